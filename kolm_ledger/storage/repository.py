"""The ledger repository: SQLite (embedded default) or PostgreSQL (scale-out).

Writes happen only inside :meth:`Store.sequencing`, one transaction that holds
the sequencer lock (``BEGIN IMMEDIATE`` on SQLite, a transaction-level advisory
lock on PostgreSQL), so any number of processes sharing one database build
exactly one chain. Reads never lock.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, RootTransaction, create_engine, event, func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError
from sqlalchemy.pool import QueuePool, StaticPool

from kolm_ledger.errors import InvalidInput, KolmError, NotFoundError, StorageError
from kolm_ledger.formats.merkle import (
    CompactRange,
    NodeID,
    consistency_proof,
    inclusion_proof,
    peak_ids,
)
from kolm_ledger.storage.models import (
    NODE_LEVEL_SHIFT,
    CheckpointRow,
    CosignatureRow,
    EntryRow,
    NodeRow,
    SubjectRow,
    node_id,
)
from kolm_ledger.timefmt import from_micros as from_micros
from kolm_ledger.timefmt import micros as micros

__all__ = [
    "Entry",
    "EntryTuple",
    "Head",
    "LeafHashExists",
    "NewEntry",
    "SequencingTx",
    "Store",
    "StoredCheckpoint",
]

_ADVISORY_LOCK_KEY = 0x6B6F6C6D  # "kolm"
_MIGRATIONS = Path(__file__).parent / "migrations"


@dataclass(frozen=True)
class Entry:
    """A stored ledger entry."""

    index: int
    leaf_hash: bytes
    chain_hash: bytes
    kind: str
    key_id: str
    integrated_at: datetime
    envelope: bytes  # canonical JSON of the DSSE envelope (with the time: the leaf data)
    #: :func:`kolm_ledger.formats.leaf.statement_digest` of the envelope, as stored (b"" when not read)
    statement_digest: bytes = b""


@dataclass(frozen=True)
class NewEntry:
    """An entry about to be written (already validated and sequenced)."""

    index: int
    leaf_hash: bytes
    chain_hash: bytes
    kind: str
    key_id: str
    integrated_at_us: int
    envelope: bytes
    subjects: tuple[str, ...]
    statement_digest: bytes | None = None


@dataclass(frozen=True)
class StoredCheckpoint:
    """A checkpoint as stored."""

    size: int
    root: bytes
    chain_head: bytes
    note: bytes
    created_at: datetime


@dataclass(frozen=True)
class Head:
    """The tree state the next append extends."""

    size: int
    peaks: CompactRange
    chain_head: bytes
    #: the last entry's integration time (µs; 0 for an empty log): the next is not earlier
    last_time_us: int = 0


def _entry(r: Any) -> Entry:
    return Entry(
        r.idx,
        bytes(r.leaf_hash),
        bytes(r.chain_hash),
        r.kind,
        r.key_id,
        from_micros(r.integrated_at),
        bytes(r.envelope),
        bytes(r.statement_digest or b""),
    )


def _checkpoint(r: Any) -> StoredCheckpoint:
    return StoredCheckpoint(
        r.size, bytes(r.root), bytes(r.chain_head), bytes(r.note), from_micros(r.created_at)
    )


def _cosignature_line(name: str, key_id: bytes, sig: bytes) -> bytes:
    # a signed-note signature line; not validated here: a malformed stored row makes the
    # note fail to parse where it is verified (the audit names that checkpoint)
    return f"\u2014 {name} {base64.b64encode(key_id + sig).decode()}\n".encode()


def _with_cosignatures(conn: Connection, cps: list[StoredCheckpoint]) -> list[StoredCheckpoint]:
    """``cps`` with the witness cosignatures stored for them appended to their notes.

    A checkpoint commits with the log's signatures only; witnesses cosign it afterwards
    (:meth:`Store.add_cosignatures`), so readers put the two together here.
    """
    if not cps:
        return cps
    sizes = [c.size for c in cps]
    q = select(
        CosignatureRow.size, CosignatureRow.name, CosignatureRow.key_id, CosignatureRow.signature
    )
    if len(sizes) == 1:
        q = q.where(CosignatureRow.size == sizes[0])
    else:
        q = q.where(CosignatureRow.size >= min(sizes), CosignatureRow.size <= max(sizes))
    lines: dict[int, list[bytes]] = {}
    for size, name, kid, sig in conn.execute(
        q.order_by(CosignatureRow.size, CosignatureRow.name, CosignatureRow.key_id)
    ):
        lines.setdefault(int(size), []).append(_cosignature_line(name, bytes(kid), bytes(sig)))
    if not lines:
        return cps
    out = []
    for c in cps:
        extra = [ln for ln in lines.get(c.size, ()) if ln not in c.note]
        out.append(replace(c, note=c.note + b"".join(extra)) if extra else c)
    return out


EntryTuple = tuple[int, bytes, bytes, str, str, int, bytes, bytes | None]
"""An entry row as :meth:`SequencingTx.insert_entries` takes it: ``(index, leaf_hash,
chain_hash, kind, key_id, integrated_at_us, envelope, statement_digest)``."""

_ENTRY_COLUMNS = (
    "idx",
    "leaf_hash",
    "chain_hash",
    "kind",
    "key_id",
    "integrated_at",
    "envelope",
    "statement_digest",
)
_ENTRY_TYPES = ("int8", "bytea", "bytea", "varchar", "varchar", "int8", "bytea", "bytea")
_UNIQUE_CONSTRAINTS = ("uq_entries_leaf_hash", "uq_entries_statement_digest")


class LeafHashExists(StorageError):
    """An insert met an entry already in the log: its statement digest (one statement, one
    entry) or its leaf hash is stored (the unique constraints).

    :meth:`~kolm_ledger.log.ledger.Ledger.append_validated` inserts optimistically (no
    look-up first) and, on this, sequences the batch again with the duplicates resolved.
    """


def _is_driver_error(e: BaseException) -> bool:
    mod = type(e).__module__
    return mod.startswith(("sqlite3", "psycopg", "pysqlite"))


def _is_leaf_conflict(e: BaseException) -> bool:
    """Whether ``e`` is the unique violation of ``entries.statement_digest`` or
    ``entries.leaf_hash``."""
    if isinstance(e, DBAPIError):
        e = e.orig if isinstance(e.orig, BaseException) else e
    if type(e).__name__ == "UniqueViolation":  # psycopg
        diag = getattr(e, "diag", None)
        return getattr(diag, "constraint_name", None) in _UNIQUE_CONSTRAINTS
    if type(e).__name__ == "IntegrityError" and _is_driver_error(e):  # sqlite3
        msg = str(e)
        return "entries.leaf_hash" in msg or "entries.statement_digest" in msg
    return False


class SequencingTx:
    """One write transaction holding the sequencer lock."""

    def __init__(self, store: Store, conn: Connection) -> None:
        self._store = store
        self.conn = conn

    def _raw(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        """Rows of one query on the driver's cursor (``?`` placeholders; per-batch reads:
        SQLAlchemy's statement handling costs more than these queries do)."""
        if self._store.dialect != "sqlite":
            sql = sql.replace("?", "%s")
        with self._driver_errors():
            cur = self.conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
            try:
                cur.execute(sql, params)
                return list(cur.fetchall())
            finally:
                cur.close()

    def head(self) -> Head:
        """Current size, compact range and chain head, read under the lock."""
        cached = self._store._head_cache
        ((top,),) = self._raw("SELECT max(idx) FROM entries")
        size = 0 if top is None else int(top) + 1
        if cached is not None and cached.size == size:
            return Head(cached.size, cached.peaks.copy(), cached.chain_head, cached.last_time_us)
        if size == 0:
            return Head(0, CompactRange.empty(), bytes(32))
        ids = peak_ids(size)
        peaks = _get_nodes(self.conn, ids)
        last = self.conn.execute(
            select(EntryRow.chain_hash, EntryRow.integrated_at).where(EntryRow.idx == size - 1)
        ).first()
        if last is None:
            raise StorageError(f"entry {size - 1} is missing though the log has {size} rows")
        return Head(size, CompactRange.from_peaks(size, peaks), bytes(last[0]), int(last[1]))

    def existing(self, digests: Sequence[bytes]) -> dict[bytes, tuple[int, bytes, int]]:
        """Map of those statement ``digests`` already in the log to their entry's
        ``(index, leaf hash, integrated_at µs)``."""
        out: dict[bytes, tuple[int, bytes, int]] = {}
        hs = list(digests)
        for i in range(0, len(hs), 500):
            rows = self.conn.execute(
                select(
                    EntryRow.statement_digest,
                    EntryRow.idx,
                    EntryRow.leaf_hash,
                    EntryRow.integrated_at,
                ).where(EntryRow.statement_digest.in_(hs[i : i + 500]))
            )
            out.update((bytes(d or b""), (idx, bytes(h), int(at))) for d, idx, h, at in rows)
        return out

    def entries_of_kind(self, kind: str, after_index: int = -1) -> list[Entry]:
        """Entries of ``kind`` after ``after_index``, in index order, read under the lock."""
        rows = self._raw(
            "SELECT idx, leaf_hash, chain_hash, kind, key_id, integrated_at, envelope, "
            "statement_digest FROM entries WHERE kind = ? AND idx > ? ORDER BY idx",
            (kind, after_index),
        )
        return [
            Entry(i, bytes(lh), bytes(ch), k, kid, from_micros(at), bytes(env), bytes(sd or b""))
            for i, lh, ch, k, kid, at, env, sd in rows
        ]

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        """Inclusion proof of ``index`` in the tree of ``size``, read under the lock."""
        return inclusion_proof(index, size, lambda ids: _get_nodes(self.conn, ids))

    def latest_checkpoint(self) -> StoredCheckpoint | None:
        """Newest checkpoint, read under the lock."""
        rows = self._raw(
            "SELECT size, root, chain_head, note, created_at FROM checkpoints "
            "ORDER BY size DESC LIMIT 1"
        )
        if not rows:
            return None
        size, root, chain, note, at = rows[0]
        return StoredCheckpoint(size, bytes(root), bytes(chain), bytes(note), from_micros(at))

    def insert_entries(
        self, rows: Sequence[EntryTuple], subjects: Sequence[tuple[str, int]] = ()
    ) -> None:
        """Insert sequenced entries and their subject-index rows, in bulk.

        ``rows`` are :data:`EntryTuple`; ``subjects`` are ``(digest, index)``. Raises as
        :meth:`entry_writer` does.
        """
        if rows:
            with self.entry_writer() as put:
                for r in rows:
                    put(r)
        self.insert_subjects(subjects)

    @contextmanager
    def entry_writer(self) -> Iterator[Callable[[EntryTuple], None]]:
        """Stream entry rows into the log: yields ``put(row)``; they are stored when the block exits.

        PostgreSQL: one binary ``COPY``, fed while the caller still computes later rows,
        so the server inserts in parallel; SQLite: one ``executemany`` at the end. Raises
        :class:`LeafHashExists` when a leaf hash is already in the log (the unique
        constraint; the transaction is then unusable and must be abandoned), and
        :class:`StorageError` for any other database failure. An exception from the block
        abandons the rows (and, on PostgreSQL, the transaction).
        """
        with self._driver_errors():
            if self._store.dialect == "sqlite":
                rows: list[EntryTuple] = []
                yield rows.append
                self._executemany("entries", _ENTRY_COLUMNS, rows)
            else:
                with self._copy("entries", _ENTRY_COLUMNS, _ENTRY_TYPES) as put:
                    yield put

    def insert_subjects(self, subjects: Sequence[tuple[str, int]]) -> None:
        """Insert subject-index rows ``(digest, entry index)`` in bulk."""
        if subjects:
            self._bulk("entry_subjects", ("digest", "idx"), ("varchar", "int8"), subjects)

    def insert_nodes(self, nodes: Sequence[tuple[int, int, bytes]]) -> None:
        """Insert completed interior Merkle nodes ``(level, index, hash)`` in bulk."""
        if nodes:
            self._bulk(
                "nodes",
                ("node_id", "hash"),
                ("int8", "bytea"),
                [((lv << NODE_LEVEL_SHIFT) | i, h) for lv, i, h in nodes],
            )

    # The hot path of every append goes straight to the driver: SQLAlchemy's per-row
    # bind processing costs more than the insert itself.

    def _bulk(
        self,
        table: str,
        columns: tuple[str, ...],
        pg_types: tuple[str, ...],
        rows: Sequence[tuple[Any, ...]],
    ) -> None:
        with self._driver_errors():
            if self._store.dialect == "sqlite":
                self._executemany(table, columns, rows)
            else:
                with self._copy(table, columns, pg_types) as put:
                    for r in rows:
                        put(r)

    def _executemany(
        self, table: str, columns: tuple[str, ...], rows: Sequence[tuple[Any, ...]]
    ) -> None:
        if not rows:
            return
        cur = self.conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            cur.executemany(
                f"INSERT INTO {table} ({', '.join(columns)}) "
                f"VALUES ({', '.join('?' * len(columns))})",
                rows,
            )
        finally:
            cur.close()

    @contextmanager
    def _copy(
        self, table: str, columns: tuple[str, ...], pg_types: tuple[str, ...]
    ) -> Iterator[Callable[[tuple[Any, ...]], None]]:
        from psycopg.types.string import BytesBinaryDumper

        dbapi = self.conn.connection.dbapi_connection
        with dbapi.cursor() as cur:  # type: ignore[union-attr]
            # bytea by oid would otherwise dump through psycopg.dbapi20's pure-Python
            # dumper (it accepts dbapi Binary too); this cursor only ever passes bytes
            cur.adapters.register_dumper(None, BytesBinaryDumper)
            with cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN (FORMAT BINARY)") as cp:
                cp.set_types(list(pg_types))
                yield cp.write_row

    @contextmanager
    def _driver_errors(self) -> Iterator[None]:
        """Map the raw driver's errors: the leaf-hash unique violation, then StorageError."""
        try:
            yield
        except Exception as e:
            if _is_leaf_conflict(e):
                raise LeafHashExists(
                    f"ledger write failed: a leaf hash is already stored: {e}"
                ) from e
            if isinstance(e, DBAPIError | KolmError) or not _is_driver_error(e):
                raise
            raise StorageError(f"ledger write failed: {e}") from e

    def write(
        self,
        entries: Sequence[NewEntry],
        nodes: Sequence[tuple[int, int, bytes]],
        checkpoint: StoredCheckpoint | None,
        new_head: Head | None = None,
    ) -> None:
        """Insert a sequenced batch (entries, subjects, interior nodes, checkpoint)."""
        if entries:
            self.insert_entries(
                [
                    (
                        e.index,
                        e.leaf_hash,
                        e.chain_hash,
                        e.kind,
                        e.key_id,
                        e.integrated_at_us,
                        e.envelope,
                        e.statement_digest,
                    )
                    for e in entries
                ],
                [(d, e.index) for e in entries for d in sorted(set(e.subjects))],
            )
        self.finish(nodes, checkpoint, new_head)

    def finish(
        self,
        nodes: Sequence[tuple[int, int, bytes]],
        checkpoint: StoredCheckpoint | None,
        new_head: Head | None = None,
        subjects: Sequence[tuple[str, int]] = (),
    ) -> None:
        """Insert a batch's subject rows, interior nodes and checkpoint.

        ``new_head`` is the state after the batch. (On PostgreSQL binary ``COPY`` beat one
        ``INSERT ... SELECT unnest(...)`` statement for the first two, despite the extra
        round trip.)
        """
        self.insert_subjects(subjects)
        self.insert_nodes(nodes)
        if checkpoint is not None:
            ph = "?" if self._store.dialect == "sqlite" else "%s"
            self.conn.exec_driver_sql(
                "INSERT INTO checkpoints (size, root, chain_head, note, created_at) "
                f"VALUES ({ph}, {ph}, {ph}, {ph}, {ph})",
                (
                    checkpoint.size,
                    checkpoint.root,
                    checkpoint.chain_head,
                    checkpoint.note,
                    micros(checkpoint.created_at),
                ),
            )
        self._pending_head = new_head

    _pending_head: Head | None = None


def _size(conn: Connection) -> int:
    top = conn.execute(select(func.max(EntryRow.idx))).scalar_one_or_none()
    return 0 if top is None else int(top) + 1


def _get_nodes(
    conn: Connection, ids: Sequence[NodeID], cache: dict[int, bytes] | None = None
) -> list[bytes]:
    """One round trip for every node not in ``cache``.

    Leaves are level-0 nodes, so ``node_id(0, i) == i`` names entry ``i``'s leaf hash and
    interior ids (level >= 1) never collide with it: a single UNION ALL reads both.
    Nodes are immutable once committed, so ``cache`` may keep them forever.
    """
    keys = [node_id(lv, i) for lv, i in ids]
    found: dict[int, bytes] = {}
    missing = []
    for k in keys:
        h = cache.get(k) if cache is not None else None
        if h is None:
            missing.append(k)
        else:
            found[k] = h
    if missing:
        leaves = [k for k in missing if k < (1 << 48)]
        inner = [k for k in missing if k >= (1 << 48)]
        ph = "?" if conn.dialect.name == "sqlite" else "%s"
        parts, params = [], []
        if inner:
            parts.append(
                f"SELECT node_id, hash FROM nodes WHERE node_id IN ({', '.join([ph] * len(inner))})"
            )
            params.extend(inner)
        if leaves:
            parts.append(
                f"SELECT idx, leaf_hash FROM entries WHERE idx IN ({', '.join([ph] * len(leaves))})"
            )
            params.extend(leaves)
        for k, h in conn.exec_driver_sql(" UNION ALL ".join(parts), tuple(params)):
            found[k] = bytes(h)
            if cache is not None:
                cache[k] = found[k]
        if cache is not None and len(cache) > _NODE_CACHE_MAX:
            cache.clear()
    try:
        return [found[k] for k in keys]
    except KeyError as e:
        k = e.args[0]
        raise StorageError(
            f"Merkle node (level, index) = {(k >> 48, k & ((1 << 48) - 1))} is missing"
        ) from e


_NODE_CACHE_MAX = 2_000_000


class Store:
    """Ledger storage on any SQLAlchemy URL (``sqlite:///path`` or ``postgresql+psycopg://``).

    Requires the URL's database to exist (SQLite creates the file). Opening runs the
    alembic migrations to head.
    """

    def __init__(self, url: str, *, migrate: bool = True, pool_size: int = 5) -> None:
        try:
            u = make_url(url)
        except ArgumentError as e:
            raise InvalidInput(f"--db {url!r} is not a SQLAlchemy URL: {e}") from e
        self.url = u
        self.dialect = u.get_backend_name()
        if self.dialect not in ("sqlite", "postgresql"):
            raise InvalidInput(f"--db {url!r}: engine {self.dialect!r}, want sqlite or postgresql")
        try:
            if self.dialect == "sqlite":
                if u.database and u.database != ":memory:":
                    Path(u.database).parent.mkdir(parents=True, exist_ok=True)
                memory = u.database in (None, "", ":memory:")
                self.engine: Engine = create_engine(
                    u,
                    poolclass=StaticPool if memory else QueuePool,
                    connect_args={"check_same_thread": False},
                )
                _configure_sqlite(self.engine)
            else:
                self.engine = create_engine(
                    u, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True
                )
        except (NoSuchModuleError, ImportError) as e:
            raise InvalidInput(
                f"--db {url!r}: database driver missing ({e}); "
                "install kolm[postgres] for PostgreSQL"
            ) from e
        self._head_cache: Head | None = None
        self._nodes: dict[int, bytes] = {}
        self._lock = threading.Lock()
        self._write_conn: Connection | None = None
        if migrate:
            try:
                self.migrate()
            except BaseException:  # e.g. a format v1 database: no pool left behind
                self.engine.dispose()
                raise

    def migrate(self) -> None:
        """Bring the schema to the newest alembic revision."""
        cfg = Config()
        cfg.set_main_option("script_location", str(_MIGRATIONS))
        try:
            with self.engine.begin() as conn:
                if self.dialect == "postgresql":
                    conn.execute(
                        text("SELECT pg_advisory_xact_lock(:k)"), {"k": _ADVISORY_LOCK_KEY + 1}
                    )
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
        except DBAPIError as e:
            raise StorageError(f"cannot open ledger database {self.url!r}: {e.orig}") from e

    def close(self) -> None:
        """Close the sequencer's connection and dispose of the connection pool."""
        with self._lock:
            self._drop_writer(invalidate=False)
        self.engine.dispose()

    def _writer(self) -> Connection:
        """The sequencer's own connection, kept open across batches (under ``_lock``).

        A pool checkout per batch (and PostgreSQL's pre-ping round trip) cost more than
        a small batch's inserts; a connection found dead is replaced in
        :meth:`_begin_sequencing`, which is what the pre-ping did.
        """
        c = self._write_conn
        if c is None or c.closed or c.invalidated:
            c = self._write_conn = self.engine.connect().execution_options(kolm_write=True)
        return c

    def _drop_writer(self, *, invalidate: bool = True) -> None:
        """Forget the sequencer's connection; ``invalidate``: its state is unknown, so the
        pool must not hand its DBAPI connection out again."""
        c, self._write_conn = self._write_conn, None
        if c is None:
            return
        try:
            if invalidate:
                c.invalidate()
            c.close()
        except Exception:  # best effort: it is gone either way
            pass

    def _begin_sequencing(self) -> tuple[Connection, RootTransaction]:
        """BEGIN (IMMEDIATE on SQLite; plus the advisory lock on PostgreSQL) on the
        sequencer's connection; one that turns out dead (the server restarted, the backend
        was terminated) is replaced once: nothing was written on it."""
        for attempt in (0, 1):
            conn = self._writer()
            try:
                trans = conn.begin()
                if self.dialect == "postgresql":
                    conn.execute(
                        text("SELECT pg_advisory_xact_lock(:k)"), {"k": _ADVISORY_LOCK_KEY}
                    )
                return conn, trans
            except DBAPIError as e:
                self._drop_writer()
                if attempt or not e.connection_invalidated:
                    raise
        raise AssertionError("unreachable")

    @contextmanager
    def sequencing(self) -> Iterator[SequencingTx]:
        """A write transaction holding the sequencer lock; commits on success.

        Within one process, sequencing is also serialized by a thread lock. The
        transaction runs on a connection kept for the sequencer (see :meth:`_writer`);
        after a database error it is discarded and the next batch opens a new one.
        """
        with self._lock:
            try:
                conn, trans = self._begin_sequencing()
                tx = SequencingTx(self, conn)
                try:
                    yield tx
                except BaseException:
                    try:
                        trans.rollback()
                    except BaseException:
                        self._drop_writer()
                    raise
                try:
                    trans.commit()
                except BaseException:
                    self._drop_writer()  # what that connection holds now is unknown
                    raise
            except DBAPIError as e:
                self._head_cache = None
                self._drop_writer()
                raise StorageError(f"ledger write failed: {e.orig}") from e
            except BaseException:
                self._head_cache = None
                raise
            self._head_cache = tx._pending_head

    # ---- reads -------------------------------------------------------------------------

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        try:
            with self.engine.connect() as conn:
                yield conn
        except DBAPIError as e:
            raise StorageError(f"ledger read failed: {e.orig}") from e

    def size(self) -> int:
        """Number of entries."""
        with self._read() as c:
            return _size(c)

    def get_entry(self, index: int) -> Entry:
        """Entry at ``index``; raises :class:`NotFoundError`."""
        with self._read() as c:
            r = c.execute(select(EntryRow).where(EntryRow.idx == index)).first()
        if r is None:
            raise NotFoundError(f"no entry at index {index}")
        return _entry(r)

    def get_by_leaf_hash(self, leaf_hash: bytes) -> Entry:
        """Entry with ``leaf_hash``; raises :class:`NotFoundError`."""
        with self._read() as c:
            r = c.execute(select(EntryRow).where(EntryRow.leaf_hash == leaf_hash)).first()
        if r is None:
            raise NotFoundError(f"no entry with leaf hash {leaf_hash.hex()}")
        return _entry(r)

    def get_by_statement_digest(self, digest: bytes) -> Entry:
        """The entry of the statement ``digest`` (:func:`kolm_ledger.formats.leaf.statement_digest`:
        one statement, one entry); raises :class:`NotFoundError`."""
        with self._read() as c:
            r = c.execute(select(EntryRow).where(EntryRow.statement_digest == digest)).first()
        if r is None:
            raise NotFoundError(f"no entry with statement digest {digest.hex()}")
        return _entry(r)

    def entries(self, start: int = 0, end: int | None = None, batch: int = 2000) -> Iterator[Entry]:
        """Entries with ``start <= index < end`` in index order (read in batches)."""
        pos = start
        while end is None or pos < end:
            hi = pos + batch if end is None else min(pos + batch, end)
            with self._read() as c:
                rows = c.execute(
                    select(EntryRow)
                    .where(EntryRow.idx >= pos, EntryRow.idx < hi)
                    .order_by(EntryRow.idx)
                ).all()
            if not rows:
                if end is None:
                    return
                pos = hi
                continue
            for r in rows:
                yield _entry(r)
            pos = hi

    def find(
        self,
        *,
        subject_digest: str | None = None,
        kind: str | None = None,
        key_id: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        after_index: int = -1,
        limit: int = 1000,
    ) -> list[Entry]:
        """Entries matching every given filter, in index order, after ``after_index``."""
        q = select(EntryRow).where(EntryRow.idx > after_index)
        if subject_digest is not None:
            q = q.where(
                EntryRow.idx.in_(select(SubjectRow.idx).where(SubjectRow.digest == subject_digest))
            )
        if kind is not None:
            q = q.where(EntryRow.kind == kind)
        if key_id is not None:
            q = q.where(EntryRow.key_id == key_id)
        if since is not None:
            q = q.where(EntryRow.integrated_at >= micros(since))
        if until is not None:
            q = q.where(EntryRow.integrated_at < micros(until))
        with self._read() as c:
            return [_entry(r) for r in c.execute(q.order_by(EntryRow.idx).limit(limit))]

    def get_nodes(self, ids: Sequence[NodeID]) -> list[bytes]:
        """Hashes of Merkle nodes ``ids`` (level 0 = leaf hashes), in one round trip each kind."""
        with self._read() as c:
            return _get_nodes(c, ids, self._nodes)

    def inclusion_proof(self, index: int, size: int, *, check_size: bool = True) -> list[bytes]:
        """Inclusion proof of ``index`` in the tree of ``size``. Requires 0 <= index < size <= log size.

        ``check_size=False`` skips one query when the caller knows ``size`` exists (it came
        from a stored checkpoint).
        """
        if check_size:
            self._check_size(size)
        if not 0 <= index < size:
            raise InvalidInput(f"index {index} is outside the tree of size {size}")
        return inclusion_proof(index, size, self.get_nodes)

    def consistency_proof(self, size1: int, size2: int) -> list[bytes]:
        """Consistency proof between sizes. Requires 0 < size1 <= size2 <= log size."""
        self._check_size(size2)
        if not 0 < size1 <= size2:
            raise InvalidInput(f"consistency needs 0 < size1 <= size2, got {size1} and {size2}")
        return consistency_proof(size1, size2, self.get_nodes)

    def _check_size(self, size: int) -> None:
        n = self.size()
        if size > n:
            raise NotFoundError(f"tree size {size} is beyond the log size {n}")

    def latest_checkpoint(self) -> StoredCheckpoint | None:
        """Newest checkpoint (with its witness cosignatures), or None for an empty log."""
        with self._read() as c:
            r = c.execute(
                select(CheckpointRow).order_by(CheckpointRow.size.desc()).limit(1)
            ).first()
            return _with_cosignatures(c, [_checkpoint(r)])[0] if r else None

    def checkpoint_at(self, size: int) -> StoredCheckpoint:
        """The checkpoint of exactly ``size``; raises :class:`NotFoundError`."""
        with self._read() as c:
            r = c.execute(select(CheckpointRow).where(CheckpointRow.size == size)).first()
            if r is None:
                raise NotFoundError(f"no checkpoint at tree size {size}")
            return _with_cosignatures(c, [_checkpoint(r)])[0]

    def checkpoint_covering(self, index: int) -> StoredCheckpoint:
        """The smallest checkpoint whose size covers ``index``."""
        with self._read() as c:
            r = c.execute(
                select(CheckpointRow)
                .where(CheckpointRow.size > index)
                .order_by(CheckpointRow.size)
                .limit(1)
            ).first()
            if r is None:
                raise NotFoundError(f"no checkpoint covers index {index} yet")
            return _with_cosignatures(c, [_checkpoint(r)])[0]

    def checkpoints(self, min_size: int = 0) -> Iterator[StoredCheckpoint]:
        """All checkpoints with size >= ``min_size``, smallest first (with cosignatures)."""
        with self._read() as c:
            rows = c.execute(
                select(CheckpointRow)
                .where(CheckpointRow.size >= min_size)
                .order_by(CheckpointRow.size)
            ).all()
            cps = _with_cosignatures(c, [_checkpoint(r) for r in rows])
        yield from cps

    def add_cosignatures(
        self, size: int, cosignatures: Sequence[tuple[str, bytes, bytes]], at: datetime
    ) -> int:
        """Append witness cosignatures ``(key name, 4-byte key id, signature)`` on checkpoint ``size``.

        Its own short write transaction, after the checkpoint committed. Append-only: a
        key that already cosigned ``size`` keeps its stored cosignature. Returns the
        number of rows added.
        """
        if not cosignatures:
            return 0
        ph = "?" if self.dialect == "sqlite" else "%s"
        rows = [(size, name, kid, sig, micros(at)) for name, kid, sig in cosignatures]
        try:
            with self.engine.connect().execution_options(kolm_write=True) as conn, conn.begin():
                r = conn.exec_driver_sql(
                    "INSERT INTO checkpoint_cosignatures (size, name, key_id, signature, "
                    f"created_at) VALUES ({ph}, {ph}, {ph}, {ph}, {ph}) ON CONFLICT DO NOTHING",
                    rows,
                )
                return max(0, int(r.rowcount))
        except DBAPIError as e:
            raise StorageError(f"storing cosignatures on checkpoint {size} failed: {e.orig}") from e

    def node_hashes(self, min_id: int, max_id: int) -> Iterator[tuple[int, int, bytes]]:
        """Stored interior nodes with ``min_id <= node_id < max_id`` as (level, index, hash)."""
        mask = (1 << 48) - 1
        with self._read() as c:
            for nid, h in c.execute(
                select(NodeRow.node_id, NodeRow.hash)
                .where(NodeRow.node_id >= min_id, NodeRow.node_id < max_id)
                .order_by(NodeRow.node_id)
            ):
                yield nid >> 48, nid & mask, bytes(h)

    def subject_index(self) -> Iterator[tuple[int, str]]:
        """Every row of the subject index as (entry index, subject digest), by index."""
        with self._read() as c:
            rows = c.execute(
                select(SubjectRow.idx, SubjectRow.digest).order_by(
                    SubjectRow.idx, SubjectRow.digest
                )
            )
            yield from ((int(idx), str(digest)) for idx, digest in rows)


def _configure_sqlite(engine: Engine) -> None:
    """WAL, durable commits (synchronous=FULL), and BEGIN IMMEDIATE for writers."""

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        # writers take the write lock up front; readers use a deferred (snapshot) transaction
        write = conn.get_execution_options().get("kolm_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")
