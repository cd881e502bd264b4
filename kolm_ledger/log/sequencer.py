"""The sequencer: group commit of validated appends, one checkpoint per batch.

Producers ``await submit(items)``; one writer task takes up to ``max_batch`` queued
items, writes them in one transaction on a worker thread, and resolves every waiter
with its index and a signed promise as soon as that transaction is durable. By default
(``max_wait_ms=0``) the writer never waits for a batch to fill: an item that finds the
log idle is committed at once, and whatever arrives while a commit runs forms the next
batch (group commit: batches grow with the load by themselves, and a lone append pays
one commit, not a timer). ``max_wait_ms > 0`` opts into waiting up to that long for a
batch to fill once one item is there (fewer, larger commits; more latency).

The queue is bounded: past ``max_queue`` items a submit fails at once with
:class:`BackpressureError` (``RESOURCE_EXHAUSTED`` plus a retry hint) instead of
growing without limit.

Key receipts change what later entries may be signed with, so a key receipt ends its
batch, and before each write the trust state is refreshed (key receipts sequenced by
this or any other replica since the items were validated) and every item's key is
checked again: an entry signed by a key revoked in the meantime is refused
(``FAILED_PRECONDITION``) instead of being committed where an audit would reject it.

Integration times never go back: each batch is integrated at ``max(clock, previous
entry's time + 1 µs)`` (:meth:`Ledger.append_validated`), so an operator whose clock is
set back cannot place an entry before one already logged — a revoked key's receipt
before its revocation is refused, not back-dated. The time is in the leaf
(:mod:`kolm_ledger.formats.leaf`), so every checkpoint that covers the entry signs it. For an
envelope whose statement was already logged, the promise is for that entry (its index,
leaf hash and integration time).

A promise is the log's Ed25519 signature over::

    kolm.promise/v1\\n<origin>\\n<index>\\n<base64 leaf hash>\\n<integrated time µs>\\n
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from prometheus_client import Counter, Gauge, Histogram

from kolm_ledger._crypto import PrivateKey
from kolm_ledger.errors import BackpressureError, KolmError, UnavailableError
from kolm_ledger.formats.checkpoint import SignedCheckpoint
from kolm_ledger.formats.note import NoteSigner
from kolm_ledger.formats.promise import Promise, promise_message, verify_promise
from kolm_ledger.log.ledger import Appended, Ledger, Validated
from kolm_ledger.storage import micros

__all__ = ["Promise", "Sequencer", "promise_message", "verify_promise"]

log = logging.getLogger("kolm.sequencer")

APPENDS = Counter("kolm_ledger_appends_total", "Entries sequenced", ["result"])
BATCH_SIZE = Histogram(
    "kolm_ledger_batch_size",
    "Entries per sequenced batch",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000),
)
QUEUE_DEPTH = Gauge("kolm_ledger_queue_depth", "Validated appends waiting for the sequencer")
COMMIT_SECONDS = Histogram(
    "kolm_ledger_commit_seconds",
    "Time to write and sign one batch",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2),
)
APPEND_SECONDS = Histogram(
    "kolm_ledger_append_latency_seconds",
    "From submit to acknowledged (covered by a checkpoint)",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5),
)


_Outcome = tuple[Appended, Promise, SignedCheckpoint | None] | BaseException


class _Ticket:
    """One :meth:`Sequencer.submit_each` call: its outcomes by position, handed back through
    one future once the last is in (not a future and a callback per entry)."""

    __slots__ = ("future", "left", "outcomes")

    def __init__(self, n: int, future: asyncio.Future[list[_Outcome]]) -> None:
        self.outcomes: list[_Outcome | None] = [None] * n
        self.left = n
        self.future = future

    def settle(self, pos: int, outcome: _Outcome) -> None:
        self.outcomes[pos] = outcome
        self.left -= 1
        if self.left == 0 and not self.future.done():  # done: the submitter was cancelled
            self.future.set_result(self.outcomes)  # type: ignore[arg-type]


@dataclass(slots=True)
class _Item:
    validated: Validated
    ticket: _Ticket
    pos: int
    t0: float


class Sequencer:
    """Batches validated appends into group commits on one :class:`Ledger`."""

    def __init__(
        self,
        ledger: Ledger,
        log_key: PrivateKey,
        *,
        max_batch: int = 1000,
        max_wait_ms: float = 0.0,
        max_queue: int = 50_000,
    ) -> None:
        self.ledger = ledger
        self._key = log_key
        self._key_id = NoteSigner(ledger.origin, log_key).key_id.hex()
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.max_queue = max_queue
        self._queue: deque[_Item] = deque()
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._last_batch_s = 0.005

    def start(self) -> None:
        """Start the writer task on the running loop."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="kolm-sequencer")

    @property
    def depth(self) -> int:
        """Items waiting."""
        return len(self._queue)

    async def submit(
        self, items: Sequence[Validated]
    ) -> list[tuple[Appended, Promise, SignedCheckpoint | None]]:
        """Queue ``items`` (all or none) and wait until they are durably sequenced.

        Raises the first item's error if any item was refused (see :meth:`submit_each`).
        """
        out = await self.submit_each(items)
        for r in out:
            if isinstance(r, BaseException):
                raise r
        return out  # type: ignore[return-value]

    async def submit_each(
        self, items: Sequence[Validated]
    ) -> list[tuple[Appended, Promise, SignedCheckpoint | None] | BaseException]:
        """Queue ``items`` (all or none) and wait for each: its result, or why it was refused.

        Items may land in different batches, so some can be committed while another is
        refused (its key revoked meanwhile) or its batch fails. A full queue or a
        shutdown refuses them all at once by raising.
        """
        if self._closing:
            raise UnavailableError("the ledger is shutting down; retry on another replica")
        if len(self._queue) + len(items) > self.max_queue:
            batches = (len(self._queue) + self.max_batch - 1) // self.max_batch
            # each queued batch may first wait max_wait to fill, then takes a commit
            per_batch = self._last_batch_s + self.max_wait
            retry = max(5, int(1000 * per_batch * max(1, batches)))
            raise BackpressureError(
                f"sequencer queue is full ({len(self._queue)} waiting, limit {self.max_queue}); "
                f"retry after {retry} ms",
                retry,
            )
        if not items:
            return []
        now = time.perf_counter()
        fut: asyncio.Future[list[_Outcome]] = asyncio.get_running_loop().create_future()
        ticket = _Ticket(len(items), fut)
        self._queue.extend(_Item(v, ticket, i, now) for i, v in enumerate(items))
        QUEUE_DEPTH.set(len(self._queue))
        self._wake.set()
        return await fut

    async def close(self) -> None:
        """Refuse new work, finish everything already queued, then stop."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            if self.max_wait > 0 and len(self._queue) < self.max_batch and not self._closing:
                # opt-in fill wait (max_wait_ms > 0): trade latency for larger batches
                deadline = loop.time() + self.max_wait
                while (
                    len(self._queue) < self.max_batch
                    and loop.time() < deadline
                    and not self._closing  # shutting down: write what is queued now
                ):
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), deadline - loop.time())
                    except TimeoutError:
                        break
            batch: list[_Item] = []
            while self._queue and len(batch) < self.max_batch:
                batch.append(self._queue.popleft())
                if batch[-1].validated.kind == "key":
                    break  # later items are re-checked against the trust state it makes
            QUEUE_DEPTH.set(len(self._queue))
            t0 = time.perf_counter()
            try:
                results = await loop.run_in_executor(None, self._write, batch)
            except Exception as e:
                log.error("batch of %d failed: %s", len(batch), e)
                APPENDS.labels("error").inc(len(batch))
                for it in batch:
                    it.ticket.settle(it.pos, e)
                continue
            self._last_batch_s = time.perf_counter() - t0
            COMMIT_SECONDS.observe(self._last_batch_s)
            BATCH_SIZE.observe(len(batch))
            done = time.perf_counter()
            counts = {"ok": 0, "duplicate": 0, "refused": 0}
            for it, r in zip(batch, results, strict=True):
                if isinstance(r, KolmError):
                    counts["refused"] += 1
                else:
                    counts["duplicate" if r[0].duplicate else "ok"] += 1
                    APPEND_SECONDS.observe(done - it.t0)
                it.ticket.settle(it.pos, r)
            for result, n in counts.items():  # once per batch, not per entry
                if n:
                    APPENDS.labels(result).inc(n)

    def _write(
        self, batch: list[_Item]
    ) -> list[tuple[Appended, Promise, SignedCheckpoint | None] | KolmError]:
        """Write the batch; the ledger re-checks each key under the lock (see append_validated)."""
        results, checkpoint = self.ledger.append_validated(
            [it.validated for it in batch], skip_refused=True
        )
        origin = self.ledger.origin
        out: list[tuple[Appended, Promise, SignedCheckpoint | None] | KolmError] = []
        for a in results:
            if isinstance(a, KolmError):
                out.append(a)
                continue
            us = micros(a.integrated_at)
            sig = self._key.sign(promise_message(origin, a.index, a.leaf_hash, us))
            out.append(
                (a, Promise(origin, a.index, a.leaf_hash, us, self._key_id, sig), checkpoint)
            )
        return out
