"""Ledger storage: SQLAlchemy 2 models, alembic migrations, and the repository.

Example::

    >>> from kolm_ledger.storage import Store
    >>> store = Store("sqlite:///:memory:")
    >>> store.size()
    0
"""

from kolm_ledger.storage.repository import (
    Entry,
    Head,
    NewEntry,
    SequencingTx,
    Store,
    StoredCheckpoint,
    micros,
)

__all__ = ["Entry", "Head", "NewEntry", "SequencingTx", "Store", "StoredCheckpoint", "micros"]
