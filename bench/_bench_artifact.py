"""Package a trained bench model as a signed ``.kolm`` and log its ``artifact`` receipt.

Shared by ``bench_infer.py`` and ``bench_recall.py``: both train a small student directly
(no teacher, no labels in the ledger), so the receipt carries zero roots and a zero
K-score — enough for the inference service's load checks, not a real provenance chain.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kolm_compile.artifact import pack, sha256_file
from kolm_ledger.formats.canonical import digest_hex
from kolm_ledger.formats.receipts import artifact_statement, sign_statement
from kolm_ledger.keys import PrivateKey
from kolm_ledger.service.client import LedgerClient

__all__ = ["log_artifact", "package"]


def package(
    model: Path, out: Path, keys: Path, name: str, labels: list[str], base_model: str,
    **manifest_extra: Any,
) -> tuple[str, dict[str, Any]]:  # fmt: skip
    """Write manifest/task/verifier into ``model`` (holding ``adapter/``), pack and sign.

    Returns the artifact digest and the verifier object.
    """
    verifier = {"name": "label_set", "version": "1", "params": {"labels": labels}}
    task = {"name": name, "task": "classify", "labels": labels}
    manifest = {
        "format": "kolm/v1",
        "name": name,
        "task_type": "classify",
        "labels": labels,
        "base_model": {"id": base_model, "revision": "bench", "weights_digest": "0" * 64},
        "adapter": "adapter",
        "max_length": 32,
        "confidence_threshold": 0.0,
        "verifier": verifier,
        "spec_digest": digest_hex(task),
        "job_id": "bench",
        "kolm_version": "0.1.0",
        **manifest_extra,
    }
    (model / "manifest.json").write_text(json.dumps(manifest, sort_keys=True))
    (model / "task.json").write_text(json.dumps(task, sort_keys=True))
    (model / "verifier.json").write_text(json.dumps(verifier, sort_keys=True))
    return pack(model, out, PrivateKey.load(keys / "compile.key")), verifier


def log_artifact(
    ledger: str, out: Path, digest: str, keys: Path, base_model: str, label_count: int,
    verifier: dict[str, Any], **extra: Any,
) -> None:  # fmt: skip
    """Append the artifact receipt (signed with ``keys/compile.key``) and wait for it."""
    st = artifact_statement(
        artifact_digest=digest,
        file_name=out.name,
        file_digest=sha256_file(out),
        base_model={"id": base_model},
        training_set_root="0" * 64,
        label_count=label_count,
        eval_receipt="0" * 64,
        k_score=0.0,
        verifier=verifier,
        compile_config_digest="0" * 64,
        kolm_version="0.1.0",
        checkpoint={"size": 0},
        extra=extra,
    )
    with LedgerClient(ledger) as c:
        c.append(sign_statement(st, PrivateKey.load(keys / "compile.key")), wait=True)
