"""The transport-free ledger core: validate, sequence, chain, tree, checkpoint.

Appending an envelope:

1. checks its size (canonical JSON <= 64 KiB) before any hashing;
2. parses it (DSSE, in-toto statement, kolm predicate type, the receipt's RFC 3339
   ``time``: :mod:`kolm_ledger.timefmt`);
3. finds its signing key in the trust state (trust root + key receipts in the log);
4. verifies the DSSE signature;
5. checks the key's role may sign that kind, the key is valid now, and the receipt's
   ``time`` is not before the key's ``not_before`` nor later than now plus
   ``max_time_skew`` (5 minutes by default);
6. sequences it under the storage lock: an envelope whose statement (payload and key id,
   :func:`kolm_ledger.formats.leaf.statement_digest`) is already in the log answers with that
   entry (``duplicate``), whatever its signature bytes; otherwise it is integrated at
   ``max(clock, previous entry's time + 1 µs)`` — integration times never go back, even
   when the clock does — its key and time are checked again at that integration time,
   its leaf ``SHA-256(0x00 || JCS({"envelope", "integrated_time"}))``
   (:mod:`kolm_ledger.formats.leaf`) extends the hash chain and the Merkle tree, and one
   checkpoint is signed per batch (never one inconsistent with the last);
7. with ``witnesses`` configured, once the batch (entries and log-signed checkpoint)
   has committed, offers the newest committed checkpoint to each witness
   (:mod:`kolm_ledger.formats.witness`) and appends the cosignatures that come back to
   ``checkpoint_cosignatures``; readers serve the checkpoint with them. A witness
   therefore only ever sees checkpoints the log committed. Under
   ``witness_policy="required"`` the append returns only once every witness cosigned
   (otherwise :class:`UnavailableError`: the entries stay committed, and a retry is a
   duplicate that waits for the cosignatures again); under ``"best-effort"`` the
   checkpoint is served with the cosignatures that came back. Opening a ledger
   re-offers its newest checkpoint (a crash may have come between commit and cosigning).

Checks (1)-(5) run in :mod:`kolm_ledger.log.validate`, step 6 in
:mod:`kolm_ledger.log.integrate`, step 7 in :mod:`kolm_ledger.log.witnessing`;
:class:`Ledger` is the facade that holds the trust state and the clock and runs them.

Example::

    >>> import tempfile, pathlib
    >>> from kolm_ledger.keys import init_keys, PrivateKey
    >>> from kolm_ledger.storage import Store
    >>> from kolm_ledger.log.ledger import Ledger
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> trust = init_keys(d / "keys")
    >>> ledger = Ledger(Store(f"sqlite:///{d}/ledger.db"), trust, PrivateKey.load(d / "keys/log.key"))
    >>> ledger.size
    0
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

from kolm_ledger._crypto import PrivateKey
from kolm_ledger.errors import (
    ConflictError,
    KeyFormatError,
    KolmError,
    NotFoundError,
    UnknownKeyError,
)
from kolm_ledger.formats.bundle import Bundle
from kolm_ledger.formats.checkpoint import SignedCheckpoint
from kolm_ledger.formats.dsse import Envelope
from kolm_ledger.formats.leaf import statement_digest
from kolm_ledger.formats.note import NoteSigner
from kolm_ledger.keys import TrustedKey, TrustRoot
from kolm_ledger.log.integrate import (
    Appended,
    Integrated,
    Memo,
    integrate_batch,
    prove_key_receipts,
)
from kolm_ledger.log.validate import DEFAULT_VERIFY_THREADS, Passed, Validated, Validator
from kolm_ledger.log.witnessing import WitnessRound
from kolm_ledger.storage import Entry, Store
from kolm_ledger.storage.repository import LeafHashExists, SequencingTx
from kolm_ledger.timefmt import MAX_TIME_SKEW
from kolm_ledger.verify.trust import TrustState, fold_key_receipts, key_receipt_entries

log = logging.getLogger("kolm.ledger")

__all__ = ["DEFAULT_VERIFY_THREADS", "Appended", "Ledger", "Validated"]

Clock = Callable[[], datetime]


class Ledger:
    """Validates and sequences receipts into one store; signs checkpoints with the log key.

    Requires ``log_key`` to be an Ed25519 key listed in ``trust`` as a ``log`` key;
    the checkpoint origin is that key's origin. ``verify_threads`` > 1 lets
    :meth:`append` validate a large batch on that many threads, pipelined with its
    sequencing (signature verification runs with the GIL released, so on that many
    cores), and :meth:`submit_validation` validate off the caller's thread; the default is
    :data:`DEFAULT_VERIFY_THREADS` (min(2, CPUs)); 1 validates on the caller's thread.
    ``verify_processes`` > 0 (opt-in) has :meth:`append` of a large batch of envelope
    bytes parse and verify in that many worker processes instead
    (:mod:`kolm_ledger.log.verify_pool`), pipelined the same way; the trust policy checks
    and the sequencing stay on the caller's thread. :meth:`close` stops the workers.

    The class is the facade over the log's three jobs: validation
    (:class:`~kolm_ledger.log.validate.Validator`, both pools), integration
    (:func:`~kolm_ledger.log.integrate.integrate_batch`, one function per storage
    transaction) and witness rounds (:class:`~kolm_ledger.log.witnessing.WitnessRound`).
    It keeps the trust state and the clock, and hands each job the ones it judges by.
    """

    #: False: a threaded :meth:`append` validates the whole batch before sequencing it
    #: (no overlap; kept for the benchmark's side-by-side comparison)
    pipeline = True

    def __init__(
        self,
        store: Store,
        trust: TrustRoot,
        log_key: PrivateKey,
        *,
        extra_log_keys: Sequence[PrivateKey] = (),
        clock: Clock | None = None,
        witnesses: Sequence[str] = (),
        witness_policy: str = "best-effort",
        witness_timeout: float = 5.0,
        verify_threads: int = DEFAULT_VERIFY_THREADS,
        verify_processes: int = 0,
        max_time_skew: timedelta = MAX_TIME_SKEW,
    ) -> None:
        self._validator = Validator(
            max_time_skew=max_time_skew,
            verify_threads=verify_threads,
            verify_processes=verify_processes,
        )
        #: how far a receipt's own ``time`` may lie after its integration time
        self.max_time_skew = max_time_skew
        self.verify_threads = verify_threads
        self.verify_processes = verify_processes
        self._processes = self._validator.processes  # its worker processes, if any
        self._witnessing = WitnessRound(
            store, witnesses, policy=witness_policy, timeout=witness_timeout
        )
        self.witnesses = self._witnessing.witnesses
        self.witness_policy = witness_policy
        self.witness_timeout = witness_timeout
        self.store = store
        self._clock = clock or (lambda: datetime.now(UTC))
        try:
            entry = trust.get(log_key.keyid())
        except UnknownKeyError as e:
            raise KeyFormatError("the log key is not in the trust root") from e
        if entry.role != "log" or entry.origin is None:
            raise KeyFormatError(
                f"the log key has role {entry.role!r} in the trust root, want 'log'"
            )
        self.origin: str = entry.origin
        self._signers = [NoteSigner(self.origin, k) for k in (log_key, *extra_log_keys)]
        self.trust = TrustState(trust)
        self._trust_lock = threading.Lock()
        self._trust_seen = -1
        self._memo = Memo()  # what integration remembers between batches
        self._in_tx = threading.local()  # .tx: the sequencing transaction of this thread
        try:
            self.refresh_trust()
        except ConflictError as e:  # reads still work; every append is refused (again)
            log.error("%s", e)
        if self.witnesses:
            self.offer_latest_checkpoint()

    # ---- trust -------------------------------------------------------------------------

    def refresh_trust(self) -> None:
        """Fold key receipts sequenced since the last refresh (by any replica) into the trust state.

        Called under the sequencer lock by :meth:`append_validated`, it reads on that
        transaction's connection (this thread's only) instead of taking another one.
        """
        tx: SequencingTx | None = getattr(self._in_tx, "tx", None)
        with self._trust_lock:
            if tx is not None:
                found: Sequence[Entry] = tx.entries_of_kind("key", self._trust_seen)
            else:
                found = list(key_receipt_entries(self.store, after_index=self._trust_seen))
            # each key receipt's time is the one the log key signed (format v2), or nothing
            # is folded and the log is not extended: a time moved in the database (a
            # revocation pushed to 2100) must not un-revoke a key
            if found:
                store = self.store
                prove_key_receipts(
                    found,
                    tx.latest_checkpoint() if tx is not None else store.latest_checkpoint(),
                    tx.inclusion_proof
                    if tx is not None
                    else lambda i, n: store.inclusion_proof(i, n, check_size=False),
                    self.trust.root,
                    self.origin,
                )
            # the one fold (trust.fold_key_receipts): a receipt that does not apply is left
            # out (and logged), never raised, so it cannot wedge every later append
            self.trust = fold_key_receipts(self.trust, found)
            if found:
                self._trust_seen = found[-1].index

    def key(self, keyid: str) -> TrustedKey:
        """The trusted key ``keyid`` as the ledger currently sees it."""
        return self.trust.get(keyid)

    # ---- append ------------------------------------------------------------------------

    def validate(
        self, envelope: Envelope | bytes | Mapping[str, object], now: datetime | None = None
    ) -> Validated:
        """Run checks (1)-(5) of the module docstring; raises the specific error."""
        return self._validator.validate(envelope, now or self._clock(), self.trust, None)

    def append(
        self, envelopes: Sequence[Envelope | bytes | Mapping[str, object]]
    ) -> list[Appended]:
        """Validate every envelope, then sequence them as one atomic batch.

        If any envelope is invalid nothing is written and its error is raised. Appending
        an envelope already in the log returns its existing index (``duplicate=True``).

        With ``verify_threads`` > 1 and a large batch, validation is pipelined with
        sequencing: chunks are validated on the verify threads while this thread
        sequences the chunks already validated into the batch's one transaction (rows
        streamed to the database as they are made); an invalid envelope aborts that
        transaction, so the batch stays atomic and the first invalid one in order is
        still the error raised.
        """
        now = self._clock()
        trust = self.trust
        validator = self._validator
        processes = validator.pipelines(envelopes)
        if processes is None:
            passed: Passed = {}
            items = [validator.validate(e, now, trust, passed) for e in envelopes]
            results, _ = self.append_validated(items)
        else:
            with validator.pipelined(envelopes, now, trust, processes=processes) as (it, every):
                # duplicates lately: the look-up needs every leaf hash first
                whole = self._memo.look_up or not self.pipeline
                results, _ = self._append_items(every() if whole else it, every, False)
        return [r for r in results if isinstance(r, Appended)]

    def submit_validation(
        self, envelopes: Sequence[Envelope | bytes | Mapping[str, object]]
    ) -> list[Future[list[Validated | KolmError]]]:
        """:meth:`validate` each envelope on the verify threads, in contiguous chunks.

        Returns one future per chunk, in order; each gives, per envelope, its
        :class:`Validated` or the :class:`KolmError` it was refused with (other
        exceptions propagate). Used by the service to validate off its event loop.
        With ``verify_processes`` and envelope bytes, the chunks are parsed and verified
        in the worker processes instead, and finished (checks 3 and 5) as they come back.
        """
        return self._validator.submit(envelopes, self._clock(), self.trust)

    def start_workers(self) -> None:
        """Start the ``verify_processes`` workers now rather than on first use (no-op without)."""
        self._validator.start_workers()

    def close(self) -> None:
        """Stop the verify and witness threads and the worker processes (the store stays
        open)."""
        self._validator.close()
        self._witnessing.close()

    @property
    def _witness_pool(self) -> ThreadPoolExecutor | None:
        """The threads that ask the witnesses at once (None until a round needs them)."""
        return self._witnessing.pool

    def append_validated(
        self, items: Sequence[Validated], *, skip_refused: bool = False
    ) -> tuple[list[Appended | KolmError], SignedCheckpoint | None]:
        """Sequence already-validated envelopes in one transaction; one checkpoint per batch.

        Under the sequencer lock, the trust state is refreshed (key receipts committed by
        any replica since validation) and each item's key is checked again, applying key
        receipts of this batch in order — so a revocation always wins over entries after
        it. A refused item raises (nothing is written), or with ``skip_refused`` takes
        its error in the result list while the others are written.

        Entries are inserted without looking their statement digests up first; if one is
        already in the log the unique constraint refuses the insert, the transaction rolls
        back, and the batch is sequenced again with the look-up (so a duplicate still
        returns its existing entry, at the price of a second transaction).
        """
        if not items:
            return [], None
        return self._append_items(items, lambda: items, skip_refused)

    def _append_items(
        self,
        items: Iterable[Validated],
        every: Callable[[], Sequence[Validated]],
        skip_refused: bool,
    ) -> tuple[list[Appended | KolmError], SignedCheckpoint | None]:
        """:meth:`append_validated` of ``items`` (``every()``: all of them, as a sequence)."""
        try:
            done = self._sequence(items, skip_refused, self._memo.look_up)
        except LeafHashExists:
            # an item is already in the log: nothing was written; sequence the batch again,
            # looking its statement digests up first (and keep doing so while duplicates come)
            done = self._sequence(every(), skip_refused, True)
        signed = done.signed
        if signed is not None:
            self._memo.verified_note = signed.to_bytes()  # ours, just committed: no re-verify
        if done.key_receipts:
            self.refresh_trust()
        if self.witnesses:  # step 7, after the commit: witnesses see committed checkpoints only
            signed = self._cosign(signed)
        return done.results, signed

    def _sequence(
        self, items: Iterable[Validated], skip_refused: bool, look_up: bool
    ) -> Integrated:
        """One sequencing transaction (step 6): the trust state refreshed under the lock
        (key receipts committed by any replica since the last refresh), then
        :func:`~kolm_ledger.log.integrate.integrate_batch` against it."""
        with self.store.sequencing() as tx:
            self._in_tx.tx = tx
            try:
                self.refresh_trust()
            finally:
                self._in_tx.tx = None
            return integrate_batch(
                tx,
                items,
                self.trust,
                self._signers,
                clock=self._clock,
                max_time_skew=self.max_time_skew,
                skip_refused=skip_refused,
                look_up=look_up,
                memo=self._memo,
            )

    # ---- witnesses ---------------------------------------------------------------------

    def offer_latest_checkpoint(self) -> SignedCheckpoint | None:
        """Offer the newest committed checkpoint to the witnesses that have not cosigned it.

        Runs when the ledger opens (a crash between a commit and its cosignatures leaves
        that checkpoint uncosigned). Failures are logged, not raised. Returns the
        checkpoint with every cosignature stored for it, or None for an empty log.
        """
        return self._witnessing.offer_latest(self._clock)

    def _cosign(self, signed: SignedCheckpoint | None) -> SignedCheckpoint | None:
        """Step 7 of the module docstring, after the batch committed ``signed``
        (:meth:`WitnessRound.cosign <kolm_ledger.log.witnessing.WitnessRound.cosign>`)."""
        return self._witnessing.cosign(signed, self._clock)

    # ---- reads -------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Number of entries."""
        return self.store.size()

    def checkpoint(self) -> SignedCheckpoint:
        """The newest signed checkpoint; raises :class:`NotFoundError` for an empty log."""
        cp = self.store.latest_checkpoint()
        if cp is None:
            raise NotFoundError("the log is empty; no checkpoint yet")
        return SignedCheckpoint.from_bytes(cp.note)

    def entry(self, index: int) -> Entry:
        """Entry at ``index``."""
        return self.store.get_entry(index)

    def bundle(self, index: int, size: int | None = None) -> Bundle:
        """The offline bundle for entry ``index`` against the checkpoint of ``size`` (newest)."""
        return Bundle.from_store(self.store, index, size)

    def bundle_for_leaf(self, leaf_hash: bytes, size: int | None = None) -> Bundle:
        """The offline bundle for the entry with ``leaf_hash`` (as the ledger gave it)."""
        return self.bundle(self.store.get_by_leaf_hash(leaf_hash).index, size)

    def bundle_for_envelope(self, envelope: Envelope, size: int | None = None) -> Bundle:
        """The offline bundle for the entry of ``envelope``'s statement (its payload and
        key id: :func:`kolm_ledger.formats.leaf.statement_digest`), whatever its signature bytes."""
        return self.bundle(
            self.store.get_by_statement_digest(statement_digest(envelope)).index, size
        )
