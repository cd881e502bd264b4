"""Checkpoints: strict body parsing, signing and verification against a trust root, consistency."""

from __future__ import annotations

import base64
import functools
import re
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support.fuzz import FUZZ_DERANDOMIZED
from support.mutations import mutations

from kolm_ledger._crypto import PrivateKey
from kolm_ledger.errors import (
    CheckpointError,
    CheckpointFormatError,
    ConsistencyProofError,
    InvalidInput,
    KolmError,
)
from kolm_ledger.formats import merkle
from kolm_ledger.formats.checkpoint import (
    MAX_TREE_SIZE,
    Checkpoint,
    SignedCheckpoint,
    check_consistent,
    log_verifiers,
    sign_checkpoint,
    verify_checkpoint,
)
from kolm_ledger.formats.note import Note, NoteSigner, sign_note
from kolm_ledger.keys import TrustedKey, TrustRoot

ORIGIN = "example.com/kolm"
LOG_KEY = PrivateKey.generate("ed25519")
OTHER_LOG_KEY = PrivateKey.generate("ed25519")  # trusted, but for another origin
ROGUE_KEY = PrivateKey.generate("ed25519")  # not trusted at all
TRUST = TrustRoot(
    (
        TrustedKey.for_key(LOG_KEY.public_key(), "log", origin=ORIGIN),
        TrustedKey.for_key(OTHER_LOG_KEY.public_key(), "log", origin="example.com/other"),
    )
)
SIGNER = NoteSigner(ORIGIN, LOG_KEY)

TREE = merkle.MemoryTree()
for _i in range(50):
    TREE.append(merkle.hash_leaf(b"leaf %d" % _i))
CHAIN = bytes(range(32))


def cp_at(size: int, chain: bytes = CHAIN) -> Checkpoint:
    return Checkpoint(ORIGIN, size, TREE.root(size), chain)


CP = cp_at(50)
SIGNED = sign_checkpoint(CP, [SIGNER]).to_bytes()


def b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def names_something(e: BaseException) -> None:
    msg = str(e)
    assert len(msg) >= 8 and re.search(r"[a-z]{3}", msg), repr(msg)


# --------------------------------------------------------------------------------------
# The body


def test_text_format_and_round_trip() -> None:
    text = CP.to_text()
    assert text == f"{ORIGIN}\n50\n{b64(CP.root)}\nchain {b64(CHAIN)}\n"
    assert Checkpoint.from_text(text) == CP
    empty = Checkpoint(ORIGIN, 0, merkle.empty_root(), bytes(32))
    assert Checkpoint.from_text(empty.to_text()) == empty
    big = Checkpoint(ORIGIN, MAX_TREE_SIZE, bytes(32), bytes(32))
    assert Checkpoint.from_text(big.to_text()) == big


def test_signed_round_trip() -> None:
    sc = SignedCheckpoint.from_bytes(SIGNED)
    assert sc.checkpoint == CP
    assert sc.to_bytes() == SIGNED
    assert sc.note.signatures[0].name == ORIGIN


ROOT = b64(bytes(32))
CH = f"chain {ROOT}"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (f"o\n5\n{ROOT}\n{CH}", "newline"),
        (f"o\n5\n{ROOT}\n", "3 lines"),
        (f"\n5\n{ROOT}\n{CH}\n", "origin"),
        (f"o\n05\n{ROOT}\n{CH}\n", "leading zeros"),
        (f"o\n+5\n{ROOT}\n{CH}\n", "size line"),
        (f"o\n-5\n{ROOT}\n{CH}\n", "size line"),
        (f"o\n 5\n{ROOT}\n{CH}\n", "size line"),
        (f"o\n5 \n{ROOT}\n{CH}\n", "size line"),
        (f"o\n\u0665\n{ROOT}\n{CH}\n", "size line"),  # ARABIC-INDIC DIGIT FIVE
        (f"o\n{'9' * 20}\n{ROOT}\n{CH}\n", "size line"),
        (f"o\n{2**63}\n{ROOT}\n{CH}\n", "over"),
        (f"o\n\n{ROOT}\n{CH}\n", "size line"),
        (f"o\n5\n{b64(bytes(31))}\n{CH}\n", "31 bytes, want 32"),
        (f"o\n5\n{ROOT[:-2]}B=\n{CH}\n", "canonical"),
        (f"o\n5\n{ROOT}x\n{CH}\n", "base64"),
        (f"o\n5\n{ROOT}\nchain {b64(bytes(33))}\n", "33 bytes"),
        (f"o\n5\n{ROOT}\nChain {ROOT}\n", "chain"),
        (f"o\n5\n{ROOT}\nchain\n", "chain"),
        (f"o\n5\n{ROOT}\nchain  {ROOT}\n", "base64"),
        (f"o\n5\n{ROOT}\nwitness foo\n", "line 4"),
        # further extension lines are accepted (C2SP), but not empty or a second chain line
        (f"o\n5\n{ROOT}\n{CH}\n\nfoo bar\n", "extension line 5 is empty"),
        (f"o\n5\n{ROOT}\n{CH}\nfoo bar\n{CH}\n", "line 6 .* second 'chain' line"),
        (f"o\n5\n{ROOT}\n{CH}\n{CH}\n", "second 'chain' line"),
        (f"o\r\n5\n{ROOT}\n{CH}\n", "control character"),
        (f"o\ud800\n5\n{ROOT}\n{CH}\n", "UTF-8"),
    ],
)
def test_strict_body_parse(text: str, match: str) -> None:
    with pytest.raises(CheckpointFormatError, match=match) as e:
        Checkpoint.from_text(text)
    names_something(e.value)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("", 1, bytes(32), bytes(32)), "origin"),
        (("a\nb", 1, bytes(32), bytes(32)), "control"),
        (("o", -1, bytes(32), bytes(32)), "size"),
        (("o", True, bytes(32), bytes(32)), "size"),
        (("o", 2**63, bytes(32), bytes(32)), "size"),
        (("o", 1, bytes(31), bytes(32)), "root has 31 bytes"),
        (("o", 1, bytes(32), b""), "chain head has 0 bytes"),
    ],
)
def test_constructor_checks(args: tuple[object, ...], match: str) -> None:
    with pytest.raises(CheckpointFormatError, match=match):
        Checkpoint(*args)  # type: ignore[arg-type]


def test_signed_checkpoint_must_match_its_note() -> None:
    note = sign_note(cp_at(49).to_text(), [SIGNER])
    with pytest.raises(CheckpointFormatError, match="not the checkpoint"):
        SignedCheckpoint(CP, note)


def test_signed_checkpoint_with_bad_body() -> None:
    data = sign_note("example.com/kolm\n1\n", [SIGNER]).to_bytes()
    with pytest.raises(CheckpointFormatError, match="2 lines"):
        SignedCheckpoint.from_bytes(data)


# --------------------------------------------------------------------------------------
# Signing and verification


def test_sign_checkpoint_requires_the_origin_as_key_name() -> None:
    with pytest.raises(InvalidInput, match="not the checkpoint origin"):
        sign_checkpoint(CP, [NoteSigner("example.com/other", LOG_KEY)])
    with pytest.raises(InvalidInput):
        sign_checkpoint(CP, [])


def test_verify_good() -> None:
    sc = verify_checkpoint(SIGNED, TRUST)
    assert sc.checkpoint == CP
    assert verify_checkpoint(SIGNED, TRUST, origin=ORIGIN).checkpoint == CP


def test_log_verifiers() -> None:
    names = sorted(v.name for v in log_verifiers(TRUST))
    assert names == [ORIGIN, "example.com/other"]
    assert [v.name for v in log_verifiers(TRUST, ORIGIN)] == [ORIGIN]
    assert log_verifiers(TRUST, "nobody") == []


def test_wrong_expected_origin() -> None:
    with pytest.raises(
        CheckpointError, match=re.escape("no log key for origin 'example.com/none'")
    ):
        verify_checkpoint(SIGNED, TRUST, origin="example.com/none")
    with pytest.raises(CheckpointError, match="no log key for any origin"):
        verify_checkpoint(SIGNED, TrustRoot(()))
    with pytest.raises(CheckpointError, match="no verifiable signature"):
        verify_checkpoint(SIGNED, TRUST, origin="example.com/other")


def test_untrusted_key() -> None:
    data = sign_checkpoint(CP, [NoteSigner(ORIGIN, ROGUE_KEY)]).to_bytes()
    with pytest.raises(CheckpointError, match="no verifiable signature"):
        verify_checkpoint(data, TRUST)


def test_a_log_key_cannot_vouch_for_another_origin() -> None:
    # The key trusted for example.com/other signs (under its own name) a checkpoint
    # claiming to be example.com/kolm: the signature verifies, the origin does not match.
    note = sign_note(CP.to_text(), [NoteSigner("example.com/other", OTHER_LOG_KEY)])
    with pytest.raises(CheckpointError, match="not the origin of a log key that signed it"):
        verify_checkpoint(note.to_bytes(), TRUST)
    # and the same key under the stolen name has another key id: unknown
    note = sign_note(CP.to_text(), [NoteSigner(ORIGIN, OTHER_LOG_KEY)])
    with pytest.raises(CheckpointError, match="no verifiable signature"):
        verify_checkpoint(note.to_bytes(), TRUST)


def test_witness_cosignatures_are_ignored_bad_trusted_signature_rejected() -> None:
    witness = NoteSigner("witness.example", PrivateKey.generate("ed25519"))
    note = Note.from_bytes(SIGNED).add_signatures([witness])
    assert verify_checkpoint(note.to_bytes(), TRUST).checkpoint == CP
    forged = Note(note.text, (*note.signatures, sign_note("x\n", [SIGNER]).signatures[0]))
    with pytest.raises(CheckpointError, match="does not verify"):
        verify_checkpoint(forged.to_bytes(), TRUST)


def test_key_validity_at() -> None:
    t = datetime(2026, 1, 1, tzinfo=UTC)
    expired = TrustRoot(
        (
            TrustedKey.for_key(
                LOG_KEY.public_key(),
                "log",
                origin=ORIGIN,
                not_after=datetime(2025, 1, 1, tzinfo=UTC),
            ),
        )
    )
    assert verify_checkpoint(SIGNED, expired).checkpoint == CP
    with pytest.raises(CheckpointError, match="no log key valid at that time"):
        verify_checkpoint(SIGNED, expired, at=t)
    revoked = TRUST.revoke(TRUST.keys[0].keyid, datetime(2025, 6, 1, tzinfo=UTC))
    with pytest.raises(CheckpointError):
        verify_checkpoint(SIGNED, revoked, origin=ORIGIN, at=t)
    assert verify_checkpoint(SIGNED, revoked, at=datetime(2025, 1, 1, tzinfo=UTC))


def test_every_bit_flip_of_the_signed_checkpoint_fails() -> None:
    for bit in range(len(SIGNED) * 8):
        data = bytearray(SIGNED)
        data[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(KolmError):
            verify_checkpoint(bytes(data), TRUST)


@FUZZ_DERANDOMIZED
@given(bit=st.integers(0, 255), which=st.sampled_from(["root", "chain"]))
def test_resigned_body_bit_flip_changes_the_checkpoint(bit: int, which: str) -> None:
    # A trusted log signing a different root/chain is a different checkpoint: it verifies
    # as a signature but is inconsistent with the original.
    field = bytearray(CP.root if which == "root" else CP.chain_head)
    field[bit // 8] ^= 1 << (bit % 8)
    other = Checkpoint(
        ORIGIN,
        CP.size,
        bytes(field) if which == "root" else CP.root,
        bytes(field) if which == "chain" else CP.chain_head,
    )
    assert verify_checkpoint(sign_checkpoint(other, [SIGNER]).to_bytes(), TRUST).checkpoint == other
    with pytest.raises(CheckpointError, match="different"):
        check_consistent(CP, other, [])


# --------------------------------------------------------------------------------------
# Consistency


@FUZZ_DERANDOMIZED
@given(s1=st.integers(0, 50), s2=st.integers(0, 50))
def test_consistency_between_any_two_sizes(s1: int, s2: int) -> None:
    s1, s2 = min(s1, s2), max(s1, s2)
    proof = TREE.consistency_proof(s1, s2) if s1 > 0 else []
    check_consistent(cp_at(s1), cp_at(s2), proof)
    if s1 < s2 and s1 > 0 and proof:
        bad = [bytes([proof[0][0] ^ 1]) + proof[0][1:], *proof[1:]]
        with pytest.raises(ConsistencyProofError):
            check_consistent(cp_at(s1), cp_at(s2), bad)


def test_consistency_contradictions_name_both_sides() -> None:
    with pytest.raises(CheckpointError, match=re.escape("old 'example.com/kolm', new 'x'")):
        check_consistent(CP, Checkpoint("x", 50, CP.root, CHAIN), [])
    with pytest.raises(CheckpointError, match="new checkpoint size 10 is smaller than old size 50"):
        check_consistent(CP, cp_at(10), [])
    with pytest.raises(CheckpointError, match="different roots"):
        check_consistent(cp_at(20), Checkpoint(ORIGIN, 20, TREE.root(21), CHAIN), [])
    with pytest.raises(CheckpointError, match="different chain heads"):
        check_consistent(cp_at(20), cp_at(20, bytes(32)), [])
    with pytest.raises(ConsistencyProofError, match="want 0"):
        check_consistent(cp_at(20), cp_at(20), [bytes(32)])
    with pytest.raises(CheckpointError, match="empty root"):
        check_consistent(Checkpoint(ORIGIN, 0, bytes(32), CHAIN), CP, [])
    with pytest.raises(CheckpointError, match="want 0"):
        check_consistent(cp_at(0), CP, [bytes(32)])
    with pytest.raises(ConsistencyProofError):
        check_consistent(cp_at(10), CP, TREE.consistency_proof(11, 50))


# --------------------------------------------------------------------------------------
# Fuzzing the parsers


@FUZZ_DERANDOMIZED
@given(data=st.data())
def test_parsers_raise_only_kolm_errors(data: st.DataObject) -> None:
    signed = data.draw(mutations(SIGNED))
    body = data.draw(mutations(CP.to_text().encode())).decode("utf-8", "surrogateescape")
    checks: list[Callable[[], object]] = [
        functools.partial(SignedCheckpoint.from_bytes, signed),
        functools.partial(verify_checkpoint, signed, TRUST),
        functools.partial(Checkpoint.from_text, body),
    ]
    for check in checks:
        try:
            check()
        except KolmError as e:
            names_something(e)
