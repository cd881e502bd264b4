"""The transparency-dev/merkle proof vectors: every one must give exactly its expected result."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from kolm_ledger.errors import ConsistencyProofError, InclusionProofError
from kolm_ledger.formats.merkle import verify_consistency, verify_inclusion

VECTORS = Path(__file__).parents[1] / "vectors" / "transparency-dev-merkle"
INCLUSION = sorted(VECTORS.glob("inclusion/**/*.json"))
CONSISTENCY = sorted(VECTORS.glob("consistency/**/*.json"))


def _id(path: Path) -> str:
    return path.relative_to(VECTORS).as_posix()


def _load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def _b64(value: str | None) -> bytes:
    return base64.b64decode(value) if value else b""


def _proof(value: list[str | None] | None) -> list[bytes]:
    return [_b64(h) for h in value or []]


def test_corpus_is_complete() -> None:
    # Guards against a glob silently matching nothing (or a partial copy).
    assert len(INCLUSION) == 98
    assert len(CONSISTENCY) == 98
    assert any("additional" in p.parts for p in INCLUSION)
    assert any("additional" in p.parts for p in CONSISTENCY)


@pytest.mark.parametrize("path", INCLUSION, ids=_id)
def test_inclusion_vector(path: Path) -> None:
    v = _load(path)
    args = (
        v["leafIdx"],
        v["treeSize"],
        _b64(v["leafHash"]),
        _proof(v["proof"]),
        _b64(v["root"]),
    )
    if v["wantErr"]:
        with pytest.raises(InclusionProofError):
            verify_inclusion(*args)
    else:
        verify_inclusion(*args)


@pytest.mark.parametrize("path", CONSISTENCY, ids=_id)
def test_consistency_vector(path: Path) -> None:
    v = _load(path)
    args = (
        v["size1"],
        v["size2"],
        _proof(v["proof"]),
        _b64(v["root1"]),
        _b64(v["root2"]),
    )
    if v["wantErr"]:
        with pytest.raises(ConsistencyProofError):
            verify_consistency(*args)
    else:
        verify_consistency(*args)
