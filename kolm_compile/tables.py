"""Tables: the one CSV/JSONL reader of kolm_compile (the spec's data files, the simulated
teacher's gold answers, the pipeline's inputs).

:func:`read_table` reads ``(text, label)`` rows (classify). :func:`read_outputs` reads
``(text, reference output)`` rows for the structured tasks, the output as the task
writes it (:func:`output_text`):

* ``extract`` — the RFC 8785 canonical JSON text of one object valid under the task's
  output schema. In JSON Lines the cell may be the object itself or JSON text; in CSV it
  is JSON text. A cell that is not such an object makes the row *invalid* (kept aside,
  with the reason, never silently read);
* ``generate`` — the text, stripped (a JSON Lines cell that is not a string is invalid).

An empty or missing cell is no output (``None``) for both.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

from kolm_compile.structured import canonical, parse_object
from kolm_ledger.errors import FormatError, SpecError

__all__ = ["OutputRow", "OutputTable", "output_text", "read_outputs", "read_rows", "read_table"]


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


# --------------------------------------------------------------------------- structured outputs


def output_text(value: Any, task: str, validator: Draft202012Validator | None = None) -> str | None:
    """A table cell as the reference output of ``task`` (see the module docstring):
    canonical JSON of a schema-valid object (extract; ``validator`` checks the schema) or
    stripped text (generate); ``None`` for an empty cell. Raises ``ValueError`` saying
    why for a cell that is not a valid output."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if task == "generate":
        if not isinstance(value, str):
            raise ValueError(f"not text but a JSON {type(value).__name__}")
        return value.strip()
    if task != "extract":
        raise ValueError(f"task {task!r} has labels, not outputs")
    if isinstance(value, str):
        obj: Any = parse_object(value.strip())
    elif isinstance(value, dict):
        obj = value
    else:
        raise ValueError(f"a JSON {type(value).__name__}, not an object")
    if validator is not None:
        try:
            error = best_match(validator.iter_errors(obj))
        except RecursionError:
            raise ValueError("nested too deeply to validate") from None
        if error is not None:
            raise ValueError(
                f"not valid under the output schema: {error.json_path}: {error.message}"
            )
    return canonical(obj)


@dataclass(frozen=True)
class OutputRow:
    """One usable row: its text, its output (``None``: the cell is empty or missing) and
    its row number (1 = the first data row)."""

    text: str
    output: str | None
    row: int


@dataclass(frozen=True)
class OutputTable:
    """What :func:`read_outputs` read: the usable rows, the ``invalid`` ones (row number,
    reason; not in ``rows``) and whether the first row had the output column."""

    rows: list[OutputRow]
    invalid: list[tuple[int, str]] = field(default_factory=list)
    has_column: bool = False

    def describe_invalid(self, limit: int = 3) -> str:
        """``row 4: not JSON: ...; row 9: ...`` for the first ``limit`` invalid rows."""
        shown = "; ".join(f"row {n}: {why}" for n, why in self.invalid[:limit])
        more = len(self.invalid) - limit
        return shown + (f"; and {more} more" if more > 0 else "")


def read_outputs(
    path: Path,
    text_col: str,
    output_col: str,
    field_name: str,
    *,
    task: str,
    schema: Mapping[str, Any] | None = None,
) -> OutputTable:
    """A table's rows as ``(text, reference output)`` for ``task`` (extract or generate;
    :func:`output_text`, ``schema`` the extract task's output schema). A row whose cell is
    not a valid output is set aside in ``invalid`` with the reason (the caller drops and
    counts it). Texts are stripped.

    Raises :class:`SpecError` starting with ``field_name`` for an unreadable file, a bad
    JSON line or a row without the text column.
    """
    path = Path(path)
    validator = Draft202012Validator(dict(schema)) if schema is not None else None
    rows: list[OutputRow] = []
    invalid: list[tuple[int, str]] = []
    has_column = False
    try:
        for n, r in enumerate(read_rows(path), 1):
            text = r.get(text_col)
            if text is None:
                raise SpecError(f"{field_name}: {path.name} has no column {text_col!r} (row {n})")
            if n == 1:
                has_column = output_col in r
            try:
                out = output_text(r.get(output_col), task, validator)
            except ValueError as e:
                invalid.append((n, str(e)))
                continue
            rows.append(OutputRow(str(text).strip(), out, n))
    except FormatError as e:
        if isinstance(e, SpecError):
            raise
        raise SpecError(f"{field_name}: {e}") from e
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise SpecError(f"{field_name}: cannot read {path.name}: {e}") from e
    return OutputTable(rows, invalid, has_column)
