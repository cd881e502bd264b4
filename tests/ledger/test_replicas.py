"""Several ``kolm ledger serve`` replicas on one PostgreSQL build exactly one chain.

Three server processes share a fresh database; writer processes append to all three
at once, through ``AppendStream`` and ``Append``. Afterwards there is one log with
indices 0..n-1, every acknowledged (index, leaf hash) is in it, every replica serves
the same newest checkpoint and proves every older checkpoint consistent with it, and
both audits (``--db`` and ``--ledger``) pass.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.servers import label_envelope

from kolm_ledger._crypto import PrivateKey
from kolm_ledger.audit.auditor import audit
from kolm_ledger.errors import KolmError
from kolm_ledger.formats.checkpoint import check_consistent, verify_checkpoint
from kolm_ledger.formats.leaf import entry_leaf_hash
from kolm_ledger.formats.receipts import key_statement, sign_statement
from kolm_ledger.keys import TrustRoot
from kolm_ledger.service.client import LedgerClient
from kolm_ledger.storage import Store

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

KOLM = Path(sys.executable).with_name("kolm")
REPLICAS = 3
WRITERS = 4
ROUNDS = 3  # per writer and replica: one AppendStream call of STREAM_N envelopes + UNARY_N Appends
STREAM_N = 8
UNARY_N = 2

# A writer process: appends to every replica in turn and prints its acknowledgements as
# JSON [index, leaf hash hex, the envelope's own leaf hash hex (recomputed from it and the
# answer's integration time: log format v2), how it was appended].
WRITER = r"""
import json, sys
from kolm_ledger._crypto import PrivateKey
from kolm_ledger.service.client import AppendResult, LedgerClient
from kolm_ledger.formats.leaf import entry_leaf_hash
from kolm_ledger.formats.receipts import label_statement, sign_statement

def own(e, res):
    return entry_leaf_hash(e, res.integrated_time_us).hex()

keydir, wid, targets = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
rounds, stream_n, unary_n = map(int, sys.argv[4:7])
key = PrivateKey.load(keydir + "/compile.key")

def env(i):
    st = label_statement(
        input_value=f"writer {wid} ticket {i}", output_value="card_arrival",
        task={"name": "router"}, teacher={"backend": "simulated"}, k=1,
        votes={"card_arrival": 1}, sample_digests=[], verifier={"name": "label_set"},
        agreement=1.0, job_id=f"job-writer-{wid}")
    return sign_statement(st, key)

clients = [LedgerClient(t) for t in targets]
acks, n = [], 0
for r in range(rounds):
    for c in clients:
        batch = [env(n + j) for j in range(stream_n)]
        n += stream_n
        for e, res in zip(batch, c.append_many(batch, batch=3), strict=True):
            assert isinstance(res, AppendResult), res
            acks.append([res.index, res.leaf_hash.hex(), own(e, res), "stream"])
        for _ in range(unary_n):
            e = env(n)
            n += 1
            res = c.append(e)
            acks.append([res.index, res.leaf_hash.hex(), own(e, res), "unary"])
for c in clients:
    c.close()
print(json.dumps(acks))
"""


def _wait_ready(
    procs: list[tuple[subprocess.Popen[bytes], Path]], timeout: float = 60
) -> list[int]:
    ports: list[int | None] = [None] * len(procs)
    deadline = time.monotonic() + timeout
    while None in ports:
        assert time.monotonic() < deadline, "replicas did not become ready"
        for i, (p, ready) in enumerate(procs):
            if ports[i] is None and ready.exists() and ready.read_text().strip():
                ports[i] = int(ready.read_text())
            elif p.poll() is not None:
                err = p.stderr.read().decode() if p.stderr else ""
                raise AssertionError(f"replica {i} exited {p.returncode}: {err[-2000:]}")
        time.sleep(0.05)
    return [p for p in ports if p is not None]


@pytest.fixture
def replicas(pg_url: str, keydir: Path, tmp_path: Path) -> Iterator[list[str]]:
    """Three ``kolm ledger serve`` processes on one fresh PostgreSQL database (started together)."""
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []
    try:
        for i in range(REPLICAS):
            ready = tmp_path / f"ready-{i}"
            p = subprocess.Popen(
                [
                    str(KOLM),
                    "ledger",
                    "serve",
                    "--insecure",
                    "--db",
                    pg_url,
                    "--trust",
                    str(keydir / "trust.json"),
                    "--log-key",
                    str(keydir / "log.key"),
                    "--listen",
                    "127.0.0.1:0",
                    "--ready-file",
                    str(ready),
                    "--log-level",
                    "WARNING",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            procs.append((p, ready))
        yield [f"127.0.0.1:{port}" for port in _wait_ready(procs)]
    finally:
        for p, _ in procs:
            p.terminate()
        for p, _ in procs:
            try:
                _, err = p.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.communicate()
                raise
            assert p.returncode == 0, err.decode()[-2000:]


def test_replicas_on_one_postgres_build_one_chain(
    replicas: list[str], pg_url: str, keydir: Path, tmp_path: Path
) -> None:
    trust = TrustRoot.load(keydir / "trust.json")
    # each writer starts on a different replica, so all three sequence at once
    writers = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                WRITER,
                str(keydir),
                str(w),
                ",".join(replicas[w % REPLICAS :] + replicas[: w % REPLICAS]),
                str(ROUNDS),
                str(STREAM_N),
                str(UNARY_N),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONWARNINGS": "error"},
        )
        for w in range(WRITERS)
    ]
    acks: list[tuple[int, str, str, str]] = []
    for w in writers:
        out, err = w.communicate(timeout=180)
        assert w.returncode == 0, err.decode()[-3000:]
        acks += [tuple(a) for a in json.loads(out)]  # type: ignore[misc]
    n = WRITERS * ROUNDS * REPLICAS * (STREAM_N + UNARY_N)
    assert len(acks) == n
    assert {a[3] for a in acks} == {"stream", "unary"}

    # key receipts sequenced by one replica bind the others at once: a key registered
    # through replica 0 signs through replica 1; once revoked through replica 0, replica 2
    # (which accepted it a moment ago) refuses it
    admin = PrivateKey.load(keydir / "admin.key")
    k = PrivateKey.generate()
    reg = sign_statement(
        key_statement(action="register", public_key=k.public_key(), role="compile"), admin
    )
    rev = sign_statement(
        key_statement(action="revoke", public_key=k.public_key(), role="compile"), admin
    )
    c0, c1, c2 = (LedgerClient(t) for t in replicas)
    try:
        # (each receipt made when its turn comes: a label dated before the registration
        # took effect, its key's not_before, would be refused)
        steps = [
            (c0, lambda: reg),
            (c1, lambda: label_envelope(k, "keys", 1)),
            (c2, lambda: label_envelope(k, "keys", 2)),
            (c0, lambda: rev),
        ]
        for c, make in steps:
            env = make()
            r = c.append(env)
            own = entry_leaf_hash(env, r.integrated_time_us).hex()
            acks.append((r.index, r.leaf_hash.hex(), own, "unary"))
        for c in (c2, c1):
            with pytest.raises(
                KolmError, match=f"key {k.keyid()[:16]} \\(compile\\) was revoked at"
            ) as e:
                c.append(label_envelope(k, "keys", 3))
            assert e.value.grpc_code == "FAILED_PRECONDITION"
    finally:
        for c in (c0, c1, c2):
            c.close()
    n += len(steps)

    # every acknowledgement is for its own envelope, and no index was handed out twice
    for index, leaf, own, _ in acks:
        assert leaf == own, f"index {index} acknowledged with another envelope's leaf hash"
    assert sorted(a[0] for a in acks) == list(range(n)), "duplicate or missing index"

    # the database holds exactly those entries, at those indices: one chain, no fork
    store = Store(pg_url)
    try:
        entries = list(store.entries())
        assert [e.index for e in entries] == list(range(n))
        by_index = {e.index: e.leaf_hash.hex() for e in entries}
        for index, leaf, _, _ in acks:
            assert by_index[index] == leaf
        cps = list(store.checkpoints())
        rep = audit(store, trust)
        assert rep.ok, [str(f) for f in rep.failures[:20]]
        assert rep.entries == n and rep.size == n
    finally:
        store.close()
    sizes = [c.size for c in cps]
    assert sizes == sorted(set(sizes)) and sizes[-1] == n

    # every replica serves the same newest checkpoint and proves the history consistent
    newest = {}
    for target in replicas:
        with LedgerClient(target) as c:
            head = verify_checkpoint(c.checkpoint().to_bytes(), trust).checkpoint
            newest[target] = head
            for sc in cps[:: max(1, len(cps) // 10)]:
                old = verify_checkpoint(sc.note, trust).checkpoint
                hashes, _ = c.consistency_proof(old.size, head.size)
                check_consistent(old, head, hashes)
            assert c.bundle(index=n - 1).tlog_proof.index == n - 1
    assert len({(h.size, h.root, h.chain_head) for h in newest.values()}) == 1

    # both audits pass through the command line
    trust_path = str(keydir / "trust.json")
    for argv in (
        ["audit", "--db", pg_url, "--trust", trust_path],
        ["audit", "--ledger", replicas[1], "--trust", trust_path, "--state", str(tmp_path / "s")],
    ):
        r = subprocess.run([str(KOLM), *argv], capture_output=True, timeout=120)
        assert r.returncode == 0, (argv, r.stdout.decode(), r.stderr.decode())
        assert f"OK: {n} entries (key 2, label {n - 2})" in r.stdout.decode()
