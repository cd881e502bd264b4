"""Student training: config validation, learning, reproducibility, load round trip.

The ML tests train MiniLM with LoRA on 4 Banking77 labels x 16 examples (16
steps, a few seconds on 2 CPU cores; the sample in tests/data/banking77) and share one
trained adapter.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.data import banking77

from kolm_compile._train import TrainConfig, TrainResult, train_classifier
from kolm_compile.student import DEFAULT_BASE_MODEL, TOKENIZER_FILES, resolve_base_model
from kolm_ledger.errors import InvalidInput, SpecError

LABELS = ["card_arrival", "exchange_rate", "lost_or_stolen_card", "top_up_failed"]
PER_LABEL = 16
# threads=1: with 2 OpenMP threads, a busy neighbour process on a 2-core runner makes
# torch's spinning barriers many times slower; one thread is immune and only ~1.4x slower.
CONFIG = TrainConfig(epochs=4, batch_size=16, max_length=32, seed=0, threads=1)

ml = [pytest.mark.ml, pytest.mark.slow]


# --------------------------------------------------------------------------- config (no torch)


def test_config_defaults_and_dict_are_sorted() -> None:
    c = TrainConfig()
    d = c.to_dict()
    assert list(d) == sorted(d)
    assert d["base_model"] == DEFAULT_BASE_MODEL
    assert d["target_modules"] == ["query", "value"]
    assert d["lora_dropout"] == 0.0
    assert TrainConfig.from_dict(json.loads(c.to_json())) == c
    assert c.to_json() == json.dumps(d, sort_keys=True, separators=(",", ":")).encode()


def test_config_every_field_has_help() -> None:
    helps = TrainConfig.help()
    assert set(helps) == set(TrainConfig().to_dict())
    assert all(h.strip() for h in helps.values())


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("base_model", "/abs/path/to/model"),
        ("lora_r", 0),
        ("lora_r", True),
        ("lora_alpha", 0),
        ("lora_dropout", 1.0),
        ("lora_dropout", float("nan")),
        ("target_modules", ()),
        ("target_modules", ("query", "query")),
        ("target_modules", ("query", "")),
        ("learning_rate", 0.0),
        ("learning_rate", float("inf")),
        ("epochs", 0),
        ("epochs", 1.5),
        ("batch_size", 0),
        ("max_length", 2),
        ("max_length", 513),
        ("seed", -1),
        ("threads", 0),
        ("weight_decay", -0.1),
        ("warmup_ratio", 1.0),
    ],
)
def test_config_rejects(field: str, value: object) -> None:
    with pytest.raises(SpecError, match=rf"^{field}: "):
        TrainConfig(**{field: value})  # type: ignore[arg-type]


def test_config_int_and_float_serialize_alike() -> None:
    a = TrainConfig(weight_decay=0, learning_rate=1, warmup_ratio=0, lora_dropout=0)
    b = TrainConfig(weight_decay=0.0, learning_rate=1.0, warmup_ratio=0.0, lora_dropout=0.0)
    assert a == b and a.to_json() == b.to_json()
    assert isinstance(a.learning_rate, float)


def test_config_from_dict_rejects_unknown_and_accepts_lists() -> None:
    with pytest.raises(SpecError, match=r"^lr: unknown"):
        TrainConfig.from_dict({"lr": 0.1})
    c = TrainConfig.from_dict({"target_modules": ["query", "key", "value"]})
    assert c.target_modules == ("query", "key", "value")
    assert hash(c) == hash(TrainConfig(target_modules=("query", "key", "value")))


def test_resolve_base_model() -> None:
    with pytest.raises(SpecError, match=r"^base_model: unknown model 'nope/nope'"):
        resolve_base_model("nope/nope")
    path = resolve_base_model(DEFAULT_BASE_MODEL)
    assert path.is_absolute() and (path / "config.json").is_file()


def test_import_is_cheap() -> None:
    code = (
        "import sys, kolm_compile._train, kolm_compile.student, kolm_compile.kscore\n"
        "heavy = {'torch', 'transformers', 'peft'} & set(sys.modules)\n"
        "assert not heavy, heavy"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


def test_train_rejects_bad_data(tmp_path: Path) -> None:
    # Checked before any model is loaded, so no [ml] extra needed.
    with pytest.raises(InvalidInput, match="texts has 2 items, labels has 1"):
        train_classifier(["a", "b"], ["x"], ["x", "y"], CONFIG, tmp_path)
    with pytest.raises(InvalidInput, match="texts is empty"):
        train_classifier([], [], ["x", "y"], CONFIG, tmp_path)
    with pytest.raises(InvalidInput, match=r"labels\[1\] is 'z'"):
        train_classifier(["a", "b"], ["x", "z"], ["x", "y"], CONFIG, tmp_path)
    with pytest.raises(SpecError, match=r"^labels: want at least 2"):
        train_classifier(["a"], ["x"], ["x"], CONFIG, tmp_path)
    with pytest.raises(SpecError, match=r"^labels: label set has duplicates"):
        train_classifier(["a"], ["x"], ["x", "x"], CONFIG, tmp_path)


# --------------------------------------------------------------------------- ML


@dataclass
class Subset:
    train_texts: list[str]
    train_labels: list[str]
    test_texts: list[str]
    test_labels: list[str]


@pytest.fixture(scope="module")
def subset() -> Subset:
    train: list[tuple[str, str]] = []
    for label in LABELS:
        train += [row for row in banking77("train") if row[1] == label][:PER_LABEL]
    test = [row for row in banking77("test") if row[1] in LABELS]
    assert len(train) == PER_LABEL * len(LABELS) and len(test) == 40 * len(LABELS)
    return Subset(
        [x for x, _ in train], [y for _, y in train], [x for x, _ in test], [y for _, y in test]
    )


@pytest.fixture(scope="module")
def train(subset: Subset) -> Callable[..., TrainResult]:
    pytest.importorskip("torch")
    pytest.importorskip("peft")

    def run(out: Path, config: TrainConfig = CONFIG, **kw: object) -> TrainResult:
        return train_classifier(
            subset.train_texts,
            subset.train_labels,
            LABELS,
            config,
            out,
            **kw,  # type: ignore[arg-type]
        )

    return run


@pytest.fixture(scope="module")
def trained(
    train: Callable[..., TrainResult], tmp_path_factory: pytest.TempPathFactory
) -> TrainResult:
    return train(tmp_path_factory.mktemp("adapter") / "a")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.ml
@pytest.mark.slow
def test_learning_happened(trained: TrainResult, subset: Subset) -> None:
    assert trained.steps == len(trained.losses) == 4 * (len(subset.train_texts) // 16)
    k = 4
    first, last = trained.losses[:k], trained.losses[-k:]
    assert sum(last) / k < 0.5 * sum(first) / k, trained.losses
    assert trained.student is not None
    preds = trained.student.predict(subset.test_texts)
    accuracy = sum(p == y for (p, _), y in zip(preds, subset.test_labels, strict=True)) / len(preds)
    assert accuracy > 0.7, accuracy  # chance is 0.25
    assert all(0.0 < conf <= 1.0 for _, conf in preds)
    assert {p for p, _ in preds} <= set(LABELS)


@pytest.mark.ml
@pytest.mark.slow
def test_artifact_is_self_contained_and_path_free(trained: TrainResult) -> None:
    from safetensors import safe_open

    d = trained.adapter_dir
    assert sorted(p.name for p in d.iterdir()) == sorted(
        [
            "adapter_config.json",
            "adapter_model.safetensors",
            "labels.json",
            "train_config.json",
            *TOKENIZER_FILES,
        ]
    )
    cfg = json.loads((d / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == DEFAULT_BASE_MODEL
    assert cfg["target_modules"] == ["query", "value"]
    assert set(cfg["modules_to_save"]) >= {"classifier", "pooler"}
    assert list(cfg) == sorted(cfg)
    assert json.loads((d / "labels.json").read_text()) == LABELS
    assert trained.labels == LABELS
    assert TrainConfig.from_dict(json.loads((d / "train_config.json").read_text())) == CONFIG
    base = str(resolve_base_model(DEFAULT_BASE_MODEL))
    for f in d.iterdir():
        text = f.read_bytes()
        assert base.encode() not in text, f.name
        assert str(d).encode() not in text, f.name
        assert b"site-packages" not in text, f.name
    with safe_open(str(d / "adapter_model.safetensors"), "pt") as st:
        assert st.metadata() == {"format": "pt"}
        keys = list(st.keys())
    assert any("lora_A" in k for k in keys)
    assert any("pooler" in k for k in keys) and any("classifier" in k for k in keys)


@pytest.mark.ml
@pytest.mark.slow
def test_same_seed_same_bytes_other_seed_other_bytes(
    trained: TrainResult, train: Callable[..., TrainResult], tmp_path: Path
) -> None:
    import torch

    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.manual_seed(1234)
    rng = torch.get_rng_state()
    again = train(tmp_path / "again")
    # the caller's torch state is left as it was
    assert torch.equal(torch.get_rng_state(), rng)
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == (threads, det)

    assert again.losses == trained.losses
    for name in ("adapter_model.safetensors", "adapter_config.json", "labels.json"):
        assert _sha(again.adapter_dir / name) == _sha(trained.adapter_dir / name), name

    other = train(tmp_path / "other", TrainConfig(**{**CONFIG.to_dict(), "seed": 1}))
    assert _sha(other.adapter_dir / "adapter_model.safetensors") != _sha(
        trained.adapter_dir / "adapter_model.safetensors"
    )


@pytest.mark.ml
@pytest.mark.slow
def test_load_round_trip(trained: TrainResult, subset: Subset) -> None:
    from kolm_compile.student import Student

    assert trained.student is not None
    texts = subset.test_texts[:48]
    in_memory = trained.student.predict(texts)
    loaded = Student.load(trained.adapter_dir)
    assert loaded.labels == LABELS
    assert loaded.predict(texts) == in_memory
    explicit = Student.load(
        trained.adapter_dir, base_model_path=resolve_base_model(DEFAULT_BASE_MODEL)
    )
    # the same inputs in the same batches give the same floats; a different batch (here
    # 4 texts, not the first 32) pads differently and may move the 7th decimal
    assert explicit.predict(texts[:4]) == loaded.predict(texts[:4])
    assert [p for p, _ in explicit.predict(texts[:4])] == [p for p, _ in in_memory[:4]]
    assert loaded.predict([]) == []
    # batch size changes the padding, not the answer
    again = loaded.predict(texts, batch_size=5)
    assert [p for p, _ in again] == [p for p, _ in in_memory]
    assert all(abs(a - b) < 1e-4 for (_, a), (_, b) in zip(again, in_memory, strict=True))


@pytest.mark.ml
@pytest.mark.slow
def test_load_rejects_incomplete_dir(tmp_path: Path) -> None:
    pytest.importorskip("peft")
    from kolm_compile.student import Student

    with pytest.raises(InvalidInput, match=r"has no adapter_config\.json"):
        Student.load(tmp_path)


@pytest.mark.ml
@pytest.mark.slow
def test_load_rejects_head_label_mismatch(trained: TrainResult, tmp_path: Path) -> None:
    from kolm_compile.student import Student

    bad = tmp_path / "bad"
    shutil.copytree(trained.adapter_dir, bad)
    (bad / "labels.json").write_text(json.dumps(LABELS[:3]))
    with pytest.raises(InvalidInput, match=r"classifier has 4 outputs, labels\.json has 3"):
        Student.load(bad)
    (bad / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(InvalidInput, match=r"adapter_model\.safetensors"):
        Student.load(bad)


@pytest.mark.ml
@pytest.mark.slow
def test_embeddings(trained: TrainResult) -> None:
    import numpy as np

    from kolm_compile.student import embed_texts

    texts = [
        "my card has not arrived yet",
        "when will my card arrive?",
        "what is the exchange rate",
    ]
    assert trained.student is not None
    for vecs in (trained.student.embed(texts), embed_texts(texts)):
        assert vecs.shape == (3, 384) and vecs.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
        sims = vecs @ vecs.T
        assert sims[0, 1] > sims[0, 2]
    base = embed_texts(texts)
    np.testing.assert_allclose(embed_texts(texts[::-1])[::-1], base, atol=1e-6)
    assert embed_texts([]).shape == (0, 384)
    assert not np.allclose(trained.student.embed(texts), base, atol=1e-3)  # LoRA changes it


@pytest.mark.ml
@pytest.mark.slow
def test_progress_and_stop(train: Callable[..., TrainResult], tmp_path: Path) -> None:
    seen: list[tuple[int, int, float]] = []

    def progress(step: int, total: int, loss: float) -> None:
        seen.append((step, total, loss))

    with pytest.raises(InterruptedError, match="stopped at step 2 of 16"):
        train(tmp_path, progress=progress, should_stop=lambda: len(seen) >= 2)
    assert [(s, t) for s, t, _ in seen] == [(1, 16), (2, 16)]
    assert all(loss > 0 for _, _, loss in seen)
    assert not (tmp_path / "adapter_model.safetensors").exists()
