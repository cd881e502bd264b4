"""RFC 8785 (JCS) canonical JSON and the digests built on it.

Example::

    >>> from kolm_ledger.canonical import canonical_json, digest_hex
    >>> canonical_json({"b": 1, "a": [True, None]})
    b'{"a":[true,null],"b":1}'
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import rfc8785

from .errors import FormatError

__all__ = ["canonical_json", "digest_hex", "sha256_hex"]

_INT_MAX = 2**53 - 1  # RFC 8785 numbers are IEEE doubles: exact integers up to here
# the standard library's C encoder, configured as JCS writes: sorted keys, no whitespace,
# UTF-8 text as is, and the same escapes (\" \\ \b \f \n \r \t, other controls \u00xx)
_ENCODER = json.JSONEncoder(
    ensure_ascii=False, sort_keys=True, separators=(",", ":"), allow_nan=False
)


class _General(Exception):
    """The value needs the general encoder (or is not representable at all)."""


def _plain(obj: Any) -> Any:
    """``obj`` as the C encoder writes exactly as RFC 8785 does, or raise :class:`_General`.

    Accepted: dicts with ASCII string keys (so code-point order is JCS's UTF-16 order),
    lists, tuples, strings, booleans, None, integers within +-(2**53 - 1), and floats
    that are integral below 1e16 (written as integers, as JCS does) or non-integral with
    1e-4 <= |x| < 1e16 (where ``repr`` is JCS's shortest round-trip form, no exponent).
    """
    t = type(obj)
    if t is str or t is bool or obj is None:
        return obj
    if t is int:
        if -_INT_MAX <= obj <= _INT_MAX:
            return obj
        raise _General
    if t is float:
        a = abs(obj)
        if a < 1e16:  # False for NaN and the infinities
            if obj.is_integer():
                return int(obj)
            if a >= 1e-4:
                return obj
        raise _General
    if t is dict:
        out = {}
        for k, v in obj.items():
            if type(k) is not str or not k.isascii():
                raise _General
            out[k] = _plain(v)
        return out
    if t is list or t is tuple:
        return [_plain(v) for v in obj]
    raise _General


def canonical_json(obj: Any) -> bytes:
    """RFC 8785 canonical JSON bytes; raises :class:`FormatError` for unrepresentable values.

    Fast path: values :func:`_plain` accepts (receipts are such values) go through the
    standard library's C encoder; anything else through the ``rfc8785`` package. A
    property test holds the two equal.
    """
    try:
        return _ENCODER.encode(_plain(obj)).encode("utf-8")
    except (_General, UnicodeEncodeError):  # UnicodeEncodeError: a lone surrogate
        pass
    try:
        return rfc8785.dumps(obj)
    except (rfc8785.CanonicalizationError, TypeError, ValueError) as e:
        raise FormatError(f"value cannot be canonicalized as RFC 8785 JSON: {e}") from e


def sha256_hex(data: bytes) -> str:
    """Lowercase hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def digest_hex(obj: Any) -> str:
    """Lowercase hex SHA-256 of the canonical JSON of ``obj``."""
    return sha256_hex(canonical_json(obj))
