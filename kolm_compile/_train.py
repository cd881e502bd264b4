"""Student training: LoRA fine-tuning of a small encoder into a text classifier.

This is the "LoRA train" stage of a compile job. It writes the adapter folder that the
runtime student (:mod:`kolm_compile.student`, public: the evaluate stage, the inference
engine and an auditor's re-execution load students through it) reads::

    from pathlib import Path
    from kolm_compile._train import TrainConfig, train_classifier
    from kolm_compile.student import Student

    result = train_classifier(texts, labels, label_set, TrainConfig(), Path("out/adapter"))
    student = Student.load(result.adapter_dir)
    student.predict(["where is my card?"])   # [("card_arrival", 0.97)]

Heavy libraries (torch, transformers, peft) are imported inside the functions
that need them, so importing this module is cheap and an auditor's install of
``kolm`` (no ``[ml]`` extra) can still import the config types.

Reproducibility: on CPU, at a fixed seed and a fixed thread count, training is
byte-for-byte reproducible (the saved ``adapter_model.safetensors`` is
identical across runs). What makes it so:

1. the global torch RNG is seeded *before* the model is built (the classifier
   head and the LoRA ``A`` matrices are randomly initialised) and is forked, so
   the caller's RNG state is left as it was;
2. ``torch.use_deterministic_algorithms(True)`` and ``torch.set_num_threads``
   for the duration of training (both restored afterwards);
3. the data order comes from a ``torch.Generator`` seeded with the same seed;
4. dropout masks come from the seeded global RNG; LoRA dropout defaults to 0;
5. the saved files hold no timestamps and no paths: ``adapter_config.json`` is
   rewritten with sorted keys, sorted module lists and the *logical* base model
   id instead of the absolute path peft writes.

The global RNG is process-wide: another thread drawing torch random numbers
while a job trains breaks (3)/(4). The compile service runs one training at a
time in its worker, which is what this assumes.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

from pydantic import PlainValidator

from kolm_ledger.errors import InvalidInput, SpecError

from ._ml import train_steps, training_scope
from .fields import Section, integer, invalid, number, section
from .student import (
    ADAPTER_CONFIG_FILE,
    DEFAULT_BASE_MODEL,
    LABELS_FILE,
    TOKENIZER_FILES,
    TRAIN_CONFIG_FILE,
    Student,
    base_model_ids,
    collate,
    encode,
    prepare_ml_env,
    resolve_base_model,
)

if TYPE_CHECKING:
    from .lm_student import CausalLMStudent

__all__ = [
    "MODULES_TO_SAVE",
    "STUDENT_KINDS",
    "TrainConfig",
    "TrainResult",
    "train_classifier",
]

# The classifier head is new, and the BERT CLS pooler of a sentence-transformers
# checkpoint was never trained (the checkpoint was trained with mean pooling):
# with the pooler frozen, Banking77 accuracy stalls below 80%; training it with
# the head reaches 92%. So both are fully trained and saved with the adapter.
MODULES_TO_SAVE = ("classifier", "pooler")


# --------------------------------------------------------------------------- config


def _help(text: str) -> dict[str, str]:
    return {"help": text}


def _check_base_model(v: Any) -> str:
    ids = base_model_ids()
    if not isinstance(v, str) or v not in ids:
        invalid(f"must be one of {', '.join(ids)}, got {v!r}")
    return v


#: the student kinds a train config may name (kolm_compile.student.Student.load dispatches)
STUDENT_KINDS = ("classifier", "causal_lm", "span_tagger")


def _check_kind(v: Any) -> str:
    if not isinstance(v, str) or v not in STUDENT_KINDS:
        invalid(f"must be one of {', '.join(STUDENT_KINDS)}, got {v!r}")
    return v


def _check_modules(v: Any) -> tuple[str, ...]:
    tm = tuple(v) if isinstance(v, list) else v  # a list: from JSON
    if (
        not isinstance(tm, tuple)
        or not tm
        or not all(isinstance(m, str) and m for m in tm)
        or len(set(tm)) != len(tm)
    ):
        invalid(f"must be a non-empty tuple of distinct module names, got {v!r}")
    return tm


@section
class TrainConfig(Section):
    """Hyper-parameters of the LoRA training stage.

    Validated on construction (:class:`SpecError` naming the field; the one validation
    kit, kolm_compile.fields). The defaults reach 92% on the full Banking77 test set in
    ~8 min on 2 CPU cores. ``to_dict``/``to_json`` are deterministic (sorted keys), so
    their digest can be recorded in receipts; numbers are floats where a float is meant,
    so ``0`` and ``0.0`` serialize alike.
    """

    PATH: ClassVar[str] = ""
    UNKNOWN: ClassVar[str] = "unknown training option"

    kind: Annotated[str, PlainValidator(_check_kind)] = field(
        default="classifier",
        metadata=_help(
            "the student: classifier (encoder + head), causal_lm (generative), span_tagger "
            "(encoder + BIO tags + enum heads); the runtime loader dispatches on it"
        ),
    )
    max_new_tokens: Annotated[int, integer(1, 4096)] = field(
        default=64, metadata=_help("causal_lm: the most tokens one output may have")
    )
    base_model: Annotated[str, PlainValidator(_check_base_model)] = field(
        default=DEFAULT_BASE_MODEL,
        metadata=_help("logical id of the base encoder (see register_base_model); never a path"),
    )
    lora_r: Annotated[int, integer(1)] = field(default=16, metadata=_help("LoRA rank"))
    lora_alpha: Annotated[int, integer(1)] = field(
        default=32, metadata=_help("LoRA scaling numerator (scale = alpha/r)")
    )
    lora_dropout: Annotated[float, number(0.0, 1.0, hi_open=True)] = field(
        default=0.0,
        metadata=_help(
            "dropout on the LoRA input; 0 by default: a LoRA-only dropout adds little on these "
            "data sizes and every random draw is one more thing that must replay exactly"
        ),
    )
    target_modules: Annotated[tuple[str, ...], PlainValidator(_check_modules)] = field(
        default=("query", "value"),
        metadata=_help("names of the linear layers that get LoRA adapters"),
    )
    learning_rate: Annotated[float, number(0.0, 1.0, lo_open=True)] = field(
        default=3e-3, metadata=_help("peak AdamW learning rate (linear warmup, linear decay to 0)")
    )
    epochs: Annotated[int, integer(1, 1000)] = field(
        default=2, metadata=_help("passes over the training set")
    )
    batch_size: Annotated[int, integer(1, 4096)] = field(
        default=32, metadata=_help("examples per optimizer step")
    )
    max_length: Annotated[int, integer(4, 512)] = field(
        default=64, metadata=_help("token limit per text (longer is cut)")
    )
    seed: Annotated[int, integer(0, 2**63 - 1)] = field(
        default=0, metadata=_help("seeds initialisation, dropout and data order")
    )
    threads: Annotated[int, integer(1, 256)] = field(
        default=2, metadata=_help("torch CPU threads; part of the reproducibility contract")
    )
    weight_decay: Annotated[float, number(0.0)] = field(
        default=0.0, metadata=_help("AdamW decoupled weight decay")
    )
    warmup_ratio: Annotated[float, number(0.0, 1.0, hi_open=True)] = field(
        default=0.0, metadata=_help("fraction of steps with linear learning-rate warmup")
    )

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as JSON-ready values, keys sorted."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["target_modules"] = list(self.target_modules)
        return dict(sorted(out.items()))

    def to_json(self) -> bytes:
        """Canonical JSON bytes (sorted keys, no whitespace): what a digest covers."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`SpecError`."""
        return cls(**dict(data))


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train_classifier` (or :func:`kolm_compile._train_lm.train_causal_lm`:
    ``labels`` empty, ``student`` a :class:`~kolm_compile.lm_student.CausalLMStudent`)
    produced.

    ``adapter_dir`` is self-contained apart from the base weights: adapter
    weights and sanitized config, ``labels.json`` (the ordered label list:
    class index i is ``labels[i]``), ``train_config.json``, and the tokenizer
    files. ``student`` is the trained model already loaded for prediction (in
    eval mode), so the evaluate stage need not reload it; it is not compared.
    """

    adapter_dir: Path
    labels: list[str]
    losses: list[float]
    seconds: float
    steps: int
    student: Student | CausalLMStudent | None = field(default=None, repr=False, compare=False)


def _check_data(texts: Sequence[str], labels: Sequence[str], label_set: Sequence[str]) -> None:
    if len(texts) != len(labels):
        raise InvalidInput(f"texts has {len(texts)} items, labels has {len(labels)}; want equal")
    if not texts:
        raise InvalidInput("texts is empty; want at least one training example")
    if len(label_set) < 2:
        raise SpecError(f"labels: want at least 2 labels, got {len(label_set)}")
    if len(set(label_set)) != len(label_set):
        raise SpecError("labels: label set has duplicates")
    known = set(label_set)
    for i, (t, y) in enumerate(zip(texts, labels, strict=True)):
        if not isinstance(t, str):
            raise InvalidInput(f"texts[{i}] is {type(t).__name__}, want str")
        if y not in known:
            raise InvalidInput(f"labels[{i}] is {y!r}, which is not in the label set")


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False) + "\n")


def _sanitize_adapter_config(adapter_dir: Path, base_model_id: str) -> None:
    """Rewrite peft's adapter_config.json: logical base id, sorted keys and module lists.

    peft writes the absolute base path and serializes module sets in hash order;
    both would make artifacts machine-dependent or non-reproducible.
    """
    path = adapter_dir / ADAPTER_CONFIG_FILE
    cfg = json.loads(path.read_text())
    cfg["base_model_name_or_path"] = base_model_id
    for key in ("target_modules", "modules_to_save"):
        if isinstance(cfg.get(key), list):
            cfg[key] = sorted(set(cfg[key]))
    _write_json(path, cfg)


def _finish_adapter(out_dir: Path, base_model_id: str, tokenizer_from: Path | None) -> None:
    """Make a saved adapter folder path-free: sanitize its ``adapter_config.json``, copy
    the base's tokenizer files from ``tokenizer_from`` (when given) and drop peft's model
    card (it holds the absolute base path)."""
    _sanitize_adapter_config(out_dir, base_model_id)
    if tokenizer_from is not None:
        for name in TOKENIZER_FILES:
            shutil.copyfile(tokenizer_from / name, out_dir / name)
    for stray in ("README.md",):
        (out_dir / stray).unlink(missing_ok=True)


# --------------------------------------------------------------------------- training


def train_classifier(
    texts: Sequence[str],
    labels: Sequence[str],
    label_set: Sequence[str],
    config: TrainConfig,
    out_dir: Path,
    progress: Callable[[int, int, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Fine-tune ``config.base_model`` with LoRA into a classifier over ``label_set``.

    Requires ``len(texts) == len(labels) > 0``, every label in ``label_set``,
    ``label_set`` distinct with at least 2 entries (its order fixes the class
    indices). Writes the adapter into ``out_dir`` (created if needed; files of
    the same names are overwritten).

    ``progress(step, total_steps, loss)`` is called after every optimizer step
    (``step`` counts from 1). ``should_stop()`` is polled before every step; if
    it returns true, training stops and :class:`InterruptedError` is raised
    (nothing is saved). The learning rate warms up linearly over
    ``warmup_ratio`` of the steps, then decays linearly to 0.
    """
    _check_data(texts, labels, label_set)
    base_path = resolve_base_model(config.base_model)
    prepare_ml_env()
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)  # fail on an unwritable place before training
    label_list = list(label_set)
    index = {y: i for i, y in enumerate(label_list)}
    started = time.perf_counter()

    # (1) seeded before anything random is created: head init, LoRA A init.
    with training_scope(config.threads, config.seed):
        tokenizer = AutoTokenizer.from_pretrained(str(base_path))
        model = AutoModelForSequenceClassification.from_pretrained(
            str(base_path),
            num_labels=len(label_list),
            id2label=dict(enumerate(label_list)),
            label2id=index,
        )
        lora = LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=list(config.target_modules),
            modules_to_save=list(MODULES_TO_SAVE),
        )
        model = get_peft_model(model, lora)

        ids = encode(tokenizer, texts, config.max_length)
        y = torch.tensor([index[label] for label in labels], dtype=torch.long)

        def loss_of(batch: list[int]) -> Any:
            inputs = collate([ids[i] for i in batch], tokenizer.pad_token_id)
            return model(**inputs, labels=y[batch]).loss

        # (3) the data order comes from train_steps' own seeded generator.
        losses = train_steps(
            model, len(ids), config, loss_of, progress=progress, should_stop=should_stop
        )

        model.eval()
        model.save_pretrained(str(out_dir), safe_serialization=True)

    _finish_adapter(out_dir, config.base_model, base_path)
    _write_json(out_dir / LABELS_FILE, label_list)
    _write_json(out_dir / TRAIN_CONFIG_FILE, config.to_dict())

    student = Student(model, tokenizer, label_list, config.max_length)
    return TrainResult(
        adapter_dir=out_dir,
        labels=label_list,
        losses=losses,
        seconds=time.perf_counter() - started,
        steps=len(losses),
        student=student,
    )
