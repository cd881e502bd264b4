"""Ingest of the structured tasks: (text, output) rows from JSON Lines (an object or JSON
text) and CSV (JSON text), canonical JSON for extract, text for generate; invalid outputs
dropped, counted and named; no label filtering; the holdout's checks."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from kolm_compile.pipeline.ingest import ingest, read_holdout
from kolm_compile.spec import TaskSpec
from kolm_compile.structured import canonical
from kolm_compile.tables import output_text, read_outputs
from kolm_ledger.errors import SpecError

SCHEMA = {
    "type": "object",
    "required": ["intent"],
    "additionalProperties": False,
    "properties": {
        "intent": {"type": "string", "enum": ["pay", "refund"]},
        "payee": {"type": "string", "x-kolm-grounded": True},
    },
}
PAY = {"intent": "pay", "payee": "Ann"}
REFUND = {"payee": "Bo", "intent": "refund"}


def jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def spec(d: Path, task: str = "extract", **data: Any) -> TaskSpec:
    raw: dict[str, Any] = {
        "name": "pay",
        "task": task,
        "teacher": {"backend": "openai", "model": "m"},
        "data": {"unlabeled": "in.jsonl", "holdout": "hold.jsonl", **data},
    }
    if task == "extract":
        raw["output_schema"] = SCHEMA
    else:
        raw["verifier"] = {"name": "exact_match"}
    return TaskSpec.from_dict(raw, d)


def test_extract_rows_read_as_canonical_json(tmp_path: Path, caplog: Any) -> None:
    jsonl(
        tmp_path / "in.jsonl",
        [
            {"text": " pay Ann ", "output": PAY},  # an object
            {"text": "refund Bo", "output": json.dumps(REFUND, indent=1)},  # JSON text
            {"text": "pay Ann", "output": PAY},  # a repeated text: once
            {"text": "no gold"},  # no output: an input all the same
            {"text": "bad 1", "output": {"intent": "lend"}},  # not valid under the schema
            {"text": "bad 2", "output": "{not json"},
            {"text": "bad 3", "output": ["pay"]},
        ],
    )
    jsonl(
        tmp_path / "hold.jsonl",
        [
            {"text": "pay Cy", "output": {"intent": "pay", "payee": "Cy"}},
            {"text": "refund Bo", "output": REFUND},  # also a training input
            {"text": "empty", "output": ""},
            {"text": "bad", "output": {"intent": "pay", "extra": 1}},
        ],
    )
    with caplog.at_level(logging.WARNING):
        ing = ingest(spec(tmp_path))
    assert ing.inputs == ["pay Ann", "refund Bo", "no gold"]
    assert ing.input_gold == [canonical(PAY), canonical(REFUND), None]
    assert ing.input_rows == [1, 2, 4]
    assert ing.holdout == [
        ("pay Cy", '{"intent":"pay","payee":"Cy"}'),
        ("refund Bo", canonical(REFUND)),
    ]
    report = ing.holdout_report
    assert report is not None
    assert (report.rows, report.dropped, report.unlabeled, report.leaked) == (4, 1, 1, 1)
    assert report.dropped_rows == (
        "row 4: not valid under the output schema: $: Additional properties are not allowed "
        "('extra' was unexpected)",
    )
    assert report.to_dict()["dropped_rows"] == list(report.dropped_rows)
    assert ing.counters["inputs_dropped"] == 3
    assert ing.counters["holdout_dropped"] == 1 and "holdout_dropped_rows" not in ing.counters
    # the dropped rows are named in the log, with the reason
    text = caplog.text
    assert "spec.data.unlabeled: 3 rows dropped" in text
    assert "row 5: not valid under the output schema: $.intent: 'lend' is not one of" in text
    assert "row 6: not JSON" in text and "row 7: a JSON list, not an object" in text


def test_extract_from_csv_json_text_and_seed_pairs(tmp_path: Path) -> None:
    with (tmp_path / "seeds.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "frame"])
        w.writerow(["pay Ann", json.dumps(PAY)])
        w.writerow(["junk", "{"])
        w.writerow(["blank", ""])
    jsonl(tmp_path / "in.jsonl", [{"text": "pay Ann"}, {"text": "refund Bo"}])
    jsonl(tmp_path / "hold.jsonl", [{"text": "x", "frame": PAY}])
    ing = ingest(spec(tmp_path, seed_pairs="seeds.csv", output_column="frame"))
    assert ing.seeds == [("pay Ann", canonical(PAY))]
    assert ing.inputs == ["refund Bo"]  # the seed's text is not asked again
    assert ing.counters["seeds_dropped"] == 1


def test_generate_rows_read_as_text(tmp_path: Path) -> None:
    jsonl(
        tmp_path / "in.jsonl",
        [{"text": "a", "output": "  Hello  there\n"}, {"text": "b", "output": {"x": 1}}],
    )
    jsonl(tmp_path / "hold.jsonl", [{"text": "c", "output": "Bye."}, {"text": "d", "output": 7}])
    ing = ingest(spec(tmp_path, "generate"))
    assert ing.input_gold == ["Hello  there"]  # stripped, inner spacing kept
    assert ing.holdout == [("c", "Bye.")]
    assert ing.holdout_report is not None
    assert ing.holdout_report.dropped_rows == ("row 2: not text but a JSON int",)


def test_holdout_problems_are_named(tmp_path: Path) -> None:
    jsonl(tmp_path / "in.jsonl", [{"text": "pay Ann"}])
    jsonl(tmp_path / "hold.jsonl", [{"text": "x", "label": "pay"}])
    s = spec(tmp_path)
    with pytest.raises(
        SpecError,
        match=r"^spec\.data\.holdout: hold\.jsonl has no column 'output' "
        r"\(spec\.data\.output_column\): a holdout needs reference outputs$",
    ):
        read_holdout(s, set())
    jsonl(tmp_path / "hold.jsonl", [{"text": "x", "output": {"intent": "x"}}, {"text": "y"}])
    with pytest.raises(
        SpecError,
        match=r"^spec\.data\.holdout: none of its 2 rows has a valid extract output in column "
        r"'output' \(1 invalid, 1 empty\): row 1: not valid under the output schema: ",
    ):
        read_holdout(s, set())
    (tmp_path / "hold.jsonl").write_text("")
    with pytest.raises(SpecError, match=r"^spec\.data\.holdout: hold\.jsonl is empty"):
        read_holdout(s, set())


def test_no_usable_input_names_why(tmp_path: Path) -> None:
    jsonl(tmp_path / "in.jsonl", [{"text": "x", "output": "[1]"}])
    jsonl(tmp_path / "hold.jsonl", [{"text": "y", "output": PAY}])
    with pytest.raises(
        SpecError,
        match=r"^spec\.data\.unlabeled: no inputs left after filtering \(row 1: a JSON list",
    ):
        ingest(spec(tmp_path))


@pytest.mark.parametrize(
    ("value", "task", "want"),
    [
        (None, "extract", None),
        ("  ", "extract", None),
        ({"b": 1, "a": 2}, "extract", '{"a":2,"b":1}'),
        ('{"b": 1.0, "a": 2}', "extract", '{"a":2,"b":1}'),
        ("text ", "generate", "text"),
    ],
)
def test_output_text(value: Any, task: str, want: str | None) -> None:
    assert output_text(value, task) == want


@pytest.mark.parametrize(
    ("value", "task", "why"),
    [
        ('{"a": 1, "a": 2}', "extract", "duplicate key"),
        ("3", "extract", "a JSON int, not an object"),
        (3, "extract", "a JSON int, not an object"),
        (["x"], "generate", "not text but a JSON list"),
        ("x", "classify", "has labels, not outputs"),
    ],
)
def test_output_text_refuses(value: Any, task: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        output_text(value, task)


def test_read_outputs_without_the_text_column(tmp_path: Path) -> None:
    jsonl(tmp_path / "t.jsonl", [{"utterance": "x", "output": PAY}])
    with pytest.raises(SpecError, match=r"^spec\.data\.unlabeled: t\.jsonl has no column 'text'"):
        read_outputs(tmp_path / "t.jsonl", "text", "output", "spec.data.unlabeled", task="extract")
