"""Issue 14, findings 4 (low-S), 5 (strict RFC 8785 payloads) and 6 (strict base64).

Each malformed receipt is signed correctly by a trusted key, so only the format rule can
refuse it, and it is refused in every place that reads receipts:

- at append, through a real gRPC ledger server on SQLite and PostgreSQL
  (``INVALID_ARGUMENT`` naming the fault), and by the worker-process check
  (``verify_pool.check_chunk``, what ``Ledger(verify_processes=N)`` runs);
- by ``kolm verify`` on a bundle (the step that fails: 1 parse bundle, 2 parse
  statement, 3 signature);
- by the audit, when planted in the database in place of a logged entry.

Before this change every one of them was accepted (and audit-clean): a first-wins JSON
parser could read a different statement than kolm did, and ``(r, n - s)`` or a base64
text with padding bits set gave a second valid encoding of one signed statement.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
import rfc8785
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy.pool import NullPool
from support.db import drop_triggers
from support.mutations import mutations
from support.servers import LedgerThread

from kolm.cli.main import main as kolm_main
from kolm_ledger._crypto import P256_ORDER, PrivateKey
from kolm_ledger.audit.auditor import audit
from kolm_ledger.errors import (
    ArtifactError,
    EnvelopeFormatError,
    FormatError,
    KolmError,
    SignatureError,
    StatementFormatError,
)
from kolm_ledger.formats import dsse
from kolm_ledger.formats.canonical import canonical_json, parse_json, strict_loads
from kolm_ledger.formats.checkpoint import Checkpoint, SignedCheckpoint, sign_checkpoint
from kolm_ledger.formats.dsse import Envelope, Signature
from kolm_ledger.formats.model_signing import (
    MODEL_SIGNING_PREDICATE,
    artifact_digest,
    parse_model_signature,
)
from kolm_ledger.formats.note import NoteSigner
from kolm_ledger.formats.receipts import Statement, label_statement, sign_statement
from kolm_ledger.keys import TrustedKey, TrustRoot
from kolm_ledger.log import verify_pool
from kolm_ledger.service.client import LedgerClient
from kolm_ledger.storage import Store
from kolm_ledger.verify.receipt import verify_bundle

HALF_N = P256_ORDER // 2


# ---- the malformed receipts ---------------------------------------------------------------


def good_statement(i: int = 0) -> Statement:
    return label_statement(
        input_value=f"ticket {i}: where is my card?",
        output_value="card_arrival",
        task={"name": "router"},
        teacher={"backend": "simulated", "model": "gold"},
        k=5,
        votes={"card_arrival": 5},
        sample_digests=[],
        verifier={"name": "label_set"},
        agreement=0.8,
        job_id=f"job-{i}",
    )


def _swap(data: bytes, old: bytes, new: bytes) -> bytes:
    assert data.count(old) == 1, (old, data)
    return data.replace(old, new)


PREDICTION = b"urn:kolm:receipt:prediction:v1"


def bad_payloads(i: int = 0) -> dict[str, tuple[bytes, str]]:
    """name -> (payload bytes, a phrase the refusal must contain)."""
    c = good_statement(i).to_bytes()
    label = b'"predicateType":"urn:kolm:receipt:label:v1"'
    return {
        # a first-wins parser reads a prediction where kolm's (last-wins) json.loads read
        # a label: the receipt was accepted as a label before issue 14
        "duplicate predicateType": (
            _swap(c, label, b'"predicateType":"' + PREDICTION + b'",' + label),
            "duplicate key 'predicateType'",
        ),
        "lone surrogate escape": (
            _swap(c, b'"job_id":"job-', b'"job_id":"\\ud800job-'),
            "lone surrogate \\ud800",
        ),
        # U+1F600 as two 3-byte surrogates (CESU-8), not one 4-byte UTF-8 sequence
        "raw CESU-8": (
            _swap(c, b'"job_id":"job-', b'"job_id":"\xed\xa0\xbd\xed\xb8\x80job-'),
            "not valid UTF-8",
        ),
        "1e400": (_swap(c, b'"k":5', b'"k":1e400'), "1e400 is outside the IEEE-754 double range"),
        "NaN": (_swap(c, b'"agreement":0.8', b'"agreement":NaN'), "NaN is not a JSON number"),
        "Infinity": (
            _swap(c, b'"agreement":0.8', b'"agreement":-Infinity'),
            "-Infinity is not a JSON number",
        ),
        "whitespace": (_swap(c, b'"k":5', b'"k": 5'), "not in RFC 8785 canonical form"),
        "key order": (
            _swap(c, b'{"_type":"https://in-toto.io/Statement/v1",', b"{")[:-1]
            + b',"_type":"https://in-toto.io/Statement/v1"}',
            "not in RFC 8785 canonical form",
        ),
        "number form": (_swap(c, b'"k":5', b'"k":5.0'), "not in RFC 8785 canonical form"),
        "escape form": (_swap(c, b'"job_id":"job-', b'"job_id":"\\u006aob-'), "canonical form"),
    }


def signed(payload: bytes, key: PrivateKey) -> Envelope:
    return dsse.sign(payload, dsse.IN_TOTO_PAYLOAD_TYPE, key)


def high_s(env: Envelope) -> Envelope:
    """``env`` with its ECDSA signature (r, s) replaced by (r, n - s): valid before issue 14."""
    (sig,) = env.signatures
    r, s = decode_dss_signature(sig.sig)
    assert s <= HALF_N  # kolm's signer writes low-S
    return Envelope(
        env.payload,
        env.payload_type,
        (Signature(sig.keyid, encode_dss_signature(r, P256_ORDER - s)),),
    )


def padding_bits_set(b64: str) -> str:
    """The same bytes in base64 with the unused low bits of the last digit set (g== -> h==)."""
    assert b64.endswith("=")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    i = len(b64.rstrip("=")) - 1
    bumped = b64[:i] + alphabet[alphabet.index(b64[i]) + 1] + b64[i + 1 :]
    assert base64.b64decode(bumped) == base64.b64decode(b64) and bumped != b64
    return bumped


def padded_sig_envelope(key: PrivateKey, i: int) -> Envelope:
    """A receipt whose signature's base64 ends in ``=`` (a 70- or 71-byte DER signature)."""
    for j in range(100):
        env = sign_statement(good_statement(1000 * i + j), key)
        if base64.b64encode(env.signatures[0].sig).endswith(b"="):
            return env
    raise AssertionError("no signature of 70 or 71 bytes in 100 tries")


# ---- unit level: the one parser, the one signature check ---------------------------------


@pytest.mark.parametrize("name", sorted(bad_payloads()))
def test_strict_loads_names_each_fault(name: str) -> None:
    payload, phrase = bad_payloads()[name]
    with pytest.raises(StatementFormatError) as e:
        Statement.from_bytes(payload)
    assert phrase in str(e.value), str(e.value)
    # what the code before issue 14 did: json.loads, first fault-free reading accepted
    if name not in ("raw CESU-8",):
        json.loads(payload.decode("utf-8", "surrogatepass"))


def test_strict_loads_accepts_canonical_forms_of_doubles() -> None:
    # RFC 8785 numbers are doubles: these integral doubles are written without exponent
    for value in (1e20, 2.0**53, -(2.0**60), 1e21, 1e-7, 0.1, 123.456):
        data = canonical_json({"x": value})
        assert strict_loads(data) == {"x": value}, data
    # an integer literal past 2**53 that is not the shortest form of its double
    with pytest.raises(FormatError, match="canonical form"):
        strict_loads(b'{"x":12345678901234567890}')
    with pytest.raises(FormatError, match="double range"):
        strict_loads(b'{"x":' + b"9" * 400 + b"}")


def test_parse_json_is_lenient_on_layout_only() -> None:
    assert parse_json(b'{ "b" : 1 , "a" : [1.0] }') == {"a": [1.0], "b": 1}
    for bad, phrase in [
        (b'{"a":1,"a":2}', "duplicate key"),
        (b'{"a":NaN}', "NaN"),
        (b'{"a":1e999}', "double range"),
        (b'{"a":"\\udc00"}', "lone surrogate"),
        (b'{"a":"\xc0\xaf"}', "UTF-8"),
    ]:
        with pytest.raises(FormatError, match=phrase):
            parse_json(bad)


def _reference_accepts(data: bytes) -> bool:
    """The rule written plainly: strict UTF-8, no duplicates, no NaN, rfc8785 bytes equal."""

    def pairs(p: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in p]
        if len(set(keys)) != len(keys):
            raise ValueError("duplicate")
        return dict(p)

    def no_const(s: str) -> Any:
        raise ValueError(s)

    def as_double(s: str) -> int | float:
        n = int(s)
        return n if abs(n) <= 2**53 - 1 else float(n)

    try:
        obj = json.loads(
            data.decode("utf-8"),
            object_pairs_hook=pairs,
            parse_constant=no_const,
            parse_int=as_double,
        )
        return bool(rfc8785.dumps(obj) == data)
    except (ValueError, OverflowError, RecursionError, rfc8785.CanonicalizationError):
        return False


_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53) + 1, 2**53 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None)
@given(_JSON)
def test_strict_loads_round_trips_every_canonical_value(value: Any) -> None:
    data = canonical_json(value)
    assert _reference_accepts(data)
    assert canonical_json(strict_loads(data)) == data


_SAMPLE = good_statement(7).to_bytes()


@settings(max_examples=1500, deadline=None)
@given(mutations(_SAMPLE))
def test_strict_loads_accepts_exactly_what_the_plain_rule_accepts(data: bytes) -> None:
    """The fast path (C decoder and encoder, number hooks) agrees with the plain rule."""
    try:
        strict_loads(data)
        got = True
    except FormatError:
        got = False
    assert got == _reference_accepts(data), data


def test_signer_writes_low_s_and_stays_deterministic() -> None:
    key = PrivateKey.generate()
    pub = key.public_key()
    highs = 0
    for i in range(64):
        msg = b"message %d" % i
        for det in (False, True):
            sig = key.sign(msg, deterministic=det)
            _, s = decode_dss_signature(sig)
            assert s <= HALF_N
            pub.verify(sig, msg)
        # RFC 6979: the same bytes again (the normalisation is a function of the signature)
        assert key.sign(msg, deterministic=True) == key.sign(msg, deterministic=True)
        _, s = decode_dss_signature(key._key.sign(msg, dsse_ecdsa()))  # the library alone
        highs += s > HALF_N
    assert highs > 0  # the library alone does write high-S signatures: normalising matters


def dsse_ecdsa() -> Any:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.ECDSA(hashes.SHA256())


def test_verify_refuses_high_s_and_non_strict_der() -> None:
    key = PrivateKey.generate()
    env = sign_statement(good_statement(), key)
    dsse.verify_signature(env, key.public_key())
    with pytest.raises(SignatureError, match=r"low-S form \(s > n/2\)"):
        dsse.verify_signature(high_s(env), key.public_key())
    # the same (r, s) with a superfluous leading zero in r's INTEGER is not DER
    r, s = decode_dss_signature(env.signatures[0].sig)
    rb, sb = r.to_bytes(33, "big"), s.to_bytes(32, "big")
    ber = bytes([0x30, 4 + 34 + len(sb), 0x02, 34, 0]) + rb + bytes([0x02, len(sb)]) + sb
    with pytest.raises(SignatureError):
        key.public_key().verify(ber, dsse.pae(env.payload_type, env.payload))


def test_envelope_base64_is_strict_and_duplicate_keys_are_refused() -> None:
    key = PrivateKey.generate()
    env = padded_sig_envelope(key, 0)
    obj = env.to_json()
    obj["signatures"][0]["sig"] = padding_bits_set(obj["signatures"][0]["sig"])
    for data in (
        json.dumps(obj).encode(),
        json.dumps(obj, separators=(",", ":"), sort_keys=True).encode(),  # the fast layout
    ):
        with pytest.raises(EnvelopeFormatError, match=r"signatures\[0\]\.sig: not canonical"):
            dsse.parse_envelope(data)
    with pytest.raises(EnvelopeFormatError, match="not canonical base64"):
        Envelope.from_json(obj)
    for bad in ("QUJD\n", "QUJD=", "QUI", "QU-_", " QUJD"):
        with pytest.raises(EnvelopeFormatError, match="base64"):
            dsse.b64decode(bad, "x")
    dup = env.to_bytes().replace(b'{"payload":', b'{"payload":"e30=","payload":', 1)
    with pytest.raises(EnvelopeFormatError, match="duplicate JSON key 'payload'"):
        dsse.parse_envelope(dup)


def test_worker_processes_refuse_the_same() -> None:
    key = PrivateKey.generate()
    keys = {key.keyid(): key.public_key().pem()}
    chunk = [signed(p, key).to_bytes() for p, _ in bad_payloads().values()]
    chunk.append(high_s(sign_statement(good_statement(1), key)).to_bytes())
    good = sign_statement(good_statement(2), key).to_bytes()
    out = verify_pool.check_chunk(keys, [*chunk, good])
    phrases = [ph for _, ph in bad_payloads().values()] + ["low-S"]
    for got, phrase in zip(out[:-1], phrases, strict=True):
        assert isinstance(got, KolmError) and phrase in str(got), (phrase, got)
    assert isinstance(out[-1], tuple)


# ---- end to end: a real ledger server, kolm verify, the audit -----------------------------


@dataclass
class World:
    db: str
    keydir: Path
    trust: TrustRoot
    compile: PrivateKey
    log: PrivateKey
    server: LedgerThread


@pytest.fixture
def world(db_url: str, keydir: Path) -> Iterator[World]:
    trust = TrustRoot.load(keydir / "trust.json")
    log = PrivateKey.load(keydir / "log.key")
    srv = LedgerThread(db_url, trust, log)
    try:
        yield World(db_url, keydir, trust, PrivateKey.load(keydir / "compile.key"), log, srv)
    finally:
        srv.close()


def _invalid_argument(client: LedgerClient, data: bytes) -> str:
    with pytest.raises(KolmError) as e:
        client.append(data)
    cause = e.value.__cause__
    assert isinstance(cause, grpc.RpcError)
    assert cause.code() == grpc.StatusCode.INVALID_ARGUMENT, cause.details()
    return str(cause.details())


def test_append_refuses_each_malformed_receipt(world: World) -> None:
    with LedgerClient(world.server.target) as client:
        for name, (payload, phrase) in bad_payloads().items():
            details = _invalid_argument(client, signed(payload, world.compile).to_bytes())
            assert phrase in details, (name, details)
        details = _invalid_argument(
            client, high_s(sign_statement(good_statement(1), world.compile)).to_bytes()
        )
        assert "low-S" in details
        obj = padded_sig_envelope(world.compile, 1).to_json()
        obj["signatures"][0]["sig"] = padding_bits_set(obj["signatures"][0]["sig"])
        details = _invalid_argument(client, canonical_json(obj))
        assert "envelope.signatures[0].sig: not canonical base64" in details
        assert list(client.entries()) == []
        # the well-formed receipt still goes in
        client.append(sign_statement(good_statement(1), world.compile))
        assert len(list(client.entries())) == 1


def _verify(tmp: Path, trust: Path, obj: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> str:
    path = tmp / "x.kolm-receipt.json"
    path.write_text(json.dumps(obj))
    rc = kolm_main(["verify", str(path), "--trust", str(trust)])
    out = capsys.readouterr().out
    assert rc == (0 if out.startswith("OK") else 1), out
    return out


def test_kolm_verify_refuses_each_at_its_step(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trust = world.keydir / "trust.json"
    with LedgerClient(world.server.target) as client:
        env = padded_sig_envelope(world.compile, 2)
        client.append(env, wait=True)
        good = client.bundle(index=0).to_json()
    assert _verify(tmp_path, trust, good, capsys).startswith("OK: label receipt at index 0")
    for name, (payload, phrase) in bad_payloads().items():
        b = json.loads(json.dumps(good))
        b["envelope"] = signed(payload, world.compile).to_json()
        out = _verify(tmp_path, trust, b, capsys)
        assert out.startswith("FAILED at step 2"), (name, out)
        assert phrase in out, (name, out)
    b = json.loads(json.dumps(good))
    b["envelope"] = high_s(env).to_json()
    out = _verify(tmp_path, trust, b, capsys)
    assert out.startswith("FAILED at step 3") and "low-S" in out, out
    b = json.loads(json.dumps(good))
    sig = b["envelope"]["signatures"][0]["sig"]
    b["envelope"]["signatures"][0]["sig"] = padding_bits_set(sig)
    out = _verify(tmp_path, trust, b, capsys)
    assert out.startswith("FAILED at step 1") and "not canonical base64" in out, out
    # unknown envelope fields would be hashed by one reader and dropped by another
    b = json.loads(json.dumps(good))
    b["envelope"]["signatures"][0]["cert"] = "x"
    out = _verify(tmp_path, trust, b, capsys)
    assert out.startswith("FAILED at step 1") and "unknown field(s) cert" in out, out


def test_audit_names_each_planted_entry(world: World) -> None:
    plants: dict[str, tuple[bytes, str]] = {
        name: (signed(p, world.compile).to_bytes(), phrase)
        for name, (p, phrase) in bad_payloads().items()
    }
    n = len(plants) + 1
    envs = [sign_statement(good_statement(100 + i), world.compile) for i in range(n)]
    # the last entry's own receipt re-signed (r, n - s): the same statement, a second signature
    plants["high-S"] = (high_s(envs[-1]).to_bytes(), "low-S")
    with LedgerClient(world.server.target) as client:
        client.append_many(envs)
    world.server.stop()
    store = Store(world.db, migrate=False)
    try:
        assert audit(store, world.trust).ok
    finally:
        store.close()
    # a database writer without keys puts each malformed (but correctly signed) receipt
    # in place of an entry; the leaf and chain no longer match either, but the audit must
    # also say what is wrong with the receipt itself
    drop_triggers(world.db)
    eng = sa.create_engine(world.db, poolclass=NullPool)
    with eng.begin() as c:
        for i, (data, _) in enumerate(plants.values()):
            c.execute(
                sa.text("UPDATE entries SET envelope = :v WHERE idx = :i"), {"v": data, "i": i}
            )
    eng.dispose()
    store = Store(world.db, migrate=False)
    try:
        rep = audit(store, world.trust)
    finally:
        store.close()
    assert not rep.ok
    for i, (name, (_, phrase)) in enumerate(plants.items()):
        reasons = [f.reason for f in rep.failures if f.index == i]
        assert any(phrase in r for r in reasons), (name, reasons)


# ---- checkpoint extension lines (C2SP) -----------------------------------------------------


def test_checkpoint_extension_lines_are_accepted_and_kept(world: World) -> None:
    """A log-signed checkpoint with extension lines after ``chain`` verifies (C2SP allows
    them); kolm still requires its ``chain`` line first, and keeps the extra lines."""
    with LedgerClient(world.server.target) as client:
        client.append(sign_statement(good_statement(3), world.compile), wait=True)
        bundle = client.bundle(index=0)
    cp = bundle.tlog_proof.signed_checkpoint().checkpoint
    extended = Checkpoint(
        cp.origin, cp.size, cp.root, cp.chain_head, ("example.com/ext 42", "another line")
    )
    signed_cp = sign_checkpoint(extended, [NoteSigner(cp.origin, world.log)])
    text = signed_cp.note.text
    assert text.endswith(
        f"chain {base64.b64encode(cp.chain_head).decode()}\nexample.com/ext 42\nanother line\n"
    )
    again = SignedCheckpoint.from_bytes(signed_cp.to_bytes())
    assert again.checkpoint == extended
    swapped = dataclasses.replace(bundle.tlog_proof, checkpoint=signed_cp.to_bytes())
    v = verify_bundle(dataclasses.replace(bundle, tlog_proof=swapped), world.trust)
    assert v.checkpoint == extended


# ---- model.sig (OpenSSF model-signing): verified by the same code --------------------------


def test_model_sig_is_held_to_the_same_rules() -> None:
    key = PrivateKey.generate()
    pub = key.public_key()
    trusted = TrustedKey(
        pub.keyid(), "compile", "ecdsa-p256-sha256", pub, datetime(2020, 1, 1, tzinfo=UTC)
    )
    res = [("manifest.json", "ab" * 32)]
    payload = canonical_json(
        {
            "subject": [{"name": "a", "digest": {"sha256": artifact_digest(res)}}],
            "predicateType": MODEL_SIGNING_PREDICATE,
            "predicate": {
                "resources": [{"name": "manifest.json", "algorithm": "sha256", "digest": "ab" * 32}]
            },
        }
    )
    env = signed(payload, key)

    def model_sig(e: Envelope, sig_b64: str | None = None) -> bytes:
        sig = sig_b64 or base64.b64encode(e.signatures[0].sig).decode()
        obj = {
            "payload": base64.b64encode(e.payload).decode(),
            "payloadType": e.payload_type,
            "signatures": [{"sig": sig}],
        }
        return json.dumps({"dsseEnvelope": obj}).encode()

    parse_model_signature(model_sig(env), "a.kolm").verify_by(trusted)
    with pytest.raises(SignatureError, match="low-S"):
        parse_model_signature(model_sig(high_s(env)), "a.kolm").verify_by(trusted)
    for i in range(100):
        e = signed(payload + b" " * i, key)  # other signatures until one is padded
        b64 = base64.b64encode(e.signatures[0].sig).decode()
        if b64.endswith("="):
            break
    with pytest.raises(ArtifactError, match="not canonical base64"):
        parse_model_signature(model_sig(e, padding_bits_set(b64)), "a.kolm")
