"""One retry helper: exponential backoff with jitter, at least the server's Retry-After.

:func:`retry` calls an attempt until it returns a result or the retries run out; an
attempt that should be tried again returns a :class:`Retry` (why, and the server's
``Retry-After`` when it sent one). :class:`Backoff` says how long to wait before retry
``a`` (0-based): ``d/2 + uniform(0, d/2)`` with ``d = min(max_s, base_s * 2**a)``, at
least ``Retry-After`` (capped at ``max_s``). ``sleep`` and ``rng`` are injectable, so
tests observe the waits without waiting::

    >>> waits = []
    >>> backoff = Backoff(0.5, 30.0, rng=random.Random(0), sleep=waits.append)
    >>> answers = iter([Retry("HTTP 503"), Retry("HTTP 429", retry_after=2.5), "ok"])
    >>> retry(lambda: next(answers), retries=5, backoff=backoff)
    'ok'
    >>> [round(w, 3) for w in waits]
    [0.461, 2.5]
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

__all__ = ["Backoff", "Retry", "retry", "retry_after"]

_T = TypeVar("_T")


@dataclass(frozen=True)
class Retry:
    """An attempt that failed in a way worth trying again: ``reason`` (in this machine's
    words, for logs and the final error) and the server's ``Retry-After`` in seconds."""

    reason: str
    retry_after: float | None = None


class Backoff:
    """Exponential backoff with jitter (see the module docstring); thread-safe."""

    def __init__(
        self,
        base_s: float = 0.5,
        max_s: float = 30.0,
        *,
        rng: random.Random | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.base_s, self.max_s = float(base_s), float(max_s)
        self.sleep = sleep
        self._rng = rng or random.Random()
        self._lock = threading.Lock()

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry ``attempt`` (0-based)."""
        d = min(self.max_s, self.base_s * 2**attempt)
        with self._lock:
            delay = d / 2 + self._rng.uniform(0, d / 2)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_s))
        return float(delay)


def retry(
    attempt: Callable[[], _T | Retry],
    *,
    retries: int,
    backoff: Backoff,
    on_retry: Callable[[int, Retry, float], None] | None = None,
) -> _T | Retry:
    """``attempt()`` until it returns something other than a :class:`Retry`, at most
    ``retries + 1`` times, waiting ``backoff.delay`` in between (``on_retry(n, why,
    delay)`` is told first). Returns the result, or the last :class:`Retry` when every
    attempt asked for one. Exceptions from ``attempt`` are not caught."""
    out: _T | Retry = Retry("no attempt")
    for n in range(retries + 1):
        out = attempt()
        if not isinstance(out, Retry):
            return out
        if n < retries:
            delay = backoff.delay(n, out.retry_after)
            if on_retry is not None:
                on_retry(n, out, delay)
            backoff.sleep(delay)
    return out


def retry_after(headers: Mapping[str, str]) -> float | None:
    """The ``Retry-After`` header in seconds; ``None`` when absent, negative, not finite or
    an HTTP date (the caller's own backoff applies)."""
    for key, value in headers.items():
        if key.lower() == "retry-after":
            try:
                seconds = float(value)
            except ValueError:
                return None
            return seconds if math.isfinite(seconds) and seconds >= 0 else None
    return None
