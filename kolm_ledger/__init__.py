"""kolm_ledger: receipts, keys, the RFC 6962 Merkle log, checkpoints, storage, audit.

Importable without torch: this is what an auditor or a downstream system installs.

Example::

    >>> import tempfile, pathlib
    >>> from kolm_ledger import Ledger, PrivateKey, Store, init_keys, receipts
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> trust = init_keys(d / "keys")
    >>> ledger = Ledger(Store(f"sqlite:///{d}/ledger.db"), trust, PrivateKey.load(d / "keys/log.key"))
    >>> admin = PrivateKey.load(d / "keys/admin.key")
    >>> st = receipts.key_statement(action="register", role="infer",
    ...                             public_key=PrivateKey.generate().public_key())
    >>> [a.index for a in ledger.append([receipts.sign_statement(st, admin)])]
    [0]
    >>> audit(ledger.store, trust).ok
    True
"""

from kolm_ledger._crypto import PrivateKey, PublicKey
from kolm_ledger.audit.auditor import AuditReport, audit
from kolm_ledger.errors import KolmError
from kolm_ledger.formats import receipts
from kolm_ledger.formats.bundle import Bundle
from kolm_ledger.formats.checkpoint import Checkpoint, SignedCheckpoint
from kolm_ledger.formats.dsse import Envelope
from kolm_ledger.keys import TrustedKey, TrustRoot, init_keys
from kolm_ledger.log.ledger import Ledger
from kolm_ledger.storage import Store
from kolm_ledger.verify.receipt import VerifiedReceipt, verify_bundle

__version__ = "0.1.0"

__all__ = [
    "AuditReport",
    "Bundle",
    "Checkpoint",
    "Envelope",
    "KolmError",
    "Ledger",
    "PrivateKey",
    "PublicKey",
    "SignedCheckpoint",
    "Store",
    "TrustRoot",
    "TrustedKey",
    "VerifiedReceipt",
    "__version__",
    "audit",
    "init_keys",
    "receipts",
    "verify_bundle",
]
