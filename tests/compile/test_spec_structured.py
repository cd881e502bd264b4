"""Task spec of the structured tasks (extract, generate): the output schema, the answer
column, the student kind and its defaults, the vote kind; every bad field named."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import rfc8785
from support.data import SNIPS

from kolm_compile.spec import (
    CAUSAL_LM_BASE_MODEL,
    CAUSAL_LM_TARGET_MODULES,
    ENCODER_BASE_MODEL,
    StudentSpec,
    TaskSpec,
)
from kolm_ledger.errors import SpecError

#: a schema a span tagger can produce: one enum and grounded strings
SPAN_SCHEMA = {
    "type": "object",
    "required": ["intent"],
    "properties": {
        "intent": {"type": "string", "enum": ["pay", "refund"]},
        "slots": {
            "type": "object",
            "properties": {
                "amount": {"type": "array", "items": {"type": "string", "x-kolm-grounded": True}},
                "payee": {"type": "string", "x-kolm-grounded": True},
            },
        },
    },
}


def extract_spec(**over: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "name": "pay-1",
        "task": "extract",
        "output_schema": SPAN_SCHEMA,
        "teacher": {"backend": "simulated", "dataset": "gold.jsonl"},
        "data": {"unlabeled": "gold.jsonl", "holdout": "gold.jsonl"},
    }
    d.update(over)
    return d


def load(tmp_path: Path, d: dict[str, Any]) -> TaskSpec:
    rows = [{"text": "pay 5 EUR to Ann", "output": {"intent": "pay", "slots": {"payee": "Ann"}}}]
    (tmp_path / "gold.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return TaskSpec.from_dict(d, tmp_path)


# --------------------------------------------------------------------------- output_schema


def test_output_schema_inline_or_from_a_file(tmp_path: Path) -> None:
    inline = load(tmp_path, extract_spec())
    (tmp_path / "schema.json").write_text(json.dumps(SPAN_SCHEMA))
    from_file = load(tmp_path, extract_spec(output_schema="schema.json"))
    assert inline == from_file
    assert inline.to_dict()["output_schema"] == json.loads(json.dumps(SPAN_SCHEMA))
    assert inline.verifier is not None and inline.verifier.name == "json_schema"
    assert inline.to_dict()["verifier"]["params"]["schema"] == inline.to_dict()["output_schema"]
    assert inline.build_verifier().check('{"intent": "pay"}').ok
    assert not inline.build_verifier().check('{"intent": "lend"}').ok


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ({"type": "object", "properties": 3}, r"^spec\.output_schema: not a valid JSON Schema"),
        (
            {"type": "object", "properties": {"a": {"type": "strin"}}},
            r"^spec\.output_schema: not a valid JSON Schema \(Draft 2020-12\) at "
            r"/properties/a/type: ",
        ),
        ({"type": "string"}, r"^spec\.output_schema\.type: must be \"object\""),
        ({"properties": {}}, r"^spec\.output_schema\.type: must be \"object\".*got None"),
        ("missing.json", r"^spec\.output_schema: cannot read "),
    ],
)
def test_bad_output_schema_is_named(tmp_path: Path, schema: Any, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        load(tmp_path, extract_spec(output_schema=schema))


def test_output_schema_file_that_is_not_json(tmp_path: Path) -> None:
    (tmp_path / "schema.json").write_text("{")
    with pytest.raises(SpecError, match=r"^spec\.output_schema: schema\.json is not JSON"):
        load(tmp_path, extract_spec(output_schema="schema.json"))


def test_verifier_schema_must_equal_the_output_schema(tmp_path: Path) -> None:
    d = extract_spec(verifier={"name": "json_schema", "params": {"schema": {"type": "object"}}})
    with pytest.raises(
        SpecError, match=r"^spec\.verifier\.params\.schema: must equal spec\.output_schema$"
    ):
        load(tmp_path, d)


# --------------------------------------------------------------------------- data columns


def test_each_task_has_its_own_answer_column(tmp_path: Path) -> None:
    spec = load(tmp_path, extract_spec())
    assert spec.data.output_column == "output" and spec.data.column("extract") == "output"
    assert "label_column" not in spec.to_dict()["data"]
    assert spec.to_dict()["data"]["output_column"] == "output"
    d = extract_spec()
    d["data"] = {**d["data"], "output_column": "frame"}
    assert load(tmp_path, d).data.column("extract") == "frame"
    d["data"] = {**d["data"], "label_column": "intent"}
    with pytest.raises(
        SpecError,
        match=r"^spec\.data\.label_column: not used by task extract; its reference answers "
        r"are in data\.output_column$",
    ):
        load(tmp_path, d)


@pytest.mark.parametrize(("name", "value"), [("limit_per_label", 10), ("labels", ["a", "b"])])
def test_label_filters_are_classify_only(tmp_path: Path, name: str, value: Any) -> None:
    d = extract_spec()
    d["data"] = {**d["data"], name: value}
    with pytest.raises(SpecError, match=rf"^spec\.data\.{name}: only used by task classify"):
        load(tmp_path, d)


# --------------------------------------------------------------------------- student kind


def test_auto_kind_follows_the_task_and_schema(tmp_path: Path) -> None:
    spec = load(tmp_path, extract_spec())
    assert spec.student.kind == "span_tagger" and spec.student.base_model == ENCODER_BASE_MODEL
    assert spec.student.max_new_tokens is None
    # a field that is neither an enum nor grounded: the generative student
    free = {"type": "object", "properties": {"note": {"type": "string"}}}
    causal = load(tmp_path, extract_spec(output_schema=free)).student
    assert (causal.kind, causal.base_model, causal.max_new_tokens) == (
        "causal_lm",
        CAUSAL_LM_BASE_MODEL,
        64,
    )
    gen = load(
        tmp_path,
        extract_spec(
            task="generate",
            output_schema=None,
            verifier={"name": "exact_match", "params": {"collapse_whitespace": True}},
        ),
    )
    assert gen.student.kind == "causal_lm"
    # what the spec holds after loading is the resolved kind: to_dict records it
    assert spec.to_dict()["student"]["kind"] == "span_tagger"
    assert TaskSpec.from_dict(spec.to_dict(), tmp_path) == spec


def test_kind_changes_the_training_digest_only(tmp_path: Path) -> None:
    span = load(tmp_path, extract_spec())
    lm = load(tmp_path, extract_spec(student={"kind": "causal_lm", "max_new_tokens": 96}))
    assert lm.student.max_new_tokens == 96
    assert span.training_digest() != lm.training_digest()
    assert span.identity() == lm.identity()  # the labels do not depend on the student


def test_train_config_carries_the_kind(tmp_path: Path) -> None:
    lm = load(tmp_path, extract_spec(student={"kind": "causal_lm", "max_new_tokens": 32}))
    cfg = lm.student.train_config(7)
    assert (cfg.kind, cfg.max_new_tokens, cfg.base_model, cfg.seed) == (
        "causal_lm",
        32,
        CAUSAL_LM_BASE_MODEL,
        7,
    )
    assert cfg.target_modules == CAUSAL_LM_TARGET_MODULES
    span = load(tmp_path, extract_spec()).student.train_config(7)
    assert (span.kind, span.base_model, span.target_modules) == (
        "span_tagger",
        ENCODER_BASE_MODEL,
        ("query", "key", "value", "dense"),  # every linear layer (spec.TAGGER_TARGET_MODULES)
    )
    with pytest.raises(SpecError, match=r"^spec\.student\.kind: auto is resolved by the task"):
        StudentSpec().train_config(0)


def test_classify_may_choose_the_generative_student(tmp_path: Path) -> None:
    d = {
        "name": "c",
        "task": "classify",
        "labels": ["a", "b"],
        "teacher": {"backend": "openai", "model": "m"},
        "data": {"unlabeled": "gold.jsonl"},
        "student": {"kind": "causal_lm"},
    }
    assert load(tmp_path, d).student.train_config(0).kind == "causal_lm"


@pytest.mark.parametrize(
    ("over", "message"),
    [
        (
            {"student": {"kind": "classifier"}},
            r"^spec\.student\.kind: classifier needs task classify, not extract$",
        ),
        (
            {
                "output_schema": {
                    "type": "object",
                    "properties": {
                        "intent": {"type": "string", "enum": ["a", "b"]},
                        "slots": {"type": "object", "properties": {"when": {"type": "string"}}},
                    },
                },
                "student": {"kind": "span_tagger"},
            },
            r"^spec\.student\.kind: span_tagger needs every field of spec\.output_schema to be "
            r"a grounded string \(x-kolm-grounded\) or a single enum; field /slots/when is not",
        ),
        (
            {
                "output_schema": {
                    "type": "object",
                    "properties": {
                        "tags": {"type": "array", "items": {"type": "string", "enum": ["x"]}}
                    },
                },
                "student": {"kind": "span_tagger"},
            },
            r"^spec\.student\.kind: span_tagger .*field /tags is not \(an enum inside an array",
        ),
        (
            {"output_schema": {"type": "object"}, "student": {"kind": "span_tagger"}},
            r"^spec\.student\.kind: span_tagger .*field / \(the whole output\) is not",
        ),
        (
            {"student": {"kind": "span_tagger", "max_new_tokens": 10}},
            r"^spec\.student\.max_new_tokens: only used by kind causal_lm, not span_tagger$",
        ),
        (
            {"student": {"kind": "causal_lm", "max_new_tokens": 0}},
            r"^spec\.student\.max_new_tokens: must be >= 1, got 0$",
        ),
        (
            {"student": {"base_model": "no/such-model"}},
            r"^spec\.student\.base_model: must be one of ",
        ),
    ],
)
def test_bad_student_is_named(tmp_path: Path, over: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        load(tmp_path, extract_spec(**over))


def test_generate_refuses_the_encoder_students(tmp_path: Path) -> None:
    d = extract_spec(
        task="generate", output_schema=None, verifier={"name": "regex", "params": {"pattern": ".+"}}
    )
    for kind in ("classifier", "span_tagger"):
        with pytest.raises(SpecError, match=rf"^spec\.student\.kind: {kind} needs task "):
            load(tmp_path, {**d, "student": {"kind": kind}})


# --------------------------------------------------------------------------- teacher


def test_vote_kind(tmp_path: Path) -> None:
    assert load(tmp_path, extract_spec()).teacher.vote == "exact"
    d = extract_spec()
    d["teacher"] = {**d["teacher"], "vote": "per_field"}
    spec = load(tmp_path, d)
    assert spec.teacher.vote == "per_field" and spec.to_dict()["teacher"]["vote"] == "per_field"
    # how samples become labels is part of what the job is
    assert spec.identity()["teacher"] != load(tmp_path, extract_spec()).identity()["teacher"]


def test_simulated_teacher_answers_every_task(tmp_path: Path) -> None:
    """The old refusal ("simulated only answers task classify") is gone."""
    d = extract_spec(
        task="generate", output_schema=None, verifier={"name": "regex", "params": {"pattern": ".+"}}
    )
    assert load(tmp_path, d).teacher.backend == "simulated"


def test_response_format_is_for_extract(tmp_path: Path) -> None:
    teacher = {"backend": "openai", "model": "m", "response_format": "json_object"}
    spec = load(tmp_path, extract_spec(teacher=teacher))
    assert spec.teacher.response_format == "json_object"
    with pytest.raises(SpecError, match=r"^spec\.teacher\.response_format: must be one of "):
        load(tmp_path, extract_spec(teacher={**teacher, "response_format": "yaml"}))
    d = extract_spec(
        task="generate",
        output_schema=None,
        teacher=teacher,
        verifier={"name": "regex", "params": {"pattern": ".+"}},
    )
    with pytest.raises(
        SpecError, match=r"^spec\.teacher\.response_format: only used by task extract, not generate"
    ):
        load(tmp_path, d)


# --------------------------------------------------------------------------- SNIPS


def test_snips_test_subset_loads_as_an_extract_spec(tmp_path: Path) -> None:
    d = {
        "name": "snips",
        "task": "extract",
        "output_schema": str(SNIPS / "schema.json"),
        "teacher": {"backend": "simulated", "dataset": str(SNIPS / "train.jsonl")},
        "data": {"unlabeled": str(SNIPS / "train.jsonl"), "holdout": str(SNIPS / "test.jsonl")},
    }
    spec = TaskSpec.from_dict(d, tmp_path)
    assert spec.student.kind == "span_tagger"  # every slot is grounded, the intent an enum
    assert spec.verifier is not None and spec.verifier.params["grounded"] == "marked"


def test_an_exact_vote_keeps_the_identity_of_older_jobs(tmp_path: Path) -> None:
    """Jobs started before teacher.vote existed voted exactly: their identity (what a job
    folder resumes) does not see the field at its default."""
    spec = load(tmp_path, extract_spec())
    teacher = spec.to_dict(with_file_digests=True)["teacher"]
    assert teacher["vote"] == "exact"
    del teacher["vote"]
    files = spec.to_dict(with_file_digests=True)["files"]
    teacher["files"] = {k: v for k, v in files.items() if k.startswith("teacher.")}
    want = hashlib.sha256(rfc8785.dumps(teacher)).hexdigest()
    assert spec.identity()["teacher"] == want
