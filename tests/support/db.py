"""Raw database access for the tamper tests: an engine that bypasses the ledger, the
append-only triggers dropped (what an attacker with database access, and no keys, does
first), and SQL run behind the ledger's back."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from kolm_ledger.storage.models import APPEND_ONLY_TABLES

__all__ = ["drop_triggers", "raw", "run_sql", "set_time", "tamper"]


def raw(url: str) -> sa.Engine:
    """An engine on ``url`` with no pool, outside any ledger or store."""
    return sa.create_engine(url, poolclass=NullPool)


def drop_triggers(url: str) -> None:
    """Drop the append-only triggers on every append-only table (SQLite and PostgreSQL)."""
    eng = raw(url)
    with eng.begin() as c:
        for t in APPEND_ONLY_TABLES:
            if eng.dialect.name == "sqlite":
                c.execute(sa.text(f"DROP TRIGGER IF EXISTS {t}_no_update"))
                c.execute(sa.text(f"DROP TRIGGER IF EXISTS {t}_no_delete"))
            else:
                c.execute(sa.text(f"DROP TRIGGER IF EXISTS {t}_append_only ON {t}"))
                c.execute(sa.text(f"DROP TRIGGER IF EXISTS {t}_no_truncate ON {t}"))
    eng.dispose()


def run_sql(url: str, statements: Iterable[tuple[str, dict[str, Any]]]) -> None:
    """Run ``(sql, params)`` statements in one transaction (the triggers still apply)."""
    eng = raw(url)
    with eng.begin() as c:
        for sql, params in statements:
            c.execute(sa.text(sql), params)
    eng.dispose()


def tamper(url: str, *statements: tuple[str, dict[str, Any]]) -> None:
    """Drop the triggers, then run ``statements`` in one transaction."""
    drop_triggers(url)
    run_sql(url, statements)


def set_time(url: str, index: int, us: int) -> None:
    """Rewrite entry ``index``'s integration time to ``us`` (the triggers must be gone)."""
    run_sql(url, [("UPDATE entries SET integrated_at = :t WHERE idx = :i", {"t": us, "i": index})])
