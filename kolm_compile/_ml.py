"""Shared machinery of the runtime students and their training: the ML environment,
scoped torch settings, tokenising and batching. Internal; heavy libraries are imported
inside the functions that need them, so importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

from kolm_ledger.errors import InvalidInput

__all__ = [
    "ADAPTER_CONFIG_FILE",
    "ADAPTER_WEIGHTS_FILE",
    "TRAIN_CONFIG_FILE",
    "check_batch_size",
    "collate",
    "encode",
    "length_batches",
    "prepare_ml_env",
    "quiet_hf",
    "torch_state",
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
