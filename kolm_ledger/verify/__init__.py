"""Offline verification against a trust root: a receipt bundle (steps 1–7),
a prediction (steps 8–10), a ``.kolm`` artifact, the trust state folded from key
receipts. No storage and no network: what an auditor runs on files."""

__all__: list[str] = []
