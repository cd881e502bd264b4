"""Shared fixtures: keys, trust roots, and real databases (SQLite files and PostgreSQL)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PG_ADMIN_URL = os.environ.get(
    "KOLM_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
BANKING77 = Path(__file__).resolve().parent / "data" / "banking77"


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
            "start it (.ci/run does) — these tests are part of the suite"
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
