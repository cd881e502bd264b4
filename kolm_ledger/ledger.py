"""The transport-free ledger core: validate, sequence, chain, tree, checkpoint.

Appending an envelope:

1. checks its size (canonical JSON <= 64 KiB) before any hashing;
2. parses it (DSSE, in-toto statement, kolm predicate type);
3. finds its signing key in the trust state (trust root + key receipts in the log);
4. verifies the DSSE signature;
5. checks the key's role may sign that kind and the key is valid now;
6. sequences it under the storage lock: extends the hash chain and the Merkle tree,
   and signs one checkpoint per batch (never one inconsistent with the last);
7. with ``witnesses`` configured, collects their C2SP cosignatures on that checkpoint
   before committing (:mod:`kolm_ledger.witness`): under ``witness_policy="required"`` a
   witness that fails fails the batch and nothing is written; under ``"best-effort"``
   the checkpoint is published with the cosignatures that came back.

Example::

    >>> import tempfile, pathlib
    >>> from kolm_ledger.keys import init_keys, PrivateKey
    >>> from kolm_ledger.storage import Store
    >>> from kolm_ledger.ledger import Ledger
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
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from ._crypto import PrivateKey
from .bundle import Bundle
from .checkpoint import Checkpoint, SignedCheckpoint, sign_checkpoint, verify_checkpoint
from .dsse import MAX_ENVELOPE_BYTES, Envelope, verify_signature
from .errors import (
    ConflictError,
    EntryTooLargeError,
    EnvelopeFormatError,
    InvalidInput,
    KeyFormatError,
    KolmError,
    NotFoundError,
    StatementFormatError,
    StorageError,
    UnavailableError,
    UnknownKeyError,
)
from .keys import TrustedKey, TrustRoot
from .merkle import NodeID, consistency_proof
from .note import Note, NoteSignature, NoteSigner
from .receipts import Statement
from .storage import Entry, NewEntry, Store, StoredCheckpoint, micros
from .storage.repository import Head
from .tlogproof import TlogProof
from .trust import TrustState
from .witness import WitnessConflict, add_checkpoint

log = logging.getLogger("kolm.ledger")

__all__ = ["Appended", "Ledger", "Validated", "chain_next"]

Clock = Callable[[], datetime]


def chain_next(prev: bytes, leaf_hash: bytes) -> bytes:
    """``chain[i] = SHA-256(0x02 || chain[i-1] || leaf_hash[i])``."""
    return hashlib.sha256(b"\x02" + prev + leaf_hash).digest()


@dataclass(frozen=True)
class Validated:
    """An envelope that passed every check and is ready to sequence."""

    envelope: Envelope
    canonical: bytes
    leaf_hash: bytes
    statement: Statement
    kind: str
    key_id: str


@dataclass(frozen=True)
class Appended:
    """Where an envelope landed."""

    index: int
    leaf_hash: bytes
    integrated_at: datetime
    duplicate: bool


def _parse(envelope: Envelope | bytes | Mapping[str, object]) -> tuple[Envelope, bytes]:
    if isinstance(envelope, bytes | bytearray):
        if len(envelope) > 2 * MAX_ENVELOPE_BYTES:
            raise EntryTooLargeError(
                f"entry is {len(envelope)} bytes; the ledger accepts at most {MAX_ENVELOPE_BYTES}"
            )
        envelope = Envelope.from_bytes(bytes(envelope))
    elif isinstance(envelope, Mapping):
        envelope = Envelope.from_json(dict(envelope))
    if not isinstance(envelope, Envelope):
        raise EnvelopeFormatError(f"want a DSSE envelope, got {type(envelope).__name__}")
    canonical = envelope.canonical()
    if len(canonical) > MAX_ENVELOPE_BYTES:
        raise EntryTooLargeError(
            f"entry is {len(canonical)} bytes (canonical JSON); the ledger accepts at most "
            f"{MAX_ENVELOPE_BYTES}"
        )
    return envelope, canonical


class Ledger:
    """Validates and sequences receipts into one store; signs checkpoints with the log key.

    Requires ``log_key`` to be an Ed25519 key listed in ``trust`` as a ``log`` key;
    the checkpoint origin is that key's origin.
    """

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
    ) -> None:
        if witness_policy not in ("required", "best-effort"):
            raise InvalidInput(
                f"witness_policy {witness_policy!r}, want 'required' or 'best-effort'"
            )
        self.witnesses = list(witnesses)
        self.witness_policy = witness_policy
        self.witness_timeout = witness_timeout
        # the size each witness last cosigned, as far as we know (re-synced from its 409)
        self._witness_sizes: dict[str, int] = {}
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
        self.refresh_trust()

    # ---- trust -------------------------------------------------------------------------

    def refresh_trust(self) -> None:
        """Fold key receipts sequenced since the last refresh (by any replica) into the trust state."""
        with self._trust_lock:
            for e in self.store.find(kind="key", after_index=self._trust_seen, limit=1_000_000):
                st = Statement.from_envelope(Envelope.from_bytes(e.envelope))
                self.trust = self.trust.apply(st, e.integrated_at)
                self._trust_seen = e.index

    def key(self, keyid: str) -> TrustedKey:
        """The trusted key ``keyid`` as the ledger currently sees it."""
        return self.trust.get(keyid)

    # ---- append ------------------------------------------------------------------------

    def validate(
        self, envelope: Envelope | bytes | Mapping[str, object], now: datetime | None = None
    ) -> Validated:
        """Run checks (1)-(5) of the module docstring; raises the specific error."""
        # (1)+(2) size, then parse
        try:
            env, canonical = _parse(envelope)
        except RecursionError as e:  # json.loads on deeply nested input
            raise EnvelopeFormatError("envelope is nested too deeply to parse") from e
        try:
            st = Statement.from_envelope(env)
        except RecursionError as e:
            raise StatementFormatError("envelope payload is nested too deeply to parse") from e
        kind = st.kind
        if len(env.signatures) != 1:
            raise EnvelopeFormatError(
                f"receipt envelope has {len(env.signatures)} signatures, want exactly 1"
            )
        keyid = env.signatures[0].keyid
        # (3) key in the trust state
        key = self.trust.get(keyid)
        # (4) signature
        verify_signature(env, key.public_key)
        # (5) role and validity
        key.check_may_sign(kind)
        now = now or self._clock()
        key.check_valid_at(now)
        if kind == "key":
            # a key receipt that does not apply to the trust state must be refused here:
            # once committed it would break every later refresh_trust (and every reopen)
            self.trust.apply(st, now)
        leaf = hashlib.sha256(b"\x00" + canonical).digest()
        return Validated(env, canonical, leaf, st, kind, keyid)

    def append(
        self, envelopes: Sequence[Envelope | bytes | Mapping[str, object]]
    ) -> list[Appended]:
        """Validate every envelope, then sequence them as one atomic batch.

        If any envelope is invalid nothing is written and its error is raised. Appending
        an envelope already in the log returns its existing index (``duplicate=True``).
        """
        now = self._clock()
        items = [self.validate(e, now) for e in envelopes]
        results, _ = self.append_validated(items)
        return [r for r in results if isinstance(r, Appended)]

    def append_validated(
        self, items: Sequence[Validated], *, skip_refused: bool = False
    ) -> tuple[list[Appended | KolmError], SignedCheckpoint | None]:
        """Sequence already-validated envelopes in one transaction; one checkpoint per batch.

        Under the sequencer lock, the trust state is refreshed (key receipts committed by
        any replica since validation) and each item's key is checked again, applying key
        receipts of this batch in order — so a revocation always wins over entries after
        it. A refused item raises (nothing is written), or with ``skip_refused`` takes
        its error in the result list while the others are written.
        """
        if not items:
            return [], None
        now = self._clock()
        now_us = micros(now)
        results: list[Appended | KolmError] = []
        with self.store.sequencing() as tx:
            self.refresh_trust()
            state = self.trust
            head = tx.head()
            self._check_last_checkpoint(tx.latest_checkpoint(), head)
            existing = tx.existing([v.leaf_hash for v in items])
            peaks = head.peaks
            chain = head.chain_head
            size = head.size
            new: list[NewEntry] = []
            nodes: list[tuple[int, int, bytes]] = []
            batch_seen: dict[bytes, int] = {}
            key_receipts: list[Statement] = []
            for v in items:
                known = existing.get(v.leaf_hash, batch_seen.get(v.leaf_hash))
                if known is not None:
                    results.append(Appended(known, v.leaf_hash, now, True))
                    continue
                try:
                    key = state.get(v.key_id)
                    key.check_may_sign(v.kind)
                    key.check_valid_at(now)
                    if v.kind == "key":
                        state = state.apply(v.statement, now)
                except KolmError as e:
                    if not skip_refused:
                        raise
                    results.append(e)
                    continue
                chain = chain_next(chain, v.leaf_hash)
                nodes.extend(peaks.append(v.leaf_hash))
                new.append(
                    NewEntry(
                        size,
                        v.leaf_hash,
                        chain,
                        v.kind,
                        v.key_id,
                        now_us,
                        v.canonical,
                        tuple(v.statement.subject_digests()),
                    )
                )
                batch_seen[v.leaf_hash] = size
                results.append(Appended(size, v.leaf_hash, now, False))
                if v.kind == "key":
                    key_receipts.append(v.statement)
                size += 1
            signed: SignedCheckpoint | None = None
            stored: StoredCheckpoint | None = None
            if new:
                cp = Checkpoint(self.origin, size, peaks.root(), chain)
                signed = sign_checkpoint(cp, self._signers)
                if self.witnesses:
                    signed = self._cosign(signed, new, nodes)
                stored = StoredCheckpoint(size, cp.root, chain, signed.to_bytes(), now)
            tx.write(new, nodes, stored, Head(size, peaks, chain))
        if signed is not None:
            self._verified_note = signed.to_bytes()  # ours, just committed: no need to re-verify
        if key_receipts:
            self.refresh_trust()
        return results, signed

    def _cosign(
        self,
        signed: SignedCheckpoint,
        new: Sequence[NewEntry],
        nodes: Sequence[tuple[int, int, bytes]],
    ) -> SignedCheckpoint:
        """Add each witness's cosignatures to ``signed`` (step 7 of the module docstring)."""
        pending: dict[NodeID, bytes] = {(lv, i): h for lv, i, h in nodes}
        pending.update({(0, e.index): e.leaf_hash for e in new})

        def get_nodes(ids: Sequence[NodeID]) -> list[bytes]:
            # nodes of this batch are not committed yet; older ones are
            missing = [i for i in ids if i not in pending]
            got = dict(zip(missing, self.store.get_nodes(missing), strict=True)) if missing else {}
            return [pending[i] if i in pending else got[i] for i in ids]

        sigs: list[NoteSignature] = list(signed.note.signatures)
        for url in self.witnesses:
            try:
                sigs.extend(self._witness_one(url, signed, get_nodes))
            except KolmError as e:
                if self.witness_policy == "required":
                    raise UnavailableError(
                        f"witness {url} did not cosign checkpoint {signed.checkpoint.size}: {e}"
                    ) from e
                log.warning("witness %s did not cosign: %s", url, e)
        return SignedCheckpoint(signed.checkpoint, Note(signed.note.text, tuple(sigs)))

    def _witness_one(
        self,
        url: str,
        signed: SignedCheckpoint,
        get_nodes: Callable[[Sequence[NodeID]], list[bytes]],
    ) -> list[NoteSignature]:
        size = signed.checkpoint.size
        old = self._witness_sizes.get(url, 0)
        for _ in range(2):  # once more after a 409 tells us the witness's size
            if old > size:
                raise ConflictError(f"witness {url} has cosigned size {old}, beyond {size}")
            proof = [] if old in (0, size) else consistency_proof(old, size, get_nodes)
            try:
                out = add_checkpoint(
                    url, old, proof, signed.to_bytes(), timeout=self.witness_timeout
                )
            except WitnessConflict as c:
                old = c.size
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
        if index < 0:
            raise InvalidInput(f"index {index} is negative")
        entry = self.store.get_entry(index)
        cp = self.store.latest_checkpoint() if size is None else self.store.checkpoint_at(size)
        if cp is None or cp.size <= index:
            raise NotFoundError(f"no checkpoint covers index {index} yet")
        proof = self.store.inclusion_proof(index, cp.size, check_size=False)
        return Bundle(Envelope.from_bytes(entry.envelope), TlogProof(index, tuple(proof), cp.note))

    def bundle_for_leaf(self, leaf_hash: bytes, size: int | None = None) -> Bundle:
        """The offline bundle for the entry with ``leaf_hash``."""
        return self.bundle(self.store.get_by_leaf_hash(leaf_hash).index, size)


def envelope_json(entry: Entry) -> dict[str, object]:
    """The DSSE JSON object stored in ``entry``."""
    obj = json.loads(entry.envelope)
    if not isinstance(obj, dict):
        raise StorageError(f"entry {entry.index} does not hold a JSON object")
    return obj
