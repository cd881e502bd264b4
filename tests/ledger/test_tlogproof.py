"""tlog-proof: text round trips, strict parsing, offline inclusion verification, tampering."""

from __future__ import annotations

import base64
import functools
import re
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support.fuzz import FUZZ_DERANDOMIZED
from support.mutations import mutations

from kolm_ledger._crypto import PrivateKey
from kolm_ledger.errors import (
    CheckpointError,
    InclusionProofError,
    KolmError,
    ProofFormatError,
)
from kolm_ledger.formats import merkle
from kolm_ledger.formats.checkpoint import Checkpoint, sign_checkpoint
from kolm_ledger.formats.note import NoteSigner
from kolm_ledger.formats.tlogproof import HEADER, MAX_PROOF_HASHES, TlogProof
from kolm_ledger.keys import TrustedKey, TrustRoot

ORIGIN = "example.com/kolm"
LOG_KEY = PrivateKey.generate("ed25519")
TRUST = TrustRoot((TrustedKey.for_key(LOG_KEY.public_key(), "log", origin=ORIGIN),))
SIGNER = NoteSigner(ORIGIN, LOG_KEY)
SIZE = 37
LEAVES = [merkle.hash_leaf(b"entry %d" % i) for i in range(SIZE)]
TREE = merkle.MemoryTree()
for _leaf in LEAVES:
    TREE.append(_leaf)


def signed_cp(size: int = SIZE, root: bytes | None = None) -> bytes:
    cp = Checkpoint(ORIGIN, size, TREE.root(size) if root is None else root, bytes(32))
    return sign_checkpoint(cp, [SIGNER]).to_bytes()


CP = signed_cp()


def proof_for(index: int, extra: bytes | None = None) -> TlogProof:
    return TlogProof(index, tuple(TREE.inclusion_proof(index, SIZE)), CP, extra)


def b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def names_something(e: BaseException) -> None:
    msg = str(e)
    assert len(msg) >= 8 and re.search(r"[a-z]{3}", msg), repr(msg)


def test_text_format() -> None:
    p = proof_for(5, extra=b"hi")
    hashes = "".join(b64(h) + "\n" for h in p.hashes)
    assert p.to_text() == f"{HEADER}\nextra aGk=\nindex 5\n{hashes}\n{CP.decode()}"
    assert p.to_bytes() == p.to_text().encode()


@pytest.mark.parametrize("index", [0, 1, 17, 31, 32, 36])
@pytest.mark.parametrize("extra", [None, b"\x00opaque"])
def test_round_trip_and_verify(index: int, extra: bytes | None) -> None:
    p = proof_for(index, extra)
    assert TlogProof.from_text(p.to_text()) == p
    assert TlogProof.from_bytes(p.to_bytes()) == p
    sc = p.verify(LEAVES[index], TRUST, origin=ORIGIN)
    assert sc.checkpoint.size == SIZE
    assert p.signed_checkpoint() == sc


def test_zero_hashes_single_leaf_tree() -> None:
    p = TlogProof(0, (), signed_cp(1))
    assert f"index 0\n\n{ORIGIN}\n" in p.to_text()
    assert TlogProof.from_text(p.to_text()) == p
    p.verify(LEAVES[0], TRUST)


def test_every_index_of_every_small_tree() -> None:
    for size in range(1, 12):
        cp = signed_cp(size)
        for i in range(size):
            TlogProof(i, tuple(TREE.inclusion_proof(i, size)), cp).verify(LEAVES[i], TRUST)


GOOD = proof_for(9).to_text()
HEAD, _, NOTE = GOOD.partition("\n\n")
H = b64(bytes(32))


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "no blank line"),
        (HEAD + "\n" + NOTE, "no blank line|line"),
        (GOOD.replace(HEADER, "c2sp.org/tlog-proof@v2"), "line 1"),
        (GOOD.replace("index 9", "index 09"), "leading zeros"),
        (GOOD.replace("index 9", "index -9"), "index"),
        (GOOD.replace("index 9", "index  9"), "index"),
        (GOOD.replace("index 9", "Index 9"), "index"),
        (GOOD.replace("index 9", "index 9 "), "index"),
        (GOOD.replace("index 9", "index \u0669"), "index"),
        (GOOD.replace("index 9", f"index {2**63}"), "over"),
        (GOOD.replace("index 9", "index " + "9" * 30), "index"),
        (HEADER + "\n\n" + NOTE, "no 'index' line"),
        (HEADER + "\nextra aGk=\n\n" + NOTE, "no 'index' line"),
        (GOOD.replace("index 9", "index 9\nextra aGk="), "hash"),
        (GOOD.replace(HEADER, HEADER + "\nextra "), "extra"),
        (GOOD.replace(HEADER, HEADER + "\nextra aGl="), "canonical"),
        (GOOD.replace("index 9", "index 9\n" + b64(bytes(31))), "31 bytes, want 32"),
        (GOOD.replace("index 9", "index 9\n" + H[:-1]), "base64"),
        (GOOD.replace("index 9", "index 9\n" + H + " "), "base64"),
        (HEAD + "\n" + "\n".join([H] * (MAX_PROOF_HASHES + 1)) + "\n\n" + NOTE, "over the limit"),
        (HEAD + "\n\n", "checkpoint"),
        (HEAD + "\n\n" + NOTE.replace("—", "-"), "checkpoint"),
        (HEAD + "\n\n" + NOTE + "junk\n", "checkpoint"),
        (HEAD + "\n\n\n" + NOTE, "checkpoint"),
        (HEAD + "\n\n" + NOTE.replace(ORIGIN, ORIGIN + "\ud800"), "checkpoint"),
    ],
)
def test_strict_parse(text: str, match: str) -> None:
    with pytest.raises(ProofFormatError, match=match) as e:
        TlogProof.from_text(text)
    names_something(e.value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"index": -1}, "index"),
        ({"index": 2**63}, "index"),
        ({"hashes": (bytes(31),)}, "hash 0 has 31 bytes"),
        ({"hashes": (bytes(32),) * 65}, "over the limit"),
        ({"extra": b""}, "extra"),
        ({"checkpoint": b"nope"}, "checkpoint"),
    ],
)
def test_constructor_checks(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {"index": 0, "hashes": (), "checkpoint": CP, **kwargs}
    with pytest.raises(ProofFormatError, match=match):
        TlogProof(**args)  # type: ignore[arg-type]


def test_non_utf8_bytes() -> None:
    with pytest.raises(ProofFormatError, match="UTF-8"):
        TlogProof.from_bytes(GOOD.encode() + b"\xff")


# --------------------------------------------------------------------------------------
# Verification failures


def test_index_out_of_range_and_off_by_one() -> None:
    p = proof_for(9)
    with pytest.raises(InclusionProofError, match="not below the checkpoint size 37"):
        TlogProof(SIZE, p.hashes, CP).verify(LEAVES[9], TRUST)
    for index in (8, 10):
        with pytest.raises(InclusionProofError):
            TlogProof(index, p.hashes, CP).verify(LEAVES[9], TRUST)


def test_wrong_number_of_hashes() -> None:
    p = proof_for(9)
    with pytest.raises(InclusionProofError, match="want"):
        TlogProof(9, p.hashes[:-1], CP).verify(LEAVES[9], TRUST)
    with pytest.raises(InclusionProofError, match="want"):
        TlogProof(9, (*p.hashes, bytes(32)), CP).verify(LEAVES[9], TRUST)


def test_checkpoint_for_another_tree_or_signer() -> None:
    p = proof_for(9)
    resigned = TlogProof(9, p.hashes, signed_cp(SIZE, root=TREE.root(36)))
    with pytest.raises(InclusionProofError, match="computed root"):
        resigned.verify(LEAVES[9], TRUST)
    rogue = NoteSigner(ORIGIN, PrivateKey.generate("ed25519"))
    cp = sign_checkpoint(Checkpoint(ORIGIN, SIZE, TREE.root(), bytes(32)), [rogue]).to_bytes()
    with pytest.raises(CheckpointError, match="no verifiable signature"):
        TlogProof(9, p.hashes, cp).verify(LEAVES[9], TRUST)
    with pytest.raises(CheckpointError):
        p.verify(LEAVES[9], TRUST, origin="example.com/other")


@FUZZ_DERANDOMIZED
@given(index=st.integers(0, SIZE - 1), data=st.data())
def test_any_bit_flip_in_a_proof_hash_fails(index: int, data: st.DataObject) -> None:
    p = proof_for(index)
    i = data.draw(st.integers(0, len(p.hashes) - 1))
    bit = data.draw(st.integers(0, 255))
    h = bytearray(p.hashes[i])
    h[bit // 8] ^= 1 << (bit % 8)
    hashes = (*p.hashes[:i], bytes(h), *p.hashes[i + 1 :])
    with pytest.raises(InclusionProofError):
        TlogProof(index, hashes, CP).verify(LEAVES[index], TRUST)


@FUZZ_DERANDOMIZED
@given(index=st.integers(0, SIZE - 1), bit=st.integers(0, 255))
def test_any_bit_flip_in_the_leaf_fails(index: int, bit: int) -> None:
    leaf = bytearray(LEAVES[index])
    leaf[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(InclusionProofError):
        proof_for(index).verify(bytes(leaf), TRUST)


@FUZZ_DERANDOMIZED
@given(index=st.integers(0, SIZE - 1), bit=st.integers(0, 255))
def test_any_bit_flip_in_the_root_fails(index: int, bit: int) -> None:
    root = bytearray(TREE.root())
    root[bit // 8] ^= 1 << (bit % 8)
    p = proof_for(index)
    # re-signed by the trusted log: the proof no longer reaches the root
    with pytest.raises(InclusionProofError):
        TlogProof(index, p.hashes, signed_cp(root=bytes(root))).verify(LEAVES[index], TRUST)
    # not re-signed: the checkpoint signature fails
    tampered = CP.replace(base64.b64encode(TREE.root()), base64.b64encode(bytes(root)))
    assert tampered != CP
    with pytest.raises(KolmError):
        TlogProof(index, p.hashes, tampered).verify(LEAVES[index], TRUST)


@FUZZ_DERANDOMIZED
@given(bit=st.integers(0, len(CP) * 8 - 1))
def test_any_bit_flip_in_the_checkpoint_fails(bit: int) -> None:
    cp = bytearray(CP)
    cp[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(KolmError) as e:
        TlogProof(9, proof_for(9).hashes, bytes(cp)).verify(LEAVES[9], TRUST)
    names_something(e.value)


# --------------------------------------------------------------------------------------
# Fuzzing the parser


@FUZZ_DERANDOMIZED
@given(data=st.data())
def test_parser_raises_only_kolm_errors(data: st.DataObject) -> None:
    mutated = data.draw(mutations(proof_for(9, b"x").to_bytes()))
    parses: list[Callable[[], TlogProof]] = [
        functools.partial(TlogProof.from_bytes, mutated),
        functools.partial(TlogProof.from_text, mutated.decode("utf-8", "surrogateescape")),
    ]
    for parse in parses:
        try:
            p = parse()
        except KolmError as e:
            names_something(e)
            continue
        try:
            p.verify(LEAVES[9], TRUST)
        except KolmError as e:
            names_something(e)
