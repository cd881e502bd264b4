"""Initial ledger schema with append-only triggers.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TABLES = ("entries", "entry_subjects", "nodes", "checkpoints")


def upgrade() -> None:
    op.create_table(
        "entries",
        sa.Column("idx", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("leaf_hash", sa.LargeBinary(32), nullable=False),
        sa.Column("chain_hash", sa.LargeBinary(32), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("integrated_at", sa.BigInteger(), nullable=False),
        sa.Column("envelope", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("idx", name="pk_entries"),
        sa.UniqueConstraint("leaf_hash", name="uq_entries_leaf_hash"),
    )
    op.create_index("ix_entries_kind", "entries", ["kind"])
    op.create_index("ix_entries_key_id", "entries", ["key_id"])
    op.create_index("ix_entries_integrated_at", "entries", ["integrated_at"])
    op.create_table(
        "entry_subjects",
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("idx", sa.BigInteger(), nullable=False, autoincrement=False),
        sa.PrimaryKeyConstraint("digest", "idx", name="pk_entry_subjects"),
    )
    op.create_index("ix_entry_subjects_idx", "entry_subjects", ["idx"])
    op.create_table(
        "nodes",
        sa.Column("node_id", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("hash", sa.LargeBinary(32), nullable=False),
        sa.PrimaryKeyConstraint("node_id", name="pk_nodes"),
    )
    op.create_table(
        "checkpoints",
        sa.Column("size", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("root", sa.LargeBinary(32), nullable=False),
        sa.Column("chain_head", sa.LargeBinary(32), nullable=False),
        sa.Column("note", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("size", name="pk_checkpoints"),
    )
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        op.execute(
            """
            CREATE FUNCTION kolm_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
              RAISE EXCEPTION 'kolm: % is append-only (% refused)', TG_TABLE_NAME, TG_OP;
            END $$;
            """
        )
        for t in TABLES:
            op.execute(
                f"CREATE TRIGGER {t}_append_only BEFORE UPDATE OR DELETE ON {t} "
                f"FOR EACH ROW EXECUTE FUNCTION kolm_append_only()"
            )
            op.execute(
                f"CREATE TRIGGER {t}_no_truncate BEFORE TRUNCATE ON {t} "
                f"FOR EACH STATEMENT EXECUTE FUNCTION kolm_append_only()"
            )
    else:
        for t in TABLES:
            for op_name in ("UPDATE", "DELETE"):
                op.execute(
                    f"CREATE TRIGGER {t}_no_{op_name.lower()} BEFORE {op_name} ON {t} "
                    f"BEGIN SELECT RAISE(ABORT, 'kolm: {t} is append-only ({op_name} refused)'); "
                    f"END"
                )


def downgrade() -> None:
    raise RuntimeError("the kolm ledger schema is append-only; no downgrade")
