"""Crash and overload campaigns against real ``kolm ledger serve`` processes.

- crash: clients stream appends while the server is killed with SIGKILL, N rounds, on
  SQLite and on PostgreSQL (a fresh database per run, dropped after), optionally with a
  witness whose cosignatures are required. After each restart every acknowledged
  (index, leaf hash) is there, the audit passes, no two checkpoints ever seen have the
  same size and different roots, and the witness holds only checkpoints the log
  committed (it never wedges);
- overload: a flood past the sequencer queue gets RESOURCE_EXHAUSTED (with a retry
  hint), the server's resident memory (``VmRSS``) stays bounded, and every accepted
  append is in the log.

CI runs them small; ``make soak`` (bench/soak.py) runs the same functions at full size
and writes the numbers to docs/RELIABILITY.md.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from support.servers import label_envelope

from kolm_ledger._crypto import PrivateKey
from kolm_ledger._pb import ledger_pb2 as pb
from kolm_ledger._pb import ledger_pb2_grpc as pb_grpc
from kolm_ledger.audit.auditor import audit
from kolm_ledger.formats.checkpoint import SignedCheckpoint
from kolm_ledger.formats.note import NoteSigner
from kolm_ledger.formats.witness import Cosigner, verify_cosignatures
from kolm_ledger.keys import TrustRoot, init_keys
from kolm_ledger.service.witness import Witness, start_witness
from kolm_ledger.storage import Store

KOLM = Path(sys.executable).with_name("kolm")
PG_ADMIN_URL = os.environ.get(
    "KOLM_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


@contextmanager
def pg_database(prefix: str = "kolm_soak") -> Iterator[str]:
    """A fresh PostgreSQL database ``<prefix>_<random>`` for one run; dropped afterwards."""
    import sqlalchemy as sa

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as c:
            c.execute(sa.text(f'CREATE DATABASE "{name}"'))
        try:
            yield PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
        finally:
            with admin.connect() as c:
                c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


class Server:
    """One ``kolm ledger serve --insecure`` process on 127.0.0.1."""

    def __init__(self, db: str, keydir: Path, ready: Path, *extra: str) -> None:
        ready.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [
                str(KOLM), "ledger", "serve", "--db", db,
                "--trust", str(keydir / "trust.json"), "--log-key", str(keydir / "log.key"),
                "--listen", "127.0.0.1:0", "--insecure", "--ready-file", str(ready),
                "--log-level", "WARNING", *extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while not (ready.exists() and ready.read_text().strip()):
            assert self.proc.poll() is None, f"serve exited {self.proc.returncode}"
            assert time.monotonic() < deadline, "serve did not become ready"
            time.sleep(0.02)
        self.target = f"127.0.0.1:{int(ready.read_text())}"

    def rss_kib(self) -> int:
        """Resident memory of the process, from /proc/<pid>/status."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill9()


@dataclass
class Acks:
    lock: threading.Lock = field(default_factory=threading.Lock)
    acked: dict[int, bytes] = field(default_factory=dict)
    roots: dict[int, bytes] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)

    def count(self) -> int:
        with self.lock:
            return len(self.acked)


def _stream(target: str, key: PrivateKey, who: str, acks: Acks, stop: threading.Event) -> None:
    i = 0

    def reqs() -> Iterator[pb.AppendStreamRequest]:
        nonlocal i
        while not stop.is_set():
            envs = [label_envelope(key, who, i + j).to_bytes() for j in range(20)]
            i += 20
            yield pb.AppendStreamRequest(batch_id=i, envelopes=envs, wait_for_checkpoint=False)
            time.sleep(0.005)

    with grpc.insecure_channel(target) as ch:
        try:
            for resp in pb_grpc.LedgerStub(ch).AppendStream(reqs(), timeout=120):
                with acks.lock:
                    for r in resp.results:
                        if r.WhichOneof("result") == "ok":
                            acks.acked[r.ok.index] = r.ok.leaf_hash
                        else:
                            acks.errors[str(r.error.code)] = (
                                acks.errors.get(str(r.error.code), 0) + 1
                            )
        except grpc.RpcError as e:
            with acks.lock:
                acks.errors[e.code().name] = acks.errors.get(e.code().name, 0) + 1


def crash_campaign(
    workdir: Path,
    rounds: int,
    acks_per_round: int,
    clients: int = 2,
    *,
    db: str | None = None,
    witness: bool = False,
) -> dict[str, object]:
    """Kill -9 the ledger during streamed appends ``rounds`` times; check and report.

    ``db``: the database URL (default a SQLite file in ``workdir``). ``witness``: serve
    with one witness (``--witness-policy required``) and check after each restart that
    it holds exactly a checkpoint the log committed, and that the newest checkpoint
    carries its cosignature (re-offered when the ledger opens).
    """
    keydir = workdir / "keys"
    if not keydir.exists():
        init_keys(keydir)
    trust = TrustRoot.load(keydir / "trust.json")
    compile_key = PrivateKey.load(keydir / "compile.key")
    db = db or f"sqlite:///{workdir / 'ledger.db'}"
    extra: list[str] = []
    wit: Witness | None = None
    if witness:
        log_key = PrivateKey.load(keydir / "log.key")
        origin = trust.get(log_key.keyid()).origin
        assert origin is not None
        cosigner = Cosigner("witness.test/crash", PrivateKey.generate("ed25519"))
        wit = Witness(cosigner, workdir / "witness.json", [NoteSigner(origin, log_key).verifier()])
        wsrv = start_witness(wit)
        extra = [
            "--witness", f"http://127.0.0.1:{wsrv.server_address[1]}",
            "--witness-policy", "required",
        ]  # fmt: skip
    acks = Acks()
    t0 = time.monotonic()
    try:
        for rnd in range(rounds):
            _crash_round(rnd, db, keydir, workdir, trust, compile_key, acks, clients,
                         acks_per_round, extra, wit)  # fmt: skip
    finally:
        if wit is not None:
            wsrv.shutdown()
            wsrv.server_close()
    out: dict[str, object] = {
        "engine": db.split(":", 1)[0].split("+", 1)[0],
        "rounds": rounds,
        "acknowledged": acks.count(),
        "client_errors": dict(acks.errors),
        "seconds": round(time.monotonic() - t0, 1),
    }
    if wit is not None:
        out["witness_size"] = wit.latest(origin)[0]
    return out


def _crash_round(
    rnd: int,
    db: str,
    keydir: Path,
    workdir: Path,
    trust: TrustRoot,
    compile_key: PrivateKey,
    acks: Acks,
    clients: int,
    acks_per_round: int,
    extra: list[str],
    wit: Witness | None,
) -> None:
    srv = Server(db, keydir, workdir / "port", "--max-wait-ms", "2", *extra)
    stop = threading.Event()
    start = acks.count()
    threads = [
        threading.Thread(target=_stream, args=(srv.target, compile_key, f"r{rnd}c{c}", acks, stop))
        for c in range(clients)
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while acks.count() - start < acks_per_round:
        assert time.monotonic() < deadline, f"round {rnd}: too few acks {acks.errors}"
        time.sleep(0.01)
    srv.kill9()
    stop.set()
    for t in threads:
        t.join(60)
    # restart: every acknowledged entry is there, with its leaf hash
    srv = Server(db, keydir, workdir / "port", *extra)
    with grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.LedgerStub(ch)
        cp = stub.GetCheckpoint(pb.GetCheckpointRequest(), timeout=30)
        got = {e.index: e.leaf_hash for e in stub.GetEntries(pb.GetEntriesRequest(), timeout=60)}
    with acks.lock:
        missing = [i for i, h in acks.acked.items() if got.get(i) != h]
        assert not missing, f"round {rnd}: {len(missing)} acknowledged entries missing"
        old = acks.roots.get(cp.size)
        assert old in (None, cp.root), f"two checkpoints of size {cp.size} with different roots"
        acks.roots[cp.size] = cp.root
    srv.stop()
    store = Store(db)
    try:
        for size, root in list(acks.roots.items()):
            stored = store.checkpoint_at(size)
            assert stored.root == root, f"checkpoint {size} changed its root"
        rep = audit(store, trust)
        assert rep.ok, [str(f) for f in rep.failures][:10]
        if wit is not None:
            # the witness holds a checkpoint the log committed, never one it lost; the
            # restarted ledger re-offered its newest checkpoint, which now carries the
            # witness's cosignature
            latest = store.latest_checkpoint()
            assert latest is not None
            wsize, wroot = wit.latest(latest.note.split(b"\n", 1)[0].decode())
            assert store.checkpoint_at(wsize).root == wroot, f"round {rnd}: witness forked"
            assert wsize == latest.size, f"round {rnd}: witness at {wsize}, log {latest.size}"
            note = SignedCheckpoint.from_bytes(latest.note).note
            assert verify_cosignatures(note, [wit.cosigner.verifier()]), f"round {rnd}"
    finally:
        store.close()


def overload_campaign(
    workdir: Path, senders: int, messages: int, per_message: int, max_queue: int
) -> dict[str, object]:
    """Flood one server past ``max_queue``; check refusals, memory and accepted work."""
    keydir = workdir / "keys"
    if not keydir.exists():
        init_keys(keydir)
    trust = TrustRoot.load(keydir / "trust.json")
    key = PrivateKey.load(keydir / "compile.key")
    db = f"sqlite:///{workdir / 'overload.db'}"
    envs = [
        [
            [label_envelope(key, f"s{s}m{m}", j).to_bytes() for j in range(per_message)]
            for m in range(messages)
        ]
        for s in range(senders)
    ]
    srv = Server(
        db, keydir, workdir / "port", "--max-queue", str(max_queue), "--max-batch", "100",
        "--max-wait-ms", "20",
    )  # fmt: skip
    rss0 = srv.rss_kib()
    peak = [rss0]
    ok: dict[int, bytes] = {}
    codes: dict[str, int] = {}
    retry_hints: list[int] = []
    lock = threading.Lock()
    done = threading.Event()

    def sender(s: int) -> None:
        with grpc.insecure_channel(srv.target) as ch:
            reqs = (pb.AppendStreamRequest(batch_id=m, envelopes=e) for m, e in enumerate(envs[s]))
            for resp in pb_grpc.LedgerStub(ch).AppendStream(reqs, timeout=300):
                with lock:
                    for r in resp.results:
                        if r.WhichOneof("result") == "ok":
                            ok[r.ok.index] = r.ok.leaf_hash
                        else:
                            name = grpc.StatusCode(
                                next(c for c in grpc.StatusCode if c.value[0] == r.error.code)
                            ).name
                            codes[name] = codes.get(name, 0) + 1
                            if r.error.retry_after_ms:
                                retry_hints.append(r.error.retry_after_ms)

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], srv.rss_kib())
            time.sleep(0.05)

    t0 = time.monotonic()
    sampler = threading.Thread(target=sample)
    sampler.start()
    threads = [threading.Thread(target=sender, args=(s,)) for s in range(senders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    done.set()
    sampler.join()
    elapsed = time.monotonic() - t0
    with grpc.insecure_channel(srv.target) as ch:
        got = {
            e.index: e.leaf_hash
            for e in pb_grpc.LedgerStub(ch).GetEntries(pb.GetEntriesRequest(), timeout=120)
        }
    srv.stop()
    missing = [i for i, h in ok.items() if got.get(i) != h]
    store = Store(db)
    try:
        rep = audit(store, trust)
    finally:
        store.close()
    return {
        "sent": senders * messages * per_message,
        "accepted": len(ok),
        "refused": codes,
        "retry_after_ms_min": min(retry_hints) if retry_hints else None,
        "missing_accepted": len(missing),
        "rss_start_mib": round(rss0 / 1024, 1),
        "rss_peak_mib": round(peak[0] / 1024, 1),
        "audit_ok": rep.ok,
        "seconds": round(elapsed, 1),
    }


# ---- CI size -----------------------------------------------------------------------------


def test_kill9_during_streamed_appends_loses_nothing_acknowledged(tmp_path: Path) -> None:
    r = crash_campaign(tmp_path, rounds=2, acks_per_round=150)
    assert r["acknowledged"] >= 300  # type: ignore[operator]


@pytest.mark.postgres
def test_kill9_on_postgresql_loses_nothing_acknowledged(tmp_path: Path) -> None:
    with pg_database("kolm_test_crash") as db:
        r = crash_campaign(tmp_path, rounds=2, acks_per_round=150, db=db)
    assert r["engine"] == "postgresql"
    assert r["acknowledged"] >= 300  # type: ignore[operator]


def test_kill9_with_a_required_witness_never_wedges_it(tmp_path: Path) -> None:
    """Cosignatures come after the commit: a kill -9 at any point leaves the witness at a
    checkpoint the log committed, and the restarted ledger gets its newest one cosigned."""
    r = crash_campaign(tmp_path, rounds=2, acks_per_round=100, witness=True)
    assert r["acknowledged"] >= 200 and r["witness_size"] >= 200  # type: ignore[operator]


def test_flood_past_the_queue_is_refused_memory_bounded_accepted_work_lands(
    tmp_path: Path,
) -> None:
    r = overload_campaign(tmp_path, senders=4, messages=6, per_message=250, max_queue=300)
    assert r["refused"].get("RESOURCE_EXHAUSTED", 0) > 0, r  # type: ignore[attr-defined]
    assert r["accepted"] > 0 and r["missing_accepted"] == 0, r  # type: ignore[operator]
    assert r["audit_ok"], r
    assert r["retry_after_ms_min"] and r["retry_after_ms_min"] >= 5, r  # type: ignore[operator]
    # bounded: the queue holds at most 300 small envelopes, far below this margin
    assert r["rss_peak_mib"] - r["rss_start_mib"] < 256, r  # type: ignore[operator]
