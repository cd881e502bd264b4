"""One fold of key receipts into a trust state (kolm_ledger.verify.trust), used everywhere.

- a revoked key id never becomes valid again: a ``register``/``rotate`` naming it is
  refused at append (``FAILED_PRECONDITION`` naming the key id), and a fold over a log
  that holds one anyway (a stale replica forced it in) leaves it out — the issue's
  reproduction, with the re-appended old receipt also malleated to ``(r, n - s)``;
- the fold reads *every* key receipt, past the first page of 1000: a revocation after
  1000+ registrations is honoured by the ledger's refresh, by the database and by the
  service (``ledger_trust_state`` through ``FindEntries``), and by the inference
  loader's fold (:func:`kolm_infer.engine.ledger_trust_state`);
- the fold checks each key receipt against the state so far (known admin key valid at
  the integration time, signature) and leaves out those that fail.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from support.servers import LedgerThread

from kolm_ledger._crypto import PrivateKey
from kolm_ledger._samples import sample_statement
from kolm_ledger.audit.auditor import audit
from kolm_ledger.errors import KeyValidityError, KolmError, SignatureError, UnknownKeyError
from kolm_ledger.formats import receipts
from kolm_ledger.formats.dsse import Envelope, Signature
from kolm_ledger.keys import TrustedKey, TrustRoot
from kolm_ledger.log.ledger import Ledger
from kolm_ledger.service.client import LedgerClient
from kolm_ledger.storage import Entry, Store
from kolm_ledger.verify.trust import (
    TrustState,
    fold_key_receipts,
    key_receipt_entries,
    ledger_trust_state,
)

T0 = datetime(2026, 3, 1, 12, tzinfo=UTC)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# the order of the P-256 group
P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551

ADMIN = PrivateKey.generate()
COMPILE = PrivateKey.generate()
INFER = PrivateKey.generate()
LOG = PrivateKey.generate("ed25519")
TRUST = TrustRoot(
    (
        TrustedKey.for_key(ADMIN.public_key(), "admin", not_before=EPOCH),
        TrustedKey.for_key(COMPILE.public_key(), "compile", not_before=EPOCH),
        TrustedKey.for_key(INFER.public_key(), "infer", not_before=EPOCH),
        TrustedKey.for_key(LOG.public_key(), "log", not_before=EPOCH, origin="kolm.test/fold"),
    )
)


class Clock:
    def __init__(self, t: datetime = T0) -> None:
        self.t = t

    def __call__(self) -> datetime:
        return self.t

    def tick(self, **kw: float) -> None:
        self.t += timedelta(**kw)


_OPEN: list[Store] = []


@pytest.fixture(autouse=True)
def _close_stores() -> Iterator[None]:
    yield
    while _OPEN:
        _OPEN.pop().close()


def ledger_on(url: str, clock: Clock, trust: TrustRoot = TRUST) -> Ledger:
    store = Store(url)
    _OPEN.append(store)
    return Ledger(store, trust, LOG, clock=clock)


def key_env(action: str, key: PrivateKey, role: str, t: datetime, **kw: Any) -> Envelope:
    st = receipts.key_statement(action=action, public_key=key.public_key(), role=role, time=t, **kw)
    return receipts.sign_statement(st, ADMIN)


def label(key: PrivateKey, i: int) -> Envelope:
    # dated T0, where the clock starts (a receipt's time may not lie after its integration
    # time plus the skew, nor before its key's not_before)
    return receipts.sign_statement(sample_statement("label", i, random.Random(i), T0), key)


def malleate(env: Envelope) -> Envelope:
    """The same envelope with its ECDSA signature ``(r, s)`` replaced by ``(r, n - s)``."""
    sig = env.signatures[0]
    r, s = decode_dss_signature(sig.sig)
    return Envelope(
        env.payload, env.payload_type, (Signature(sig.keyid, encode_dss_signature(r, P256_N - s)),)
    )


# --------------------------------------------------------------------------- revoked stays revoked


def test_a_revoked_key_id_is_never_registered_again(db_url: str) -> None:
    """The issue's reproduction: an old admin register/rotate receipt for a key that was
    later revoked, appended again (as sent, malleated, and re-signed afresh), is refused;
    the revoked key stays refused; the audit stays clean."""
    clock = Clock()
    led = ledger_on(db_url, clock)
    k = PrivateKey.generate()
    kid = k.keyid()
    register = key_env("register", k, "compile", clock.t)
    (reg,) = led.append([register])
    led.append([label(k, 0)])
    clock.tick(minutes=1)
    pre_revocation = led.trust
    rotate_in = key_env("rotate", PrivateKey.generate(), "compile", clock.t, replaces=kid)
    led.append([rotate_in])  # rotation revokes k
    assert led.key(kid).revoked_at == clock.t
    clock.tick(minutes=1)
    with pytest.raises(KeyValidityError, match="revoked"):
        led.append([label(k, 1)])
    # (1) the old register receipt as it was, (2) malleated: refused, or (one statement,
    # one entry) answered as the existing entry; never a new entry
    for old in (register, malleate(register)):
        try:
            (d,) = led.append([old])
        except KolmError:
            continue
        assert d.duplicate and d.index == reg.index, "an old key receipt made a new entry"
    # (3) the same registration signed afresh (a new statement): FAILED_PRECONDITION naming k
    for again in (
        key_env("register", k, "compile", clock.t),
        key_env("rotate", k, "compile", clock.t, replaces=COMPILE.keyid()),
        key_env("register", k, "infer", clock.t),
    ):
        with pytest.raises(KeyValidityError) as ei:
            led.append([again])
        assert ei.value.grpc_code == "FAILED_PRECONDITION"
        assert kid[:16] in str(ei.value) and "cannot be registered again" in str(ei.value)
    # the revoked key stays refused, and COMPILE (named by the refused rotate) stays valid
    with pytest.raises(KeyValidityError, match="revoked"):
        led.append([label(k, 2)])
    led.append([label(COMPILE, 3)])
    rep = audit(led.store, TRUST)
    assert rep.ok, [str(f) for f in rep.failures]
    size = led.size
    # a stale replica (its trust state from before the revocation) forces a re-registration
    # in; the audit names exactly that entry, and every fold leaves it out
    stale = ledger_on(db_url, clock)
    stale.trust = pre_revocation
    stale.refresh_trust = lambda: None  # type: ignore[method-assign]
    (forced,) = stale.append([key_env("register", k, "compile", clock.t + timedelta(seconds=1))])
    assert forced.index == size
    rep = audit(led.store, TRUST)
    assert rep.failing_indices() == [forced.index]
    assert "cannot be registered again" in str(rep.failures[0])
    fresh = ledger_on(db_url, clock)  # folds the log from the start
    assert fresh.key(kid).revoked_at is not None
    with pytest.raises(KeyValidityError, match="revoked"):
        fresh.append([label(k, 4)])
    led.refresh_trust()  # the running ledger folds it too, without wedging
    with pytest.raises(KeyValidityError, match="revoked"):
        led.append([label(k, 5)])
    assert ledger_trust_state(fresh.store, TRUST).get(kid).revoked_at is not None


def test_apply_refuses_and_fold_skips_a_revoked_key_id() -> None:
    k = PrivateKey.generate()
    state = TrustState(TRUST)
    reg = receipts.key_statement(
        action="register", public_key=k.public_key(), role="infer", time=T0
    )
    rev = receipts.key_statement(action="revoke", public_key=k.public_key(), role="infer", time=T0)
    state = state.apply(reg, T0).apply(rev, T0 + timedelta(hours=1))
    with pytest.raises(KeyValidityError, match=k.keyid()[:16]):
        state.apply(reg, T0 + timedelta(hours=2))
    # a root key revoked from a time still to come counts as revoked too
    future = TrustState(TRUST).apply(
        receipts.key_statement(
            action="revoke",
            public_key=INFER.public_key(),
            role="infer",
            effective_at=T0 + timedelta(days=9),
            time=T0,
        ),
        T0,
    )
    again = receipts.key_statement(
        action="register", public_key=INFER.public_key(), role="infer", time=T0
    )
    with pytest.raises(KeyValidityError, match="cannot be registered again"):
        future.apply(again, T0 + timedelta(seconds=1))
    # a rotate cannot move an earlier revocation later
    rot = receipts.key_statement(
        action="rotate",
        public_key=PrivateKey.generate().public_key(),
        role="infer",
        replaces=k.keyid(),
        time=T0,
    )
    assert state.apply(rot, T0 + timedelta(hours=3)).get(k.keyid()).revoked_at == (
        T0 + timedelta(hours=1)
    )


def _entry(i: int, env: Envelope, t: datetime) -> Entry:
    return Entry(i, b"\0" * 32, b"\0" * 32, "key", env.signatures[0].keyid, t, env.to_bytes())


def test_fold_checks_each_key_receipt_against_the_state_so_far() -> None:
    k, k2, admin2 = PrivateKey.generate(), PrivateKey.generate(), PrivateKey.generate()
    rogue = PrivateKey.generate()
    by_rogue = receipts.sign_statement(
        receipts.key_statement(action="register", public_key=k.public_key(), role="infer", time=T0),
        rogue,
    )
    by_compile = receipts.sign_statement(
        receipts.key_statement(action="register", public_key=k.public_key(), role="infer", time=T0),
        COMPILE,
    )
    good = key_env("register", k, "infer", T0)
    forged = Envelope(
        good.payload, good.payload_type, (Signature(ADMIN.keyid(), by_rogue.signatures[0].sig),)
    )
    # an admin registered by a key receipt may sign key receipts, from then on
    reg_admin2 = key_env("register", admin2, "admin", T0)
    by_admin2 = receipts.sign_statement(
        receipts.key_statement(
            action="register", public_key=k2.public_key(), role="compile", time=T0
        ),
        admin2,
    )
    revoke_admin2 = key_env("revoke", admin2, "admin", T0)
    late_by_admin2 = receipts.sign_statement(
        receipts.key_statement(
            action="revoke", public_key=COMPILE.public_key(), role="compile", time=T0
        ),
        admin2,
    )
    entries = [
        _entry(0, by_rogue, T0),  # unknown signer
        _entry(1, by_compile, T0),  # a compile key may not sign key receipts
        _entry(2, forged, T0),  # bad signature
        _entry(3, reg_admin2, T0),
        _entry(4, by_admin2, T0 + timedelta(minutes=1)),
        _entry(5, revoke_admin2, T0 + timedelta(minutes=2)),
        _entry(6, late_by_admin2, T0 + timedelta(minutes=3)),  # admin2 revoked by then
        _entry(7, good, T0 + timedelta(minutes=4)),
    ]
    refused: dict[int, KolmError] = {}
    state = fold_key_receipts(
        TRUST, entries, refused=lambda e, err: refused.__setitem__(e.index, err)
    )
    assert sorted(refused) == [0, 1, 2, 6]
    assert isinstance(refused[0], UnknownKeyError)
    assert "may not sign 'key'" in str(refused[1])
    assert isinstance(refused[2], SignatureError)
    assert isinstance(refused[6], KeyValidityError)
    assert state.get(k2.keyid()).role == "compile"
    assert state.get(k.keyid()).not_before == T0 + timedelta(minutes=4)
    assert state.get(COMPILE.keyid()).revoked_at is None  # admin2's late revocation: left out
    # folding in two parts gives the same state (the key follower's incremental fold)
    half = fold_key_receipts(fold_key_receipts(TRUST, entries[:4]), entries[4:])
    assert half.keys() == state.keys()


# --------------------------------------------------------------------------- every page


def _registrations(n: int, t: datetime) -> list[Envelope]:
    """``n`` admin-signed ``register`` key receipts for fresh infer keys."""
    return [key_env("register", PrivateKey.generate(), "infer", t) for _ in range(n)]


def test_a_revocation_after_1000_registrations_is_honoured_everywhere(
    db_url: str, tmp_path: Path
) -> None:
    clock = Clock()
    led = ledger_on(db_url, clock)
    t0 = time.perf_counter()
    envs = _registrations(1005, clock.t)
    for i in range(0, len(envs), 500):
        led.append(envs[i : i + 500])
    clock.tick(minutes=1)
    led.append([key_env("revoke", COMPILE, "compile", clock.t, reason="leaked")])
    built = time.perf_counter() - t0
    assert led.size == 1006 and built < 60, built
    # the running ledger and a fresh one (its refresh folds every page)
    with pytest.raises(KeyValidityError, match="revoked"):
        led.append([label(COMPILE, 0)])
    fresh = ledger_on(db_url, clock)
    assert fresh.key(COMPILE.keyid()).revoked_at == clock.t
    # from the database, page by page
    assert len(list(key_receipt_entries(fresh.store))) == 1006
    assert ledger_trust_state(fresh.store, TRUST).get(COMPILE.keyid()).revoked_at == clock.t
    assert next(iter(key_receipt_entries(fresh.store, after_index=1000))).index == 1001
    # through the ledger service (FindEntries pages), as every remote reader folds it
    led.store.close()
    srv = LedgerThread(db_url, TRUST, LOG)
    try:
        with LedgerClient(srv.target) as c:
            state = ledger_trust_state(c, TRUST)
            assert state.get(COMPILE.keyid()).revoked_at == clock.t
            assert len(state.extra) == 1005
            from kolm_infer.engine import ledger_trust_state as loader_fold

            assert loader_fold(c, TRUST).get(COMPILE.keyid()).revoked_at == clock.t
    finally:
        srv.close()
