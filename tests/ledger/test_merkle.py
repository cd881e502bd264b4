"""Unit and property tests for kolm_ledger.formats.merkle (RFC 6962/9162 Merkle tree)."""

from __future__ import annotations

import doctest
import functools
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kolm_ledger.errors import (
    ConsistencyProofError,
    InclusionProofError,
    InvalidInput,
    ProofFormatError,
)
from kolm_ledger.formats import merkle
from kolm_ledger.formats.merkle import (
    HASH_SIZE,
    CompactRange,
    MemoryTree,
    NodeID,
    ProofPlan,
    assemble,
    consistency_plan,
    consistency_proof,
    empty_root,
    hash_children,
    hash_leaf,
    inclusion_plan,
    inclusion_proof,
    peak_ids,
    root_from_inclusion_proof,
    root_from_leaves,
    root_from_peaks,
    root_plan,
    verify_consistency,
    verify_inclusion,
)

MAX_SIZE = 300

# --------------------------------------------------------------------------------------
# Independent references: RFC 9162 §2.1 written recursively, straight from the text.


def _split(n: int) -> int:
    """Largest power of two smaller than n (n > 1)."""
    return 1 << ((n - 1).bit_length() - 1)


def ref_mth(d: Sequence[bytes]) -> bytes:
    if not d:
        return empty_root()
    if len(d) == 1:
        return d[0]
    k = _split(len(d))
    return hash_children(ref_mth(d[:k]), ref_mth(d[k:]))


def ref_path(m: int, d: Sequence[bytes]) -> list[bytes]:
    if len(d) == 1:
        return []
    k = _split(len(d))
    if m < k:
        return [*ref_path(m, d[:k]), ref_mth(d[k:])]
    return [*ref_path(m - k, d[k:]), ref_mth(d[:k])]


def ref_subproof(m: int, d: Sequence[bytes], b: bool) -> list[bytes]:
    n = len(d)
    if m == n:
        return [] if b else [ref_mth(d)]
    k = _split(n)
    if m <= k:
        return [*ref_subproof(m, d[:k], b), ref_mth(d[k:])]
    return [*ref_subproof(m - k, d[k:], False), ref_mth(d[:k])]


def ref_consistency(m: int, d: Sequence[bytes]) -> list[bytes]:
    return ref_subproof(m, d, True)


def perfect_nodes(size: int) -> set[NodeID]:
    """Every perfect node (level >= 1) of the tree of `size` leaves."""
    return {(level, i) for level in range(1, size.bit_length()) for i in range(size >> level)}


# --------------------------------------------------------------------------------------
# Shared data: one tree of MAX_SIZE leaves, proofs taken at every past size.

LEAVES = [hash_leaf(i.to_bytes(4, "big")) for i in range(MAX_SIZE)]


@functools.cache
def tree() -> MemoryTree:
    t = MemoryTree()
    for leaf in LEAVES:
        t.append(leaf)
    return t


@functools.cache
def roots() -> list[bytes]:
    """roots()[n] is the root of the first n leaves, by the iterative reference."""
    return [root_from_leaves(LEAVES[:n]) for n in range(MAX_SIZE + 1)]


def flip(h: bytes, bit: int) -> bytes:
    b = bytearray(h)
    b[(bit // 8) % len(b)] ^= 1 << (bit % 8)
    return bytes(b)


sizes = st.integers(min_value=1, max_value=MAX_SIZE)


@st.composite
def index_and_size(draw: st.DrawFn) -> tuple[int, int]:
    size = draw(sizes)
    return draw(st.integers(min_value=0, max_value=size - 1)), size


@st.composite
def size_pairs(draw: st.DrawFn) -> tuple[int, int]:
    size2 = draw(sizes)
    return draw(st.integers(min_value=1, max_value=size2)), size2


# --------------------------------------------------------------------------------------
# Hashing and roots


def test_known_hashes() -> None:
    # RFC 6962 reference data (certificate-transparency merkle_tree_test).
    assert empty_root().hex() == (
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )
    assert hash_leaf(b"").hex() == (
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"
    )
    data = ["", "00", "10", "2021", "3031", "40414243", "5051525354555657",
            "606162636465666768696a6b6c6d6e6f"]  # fmt: skip
    want = [
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    ]
    leaves = [hash_leaf(bytes.fromhex(x)) for x in data]
    for n in range(1, 9):
        assert root_from_leaves(leaves[:n]).hex() == want[n - 1]


def test_hash_domain_separation() -> None:
    a, b = LEAVES[0], LEAVES[1]
    assert hash_children(a, b) != hash_leaf(a + b)
    assert len(hash_leaf(b"x")) == len(hash_children(a, b)) == HASH_SIZE


def test_root_from_leaves_matches_recursive_reference() -> None:
    for n in range(0, 130):
        assert root_from_leaves(LEAVES[:n]) == ref_mth(LEAVES[:n]), n


def test_root_from_leaves_rejects_bad_hash() -> None:
    with pytest.raises(ProofFormatError, match="has 31 bytes, want 32"):
        root_from_leaves([LEAVES[0], LEAVES[1][:31]])


def test_peak_ids() -> None:
    assert peak_ids(0) == []
    assert peak_ids(1) == [(0, 0)]
    assert peak_ids(6) == [(2, 0), (1, 2)]
    assert peak_ids(7) == [(2, 0), (1, 2), (0, 6)]
    assert peak_ids(8) == [(3, 0)]
    assert root_plan(13) == peak_ids(13) == [(3, 0), (2, 2), (0, 12)]
    with pytest.raises(InvalidInput):
        peak_ids(-1)
    for size in range(0, 200):
        ids = peak_ids(size)
        # Perfect, adjacent, decreasing in level, covering exactly [0, size).
        start = 0
        for level, index in ids:
            assert index << level == start
            start += 1 << level
        assert start == size
        assert [lv for lv, _ in ids] == sorted((lv for lv, _ in ids), reverse=True)


def test_root_from_peaks() -> None:
    t = tree()
    assert root_from_peaks([]) == empty_root()
    for size in range(0, MAX_SIZE + 1):
        assert root_from_peaks(t.get_nodes(root_plan(size))) == roots()[size]


# --------------------------------------------------------------------------------------
# CompactRange


def test_compact_range_root_and_completed_nodes() -> None:
    cr = CompactRange.empty()
    assert cr.size == 0
    assert cr.peaks == []
    assert cr.root() == empty_root()
    for n, leaf in enumerate(LEAVES):
        completed = cr.append(leaf)
        # Naively: the perfect nodes of the tree of n + 1 leaves that size n lacks, bottom up.
        new = sorted(perfect_nodes(n + 1) - perfect_nodes(n))
        want = [(lv, i, ref_mth(LEAVES[i << lv : (i + 1) << lv])) for lv, i in new]
        assert completed == want, n
        assert cr.size == n + 1
        assert len(cr.peaks) == (n + 1).bit_count()
        assert cr.root() == roots()[n + 1]


def test_compact_range_from_peaks_copy_and_equality() -> None:
    cr = CompactRange.empty()
    for leaf in LEAVES[:11]:
        cr.append(leaf)
    again = CompactRange.from_peaks(cr.size, cr.peaks)
    assert again == cr
    assert again.peaks is not cr.peaks
    assert again.root() == roots()[11]
    snapshot = cr.copy()
    cr.append(LEAVES[11])
    assert snapshot.size == 11
    assert snapshot.root() == roots()[11]
    assert cr.root() == roots()[12]
    assert snapshot != cr
    assert CompactRange.from_peaks(0, []) == CompactRange.empty()
    assert "size=11" in repr(snapshot)


def test_compact_range_rejects_bad_input() -> None:
    with pytest.raises(ProofFormatError, match="has 2 peaks, want 3"):
        CompactRange.from_peaks(7, LEAVES[:2])
    with pytest.raises(ProofFormatError, match="has 1 peaks, want 0"):
        CompactRange.from_peaks(0, LEAVES[:1])
    with pytest.raises(ProofFormatError):
        CompactRange.from_peaks(-1, [])
    with pytest.raises(ProofFormatError, match="peak 1 has 33 bytes"):
        CompactRange.from_peaks(3, [LEAVES[0], LEAVES[1] + b"\x00"])
    cr = CompactRange.empty()
    with pytest.raises(ProofFormatError, match="leaf hash has 0 bytes, want 32"):
        cr.append(b"")
    assert cr.size == 0


# --------------------------------------------------------------------------------------
# Proof plans


def _covers(ids: Sequence[NodeID], size: int) -> bool:
    return all(index >= 0 and (index + 1) << level <= size for level, index in ids)


def test_plans_small_cases() -> None:
    assert inclusion_plan(0, 1) == ProofPlan((), 0, 0)
    # Leaf 2 of 3: sibling of the leaf is beyond the tree, so the proof is [node (1, 0)].
    assert inclusion_plan(2, 3) == ProofPlan(((1, 0),), 0, 0)
    # Leaf 0 of 7: siblings (0, 1), (1, 1), then the ephemeral [4, 7) = (0, 6) + (1, 2).
    assert inclusion_plan(0, 7) == ProofPlan(((0, 1), (1, 1), (0, 6), (1, 2)), 2, 4)
    assert consistency_plan(5, 5) == ProofPlan((), 0, 0)
    # 4 -> 8: size1 is a power of two, so its root is not repeated.
    assert consistency_plan(4, 8) == ProofPlan(((2, 1),), 0, 0)
    # 3 -> 7: seed (0, 2), its sibling (0, 3), then (1, 0), then ephemeral [4, 7).
    assert consistency_plan(3, 7) == ProofPlan(((0, 2), (0, 3), (1, 0), (0, 6), (1, 2)), 3, 5)


def test_plan_preconditions() -> None:
    for index, size in [(0, 0), (1, 1), (-1, 5), (5, 5), (6, 5)]:
        with pytest.raises(InvalidInput, match="out of range"):
            inclusion_plan(index, size)
    for size1, size2 in [(0, 0), (0, 5), (3, 2), (-1, 4)]:
        with pytest.raises(InvalidInput, match="0 < size1 <= size2"):
            consistency_plan(size1, size2)


def _verify_shape_inclusion(index: int, size: int) -> tuple[int, int]:
    inner = (index ^ (size - 1)).bit_length()
    return inner, (index >> inner).bit_count()


@settings(max_examples=400, deadline=None)
@given(size=st.integers(min_value=1, max_value=2**64), data=st.data())
def test_inclusion_plan_is_logarithmic(size: int, data: st.DataObject) -> None:
    index = data.draw(st.integers(min_value=0, max_value=size - 1))
    plan = inclusion_plan(index, size)
    assert len(plan.ids) <= 2 * size.bit_length()
    assert len(set(plan.ids)) == len(plan.ids)
    assert _covers(plan.ids, size)
    assert (0, index) not in plan.ids
    assert plan.proof_len == sum(_verify_shape_inclusion(index, size))
    assert 0 <= plan.begin <= plan.end <= len(plan.ids)


@settings(max_examples=400, deadline=None)
@given(size2=st.integers(min_value=1, max_value=2**64), data=st.data())
def test_consistency_plan_is_logarithmic(size2: int, data: st.DataObject) -> None:
    size1 = data.draw(st.integers(min_value=1, max_value=size2))
    plan = consistency_plan(size1, size2)
    assert len(plan.ids) <= 2 * size2.bit_length() + 1
    assert len(set(plan.ids)) == len(plan.ids)
    assert _covers(plan.ids, size2)
    assert 0 <= plan.begin <= plan.end <= len(plan.ids)


def test_assemble() -> None:
    a, b, c, d = LEAVES[:4]
    assert assemble(ProofPlan((), 0, 0), []) == []
    assert assemble(ProofPlan(((0, 1), (1, 1)), 0, 0), [a, b]) == [a, b]
    assert assemble(ProofPlan(((0, 1), (1, 1)), 1, 2), [a, b]) == [a, b]
    # ids[1:4] folded right to left: H(d, H(c, b)).
    plan = ProofPlan(((0, 0), (0, 0), (0, 0), (0, 0)), 1, 4)
    assert assemble(plan, [a, b, c, d]) == [a, hash_children(d, hash_children(c, b))]
    with pytest.raises(InvalidInput, match="got 1 node hashes for a plan of 2 nodes"):
        assemble(ProofPlan(((0, 1), (1, 1)), 0, 0), [a])


# --------------------------------------------------------------------------------------
# Proof generation against the RFC text


def test_proofs_match_rfc_reference_exhaustively() -> None:
    t = tree()
    for size in range(1, 70):
        d = LEAVES[:size]
        for index in range(size):
            assert t.inclusion_proof(index, size) == ref_path(index, d), (index, size)
        for size1 in range(1, size + 1):
            assert t.consistency_proof(size1, size) == ref_consistency(size1, d), (size1, size)


def test_proofs_from_exact_size_tree_equal_past_size_proofs() -> None:
    for size in (1, 2, 3, 7, 8, 9, 31, 64, 100):
        small = MemoryTree()
        for leaf in LEAVES[:size]:
            small.append(leaf)
        assert small.size == size
        assert small.root() == roots()[size]
        for index in range(0, size, 3):
            assert small.inclusion_proof(index, size) == tree().inclusion_proof(index, size)
        for size1 in range(1, size + 1, 5):
            assert small.consistency_proof(size1, size) == tree().consistency_proof(size1, size)


def test_one_storage_read_per_proof() -> None:
    t = tree()
    calls: list[int] = []

    def get_nodes(ids: Sequence[NodeID]) -> list[bytes]:
        calls.append(len(ids))
        return t.get_nodes(ids)

    inclusion_proof(100, 299, get_nodes)
    consistency_proof(77, 299, get_nodes)
    assert consistency_proof(77, 77, get_nodes) == []
    assert len(calls) == 2
    assert all(n <= 2 * (299).bit_length() + 1 for n in calls)


def test_memory_tree_preconditions() -> None:
    t = MemoryTree()
    assert t.size == 0
    assert t.root() == t.root(0) == empty_root()
    for leaf in LEAVES[:5]:
        t.append(leaf)
    with pytest.raises(InvalidInput, match="exceeds current size"):
        t.inclusion_proof(0, 6)
    with pytest.raises(InvalidInput, match="exceeds current size"):
        t.consistency_proof(1, 6)
    with pytest.raises(InvalidInput, match="out of range"):
        t.root(6)
    with pytest.raises(InvalidInput, match="out of range"):
        t.inclusion_proof(5, 5)
    with pytest.raises(InvalidInput, match="nodes not stored"):
        t.get_nodes([(1, 2)])
    with pytest.raises(ProofFormatError):
        t.append(b"short")
    assert t.size == 5


# --------------------------------------------------------------------------------------
# Verification: every proof verifies; every change fails


@settings(max_examples=300, deadline=None)
@given(index_and_size())
def test_every_inclusion_proof_verifies(case: tuple[int, int]) -> None:
    index, size = case
    t = tree()
    proof = t.inclusion_proof(index, size)
    root = roots()[size]
    assert t.root(size) == root
    assert root_from_inclusion_proof(index, size, LEAVES[index], proof) == root
    verify_inclusion(index, size, LEAVES[index], proof, root)


@settings(max_examples=300, deadline=None)
@given(size_pairs())
def test_every_consistency_proof_verifies(case: tuple[int, int]) -> None:
    size1, size2 = case
    proof = tree().consistency_proof(size1, size2)
    verify_consistency(size1, size2, proof, roots()[size1], roots()[size2])


@settings(max_examples=300, deadline=None)
@given(index_and_size(), st.data())
def test_inclusion_bit_flip_fails(case: tuple[int, int], data: st.DataObject) -> None:
    index, size = case
    proof = tree().inclusion_proof(index, size)
    root, leaf = roots()[size], LEAVES[index]
    target = data.draw(st.integers(min_value=-2, max_value=len(proof) - 1), label="target")
    bit = data.draw(st.integers(min_value=0, max_value=8 * HASH_SIZE - 1), label="bit")
    if target == -2:
        root = flip(root, bit)
    elif target == -1:
        leaf = flip(leaf, bit)
    else:
        proof[target] = flip(proof[target], bit)
    with pytest.raises(InclusionProofError):
        verify_inclusion(index, size, leaf, proof, root)


@settings(max_examples=300, deadline=None)
@given(size_pairs(), st.data())
def test_consistency_bit_flip_fails(case: tuple[int, int], data: st.DataObject) -> None:
    size1, size2 = case
    proof = tree().consistency_proof(size1, size2)
    root1, root2 = roots()[size1], roots()[size2]
    target = data.draw(st.integers(min_value=-2, max_value=len(proof) - 1), label="target")
    bit = data.draw(st.integers(min_value=0, max_value=8 * HASH_SIZE - 1), label="bit")
    if target == -2:
        root1 = flip(root1, bit)
    elif target == -1:
        root2 = flip(root2, bit)
    else:
        proof[target] = flip(proof[target], bit)
    with pytest.raises(ConsistencyProofError):
        verify_consistency(size1, size2, proof, root1, root2)


def _inclusion_shape(index: int, size: int) -> tuple[int, int, int]:
    """What the verifier's computation depends on: equal shapes hash identically."""
    inner, border = _verify_shape_inclusion(index, size)
    return inner, border, index & ((1 << inner) - 1)


@settings(max_examples=400, deadline=None)
@given(index_and_size(), st.data())
def test_inclusion_wrong_index_or_size_fails(case: tuple[int, int], data: st.DataObject) -> None:
    index, size = case
    proof = tree().inclusion_proof(index, size)
    root = roots()[size]
    index2 = data.draw(st.integers(min_value=-1, max_value=MAX_SIZE + 1), label="index2")
    size2 = data.draw(st.integers(min_value=0, max_value=MAX_SIZE + 1), label="size2")
    if (index2, size2) == (index, size):
        return
    if 0 <= index2 < size2 and _inclusion_shape(index2, size2) == _inclusion_shape(index, size):
        # A different (index, size) with the same hashing path (e.g. leaf 0 of 3 and of
        # 4) computes the same root: binding the size to the root is the checkpoint's job.
        assert index2 == index
        verify_inclusion(index2, size2, LEAVES[index], proof, root)
    else:
        with pytest.raises(InclusionProofError):
            verify_inclusion(index2, size2, LEAVES[index], proof, root)


def _consistency_shape(size1: int, size2: int) -> tuple[int, int, int, int]:
    level = (size1 & -size1).bit_length() - 1
    mask = (size1 - 1) >> level
    inner = (size1 - 1 ^ size2 - 1).bit_length() - level
    border = ((size1 - 1) >> (inner + level)).bit_count()
    return int(mask != 0), inner, border, mask & ((1 << inner) - 1)


@settings(max_examples=400, deadline=None)
@given(size_pairs(), st.data())
def test_consistency_wrong_sizes_fail(case: tuple[int, int], data: st.DataObject) -> None:
    size1, size2 = case
    proof = tree().consistency_proof(size1, size2)
    root1, root2 = roots()[size1], roots()[size2]
    s1 = data.draw(st.integers(min_value=-1, max_value=MAX_SIZE + 1), label="s1")
    s2 = data.draw(st.integers(min_value=-1, max_value=MAX_SIZE + 1), label="s2")
    if (s1, s2) == (size1, size2):
        return
    if 0 < s1 == s2:
        # Equal sizes need an empty proof and equal roots, whatever the sizes are.
        same = not proof and root1 == root2
    else:
        same = (
            0 < s1 < s2
            and size1 < size2
            and _consistency_shape(s1, s2) == _consistency_shape(size1, size2)
        )
    if same:
        verify_consistency(s1, s2, proof, root1, root2)
    else:
        with pytest.raises(ConsistencyProofError):
            verify_consistency(s1, s2, proof, root1, root2)


def test_inclusion_error_messages() -> None:
    proof = tree().inclusion_proof(3, 10)
    root = roots()[10]
    with pytest.raises(InclusionProofError, match="inclusion proof has 3 hashes, want 4"):
        verify_inclusion(3, 10, LEAVES[3], proof[:3], root)
    with pytest.raises(InclusionProofError, match="inclusion proof has 5 hashes, want 4"):
        verify_inclusion(3, 10, LEAVES[3], [*proof, root], root)
    with pytest.raises(InclusionProofError, match=f"computed root {root.hex()}, want 00"):
        verify_inclusion(3, 10, LEAVES[3], proof, bytes(32))
    with pytest.raises(InclusionProofError, match="leaf index 10 out of range for tree size 10"):
        verify_inclusion(10, 10, LEAVES[3], proof, root)
    with pytest.raises(InclusionProofError, match="leaf hash has 31 bytes, want 32") as exc:
        verify_inclusion(3, 10, LEAVES[3][:31], proof, root)
    assert isinstance(exc.value.__cause__, ProofFormatError)
    with pytest.raises(ProofFormatError, match="inclusion proof hash 2 has 0 bytes"):
        root_from_inclusion_proof(3, 10, LEAVES[3], [proof[0], proof[1], b"", proof[3]])


def test_consistency_error_messages() -> None:
    proof = tree().consistency_proof(3, 10)
    r3, r10 = roots()[3], roots()[10]
    with pytest.raises(ConsistencyProofError, match="consistency proof has 2 hashes, want 5"):
        verify_consistency(3, 10, proof[:2], r3, r10)
    with pytest.raises(ConsistencyProofError, match="meaningless"):
        verify_consistency(0, 10, [], empty_root(), r10)
    with pytest.raises(ConsistencyProofError, match="size2 2 is smaller than size1 3"):
        verify_consistency(3, 2, proof, r3, r10)
    with pytest.raises(ConsistencyProofError, match="has 1 hashes, want 0"):
        verify_consistency(3, 3, [r3], r3, r3)
    with pytest.raises(ConsistencyProofError, match="differs from root2"):
        verify_consistency(3, 3, [], r3, r10)
    with pytest.raises(ConsistencyProofError, match=f"computed root1 {r3.hex()}, want"):
        verify_consistency(3, 10, proof, roots()[4], r10)
    with pytest.raises(ConsistencyProofError, match=f"computed root2 {r10.hex()}, want"):
        verify_consistency(3, 10, proof, r3, roots()[9])
    with pytest.raises(ConsistencyProofError, match="hash 1 has 31 bytes") as exc:
        verify_consistency(3, 10, [proof[0], proof[1][:31], *proof[2:]], r3, r10)
    assert isinstance(exc.value.__cause__, ProofFormatError)
    verify_consistency(3, 3, [], r3, r3)


def test_sizes_checked_before_hashing(monkeypatch: pytest.MonkeyPatch) -> None:
    proof = tree().inclusion_proof(3, 10)
    cproof = tree().consistency_proof(3, 10)
    root = roots()[10]

    def no_hashing(*_: object) -> object:
        raise AssertionError("hashed before checking sizes")

    monkeypatch.setattr(merkle, "_sha256", no_hashing)
    bad_inclusion = [
        (10, 10, LEAVES[3], proof),
        (-1, 10, LEAVES[3], proof),
        (3, 10, LEAVES[3], proof[:3]),
        (3, 10, LEAVES[3][:5], proof),
        (3, 10, LEAVES[3], [*proof[:3], b"x"]),
    ]
    for index, size, leaf, p in bad_inclusion:
        with pytest.raises(InclusionProofError):
            verify_inclusion(index, size, leaf, p, root)
    bad_consistency = [(0, 10, cproof), (11, 10, cproof), (3, 10, cproof[:3]),
                       (3, 10, [*cproof[:3], b"x"])]  # fmt: skip
    for size1, size2, p in bad_consistency:
        with pytest.raises(ConsistencyProofError):
            verify_consistency(size1, size2, p, roots()[3], root)
    for args in [(0, 0), (4, 3)]:
        with pytest.raises(InvalidInput):
            inclusion_plan(*args)
    with pytest.raises(ProofFormatError):
        CompactRange.empty().append(b"x")


def test_module_docstring_example() -> None:
    failed, attempted = doctest.testmod(merkle)
    assert attempted > 0
    assert failed == 0
