"""Stage (1): read the spec's unlabeled inputs, seed pairs and holdout (:func:`ingest`).

classify reads ``(text, label)`` rows (``data.label_column``; ``data.labels`` and
``limit_per_label`` select rows). extract and generate read ``(text, output)`` rows
(``data.output_column``, kolm_compile.tables.read_outputs): the output is the canonical
JSON of one object valid under ``spec.output_schema`` (extract) or the text (generate);
nothing selects rows by label. A row of a structured task whose output is not valid
(not JSON, not an object, not valid under the schema; not text) is dropped and counted:
``seeds_dropped`` / ``inputs_dropped`` in the counters, ``dropped`` and ``dropped_rows``
(which rows, why) in the holdout report, and a warning naming the first rows.

The estimate (:mod:`kolm_compile.estimate`) runs this stage alone: no folder, no ledger.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from kolm_ledger.errors import SpecError

from ..fields import thaw
from ..spec import TaskSpec
from ..tables import OutputTable, read_outputs, read_rows, read_table
from .outputs import HoldoutReport, Ingested

log = logging.getLogger(__name__)

__all__ = ["ingest", "read_holdout"]


def _select(
    rows: Sequence[tuple[Any, ...]], keep: set[str] | None, limit: int | None
) -> list[tuple[Any, ...]]:
    counts: Counter[str | None] = Counter()
    out = []
    for row in rows:
        label = row[1]
        if keep is not None and label is not None and label not in keep:
            continue
        if limit is not None:
            if counts[label] >= limit:
                continue
            counts[label] += 1
        out.append(tuple(row))
    return out


def ingest(spec: TaskSpec) -> Ingested:
    """Stage (1): the unique inputs (file order, not among the seed pairs), the seed pairs
    and the holdout (:func:`read_holdout`), and how many holdout texts are also training
    inputs (``leaked``). Raises :class:`SpecError` naming the field for bad data."""
    if spec.task != "classify":
        return _ingest_outputs(spec)
    d = spec.data
    keep = set(d.labels or spec.labels or ()) or None
    label_set = set(spec.labels or ())
    seeds: list[tuple[str, str]] = []
    if d.seed_pairs is not None:
        rows = read_table(d.seed_pairs, d.text_column, d.label_column, "spec.data.seed_pairs")
        seeds = list(dict(r for r in _select(rows, keep, None) if r[1]).items())
        bad = sorted({y for _, y in seeds if y not in label_set})
        if bad:
            raise SpecError(f"spec.data.seed_pairs: label {bad[0]!r} is not in spec.labels")
    seed_texts = {t for t, _ in seeds}
    inputs: list[tuple[str, str | None, int]] = []
    if d.unlabeled is not None:
        # a label column, when the file has one, selects rows (limit_per_label, other
        # intents out) and measures label precision; it never reaches training
        rows = read_table(d.unlabeled, d.text_column, d.label_column, "spec.data.unlabeled")
        numbered = _select([(t, y, n) for n, (t, y) in enumerate(rows, 1)], keep, d.limit_per_label)
        # unique, in file order; the gold column (if any) is kept only for diagnostics
        seen: dict[str, tuple[str | None, int]] = {}
        for t, y, n in numbered:
            if t and t not in seed_texts and t not in seen:
                seen[t] = (y, n)
        inputs = [(t, y, n) for t, (y, n) in seen.items()]
    holdout, report = read_holdout(spec, label_set)
    if not inputs and not seeds:
        raise SpecError("spec.data.unlabeled: no inputs left after filtering")
    # holdout texts the student may be trained on: the K-score would flatter it
    training = {t for t, *_ in inputs} | seed_texts
    leaked = sum(1 for t, _ in holdout if t in training)
    report = replace(report, leaked=leaked)
    return Ingested(
        inputs=[t for t, _, _ in inputs],
        input_gold=[y for _, y, _ in inputs],
        input_rows=[n for _, _, n in inputs],
        seeds=seeds,
        holdout=holdout,
        holdout_report=report,
        counters={
            "inputs": len(inputs),
            "seeds": len(seeds),
            "holdout": len(holdout),
            **{f"holdout_{k}": v for k, v in _report_counters(report).items()},
        },
    )


def _outputs(spec: TaskSpec, path: Path, field_name: str) -> OutputTable:
    """The ``(text, output)`` rows of one data file of a structured task; its invalid
    rows are logged (the first three, with the reason)."""
    schema = thaw(spec.output_schema) if spec.output_schema is not None else None
    d = spec.data
    table = read_outputs(
        path, d.text_column, d.output_column, field_name, task=spec.task, schema=schema
    )
    if table.invalid:
        log.warning(
            "%s: %d rows dropped, their %s is not a valid %s output (%s)",
            field_name,
            len(table.invalid),
            d.output_column,
            spec.task,
            table.describe_invalid(),
        )
    return table


def _ingest_outputs(spec: TaskSpec) -> Ingested:
    """:func:`ingest` for extract and generate (see the module docstring)."""
    d = spec.data
    counters: dict[str, float] = {}
    seeds: dict[str, str] = {}
    if d.seed_pairs is not None:
        table = _outputs(spec, d.seed_pairs, "spec.data.seed_pairs")
        seeds = {r.text: r.output for r in table.rows if r.text and r.output is not None}
        if table.invalid:
            counters["seeds_dropped"] = len(table.invalid)
    inputs: dict[str, tuple[str | None, int]] = {}
    invalid: OutputTable | None = None
    if d.unlabeled is not None:
        # an output column, when the file has one, measures label precision; it never
        # reaches training
        table = _outputs(spec, d.unlabeled, "spec.data.unlabeled")
        for r in table.rows:
            if r.text and r.text not in seeds and r.text not in inputs:
                inputs[r.text] = (r.output, r.row)
        if table.invalid:
            counters["inputs_dropped"] = len(table.invalid)
            invalid = table
    holdout, report = read_holdout(spec, set())
    if not inputs and not seeds:
        why = f" ({invalid.describe_invalid()})" if invalid is not None else ""
        raise SpecError(f"spec.data.unlabeled: no inputs left after filtering{why}")
    training = set(inputs) | set(seeds)
    report = replace(report, leaked=sum(1 for t, _ in holdout if t in training))
    return Ingested(
        inputs=list(inputs),
        input_gold=[y for y, _ in inputs.values()],
        input_rows=[n for _, n in inputs.values()],
        seeds=list(seeds.items()),
        holdout=holdout,
        holdout_report=report,
        counters={
            "inputs": len(inputs),
            "seeds": len(seeds),
            "holdout": len(holdout),
            **counters,
            **{f"holdout_{k}": v for k, v in _report_counters(report).items()},
        },
    )


def _report_counters(report: HoldoutReport) -> dict[str, int]:
    return {k: v for k, v in report.to_dict().items() if k not in ("rows", "dropped_rows") and v}


def read_holdout(
    spec: TaskSpec, label_set: set[str]
) -> tuple[list[tuple[str, str]], HoldoutReport]:
    """The holdout's ``(text, label)`` rows and what was done to them.

    classify: a label that differs from one of ``spec.labels`` only by case, surrounding
    quotes/spaces or ``_``/``-``/space is mapped to it (counted as ``mapped``); a row
    whose label is not in the set (``dropped``) or empty (``unlabeled``) is left out
    and counted. extract/generate (``label_set`` unused): ``(text, output)`` rows, the
    output as kolm_compile.tables.read_outputs writes it; a row whose output is not valid
    is left out and counted (``dropped``, the first named in ``dropped_rows``), an empty
    one too (``unlabeled``). A file without the answer column, an empty file and a file
    with no usable row are refused, naming ``spec.data.holdout``.
    """
    d = spec.data
    if d.holdout is None:
        raise SpecError("spec.data.holdout: required (the K-score is measured on it)")
    field_name = "spec.data.holdout"
    if spec.task != "classify":
        return _read_output_holdout(spec, d.holdout, field_name)
    rows = read_table(d.holdout, d.text_column, d.label_column, field_name)
    if not rows:
        raise SpecError(f"{field_name}: {d.holdout.name} is empty (no data rows)")
    first: Mapping[str, Any] = next(iter(read_rows(d.holdout)), {})
    if d.label_column not in first:
        raise SpecError(
            f"{field_name}: {d.holdout.name} has no column {d.label_column!r} "
            "(spec.data.label_column): a holdout needs labels"
        )

    def key(label: str) -> str:
        return " ".join(
            label.strip(" \t\"'`.").replace("_", " ").replace("-", " ").split()
        ).casefold()

    canon = {key(x): x for x in label_set}
    out: list[tuple[str, str]] = []
    mapped = dropped = unlabeled = 0
    for t, y in rows:
        if y is None:
            unlabeled += 1
        elif y in label_set:
            out.append((t, y))
        elif key(y) in canon:
            mapped += 1
            out.append((t, canon[key(y)]))
        else:
            dropped += 1
    if not out:
        raise SpecError(
            f"{field_name}: none of its {len(rows)} rows has a label from spec.labels "
            f"({dropped} other labels, {unlabeled} empty)"
        )
    return out, HoldoutReport(rows=len(rows), mapped=mapped, dropped=dropped, unlabeled=unlabeled)


def _read_output_holdout(
    spec: TaskSpec, path: Path, field_name: str
) -> tuple[list[tuple[str, str]], HoldoutReport]:
    """:func:`read_holdout` for extract and generate."""
    column = spec.data.output_column
    table = _outputs(spec, path, field_name)
    n = len(table.rows) + len(table.invalid)
    if not n:
        raise SpecError(f"{field_name}: {path.name} is empty (no data rows)")
    if not table.has_column:
        raise SpecError(
            f"{field_name}: {path.name} has no column {column!r} (spec.data.output_column): "
            "a holdout needs reference outputs"
        )
    out = [(r.text, r.output) for r in table.rows if r.output is not None]
    unlabeled = sum(1 for r in table.rows if r.output is None)
    if not out:
        why = f": {table.describe_invalid()}" if table.invalid else ""
        raise SpecError(
            f"{field_name}: none of its {n} rows has a valid {spec.task} output in column "
            f"{column!r} ({len(table.invalid)} invalid, {unlabeled} empty){why}"
        )
    dropped_rows = tuple(f"row {row}: {why}"[:200] for row, why in table.invalid[:5])
    return out, HoldoutReport(
        rows=n, dropped=len(table.invalid), unlabeled=unlabeled, dropped_rows=dropped_rows
    )
