"""Prediction receipts: build and sign them, send them to the ledger in batches, spool them.

- :func:`sign_prediction` builds the ``prediction`` statement of one answer (input
  commitment ``SHA-256(salt || JCS(input))`` with a fresh 32-byte salt that only the
  caller gets back) and signs it with the ``infer`` key.
- :class:`ReceiptWriter` sends envelopes to the ledger over one persistent
  ``AppendStream`` in batches (every receipt queued while batches are in flight goes in
  the next one, up to ``max_inflight`` batches at once) and resolves each submitter's
  future with the ledger's acknowledgement: the signed promise, or with ``wait`` the
  offline bundle (``ack="ledger"``, the default: fail closed).
- :class:`Spool` is the optional durable local queue (SQLite, WAL,
  ``synchronous=FULL``): when the ledger is unreachable a receipt is committed to the
  spool *before* the answer goes out, and replayed in order once the ledger is back.
  While the spool holds anything, new receipts go behind it, so the ledger sees them
  in the order they were made. With ``ack="spool"`` (opt-in) every receipt goes to the
  spool first and the answer waits only for that local commit; a replayer ships the
  spool to the ledger right after each write (durable locally, not yet in the ledger).
  A spooled receipt the ledger refuses is never deleted: it moves to the spool's
  ``quarantine`` table with the ledger's status and message
  (``kolm_infer_receipts_total{outcome="quarantined"}``, gauge
  ``kolm_infer_spool_quarantine``).
- Fail closed on the service's own key: once the ledger refuses a receipt *for its key*
  (``PERMISSION_DENIED`` or ``FAILED_PRECONDITION`` naming the ``infer`` key id: revoked,
  expired, unknown), or the key follower sees that key revoked, the writer refuses every
  later submission with :class:`KeyRefused` (``FAILED_PRECONDITION``): no answer goes
  out whose receipt the ledger would refuse.

Example::

    writer = ReceiptWriter(AsyncLedgerClient("127.0.0.1:7070"), spool=Spool("spool.db"))
    await writer.start()
    env, salt, commitment = sign_prediction(infer_key, artifact_digest=d, input_value="hi",
                                            output="card_arrival", ...)
    ack = await writer.submit(env)      # ack.promise, or ack.spooled
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Gauge

from kolm_ledger._crypto import PrivateKey
from kolm_ledger.errors import InvalidInput, KolmError, StorageError, UnavailableError
from kolm_ledger.formats.bundle import Bundle
from kolm_ledger.formats.canonical import digest_hex
from kolm_ledger.formats.dsse import Envelope
from kolm_ledger.formats.leaf import statement_digest
from kolm_ledger.formats.promise import Promise
from kolm_ledger.formats.receipts import prediction_statement, sign_statement
from kolm_ledger.service.client import AppendResult, AsyncLedgerClient
from kolm_ledger.verify.receipt import SALT_BYTES, input_commitment

__all__ = [
    "ACK_MODES",
    "MAX_REQUEST_ID_CHARS",
    "OUTPUT_POLICIES",
    "Ack",
    "KeyRefused",
    "Quarantined",
    "ReceiptWriter",
    "Spool",
    "check_ack",
    "check_request_id",
    "sign_prediction",
]

log = logging.getLogger("kolm.infer.receipts")

#: ``full``: the receipt carries the output; ``digest``: only its digest (the subject).
OUTPUT_POLICIES = ("full", "digest")
#: When an answer may go out: ``ledger`` (the ledger acknowledged its receipt: fail
#: closed) or ``spool`` (its receipt is committed to the local spool; opt-in).
ACK_MODES = ("ledger", "spool")
#: Longest ``request_id`` a prediction receipt may carry (the ledger caps an entry at 64 KiB).
MAX_REQUEST_ID_CHARS = 256


class KeyRefused(KolmError):
    """The ledger refuses this service's ``infer`` key: the service fails closed."""

    grpc_code = "FAILED_PRECONDITION"


def check_request_id(request_id: str) -> None:
    """Raise :class:`InvalidInput` naming ``request_id`` unless it is at most
    :data:`MAX_REQUEST_ID_CHARS` characters."""
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidInput(
            f"request_id has {len(request_id)} characters, limit {MAX_REQUEST_ID_CHARS}"
        )


def check_ack(ack: str, has_spool: bool) -> None:
    """Raise :class:`InvalidInput` unless ``ack`` is a known mode that this set-up can give."""
    if ack not in ACK_MODES:
        raise InvalidInput(f"receipt ack {ack!r}, want one of {ACK_MODES}")
    if ack == "spool" and not has_spool:
        raise InvalidInput("receipt ack 'spool' needs a spool (--spool FILE)")


RECEIPTS = Counter("kolm_infer_receipts_total", "Prediction receipts by outcome", ["outcome"])
SPOOL_DEPTH = Gauge("kolm_infer_spool_depth", "Receipts waiting in the local spool")
QUARANTINE = Gauge(
    "kolm_infer_spool_quarantine", "Spooled receipts the ledger refused, kept in quarantine"
)


def sign_prediction(
    key: PrivateKey,
    *,
    artifact_digest: str,
    input_value: Any,
    output: Any,
    verdict: Mapping[str, Any],
    backend: str,
    reason: str,
    confidence: float | None,
    latency_ms: float,
    request_id: str,
    output_policy: str = "full",
    extra: Mapping[str, Any] | None = None,
    salt: bytes | None = None,
    time: datetime | None = None,
    evidence: Sequence[Mapping[str, Any]] | None = None,
    corpus_root: str | None = None,
) -> tuple[Envelope, bytes, str]:
    """Sign one prediction receipt; returns ``(envelope, salt, input_commitment)``.

    The salt is fresh (``os.urandom(32)``) unless given; hand it to the caller only.
    ``evidence``/``corpus_root``: the recall chunks cited (both or neither).
    """
    if output_policy not in OUTPUT_POLICIES:
        raise InvalidInput(f"output policy {output_policy!r}, want one of {OUTPUT_POLICIES}")
    check_request_id(request_id)
    salt = os.urandom(SALT_BYTES) if salt is None else salt
    commitment = input_commitment(input_value, salt)
    st = prediction_statement(
        output_digest=digest_hex(output),
        artifact_digest=artifact_digest,
        input_commitment=commitment,
        output=output if output_policy == "full" else None,
        verifier_verdict=verdict,
        backend=backend,
        confidence=confidence,
        latency_ms=round(latency_ms, 3),
        request_id=request_id,
        evidence=evidence,
        corpus_root=corpus_root,
        extra={"reason": reason, **(extra or {})},
        time=time,
    )
    return sign_statement(st, key), salt, commitment


@dataclass(frozen=True)
class Ack:
    """How a receipt was made durable: a ledger promise (and bundle), or the local spool."""

    leaf_hash: bytes  # the ledger's leaf hash; for a receipt only spooled, its statement digest
    promise: Promise | None = None
    bundle: Bundle | None = None
    spooled: bool = False


# --------------------------------------------------------------------------- spool


@dataclass(frozen=True)
class Quarantined:
    """A spooled receipt the ledger refused, kept with the ledger's reason."""

    seq: int
    leaf_hash: bytes
    envelope: bytes
    spooled_at: float
    quarantined_at: float
    code: str  # the ledger's gRPC status, e.g. FAILED_PRECONDITION
    reason: str


class Spool:
    """A durable FIFO of envelopes (SQLite, WAL, ``synchronous=FULL``); thread-safe.

    ``put`` returns only after its commit is on disk. ``remove_through`` (entries the
    ledger has acknowledged) commits without waiting for the disk: if a crash loses
    that deletion, the entries are replayed once more, which the ledger answers as
    idempotent duplicates. Entries the ledger refused move, in the same transaction, to
    the ``quarantine`` table with the ledger's status and message; nothing there is
    ever deleted by kolm (``SELECT * FROM quarantine`` to inspect them).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            self._db = sqlite3.connect(
                str(self.path), check_same_thread=False, isolation_level=None
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS spool ("
                " seq INTEGER PRIMARY KEY AUTOINCREMENT,"
                " leaf_hash BLOB NOT NULL,"
                " envelope BLOB NOT NULL,"
                " spooled_at REAL NOT NULL)"
            )
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS quarantine ("
                " seq INTEGER PRIMARY KEY,"
                " leaf_hash BLOB NOT NULL,"
                " envelope BLOB NOT NULL,"
                " spooled_at REAL NOT NULL,"
                " quarantined_at REAL NOT NULL,"
                " code TEXT NOT NULL,"
                " reason TEXT NOT NULL)"
            )
            self._depth = int(self._db.execute("SELECT count(*) FROM spool").fetchone()[0])
            self._held = int(self._db.execute("SELECT count(*) FROM quarantine").fetchone()[0])
        except sqlite3.Error as e:
            raise StorageError(f"cannot open spool {self.path}: {e}") from e
        self._lock = threading.Lock()
        SPOOL_DEPTH.set(self._depth)
        QUARANTINE.set(self._held)

    def put(self, envelopes: Sequence[bytes], leaf_hashes: Sequence[bytes]) -> None:
        """Append envelopes in order, durably (returns after the commit is on disk)."""
        now = time.time()
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.executemany(
                    "INSERT INTO spool (leaf_hash, envelope, spooled_at) VALUES (?, ?, ?)",
                    [(h, e, now) for e, h in zip(envelopes, leaf_hashes, strict=True)],
                )
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                self._db.execute("ROLLBACK") if self._db.in_transaction else None
                raise StorageError(f"spool {self.path}: write failed: {e}") from e
            self._depth += len(envelopes)
            SPOOL_DEPTH.set(self._depth)

    def head(self, n: int) -> list[tuple[int, bytes]]:
        """The oldest ``n`` entries as ``(seq, envelope)``."""
        with self._lock:
            return list(
                self._db.execute("SELECT seq, envelope FROM spool ORDER BY seq LIMIT ?", (n,))
            )

    def remove_through(self, seq: int, refused: Sequence[tuple[int, str, str]] = ()) -> None:
        """Forget every entry up to and including ``seq``: they are in the ledger, except
        ``refused`` ``(seq, code, reason)``, which move to the quarantine table instead
        (one transaction)."""
        now = time.time()
        with self._lock:
            try:
                # no fsync: losing this in a crash only means a replay that the ledger
                # answers as duplicates (or refuses again); the next put's fsync covers it
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._db.execute("BEGIN IMMEDIATE")
                held = 0
                for q, code, reason in refused:
                    cur = self._db.execute(
                        "INSERT OR IGNORE INTO quarantine (seq, leaf_hash, envelope, spooled_at,"
                        " quarantined_at, code, reason) SELECT seq, leaf_hash, envelope,"
                        " spooled_at, ?, ?, ? FROM spool WHERE seq = ?",
                        (now, code, reason, q),
                    )
                    held += max(cur.rowcount, 0)
                cur = self._db.execute("DELETE FROM spool WHERE seq <= ?", (seq,))
                self._db.execute("COMMIT")
                self._depth = max(0, self._depth - max(cur.rowcount, 0))
                self._held += held
            except sqlite3.Error as e:
                self._db.execute("ROLLBACK") if self._db.in_transaction else None
                raise StorageError(f"spool {self.path}: delete failed: {e}") from e
            finally:
                self._db.execute("PRAGMA synchronous=FULL")
            SPOOL_DEPTH.set(self._depth)
            QUARANTINE.set(self._held)

    def quarantined(self) -> list[Quarantined]:
        """The receipts the ledger refused, oldest first."""
        with self._lock:
            rows = list(
                self._db.execute(
                    "SELECT seq, leaf_hash, envelope, spooled_at, quarantined_at, code, reason"
                    " FROM quarantine ORDER BY seq"
                )
            )
        return [Quarantined(*r) for r in rows]

    def quarantine_depth(self) -> int:
        """Receipts held in quarantine."""
        with self._lock:
            return self._held

    def depth(self) -> int:
        """Entries waiting."""
        with self._lock:
            return self._depth

    def leaf_hashes(self) -> list[bytes]:
        """Leaf hashes of the waiting entries, oldest first."""
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT leaf_hash FROM spool ORDER BY seq")]

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()


# --------------------------------------------------------------------------- writer


@dataclass
class _Item:
    envelope: bytes
    leaf_hash: bytes
    wait: bool
    future: asyncio.Future[Ack]


class ReceiptWriter:
    """Sends receipts to the ledger in batches; fails closed unless a spool is configured.

    ``ack`` says when ``submit`` returns, that is, what the answer waits for:

    - ``"ledger"`` (default, fail closed): once the ledger acknowledged the receipt (the
      :class:`Ack` carries its signed promise, or with ``wait`` the offline bundle).
      With a spool and the ledger unreachable, once the receipt is committed to the
      spool instead (``Ack.spooled``); without a spool an unreachable ledger raises
      :class:`UnavailableError` to the submitter.
    - ``"spool"`` (opt-in; needs a spool): once the receipt is durable in the *local*
      spool (``Ack.spooled``, no promise). A background replayer ships the spool to the
      ledger in order soon after each write (within ``replay_linger_ms``, which lets
      receipts gather into fewer, larger appends). A weaker promise: the receipt is on
      this machine's disk, not yet in the ledger, until it is replayed. ``wait``
      submissions still go to the ledger (the caller asked for the bundle).

    Batches go over the client's persistent ``AppendStream``
    (:meth:`~kolm_ledger.service.client.AsyncLedgerClient.append_pipelined`): everything queued
    while batches are in flight goes in the next one, up to ``max_inflight`` at once.
    ``wait`` batches (the bundle takes longer to build) use a short call of their own so
    they never hold up the acknowledgements queued behind them on the stream
    (``persistent_stream=False``: every batch does, as before; for comparison).

    ``key_id``: the service's ``infer`` key. Once the ledger refuses a receipt for that
    key (or :meth:`refuse_key` is called), every later :meth:`submit` raises
    :class:`KeyRefused` and ``on_key_refused`` is called once (fail closed). Spooled
    receipts the ledger refuses, for any reason, go to the spool's quarantine.
    """

    def __init__(
        self,
        client: AsyncLedgerClient,
        *,
        spool: Spool | None = None,
        ack: str = "ledger",
        max_batch: int = 512,
        max_inflight: int = 4,
        replay_interval_s: float = 0.5,
        replay_linger_ms: float = 100.0,
        persistent_stream: bool = True,
        key_id: str | None = None,
        on_key_refused: Callable[[KeyRefused], None] | None = None,
    ) -> None:
        if max_batch < 1 or max_inflight < 1:
            raise InvalidInput("max_batch and max_inflight must be >= 1")
        check_ack(ack, spool is not None)
        self.client = client
        self.spool = spool
        self.ack = ack
        self.max_batch = max_batch
        self.max_inflight = max_inflight
        self.replay_interval_s = replay_interval_s
        self.replay_linger_s = replay_linger_ms / 1000
        self.persistent_stream = persistent_stream
        self.key_id = key_id
        self.on_key_refused = on_key_refused
        #: set once the ledger refused this service's key: every submission fails closed
        self.key_refused: KeyRefused | None = None
        self._queue: list[_Item] = []
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(max_inflight)
        self._tasks: set[asyncio.Task[None]] = set()
        self._runner: asyncio.Task[None] | None = None
        self._replayer: asyncio.Task[None] | None = None
        self._replay_wake = asyncio.Event()
        self._spool_q: list[tuple[list[bytes], list[bytes], list[asyncio.Future[Ack]]]] = []
        self._spool_writer: asyncio.Task[None] | None = None
        self._spool_inflight = 0  # receipts handed to the spool writer, not yet committed
        self._spool_pending = False
        self._ledger_down = False
        self._closing = False
        self.batches: list[int] = []  # sizes of the batches sent (for tests and metrics)
        self.spool_writes: list[int] = []  # sizes of the spool commits (for tests and metrics)

    async def start(self) -> None:
        """Start the batching task (and the spool replayer) on the running loop."""
        loop = asyncio.get_running_loop()
        self._runner = loop.create_task(self._run(), name="kolm-receipt-writer")
        if self.spool is not None:
            self._spool_pending = await asyncio.to_thread(self.spool.depth) > 0
            self._replayer = loop.create_task(self._replay_loop(), name="kolm-spool-replay")

    def refuse_key(self, why: str) -> KeyRefused:
        """Fail closed from now on: the ledger refuses (or will refuse) this service's key.

        Returns the error every later :meth:`submit` raises. Idempotent: the first reason
        is kept."""
        if self.key_refused is None:
            kid = (self.key_id or "?")[:16]
            self.key_refused = KeyRefused(
                f"the ledger refuses this service's infer key {kid} ({why[:300]}); failing "
                "closed: no more answers until the key is replaced and the service restarted"
            )
            log.error("%s", self.key_refused)
            if self.on_key_refused is not None:
                self.on_key_refused(self.key_refused)
        return self.key_refused

    def check_serving(self) -> None:
        """Raise :class:`KeyRefused` when the writer fails closed (see :meth:`refuse_key`)."""
        if self.key_refused is not None:
            raise KeyRefused(str(self.key_refused))

    def _own_key_refusal(self, err: KolmError) -> bool:
        """Whether the ledger refused a receipt because of this service's key."""
        return (
            self.key_id is not None
            and getattr(err, "grpc_code", "") in ("PERMISSION_DENIED", "FAILED_PRECONDITION")
            and f"key {self.key_id[:16]}" in str(err)
        )

    async def submit(self, envelope: Envelope, *, wait: bool = False) -> Ack:
        """Queue one envelope; returns once it is durable (see ``ack``)."""
        if self._closing:
            raise UnavailableError("the inference service is shutting down")
        self.check_serving()
        data = envelope.to_bytes()
        # the spool keys a receipt by its statement digest (kolm_ledger.formats.leaf): its leaf hash
        # binds the integration time, so only the ledger's answer carries it
        leaf = statement_digest(envelope)
        if not wait and (self.ack == "spool" or self._spool_pending):
            # spool-first, or keep ledger order = creation order: go behind the spool
            return await self._to_spool([data], [leaf])[0]
        fut: asyncio.Future[Ack] = asyncio.get_running_loop().create_future()
        self._queue.append(_Item(data, leaf, wait, fut))
        self._wake.set()
        return await fut

    def _to_spool(self, envs: list[bytes], leaves: list[bytes]) -> list[asyncio.Future[Ack]]:
        """Queue envelopes for the spool; one writer commits them in order, in groups."""
        assert self.spool is not None
        loop = asyncio.get_running_loop()
        futs: list[asyncio.Future[Ack]] = [loop.create_future() for _ in envs]
        self._spool_pending = True
        self._spool_inflight += len(envs)
        self._spool_q.append((envs, leaves, futs))
        if self._spool_writer is None or self._spool_writer.done():
            t = loop.create_task(self._write_spool(), name="kolm-spool-writer")
            self._spool_writer = t
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)
        return futs

    async def _write_spool(self) -> None:
        assert self.spool is not None
        while self._spool_q:
            # group commit: everything queued while the previous commit ran
            group, self._spool_q = self._spool_q, []
            envs = [e for g in group for e in g[0]]
            leaves = [h for g in group for h in g[1]]
            futs = [f for g in group for f in g[2]]
            try:
                await asyncio.to_thread(self.spool.put, envs, leaves)
            except Exception as e:
                if not isinstance(e, KolmError):
                    e = StorageError(f"spool {self.spool.path}: write failed: {e}")
                RECEIPTS.labels("failed").inc(len(envs))
                for f in futs:
                    if not f.done():
                        f.set_exception(e)
                continue
            finally:
                self._spool_inflight -= len(envs)
            self.spool_writes.append(len(envs))
            RECEIPTS.labels("spooled").inc(len(envs))
            for f, h in zip(futs, leaves, strict=True):
                if not f.done():
                    f.set_result(Ack(h, spooled=True))
            if self.ack == "spool":
                self._replay_wake.set()  # ship it now, not at the next poll

    async def _run(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            await self._slots.acquire()
            # take what is queued now, one wait-flag at a time
            flag = self._queue[0].wait
            if all(it.wait == flag for it in self._queue):
                batch = self._queue[: self.max_batch]
                self._queue = self._queue[self.max_batch :]
            else:
                batch = [it for it in self._queue if it.wait == flag][: self.max_batch]
                taken = {id(it) for it in batch}
                self._queue = [it for it in self._queue if id(it) not in taken]
            t = asyncio.get_running_loop().create_task(self._send(batch, flag))
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    async def _append(
        self, envs: list[bytes], *, wait: bool = False
    ) -> Sequence[AppendResult | KolmError]:
        if wait or not self.persistent_stream:
            # a bundle takes longer: its own call, not ahead of others' acks on the stream
            return await self.client.append_batch(envs, wait=wait)
        return await self.client.append_pipelined(envs)

    async def _send(self, batch: list[_Item], wait: bool) -> None:
        try:
            self.batches.append(len(batch))
            results: Sequence[AppendResult | KolmError]
            envs = [it.envelope for it in batch]
            try:
                results = await self._append(envs, wait=wait)
            except KolmError as e:
                results = [e] * len(batch)
            to_spool: list[_Item] = []
            acked = 0
            for it, r in zip(batch, results, strict=False):
                if isinstance(r, AppendResult):
                    acked += 1
                    it.future.set_result(Ack(r.leaf_hash, r.promise, r.bundle))
                elif isinstance(r, UnavailableError) and self.spool is not None and not wait:
                    to_spool.append(it)
                else:
                    RECEIPTS.labels("failed").inc()
                    err = r if isinstance(r, KolmError) else KolmError(str(r))
                    if isinstance(r, UnavailableError):
                        err = UnavailableError(f"the ledger is unreachable; fail closed: {r}")
                    elif self._own_key_refusal(err):
                        self.refuse_key(str(err))
                    it.future.set_exception(err)
            if acked:
                RECEIPTS.labels("acked").inc(acked)
            for it in batch[len(results) :]:
                it.future.set_exception(UnavailableError("the ledger sent no result"))
            if to_spool:
                log.warning("ledger unreachable: spooling %d receipts", len(to_spool))
                futs = self._to_spool(
                    [it.envelope for it in to_spool], [it.leaf_hash for it in to_spool]
                )
                for it, f in zip(to_spool, futs, strict=True):
                    _chain(f, it.future)
        finally:
            self._slots.release()

    async def _replay_loop(self) -> None:
        while True:
            self._replay_wake.clear()
            try:
                await self.replay_once()
            except Exception as e:  # keep replaying; the next round retries
                log.warning("spool replay failed: %s", e)
                self._ledger_down = True
            if self._closing:
                return
            if self._ledger_down:
                await asyncio.sleep(self.replay_interval_s)  # back off: no wake-ups
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._replay_wake.wait(), self.replay_interval_s)
            if self._replay_wake.is_set() and self.replay_linger_s > 0 and not self._closing:
                # spool-first: let receipts gather for a moment, so the ledger takes
                # fewer, larger appends (less CPU taken from the model per receipt)
                await asyncio.sleep(self.replay_linger_s)

    async def replay_once(self) -> int:
        """Send the spool to the ledger in order until it is empty or the ledger fails.

        Returns how many entries were confirmed. An entry the ledger refuses (not for
        unavailability) moves to the spool's quarantine table with the ledger's status
        and message, so one bad receipt cannot block the rest and none is lost; a refusal
        of this service's key also makes the writer fail closed (:meth:`refuse_key`).
        """
        assert self.spool is not None
        done = 0
        while True:
            rows = await asyncio.to_thread(self.spool.head, self.max_batch)
            if not rows:
                self._ledger_down = False
                if self._spool_inflight == 0:
                    self._spool_pending = False
                return done
            try:
                results = await self._append([e for _, e in rows])
            except UnavailableError:
                self._ledger_down = True
                return done
            last = None
            refused: list[tuple[int, str, str]] = []
            for (seq, _), r in zip(rows, results, strict=False):
                if isinstance(r, UnavailableError):
                    break
                if isinstance(r, KolmError):
                    code = str(getattr(r, "grpc_code", "UNKNOWN"))
                    log.error("ledger refused spooled receipt %d (quarantined): %s", seq, r)
                    refused.append((seq, code, str(r)[:2000]))
                    if self._own_key_refusal(r):
                        self.refuse_key(str(r))
                last = seq
            if last is None:
                self._ledger_down = True
                return done
            self._ledger_down = False
            await asyncio.to_thread(self.spool.remove_through, last, refused)
            if refused:
                RECEIPTS.labels("quarantined").inc(len(refused))
            n = sum(1 for seq, _ in rows if seq <= last) - len(refused)
            RECEIPTS.labels("replayed").inc(n)
            done += n
            if self.spool.depth() == 0 and self._spool_inflight == 0:
                # nothing spooled since: new receipts may go straight to the ledger again
                self._spool_pending = False
                return done

    async def close(self, flush_timeout_s: float = 5.0) -> None:
        """Finish queued receipts, try once more to ship the spool (at most
        ``flush_timeout_s``), stop the tasks; the spool keeps what is not replayed."""
        self._closing = True
        self._wake.set()
        if self._runner is not None:
            await self._runner
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        if self._replayer is not None:
            self._replay_wake.set()
            try:
                await asyncio.wait_for(asyncio.shield(self._replayer), flush_timeout_s)
            except TimeoutError:
                self._replayer.cancel()
            await asyncio.gather(self._replayer, return_exceptions=True)


def _chain(src: asyncio.Future[Ack], dst: asyncio.Future[Ack]) -> None:
    def done(f: asyncio.Future[Ack]) -> None:
        if dst.done():
            return
        if f.exception() is not None:
            dst.set_exception(f.exception())  # type: ignore[arg-type]
        else:
            dst.set_result(f.result())

    src.add_done_callback(done)
