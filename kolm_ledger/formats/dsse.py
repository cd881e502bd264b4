"""DSSE envelopes (https://github.com/secure-systems-lab/dsse, protocol v1).

A receipt is a DSSE envelope whose payload is an in-toto Statement v1. The
signature covers the pre-authentication encoding::

    PAE(type, body) = "DSSEv1" SP LEN(type) SP type SP LEN(body) SP body

A log entry's Merkle leaf binds the RFC 8785 canonical JSON of the envelope object
(:meth:`Envelope.canonical`) and the entry's integration time
(:func:`kolm_ledger.formats.leaf.entry_leaf_hash`), so a leaf hash is not a function of the
envelope alone: take it from the ledger.

Example::

    >>> from kolm_ledger.keys import PrivateKey
    >>> from kolm_ledger import dsse
    >>> key = PrivateKey.generate()
    >>> env = dsse.sign(b'{"_type": "x"}', dsse.IN_TOTO_PAYLOAD_TYPE, key)
    >>> dsse.verify_signature(env, key.public_key())
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any

from kolm_ledger._crypto import PrivateKey, PublicKey
from kolm_ledger.errors import EnvelopeFormatError, FormatError, SignatureError
from kolm_ledger.formats.canonical import canonical_json

__all__ = [
    "IN_TOTO_PAYLOAD_TYPE",
    "MAX_ENVELOPE_BYTES",
    "Envelope",
    "Signature",
    "b64decode",
    "pae",
    "parse_envelope",
    "sign",
    "verify_signature",
]

IN_TOTO_PAYLOAD_TYPE = "application/vnd.in-toto+json"
#: Envelopes (canonical JSON) larger than this are refused by the ledger.
MAX_ENVELOPE_BYTES = 64 * 1024
_PLAIN = re.compile(r"[ !#-\[\]-~]*")  # printable ASCII except '"' and '\\'
_PLAIN_BYTES = re.compile(rb"[ !#-\[\]-~]*")
# the canonical layout of a one-signature envelope (see Envelope.canonical)
_C_HEAD = b'{"payload":"'
_C_TYPE = b'","payloadType":"'
_C_KEYID = b'","signatures":[{"keyid":"'
_C_SIG = b'","sig":"'
_C_TAIL = b'"}]}'


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding."""
    t = payload_type.encode()
    return b"DSSEv1 %d %b %d %b" % (len(t), t, len(payload), payload)


def b64decode(s: object, what: str) -> bytes:
    """Strict standard base64; raises :class:`EnvelopeFormatError` naming ``what``.

    Exactly one text per value: the RFC 4648 §4 alphabet, ``=`` padding to a multiple of
    4, nothing else (no whitespace, no URL-safe digits), and the unused low bits of the
    last digit zero -- the rule is ``base64.b64encode(decoded) == given``, Go's
    ``base64.StdEncoding.Strict()``. So the envelope hashed is the envelope given: a
    ``sig`` ending ``h==`` where the encoding is ``g==`` is refused, not re-encoded.
    """
    if not isinstance(s, str):
        raise EnvelopeFormatError(f"{what}: want a base64 string, got {type(s).__name__}")
    try:
        raw = s.encode("ascii")
        out = base64.b64decode(raw, validate=True)
    except (binascii.Error, UnicodeEncodeError) as e:
        raise EnvelopeFormatError(f"{what}: not valid base64: {e}") from e
    if base64.b64encode(out) != raw:
        tail = s[-4:] if len(s) > 4 else s
        raise EnvelopeFormatError(
            f"{what}: not canonical base64 (ends {tail!r}: padding bits set, or padding "
            f"missing); the canonical encoding of these bytes ends "
            f"{base64.b64encode(out)[-4:].decode()!r}"
        )
    return out


@dataclass(frozen=True)
class Signature:
    """One DSSE signature."""

    keyid: str
    sig: bytes


@dataclass(frozen=True)
class Envelope:
    """A DSSE envelope."""

    payload: bytes
    payload_type: str
    signatures: tuple[Signature, ...]

    def to_json(self) -> dict[str, Any]:
        """The DSSE JSON object (base64 payload and signatures)."""
        return {
            "payload": base64.b64encode(self.payload).decode(),
            "payloadType": self.payload_type,
            "signatures": [
                {"keyid": s.keyid, "sig": base64.b64encode(s.sig).decode()} for s in self.signatures
            ],
        }

    def canonical(self) -> bytes:
        """RFC 8785 canonical JSON of :meth:`to_json` — the envelope in the Merkle leaf data.

        Fast path: when every string is plain printable ASCII without ``"`` or ``\\``
        (always so for base64 and hex, and for ordinary payload types), JCS reduces to
        this fixed layout (keys already in sorted order, no escaping, no whitespace);
        otherwise the general RFC 8785 encoder runs. A property test holds both equal.
        Computed once per envelope (it is immutable): the leaf hash, the bytes sent to
        the ledger and the bytes handed back to a caller are the same encoding.
        """
        cached: bytes | None = self.__dict__.get("_canonical")
        if cached is None:
            cached = self.__dict__["_canonical"] = self._encode()
        return cached

    def _encode(self) -> bytes:
        payload = base64.b64encode(self.payload).decode()
        parts = [s.keyid for s in self.signatures]
        if _PLAIN.fullmatch(self.payload_type) and all(_PLAIN.fullmatch(k) for k in parts):
            sigs = ",".join(
                f'{{"keyid":"{s.keyid}","sig":"{base64.b64encode(s.sig).decode()}"}}'
                for s in self.signatures
            )
            return (
                f'{{"payload":"{payload}","payloadType":"{self.payload_type}",'
                f'"signatures":[{sigs}]}}'
            ).encode()
        return canonical_json(self.to_json())

    def to_bytes(self) -> bytes:
        """Canonical JSON bytes (same as :meth:`canonical`)."""
        return self.canonical()

    @classmethod
    def from_json(cls, obj: object) -> Envelope:
        """Parse a DSSE JSON object; raises :class:`EnvelopeFormatError` naming the field."""
        if not isinstance(obj, dict):
            raise EnvelopeFormatError(f"envelope: want a JSON object, got {type(obj).__name__}")
        unknown = sorted(obj.keys() - {"payload", "payloadType", "signatures"})
        if unknown:
            raise EnvelopeFormatError(f"envelope: unknown field(s) {', '.join(unknown)}")
        for f in ("payload", "payloadType", "signatures"):
            if f not in obj:
                raise EnvelopeFormatError(f"envelope: missing field {f}")
        payload = b64decode(obj["payload"], "envelope.payload")
        ptype = obj["payloadType"]
        if not isinstance(ptype, str) or not ptype:
            raise EnvelopeFormatError("envelope.payloadType: want a non-empty string")
        try:
            ptype.encode()
        except UnicodeEncodeError as e:
            raise EnvelopeFormatError("envelope.payloadType: not valid Unicode text") from e
        sigs_obj = obj["signatures"]
        if not isinstance(sigs_obj, list) or not sigs_obj:
            raise EnvelopeFormatError("envelope.signatures: want a non-empty list")
        sigs: list[Signature] = []
        for i, s in enumerate(sigs_obj):
            if not isinstance(s, dict):
                raise EnvelopeFormatError(f"envelope.signatures[{i}]: want an object")
            unknown = sorted(s.keys() - {"keyid", "sig"})
            if unknown:
                raise EnvelopeFormatError(
                    f"envelope.signatures[{i}]: unknown field(s) {', '.join(unknown)}"
                )
            keyid = s.get("keyid")
            if not isinstance(keyid, str):
                raise EnvelopeFormatError(f"envelope.signatures[{i}].keyid: want a string")
            sig = b64decode(s.get("sig"), f"envelope.signatures[{i}].sig")
            if not sig:
                raise EnvelopeFormatError(f"envelope.signatures[{i}].sig: empty")
            sigs.append(Signature(keyid, sig))
        return cls(payload, ptype, tuple(sigs))

    @classmethod
    def from_bytes(cls, data: bytes) -> Envelope:
        """Parse DSSE JSON bytes; raises :class:`EnvelopeFormatError`."""
        return parse_envelope(data)[0]


# base64 digits whose low 4 (resp. 2) bits are zero: the last digit before "==" (resp. "=")
_LOW4_ZERO = frozenset(b"AQgw")
_LOW2_ZERO = frozenset(b"AEIMQUYcgkosw048")


def _b64_canonical(s: bytes) -> bool:
    """Whether ``s``, which strict base64 decoding accepted, is the encoding of what it decodes to.

    Strict decoding refuses bad digits, missing padding and data after padding, but
    CPython's ``a2b_base64(strict_mode=True)`` accepts padding after a complete group
    (``QUFB==`` decodes to ``AAA``), so the padding must be exactly what the digits need;
    the slack left is the unused low bits of the last digit before the padding.
    """
    digits = len(s.rstrip(b"="))
    if len(s) - digits != -digits % 4:
        return False
    if s.endswith(b"=="):
        return s[-3] in _LOW4_ZERO
    if s.endswith(b"="):
        return s[-2] in _LOW2_ZERO
    return True


def _parse_canonical(data: bytes) -> Envelope | None:
    """The envelope ``data`` holds if ``data`` is exactly its canonical JSON, else None.

    The ledger's hot path: receipts arrive in canonical form (what :meth:`Envelope.to_bytes`
    writes), so one scan over fixed delimiters replaces ``json.loads`` + :meth:`from_json` +
    :meth:`Envelope.canonical`. It accepts only bytes for which the general path gives the
    same envelope *and* whose canonical JSON is ``data`` itself: the four strings hold no
    ``"``, ``\\`` or non-ASCII byte (so JSON decoding them is the identity), both base64
    strings decode strictly and re-encode to themselves, and nothing follows the layout.
    Anything else (other key order, whitespace, escapes, several signatures, an empty
    ``payloadType`` or ``sig``, non-canonical base64) returns None and takes the general
    path, which gives the precise error.
    """
    if not data.startswith(_C_HEAD):
        return None
    a = len(_C_HEAD)
    b = data.find(b'"', a)
    if b < 0 or not data.startswith(_C_TYPE, b):
        return None
    c = b + len(_C_TYPE)
    d = data.find(b'"', c)
    if d <= c or not data.startswith(_C_KEYID, d):
        return None
    e = d + len(_C_KEYID)
    f = data.find(b'"', e)
    if f < 0 or not data.startswith(_C_SIG, f):
        return None
    g = f + len(_C_SIG)
    h = data.find(b'"', g)
    if h <= g or len(data) != h + len(_C_TAIL) or not data.endswith(_C_TAIL):
        return None
    ptype, keyid = data[c:d], data[e:f]
    if _PLAIN_BYTES.fullmatch(ptype) is None or _PLAIN_BYTES.fullmatch(keyid) is None:
        return None
    p64, s64 = data[a:b], data[g:h]
    try:
        payload = binascii.a2b_base64(p64, strict_mode=True)
        sig = binascii.a2b_base64(s64, strict_mode=True)
    except binascii.Error:
        return None
    if not (_b64_canonical(p64) and _b64_canonical(s64)):
        return None
    return Envelope(payload, ptype.decode("ascii"), (Signature(keyid.decode("ascii"), sig),))


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for k, v in pairs:
        if k in obj:
            raise EnvelopeFormatError(f"envelope: duplicate JSON key {k[:40]!r}")
        obj[k] = v
    return obj


def parse_envelope(data: bytes) -> tuple[Envelope, bytes]:
    """Parse DSSE JSON bytes into the envelope and its canonical JSON (the Merkle leaf data).

    Canonical input (the common case) is recognised in one pass and is its own canonical
    form; anything else is parsed as JSON and re-encoded. Raises
    :class:`EnvelopeFormatError` exactly as :meth:`Envelope.from_bytes` does.
    """
    if len(data) > 4 * MAX_ENVELOPE_BYTES:
        raise EnvelopeFormatError(f"envelope is {len(data)} bytes; far over the size limit")
    env = _parse_canonical(data)
    if env is not None:
        return env, data
    try:
        obj = json.loads(data, object_pairs_hook=_no_duplicate_keys)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise EnvelopeFormatError(f"envelope is not JSON: {e}") from e
    env = Envelope.from_json(obj)
    try:
        return env, env.canonical()
    except FormatError as e:  # e.g. a lone surrogate, which json.loads lets through
        raise EnvelopeFormatError(f"envelope: {e}") from e


def sign(
    payload: bytes, payload_type: str, key: PrivateKey, *, deterministic: bool = False
) -> Envelope:
    """Sign ``payload`` as a one-signature DSSE envelope keyed by the DSSE key id.

    ``deterministic``: an RFC 6979 ECDSA signature, so the same payload gives the same bytes.
    """
    sig = key.sign(pae(payload_type, payload), deterministic=deterministic)
    return Envelope(payload, payload_type, (Signature(key.keyid(), sig),))


def verify_signature(envelope: Envelope, key: PublicKey) -> None:
    """Verify that ``key`` signed ``envelope``; raises :class:`SignatureError`.

    (1) find a signature whose keyid is ``key``'s DSSE key id;
    (2) verify it over PAE(payloadType, payload).
    """
    keyid = key.keyid()
    sigs = [s for s in envelope.signatures if s.keyid == keyid]
    if not sigs:
        have = ", ".join(s.keyid[:16] for s in envelope.signatures)
        raise SignatureError(f"envelope has no signature by key {keyid[:16]} (has: {have})")
    msg = pae(envelope.payload_type, envelope.payload)
    last: SignatureError | None = None
    for s in sigs:
        try:
            key.verify(s.sig, msg)
            return
        except SignatureError as e:
            last = e
    assert last is not None
    # name the form fault (high-S, not DER) when that is why; a wrong signature says only that
    why = "" if "does not verify" in str(last) else f": {last}"
    raise SignatureError(f"envelope signature by key {keyid[:16]} does not verify{why}") from last
