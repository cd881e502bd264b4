"""Student training for ``student.kind: causal_lm``: LoRA fine-tuning of a causal language
model on (prompt, output) pairs, the generative counterpart of
:func:`kolm_compile._train.train_classifier`. It writes the adapter folder the runtime
(:mod:`kolm_compile.lm_student`, which documents the folder and the prompt) reads::

    from kolm_compile._train import TrainConfig
    from kolm_compile._train_lm import train_causal_lm
    from kolm_compile.student import DEFAULT_LM_BASE_MODEL, Student

    cfg = TrainConfig(kind="causal_lm", base_model=DEFAULT_LM_BASE_MODEL, max_new_tokens=64)
    result = train_causal_lm(texts, outputs, cfg, Path("out/adapter"),
                             instructions="Answer with the JSON object.")
    Student.load(result.adapter_dir).predict(["play some jazz"])

What is learnt: the LoRA matrices on the attention projections (``cfg.target_modules``; the
classifier's default ``("query", "value")`` means ``q_proj, k_proj, v_proj, o_proj`` here),
everything else frozen. The loss is the next-token cross-entropy on the output's tokens and
the EOS token after them only (prompt and padding are masked with -100), averaged over the
batch's target tokens; batches are right-padded; the learning rate warms up and decays
linearly, as for the classifier.

Reproducibility: the classifier's contract (:mod:`kolm_compile._train`) holds here too —
at a fixed seed and thread count the saved ``adapter_model.safetensors`` is byte-for-byte
identical across runs: the global torch RNG is seeded before the LoRA matrices are created
and forked around the run, deterministic algorithms and the thread count are set for the
run, the data order comes from its own seeded generator, and the saved files hold no path
or timestamp (``adapter_config.json`` names the base by its logical id).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kolm_ledger.errors import InvalidInput, SpecError

from ._ml import TRAIN_CONFIG_FILE, prepare_ml_env, train_steps, training_scope
from ._train import (
    TrainConfig,
    TrainResult,
    _finish_adapter,
    _write_json,
)
from .base_models import resolve_base_model
from .lm_student import (
    CausalLMStudent,
    PromptRecipe,
    collate_lm,
    load_base_lm,
    load_base_tokenizer,
    prompt_ids,
    target_ids,
)

__all__ = ["LM_TARGET_MODULES", "lm_target_modules", "train_causal_lm"]

#: the projections a causal LM's LoRA adapts by default (Llama/Qwen/SmolLM names)
LM_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
_CLASSIFIER_DEFAULT = ("query", "value")


def lm_target_modules(configured: Sequence[str]) -> tuple[str, ...]:
    """The modules a causal LM's LoRA targets: :data:`LM_TARGET_MODULES` when ``configured``
    is the classifier's default (BERT names, which a Llama-style model lacks), else
    ``configured``."""
    tm = tuple(configured)
    return LM_TARGET_MODULES if tm == _CLASSIFIER_DEFAULT else tm


def _check_data(prompts: Sequence[str], outputs: Sequence[str], cfg: TrainConfig) -> None:
    if cfg.kind != "causal_lm":
        raise SpecError(f"kind: train_causal_lm trains kind 'causal_lm', got {cfg.kind!r}")
    if len(prompts) != len(outputs):
        raise InvalidInput(
            f"prompts has {len(prompts)} items, outputs has {len(outputs)}; want equal"
        )
    if not prompts:
        raise InvalidInput("prompts is empty; want at least one training example")
    for name, seq in (("prompts", prompts), ("outputs", outputs)):
        for i, x in enumerate(seq):
            if not isinstance(x, str):
                raise InvalidInput(f"{name}[{i}] is {type(x).__name__}, want str")


def train_causal_lm(
    prompts: Sequence[str],
    outputs: Sequence[str],
    cfg: TrainConfig,
    out_dir: Path,
    *,
    instructions: str | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Fine-tune the causal LM ``cfg.base_model`` with LoRA to answer ``prompts[i]`` (the
    input text, put in the student's prompt with ``instructions``) with ``outputs[i]``.

    Requires ``cfg.kind == "causal_lm"`` (:class:`SpecError` otherwise) and
    ``len(prompts) == len(outputs) > 0``, all strings. Prompts are cut to
    ``cfg.max_length`` tokens, targets (output + EOS) to ``cfg.max_new_tokens``. Writes
    the adapter folder into ``out_dir`` (created if needed; files of the same names are
    overwritten). ``progress(step, total_steps, loss)`` is called after every optimizer
    step; ``should_stop()`` is polled before every step and, when true, stops training
    with :class:`InterruptedError` (nothing is saved). The result's ``labels`` is empty
    and its ``student`` the trained :class:`CausalLMStudent`.
    """
    _check_data(prompts, outputs, cfg)
    base_path = resolve_base_model(cfg.base_model)
    prepare_ml_env()
    from peft import LoraConfig, TaskType, get_peft_model

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)  # fail on an unwritable place before training
    started = time.perf_counter()

    # (1) seeded before anything random is created: the LoRA A matrices.
    with training_scope(cfg.threads, cfg.seed):
        tokenizer = load_base_tokenizer(base_path)
        model = load_base_lm(base_path)
        recipe = PromptRecipe.for_tokenizer(tokenizer, instructions)
        lora = LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=list(lm_target_modules(cfg.target_modules)),
        )
        try:
            model = get_peft_model(model, lora)
        except ValueError as e:  # peft: a target module the model does not have
            raise SpecError(f"target_modules: {e}") from e

        src = [prompt_ids(tokenizer, recipe, p, cfg.max_length) for p in prompts]
        tgt = [target_ids(tokenizer, o, cfg.max_new_tokens) for o in outputs]

        def loss_of(batch: list[int]) -> Any:
            inputs, labels = collate_lm(
                [src[i] for i in batch], [tgt[i] for i in batch], tokenizer.pad_token_id
            )
            return model(**inputs, labels=labels).loss

        # (3) the data order comes from train_steps' own seeded generator.
        losses = train_steps(
            model, len(src), cfg, loss_of, progress=progress, should_stop=should_stop
        )

        model.eval()
        # never resized, so never saved: "auto" would look for the base's config.json,
        # which a GGUF base has not
        model.save_pretrained(str(out_dir), safe_serialization=True, save_embedding_layers=False)
        tokenizer.save_pretrained(str(out_dir))

    _finish_adapter(out_dir, cfg.base_model, None)  # the tokenizer is saved above
    _write_json(out_dir / TRAIN_CONFIG_FILE, {**cfg.to_dict(), "prompt": recipe.to_dict()})

    student = CausalLMStudent(model, tokenizer, recipe, cfg.max_length, cfg.max_new_tokens)
    return TrainResult(
        adapter_dir=out_dir,
        labels=[],
        losses=losses,
        seconds=time.perf_counter() - started,
        steps=len(losses),
        student=student,
    )
