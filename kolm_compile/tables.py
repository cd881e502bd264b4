"""Tables: the one CSV/JSONL reader of kolm_compile (the spec's data files, the simulated
teacher's gold labels, the pipeline's inputs)."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from kolm_ledger.errors import FormatError, SpecError

__all__ = ["read_rows", "read_table"]


def read_rows(path: Path) -> Iterator[Mapping[str, Any]]:
    """Rows of a table: a CSV file with a header row, or JSON Lines (``.jsonl``/``.ndjson``:
    one object per line, blank lines skipped). The one table reader of kolm_compile.

    CSV values are strings (``None`` for a missing trailing cell). Raises
    :class:`~kolm_ledger.errors.FormatError` naming the file and line for a JSONL line
    that is not a JSON object; ``OSError`` when the file cannot be read.
    """
    path = Path(path)
    if path.suffix.lower() == ".csv":
        # utf-8-sig: a spreadsheet's byte-order mark is not part of the first column's name
        with path.open(newline="", encoding="utf-8-sig") as f:
            yield from csv.DictReader(f)
        return
    with path.open(encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise FormatError(f"{path.name} line {n}: not JSON: {e}") from e
                if not isinstance(row, dict):
                    raise FormatError(f"{path.name} line {n}: must be a JSON object")
                yield row


def read_table(
    path: Path, text_col: str, label_col: str | None, field_name: str
) -> list[tuple[str, str | None]]:
    """A table's rows as ``(text, label-or-None)``, both stripped; an empty label is ``None``.

    Every problem raises :class:`SpecError` starting with ``field_name`` (the dotted
    spec field the file came from): unreadable file, bad JSON line, missing column.
    """
    path = Path(path)
    out: list[tuple[str, str | None]] = []
    try:
        for n, r in enumerate(read_rows(path), 1):
            text = r.get(text_col)
            if text is None:
                raise SpecError(f"{field_name}: {path.name} has no column {text_col!r} (row {n})")
            label = r.get(label_col) if label_col else None
            label = None if label is None else str(label).strip() or None
            out.append((str(text).strip(), label))
    except FormatError as e:
        if isinstance(e, SpecError):
            raise
        raise SpecError(f"{field_name}: {e}") from e
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise SpecError(f"{field_name}: cannot read {path.name}: {e}") from e
    return out
