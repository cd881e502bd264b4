"""The span-tagger student (``student.kind: span_tagger``): layout from the schema,
alignment and decoding (no torch), then real training of MiniLM + LoRA on the shipped
SNIPS subset (tests/data/snips: 120 training and 40 test rows), scoring, byte
reproducibility, the folder, loading and its failures.

The scored training runs ~20 s on 2 CPU cores and is shared by the module; the
reproducibility pair trains on 16 rows for one epoch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kolm_compile._train import TrainConfig
from kolm_compile._train_tagger import (
    TAGGER_DEFAULTS,
    TaggerTrainResult,
    align_spans,
    tagger_layout,
    train_span_tagger,
)
from kolm_compile.structured import canonical, field_scores, parse_object
from kolm_compile.student import DEFAULT_BASE_MODEL, TOKENIZER_FILES, resolve_base_model
from kolm_compile.tagger_student import (
    TAGGER_FILE,
    EnumHead,
    SpanTaggerStudent,
    TaggerLayout,
    decode_spans,
)
from kolm_ledger.errors import InvalidInput, SpecError

SNIPS = Path(__file__).resolve().parents[1] / "data" / "snips"
# the tagger defaults, with smaller batches and more epochs for 120 rows
CONFIG = TrainConfig(
    kind="span_tagger",
    **{**TAGGER_DEFAULTS, "epochs": 12, "batch_size": 16, "max_length": 48, "threads": 2},
)
TINY = TrainConfig(kind="span_tagger", epochs=1, batch_size=8, max_length=32, threads=2, lora_r=4)

ml = [pytest.mark.ml, pytest.mark.slow]


def _rows(split: str) -> list[dict[str, Any]]:
    with (SNIPS / f"{split}.jsonl").open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _schema() -> dict[str, Any]:
    return dict(json.loads((SNIPS / "schema.json").read_text()))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- layout (no torch)


def test_layout_of_the_snips_schema() -> None:
    layout = tagger_layout(_schema())
    spans = [f.path for f in layout.fields if f.kind == "span"]
    assert len(spans) == 35 and spans == sorted(spans)
    assert layout.tags[0] == "O" and len(layout.tags) == 1 + 2 * 35
    assert layout.tags[1:3] == ("B-/slots/album", "I-/slots/album")
    intents = ("AddToPlaylist", "BookRestaurant", "GetWeather", "PlayMusic", "RateBook")
    # /intent is required along its path: no "absent" class
    assert layout.enums == (EnumHead("/intent", intents, optional=False),)
    assert layout.enum_width == 5
    assert layout.objects == ("/slots",)
    assert layout.case_types
    assert TaggerLayout.from_bytes(layout.to_bytes()) == layout


def test_layout_optional_enum_and_nested_objects() -> None:
    schema = {
        "type": "object",
        "required": ["a"],
        "properties": {
            "a": {
                "type": "object",
                "required": ["kind", "b"],
                "properties": {
                    "kind": {"type": "string", "enum": ["x", "y"]},
                    "mood": {"type": "string", "enum": ["up", "down"]},
                    "b": {"type": "object", "properties": {"who": {"type": "string"}}},
                },
            },
            "name": {"type": "string", "x-kolm-grounded": True},
        },
        "x-kolm-grounded": True,
    }
    layout = tagger_layout(schema)
    assert layout.enums == (
        EnumHead("/a/kind", ("x", "y"), optional=False),
        EnumHead("/a/mood", ("up", "down"), optional=True),
    )
    assert layout.enum_width == 5
    assert layout.objects == ("/a", "/a/b")
    assert layout.tags == ("O", "B-/a/b/who", "I-/a/b/who", "B-/name", "I-/name")


@pytest.mark.parametrize(
    ("schema", "field"),
    [
        ({"type": "object", "properties": {"n": {"type": "integer"}}}, "/n"),
        ({"type": "object", "properties": {"s": {"type": "string"}}}, "/s"),
        (
            {
                "type": "object",
                "properties": {
                    "ok": {"type": "string", "x-kolm-grounded": True},
                    "tags": {"type": "array", "items": {"enum": ["a", "b"]}},
                },
            },
            "/tags",
        ),
        ({"type": "object"}, "/"),
    ],
)
def test_non_span_schema_is_refused_naming_the_field(schema: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecError, match=r"^spec\.student\.kind: span_tagger needs") as e:
        tagger_layout(schema)
    assert f"; {field} is " in str(e.value)
    # train_span_tagger checks the schema before loading anything
    with pytest.raises(SpecError, match=rf"; {field} is "):
        train_span_tagger(["x"], ['{"n":1}'], schema, TINY, Path("/nonexistent/never"))


def test_train_rejects_bad_data(tmp_path: Path) -> None:
    schema = _schema()
    with pytest.raises(SpecError, match=r"^kind: train_span_tagger trains kind 'span_tagger'"):
        train_span_tagger(["a"], ["{}"], schema, TrainConfig(), tmp_path)
    with pytest.raises(InvalidInput, match="texts has 2 items, outputs has 1"):
        train_span_tagger(["a", "b"], ["{}"], schema, TINY, tmp_path)
    with pytest.raises(InvalidInput, match="texts is empty"):
        train_span_tagger([], [], schema, TINY, tmp_path)


def test_layout_file_is_checked() -> None:
    good = json.loads(tagger_layout(_schema()).to_bytes())
    mutations: list[Callable[[dict[str, Any]], object]] = [
        lambda d: d.update(format=2),
        lambda d: d["tags"].pop(),
        lambda d: d["enums"][0]["classes"].reverse(),
        lambda d: d["alignment"].update(unaligned=-1),
        lambda d: d["fields"][0].update(kind="other"),
        lambda d: d.pop("objects"),
        lambda d: d.update(case_types="yes"),
    ]
    for mutate in mutations:
        bad = json.loads(json.dumps(good))
        mutate(bad)
        with pytest.raises(InvalidInput, match=r"^where/tagger\.json: malformed"):
            TaggerLayout.from_bytes(json.dumps(bad).encode(), "where/tagger.json")
    with pytest.raises(InvalidInput, match="malformed"):
        TaggerLayout.from_bytes(b"not json")


# --------------------------------------------------------------------------- alignment, decoding


TAGS = {"O": 0, "B-/a": 1, "I-/a": 2, "B-/b": 3, "I-/b": 4}


def _words(text: str) -> list[tuple[int, int]]:
    out, pos = [], 0
    for w in text.split(" "):
        out.append((pos, pos + len(w)))
        pos += len(w) + 1
    return out


def test_align_longest_first_then_case_insensitive() -> None:
    text = "play rock hits and Rock"
    # "rock" (b) is listed first, but "rock hits" (a) is placed first: b takes the last word
    labels, bad = align_spans(text, [("/b", "rock"), ("/a", "rock hits")], _words(text), TAGS)
    assert bad == 0
    assert labels == [0, 1, 2, 0, 3]
    # the same value twice takes two occurrences, in order
    text = "x and x"
    labels, bad = align_spans(text, [("/a", "x"), ("/a", "x")], _words(text), TAGS)
    assert (labels, bad) == ([1, 0, 1], 0)


def test_align_counts_unaligned_values() -> None:
    text = "book a table"
    spans = [("/a", "Zanzibar"), ("/b", "table"), ("/a", "table"), ("/a", "  ")]
    labels, bad = align_spans(text, spans, _words(text), TAGS)
    # not in the text; "table" a second time (no free occurrence); blank
    assert bad == 3
    assert labels == [0, 0, 3]
    # a value past the tagged words (cut by max_length) touches no word
    labels, bad = align_spans(text, [("/a", "table")], _words(text)[:2], TAGS)
    assert (labels, bad) == ([0, 0], 1)


def test_decode_spans_cuts_the_original_text() -> None:
    text = "Play  Nina   Simone, now"
    words = [(0, 4), (6, 10), (13, 19), (19, 20), (21, 24)]
    got = decode_spans(text, words, ["O", "B-/a", "I-/a", "O", "I-/b"])
    # the value spans the original spacing; an I after O starts a value
    assert got == {"/a": ["Nina   Simone"], "/b": ["now"]}
    got = decode_spans(text, words, ["B-/a", "I-/b", "I-/b", "B-/b", "I-/a"])
    assert got == {"/a": ["Play", "now"], "/b": ["Nina   Simone", ","]}
    assert decode_spans(text, words[:2], ["I-/a", "I-/a", "B-/a"]) == {"/a": ["Play  Nina"]}
    assert decode_spans("", [], []) == {}


def test_viterbi_keeps_to_valid_bio_sequences() -> None:
    torch = pytest.importorskip("torch")
    from kolm_compile.tagger_student import transitions, viterbi

    tags = ["O", "B-/a", "I-/a", "B-/b", "I-/b"]
    start, trans = transitions(tags)
    assert start.tolist() == [True, True, False, True, False]
    assert trans[1, 2] and trans[2, 2] and not trans[0, 2] and not trans[3, 2]
    # one field's values are never adjacent words; another field's may be
    assert not trans[1, 1] and not trans[2, 1] and trans[2, 3] and trans[0, 1]

    def probs(*rows: list[float]) -> Any:
        return torch.tensor(rows)

    # arg-max would say I-/a first and B-/a twice in a row; the best valid path differs
    p = probs(
        [0.1, 0.4, 0.5, 0.0, 0.0],
        [0.0, 0.6, 0.4, 0.0, 0.0],
        [0.5, 0.1, 0.0, 0.0, 0.4],
    )
    assert p.argmax(dim=-1).tolist() == [2, 1, 0]
    assert viterbi(p, start, trans) == [1, 2, 0]
    assert viterbi(probs([0.2, 0.1, 0.7, 0.0, 0.0]), start, trans) == [0]


def test_words_and_case_marks() -> None:
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    from kolm_compile.tagger_student import encode_words

    tok = AutoTokenizer.from_pretrained(str(resolve_base_model(DEFAULT_BASE_MODEL)))
    text = "Play Nina   Simone's ÉPOPÉE, now"
    (enc,) = encode_words(tok, [text], 64)
    assert [text[a:b] for a, b in enc.words] == [
        "Play",
        "Nina",
        "Simone",
        "'",
        "s",
        "ÉPOPÉE",
        ",",
        "now",
    ]
    assert len(enc.ids) == len(enc.first) == len(enc.cased)
    assert enc.first[0] == enc.first[-1] == -1  # [CLS], [SEP]
    assert [w for w in enc.first if w >= 0] == list(range(8))
    firsts = [t for t, w in enumerate(enc.first) if w >= 0]
    assert [enc.cased[t] for t in firsts] == [1, 1, 1, 0, 0, 1, 0, 0]
    (cut,) = encode_words(tok, [text], 4)  # [CLS] + 2 tokens + [SEP]
    assert [text[a:b] for a, b in cut.words] == ["Play", "Nina"]


def test_import_is_cheap() -> None:
    code = (
        "import sys, kolm_compile._train_tagger, kolm_compile.tagger_student\n"
        "heavy = {'torch', 'transformers', 'peft'} & set(sys.modules)\n"
        "assert not heavy, heavy"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


def test_defaults_are_a_valid_config() -> None:
    cfg = TrainConfig(kind="span_tagger", **TAGGER_DEFAULTS)
    assert cfg.kind == "span_tagger"


# --------------------------------------------------------------------------- ML


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> TaggerTrainResult:
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    rows = _rows("train")
    return train_span_tagger(
        [r["text"] for r in rows],
        [canonical(r["output"]) for r in rows],
        _schema(),
        CONFIG,
        tmp_path_factory.mktemp("tagger") / "adapter",
    )


def _tiny_rows() -> tuple[list[str], list[str]]:
    rows = _rows("train")[:16]
    texts = [r["text"] for r in rows]
    outs = [r["output"] for r in rows]
    # a value the text does not hold: counted, skipped, no crash
    outs[0] = {**outs[0], "slots": {**outs[0]["slots"], "city": ["Zanzibar"]}}
    return texts, [canonical(o) for o in outs]


@pytest.fixture(scope="module")
def train_tiny() -> Callable[..., TaggerTrainResult]:
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    texts, outs = _tiny_rows()

    def run(out: Path, config: TrainConfig = TINY, **kw: Any) -> TaggerTrainResult:
        return train_span_tagger(texts, outs, _schema(), config, out, **kw)

    return run


@pytest.mark.ml
@pytest.mark.slow
def test_learning_happened_and_outputs_are_grounded_valid_frames(
    trained: TaggerTrainResult,
) -> None:
    from jsonschema import Draft202012Validator

    schema = _schema()
    test = _rows("test")
    assert trained.steps == len(trained.losses) == 12 * 8
    assert trained.unaligned == 0 and trained.values > 300
    k = 8
    assert sum(trained.losses[-k:]) < 0.2 * sum(trained.losses[:k]), trained.losses
    assert isinstance(trained.student, SpanTaggerStudent)
    texts = [r["text"] for r in test]
    preds = trained.student.predict(texts)
    validator = Draft202012Validator(schema)
    objs = []
    for text, (out, conf) in zip(texts, preds, strict=True):
        obj = parse_object(out)
        assert out == canonical(obj)
        assert validator.is_valid(obj), (text, out)
        assert 0.0 < conf <= 1.0
        for values in obj["slots"].values():
            for v in values:
                assert v and v in text, (v, text)
        objs.append(obj)
    golds = [r["output"] for r in test]
    intent = sum(o["intent"] == g["intent"] for o, g in zip(objs, golds, strict=True)) / len(test)
    _, slots = field_scores(golds, objs, prefix="/slots/")
    exact = sum(canonical(o) == canonical(g) for o, g in zip(objs, golds, strict=True))
    # measured at this setting: intent 0.975, slot F1 0.69, exact 15/40; chance intent 0.2,
    # a tagger that tags nothing has F1 0 and exact 0
    assert intent >= 0.8, intent
    assert slots.f1 >= 0.45, slots
    assert exact >= 6, exact


@pytest.mark.ml
@pytest.mark.slow
def test_folder_is_self_contained_and_path_free(trained: TaggerTrainResult) -> None:
    from safetensors import safe_open

    d = trained.adapter_dir
    assert sorted(p.name for p in d.iterdir()) == sorted(
        [
            "adapter_config.json",
            "adapter_model.safetensors",
            TAGGER_FILE,
            "train_config.json",
            *TOKENIZER_FILES,
        ]
    )
    cfg = json.loads((d / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == DEFAULT_BASE_MODEL
    assert cfg["target_modules"] == ["dense", "key", "query", "value"]
    assert cfg["modules_to_save"] == ["enum_head", "tag_head", "token_type_embeddings"]
    assert list(cfg) == sorted(cfg)
    assert TrainConfig.from_dict(json.loads((d / "train_config.json").read_text())) == CONFIG
    layout = TaggerLayout.from_bytes((d / TAGGER_FILE).read_bytes())
    assert layout.values == trained.values and layout.unaligned == 0
    assert list(layout.tags) == trained.labels
    base = str(resolve_base_model(DEFAULT_BASE_MODEL))
    for f in d.iterdir():
        data = f.read_bytes()
        assert base.encode() not in data, f.name
        assert str(d).encode() not in data, f.name
        assert b"site-packages" not in data, f.name
    with safe_open(str(d / "adapter_model.safetensors"), "pt") as st:
        assert st.metadata() == {"format": "pt"}
        keys = list(st.keys())
    assert any("lora_A" in k for k in keys)
    assert any(k.endswith("tag_head.weight") for k in keys)
    assert any(k.endswith("enum_head.weight") for k in keys)
    assert any("token_type_embeddings" in k for k in keys)


@pytest.mark.ml
@pytest.mark.slow
def test_load_round_trip_and_batching(trained: TaggerTrainResult) -> None:
    texts = [r["text"] for r in _rows("test")]
    assert trained.student is not None
    in_memory = trained.student.predict(texts)
    loaded = SpanTaggerStudent.load(trained.adapter_dir, threads=2)
    assert loaded.kind == "span_tagger" and loaded.labels is None
    assert loaded.dtype == "float32"
    assert loaded.predict(texts) == in_memory
    assert loaded.predict([]) == []
    # batch size changes the padding, not the answer
    for bs in (1, 7):
        again = loaded.predict(texts, batch_size=bs)
        assert [o for o, _ in again] == [o for o, _ in in_memory]
        assert all(abs(a - b) < 1e-4 for (_, a), (_, b) in zip(again, in_memory, strict=True))
    # an empty text is an input like any other: the required frame, nothing else guessed
    ((out, conf),) = loaded.predict([""])
    assert set(parse_object(out)) == {"intent", "slots"} and 0 < conf <= 1
    with pytest.raises(InvalidInput, match=r"texts\[1\] is int"):
        loaded.predict(["a", 3])  # type: ignore[list-item]
    with pytest.raises(InvalidInput, match="batch_size is 0"):
        loaded.predict(["a"], batch_size=0)


@pytest.mark.ml
@pytest.mark.slow
def test_embed(trained: TaggerTrainResult) -> None:
    import numpy as np

    assert trained.student is not None
    texts = ["play some jazz", "play some blues", "will it rain in Paris tomorrow"]
    vecs = trained.student.embed(texts)
    assert vecs.shape == (3, 384) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    sims = vecs @ vecs.T
    assert sims[0, 1] > sims[0, 2]
    assert trained.student.embed([]).shape == (0, 384)


@pytest.mark.ml
@pytest.mark.slow
def test_same_seed_same_bytes_and_unaligned_counted(
    train_tiny: Callable[..., TaggerTrainResult], tmp_path: Path
) -> None:
    import torch

    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.manual_seed(1234)
    rng = torch.get_rng_state()
    a = train_tiny(tmp_path / "a")
    # the caller's torch state is left as it was
    assert torch.equal(torch.get_rng_state(), rng)
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == (threads, det)
    b = train_tiny(tmp_path / "b")
    assert a.losses == b.losses
    for f in a.adapter_dir.iterdir():
        assert _sha(f) == _sha(b.adapter_dir / f.name), f.name
    assert a.unaligned == 1
    assert TaggerLayout.from_bytes((a.adapter_dir / TAGGER_FILE).read_bytes()).unaligned == 1

    other = train_tiny(tmp_path / "c", TrainConfig(**{**TINY.to_dict(), "seed": 1}))
    assert _sha(other.adapter_dir / "adapter_model.safetensors") != _sha(
        a.adapter_dir / "adapter_model.safetensors"
    )


@pytest.mark.ml
@pytest.mark.slow
def test_progress_and_stop(train_tiny: Callable[..., TaggerTrainResult], tmp_path: Path) -> None:
    seen: list[tuple[int, int, float]] = []

    def progress(step: int, total: int, loss: float) -> None:
        seen.append((step, total, loss))

    with pytest.raises(InterruptedError, match="stopped at step 1 of 2"):
        train_tiny(tmp_path, progress=progress, should_stop=lambda: len(seen) >= 1)
    assert [(s, t) for s, t, _ in seen] == [(1, 2)]
    assert not (tmp_path / "adapter_model.safetensors").exists()


@pytest.mark.ml
@pytest.mark.slow
def test_optional_enum_and_single_span(tmp_path: Path) -> None:
    pytest.importorskip("peft")
    schema = {
        "type": "object",
        "properties": {
            "mood": {"type": "string", "enum": ["happy", "sad"]},
            "name": {"type": "string", "x-kolm-grounded": True},
        },
    }
    names = ["Ada", "Bo", "Cy", "Di"]
    texts, outs = [], []
    for i in range(24):
        n = names[i % 4]
        if i % 3 == 0:
            texts.append(f"{n} is happy")
            outs.append({"mood": "happy", "name": n})
        elif i % 3 == 1:
            texts.append(f"{n} is sad")
            outs.append({"mood": "sad", "name": n})
        else:
            texts.append(f"{n} went home")
            outs.append({"name": n})
    cfg = TrainConfig(kind="span_tagger", epochs=8, batch_size=8, max_length=16, threads=2)
    res = train_span_tagger(texts, [canonical(o) for o in outs], schema, cfg, tmp_path / "t")
    layout = TaggerLayout.from_bytes((res.adapter_dir / TAGGER_FILE).read_bytes())
    assert layout.enums == (EnumHead("/mood", ("happy", "sad"), optional=True),)
    assert layout.objects == ()
    loaded = SpanTaggerStudent.load(res.adapter_dir)
    preds = [parse_object(o) for o, _ in loaded.predict(texts)]
    assert all(not isinstance(p.get("name"), list) for p in preds)  # a single value
    right = sum(p == o for p, o in zip(preds, outs, strict=True))
    assert right >= 18, preds
    # "absent" is learned: some frames have no mood
    assert any("mood" not in p for p in preds)


@pytest.mark.ml
@pytest.mark.slow
def test_train_rejects_outputs_outside_the_schema(tmp_path: Path) -> None:
    pytest.importorskip("peft")
    schema = _schema()
    good = '{"intent":"PlayMusic","slots":{}}'
    for bad, msg in (
        ("not json", r"outputs\[1\]: not JSON"),
        ('{"intent":"Dance","slots":{}}', r"outputs\[1\]: /intent is 'Dance'"),
        ('{"intent":"PlayMusic","mood":"x"}', r"outputs\[1\]: '/mood' is not a field"),
        ('{"intent":"PlayMusic","slots":{"year":[1999]}}', r"outputs\[1\]: /slots/year holds"),
    ):
        with pytest.raises(InvalidInput, match=msg):
            train_span_tagger(["play", "play"], [good, bad], schema, TINY, tmp_path)


@pytest.mark.ml
@pytest.mark.slow
def test_load_rejects_missing_and_malformed_files(
    trained: TaggerTrainResult, tmp_path: Path
) -> None:
    src = trained.adapter_dir
    for name in ("tagger.json", "adapter_model.safetensors", "train_config.json"):
        bad = tmp_path / f"no-{name}"
        shutil.copytree(src, bad)
        (bad / name).unlink()
        with pytest.raises(InvalidInput, match=f"has no {re.escape(name)}"):
            SpanTaggerStudent.load(bad)

    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    layout = json.loads((src / TAGGER_FILE).read_text())
    # one span field fewer: 2 tags fewer than the saved head has
    layout["fields"] = [f for f in layout["fields"] if f["path"] != "/slots/year"]
    layout["tags"] = [t for t in layout["tags"] if not t.endswith("-/slots/year")]
    (bad / TAGGER_FILE).write_text(json.dumps(layout))
    with pytest.raises(InvalidInput, match=r"tag_head has 71 outputs, tagger\.json wants 69"):
        SpanTaggerStudent.load(bad)
    (bad / TAGGER_FILE).write_text("{}")
    with pytest.raises(InvalidInput, match=r"tagger\.json: malformed"):
        SpanTaggerStudent.load(bad)
    shutil.copy(src / TAGGER_FILE, bad / TAGGER_FILE)
    (bad / "train_config.json").write_text('{"kind": "classifier", "max_length": 64}')
    with pytest.raises(InvalidInput, match=r"train_config\.json: malformed: kind is 'classifier'"):
        SpanTaggerStudent.load(bad)
    shutil.copy(src / "train_config.json", bad / "train_config.json")
    (bad / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(InvalidInput, match=r"adapter_model\.safetensors"):
        SpanTaggerStudent.load(bad)
