"""kolm log format v2: one statement, one entry; the integration time is in the leaf.

Adds ``entries.statement_digest`` (``kolm_ledger.formats.leaf.statement_digest``) with a unique
index, so an envelope whose statement (payload type, payload, key id) is already in the
log cannot become a second entry, whatever its signature bytes.

From this revision the leaf hash binds the integration time (docs/FORMATS.md, "Log
format"). Leaves of format v1 (the envelope alone) are not converted: a database that
already holds entries is refused with a clear error instead of being extended into a
log of mixed formats that no audit would pass. Nothing was deployed on v1.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

from kolm_ledger.errors import StorageError

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    n = op.get_bind().execute(sa.text("SELECT count(*) FROM entries")).scalar_one()
    if n:
        raise StorageError(
            f"this ledger database holds {n} entries of kolm log format v1 (leaf = "
            "SHA-256(0x00 || envelope)); format v2 binds each entry's integration time "
            "into its leaf and nothing converts v1 logs: start a new ledger database "
            "(docs/FORMATS.md, 'Log format')"
        )
    op.add_column("entries", sa.Column("statement_digest", sa.LargeBinary(32), nullable=True))
    op.create_index("uq_entries_statement_digest", "entries", ["statement_digest"], unique=True)


def downgrade() -> None:
    raise RuntimeError("the kolm ledger schema is append-only; no downgrade")
