"""Issue 14, findings 3, 4 (one statement, one entry) and 7: the integration time is
authenticated, a statement is logged once, and a receipt's own time obeys one rule.

Each test here fails on the code before log format v2:

- the Merkle leaf binds the envelope *and* the integration time
  (``SHA-256(0x00 || JCS({"envelope", "integrated_time"}))``), so a time moved in the
  database breaks the leaf, the chain and the roots: the audit names the entry, a
  restarted ledger refuses to fold the key receipt or to extend the log, and an offline
  bundle proves its ``integrated_time``;
- the sequencer never integrates before the previous entry (a clock set back cannot put
  a revoked key's receipt before its revocation), and the audit names the first entry
  whose time goes back;
- an envelope whose statement (payload and key id) is already logged answers with that
  entry, whatever its signature bytes;
- a receipt's ``time`` is strict RFC 3339, present, not before its key's ``not_before``
  and not after its integration time plus the skew, at append, in the audit and in
  ``kolm verify``.

Real gRPC servers and both engines (SQLite and PostgreSQL) where a finding involves them.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import rfc8785
import sqlalchemy as sa
from support.db import drop_triggers, raw, set_time
from support.receipts import label_statement
from support.servers import LedgerThread

import kolm_ledger.log.validate as ledger_mod
from kolm.cli.main import main as kolm_main
from kolm_ledger._crypto import PrivateKey
from kolm_ledger._samples import sample_statement
from kolm_ledger.audit.auditor import audit, audit_remote
from kolm_ledger.errors import (
    ConflictError,
    InclusionProofError,
    InvalidInput,
    KeyValidityError,
    KolmError,
    StatementFormatError,
    StorageError,
    TrustRootFormatError,
)
from kolm_ledger.formats import receipts
from kolm_ledger.formats.dsse import Envelope, Signature
from kolm_ledger.formats.leaf import (
    LOG_FORMAT,
    MAX_INTEGRATED_TIME_US,
    entry_leaf_hash,
    leaf_data,
    statement_digest,
)
from kolm_ledger.keys import TrustedKey, TrustRoot, format_time, parse_time
from kolm_ledger.log.ledger import Ledger
from kolm_ledger.service.client import LedgerClient
from kolm_ledger.storage import Store, micros
from kolm_ledger.timefmt import from_micros, parse_rfc3339
from kolm_ledger.verify.receipt import step_of, verify_bundle
from kolm_ledger.verify.trust import ledger_trust_state, prove_entries

ORIGIN = "time.kolm.dev/ledger"
EPOCH = datetime(2025, 1, 1, tzinfo=UTC)
T0 = datetime(2026, 3, 1, 12, tzinfo=UTC)
Y2100 = micros(datetime(2100, 1, 1, tzinfo=UTC))
KEYS = {
    name: PrivateKey.generate("ed25519" if name == "log" else "ecdsa-p256-sha256")
    for name in ("admin", "compile", "infer", "log")
}
TRUST = TrustRoot(
    tuple(
        TrustedKey.for_key(
            KEYS[r].public_key(), r, not_before=EPOCH, origin=ORIGIN if r == "log" else None
        )
        for r in ("admin", "compile", "infer", "log")
    )
)
SIGNER = {"label": "compile", "eval": "compile", "artifact": "compile", "prediction": "infer"}


class Clock:
    """An injected clock that an operator can set anywhere (forward or back)."""

    def __init__(self, t: datetime = T0) -> None:
        self.t = t

    def __call__(self) -> datetime:
        return self.t


def signed(kind: str, i: int, at: datetime = T0, key: PrivateKey | None = None) -> Envelope:
    st = sample_statement(kind, i, random.Random(f"{kind}/{i}"), at)
    return receipts.sign_statement(st, key or KEYS[SIGNER[kind]])


def revocation(role: str, at: datetime) -> Envelope:
    st = receipts.key_statement(
        action="revoke", public_key=KEYS[role].public_key(), role=role, time=at
    )
    return receipts.sign_statement(st, KEYS["admin"])


def with_time(key: PrivateKey, value: object, i: int = 0, *, drop: bool = False) -> Envelope:
    """A label receipt whose predicate ``time`` is ``value`` verbatim (or absent)."""
    st = label_statement(input_value=f"ticket {i}", job_id="job-time")
    pred = dict(st.predicate)
    if drop:
        del pred["time"]
    else:
        pred["time"] = value
    return receipts.sign_statement(receipts.Statement(st.subjects, st.predicate_type, pred), key)


_OPEN: list[Store] = []


def open_store(url: str) -> Store:
    store = Store(url)
    _OPEN.append(store)
    return store


@pytest.fixture(autouse=True)
def _close_stores() -> Iterator[None]:
    yield
    while _OPEN:
        _OPEN.pop().close()


class Keys:
    """``kolm keys init`` keys (not_before = when they were made) and their trust root."""

    def __init__(self, keydir: Path) -> None:
        self.dir = keydir
        self.trust = TrustRoot.load(keydir / "trust.json")
        self.by_role = {
            r: PrivateKey.load(keydir / f"{r}.key") for r in ("admin", "compile", "infer", "log")
        }

    def __getattr__(self, role: str) -> PrivateKey:
        try:
            return self.by_role[role]
        except KeyError:
            raise AttributeError(role) from None

    def not_before(self, role: str) -> datetime:
        return next(k for k in self.trust.keys if k.role == role).not_before


@pytest.fixture
def keys(keydir: Path) -> Keys:
    return Keys(keydir)


@pytest.fixture
def served(db_url: str, keys: Keys) -> Iterator[LedgerThread]:
    srv = LedgerThread(db_url, keys.trust, keys.log)
    try:
        yield srv
    finally:
        srv.close()


def label(key: PrivateKey, i: int, at: datetime | None = None) -> Envelope:
    st = sample_statement("label", i, random.Random(f"label/{i}"), at)
    return receipts.sign_statement(st, key)


def prediction(key: PrivateKey, i: int, at: datetime | None = None) -> Envelope:
    st = sample_statement("prediction", i, random.Random(f"prediction/{i}"), at)
    return receipts.sign_statement(st, key)


# ---- the leaf -------------------------------------------------------------------------


def test_the_leaf_is_the_jcs_of_the_envelope_and_its_integration_time() -> None:
    rng = random.Random(14)
    envs = [signed(k, i) for i, k in enumerate(receipts.KINDS[:4])]
    # a payload type and key id that take RFC 8785's general path (escapes, non-ASCII)
    envs.append(Envelope(b'{"x": 1}', 'application/x"\\é\u2028', (Signature("k\n\u00ff", b"s"),)))
    for env in envs:
        for us in (0, 1, micros(T0), MAX_INTEGRATED_TIME_US, rng.randrange(2**53)):
            want = rfc8785.dumps({"envelope": env.to_json(), "integrated_time": us})
            assert leaf_data(env, us) == leaf_data(env.canonical(), us) == want
            assert entry_leaf_hash(env, us) == hashlib.sha256(b"\x00" + want).digest()
        # one microsecond apart is another leaf
        assert entry_leaf_hash(env, micros(T0)) != entry_leaf_hash(env, micros(T0) + 1)
    for bad in (-1, MAX_INTEGRATED_TIME_US + 1, 1.5, True):
        with pytest.raises(InvalidInput, match="integrated_time"):
            entry_leaf_hash(envs[0], bad)  # type: ignore[arg-type]
    assert LOG_FORMAT == "kolm log format v2"


def test_the_statement_digest_leaves_the_signature_out() -> None:
    env = signed("label", 1)
    again = receipts.sign_statement(receipts.Statement.from_envelope(env), KEYS["compile"])
    assert again.signatures[0].sig != env.signatures[0].sig  # ECDSA: a fresh nonce
    assert statement_digest(again) == statement_digest(env)
    # another signer, payload or payload type is another statement
    other = receipts.sign_statement(receipts.Statement.from_envelope(env), KEYS["infer"])
    assert statement_digest(other) != statement_digest(env)
    assert statement_digest(replace(env, payload=env.payload + b" ")) != statement_digest(env)
    assert statement_digest(replace(env, payload_type="x")) != statement_digest(env)


# ---- finding 3: a moved integration time ------------------------------------------------


def test_a_revocation_moved_to_2100_in_the_database_is_caught_everywhere(
    db_url: str, keys: Keys, served: LedgerThread, tmp_path: Path, capsys: Any
) -> None:
    """The issue's reproduction: a database writer (no keys) moves a revocation's
    ``integrated_at`` to 2100. Before: the restarted ledger accepted the revoked key and
    ``kolm audit`` (with and without ``--state``) stayed clean."""
    with LedgerClient(served.target) as c:
        c.append(label(keys.compile, 0))
        c.append(prediction(keys.infer, 1))
        rev = c.append(revocation_of(keys, "infer"))
        with pytest.raises(KolmError, match="revoked") as ei:
            c.append(prediction(keys.infer, 2))
        assert ei.value.grpc_code == "FAILED_PRECONDITION"
        after = c.append(label(keys.compile, 3))
    state = tmp_path / "audit-state.json"
    assert kolm_main(["audit", "--db", db_url, "--trust", str(keys.dir / "trust.json"),
                      "--state", str(state)]) == 0  # fmt: skip
    capsys.readouterr()
    served.stop()

    drop_triggers(db_url)
    set_time(db_url, rev.index, Y2100)

    # the audit names the revocation (its leaf, the chain and the roots no longer match)
    # and the entry after it, whose time now goes back
    rep = audit(open_store(db_url), keys.trust)
    assert not rep.ok
    assert rep.failing_indices()[0] == rev.index
    first = next(f for f in rep.failures if f.index == rev.index)
    assert "leaf hash" in first.reason
    assert any(f.index == after.index and "goes back" in f.reason for f in rep.failures)
    # ... and so does kolm audit, with and without --state
    for extra in ([], ["--state", str(state)]):
        rc = kolm_main(["audit", "--db", db_url, "--trust", str(keys.dir / "trust.json"), *extra])
        out = capsys.readouterr().out
        assert rc == 1 and f"entry {rev.index}:" in out, out

    # the key receipt's time is not the one the log key signed: proving it fails
    store = open_store(db_url)
    key_entries = store.find(kind="key")
    with pytest.raises(InclusionProofError, match=f"entry {rev.index} "):
        prove_entries(key_entries, store, keys.trust)
    # ... so the one fold of the trust state (kolm verify --ledger, provenance, report,
    # the inference loader) refuses it instead of un-revoking the key
    with pytest.raises(InclusionProofError, match=f"entry {rev.index} "):
        ledger_trust_state(store, keys.trust)

    # a restarted ledger refuses to fold it, so it never takes the revoked key, and it
    # refuses to extend the altered log at all
    served.start()
    with LedgerClient(served.target) as c:
        for env in (prediction(keys.infer, 4), label(keys.compile, 5)):
            with pytest.raises(KolmError, match="the stored log was altered") as ei:
                c.append(env)
            assert ei.value.grpc_code == "FAILED_PRECONDITION"
            assert f"entry {rev.index}" in str(ei.value)
        # a reader proving key receipts over gRPC refuses the moved time too
        with pytest.raises(InclusionProofError, match=f"entry {rev.index} "):
            prove_entries(c.find(kind="key"), c, keys.trust)
        with pytest.raises(InclusionProofError, match=f"entry {rev.index} "):
            ledger_trust_state(c, keys.trust)
        # the remote audit names it too
        assert rev.index in audit_remote(c, keys.trust).failing_indices()
    assert store.size() == after.index + 1  # nothing was written


def revocation_of(keys: Keys, role: str) -> Envelope:
    st = receipts.key_statement(
        action="revoke", public_key=keys.by_role[role].public_key(), role=role
    )
    return receipts.sign_statement(st, keys.admin)


def test_swapped_integration_times_fail_the_audit(db_url: str) -> None:
    clock = Clock()
    led = Ledger(open_store(db_url), TRUST, KEYS["log"], clock=clock)
    for b in range(4):
        led.append([signed("label", 10 * b + i) for i in range(3)])
        clock.t += timedelta(seconds=1)
    assert audit(led.store, TRUST).ok
    times = {e.index: micros(e.integrated_at) for e in led.store.entries()}
    drop_triggers(db_url)
    set_time(db_url, 1, times[7])
    set_time(db_url, 7, times[1])
    rep = audit(open_store(db_url), TRUST)
    assert {1, 7} <= set(rep.failing_indices())
    assert rep.failing_indices()[0] == 1  # nothing before the first swapped entry
    goes_back = [f for f in rep.failures if "goes back" in f.reason]
    assert goes_back and goes_back[0].index == 2  # the first entry whose time goes back
    assert all(f.index is None or f.index >= 1 for f in rep.failures)


def test_an_offline_bundle_proves_its_integration_time(db_url: str) -> None:
    clock = Clock()
    led = Ledger(open_store(db_url), TRUST, KEYS["log"], clock=clock)
    led.append([signed("label", 0)])
    clock.t += timedelta(hours=1)
    (a,) = led.append([signed("prediction", 1)])  # receipt dated T0, integrated T0 + 1 h
    b = led.bundle(a.index)
    assert b.integrated_time == micros(a.integrated_at) == micros(T0 + timedelta(hours=1))
    assert json.loads(b.to_bytes())["integrated_time"] == b.integrated_time
    v = verify_bundle(b, TRUST)
    assert (v.integrated_at, v.time, v.leaf_hash) == (a.integrated_at, T0, a.leaf_hash)
    # any other time is another leaf: the inclusion proof fails (step 7)
    for us in (b.integrated_time - 1, b.integrated_time + 1, micros(T0)):
        with pytest.raises(InclusionProofError) as ei:
            verify_bundle(replace(b, integrated_time=us), TRUST)
        assert step_of(ei.value) == 7
    # key validity is judged at the proven integration time: revoked between the
    # receipt's own time and its integration, the key no longer vouches for it
    revoked = TRUST.revoke(KEYS["infer"].keyid(), T0 + timedelta(minutes=30))
    with pytest.raises(KeyValidityError, match="revoked") as ei:
        verify_bundle(b, revoked)
    assert step_of(ei.value) == 4
    early = led.bundle(0)  # integrated at T0, before the revocation
    assert verify_bundle(early, TRUST.revoke(KEYS["compile"].keyid(), T0 + timedelta(1))).index == 0


# ---- finding 3: the sequencer's clock -----------------------------------------------------


def test_integration_times_never_go_back_when_the_clock_does(db_url: str) -> None:
    clock = Clock(T0 + timedelta(hours=1))
    led = Ledger(open_store(db_url), TRUST, KEYS["log"], clock=clock)
    first = led.append([signed("label", 0), signed("label", 1)])
    clock.t = T0  # an hour back
    second = led.append([signed("eval", 2)])
    third = led.append([signed("artifact", 3)])
    stamps = [micros(a.integrated_at) for a in (*first, *second, *third)]
    assert stamps[0] == stamps[1] == micros(T0 + timedelta(hours=1))
    # clamped to one microsecond after the previous batch: every batch its own time
    assert stamps[2] == stamps[1] + 1 and stamps[3] == stamps[2] + 1
    stored = [micros(e.integrated_at) for e in led.store.entries()]
    assert stored == stamps
    for e, a in zip(led.store.entries(), (*first, *second, *third), strict=True):
        assert e.leaf_hash == a.leaf_hash == entry_leaf_hash(e.envelope, micros(e.integrated_at))
    assert audit(led.store, TRUST).ok
    # a second replica on the same database continues from the stored time
    other = Ledger(open_store(db_url), TRUST, KEYS["log"], clock=Clock(EPOCH))
    (d,) = other.append([signed("label", 4, EPOCH)])
    assert micros(d.integrated_at) == stamps[-1] + 1


def test_a_clock_set_back_cannot_put_a_revoked_keys_receipt_before_its_revocation(
    db_url: str, keys: Keys, served: LedgerThread
) -> None:
    """The issue: an operator running the ledger with its clock set back forced a revoked
    key's receipt in before the revocation, audit-clean."""
    made = datetime.now(UTC)  # signed before the revocation, appended after it
    early = prediction(keys.infer, 1, made)
    with LedgerClient(served.target) as c:
        c.append(label(keys.compile, 0))
        rev = c.append(revocation_of(keys, "infer"))
        assert made < from_micros(rev.integrated_time_us)
        served.srv.ledger._clock = lambda: made  # the operator sets the clock back
        with pytest.raises(KolmError, match="revoked") as ei:
            c.append(early)
        assert ei.value.grpc_code == "FAILED_PRECONDITION"
        ok = c.append(label(keys.compile, 2, made))
        assert ok.integrated_time_us == rev.integrated_time_us + 1
        assert ok.promise.integrated_time_us == ok.integrated_time_us
    rep = audit(open_store(db_url), keys.trust)
    assert rep.ok, rep.failures
    assert rep.entries == 3


# ---- finding 4: one statement, one entry ------------------------------------------------


def test_one_statement_one_entry_whatever_the_signature_bytes(
    keys: Keys, served: LedgerThread
) -> None:
    a = label(keys.compile, 0)
    b = label(keys.compile, 1)

    def resign(env: Envelope) -> Envelope:
        again = receipts.sign_statement(receipts.Statement.from_envelope(env), keys.compile)
        assert again.signatures[0].sig != env.signatures[0].sig
        return again

    with LedgerClient(served.target) as c:
        first = c.append(a)
        dup = c.append(resign(a))
        assert (dup.index, dup.leaf_hash, dup.duplicate) == (first.index, first.leaf_hash, True)
        assert dup.integrated_time_us == first.integrated_time_us
        assert dup.promise.integrated_time_us == first.integrated_time_us
        # within one stream message, and with the same bytes
        got = c.append_many([b, resign(b), b, resign(a)])
        assert [(r.index, r.duplicate) for r in got] == [  # type: ignore[union-attr]
            (1, False),
            (1, True),
            (1, True),
            (0, True),
        ]
        assert c.checkpoint().checkpoint.size == 2
        # the entry of a statement, found by its digest: the envelope that was logged
        bundle = c.bundle(statement_digest=statement_digest(resign(a)))
        assert bundle.envelope == a and bundle.tlog_proof.index == 0
        assert verify_bundle(bundle, keys.trust).leaf_hash == first.leaf_hash
    led = served.srv.ledger
    assert led.bundle_for_envelope(resign(b)).envelope == b


def test_the_audit_names_a_statement_logged_twice(db_url: str) -> None:
    """A database writer drops the unique index, and a ledger then logs a re-signed copy
    (what the code before this change did anyway); the audit, which recomputes statement
    digests itself, names it."""
    led = Ledger(open_store(db_url), TRUST, KEYS["log"], clock=Clock())
    env = signed("label", 0)
    led.append([env, signed("label", 1)])
    eng = raw(db_url)
    with eng.begin() as c:
        c.execute(sa.text("DROP INDEX uq_entries_statement_digest"))
    eng.dispose()
    stale = Ledger(open_store(db_url), TRUST, KEYS["log"], clock=Clock())
    again = receipts.sign_statement(receipts.Statement.from_envelope(env), KEYS["compile"])
    (r,) = stale.append([again])
    assert (r.index, r.duplicate) == (2, False)
    rep = audit(open_store(db_url), TRUST)
    assert rep.failing_indices() == [2]
    assert "repeats the statement (payload and key id) of entry 0" in str(rep.failures[0])


# ---- finding 7: the receipt time rule ----------------------------------------------------

BAD_TIMES: list[tuple[object, str, str]] = [
    # (predicate time, gRPC code, what the message says)
    (None, "INVALID_ARGUMENT", "statement.predicate.time: missing"),
    ("2026-12-03T12:00:00", "INVALID_ARGUMENT", "not an RFC 3339 date-time"),  # no offset
    ("2026-12-03 12:00:00Z", "INVALID_ARGUMENT", "not an RFC 3339 date-time"),
    ("20261203T120000Z", "INVALID_ARGUMENT", "not an RFC 3339 date-time"),
    ("2026-12-03T12:00:00+0000", "INVALID_ARGUMENT", "not an RFC 3339 date-time"),
    ("2026-W49-3T12:00:00Z", "INVALID_ARGUMENT", "not an RFC 3339 date-time"),
    ("2026-12-03t12:00:00z", "INVALID_ARGUMENT", "not an RFC 3339 date-time"),
    (1764763200, "INVALID_ARGUMENT", "want an RFC 3339 string"),
    ("1970-01-01T00:00:00Z", "FAILED_PRECONDITION", "before its key's not_before"),
    ("9999-12-31T23:59:59Z", "INVALID_ARGUMENT", "later than its integration time"),
]


def _bad(key: PrivateKey, value: object, i: int) -> Envelope:
    return with_time(key, value, i, drop=value is None)


def test_the_ledger_refuses_at_append_what_verify_refuses(keys: Keys, served: LedgerThread) -> None:
    nb = keys.not_before("compile")
    cases = [
        *BAD_TIMES,
        (format_time(nb - timedelta(seconds=1)), "FAILED_PRECONDITION", "before its key's"),
        (
            format_time(datetime.now(UTC) + timedelta(minutes=6)),
            "INVALID_ARGUMENT",
            "later than its integration time",
        ),
    ]
    with LedgerClient(served.target) as c:
        for i, (value, code, what) in enumerate(cases):
            with pytest.raises(KolmError) as ei:
                c.append(_bad(keys.compile, value, i))
            assert ei.value.grpc_code == code, (value, ei.value)
            assert what in str(ei.value) and "statement.predicate.time" in str(ei.value)
        # older is fine (spooled and resumed receipts arrive late), and so is a little
        # skew ahead; other offsets are read as the instant they name
        ok = [
            format_time(nb),
            format_time(datetime.now(UTC) + timedelta(minutes=4)),
            datetime.now(UTC).astimezone(timezone(timedelta(hours=-5))).isoformat("T", "seconds"),
        ]
        for i, value in enumerate(ok):
            assert not c.append(_bad(keys.compile, value, 100 + i)).duplicate
        assert c.checkpoint().checkpoint.size == len(ok)


def test_the_audit_and_verify_apply_the_same_time_rule(db_url: str, monkeypatch: Any) -> None:
    """Receipts a ledger without the rule (the code before) accepted: the audit names each
    and ``kolm verify`` refuses each bundle, at step 2 (parse) or 4 (key policy)."""
    clock = Clock()
    led = Ledger(open_store(db_url), TRUST, KEYS["log"], clock=clock)
    led.append([signed("label", 0)])
    monkeypatch.setattr(ledger_mod, "receipt_time", lambda _pred: T0)
    monkeypatch.setattr(ledger_mod, "check_receipt_time", lambda *_a, **_k: None)
    got = led.append([_bad(KEYS["compile"], v, i) for i, (v, _, _) in enumerate(BAD_TIMES)])
    monkeypatch.undo()
    led.append([signed("label", 99)])  # and the log goes on, rule back in place
    rep = audit(led.store, TRUST)
    assert rep.failing_indices() == [a.index for a in got]
    for a, f in zip(got, rep.failures, strict=True):
        assert f.index == a.index and "statement.predicate.time" in f.reason
    for a in got:
        with pytest.raises(KolmError) as ei:
            verify_bundle(led.bundle(a.index), TRUST)
        assert step_of(ei.value) in (2, 4) and "statement.predicate.time" in str(ei.value)
    # the skew is the stated one: a wider one (the ledger's --max-time-skew) accepts 9999
    future = got[-1]
    assert b"9999-12-31" in led.bundle(future.index).envelope.payload
    wide = timedelta(days=365 * 8000)
    assert verify_bundle(led.bundle(future.index), TRUST, max_time_skew=wide).index == future.index
    assert future.index not in audit(led.store, TRUST, max_time_skew=wide).failing_indices()


# ---- finding 7: one strict RFC 3339 parser ----------------------------------------------


NOON = datetime(2026, 12, 3, 12, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "want"),
    [
        ("2026-12-03T12:00:00Z", NOON),
        ("2026-12-03T12:00:00.5Z", NOON + timedelta(milliseconds=500)),
        ("2026-12-03T13:30:00+01:30", NOON),
        ("2026-12-03T06:59:59.123456789-05:00", NOON - timedelta(microseconds=876544)),
        ("2026-12-03T12:00:00-00:00", NOON),
    ],
)
def test_rfc3339_date_times_are_read(value: str, want: datetime) -> None:
    t = parse_rfc3339(value, "time")
    assert t == want and t.tzinfo is UTC
    assert parse_rfc3339(format_time(t), "time") == t


@pytest.mark.parametrize(
    "value",
    [
        "2026-12-03 12:00:00Z",
        "20261203T120000Z",
        "2026-12-03T12:00:00+0000",
        "2026-12-03T12:00:00+00",
        "2026-W49-3T12:00:00Z",
        "2026-337T12:00:00Z",
        "2026-12-03T12:00:00",
        "2026-12-03",
        "2026-12-03T12:00Z",
        "2026-12-03t12:00:00z",
        "2026-12-03T12:00:00.Z",
        "2026-12-03T12:00:00,5Z",
        "2026-12-03T12:00:00.1234567890Z",
        "2026-02-30T12:00:00Z",
        "2026-12-03T24:00:00Z",
        "2026-12-03T12:00:60Z",
        "2026-12-03T12:00:00+24:00",
        "0001-01-01T00:00:00+01:00",
        "+2026-12-03T12:00:00Z",
        "２０２６-12-03T12:00:00Z",
        " 2026-12-03T12:00:00Z",
        "2026-12-03T12:00:00Z\n",
    ],
)
def test_everything_else_is_refused_by_the_one_parser(value: str) -> None:
    with pytest.raises(StatementFormatError, match="time"):
        parse_rfc3339(value, "time")
    # the trust root and key receipts read times through it too
    with pytest.raises(TrustRootFormatError, match="not_before"):
        parse_time(value, "keys[0].not_before")


# ---- storage ---------------------------------------------------------------------------


def test_a_format_v1_database_with_entries_is_refused(db_url: str) -> None:
    from alembic import command
    from alembic.config import Config

    import kolm_ledger.storage.repository as repo

    store = Store(db_url, migrate=False)
    cfg = Config()
    cfg.set_main_option("script_location", str(repo._MIGRATIONS))
    with store.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0002")
        conn.execute(
            sa.text(
                "INSERT INTO entries (idx, leaf_hash, chain_hash, kind, key_id, integrated_at, "
                "envelope) VALUES (0, :h, :h, 'label', 'k', 0, :e)"
            ),
            {"h": bytes(32), "e": b"{}"},
        )
    store.close()
    with pytest.raises(StorageError, match="kolm log format v1"):
        Store(db_url)


def test_a_ledger_refuses_to_be_built_on_a_stored_revocation_it_cannot_prove(
    db_url: str,
) -> None:
    """In process, the same as over gRPC: the ledger opens (reads still work) but refuses
    every append until the log is repaired, naming the entry."""
    clock = Clock()
    led = Ledger(open_store(db_url), TRUST, KEYS["log"], clock=clock)
    led.append([signed("prediction", 0)])
    clock.t += timedelta(minutes=1)
    (rev,) = led.append([revocation("infer", clock.t)])
    clock.t += timedelta(minutes=1)
    with pytest.raises(KeyValidityError, match="revoked"):
        led.append([signed("prediction", 1, clock.t)])
    drop_triggers(db_url)
    set_time(db_url, rev.index, Y2100)
    again = Ledger(open_store(db_url), TRUST, KEYS["log"], clock=clock)
    assert again.key(KEYS["infer"].keyid()).revoked_at is None  # nothing folded...
    for env in (signed("prediction", 2, clock.t), signed("label", 3, clock.t)):
        with pytest.raises(ConflictError, match=f"entry {rev.index} "):  # ... nor written
            again.append([env])
    assert again.size == rev.index + 1
    assert again.entry(rev.index).integrated_at == from_micros(Y2100)
