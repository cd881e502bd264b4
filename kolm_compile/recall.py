"""Recall: a signed, verifiable retrieval index shipped inside a ``.kolm``.

A corpus (a JSONL of ``{"id", "text"}`` documents or a folder of text files) is cut
into chunks, each chunk committed to by its digest and the corpus by an RFC 6962
Merkle root (rules in :mod:`kolm_ledger.verify.recall_proof`). The chunks and their
embeddings go into one sqlite-vec database, ``recall/index.db``; the manifest's
``recall`` field records the root, so a cited chunk can be proved to be in the
signed corpus. For a classify task with no corpus, the accepted training examples
become the chunks (:func:`index_from_examples`), and a prediction can cite its
nearest labelled neighbours (:func:`neighbour_vote`).

Example::

    >>> from kolm_compile import recall
    >>> docs = recall.load_corpus("corpus.jsonl")                        # doctest: +SKIP
    >>> chunks = recall.chunk_documents(docs, recall.ChunkConfig(size=200, overlap=40))
    >>> info = recall.build_index(chunks, embed_texts, "recall/index.db")  # doctest: +SKIP
    >>> manifest = manifest.replace(recall=info.to_ref(k=5))            # doctest: +SKIP
    >>> idx = recall.RecallIndex.open("recall/index.db", embed=embed_texts)  # doctest: +SKIP
    >>> hits = idx.search(["where is my card?"], k=5)[0]                # doctest: +SKIP
    >>> receipt_evidence = recall.evidence(hits, idx)                   # doctest: +SKIP

Database schema (``recall/index.db``; page size 4096, built then ``VACUUM``-ed)::

    meta(key TEXT PRIMARY KEY, value TEXT)      format, corpus_root, chunks, dim,
                                                embedding_model, chunking (JSON)
    chunks(position INTEGER PRIMARY KEY,        0..n-1, chunk order (= Merkle leaf order)
           id TEXT UNIQUE, digest TEXT, text TEXT, label TEXT NULL)
    vec_chunks USING vec0(embedding float[dim] distance_metric=cosine)   rowid = position

Loading the extension: the stdlib ``sqlite3`` is used when it can load extensions;
otherwise ``pysqlite3`` (``pysqlite3-binary``) is; if neither can load sqlite-vec,
:class:`RecallUnavailable` names the fix (``pip install 'kolm[recall]'``). Reading the
``chunks`` table (:func:`verify_index`) needs no extension at all.
"""

from __future__ import annotations

import functools
import json
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kolm_ledger.errors import ArtifactError, InvalidInput, KolmError
from kolm_ledger.formats.manifest import RecallRef
from kolm_ledger.formats.receipts import example_digest
from kolm_ledger.verify.recall_proof import CorpusTree, chunk_digest, corpus_root

if TYPE_CHECKING:
    import numpy

__all__ = [
    "DEFAULT_K_CAP",
    "INDEX_FILE",
    "INDEX_FORMAT",
    "Chunk",
    "ChunkConfig",
    "Document",
    "Hit",
    "IndexInfo",
    "RecallIndex",
    "RecallUnavailable",
    "build_index",
    "chunk_documents",
    "chunks_from_examples",
    "connect",
    "evidence",
    "exact_search",
    "index_from_examples",
    "load_corpus",
    "neighbour_vote",
    "sqlite_backend",
    "verify_index",
]

INDEX_FILE = "recall/index.db"
"""Where the index lives inside an artifact folder (the manifest's ``recall.index``)."""
INDEX_FORMAT = "kolm-recall/v1"
DEFAULT_K_CAP = 50
_PAGE_SIZE = 4096

Embed = Callable[[Sequence[str]], "numpy.ndarray"]
"""Texts → float32 array of shape ``(len(texts), dim)`` (L2-normalized is expected)."""


class RecallUnavailable(KolmError):
    """sqlite-vec cannot be loaded by any available SQLite (install ``kolm[recall]``)."""

    grpc_code = "FAILED_PRECONDITION"


# --------------------------------------------------------------------------- sqlite-vec


@functools.cache
def sqlite_backend() -> Any:
    """The DB-API module used for recall databases: stdlib ``sqlite3`` if it can load
    extensions, else ``pysqlite3.dbapi2``. Raises :class:`RecallUnavailable` if neither
    can load sqlite-vec. Probed once per process."""
    reasons: list[str] = []
    try:
        import sqlite_vec
    except ImportError:
        raise RecallUnavailable(
            "recall needs the sqlite-vec package; install it with pip install 'kolm[recall]'"
        ) from None
    candidates: list[tuple[str, Callable[[], Any]]] = [
        ("sqlite3", lambda: __import__("sqlite3")),
        ("pysqlite3", lambda: __import__("pysqlite3.dbapi2", fromlist=["dbapi2"])),
    ]
    for name, load in candidates:
        try:
            mod = load()
        except ImportError:
            reasons.append(f"{name}: not installed")
            continue
        if not hasattr(mod.Connection, "enable_load_extension"):
            reasons.append(f"{name} {mod.sqlite_version}: built without extension loading")
            continue
        try:
            c = mod.connect(":memory:")
            try:
                c.enable_load_extension(True)
                sqlite_vec.load(c)
                c.enable_load_extension(False)
                c.execute("SELECT vec_version()").fetchone()
            finally:
                c.close()
        except Exception as e:  # any failure to load means: try the next SQLite
            reasons.append(f"{name} {mod.sqlite_version}: {e}")
            continue
        return mod
    raise RecallUnavailable(
        "no SQLite here can load the sqlite-vec extension ("
        + "; ".join(reasons)
        + "); install pip install 'kolm[recall]' (adds pysqlite3-binary on Linux) or use a "
        "Python whose sqlite3 supports enable_load_extension"
    )


def connect(path: str | os.PathLike[str], *, read_only: bool = True) -> Any:
    """Open a recall database with sqlite-vec loaded (``check_same_thread=False``)."""
    import sqlite_vec

    mod = sqlite_backend()
    p = Path(path)
    if read_only:
        if not p.is_file():
            raise ArtifactError(f"recall index {p}: no such file")
        conn = mod.connect(f"{p.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
    else:
        conn = mod.connect(str(p), check_same_thread=False)
    conn.enable_load_extension(True)
    sqlite_vec.load(conn)
    conn.enable_load_extension(False)
    return conn


# --------------------------------------------------------------------------- corpus


@dataclass(frozen=True)
class Document:
    """One corpus document: a non-empty id and its text."""

    id: str
    text: str


def load_corpus(path: str | os.PathLike[str]) -> list[Document]:
    """Read a corpus: a ``.jsonl`` file of ``{"id", "text"}`` objects, or a folder.

    JSONL: one object per line (blank lines skipped), ``id`` a non-empty string unique in
    the file, ``text`` a string; order is file order. Folder: every regular file below it
    whose path has no part starting with ``.``, decoded as UTF-8, id = the relative POSIX
    path; order is sorted by id. Raises :class:`InvalidInput` naming the line or file.
    """
    p = Path(path)
    docs: list[Document] = []
    if p.is_dir():
        for f in sorted(p.rglob("*"), key=lambda q: q.relative_to(p).as_posix()):
            rel = f.relative_to(p)
            if any(part.startswith(".") for part in rel.parts) or not f.is_file():
                continue
            if f.is_symlink():
                raise InvalidInput(f"corpus {p}: {rel.as_posix()} is a symlink; want plain files")
            try:
                docs.append(Document(rel.as_posix(), f.read_text(encoding="utf-8")))
            except UnicodeDecodeError as e:
                raise InvalidInput(f"corpus {p}: {rel.as_posix()} is not UTF-8 text: {e}") from e
    elif p.is_file():
        seen: set[str] = set()
        with open(p, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    raise InvalidInput(f"corpus {p.name} line {n}: not JSON: {e}") from e
                if not isinstance(obj, dict):
                    raise InvalidInput(f"corpus {p.name} line {n}: want an object")
                did, text = obj.get("id"), obj.get("text")
                if not isinstance(did, str) or not did:
                    raise InvalidInput(f"corpus {p.name} line {n}: id must be a non-empty string")
                if not isinstance(text, str):
                    raise InvalidInput(f"corpus {p.name} line {n}: text must be a string")
                if did in seen:
                    raise InvalidInput(f"corpus {p.name} line {n}: duplicate id {did!r}")
                seen.add(did)
                docs.append(Document(did, text))
    else:
        raise InvalidInput(f"corpus {p}: no such file or folder")
    if not docs:
        raise InvalidInput(f"corpus {p}: no documents")
    return docs


@dataclass(frozen=True)
class ChunkConfig:
    """How documents are cut into chunks (recorded in the manifest's ``recall.chunking``).

    Words (the default) are maximal runs of non-whitespace; a word chunk's text is its
    words joined by one space, so whitespace is normalized. Characters slice the raw text.
    A window of ``size`` units advances by ``size - overlap``; the last window of a
    document ends at its end (no chunk lies wholly inside the previous one). A document
    with no words (or no characters) gives no chunk.
    """

    size: int = field(default=200, metadata={"help": "units per chunk"})
    overlap: int = field(default=40, metadata={"help": "units shared by consecutive chunks"})
    unit: str = field(default="words", metadata={"help": "'words' or 'chars'"})

    def __post_init__(self) -> None:
        def is_int(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if not is_int(self.size) or not 1 <= self.size <= 100_000:
            raise InvalidInput(f"chunk size: want an integer in [1, 100000], got {self.size!r}")
        if not is_int(self.overlap) or not 0 <= self.overlap < self.size:
            raise InvalidInput(
                f"chunk overlap: want an integer in [0, size={self.size}), got {self.overlap!r}"
            )
        if self.unit not in ("words", "chars"):
            raise InvalidInput(f"chunk unit: want 'words' or 'chars', got {self.unit!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, keys sorted: ``{"overlap", "size", "source": "documents", "unit"}``."""
        return {
            "overlap": self.overlap,
            "size": self.size,
            "source": "documents",
            "unit": self.unit,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ChunkConfig:
        """Inverse of :meth:`to_dict` (``source`` is ignored)."""
        return cls(
            size=d.get("size", 200), overlap=d.get("overlap", 40), unit=d.get("unit", "words")
        )


@dataclass(frozen=True)
class Chunk:
    """An indexed chunk. ``digest`` is :func:`~kolm_ledger.verify.recall_proof.chunk_digest`."""

    id: str
    text: str
    position: int
    digest: str
    label: str | None = None

    @classmethod
    def make(cls, chunk_id: str, text: str, position: int, label: str | None = None) -> Chunk:
        """A chunk with its digest computed."""
        return cls(chunk_id, text, position, chunk_digest(chunk_id, text, label), label)


def _windows(n: int, size: int, step: int) -> Iterator[tuple[int, int]]:
    start = 0
    while True:
        yield start, min(start + size, n)
        if start + size >= n:
            return
        start += step


def chunk_documents(docs: Iterable[Document], config: ChunkConfig | None = None) -> list[Chunk]:
    """Cut documents into chunks, in document order; chunk ``n`` of ``d`` is ``f"{d.id}#{n}"``."""
    cfg = config or ChunkConfig()
    step = cfg.size - cfg.overlap
    out: list[Chunk] = []
    for d in docs:
        if cfg.unit == "words":
            words = d.text.split()
            pieces = (
                [" ".join(words[a:b]) for a, b in _windows(len(words), cfg.size, step)]
                if words
                else []
            )
        else:
            pieces = (
                [d.text[a:b] for a, b in _windows(len(d.text), cfg.size, step)] if d.text else []
            )
        for n, text in enumerate(pieces):
            out.append(Chunk.make(f"{d.id}#{n}", text, len(out)))
    return out


def chunks_from_examples(examples: Iterable[Any]) -> list[Chunk]:
    """Accepted training examples as labelled chunks (classify tasks with no corpus).

    Each example is a ``(text, label)`` pair or a mapping with ``text``/``input`` and
    ``label``/``output``. Chunk id = :func:`~kolm_ledger.formats.receipts.example_digest`
    ``(text, label)`` — the subject digest of the example's label receipt, so a cited
    neighbour leads to its receipt. Exact duplicates are kept once (first occurrence).
    """
    out: list[Chunk] = []
    seen: set[str] = set()
    for n, ex in enumerate(examples):
        if isinstance(ex, Mapping):
            text = ex.get("text", ex.get("input"))
            label = ex.get("label", ex.get("output"))
        elif isinstance(ex, (tuple, list)) and len(ex) == 2:
            text, label = ex
        else:
            raise InvalidInput(f"examples[{n}]: want (text, label) or a mapping")
        if not isinstance(text, str) or not isinstance(label, str):
            raise InvalidInput(f"examples[{n}]: text and label must be strings")
        cid = example_digest(text, label)
        if cid in seen:
            continue
        seen.add(cid)
        out.append(Chunk.make(cid, text, len(out), label))
    return out


# --------------------------------------------------------------------------- building


@dataclass(frozen=True)
class IndexInfo:
    """What an index commits to; :meth:`to_manifest` is the manifest's ``recall`` section
    (:class:`kolm_ledger.formats.manifest.RecallRef`, less ``k``)."""

    corpus_root: str
    chunks: int
    dim: int
    embedding_model: str
    chunking: dict[str, Any]
    index: str = INDEX_FILE

    def to_ref(self, k: int | None = None) -> RecallRef:
        """The manifest's ``recall`` section for this index, with default top-``k``."""
        return RecallRef(
            index=self.index,
            corpus_root=self.corpus_root,
            chunks=self.chunks,
            dim=self.dim,
            embedding_model=self.embedding_model,
            chunking=dict(self.chunking),
            k=k,
        )

    def to_manifest(self) -> dict[str, Any]:
        """``{"index", "corpus_root", "chunks", "dim", "embedding_model", "chunking"}``."""
        return self.to_ref().to_dict()

    @classmethod
    def from_ref(cls, ref: RecallRef) -> IndexInfo:
        """What the manifest's (already checked) ``recall`` section says the index holds."""
        return cls(
            ref.corpus_root, ref.chunks, ref.dim, ref.embedding_model, dict(ref.chunking), ref.index
        )

    @classmethod
    def from_manifest(cls, d: Mapping[str, Any]) -> IndexInfo:
        """Parse the manifest's ``recall`` section (:meth:`RecallRef.from_dict
        <kolm_ledger.formats.manifest.RecallRef.from_dict>`); raises :class:`ArtifactError` naming
        the field."""
        return cls.from_ref(RecallRef.from_dict(d))


def _as_matrix(vecs: Any, n: int | None, what: str) -> numpy.ndarray:
    import numpy as np

    try:
        m = np.asarray(vecs, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise InvalidInput(f"{what}: not numeric vectors: {e}") from e
    if m.ndim == 1:
        m = m[None, :]
    if m.ndim != 2 or m.shape[1] < 1:
        raise InvalidInput(f"{what}: want shape (n, dim), got {m.shape}")
    if n is not None and m.shape[0] != n:
        raise InvalidInput(f"{what}: {m.shape[0]} vectors for {n} chunks")
    if not np.isfinite(m).all():
        raise InvalidInput(f"{what}: has NaN or infinite values")
    return np.ascontiguousarray(m, dtype="<f4")


def build_index(
    chunks: Sequence[Chunk],
    embed: Embed | numpy.ndarray,
    path: str | os.PathLike[str],
    *,
    embedding_model: str,
    chunking: Mapping[str, Any] | None = None,
    batch_size: int = 256,
) -> IndexInfo:
    """Write the recall database for ``chunks`` to ``path``; returns its :class:`IndexInfo`.

    ``embed`` is a function texts → ``(n, dim)`` float array (called in batches of
    ``batch_size``) or the ``(len(chunks), dim)`` array itself. Requires at least one
    chunk, positions ``0..n-1`` in order, unique ids and correct digests (else
    :class:`InvalidInput`). The file is written beside ``path`` and renamed into place.
    With the same SQLite library the bytes are identical for the same inputs (fixed
    page size, one insert order, ``VACUUM``; the header records the SQLite version).
    """
    import numpy as np

    if not chunks:
        raise InvalidInput("build_index: no chunks; a recall index needs at least one")
    seen: set[str] = set()
    for i, c in enumerate(chunks):
        if c.position != i:
            raise InvalidInput(f"chunk {c.id!r} has position {c.position}, want {i}")
        if c.id in seen:
            raise InvalidInput(f"chunk id {c.id!r} appears twice")
        seen.add(c.id)
        if c.digest != chunk_digest(c.id, c.text, c.label):
            raise InvalidInput(f"chunk {c.id!r}: digest does not match its id/text/label")
    if isinstance(embed, np.ndarray):
        mat = _as_matrix(embed, len(chunks), "embeddings")
    else:
        parts = []
        for a in range(0, len(chunks), batch_size):
            texts = [c.text for c in chunks[a : a + batch_size]]
            parts.append(_as_matrix(embed(texts), len(texts), "embed() result"))
        mat = np.concatenate(parts)
    dim = int(mat.shape[1])
    root = corpus_root([c.digest for c in chunks])
    info = IndexInfo(
        root, len(chunks), dim, embedding_model, dict(chunking) if chunking is not None else {}
    )

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.unlink(missing_ok=True)
    conn = connect(tmp, read_only=False)
    try:
        conn.execute(f"PRAGMA page_size = {_PAGE_SIZE}")
        conn.execute("PRAGMA journal_mode = OFF")
        conn.execute("PRAGMA synchronous = OFF")
        with conn:
            conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            conn.execute(
                "CREATE TABLE chunks (position INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, "
                "digest TEXT NOT NULL, text TEXT NOT NULL, label TEXT)"
            )
            conn.execute(
                f"CREATE VIRTUAL TABLE vec_chunks USING vec0("
                f"embedding float[{dim}] distance_metric=cosine)"
            )
            meta = {
                "format": INDEX_FORMAT,
                "corpus_root": root,
                "chunks": str(len(chunks)),
                "dim": str(dim),
                "embedding_model": embedding_model,
                "chunking": json.dumps(info.chunking, sort_keys=True, separators=(",", ":")),
            }
            conn.executemany("INSERT INTO meta VALUES (?, ?)", sorted(meta.items()))
            conn.executemany(
                "INSERT INTO chunks VALUES (?, ?, ?, ?, ?)",
                ((c.position, c.id, c.digest, c.text, c.label) for c in chunks),
            )
            conn.executemany(
                "INSERT INTO vec_chunks(rowid, embedding) VALUES (?, ?)",
                ((i, mat[i].tobytes()) for i in range(len(chunks))),
            )
        conn.execute("VACUUM")
    finally:
        conn.close()
    os.replace(tmp, out)
    return info


def index_from_examples(
    examples: Iterable[Any],
    embed: Embed | numpy.ndarray,
    path: str | os.PathLike[str],
    *,
    embedding_model: str,
) -> IndexInfo:
    """Build an index whose chunks are accepted training examples (see
    :func:`chunks_from_examples`); ``chunking`` is ``{"source": "examples"}``."""
    chunks = chunks_from_examples(examples)
    return build_index(
        chunks, embed, path, embedding_model=embedding_model, chunking={"source": "examples"}
    )


# --------------------------------------------------------------------------- verification


def _read_plain(path: Path) -> tuple[dict[str, str], list[tuple[int, str, str, str, Any]]]:
    """Meta and chunk rows with the stdlib sqlite3 (no extension needed), read-only."""
    import sqlite3

    if not path.is_file():
        raise ArtifactError(f"recall index {path}: no such file")
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            rows = conn.execute(
                "SELECT position, id, digest, text, label FROM chunks ORDER BY position"
            ).fetchall()
        finally:
            conn.close()
    except sqlite3.DatabaseError as e:
        raise ArtifactError(f"recall index {path.name}: not a readable recall database: {e}") from e
    return meta, rows


def verify_index(
    path: str | os.PathLike[str], expected_root: str, *, expected_chunks: int | None = None
) -> IndexInfo:
    """Check an index against the corpus root the signed manifest gives; returns its info.

    Raises :class:`ArtifactError` naming what failed. Needs no sqlite-vec. Steps:
      1. read ``meta`` and ``chunks``; the format is ``kolm-recall/v1``;
      2. positions are ``0..n-1`` and ``n`` equals ``meta.chunks`` (and ``expected_chunks``);
      3. every chunk's digest, recomputed from its id, text and label, equals the stored one
         (the error names the chunk id);
      4. the corpus root over the recomputed digests equals ``expected_root`` and
         ``meta.corpus_root``.
    Embeddings are not recomputed here: the index file as a whole is covered by the
    artifact signature; this check binds the text a prediction will cite to the root.
    """
    p = Path(path)
    # (1)
    meta, rows = _read_plain(p)
    if meta.get("format") != INDEX_FORMAT:
        raise ArtifactError(
            f"recall index {p.name}: format {meta.get('format')!r}, want {INDEX_FORMAT!r}"
        )
    # (2)
    n = len(rows)
    for i, r in enumerate(rows):
        if r[0] != i:
            raise ArtifactError(
                f"recall index {p.name}: chunk {r[1]!r} at position {r[0]}, want {i}"
            )
    if str(n) != meta.get("chunks") or (expected_chunks is not None and n != expected_chunks):
        raise ArtifactError(
            f"recall index {p.name}: holds {n} chunks, meta says "
            f"{meta.get('chunks')}, manifest says {expected_chunks}"
        )
    if n == 0:
        raise ArtifactError(f"recall index {p.name}: no chunks")
    # (3)
    digests = []
    for _pos, cid, stored, text, label in rows:
        if not isinstance(cid, str) or not isinstance(text, str):
            raise ArtifactError(f"recall index {p.name}: chunk {cid!r} has a non-text field")
        d = chunk_digest(cid, text, label)
        if d != stored:
            raise ArtifactError(
                f"recall index {p.name}: chunk {cid!r} has digest {d[:16]}… "
                f"from its text, the index says {str(stored)[:16]}…"
            )
        digests.append(d)
    # (4)
    root = corpus_root(digests)
    if root != expected_root or root != meta.get("corpus_root"):
        raise ArtifactError(
            f"recall index {p.name}: corpus root {root[:16]}… from the chunks, "
            f"want {str(expected_root)[:16]}… (meta says "
            f"{str(meta.get('corpus_root'))[:16]}…)"
        )
    try:
        chunking = json.loads(meta.get("chunking", "{}"))
        return IndexInfo(root, n, int(meta["dim"]), meta["embedding_model"], chunking)
    except (KeyError, ValueError) as e:
        raise ArtifactError(f"recall index {p.name}: malformed meta: {e}") from e


# --------------------------------------------------------------------------- search


@dataclass(frozen=True)
class Hit:
    """One retrieved chunk; ``score`` is the cosine similarity to the query."""

    chunk_id: str
    digest: str
    text: str
    score: float
    position: int
    label: str | None = None


class RecallIndex:
    """An open recall database (read-only). Thread-safe: searches are serialized."""

    def __init__(
        self, conn: Any, path: Path, meta: dict[str, str], k_cap: int, embed: Embed | None
    ) -> None:
        self._conn = conn
        self._lock = threading.Lock()
        self.path = path
        self.k_cap = k_cap
        self.dim = int(meta["dim"])
        self.size = int(meta["chunks"])
        self.corpus_root = meta["corpus_root"]
        self.embedding_model = meta["embedding_model"]
        self._embed = embed
        self._tree: CorpusTree | None = None

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        k_cap: int = DEFAULT_K_CAP,
        embed: Embed | None = None,
        expected_root: str | None = None,
    ) -> RecallIndex:
        """Open ``path`` read-only. ``embed`` turns query texts into vectors (default:
        :func:`kolm_compile.student.embed_texts` with the index's ``embedding_model``).
        With ``expected_root``, :func:`verify_index` runs first. Requires ``k_cap >= 1``."""
        if not isinstance(k_cap, int) or k_cap < 1:
            raise InvalidInput(f"k_cap is {k_cap!r}, want an integer >= 1")
        p = Path(path)
        if expected_root is not None:
            verify_index(p, expected_root)
        conn = connect(p, read_only=True)
        try:
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            if meta.get("format") != INDEX_FORMAT:
                raise ArtifactError(f"recall index {p.name}: format {meta.get('format')!r}")
        except Exception as e:
            conn.close()
            if isinstance(e, KolmError):
                raise
            raise ArtifactError(f"recall index {p.name}: unreadable: {e}") from e
        return cls(conn, p, meta, k_cap, embed)

    def close(self) -> None:
        """Close the database."""
        self._conn.close()

    def __enter__(self) -> RecallIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _embed_texts(self, texts: Sequence[str]) -> numpy.ndarray:
        if self._embed is not None:
            return self._embed(texts)
        from kolm_compile.student import embed_texts

        return embed_texts(texts, self.embedding_model)

    def search(self, queries: Sequence[str] | numpy.ndarray, k: int = 10) -> list[list[Hit]]:
        """The ``k`` nearest chunks per query, best first (``min(k, size)`` per query).

        ``queries`` is a list of texts or an ``(n, dim)`` / ``(dim,)`` array. Requires
        ``1 <= k <= k_cap`` (else :class:`InvalidInput` naming ``k`` and the cap).
        Search is exact (sqlite-vec's vec0 scans every vector).
        """
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise InvalidInput(f"k is {k!r}, want an integer >= 1")
        if k > self.k_cap:
            raise InvalidInput(f"k is {k}, over the cap of {self.k_cap} results per query")
        if isinstance(queries, (list, tuple)) and all(isinstance(q, str) for q in queries):
            if not queries:
                return []
            mat = _as_matrix(self._embed_texts(queries), len(queries), "query embeddings")
        else:
            mat = _as_matrix(queries, None, "queries")
        if mat.shape[1] != self.dim:
            raise InvalidInput(f"query vectors have dim {mat.shape[1]}, the index has {self.dim}")
        out: list[list[Hit]] = []
        with self._lock:
            for q in mat:
                rows = self._conn.execute(
                    "SELECT c.position, c.id, c.digest, c.text, c.label, v.distance "
                    "FROM (SELECT rowid, distance FROM vec_chunks WHERE embedding MATCH ? "
                    "AND k = ?) v JOIN chunks c ON c.position = v.rowid ORDER BY v.distance, "
                    "c.position",
                    (q.tobytes(), min(k, self.size)),
                ).fetchall()
                out.append([Hit(r[1], r[2], r[3], 1.0 - float(r[5]), r[0], r[4]) for r in rows])
        return out

    def vectors(self) -> numpy.ndarray:
        """Every stored embedding, ``(size, dim)`` in chunk order (for tests/benchmarks)."""
        import numpy as np

        with self._lock:
            rows = self._conn.execute(
                "SELECT rowid, embedding FROM vec_chunks ORDER BY rowid"
            ).fetchall()
        return np.stack([np.frombuffer(r[1], dtype="<f4") for r in rows])

    def chunk(self, position: int) -> Chunk:
        """The chunk at ``position``. Requires ``0 <= position < size``."""
        with self._lock:
            r = self._conn.execute(
                "SELECT position, id, digest, text, label FROM chunks WHERE position = ?",
                (position,),
            ).fetchone()
        if r is None:
            raise InvalidInput(f"chunk position {position} out of range [0, {self.size})")
        return Chunk(r[1], r[3], r[0], r[2], r[4])

    def corpus_tree(self) -> CorpusTree:
        """The corpus Merkle tree (built on first use from the stored digests, O(n))."""
        with self._lock:
            if self._tree is None:
                digests = [
                    r[0] for r in self._conn.execute("SELECT digest FROM chunks ORDER BY position")
                ]
                tree = CorpusTree(digests)
                if tree.root_hex != self.corpus_root:
                    raise ArtifactError(
                        f"recall index {self.path.name}: stored digests give "
                        f"root {tree.root_hex[:16]}…, meta says "
                        f"{self.corpus_root[:16]}…"
                    )
                self._tree = tree
            return self._tree

    def corpus_proof(self, position: int) -> list[bytes]:
        """Inclusion proof of chunk ``position`` in the corpus tree."""
        return self.corpus_tree().proof(position)


def evidence(hits: Sequence[Hit], index: RecallIndex) -> list[dict[str, Any]]:
    """Receipt evidence for ``hits``: ``{"id", "digest", "position", "proof"}`` each
    (plus ``"label"`` for labelled chunks), checkable with
    :func:`kolm_ledger.verify.recall_proof.verify_evidence` against the manifest's corpus root.
    Each item costs about 70 + 67·log2(size) bytes of receipt."""
    tree = index.corpus_tree()
    out = []
    for h in hits:
        proof = tree.proof(h.position)
        item: dict[str, Any] = {
            "digest": h.digest,
            "id": h.chunk_id,
            "position": h.position,
            "proof": [p.hex() for p in proof],
        }
        if h.label is not None:
            item["label"] = h.label
        out.append(item)
    return out


def neighbour_vote(hits: Sequence[Hit]) -> tuple[str, float]:
    """Majority label among labelled ``hits`` and its share of them (in ``(0, 1]``).

    Ties go to the label whose best hit ranks first. Requires at least one labelled hit
    (else :class:`InvalidInput`).
    """
    labels = [h.label for h in hits if h.label is not None]
    if not labels:
        raise InvalidInput("neighbour_vote: no labelled hits (is this an examples index?)")
    counts = Counter(labels)
    best = max(counts.values())
    winner = next(lb for lb in labels if counts[lb] == best)
    return winner, best / len(labels)


def exact_search(
    vectors: numpy.ndarray, queries: numpy.ndarray, k: int
) -> tuple[numpy.ndarray, numpy.ndarray]:
    """Brute-force cosine reference: ``(indices, scores)``, each ``(n_queries, k)``, best first."""
    import numpy as np

    v = np.asarray(vectors, dtype=np.float32)
    q = np.atleast_2d(np.asarray(queries, dtype=np.float32))
    v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    sims = q @ v.T
    k = min(k, v.shape[0])
    part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(sims, part, axis=1), axis=1, kind="stable")
    idx = np.take_along_axis(part, order, axis=1)
    return idx, np.take_along_axis(sims, idx, axis=1)
