"""The generative runtime student (``student.kind: causal_lm``): a causal language model with
a LoRA adapter, loaded from its adapter folder and decoded greedily::

    from kolm_compile.lm_student import CausalLMStudent

    student = CausalLMStudent.load(Path("extractor/adapter"))
    student.predict(["play some jazz"])
    # [('{"intent":"PlayMusic","slots":{"genre":["jazz"]}}', 0.93)]

:meth:`kolm_compile.student.Student.load` returns one of these for a folder whose train
config says ``"kind": "causal_lm"``; :func:`kolm_compile._train_lm.train_causal_lm` writes
the folder.

**The adapter folder.** ``adapter_config.json`` (peft's LoRA config; the base is named by
its logical id, see :mod:`kolm_compile.base_models`), ``adapter_model.safetensors`` (the
LoRA weights), the tokenizer files as the tokenizer saved them (``tokenizer.json``,
``tokenizer_config.json``, ``chat_template.jinja`` when the base has a chat template), and
``train_config.json``: the training config (``kind`` is ``"causal_lm"``; ``max_length`` caps
the prompt's tokens, ``max_new_tokens`` the output's, EOS included) plus the prompt recipe
under ``"prompt"`` (:class:`PromptRecipe`).

**The prompt.** One function builds it, for training and inference alike:
:func:`lm_prompt`. With a tokenizer that has a chat template (format ``"chat"``; SmolLM2's
is ChatML) the prompt is the template rendered over ``[system: instructions]`` (left out
when there are none; the template may then add its own default system turn) and
``[user: text]``, with the generation prompt (the assistant turn's header) appended. Without
one (format ``"plain"``) it is::

    Instructions:
    {instructions}

    Input:
    {text}

    Output:

(the first block left out when there are no instructions; the prompt ends with the newline
after ``Output:``). The prompt is tokenised without added special tokens; the target is the
output's tokens followed by the tokenizer's EOS token. A prompt longer than ``max_length``
tokens keeps its template and loses the end of the input (:func:`prompt_ids`).

**Decoding.** Greedy, up to ``max_new_tokens`` tokens, stopping at EOS; micro-batched with
left padding, an attention mask and explicit position ids, so a batched answer is the
unbatched one. The confidence is ``exp`` of the mean log-probability of the generated tokens
(EOS included when it was generated), in (0, 1]. The LoRA weights stay unmerged, as in
training, so the student a training run returns and the one loaded from its folder compute
alike.

Heavy libraries (torch, transformers, peft) are imported inside the functions that need
them, so importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kolm_ledger.errors import InvalidInput, SpecError

from ._ml import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    TRAIN_CONFIG_FILE,
    check_batch_size,
    length_batches,
    prepare_ml_env,
    quiet_hf,
    require_files,
)
from .base_models import base_model_source, resolve_base_model

__all__ = [
    "PROMPT_FORMATS",
    "CausalLMStudent",
    "PromptRecipe",
    "collate_lm",
    "lm_prompt",
    "load_base_lm",
    "load_base_tokenizer",
    "prompt_ids",
    "target_ids",
]

#: the prompt layouts: the base tokenizer's chat template, or the plain layout
PROMPT_FORMATS = ("chat", "plain")


# --------------------------------------------------------------------------- prompt


def lm_prompt(instructions: str | None, text: str, tokenizer: Any | None = None) -> str:
    """The student's prompt for ``text``: the one template of training and inference.

    ``tokenizer`` with a chat template → that template rendered over the system turn
    ``instructions`` (left out when None) and the user turn ``text``, generation prompt
    appended; otherwise (or with no tokenizer) the plain layout of the module docstring.
    """
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": text}]
        if instructions is not None:
            messages.insert(0, {"role": "system", "content": instructions})
        out = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if not isinstance(out, str):  # pragma: no cover - tokenize=False renders text
            raise TypeError(f"chat template rendered {type(out).__name__}, want str")
        return out
    head = f"Instructions:\n{instructions}\n\n" if instructions is not None else ""
    return f"{head}Input:\n{text}\n\nOutput:\n"


@dataclass(frozen=True)
class PromptRecipe:
    """What rebuilds a student's prompts: the layout (one of :data:`PROMPT_FORMATS`) and
    the instructions (None: none). Stored under ``"prompt"`` in ``train_config.json``."""

    format: str
    instructions: str | None = None

    def __post_init__(self) -> None:
        if self.format not in PROMPT_FORMATS:
            raise ValueError(f"format is {self.format!r}, want one of {PROMPT_FORMATS}")
        if self.instructions is not None and not isinstance(self.instructions, str):
            raise ValueError(f"instructions is {type(self.instructions).__name__}, want str")

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, instructions: str | None) -> PromptRecipe:
        """The recipe :func:`lm_prompt` follows with ``tokenizer``."""
        chat = bool(getattr(tokenizer, "chat_template", None))
        return cls("chat" if chat else "plain", instructions)

    def prompt(self, text: str, tokenizer: Any) -> str:
        """:func:`lm_prompt` for ``text``. Requires a tokenizer with a chat template for
        the ``chat`` format (:class:`InvalidInput` otherwise)."""
        if self.format == "chat":
            if not getattr(tokenizer, "chat_template", None):
                raise InvalidInput("prompt format is chat, but the tokenizer has no chat template")
            return lm_prompt(self.instructions, text, tokenizer)
        return lm_prompt(self.instructions, text, None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, keys sorted."""
        return {"format": self.format, "instructions": self.instructions}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PromptRecipe:
        """Inverse of :meth:`to_dict`; raises ``ValueError`` for a malformed recipe."""
        if not isinstance(d, Mapping) or set(d) != {"format", "instructions"}:
            raise ValueError(f"prompt recipe {d!r}: want exactly the keys format, instructions")
        return cls(d["format"], d["instructions"])


def _tokens(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def prompt_ids(tokenizer: Any, recipe: PromptRecipe, text: str, max_length: int) -> list[int]:
    """The prompt's token ids, at most ``max_length`` of them.

    A prompt that is too long keeps its template: the input is cut to the tokens that fit
    (its first ones, decoded back to text and the prompt rebuilt); if even that is too
    long (instructions longer than the limit), the prompt keeps its last ``max_length``
    tokens, so the answer header is never lost.
    """
    ids = _tokens(tokenizer, recipe.prompt(text, tokenizer))
    if len(ids) <= max_length:
        return ids
    overhead = len(_tokens(tokenizer, recipe.prompt("", tokenizer)))
    keep = _tokens(tokenizer, text)[: max(0, max_length - overhead)]
    ids = _tokens(tokenizer, recipe.prompt(tokenizer.decode(keep), tokenizer))
    return ids[-max_length:]


def target_ids(tokenizer: Any, output: str, max_new_tokens: int) -> list[int]:
    """The training target: ``output``'s tokens, then EOS, cut to ``max_new_tokens``
    (an output that long loses its end and its EOS, as decoding would)."""
    return [*_tokens(tokenizer, output), tokenizer.eos_token_id][:max_new_tokens]


# --------------------------------------------------------------------------- loading


def load_base_tokenizer(base_path: Path) -> Any:
    """The tokenizer of a causal-LM base (a folder, a ``.gguf`` file or a folder holding
    one: :func:`kolm_compile.base_models.base_model_source`), its EOS token made the pad
    token when it has none. Raises :class:`SpecError` naming ``base_model`` when it has no
    EOS token."""
    prepare_ml_env()
    from transformers import AutoTokenizer

    folder, gguf = base_model_source(base_path)
    with quiet_hf():
        tokenizer = AutoTokenizer.from_pretrained(str(folder), **_gguf_kw(gguf))
    if tokenizer.eos_token_id is None:
        raise SpecError(f"base_model: {base_path}: its tokenizer has no end-of-sequence token")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_lm(base_path: Path) -> Any:
    """The causal LM of a base (as :func:`load_base_tokenizer`), float32 (GGUF weights are
    dequantized), in eval mode. Raises :class:`SpecError` naming ``base_model`` when the
    base is not a causal LM."""
    prepare_ml_env()
    import torch
    from transformers import AutoModelForCausalLM

    folder, gguf = base_model_source(base_path)
    with quiet_hf(), _quiet_gguf():
        try:
            model = AutoModelForCausalLM.from_pretrained(str(folder), **_gguf_kw(gguf))
        except (ValueError, KeyError) as e:
            raise SpecError(f"base_model: {base_path} is not a causal language model: {e}") from e
    model_: Any = model  # transformers' to()/eval() are loosely typed
    model_.to(torch.float32)
    model_.eval()
    return model_


@contextlib.contextmanager
def _quiet_gguf() -> Iterator[None]:
    """Hide transformers' GGUF dequantization progress bar (a plain tqdm, which the hub
    progress-bar switch does not reach) for the block."""
    try:
        from transformers import modeling_gguf_pytorch_utils
    except ImportError:  # pragma: no cover - a transformers without GGUF support
        yield
        return
    gguf_utils: Any = modeling_gguf_pytorch_utils
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is None:  # pragma: no cover - a transformers that has no such bar
        yield
        return
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


def _gguf_kw(gguf: str | None) -> dict[str, Any]:
    return {"gguf_file": gguf} if gguf is not None else {}


def _check_weights(path: Path) -> None:
    """The adapter weights must be a readable safetensors file of LoRA tensors."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            names = list(f.keys())
    except (OSError, SafetensorError) as e:
        raise InvalidInput(f"{path}: {e}") from e
    if not names or not all("lora_" in k for k in names):
        raise InvalidInput(f"{path}: want LoRA weights only, got {len(names)} tensors")


def _read_train_config(path: Path) -> tuple[int, int, PromptRecipe]:
    """``(max_length, max_new_tokens, recipe)`` from a causal LM's ``train_config.json``."""
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
        if cfg.get("kind") != "causal_lm":
            raise ValueError(f"kind is {cfg.get('kind')!r}, want 'causal_lm'")
        max_length, max_new = cfg["max_length"], cfg["max_new_tokens"]
        for name, v in (("max_length", max_length), ("max_new_tokens", max_new)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} is {v!r}, want an integer >= 1")
        recipe = PromptRecipe.from_dict(cfg["prompt"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise InvalidInput(f"{path}: malformed: {e}") from e
    return max_length, max_new, recipe


# --------------------------------------------------------------------------- the student


class CausalLMStudent:
    """A trained generative student loaded for prediction (eval mode, no gradients).

    ``predict`` returns ``(output text, confidence)`` per input; ``score`` the mean
    log-probability of given outputs. ``labels`` is None: the outputs are open text.
    """

    kind = "causal_lm"
    labels = None

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        recipe: PromptRecipe,
        max_length: int,
        max_new_tokens: int,
    ) -> None:
        self._model = model
        self._tokenizer = tokenizer
        self.recipe = recipe
        self.max_length = max_length
        self.max_new_tokens = max_new_tokens

    @classmethod
    def load(
        cls, adapter_dir: Path, base_model_path: Path | None = None, threads: int | None = None
    ) -> CausalLMStudent:
        """Load an adapter folder written by :func:`kolm_compile._train_lm.train_causal_lm`.

        The base comes from ``base_model_path`` if given (a bundled base: a folder with
        ``config.json``, a ``.gguf`` file, or a folder holding one), else from the registry
        entry named by the adapter config's logical ``base_model_name_or_path``.
        ``threads`` sets torch's CPU thread count (process-wide). Raises
        :class:`InvalidInput` naming the file if a required file is missing or malformed.
        """
        prepare_ml_env()
        import torch
        from peft import LoraConfig, PeftModel
        from transformers import AutoTokenizer

        adapter_dir = Path(adapter_dir)
        require_files(
            adapter_dir,
            (
                ADAPTER_CONFIG_FILE,
                ADAPTER_WEIGHTS_FILE,
                TRAIN_CONFIG_FILE,
                "tokenizer.json",
            ),
        )
        max_length, max_new, recipe = _read_train_config(adapter_dir / TRAIN_CONFIG_FILE)
        _check_weights(adapter_dir / ADAPTER_WEIGHTS_FILE)
        try:
            lora = LoraConfig.from_pretrained(str(adapter_dir))
        except (OSError, ValueError, TypeError) as e:
            raise InvalidInput(f"{adapter_dir / ADAPTER_CONFIG_FILE}: {e}") from e
        if base_model_path is None:
            base_model_path = resolve_base_model(lora.base_model_name_or_path)
        # Resolve the logical id back to a path only in memory; the file keeps the id.
        lora.base_model_name_or_path = str(base_model_path)
        lora.inference_mode = True

        with quiet_hf():
            try:
                tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
            except (OSError, ValueError) as e:
                raise InvalidInput(f"{adapter_dir}: tokenizer files: {e}") from e
        if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
            raise InvalidInput(f"{adapter_dir}: the tokenizer has no EOS or pad token")
        recipe.prompt("", tokenizer)  # a chat recipe needs the saved chat template

        if threads is not None:
            torch.set_num_threads(threads)
        with torch.random.fork_rng(devices=[]):
            base = load_base_lm(Path(base_model_path))
            with quiet_hf():
                model = PeftModel.from_pretrained(base, str(adapter_dir), config=lora)
        model.eval()
        return cls(model, tokenizer, recipe, max_length, max_new)

    @property
    def dtype(self) -> str:
        """The weights' dtype, e.g. ``"float32"`` (recorded with an evaluation)."""
        return str(next(self._model.parameters()).dtype).removeprefix("torch.")

    @property
    def tokenizer(self) -> Any:
        """The student's tokenizer (the one saved with its adapter)."""
        return self._tokenizer

    def prompt(self, text: str) -> str:
        """The prompt this student completes for ``text`` (:func:`lm_prompt`)."""
        return self.recipe.prompt(text, self._tokenizer)

    def _ids(self, texts: Sequence[str]) -> list[list[int]]:
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise InvalidInput(f"texts[{i}] is {type(t).__name__}, want str")
        return [prompt_ids(self._tokenizer, self.recipe, t, self.max_length) for t in texts]

    def _lm(self) -> Any:
        # The LoRA layers are injected in place: the inner model computes the adapted LM.
        return self._model.get_base_model()

    def predict(self, texts: Sequence[str], batch_size: int = 8) -> list[tuple[str, float]]:
        """Greedy outputs ``(text, confidence)`` per input, in input order.

        ``confidence`` is exp(mean log-probability of the generated tokens), in (0, 1].
        Requires ``batch_size >= 1`` (inputs of similar length share a micro-batch).
        """
        import torch

        check_batch_size(batch_size)
        ids = self._ids(texts)
        out: list[tuple[str, float]] = [("", 0.0)] * len(ids)
        self._model.eval()
        with torch.inference_mode():
            for batch in length_batches(ids, batch_size):
                for i, (toks, lps) in zip(
                    batch, self._generate([ids[i] for i in batch]), strict=True
                ):
                    eos = self._tokenizer.eos_token_id
                    text_ids = toks[:-1] if toks and toks[-1] == eos else toks
                    text = self._tokenizer.decode(text_ids, skip_special_tokens=False)
                    out[i] = (text, math.exp(sum(lps) / len(lps)))
        return out

    def _generate(self, prompts: list[list[int]]) -> list[tuple[list[int], list[float]]]:
        """Greedy decoding of one left-padded micro-batch: per prompt, the generated token
        ids (ending with EOS when it came) and their log-probabilities."""
        import torch

        lm = self._lm()
        pad, eos = self._tokenizer.pad_token_id, self._tokenizer.eos_token_id
        n, width = len(prompts), max(len(p) for p in prompts)
        input_ids = torch.full((n, width), pad, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, p in enumerate(prompts):
            input_ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = 1
        # Each row's positions count its own tokens only, so padding does not shift them.
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        cache_key = _cache_keyword(lm)
        res = lm(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
        )
        cache = getattr(res, cache_key)
        logits = res.logits[:, -1, :]
        next_pos = mask.sum(dim=1)
        done = [False] * n
        toks: list[list[int]] = [[] for _ in range(n)]
        lps: list[list[float]] = [[] for _ in range(n)]
        for step in range(self.max_new_tokens):
            logp = torch.log_softmax(logits.to(torch.float32), dim=-1)
            best = logp.argmax(dim=-1)
            for i in range(n):
                if not done[i]:
                    t = int(best[i])
                    toks[i].append(t)
                    lps[i].append(float(logp[i, t]))
                    done[i] = t == eos
            if all(done) or step == self.max_new_tokens - 1:
                break
            feed = torch.tensor([pad if d else int(b) for d, b in zip(done, best, strict=True)])
            mask = torch.cat([mask, torch.ones((n, 1), dtype=torch.long)], dim=1)
            res = lm(
                input_ids=feed[:, None],
                attention_mask=mask,
                position_ids=next_pos[:, None],
                use_cache=True,
                **{cache_key: cache},
            )
            cache = getattr(res, cache_key)
            logits = res.logits[:, -1, :]
            next_pos = next_pos + 1
        return list(zip(toks, lps, strict=True))

    def score(
        self, texts: Sequence[str], outputs: Sequence[str], batch_size: int = 8
    ) -> list[float]:
        """Mean log-probability (natural log, <= 0) of each ``outputs[i]`` (its tokens and
        EOS, cut to ``max_new_tokens`` as in training) given ``texts[i]``'s prompt.

        Requires ``len(texts) == len(outputs)`` and ``batch_size >= 1``.
        """
        import torch

        check_batch_size(batch_size)
        if len(texts) != len(outputs):
            raise InvalidInput(f"texts has {len(texts)} items, outputs has {len(outputs)}")
        for i, o in enumerate(outputs):
            if not isinstance(o, str):
                raise InvalidInput(f"outputs[{i}] is {type(o).__name__}, want str")
        prompts = self._ids(texts)
        targets = [target_ids(self._tokenizer, o, self.max_new_tokens) for o in outputs]
        seqs = [p + t for p, t in zip(prompts, targets, strict=True)]
        out = [0.0] * len(seqs)
        lm = self._lm()
        self._model.eval()
        with torch.inference_mode():
            for batch in length_batches(seqs, batch_size):
                inputs, labels = collate_lm(
                    [prompts[i] for i in batch],
                    [targets[i] for i in batch],
                    self._tokenizer.pad_token_id,
                )
                logp = torch.log_softmax(lm(**inputs).logits[:, :-1].to(torch.float32), dim=-1)
                gold = labels[:, 1:]
                keep = gold != -100
                picked = logp.gather(-1, gold.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep
                means = picked.sum(dim=1) / keep.sum(dim=1).clamp(min=1)
                for i, m in zip(batch, means.tolist(), strict=True):
                    out[i] = float(m)
        return out


def _cache_keyword(model: Any) -> str:
    """The forward keyword of the KV cache: ``cache`` (transformers >= 5.x), else
    ``past_key_values``; the model output's attribute has the same name."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def collate_lm(
    prompts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], pad_id: int
) -> tuple[dict[str, Any], Any]:
    """A right-padded batch of ``prompt + target`` sequences and its labels: the target
    tokens, -100 on the prompt and the padding (no loss there)."""
    import torch

    seqs = [list(p) + list(t) for p, t in zip(prompts, targets, strict=True)]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, (p, s) in enumerate(zip(prompts, seqs, strict=True)):
        input_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
        labels[i, len(p) : len(s)] = input_ids[i, len(p) : len(s)]
    return {"input_ids": input_ids, "attention_mask": mask}, labels
