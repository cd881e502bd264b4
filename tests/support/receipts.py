"""Receipts the tests sign: ``artifact`` and ``label`` statements with a placeholder for
every field a test does not care about, so each test names only what it checks."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from kolm_ledger.formats import receipts

__all__ = ["ORIGIN", "artifact_statement", "label_statement"]

#: the log origin the placeholder checkpoint names
ORIGIN = "example.com/kolm"

_PLACEHOLDERS: dict[str, Any] = {
    "artifact_digest": "a" * 64,
    "file_name": "model.kolm",
    "file_digest": "b" * 64,
    "base_model": {"id": "tiny", "revision": "r1", "weights_digest": "c" * 64},
    "training_set_root": "d" * 64,
    "label_count": 3,
    "eval_receipt": "e" * 64,
    "k_score": 91.5,
    "verifier": {"name": "exact", "version": "1"},
    "compile_config_digest": "f" * 64,
    "kolm_version": "0.1.0",
    "checkpoint": {"origin": ORIGIN, "size": 1},
}


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def artifact_statement(*, file: Path | None = None, **fields: Any) -> receipts.Statement:
    """:func:`kolm_ledger.formats.receipts.artifact_statement` with ``fields`` over the
    placeholders; ``file`` fills ``file_name`` and ``file_digest`` from a ``.kolm`` on disk."""
    if file is not None:
        fields = {"file_name": file.name, "file_digest": _sha256_file(file), **fields}
    return receipts.artifact_statement(**{**_PLACEHOLDERS, **fields})


_LABEL_PLACEHOLDERS: dict[str, Any] = {
    "output_value": "card_arrival",
    "task": {"name": "router"},
    "teacher": {"backend": "simulated"},
    "k": 1,
    "votes": {"card_arrival": 1},
    "sample_digests": [],
    "verifier": {"name": "label_set"},
    "agreement": 1.0,
}


def label_statement(*, input_value: str, job_id: str, **fields: Any) -> receipts.Statement:
    """:func:`kolm_ledger.formats.receipts.label_statement` for one unanimous simulated
    vote (``card_arrival``), with ``fields`` over those placeholders."""
    return receipts.label_statement(
        input_value=input_value, job_id=job_id, **{**_LABEL_PLACEHOLDERS, **fields}
    )
