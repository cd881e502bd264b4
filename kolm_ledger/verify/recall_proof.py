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

:func:`read_artifact_corpus` verifies a ``.kolm`` file's signature and recall index with
nothing but this package (for ``kolm verify --artifact``): the signed corpus root, the
corpus tree and the cited rows, so evidence ids, labels and texts can be checked too.

Example::

    >>> from kolm_ledger.verify.recall_proof import CorpusTree, chunk_digest, verify_evidence
    >>> digests = [chunk_digest(f"doc#{i}", f"text {i}") for i in range(5)]
    >>> tree = CorpusTree(digests)
    >>> ev = [{"id": "doc#3", "digest": digests[3], "position": 3,
    ...        "proof": [h.hex() for h in tree.proof(3)]}]
    >>> verify_evidence(ev, tree.root_hex, tree.size)
"""

from __future__ import annotations

import os
import re
import sqlite3
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kolm_ledger.errors import ArtifactError, InclusionProofError, InvalidInput
from kolm_ledger.formats.canonical import digest_hex
from kolm_ledger.formats.merkle import MemoryTree, hash_leaf, root_from_leaves, verify_inclusion
from kolm_ledger.formats.model_signing import SIGNATURE_FILE
from kolm_ledger.verify.artifact import open_artifact

if TYPE_CHECKING:
    from kolm_ledger.keys import TrustRoot

__all__ = [
    "ArtifactChunk",
    "ArtifactCorpus",
    "CorpusTree",
    "chunk_digest",
    "corpus_leaf",
    "corpus_root",
    "read_artifact_corpus",
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


# --------------------------------------------------------------------------- the artifact file


@dataclass(frozen=True)
class ArtifactChunk:
    """One chunk row of an artifact's recall index."""

    position: int
    id: str
    digest: str
    text: str
    label: str | None


@dataclass(frozen=True)
class ArtifactCorpus:
    """The signed corpus of a verified ``.kolm`` file (see :func:`read_artifact_corpus`)."""

    artifact_digest: str
    signer_keyid: str
    corpus_root: str
    size: int
    tree: CorpusTree
    chunks: Mapping[int, ArtifactChunk]  # the requested positions only


def read_artifact_corpus(
    path: str | os.PathLike[str],
    trust: TrustRoot,
    *,
    artifact_digest: str,
    at: datetime,
    positions: Iterable[int] = (),
) -> ArtifactCorpus:
    """Verify a ``.kolm`` file's signature and recall index; return its signed corpus.

    Torch-, sqlite-vec- and ``kolm_compile``-free (an auditor's check). The artifact check
    is :func:`kolm_ledger.verify.artifact.open_artifact`'s, the one the inference loader
    runs. Raises :class:`~kolm_ledger.errors.ArtifactError` naming what failed. Steps:

      1. ``model.sig`` (the OpenSSF model-signing DSSE envelope) is signed by a
         ``compile`` key of ``trust`` valid at ``at`` (the prediction's time);
      2. its subject digest is the SHA-256 over the listed file digests and equals
         ``artifact_digest`` (the artifact the prediction names);
      3. the zip holds exactly the listed files (no unsigned extra, none missing, no
         symlink, unsafe name or pickle), each hashing to its listed digest within the
         size caps; ``manifest.json`` is read and the recall index it names unpacked;
      4. the index's chunk digests, in position order, give the manifest's
         ``recall.corpus_root`` over ``recall.chunks`` chunks (this builds the corpus tree);
      5. the rows at ``positions`` are returned (the caller compares them with the evidence).
    """
    p = Path(path)
    name = p.name
    with (
        open_artifact(p, trust.by_role("compile"), at=at) as art,
        tempfile.TemporaryDirectory(prefix="kolm-verify-") as tmp,
    ):
        # (1)-(2) the signature, the listed files and their digests (the loader's check)
        if art.digest != artifact_digest:
            raise ArtifactError(
                f"{name} is artifact {art.digest[:16]}…, the prediction names {artifact_digest[:16]}…"
            )
        signer = art.signer
        claimed = art.digest
        art.check()
        # (3) the manifest and the index it names, unpacked (both already hashed)
        rc = art.read_manifest().recall
        if rc is None:
            raise ArtifactError(f"{name}: manifest.json has no recall field")
        root, size, rel = rc.corpus_root, rc.chunks, rc.index
        if rel not in dict(art.resources):
            raise ArtifactError(f"{name}: {rel[:80]} is not listed in {SIGNATURE_FILE}")
        db = art.extract(Path(tmp) / "a", only=[rel]) / rel
        # (4) the chunk digests give the signed corpus root
        want = sorted({int(x) for x in positions})
        try:
            conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
            try:
                digests = [
                    r[0] for r in conn.execute("SELECT digest FROM chunks ORDER BY position")
                ]
                rows = {
                    r[0]: ArtifactChunk(int(r[0]), r[1], r[2], r[3], r[4])
                    for pos in want
                    for r in conn.execute(
                        "SELECT position, id, digest, text, label FROM chunks WHERE position = ?",
                        (pos,),
                    )
                }
            finally:
                conn.close()
        except sqlite3.DatabaseError as e:
            raise ArtifactError(f"{name}: {rel} is not a readable recall database: {e}") from e
        if len(digests) != size or size < 1:
            raise ArtifactError(
                f"{name}: {rel} holds {len(digests)} chunks, the manifest says {size}"
            )
        try:
            tree = CorpusTree(digests)
        except InvalidInput as e:
            raise ArtifactError(f"{name}: {rel}: {e}") from e
        if tree.root_hex != root:
            raise ArtifactError(
                f"{name}: the chunks of {rel} give corpus root {tree.root_hex[:16]}…, the "
                f"manifest says {root[:16]}…"
            )
    return ArtifactCorpus(claimed, signer.keyid, root, size, tree, rows)
