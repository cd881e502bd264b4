"""Recall evidence: chunk digests, the corpus Merkle root, and offline checks of cited chunks.

A recall index (``recall/index.db`` inside a ``.kolm``) holds chunks of a corpus. Each
chunk is committed to by its **chunk digest**, and the whole corpus by its **corpus
root**; a prediction receipt cites the chunks it used as **evidence** with RFC 6962
inclusion proofs, so anyone holding the corpus root (from the signed artifact manifest
or its artifact receipt) can check that a cited chunk is in the signed corpus — with
no sqlite-vec, no torch and no kolm server. The rules:

- chunk digest = hex SHA-256 of RFC 8785 ``{"id": id, "text": text}``; a labelled
  chunk (an accepted training example) adds ``"label": label`` to that object, so the
  label is committed too;
- corpus leaf ``i`` = ``SHA-256(0x00 || bytes.fromhex(digest_i))`` (the RFC 6962 leaf hash
  of the 32 raw digest bytes), in chunk order (position 0, 1, ...);
- corpus root = RFC 6962 Merkle tree hash of those leaves; a corpus has >= 1 chunk;
- evidence item = ``{"id", "digest", "position", "proof": [hex, ...]}`` (optionally
  ``"label"``), the proof being the inclusion proof of leaf ``position`` in the tree of
  ``corpus_size`` leaves.

Example::

    >>> from kolm_ledger.recall_proof import CorpusTree, chunk_digest, verify_evidence
    >>> digests = [chunk_digest(f"doc#{i}", f"text {i}") for i in range(5)]
    >>> tree = CorpusTree(digests)
    >>> ev = [{"id": "doc#3", "digest": digests[3], "position": 3,
    ...        "proof": [h.hex() for h in tree.proof(3)]}]
    >>> verify_evidence(ev, tree.root_hex, tree.size)
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from .canonical import digest_hex
from .errors import InclusionProofError, InvalidInput
from .merkle import MemoryTree, hash_leaf, root_from_leaves, verify_inclusion

__all__ = [
    "CorpusTree",
    "chunk_digest",
    "corpus_leaf",
    "corpus_root",
    "verify_evidence",
]

_HEX64 = re.compile(r"[0-9a-f]{64}")


def chunk_digest(chunk_id: str, text: str, label: str | None = None) -> str:
    """Hex SHA-256 of RFC 8785 ``{"id", "text"}`` (plus ``"label"`` when not ``None``)."""
    obj: dict[str, Any] = {"id": chunk_id, "text": text}
    if label is not None:
        obj["label"] = label
    return digest_hex(obj)


def corpus_leaf(digest: str) -> bytes:
    """The corpus Merkle leaf hash of a chunk digest: ``SHA-256(0x00 || raw digest)``.

    Requires ``digest`` to be 64 lowercase hex characters (else :class:`InvalidInput`).
    """
    if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
        raise InvalidInput(f"chunk digest {str(digest)[:80]!r} is not 64 lowercase hex characters")
    return hash_leaf(bytes.fromhex(digest))


def corpus_root(digests: Sequence[str]) -> str:
    """Hex corpus root over chunk digests in chunk order. Requires at least one digest."""
    if not digests:
        raise InvalidInput("a corpus needs at least one chunk; got none")
    return root_from_leaves([corpus_leaf(d) for d in digests]).hex()


class CorpusTree:
    """The corpus Merkle tree in memory: root and inclusion proofs. O(n) to build."""

    __slots__ = ("_tree",)

    def __init__(self, digests: Sequence[str]) -> None:
        """Build from chunk digests in chunk order. Requires at least one digest."""
        if not digests:
            raise InvalidInput("a corpus needs at least one chunk; got none")
        self._tree = MemoryTree()
        for d in digests:
            self._tree.append(corpus_leaf(d))

    @property
    def size(self) -> int:
        """Number of chunks."""
        return self._tree.size

    @property
    def root(self) -> bytes:
        """The corpus root."""
        return self._tree.root()

    @property
    def root_hex(self) -> str:
        """The corpus root, hex."""
        return self._tree.root().hex()

    def proof(self, position: int) -> list[bytes]:
        """Inclusion proof of chunk ``position``. Requires ``0 <= position < size``."""
        if not isinstance(position, int) or not 0 <= position < self.size:
            raise InvalidInput(f"chunk position {position!r} out of range [0, {self.size})")
        return self._tree.inclusion_proof(position, self.size)


def _fail(name: str, why: str) -> InclusionProofError:
    return InclusionProofError(f"evidence chunk {name}: {why}")


def verify_evidence(
    evidence: Sequence[Mapping[str, Any]],
    corpus_root: str | bytes,
    corpus_size: int,
    *,
    texts: Mapping[str, str] | None = None,
) -> None:
    """Check that every cited chunk is in the corpus with ``corpus_root`` and ``corpus_size``.

    ``corpus_root`` and ``corpus_size`` must come from a trusted source (the signed
    artifact manifest's ``recall`` field, or the artifact receipt), never from the
    evidence itself. ``texts`` optionally maps chunk id → text (and, for labelled
    chunks, ``evidence["label"]`` is used) to also check each digest against its text.
    Requires ``corpus_size >= 1``. Raises :class:`InclusionProofError` naming the first
    failing chunk (by id, else by list index); returns ``None`` when all verify.

    Steps, per item:
      1. shape: ``id`` a string, ``digest`` 64 lowercase hex, ``position`` an int in
         ``[0, corpus_size)``, ``proof`` a list of 64-hex strings;
      2. if ``texts`` has the id: recompute the chunk digest and compare;
      3. the inclusion proof of ``corpus_leaf(digest)`` at ``position`` gives ``corpus_root``.
    """
    if isinstance(corpus_root, str):
        if not _HEX64.fullmatch(corpus_root):
            raise InvalidInput(f"corpus root {corpus_root[:80]!r} is not 64 lowercase hex")
        root = bytes.fromhex(corpus_root)
    else:
        root = bytes(corpus_root)
    if not isinstance(corpus_size, int) or isinstance(corpus_size, bool) or corpus_size < 1:
        raise InvalidInput(f"corpus size {corpus_size!r}, want an integer >= 1")
    if isinstance(evidence, (str, bytes)) or not isinstance(evidence, Sequence):
        raise InclusionProofError(f"evidence is {type(evidence).__name__}, want a list")
    for n, item in enumerate(evidence):
        # (1) shape
        if not isinstance(item, Mapping):
            raise _fail(f"[{n}]", f"is {type(item).__name__}, want an object")
        cid = item.get("id")
        name = repr(cid) if isinstance(cid, str) else f"[{n}]"
        if not isinstance(cid, str):
            raise _fail(name, f"id is {type(cid).__name__}, want a string")
        digest, pos, proof = item.get("digest"), item.get("position"), item.get("proof")
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
            raise _fail(name, f"digest {str(digest)[:80]!r} is not 64 lowercase hex")
        if not isinstance(pos, int) or isinstance(pos, bool) or not 0 <= pos < corpus_size:
            raise _fail(name, f"position {pos!r} out of range [0, {corpus_size})")
        if not isinstance(proof, list) or not all(
            isinstance(h, str) and _HEX64.fullmatch(h) for h in proof
        ):
            raise _fail(name, "proof is not a list of 64-hex hashes")
        # (2) digest against text, when the caller holds the text
        if texts is not None and cid in texts:
            label = item.get("label")
            want = chunk_digest(cid, texts[cid], label if isinstance(label, str) else None)
            if want != digest:
                raise _fail(name, f"digest {digest[:16]}… does not match its text ({want[:16]}…)")
        # (3) inclusion in the corpus
        try:
            verify_inclusion(
                pos, corpus_size, corpus_leaf(digest), [bytes.fromhex(h) for h in proof], root
            )
        except InclusionProofError as e:
            raise _fail(name, f"not in the corpus (position {pos} of {corpus_size}): {e}") from e
