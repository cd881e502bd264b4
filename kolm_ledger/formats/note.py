"""C2SP signed notes (https://c2sp.org/signed-note), Ed25519 only.

A signed note is a text followed by a blank line and one or more signature lines::

    <text: one or more non-empty lines, each ending in "\\n">
    <blank line>
    — <key name> <base64(4-byte key id || signature)>
    ...

The whole note is valid UTF-8 with no control characters other than newline. The
signature covers the text, final newline included. Key names are non-empty and
contain neither whitespace nor ``+``. The key id of an Ed25519 key is::

    SHA-256(name || 0x0A || 0x01 || 32-byte public key)[:4]

and a verifier key is written ``<name>+<hex key id>+<base64(0x01 || public key)>``,
exactly as golang.org/x/mod/sumdb/note writes it, so notes and keys interoperate
with the Go ecosystem (witnesses, ``note.NewVerifier``).

This module is stricter than the spec in two places, both harmless for checkpoints:
the text may not contain empty lines, and base64 must be canonical (no set padding
bits), so that no two distinct byte strings parse to the same note.

Example::

    >>> from kolm_ledger.keys import PrivateKey
    >>> from kolm_ledger.formats.note import NoteSigner, open_note, sign_note
    >>> signer = NoteSigner("example.com/log", PrivateKey.generate("ed25519"))
    >>> data = sign_note("hello\\n", [signer]).to_bytes()
    >>> note, verified = open_note(data, [signer.verifier()])
    >>> note.text, verified[0].name
    ('hello\\n', 'example.com/log')
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

from kolm_ledger._crypto import PrivateKey, PublicKey
from kolm_ledger.errors import (
    CheckpointError,
    CheckpointFormatError,
    FormatError,
    InvalidInput,
    KeyFormatError,
    SignatureError,
)

__all__ = [
    "ALG_ED25519",
    "KEY_ID_SIZE",
    "MAX_NOTE_BYTES",
    "MAX_SIGNATURES",
    "Note",
    "NoteSignature",
    "NoteSigner",
    "NoteVerifier",
    "check_key_name",
    "key_id",
    "open_note",
    "sign_note",
    "strict_b64decode",
]

#: Signature type byte of Ed25519 note signatures.
ALG_ED25519 = 0x01
#: Size in bytes of a note key id.
KEY_ID_SIZE = 4
#: Notes larger than this are refused before any parsing.
MAX_NOTE_BYTES = 1 << 20
#: Notes with more signature lines than this are refused.
MAX_SIGNATURES = 100

_SIG_PREFIX = "\u2014 "  # em dash, space
_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f]")
_HEX8 = re.compile(r"[0-9a-f]{8}")
_B64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")


def _snippet(s: str, n: int = 40) -> str:
    return repr(s if len(s) <= n else s[:n] + "...")


def strict_b64decode(s: str, what: str, error: type[FormatError] = CheckpointFormatError) -> bytes:
    """Decode canonical standard base64 (RFC 4648 §4, padded, no set padding bits).

    Raises ``error`` naming ``what``. Canonical only, so that every value has exactly
    one text form: a flipped bit in a base64 line always changes the decoded bytes.
    """
    if not _B64.fullmatch(s) or len(s) % 4:
        raise error(f"{what}: {_snippet(s)} is not padded standard base64")
    try:
        raw = base64.b64decode(s, validate=True)
    except binascii.Error as e:  # pragma: no cover - the pattern above already rules this out
        raise error(f"{what}: {_snippet(s)} is not valid base64: {e}") from e
    if base64.b64encode(raw).decode("ascii") != s:
        raise error(f"{what}: {_snippet(s)} is not canonical base64 (padding bits set)")
    return raw


def check_key_name(
    name: object, what: str, error: type[FormatError] = CheckpointFormatError
) -> str:
    """Check a note key name: a non-empty string without whitespace, ``+`` or control chars."""
    if not isinstance(name, str) or not name:
        raise error(f"{what}: key name must be a non-empty string, got {name!r}")
    if "+" in name:
        raise error(f"{what}: key name {_snippet(name)} contains '+'")
    if any(c.isspace() or c < " " for c in name):
        raise error(f"{what}: key name {_snippet(name)} contains whitespace or a control character")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError as e:
        raise error(f"{what}: key name {_snippet(name)} is not valid UTF-8") from e
    return name


def _check_chars(s: str, what: str) -> None:
    m = _CONTROL.search(s)
    if m:
        line = s.count("\n", 0, m.start()) + 1
        raise CheckpointFormatError(
            f"{what} has control character {m.group()!r} on line {line} (offset {m.start()})"
        )
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise CheckpointFormatError(
            f"{what} is not valid UTF-8: lone surrogate at offset {e.start}"
        ) from e


def _check_text(text: object) -> str:
    """Check note text: non-empty lines each ending in a newline, no control characters."""
    if not isinstance(text, str):
        raise CheckpointFormatError(f"note text must be a string, got {type(text).__name__}")
    if not text:
        raise CheckpointFormatError("note text is empty")
    if not text.endswith("\n"):
        raise CheckpointFormatError("note text does not end with a newline")
    _check_chars(text, "note text")
    for i, line in enumerate(text[:-1].split("\n"), 1):
        if not line:
            raise CheckpointFormatError(f"note text line {i} is empty")
    return text


def key_id(name: str, public_key: PublicKey) -> bytes:
    """The 4-byte key id of an Ed25519 note key: ``SHA-256(name || 0x0A || 0x01 || pub)[:4]``."""
    if public_key.algorithm != "ed25519":
        raise KeyFormatError(f"note keys must be Ed25519, got {public_key.algorithm}")
    data = name.encode("utf-8") + b"\n" + bytes([ALG_ED25519]) + public_key.raw()
    return hashlib.sha256(data).digest()[:KEY_ID_SIZE]


@dataclass(frozen=True)
class NoteSignature:
    """One signature line: key name, 4-byte key id and the raw signature bytes."""

    name: str
    key_id: bytes
    sig: bytes

    def __post_init__(self) -> None:
        check_key_name(self.name, "note signature")
        if not isinstance(self.key_id, bytes) or len(self.key_id) != KEY_ID_SIZE:
            n = len(self.key_id) if isinstance(self.key_id, bytes) else type(self.key_id).__name__
            raise CheckpointFormatError(
                f"note signature by {_snippet(self.name)}: key id has {n} bytes, want {KEY_ID_SIZE}"
            )
        if not isinstance(self.sig, bytes) or not self.sig:
            raise CheckpointFormatError(f"note signature by {_snippet(self.name)} is empty")

    @property
    def key(self) -> str:
        """``name+hex key id``, how errors and Go's ``note`` package name a key."""
        return f"{self.name}+{self.key_id.hex()}"

    def to_line(self) -> str:
        """The signature line, newline included."""
        blob = base64.b64encode(self.key_id + self.sig).decode("ascii")
        return f"{_SIG_PREFIX}{self.name} {blob}\n"

    @classmethod
    def from_line(cls, line: str, where: str = "note signature line") -> NoteSignature:
        """Parse one signature line (without its newline); raises :class:`CheckpointFormatError`."""
        if not line.startswith(_SIG_PREFIX):
            raise CheckpointFormatError(
                f"{where} does not start with an em dash (U+2014) and a space: {_snippet(line)}"
            )
        name, sep, blob = line[len(_SIG_PREFIX) :].partition(" ")
        if not sep:
            raise CheckpointFormatError(
                f"{where} has no space between key name and signature: {_snippet(line)}"
            )
        check_key_name(name, where)
        raw = strict_b64decode(blob, f"{where} signature")
        if len(raw) <= KEY_ID_SIZE:
            raise CheckpointFormatError(
                f"{where} signature has {len(raw)} bytes, want more than {KEY_ID_SIZE} "
                "(key id and signature)"
            )
        return cls(name, raw[:KEY_ID_SIZE], raw[KEY_ID_SIZE:])


@dataclass(frozen=True)
class NoteVerifier:
    """An Ed25519 note public key under a key name."""

    name: str
    key: PublicKey

    def __post_init__(self) -> None:
        check_key_name(self.name, "note verifier", KeyFormatError)
        if self.key.algorithm != "ed25519":
            raise KeyFormatError(
                f"note verifier {self.name!r}: note keys must be Ed25519, got {self.key.algorithm}"
            )

    @property
    def key_id(self) -> bytes:
        """The 4-byte key id."""
        return key_id(self.name, self.key)

    @property
    def key_label(self) -> str:
        """``name+hex key id``."""
        return f"{self.name}+{self.key_id.hex()}"

    def vkey(self) -> str:
        """The verifier key string ``name+hex8(key id)+base64(0x01 || public key)``."""
        blob = base64.b64encode(bytes([ALG_ED25519]) + self.key.raw()).decode("ascii")
        return f"{self.key_label}+{blob}"

    @classmethod
    def from_vkey(cls, vkey: str) -> NoteVerifier:
        """Parse a verifier key string; raises :class:`KeyFormatError` naming what is wrong.

        Requires an Ed25519 key (type byte 0x01) and a key id that matches name and key.
        """
        if not isinstance(vkey, str):
            raise KeyFormatError(f"verifier key must be a string, got {type(vkey).__name__}")
        parts = vkey.split("+", 2)
        if len(parts) != 3:
            raise KeyFormatError(f"verifier key {_snippet(vkey)}: want <name>+<key id>+<key>")
        name, hex_id, blob = parts
        check_key_name(name, "verifier key", KeyFormatError)
        if not _HEX8.fullmatch(hex_id):
            raise KeyFormatError(
                f"verifier key {name!r}: key id {_snippet(hex_id)} is not 8 lowercase hex digits"
            )
        raw = strict_b64decode(blob, f"verifier key {name!r}", KeyFormatError)
        if not raw or raw[0] != ALG_ED25519:
            alg = f"0x{raw[0]:02x}" if raw else "missing"
            raise KeyFormatError(
                f"verifier key {name!r}: signature type {alg}, only Ed25519 (0x01) is supported"
            )
        if len(raw) != 33:
            raise KeyFormatError(
                f"verifier key {name!r}: Ed25519 public key has {len(raw) - 1} bytes, want 32"
            )
        v = cls(name, PublicKey.from_ed25519_raw(raw[1:]))
        if v.key_id.hex() != hex_id:
            raise KeyFormatError(
                f"verifier key {name!r}: key id {hex_id} does not match the key "
                f"(computed {v.key_id.hex()})"
            )
        return v

    def verify(self, text: str, sig: NoteSignature) -> None:
        """Check that ``sig`` is this key's signature over ``text``.

        Raises :class:`SignatureError` naming the key.

        (1) the signature's key name and key id are this verifier's;
        (2) the Ed25519 signature verifies over the UTF-8 text.
        """
        # (1) the signature names this key
        if (sig.name, sig.key_id) != (self.name, self.key_id):
            raise SignatureError(f"note signature is by key {sig.key}, not {self.key_label}")
        # (2) the signature verifies over the text
        data = _check_text(text).encode("utf-8")
        try:
            self.key.verify(sig.sig, data)
        except SignatureError as e:
            raise SignatureError(f"note signature by key {self.key_label} does not verify") from e


@dataclass(frozen=True, eq=False)
class NoteSigner:
    """An Ed25519 private key that signs notes under a key name."""

    name: str
    key: PrivateKey

    def __post_init__(self) -> None:
        check_key_name(self.name, "note signer", KeyFormatError)
        if self.key.algorithm != "ed25519":
            raise KeyFormatError(
                f"note signer {self.name!r}: note keys must be Ed25519, got {self.key.algorithm}"
            )

    @property
    def key_id(self) -> bytes:
        """The 4-byte key id."""
        return key_id(self.name, self.key.public_key())

    def sign(self, text: str) -> NoteSignature:
        """Sign note ``text`` (checked first: non-empty lines, each ending in a newline)."""
        data = _check_text(text).encode("utf-8")
        return NoteSignature(self.name, self.key_id, self.key.sign(data))

    def verifier(self) -> NoteVerifier:
        """The matching verifier."""
        return NoteVerifier(self.name, self.key.public_key())


@dataclass(frozen=True)
class Note:
    """A note text with 1 to :data:`MAX_SIGNATURES` signatures (not necessarily verified)."""

    text: str
    signatures: tuple[NoteSignature, ...]

    def __post_init__(self) -> None:
        _check_text(self.text)
        n = len(self.signatures)
        if not 1 <= n <= MAX_SIGNATURES:
            raise CheckpointFormatError(
                f"note has {n} signatures, want between 1 and {MAX_SIGNATURES}"
            )
        size = len(self._encode())
        if size > MAX_NOTE_BYTES:
            raise CheckpointFormatError(
                f"note is {size} bytes, over the {MAX_NOTE_BYTES}-byte limit"
            )

    def _encode(self) -> bytes:
        return (self.text + "\n" + "".join(s.to_line() for s in self.signatures)).encode("utf-8")

    def to_bytes(self) -> bytes:
        """The signed-note bytes."""
        return self._encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Note:
        """Parse a signed note without verifying it; raises :class:`CheckpointFormatError`.

        The size limit is checked before anything else.
        """
        if len(data) > MAX_NOTE_BYTES:
            raise CheckpointFormatError(
                f"note is {len(data)} bytes, over the {MAX_NOTE_BYTES}-byte limit"
            )
        try:
            s = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CheckpointFormatError(
                f"note is not valid UTF-8: byte 0x{data[e.start]:02x} at offset {e.start}"
            ) from e
        _check_chars(s, "note")
        if not s.endswith("\n"):
            raise CheckpointFormatError("note does not end with a newline")
        split = s.rfind("\n\n")
        if split < 0:
            raise CheckpointFormatError("note has no blank line between its text and signatures")
        text, block = s[: split + 1], s[split + 2 :]
        if not block:
            raise CheckpointFormatError("note has no signature lines after the blank line")
        lines = block[:-1].split("\n")
        if len(lines) > MAX_SIGNATURES:
            raise CheckpointFormatError(
                f"note has {len(lines)} signature lines, over the limit of {MAX_SIGNATURES}"
            )
        sigs = tuple(
            NoteSignature.from_line(line, f"note signature line {i}")
            for i, line in enumerate(lines, 1)
        )
        return cls(text, sigs)

    def add_signatures(self, signers: Sequence[NoteSigner]) -> Note:
        """A copy signed by ``signers`` too; an existing signature by the same key is replaced."""
        new = [s.sign(self.text) for s in signers]
        keys = {(s.name, s.key_id) for s in new}
        kept = tuple(s for s in self.signatures if (s.name, s.key_id) not in keys)
        return Note(self.text, kept + tuple(new))

    def verify(self, verifiers: Sequence[NoteVerifier]) -> list[NoteVerifier]:
        """Verify the signatures by known keys; return the verifiers that verified, in order.

        Raises :class:`CheckpointError` naming the key or the known key names.

        (1) index the known keys by (name, key id);
        (2) ignore signatures by unknown keys;
        (3) verify every signature by a known key: one that fails rejects the note;
        (4) at least one known key must have verified.
        """
        # (1) index the known keys; the same key listed twice is not ambiguous
        known: dict[tuple[str, bytes], NoteVerifier] = {}
        ambiguous: set[tuple[str, bytes]] = set()
        for v in verifiers:
            k = (v.name, v.key_id)
            if k in known and known[k].key != v.key:
                ambiguous.add(k)
            known.setdefault(k, v)
        verified: list[NoteVerifier] = []
        for i, sig in enumerate(self.signatures, 1):
            k = (sig.name, sig.key_id)
            verifier = known.get(k)
            # (2) signatures by unknown keys are ignored (witnesses, rotated keys)
            if verifier is None:
                continue
            if k in ambiguous:
                raise CheckpointError(f"note signature {i}: ambiguous key {sig.key}")
            # (3) a signature by a known key must verify
            try:
                verifier.verify(self.text, sig)
            except SignatureError as e:
                raise CheckpointError(
                    f"note signature {i} by known key {sig.key} does not verify"
                ) from e
            if verifier not in verified:
                verified.append(verifier)
        # (4) at least one known key signed
        if not verified:
            names = sorted({v.key_label for v in known.values()})
            signers = [s.key for s in self.signatures[:5]]
            if len(self.signatures) > 5:
                signers.append(f"{len(self.signatures) - 5} more")
            raise CheckpointError(
                "note has no verifiable signature from "
                + (", ".join(names) if names else "any key (no verifiers given)")
                + f"; it is signed by {', '.join(signers)}"
            )
        return verified


def sign_note(text: str, signers: Sequence[NoteSigner]) -> Note:
    """Sign ``text`` with every signer. Requires at least one signer."""
    if not signers:
        raise InvalidInput("sign_note needs at least one signer")
    return Note(_check_text(text), tuple(s.sign(text) for s in signers))


def open_note(data: bytes, verifiers: Sequence[NoteVerifier]) -> tuple[Note, list[NoteVerifier]]:
    """Parse and verify a signed note; return it and the verifiers whose signature verified.

    Raises :class:`CheckpointFormatError` if malformed, :class:`CheckpointError` if a
    known key's signature does not verify or no known key signed.

    (1) parse the note (size limit first);
    (2) verify it against ``verifiers`` (:meth:`Note.verify`).
    """
    # (1) parse
    note = Note.from_bytes(data)
    # (2) verify
    return note, note.verify(verifiers)
