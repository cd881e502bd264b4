"""SQLAlchemy 2 table models of the ledger.

``entries``        one row per receipt: index, leaf hash, chain hash, kind, signing key id,
                   integration time (µs since the epoch, UTC), the canonical envelope and
                   its statement digest (unique: one statement, one entry; revision 0003).
``entry_subjects`` subject digest → entry index, for provenance look-ups.
``nodes``          every completed interior Merkle node (level >= 1), keyed by
                   ``node_id = level * 2**48 + index``, so proofs cost O(log n) reads.
``checkpoints``    every signed checkpoint, keyed by tree size (the note as the log signed it).
``checkpoint_cosignatures``
                   witness cosignatures collected after a checkpoint committed, one row per
                   (size, witness key); readers append them to the checkpoint's note.

All five are append-only: there is no update or delete path in code, and the
migration installs triggers that reject UPDATE and DELETE (and TRUNCATE on
PostgreSQL).
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Index, LargeBinary, MetaData, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "APPEND_ONLY_TABLES",
    "COSIGNATURE_TABLE",
    "Base",
    "CheckpointRow",
    "CosignatureRow",
    "EntryRow",
    "NodeRow",
    "SubjectRow",
    "node_id",
]

NODE_LEVEL_SHIFT = 48
#: the log's tables (what an audit recomputes)
APPEND_ONLY_TABLES = ("entries", "entry_subjects", "nodes", "checkpoints")
#: witness cosignatures (revision 0002): append-only too, but outside the log's hashes
COSIGNATURE_TABLE = "checkpoint_cosignatures"


def node_id(level: int, index: int) -> int:
    """Storage key of Merkle node (level, index). Requires 0 <= level < 64, index < 2**48."""
    return (level << NODE_LEVEL_SHIFT) | index


class Base(DeclarativeBase):
    """Declarative base with a fixed naming convention (stable constraint names)."""

    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_name)s",
            "uq": "uq_%(table_name)s_%(column_0_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


class EntryRow(Base):
    """One sequenced receipt."""

    __tablename__ = "entries"
    idx: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    leaf_hash: Mapped[bytes] = mapped_column(LargeBinary(32), unique=True)
    chain_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    kind: Mapped[str] = mapped_column(String(16), index=True)
    key_id: Mapped[str] = mapped_column(String(64), index=True)
    integrated_at: Mapped[int] = mapped_column(BigInteger, index=True)
    envelope: Mapped[bytes] = mapped_column(LargeBinary)
    #: kolm_ledger.formats.leaf.statement_digest of the envelope (revision 0003)
    statement_digest: Mapped[bytes | None] = mapped_column(LargeBinary(32), unique=True)


class SubjectRow(Base):
    """Subject digest → entry index."""

    __tablename__ = "entry_subjects"
    digest: Mapped[str] = mapped_column(String(64), primary_key=True)
    idx: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)


class NodeRow(Base):
    """A completed interior Merkle node."""

    __tablename__ = "nodes"
    node_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    hash: Mapped[bytes] = mapped_column(LargeBinary(32))


class CheckpointRow(Base):
    """A signed checkpoint (C2SP signed note bytes)."""

    __tablename__ = "checkpoints"
    size: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    root: Mapped[bytes] = mapped_column(LargeBinary(32))
    chain_head: Mapped[bytes] = mapped_column(LargeBinary(32))
    note: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[int] = mapped_column(BigInteger)


class CosignatureRow(Base):
    """A witness cosignature on checkpoint ``size``, stored after that checkpoint committed."""

    __tablename__ = "checkpoint_cosignatures"
    size: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    key_id: Mapped[bytes] = mapped_column(LargeBinary(4), primary_key=True)
    signature: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[int] = mapped_column(BigInteger)


Index("ix_entry_subjects_idx", SubjectRow.idx)
