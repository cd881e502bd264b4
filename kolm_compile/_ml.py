"""Shared machinery of the runtime students and their training: the ML environment,
scoped torch settings, tokenising and batching, and the one LoRA training loop every
trainer runs (:func:`training_scope`, :func:`train_steps`). Internal; heavy libraries are imported
inside the functions that need them, so importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from kolm_ledger.errors import InvalidInput

__all__ = [
    "ADAPTER_CONFIG_FILE",
    "ADAPTER_WEIGHTS_FILE",
    "TRAIN_CONFIG_FILE",
    "LoopConfig",
    "check_batch_size",
    "collate",
    "encode",
    "length_batches",
    "prepare_ml_env",
    "quiet_hf",
    "require_files",
    "torch_state",
    "train_steps",
    "training_scope",
]

# The file names every student kind's adapter folder shares (kolm_compile.student says
# what each holds).
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
TRAIN_CONFIG_FILE = "train_config.json"


def prepare_ml_env() -> None:
    """Prepare the environment before transformers is first imported."""
    # Artifacts never resolve anything on the Hugging Face hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@contextlib.contextmanager
def quiet_hf() -> Iterator[None]:
    """Silence transformers' load report/progress bar and known deprecation noise.

    Scoped: logging verbosity and the progress-bar switch are restored on exit,
    and the warnings filters only apply inside the block.
    """
    from transformers.utils import logging

    hf_logging: Any = logging  # its switches are untyped
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            # peft 0.21 reads model.is_gradient_checkpointing, deprecated in transformers 5.
            warnings.filterwarnings(
                "ignore",
                message=r".*`is_gradient_checkpointing` is deprecated.*",
                category=FutureWarning,
            )
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def torch_state(threads: int | None, deterministic: bool) -> Iterator[None]:
    """Set thread count and deterministic mode for the block, then restore them."""
    import torch

    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    if threads is not None:
        torch.set_num_threads(threads)
    if deterministic:
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)


def encode(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids per text, truncated to ``max_length``, no padding."""
    enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding=False)
    return [list(ids) for ids in enc["input_ids"]]


def collate(ids: Sequence[Sequence[int]], pad_id: int) -> dict[str, Any]:
    """Pad a batch on the right to its longest member (dynamic padding keeps short batches
    cheap), with BERT-style ``token_type_ids`` (all 0)."""
    import torch

    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, : len(x)] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "token_type_ids": torch.zeros_like(input_ids),
    }


def length_batches(ids: list[list[int]], batch_size: int) -> Iterator[list[int]]:
    """Index batches with texts of similar length together (less padding)."""
    order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def check_batch_size(batch_size: int) -> None:
    """Raise :class:`InvalidInput` unless ``batch_size`` is an integer >= 1."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidInput(f"batch_size is {batch_size!r}, want an integer >= 1")


# --------------------------------------------------------------------------- training loop


class LoopConfig(Protocol):
    """The training settings :func:`train_steps` reads (``kolm_compile._train.TrainConfig``
    has them all)."""

    @property
    def epochs(self) -> int: ...
    @property
    def batch_size(self) -> int: ...
    @property
    def learning_rate(self) -> float: ...
    @property
    def weight_decay(self) -> float: ...
    @property
    def warmup_ratio(self) -> float: ...
    @property
    def seed(self) -> int: ...


@contextlib.contextmanager
def training_scope(threads: int | None, seed: int) -> Iterator[None]:
    """The block a student trains in: transformers quiet, ``threads`` torch threads,
    deterministic algorithms on, and the global torch RNG forked (the caller's state is
    left as it was) and seeded with ``seed`` before anything random (heads, LoRA ``A``
    matrices, dropout masks) is created."""
    import torch

    with (
        quiet_hf(),
        torch_state(threads, deterministic=True),
        torch.random.fork_rng(devices=[]),
    ):
        torch.manual_seed(seed)
        yield


def _lr_lambda(total: int, warmup: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


def train_steps(
    model: Any,
    n: int,
    cfg: LoopConfig,
    loss_of: Callable[[list[int]], Any],
    *,
    progress: Callable[[int, int, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> list[float]:
    """Train ``model``'s trainable parameters over ``n`` examples; return the loss of
    every step (their count is the number of steps).

    AdamW (``cfg.learning_rate``, ``cfg.weight_decay``); the learning rate warms up
    linearly over ``cfg.warmup_ratio`` of the steps, then decays linearly to 0. Each of
    ``cfg.epochs`` epochs draws a permutation of the examples from a ``torch.Generator``
    seeded with ``cfg.seed`` (the data order is the seed's alone) and cuts it into
    batches of ``cfg.batch_size``; ``loss_of(batch)`` is the loss tensor of a batch of
    example indices. ``should_stop()`` is polled before every step and, when true, raises
    :class:`InterruptedError`; ``progress(step, total_steps, loss)`` is called after every
    optimizer step (``step`` counts from 1). Leaves the model in training mode.
    """
    import torch

    total = math.ceil(n / cfg.batch_size) * cfg.epochs
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    warmup = int(cfg.warmup_ratio * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(total, warmup))
    order_gen = torch.Generator().manual_seed(cfg.seed)

    model.train()
    losses: list[float] = []
    for _epoch in range(cfg.epochs):
        perm = torch.randperm(n, generator=order_gen).tolist()
        for start in range(0, n, cfg.batch_size):
            if should_stop is not None and should_stop():
                raise InterruptedError(f"training stopped at step {len(losses)} of {total}")
            loss = loss_of(perm[start : start + cfg.batch_size])
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            if progress is not None:
                progress(len(losses), total, losses[-1])
    return losses


def require_files(adapter_dir: Path, names: Sequence[str]) -> None:
    """Raise :class:`~kolm_ledger.errors.InvalidInput` naming the first of ``names`` that is
    not a file in ``adapter_dir`` (every runtime student checks its folder this way)."""
    for name in names:
        if not (adapter_dir / name).is_file():
            raise InvalidInput(f"adapter directory {adapter_dir} has no {name}")
