"""RFC 8785 (JCS) canonical JSON and the digests built on it.

Example::

    >>> from kolm_ledger.formats.canonical import canonical_json, strict_loads
    >>> canonical_json({"b": 1, "a": [True, None]})
    b'{"a":[true,null],"b":1}'
    >>> strict_loads(b'{"a":[true,null],"b":1}')
    {'a': [True, None], 'b': 1}

:func:`strict_loads` is the one strict parser of signed JSON (receipt payloads): the
ledger's append validation, ``kolm verify`` and the audit all read statements through it.
"""

from __future__ import annotations

import hashlib
import json
import math
from json.encoder import c_encode_basestring, c_make_encoder  # type: ignore[attr-defined]
from typing import Any, NoReturn

import rfc8785

from kolm_ledger.errors import FormatError

__all__ = ["canonical_json", "digest_hex", "parse_json", "sha256_hex", "strict_loads"]

_INT_MAX = 2**53 - 1  # RFC 8785 numbers are IEEE doubles: exact integers up to here
# the standard library's C encoder, configured as JCS writes: sorted keys, no whitespace,
# UTF-8 text as is, and the same escapes (\" \\ \b \f \n \r \t, other controls \u00xx)
_ENCODER = json.JSONEncoder(
    ensure_ascii=False, sort_keys=True, separators=(",", ":"), allow_nan=False
)


def _no_default(o: Any) -> NoReturn:
    raise ValueError(f"{type(o).__name__} is not JSON")


# _ENCODER's C encoder built once (JSONEncoder.encode builds one per call) and without the
# circularity check (parsed JSON has no cycles): the strict parser's fast re-encoding
_C = (
    c_make_encoder(None, _no_default, c_encode_basestring, None, ":", ",", True, False, False)
    if c_make_encoder is not None
    else None
)


def _encode_c(obj: Any) -> str:
    if _C is None:  # pragma: no cover - CPython always has the C encoder
        return _ENCODER.encode(obj)
    return "".join(_C(obj, 0))


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


def _utf8(data: bytes, what: str, error: type[FormatError]) -> str:
    """``data`` decoded as strict UTF-8; ``error`` names the first bad byte otherwise."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(
            f"{what} is not valid UTF-8: byte {e.start} ({data[e.start : e.start + 1]!r}): "
            f"{e.reason}"
        ) from e


def strict_loads(data: bytes, what: str = "JSON", error: type[FormatError] = FormatError) -> Any:
    """Parse ``data``, which must be exactly the RFC 8785 form of the value it holds.

    The rule (docs/FORMATS.md, "Strict JSON"): valid UTF-8 (no CESU-8, no encoded
    surrogates, no byte-order mark), JSON without duplicate keys at any depth, no
    ``NaN``/``Infinity``, no lone surrogate escapes, every number a finite IEEE-754
    double (``1e400`` is refused; an integer literal is the double it names), and
    ``data == canonical_json(value)`` (so no whitespace, keys sorted, shortest number
    forms, minimal escapes).

    Cost on valid input: one strict UTF-8 decode, ``json.loads`` and the canonical
    re-encoding (C fast path) compared with ``data``; every violation makes the bytes
    differ from (or the value unencodable by) the canonical encoding, so the slower
    diagnosis that names the fault runs only for refused input. Raises ``error`` (a
    :class:`FormatError`) whose message starts with ``what`` and names the fault.
    """
    text = _utf8(data, what, error)
    try:
        obj = _DECODER.decode(text)
    except _Slow:
        return _slow(data, what, error)
    except RecursionError as e:
        raise error(f"{what} is nested too deeply to parse") from e
    except ValueError as e:
        raise error(f"{what} is not JSON: {e}") from e
    if data.isascii():
        # ASCII keys sort the same by code point (the C encoder) and UTF-16 unit (JCS);
        # the hooks above passed only numbers the C encoder writes as JCS does
        try:
            same = _encode_c(obj) == text
        except ValueError:  # NaN or an infinity
            same = False
    else:
        try:
            same = canonical_json(obj) == data
        except FormatError:
            same = False
    return obj if same else _slow(data, what, error)


class _Slow(Exception):
    """A number the fast check cannot judge: the exact path decides."""


def _float_as_written(s: str) -> float:
    """A float literal the C encoder writes back unchanged iff it is canonical, else _Slow.

    ``repr`` is JCS's form for non-integral doubles with 1e-4 <= |x| < 1e16 (see
    :func:`_plain`); any other float (integral, tiny, huge, infinite) goes the exact way.
    """
    x = float(s)
    a = abs(x)
    if 1e-4 <= a < 1e16 and not x.is_integer():
        return x
    raise _Slow


def _int_as_written(s: str) -> int:
    """An integer literal of at most 15 digits (always exact in a double), else _Slow."""
    if len(s) > 15:
        raise _Slow
    return int(s)


# numbers the fast check can judge, or _Slow (built once: json.loads with hooks would
# build a decoder per call)
_DECODER = json.JSONDecoder(parse_float=_float_as_written, parse_int=_int_as_written)


class _Fault(Exception):
    """The first strict-JSON fault found while diagnosing refused input."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _Fault(f"duplicate key {k[:60]!r}")
        out[k] = v
    return out


def _no_constant(name: str) -> NoReturn:
    raise _Fault(f"{name} is not a JSON number (RFC 8785 has no NaN or infinities)")


def _finite_float(s: str) -> float:
    x = float(s)
    if math.isinf(x):
        raise _Fault(f"number {s[:40]} is outside the IEEE-754 double range")
    return x


def _as_double(s: str) -> int | float:
    """An integer literal as RFC 8785 reads it: a double (kept an ``int`` when exact)."""
    n = int(s)
    if abs(n) <= _INT_MAX:
        return n
    x = float(n)  # OverflowError past the double range: caught below
    return x


def _lone_surrogate(obj: Any) -> str | None:
    """The first string (key or value) in ``obj`` holding a lone surrogate, if any."""
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, str):
            try:
                o.encode("utf-8")
            except UnicodeEncodeError as e:
                return f"lone surrogate \\u{ord(o[e.start]):04x} in string {o[:40]!r}"
        elif isinstance(o, dict):
            stack.extend(o.keys())
            stack.extend(o.values())
        elif isinstance(o, list):
            stack.extend(o)
    return None


def parse_json(data: bytes, what: str = "JSON", error: type[FormatError] = FormatError) -> Any:
    """Parse JSON a person wrote: any whitespace and key order, otherwise the strict rules.

    Refused with ``error`` naming the fault: invalid UTF-8, a duplicate key, ``NaN`` or
    an infinity, a number outside the double range, a lone surrogate. Numbers are read
    as RFC 8785 reads them (an integer literal beyond 2**53 - 1 is a double). What this
    returns :func:`canonical_json` can always encode; signed JSON is read with
    :func:`strict_loads`, which also requires the canonical form.
    """
    text = _utf8(data, what, error)
    try:
        obj = json.loads(
            text,
            object_pairs_hook=_no_duplicates,
            parse_constant=_no_constant,
            parse_float=_finite_float,
            parse_int=_as_double,
        )
    except _Fault as e:
        raise error(f"{what}: {e}") from None
    except OverflowError:
        raise error(f"{what}: an integer is outside the IEEE-754 double range") from None
    except RecursionError as e:
        raise error(f"{what} is nested too deeply to parse") from e
    except ValueError as e:
        raise error(f"{what} is not JSON: {e}") from e
    fault = _lone_surrogate(obj)
    if fault is not None:
        raise error(f"{what}: {fault}")
    return obj


def _slow(data: bytes, what: str, error: type[FormatError]) -> Any:
    """``data`` parsed as JSON but is not plainly canonical: accept it or name the fault.

    Accepted only when it is canonical once every number is read as RFC 8785 reads it
    (a double: an integer literal beyond 2**53 - 1, such as ``9007199254740992`` or
    JCS's ``100000000000000000000`` for 1e20, is that double); otherwise raises
    ``error`` naming the fault (see :func:`parse_json`) or the first byte where ``data``
    leaves the canonical form.
    """
    obj = parse_json(data, what, error)
    again = canonical_json(obj)
    if again == data:
        return obj
    i = next((j for j, (a, b) in enumerate(zip(data, again, strict=False)) if a != b), None)
    if i is None:
        i = min(len(data), len(again))
    raise error(
        f"{what} is not in RFC 8785 canonical form (whitespace, key order, number or "
        f"escape form): first difference at byte {i}, {data[i : i + 12]!r} where the "
        f"canonical form has {again[i : i + 12]!r}"
    )
