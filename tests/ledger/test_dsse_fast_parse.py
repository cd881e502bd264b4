"""The ledger's one-pass envelope parser agrees with the general JSON path, byte for byte.

``dsse.parse_envelope`` recognises canonical input without ``json.loads``; it must accept
exactly the bytes the general path maps to the same envelope *and* back to the same
canonical bytes, and hand everything else to the general path (which names the error).
"""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.mutations import mutations

from kolm_ledger.errors import EnvelopeFormatError, KolmError
from kolm_ledger.formats import dsse
from kolm_ledger.formats.dsse import Envelope, Signature, parse_envelope

_plain = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=30)
_any_text = st.text(min_size=1, max_size=30)  # quotes, backslashes, controls, non-ASCII


@st.composite
def envelopes(draw: st.DrawFn) -> Envelope:
    text = st.one_of(_plain, _any_text)
    sigs = draw(
        st.lists(
            st.builds(Signature, text, st.binary(min_size=1, max_size=72)), min_size=1, max_size=2
        )
    )
    return Envelope(draw(st.binary(max_size=200)), draw(text), tuple(sigs))


def general(data: bytes) -> tuple[Envelope, bytes]:
    """The reference: JSON decode, field checks, canonical re-encoding."""
    env = Envelope.from_json(json.loads(data))
    return env, env.canonical()


@settings(max_examples=400, deadline=None)
@given(envelopes())
def test_canonical_bytes_parse_to_the_same_envelope_on_either_path(env: Envelope) -> None:
    data = env.canonical()
    assert parse_envelope(data) == (env, data)
    assert general(data) == (env, data)
    fast = dsse._parse_canonical(data)
    if fast is not None:
        assert fast == env
    strings = (env.payload_type, env.signatures[0].keyid)
    if len(env.signatures) == 1 and all(dsse._PLAIN.fullmatch(t) for t in strings):
        assert fast == env  # the common case really takes the fast path


_SAMPLE = Envelope(
    b'{"_type":"https://in-toto.io/Statement/v1"}',
    dsse.IN_TOTO_PAYLOAD_TYPE,
    (Signature("ab" * 32, bytes(range(70))),),
).canonical()


@settings(max_examples=1500, deadline=None)
@given(mutations(_SAMPLE))
def test_a_mutated_envelope_is_accepted_only_where_the_general_path_agrees(data: bytes) -> None:
    fast = dsse._parse_canonical(data)
    try:
        ref: tuple[Envelope, bytes] | None = general(data)
    except (ValueError, UnicodeDecodeError, KolmError):
        ref = None
    if fast is not None:
        # accepted in one pass: the general path gives the same envelope and these bytes
        assert ref == (fast, data)
    try:
        got = parse_envelope(data)
    except EnvelopeFormatError:
        assert ref is None
    else:
        assert ref is not None and got == ref


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=4), st.sampled_from(["payload", "sig"]))
def test_non_canonical_base64_never_takes_the_fast_path(raw: bytes, where: str) -> None:
    """A last digit with unused low bits set decodes the same but is refused on either path.

    (Before issue 14 the general path re-encoded it, so two texts named one logged envelope.)
    """
    good = base64.b64encode(raw)
    if not good.endswith(b"="):
        return
    i = len(good.rstrip(b"=")) - 1
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    bumped = good[:i] + bytes([alphabet[alphabet.index(good[i]) + 1]]) + good[i + 1 :]
    if base64.b64decode(bumped) != raw:
        return  # the bump reached a used bit: a different value, not a near miss
    env = Envelope(raw, "t", (Signature("k", raw),))
    canon = env.canonical()
    field = b'"payload":"' if where == "payload" else b'"sig":"'
    data = canon.replace(field + good, field + bumped, 1)
    assert data != canon
    assert dsse._parse_canonical(data) is None
    with pytest.raises(EnvelopeFormatError, match="not canonical base64"):
        parse_envelope(data)
