"""C2SP transparency-log proofs (https://c2sp.org/tlog-proof): offline inclusion proofs.

The text form::

    c2sp.org/tlog-proof@v1
    extra <base64>                      (optional, unauthenticated)
    index <decimal, no leading zeros>
    <base64 inclusion-proof hash>       (zero or more, leaf's sibling first)

    <the signed checkpoint note, verbatim>

Proofs are stored with the file extension ``.tlog-proof``.

Example::

    >>> from kolm_ledger import merkle
    >>> from kolm_ledger.keys import PrivateKey, TrustRoot, TrustedKey
    >>> from kolm_ledger.formats.note import NoteSigner
    >>> from kolm_ledger.formats.checkpoint import Checkpoint, sign_checkpoint
    >>> from kolm_ledger.formats.tlogproof import TlogProof
    >>> key = PrivateKey.generate("ed25519")
    >>> trust = TrustRoot((TrustedKey.for_key(key.public_key(), "log", origin="example.com/log"),))
    >>> tree = merkle.MemoryTree()
    >>> for i in range(3):
    ...     tree.append(merkle.hash_leaf(b"%d" % i))
    >>> cp = Checkpoint("example.com/log", 3, tree.root(), bytes(32))
    >>> note = sign_checkpoint(cp, [NoteSigner("example.com/log", key)]).to_bytes()
    >>> proof = TlogProof(1, tuple(tree.inclusion_proof(1, 3)), note)
    >>> TlogProof.from_text(proof.to_text()).verify(merkle.hash_leaf(b"1"), trust).checkpoint.size
    3
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from datetime import datetime

from kolm_ledger.errors import FormatError, InclusionProofError, ProofFormatError
from kolm_ledger.formats import merkle
from kolm_ledger.formats.checkpoint import Checkpoint, SignedCheckpoint, verify_checkpoint
from kolm_ledger.formats.note import MAX_NOTE_BYTES, strict_b64decode
from kolm_ledger.keys import TrustRoot

__all__ = [
    "FILE_EXTENSION",
    "HEADER",
    "MAX_INDEX",
    "MAX_PROOF_HASHES",
    "TlogProof",
]

#: First line of every proof.
HEADER = "c2sp.org/tlog-proof@v1"
#: File extension proofs are stored with.
FILE_EXTENSION = ".tlog-proof"
#: An inclusion proof in a tree of at most 2**63 leaves has at most 63 hashes.
MAX_PROOF_HASHES = 64
#: Largest leaf index (what a signed 64-bit integer holds).
MAX_INDEX = 2**63 - 1
#: Proof texts larger than this are refused before parsing.
MAX_PROOF_BYTES = MAX_NOTE_BYTES + 64 * 1024

_INDEX = re.compile(r"0|[1-9][0-9]{0,18}")


def _short(s: str, n: int = 40) -> str:
    return repr(s if len(s) <= n else s[:n] + "...")


@dataclass(frozen=True)
class TlogProof:
    """An entry's index, its inclusion proof and the signed checkpoint it proves against."""

    index: int
    hashes: tuple[bytes, ...]
    checkpoint: bytes
    extra: bytes | None = None

    def __post_init__(self) -> None:
        if type(self.index) is not int or not 0 <= self.index <= MAX_INDEX:
            raise ProofFormatError(f"tlog-proof index {self.index!r} is not in [0, {MAX_INDEX}]")
        if not isinstance(self.hashes, tuple):
            raise ProofFormatError("tlog-proof hashes must be a tuple of bytes")
        if len(self.hashes) > MAX_PROOF_HASHES:
            raise ProofFormatError(
                f"tlog-proof has {len(self.hashes)} hashes, over the limit of {MAX_PROOF_HASHES}"
            )
        for i, h in enumerate(self.hashes):
            if not isinstance(h, bytes) or len(h) != merkle.HASH_SIZE:
                n = len(h) if isinstance(h, bytes) else type(h).__name__
                raise ProofFormatError(
                    f"tlog-proof hash {i} has {n} bytes, want {merkle.HASH_SIZE}"
                )
        if self.extra is not None and (not isinstance(self.extra, bytes) or not self.extra):
            raise ProofFormatError("tlog-proof extra must be non-empty bytes or None")
        if not isinstance(self.checkpoint, bytes):
            raise ProofFormatError("tlog-proof checkpoint must be bytes")
        try:
            SignedCheckpoint.from_bytes(self.checkpoint)
        except FormatError as e:
            raise ProofFormatError(f"tlog-proof checkpoint: {e}") from e

    def signed_checkpoint(self) -> SignedCheckpoint:
        """The checkpoint, parsed but not verified."""
        return SignedCheckpoint.from_bytes(self.checkpoint)

    def to_text(self) -> str:
        """The tlog-proof text."""
        lines = [HEADER]
        if self.extra is not None:
            lines.append("extra " + base64.b64encode(self.extra).decode("ascii"))
        lines.append(f"index {self.index}")
        lines.extend(base64.b64encode(h).decode("ascii") for h in self.hashes)
        return "\n".join(lines) + "\n\n" + self.checkpoint.decode("utf-8")

    def to_bytes(self) -> bytes:
        """The tlog-proof text as UTF-8 (the ``.tlog-proof`` file contents)."""
        return self.to_text().encode("utf-8")

    @classmethod
    def from_text(cls, text: str) -> TlogProof:
        """Parse a tlog-proof strictly; raises :class:`ProofFormatError` naming the line.

        The header, an optional ``extra`` line, ``index N`` (no leading zeros), at most
        :data:`MAX_PROOF_HASHES` base64 hashes of 32 bytes, a blank line, and a checkpoint
        that parses.
        """
        if not isinstance(text, str):
            raise ProofFormatError(f"tlog-proof must be text, got {type(text).__name__}")
        if len(text) > MAX_PROOF_BYTES:
            raise ProofFormatError(
                f"tlog-proof is {len(text)} characters, over the {MAX_PROOF_BYTES} limit"
            )
        head, sep, note = text.partition("\n\n")
        if not sep:
            raise ProofFormatError("tlog-proof has no blank line before its checkpoint")
        lines = head.split("\n")
        if lines[0] != HEADER:
            raise ProofFormatError(f"tlog-proof line 1 is {_short(lines[0])}, want {HEADER!r}")
        pos = 1
        extra: bytes | None = None
        if pos < len(lines) and lines[pos].startswith("extra "):
            extra = strict_b64decode(lines[pos][6:], "tlog-proof extra", ProofFormatError)
            if not extra:
                raise ProofFormatError("tlog-proof extra line is empty")
            pos += 1
        if pos >= len(lines):
            raise ProofFormatError(f"tlog-proof has no 'index' line (line {pos + 1})")
        keyword, _, value = lines[pos].partition(" ")
        if keyword != "index" or not _INDEX.fullmatch(value):
            raise ProofFormatError(
                f"tlog-proof line {pos + 1} {_short(lines[pos])} is not 'index <decimal>' "
                "without leading zeros"
            )
        index = int(value)
        if index > MAX_INDEX:
            raise ProofFormatError(f"tlog-proof index {index} is over {MAX_INDEX}")
        hash_lines = lines[pos + 1 :]
        if len(hash_lines) > MAX_PROOF_HASHES:
            raise ProofFormatError(
                f"tlog-proof has {len(hash_lines)} hashes, over the limit of {MAX_PROOF_HASHES}"
            )
        hashes: list[bytes] = []
        for i, line in enumerate(hash_lines):
            where = f"tlog-proof line {pos + 2 + i} (hash {i})"
            h = strict_b64decode(line, where, ProofFormatError)
            if len(h) != merkle.HASH_SIZE:
                raise ProofFormatError(f"{where} has {len(h)} bytes, want {merkle.HASH_SIZE}")
            hashes.append(h)
        try:
            checkpoint = note.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ProofFormatError(f"tlog-proof checkpoint is not valid UTF-8: {e.reason}") from e
        return cls(index, tuple(hashes), checkpoint, extra)

    @classmethod
    def from_bytes(cls, data: bytes) -> TlogProof:
        """Parse UTF-8 tlog-proof bytes."""
        if len(data) > MAX_PROOF_BYTES:
            raise ProofFormatError(
                f"tlog-proof is {len(data)} bytes, over the {MAX_PROOF_BYTES}-byte limit"
            )
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ProofFormatError(
                f"tlog-proof is not valid UTF-8: byte 0x{data[e.start]:02x} at offset {e.start}"
            ) from e
        return cls.from_text(text)

    def verify_inclusion(self, leaf_hash: bytes, checkpoint: Checkpoint) -> None:
        """Check that ``leaf_hash`` is leaf :attr:`index` of the tree ``checkpoint`` commits to.

        ``checkpoint`` must already be verified. Raises :class:`InclusionProofError`.

        (1) ``index < checkpoint.size``;
        (2) the inclusion proof gives ``checkpoint.root``.
        """
        # (1) the index lies inside the tree
        if not self.index < checkpoint.size:
            raise InclusionProofError(
                f"leaf index {self.index} is not below the checkpoint size {checkpoint.size}"
            )
        # (2) the proof links the leaf to the root
        merkle.verify_inclusion(
            self.index, checkpoint.size, leaf_hash, self.hashes, checkpoint.root
        )

    def verify(
        self,
        leaf_hash: bytes,
        trust: TrustRoot,
        *,
        origin: str | None = None,
        at: datetime | None = None,
    ) -> SignedCheckpoint:
        """Verify that ``leaf_hash`` is in the log, offline; return the verified checkpoint.

        Raises :class:`~kolm_ledger.errors.CheckpointError` (or a format error) for the
        checkpoint and :class:`InclusionProofError` for the proof.

        (1) the checkpoint is signed by a trusted log key (for ``origin``, valid at ``at``);
        (2) ``index < size``;
        (3) the inclusion proof links ``leaf_hash`` to the checkpoint root.
        """
        # (1) check the checkpoint signature
        signed = verify_checkpoint(self.checkpoint, trust, origin=origin, at=at)
        # (2) and (3) check the index and the inclusion proof
        self.verify_inclusion(leaf_hash, signed.checkpoint)
        return signed
