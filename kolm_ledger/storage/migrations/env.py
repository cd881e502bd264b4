"""Alembic environment: always run with a connection handed in by kolm (no alembic.ini)."""

from alembic import context

from kolm_ledger.storage.models import Base

target_metadata = Base.metadata
connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - kolm always passes a connection
    raise RuntimeError("kolm migrations run through kolm_ledger.storage.migrate(engine)")
context.configure(connection=connection, target_metadata=target_metadata)
with context.begin_transaction():
    context.run_migrations()
