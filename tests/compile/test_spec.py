"""Task spec: loading, defaults, every bad field named by path, deterministic digest."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any

import pytest
import yaml

from kolm_compile import fields as kit
from kolm_compile import teachers
from kolm_compile.spec import (
    ENCODER_BASE_MODEL,
    BudgetSpec,
    DataSpec,
    StudentSpec,
    TaskSpec,
    TeacherSpec,
    VerifierSpec,
    kolm_version,
)
from kolm_ledger.errors import SpecError

EXAMPLE = (
    Path(__file__).resolve().parents[2] / "kolm_compile" / "examples" / "banking77-router.yaml"
)
LABELS = ["card_arrival", "pin_blocked", "exchange_rate"]


def write_data(d: Path) -> None:
    (d / "data").mkdir(parents=True, exist_ok=True)
    (d / "data" / "train.csv").write_text(
        "text,label\nwhere is my card,card_arrival\nmy pin is blocked,pin_blocked\n"
    )
    (d / "data" / "test.jsonl").write_text(
        json.dumps({"text": "what rate do you use", "label": "exchange_rate"}) + "\n"
    )


def base_spec() -> dict[str, Any]:
    return {
        "name": "router-1",
        "task": "classify",
        "labels": list(LABELS),
        "teacher": {"backend": "simulated", "dataset": "data/train.csv", "k": 5},
        "data": {"unlabeled": "data/train.csv", "holdout": "data/test.jsonl"},
    }


def load(tmp_path: Path, d: dict[str, Any], **kw: Any) -> TaskSpec:
    write_data(tmp_path)
    return TaskSpec.from_dict(d, tmp_path, **kw)


# --------------------------------------------------------------------------- the example


def test_example_loads() -> None:
    spec = TaskSpec.load(EXAMPLE, check_files=False)
    assert spec.name == "banking77-router" and spec.task == "classify"
    assert spec.labels is not None and len(spec.labels) == 12
    assert (spec.teacher.backend, spec.teacher.k, spec.teacher.min_agreement) == ("simulated", 5, 3)
    assert spec.verifier == VerifierSpec(
        "label_set", {"case_sensitive": False, "labels": list(spec.labels), "strip": True}
    )
    assert spec.student.learning_rate == 0.003
    assert spec.data.labels is None  # the task's own label set selects the rows
    assert spec.base_dir == EXAMPLE.parent
    assert spec.build_verifier().check("Request_Refund").normalized == "request_refund"


def test_example_files_exist_and_digest() -> None:
    spec = TaskSpec.load(EXAMPLE)  # the Banking77 subset shipped in kolm_compile/data
    assert set(spec.files()) == {"data.holdout", "data.unlabeled", "teacher.dataset"}
    assert len(spec.digest()) == 64


# --------------------------------------------------------------------------- good specs


def test_defaults_are_filled(tmp_path: Path) -> None:
    spec = load(tmp_path, base_spec())
    assert spec.teacher.min_agreement == 3  # floor(5/2)+1
    assert spec.teacher.accuracy == 0.85 and spec.teacher.similarity_temperature == 0.1
    assert spec.teacher.seed == spec.seed == 0
    # the backend owns its options: openai's are not part of a simulated teacher
    assert type(spec.teacher.options).__name__ == "SimulatedOptions"
    assert not hasattr(spec.teacher, "endpoint")
    assert dict(spec.teacher.params) == {"temperature": 0.7}
    assert spec.student == StudentSpec(
        kind="classifier", base_model=ENCODER_BASE_MODEL, chosen_by="auto"
    )
    assert StudentSpec().resolved("classify") == spec.student
    assert spec.budget == BudgetSpec()
    assert spec.data.text_column == "text" and spec.data.label_column == "label"
    assert spec.data.unlabeled == tmp_path / "data" / "train.csv"
    assert spec.verifier is not None and spec.verifier.name == "label_set"


@pytest.mark.parametrize(("k", "want"), [(1, 1), (2, 2), (3, 2), (4, 3), (7, 4)])
def test_min_agreement_default_is_a_majority(tmp_path: Path, k: int, want: int) -> None:
    d = base_spec()
    d["teacher"]["k"] = k
    assert load(tmp_path, d).teacher.min_agreement == want


def test_openai_defaults(tmp_path: Path) -> None:
    d = base_spec()
    d["teacher"] = {"backend": "openai", "model": "gpt-4o-mini", "api_key_env": "OPENAI_API_KEY"}
    t = load(tmp_path, d).teacher
    assert (t.endpoint, t.concurrency, t.timeout_s, t.max_retries, t.batch_samples) == (
        "https://api.openai.com",
        4,
        60.0,
        5,
        True,
    )
    assert not hasattr(t, "seed")  # openai takes no seed: its options class has none


def test_load_yaml_and_json_agree(tmp_path: Path) -> None:
    write_data(tmp_path)
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(base_spec()))
    (tmp_path / "spec.json").write_text(json.dumps(base_spec()))
    assert TaskSpec.load(tmp_path / "spec.yaml") == TaskSpec.load(tmp_path / "spec.json")


def test_yaml_exponent_without_dot_is_a_float(tmp_path: Path) -> None:
    write_data(tmp_path)
    text = yaml.safe_dump(base_spec()) + "student:\n  learning_rate: 3e-4\n"
    (tmp_path / "spec.yaml").write_text(text)
    assert TaskSpec.load(tmp_path / "spec.yaml").student.learning_rate == 3e-4


def test_extract_task_uses_the_schema(tmp_path: Path) -> None:
    schema = {"type": "object", "required": ["amount"]}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    d = base_spec()
    del d["labels"]
    d.update(task="extract", output_schema="schema.json")
    d["teacher"] = {"backend": "replay", "path": "data/rec.jsonl"}
    spec = load(tmp_path, d, check_files=False)
    assert dict(spec.output_schema or {}) == {"required": ("amount",), "type": "object"}
    assert spec.verifier is not None and spec.verifier.name == "json_schema"
    assert spec.build_verifier().check('{"amount": 1}').ok
    assert spec.to_dict()["output_schema"] == schema


def test_generate_task_with_verifier(tmp_path: Path) -> None:
    d = base_spec()
    del d["labels"]
    d.update(task="generate", verifier={"name": "bleu", "params": {"threshold": 0.4}})
    d["teacher"] = {"backend": "openai", "model": "m"}
    spec = load(tmp_path, d)
    assert spec.build_verifier().describe()["params"] == {
        "lowercase": False,
        "max_n": 4,
        "threshold": 0.4,
    }


def test_round_trip_and_determinism(tmp_path: Path) -> None:
    spec = load(tmp_path, base_spec())
    d = spec.to_dict()
    assert d["kolm_version"] == kolm_version()
    assert d["data"]["unlabeled"] == "data/train.csv"
    assert json.dumps(d) == json.dumps(load(tmp_path, base_spec()).to_dict())
    assert list(d) == sorted(d)
    again = TaskSpec.from_dict(d, tmp_path)
    assert again == spec and again.to_dict() == d and again.digest() == spec.digest()


def test_absolute_paths_are_made_relative(tmp_path: Path) -> None:
    d = base_spec()
    d["data"]["holdout"] = str(tmp_path / "data" / "test.jsonl")
    assert load(tmp_path, d).to_dict()["data"]["holdout"] == "data/test.jsonl"


def test_digest_follows_file_contents_not_location(tmp_path: Path) -> None:
    a = tmp_path / "a"
    spec = load(a, base_spec())
    digest = spec.digest()
    files = spec.to_dict(with_file_digests=True)["files"]
    assert set(files) == {"data.holdout", "data.unlabeled", "teacher.dataset"}
    # moving the whole directory keeps the digest
    shutil.copytree(a, tmp_path / "b")
    assert TaskSpec.from_dict(base_spec(), tmp_path / "b").digest() == digest
    # changing a data file changes it
    with (a / "data" / "test.jsonl").open("a") as f:
        f.write(json.dumps({"text": "card?", "label": "card_arrival"}) + "\n")
    assert spec.digest() != digest
    # and so does any field
    d = base_spec()
    d["seed"] = 1
    assert TaskSpec.from_dict(d, a).digest() != spec.digest()


def test_spec_is_frozen(tmp_path: Path) -> None:
    spec = load(tmp_path, base_spec())
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.name = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        spec.teacher.params["temperature"] = 0.0  # type: ignore[index]


def test_every_field_has_help() -> None:
    for cls in (TaskSpec, TeacherSpec, StudentSpec, DataSpec, BudgetSpec, VerifierSpec):
        assert all(cls.help().values()), cls


# --------------------------------------------------------------------------- bad specs


def mutate(d: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    d = copy.deepcopy(d)
    *parents, last = dotted.split(".")
    node = d
    for key in parents:
        node = node.setdefault(key, {})
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return d


DELETE = object()

BAD = [
    ("name", "Bad Name", r"spec\.name: must be a name matching"),
    ("name", 7, r"spec\.name: "),
    ("name", DELETE, r"spec\.name: required"),
    ("task", "summarize", r"spec\.task: must be one of classify, extract, generate"),
    ("colour", "blue", r"spec\.colour: unknown field"),
    ("labels", DELETE, r"spec\.labels: required for task classify"),
    ("labels", ["only"], r"spec\.labels: must have at least 2"),
    ("labels", ["a", "a"], r"spec\.labels: duplicate label 'a'"),
    ("labels", ["a", " b"], r"spec\.labels\[1\]: "),
    ("labels", "a,b", r"spec\.labels: must be a list"),
    ("output_schema", {"type": "object"}, r"spec\.output_schema: only used by task extract"),
    ("data.output_column", "out", r"^spec\.data\.output_column: not used by task classify"),
    ("teacher.vote", "per_field", r"^spec\.teacher\.vote: per_field needs task extract"),
    ("teacher.vote", "majority", r"^spec\.teacher\.vote: must be one of exact, per_field"),
    ("student.kind", "span_tagger", r"^spec\.student\.kind: span_tagger needs task extract"),
    ("student.kind", "causal", r"^spec\.student\.kind: must be one of auto, classifier, "),
    (
        "student.max_new_tokens",
        8,
        r"^spec\.student\.max_new_tokens: only used by kind causal_lm, not classifier",
    ),
    ("instructions", "  ", r"spec\.instructions: must not be empty"),
    ("seed", -1, r"spec\.seed: must be >= 0, got -1"),
    ("seed", True, r"spec\.seed: must be an integer"),
    ("seed", 2**60, r"spec\.seed: must be <= "),
    ("verifier", {"name": "nope"}, r"spec\.verifier\.name: task classify needs verifier label_set"),
    (
        "verifier",
        {"name": "label_set", "params": {"case_sensitive": "yes"}},
        r"spec\.verifier\.params\.case_sensitive: ",
    ),
    (
        "verifier",
        {"name": "label_set", "params": {"labels": ["x", "y"]}},
        r"spec\.verifier\.params\.labels: must equal spec\.labels",
    ),
    ("verifier", {"name": "label_set", "extra": 1}, r"spec\.verifier\.extra: unknown field"),
    ("teacher", "simulated", r"spec\.teacher: must be a mapping"),
    ("teacher", DELETE, r"spec\.teacher: required"),
    ("teacher.backend", "gpt", r"spec\.teacher\.backend: unknown teacher backend 'gpt'"),
    ("teacher.backend", DELETE, r"spec\.teacher\.backend: required"),
    ("teacher.k", 0, r"^spec\.teacher\.k: must be >= 1, got 0$"),
    ("teacher.k", "five", r"spec\.teacher\.k: must be an integer, got 'five'"),
    ("teacher.k", 2.0, r"spec\.teacher\.k: must be an integer"),
    ("teacher.min_agreement", 6, r"spec\.teacher\.min_agreement: must be <= 5, got 6"),
    ("teacher.min_agreement", 0, r"spec\.teacher\.min_agreement: must be >= 1"),
    ("teacher.params", [1], r"spec\.teacher\.params: must be a mapping"),
    ("teacher.params.temperature", 3, r"spec\.teacher\.params\.temperature: must be in \[0, 2\]"),
    ("teacher.params.top_p", 0, r"spec\.teacher\.params\.top_p: must be in \(0, 1\]"),
    ("teacher.params.max_tokens", 0, r"spec\.teacher\.params\.max_tokens: must be >= 1"),
    ("teacher.params.stop", [], r"spec\.teacher\.params\.stop: "),
    (
        "teacher.params.logit_bias",
        {},
        r"spec\.teacher\.params\.logit_bias: unknown sampling parameter",
    ),
    ("teacher.accuracy", 1.5, r"spec\.teacher\.accuracy: must be in \[0, 1\]"),
    ("teacher.similarity_temperature", 0, r"spec\.teacher\.similarity_temperature: must be in \(0"),
    (
        "teacher.endpoint",
        "http://x",
        r"spec\.teacher\.endpoint: only used by backend openai, not simulated",
    ),
    ("teacher.path", "r.jsonl", r"spec\.teacher\.path: only used by backend replay"),
    ("teacher.dataset", DELETE, r"spec\.teacher\.dataset: required for backend simulated"),
    ("teacher.dataset", "gold.txt", r"spec\.teacher\.dataset: must be a \.csv"),
    ("teacher.temperature", 0.5, r"spec\.teacher\.temperature: unknown field"),
    ("student.lora_r", 0, r"spec\.student\.lora_r: "),
    ("student.base_model", "gpt2", r"spec\.student\.base_model: "),
    ("student.learning_rate", "fast", r"spec\.student\.learning_rate: "),
    (
        "student.confidence_threshold",
        1.5,
        r"spec\.student\.confidence_threshold: must be in \[0, 1\]",
    ),
    ("student.dropout", 0.1, r"spec\.student\.dropout: unknown field"),
    ("data", DELETE, r"spec\.data: required"),
    ("data.unlabeled", DELETE, r"spec\.data: needs seed_pairs or unlabeled"),
    ("data.holdout", "data/missing.csv", r"spec\.data\.holdout: file not found: "),
    (
        "data.holdout",
        "data/test.txt",
        r"spec\.data\.holdout: must be a \.csv, \.jsonl, \.ndjson file",
    ),
    ("data.holdout", 5, r"spec\.data\.holdout: must be a path"),
    ("data.text_column", "", r"spec\.data\.text_column: must not be empty"),
    ("data.limit_per_label", 0, r"spec\.data\.limit_per_label: must be >= 1"),
    ("data.labels", ["zzz"], r"spec\.data\.labels: 'zzz' is not in spec\.labels"),
    ("budget.max_teacher_calls", 0, r"spec\.budget\.max_teacher_calls: must be >= 1"),
    (
        "budget.price_per_1k_input_tokens",
        -1,
        r"spec\.budget\.price_per_1k_input_tokens: must be in",
    ),
    (
        "budget.price_per_1k_output_tokens",
        "free",
        r"spec\.budget\.price_per_1k_output_tokens: must be a number",
    ),
    ("budget.currency", "EUR", r"spec\.budget\.currency: unknown field"),
]


@pytest.mark.parametrize(
    ("dotted", "value", "message"), BAD, ids=[f"{b[0]}={b[1]!r}"[:40] for b in BAD]
)
def test_bad_field_is_named(tmp_path: Path, dotted: str, value: Any, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        load(tmp_path, mutate(base_spec(), dotted, value))


def test_backend_specific_requirements(tmp_path: Path) -> None:
    d = base_spec()
    d["teacher"] = {"backend": "openai"}
    with pytest.raises(SpecError, match=r"spec\.teacher\.model: required for backend openai"):
        load(tmp_path, d)
    d["teacher"] = {"backend": "openai", "model": "m", "endpoint": "ftp://x"}
    with pytest.raises(SpecError, match=r"spec\.teacher\.endpoint: must be an http\(s\) URL"):
        load(tmp_path, d)
    d["teacher"] = {"backend": "openai", "model": "m", "api_key_env": "not a name"}
    with pytest.raises(SpecError, match=r"spec\.teacher\.api_key_env: "):
        load(tmp_path, d)
    d["teacher"] = {"backend": "replay"}
    with pytest.raises(SpecError, match=r"spec\.teacher\.path: required for backend replay"):
        load(tmp_path, d)
    d["teacher"] = {"backend": "replay", "path": "missing.jsonl"}
    with pytest.raises(SpecError, match=r"spec\.teacher\.path: file not found"):
        load(tmp_path, d)


def test_sections_built_in_code_check_like_the_loader() -> None:
    """A section built in code goes through the same kit: the same field paths."""
    with pytest.raises(SpecError, match=r"^spec\.teacher\.model: required for backend openai$"):
        TeacherSpec(backend="openai")
    with pytest.raises(SpecError, match=r"^spec\.teacher\.k: must be >= 1, got 0$"):
        TeacherSpec(backend="openai", model="m", k=0)
    with pytest.raises(
        SpecError, match=r"^spec\.teacher\.dataset: required for backend simulated$"
    ):
        TeacherSpec(backend="simulated")
    with pytest.raises(SpecError, match=r"^spec\.budget\.currency: unknown field \(known: "):
        BudgetSpec(currency="EUR")  # type: ignore[call-arg]
    t = TeacherSpec(backend="openai", model="m")
    assert (t.k, t.min_agreement, t.endpoint) == (5, 3, "https://api.openai.com")


def test_a_backend_file_option_must_go_through_the_resolver(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backend's options may not name a file the one resolver (FILE_FIELDS) does not
    know: such a path would be read from anywhere, past the service's uploads and root."""

    @kit.section
    class FileOptions(teachers.TeacherOptions):
        notes: Annotated[Path, kit.table_path()] = field(metadata={"help": "a file"})

    monkeypatch.setitem(teachers._OPTIONS, "file-test", FileOptions)
    monkeypatch.setitem(teachers._REGISTRY, "file-test", teachers.BaseTeacher)
    d = mutate(base_spec(), "teacher", {"backend": "file-test", "notes": "data/train.csv"})
    with pytest.raises(
        SpecError, match=r"^spec\.teacher\.notes: backend file-test declares a file"
    ):
        load(tmp_path, d)


def test_two_problems_name_the_one_named_before(tmp_path: Path) -> None:
    # the cross-field rule of the recall section comes before its k, as it did
    with pytest.raises(SpecError, match=r"^spec\.recall: needs corpus"):
        load(tmp_path, mutate(base_spec(), "recall", {"k": 0}))
    # the first unknown key as written, a field a spec may not set included
    d = {**base_spec(), "colour": 1, "base_dir": "/x"}
    with pytest.raises(SpecError, match=r"^spec\.colour: unknown field"):
        load(tmp_path, d)


def test_task_type_requirements(tmp_path: Path) -> None:
    d = base_spec()
    del d["labels"]
    d["teacher"] = {"backend": "openai", "model": "m"}
    with pytest.raises(SpecError, match=r"spec\.output_schema: required for task extract"):
        load(tmp_path, {**d, "task": "extract"})
    with pytest.raises(SpecError, match=r"spec\.verifier: required for task generate"):
        load(tmp_path, {**d, "task": "generate"})
    with pytest.raises(SpecError, match=r"spec\.labels: only used by task classify"):
        load(tmp_path, {**d, "task": "generate", "labels": LABELS})
    with pytest.raises(SpecError, match=r"spec\.output_schema: must be a mapping"):
        load(tmp_path, {**d, "task": "extract", "output_schema": 3})
    with pytest.raises(SpecError, match=r"spec\.output_schema: cannot read"):
        load(tmp_path, {**d, "task": "extract", "output_schema": "nope.json"})
    with pytest.raises(SpecError, match=r"^spec\.output_schema: not a valid JSON Schema"):
        load(tmp_path, {**d, "task": "extract", "output_schema": {"type": 5}})
    with pytest.raises(SpecError, match=r"^spec\.output_schema\.type: must be \"object\""):
        load(tmp_path, {**d, "task": "extract", "output_schema": {"type": "array"}})


def test_spec_must_be_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"^spec: must be a mapping"):
        TaskSpec.from_dict(["x"], tmp_path)


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"^spec: cannot read"):
        TaskSpec.load(tmp_path / "absent.yaml")
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match=r"^spec: bad\.yaml does not parse"):
        TaskSpec.load(tmp_path / "bad.yaml")
    (tmp_path / "dup.yaml").write_text("name: a\nname: b\n")
    with pytest.raises(SpecError, match="duplicate key 'name'"):
        TaskSpec.load(tmp_path / "dup.yaml")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(SpecError, match=r"^spec: bad\.json does not parse"):
        TaskSpec.load(tmp_path / "bad.json")


def test_check_files_can_be_deferred(tmp_path: Path) -> None:
    d = mutate(base_spec(), "data.holdout", "data/later.csv")
    spec = load(tmp_path, d, check_files=False)
    with pytest.raises(SpecError, match=r"spec\.data\.holdout: file not found"):
        spec.check_files()
    with pytest.raises(SpecError, match=r"spec\.data\.holdout: cannot read"):
        spec.digest()
