"""Witness cosignatures in their own append-only table.

Checkpoints commit with the log's signatures only; witnesses cosign a checkpoint after
it committed, and their cosignatures are appended here (one row per size and witness
key). Readers add them to the checkpoint's note.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TABLE = "checkpoint_cosignatures"


def upgrade() -> None:
    op.create_table(
        TABLE,
        sa.Column("size", sa.BigInteger(), nullable=False, autoincrement=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("key_id", sa.LargeBinary(4), nullable=False),
        sa.Column("signature", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("size", "name", "key_id", name=f"pk_{TABLE}"),
    )
    if op.get_bind().dialect.name == "postgresql":
        # kolm_append_only() comes from revision 0001
        op.execute(
            f"CREATE TRIGGER {TABLE}_append_only BEFORE UPDATE OR DELETE ON {TABLE} "
            f"FOR EACH ROW EXECUTE FUNCTION kolm_append_only()"
        )
        op.execute(
            f"CREATE TRIGGER {TABLE}_no_truncate BEFORE TRUNCATE ON {TABLE} "
            f"FOR EACH STATEMENT EXECUTE FUNCTION kolm_append_only()"
        )
    else:
        for op_name in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER {TABLE}_no_{op_name.lower()} BEFORE {op_name} ON {TABLE} "
                f"BEGIN SELECT RAISE(ABORT, 'kolm: {TABLE} is append-only ({op_name} refused)'); "
                f"END"
            )


def downgrade() -> None:
    raise RuntimeError("the kolm ledger schema is append-only; no downgrade")
