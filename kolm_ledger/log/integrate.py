"""Integration: step 6 of :mod:`kolm_ledger.log.ledger`, as functions over one storage
transaction (tessera's ``Integrate``: the tree grows in a function, not in a god object).

:func:`integrate_batch` sequences validated envelopes under the storage lock: it checks
the stored head against the newest signed checkpoint (:func:`check_head`), picks the
batch's integration time, re-checks each key and receipt time at that time, extends the
hash chain and the Merkle tree, streams the rows, and signs one checkpoint for the
batch. :func:`prove_key_receipts` is the same refusal for the key receipts the trust
state folds: the stored log must be what its newest signed checkpoint says.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from kolm_ledger.errors import ConflictError, KolmError
from kolm_ledger.formats.checkpoint import (
    Checkpoint,
    SignedCheckpoint,
    sign_checkpoint,
    verify_checkpoint,
)
from kolm_ledger.formats.note import NoteSigner
from kolm_ledger.formats.receipts import Statement
from kolm_ledger.keys import TrustRoot
from kolm_ledger.log.validate import Validated
from kolm_ledger.storage import Entry, StoredCheckpoint
from kolm_ledger.storage.repository import Head, SequencingTx
from kolm_ledger.timefmt import check_receipt_time, from_micros, micros
from kolm_ledger.verify.trust import TrustState, prove_entry

__all__ = ["Appended", "Integrated", "Memo", "check_head", "integrate_batch", "prove_key_receipts"]


@dataclass(frozen=True)
class Appended:
    """Where an envelope landed: its entry's index, leaf hash and integration time (the
    stored entry's, for a ``duplicate``). The leaf hash binds the integration time, so
    callers keep this one; it cannot be recomputed from the envelope alone."""

    index: int
    leaf_hash: bytes
    integrated_at: datetime
    duplicate: bool


@dataclass(frozen=True)
class Integrated:
    """One batch's outcome: per item its :class:`Appended` (or, with ``skip_refused``,
    why it was refused), the checkpoint signed for the batch (None if it added nothing)
    and the key receipts it committed, in order."""

    results: list[Appended | KolmError]
    signed: SignedCheckpoint | None
    key_receipts: list[Statement]


@dataclass
class Memo:
    """What integration remembers between one log's batches (only to save work)."""

    #: the newest checkpoint note already verified (:func:`check_head` skips it)
    verified_note: bytes | None = None
    #: the last batch found duplicates: look digests up before inserting (set while
    #: batches bring them; see :meth:`~kolm_ledger.log.ledger.Ledger.append_validated`)
    look_up: bool = False


def check_head(
    last: StoredCheckpoint | None, head: Head, root: TrustRoot, origin: str, memo: Memo
) -> None:
    """Refuse to extend a log whose stored state contradicts its newest checkpoint.

    Every batch writes its entries and its checkpoint in one transaction, so the
    newest checkpoint covers exactly the stored entries; anything else (entries
    without a checkpoint, rows deleted or added, a rewritten node or chain hash, a
    checkpoint row whose columns differ from its signed note) is tampering.
    """
    if last is None:
        if head.size:
            raise ConflictError(
                f"the log holds {head.size} entries but no signed checkpoint; refusing to extend it"
            )
        return
    if last.note != memo.verified_note:
        try:
            cp = verify_checkpoint(last.note, root, origin=origin).checkpoint
        except KolmError as e:
            raise ConflictError(
                f"newest stored checkpoint (size {last.size}) does not verify: {e}"
            ) from e
        if (cp.size, cp.root, cp.chain_head) != (last.size, last.root, last.chain_head):
            raise ConflictError(
                f"newest stored checkpoint (size {last.size}): stored size/root/chain "
                "columns differ from its signed note"
            )
        memo.verified_note = last.note
    if last.size != head.size:
        raise ConflictError(
            f"newest checkpoint has size {last.size} but the log holds {head.size} entries"
        )
    root_hash, chain = head.peaks.root(), head.chain_head
    if root_hash != last.root or chain != last.chain_head:
        raise ConflictError(
            f"stored tree at size {last.size} has root {root_hash.hex()[:16]}, but its signed "
            f"checkpoint says {last.root.hex()[:16]}; refusing to sign an inconsistent checkpoint"
        )


def prove_key_receipts(
    found: Sequence[Entry],
    last: StoredCheckpoint | None,
    inclusion_proof: Callable[[int, int], list[bytes]],
    root: TrustRoot,
    origin: str,
) -> None:
    """Prove each key receipt (envelope and integration time) is what the newest signed
    checkpoint ``last`` holds at its index (:func:`kolm_ledger.verify.trust.prove_entry`;
    ``inclusion_proof(index, size)``); raises :class:`ConflictError`
    (``FAILED_PRECONDITION``) naming the entry otherwise."""
    try:
        if last is None:
            raise ConflictError("the log holds key receipts but no signed checkpoint")
        try:
            cp = verify_checkpoint(last.note, root, origin=origin).checkpoint
        except KolmError as bad:
            raise ConflictError(f"its newest checkpoint (size {last.size}): {bad}") from bad
        for e in found:
            prove_entry(e, cp, lambda i: inclusion_proof(i, cp.size))
    except KolmError as err:
        raise ConflictError(
            f"the stored log was altered: {err}; refusing to fold its key receipts and "
            "to extend it (kolm audit names every entry affected)"
        ) from err


def integrate_batch(
    tx: SequencingTx,
    items: Iterable[Validated],
    trust: TrustState,
    signers: Sequence[NoteSigner],
    *,
    clock: Callable[[], datetime],
    max_time_skew: timedelta,
    skip_refused: bool,
    look_up: bool,
    memo: Memo,
) -> Integrated:
    """One sequencing transaction (step 6): ``items`` into the log of ``tx``, one
    checkpoint signed by ``signers`` (named by the log's origin).

    ``look_up`` reads which statement digests are already in the log before
    sequencing; without it the entries are inserted first and the unique constraint
    raises :class:`~kolm_ledger.storage.repository.LeafHashExists` (rolling everything
    back) if one already is — the common all-new batch saves a query per 500 entries.

    The batch's integration time is ``max(clock, previous entry's + 1 µs)``, read
    under the lock: stored times never go back (a clock set back cannot integrate an
    entry before one already logged, e.g. before a revocation), and every batch has
    its own time (the audit tells batches apart by it). Each key is checked again
    against ``trust`` at that time, applying the batch's key receipts in order.
    """
    origin = signers[0].name
    results: list[Appended | KolmError] = []
    key_receipts: list[Statement] = []
    signed: SignedCheckpoint | None = None
    state = trust
    head = tx.head()
    check_head(tx.latest_checkpoint(), head, trust.root, origin, memo)
    # the integration time: never before the previous entry's (see the docstring)
    now_us = max(micros(clock()), head.last_time_us + 1)
    now = from_micros(now_us)
    latest_us = now_us + max_time_skew // timedelta(microseconds=1)  # latest receipt time
    # leaf_data = b'{"envelope":' + canonical + tail (kolm_ledger.formats.leaf, inlined)
    tail = b',"integrated_time":%d}' % now_us
    # statement digest -> (index, leaf hash, time µs), of the log (when looked up)
    # and of this batch so far: one statement, one entry
    seen: dict[bytes, tuple[int, bytes, int]] = {}
    if look_up:
        items = list(items)
        seen = tx.existing([v.digest for v in items])
    memo.look_up = bool(seen)
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
                        skew=max_time_skew,
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
        cp = Checkpoint(origin, size, peaks.root(), chain)
        signed = sign_checkpoint(cp, signers)
        stored = StoredCheckpoint(size, cp.root, chain, signed.to_bytes(), now)
    last_us = now_us if size > head.size else head.last_time_us
    tx.finish(nodes, stored, Head(size, peaks, chain, last_us), subjects)
    return Integrated(results, signed, key_receipts)
