"""The receipt time rule at its edges, on every validation path of the append.

``not_before <= time <= integration time + skew`` (``kolm_ledger.timefmt.check_receipt_time``)
is judged in whole microseconds on the hot paths (``Validator.validate`` and, for receipts
the worker processes checked, ``Validator._finish``); these tests hold that to the rule
exactly: each bound accepted, one microsecond past it refused with the rule's own error,
on the one-thread append and on the worker-process append, on both engines. The clock
reads NOW when a batch is validated and an hour later when it is integrated, so a receipt
past ``NOW + skew`` is refused by the validation check alone (the sequencing check, at
the later integration time, would let it through).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from kolm_ledger._crypto import PrivateKey
from kolm_ledger._samples import sample_statement
from kolm_ledger.errors import KeyValidityError, StatementFormatError
from kolm_ledger.formats import receipts
from kolm_ledger.keys import TrustedKey, TrustRoot
from kolm_ledger.log.ledger import Ledger
from kolm_ledger.log.validate import _MIN_CHUNK
from kolm_ledger.storage import Store
from kolm_ledger.timefmt import MAX_TIME_SKEW

ORIGIN = "test.kolm.dev/time-edges"
NOT_BEFORE = datetime(2026, 3, 1, 12, tzinfo=UTC)
NOW = NOT_BEFORE + timedelta(days=1)  # the injected clock at validation
LATER = NOW + timedelta(hours=1)  # ... and at integration
US = timedelta(microseconds=1)
INFER = PrivateKey.generate("ecdsa-p256-sha256")
LOG = PrivateKey.generate("ed25519")
TRUST = TrustRoot(
    (
        TrustedKey.for_key(INFER.public_key(), "infer", not_before=NOT_BEFORE),
        TrustedKey.for_key(LOG.public_key(), "log", origin=ORIGIN, not_before=NOT_BEFORE),
    )
)
# enough receipts that the append hands validation to the worker processes
BATCH = 2 * _MIN_CHUNK


def _receipt(i: int, t: datetime) -> bytes:
    st = sample_statement("prediction", i, random.Random(i), t)
    return receipts.sign_statement(st, INFER).to_bytes()


class Clock:
    """NOW on the first reading after :meth:`validating` (the append's validation time),
    LATER on every other (the integration time)."""

    def __init__(self) -> None:
        self.first = False

    def validating(self) -> None:
        self.first = True

    def __call__(self) -> datetime:
        first, self.first = self.first, False
        return NOW if first else LATER


CLOCK = Clock()


@pytest.fixture(params=["one thread", "worker processes"])
def ledger(request: pytest.FixtureRequest, db_url: str) -> Iterator[Ledger]:
    processes = 2 if request.param == "worker processes" else 0
    led = Ledger(
        Store(db_url), TRUST, LOG, clock=CLOCK, verify_threads=1, verify_processes=processes
    )
    try:
        yield led
    finally:
        led.close()
        led.store.close()


def _batch(edge: bytes, seed: int) -> list[bytes]:
    """``edge`` among ordinary receipts (dated an hour before NOW), a worker-sized batch."""
    filler = [_receipt(seed + i, NOW - timedelta(hours=1)) for i in range(1, BATCH)]
    return [*filler[: BATCH // 2], edge, *filler[BATCH // 2 :]]


def test_each_bound_of_the_receipt_time_rule_is_accepted(ledger: Ledger) -> None:
    for n, t in enumerate((NOT_BEFORE, NOW + MAX_TIME_SKEW)):
        CLOCK.validating()
        got = ledger.append(_batch(_receipt(10_000 * (n + 1), t), 10_000 * (n + 1)))
        assert len(got) == BATCH and not any(a.duplicate for a in got)
    assert ledger.size == 2 * BATCH


@pytest.mark.parametrize(
    ("t", "error", "phrase"),
    [
        (NOT_BEFORE - US, KeyValidityError, "before its key's not_before"),
        (NOW + MAX_TIME_SKEW + US, StatementFormatError, "later than its integration time"),
    ],
    ids=["1 µs before not_before", "1 µs past now + skew"],
)
def test_one_microsecond_past_a_bound_is_refused_with_the_rules_error(
    ledger: Ledger, t: datetime, error: type[Exception], phrase: str
) -> None:
    CLOCK.validating()
    with pytest.raises(error, match=phrase):
        ledger.append(_batch(_receipt(1, t), 100))
    CLOCK.validating()
    with pytest.raises(error, match=phrase):
        ledger.append([_receipt(1, t)])  # alone: always validated on this thread
    with pytest.raises(error, match=phrase):
        ledger.validate(_receipt(1, t), now=NOW)
    ledger.validate(_receipt(2, NOT_BEFORE), now=NOW)
    ledger.validate(_receipt(3, NOW + MAX_TIME_SKEW), now=NOW)
    assert ledger.size == 0
