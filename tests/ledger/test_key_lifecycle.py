"""Key lifecycle: ``kolm keys rotate`` / ``kolm keys revoke``, and log key rotation.

- rotation appends an admin-signed ``key`` receipt (action rotate, replaces the old
  key id), retires the old key file, and from then on the old key may not append;
- a receipt signed before a revocation stays valid in the audit; one after it is
  refused at append (FAILED_PRECONDITION) and, if a replica with a stale trust state
  forces it into the database anyway, the audit flags exactly that entry;
- during a log key rotation checkpoints carry signatures by the old and the new log
  key, so a verifier that trusts only the new key accepts them.
"""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from test_ledger_service import Keys, ThreadedServer, keys, label_env  # noqa: F401

from kolm.cli.main import main as kolm_main
from kolm_ledger._crypto import PrivateKey
from kolm_ledger.audit.auditor import audit
from kolm_ledger.errors import KeyValidityError, KolmError
from kolm_ledger.formats.checkpoint import verify_checkpoint
from kolm_ledger.keys import TrustedKey, TrustRoot
from kolm_ledger.log.ledger import Ledger
from kolm_ledger.service.client import LedgerClient
from kolm_ledger.storage import Store
from kolm_ledger.verify.receipt import verify_bundle

KOLM = Path(sys.executable).with_name("kolm")


def _ledger(db: str, keydir: Path) -> Ledger:
    return Ledger(
        Store(db), TrustRoot.load(keydir / "trust.json"), PrivateKey.load(keydir / "log.key")
    )


def test_rotate_through_the_database(
    tmp_path: Path,
    keys: Keys,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    led = _ledger(db, keys.dir)
    led.append([label_env(keys.compile, 0)])
    led.store.close()
    old_id = keys.compile.keyid()
    assert (
        kolm_main(["keys", "rotate", "--keys", str(keys.dir), "--role", "compile", "--db", db]) == 0
    )
    out = capsys.readouterr().out
    assert f"{old_id[:16]} -> " in out
    retired = keys.dir / f"compile.key.{old_id[:8]}.retired"
    assert PrivateKey.load(retired).keyid() == old_id
    new = PrivateKey.load(keys.dir / "compile.key")
    assert new.keyid() != old_id and not (keys.dir / "compile.key.new").exists()
    time.sleep(1.1)  # the old key's validity in trust.json ends a second after rotation
    led = _ledger(db, keys.dir)
    try:
        assert len(led.store.find(kind="key", limit=10)) == 1
        assert led.key(new.keyid()).role == "compile"
        led.append([label_env(new, 1)])
        with pytest.raises(KeyValidityError, match=r"was revoked at|expired at"):
            led.append([label_env(keys.compile, 2)])
        rep = audit(led.store, TrustRoot.load(keys.dir / "trust.json"))
        assert rep.ok, [str(f) for f in rep.failures]
        assert rep.entries == 3
    finally:
        led.store.close()


def test_revoke_through_the_service_before_stays_valid_after_is_refused(
    tmp_path: Path,
    keys: Keys,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    # a stale replica: opened before the revocation, and never refreshing its trust state
    stale = _ledger(db, keys.dir)
    srv = ThreadedServer(db, keys.trust, keys.log, max_wait_ms=1)
    try:
        with srv.client() as c:
            before = c.append(label_env(keys.compile, 0), wait=True)
            args = ["keys", "revoke", "--keys", str(keys.dir), "--keyid", keys.compile.keyid()[:12]]
            assert kolm_main([*args, "--reason", "leaked", "--ledger", srv.target]) == 0
            assert "revoked compile key" in capsys.readouterr().out
            # trust.json (what offline verifiers read) now ends the key's validity too
            on_disk = TrustRoot.load(keys.dir / "trust.json").get(keys.compile.keyid())
            assert on_disk.not_after is not None
            assert on_disk.not_after < datetime.now(UTC)
            assert verify_bundle(before.bundle, TrustRoot.load(keys.dir / "trust.json"))  # type: ignore[arg-type]
            with pytest.raises(KolmError) as e:
                c.append(label_env(keys.compile, 1))
            assert e.value.grpc_code == "FAILED_PRECONDITION"
            assert "was revoked at" in str(e.value)
            assert c.checkpoint().checkpoint.size == 2
            # the bundle of the receipt from before the revocation still verifies offline
            assert verify_bundle(before.bundle, keys.trust).index == 0  # type: ignore[arg-type]
    finally:
        srv.stop()
    store = Store(db)
    try:
        rep = audit(store, keys.trust)
        assert rep.ok, [str(f) for f in rep.failures]
    finally:
        store.close()
    # force one in: the stale replica still thinks the key is valid
    stale.refresh_trust = lambda: None  # type: ignore[method-assign]
    (forced,) = stale.append([label_env(keys.compile, 2)])
    stale.store.close()
    store = Store(db)
    try:
        rep = audit(store, keys.trust)
        assert not rep.ok
        assert rep.failing_indices() == [forced.index]
        assert any("revoked" in f.reason for f in rep.failures)
    finally:
        store.close()


def test_revoke_needs_a_known_unique_key(
    tmp_path: Path,
    keys: Keys,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    db = f"sqlite:///{tmp_path / 'l.db'}"
    assert (
        kolm_main(["keys", "revoke", "--keys", str(keys.dir), "--keyid", "ffff", "--db", db]) == 2
    )
    assert "matches 0 keys" in capsys.readouterr().err
    log_id = keys.log.keyid()
    assert (
        kolm_main(["keys", "revoke", "--keys", str(keys.dir), "--keyid", log_id, "--db", db]) == 2
    )
    assert "--extra-log-key" in capsys.readouterr().err


def test_log_key_rotation_new_key_verifier_accepts_transition_checkpoints(
    tmp_path: Path,
    keys: Keys,  # noqa: F811
) -> None:
    new_log = PrivateKey.generate("ed25519")
    new_log.save(tmp_path / "log2.key")
    origin = keys.trust.log_keys()[0].origin
    producers = tuple(k for k in keys.trust.keys if k.role != "log")
    only_new = TrustRoot(
        (*producers, TrustedKey.for_key(new_log.public_key(), "log", origin=origin))
    )
    ready = tmp_path / "port"
    proc = subprocess.Popen(
        [
            str(KOLM),
            "ledger",
            "serve",
            "--db",
            f"sqlite:///{tmp_path / 'ledger.db'}",
            "--trust",
            str(keys.dir / "trust.json"),
            "--log-key",
            str(keys.dir / "log.key"),
            "--extra-log-key",
            str(tmp_path / "log2.key"),
            "--listen",
            "127.0.0.1:0",
            "--insecure",
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
        with LedgerClient(f"127.0.0.1:{ready.read_text()}") as c:
            res = c.append(label_env(keys.compile, 0), wait=True)
            note = c.checkpoint().to_bytes()
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    assert len(verify_checkpoint(note, only_new).note.signatures) == 2
    verify_checkpoint(note, keys.trust)  # and the old-key verifier still accepts it
    assert res.bundle is not None
    assert verify_bundle(res.bundle, only_new).index == 0
    # a verifier trusting neither key refuses it
    stranger = TrustRoot(
        (
            *producers,
            TrustedKey.for_key(PrivateKey.generate("ed25519").public_key(), "log", origin=origin),
        ),
    )
    with pytest.raises(KolmError, match="step 6"):
        verify_bundle(res.bundle, stranger)
