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

import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar, cast

from kolm_ledger._crypto import PrivateKey
from kolm_ledger.errors import (
    ConflictError,
    InvalidInput,
    KeyFormatError,
    KolmError,
    NotFoundError,
    StorageError,
    UnavailableError,
    UnknownKeyError,
)
from kolm_ledger.formats.bundle import Bundle
from kolm_ledger.formats.checkpoint import (
    Checkpoint,
    SignedCheckpoint,
    sign_checkpoint,
    verify_checkpoint,
)
from kolm_ledger.formats.dsse import Envelope, verify_signature
from kolm_ledger.formats.leaf import statement_digest
from kolm_ledger.formats.merkle import consistency_proof
from kolm_ledger.formats.note import NoteSignature, NoteSigner
from kolm_ledger.formats.receipts import Statement
from kolm_ledger.keys import TrustedKey, TrustRoot
from kolm_ledger.log.verify_pool import Checked, ProcessVerifier, parse_receipt
from kolm_ledger.log.witnessing import WitnessConflict, add_checkpoint
from kolm_ledger.storage import Entry, Store, StoredCheckpoint, micros
from kolm_ledger.storage.repository import Head, LeafHashExists, SequencingTx, from_micros
from kolm_ledger.timefmt import MAX_TIME_SKEW, check_receipt_time, receipt_time
from kolm_ledger.verify.trust import (
    TrustState,
    check_key_policy,
    fold_key_receipts,
    key_receipt_entries,
    prove_entry,
)

log = logging.getLogger("kolm.ledger")

__all__ = ["Appended", "Ledger", "Validated"]

Clock = Callable[[], datetime]

_MIN_CHUNK = 64  # fewer envelopes per thread than this are not worth a hand-off
_T = TypeVar("_T")
#: ``verify_threads`` when not given: two cores verify while one sequences (see BENCHMARKS.md)
DEFAULT_VERIFY_THREADS = min(2, os.cpu_count() or 1)


@dataclass(frozen=True)
class Validated:
    """An envelope that passed every check and is ready to sequence.

    ``envelope`` and ``statement`` are None when a worker process validated it
    (``Ledger(verify_processes=N)``); a ``key`` receipt always has its statement. Its
    leaf hash is made when it is sequenced: it binds the integration time.
    """

    envelope: Envelope | None
    canonical: bytes
    statement: Statement | None
    kind: str
    key_id: str
    subjects: tuple[str, ...]  # subject SHA-256 digests, in statement order
    digest: bytes  # kolm_ledger.formats.leaf.statement_digest: one statement, one entry
    time_us: int  # the receipt's own ``time`` (µs since the epoch)


@dataclass(frozen=True)
class Appended:
    """Where an envelope landed: its entry's index, leaf hash and integration time (the
    stored entry's, for a ``duplicate``). The leaf hash binds the integration time, so
    callers keep this one; it cannot be recomputed from the envelope alone."""

    index: int
    leaf_hash: bytes
    integrated_at: datetime
    duplicate: bool


def _split(items: Sequence[_T], workers: int) -> list[Sequence[_T]]:
    """``items`` in contiguous chunks for :meth:`Ledger.submit_validation`: one per worker,
    but none under ``_MIN_CHUNK // 2`` items unless there are fewer than that in all."""
    n = max(1, min(workers, len(items) // (_MIN_CHUNK // 2)))
    step = max(1, -(-len(items) // n))
    return [items[i : i + step] for i in range(0, len(items), step)]


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
        if max_time_skew < timedelta(0):
            raise InvalidInput(f"max_time_skew {max_time_skew}, want 0 or more")
        #: how far a receipt's own ``time`` may lie after its integration time
        self.max_time_skew = max_time_skew
        self._skew_us = max_time_skew // timedelta(microseconds=1)
        if verify_threads < 1:
            raise InvalidInput(f"verify_threads {verify_threads}, want at least 1")
        if verify_processes < 0:
            raise InvalidInput(f"verify_processes {verify_processes}, want 0 or more")
        self.verify_processes = verify_processes
        self._processes = ProcessVerifier(verify_processes) if verify_processes else None
        self._pems: tuple[TrustState, dict[str, str]] | None = None
        # cryptography verifies with the GIL released, so threads verify in parallel
        self.verify_threads = verify_threads
        self._verify_pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        if witness_policy not in ("required", "best-effort"):
            raise InvalidInput(
                f"witness_policy {witness_policy!r}, want 'required' or 'best-effort'"
            )
        self.witnesses = list(witnesses)
        self.witness_policy = witness_policy
        self.witness_timeout = witness_timeout
        # the size each witness last cosigned, as far as we know (re-synced from its 409)
        self._witness_sizes: dict[str, int] = {}
        # the checkpoint size whose cosignature by each witness this process stored
        self._cosigned: dict[str, int] = {}
        self._witness_lock = threading.Lock()  # one offer round at a time, in size order
        self._witness_pool: ThreadPoolExecutor | None = None  # asks the witnesses at once
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
        self._verified_note: bytes | None = None
        # look leaf hashes up before inserting (set while batches bring duplicates)
        self._look_up = False
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
            self._prove_key_receipts(found, tx)
            # the one fold (trust.fold_key_receipts): a receipt that does not apply is left
            # out (and logged), never raised, so it cannot wedge every later append
            self.trust = fold_key_receipts(self.trust, found)
            if found:
                self._trust_seen = found[-1].index

    def _prove_key_receipts(self, found: Sequence[Entry], tx: SequencingTx | None) -> None:
        """Prove each key receipt (envelope and integration time) is what the newest signed
        checkpoint holds at its index (:func:`kolm_ledger.verify.trust.prove_entry`); raises
        :class:`ConflictError` (``FAILED_PRECONDITION``) naming the entry otherwise."""
        if not found:
            return
        last = tx.latest_checkpoint() if tx is not None else self.store.latest_checkpoint()
        try:
            if last is None:
                raise ConflictError("the log holds key receipts but no signed checkpoint")
            try:
                cp = verify_checkpoint(last.note, self.trust.root, origin=self.origin).checkpoint
            except KolmError as bad:
                raise ConflictError(f"its newest checkpoint (size {last.size}): {bad}") from bad

            def proof(i: int) -> list[bytes]:
                if tx is not None:
                    return tx.inclusion_proof(i, cp.size)
                return self.store.inclusion_proof(i, cp.size, check_size=False)

            for e in found:
                prove_entry(e, cp, proof)
        except KolmError as err:
            raise ConflictError(
                f"the stored log was altered: {err}; refusing to fold its key receipts and "
                "to extend it (kolm audit names every entry affected)"
            ) from err

    def key(self, keyid: str) -> TrustedKey:
        """The trusted key ``keyid`` as the ledger currently sees it."""
        return self.trust.get(keyid)

    # ---- append ------------------------------------------------------------------------

    def validate(
        self, envelope: Envelope | bytes | Mapping[str, object], now: datetime | None = None
    ) -> Validated:
        """Run checks (1)-(5) of the module docstring; raises the specific error."""
        return self._validate(envelope, now, self.trust, None)

    def _validate(
        self,
        envelope: Envelope | bytes | Mapping[str, object],
        now: datetime | None,
        trust: TrustState,
        passed: dict[tuple[str, str], TrustedKey] | None,
    ) -> Validated:
        """:meth:`validate` against ``trust``.

        ``passed`` (one batch: same ``trust``, same ``now``) remembers the keys that
        passed checks (3) and (5) for a (key id, kind); those checks depend on nothing
        else, so the next receipt of that pair skips straight to its own signature (4).
        """
        env, canonical, st = parse_receipt(envelope)  # (1)+(2) size, then parse
        kind = st.kind
        t = receipt_time(st.predicate)  # (2) the receipt's own time: present, RFC 3339
        keyid = env.signatures[0].keyid
        key = passed.get((keyid, kind)) if passed is not None else None
        now = now or self._clock()
        if key is not None:
            verify_signature(env, key.public_key)  # (4); (3) and (5) passed for this pair
        else:
            # (3) key in the trust state
            key = trust.get(keyid)
            if kind == "key":
                # (4), (5) and the change, as the one fold (trust.fold_key_receipts) runs
                # them: a key receipt that does not apply to the trust state must be refused
                # here, once committed it would break every later refresh_trust (and reopen)
                trust.admit(env, now)
            else:
                # (4) signature
                verify_signature(env, key.public_key)
                # (5) role and validity: the key policy
                check_key_policy(key, kind, now)
                if passed is not None:
                    passed[(keyid, kind)] = key
        # (5) the receipt time rule, against now (again at the integration time); in whole
        # microseconds (exact: datetimes hold µs), check_receipt_time only to name a failure
        t_us = micros(t)
        if not micros(key.not_before) <= t_us <= micros(now) + self._skew_us:
            check_receipt_time(
                t, not_before=key.not_before, integrated_at=now, skew=self.max_time_skew
            )
        return Validated(
            env,
            canonical,
            st,
            kind,
            keyid,
            tuple(st.subject_digests()),
            statement_digest(env),
            t_us,
        )

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
        passed: dict[tuple[str, str], TrustedKey] = {}
        big = len(envelopes) >= 2 * _MIN_CHUNK
        if big and self._processes is not None and all(type(e) is bytes for e in envelopes):
            return self._append_pipelined(envelopes, now, trust, passed, processes=True)
        if big and self.verify_threads > 1:
            return self._append_pipelined(envelopes, now, trust, passed)
        items = [self._validate(e, now, trust, passed) for e in envelopes]
        results, _ = self.append_validated(items)
        return [r for r in results if isinstance(r, Appended)]

    def _pool(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._verify_pool is None:
                self._verify_pool = ThreadPoolExecutor(
                    self.verify_threads, thread_name_prefix="kolm-verify"
                )
            return self._verify_pool

    def _append_pipelined(
        self,
        envelopes: Sequence[Envelope | bytes | Mapping[str, object]],
        now: datetime,
        trust: TrustState,
        passed: dict[tuple[str, str], TrustedKey],
        *,
        processes: bool = False,
    ) -> list[Appended]:
        """:meth:`append` with validation on the verify threads, overlapping sequencing.

        Chunks go to the pool in order; the caller's thread takes their results in
        order and feeds them to one sequencing transaction. A chunk stops at its first
        invalid envelope, whose error aborts the transaction when its turn comes, so
        every envelope before it in order validated and nothing is written.
        ``processes``: the chunks are parsed and verified in the worker processes
        (``envelopes`` are all bytes), and :meth:`_from_workers` finishes each on this
        thread.
        """
        # small enough chunks that little is left to sequence after the last one; a
        # process hand-off costs more than a thread's, so two chunks per worker there
        # (measured best: four per worker cost PostgreSQL 0.86 -> 0.74 of the ceiling)
        workers = self.verify_processes if processes else self.verify_threads
        step = max(_MIN_CHUNK // 2, -(-len(envelopes) // ((2 if processes else 4) * workers)))

        def run(
            chunk: Sequence[Envelope | bytes | Mapping[str, object]],
        ) -> tuple[list[Validated], BaseException | None]:
            out: list[Validated] = []
            try:
                for e in chunk:
                    out.append(self._validate(e, now, trust, passed))
            except Exception as err:  # re-raised by the sequencing thread, in order
                return out, err
            return out, None

        chunks = [envelopes[i : i + step] for i in range(0, len(envelopes), step)]
        futures: list[Future[Any]]
        if processes:
            assert self._processes is not None
            pems = self._public_pems(trust)
            futures = [self._processes.submit(pems, cast(Sequence[bytes], c)) for c in chunks]
        else:
            pool = self._pool()
            futures = [pool.submit(run, c) for c in chunks]
        got: list[Validated] = []

        def stream() -> Iterator[Validated]:
            for c, f in zip(chunks, futures, strict=True):
                if processes:
                    out, err = self._from_workers(
                        cast(Sequence[bytes], c), ProcessVerifier.result(f), now, trust, passed
                    )
                else:
                    out, err = f.result()
                got.extend(out)
                if err is not None:
                    raise err
                yield from out

        items = stream()

        def every() -> list[Validated]:
            for _ in items:  # validate what the aborted transaction did not reach
                pass
            return got

        try:
            if self._look_up or not self.pipeline:
                # duplicates lately: the look-up needs every leaf hash first
                results, _ = self._append_items(every(), every, False)
            else:
                results, _ = self._append_items(items, every, False)
        finally:
            for f in futures:
                f.cancel()
        return [r for r in results if isinstance(r, Appended)]

    def _public_pems(self, trust: TrustState) -> dict[str, str]:
        """Key id → public key PEM of every key of ``trust`` (what :meth:`TrustState.get` finds)."""
        cached = self._pems
        if cached is None or cached[0] is not trust:
            pems: dict[str, str] = {str(k.keyid): k.public_key.pem() for k in trust.root.keys}
            pems.update((str(k.keyid), k.public_key.pem()) for k in trust.extra)
            cached = self._pems = (trust, pems)
        return cached[1]

    def _from_workers(
        self,
        chunk: Sequence[bytes],
        checked: Sequence[Checked],
        now: datetime,
        trust: TrustState,
        passed: dict[tuple[str, str], TrustedKey],
    ) -> tuple[list[Validated], BaseException | None]:
        """Finish a chunk the workers checked: checks (3) and (5) here, as :meth:`_validate` does.

        Stops at the first refused envelope (its error second). An envelope whose key
        the workers did not have, and a key receipt, are validated here in full, so
        their errors (and a key receipt's trust check) are exactly :meth:`_validate`'s.
        """
        out: list[Validated] = []
        try:
            for data, c in zip(chunk, checked, strict=True):
                out.append(self._finish(data, c, now, trust, passed))
        except KolmError as e:
            return out, e
        return out, None

    def _finish(
        self,
        data: bytes,
        c: Checked,
        now: datetime,
        trust: TrustState,
        passed: dict[tuple[str, str], TrustedKey],
    ) -> Validated:
        """One envelope the workers checked, finished as :meth:`_validate` would; raises."""
        if isinstance(c, KolmError):
            raise c
        if isinstance(c, str):  # "unknown" key or a "key" receipt: validate it here
            return self._validate(data, now, trust, passed)
        digest, kind, keyid, subjects, time_us = c
        key = passed.get((keyid, kind))
        if key is None:
            key = trust.authorize(keyid, kind, now)  # (3) and (5)
            passed[(keyid, kind)] = key
        # the receipt time rule in µs, as in _validate (this runs on the caller's thread for
        # every receipt the workers checked: no datetime round trip unless it fails)
        if not micros(key.not_before) <= time_us <= micros(now) + self._skew_us:
            check_receipt_time(
                from_micros(time_us),
                not_before=key.not_before,
                integrated_at=now,
                skew=self.max_time_skew,
            )
        return Validated(None, data, None, kind, keyid, subjects, digest, time_us)

    def start_workers(self) -> None:
        """Start the ``verify_processes`` workers now rather than on first use (no-op without)."""
        if self._processes is not None:
            self._processes.start()

    def close(self) -> None:
        """Stop the verify and witness threads and the worker processes (the store stays
        open)."""
        with self._pool_lock:
            pools = (self._verify_pool, self._witness_pool)
            self._verify_pool = self._witness_pool = None
        for pool in pools:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        if self._processes is not None:
            self._processes.close()

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
        now = self._clock()
        trust = self.trust
        passed: dict[tuple[str, str], TrustedKey] = {}
        if self._processes is not None and all(type(e) is bytes for e in envelopes):
            return self._submit_to_workers(cast(Sequence[bytes], envelopes), now, trust, passed)

        def run(
            chunk: Sequence[Envelope | bytes | Mapping[str, object]],
        ) -> list[Validated | KolmError]:
            out: list[Validated | KolmError] = []
            for e in chunk:
                try:
                    out.append(self._validate(e, now, trust, passed))
                except KolmError as err:
                    out.append(err)
            return out

        pool = self._pool()
        return [pool.submit(run, c) for c in _split(envelopes, self.verify_threads)]

    def _submit_to_workers(
        self,
        envelopes: Sequence[bytes],
        now: datetime,
        trust: TrustState,
        passed: dict[tuple[str, str], TrustedKey],
    ) -> list[Future[list[Validated | KolmError]]]:
        """:meth:`submit_validation` on the worker processes."""
        assert self._processes is not None
        pems = self._public_pems(trust)
        lock = threading.Lock()  # ``passed`` is shared by the chunks' callbacks
        out: list[Future[list[Validated | KolmError]]] = []
        for chunk in _split(envelopes, self.verify_processes):
            done: Future[list[Validated | KolmError]] = Future()

            def finish(
                f: Future[Any],
                chunk: Sequence[bytes] = chunk,
                done: Future[list[Validated | KolmError]] = done,
            ) -> None:
                try:
                    res: list[Validated | KolmError] = []
                    with lock:
                        for data, c in zip(chunk, ProcessVerifier.result(f), strict=True):
                            try:
                                res.append(self._finish(data, c, now, trust, passed))
                            except KolmError as err:
                                res.append(err)
                    done.set_result(res)
                except BaseException as e:  # the pool broke, or was shut down
                    done.set_exception(e)

            self._processes.submit(pems, chunk).add_done_callback(finish)
            out.append(done)
        return out

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
            results, signed, key_receipts = self._sequence(items, skip_refused, self._look_up)
        except LeafHashExists:
            # an item is already in the log: nothing was written; sequence the batch again,
            # looking its statement digests up first (and keep doing so while duplicates come)
            results, signed, key_receipts = self._sequence(every(), skip_refused, True)
        if signed is not None:
            self._verified_note = signed.to_bytes()  # ours, just committed: no need to re-verify
        if key_receipts:
            self.refresh_trust()
        if self.witnesses:  # step 7, after the commit: witnesses see committed checkpoints only
            signed = self._cosign(signed)
        return results, signed

    def _sequence(
        self, items: Iterable[Validated], skip_refused: bool, look_up: bool
    ) -> tuple[list[Appended | KolmError], SignedCheckpoint | None, list[Statement]]:
        """One sequencing transaction (step 6) for :meth:`append_validated`.

        ``look_up`` reads which statement digests are already in the log before
        sequencing; without it the entries are inserted first and the unique constraint
        raises :class:`LeafHashExists` (rolling everything back) if one already is — the
        common all-new batch saves a query per 500 entries.

        The batch's integration time is ``max(clock, previous entry's + 1 µs)``, read
        under the lock: stored times never go back (a clock set back cannot integrate an
        entry before one already logged, e.g. before a revocation), and every batch has
        its own time (the audit tells batches apart by it).
        """
        results: list[Appended | KolmError] = []
        key_receipts: list[Statement] = []
        signed: SignedCheckpoint | None = None
        with self.store.sequencing() as tx:
            # key receipts committed by any replica since the last refresh
            self._in_tx.tx = tx
            try:
                self.refresh_trust()
            finally:
                self._in_tx.tx = None
            state = self.trust
            head = tx.head()
            self._check_last_checkpoint(tx.latest_checkpoint(), head)
            # the integration time: never before the previous entry's (see the docstring)
            now_us = max(micros(self._clock()), head.last_time_us + 1)
            now = from_micros(now_us)
            latest_us = now_us + self._skew_us  # the latest receipt time accepted
            # leaf_data = b'{"envelope":' + canonical + tail (kolm_ledger.formats.leaf, inlined)
            tail = b',"integrated_time":%d}' % now_us
            # statement digest -> (index, leaf hash, time µs), of the log (when looked up)
            # and of this batch so far: one statement, one entry
            seen: dict[bytes, tuple[int, bytes, int]] = {}
            if look_up:
                items = list(items)
                seen = tx.existing([v.digest for v in items])
            self._look_up = bool(seen)
            peaks = head.peaks
            chain = head.chain_head
            size = head.size
            subjects: list[tuple[str, int]] = []
            nodes: list[tuple[int, int, bytes]] = []
            # (key id, kind) -> the key's not_before (µs), for the pairs whose key checks
            # passed against ``state`` at ``now``
            passed: dict[tuple[str, str], int] = {}
            sha256 = hashlib.sha256
            # rows stream to the database as they are made (PostgreSQL inserts meanwhile);
            # LeafHashExists at the end of the block if one is already stored
            with tx.entry_writer() as put:
                for v in items:
                    digest = v.digest
                    known = seen.get(digest)
                    if known is not None:
                        idx, old_leaf, at = known
                        results.append(Appended(idx, old_leaf, from_micros(at), True))
                        continue
                    kind = v.kind
                    not_before = passed.get((v.key_id, kind))
                    try:
                        if kind == "key" or not_before is None:
                            key = state.authorize(v.key_id, kind, now)
                            not_before = micros(key.not_before)
                            if kind == "key":
                                assert v.statement is not None  # key receipts keep theirs
                                state = state.apply(v.statement, now)
                                passed.clear()  # a new trust state: check every pair again
                            else:
                                passed[(v.key_id, kind)] = not_before
                        if not not_before <= v.time_us <= latest_us:
                            check_receipt_time(  # raises, naming the bound
                                from_micros(v.time_us),
                                not_before=from_micros(not_before),
                                integrated_at=now,
                                skew=self.max_time_skew,
                            )
                    except KolmError as e:
                        if not skip_refused:
                            raise
                        results.append(e)
                        continue
                    leaf = sha256(b'\x00{"envelope":' + v.canonical + tail).digest()
                    chain = sha256(b"\x02" + chain + leaf).digest()  # leaf.chain_next, inlined
                    nodes += peaks.append(leaf)
                    put((size, leaf, chain, kind, v.key_id, now_us, v.canonical, digest))
                    subs = v.subjects
                    if len(subs) == 1:
                        subjects.append((subs[0], size))
                    else:
                        subjects.extend((d, size) for d in sorted(set(subs)))
                    seen[digest] = (size, leaf, now_us)
                    results.append(Appended(size, leaf, now, False))
                    if kind == "key":
                        assert v.statement is not None
                        key_receipts.append(v.statement)
                    size += 1
            stored: StoredCheckpoint | None = None
            if size > head.size:
                cp = Checkpoint(self.origin, size, peaks.root(), chain)
                signed = sign_checkpoint(cp, self._signers)
                stored = StoredCheckpoint(size, cp.root, chain, signed.to_bytes(), now)
            last_us = now_us if size > head.size else head.last_time_us
            tx.finish(nodes, stored, Head(size, peaks, chain, last_us), subjects)
        return results, signed, key_receipts

    def offer_latest_checkpoint(self) -> SignedCheckpoint | None:
        """Offer the newest committed checkpoint to the witnesses that have not cosigned it.

        Runs when the ledger opens (a crash between a commit and its cosignatures leaves
        that checkpoint uncosigned). Failures are logged, not raised. Returns the
        checkpoint with every cosignature stored for it, or None for an empty log.
        """
        try:
            return self._collect_cosignatures(strict=False)
        except KolmError as e:
            log.warning("offering the newest checkpoint to witnesses failed: %s", e)
            return None

    def _cosign(self, signed: SignedCheckpoint | None) -> SignedCheckpoint | None:
        """Step 7 of the module docstring, after the batch committed ``signed``.

        ``signed`` is None when the batch added nothing (only duplicates): under
        ``"required"`` the newest checkpoint must still be cosigned before the duplicates
        are acknowledged (a retry after a witness failed); under ``"best-effort"`` nobody
        is asked.
        """
        if signed is None and self.witness_policy != "required":
            return None
        out = self._collect_cosignatures(strict=self.witness_policy == "required")
        return out if out is not None else signed

    def _collect_cosignatures(self, *, strict: bool) -> SignedCheckpoint | None:
        """Offer the newest committed checkpoint to each witness; store what comes back.

        With ``strict``, raises :class:`UnavailableError` unless every witness has
        cosigned it (the cosignatures that did come back are stored either way).
        """
        with self._witness_lock:
            failed: dict[str, KolmError] = {}
            latest: StoredCheckpoint | None = None
            for _ in range(3):  # again if another replica committed (and offered) a newer one
                latest = self.store.latest_checkpoint()
                if latest is None:
                    return None
                signed = SignedCheckpoint.from_bytes(latest.note)
                size, ahead = latest.size, False
                failed.clear()
                got: dict[str, list[NoteSignature]] = {}
                todo = [u for u in self.witnesses if self._cosigned.get(u) != size]
                for url, answer in zip(todo, self._ask_witnesses(todo, signed), strict=True):
                    if isinstance(answer, WitnessConflict):
                        ahead = ahead or answer.size > size
                        failed[url] = answer
                    elif isinstance(answer, KolmError):
                        failed[url] = answer
                    else:
                        got[url] = answer
                if got:  # one short write for all of them, then serve what is stored
                    sigs = [(g.name, g.key_id, g.sig) for gs in got.values() for g in gs]
                    self.store.add_cosignatures(size, sigs, self._clock())
                    self._cosigned.update(dict.fromkeys(got, size))
                    latest = self.store.checkpoint_at(size)
                if not ahead:
                    break
            assert latest is not None
            for url, err in failed.items():
                log.warning("witness %s did not cosign checkpoint %d: %s", url, latest.size, err)
            if strict and failed:
                url, err = next(iter(failed.items()))
                raise UnavailableError(
                    f"witness {url} did not cosign checkpoint {latest.size}: {err} (the entries "
                    "are committed; retrying the append waits for the cosignatures again)"
                )
            return SignedCheckpoint.from_bytes(latest.note)

    def _ask_witnesses(
        self, urls: Sequence[str], signed: SignedCheckpoint
    ) -> list[list[NoteSignature] | KolmError]:
        """Each witness's cosignatures on ``signed`` or why not, in ``urls`` order.

        Several witnesses are asked at once, one thread each: an offer round takes as
        long as the slowest witness (at most ``witness_timeout`` for one that does not
        answer), not the sum of them.
        """

        def one(url: str) -> list[NoteSignature] | KolmError:
            try:
                return self._witness_one(url, signed)
            except KolmError as e:
                return e

        if len(urls) < 2:
            return [one(u) for u in urls]
        with self._pool_lock:
            if self._witness_pool is None:
                self._witness_pool = ThreadPoolExecutor(
                    len(self.witnesses), thread_name_prefix="kolm-witness"
                )
            pool = self._witness_pool
        return list(pool.map(one, urls))

    def _witness_one(self, url: str, signed: SignedCheckpoint) -> list[NoteSignature]:
        """One witness's cosignatures on ``signed`` (committed: its nodes are in the store).

        Raises :class:`WitnessConflict` (its ``size`` beyond ``signed``) when the witness
        has already cosigned a larger checkpoint.
        """
        size = signed.checkpoint.size
        old = self._witness_sizes.get(url, 0)
        for _ in range(2):  # once more after a 409 tells us the witness's size
            if old > size:
                raise WitnessConflict(f"witness {url} has cosigned size {old}, beyond {size}", old)
            proof = [] if old in (0, size) else consistency_proof(old, size, self.store.get_nodes)
            try:
                out = add_checkpoint(
                    url, old, proof, signed.to_bytes(), timeout=self.witness_timeout
                )
            except WitnessConflict as c:
                old = self._witness_sizes[url] = c.size
                continue
            self._witness_sizes[url] = size
            return out
        raise ConflictError(f"witness {url} keeps answering 409 (last said size {old})")

    def _check_last_checkpoint(self, last: StoredCheckpoint | None, head: Head) -> None:
        """Refuse to extend a log whose stored state contradicts its newest checkpoint.

        Every batch writes its entries and its checkpoint in one transaction, so the
        newest checkpoint covers exactly the stored entries; anything else (entries
        without a checkpoint, rows deleted or added, a rewritten node or chain hash, a
        checkpoint row whose columns differ from its signed note) is tampering.
        """
        if last is None:
            if head.size:
                raise ConflictError(
                    f"the log holds {head.size} entries but no signed checkpoint; "
                    "refusing to extend it"
                )
            return
        if last.note != self._verified_note:
            try:
                cp = verify_checkpoint(last.note, self.trust.root, origin=self.origin).checkpoint
            except KolmError as e:
                raise ConflictError(
                    f"newest stored checkpoint (size {last.size}) does not verify: {e}"
                ) from e
            if (cp.size, cp.root, cp.chain_head) != (last.size, last.root, last.chain_head):
                raise ConflictError(
                    f"newest stored checkpoint (size {last.size}): stored size/root/chain "
                    "columns differ from its signed note"
                )
            self._verified_note = last.note
        if last.size != head.size:
            raise ConflictError(
                f"newest checkpoint has size {last.size} but the log holds {head.size} entries"
            )
        root, chain = head.peaks.root(), head.chain_head
        if root != last.root or chain != last.chain_head:
            raise ConflictError(
                f"stored tree at size {last.size} has root {root.hex()[:16]}, but its signed "
                f"checkpoint says {last.root.hex()[:16]}; refusing to sign an inconsistent checkpoint"
            )

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


def envelope_json(entry: Entry) -> dict[str, object]:
    """The DSSE JSON object stored in ``entry``."""
    obj = json.loads(entry.envelope)
    if not isinstance(obj, dict):
        raise StorageError(f"entry {entry.index} does not hold a JSON object")
    return obj
