"""One key policy, one trust fold, one sink chooser (issue 15, "one owner per concept").

- The key policy ("may this key sign this kind at this time") is
  :func:`kolm_ledger.verify.trust.check_key_policy` (:meth:`TrustState.authorize`): the ledger,
  the audit, offline verify, the provenance check and the compile pre-flight all ask it,
  so a key is judged alike everywhere (here: every kind of failure, by each reader).
- The audit folds key receipts with the fold's own step (:meth:`TrustState.admit`), so
  it judges later entries by the trust state every reader folds.
- :func:`kolm_compile.sinks.open_sink` is the one choice between ``--db`` and ``--ledger``.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from kolm_compile.sinks import LocalLedgerSink, ServiceSink, open_sink
from kolm_ledger._crypto import PrivateKey
from kolm_ledger._samples import sample_statement
from kolm_ledger.audit.auditor import audit
from kolm_ledger.audit.provenance import _check_entry
from kolm_ledger.errors import (
    ConflictError,
    InvalidInput,
    KeyValidityError,
    KolmError,
    RoleError,
    UnknownKeyError,
)
from kolm_ledger.formats import receipts
from kolm_ledger.formats.dsse import Envelope
from kolm_ledger.keys import TrustedKey, TrustRoot, init_keys
from kolm_ledger.log.ledger import Ledger
from kolm_ledger.storage import Store
from kolm_ledger.verify.receipt import verify_bundle
from kolm_ledger.verify.trust import TrustState, check_key_policy, ledger_trust_state

T0 = datetime(2026, 3, 1, 12, tzinfo=UTC)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ADMIN = PrivateKey.generate()
COMPILE = PrivateKey.generate()
LOG = PrivateKey.generate("ed25519")


def trust_with(*extra: TrustedKey) -> TrustRoot:
    return TrustRoot(
        (
            TrustedKey.for_key(ADMIN.public_key(), "admin", not_before=EPOCH),
            TrustedKey.for_key(COMPILE.public_key(), "compile", not_before=EPOCH),
            TrustedKey.for_key(LOG.public_key(), "log", not_before=EPOCH, origin="kolm.test/p"),
            *extra,
        )
    )


class Clock:
    def __init__(self, t: datetime = T0) -> None:
        self.t = t

    def __call__(self) -> datetime:
        return self.t


def label(key: PrivateKey, i: int, t: datetime = T0) -> Envelope:
    return receipts.sign_statement(sample_statement("label", i, random.Random(i), t), key)


def key_env(action: str, key: PrivateKey, role: str, t: datetime, **kw: Any) -> Envelope:
    st = receipts.key_statement(action=action, public_key=key.public_key(), role=role, time=t, **kw)
    return receipts.sign_statement(st, ADMIN)


# --------------------------------------------------------------------------- the key policy

LATE = PrivateKey.generate()  # valid from T0 + 1 day
OLD = PrivateKey.generate()  # expired at T0 - 1 day
WRONG = PrivateKey.generate()  # an infer key signing a label


@pytest.mark.parametrize(
    ("key", "error", "match"),
    [
        (LATE, KeyValidityError, "is not valid before"),
        (OLD, KeyValidityError, "expired at"),
        (WRONG, RoleError, "may not sign 'label'"),
    ],
)
def test_every_reader_asks_the_one_key_policy(
    tmp_path: Path, key: PrivateKey, error: type[KolmError], match: str
) -> None:
    """A label signed by a key the policy refuses at its time: the ledger refuses it
    (validate, at integration), and for the one logged anyway (the trust root changed
    after) verify step 4, the audit and the provenance check all name the same reason."""
    keys = (
        TrustedKey.for_key(LATE.public_key(), "compile", not_before=T0 + timedelta(days=1)),
        TrustedKey.for_key(OLD.public_key(), "compile", not_before=EPOCH, not_after=T0 - timedelta(days=1)),
        TrustedKey.for_key(WRONG.public_key(), "infer", not_before=EPOCH),
    )  # fmt: skip
    strict = trust_with(*keys)
    state = TrustState(strict)
    with pytest.raises(error, match=match):
        state.authorize(key.keyid(), "label", T0)
    with pytest.raises(error, match=match):
        check_key_policy(state.get(key.keyid()), "label", T0)
    store = Store(f"sqlite:///{tmp_path / 'l.db'}")
    try:
        with pytest.raises(error, match=match):
            Ledger(store, strict, LOG, clock=Clock()).append([label(key, 1)])
        # a lenient root logs it (the key as a plain compile key, always valid)
        lenient = trust_with(TrustedKey.for_key(key.public_key(), "compile", not_before=EPOCH))
        led = Ledger(store, lenient, LOG, clock=Clock())
        (a,) = led.append([label(key, 1)])
        b = led.bundle(a.index)
        with pytest.raises(error, match=match) as e:
            verify_bundle(b, strict, now=T0)
        assert e.value.step == 4
        (f,) = audit(store, strict).failures
        assert f.index == a.index and match in f.reason
        fails: list[str] = []
        _check_entry(store.get_entry(a.index), "label", state, fails)
        assert len(fails) == 1 and match in fails[0]
    finally:
        store.close()


def test_the_compile_preflight_asks_the_key_policy(tmp_path: Path) -> None:
    """``check_signer`` refuses a compile key that is not valid yet before any teacher
    call (it used to check revocation and expiry by hand, and let it through: every label
    would then have been refused by the ledger, after the teacher was paid)."""
    tomorrow = datetime.now(UTC) + timedelta(days=1)
    late = TrustedKey.for_key(LATE.public_key(), "compile", not_before=tomorrow)
    store = Store(f"sqlite:///{tmp_path / 'l.db'}")
    try:
        sink = LocalLedgerSink(Ledger(store, trust_with(late), LOG))
        with pytest.raises(ConflictError, match="not valid before"):
            sink.check_signer(LATE)
        sink.check_signer(COMPILE)  # a valid compile key passes
        with pytest.raises(ConflictError, match="is not trusted by"):
            sink.check_signer(PrivateKey.generate())
        with pytest.raises(ConflictError, match=r"has role admin .* not compile"):
            sink.check_signer(ADMIN)
    finally:
        store.close()


# --------------------------------------------------------------------------- the one fold


def test_the_audit_folds_key_receipts_as_every_reader_does(tmp_path: Path) -> None:
    """A ``register`` receipt dated an hour after its integration time is in the log of a
    ledger run with a 2-hour skew. The audit (default skew 5 minutes) flags that receipt,
    and only it: the new key is registered in the trust state every reader folds
    (:func:`ledger_trust_state`), so the audit judges the key's labels by that state too
    (it used to leave the receipt out of its own fold and flag every later label)."""
    clock = Clock()
    store = Store(f"sqlite:///{tmp_path / 'l.db'}")
    try:
        trust = trust_with()
        led = Ledger(store, trust, LOG, clock=clock, max_time_skew=timedelta(hours=2))
        k = PrivateKey.generate()
        (reg,) = led.append([key_env("register", k, "compile", T0 + timedelta(hours=1), effective_at=T0)])  # fmt: skip
        labels = led.append([label(k, i) for i in range(3)])
        assert ledger_trust_state(store, trust).get(k.keyid()).role == "compile"
        rep = audit(store, trust)
        assert [f.index for f in rep.failures] == [reg.index], rep.failures
        assert "is later than its integration time" in rep.failures[0].reason
        assert all(a.index > reg.index for a in labels)
    finally:
        store.close()


# --------------------------------------------------------------------------- the sink chooser


def test_open_sink_is_the_one_choice_between_db_and_ledger(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    root = init_keys(keys)
    with pytest.raises(InvalidInput, match="exactly one of --db URL or --ledger"):
        open_sink(keys=keys)
    with pytest.raises(InvalidInput, match="exactly one of --db URL or --ledger"):
        open_sink(db="sqlite://", ledger="127.0.0.1:1", keys=keys)
    local = open_sink(db=f"sqlite:///{tmp_path / 'l.db'}", keys=keys)
    try:
        assert isinstance(local, LocalLedgerSink)
        assert local.trust_state().keys() == TrustState(root).keys()
        assert local.find(subject_digest="0" * 64, kind="artifact", limit=10) == []
    finally:
        local.close()
    # a service sink gets the key folder's trust root, so check_signer runs before a job
    # spends anything (python -m kolm_compile.pipeline --ledger made one without it)
    remote = open_sink(ledger="127.0.0.1:1", keys=keys, timeout=1.0)
    try:
        assert isinstance(remote, ServiceSink)
        assert remote.trust == root
        assert remote.client.timeout == 1.0
    finally:
        remote.close()
    bare = ServiceSink(remote.client)
    with pytest.raises(InvalidInput, match="no trust root"):
        bare.trust_state()
    with pytest.raises(UnknownKeyError):
        TrustState(root).authorize(PrivateKey.generate().keyid(), "label", T0)
