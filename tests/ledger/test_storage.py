"""Ledger storage on real SQLite files and real PostgreSQL databases (``db_url``).

Covers: the alembic schema, the append-only triggers (our message, every table and
operation), atomic batches, duplicate envelopes, reads (by index, by leaf hash, ranges,
find with every filter and paging), proofs built from stored nodes at many sizes and
their O(log n) cost, and the 64 KiB entry limit.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from kolm_ledger._crypto import PrivateKey
from kolm_ledger._samples import sample_statement
from kolm_ledger.audit.auditor import audit
from kolm_ledger.errors import (
    EntryTooLargeError,
    InvalidInput,
    NotFoundError,
    SignatureError,
    StorageError,
)
from kolm_ledger.formats import merkle, receipts
from kolm_ledger.formats.dsse import MAX_ENVELOPE_BYTES, Envelope
from kolm_ledger.formats.leaf import entry_leaf_hash, statement_digest
from kolm_ledger.keys import TrustRoot
from kolm_ledger.log.ledger import Ledger
from kolm_ledger.storage import Head, NewEntry, Store, StoredCheckpoint, micros
from kolm_ledger.storage.models import APPEND_ONLY_TABLES

T0 = datetime(2026, 3, 1, 12, tzinfo=UTC)
KEY_ID = "ab" * 32
JOB = "cd" * 32


# ---- helpers ----------------------------------------------------------------------------


def raw_engine(url: str) -> sa.Engine:
    """A plain engine (no kolm configuration) for what an attacker with SQL access does."""
    return sa.create_engine(url, poolclass=NullPool)


def count_rows(url: str) -> dict[str, int]:
    eng = raw_engine(url)
    try:
        with eng.connect() as c:
            return {
                t: c.execute(sa.text(f"SELECT count(*) FROM {t}")).scalar_one()
                for t in APPEND_ONLY_TABLES
            }
    finally:
        eng.dispose()


def synthetic_envelope(i: int) -> bytes:
    return b'{"synthetic":%d}' % i


def write_synthetic(
    store: Store,
    n: int,
    *,
    at: datetime = T0,
    kind: str = "label",
    key_id: str = KEY_ID,
    subjects: tuple[str, ...] = (),
) -> list[bytes]:
    """Sequence ``n`` synthetic entries straight through the repository; return leaf hashes.

    Storage does not validate envelopes (the ledger does), so any bytes will do here; the
    nodes written are exactly those :class:`~kolm_ledger.formats.merkle.CompactRange` completes.
    """
    leaves: list[bytes] = []
    with store.sequencing() as tx:
        head = tx.head()
        peaks, chain = head.peaks, head.chain_head
        new: list[NewEntry] = []
        nodes: list[tuple[int, int, bytes]] = []
        for i in range(head.size, head.size + n):
            env = synthetic_envelope(i)
            leaf = hashlib.sha256(b"\x00" + env).digest()
            chain = hashlib.sha256(b"\x02" + chain + leaf).digest()
            nodes.extend(peaks.append(leaf))
            subj = (*subjects, hashlib.sha256(b"%d" % i).hexdigest())
            new.append(NewEntry(i, leaf, chain, kind, key_id, micros(at), env, subj))
            leaves.append(leaf)
        tx.write(new, nodes, None, Head(head.size + n, peaks, chain))
    return leaves


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    s = Store(db_url)
    try:
        yield s
    finally:
        s.close()


class Keys:
    """Keys made by ``kolm keys init`` and a ledger over ``store``."""

    def __init__(self, keydir: Path, store: Store) -> None:
        self.trust = TrustRoot.load(keydir / "trust.json")
        self.by_role = {
            r: PrivateKey.load(keydir / f"{r}.key") for r in ("admin", "compile", "infer", "log")
        }
        self.ledger = Ledger(store, self.trust, self.by_role["log"])

    def receipt(self, kind: str, i: int) -> Envelope:
        signer = {"prediction": "infer", "key": "admin"}.get(kind, "compile")
        return receipts.sign_statement(
            sample_statement(kind, i, random.Random(i)), self.by_role[signer]
        )


@pytest.fixture
def keys(keydir: Path, store: Store) -> Keys:
    return Keys(keydir, store)


# ---- schema and triggers ----------------------------------------------------------------


def test_migrations_create_the_schema(db_url: str, store: Store) -> None:
    insp = sa.inspect(store.engine)
    tables = set(insp.get_table_names())
    assert {*APPEND_ONLY_TABLES, "alembic_version"} <= tables
    cols = {t: {c["name"] for c in insp.get_columns(t)} for t in APPEND_ONLY_TABLES}
    assert cols == {
        "entries": {
            "idx",
            "leaf_hash",
            "chain_hash",
            "kind",
            "key_id",
            "integrated_at",
            "envelope",
            "statement_digest",
        },
        "entry_subjects": {"digest", "idx"},
        "nodes": {"node_id", "hash"},
        "checkpoints": {"size", "root", "chain_head", "note", "created_at"},
    }
    assert insp.get_pk_constraint("entries")["constrained_columns"] == ["idx"]
    assert set(insp.get_pk_constraint("entry_subjects")["constrained_columns"]) == {
        "digest",
        "idx",
    }
    indexed = {tuple(ix["column_names"]) for ix in insp.get_indexes("entries")}
    assert {("kind",), ("key_id",), ("integrated_at",)} <= indexed
    uniques = {tuple(u["column_names"]) for u in insp.get_unique_constraints("entries")}
    unique_ix = {tuple(ix["column_names"]) for ix in insp.get_indexes("entries") if ix["unique"]}
    assert ("leaf_hash",) in uniques or ("leaf_hash",) in unique_ix
    assert ("statement_digest",) in unique_ix  # one statement, one entry
    with store.engine.connect() as c:
        assert c.execute(sa.text("SELECT version_num FROM alembic_version")).scalar_one() == "0003"
        if store.dialect == "sqlite":
            names = {
                r[0]
                for r in c.execute(sa.text("SELECT name FROM sqlite_master WHERE type='trigger'"))
            }
            want = {f"{t}_no_{op}" for t in APPEND_ONLY_TABLES for op in ("update", "delete")}
        else:
            names = {
                r[0]
                for r in c.execute(sa.text("SELECT tgname FROM pg_trigger WHERE NOT tgisinternal"))
            }
            want = {
                f"{t}_{suffix}"
                for t in APPEND_ONLY_TABLES
                for suffix in ("append_only", "no_truncate")
            }
        assert want <= names
    # opening again migrates nothing and keeps the data
    write_synthetic(store, 3)
    again = Store(db_url)
    try:
        assert again.size() == 3
    finally:
        again.close()


def test_sqlite_is_wal_and_durable(tmp_path: Path) -> None:
    s = Store(f"sqlite:///{tmp_path / 'wal.db'}")
    try:
        with s.engine.connect() as c:
            assert c.exec_driver_sql("PRAGMA journal_mode").scalar_one() == "wal"
            assert c.exec_driver_sql("PRAGMA synchronous").scalar_one() == 2  # FULL
    finally:
        s.close()


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("not a url", "not a SQLAlchemy URL"),
        ("mysql://u@localhost/db", "want sqlite or postgresql"),
    ],
)
def test_bad_urls_are_invalid_input(url: str, why: str) -> None:
    with pytest.raises(InvalidInput, match=why):
        Store(url)


MUTATIONS: dict[str, tuple[str, str]] = {
    # table: (UPDATE statement, DELETE statement)
    "entries": ("UPDATE entries SET kind = 'eval'", "DELETE FROM entries"),
    "entry_subjects": ("UPDATE entry_subjects SET idx = idx + 1000", "DELETE FROM entry_subjects"),
    "nodes": ("UPDATE nodes SET hash = hash", "DELETE FROM nodes WHERE node_id > 0"),
    "checkpoints": ("UPDATE checkpoints SET created_at = 0", "DELETE FROM checkpoints"),
}


def test_triggers_reject_update_and_delete_on_every_table(
    db_url: str, store: Store, keys: Keys
) -> None:
    keys.ledger.append([keys.receipt(k, i) for i, k in enumerate(receipts.KINDS)])
    keys.ledger.append([keys.receipt("label", 10), keys.receipt("label", 11)])
    before = count_rows(db_url)
    assert all(before.values()), before
    ops = [("UPDATE", u) for u, _ in MUTATIONS.values()] + [
        ("DELETE", d) for _, d in MUTATIONS.values()
    ]
    tables = list(MUTATIONS) * 2
    if store.dialect == "postgresql":
        ops += [("TRUNCATE", f"TRUNCATE {t}") for t in MUTATIONS]
        tables += list(MUTATIONS)
    eng = raw_engine(db_url)
    try:
        for table, (op, sql) in zip(tables, ops, strict=True):
            with eng.connect() as c, pytest.raises(sa.exc.DBAPIError) as ei:
                c.execute(sa.text(sql))
                c.commit()
            assert f"kolm: {table} is append-only ({op} refused)" in str(ei.value.orig), sql
    finally:
        eng.dispose()
    assert count_rows(db_url) == before
    assert keys.ledger.checkpoint().checkpoint.size == 7


# ---- batches and duplicates -------------------------------------------------------------


def test_a_failing_batch_writes_nothing(db_url: str, store: Store, keys: Keys) -> None:
    keys.ledger.append([keys.receipt("label", 0), keys.receipt("eval", 1)])
    before = count_rows(db_url)
    # the ledger refuses a batch with one bad envelope before writing anything
    bad = keys.receipt("prediction", 2)
    sig = bad.signatures[0]
    bad = Envelope(bad.payload, bad.payload_type, (replace(sig, sig=sig.sig[:-1] + b"\x01"),))
    with pytest.raises(SignatureError):
        keys.ledger.append([keys.receipt("label", 3), keys.receipt("artifact", 4), bad])
    assert count_rows(db_url) == before
    # the database refuses the last insert of a batch (a checkpoint that exists): every
    # earlier insert of that transaction (entries, subjects, nodes) is rolled back
    cp = store.latest_checkpoint()
    assert cp is not None
    with pytest.raises(StorageError, match="ledger write failed"), store.sequencing() as tx:
        head = tx.head()
        peaks, chain = head.peaks, head.chain_head
        new, nodes = [], []
        for i in range(head.size, head.size + 3):
            leaf = hashlib.sha256(b"\x00%d" % i).digest()
            chain = hashlib.sha256(b"\x02" + chain + leaf).digest()
            nodes.extend(peaks.append(leaf))
            new.append(NewEntry(i, leaf, chain, "label", KEY_ID, 0, b"{}", (JOB,)))
        assert nodes
        tx.write(new, nodes, StoredCheckpoint(cp.size, cp.root, cp.chain_head, cp.note, T0))
    assert count_rows(db_url) == before
    # an exception of our own inside the transaction rolls it back too
    with pytest.raises(RuntimeError), store.sequencing() as tx:
        tx.write([NewEntry(2, b"\x01" * 32, b"\x02" * 32, "label", KEY_ID, 0, b"{}", ())], [], None)
        raise RuntimeError("crash after the insert, before commit")
    assert count_rows(db_url) == before
    # and the ledger carries on from the committed state (the head cache was dropped)
    res = keys.ledger.append([keys.receipt("label", 3)])
    assert [r.index for r in res] == [2]
    cps = list(store.checkpoints())
    assert [c.size for c in cps] == [2, 3]


def test_the_sequencer_keeps_one_connection_and_replaces_a_dead_one(
    db_url: str, store: Store, keys: Keys
) -> None:
    keys.ledger.append([keys.receipt("label", 0)])
    first = store._write_conn
    assert first is not None
    keys.ledger.append([keys.receipt("label", 1)])
    assert store._write_conn is first  # no pool checkout (nor pre-ping) per batch
    if store.dialect == "postgresql":
        # the server ends that session (a restart, an admin, a failover): the next batch
        # finds the connection dead at BEGIN, opens a new one, and is written
        pid = first.connection.dbapi_connection.info.backend_pid  # type: ignore[union-attr]
        eng = raw_engine(db_url)
        try:
            with eng.connect() as c:
                assert c.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid}).scalar()
        finally:
            eng.dispose()
    else:
        first.connection.dbapi_connection.close()  # type: ignore[union-attr]
    res = keys.ledger.append([keys.receipt("label", 2)])
    assert [r.index for r in res] == [2]
    assert store._write_conn is not None and store._write_conn is not first
    # a database error inside the batch discards the connection; the next batch works
    held = store._write_conn
    with pytest.raises(StorageError, match="ledger write failed"), store.sequencing() as tx:
        tx.conn.exec_driver_sql("SELECT * FROM no_such_table")
    assert store._write_conn is None
    assert [r.index for r in keys.ledger.append([keys.receipt("label", 3)])] == [3]
    assert store._write_conn is not held
    assert audit(store, keys.trust).ok
    store.close()
    assert store._write_conn is None


def test_duplicate_envelopes_return_the_existing_index(
    db_url: str, store: Store, keys: Keys
) -> None:
    a, b, c = (keys.receipt("label", 0), keys.receipt("prediction", 1), keys.receipt("key", 2))
    # within one batch
    res = keys.ledger.append([a, b, a, c, b])
    assert [(r.index, r.duplicate) for r in res] == [
        (0, False),
        (1, False),
        (0, True),
        (2, False),
        (1, True),
    ]
    assert res[0].leaf_hash == res[2].leaf_hash == store.get_entry(0).leaf_hash
    assert store.size() == 3
    # across batches: nothing new is written, not even a checkpoint
    before = count_rows(db_url)
    res = keys.ledger.append([c, a])
    assert [(r.index, r.duplicate) for r in res] == [(2, True), (0, True)]
    assert count_rows(db_url) == before
    # the same envelope as bytes or as a JSON object is the same leaf
    res = keys.ledger.append([b.to_bytes(), b.to_json(), keys.receipt("eval", 3)])
    assert [(r.index, r.duplicate) for r in res] == [(1, True), (1, True), (3, False)]
    assert [cp.size for cp in store.checkpoints()] == [3, 4]


# ---- reads ------------------------------------------------------------------------------


def test_get_by_index_and_by_leaf_hash(store: Store, keys: Keys) -> None:
    envs = [keys.receipt(k, i) for i, k in enumerate(receipts.KINDS)]
    keys.ledger.append(envs)
    for i, env in enumerate(envs):
        e = store.get_entry(i)
        assert e.index == i
        assert e.envelope == env.canonical()
        assert e.leaf_hash == entry_leaf_hash(env, micros(e.integrated_at))
        assert e.statement_digest == statement_digest(env)
        assert store.get_by_statement_digest(e.statement_digest) == e
        assert e.kind == receipts.KINDS[i]
        assert e.key_id == env.signatures[0].keyid
        assert store.get_by_leaf_hash(e.leaf_hash) == e
    with pytest.raises(NotFoundError, match="no entry at index 5"):
        store.get_entry(5)
    with pytest.raises(NotFoundError, match="no entry at index -1"):
        store.get_entry(-1)
    with pytest.raises(NotFoundError, match="no entry with leaf hash 0000"):
        store.get_by_leaf_hash(bytes(32))


def test_entries_ranges(store: Store) -> None:
    leaves = write_synthetic(store, 57)
    assert [e.leaf_hash for e in store.entries()] == leaves
    assert [e.index for e in store.entries(10, 20)] == list(range(10, 20))
    # small read batches, a range past the end, an empty range
    assert [e.index for e in store.entries(3, batch=5)] == list(range(3, 57))
    assert [e.index for e in store.entries(50, 500, batch=7)] == list(range(50, 57))
    assert list(store.entries(20, 20)) == []
    assert list(store.entries(57)) == []
    assert store.size() == 57


def test_find_by_subject_kind_key_and_time_with_paging(store: Store) -> None:
    k1, k2 = "11" * 32, "22" * 32
    times = [T0 + timedelta(minutes=m) for m in range(4)]
    write_synthetic(store, 10, at=times[0], kind="label", key_id=k1, subjects=(JOB,))
    write_synthetic(store, 7, at=times[1], kind="prediction", key_id=k2)
    write_synthetic(store, 12, at=times[2], kind="label", key_id=k1, subjects=(JOB, JOB))
    write_synthetic(store, 5, at=times[3], kind="eval", key_id=k2)
    labels = [*range(10), *range(17, 29)]

    assert [e.index for e in store.find(subject_digest=JOB)] == labels
    one = hashlib.sha256(b"%d" % 20).hexdigest()
    assert [e.index for e in store.find(subject_digest=one)] == [20]
    assert store.find(subject_digest="ff" * 32) == []
    assert [e.index for e in store.find(kind="label")] == labels
    assert [e.index for e in store.find(kind="eval")] == list(range(29, 34))
    assert [e.index for e in store.find(key_id=k2)] == [*range(10, 17), *range(29, 34)]
    assert [e.index for e in store.find(kind="prediction", key_id=k1)] == []
    # time range: since inclusive, until exclusive
    assert [e.index for e in store.find(since=times[1], until=times[3])] == list(range(10, 29))
    assert [e.index for e in store.find(since=times[3])] == list(range(29, 34))
    assert [e.index for e in store.find(until=times[1])] == list(range(10))
    assert [e.index for e in store.find(kind="label", since=times[1])] == list(range(17, 29))
    assert all(e.integrated_at == times[2] for e in store.find(since=times[2], until=times[3]))
    # the subject index as stored: each entry's own digest, labels also the job digest
    # (written once even when a statement names it twice)
    rows = list(store.subject_index())
    assert rows == sorted(rows)
    assert sorted(i for i, d in rows if d == JOB) == labels
    assert len(rows) == 34 + len(labels)
    # paging with after_index/limit visits each match once, in order
    for limit in (1, 4, 7, 100):
        seen: list[int] = []
        after = -1
        while page := store.find(subject_digest=JOB, after_index=after, limit=limit):
            assert len(page) <= limit
            seen += [e.index for e in page]
            after = page[-1].index
        assert seen == labels


# ---- proofs -----------------------------------------------------------------------------


def test_proofs_from_storage_verify_at_many_sizes(store: Store) -> None:
    n = 300
    leaves: list[bytes] = []
    rng = random.Random(7)
    while len(leaves) < n:  # batches of varying size, so the head is reloaded at odd sizes
        leaves += write_synthetic(store, min(rng.choice([1, 2, 3, 5, 8, 13, 31]), n - len(leaves)))
        if rng.random() < 0.3:
            store._head_cache = None  # as a fresh process would see it
    roots = [merkle.root_from_leaves(leaves[:s]) for s in range(n + 1)]
    sizes = sorted({*range(1, 70), *(2**k + d for k in range(6, 9) for d in (-1, 0, 1)), n})
    sizes += sorted(rng.sample(range(70, n), 20))
    for size in sizes:
        for index in {0, size - 1, size // 2, rng.randrange(size)}:
            proof = store.inclusion_proof(index, size)
            merkle.verify_inclusion(index, size, leaves[index], proof, roots[size])
        for size1 in {1, size, max(1, size // 2), rng.randint(1, size)}:
            proof = store.consistency_proof(size1, size)
            merkle.verify_consistency(size1, size, proof, roots[size1], roots[size])
    with pytest.raises(NotFoundError, match="beyond the log size 300"):
        store.inclusion_proof(0, n + 1)
    with pytest.raises(InvalidInput, match="outside the tree of size 10"):
        store.inclusion_proof(10, 10)
    with pytest.raises(InvalidInput):
        store.consistency_proof(0, 10)
    with pytest.raises(InvalidInput):
        store.consistency_proof(11, 10)
    # every stored interior node is the one recomputed from the leaves
    tree = merkle.MemoryTree()
    for leaf in leaves:
        tree.append(leaf)
    stored = list(store.node_hashes(0, 1 << 62))
    assert stored
    for level, index, h in stored:
        assert level >= 1
        assert tree.get_nodes([(level, index)]) == [h]


def test_a_proof_reads_o_log_n_nodes(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    statements: list[str] = []

    def on_execute(conn: Any, cursor: Any, sql: str, *args: Any) -> None:
        if sql.lstrip().upper().startswith("SELECT"):
            statements.append(sql)

    sa.event.listen(store.engine, "before_cursor_execute", on_execute)
    requested: list[int] = []
    returned: list[int] = []
    real = store.get_nodes

    def counting_get_nodes(ids: Any) -> list[bytes]:
        requested.append(len(ids))
        out = real(ids)
        returned.append(len(out))
        return out

    monkeypatch.setattr(store, "get_nodes", counting_get_nodes)
    leaves: list[bytes] = []
    rng = random.Random(3)
    for target in (64, 1000, 4097, 9000):
        leaves += write_synthetic(store, target - len(leaves))
        size = len(leaves)
        root = merkle.root_from_leaves(leaves)
        bound = 2 * math.ceil(math.log2(size)) + 1
        for index in (0, size - 1, rng.randrange(size)):
            statements.clear()
            requested.clear()
            returned.clear()
            proof = store.inclusion_proof(index, size)
            merkle.verify_inclusion(index, size, leaves[index], proof, root)
            # one size check, then one query per kind of node (leaves, interior nodes)
            assert len(statements) <= 3, statements
            assert requested == returned
            assert len(requested) == 1
            assert requested[0] <= bound, (size, index, requested)
        for size1 in (1, size // 3, size - 1):
            statements.clear()
            requested.clear()
            proof = store.consistency_proof(size1, size)
            merkle.verify_consistency(
                size1, size, proof, merkle.root_from_leaves(leaves[:size1]), root
            )
            assert len(statements) <= 3, statements
            assert sum(requested) <= bound
    sa.event.remove(store.engine, "before_cursor_execute", on_execute)


# ---- size limit -------------------------------------------------------------------------


def _padded(keys: Keys, pad: int) -> Envelope:
    st = receipts.prediction_statement(
        output_digest="1" * 64,
        artifact_digest="2" * 64,
        input_commitment="3" * 64,
        output="x" * pad,
        verifier_verdict={"ok": True},
        backend="student",
        confidence=0.5,
        latency_ms=1.0,
        request_id="big",
        # whole seconds (a fixed length), not before the keys' not_before (init_keys: now)
        time=datetime.now(UTC).replace(microsecond=0),
    )
    return receipts.sign_statement(st, keys.by_role["infer"])


def test_entries_over_64_kib_are_refused(db_url: str, store: Store, keys: Keys) -> None:
    # find the largest padding that fits (ECDSA signatures are 70-72 DER bytes, which
    # base64 always encodes in 96 characters, so the size is a function of the payload)
    lo, hi = 0, MAX_ENVELOPE_BYTES
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if len(_padded(keys, mid).canonical()) <= MAX_ENVELOPE_BYTES:
            lo = mid
        else:
            hi = mid
    fits, over = _padded(keys, lo), _padded(keys, hi)
    assert len(fits.canonical()) <= MAX_ENVELOPE_BYTES < len(over.canonical())
    before = count_rows(db_url)
    with pytest.raises(EntryTooLargeError) as ei:
        keys.ledger.append([keys.receipt("label", 0), over])
    msg = str(ei.value)
    assert f"{len(over.canonical())} bytes" in msg
    assert str(MAX_ENVELOPE_BYTES) in msg
    assert count_rows(db_url) == before
    # as raw bytes too, and far too large bytes are refused before parsing
    with pytest.raises(EntryTooLargeError, match=str(MAX_ENVELOPE_BYTES)):
        keys.ledger.append([over.to_bytes()])
    huge = b"x" * (3 * MAX_ENVELOPE_BYTES)
    with pytest.raises(EntryTooLargeError, match=f"{len(huge)} bytes"):
        keys.ledger.append([huge])
    # the largest envelope that fits is stored and read back byte for byte
    (res,) = keys.ledger.append([fits])
    assert store.get_entry(res.index).envelope == fits.canonical()
