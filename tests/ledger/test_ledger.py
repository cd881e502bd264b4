"""The ledger core: validation, key policy, trust changes, checkpoints, conflicts, concurrency.

Every check of :meth:`Ledger.validate` is driven to fail with its specific error; key
validity uses an injected clock; the chain, the leaf hashes, the tree root and the
checkpoint signature are recomputed here with code that does not come from kolm
(``rfc8785``, ``hashlib`` and ``cryptography`` directly); and the parsers a ledger
operator feeds files to (trust root JSON, key PEM, envelopes) are fuzzed with a seeded
generator and may raise only :class:`~kolm_ledger.errors.KolmError`.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import itertools
import json
import random
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import rfc8785
import sqlalchemy as sa
from cryptography.exceptions import InternalError
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from support.db import raw, tamper

from kolm_ledger._crypto import PrivateKey, PublicKey
from kolm_ledger._samples import sample_statement
from kolm_ledger.audit.auditor import audit
from kolm_ledger.errors import (
    ConflictError,
    EntryTooLargeError,
    EnvelopeFormatError,
    KeyFormatError,
    KeyValidityError,
    KolmError,
    NotFoundError,
    RoleError,
    SignatureError,
    StatementFormatError,
    TrustRootFormatError,
    UnavailableError,
    UnknownKeyError,
)
from kolm_ledger.formats import dsse, merkle, receipts
from kolm_ledger.formats.checkpoint import (
    Checkpoint,
    check_consistent,
    sign_checkpoint,
    verify_checkpoint,
)
from kolm_ledger.formats.dsse import Envelope, Signature
from kolm_ledger.formats.leaf import chain_next
from kolm_ledger.formats.note import NoteSigner
from kolm_ledger.keys import TrustedKey, TrustRoot, init_keys
from kolm_ledger.log.ledger import Ledger
from kolm_ledger.storage import Store, micros
from kolm_ledger.storage.models import APPEND_ONLY_TABLES, node_id
from kolm_ledger.verify.receipt import verify_bundle

ORIGIN = "test.kolm.dev/ledger"
EPOCH = datetime(2025, 1, 1, tzinfo=UTC)
T0 = datetime(2026, 3, 1, 12, tzinfo=UTC)

KEYS: dict[str, PrivateKey] = {
    name: PrivateKey.generate("ed25519" if name.startswith("log") else "ecdsa-p256-sha256")
    for name in ("admin", "compile", "infer", "expired", "future", "window", "rogue", "log")
}
KEYS["compile_ed"] = PrivateKey.generate("ed25519")  # Ed25519 producer keys are accepted too
KEYS["log_rogue"] = PrivateKey.generate("ed25519")
SIGNER = {"label": "compile", "eval": "compile", "artifact": "compile", "prediction": "infer"}
SIGNER["key"] = "admin"


def _trusted(name: str, role: Any, **kw: Any) -> TrustedKey:
    kw.setdefault("not_before", EPOCH)
    return TrustedKey.for_key(KEYS[name].public_key(), role, **kw)


TRUST = TrustRoot(
    (
        _trusted("admin", "admin"),
        _trusted("compile", "compile"),
        _trusted("compile_ed", "compile"),
        _trusted("infer", "infer"),
        _trusted("expired", "compile", not_after=T0 - timedelta(days=1)),
        _trusted("future", "compile", not_before=T0 + timedelta(days=1)),
        _trusted("window", "infer", not_before=T0, not_after=T0 + timedelta(days=10)),
        _trusted("log", "log", origin=ORIGIN),
    )
)


class Clock:
    """An injected clock that moves only when told to."""

    def __init__(self, t: datetime = T0) -> None:
        self.t = t

    def __call__(self) -> datetime:
        return self.t

    def tick(self, **kw: float) -> datetime:
        self.t += timedelta(**kw)
        return self.t


_OPEN: list[Store] = []


def open_store(url: str) -> Store:
    """A store closed after the test, whatever happens (psycopg warns about leaks)."""
    store = Store(url)
    _OPEN.append(store)
    return store


@pytest.fixture(autouse=True)
def _close_stores() -> Iterator[None]:
    yield
    while _OPEN:
        _OPEN.pop().close()


def ledger_on(url: str, clock: Clock | None = None, trust: TrustRoot = TRUST) -> Ledger:
    return Ledger(open_store(url), trust, KEYS["log"], clock=clock or Clock())


def receipt(kind: str, i: int = 0, signer: str | None = None) -> Envelope:
    # dated T0 (the injected clock's start): a receipt's time may not lie after its
    # integration time plus the skew, nor before its key's not_before
    st = sample_statement(kind, i, random.Random(f"{kind}{i}"), T0)
    return receipts.sign_statement(st, KEYS[signer or SIGNER[kind]])


def mixed(n: int, start: int = 0) -> list[Envelope]:
    return [receipt(receipts.KINDS[i % 5], i) for i in range(start, start + n)]


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'ledger.db'}"


@pytest.fixture
def ledger(sqlite_url: str) -> Ledger:
    return ledger_on(sqlite_url)


def counts(url: str) -> dict[str, int]:
    eng = raw(url)
    with eng.connect() as c:
        out = {
            t: c.execute(sa.text(f"SELECT count(*) FROM {t}")).scalar_one()
            for t in APPEND_ONLY_TABLES
        }
    eng.dispose()
    return out


# ---- validate: each check fails with its own error ------------------------------------


def test_validate_accepts_every_kind_signed_by_its_role(ledger: Ledger) -> None:
    for kind in receipts.KINDS:
        env = receipt(kind)
        v = ledger.validate(env)
        assert (v.kind, v.key_id) == (kind, KEYS[SIGNER[kind]].keyid())
        assert v.canonical == env.canonical()
        # one statement, one entry: the digest of what was signed and by whom, not of sig
        pae = dsse.pae(env.payload_type, env.payload)
        assert v.digest == hashlib.sha256(pae + env.signatures[0].keyid.encode()).digest()
        assert v.time_us == micros(T0)
        # bytes and the JSON object validate to the same thing
        assert ledger.validate(env.to_bytes()) == v
        assert ledger.validate(env.to_json()) == v
    v = ledger.validate(receipt("label", signer="compile_ed"))
    assert v.key_id == KEYS["compile_ed"].keyid()


def _env_json(**changes: Any) -> bytes:
    obj: dict[str, Any] = receipt("label").to_json()
    obj.update(changes)
    return json.dumps({k: v for k, v in obj.items() if v is not ...}).encode()


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "not JSON"),
        (b"\xff\xfe garbage", "not JSON"),
        (b"not json", "not JSON"),
        (b"[]", "want a JSON object"),
        (b"{}", "missing field payload"),
        (b"null", "want a JSON object"),
        (_env_json(payload="!!not base64!!"), "envelope.payload"),
        (_env_json(payload=...), "missing field payload"),
        (_env_json(payloadType=""), "payloadType"),
        (_env_json(payloadType=7), "payloadType"),
        (_env_json(signatures=[]), "signatures: want a non-empty list"),
        (_env_json(signatures=...), "missing field signatures"),
        (_env_json(signatures=[{"keyid": "k", "sig": ""}]), "empty"),
        (_env_json(signatures=[{"keyid": 1, "sig": "AAAA"}]), "keyid"),
        (_env_json(signatures=["x"]), "want an object"),
        (_env_json(extra=1), "unknown field"),
        (b"[" * 20_000 + b"]" * 20_000, r"nested too deeply|recursion"),
    ],
)
def test_validate_rejects_malformed_bytes(ledger: Ledger, data: bytes, match: str) -> None:
    with pytest.raises(EnvelopeFormatError, match=match):
        ledger.validate(data)


def test_validate_rejects_non_envelopes_and_two_signatures(ledger: Ledger) -> None:
    with pytest.raises(EnvelopeFormatError, match="want a DSSE envelope"):
        ledger.validate(42)  # type: ignore[arg-type]
    env = receipt("label")
    other = receipt("label", signer="compile_ed")
    two = Envelope(env.payload, env.payload_type, env.signatures + other.signatures)
    with pytest.raises(EnvelopeFormatError, match="2 signatures, want exactly 1"):
        ledger.validate(two)


def _signed_payload(payload: bytes, key: str = "compile", ptype: str | None = None) -> Envelope:
    return dsse.sign(payload, ptype or dsse.IN_TOTO_PAYLOAD_TYPE, KEYS[key])


def test_validate_rejects_statements_that_are_not_kolm_receipts(ledger: Ledger) -> None:
    st = receipt("artifact")
    body = json.loads(st.payload)
    foreign = dict(body, predicateType="https://slsa.dev/provenance/v1")
    with pytest.raises(StatementFormatError, match="not a kolm receipt type"):
        ledger.validate(_signed_payload(rfc8785.dumps(foreign)))
    near = dict(body, predicateType="urn:kolm:receipt:artifact:v2")
    with pytest.raises(StatementFormatError, match="not a kolm receipt type"):
        ledger.validate(_signed_payload(rfc8785.dumps(near)))
    with pytest.raises(StatementFormatError, match="payloadType"):
        ledger.validate(_signed_payload(st.payload, ptype="application/json"))
    missing = copy.deepcopy(body)
    del missing["predicate"]["label_count"]
    with pytest.raises(StatementFormatError, match="missing label_count"):
        ledger.validate(_signed_payload(rfc8785.dumps(missing)))
    with pytest.raises(StatementFormatError, match=r"nested too deeply|recursion"):
        ledger.validate(_signed_payload(b"[" * 20_000 + b"]" * 20_000))
    with pytest.raises(StatementFormatError, match="not JSON"):
        ledger.validate(_signed_payload(b"\x00\x01"))


def test_validate_rejects_unknown_keys(ledger: Ledger) -> None:
    with pytest.raises(UnknownKeyError, match=KEYS["rogue"].keyid()[:16]):
        ledger.validate(receipt("label", signer="rogue"))
    # the log's own key is not a producer key either, but it is known: that is a role error
    with pytest.raises(RoleError, match="'log'"):
        ledger.validate(receipt("label", signer="log"))


def test_validate_rejects_bad_signatures(ledger: Ledger) -> None:
    env = receipt("eval")
    sig = env.signatures[0]
    flipped = bytearray(sig.sig)
    flipped[-1] ^= 1
    cases = {
        "signature byte flipped": replace(env, signatures=(Signature(sig.keyid, bytes(flipped)),)),
        "payload changed": replace(env, payload=env.payload.replace(b"wilson", b"Wilson")),
        "payload type changed": replace(env, payload_type=env.payload_type + " "),
        "signature by another trusted key": replace(
            env, signatures=(Signature(KEYS["compile_ed"].keyid(), sig.sig),)
        ),
        "garbage DER": replace(env, signatures=(Signature(sig.keyid, b"\x30\x01\x00"),)),
    }
    for what, bad in cases.items():
        with pytest.raises((SignatureError, StatementFormatError)) as ei:
            ledger.validate(bad)
        if what != "payload type changed":  # that one fails earlier: not in-toto any more
            assert isinstance(ei.value, SignatureError), what


@pytest.mark.parametrize(
    ("signer", "kind"),
    [
        ("infer", "artifact"),
        ("infer", "label"),
        ("infer", "key"),
        ("compile", "prediction"),
        ("compile", "key"),
        ("admin", "label"),
        ("admin", "prediction"),
        ("log", "eval"),
    ],
)
def test_validate_rejects_roles_that_may_not_sign_the_kind(
    ledger: Ledger, signer: str, kind: str
) -> None:
    with pytest.raises(RoleError) as ei:
        ledger.validate(receipt(kind, signer=signer))
    msg = str(ei.value)
    assert f"may not sign {kind!r}" in msg
    assert KEYS[signer].keyid()[:16] in msg


def test_validate_checks_key_validity_at_the_injected_clock(sqlite_url: str) -> None:
    clock = Clock(T0)
    led = ledger_on(sqlite_url, clock)
    with pytest.raises(KeyValidityError, match="expired at"):
        led.validate(receipt("label", signer="expired"))
    with pytest.raises(KeyValidityError, match="not valid before"):
        led.validate(receipt("label", signer="future"))
    # the same keys at other times, passed explicitly or through the clock
    # (receipts dated when the key was valid: a receipt's time may not lie after the
    # validation time plus the skew, nor before its key's not_before)
    st = sample_statement("label", 0, random.Random(0), T0 - timedelta(days=3))
    led.validate(receipts.sign_statement(st, KEYS["expired"]), now=T0 - timedelta(days=2))
    st = sample_statement("label", 0, random.Random(0), T0 + timedelta(days=2))
    led.validate(receipts.sign_statement(st, KEYS["future"]), now=T0 + timedelta(days=2))
    win = receipt("prediction", signer="window")
    clock.t = T0 - timedelta(seconds=1)
    with pytest.raises(KeyValidityError, match="not valid before"):
        led.append([win])
    for t in (T0, T0 + timedelta(days=5), T0 + timedelta(days=10)):  # bounds inclusive
        clock.t = t
        led.validate(win)
    clock.t = T0 + timedelta(days=10, microseconds=1)
    with pytest.raises(KeyValidityError, match="expired at"):
        led.append([win])
    assert led.size == 0
    clock.t = T0 + timedelta(days=1)
    assert [a.index for a in led.append([win])] == [0]


def test_revocation_by_key_receipt(sqlite_url: str) -> None:
    """Admin revokes the infer key: receipts before stay valid, after are refused."""
    clock = Clock(T0)
    led = ledger_on(sqlite_url, clock)
    before = [receipt("prediction", i) for i in range(3)]
    assert [a.index for a in led.append(before)] == [0, 1, 2]
    pre_revocation_trust = led.trust
    clock.tick(minutes=1)
    # back-dated a day: a key receipt takes effect no earlier than the log saw it
    revoke = receipts.key_statement(
        action="revoke",
        public_key=KEYS["infer"].public_key(),
        role="infer",
        effective_at=T0 - timedelta(days=1),
        reason="laptop stolen",
        time=clock.t,
    )
    (rev,) = led.append([receipts.sign_statement(revoke, KEYS["admin"])])
    assert rev.index == 3
    assert led.key(KEYS["infer"].keyid()).revoked_at == clock.t
    late = receipt("prediction", 99)
    with pytest.raises(KeyValidityError, match="revoked"):
        led.append([late])
    clock.tick(minutes=1)
    with pytest.raises(KeyValidityError, match="revoked"):
        led.append([receipt("label", 5), late])  # the whole batch is refused
    assert led.size == 4
    # a second replica learns the revocation from the log
    other = ledger_on(sqlite_url, clock)
    with pytest.raises(KeyValidityError, match="revoked"):
        other.validate(late)
    rep = audit(led.store, TRUST)
    assert rep.ok, rep.failures
    assert rep.by_kind == Counter({"prediction": 3, "key": 1})
    # a replica that missed the revocation (stale trust state) accepts the receipt; the
    # audit, which replays key receipts from the log itself, names it
    led.trust = pre_revocation_trust
    (bad,) = led.append([late])
    rep = audit(led.store, TRUST)
    assert rep.failing_indices() == [bad.index]
    assert "revoked" in str(rep.failures[0])


def test_future_revocation_registration_and_rotation(sqlite_url: str) -> None:
    clock = Clock(T0)
    led = ledger_on(sqlite_url, clock)
    new_infer = PrivateKey.generate()
    pred = receipts.sign_statement(
        sample_statement("prediction", 1, random.Random(1), T0), new_infer
    )
    with pytest.raises(UnknownKeyError):
        led.validate(pred)
    reg = receipts.key_statement(
        action="register",
        public_key=new_infer.public_key(),
        role="infer",
        not_after=T0 + timedelta(hours=2),
        time=T0,
    )
    led.append([receipts.sign_statement(reg, KEYS["admin"])])
    assert led.append([pred])[0].index == 1
    # a revocation dated in the future takes effect then, not now
    later = receipts.key_statement(
        action="revoke",
        public_key=KEYS["infer"].public_key(),
        role="infer",
        effective_at=T0 + timedelta(hours=1),
        time=T0,
    )
    led.append([receipts.sign_statement(later, KEYS["admin"])])
    led.append([receipt("prediction", 1)])
    clock.tick(hours=1)
    with pytest.raises(KeyValidityError, match="revoked"):
        led.append([receipt("prediction", 2)])
    # the registered key's own not_after holds too
    led.append(
        [
            receipts.sign_statement(
                sample_statement("prediction", 3, random.Random(3), T0), new_infer
            )
        ]
    )
    clock.tick(hours=1, seconds=1)
    with pytest.raises(KeyValidityError, match="expired"):
        led.append(
            [
                receipts.sign_statement(
                    sample_statement("prediction", 4, random.Random(4), T0), new_infer
                )
            ]
        )
    # rotation: the new compile key is registered, the one it replaces revoked
    new_compile = PrivateKey.generate()
    rot = receipts.key_statement(
        action="rotate",
        public_key=new_compile.public_key(),
        role="compile",
        replaces=KEYS["compile"].keyid(),
        time=clock.t,
    )
    led.append([receipts.sign_statement(rot, KEYS["admin"])])
    clock.tick(seconds=1)
    led.append(
        [
            receipts.sign_statement(
                sample_statement("label", 1, random.Random(1), clock.t), new_compile
            )
        ]
    )
    with pytest.raises(KeyValidityError, match="revoked"):
        led.append([receipt("label", 2)])
    rep = audit(led.store, TRUST)
    assert rep.ok, rep.failures
    assert rep.entries == led.size == 7


def _key_receipt(**pred: Any) -> Envelope:
    st = receipts.key_statement(
        action="register", public_key=PrivateKey.generate().public_key(), role="infer", time=T0
    )
    body = st.to_json()
    body["predicate"].update(pred)
    return _signed_payload(rfc8785.dumps(body), key="admin")


@pytest.mark.parametrize(
    ("pred", "error", "match"),
    [
        ({"action": "revoke", "keyid": "ee" * 32}, UnknownKeyError, "ee" * 8),
        ({"role": "log"}, StatementFormatError, "cannot be registered"),
        ({"role": "root"}, StatementFormatError, "cannot be registered"),
        ({"keyid": "ee" * 32}, StatementFormatError, "does not match its public key"),
        ({"public_key_pem": "not a pem"}, StatementFormatError, "public_key_pem"),
        ({"public_key_pem": 7}, StatementFormatError, "public_key_pem"),
        ({"action": "delete"}, StatementFormatError, "action"),
        ({"action": ["register"]}, StatementFormatError, "action"),
        ({"keyid": None}, StatementFormatError, "keyid"),
        ({"effective_at": "yesterday"}, StatementFormatError, "effective_at"),
        ({"effective_at": 0}, StatementFormatError, "effective_at"),
        ({"effective_at": "0001-01-01T00:00:00+01:00"}, StatementFormatError, "effective_at"),
        ({"not_after": "soon"}, StatementFormatError, "not_after"),
        ({"action": "rotate", "replaces": 5}, StatementFormatError, "replaces"),
        ({"action": "rotate", "replaces": "ee" * 32}, UnknownKeyError, "ee" * 8),
    ],
)
def test_key_receipts_that_do_not_apply_are_refused_before_they_are_written(
    sqlite_url: str, pred: dict[str, Any], error: type[KolmError], match: str
) -> None:
    """Such a receipt once committed made every later refresh_trust (and reopen) raise."""
    led = ledger_on(sqlite_url)
    with pytest.raises(error, match=match):
        led.append([_key_receipt(**pred)])
    assert led.size == 0
    led.append([receipt("label")])
    ledger_on(sqlite_url)  # the log still opens


# ---- checkpoints ----------------------------------------------------------------------


def test_one_checkpoint_per_batch_each_verified_and_consistent(ledger: Ledger) -> None:
    with pytest.raises(NotFoundError, match="empty"):
        ledger.checkpoint()
    assert ledger.append([]) == []
    sizes = [1, 3, 1, 7, 2, 16, 5, 1]
    envs = mixed(sum(sizes))
    pos = 0
    for n in sizes:
        res = ledger.append(envs[pos : pos + n])
        assert [a.index for a in res] == list(range(pos, pos + n))
        pos += n
        assert ledger.checkpoint().checkpoint.size == pos
    # a batch of duplicates only signs nothing
    ledger.append(envs[:4])
    stored = list(ledger.store.checkpoints())
    want = [sum(sizes[: i + 1]) for i in range(len(sizes))]
    assert [c.size for c in stored] == want
    leaves = [e.leaf_hash for e in ledger.store.entries()]
    prev: Checkpoint | None = None
    for sc in stored:
        cp = verify_checkpoint(sc.note, TRUST, origin=ORIGIN).checkpoint
        assert (cp.origin, cp.size, cp.root, cp.chain_head) == (
            ORIGIN,
            sc.size,
            sc.root,
            sc.chain_head,
        )
        assert cp.root == merkle.root_from_leaves(leaves[: cp.size])
        assert cp.chain_head == ledger.store.get_entry(cp.size - 1).chain_hash
        if prev is not None:
            check_consistent(prev, cp, ledger.store.consistency_proof(prev.size, cp.size))
            # and not consistent with a forked history
            forked = Checkpoint(ORIGIN, cp.size, hashlib.sha256(cp.root).digest(), cp.chain_head)
            with pytest.raises(KolmError):
                check_consistent(prev, forked, ledger.store.consistency_proof(prev.size, cp.size))
        prev = cp
    # offline bundles against the newest and against older checkpoints
    for index in (0, 5, pos - 1):
        for size in (None, *[s for s in want if s > index][:2]):
            b = ledger.bundle(index, size)
            v = verify_bundle(b, TRUST, origin=ORIGIN)
            assert v.index == index
            assert v.leaf_hash == leaves[index]
    with pytest.raises(NotFoundError):
        ledger.bundle(pos)


def test_a_log_key_not_in_the_trust_root_is_refused(sqlite_url: str) -> None:
    with pytest.raises(KeyFormatError, match="not in the trust root"):
        Ledger(open_store(sqlite_url), TRUST, KEYS["log_rogue"])
    with pytest.raises(KeyFormatError, match="want 'log'"):
        Ledger(open_store(sqlite_url), TRUST, KEYS["compile_ed"])


# ---- refusing to extend a tampered log ------------------------------------------------


def _forged_row(url: str) -> list[tuple[str, dict[str, Any]]]:
    """An extra entry after the newest checkpoint, with a correct chain hash and node."""
    last = open_store(url).get_entry(12)
    env = receipt("label", 500).canonical()
    leaf = hashlib.sha256(b"\x00" + env).digest()
    return [
        (
            "INSERT INTO entries (idx, leaf_hash, chain_hash, kind, key_id, integrated_at, "
            "envelope) VALUES (13, :l, :c, 'label', :k, 0, :e)",
            {"l": leaf, "c": chain_next(last.chain_hash, leaf), "k": "x", "e": env},
        ),
        (
            "INSERT INTO nodes (node_id, hash) VALUES (:n, :h)",
            {
                "n": node_id(1, 6),
                "h": hashlib.sha256(b"\x01" + last.leaf_hash + leaf).digest(),
            },
        ),
    ]


def _rewritten_with_checkpoint(url: str, resign: bool) -> list[tuple[str, dict[str, Any]]]:
    """Rewrite the peak over entries 0..7 and make the checkpoint row agree with it."""
    store = open_store(url)
    peaks = store.get_nodes([(3, 0), (2, 2), (0, 12)])
    sc = store.latest_checkpoint()
    assert sc is not None and sc.size == 13
    fake = hashlib.sha256(b"forged").digest()
    root = merkle.root_from_peaks([fake, *peaks[1:]])
    stmts: list[tuple[str, dict[str, Any]]] = [
        ("UPDATE nodes SET hash = :h WHERE node_id = :n", {"h": fake, "n": node_id(3, 0)}),
        ("UPDATE checkpoints SET root = :r WHERE size = 13", {"r": root}),
    ]
    if resign:  # signed by a key with the right origin, but not a trusted one
        cp = Checkpoint(ORIGIN, 13, root, sc.chain_head)
        note = sign_checkpoint(cp, [NoteSigner(ORIGIN, KEYS["log_rogue"])]).to_bytes()
        stmts.append(("UPDATE checkpoints SET note = :n WHERE size = 13", {"n": note}))
    return stmts


TAMPERING: dict[str, Callable[[str], list[tuple[str, dict[str, Any]]]]] = {
    "peak node rewritten": lambda url: [
        ("UPDATE nodes SET hash = :h WHERE node_id = :n", {"h": bytes(32), "n": node_id(3, 0)})
    ],
    "last leaf hash rewritten": lambda url: [
        ("UPDATE entries SET leaf_hash = :h WHERE idx = 12", {"h": b"\x07" * 32})
    ],
    "last chain hash rewritten": lambda url: [
        ("UPDATE entries SET chain_hash = :h WHERE idx = 12", {"h": b"\x07" * 32})
    ],
    "last entry deleted": lambda url: [
        ("DELETE FROM entries WHERE idx = 12", {}),
        ("DELETE FROM entry_subjects WHERE idx = 12", {}),
    ],
    "forged entry after the checkpoint": _forged_row,
    "every checkpoint deleted": lambda url: [("DELETE FROM checkpoints", {})],
    "checkpoint columns rewritten to match": lambda url: _rewritten_with_checkpoint(url, False),
    "checkpoint re-signed by an untrusted key": lambda url: _rewritten_with_checkpoint(url, True),
}


@pytest.mark.parametrize("how", sorted(TAMPERING))
def test_refuses_to_extend_a_log_that_contradicts_its_newest_checkpoint(
    db_url: str, how: str
) -> None:
    led = ledger_on(db_url)
    led.append(mixed(5))
    led.append(mixed(8, 5))  # size 13: peaks (3, 0), (2, 2) and leaf 12
    tamper(db_url, *TAMPERING[how](db_url))
    before = counts(db_url)
    fresh = ledger_on(db_url)  # a new process: nothing cached
    with pytest.raises(ConflictError) as ei:
        fresh.append([receipt("label", 1000)])
    assert "13" in str(ei.value) or "checkpoint" in str(ei.value)
    assert counts(db_url) == before


def test_the_untampered_log_extends_from_a_fresh_process(db_url: str) -> None:
    led = ledger_on(db_url)
    led.append(mixed(13))
    again = ledger_on(db_url)
    assert [a.index for a in again.append([receipt("label", 1000)])] == [13]
    assert audit(again.store, TRUST).ok


# ---- the hash chain and the tree, recomputed independently ----------------------------


def _mth(leaves: list[bytes]) -> bytes:
    """RFC 6962 §2.1 Merkle tree hash, straight from the definition."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return leaves[0]
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    return hashlib.sha256(b"\x01" + _mth(leaves[:k]) + _mth(leaves[k:])).digest()


def _check_note(note: bytes) -> tuple[str, int, bytes, bytes]:
    """Verify a C2SP signed note with the log key, using only ``cryptography``."""
    text, _, sigs = note.decode().partition("\n\n")
    text += "\n"
    pub = KEYS["log"].public_key().raw()
    key_hash = hashlib.sha256(ORIGIN.encode() + b"\n\x01" + pub).digest()[:4]
    verified = 0
    for line in sigs.splitlines():
        name, blob = line.removeprefix("\u2014 ").split(" ")
        raw_sig = base64.b64decode(blob)
        if name == ORIGIN and raw_sig[:4] == key_hash:
            ed25519.Ed25519PublicKey.from_public_bytes(pub).verify(raw_sig[4:], text.encode())
            verified += 1
    assert verified == 1
    origin, size, root, chain = text.splitlines()
    assert chain.startswith("chain ")
    return origin, int(size), base64.b64decode(root), base64.b64decode(chain[6:])


def test_chain_leaves_root_and_note_recomputed_independently(db_url: str) -> None:
    led = ledger_on(db_url)
    envs = mixed(37)
    for i in range(0, 37, 6):
        led.append(envs[i : i + 6])
    chain = bytes(32)
    leaves = []
    chains = {}
    for i, e in enumerate(led.store.entries()):
        assert e.index == i
        # the stored envelope is the RFC 8785 form of the DSSE JSON the producer signed
        assert e.envelope == rfc8785.dumps(envs[i].to_json())
        # log format v2: the leaf binds the envelope and its integration time (µs)
        data = rfc8785.dumps(
            {"envelope": envs[i].to_json(), "integrated_time": micros(e.integrated_at)}
        )
        leaf = hashlib.sha256(b"\x00" + data).digest()
        assert e.leaf_hash == leaf
        chain = hashlib.sha256(b"\x02" + chain + leaf).digest()
        assert e.chain_hash == chain
        leaves.append(leaf)
        chains[i + 1] = chain
    for sc in led.store.checkpoints():
        origin, size, root, chain_head = _check_note(sc.note)
        assert origin == ORIGIN
        assert root == _mth(leaves[:size])
        assert chain_head == chains[size]
    assert _mth(leaves) == led.checkpoint().checkpoint.root


# ---- concurrency ----------------------------------------------------------------------


def test_two_ledgers_on_one_database_append_concurrently(db_url: str) -> None:
    ledgers = [ledger_on(db_url), ledger_on(db_url)]
    workers, rounds, per_batch = 4, 10, 3
    shared = [receipt("eval", 10_000 + r) for r in range(rounds)]  # every worker sends these
    barrier = threading.Barrier(workers)
    results: list[list[tuple[bytes, int, bool]]] = [[] for _ in range(workers)]
    errors: list[BaseException] = []

    def work(w: int) -> None:
        try:
            led = ledgers[w % 2]
            mine = mixed(rounds * per_batch, start=1000 * (w + 1))
            barrier.wait()
            for r in range(rounds):
                batch = [*mine[r * per_batch : (r + 1) * per_batch], shared[r]]
                for a in led.append(batch):
                    results[w].append((a.leaf_hash, a.index, a.duplicate))
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    total = workers * rounds * per_batch + rounds
    store = ledgers[0].store
    assert store.size() == total
    fresh = [(leaf, i) for res in results for leaf, i, dup in res if not dup]
    assert sorted(i for _, i in fresh) == list(range(total))  # no duplicate, no gap
    by_leaf = {e.leaf_hash: e.index for e in store.entries()}
    assert len(by_leaf) == total
    for res in results:
        for leaf, i, _ in res:
            assert by_leaf[leaf] == i  # every caller was told the real index
    chain = bytes(32)
    for e in store.entries():
        chain = chain_next(chain, e.leaf_hash)
        assert e.chain_hash == chain
    cps = list(store.checkpoints())
    assert cps[-1].size == total
    assert len(cps) == workers * rounds  # one per batch: every batch had new entries
    for a, b in itertools.pairwise(cps):
        old = verify_checkpoint(a.note, TRUST).checkpoint
        new = verify_checkpoint(b.note, TRUST).checkpoint
        check_consistent(old, new, store.consistency_proof(a.size, b.size))
    rep = audit(store, TRUST)
    assert rep.ok, rep.failures[:5]
    assert rep.entries == total


# ---- bad input: only our own errors ---------------------------------------------------

JSON_POOL: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    2**64,
    1.5,
    1e308,
    "",
    "x",
    "é",
    "\u2014",
    "A" * 300,
    [],
    {},
    [None],
    {"a": 1},
    "2026-01-01T00:00:00Z",
    "2026-01-01T00:00:00",
    "9999-12-31T23:59:59Z",
    "register",
    "revoke",
    "rotate",
    "log",
    "admin",
    "infer",
    "ed25519",
    "ecdsa-p256-sha256",
    "urn:kolm:receipt:key:v1",
    "urn:kolm:receipt:label:v1",
    "https://in-toto.io/Statement/v1",
    "application/vnd.in-toto+json",
    "ab" * 32,
    "AAAA",
    "====",
    KEYS["infer"].public_key().pem(),
    KEYS["log"].public_key().pem(),
    KEYS["infer"].keyid(),
    KEYS["log"].keyid(),
]


def _paths(obj: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield path
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*path, i))


def mutate_json(obj: Any, rng: random.Random) -> Any:
    """One near miss: a value replaced, a field deleted or added, a list shortened."""
    obj = copy.deepcopy(obj)
    path = rng.choice(list(_paths(obj)))
    if not path:
        return rng.choice(JSON_POOL)
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    last = path[-1]
    op = rng.randrange(4)
    if op == 0 or (op == 3 and not isinstance(parent, dict)):
        parent[last] = copy.deepcopy(rng.choice(JSON_POOL))
    elif op == 1:
        del parent[last]
    elif op == 2 and isinstance(parent, dict):
        parent[rng.choice(["extra", "payload", "keyid", "not_after", "x" * 3])] = rng.choice(
            JSON_POOL
        )
    elif isinstance(parent, dict):
        parent[last] = [parent[last]]
    else:
        parent.append(rng.choice(JSON_POOL))
    return obj


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    op = rng.randrange(5)
    i = rng.randrange(len(b)) if b else 0
    if op == 0 and b:
        b[i] ^= 1 << rng.randrange(8)
    elif op == 1 and b:
        b[i] = rng.randrange(256)
    elif op == 2:
        del b[i:]
    elif op == 3:
        b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    elif b:
        del b[i : i + rng.randint(1, 16)]
    return bytes(b)


def _jcs_or_json(obj: Any) -> bytes:
    """RFC 8785 bytes where the value has them (so the statement checks run), else JSON."""
    try:
        return rfc8785.dumps(obj)
    except (rfc8785.CanonicalizationError, TypeError, ValueError):
        return json.dumps(obj).encode()


def test_validate_raises_only_kolm_errors_on_arbitrary_bytes(ledger: Ledger) -> None:
    rng = random.Random(1234)
    seeds = [receipt(k, i) for i, k in enumerate(receipts.KINDS)]
    outcomes: Counter[str] = Counter()
    cases: list[Any] = [
        b"[" * 100_000,
        b'{"payload":' * 5000,
        b'{"payload": "' + b"A" * 200_000 + b'"}',
        b"\xef\xbb\xbf" + seeds[0].to_bytes(),  # BOM
        seeds[0].to_bytes().replace(b'"payload"', b'"payload\\u0000"'),
        json.dumps(dict(seeds[0].to_json(), payloadType="\ud800")).encode(),
        b'{"payload": NaN, "payloadType": Infinity, "signatures": -Infinity}',
    ]
    cases += [bytes(rng.randrange(256) for _ in range(rng.randrange(300))) for _ in range(300)]
    cases += [mutate_bytes(rng.choice(seeds).to_bytes(), rng) for _ in range(500)]
    for _ in range(400):
        obj = mutate_json(rng.choice(seeds).to_json(), rng)
        cases.append(json.dumps(obj).encode() if rng.random() < 0.5 else obj)
    for _ in range(500):  # statements off by one field, correctly signed: past the signature
        env = rng.choice(seeds)
        st = mutate_json(json.loads(env.payload), rng)
        kind = receipts.KINDS[seeds.index(env)]
        cases.append(_signed_payload(_jcs_or_json(st), key=SIGNER[kind]))
    for case in cases:
        try:
            ledger.validate(case)
            outcomes["accepted"] += 1
        except KolmError as e:
            assert str(e), type(e)
            outcomes[type(e).__name__] += 1
    assert len(cases) >= 1700
    # the generator reaches every stage, not just the JSON parser
    for name in ("EnvelopeFormatError", "StatementFormatError", "SignatureError", "accepted"):
        assert outcomes[name] > 0, outcomes


def _pems() -> list[bytes]:
    enc = serialization.Encoding.PEM
    pk8 = serialization.PrivateFormat.PKCS8
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    none = serialization.NoEncryption()
    p384 = ec.generate_private_key(ec.SECP384R1())
    r = rsa.generate_private_key(65537, 1024)
    return [
        KEYS["compile"].pem(),
        KEYS["log"].pem(),
        KEYS["compile"].public_key().pem().encode(),
        KEYS["log"].public_key().pem().encode(),
        p384.private_bytes(enc, pk8, none),
        p384.public_key().public_bytes(enc, spki),
        r.private_bytes(enc, pk8, none),
        r.public_key().public_bytes(enc, spki),
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            enc, serialization.PrivateFormat.TraditionalOpenSSL, none
        ),
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            enc, pk8, serialization.BestAvailableEncryption(b"pw")
        ),
    ]


def _reencode(pem: bytes, rng: random.Random) -> bytes:
    """A mutation inside the DER, re-wrapped as valid PEM (so it reaches the ASN.1 parser)."""
    lines = pem.strip().split(b"\n")
    der = base64.b64decode(b"".join(lines[1:-1]))
    return lines[0] + b"\n" + base64.encodebytes(mutate_bytes(der, rng)) + lines[-1] + b"\n"


#: Foreign exceptions the key parser in _crypto.py still lets through (reported; not ours
#: to edit). The fuzz tolerates only these; test_known_pem_leaks pins each with a reproducer.
PEM_LEAKS = (InternalError,)


def test_key_pem_loading_raises_only_kolm_errors(tmp_path: Path) -> None:
    rng = random.Random(99)
    seeds = _pems()
    cases = [b"", b"-----BEGIN PRIVATE KEY-----\n-----END PRIVATE KEY-----\n", b"\x00" * 64]
    cases += [_reencode(rng.choice(seeds), rng) for _ in range(700)]
    cases += [mutate_bytes(rng.choice(seeds), rng) for _ in range(300)]
    path = tmp_path / "k.key"
    outcomes: Counter[str] = Counter()
    for data in cases:
        path.write_bytes(data)
        for parse in (PrivateKey.load, lambda p: PublicKey.from_pem(Path(p).read_bytes())):
            try:
                parse(path)
                outcomes["accepted"] += 1
            except KeyFormatError as e:
                assert str(e)
                outcomes["KeyFormatError"] += 1
            except PEM_LEAKS as e:
                outcomes[f"leak {type(e).__name__}"] += 1
    assert outcomes["KeyFormatError"] > 1000
    assert outcomes["accepted"] > 0
    with pytest.raises(KeyFormatError, match="cannot read key file"):
        PrivateKey.load(tmp_path / "missing.key")
    with pytest.raises(KeyFormatError, match="cannot read key file"):
        PrivateKey.load(tmp_path)


def _ed25519_der_with_oid(oid: bytes, private: bool) -> bytes:
    k = KEYS["log"]
    der = (
        base64.b64decode(b"".join(k.pem().strip().split(b"\n")[1:-1]))
        if private
        else k.public_key().der()
    )
    der = der.replace(b"\x06\x03\x2b\x65\x70", b"\x06\x03" + oid)
    label = b"PRIVATE KEY" if private else b"PUBLIC KEY"
    return (
        b"-----BEGIN "
        + label
        + b"-----\n"
        + base64.encodebytes(der)
        + b"-----END "
        + label
        + b"-----\n"
    )


PEM_CASES = {
    "private-unknown-oid": (PrivateKey.from_pem, _ed25519_der_with_oid(b"\x2b\x65\x7f", True)),
    "public-unknown-oid": (PublicKey.from_pem, _ed25519_der_with_oid(b"\x2b\x65\x7f", False)),
    "private-x25519": (PrivateKey.from_pem, _ed25519_der_with_oid(b"\x2b\x65\x6e", True)),
    "public-x25519": (PublicKey.from_pem, _ed25519_der_with_oid(b"\x2b\x65\x6e", False)),
    "public-x448-oid": (PublicKey.from_pem, _ed25519_der_with_oid(b"\x2b\x65\x6f", False)),
}
PEM_LEAK_CASES = {
    # OpenSSL fails inside on an X448 OID with a 32-byte key: cryptography.InternalError
    "private-x448-oid-InternalError": (
        PrivateKey.from_pem,
        _ed25519_der_with_oid(b"\x2b\x65\x6f", True),
    ),
}


@pytest.mark.parametrize("name", sorted(PEM_CASES))
def test_pem_near_misses_raise_key_format_error(name: str) -> None:
    parse, data = PEM_CASES[name]
    with pytest.raises(KeyFormatError):
        parse(data)


@pytest.mark.parametrize("name", sorted(PEM_LEAK_CASES))
def test_former_pem_leaks_raise_key_format_error(name: str) -> None:
    parse, data = PEM_LEAK_CASES[name]
    with pytest.raises(KeyFormatError):
        parse(data)


def test_trust_root_file_raises_only_kolm_errors(tmp_path: Path) -> None:
    root = init_keys(tmp_path / "keys", now=T0)
    path = tmp_path / "keys" / "trust.json"
    assert TrustRoot.load(path) == root
    seed = json.loads(path.read_bytes())
    assert set(seed) == {"version", "keys"}
    assert all(
        set(k)
        == {"keyid", "role", "algorithm", "public_key_pem", "not_before", "not_after", "origin"}
        for k in seed["keys"]
    )
    rng = random.Random(7)
    cases: list[bytes] = [b"", b"null", b"[]", b"{}", b'{"version": 2, "keys": []}', b"\xff"]
    cases.append(b"[" * 100_000)
    for field_, value in [
        ("public_key_pem", "\ud800"),
        ("public_key_pem", _ed25519_der_with_oid(b"\x2b\x65\x7f", False).decode()),
        ("not_before", "0001-01-01T00:00:00+01:00"),
        ("not_after", "9999-12-31T23:59:59-01:00"),
        ("keyid", "\ud800"),
    ]:
        bad = copy.deepcopy(seed)
        bad["keys"][3][field_] = value
        cases.append(json.dumps(bad).encode())
    for _ in range(600):
        obj = seed
        for _ in range(rng.randint(1, 3)):
            obj = mutate_json(obj, rng)
        cases.append(json.dumps(obj).encode())
    cases += [mutate_bytes(path.read_bytes(), rng) for _ in range(400)]
    outcomes: Counter[str] = Counter()
    for data in cases:
        path.write_bytes(data)
        try:
            TrustRoot.load(path)
            outcomes["accepted"] += 1
        except TrustRootFormatError as e:
            assert str(e)
            outcomes["TrustRootFormatError"] += 1
    assert outcomes["TrustRootFormatError"] > 800, outcomes
    with pytest.raises(TrustRootFormatError, match="cannot read trust root"):
        TrustRoot.load(tmp_path / "nope.json")
    # the messages name the field
    bad = copy.deepcopy(seed)
    bad["keys"][1]["role"] = "root"
    with pytest.raises(TrustRootFormatError, match=r"keys\[1\]\.role"):
        TrustRoot.from_bytes(json.dumps(bad).encode())
    bad = copy.deepcopy(seed)
    bad["keys"][0]["keyid"] = "00" * 32
    with pytest.raises(TrustRootFormatError, match=r"keys\[0\]\.keyid"):
        TrustRoot.from_bytes(json.dumps(bad).encode())
    bad = copy.deepcopy(seed)
    bad["keys"].append(bad["keys"][0])
    with pytest.raises(TrustRootFormatError, match="same keyid twice"):
        TrustRoot.from_bytes(json.dumps(bad).encode())


def test_entry_size_is_checked_before_parsing(ledger: Ledger) -> None:
    with pytest.raises(EntryTooLargeError):
        ledger.validate(b"{" * (200 * 1024))


# ---- verify_threads: validation pipelined with sequencing --------------------------------


def _threaded(url: str, threads: int = 3) -> Ledger:
    return Ledger(open_store(url), TRUST, KEYS["log"], clock=Clock(), verify_threads=threads)


def test_pipelined_append_matches_the_one_thread_append(db_url: str, tmp_path: Path) -> None:
    envs = mixed(300)
    one = ledger_on(f"sqlite:///{tmp_path / 'one.db'}")
    many = _threaded(db_url)
    for batch in (envs[:200], envs[200:], envs[150:250]):  # the last: duplicates + new
        assert [(a.index, a.leaf_hash, a.duplicate) for a in many.append(batch)] == [
            (a.index, a.leaf_hash, a.duplicate) for a in one.append(batch)
        ]
    assert many.checkpoint().checkpoint.root == one.checkpoint().checkpoint.root
    assert many.size == 300
    many.pipeline = False  # the unpipelined threaded path gives the same again
    more = mixed(200, 300)
    assert [a.index for a in many.append(more)] == [a.index for a in one.append(more)]
    assert many.checkpoint().checkpoint.root == one.checkpoint().checkpoint.root
    assert audit(many.store, TRUST).ok


def test_pipelined_append_stays_atomic_and_raises_the_first_error_in_order(db_url: str) -> None:
    ledger = _threaded(db_url)
    ledger.append(mixed(10))
    before = ledger.checkpoint().to_bytes()
    envs = mixed(400, 10)
    wrong_role = receipt("label", 999, signer="infer")
    bad_sig = replace(envs[5], payload=envs[5].payload + b" ")
    for pos in (0, 150, 399):  # first chunk, a middle one, the last
        batch = [*envs[:pos], wrong_role, *envs[pos:]]
        batch.insert(min(len(batch), pos + 70), bad_sig)  # a later invalid one, other chunk
        with pytest.raises(RoleError):
            ledger.append(batch)
        assert ledger.size == 10 and ledger.checkpoint().to_bytes() == before
    assert [a.index for a in ledger.append(envs)] == list(range(10, 410))


# ---- verify_processes: parsing and signatures in worker processes -------------------------


def _processes(url: str) -> Ledger:
    return Ledger(
        open_store(url), TRUST, KEYS["log"], clock=Clock(), verify_threads=1, verify_processes=2
    )


def test_process_validated_append_matches_the_one_thread_append(
    db_url: str, tmp_path: Path
) -> None:
    envs = [e.to_bytes() for e in mixed(400)]  # every kind, key receipts included
    one = ledger_on(f"sqlite:///{tmp_path / 'one.db'}")
    procs = _processes(db_url)
    try:
        for batch in (envs[:250], envs[250:], envs[150:300]):  # the last: duplicates only
            assert [(a.index, a.leaf_hash, a.duplicate) for a in procs.append(batch)] == [
                (a.index, a.leaf_hash, a.duplicate) for a in one.append(batch)
            ]
        assert procs.checkpoint().checkpoint.root == one.checkpoint().checkpoint.root
        # the workers' subject digests feed the same subject index
        assert list(procs.store.subject_index()) == list(one.store.subject_index())
        assert procs.size == 400 and audit(procs.store, TRUST).ok
        procs.close()  # workers stop; the next large append starts them again
        more = [e.to_bytes() for e in mixed(200, 400)]
        assert [a.index for a in procs.append(more)] == [a.index for a in one.append(more)]
        assert procs.checkpoint().checkpoint.root == one.checkpoint().checkpoint.root
    finally:
        procs.close()


def test_process_validated_append_refuses_what_the_one_thread_append_refuses(
    db_url: str, tmp_path: Path
) -> None:
    """Each bad envelope, in any chunk: the same error (type and message); nothing written."""
    procs = _processes(db_url)
    one = ledger_on(f"sqlite:///{tmp_path / 'one.db'}")
    try:
        procs.append([e.to_bytes() for e in mixed(10)])
        one.append([e.to_bytes() for e in mixed(10)])
        before = procs.checkpoint().to_bytes()
        envs = [e.to_bytes() for e in mixed(300, 10)]
        good = receipt("prediction", 7)
        unsigned_statement = dsse.sign(
            b'{"not": "a statement"}', receipts.IN_TOTO_PAYLOAD_TYPE, KEYS["infer"]
        )
        bad = {
            "wrong role": receipt("label", 999, signer="infer").to_bytes(),
            "bad signature": replace(good, payload=good.payload + b" ").to_bytes(),
            "unknown key": receipt("label", 998, signer="rogue").to_bytes(),
            "expired key": receipt("label", 997, signer="expired").to_bytes(),
            "not JSON": b"{not json",
            "too large": b"{" * (200 * 1024),
            "not a statement": unsigned_statement.to_bytes(),
            "two signatures": replace(
                good, signatures=good.signatures + good.signatures
            ).to_bytes(),
        }
        for what, env in bad.items():
            for pos in (0, 140, 299):  # first chunk, a middle one, the last
                batch = [*envs[:pos], env, *envs[pos:]]
                with pytest.raises(KolmError) as want:
                    one.append(batch)
                with pytest.raises(KolmError) as got:
                    procs.append(batch)
                assert (type(got.value), str(got.value)) == (
                    type(want.value),
                    str(want.value),
                ), what
                assert procs.size == 10 and procs.checkpoint().to_bytes() == before
        assert [a.index for a in procs.append(envs)] == list(range(10, 310))
    finally:
        procs.close()


def test_a_dead_verify_worker_fails_the_batch_unavailable_and_the_next_one_works(
    sqlite_url: str,
) -> None:
    import os
    import signal

    procs = _processes(sqlite_url)
    try:
        envs = [e.to_bytes() for e in mixed(600)]
        procs.append(envs[:200])
        pool = procs._processes._pool  # type: ignore[union-attr]
        assert pool is not None
        for pid in list(pool._processes):  # an operator's kill -9, the OOM killer
            os.kill(pid, signal.SIGKILL)
        with pytest.raises(UnavailableError, match="verify worker process died"):
            procs.append(envs[200:400])
        assert procs.size == 200  # nothing of the failed batch was written
        assert [a.index for a in procs.append(envs[200:400])] == list(range(200, 400))
        assert audit(procs.store, TRUST).ok
    finally:
        procs.close()
