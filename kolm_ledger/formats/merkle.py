"""RFC 6962 / RFC 9162 Merkle tree: hashing, compact ranges, proofs and their verification.

The ledger's tree is the log tree of RFC 9162 §2.1: leaves are hashed as
``SHA-256(0x00 || data)``, interior nodes as ``SHA-256(0x01 || left || right)``, and the
tree of ``n`` leaves splits at the largest power of two below ``n``.

Nodes are named by :data:`NodeID` ``(level, index)``: the *perfect* subtree of
``2**level`` leaves starting at leaf ``index * 2**level``. Only perfect nodes are ever
stored; the hash of a non-perfect subtree on the right edge of a tree (an *ephemeral*
node) is folded from the perfect nodes that cover it. A :class:`ProofPlan` says which
stored nodes a proof needs, so that storage can answer every read of one proof in a
single query, and :func:`assemble` folds the ephemeral node. The design follows
transparency-dev/merkle (``compact``, ``proof/proof.go``, ``proof/verify.go``).

Errors: malformed hashes (wrong length) raise :class:`~kolm_ledger.errors.ProofFormatError`;
proofs that do not verify raise :class:`~kolm_ledger.errors.InclusionProofError` or
:class:`~kolm_ledger.errors.ConsistencyProofError` (``verify_*`` raise only those);
arguments that break a documented precondition of a non-verifying function (an index
past the tree size, a plan and hashes that do not match) raise
:class:`~kolm_ledger.errors.InvalidInput`. Sizes and indices are always checked before
any hashing.

Example::

    >>> tree = MemoryTree()
    >>> for i in range(5):
    ...     tree.append(hash_leaf(b"entry %d" % i))
    >>> proof = tree.inclusion_proof(3, 5)
    >>> verify_inclusion(3, 5, hash_leaf(b"entry 3"), proof, tree.root())
    >>> verify_consistency(2, 5, tree.consistency_proof(2, 5), tree.root(2), tree.root())
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kolm_ledger.errors import (
    ConsistencyProofError,
    InclusionProofError,
    InvalidInput,
    ProofFormatError,
)

__all__ = [
    "HASH_SIZE",
    "CompactRange",
    "GetNodes",
    "MemoryTree",
    "NodeID",
    "ProofPlan",
    "assemble",
    "consistency_plan",
    "consistency_proof",
    "empty_root",
    "hash_children",
    "hash_leaf",
    "inclusion_plan",
    "inclusion_proof",
    "peak_ids",
    "root_from_inclusion_proof",
    "root_from_leaves",
    "root_from_peaks",
    "root_plan",
    "verify_consistency",
    "verify_inclusion",
]

HASH_SIZE = 32
"""Size in bytes of every leaf, node and root hash (SHA-256)."""

NodeID = tuple[int, int]
"""``(level, index)``: the perfect subtree of ``2**level`` leaves starting at leaf
``index * 2**level``. Level 0 is a leaf hash."""

GetNodes = Callable[[Sequence[NodeID]], Sequence[bytes]]
"""Reads the hashes of the given stored nodes, in the order asked (one storage query)."""

_sha256 = hashlib.sha256
_LEAF_PREFIX = b"\x00"
_NODE_PREFIX = b"\x01"
_EMPTY_ROOT = _sha256(b"").digest()


# --------------------------------------------------------------------------------------
# Hashing


def hash_leaf(data: bytes) -> bytes:
    """Return the RFC 6962 leaf hash ``SHA-256(0x00 || data)``."""
    return _sha256(_LEAF_PREFIX + data).digest()


def hash_children(left: bytes, right: bytes) -> bytes:
    """Return the RFC 6962 interior node hash ``SHA-256(0x01 || left || right)``.

    Requires both hashes to be :data:`HASH_SIZE` bytes (not checked: this is the hot path;
    callers that take hashes from outside check them first).
    """
    return _sha256(_NODE_PREFIX + left + right).digest()


def empty_root() -> bytes:
    """Return the root of the empty tree, ``SHA-256("")``."""
    return _EMPTY_ROOT


def root_from_leaves(leaf_hashes: Sequence[bytes]) -> bytes:
    """Return the RFC 6962 Merkle tree hash (MTH) of the given leaf hashes.

    A plain reference implementation for tests and small trees: O(n) time and memory.
    Pairs nodes level by level and promotes an odd last node unchanged, which builds
    exactly the tree of RFC 9162 §2.1.1. Requires every leaf hash to be
    :data:`HASH_SIZE` bytes.
    """
    if not leaf_hashes:
        return _EMPTY_ROOT
    _check_hashes(leaf_hashes, "leaf hash")
    level = list(leaf_hashes)
    while len(level) > 1:
        paired = [hash_children(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) & 1:
            paired.append(level[-1])
        level = paired
    return level[0]


def _check_hash(h: bytes, what: str) -> None:
    if len(h) != HASH_SIZE:
        raise ProofFormatError(f"{what} has {len(h)} bytes, want {HASH_SIZE}")


def _check_hashes(hashes: Sequence[bytes], what: str) -> None:
    for i, h in enumerate(hashes):
        if len(h) != HASH_SIZE:
            raise ProofFormatError(f"{what} {i} has {len(h)} bytes, want {HASH_SIZE}")


# --------------------------------------------------------------------------------------
# Compact ranges


def peak_ids(size: int) -> list[NodeID]:
    """Return the node ids of the compact range ``[0, size)``, left to right.

    These are the roots of the perfect subtrees whose hashes, folded right to left, give
    the root of the tree of ``size`` leaves: one per set bit of ``size``, in decreasing
    level. Requires ``size >= 0``.
    """
    if size < 0:
        raise InvalidInput(f"tree size {size} is negative")
    ids: list[NodeID] = []
    start = 0
    for level in range(size.bit_length() - 1, -1, -1):
        if (size >> level) & 1:
            ids.append((level, start >> level))
            start += 1 << level
    return ids


def root_plan(size: int) -> list[NodeID]:
    """Return the stored nodes whose hashes give the root at ``size`` (see :func:`peak_ids`).

    Feed their hashes, in order, to :func:`root_from_peaks`. Requires ``size >= 0``.
    """
    return peak_ids(size)


def root_from_peaks(peaks: Sequence[bytes]) -> bytes:
    """Fold the hashes of a compact range ``[0, size)`` (left to right) into the tree root.

    Returns :func:`empty_root` for no peaks. Requires the peaks to be the hashes of
    ``peak_ids(size)`` in that order.
    """
    if not peaks:
        return _EMPTY_ROOT
    root = peaks[-1]
    for i in range(len(peaks) - 2, -1, -1):
        root = hash_children(peaks[i], root)
    return root


class CompactRange:
    """The compact range ``[0, size)``: the peaks of the tree of ``size`` leaves.

    ``peaks`` holds the hashes of the perfect subtrees of :func:`peak_ids` (``size``),
    left to right, so ``len(peaks) == popcount(size)``. Appending a leaf is O(log n) and
    reports the interior nodes it completed, which is all storage needs to persist.
    Build one with :meth:`empty` or :meth:`from_peaks`.
    """

    __slots__ = ("peaks", "size")

    size: int
    peaks: list[bytes]

    def __init__(self) -> None:
        """Create the empty range; prefer :meth:`empty` or :meth:`from_peaks`."""
        self.size = 0
        self.peaks = []

    @classmethod
    def empty(cls) -> CompactRange:
        """Return the compact range of the empty tree."""
        return cls()

    @classmethod
    def from_peaks(cls, size: int, peaks: Sequence[bytes]) -> CompactRange:
        """Return the compact range ``[0, size)`` with the given peak hashes.

        Requires ``size >= 0``, ``len(peaks) == popcount(size)`` and every peak to be
        :data:`HASH_SIZE` bytes; raises :class:`ProofFormatError` otherwise.
        """
        if size < 0:
            raise ProofFormatError(f"compact range size {size} is negative")
        want = size.bit_count()
        if len(peaks) != want:
            raise ProofFormatError(
                f"compact range of size {size} has {len(peaks)} peaks, want {want}"
            )
        _check_hashes(peaks, "peak")
        cr = cls()
        cr.size = size
        cr.peaks = list(peaks)
        return cr

    def append(self, leaf_hash: bytes) -> list[tuple[int, int, bytes]]:
        """Append one leaf hash; return the interior nodes this completed.

        Each returned ``(level, index, hash)`` has ``level >= 1`` and is listed bottom
        up; the leaf itself, node ``(0, old size)``, is not listed. Requires
        ``len(leaf_hash) == HASH_SIZE`` (else :class:`ProofFormatError`). O(log n).
        """
        if len(leaf_hash) != HASH_SIZE:
            raise ProofFormatError(f"leaf hash has {len(leaf_hash)} bytes, want {HASH_SIZE}")
        peaks = self.peaks
        index = self.size
        h = leaf_hash
        level = 0
        completed: list[tuple[int, int, bytes]] = []
        # Every trailing 1 bit of the old size is a peak that now has a right sibling.
        while index & 1:
            h = _sha256(_NODE_PREFIX + peaks.pop() + h).digest()
            index >>= 1
            level += 1
            completed.append((level, index, h))
        peaks.append(h)
        self.size += 1
        return completed

    def root(self) -> bytes:
        """Return the root of the tree of ``size`` leaves (:func:`empty_root` for 0)."""
        return root_from_peaks(self.peaks)

    def copy(self) -> CompactRange:
        """Return an independent copy."""
        cr = CompactRange()
        cr.size = self.size
        cr.peaks = self.peaks.copy()
        return cr

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CompactRange):
            return NotImplemented
        return self.size == other.size and self.peaks == other.peaks

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"CompactRange(size={self.size}, peaks=[{', '.join(p.hex() for p in self.peaks)}])"


# --------------------------------------------------------------------------------------
# Proof plans (which stored nodes a proof needs)


@dataclass(frozen=True, slots=True)
class ProofPlan:
    """Which stored (perfect) nodes a proof needs, and how to fold the ephemeral one.

    ``ids`` lists the nodes in proof order (bottom up). ``ids[begin:end]``, when longer
    than one, covers the ephemeral node — a non-perfect subtree on the right edge of the
    tree — ordered right to left (increasing level); :func:`assemble` folds it into one
    hash, as ``proof.Nodes.Rehash`` does in transparency-dev/merkle. ``begin == end``
    when there is no ephemeral node. A plan never has more than ``2 * log2(size) + 1``
    ids, so a proof costs one O(log n) storage query.
    """

    ids: tuple[NodeID, ...]
    begin: int
    end: int

    @property
    def proof_len(self) -> int:
        """Number of hashes in the assembled proof."""
        return len(self.ids) - max(0, self.end - self.begin - 1)


_EMPTY_PLAN = ProofPlan((), 0, 0)


def _plan(level: int, index: int, size: int, with_seed: bool) -> ProofPlan:
    """Plan the proof that perfect node ``(level, index)`` is in the tree of ``size``.

    Requires the node to lie inside ``[0, size)``. If ``with_seed``, the node itself
    comes first. Mirrors ``nodes()`` in transparency-dev/merkle ``proof/proof.go``.
    """
    # The `fork` is the seed's ancestor where its path from the root leaves the path to
    # leaf `size`; its right sibling is the ephemeral node covering [end, size). `inner`
    # is how many levels above the seed the fork is.
    inner = (index ^ (size >> level)).bit_length() - 1
    fork_level = level + inner
    begin = (index >> inner) << fork_level  # first leaf under the fork
    end = begin + (1 << fork_level)  # first leaf under its (ephemeral) sibling

    ids: list[NodeID] = [(level, index)] if with_seed else []
    # Siblings on the path from the seed up to the fork: all perfect, inside [0, size).
    for k in range(inner):
        ids.append((level + k, (index >> k) ^ 1))
    # The compact range [end, size), right to left: folds into the ephemeral node.
    eph_begin = len(ids)
    pos = size
    rest = size - end
    while rest:
        low = rest & -rest
        pos -= low
        lvl = low.bit_length() - 1
        ids.append((lvl, pos >> lvl))
        rest ^= low
    eph_end = len(ids)
    # The compact range [0, begin), right to left: the left siblings above the fork.
    pos = begin
    rest = begin
    while rest:
        low = rest & -rest
        pos -= low
        lvl = low.bit_length() - 1
        ids.append((lvl, pos >> lvl))
        rest ^= low
    if eph_end - eph_begin < 1:
        eph_begin = eph_end = 0
    return ProofPlan(tuple(ids), eph_begin, eph_end)


def inclusion_plan(index: int, size: int) -> ProofPlan:
    """Plan the inclusion proof of leaf ``index`` in the tree of ``size`` leaves.

    Requires ``0 <= index < size`` (else :class:`InvalidInput`).
    """
    if not 0 <= index < size:
        raise InvalidInput(f"leaf index {index} out of range for tree size {size}")
    return _plan(0, index, size, with_seed=False)


def consistency_plan(size1: int, size2: int) -> ProofPlan:
    """Plan the consistency proof from the tree of ``size1`` leaves to that of ``size2``.

    Requires ``0 < size1 <= size2`` (else :class:`InvalidInput`); ``size1 == size2``
    gives the empty plan.
    """
    if not 0 < size1 <= size2:
        raise InvalidInput(f"consistency proof needs 0 < size1 <= size2, got {size1}, {size2}")
    if size1 == size2:
        return _EMPTY_PLAN
    # The seed is the largest perfect subtree ending at size1 (RFC 9162 §2.1.4.1). When
    # size1 is a power of two the seed is the whole old tree, whose root the verifier
    # already has, so it is left out.
    level = (size1 & -size1).bit_length() - 1
    index = (size1 - 1) >> level
    return _plan(level, index, size2, with_seed=index != 0)


def assemble(plan: ProofPlan, hashes: Sequence[bytes]) -> list[bytes]:
    """Turn the hashes of ``plan.ids`` into the proof, folding the ephemeral node.

    Requires ``len(hashes) == len(plan.ids)`` with ``hashes[i]`` the hash of
    ``plan.ids[i]`` (else :class:`InvalidInput`).
    """
    n = len(plan.ids)
    if len(hashes) != n:
        raise InvalidInput(f"got {len(hashes)} node hashes for a plan of {n} nodes")
    begin, end = plan.begin, plan.end
    if end - begin <= 1:
        return list(hashes)
    h = hashes[begin]
    for i in range(begin + 1, end):
        h = _sha256(_NODE_PREFIX + hashes[i] + h).digest()
    proof = list(hashes[:begin])
    proof.append(h)
    proof.extend(hashes[end:])
    return proof


def inclusion_proof(index: int, size: int, get_nodes: GetNodes) -> list[bytes]:
    """Build the inclusion proof of leaf ``index`` in the tree of ``size`` leaves.

    Reads all stored nodes with one ``get_nodes`` call. Requires ``0 <= index < size``
    (else :class:`InvalidInput`) and ``get_nodes`` to know every node of that tree.
    """
    plan = inclusion_plan(index, size)
    return assemble(plan, get_nodes(plan.ids))


def consistency_proof(size1: int, size2: int, get_nodes: GetNodes) -> list[bytes]:
    """Build the consistency proof between the trees of ``size1`` and ``size2`` leaves.

    Reads all stored nodes with at most one ``get_nodes`` call. Requires
    ``0 < size1 <= size2`` (else :class:`InvalidInput`) and ``get_nodes`` to know every
    node of the tree of ``size2``.
    """
    plan = consistency_plan(size1, size2)
    if not plan.ids:
        return []
    return assemble(plan, get_nodes(plan.ids))


# --------------------------------------------------------------------------------------
# Verification (RFC 9162 §2.1.3.2 and §2.1.4.2, in the transparency-dev/merkle form)


def _decompose(index: int, size: int) -> tuple[int, int]:
    """Split the inclusion proof of ``index`` in a tree of ``size`` into (inner, border).

    ``inner`` hashes lie below the point where the paths to ``index`` and ``size - 1``
    meet (each may be a left or right sibling); ``border`` hashes above it are all left
    siblings. Requires ``0 <= index < size``.
    """
    inner = (index ^ (size - 1)).bit_length()
    return inner, (index >> inner).bit_count()


def root_from_inclusion_proof(
    index: int, size: int, leaf_hash: bytes, proof: Sequence[bytes]
) -> bytes:
    """Compute the root implied by an inclusion proof of ``leaf_hash`` at ``index``.

    Requires ``0 <= index < size`` and a proof of exactly the length RFC 9162 gives for
    that pair (else :class:`InclusionProofError`), and the leaf hash and every proof hash
    to be :data:`HASH_SIZE` bytes (else :class:`ProofFormatError`). The caller compares
    the result with a trusted root; :func:`verify_inclusion` does both.

    Steps:
      1. check ``0 <= index < size``;
      2. check the leaf hash size;
      3. check the proof length: ``inner`` + ``border`` hashes (see ``_decompose``);
      4. check every proof hash size;
      5. hash up the inner part, taking each sibling on the side the index bit says;
      6. hash up the border part, every sibling on the left.
    """
    # (1)
    if not 0 <= index < size:
        raise InclusionProofError(f"leaf index {index} out of range for tree size {size}")
    # (2)
    _check_hash(leaf_hash, "leaf hash")
    # (3)
    inner, border = _decompose(index, size)
    if len(proof) != inner + border:
        raise InclusionProofError(
            f"inclusion proof has {len(proof)} hashes, want {inner + border}"
            f" (index {index}, tree size {size})"
        )
    # (4)
    _check_hashes(proof, "inclusion proof hash")
    # (5)
    h = leaf_hash
    for i in range(inner):
        if (index >> i) & 1:
            h = _sha256(_NODE_PREFIX + proof[i] + h).digest()
        else:
            h = _sha256(_NODE_PREFIX + h + proof[i]).digest()
    # (6)
    for i in range(inner, inner + border):
        h = _sha256(_NODE_PREFIX + proof[i] + h).digest()
    return h


def verify_inclusion(
    index: int, size: int, leaf_hash: bytes, proof: Sequence[bytes], root: bytes
) -> None:
    """Check that ``leaf_hash`` is leaf ``index`` of the tree of ``size`` with ``root``.

    Requires ``0 <= index < size``. Raises :class:`InclusionProofError` on any failure,
    malformed input included; returns ``None`` when the proof verifies.

    Steps:
      1. compute the root from the proof (:func:`root_from_inclusion_proof`);
      2. compare it with ``root``.
    """
    # (1)
    try:
        computed = root_from_inclusion_proof(index, size, leaf_hash, proof)
    except ProofFormatError as e:
        raise InclusionProofError(str(e)) from e
    # (2)
    if computed != root:
        raise InclusionProofError(f"computed root {computed.hex()}, want {root.hex()}")


def verify_consistency(
    size1: int, size2: int, proof: Sequence[bytes], root1: bytes, root2: bytes
) -> None:
    """Check that the tree of ``size2`` with ``root2`` extends that of ``size1`` with ``root1``.

    Requires ``0 < size1 <= size2`` (a consistency proof from the empty tree proves
    nothing, so ``size1 == 0`` fails). Raises :class:`ConsistencyProofError` on any
    failure, malformed input included; returns ``None`` when the proof verifies.

    Steps:
      1. check ``0 < size1 <= size2``;
      2. if ``size1 == size2``: the proof must be empty and the roots equal; done;
      3. find the seed, the largest perfect subtree ending at ``size1``; its hash is
         ``root1`` if ``size1`` is a power of two, else the first proof hash;
      4. check the proof length: (seed) + ``inner`` + ``border`` hashes of the seed's
         inclusion proof in the tree of ``size2``;
      5. check every proof hash size;
      6. hash up from the seed using only left siblings: must give ``root1``;
      7. hash up from the seed using all siblings: must give ``root2``.
    """
    # (1)
    if size1 <= 0:
        raise ConsistencyProofError(
            f"consistency proof from tree size {size1} is meaningless, want size1 > 0"
        )
    if size2 < size1:
        raise ConsistencyProofError(f"tree size2 {size2} is smaller than size1 {size1}")
    # (2)
    if size1 == size2:
        if proof:
            raise ConsistencyProofError(
                f"consistency proof has {len(proof)} hashes, want 0 (size1 == size2 == {size1})"
            )
        if root1 != root2:
            raise ConsistencyProofError(
                f"root1 {root1.hex()} differs from root2 {root2.hex()} at equal size {size1}"
            )
        return
    # (3)
    level = (size1 & -size1).bit_length() - 1
    mask = (size1 - 1) >> level  # the seed's index at its level
    seeded = mask != 0
    # (4)
    inner, border = _decompose(size1 - 1, size2)
    inner -= level
    want = seeded + inner + border
    if len(proof) != want:
        raise ConsistencyProofError(
            f"consistency proof has {len(proof)} hashes, want {want} (size1 {size1}, size2 {size2})"
        )
    # (5)
    try:
        _check_hashes(proof, "consistency proof hash")
    except ProofFormatError as e:
        raise ConsistencyProofError(str(e)) from e
    seed = proof[0] if seeded else root1
    path = proof[1:] if seeded else proof
    # (6) and (7), in one pass.
    h1 = h2 = seed
    for i in range(inner):
        if (mask >> i) & 1:
            h1 = _sha256(_NODE_PREFIX + path[i] + h1).digest()
            h2 = _sha256(_NODE_PREFIX + path[i] + h2).digest()
        else:
            h2 = _sha256(_NODE_PREFIX + h2 + path[i]).digest()
    for i in range(inner, inner + border):
        h1 = _sha256(_NODE_PREFIX + path[i] + h1).digest()
        h2 = _sha256(_NODE_PREFIX + path[i] + h2).digest()
    if h1 != root1:
        raise ConsistencyProofError(f"computed root1 {h1.hex()}, want {root1.hex()}")
    if h2 != root2:
        raise ConsistencyProofError(f"computed root2 {h2.hex()}, want {root2.hex()}")


# --------------------------------------------------------------------------------------
# In-memory node store


class MemoryTree:
    """An in-memory log tree storing every perfect node, for tests and benchmarks.

    ``levels[level][index]`` is the hash of node ``(level, index)``. Proofs and roots at
    any past size are built from stored nodes in O(log n).
    """

    __slots__ = ("_levels", "_range")

    def __init__(self) -> None:
        """Create an empty tree."""
        self._levels: list[list[bytes]] = [[]]
        self._range = CompactRange.empty()

    @property
    def size(self) -> int:
        """Number of leaves."""
        return self._range.size

    def append(self, leaf_hash: bytes) -> None:
        """Append one leaf hash. Requires ``len(leaf_hash) == HASH_SIZE``."""
        completed = self._range.append(leaf_hash)
        levels = self._levels
        levels[0].append(leaf_hash)
        for level, _index, h in completed:
            if level == len(levels):
                levels.append([])
            levels[level].append(h)

    def get_nodes(self, ids: Sequence[NodeID]) -> list[bytes]:
        """Return the hashes of the given stored nodes, in order.

        Requires every id to name a node already complete (else :class:`InvalidInput`).
        """
        levels = self._levels
        try:
            return [levels[level][index] for level, index in ids]
        except IndexError:
            missing = [
                (lv, ix) for lv, ix in ids if not (0 <= lv < len(levels) and ix < len(levels[lv]))
            ]
            raise InvalidInput(f"nodes not stored: {missing}") from None

    def root(self, size: int | None = None) -> bytes:
        """Return the root at ``size`` (default: the current size).

        Requires ``0 <= size <= self.size`` (else :class:`InvalidInput`). O(log n).
        """
        if size is None:
            return self._range.root()
        if not 0 <= size <= self._range.size:
            raise InvalidInput(f"tree size {size} out of range [0, {self._range.size}]")
        return root_from_peaks(self.get_nodes(peak_ids(size)))

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        """Return the inclusion proof of leaf ``index`` in the tree at ``size``.

        Requires ``0 <= index < size <= self.size`` (else :class:`InvalidInput`).
        """
        if size > self._range.size:
            raise InvalidInput(f"tree size {size} exceeds current size {self._range.size}")
        return inclusion_proof(index, size, self.get_nodes)

    def consistency_proof(self, size1: int, size2: int) -> list[bytes]:
        """Return the consistency proof between the trees at ``size1`` and ``size2``.

        Requires ``0 < size1 <= size2 <= self.size`` (else :class:`InvalidInput`).
        """
        if size2 > self._range.size:
            raise InvalidInput(f"tree size {size2} exceeds current size {self._range.size}")
        return consistency_proof(size1, size2, self.get_nodes)
