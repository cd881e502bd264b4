"""Stage (1): read the spec's unlabeled inputs, seed pairs and holdout (:func:`ingest`).

The estimate (:mod:`kolm_compile.estimate`) runs this stage alone: no folder, no ledger.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from kolm_ledger.errors import SpecError

from ..spec import TaskSpec
from ..tables import read_rows, read_table
from .outputs import HoldoutReport, Ingested

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
            **{f"holdout_{k}": v for k, v in report.to_dict().items() if k != "rows" and v},
        },
    )


def read_holdout(
    spec: TaskSpec, label_set: set[str]
) -> tuple[list[tuple[str, str]], HoldoutReport]:
    """The holdout's ``(text, label)`` rows and what was done to them.

    A label that differs from one of ``spec.labels`` only by case, surrounding
    quotes/spaces or ``_``/``-``/space is mapped to it (counted as ``mapped``); a row
    whose label is not in the set (``dropped``) or empty (``unlabeled``) is left out
    and counted. A file without the label column, an empty file and a file with no
    usable row are refused, naming ``spec.data.holdout``.
    """
    d = spec.data
    if d.holdout is None:
        raise SpecError("spec.data.holdout: required (the K-score is measured on it)")
    field_name = "spec.data.holdout"
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
