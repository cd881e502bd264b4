"""The formats: bytes ⇄ objects (DSSE, in-toto receipts, RFC 8785, RFC 6962,
signed notes, checkpoints, tlog-proof, bundles, promises, model signing, corpora,
witness cosignatures). No storage, no network, no clock."""

__all__: list[str] = []
