"""Audit a whole ledger, trusting nothing but the trust root.

For every entry, in index order:

1. the index follows the previous one (no gap, nothing deleted), and its integration
   time is not earlier than the previous entry's (the first entry that goes back is
   named);
2. the stored envelope parses and is in canonical (RFC 8785) form, the stored kind
   and key id columns are the statement's kind and the signature's key id, and no
   earlier entry holds the same statement (payload and key id: one statement, one
   entry; locally, the stored statement digest column is recomputed too);
3. the stored leaf hash equals SHA-256(0x00 || JCS({"envelope", "integrated_time"}))
   recomputed with the stored integration time (:mod:`kolm_ledger.formats.leaf`), so a moved
   time breaks the leaf, the chain and every root after it;
4. the signing key is trusted (root + key receipts so far), its DSSE signature verifies,
   its role may sign the receipt kind, and it was valid at the entry's integration time;
   the receipt's own ``time`` is RFC 3339, not before the key's ``not_before`` and not
   later than the integration time plus the skew (:mod:`kolm_ledger.timefmt`);
5. the stored chain hash equals SHA-256(0x02 || previous chain || leaf hash).

Then, for the whole log:

6. every stored interior Merkle node equals the one recomputed from the leaves;
7. every checkpoint is signed by a trusted log key for the origin, its stored columns
   match its signed body, and its root and chain head equal those recomputed at its size
   (which also proves each checkpoint consistent with the previous one);
8. every entry is covered by the newest checkpoint, and no checkpoint claims entries
   that are missing; every batch (a run of entries integrated at one time) ends at a
   signed checkpoint, since the ledger signs one per batch (so one deleted is noticed);
9. the subject index lists exactly the subjects of each entry's statement.

Every failure is reported with the entry index (or checkpoint size) and the reason.

Example::

    >>> from kolm_ledger.storage import Store
    >>> from kolm_ledger.keys import TrustRoot
    >>> audit(Store("sqlite:///:memory:"), TrustRoot(())).ok
    True
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from kolm_ledger.errors import KolmError, NotFoundError
from kolm_ledger.formats.checkpoint import Checkpoint, check_consistent, verify_checkpoint
from kolm_ledger.formats.dsse import Envelope, verify_signature
from kolm_ledger.formats.leaf import chain_next, entry_leaf_hash, statement_digest
from kolm_ledger.formats.merkle import CompactRange
from kolm_ledger.formats.receipts import Statement
from kolm_ledger.keys import TrustRoot, format_time
from kolm_ledger.storage import Entry, Store, micros
from kolm_ledger.storage.models import node_id
from kolm_ledger.timefmt import MAX_TIME_SKEW, check_receipt_time, receipt_time
from kolm_ledger.verify.trust import TrustState, check_key_policy

if TYPE_CHECKING:
    from kolm_ledger.service.client import LedgerClient

__all__ = ["AuditReport", "Failure", "audit", "audit_remote"]

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Failure:
    """One audit failure: the entry index (or ``None``), a checkpoint size, and why."""

    index: int | None
    reason: str
    checkpoint_size: int | None = None

    def __str__(self) -> str:
        if self.index is not None:
            return f"entry {self.index}: {self.reason}"
        if self.checkpoint_size is not None:
            return f"checkpoint {self.checkpoint_size}: {self.reason}"
        return f"tree: {self.reason}"


@dataclass
class AuditReport:
    """What an audit saw and what failed."""

    entries: int = 0
    checkpoints: int = 0
    by_kind: Counter[str] = field(default_factory=Counter)
    failures: list[Failure] = field(default_factory=list)
    root: bytes = b""
    size: int = 0
    newest_checkpoint: Checkpoint | None = None

    @property
    def ok(self) -> bool:
        """True when nothing failed."""
        return not self.failures

    def failing_indices(self) -> list[int]:
        """Sorted entry indices named by failures."""
        return sorted({f.index for f in self.failures if f.index is not None})


class _Walker:
    """Checks (1)-(5) and (7b) entry by entry; shared by the local and remote audits.

    ``local``: the whole database is at hand, so also recompute every interior node (6),
    every batch's checkpoint (8) and the subject index (9).
    """

    def __init__(
        self,
        trust: TrustRoot,
        cps: dict[int, Checkpoint],
        rep: AuditReport,
        local: bool,
        skew: timedelta = MAX_TIME_SKEW,
    ) -> None:
        self.state = TrustState(trust)
        self.skew = skew
        # statement digest -> the index of the entry that holds it (one statement, one entry)
        self.statements: dict[bytes, int] = {}
        self.cps = cps
        self.rep = rep
        self.tree = CompactRange.empty()
        self.chain = bytes(32)
        self.expected = 0
        self.local = local
        self.recomputed: dict[int, bytes] = {}
        self.subjects: dict[int, set[str] | None] = {}  # None: the statement did not parse
        self.last_time: datetime | None = None
        self.roots: dict[int, bytes] = {}

    def feed(self, e: Entry) -> None:
        rep, fail = self.rep, self.rep.failures.append
        # (1) continuity
        if e.index != self.expected:
            for missing in range(self.expected, min(e.index, self.expected + 1000)):
                fail(Failure(missing, "entry is missing (deleted or never written)"))
            self.expected = e.index  # keep walking; roots will not match past the gap
        self.expected += 1
        rep.entries += 1
        # (1) integration times never go back (the sequencer clamps; a moved time shows)
        if self.last_time is not None and e.integrated_at < self.last_time:
            fail(
                Failure(
                    e.index,
                    f"integration time {format_time(e.integrated_at)} goes back before the "
                    f"previous entry's {format_time(self.last_time)}",
                )
            )
        # (3) the leaf binds the envelope and its integration time
        try:
            leaf = entry_leaf_hash(e.envelope, micros(e.integrated_at))
        except KolmError as err:
            fail(Failure(e.index, f"integration time cannot be in a leaf: {err}"))
            leaf = e.leaf_hash
        if self.local:
            self.subjects[e.index] = None
        # (3) leaf hash
        if leaf != e.leaf_hash:
            fail(
                Failure(
                    e.index,
                    f"stored leaf hash {e.leaf_hash.hex()[:16]} != recomputed {leaf.hex()[:16]}",
                )
            )
        try:
            # (2) parse, canonical form
            env = Envelope.from_bytes(e.envelope)
            if env.canonical() != e.envelope:
                raise KolmError("stored envelope is not in RFC 8785 canonical form")
            st = Statement.from_envelope(env)
            rep.by_kind[st.kind] += 1
            if st.kind != e.kind:
                raise KolmError(f"stored kind {e.kind!r} but the statement is {st.kind!r}")
            if self.local:
                self.subjects[e.index] = set(st.subject_digests())
            # (4) key, signature, role, validity at integration time
            if len(env.signatures) != 1:
                raise KolmError(f"envelope has {len(env.signatures)} signatures, want 1")
            if e.key_id != env.signatures[0].keyid:
                raise KolmError(
                    f"stored key id {e.key_id[:16]} but the envelope is signed by "
                    f"{env.signatures[0].keyid[:16]}"
                )
            # (2) one statement, one entry
            digest = statement_digest(env)
            first = self.statements.setdefault(digest, e.index)
            if first != e.index:
                raise KolmError(
                    f"repeats the statement (payload and key id) of entry {first}: one "
                    "statement, one entry"
                )
            if self.local and e.statement_digest != digest:
                raise KolmError(
                    "stored statement digest column differs from the one recomputed "
                    "from the envelope"
                )
            key = self.state.get(env.signatures[0].keyid)
            if st.kind == "key":
                # the fold's own step (trust.fold_key_receipts: signature, key policy, then
                # the change), so the audit judges later entries by the trust state every
                # reader folds, even past a key receipt it flags below
                self.state = self.state.admit(env, e.integrated_at)
            else:
                verify_signature(env, key.public_key)
                check_key_policy(key, st.kind, e.integrated_at)
            check_receipt_time(
                receipt_time(st.predicate),
                not_before=key.not_before,
                integrated_at=e.integrated_at,
                skew=self.skew,
            )
        except KolmError as err:
            fail(Failure(e.index, str(err)))
        # (5) chain
        self.chain = chain_next(self.chain, leaf)
        if self.chain != e.chain_hash:
            fail(Failure(e.index, "hash chain does not link (stored chain hash differs)"))
            self.chain = e.chain_hash  # resync so only the entries that break it are named
        # (8) a new integration time starts a new batch: the previous one needs its checkpoint
        if self.local and self.last_time not in (None, e.integrated_at):
            self._check_batch_end(e.index)
        self.last_time = e.integrated_at
        for lv, i, h in self.tree.append(leaf):
            if self.local:
                self.recomputed[node_id(lv, i)] = h
        # (7b) roots at checkpoint sizes
        size = self.tree.size
        cp = self.cps.get(size)
        if cp is not None:
            root = self.tree.root()
            self.roots[size] = root
            if root != cp.root:
                fail(
                    Failure(
                        None,
                        f"Merkle root recomputed at size {size} is "
                        f"{root.hex()[:16]}, the checkpoint says {cp.root.hex()[:16]}",
                        size,
                    )
                )
            if self.chain != cp.chain_head:
                fail(
                    Failure(None, f"chain head at size {size} differs from the checkpoint's", size)
                )

    def _check_batch_end(self, size: int) -> None:
        if size not in self.cps:
            self.rep.failures.append(
                Failure(
                    None,
                    f"a batch ends at entry {size - 1} (the next entry was integrated at "
                    "another time), but there is no valid signed checkpoint of this size "
                    "(deleted or forged)",
                    size,
                )
            )

    def finish(self, newest: int) -> None:
        rep, fail = self.rep, self.rep.failures.append
        rep.size = self.tree.size
        rep.root = self.tree.root()
        if self.local and self.expected and newest >= self.expected:
            self._check_batch_end(self.expected)
        # (8) coverage
        if newest > self.expected:
            fail(
                Failure(
                    self.expected,
                    f"entry is missing: checkpoint of size {newest} covers "
                    f"{newest - self.expected} more entries than the log "
                    "holds",
                    newest,
                )
            )
        elif self.expected > newest:
            fail(
                Failure(
                    newest,
                    f"entries {newest}..{self.expected - 1} are not covered by any "
                    "signed checkpoint",
                )
            )


def audit(
    store: Store,
    trust: TrustRoot,
    *,
    origin: str | None = None,
    progress: Progress | None = None,
    state_path: str | os.PathLike[str] | None = None,
    max_time_skew: timedelta = MAX_TIME_SKEW,
) -> AuditReport:
    """Audit ``store`` against ``trust``; see the module docstring for the numbered checks.

    ``max_time_skew``: how far a receipt's own ``time`` may lie after its integration time
    (the ledger's ``--max-time-skew``).

    With ``state_path``, as in :func:`audit_remote`: the newest checkpoint must extend the
    one remembered there (same root recomputed at its size), so a database truncated or
    rewritten back to an older, validly signed state is caught; on success it is saved.
    """
    rep = AuditReport()
    fail = rep.failures.append
    total = store.size()

    # (7a) checkpoints: signatures and stored columns, before the walk
    cps: dict[int, Checkpoint] = {}
    for sc in store.checkpoints():
        rep.checkpoints += 1
        try:
            cp = verify_checkpoint(sc.note, trust, origin=origin).checkpoint
        except KolmError as err:
            fail(Failure(None, f"checkpoint signature: {err}", sc.size))
            continue
        if (cp.size, cp.root, cp.chain_head) != (sc.size, sc.root, sc.chain_head):
            fail(
                Failure(None, "stored size/root/chain columns differ from the signed note", sc.size)
            )
        cps[cp.size] = cp
    newest = max(cps) if cps else 0
    rep.newest_checkpoint = cps.get(newest)
    state = Path(state_path) if state_path else None
    old = _load_state(state, trust, origin, newest, rep)
    if old is False:
        return rep
    if isinstance(old, Checkpoint) and old.size > 0:
        mine = cps.get(old.size)
        if mine is not None and (mine.root, mine.chain_head) != (old.root, old.chain_head):
            fail(
                Failure(
                    None,
                    f"checkpoint of size {old.size} differs from the remembered one "
                    "(history was rewritten)",
                    old.size,
                )
            )
        cps.setdefault(old.size, old)

    w = _Walker(trust, cps, rep, local=True, skew=max_time_skew)
    for e in store.entries():
        w.feed(e)
        if progress is not None and rep.entries % 1000 == 0:
            progress(rep.entries, total)
    w.finish(newest)
    # (6) stored interior nodes
    _check_nodes(store, w.recomputed, rep)
    # (9) the subject index
    _check_subjects(store, w.subjects, rep)
    if progress is not None:
        progress(rep.entries, total)
    latest = store.latest_checkpoint()
    if rep.newest_checkpoint is not None and latest is not None:
        _save_state(state, latest.note, rep.newest_checkpoint, rep)
    return rep


def _load_state(
    state: Path | None, trust: TrustRoot, origin: str | None, newest: int, rep: AuditReport
) -> Checkpoint | bool | None:
    """The remembered checkpoint (None if no state yet); False after recording a failure."""
    if state is None or not state.exists():
        return None
    try:
        old = verify_checkpoint(
            json.loads(state.read_text())["note"].encode(), trust, origin=origin
        ).checkpoint
    except (KolmError, ValueError, KeyError) as err:
        rep.failures.append(
            Failure(None, f"state file {state}: cannot use the remembered checkpoint: {err}")
        )
        return False
    if old.size > newest:
        rep.failures.append(
            Failure(
                None,
                f"log shrank: remembered checkpoint has size {old.size}, the ledger now says "
                f"{newest}",
                newest,
            )
        )
        return False
    return old


def _save_state(state: Path | None, note: bytes, cp: Checkpoint, rep: AuditReport) -> None:
    """Remember ``cp`` (atomically) once an audit passed."""
    if not rep.ok or state is None:
        return
    tmp = state.with_name(state.name + ".tmp")
    tmp.write_text(
        json.dumps(
            {"origin": cp.origin, "size": cp.size, "root": cp.root.hex(), "note": note.decode()},
            indent=2,
            sort_keys=True,
        )
        + "\n"
    )
    os.replace(tmp, state)


def _check_nodes(store: Store, recomputed: dict[int, bytes], rep: AuditReport) -> None:
    seen: set[int] = set()
    for lv, i, h in store.node_hashes(0, 1 << 62):
        nid = node_id(lv, i)
        seen.add(nid)
        want = recomputed.get(nid)
        span = f"over entries {i << lv}..{((i + 1) << lv) - 1}"
        if want is None:
            rep.failures.append(
                Failure(
                    None,
                    f"stored Merkle node (level {lv}, index {i}) {span} has no leaves under it",
                )
            )
        elif want != h:
            rep.failures.append(
                Failure(
                    None,
                    f"stored Merkle node (level {lv}, index {i}) {span} "
                    "differs from the one recomputed from the leaves",
                )
            )
    for nid in recomputed.keys() - seen:
        lv, i = nid >> 48, nid & ((1 << 48) - 1)
        rep.failures.append(
            Failure(
                None,
                f"Merkle node (level {lv}, index {i}) over entries "
                f"{i << lv}..{((i + 1) << lv) - 1} is missing",
            )
        )


def _check_subjects(store: Store, want: dict[int, set[str] | None], rep: AuditReport) -> None:
    """Compare the stored subject index with the subjects of the statements that parsed."""
    stored: dict[int, set[str]] = {}
    for idx, digest in store.subject_index():
        stored.setdefault(idx, set()).add(digest)
    for idx in sorted(stored.keys() | want.keys()):
        if idx not in want:
            rep.failures.append(
                Failure(idx, "the subject index names this entry, which does not exist")
            )
            continue
        subjects = want[idx]
        if subjects is None:  # the statement did not parse; already reported
            continue
        have = stored.get(idx, set())
        if have != subjects:
            extra, missing = sorted(have - subjects), sorted(subjects - have)
            rep.failures.append(
                Failure(
                    idx,
                    "subject index differs from the statement: "
                    + ", ".join(
                        [f"lists {d[:16]} it does not name" for d in extra]
                        + [f"lacks {d[:16]}" for d in missing]
                    ),
                )
            )


def audit_remote(
    client: LedgerClient,
    trust: TrustRoot,
    *,
    state_path: str | os.PathLike[str] | None = None,
    origin: str | None = None,
    progress: Progress | None = None,
    max_time_skew: timedelta = MAX_TIME_SKEW,
) -> AuditReport:
    """Audit a ledger over gRPC, verifying everything client-side.

    Checks (1)-(5) and (8) on every streamed entry, (7) on the newest checkpoint, and —
    when ``state_path`` holds the checkpoint the previous audit verified — that the new
    checkpoint is consistent with it (a consistency proof from the server, and the root
    recomputed at the old size), so a ledger that rewrote or forked history is caught.
    On success the newest checkpoint is saved to ``state_path`` (atomically).
    """
    rep = AuditReport()
    fail = rep.failures.append
    try:
        signed = client.checkpoint()
    except NotFoundError as err:  # an empty log: fine, unless an earlier audit saw entries
        if state_path is not None and Path(state_path).exists():
            fail(
                Failure(
                    None,
                    f"log shrank: {state_path} remembers a checkpoint, but the ledger now "
                    f"has none ({err})",
                    0,
                )
            )
        return rep
    try:
        cp = verify_checkpoint(signed.to_bytes(), trust, origin=origin).checkpoint
    except KolmError as err:
        fail(Failure(None, f"checkpoint signature: {err}", signed.checkpoint.size))
        return rep
    rep.checkpoints = 1
    rep.newest_checkpoint = cp
    cps = {cp.size: cp}
    state = Path(state_path) if state_path else None
    old = _load_state(state, trust, origin, cp.size, rep)
    if old is False:
        return rep
    if isinstance(old, Checkpoint) and old.size > 0:
        try:
            hashes, _ = client.consistency_proof(old.size, cp.size)
            check_consistent(old, cp, hashes)
        except KolmError as err:
            fail(
                Failure(
                    None,
                    f"checkpoint of size {cp.size} is not consistent with the "
                    f"remembered checkpoint of size {old.size}: {err}",
                    cp.size,
                )
            )
        cps.setdefault(old.size, old)
    w = _Walker(trust, cps, rep, local=False, skew=max_time_skew)
    for e in client.entries(0, cp.size):
        w.feed(e)
        if progress is not None and rep.entries % 1000 == 0:
            progress(rep.entries, cp.size)
    w.finish(cp.size)
    if progress is not None:
        progress(rep.entries, cp.size)
    _save_state(state, signed.to_bytes(), cp, rep)
    return rep
