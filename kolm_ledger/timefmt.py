"""The one RFC 3339 parser, and the receipt time rule shared by the ledger, audit and verify.

:func:`parse_rfc3339` accepts exactly the RFC 3339 §5.6 ``date-time`` production with
upper-case ``T`` and ``Z``::

    YYYY-MM-DDTHH:MM:SS[.fraction](Z|+HH:MM|-HH:MM)

and nothing else: no space instead of ``T``, no basic format (``20261203T120000Z``), no
``+0000`` or ``+00`` offsets, no week or ordinal dates, no missing offset, no leap
second (``:60``, which a ``datetime`` cannot hold). A fraction of 1 to 9 digits is kept
to the microsecond (further digits are dropped, never rounded up). It returns an aware
``datetime`` in UTC.

:func:`check_receipt_time` is the rule a receipt's own ``time`` obeys, wherever it is
judged (the ledger at append, the audit, ``kolm verify`` with the bundle's
``integrated_time``):

- it is present, a string, and parses as above;
- it is not before the signing key's ``not_before``;
- it is not later than the integration time plus a stated skew
  (:data:`MAX_TIME_SKEW`, 5 minutes, unless configured). Older is fine: spooled and
  resumed receipts arrive late.

Example::

    >>> parse_rfc3339("2026-12-03T12:00:00.5+01:00", "time").isoformat()
    '2026-12-03T11:00:00.500000+00:00'
    >>> parse_rfc3339("2026-12-03 12:00:00Z", "time")
    Traceback (most recent call last):
    ...
    kolm_ledger.errors.StatementFormatError: time: '2026-12-03 12:00:00Z' is not an RFC 3339 date-time (YYYY-MM-DDTHH:MM:SS[.frac] with Z or ±HH:MM)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from kolm_ledger.errors import FormatError, KeyValidityError, StatementFormatError

__all__ = [
    "MAX_TIME_SKEW",
    "check_receipt_time",
    "format_time",
    "from_micros",
    "micros",
    "parse_rfc3339",
    "receipt_time",
]


def format_time(t: datetime) -> str:
    """RFC 3339 in UTC with a ``Z`` suffix and microseconds only when present."""
    t = t.astimezone(UTC)
    s = t.strftime("%Y-%m-%dT%H:%M:%S")
    if t.microsecond:
        s += f".{t.microsecond:06d}"
    return s + "Z"


#: How far a receipt's own ``time`` may lie after its integration time (clock skew).
MAX_TIME_SKEW = timedelta(minutes=5)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)


def micros(t: datetime) -> int:
    """Microseconds since the epoch (UTC) of an aware ``t``."""
    return (t - _EPOCH) // _US


def from_micros(us: int) -> datetime:
    """Inverse of :func:`micros` (UTC)."""
    return _EPOCH + timedelta(microseconds=us)


_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(Z|[+-]\d{2}:\d{2})",
    re.ASCII,
)


def parse_rfc3339(
    value: object, what: str, error: type[FormatError] = StatementFormatError
) -> datetime:
    """Parse an RFC 3339 ``date-time`` strictly (see the module docstring) into UTC.

    Raises ``error`` (default :class:`StatementFormatError`) whose message names ``what``.
    """
    if not isinstance(value, str):
        raise error(f"{what}: want an RFC 3339 string, got {type(value).__name__}")
    m = _RFC3339.fullmatch(value)
    if m is None:
        raise error(
            f"{what}: {value[:40]!r} is not an RFC 3339 date-time "
            "(YYYY-MM-DDTHH:MM:SS[.frac] with Z or ±HH:MM)"
        )
    y, mo, d, h, mi, s, frac, off = m.groups()
    if s == "60":
        raise error(f"{what}: {value[:40]!r} is a leap second, which kolm does not accept")
    micro = int((frac or "").ljust(6, "0")[:6])
    try:
        t = datetime(int(y), int(mo), int(d), int(h), int(mi), int(s), micro, tzinfo=UTC)
        if off != "Z":
            oh, om = int(off[1:3]), int(off[4:6])
            if oh > 23 or om > 59:
                raise ValueError(f"UTC offset {off} out of range")
            delta = timedelta(hours=oh, minutes=om)
            t = t - delta if off[0] == "+" else t + delta
    except (ValueError, OverflowError) as e:
        raise error(f"{what}: {value[:40]!r} is not a valid date-time: {e}") from e
    return t


def receipt_time(predicate: Mapping[str, Any]) -> datetime:
    """A statement predicate's ``time`` (required for every receipt kind), as UTC."""
    if "time" not in predicate:
        raise StatementFormatError("statement.predicate.time: missing (every receipt has a time)")
    return parse_rfc3339(predicate["time"], "statement.predicate.time")


def check_receipt_time(
    t: datetime,
    *,
    not_before: datetime,
    integrated_at: datetime,
    skew: timedelta = MAX_TIME_SKEW,
) -> None:
    """The receipt time rule: ``not_before <= t <= integrated_at + skew``.

    Raises :class:`KeyValidityError` (``FAILED_PRECONDITION``: the key was not yet valid
    at the time the receipt claims) or :class:`StatementFormatError` (``INVALID_ARGUMENT``:
    a time from the future), naming the bound broken.
    """
    if t < not_before:
        raise KeyValidityError(
            f"statement.predicate.time {format_time(t)} is before its key's not_before "
            f"{format_time(not_before)}"
        )
    if t - integrated_at > skew:  # (not integrated_at + skew: that may leave year 9999)
        raise StatementFormatError(
            f"statement.predicate.time {format_time(t)} is later than its integration time "
            f"{format_time(integrated_at)} plus the allowed skew of "
            f"{int(skew.total_seconds())} s"
        )
