"""C2SP transparency-log checkpoints (https://c2sp.org/tlog-checkpoint) with kolm's chain line.

A checkpoint is a signed note (:mod:`kolm_ledger.formats.note`) whose text is::

    <origin>
    <tree size, decimal, no leading zeros>
    <base64 RFC 6962 root hash, 32 bytes>
    chain <base64 hash-chain head, 32 bytes>
    <further extension lines, optional, each non-empty>

The fourth line is kolm's extension line: the head of the ledger's hash chain at that
size, so an auditor can check the chain and the tree against one signature. kolm
requires it as the first extension line (stricter than C2SP, where every extension line
is optional). Further extension lines, which C2SP allows, are accepted, kept (they are
signed text) and otherwise ignored; an empty one or a second ``chain`` line is refused.
kolm's own log writes none. The log signs with its origin as the note key name; other
signatures (witness cosignatures, rotated keys) are ignored unless their key is trusted.

Example::

    >>> from kolm_ledger.keys import PrivateKey, TrustRoot, TrustedKey
    >>> from kolm_ledger.formats.note import NoteSigner
    >>> from kolm_ledger.formats.checkpoint import Checkpoint, sign_checkpoint, verify_checkpoint
    >>> key = PrivateKey.generate("ed25519")
    >>> trust = TrustRoot((TrustedKey.for_key(key.public_key(), "log", origin="example.com/log"),))
    >>> cp = Checkpoint("example.com/log", 0, bytes(32), bytes(32))
    >>> data = sign_checkpoint(cp, [NoteSigner("example.com/log", key)]).to_bytes()
    >>> verify_checkpoint(data, trust).checkpoint.size
    0
"""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from kolm_ledger.errors import (
    CheckpointError,
    CheckpointFormatError,
    ConsistencyProofError,
    InvalidInput,
    KeyFormatError,
    KeyValidityError,
)
from kolm_ledger.formats import merkle
from kolm_ledger.formats.note import (
    Note,
    NoteSigner,
    NoteVerifier,
    sign_note,
    strict_b64decode,
)
from kolm_ledger.keys import TrustRoot

__all__ = [
    "CHAIN_EXTENSION",
    "HASH_SIZE",
    "MAX_TREE_SIZE",
    "Checkpoint",
    "SignedCheckpoint",
    "check_consistent",
    "log_verifiers",
    "sign_checkpoint",
    "verify_checkpoint",
]

HASH_SIZE = 32
#: Keyword of kolm's one checkpoint extension line.
CHAIN_EXTENSION = "chain"
#: Largest tree size a checkpoint may state (what a signed 64-bit integer holds).
MAX_TREE_SIZE = 2**63 - 1

_SIZE = re.compile(r"0|[1-9][0-9]{0,18}")
_CONTROL = re.compile(r"[\x00-\x1f]")


def _short(s: str, n: int = 40) -> str:
    return repr(s if len(s) <= n else s[:n] + "...")


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def _check_hash(h: object, what: str) -> bytes:
    if not isinstance(h, bytes):
        raise CheckpointFormatError(f"{what} must be bytes, got {type(h).__name__}")
    if len(h) != HASH_SIZE:
        raise CheckpointFormatError(f"{what} has {len(h)} bytes, want {HASH_SIZE}")
    return h


def _check_extension(line: object, n: int) -> None:
    """An extension line after ``chain``: a non-empty line, not another ``chain`` line."""
    if not isinstance(line, str) or not line:
        raise CheckpointFormatError(f"checkpoint extension line {n} is empty (C2SP: non-empty)")
    if "\n" in line:
        raise CheckpointFormatError(f"checkpoint extension line {n} contains a newline")
    if line.partition(" ")[0] == CHAIN_EXTENSION:
        raise CheckpointFormatError(
            f"checkpoint line {n} {_short(line)} is a second '{CHAIN_EXTENSION}' line; "
            "a checkpoint has one chain head"
        )


@dataclass(frozen=True)
class Checkpoint:
    """The body of a checkpoint: origin, tree size, root hash and hash-chain head.

    ``extensions``: extension lines after the ``chain`` line (without their newlines),
    as another writer may add them; kolm's log writes none and no check reads them.
    """

    origin: str
    size: int
    root: bytes
    chain_head: bytes
    extensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.origin, str) or not self.origin:
            raise CheckpointFormatError("checkpoint origin must be a non-empty string")
        m = _CONTROL.search(self.origin)
        if m:
            raise CheckpointFormatError(
                f"checkpoint origin {_short(self.origin)} contains control character {m.group()!r}"
            )
        try:
            self.origin.encode("utf-8")
        except UnicodeEncodeError as e:
            raise CheckpointFormatError(
                f"checkpoint origin {_short(self.origin)} is not valid UTF-8"
            ) from e
        if type(self.size) is not int or not 0 <= self.size <= MAX_TREE_SIZE:
            raise CheckpointFormatError(
                f"checkpoint size {self.size!r} is not an integer in [0, {MAX_TREE_SIZE}]"
            )
        _check_hash(self.root, "checkpoint root")
        _check_hash(self.chain_head, "checkpoint chain head")
        if not isinstance(self.extensions, tuple):
            raise CheckpointFormatError("checkpoint extensions must be a tuple of lines")
        for n, line in enumerate(self.extensions, start=5):
            _check_extension(line, n)

    def to_text(self) -> str:
        """The note text: four lines and any further extension lines, each ending in a newline."""
        return (
            f"{self.origin}\n{self.size}\n{_b64(self.root)}\n"
            f"{CHAIN_EXTENSION} {_b64(self.chain_head)}\n"
        ) + "".join(f"{line}\n" for line in self.extensions)

    @classmethod
    def from_text(cls, text: str) -> Checkpoint:
        """Parse a checkpoint body strictly; raises :class:`CheckpointFormatError`.

        Origin, size (decimal, no leading zeros), 32-byte base64 root, and
        ``chain <32-byte base64>``; then any further non-empty extension lines (kept in
        :attr:`extensions`, otherwise ignored), none of them another ``chain`` line.
        """
        if not isinstance(text, str):
            raise CheckpointFormatError(f"checkpoint must be text, got {type(text).__name__}")
        if not text.endswith("\n"):
            raise CheckpointFormatError("checkpoint does not end with a newline")
        lines = text[:-1].split("\n")
        if len(lines) < 4:
            raise CheckpointFormatError(
                f"checkpoint has {len(lines)} lines, want 4 (origin, size, root, chain)"
            )
        origin, size_line, root_line, *extensions = lines
        if not _SIZE.fullmatch(size_line):
            raise CheckpointFormatError(
                f"checkpoint size line {_short(size_line)} is not a decimal number "
                "without leading zeros (at most 19 digits)"
            )
        size = int(size_line)
        if size > MAX_TREE_SIZE:
            raise CheckpointFormatError(f"checkpoint size {size} is over {MAX_TREE_SIZE}")
        root = strict_b64decode(root_line, "checkpoint root")
        _check_hash(root, "checkpoint root")
        chain_line = extensions[0]
        keyword, sep, value = chain_line.partition(" ")
        if keyword != CHAIN_EXTENSION or not sep:
            raise CheckpointFormatError(
                f"checkpoint line 4 {_short(chain_line)} is not the "
                f"'{CHAIN_EXTENSION} <base64>' extension"
            )
        chain_head = strict_b64decode(value, "checkpoint chain head")
        _check_hash(chain_head, "checkpoint chain head")
        return cls(origin, size, root, chain_head, tuple(extensions[1:]))


@dataclass(frozen=True)
class SignedCheckpoint:
    """A checkpoint and the signed note whose text it is."""

    checkpoint: Checkpoint
    note: Note

    def __post_init__(self) -> None:
        if self.note.text != self.checkpoint.to_text():
            raise CheckpointFormatError("signed checkpoint: the note text is not the checkpoint")

    def to_bytes(self) -> bytes:
        """The signed-note bytes."""
        return self.note.to_bytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> SignedCheckpoint:
        """Parse (without verifying) a signed checkpoint; raises :class:`CheckpointFormatError`."""
        note = Note.from_bytes(data)
        return cls(Checkpoint.from_text(note.text), note)


def sign_checkpoint(cp: Checkpoint, signers: Sequence[NoteSigner]) -> SignedCheckpoint:
    """Sign ``cp``. Requires at least one signer, each named by the checkpoint origin."""
    if not signers:
        raise InvalidInput("sign_checkpoint needs at least one signer")
    for s in signers:
        if s.name != cp.origin:
            raise InvalidInput(
                f"signer key name {_short(s.name)} is not the checkpoint origin {_short(cp.origin)}"
            )
    return SignedCheckpoint(cp, sign_note(cp.to_text(), signers))


def log_verifiers(
    trust: TrustRoot, origin: str | None = None, at: datetime | None = None
) -> list[NoteVerifier]:
    """Note verifiers for the trust root's log keys, each named by the key's origin.

    Only keys for ``origin`` when given; only keys valid (not expired, not revoked)
    at ``at`` when given. Raises :class:`KeyFormatError` for a log key that cannot
    sign notes (not Ed25519, or an origin that is not a valid key name).
    """
    out: list[NoteVerifier] = []
    for k in trust.log_keys(origin):
        if at is not None:
            try:
                k.check_valid_at(at)
            except KeyValidityError:
                continue
        if k.origin is None:
            raise KeyFormatError(f"log key {k.keyid[:16]} has no origin")
        try:
            out.append(NoteVerifier(k.origin, k.public_key))
        except KeyFormatError as e:
            raise KeyFormatError(f"log key {k.keyid[:16]} cannot verify notes: {e}") from e
    return out


def verify_checkpoint(
    data: bytes, trust: TrustRoot, *, origin: str | None = None, at: datetime | None = None
) -> SignedCheckpoint:
    """Verify a signed checkpoint against the trust root's log keys; return it.

    ``origin``: the log the caller expects (default: any log in the trust root).
    ``at``: only log keys valid at this time count (default: validity not checked).
    Raises :class:`CheckpointFormatError` if malformed, :class:`CheckpointError` otherwise.

    (1) parse the note;
    (2) at least one trusted log key (for ``origin``) signed it, and no signature
        by a trusted log key fails;
    (3) parse the body as a checkpoint;
    (4) the checkpoint's origin is ``origin`` and the name of a key that signed it.
    """
    # (1) parse the note
    note = Note.from_bytes(data)
    # (2) a trusted log key signed it
    verifiers = log_verifiers(trust, origin, at)
    if not verifiers:
        which = "any origin" if origin is None else f"origin {_short(origin)}"
        when = "" if at is None else " valid at that time"
        raise CheckpointError(f"trust root has no log key{when} for {which}")
    signed_by = note.verify(verifiers)
    # (3) parse the body
    cp = Checkpoint.from_text(note.text)
    # (4) the origin matches
    if origin is not None and cp.origin != origin:
        raise CheckpointError(f"checkpoint origin is {_short(cp.origin)}, want {_short(origin)}")
    names = sorted({v.name for v in signed_by})
    if cp.origin not in names:
        raise CheckpointError(
            f"checkpoint origin {_short(cp.origin)} is not the origin of a log key that signed "
            f"it ({', '.join(map(_short, names))})"
        )
    return SignedCheckpoint(cp, note)


def check_consistent(old: Checkpoint, new: Checkpoint, proof: Sequence[bytes]) -> None:
    """Check that ``new`` extends ``old`` (both already verified).

    Raises :class:`CheckpointError` when they contradict each other outright and
    :class:`~kolm_ledger.errors.ConsistencyProofError` when the proof does not verify.

    (1) same origin;
    (2) ``new.size >= old.size``;
    (3) equal sizes: equal roots and chain heads, and an empty proof;
    (4) from the empty tree: ``old.root`` is the empty root, and an empty proof;
    (5) otherwise the Merkle consistency proof verifies from ``old.root`` to ``new.root``.
    """
    # (1) same origin
    if old.origin != new.origin:
        raise CheckpointError(
            f"checkpoint origins differ: old {_short(old.origin)}, new {_short(new.origin)}"
        )
    # (2) the tree did not shrink
    if new.size < old.size:
        raise CheckpointError(f"new checkpoint size {new.size} is smaller than old size {old.size}")
    # (3) equal sizes: identical trees and chains
    if new.size == old.size:
        if new.root != old.root:
            raise CheckpointError(
                f"checkpoints of size {old.size} have different roots: "
                f"old {old.root.hex()}, new {new.root.hex()}"
            )
        if new.chain_head != old.chain_head:
            raise CheckpointError(
                f"checkpoints of size {old.size} have different chain heads: "
                f"old {old.chain_head.hex()}, new {new.chain_head.hex()}"
            )
        if proof:
            raise ConsistencyProofError(
                f"consistency proof between equal sizes {old.size} has {len(proof)} hashes, want 0"
            )
        return
    # (4) from the empty tree everything is consistent
    if old.size == 0:
        if old.root != merkle.empty_root():
            raise CheckpointError(
                f"old checkpoint of size 0 has root {old.root.hex()}, "
                f"want the empty root {merkle.empty_root().hex()}"
            )
        if proof:
            raise CheckpointError(f"consistency proof from size 0 has {len(proof)} hashes, want 0")
        return
    # (5) the Merkle consistency proof
    merkle.verify_consistency(old.size, new.size, proof, old.root, new.root)
