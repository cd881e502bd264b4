"""Revocation reaches what is loaded: the inference service follows the ledger's key receipts.

:class:`KeyFollower` polls the ledger for ``key`` receipts every ``interval_s`` seconds
(``kolm infer serve --key-poll-seconds``, default :data:`DEFAULT_KEY_POLL_S`): one
``FindEntries(kind="key", after_index=<last seen>)`` round trip, folded into the trust
state with :func:`kolm_ledger.verify.trust.fold_key_receipts` (the ledger's own fold). After
each poll:

- every loaded artifact whose compile key is no longer valid (revoked, or rotated away,
  or expired) stops being served: it is unloaded, and a ``Predict`` naming it (by name
  or digest) answers ``FAILED_PRECONDITION`` naming the artifact and the key;
- if the service's own ``infer`` key is revoked or expired, the receipt writer fails
  closed (:meth:`kolm_infer.receipts.ReceiptWriter.refuse_key`), as it does when the
  ledger refuses that key's receipts.

Every key receipt is *proven* before it is folded
(:func:`kolm_ledger.verify.trust.prove_entries`): its envelope and its integration time must be
what the log's signed checkpoint holds at its index. A ledger that serves a key receipt
that is not — a revocation's time moved to 2100 in the database, a forged or swapped
entry — would otherwise un-revoke a key. Such a proof failure fails closed: the service
stops serving (every ``Predict`` answers ``FAILED_PRECONDITION`` naming the entry, health
goes ``NOT_SERVING``, one ``ERROR`` log line) until the ledger is repaired and the service
restarted. A ledger that cannot be reached is not a proof failure: the poll is retried.

So a revocation integrated by the ledger reaches a running service within one poll
interval plus one round trip, while the ledger is reachable. While it is not, the last
known state stands (with ``--receipt-ack ledger`` nothing is answered then anyway); the
gauge ``kolm_infer_key_poll_time_seconds`` says when the last poll succeeded.

Example::

    follower = KeyFollower(engine, LedgerClient("127.0.0.1:7070"), trust, writer=writer,
                           infer_key_id=key.keyid(), interval_s=5)
    follower.start()            # on the service's event loop
    follower.check("router")    # raises ArtifactError once its compile key is revoked
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime

from prometheus_client import Counter, Gauge

from kolm_ledger.errors import (
    ArtifactError,
    FormatError,
    InvalidInput,
    KeyValidityError,
    KolmError,
    VerificationError,
)
from kolm_ledger.keys import TrustRoot
from kolm_ledger.service.client import LedgerClient
from kolm_ledger.verify.trust import (
    TrustState,
    fold_key_receipts,
    key_receipt_entries,
    prove_entries,
)

from .engine import Engine, LoadedArtifact
from .receipts import ReceiptWriter

__all__ = ["DEFAULT_KEY_POLL_S", "KeyFollower"]

log = logging.getLogger("kolm.infer.keys")

#: Seconds between two polls of the ledger's key receipts.
DEFAULT_KEY_POLL_S = 5.0

STOPPED = Counter(
    "kolm_infer_artifacts_stopped_total",
    "Loaded artifacts no longer served because their compile key was revoked or expired",
)
UNPROVEN = Counter(
    "kolm_infer_key_receipts_unproven_total",
    "Polls whose key receipts did not prove against the ledger's signed checkpoint "
    "(the service then fails closed)",
)
POLLED = Gauge(
    "kolm_infer_key_poll_time_seconds", "When the key receipts were last read from the ledger"
)


class KeyFollower:
    """Follows the ledger's key receipts; stops serving what a revocation reaches."""

    def __init__(
        self,
        engine: Engine,
        client: LedgerClient,
        trust: TrustRoot,
        *,
        writer: ReceiptWriter | None = None,
        infer_key_id: str | None = None,
        interval_s: float = DEFAULT_KEY_POLL_S,
        clock: Callable[[], datetime] | None = None,
        on_untrusted: Callable[[str], None] | None = None,
    ) -> None:
        """``on_untrusted(why)`` is called (once, from the polling thread) when the key
        receipts the ledger serves do not prove: the service sets health ``NOT_SERVING``."""
        if not interval_s > 0:
            raise InvalidInput(f"key poll interval {interval_s!r} s, want a number above 0")
        self.engine = engine
        self.client = client
        self.writer = writer
        self.infer_key_id = infer_key_id
        self.interval_s = float(interval_s)
        self._clock = clock or (lambda: datetime.now(UTC))
        self.trust = trust
        self.state = TrustState(trust)
        self.on_untrusted = on_untrusted
        self.untrusted: str | None = None  # why nothing is served any more (fail closed)
        self.seen = -1  # the index of the last key receipt folded
        self.polls = 0  # successful polls (for tests and metrics)
        self._lock = threading.Lock()  # one poll at a time
        self._stopped: dict[str, str] = {}  # artifact name or digest -> why it is not served
        self._task: asyncio.Task[None] | None = None

    # ---------------------------------------------------------------- the poll

    def refresh(self) -> list[LoadedArtifact]:
        """Read the key receipts after the last one seen, fold them, and judge what is
        loaded (blocking: run it on a worker thread). Returns the artifacts to stop;
        raises :class:`~kolm_ledger.errors.KolmError` if the ledger cannot be read."""
        with self._lock:
            if self.untrusted is not None:
                return []  # failed closed: nothing more to fold until a restart
            entries = list(key_receipt_entries(self.client, after_index=self.seen))
            if entries:
                try:  # envelope and integration time, against the signed checkpoint
                    prove_entries(entries, self.client, self.trust)
                except (VerificationError, FormatError) as e:
                    self._fail_closed(e)
                    return []
                self.state = fold_key_receipts(self.state, entries)
                self.seen = entries[-1].index
            self.polls += 1
            POLLED.set_to_current_time()
            now = self._clock()
            stop: list[LoadedArtifact] = []
            for art in self.engine.list():
                why = self._why_not(art, now)
                if why is not None and art.digest not in self._stopped:
                    log.error("%s", why)
                    self._stopped[art.digest] = self._stopped[art.name] = why
                    stop.append(art)
            if self.infer_key_id is not None and self.writer is not None:
                try:
                    self.state.authorize(self.infer_key_id, "prediction", now)
                except KeyValidityError as e:
                    self.writer.refuse_key(str(e))
                except KolmError:
                    pass  # unknown here: the ledger's own answer decides (writer)
            return stop

    def _fail_closed(self, err: KolmError) -> None:
        self.untrusted = (
            "this service stopped serving: the ledger's key receipts do not prove against "
            f"its signed checkpoint ({str(err)[:300]}); a revocation could be hidden, so "
            "nothing is answered until the ledger is repaired and the service restarted"
        )
        UNPROVEN.inc()
        log.error("%s", self.untrusted)
        if self.on_untrusted is not None:
            self.on_untrusted(self.untrusted)

    def _why_not(self, art: LoadedArtifact, now: datetime) -> str | None:
        """Why ``art`` may not be served any more, or ``None``."""
        try:
            self.state.authorize(art.signer_keyid, "artifact", now)
        except KeyValidityError as e:
            return (
                f"artifact {art.name!r} ({art.digest[:16]}…) is no longer served: its "
                f"compile key {art.signer_keyid[:16]} is not valid any more ({e})"
            )
        except KolmError:
            return None  # not in the state the ledger gave: the load already judged it
        return None

    async def poll_once(self) -> int:
        """One poll on a worker thread, then unload what it stopped; returns how many."""
        stop = await asyncio.to_thread(self.refresh)
        for art in stop:
            STOPPED.inc()
            with contextlib.suppress(KolmError):
                await self.engine.unload(art.digest)
        return len(stop)

    async def _run(self) -> None:
        while True:
            try:
                await self.poll_once()
            except KolmError as e:
                log.warning("reading key receipts from the ledger failed (will retry): %s", e)
            except Exception:  # keep following; a bug here must not stop the service
                log.exception("key follower poll failed")
            await asyncio.sleep(self.interval_s)

    def start(self) -> None:
        """Start polling on the running event loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="kolm-key-follower"
            )

    async def close(self) -> None:
        """Stop polling."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    # ---------------------------------------------------------------- the servicer's checks

    def check(self, ref: str) -> None:
        """Raise :class:`~kolm_ledger.errors.ArtifactError` (``FAILED_PRECONDITION``) if the
        artifact named (or with the digest) ``ref`` was stopped by a revocation, or for any
        ``ref`` once the key receipts failed to prove (fail closed)."""
        if self.untrusted is not None:
            raise ArtifactError(self.untrusted)
        why = self._stopped.get(ref)
        if why is not None:
            raise ArtifactError(why)

    def forget(self, art: LoadedArtifact) -> None:
        """A load of ``art`` passed every check: its name is served again."""
        with self._lock:
            if self._stopped.get(art.name) is not None and art.digest not in self._stopped:
                del self._stopped[art.name]
