"""A C2SP transparency-log witness (https://c2sp.org/tlog-witness) and its client.

A witness is an independent process that remembers, per log origin, the newest
checkpoint it cosigned. The log (the ledger) POSTs each new checkpoint to
``/add-checkpoint`` with a consistency proof from that size::

    old <size>\\n
    <base64 consistency proof hash>\\n      (zero or more, at most 63)
    \\n
    <signed checkpoint note>

and the witness answers with cosignature lines, or:

- 400 malformed request or ``old`` > checkpoint size; 404 unknown origin;
- 403 no trusted log signature verifies;
- 409 ``old`` is not the size it last cosigned (body: that size and a newline,
  ``Content-Type: text/x.tlog.size``), or equal sizes with different roots;
- 422 the consistency proof does not verify.

A cosignature (https://c2sp.org/tlog-cosignature, Ed25519) is a signed-note signature
line whose key id is ``SHA-256(name || 0x0A || 0x04 || pubkey)[:4]`` and whose
signature is ``u64 big-endian timestamp || Ed25519 signature`` over::

    cosignature/v1\\n
    time <unix seconds>\\n
    <checkpoint note text>

The witness verifies the log signature and the consistency proof, then persists its
new state atomically (temporary file, fsync, rename, fsync of the directory) before it
answers; one lock makes check-and-persist atomic, so concurrent requests cannot roll
its view back.

Example::

    >>> from kolm_ledger.keys import PrivateKey
    >>> c = Cosigner("witness.example/w1", PrivateKey.generate("ed25519"))
    >>> sig = c.cosign("example.com/log\\n1\\n" + "A" * 43 + "=\\n", 1700000000)
    >>> c.verifier().verify("example.com/log\\n1\\n" + "A" * 43 + "=\\n", sig)
    1700000000
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kolm_ledger._crypto import PrivateKey, PublicKey
from kolm_ledger.errors import (
    CheckpointError,
    FormatError,
    KeyFormatError,
    SignatureError,
)
from kolm_ledger.formats.note import (
    Note,
    NoteSignature,
    check_key_name,
    strict_b64decode,
)

__all__ = [
    "ALG_COSIGNATURE_ED25519",
    "MAX_BODY",
    "MAX_PROOF_LINES",
    "SIZE_CONTENT_TYPE",
    "CosignatureVerifier",
    "Cosigner",
    "cosignature_key_id",
    "cosigned_message",
    "load_witness_verifiers",
    "verify_cosignatures",
]

#: Signature type byte of Ed25519 cosignatures (vkeys and key ids).
ALG_COSIGNATURE_ED25519 = 0x04
#: A request may carry at most this many consistency proof lines.
MAX_PROOF_LINES = 63
MAX_BODY = 1 << 20
SIZE_CONTENT_TYPE = "text/x.tlog.size"


def cosignature_key_id(name: str, public_key: PublicKey) -> bytes:
    """``SHA-256(name || 0x0A || 0x04 || 32-byte Ed25519 public key)[:4]``."""
    if public_key.algorithm != "ed25519":
        raise KeyFormatError(f"cosigner keys must be Ed25519, got {public_key.algorithm}")
    data = name.encode() + b"\n" + bytes([ALG_COSIGNATURE_ED25519]) + public_key.raw()
    return hashlib.sha256(data).digest()[:4]


def cosigned_message(text: str, timestamp: int) -> bytes:
    """The bytes a v1 cosignature signs: header, time line, checkpoint note text."""
    if not 0 <= timestamp < 2**63:
        raise FormatError(f"cosignature timestamp {timestamp} is out of range")
    return f"cosignature/v1\ntime {timestamp}\n{text}".encode()


@dataclass(frozen=True)
class CosignatureVerifier:
    """A witness public key (Ed25519) under its name."""

    name: str
    key: PublicKey

    def __post_init__(self) -> None:
        check_key_name(self.name, "witness key", KeyFormatError)
        cosignature_key_id(self.name, self.key)  # checks the algorithm

    @property
    def key_id(self) -> bytes:
        """The 4-byte cosignature key id."""
        return cosignature_key_id(self.name, self.key)

    def vkey(self) -> str:
        """``name+hex key id+base64(0x04 || public key)``."""
        blob = base64.b64encode(bytes([ALG_COSIGNATURE_ED25519]) + self.key.raw()).decode()
        return f"{self.name}+{self.key_id.hex()}+{blob}"

    @classmethod
    def from_vkey(cls, vkey: str) -> CosignatureVerifier:
        """Parse a cosigner vkey (signature type 0x04); raises :class:`KeyFormatError`."""
        parts = vkey.strip().split("+", 2)
        if len(parts) != 3:
            raise KeyFormatError(f"witness vkey {vkey[:40]!r}: want <name>+<key id>+<key>")
        name, hex_id, blob = parts
        raw = strict_b64decode(blob, f"witness vkey {name[:40]!r}", KeyFormatError)
        if len(raw) != 33 or raw[0] != ALG_COSIGNATURE_ED25519:
            raise KeyFormatError(
                f"witness vkey {name[:40]!r}: want type 0x04 and a 32-byte Ed25519 key"
            )
        v = cls(name, PublicKey.from_ed25519_raw(raw[1:]))
        if v.key_id.hex() != hex_id:
            raise KeyFormatError(
                f"witness vkey {name[:40]!r}: key id {hex_id[:8]} does not match the key "
                f"(computed {v.key_id.hex()})"
            )
        return v

    def matches(self, sig: NoteSignature) -> bool:
        """Whether ``sig`` claims to be by this witness key (name and key id)."""
        return (sig.name, sig.key_id) == (self.name, self.key_id)

    def verify(self, text: str, sig: NoteSignature) -> int:
        """Verify a cosignature over checkpoint ``text``; return its timestamp.

        Raises :class:`SignatureError` naming the witness.
        """
        if not self.matches(sig):
            raise SignatureError(f"cosignature is by {sig.key}, not {self.name}")
        if len(sig.sig) != 8 + 64:
            raise SignatureError(
                f"cosignature by {self.name} has {len(sig.sig)} bytes, want 72 (time + Ed25519)"
            )
        (ts,) = struct.unpack(">Q", sig.sig[:8])
        try:
            self.key.verify(sig.sig[8:], cosigned_message(text, ts))
        except (SignatureError, FormatError) as e:
            raise SignatureError(f"cosignature by witness {self.name} does not verify") from e
        return int(ts)


@dataclass(frozen=True, eq=False)
class Cosigner:
    """A witness's Ed25519 signing key under its name."""

    name: str
    key: PrivateKey

    def verifier(self) -> CosignatureVerifier:
        """The matching verifier."""
        return CosignatureVerifier(self.name, self.key.public_key())

    def cosign(self, text: str, timestamp: int | None = None) -> NoteSignature:
        """A cosignature over checkpoint note ``text`` at ``timestamp`` (default now)."""
        ts = int(time.time()) if timestamp is None else timestamp
        sig = self.key.sign(cosigned_message(text, ts))
        return NoteSignature(self.name, self.verifier().key_id, struct.pack(">Q", ts) + sig)


def load_witness_verifiers(path: str | os.PathLike[str]) -> list[CosignatureVerifier]:
    """A witnesses file: one vkey per line (blank lines and ``#`` comments ignored)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise KeyFormatError(f"cannot read witnesses file {path}: {e.strerror}") from e
    out = []
    for i, line in enumerate(lines, 1):
        line = line.strip()
        if line and not line.startswith("#"):
            try:
                out.append(CosignatureVerifier.from_vkey(line))
            except KeyFormatError as e:
                raise KeyFormatError(f"{path} line {i}: {e}") from e
    return out


def verify_cosignatures(note: Note, witnesses: Sequence[CosignatureVerifier]) -> list[str]:
    """Names of the ``witnesses`` whose cosignature on ``note`` verifies.

    Cosignatures by unknown keys are ignored; one by a known witness key that does not
    verify raises :class:`CheckpointError`.
    """
    ok: list[str] = []
    for sig in note.signatures:
        for w in witnesses:
            if w.matches(sig):
                try:
                    w.verify(note.text, sig)
                except SignatureError as e:
                    raise CheckpointError(str(e)) from e
                if w.name not in ok:
                    ok.append(w.name)
    return ok
