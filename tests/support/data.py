"""Data the tests read: only what the repository ships (a clone alone must pass)."""

from __future__ import annotations

import csv
from pathlib import Path

__all__ = ["BANKING77", "SNIPS", "banking77"]

# 4 Banking77 intents, CC BY 4.0: tests/data/banking77/README.md says what is in it
BANKING77 = Path(__file__).resolve().parents[1] / "data" / "banking77"
# 5 SNIPS intents, CC0: tests/data/snips/README.md; rows {"text", "output"}, schema.json
SNIPS = Path(__file__).resolve().parents[1] / "data" / "snips"


def banking77(split: str) -> list[tuple[str, str]]:
    """Every ``(text, label)`` row of ``split`` ("train" or "test"), in file order."""
    with (BANKING77 / f"{split}.csv").open(newline="", encoding="utf-8") as f:
        return [(r["text"], r["category"]) for r in csv.DictReader(f)]
