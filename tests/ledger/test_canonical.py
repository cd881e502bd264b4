"""canonical_json's fast path (the C encoder) against the rfc8785 package, value for value."""

from __future__ import annotations

import math

import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from kolm_ledger.errors import FormatError
from kolm_ledger.formats import canonical
from kolm_ledger.formats.canonical import canonical_json


def reference(obj: object) -> bytes | None:
    """What the rfc8785 package writes, or None when it refuses the value."""
    try:
        return rfc8785.dumps(obj)
    except (rfc8785.CanonicalizationError, TypeError, ValueError):
        return None


def check(obj: object) -> None:
    want = reference(obj)
    if want is None:
        with pytest.raises(FormatError):
            canonical_json(obj)
    else:
        assert canonical_json(obj) == want


# every character class that matters: ASCII, controls, quotes, backslash, DEL, BMP above
# the surrogates (U+E000..U+FFFF sort differently in UTF-16), astral, lone surrogates
_chars = st.one_of(
    st.characters(codec=None),
    st.sampled_from(['"', "\\", "\x00", "\x1f", "\x7f", "\b", "\f", "\n", "\r", "\t", "\ud800",
                     "\udfff", "\ue000", "\uffff", "\U00010000", "\u2028", "é"]),
)  # fmt: skip
_text = st.text(_chars, max_size=12)
_floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e-4, 9.999e-5, 1e-7, 1e16, 1e16 - 2, 1e21, 1e22, 7.0, 0.5,
                     2.0**53, 2.0**53 + 2, 123456789012345.6, 5e-324, 1.7976931348623157e308]),
)  # fmt: skip
_ints = st.one_of(st.integers(), st.sampled_from([2**53 - 1, 2**53, -(2**53) + 1, -(2**53), 0, -1]))
_scalars = st.one_of(st.none(), st.booleans(), _ints, _floats, _text)
_json = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.lists(inner, max_size=5).map(tuple),
        st.dictionaries(st.one_of(_text, st.text(max_size=6)), inner, max_size=5),
    ),
    max_leaves=30,
)


@settings(max_examples=3000, deadline=None)
@given(_json)
def test_fast_path_writes_what_rfc8785_writes(obj: object) -> None:
    check(obj)


@pytest.mark.parametrize(
    "obj",
    [
        {"b": 1, "a": [True, None, False]},
        {"\ue000": 1, "\U00010000": 2},  # code-point order differs from UTF-16 order
        {"é": 1, "e": 2, "z": 3},
        {"x": 7.0, "y": -0.0, "z": 0.93, "w": 1e-5, "v": 1e21, "u": 2.0**60},
        {"s": '\x00\x1f\x7f"\\\b\f\n\r\t\u2028'},
        [2**53 - 1, -(2**53) + 1],
        ("tuple", 1),
        {1: "int key"},
        {"bad": float("nan")},
        {"bad": math.inf},
        {"bad": 2**53},
        {"bad": "\ud800"},
        {"bad": b"bytes"},
        {"bad": {1, 2}},
    ],
)
def test_edge_cases(obj: object) -> None:
    check(obj)


def test_receipt_values_take_the_fast_path() -> None:
    """A prediction-like statement is encoded without the general encoder."""
    value = {
        "_type": "https://in-toto.io/Statement/v1",
        "predicate": {"confidence": 0.9312, "latency_ms": 7.0, "output": "card_arrival",
                      "verifier": {"ok": True}, "evidence": [{"position": 3, "id": "c-3"}]},
        "subject": [{"digest": {"sha256": "a" * 64}, "name": "artifact"}],
    }  # fmt: skip
    canonical._plain(value)  # raises _General if not
    assert canonical_json(value) == rfc8785.dumps(value)


def test_subclasses_take_the_general_path() -> None:
    class D(dict):  # type: ignore[type-arg]
        pass

    with pytest.raises(canonical._General):
        canonical._plain(D(a=1))
    check(D(a=1, b=[1.5]))


_KEY = None


def _infer_key() -> object:
    global _KEY
    if _KEY is None:
        from kolm_ledger._crypto import PrivateKey

        _KEY = PrivateKey.generate("ecdsa-p256-sha256")
    return _KEY


@settings(max_examples=300, deadline=None)
@given(output=_json, request_id=_text, confidence=st.floats(0, 1), backend=_text)
def test_signed_receipt_bytes_are_the_canonical_encoding(
    output: object, request_id: str, confidence: float, backend: str
) -> None:
    """The bytes a builder keeps from its parser round trip, and an envelope's cached
    encoding, are exactly what RFC 8785 writes for the values they hold."""
    import json

    from kolm_ledger.formats import receipts

    try:
        stmt = receipts.prediction_statement(
            output_digest="b" * 64, artifact_digest="a" * 64, input_commitment="c" * 64,
            output=output, verifier_verdict={"ok": True}, backend=backend,
            confidence=confidence, latency_ms=1.25, request_id=request_id,
        )  # fmt: skip
    except FormatError:
        return  # not representable as RFC 8785 JSON (the test above covers refusals)
    env = receipts.sign_statement(stmt, _infer_key())  # type: ignore[arg-type]
    assert env.payload == rfc8785.dumps(stmt.to_json()) == rfc8785.dumps(json.loads(env.payload))
    assert env.canonical() == rfc8785.dumps(env.to_json())
    assert env.canonical() is env.canonical() is env.to_bytes()  # encoded once
