"""Interop: a reference verifier in Go (golang.org/x/mod/sumdb) checks kolm's bundles.

``tests/interop/go/kolm_interop.go`` knows nothing of kolm's code: it reads a bundle
made by a real ledger (gRPC server, SQLite), the log's verifier key as ``kolm ledger
vkey`` prints it, and optionally an older checkpoint with a consistency proof; it
verifies the checkpoint with ``note.Open``, decodes base64 with
``base64.StdEncoding.Strict()``, computes the leaf exactly as docs/FORMATS.md says,
and checks inclusion with ``tlog.CheckRecord`` and consistency with ``tlog.CheckTree``.

It must accept every bundle kolm produced and refuse: a ``sig`` whose base64 has its
padding bits set (``h==`` for ``g==``), a flipped inclusion hash, a checkpoint signed by
another key under the log's name, and an older checkpoint from a forked history or a
tampered consistency proof.

Go is a test dependency like PostgreSQL and Chromium: ``.ci/run`` installs
``golang-go`` and ``golang-golang-x-mod-dev`` (Debian), and this test fails, never
skips, where they are missing (README, "Assumptions").
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support.receipts import label_statement
from support.servers import LedgerThread

from kolm.cli.main import main as kolm_main
from kolm_ledger.formats.checkpoint import SignedCheckpoint, sign_checkpoint
from kolm_ledger.formats.note import NoteSigner
from kolm_ledger.formats.receipts import sign_statement
from kolm_ledger.keys import PrivateKey, TrustRoot, init_keys
from kolm_ledger.service.client import LedgerClient

SOURCE = Path(__file__).parents[1] / "interop" / "go" / "kolm_interop.go"
#: where Debian's golang-golang-x-mod-dev puts the sources (GOPATH layout)
GOPATH = os.environ.get("KOLM_TEST_GOPATH", "/usr/share/gocode")


@pytest.fixture(scope="module")
def go_verifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Go reference verifier, built offline in GOPATH mode."""
    go = shutil.which("go")
    if go is None:
        pytest.fail(
            "go is not installed: the interop test needs it "
            "(Debian: apt-get install -y golang-go golang-golang-x-mod-dev; .ci/run does)"
        )
    if not (Path(GOPATH) / "src/golang.org/x/mod/sumdb/tlog").is_dir():
        pytest.fail(
            f"golang.org/x/mod/sumdb is not under {GOPATH}/src "
            "(Debian: apt-get install -y golang-golang-x-mod-dev; or set KOLM_TEST_GOPATH)"
        )
    d = tmp_path_factory.mktemp("go")
    out = d / "kolm_interop"
    env = {
        **os.environ,
        "GO111MODULE": "off",
        "GOPATH": GOPATH,
        "GOCACHE": str(d / "cache"),
        "GOFLAGS": "",
        "GOTOOLCHAIN": "local",
        "CGO_ENABLED": "0",
    }
    p = subprocess.run(
        [go, "build", "-o", str(out), str(SOURCE)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    return out


def label(i: int) -> Any:
    return label_statement(input_value=f"interop ticket {i}", job_id="job-interop")


@dataclass
class Log:
    dir: Path
    trust: TrustRoot
    log_key: PrivateKey
    vkey: Path
    old_note: bytes  # the signed checkpoint at size 3
    bundles: list[dict[str, Any]]  # one per entry, against the checkpoint at size 7
    leaves: list[bytes]  # the ledger's leaf hashes
    consistency: list[bytes]  # 3 -> 7
    forked_note: bytes  # a size-3 checkpoint of another history, signed by the same log key


@contextlib.contextmanager
def _ledger(db: str, trust: TrustRoot, log_key: PrivateKey) -> Iterator[LedgerThread]:
    srv = LedgerThread(db, trust, log_key)
    try:
        yield srv
    finally:
        srv.close()


@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Log]:
    d = tmp_path_factory.mktemp("interop")
    trust = init_keys(d / "keys")
    log_key = PrivateKey.load(d / "keys" / "log.key")
    compile_key = PrivateKey.load(d / "keys" / "compile.key")
    vkey = d / "log.vkey"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert kolm_main(["ledger", "vkey", "--trust", str(d / "keys" / "trust.json")]) == 0
    vkey.write_text(buf.getvalue())
    with (
        _ledger(f"sqlite:///{d / 'ledger.db'}", trust, log_key) as srv,
        LedgerClient(srv.target) as c,
    ):
        for i in range(3):
            c.append(sign_statement(label(i), compile_key), wait=True)
        old_note = c.checkpoint().to_bytes()
        assert c.checkpoint().checkpoint.size == 3
        for i in range(3, 7):
            c.append(sign_statement(label(i), compile_key), wait=True)
        assert c.checkpoint().checkpoint.size == 7
        bundles = [c.bundle(index=i).to_json() for i in range(7)]
        leaves = [e.leaf_hash for e in c.entries()]
        consistency, _ = c.consistency_proof(3, 7)
    # the same log key and origin, another history: a split view
    with (
        _ledger(f"sqlite:///{d / 'fork.db'}", trust, log_key) as srv,
        LedgerClient(srv.target) as c,
    ):
        for i in range(3):
            c.append(sign_statement(label(100 + i), compile_key), wait=True)
        forked_note = c.checkpoint().to_bytes()
    yield Log(d, trust, log_key, vkey, old_note, bundles, leaves, consistency, forked_note)


def run(
    exe: Path,
    d: Path,
    bundle: dict[str, Any],
    vkey: Path,
    old: bytes | None = None,
    proof: list[bytes] | None = None,
) -> subprocess.CompletedProcess[str]:
    bpath = d / "b.kolm-receipt.json"
    bpath.write_text(json.dumps(bundle, indent=2))
    args = [str(exe), "-bundle", str(bpath), "-vkey", str(vkey)]
    if old is not None:
        (d / "old.note").write_bytes(old)
        (d / "proof.txt").write_text(
            "".join(base64.b64encode(h).decode() + "\n" for h in proof or [])
        )
        args += ["-old-checkpoint", str(d / "old.note"), "-consistency", str(d / "proof.txt")]
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)


def accepted(p: subprocess.CompletedProcess[str]) -> str:
    assert p.returncode == 0 and p.stdout.startswith("OK "), p.stdout + p.stderr
    return p.stdout


def refused(p: subprocess.CompletedProcess[str], phrase: str) -> None:
    assert p.returncode == 1 and p.stdout.startswith("FAIL: "), p.stdout + p.stderr
    assert phrase in p.stdout, p.stdout


def test_go_accepts_every_bundle_and_computes_the_same_leaf(
    go_verifier: Path, log: Log, tmp_path: Path
) -> None:
    assert log.vkey.read_text().count("\n") == 1
    for i, b in enumerate(log.bundles):
        assert set(b) == {"envelope", "integrated_time", "tlog_proof"}
        out = accepted(run(go_verifier, tmp_path, b, log.vkey))
        assert f"OK index={i} size=7 " in out
        assert f"leaf={base64.b64encode(log.leaves[i]).decode()}" in out


def test_go_checks_consistency_between_two_checkpoints(
    go_verifier: Path, log: Log, tmp_path: Path
) -> None:
    out = accepted(
        run(go_verifier, tmp_path, log.bundles[5], log.vkey, log.old_note, log.consistency)
    )
    assert "consistent-from=3" in out
    # a forked history signed by the same key: the proof cannot link it
    refused(
        run(go_verifier, tmp_path, log.bundles[5], log.vkey, log.forked_note, log.consistency),
        "tlog.CheckTree(3 -> 7)",
    )
    # a tampered proof
    bad = list(log.consistency)
    bad[0] = bytes([bad[0][0] ^ 1]) + bad[0][1:]
    refused(
        run(go_verifier, tmp_path, log.bundles[5], log.vkey, log.old_note, bad),
        "tlog.CheckTree(3 -> 7)",
    )


def _padding_bits_set(b64: str) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    i = len(b64.rstrip("=")) - 1
    assert i < len(b64) - 1, "no padding"
    bumped = b64[:i] + alphabet[alphabet.index(b64[i]) + 1] + b64[i + 1 :]
    assert base64.b64decode(bumped) == base64.b64decode(b64)
    return bumped


def test_go_refuses_non_canonical_base64(go_verifier: Path, log: Log, tmp_path: Path) -> None:
    b = json.loads(json.dumps(log.bundles[1]))
    sig = b["envelope"]["signatures"][0]["sig"]  # DER ECDSA, 70 or 71 bytes: padded
    b["envelope"]["signatures"][0]["sig"] = _padding_bits_set(sig)
    refused(
        run(go_verifier, tmp_path, b, log.vkey), "envelope.signatures[0].sig: not strict base64"
    )


def test_go_refuses_a_flipped_inclusion_hash(go_verifier: Path, log: Log, tmp_path: Path) -> None:
    b = json.loads(json.dumps(log.bundles[2]))
    lines = b["tlog_proof"].split("\n")
    at = next(i for i, line in enumerate(lines) if line.startswith("index ")) + 1
    raw = bytearray(base64.b64decode(lines[at]))
    raw[0] ^= 1
    lines[at] = base64.b64encode(bytes(raw)).decode()
    b["tlog_proof"] = "\n".join(lines)
    refused(run(go_verifier, tmp_path, b, log.vkey), "tlog.CheckRecord(index 2, size 7)")
    # and a changed integration time: the leaf binds it
    b = json.loads(json.dumps(log.bundles[2]))
    b["integrated_time"] += 1
    refused(run(go_verifier, tmp_path, b, log.vkey), "tlog.CheckRecord(index 2, size 7)")


def test_go_refuses_a_checkpoint_signed_by_another_key(
    go_verifier: Path, log: Log, tmp_path: Path
) -> None:
    b = json.loads(json.dumps(log.bundles[3]))
    head, _, note = b["tlog_proof"].partition("\n\n")
    cp = SignedCheckpoint.from_bytes(note.encode()).checkpoint
    other = PrivateKey.generate("ed25519")
    forged = sign_checkpoint(cp, [NoteSigner(cp.origin, other)]).to_bytes().decode()
    b["tlog_proof"] = head + "\n\n" + forged
    refused(run(go_verifier, tmp_path, b, log.vkey), "note.Open")
