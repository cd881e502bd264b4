"""verify_bundle: real bundles, and every tampering fails at the right numbered step.

Also fuzzes every parser a downstream system feeds untrusted bytes to (ours and the
existing dsse / receipts / keys parsers): they may raise only KolmError subclasses.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import json
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.fuzz import FUZZ_DERANDOMIZED
from support.receipts import artifact_statement as placeholder_artifact

from kolm_ledger._crypto import PrivateKey
from kolm_ledger.errors import (
    BundleFormatError,
    CheckpointError,
    EntryTooLargeError,
    FormatError,
    InclusionProofError,
    KeyValidityError,
    KolmError,
    RoleError,
    SignatureError,
    StatementFormatError,
    UnknownKeyError,
)
from kolm_ledger.formats import dsse, merkle, receipts
from kolm_ledger.formats.bundle import Bundle
from kolm_ledger.formats.canonical import canonical_json
from kolm_ledger.formats.checkpoint import Checkpoint, SignedCheckpoint, sign_checkpoint
from kolm_ledger.formats.dsse import Envelope, Signature
from kolm_ledger.formats.leaf import entry_leaf_hash
from kolm_ledger.formats.note import Note, NoteSigner
from kolm_ledger.formats.tlogproof import TlogProof
from kolm_ledger.keys import Role, TrustedKey, TrustRoot
from kolm_ledger.storage import micros
from kolm_ledger.verify.receipt import (
    STEPS,
    VerifiedReceipt,
    step_of,
    verify_bundle,
    verify_bundle_bytes,
)

FUZZ = settings(FUZZ_DERANDOMIZED, max_examples=100)

ORIGIN = "example.com/kolm"
T0 = datetime(2026, 1, 1, 12, tzinfo=UTC)  # the receipts' own time
AT = T0 + timedelta(minutes=1)  # when the log integrated them (the bundle's integrated_time)
NOW = datetime(2026, 2, 1, tzinfo=UTC)  # when the downstream system verifies
EPOCH = datetime(2025, 1, 1, tzinfo=UTC)

KEYS = {
    name: PrivateKey.generate("ed25519" if name.startswith("log") else "ecdsa-p256-sha256")
    for name in (
        *("compile", "infer", "admin", "expired", "future", "revoked", "rogue"),
        *("log", "log_rogue", "log_expired"),
    )
}


def _entry(name: str, role: Role, **kw: Any) -> TrustedKey:
    return TrustedKey.for_key(KEYS[name].public_key(), role, not_before=EPOCH, **kw)


TRUST = TrustRoot(
    (
        _entry("compile", "compile"),
        _entry("infer", "infer"),
        _entry("admin", "admin"),
        _entry("expired", "compile", not_after=datetime(2025, 6, 1, tzinfo=UTC)),
        TrustedKey.for_key(
            KEYS["future"].public_key(), "compile", not_before=datetime(2026, 6, 1, tzinfo=UTC)
        ),
        _entry("revoked", "compile"),
        _entry("log", "log", origin=ORIGIN),
        _entry("log_expired", "log", origin=ORIGIN, not_after=datetime(2026, 1, 15, tzinfo=UTC)),
    )
).revoke(KEYS["revoked"].keyid(), datetime(2025, 12, 1, tzinfo=UTC))

SIZE = 300
INDEX = 137


def artifact_statement(**extra: Any) -> receipts.Statement:
    return placeholder_artifact(extra=extra or None, time=T0)


def prediction_statement() -> receipts.Statement:
    return receipts.prediction_statement(
        output_digest="1" * 64,
        artifact_digest="a" * 64,
        input_commitment="2" * 64,
        output="positive",
        verifier_verdict={"pass": True},
        backend="student",
        confidence=0.97,
        latency_ms=3.5,
        request_id="req-1",
        time=T0,
    )


def sign(st_: receipts.Statement, key: str = "compile") -> Envelope:
    return receipts.sign_statement(st_, KEYS[key])


def build(
    env: Envelope,
    *,
    index: int = INDEX,
    size: int = SIZE,
    log: str = "log",
    origin: str = ORIGIN,
    root: bytes | None = None,
    cp_size: int | None = None,
    at: datetime = AT,
) -> Bundle:
    """A bundle for ``env`` as leaf ``index`` of a tree of ``size`` leaves, integrated ``at``."""
    tree = merkle.MemoryTree()
    us = micros(at)
    for i in range(size):
        tree.append(entry_leaf_hash(env, us) if i == index else merkle.hash_leaf(b"filler %d" % i))
    cp = Checkpoint(
        origin,
        size if cp_size is None else cp_size,
        tree.root() if root is None else root,
        b"\x07" * 32,
    )
    note = sign_checkpoint(cp, [NoteSigner(origin, KEYS[log])]).to_bytes()
    return Bundle(env, TlogProof(index, tuple(tree.inclusion_proof(index, size)), note), us)


ENV = sign(artifact_statement())
BUNDLE = build(ENV)
BUNDLE_LEAF = entry_leaf_hash(ENV, micros(AT))


def verify(b: Bundle, **kw: Any) -> VerifiedReceipt:
    return verify_bundle(b, TRUST, now=NOW, **kw)


def expect_step(step: int, cls: type[KolmError], fn: Callable[[], object]) -> KolmError:
    with pytest.raises(cls) as info:
        fn()
    e = info.value
    assert step_of(e) == step, f"failed at step {step_of(e)}, want {step}: {e}"
    assert getattr(e, "step", None) == step
    assert str(e).startswith(f"step {step} ({STEPS[step - 1]}): "), str(e)
    assert len(str(e)) > len(f"step {step} ({STEPS[step - 1]}): ") + 5
    assert e.__cause__ is not None
    return e


def names_something(e: BaseException) -> None:
    msg = str(e)
    assert len(msg) >= 8 and re.search(r"[a-z]{3}", msg), repr(msg)


def with_proof(b: Bundle, **changes: Any) -> Bundle:
    return dataclasses.replace(b, tlog_proof=dataclasses.replace(b.tlog_proof, **changes))


def with_env(b: Bundle, **changes: Any) -> Bundle:
    return dataclasses.replace(b, envelope=dataclasses.replace(b.envelope, **changes))


def flip(data: bytes, bit: int) -> bytes:
    return data[: bit // 8] + bytes([data[bit // 8] ^ (1 << (bit % 8))]) + data[bit // 8 + 1 :]


# --------------------------------------------------------------------------------------
# The happy path


def test_steps() -> None:
    assert STEPS == (
        "parse bundle",
        "parse statement",
        "check signature",
        "check key policy",
        "compute leaf hash",
        "check checkpoint",
        "check inclusion",
        "check artifact receipt",
        "check input commitment",
        "check evidence",
    )


def test_verifies() -> None:
    v = verify(BUNDLE)
    assert v.kind == "artifact"
    assert v.keyid == KEYS["compile"].keyid()
    assert v.role == "compile"
    assert v.index == INDEX
    assert v.leaf_hash == entry_leaf_hash(ENV, micros(AT))
    assert v.leaf_hash == merkle.hash_leaf(
        canonical_json({"envelope": ENV.to_json(), "integrated_time": micros(AT)})
    )
    assert v.checkpoint.size == SIZE and v.checkpoint.origin == ORIGIN
    assert v.statement == receipts.Statement.from_envelope(ENV)
    assert v.envelope == ENV
    assert v.time == T0
    assert v.integrated_at == AT
    assert verify_bundle(BUNDLE, TRUST, origin=ORIGIN, now=NOW) == v
    assert verify_bundle_bytes(BUNDLE.to_bytes(), TRUST, now=NOW) == v


def test_prediction_receipt_signed_by_infer_key() -> None:
    b = build(sign(prediction_statement(), "infer"), index=0, size=1)
    assert verify(b).kind == "prediction"


def test_default_now_is_the_current_time() -> None:
    # the log key "log" never expires, so verification at the real current time works
    assert verify_bundle(BUNDLE, TRUST).index == INDEX


def test_every_position_in_a_small_tree() -> None:
    for size in (1, 2, 3, 7, 8, 9):
        for index in range(size):
            assert verify(build(ENV, index=index, size=size)).index == index


# --------------------------------------------------------------------------------------
# Tampering, step by step


def test_step1_unparseable_bundle() -> None:
    expect_step(1, BundleFormatError, lambda: verify_bundle_bytes(b"{}", TRUST, now=NOW))
    data = BUNDLE.to_bytes().replace(b'"tlog_proof"', b'"tlog_prooF"')
    expect_step(1, BundleFormatError, lambda: verify_bundle_bytes(data, TRUST, now=NOW))


def test_step2_payload_not_a_statement() -> None:
    payload = ENV.payload[:-1]  # no longer JSON
    expect_step(
        2, StatementFormatError, lambda: verify(build(with_env(BUNDLE, payload=payload).envelope))
    )


def test_step2_wrong_payload_type() -> None:
    env = dsse.sign(ENV.payload, "application/json", KEYS["compile"])
    expect_step(2, StatementFormatError, lambda: verify(build(env)))


def test_step2_foreign_predicate_type() -> None:
    obj = json.loads(ENV.payload)
    obj["predicateType"] = "https://slsa.dev/provenance/v1"
    env = dsse.sign(canonical_json(obj), dsse.IN_TOTO_PAYLOAD_TYPE, KEYS["compile"])
    expect_step(2, StatementFormatError, lambda: verify(build(env)))


@pytest.mark.parametrize(
    "time", [None, 5, "yesterday", "2026-01-01T12:00:00", "0001-01-01T00:00:00+01:00"]
)
def test_step2_receipt_time_missing_or_bad(time: object) -> None:
    st_ = artifact_statement()
    pred = dict(st_.predicate)
    if time is None:
        del pred["time"]
    else:
        pred["time"] = time
    env = sign(receipts.Statement(st_.subjects, st_.predicate_type, pred))
    e = expect_step(2, StatementFormatError, lambda: verify(build(env)))
    assert "statement.predicate.time" in str(e)


def test_step3_payload_byte_changed() -> None:
    payload = ENV.payload.replace(b"model.kolm", b"modeL.kolm")
    assert payload != ENV.payload
    b = with_env(BUNDLE, payload=payload)
    expect_step(3, SignatureError, lambda: verify(b))


def test_step3_signature_changed() -> None:
    sig = ENV.signatures[0]
    for bit in (0, 77, len(sig.sig) * 8 - 1):
        b = with_env(BUNDLE, signatures=(Signature(sig.keyid, flip(sig.sig, bit)),))
        expect_step(3, SignatureError, functools.partial(verify, b))


def test_step3_keyid_changed() -> None:
    sig = ENV.signatures[0]
    b = with_env(BUNDLE, signatures=(Signature("0" * 64, sig.sig),))
    expect_step(3, UnknownKeyError, lambda: verify(b))


def test_step3_keyid_of_another_trusted_key() -> None:
    sig = ENV.signatures[0]
    b = with_env(BUNDLE, signatures=(Signature(KEYS["infer"].keyid(), sig.sig),))
    expect_step(3, SignatureError, lambda: verify(b))


def test_step3_untrusted_key() -> None:
    expect_step(3, UnknownKeyError, lambda: verify(build(sign(artifact_statement(), "rogue"))))


def test_step3_every_trusted_signature_must_verify() -> None:
    sig = ENV.signatures[0]
    bad = Signature(KEYS["admin"].keyid(), sig.sig)
    env = dataclasses.replace(ENV, signatures=(sig, bad))
    expect_step(3, SignatureError, lambda: verify(build(env)))


def test_step4_wrong_role() -> None:
    # an infer key may sign predictions only
    e = expect_step(4, RoleError, lambda: verify(build(sign(artifact_statement(), "infer"))))
    assert "'infer'" in str(e) and "'artifact'" in str(e)
    expect_step(4, RoleError, lambda: verify(build(sign(prediction_statement(), "compile"))))
    expect_step(4, RoleError, lambda: verify(build(sign(artifact_statement(), "log"))))


def test_step4_expired_not_yet_valid_revoked() -> None:
    for key, match in (
        ("expired", "expired"),
        ("future", "not valid before"),
        ("revoked", "revoked"),
    ):
        e = expect_step(
            4, KeyValidityError, functools.partial(verify, build(sign(artifact_statement(), key)))
        )
        assert match in str(e)


def test_step4_validity_is_judged_at_the_integration_time() -> None:
    # the same "expired" key verifies for a receipt the log integrated while it was valid
    made = datetime(2025, 3, 1, tzinfo=UTC)
    st_ = receipts.eval_statement(
        artifact_digest="a" * 64,
        holdout_digest="b" * 64,
        n=10,
        correct=9,
        k_score=90.0,
        interval=(0.6, 0.98),
        outcome_root="c" * 64,
        teacher_k_score=95.0,
        time=made,
    )
    env = sign(st_, "expired")
    assert verify(build(env, at=made + timedelta(minutes=1))).role == "compile"
    # ... but not one integrated after it expired, whatever time the receipt claims: the
    # integration time is the one the log key authenticated (it is in the leaf)
    e = expect_step(4, KeyValidityError, lambda: verify(build(env)))
    assert "expired at 2025-06-01" in str(e) and "2026-01-01T12:01:00Z" in str(e)


def test_step5_envelope_over_the_ledger_size_limit() -> None:
    env = sign(artifact_statement(padding="x" * dsse.MAX_ENVELOPE_BYTES))
    expect_step(5, EntryTooLargeError, lambda: verify(build(env)))


def test_step6_checkpoint_signature_changed() -> None:
    note = Note.from_bytes(BUNDLE.tlog_proof.checkpoint)
    sig = note.signatures[0]
    for bit in (0, 100, 511):
        bad = dataclasses.replace(sig, sig=flip(sig.sig, bit))
        forged = Note(note.text, (bad,)).to_bytes()
        e = expect_step(
            6, CheckpointError, functools.partial(verify, with_proof(BUNDLE, checkpoint=forged))
        )
        assert f"known key {sig.key} does not verify" in str(e)


def test_step6_checkpoint_root_or_size_changed_without_resigning() -> None:
    sc = SignedCheckpoint.from_bytes(BUNDLE.tlog_proof.checkpoint)
    for other in (
        dataclasses.replace(sc.checkpoint, root=bytes(32)),
        dataclasses.replace(sc.checkpoint, size=SIZE + 1),
        dataclasses.replace(sc.checkpoint, chain_head=bytes(32)),
    ):
        forged = Note(other.to_text(), sc.note.signatures).to_bytes()
        e = expect_step(
            6, CheckpointError, functools.partial(verify, with_proof(BUNDLE, checkpoint=forged))
        )
        assert "does not verify" in str(e)


def test_step6_untrusted_log_key() -> None:
    e = expect_step(6, CheckpointError, lambda: verify(build(ENV, log="log_rogue")))
    assert "no verifiable signature" in str(e)


def test_step6_wrong_origin() -> None:
    expect_step(6, CheckpointError, lambda: verify(BUNDLE, origin="example.com/other"))
    other = TRUST.with_key(
        TrustedKey.for_key(KEYS["log_rogue"].public_key(), "log", origin="example.com/other")
    )
    b = build(ENV, log="log_rogue", origin="example.com/other")
    assert verify_bundle(b, other, now=NOW).checkpoint.origin == "example.com/other"
    expect_step(6, CheckpointError, lambda: verify_bundle(b, other, origin=ORIGIN, now=NOW))


def test_step6_log_key_expired_at_now() -> None:
    b = build(ENV, log="log_expired")
    assert verify_bundle(b, TRUST, now=datetime(2026, 1, 10, tzinfo=UTC)).index == INDEX
    expect_step(6, CheckpointError, lambda: verify(b))


def test_step7_index_changed() -> None:
    for index in (INDEX - 1, INDEX + 1, 0, SIZE - 1):
        b = with_proof(BUNDLE, index=index)
        expect_step(7, InclusionProofError, functools.partial(verify, b))
    e = expect_step(7, InclusionProofError, lambda: verify(with_proof(BUNDLE, index=SIZE)))
    assert "not below the checkpoint size 300" in str(e)


def test_step7_proof_hash_changed_dropped_or_added() -> None:
    hashes = BUNDLE.tlog_proof.hashes
    for changed in (
        (flip(hashes[0], 5), *hashes[1:]),
        (*hashes[:-1], flip(hashes[-1], 200)),
        hashes[:-1],
        (*hashes, bytes(32)),
        tuple(reversed(hashes)),
    ):
        b = with_proof(BUNDLE, hashes=changed)
        expect_step(7, InclusionProofError, functools.partial(verify, b))


def test_step7_checkpoint_resigned_with_another_root_or_smaller_size() -> None:
    expect_step(7, InclusionProofError, lambda: verify(build(ENV, root=bytes(32))))
    e = expect_step(7, InclusionProofError, lambda: verify(build(ENV, cp_size=INDEX)))
    assert "not below" in str(e)


def test_step7_envelope_with_an_added_untrusted_signature() -> None:
    # Steps 2-6 pass (the extra signature's key is unknown), but the leaf is another one.
    rogue = dsse.sign(ENV.payload, ENV.payload_type, KEYS["rogue"]).signatures[0]
    b = with_env(BUNDLE, signatures=(*ENV.signatures, rogue))
    expect_step(7, InclusionProofError, lambda: verify(b))


def test_step7_receipt_not_in_the_tree() -> None:
    other = sign(prediction_statement(), "infer")
    b = dataclasses.replace(BUNDLE, envelope=other)
    expect_step(7, InclusionProofError, lambda: verify(b))


# --------------------------------------------------------------------------------------
# Properties


@FUZZ
@given(data=st.data())
def test_any_bit_flip_in_a_proof_hash_fails_at_step_7(data: st.DataObject) -> None:
    hashes = BUNDLE.tlog_proof.hashes
    i = data.draw(st.integers(0, len(hashes) - 1))
    bit = data.draw(st.integers(0, 255))
    changed = (*hashes[:i], flip(hashes[i], bit), *hashes[i + 1 :])
    expect_step(7, InclusionProofError, lambda: verify(with_proof(BUNDLE, hashes=changed)))


@FUZZ
@given(bit=st.integers(0, len(BUNDLE.tlog_proof.checkpoint) * 8 - 1))
def test_any_bit_flip_in_the_checkpoint_note_fails(bit: int) -> None:
    data = flip(BUNDLE.tlog_proof.checkpoint, bit)
    try:
        b = with_proof(BUNDLE, checkpoint=data)
    except FormatError as e:  # the flip broke the note's syntax: the bundle cannot exist
        names_something(e)
        return
    expect_step(6, KolmError, lambda: verify(b))


@FUZZ
@given(bit=st.integers(0, 255))
def test_any_bit_flip_in_the_root_fails(bit: int) -> None:
    root = flip(SignedCheckpoint.from_bytes(BUNDLE.tlog_proof.checkpoint).checkpoint.root, bit)
    expect_step(7, InclusionProofError, lambda: verify(build(ENV, root=root)))


@FUZZ
@given(bit=st.integers(0, 255))
def test_any_bit_flip_in_the_leaf_fails(bit: int) -> None:
    leaf = flip(BUNDLE_LEAF, bit)
    sc = SignedCheckpoint.from_bytes(BUNDLE.tlog_proof.checkpoint)
    with pytest.raises(InclusionProofError):
        BUNDLE.tlog_proof.verify_inclusion(leaf, sc.checkpoint)


@FUZZ
@given(bit=st.integers(0, len(ENV.payload) * 8 - 1))
def test_any_bit_flip_in_the_payload_fails_at_step_2_or_3(bit: int) -> None:
    b = with_env(BUNDLE, payload=flip(ENV.payload, bit))
    with pytest.raises(KolmError) as info:
        verify(b)
    assert step_of(info.value) in (2, 3), str(info.value)


BUNDLE_BYTES = BUNDLE.to_bytes()


@settings(FUZZ, max_examples=200)
@given(bit=st.integers(0, len(BUNDLE_BYTES) * 8 - 1))
def test_any_bit_flip_in_the_bundle_file_fails_or_changes_nothing(bit: int) -> None:
    data = flip(BUNDLE_BYTES, bit)
    try:
        v = verify_bundle_bytes(data, TRUST, now=NOW)
    except KolmError as e:
        assert step_of(e) is not None
        names_something(e)
        return
    # Only a flip of unused padding bits of the envelope's base64 gets here (the DSSE
    # parser accepts non-canonical base64): the bundle, and so the receipt, is unchanged.
    assert Bundle.from_bytes(data) == BUNDLE
    assert v == verify(BUNDLE)


# --------------------------------------------------------------------------------------
# Every parser on untrusted input raises only KolmError


def _text_mutations(data: bytes) -> st.SearchStrategy[bytes]:
    n = len(data)
    lines = data.split(b"\n")

    def dup_line(i: int) -> bytes:
        i %= len(lines)
        return b"\n".join(lines[: i + 1] + lines[i:])

    def change_digit(i: int, d: int) -> bytes:
        digits = [j for j, c in enumerate(data) if 0x30 <= c <= 0x39] or [0]
        j = digits[i % len(digits)]
        return data[:j] + bytes([0x30 + d]) + data[j + 1 :]

    def insert(t: tuple[int, bytes]) -> bytes:
        return data[: t[0]] + t[1] + data[t[0] :]

    return st.one_of(
        st.integers(0, n).map(lambda i: data[:i]),  # truncate
        st.integers(0, n * 8 - 1).map(lambda b: flip(data, b)),  # bit flip
        st.integers(0, 10_000).map(dup_line),  # duplicate a line
        st.sampled_from(  # drop the blank line(s)
            [data.replace(b"\n\n", b"\n", 1), data.replace(b"\n\n", b"\n")]
        ),
        st.tuples(st.integers(0, 10_000), st.integers(0, 9)).map(lambda t: change_digit(*t)),
        st.tuples(st.integers(0, n), st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80"])).map(
            insert  # not UTF-8
        ),
        st.sampled_from(  # em dash replaced by '-'
            [data.replace("—".encode(), b"-"), data.replace(b"\\u2014", b"-")]
        ),
        st.tuples(st.integers(0, n), st.sampled_from([b" ", b"\t", b" \n", b"\r", b"\n"])).map(
            insert  # extra whitespace
        ),
        st.binary(max_size=400),  # random bytes
    )


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


def _json_paths(obj: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [path]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _json_paths(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _json_paths(v, (*path, i))
    return out


def _json_mutations(data: bytes) -> st.SearchStrategy[bytes]:
    """Replace or delete one value anywhere in a JSON document (type confusion)."""
    obj = json.loads(data)
    paths = _json_paths(obj)

    def mutate(t: tuple[int, Any, bool]) -> bytes:
        i, value, delete = t
        doc = json.loads(data)
        path = paths[i % len(paths)]
        if not path:
            return json.dumps(value).encode()
        parent = doc
        for p in path[:-1]:
            parent = parent[p]
        if delete:
            del parent[path[-1]]
        else:
            parent[path[-1]] = value
        return json.dumps(doc).encode()

    return st.tuples(st.integers(0, 10_000), JSON_VALUES, st.booleans()).map(mutate)


SC = SignedCheckpoint.from_bytes(BUNDLE.tlog_proof.checkpoint)
PARSERS: dict[str, tuple[Callable[[bytes], object], bytes, bool]] = {
    # name: (parser of bytes, a valid input to mutate, input is JSON)
    "Note.from_bytes": (Note.from_bytes, SC.to_bytes(), False),
    "Checkpoint.from_text": (
        lambda d: Checkpoint.from_text(d.decode("utf-8", "surrogateescape")),
        SC.checkpoint.to_text().encode(),
        False,
    ),
    "SignedCheckpoint.from_bytes": (SignedCheckpoint.from_bytes, SC.to_bytes(), False),
    "TlogProof.from_text": (
        lambda d: TlogProof.from_text(d.decode("utf-8", "surrogateescape")),
        BUNDLE.tlog_proof.to_bytes(),
        False,
    ),
    "TlogProof.from_bytes": (TlogProof.from_bytes, BUNDLE.tlog_proof.to_bytes(), False),
    "Bundle.from_bytes": (Bundle.from_bytes, BUNDLE_BYTES, True),
    "verify_bundle_bytes": (
        lambda d: verify_bundle_bytes(d, TRUST, now=NOW),
        BUNDLE_BYTES,
        True,
    ),
    "dsse.Envelope.from_bytes": (Envelope.from_bytes, ENV.to_bytes(), True),
    "receipts.Statement.from_bytes": (receipts.Statement.from_bytes, ENV.payload, True),
    "keys.TrustRoot.from_bytes": (TrustRoot.from_bytes, TRUST.to_bytes(), True),
}


@pytest.mark.parametrize("name", sorted(PARSERS))
@FUZZ
@given(data=st.data())
def test_parsers_raise_only_kolm_errors(name: str, data: st.DataObject) -> None:
    parse, seed, is_json = PARSERS[name]
    strategy = _text_mutations(seed)
    if is_json:
        strategy = st.one_of(strategy, _json_mutations(seed))
    mutated = data.draw(strategy)
    try:
        parse(mutated)
    except KolmError as e:
        names_something(e)


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_parsers_accept_their_seed(name: str) -> None:
    parse, seed, _ = PARSERS[name]
    parse(seed)


# Foreign exceptions the existing parsers leak (reported; dsse.py / receipts.py / keys.py
# are not ours to edit). strict=True: when one is fixed, this test says so.
DEEP = b"[" * 100_000
_pub = PrivateKey.generate("ed25519").public_key()
_ec_der = PrivateKey.generate().public_key().der()
# id-ecPublicKey 1.2.840.10045.2.1 turned into the unknown OID 1.2.840.10045.66.1
_bad_oid_der = _ec_der.replace(
    bytes.fromhex("06072a8648ce3d0201"), bytes.fromhex("06072a8648ce3d4201")
)
_BAD_OID_PEM = (
    "-----BEGIN PUBLIC KEY-----\n"
    + base64.b64encode(_bad_oid_der).decode()
    + "\n-----END PUBLIC KEY-----\n"
)
_KEY = {
    "keyid": _pub.keyid(),
    "role": "admin",
    "algorithm": "ed25519",
    "public_key_pem": _pub.pem(),
    "not_before": "2025-01-01T00:00:00Z",
}
LEAKS = {
    "dsse-deep-nesting-RecursionError": (Envelope.from_bytes, DEEP),
    "receipts-deep-nesting-RecursionError": (receipts.Statement.from_bytes, DEEP),
    "keys-deep-nesting-RecursionError": (TrustRoot.from_bytes, DEEP),
    "keys-lone-surrogate-pem-UnicodeEncodeError": (
        TrustRoot.from_bytes,
        json.dumps({"version": 1, "keys": [{**_KEY, "public_key_pem": "\ud800"}]}).encode(),
    ),
    "keys-unknown-key-oid-UnsupportedAlgorithm": (
        TrustRoot.from_bytes,
        json.dumps({"version": 1, "keys": [{**_KEY, "public_key_pem": _BAD_OID_PEM}]}).encode(),
    ),
    "keys-time-out-of-range-OverflowError": (
        TrustRoot.from_bytes,
        json.dumps(
            {"version": 1, "keys": [{**_KEY, "not_before": "0001-01-01T00:00:00+01:00"}]}
        ).encode(),
    ),
}


@pytest.mark.parametrize("name", sorted(LEAKS))
def test_former_foreign_exception_leaks_raise_our_errors(name: str) -> None:
    parse, data = LEAKS[name]
    with pytest.raises(KolmError) as ei:
        parse(data)
    assert str(ei.value)


def test_bundle_parser_is_not_affected_by_those_leaks() -> None:
    with pytest.raises(BundleFormatError):
        Bundle.from_bytes(DEEP)
    env_json = json.loads(BUNDLE_BYTES)
    env_json["envelope"] = json.loads(b"[" * 500 + b"]" * 500)
    with pytest.raises(BundleFormatError):
        Bundle.from_json(env_json)
