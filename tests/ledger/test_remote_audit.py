"""``kolm audit --ledger HOST:PORT --state FILE``: a remembered checkpoint catches rewritten history.

An insider who holds the log key can rewrite the database into a new history that is
perfectly self-consistent (re-hashed chain, recomputed Merkle nodes, re-signed
checkpoints), so a fresh audit of it passes. What such a ledger cannot do is prove the
new history consistent with a checkpoint an auditor already saw: the second remote
audit with the same state file must fail, naming the inconsistent checkpoints.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from kolm.cli.main import main as kolm_main
from kolm_ledger._crypto import PrivateKey
from kolm_ledger.audit.auditor import audit, audit_remote
from kolm_ledger.formats.checkpoint import Checkpoint, sign_checkpoint, verify_checkpoint
from kolm_ledger.formats.dsse import Envelope
from kolm_ledger.formats.leaf import chain_next, entry_leaf_hash, statement_digest
from kolm_ledger.formats.merkle import CompactRange
from kolm_ledger.formats.note import NoteSigner
from kolm_ledger.formats.receipts import Statement, label_statement, sign_statement
from kolm_ledger.keys import TrustRoot
from kolm_ledger.service.client import AppendResult, LedgerClient
from kolm_ledger.service.server import LedgerServer, start
from kolm_ledger.storage import Store, micros
from kolm_ledger.storage.models import APPEND_ONLY_TABLES, node_id


@dataclass(frozen=True)
class Keys:
    dir: Path
    trust: TrustRoot
    log: PrivateKey
    compile: PrivateKey

    @property
    def trust_path(self) -> str:
        return str(self.dir / "trust.json")

    @property
    def origin(self) -> str:
        origin = self.trust.log_keys()[0].origin
        assert origin is not None
        return origin


@pytest.fixture
def keys(keydir: Path) -> Keys:
    return Keys(
        keydir,
        TrustRoot.load(keydir / "trust.json"),
        PrivateKey.load(keydir / "log.key"),
        PrivateKey.load(keydir / "compile.key"),
    )


def label_env(key: PrivateKey, i: int) -> Envelope:
    st = label_statement(
        input_value=f"ticket {i}",
        output_value="card_arrival",
        task={"name": "router"},
        teacher={"backend": "simulated", "model": "gold"},
        k=3,
        votes={"card_arrival": 3},
        sample_digests=[hashlib.sha256(f"{i}/{s}".encode()).hexdigest() for s in range(3)],
        verifier={"name": "label_set", "version": "1"},
        agreement=1.0,
        job_id="job-audit",
    )
    return sign_statement(st, key)


class ThreadedServer:
    """``kolm_ledger.service.server.start`` on its own event loop in a background thread."""

    def __init__(self, db: str, keys: Keys) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        try:
            self.srv: LedgerServer = self._run(start(db, keys.trust, keys.log))
        except BaseException:
            self._close_loop()
            raise
        self.target = f"127.0.0.1:{self.srv.port}"

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(60)

    def stop(self) -> None:
        try:
            self._run(self.srv.stop(2.0))
        finally:
            self._close_loop()

    def _close_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._loop.close()


@pytest.fixture
def running(db_url: str, keys: Keys) -> Iterator[list[ThreadedServer]]:
    """Servers started by the test (a list, so a test can stop and restart); stopped at the end."""
    servers: list[ThreadedServer] = []
    yield servers
    for s in servers:
        if s._thread.is_alive():
            s.stop()


def _append(target: str, keys: Keys, sizes: list[int], start_at: int) -> list[AppendResult]:
    out: list[AppendResult] = []
    with LedgerClient(target) as c:
        n = start_at
        for size in sizes:
            for r in c.append_many([label_env(keys.compile, n + j) for j in range(size)]):
                assert isinstance(r, AppendResult), r
                out.append(r)
            n += size
    return out


def _audit(
    target: str, keys: Keys, state: Path | None, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str]:
    argv = ["audit", "--ledger", target, "--trust", keys.trust_path]
    if state is not None:
        argv += ["--state", str(state)]
    rc = kolm_main(argv)
    return rc, capsys.readouterr().out


def _engine(db_url: str) -> sa.Engine:
    return sa.create_engine(db_url, poolclass=NullPool)


def _drop_triggers(conn: sa.Connection) -> None:
    if conn.dialect.name == "postgresql":
        for t in APPEND_ONLY_TABLES:
            conn.execute(sa.text(f"DROP TRIGGER IF EXISTS {t}_append_only ON {t}"))
    else:
        for t in APPEND_ONLY_TABLES:
            for op in ("update", "delete"):
                conn.execute(sa.text(f"DROP TRIGGER IF EXISTS {t}_no_{op}"))


def _assert_append_only(db_url: str) -> None:
    """The database itself refuses the edit while the triggers are there."""
    eng = _engine(db_url)
    try:
        for stmt in (
            "UPDATE entries SET kind = 'eval' WHERE idx = 1",
            "DELETE FROM checkpoints",
        ):
            with pytest.raises(sa.exc.DBAPIError, match="append-only"), eng.begin() as conn:
                conn.execute(sa.text(stmt))
    finally:
        eng.dispose()


def rewrite_history(db_url: str, keys: Keys, index: int, new_env: Envelope) -> None:
    """An insider with the log key replaces entry ``index`` and re-derives everything else.

    Chain hashes, leaf hashes, interior Merkle nodes, subjects and every checkpoint (same
    sizes, re-signed with the log key) are recomputed, so the forged log is internally
    consistent.
    """
    store = Store(db_url)
    try:
        entries = list(store.entries())
        old_cps = {c.size: c for c in store.checkpoints()}
    finally:
        store.close()
    signer = NoteSigner(keys.origin, keys.log)
    tree, chain = CompactRange.empty(), bytes(32)
    rows: list[dict[str, Any]] = []
    subjects: list[dict[str, Any]] = []
    nodes: list[dict[str, Any]] = []
    cps: list[dict[str, Any]] = []
    for e in entries:
        env = new_env.canonical() if e.index == index else e.envelope
        leaf = entry_leaf_hash(env, micros(e.integrated_at))
        chain = chain_next(chain, leaf)
        nodes += [{"node_id": node_id(lv, i), "hash": h} for lv, i, h in tree.append(leaf)]
        st = Statement.from_envelope(Envelope.from_bytes(env))
        rows.append(
            {
                "idx": e.index,
                "leaf_hash": leaf,
                "chain_hash": chain,
                "kind": st.kind,
                "key_id": Envelope.from_bytes(env).signatures[0].keyid,
                "integrated_at": micros(e.integrated_at),
                "envelope": env,
                "statement_digest": statement_digest(Envelope.from_bytes(env)),
            }
        )
        subjects += [{"digest": d, "idx": e.index} for d in sorted(set(st.subject_digests()))]
        old = old_cps.get(tree.size)
        if old is not None:
            cp = Checkpoint(keys.origin, tree.size, tree.root(), chain)
            note = sign_checkpoint(cp, [signer]).to_bytes()
            cps.append(
                {
                    "size": cp.size,
                    "root": cp.root,
                    "chain_head": chain,
                    "note": note,
                    "created_at": micros(old.created_at),
                }
            )
    assert len(cps) == len(old_cps)
    _assert_append_only(db_url)
    meta = sa.MetaData()
    tables = {t: sa.Table(t, meta, autoload_with=_engine(db_url)) for t in APPEND_ONLY_TABLES}
    eng = _engine(db_url)
    try:
        with eng.begin() as conn:
            _drop_triggers(conn)
            for t in APPEND_ONLY_TABLES:
                conn.execute(tables[t].delete())
            conn.execute(tables["entries"].insert(), rows)
            conn.execute(tables["entry_subjects"].insert(), subjects)
            conn.execute(tables["nodes"].insert(), nodes)
            conn.execute(tables["checkpoints"].insert(), cps)
    finally:
        eng.dispose()


def drop_tail(db_url: str, keep: int) -> None:
    """An insider deletes every entry from ``keep`` on (and what covers them)."""
    meta = sa.MetaData()
    eng = _engine(db_url)
    try:
        with eng.begin() as conn:
            _drop_triggers(conn)
            tables = {t: sa.Table(t, meta, autoload_with=conn) for t in APPEND_ONLY_TABLES}
            conn.execute(tables["entries"].delete().where(tables["entries"].c.idx >= keep))
            conn.execute(
                tables["entry_subjects"].delete().where(tables["entry_subjects"].c.idx >= keep)
            )
            conn.execute(tables["checkpoints"].delete().where(tables["checkpoints"].c.size > keep))
            mask = (1 << 48) - 1
            for (nid,) in conn.execute(sa.select(tables["nodes"].c.node_id)).all():
                lv, i = nid >> 48, nid & mask
                if (i + 1) << lv > keep:
                    conn.execute(tables["nodes"].delete().where(tables["nodes"].c.node_id == nid))
    finally:
        eng.dispose()


def test_remote_audit_remembers_checkpoints_and_catches_rewritten_history(
    db_url: str,
    keys: Keys,
    tmp_path: Path,
    running: list[ThreadedServer],
    capsys: pytest.CaptureFixture[str],
) -> None:
    state = tmp_path / "audit-state.json"
    srv = ThreadedServer(db_url, keys)
    running.append(srv)
    _append(srv.target, keys, [4, 3, 5], 0)

    # (1) first audit: passes and remembers the checkpoint it verified
    rc, out = _audit(srv.target, keys, state, capsys)
    assert rc == 0, out
    assert "OK: 12 entries (label 12)" in out
    saved = json.loads(state.read_text())
    assert saved["size"] == 12
    first = verify_checkpoint(saved["note"].encode(), keys.trust).checkpoint
    assert first.size == 12 and saved["root"] == first.root.hex()

    # (2) more entries; the next audit demands (and gets) a consistency proof from 12
    _append(srv.target, keys, [3, 2], 12)
    rc, out = _audit(srv.target, keys, state, capsys)
    assert rc == 0, out
    assert "OK: 17 entries" in out
    assert json.loads(state.read_text())["size"] == 17
    remembered = state.read_text()
    honest = verify_checkpoint(json.loads(remembered)["note"].encode(), keys.trust).checkpoint

    # (3) rewrite history behind the auditor's back, with the log key, and carry on
    srv.stop()
    rewrite_history(db_url, keys, 1, label_env(keys.compile, 1000))
    store = Store(db_url)
    try:
        assert audit(store, keys.trust).ok  # the forgery is internally consistent
        assert store.latest_checkpoint() is not None
    finally:
        store.close()
    srv = ThreadedServer(db_url, keys)
    running.append(srv)
    _append(srv.target, keys, [2], 17)
    rc, out = _audit(srv.target, keys, None, capsys)
    assert rc == 0, out  # without a remembered checkpoint nothing looks wrong

    # (4) with the remembered checkpoint the rewrite is caught, naming both checkpoints
    rc, out = _audit(srv.target, keys, state, capsys)
    assert rc == 1, out
    assert "FAILED:" in out
    assert (
        "checkpoint 19: checkpoint of size 19 is not consistent with the remembered "
        "checkpoint of size 17" in out
    )
    assert "checkpoint 17: Merkle root recomputed at size 17 is " in out
    assert f"the checkpoint says {honest.root.hex()[:16]}" in out
    assert state.read_text() == remembered  # a failed audit never moves the state forward

    with LedgerClient(srv.target) as c:
        rep = audit_remote(c, keys.trust, state_path=state)
    assert not rep.ok
    assert {f.checkpoint_size for f in rep.failures} == {17, 19}


def test_remote_audit_catches_a_ledger_that_dropped_its_tail(
    db_url: str,
    keys: Keys,
    tmp_path: Path,
    running: list[ThreadedServer],
    capsys: pytest.CaptureFixture[str],
) -> None:
    state = tmp_path / "state.json"
    srv = ThreadedServer(db_url, keys)
    running.append(srv)
    _append(srv.target, keys, [5, 4], 0)
    rc, out = _audit(srv.target, keys, state, capsys)
    assert rc == 0, out
    srv.stop()
    drop_tail(db_url, 5)
    store = Store(db_url)
    try:
        assert audit(store, keys.trust).ok  # a consistent, shorter log
    finally:
        store.close()
    srv = ThreadedServer(db_url, keys)
    running.append(srv)
    rc, out = _audit(srv.target, keys, state, capsys)
    assert rc == 1, out
    assert "log shrank: remembered checkpoint has size 9, the ledger now says 5" in out
    # and re-growing to the old size with different entries is a fork, not a continuation
    _append(srv.target, keys, [4, 2], 100)
    rc, out = _audit(srv.target, keys, state, capsys)
    assert rc == 1, out
    assert (
        "checkpoint 11: checkpoint of size 11 is not consistent with the remembered "
        "checkpoint of size 9" in out
    )
    assert "checkpoint 9: Merkle root recomputed at size 9" in out


def test_remote_audit_of_an_empty_and_then_wiped_ledger(
    db_url: str,
    keys: Keys,
    tmp_path: Path,
    running: list[ThreadedServer],
    capsys: pytest.CaptureFixture[str],
) -> None:
    state = tmp_path / "state.json"
    srv = ThreadedServer(db_url, keys)
    running.append(srv)
    rc, out = _audit(srv.target, keys, state, capsys)
    assert rc == 0, out  # an empty ledger is a consistent one
    assert "OK: 0 entries" in out
    assert not state.exists()  # nothing to remember yet
    _append(srv.target, keys, [3], 0)
    rc, out = _audit(srv.target, keys, state, capsys)
    assert rc == 0, out
    assert json.loads(state.read_text())["size"] == 3
    srv.stop()
    drop_tail(db_url, 0)
    srv = ThreadedServer(db_url, keys)
    running.append(srv)
    rc, out = _audit(srv.target, keys, state, capsys)
    assert rc == 1, out
    assert (
        f"checkpoint 0: log shrank: {state} remembers a checkpoint, but the ledger now has none"
        in out
    )
