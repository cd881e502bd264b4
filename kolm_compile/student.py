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
logical base-model ids (:mod:`kolm_compile.base_models`, re-exported here): artifacts never
record a path.

Other student kinds: :meth:`Student.load` reads the folder's :func:`student_kind` (its
train config's ``kind``) and returns the runtime of that kind — the generative
:class:`kolm_compile.lm_student.CausalLMStudent` for ``causal_lm``, the span tagger for
``span_tagger``. Those runtimes share this module's machinery through
:mod:`kolm_compile._ml` and never import it, so the dispatch makes no import cycle.

Heavy libraries (torch, transformers, peft) are imported inside the functions that need
them, so importing this module is cheap.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kolm_ledger.errors import InvalidInput

from ._ml import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    TRAIN_CONFIG_FILE,
    collate,
    encode,
    prepare_ml_env,
    quiet_hf,
    require_files,
    torch_state,
)
from ._ml import check_batch_size as _check_batch_size
from ._ml import length_batches as _batches
from .base_models import (
    DEFAULT_BASE_MODEL,
    DEFAULT_LM_BASE_MODEL,
    GGUF_SUFFIX,
    base_model_files,
    base_model_ids,
    base_model_source,
    register_base_model,
    resolve_base_model,
)

if TYPE_CHECKING:
    import numpy

    from .lm_student import CausalLMStudent

__all__ = [
    "ADAPTER_CONFIG_FILE",
    "ADAPTER_WEIGHTS_FILE",
    "DEFAULT_BASE_MODEL",
    "DEFAULT_LM_BASE_MODEL",
    "GGUF_SUFFIX",
    "LABELS_FILE",
    "TOKENIZER_FILES",
    "TRAIN_CONFIG_FILE",
    "Student",
    "base_model_files",
    "base_model_ids",
    "base_model_source",
    "collate",
    "embed_texts",
    "encode",
    "prepare_ml_env",
    "quiet_hf",
    "register_base_model",
    "resolve_base_model",
    "student_kind",
    "torch_state",
]

LABELS_FILE = "labels.json"
TOKENIZER_FILES = (
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
)


# --------------------------------------------------------------------------- kinds


def student_kind(adapter_dir: Path) -> str:
    """The student kind an adapter folder holds: its train config's ``kind``
    (``"classifier"``, ``"causal_lm"`` or ``"span_tagger"``); ``"classifier"`` when the
    folder has no train config or the config names none (folders written before kinds).

    Raises :class:`InvalidInput` naming the file if it is not a JSON object or its
    ``kind`` is not a string.
    """
    path = Path(adapter_dir) / TRAIN_CONFIG_FILE
    if not path.is_file():
        return "classifier"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InvalidInput(f"{path}: {e}") from e
    if not isinstance(cfg, dict):
        raise InvalidInput(f"{path}: want a JSON object")
    kind = cfg.get("kind", "classifier")
    if not isinstance(kind, str):
        raise InvalidInput(f"{path}: kind is {kind!r}, want a string")
    return kind


# --------------------------------------------------------------------------- prediction


def _mean_pool(hidden: Any, mask: Any) -> Any:
    import torch

    m = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1)


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


class Student:
    """A trained classifier loaded for prediction (eval mode, no gradients).

    ``labels[i]`` is the label of class index ``i``. :meth:`load` is also the one
    entry point for every student kind: it returns the runtime of the kind the adapter
    folder holds.
    """

    kind = "classifier"

    def __init__(self, model: Any, tokenizer: Any, labels: list[str], max_length: int) -> None:
        self._model = model
        self._tokenizer = tokenizer
        self.labels = list(labels)
        self.max_length = max_length

    @classmethod
    def load(
        cls, adapter_dir: Path, base_model_path: Path | None = None, threads: int | None = None
    ) -> Student | CausalLMStudent | Any:
        """Load an adapter directory, dispatching on its :func:`student_kind`.

        ``classifier``: the folder written by :func:`train_classifier`, loaded as a
        :class:`Student`; ``causal_lm``: :meth:`kolm_compile.lm_student.CausalLMStudent.load`;
        ``span_tagger``: :meth:`kolm_compile.tagger_student.SpanTaggerStudent.load`; any
        other kind raises :class:`InvalidInput`.

        The base weights come from ``base_model_path`` if given (a bundled base), else
        from the registry entry named by the adapter config's logical
        ``base_model_name_or_path``. ``threads`` sets torch's CPU thread count
        (process-wide). Raises :class:`InvalidInput` if a required file is
        missing or malformed.
        """
        kind = student_kind(adapter_dir)
        if kind == "causal_lm":
            from .lm_student import CausalLMStudent

            return CausalLMStudent.load(adapter_dir, base_model_path, threads)
        if kind == "span_tagger":
            import importlib

            tagger: Any = importlib.import_module("kolm_compile.tagger_student")
            return tagger.SpanTaggerStudent.load(adapter_dir, base_model_path, threads)
        if kind != "classifier":
            raise InvalidInput(
                f"{Path(adapter_dir) / TRAIN_CONFIG_FILE}: unknown student kind {kind!r}"
            )
        return cls._load_classifier(adapter_dir, base_model_path, threads)

    @classmethod
    def _load_classifier(
        cls, adapter_dir: Path, base_model_path: Path | None, threads: int | None
    ) -> Student:
        prepare_ml_env()
        import torch
        from peft import LoraConfig, PeftModel
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        adapter_dir = Path(adapter_dir)
        require_files(
            adapter_dir, (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, LABELS_FILE, "tokenizer.json")
        )
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
