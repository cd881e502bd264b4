"""Signed notes: the Go reference vectors, the key-id rule, verification semantics, fuzzing."""

from __future__ import annotations

import base64
import hashlib
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support.fuzz import FUZZ_DERANDOMIZED
from support.mutations import mutations

from kolm_ledger._crypto import PrivateKey
from kolm_ledger.errors import (
    CheckpointError,
    CheckpointFormatError,
    InvalidInput,
    KeyFormatError,
    KolmError,
)
from kolm_ledger.formats.note import (
    MAX_NOTE_BYTES,
    MAX_SIGNATURES,
    Note,
    NoteSignature,
    NoteSigner,
    NoteVerifier,
    key_id,
    open_note,
    sign_note,
    strict_b64decode,
)

# golang.org/x/mod/sumdb/note note_test.go (TestNewVerifier, TestSign, TestOpen).
PETER_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
PETER_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
ENOCH_VKEY = "EnochRoot+af0cfe78+ATtqJ7zOtqQtYqOo0CpvDXNlMhV3HeJDpjrASKGLWdop"
TEXT = (
    "If you think cryptography is the answer to your problem,\n"
    "then you don't know what your problem is.\n"
)
PETER_SIG = (
    "— PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqd"
    "ngotpRZb6KE6RyyBwJnAM=\n"
)
ENOCH_SIG = (
    "— EnochRoot rwz+eBzmZa0SO3NbfRGzPCpDckykFXSdeX+MNtCOXm2/5n2tiOHp+vAF1aGrQ5ovTG01oOTG"
    "wnWLox33WWd1RvMc+QQ=\n"
)
GO_NOTE = TEXT + "\n" + PETER_SIG


def go_signer() -> NoteSigner:
    """The Go test's private key, rebuilt as PKCS#8 from its Ed25519 seed."""
    raw = base64.b64decode(PETER_SKEY.split("+", 4)[4])
    assert raw[0] == 0x01 and len(raw) == 33
    der = bytes.fromhex("302e020100300506032b657004220420") + raw[1:]
    pem = (
        b"-----BEGIN PRIVATE KEY-----\n" + base64.b64encode(der) + b"\n-----END PRIVATE KEY-----\n"
    )
    return NoteSigner("PeterNeumann", PrivateKey.from_pem(pem))


def names_something(e: BaseException) -> None:
    msg = str(e)
    assert len(msg) >= 8 and re.search(r"[a-z]{3}", msg), repr(msg)


# --------------------------------------------------------------------------------------
# The Go reference vectors


def test_go_verifier_key_parses_and_round_trips() -> None:
    v = NoteVerifier.from_vkey(PETER_VKEY)
    assert v.name == "PeterNeumann"
    assert v.key_id == bytes.fromhex("c74f20a3")
    assert v.vkey() == PETER_VKEY


def test_go_signer_matches_the_verifier_key() -> None:
    s = go_signer()
    assert s.key_id.hex() == "c74f20a3"
    assert s.verifier().vkey() == PETER_VKEY


def test_go_sign_reproduces_the_published_note_byte_for_byte() -> None:
    # Ed25519 is deterministic, so the same key and text give the same bytes as Go.
    assert sign_note(TEXT, [go_signer()]).to_bytes() == GO_NOTE.encode()


def test_go_note_opens() -> None:
    note, verified = open_note(GO_NOTE.encode(), [NoteVerifier.from_vkey(PETER_VKEY)])
    assert note.text == TEXT
    assert [v.key_label for v in verified] == ["PeterNeumann+c74f20a3"]
    assert note.signatures[0].key_id == bytes.fromhex("c74f20a3")
    assert Note.from_bytes(GO_NOTE.encode()).to_bytes() == GO_NOTE.encode()


def test_go_note_with_changed_text_is_rejected() -> None:
    bad = GO_NOTE.replace("cryptography", "cryptographY").encode()
    with pytest.raises(CheckpointError, match=r"PeterNeumann\+c74f20a3"):
        open_note(bad, [NoteVerifier.from_vkey(PETER_VKEY)])


def test_go_open_one_verified_one_unknown() -> None:
    peter, enoch = NoteVerifier.from_vkey(PETER_VKEY), NoteVerifier.from_vkey(ENOCH_VKEY)
    data = (TEXT + "\n" + PETER_SIG + ENOCH_SIG).encode()
    note, verified = open_note(data, [peter])
    assert verified == [peter]
    assert [s.name for s in note.signatures] == ["PeterNeumann", "EnochRoot"]
    note, verified = open_note(data, [peter, enoch])
    assert verified == [peter, enoch]
    # Enoch alone, with a stray key that matches nobody
    other = NoteSigner("PeterNeumann", PrivateKey.generate("ed25519")).verifier()
    assert open_note(data, [other, enoch])[1] == [enoch]


def test_go_open_no_known_key_is_rejected_naming_the_known_keys() -> None:
    data = (TEXT + "\n" + PETER_SIG + ENOCH_SIG).encode()
    with pytest.raises(CheckpointError, match="no verifiable signature from any key"):
        open_note(data, [])
    stranger = NoteSigner("example.com/x", PrivateKey.generate("ed25519")).verifier()
    with pytest.raises(CheckpointError, match=re.escape(stranger.key_label)):
        open_note(data, [stranger])


def test_go_open_invalid_signature_from_known_key_is_rejected() -> None:
    data = (TEXT + "\n" + PETER_SIG[:60] + "ABCD" + PETER_SIG[60:]).encode()
    with pytest.raises(CheckpointError, match=r"known key PeterNeumann\+c74f20a3 does not verify"):
        open_note(data, [NoteVerifier.from_vkey(PETER_VKEY)])


def test_go_open_bad_signature_from_known_key_rejected_even_with_a_good_one() -> None:
    peter, enoch = NoteVerifier.from_vkey(PETER_VKEY), NoteVerifier.from_vkey(ENOCH_VKEY)
    bad_enoch = ENOCH_SIG[:60] + "ABCD" + ENOCH_SIG[60:]
    data = (TEXT + "\n" + PETER_SIG + bad_enoch).encode()
    # Enoch unknown: its bad signature is ignored
    assert open_note(data, [peter])[1] == [peter]
    # Enoch known: its bad signature rejects the note
    with pytest.raises(CheckpointError, match=r"EnochRoot\+af0cfe78"):
        open_note(data, [peter, enoch])


def test_go_duplicated_signatures_and_verifiers() -> None:
    peter, enoch = NoteVerifier.from_vkey(PETER_VKEY), NoteVerifier.from_vkey(ENOCH_VKEY)
    data = (TEXT + "\n" + PETER_SIG + PETER_SIG + ENOCH_SIG + ENOCH_SIG).encode()
    note, verified = open_note(data, [peter, enoch, peter])
    assert verified == [peter, enoch]
    assert len(note.signatures) == 4


@pytest.mark.parametrize(
    "msg",
    [
        TEXT,
        TEXT + "\n",
        TEXT + "\n" + PETER_SIG[:-1],
        "\x01" + TEXT + "\n" + PETER_SIG,
        "\udcff" + TEXT + "\n" + PETER_SIG,
        TEXT
        + "\n"
        + "— Bad Name x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKv"
        "qfqdngotpRZb6KE6RyyBwJnAM=",
        TEXT + "\n" + PETER_SIG + "Unexpected line.\n",
        TEXT + "\n" + PETER_SIG * (MAX_SIGNATURES + 1),
    ],
    ids=[
        "no-sigs",
        "blank-no-sigs",
        "no-final-newline",
        "control-char",
        "latin1-ff",
        "bad-name",
        "unexpected-line",
        "101-sigs",
    ],
)
def test_go_malformed_notes(msg: str) -> None:
    data = msg.encode("utf-8", "surrogateescape")  # "\udcff" is the lone byte 0xff
    with pytest.raises(CheckpointFormatError) as e:
        open_note(data, [NoteVerifier.from_vkey(PETER_VKEY)])
    names_something(e.value)


def _go_bad_vkeys() -> list[str]:
    b = PETER_VKEY
    out = [b[i:j] for i in range(len(b) + 1) for j in range(i + 1, len(b) + 1)]
    out.remove(b)
    out += [b[:i] + chr(ord(b[i]) + 1) + b[i + 1 :] for i in range(len(b))]
    # wrong-length key and unknown algorithm, each with its key hash adjusted (Go's test)
    out.append("PeterNeumann+cc469956+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TWBADKEY==")
    out.append("PeterNeumann+173116ae+ZRpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW")
    return out


def test_go_mangled_verifier_keys_are_rejected() -> None:
    bad = _go_bad_vkeys()
    assert len(bad) > 2000
    for k in bad:
        with pytest.raises(KeyFormatError) as e:
            NoteVerifier.from_vkey(k)
        names_something(e.value)


# --------------------------------------------------------------------------------------
# Key ids, names, signers


def test_key_id_rule() -> None:
    key = PrivateKey.generate("ed25519")
    pub = key.public_key()
    want = hashlib.sha256(b"example.com/log\n\x01" + pub.raw()).digest()[:4]
    assert key_id("example.com/log", pub) == want
    s = NoteSigner("example.com/log", key)
    assert s.key_id == want == s.verifier().key_id
    line = sign_note("x\n", [s]).to_bytes().decode().split("\n")[-2]
    assert base64.b64decode(line.split(" ")[2])[:4] == want
    # same key, different name: different key id
    assert key_id("example.com/other", pub) != want


def test_only_ed25519_keys_sign_notes() -> None:
    ec = PrivateKey.generate("ecdsa-p256-sha256")
    with pytest.raises(KeyFormatError, match="Ed25519"):
        NoteSigner("x", ec)
    with pytest.raises(KeyFormatError, match="Ed25519"):
        NoteVerifier("x", ec.public_key())


@pytest.mark.parametrize("name", ["", "a+b", "a b", "a\tb", "a\u00a0b", "a\x01b", "a\u2003b"])
def test_bad_key_names(name: str) -> None:
    key = PrivateKey.generate("ed25519")
    with pytest.raises(KeyFormatError) as e:
        NoteSigner(name, key)
    names_something(e.value)
    with pytest.raises(CheckpointFormatError):
        NoteSignature(name, b"abcd", b"sig")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "empty"),
        ("abc", "newline"),
        ("a\n\nb\n", "line 2 is empty"),
        ("\n", "line 1 is empty"),
        ("a\rb\n", "control character"),
        ("a\x00\n", "control character"),
        ("a\ud800\n", "UTF-8"),
    ],
)
def test_sign_refuses_bad_text(text: str, match: str) -> None:
    s = NoteSigner("k", PrivateKey.generate("ed25519"))
    with pytest.raises(CheckpointFormatError, match=match):
        s.sign(text)


def test_sign_note_needs_signers() -> None:
    with pytest.raises(InvalidInput):
        sign_note("a\n", [])


def test_add_signatures_replaces_same_key_and_appends_new() -> None:
    a = NoteSigner("a", PrivateKey.generate("ed25519"))
    b = NoteSigner("b", PrivateKey.generate("ed25519"))
    n = sign_note("hello\n", [a])
    stale = Note(n.text, (NoteSignature("a", a.key_id, b"\x00" * 64),))
    n2 = stale.add_signatures([a, b])
    assert [s.name for s in n2.signatures] == ["a", "b"]
    _, verified = open_note(n2.to_bytes(), [a.verifier(), b.verifier()])
    assert {v.name for v in verified} == {"a", "b"}


def test_same_name_other_id_and_other_name_same_id_are_ignored() -> None:
    a = NoteSigner("a", PrivateKey.generate("ed25519"))
    good = sign_note("hello\n", [a])
    # a signature claiming a's name with another key id, and another name with a's key id
    junk = (
        NoteSignature("a", bytes(4), b"\x01" * 64),
        NoteSignature("b", a.key_id, b"\x02" * 64),
    )
    note = Note(good.text, junk + good.signatures)
    assert open_note(note.to_bytes(), [a.verifier()])[1] == [a.verifier()]


def test_ambiguous_known_keys_are_refused() -> None:
    class Colliding(NoteVerifier):
        @property
        def key_id(self) -> bytes:
            return b"\x00\x00\x00\x00"

    k1 = Colliding("a", PrivateKey.generate("ed25519").public_key())
    k2 = Colliding("a", PrivateKey.generate("ed25519").public_key())
    note = Note("x\n", (NoteSignature("a", bytes(4), b"\x00" * 64),))
    with pytest.raises(CheckpointError, match="ambiguous key a\\+00000000"):
        note.verify([k1, k2])


def test_size_limit_checked_first() -> None:
    with pytest.raises(CheckpointFormatError, match="over the 1048576-byte limit"):
        Note.from_bytes(b"\xff" * (MAX_NOTE_BYTES + 1))
    s = NoteSigner("k", PrivateKey.generate("ed25519"))
    with pytest.raises(CheckpointFormatError, match="limit"):
        sign_note("a" * MAX_NOTE_BYTES + "\n", [s])


def test_strict_base64() -> None:
    assert strict_b64decode("AA==", "x") == b"\x00"
    for bad in ["AB==", "AA=", "A===", "AA==AA==", " AA==", "AA==\n", "AA-_", "✓AAA"]:
        with pytest.raises(CheckpointFormatError):
            strict_b64decode(bad, "x")


def test_verifier_refuses_signature_for_another_key() -> None:
    a = NoteSigner("a", PrivateKey.generate("ed25519"))
    b = NoteSigner("b", PrivateKey.generate("ed25519"))
    sig = a.sign("t\n")
    with pytest.raises(KolmError, match=r"not b\+"):
        b.verifier().verify("t\n", sig)


# --------------------------------------------------------------------------------------
# Properties

LINE = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x2FFF, exclude_categories=["Cs"]),
    min_size=1,
    max_size=30,
)
SIGNERS = [NoteSigner(f"example.com/k{i}", PrivateKey.generate("ed25519")) for i in range(3)]


@FUZZ_DERANDOMIZED
@given(lines=st.lists(LINE, min_size=1, max_size=5), n=st.integers(1, 3))
def test_round_trip_and_verify(lines: list[str], n: int) -> None:
    text = "".join(line + "\n" for line in lines)
    note = sign_note(text, SIGNERS[:n])
    data = note.to_bytes()
    assert Note.from_bytes(data) == note
    _, verified = open_note(data, [s.verifier() for s in SIGNERS])
    assert [v.name for v in verified] == [s.name for s in SIGNERS[:n]]


GOOD_NOTE = sign_note("example.com/log\n42\nhello world\n", SIGNERS[:2]).to_bytes()
ONE_SIG_NOTE = sign_note("example.com/log\n42\nhello world\n", SIGNERS[:1]).to_bytes()


@FUZZ_DERANDOMIZED
@given(bit=st.integers(0, len(ONE_SIG_NOTE) * 8 - 1))
def test_any_bit_flip_fails(bit: int) -> None:
    # Only signature by a known key: any flip breaks the text, the signature, or makes the
    # signature's key unknown (then no known key signed). All verifiers are offered.
    data = bytearray(ONE_SIG_NOTE)
    data[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(KolmError) as e:
        open_note(bytes(data), [s.verifier() for s in SIGNERS])
    names_something(e.value)


def test_every_bit_flip_fails_exhaustively() -> None:
    verifiers = [SIGNERS[0].verifier()]
    data = sign_note("example.com/log\n7\nroot\n", SIGNERS[:1]).to_bytes()
    for bit in range(len(data) * 8):
        mutated = bytearray(data)
        mutated[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(KolmError):
            open_note(bytes(mutated), verifiers)


@FUZZ_DERANDOMIZED
@given(data=st.data())
def test_parser_raises_only_kolm_errors(data: st.DataObject) -> None:
    mutated = data.draw(mutations(GOOD_NOTE))
    try:
        Note.from_bytes(mutated)
    except KolmError as e:
        names_something(e)
    try:
        open_note(mutated, [s.verifier() for s in SIGNERS])
    except KolmError as e:
        names_something(e)


@FUZZ_DERANDOMIZED
@given(s=st.text(max_size=120))
def test_vkey_parser_raises_only_kolm_errors(s: str) -> None:
    try:
        NoteVerifier.from_vkey(s)
    except KolmError as e:
        names_something(e)
