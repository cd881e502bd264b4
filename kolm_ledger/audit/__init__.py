"""Whole-ledger checks that read a database or a ledger service: the audit,
K-score provenance, re-execution and the HTML report."""

__all__: list[str] = []
