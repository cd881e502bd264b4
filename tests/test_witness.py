"""C2SP tlog-witness: the protocol's answers, persistence, and the ledger collecting cosignatures.

Witnesses run as real HTTP servers on 127.0.0.1 (in a thread, and once as a
``kolm witness serve`` process); the ledger POSTs each new checkpoint with a
consistency proof, and ``kolm verify --witnesses`` enforces a cosignature policy.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_ledger_service import Keys, keys, label_env  # noqa: F401

from kolm_ledger import merkle
from kolm_ledger._crypto import PrivateKey
from kolm_ledger.checkpoint import Checkpoint, sign_checkpoint
from kolm_ledger.cli import main as kolm_main
from kolm_ledger.errors import CheckpointError, UnavailableError
from kolm_ledger.ledger import Ledger
from kolm_ledger.note import Note, NoteSigner
from kolm_ledger.storage import Store
from kolm_ledger.verify import verify_bundle
from kolm_ledger.witness import (
    CosignatureVerifier,
    Cosigner,
    Witness,
    add_checkpoint,
    cosignature_key_id,
    start_witness,
    verify_cosignatures,
)

KOLM = Path(sys.executable).with_name("kolm")
ORIGIN = "kolm.dev/ledger"


def _tree(n: int) -> merkle.MemoryTree:
    t = merkle.MemoryTree()
    for i in range(n):
        t.append(merkle.hash_leaf(b"leaf %d" % i))
    return t


def _note(signer: NoteSigner, t: merkle.MemoryTree, size: int) -> bytes:
    cp = Checkpoint(signer.name, size, t.root(size), bytes(32))
    return sign_checkpoint(cp, [signer]).to_bytes()


def _req(old: int, proof: list[bytes], note: bytes) -> bytes:
    return (
        f"old {old}\n".encode()
        + b"".join(base64.b64encode(h) + b"\n" for h in proof)
        + (b"\n" + note)
    )


@pytest.fixture
def log_signer() -> NoteSigner:
    return NoteSigner(ORIGIN, PrivateKey.generate("ed25519"))


@pytest.fixture
def cosigner() -> Cosigner:
    return Cosigner("witness.test/w1", PrivateKey.generate("ed25519"))


def test_cosignature_format_matches_the_spec(cosigner: Cosigner) -> None:
    v = cosigner.verifier()
    assert CosignatureVerifier.from_vkey(v.vkey()) == v
    assert v.vkey().split("+", 2)[1] == cosignature_key_id(v.name, v.key).hex()
    assert base64.b64decode(v.vkey().split("+", 2)[2])[0] == 0x04
    text = f"{ORIGIN}\n5\n{base64.b64encode(bytes(32)).decode()}\n"
    sig = cosigner.cosign(text, 1679315147)
    assert len(sig.sig) == 72 and sig.sig[:8] == (1679315147).to_bytes(8, "big")
    assert v.verify(text, sig) == 1679315147
    # the signed message is exactly "cosignature/v1\ntime <t>\n" + note text
    v.key.verify(sig.sig[8:], b"cosignature/v1\ntime 1679315147\n" + text.encode())


def test_witness_protocol_answers(
    tmp_path: Path, log_signer: NoteSigner, cosigner: Cosigner
) -> None:
    w = Witness(cosigner, tmp_path / "state.json", [log_signer.verifier()])
    t = _tree(10)
    # first contact: old 0, empty proof
    status, _, body = w.add_checkpoint(_req(0, [], _note(log_signer, t, 4)))
    assert status == 200, body
    note = Note.from_bytes(_note(log_signer, t, 4) + b"")
    cosig = Note(
        note.text,
        (*note.signatures, *Note.from_bytes(note.text.encode() + b"\n" + body).signatures),
    )
    assert verify_cosignatures(cosig, [cosigner.verifier()]) == ["witness.test/w1"]
    state = json.loads((tmp_path / "state.json").read_text())
    assert state[ORIGIN]["size"] == 4
    # stale old size: 409 with the size it knows
    status, ct, body = w.add_checkpoint(_req(0, [], _note(log_signer, t, 7)))
    assert (status, ct, body) == (409, "text/x.tlog.size", b"4\n")
    # a correct consistency proof
    status, _, _ = w.add_checkpoint(_req(4, t.consistency_proof(4, 7), _note(log_signer, t, 7)))
    assert status == 200
    # a wrong proof: 422, state unchanged
    bad = [bytes(32)] * len(t.consistency_proof(7, 9))
    assert w.add_checkpoint(_req(7, bad, _note(log_signer, t, 9)))[0] == 422
    assert w.latest(ORIGIN)[0] == 7
    # old beyond the checkpoint: 400; malformed: 400
    assert w.add_checkpoint(_req(9, [], _note(log_signer, t, 7)))[0] == 400
    assert w.add_checkpoint(b"garbage")[0] == 400
    assert w.add_checkpoint(b"old 01\n\n" + _note(log_signer, t, 7))[0] == 400
    # unknown origin: 404; a signature by an untrusted key: 403
    other = NoteSigner("other.log", PrivateKey.generate("ed25519"))
    assert w.add_checkpoint(_req(0, [], _note(other, t, 3)))[0] == 404
    forger = NoteSigner(ORIGIN, PrivateKey.generate("ed25519"))
    assert w.add_checkpoint(_req(7, t.consistency_proof(7, 9), _note(forger, t, 9)))[0] == 403
    # equal size, different root: 409 (a fork)
    t2 = _tree(6)
    t2.append(merkle.hash_leaf(b"fork"))
    assert w.add_checkpoint(_req(7, [], _note(log_signer, t2, 7)))[0] == 409
    # equal size, same root: cosigned again
    assert w.add_checkpoint(_req(7, [], _note(log_signer, t, 7)))[0] == 200
    # a restarted witness keeps its state
    w2 = Witness(cosigner, tmp_path / "state.json", [log_signer.verifier()])
    assert w2.latest(ORIGIN) == (7, t.root(7))
    assert not (tmp_path / "state.json.tmp").exists()


def test_witness_over_http_and_client_errors(
    tmp_path: Path, log_signer: NoteSigner, cosigner: Cosigner
) -> None:
    srv = start_witness(Witness(cosigner, tmp_path / "s.json", [log_signer.verifier()]))
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        t = _tree(3)
        (sig,) = add_checkpoint(url, 0, [], _note(log_signer, t, 3))
        assert cosigner.verifier().verify(Note.from_bytes(_note(log_signer, t, 3)).text, sig)
        from kolm_ledger.witness import WitnessConflict

        with pytest.raises(WitnessConflict) as e:
            add_checkpoint(url, 0, [], _note(log_signer, t, 3))
        assert e.value.size == 3
        with pytest.raises(UnavailableError, match="answered 404"):
            add_checkpoint(url, 3, [], _note(NoteSigner("x.log", log_signer.key), t, 3))
    finally:
        srv.shutdown()
        srv.server_close()
    with pytest.raises(UnavailableError, match="unreachable"):
        add_checkpoint(url, 0, [], _note(log_signer, _tree(1), 1), timeout=2)


def _witnesses(tmp_path: Path, keys: Keys, n: int) -> tuple[list[str], list[Cosigner], list]:  # noqa: F811
    log_v = NoteSigner(ORIGIN, keys.log).verifier()
    urls, cosigners, servers = [], [], []
    for i in range(n):
        c = Cosigner(f"witness.test/w{i}", PrivateKey.generate("ed25519"))
        s = start_witness(Witness(c, tmp_path / f"w{i}.json", [log_v]))
        urls.append(f"http://127.0.0.1:{s.server_address[1]}")
        cosigners.append(c)
        servers.append(s)
    return urls, cosigners, servers


def test_ledger_collects_cosignatures_and_verify_enforces_policy(
    tmp_path: Path,
    keys: Keys,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    urls, cosigners, servers = _witnesses(tmp_path, keys, 2)
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    try:
        led = Ledger(Store(db), keys.trust, keys.log, witnesses=urls, witness_policy="required")
        for b in range(4):
            led.append([label_env(keys.compile, 10 * b + i) for i in range(b + 1)])
        bundle = led.bundle(3)
        vs = [c.verifier() for c in cosigners]
        assert verify_bundle(bundle, keys.trust, witnesses=vs, min_witnesses=2).index == 3
        led.store.close()
        # a restarted ledger (no memory of witness sizes) re-syncs from their 409 answers
        led = Ledger(Store(db), keys.trust, keys.log, witnesses=urls, witness_policy="required")
        led.append([label_env(keys.compile, 99)])
        assert len(led.checkpoint().note.signatures) == 3
        # the CLI: kolm verify --witnesses FILE --min-witnesses K
        (tmp_path / "b.json").write_bytes(led.bundle(10).to_bytes())
        (tmp_path / "w.txt").write_text("# witnesses\n" + "\n".join(v.vkey() for v in vs) + "\n")
        args = ["verify", str(tmp_path / "b.json"), "--trust", str(keys.dir / "trust.json")]
        assert kolm_main([*args, "--witnesses", str(tmp_path / "w.txt")]) == 0
        capsys.readouterr()
        # required, and one witness is down: the batch fails and nothing is written
        servers[1].shutdown()
        servers[1].server_close()
        size = led.size
        refused = label_env(keys.compile, 100)
        with pytest.raises(UnavailableError, match="did not cosign"):
            led.append([refused])
        assert led.size == size
        led.store.close()
        # best-effort: published with the cosignatures that came back. The refused batch
        # is retried as is: witness 0 already cosigned that exact checkpoint (the root and
        # chain depend only on the leaves), so it cosigns it again
        led = Ledger(Store(db), keys.trust, keys.log, witnesses=urls, witness_policy="best-effort")
        led.append([refused])
        (tmp_path / "b2.json").write_bytes(led.bundle(size).to_bytes())
        led.store.close()
        with pytest.raises(CheckpointError, match=r"1 valid witness cosignature.*want at least 2"):
            verify_bundle(
                led_bundle(tmp_path / "b2.json"), keys.trust, witnesses=vs, min_witnesses=2
            )
        assert (
            kolm_main(
                [
                    *args[:1],
                    str(tmp_path / "b2.json"),
                    *args[2:],
                    "--witnesses",
                    str(tmp_path / "w.txt"),
                    "--min-witnesses",
                    "1",
                ]
            )
            == 0
        )
        assert (
            kolm_main(
                [
                    *args[:1],
                    str(tmp_path / "b2.json"),
                    *args[2:],
                    "--witnesses",
                    str(tmp_path / "w.txt"),
                ]
            )
            == 1
        )
        assert "FAILED at step 6" in capsys.readouterr().out
    finally:
        servers[0].shutdown()
        servers[0].server_close()


def led_bundle(path: Path):  # type: ignore[no-untyped-def]
    from kolm_ledger.bundle import Bundle

    return Bundle.from_bytes(path.read_bytes())


def test_witness_serve_process(tmp_path: Path, keys: Keys) -> None:  # noqa: F811
    out = subprocess.run(
        [str(KOLM), "witness", "keygen", "--key", str(tmp_path / "w.key"), "--name", "w.test/p"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    vkey = CosignatureVerifier.from_vkey(out)
    log_vkey = subprocess.run(
        [str(KOLM), "ledger", "vkey", "--trust", str(keys.dir / "trust.json")],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    ready = tmp_path / "port"
    proc = subprocess.Popen(
        [
            str(KOLM),
            "witness",
            "serve",
            "--key",
            str(tmp_path / "w.key"),
            "--name",
            "w.test/p",
            "--state",
            str(tmp_path / "state.json"),
            "--log-vkey",
            log_vkey,
            "--listen",
            "127.0.0.1:0",
            "--ready-file",
            str(ready),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.05)
        url = f"http://127.0.0.1:{ready.read_text()}"
        led = Ledger(
            Store(f"sqlite:///{tmp_path / 'l.db'}"),
            keys.trust,
            keys.log,
            witnesses=[url],
            witness_policy="required",
        )
        led.append([label_env(keys.compile, 0)])
        led.append([label_env(keys.compile, 1), label_env(keys.compile, 2)])
        b = led.bundle(0)
        led.store.close()
        assert verify_bundle(b, keys.trust, witnesses=[vkey], min_witnesses=1).index == 0
        assert json.loads((tmp_path / "state.json").read_text())[ORIGIN]["size"] == 3
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
