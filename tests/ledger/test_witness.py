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

from kolm.cli.main import main as kolm_main
from kolm_ledger._crypto import PrivateKey
from kolm_ledger.errors import CheckpointError, UnavailableError
from kolm_ledger.formats import merkle
from kolm_ledger.formats.checkpoint import Checkpoint, sign_checkpoint
from kolm_ledger.formats.note import Note, NoteSigner
from kolm_ledger.formats.witness import (
    CosignatureVerifier,
    Cosigner,
    cosignature_key_id,
    verify_cosignatures,
)
from kolm_ledger.log.ledger import Ledger
from kolm_ledger.log.witnessing import add_checkpoint
from kolm_ledger.service.witness import Witness, start_witness
from kolm_ledger.storage import Store
from kolm_ledger.verify.receipt import verify_bundle

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
        from kolm_ledger.log.witnessing import WitnessConflict

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
        # required, and one witness is down: the append fails (UNAVAILABLE) but its
        # entries are committed, with the cosignature that did come back
        servers[1].shutdown()
        servers[1].server_close()
        size = led.size
        refused = label_env(keys.compile, 100)
        with pytest.raises(UnavailableError, match="did not cosign checkpoint 12"):
            led.append([refused])
        assert led.size == size + 1
        # a retry is a duplicate that waits for the cosignatures again (and fails again)
        with pytest.raises(UnavailableError, match="did not cosign checkpoint 12"):
            led.append([refused])
        assert led.size == size + 1
        led.store.close()
        # best-effort: the retried append is acknowledged as a duplicate; the checkpoint
        # is served with the one cosignature that came back
        led = Ledger(Store(db), keys.trust, keys.log, witnesses=urls, witness_policy="best-effort")
        (dup,) = led.append([refused])
        assert dup.duplicate and dup.index == size
        assert len(led.checkpoint().note.signatures) == 2
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
    from kolm_ledger.formats.bundle import Bundle

    return Bundle.from_bytes(path.read_bytes())


def test_witnesses_are_asked_at_once(tmp_path: Path, keys: Keys) -> None:  # noqa: F811
    """Each of these witnesses answers only once the other one has been asked too: asked
    one at a time, the first would hold the round until the ledger's witness timeout and
    the required append would fail. Asked at once, every append is cosigned by both."""
    import threading

    rendezvous = threading.Barrier(2, timeout=30)

    class Rendezvous(Witness):
        def add_checkpoint(self, body: bytes) -> tuple[int, str, bytes]:
            rendezvous.wait()
            return super().add_checkpoint(body)

    log_v = NoteSigner(ORIGIN, keys.log).verifier()
    cosigners = [Cosigner(f"witness.test/r{i}", PrivateKey.generate("ed25519")) for i in (0, 1)]
    servers = [
        start_witness(Rendezvous(c, tmp_path / f"r{i}.json", [log_v]))
        for i, c in enumerate(cosigners)
    ]
    urls = [f"http://127.0.0.1:{s.server_address[1]}" for s in servers]
    led = Ledger(
        Store(f"sqlite:///{tmp_path / 'ledger.db'}"), keys.trust, keys.log,
        witnesses=urls, witness_policy="required", witness_timeout=5,
    )  # fmt: skip
    try:
        for b in range(3):
            led.append([label_env(keys.compile, 10 * b + i) for i in range(b + 1)])
            assert len(led.checkpoint().note.signatures) == 3  # the log's and both witnesses'
        vs = [c.verifier() for c in cosigners]
        assert verify_bundle(led.bundle(5), keys.trust, witnesses=vs, min_witnesses=2).index == 5
        assert led._witness_pool is not None
        led.close()
        assert led._witness_pool is None
    finally:
        rendezvous.abort()  # a witness still waiting (only if the test failed) gives up
        led.store.close()
        for s in servers:
            s.shutdown()
            s.server_close()


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


# ---- the witness wedge (issue #6) -------------------------------------------------------


def _witness_state(path: Path) -> tuple[int, bytes]:
    s = json.loads(path.read_text())[ORIGIN]
    return int(s["size"]), base64.b64decode(s["root"])


def test_a_batch_lost_before_commit_never_wedges_a_witness(
    tmp_path: Path,
    keys: Keys,  # noqa: F811
) -> None:
    """The wedge: a witness cosigned size N, then the batch's commit failed (a crash, a lost
    connection). If the witness saw that checkpoint, the next, different batch at size N
    is a fork to it and it refuses the log forever. Cosigning after the commit means a
    witness only ever sees checkpoints the log committed."""
    import sqlalchemy as sa

    from kolm_ledger.errors import StorageError

    urls, cosigners, servers = _witnesses(tmp_path, keys, 1)
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    try:
        led = Ledger(Store(db), keys.trust, keys.log, witnesses=urls, witness_policy="required")
        led.append([label_env(keys.compile, 0)])
        fail = [True]

        def connection_lost_at_commit(conn: object) -> None:
            if fail:
                fail.clear()
                raise StorageError("ledger write failed: server closed the connection")

        sa.event.listen(led.store.engine, "commit", connection_lost_at_commit)
        with pytest.raises(StorageError):
            led.append([label_env(keys.compile, 1), label_env(keys.compile, 2)])
        sa.event.remove(led.store.engine, "commit", connection_lost_at_commit)
        assert led.size == 1
        # a different batch that reaches the same size (3): accepted and cosigned
        led.append([label_env(keys.compile, 3), label_env(keys.compile, 4)])
        led.append([label_env(keys.compile, 5)])
        assert led.size == 4
        vs = [c.verifier() for c in cosigners]
        assert verify_bundle(led.bundle(2), keys.trust, witnesses=vs, min_witnesses=1).index == 2
        # the witness holds exactly the log's newest committed checkpoint
        assert _witness_state(tmp_path / "w0.json") == (4, led.checkpoint().checkpoint.root)
        led.store.close()
    finally:
        servers[0].shutdown()
        servers[0].server_close()


def test_a_crash_between_commit_and_cosigning_is_healed_when_the_ledger_opens(
    tmp_path: Path,
    keys: Keys,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The batch committed, then the process died before any witness was asked: the
    newest checkpoint has no cosignature. Opening the ledger offers it again."""
    import kolm_ledger.log.witnessing as ledger_module

    urls, cosigners, servers = _witnesses(tmp_path, keys, 2)
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    vs = [c.verifier() for c in cosigners]
    try:
        led = Ledger(Store(db), keys.trust, keys.log, witnesses=urls, witness_policy="required")
        led.append([label_env(keys.compile, 0)])

        def killed(*a: object, **kw: object) -> None:
            raise SystemExit("kill -9")  # not a KolmError: nothing after it runs

        monkeypatch.setattr(ledger_module, "add_checkpoint", killed)
        with pytest.raises(SystemExit):
            led.append([label_env(keys.compile, 1), label_env(keys.compile, 2)])
        monkeypatch.undo()
        led.store.close()
        store = Store(db)
        assert store.size() == 3  # committed before any witness was asked
        assert verify_cosignatures(Note.from_bytes(store.latest_checkpoint().note), vs) == []
        store.close()
        assert _witness_state(tmp_path / "w0.json")[0] == 1
        # the restarted ledger re-offers its newest checkpoint to both witnesses
        led = Ledger(Store(db), keys.trust, keys.log, witnesses=urls, witness_policy="required")
        root = led.checkpoint().checkpoint.root
        for i in range(2):
            assert _witness_state(tmp_path / f"w{i}.json") == (3, root)
        assert verify_bundle(led.bundle(2), keys.trust, witnesses=vs, min_witnesses=2).index == 2
        led.store.close()
        # opened again, it offers the checkpoint again and each witness cosigns again; the
        # store keeps one cosignature per witness and size
        led = Ledger(Store(db), keys.trust, keys.log, witnesses=urls, witness_policy="required")
        assert len(led.checkpoint().note.signatures) == 3
        led.store.close()
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()


def test_cosignatures_are_stored_append_only(
    tmp_path: Path,
    db_url: str,
    keys: Keys,  # noqa: F811
) -> None:
    """One row per checkpoint size and witness key; the database refuses UPDATE and DELETE
    (and TRUNCATE on PostgreSQL), like the log's own tables."""
    import sqlalchemy as sa
    from sqlalchemy.pool import NullPool

    from kolm_ledger.storage.models import COSIGNATURE_TABLE

    urls, _, servers = _witnesses(tmp_path, keys, 2)
    try:
        led = Ledger(Store(db_url), keys.trust, keys.log, witnesses=urls, witness_policy="required")
        led.append([label_env(keys.compile, 0)])
        led.append([label_env(keys.compile, 1), label_env(keys.compile, 2)])
        led.store.close()
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()
    eng = sa.create_engine(db_url, poolclass=NullPool)
    try:
        with eng.connect() as c:
            rows = c.execute(sa.text(f"SELECT size, name FROM {COSIGNATURE_TABLE}")).all()
        assert sorted(rows) == [(1, "witness.test/w0"), (1, "witness.test/w1"),
                                (3, "witness.test/w0"), (3, "witness.test/w1")]  # fmt: skip
        ops = [
            ("UPDATE", f"UPDATE {COSIGNATURE_TABLE} SET signature = signature"),
            ("DELETE", f"DELETE FROM {COSIGNATURE_TABLE}"),
        ]
        if eng.dialect.name == "postgresql":
            ops.append(("TRUNCATE", f"TRUNCATE {COSIGNATURE_TABLE}"))
        for op, sql in ops:
            with eng.connect() as c, pytest.raises(sa.exc.DBAPIError) as ei:
                c.execute(sa.text(sql))
                c.commit()
            assert f"kolm: {COSIGNATURE_TABLE} is append-only ({op} refused)" in str(ei.value.orig)
    finally:
        eng.dispose()


def test_replicas_offer_the_newest_committed_checkpoint(
    tmp_path: Path,
    keys: Keys,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two ledgers on one database, one witness: cosigning happens outside the sequencer
    lock, so a replica can find the witness already past the checkpoint it read. It then
    offers the newest committed one instead (no fork, no refusal)."""
    urls, cosigners, servers = _witnesses(tmp_path, keys, 1)
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    vs = [c.verifier() for c in cosigners]
    try:
        a = Ledger(Store(db), keys.trust, keys.log, witnesses=urls, witness_policy="required")
        b = Ledger(Store(db), keys.trust, keys.log, witnesses=urls, witness_policy="required")
        a.append([label_env(keys.compile, 0)])
        b.append([label_env(keys.compile, 1), label_env(keys.compile, 2)])
        a.store.close()
        # replica a committed size 4 and read "latest" just before b committed size 6 and
        # had it cosigned
        a = Ledger(Store(db), keys.trust, keys.log, witnesses=urls, witness_policy="required")
        monkeypatch.setattr(a, "_cosign", lambda signed: signed)
        a.append([label_env(keys.compile, 3)])
        stale = a.store.latest_checkpoint()
        b.append([label_env(keys.compile, 4), label_env(keys.compile, 5)])
        monkeypatch.undo()
        reads = [stale]
        real = a.store.latest_checkpoint
        monkeypatch.setattr(a.store, "latest_checkpoint", lambda: reads.pop() if reads else real())
        out = a._cosign(None)
        assert out is not None and out.checkpoint.size == 6
        assert verify_cosignatures(out.note, vs) == ["witness.test/w0"]
        assert _witness_state(tmp_path / "w0.json")[0] == 6
        a.store.close()
        b.store.close()
    finally:
        servers[0].shutdown()
        servers[0].server_close()
