"""The runtime span tagger (``student.kind: span_tagger``): a trained token tagger plus
enum heads, loaded from its adapter folder, that turns a text into the canonical JSON
object of an extraction schema whose fields are all enums or spans of the input::

    from kolm_compile.tagger_student import SpanTaggerStudent

    tagger = SpanTaggerStudent.load(Path("frames/adapter"))
    tagger.predict(["play the last ep from 1999"])
    # [('{"intent":"PlayMusic","slots":{"music_item":["ep"],"sort":["last"],"year":["1999"]}}',
    #   0.93)]

Training (:mod:`kolm_compile._train_tagger`) writes the folder this module reads and
imports it, never the other way round; the inference engine loads taggers through it.

**The model.** The base encoder (a logical base-model id, :func:`~kolm_compile.student.
resolve_base_model`) with LoRA adapters, and two linear heads on its last hidden states:

* ``tag_head`` — per token, one logit per tag of :attr:`TaggerLayout.tags`: ``"O"`` (index
  0, outside every span), then ``"B-<pointer>"`` and ``"I-<pointer>"`` for each span field
  in pointer order (``B-/slots/artist``: the first word of an artist value);
* ``enum_head`` — on the masked mean of the hidden states, the logits of every enum field
  side by side: the field of :attr:`TaggerLayout.enums` ``j`` owns the next
  ``len(classes) + optional`` columns; an optional field (not required all along its
  path) has an extra last column, "absent". No enum field: no ``enum_head``.

**Case.** MiniLM's tokenizer lower-cases, and capitals are what most often mark a name.
With :attr:`TaggerLayout.case_types` (what training writes), the token type ids carry
it: 1 for the tokens of a word whose first character is upper-case, 0 otherwise; the
encoder's ``token_type_embeddings`` are trained with the heads.

**Words.** Tags are read per word of the tokenizer's pre-tokenizer (whitespace and
punctuation split; a word is the character range of its tokens), from the word's first
token; the other tokens of a word are not scored. The tag sequence is the most probable
one (Viterbi over the words' log-probabilities, :func:`transitions`) among those where
``I-f`` follows ``B-f`` or ``I-f`` and ``B-f`` does not follow either (one field's values
are never adjacent words). Spans (:func:`decode_spans`): ``B-f`` starts a value of field
``f``; ``I-f`` continues the open value if it is ``f``'s, otherwise starts one (an ``I``
after ``O`` or after another field counts as ``B``); ``O`` closes. A value is the
ORIGINAL text from its first word's start to its last word's end (``text[start:end]``,
by the fast tokenizer's character offsets): always an exact substring of the input. Words
past ``max_length`` tokens are not tagged.

**The object.** Span values in text order and each enum's arg-max class (left out when
it is "absent") are assembled by :func:`kolm_compile.structured.assemble`; the objects
the schema requires all along their path (:attr:`TaggerLayout.objects`, e.g.
``/slots``) are then added empty if missing, so an input with no spans still gives a
schema-valid frame. :meth:`SpanTaggerStudent.predict` returns its canonical JSON.

**Confidence** of one prediction: the minimum of each enum field's top softmax
probability and the mean, over the tagged words, of the probability of the tag chosen
for the word (a part with nothing in it — no enum field, no word — is left out; nothing
at all gives 1.0).

**The folder** (written by :func:`kolm_compile._train_tagger.train_span_tagger`): the
LoRA adapter with its sanitized config (``adapter_config.json``,
``adapter_model.safetensors``; the heads and the token type embeddings are peft
``modules_to_save``, so their weights are in the same safetensors file, as
``base_model.model.tag_head.*``, ``base_model.model.enum_head.*`` and
``...token_type_embeddings...``), :data:`TAGGER_FILE` (the :class:`TaggerLayout`),
``train_config.json`` (its ``max_length`` is the tokenizer limit) and the tokenizer
files. Heavy libraries (torch, transformers, peft) are imported inside the functions that
need them, so importing this module is cheap.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kolm_ledger.errors import InvalidInput

from ._ml import require_files
from .structured import SchemaField, assemble, canonical, pointer_parts
from .student import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    TRAIN_CONFIG_FILE,
    prepare_ml_env,
    quiet_hf,
    resolve_base_model,
)

if TYPE_CHECKING:
    import numpy

__all__ = [
    "ENUM_HEAD",
    "OUTSIDE",
    "TAGGER_FILE",
    "TAGGER_FORMAT",
    "TAG_HEAD",
    "Encoded",
    "EnumHead",
    "SpanTaggerStudent",
    "TaggerLayout",
    "build_net",
    "collate_encoded",
    "decode_spans",
    "encode_words",
    "head_modules",
    "transitions",
    "viterbi",
]

TAGGER_FILE = "tagger.json"
TAGGER_FORMAT = 1
TAG_HEAD = "tag_head"
ENUM_HEAD = "enum_head"
OUTSIDE = "O"
CASE_EMBEDDING = "token_type_embeddings"


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class EnumHead:
    """One enum field's block of ``enum_head`` columns: its classes, then "absent" when
    the field is optional."""

    path: str
    classes: tuple[str, ...]
    optional: bool

    @property
    def width(self) -> int:
        return len(self.classes) + int(self.optional)


@dataclass(frozen=True)
class TaggerLayout:
    """What ``tagger.json`` holds: the tag list, the enum heads, the schema's fields (for
    :func:`~kolm_compile.structured.assemble`), the always-present objects, and the
    training data's alignment counts (``values`` span values placed on words,
    ``unaligned`` skipped: see :mod:`kolm_compile._train_tagger`), and whether the token
    type ids carry the words' case (see the module docstring)."""

    tags: tuple[str, ...]
    enums: tuple[EnumHead, ...]
    fields: tuple[SchemaField, ...]
    objects: tuple[str, ...]
    values: int = 0
    unaligned: int = 0
    case_types: bool = False

    @property
    def enum_width(self) -> int:
        return sum(h.width for h in self.enums)

    def to_bytes(self) -> bytes:
        """The file's bytes: sorted keys, 2-space indent, final newline."""
        obj = {
            "format": TAGGER_FORMAT,
            "tags": list(self.tags),
            "enums": [
                {"path": h.path, "classes": list(h.classes), "optional": h.optional}
                for h in self.enums
            ],
            "fields": [
                {"path": f.path, "kind": f.kind, "many": f.many, "enum": list(f.enum)}
                for f in self.fields
            ],
            "objects": list(self.objects),
            "alignment": {"values": self.values, "unaligned": self.unaligned},
            "case_types": self.case_types,
        }
        return (json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes, where: str = TAGGER_FILE) -> TaggerLayout:
        """Parse and check :meth:`to_bytes`'s output; :class:`InvalidInput` naming
        ``where`` for anything else."""
        try:
            obj = json.loads(data)
            if obj["format"] != TAGGER_FORMAT:
                raise ValueError(f"format {obj['format']!r}, want {TAGGER_FORMAT}")
            fields = tuple(
                SchemaField(_str(f["path"]), _str(f["kind"]), _bool(f["many"]), _strs(f["enum"]))
                for f in obj["fields"]
            )
            enums = tuple(
                EnumHead(_str(h["path"]), _strs(h["classes"]), _bool(h["optional"]))
                for h in obj["enums"]
            )
            layout = cls(
                tags=_strs(obj["tags"]),
                enums=enums,
                fields=fields,
                objects=_strs(obj["objects"]),
                values=_int(obj["alignment"]["values"]),
                unaligned=_int(obj["alignment"]["unaligned"]),
                case_types=_bool(obj["case_types"]),
            )
            layout.check()
        except (ValueError, KeyError, TypeError) as e:
            raise InvalidInput(f"{where}: malformed: {e}") from e
        return layout

    def check(self) -> None:
        """``ValueError`` unless the tags are ``O`` then ``B-``/``I-`` of each span field,
        in order, and the enum heads are the enum fields, in order."""
        spans = [f.path for f in self.fields if f.kind == "span"]
        want = [OUTSIDE] + [f"{bio}-{p}" for p in spans for bio in ("B", "I")]
        if list(self.tags) != want:
            raise ValueError(f"tags {list(self.tags)[:6]} do not match the span fields")
        enums = [(f.path, f.enum) for f in self.fields if f.kind == "enum"]
        if [(h.path, h.classes) for h in self.enums] != enums:
            raise ValueError("enum heads do not match the enum fields")
        if any(f.kind not in ("span", "enum") for f in self.fields):
            raise ValueError("a field is neither a span nor an enum")
        if any(f.kind == "enum" and f.many for f in self.fields):
            raise ValueError("an enum field holds several values")
        for ptr in self.objects:
            pointer_parts(ptr)
        if self.values < 0 or self.unaligned < 0:
            raise ValueError("negative alignment counts")


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError(f"want a string, got {type(v).__name__}")
    return v


def _strs(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list):
        raise TypeError(f"want a list of strings, got {type(v).__name__}")
    return tuple(_str(x) for x in v)


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"want a boolean, got {type(v).__name__}")
    return v


def _int(v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise TypeError(f"want an integer, got {type(v).__name__}")
    return v


# --------------------------------------------------------------------------- words


@dataclass(frozen=True)
class Encoded:
    """One text, tokenized: token ids, each token's word (``-1``: a special token, or a
    later token of its word: not scored), and each word's character range."""

    ids: list[int]
    first: list[int]  # per token: the index of the word it starts, or -1
    words: list[tuple[int, int]]
    cased: list[int]  # per token: 1 if its word starts with an upper-case letter, else 0


def encode_words(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[Encoded]:
    """Tokenize ``texts`` (truncated to ``max_length`` tokens) with word boundaries from
    the fast tokenizer's word ids and character offsets."""
    enc = tokenizer(
        list(texts),
        truncation=True,
        max_length=max_length,
        padding=False,
        return_offsets_mapping=True,
    )
    out = []
    for i, (text, ids) in enumerate(zip(texts, enc["input_ids"], strict=True)):
        word_ids = enc.word_ids(i)
        offsets = enc["offset_mapping"][i]
        first: list[int] = []
        words: list[tuple[int, int]] = []
        owner: list[int] = []  # per token: its word, or -1
        prev = None
        for w, (s, e) in zip(word_ids, offsets, strict=True):
            if w is None:
                first.append(-1)
                owner.append(-1)
            elif w != prev:
                first.append(len(words))
                words.append((int(s), int(e)))
                owner.append(len(words) - 1)
            else:
                first.append(-1)
                words[-1] = (words[-1][0], max(words[-1][1], int(e)))
                owner.append(len(words) - 1)
            prev = w
        upper = [text[a:b][:1].isupper() for a, b in words]
        cased = [int(w >= 0 and upper[w]) for w in owner]
        out.append(Encoded(list(ids), first, words, cased))
    return out


def _batches(encs: Sequence[Encoded], batch_size: int) -> Iterator[list[int]]:
    """Index batches with texts of similar length together (less padding)."""
    order = sorted(range(len(encs)), key=lambda i: (len(encs[i].ids), i))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def collate_encoded(encs: Sequence[Encoded], pad_id: int, case_types: bool) -> dict[str, Any]:
    """Pad a batch (:func:`kolm_compile.student.collate`); with ``case_types``, the token
    type ids carry :attr:`Encoded.cased`."""
    import torch

    from .student import collate

    batch = collate([e.ids for e in encs], pad_id)
    if case_types:
        for b, e in enumerate(encs):
            batch["token_type_ids"][b, : len(e.cased)] = torch.tensor(e.cased, dtype=torch.long)
    return batch


# --------------------------------------------------------------------------- the net


@functools.cache
def _net_type() -> type:
    import torch

    class TaggerNet(torch.nn.Module):
        """The encoder, ``tag_head`` over its hidden states and ``enum_head`` over their
        masked mean. ``forward`` returns (tag logits, enum logits or None, hidden)."""

        def __init__(self, encoder: Any, n_tags: int, n_enum: int) -> None:
            super().__init__()
            hidden = encoder.config.hidden_size
            self.encoder = encoder
            self.tag_head = torch.nn.Linear(hidden, n_tags)
            self.enum_head = torch.nn.Linear(hidden, n_enum) if n_enum else None

        def forward(
            self, input_ids: Any, attention_mask: Any, token_type_ids: Any
        ) -> tuple[Any, Any, Any]:
            hidden = self.encoder(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
            ).last_hidden_state
            tags = self.tag_head(hidden)
            enums = None
            if self.enum_head is not None:
                enums = self.enum_head(_masked_mean(hidden, attention_mask))
            return tags, enums, hidden

    return TaggerNet


def build_net(base_path: Path, layout: TaggerLayout) -> Any:
    """The untrained net for ``layout`` on the base encoder at ``base_path`` (its heads
    drawn from torch's global RNG: seed it first)."""
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(str(base_path), add_pooling_layer=False)
    return _net_type()(encoder, len(layout.tags), layout.enum_width)


def _masked_mean(hidden: Any, mask: Any) -> Any:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)


def head_modules(layout: TaggerLayout) -> list[str]:
    """The peft ``modules_to_save`` of ``layout``'s net."""
    case = [CASE_EMBEDDING] if layout.case_types else []
    return [TAG_HEAD, *([ENUM_HEAD] if layout.enums else []), *case]


def _check_heads(adapter_dir: Path, layout: TaggerLayout) -> None:
    """The saved heads must have one row per tag and per enum column of the layout
    (checked from the safetensors header, before loading)."""
    from safetensors import SafetensorError, safe_open

    path = adapter_dir / ADAPTER_WEIGHTS_FILE
    try:
        with safe_open(str(path), "pt") as f:
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118
    except (OSError, SafetensorError) as e:
        raise InvalidInput(f"{path}: {e}") from e
    want = {TAG_HEAD: len(layout.tags), ENUM_HEAD: layout.enum_width}
    for head, n in want.items():
        rows = [s[0] for k, s in shapes.items() if k.endswith(f"{head}.weight")]
        if n and not rows:
            raise InvalidInput(f"{path} has no {head} weights")
        for r in rows:
            if r != n:
                raise InvalidInput(f"{path}: {head} has {r} outputs, {TAGGER_FILE} wants {n}")


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise InvalidInput(f"batch_size is {batch_size!r}, want an integer >= 1")


def _check_texts(texts: Sequence[str]) -> None:
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise InvalidInput(f"texts[{i}] is {type(t).__name__}, want str")


# --------------------------------------------------------------------------- decoding


def decode_spans(
    text: str, words: Sequence[tuple[int, int]], tags: Sequence[str]
) -> dict[str, list[str]]:
    """Span values per field pointer, in text order, from one tag per word (see the module
    docstring: an ``I`` that does not continue its field's open value starts one)."""
    values: dict[str, list[str]] = {}
    open_field: str | None = None
    start = end = 0

    def close() -> None:
        if open_field is not None:
            values.setdefault(open_field, []).append(text[start:end])

    for (s, e), tag in zip(words, tags, strict=False):
        if tag == OUTSIDE:
            close()
            open_field = None
            continue
        bio, field = tag[0], tag[2:]
        if bio == "I" and open_field == field:
            end = e
            continue
        close()
        open_field, start, end = field, s, e
    close()
    return values


def transitions(tags: Sequence[str]) -> tuple[Any, Any]:
    """Boolean masks of the tag sequences Viterbi may choose over ``tags``: which tag may
    start a text (not an ``I-``) and which may follow which: ``I-f`` only after ``B-f`` or
    ``I-f``, and ``B-f`` not right after ``B-f`` or ``I-f`` (two values of one field are
    never adjacent words: a run of ``f`` words is one value)."""
    import torch

    n = len(tags)
    start = torch.tensor([not t.startswith("I-") for t in tags])
    trans = torch.ones((n, n), dtype=torch.bool)
    for j, t in enumerate(tags):
        same = torch.tensor([a != OUTSIDE and a[2:] == t[2:] for a in tags])
        if t.startswith("I-"):
            trans[:, j] = same
        elif t.startswith("B-"):
            trans[:, j] = ~same
    return start, trans


def viterbi(probs: Any, start_ok: Any, trans_ok: Any) -> list[int]:
    """The most probable tag sequence for per-word tag probabilities ``probs`` (a
    ``(words, tags)`` tensor, ``words >= 1``) among those :func:`transitions`'s masks
    allow."""
    import torch

    logp = torch.log(probs.clamp(min=1e-12))
    neg = torch.tensor(float("-inf"))
    score = torch.where(start_ok, logp[0], neg)
    back = []
    for w in range(1, logp.shape[0]):
        cand = torch.where(trans_ok, score.unsqueeze(1), neg)  # [from, to]
        best, arg = cand.max(dim=0)
        back.append(arg)
        score = best + logp[w]
    path = [int(score.argmax())]
    for arg in reversed(back):
        path.append(int(arg[path[-1]]))
    return path[::-1]


class SpanTaggerStudent:
    """A trained span tagger loaded for prediction (eval mode, no gradients).

    ``labels`` is ``None`` (the output is an object, not a label); ``layout`` is the
    :class:`TaggerLayout` of its folder.
    """

    kind = "span_tagger"
    labels = None

    def __init__(self, model: Any, tokenizer: Any, layout: TaggerLayout, max_length: int) -> None:
        self._model = model
        self._tokenizer = tokenizer
        self.layout = layout
        self.max_length = max_length
        self._decoding = "viterbi"  # or "argmax", "fields": bench/tagger_probe.py compares
        self._allowed: Any = None

    def _field_tags(self, probs: Any) -> list[int]:
        """Per word, the field with the most probability (``B-f`` + ``I-f``) or ``O``;
        a run of words of one field is one value."""
        n = (len(self.layout.tags) - 1) // 2
        field_p = probs[:, 1:].reshape(-1, n, 2).sum(dim=-1)
        out: list[int] = []
        prev = -1
        for w in range(probs.shape[0]):
            f = int(field_p[w].argmax())
            if float(probs[w, 0]) >= float(field_p[w, f]):
                out.append(0)
                prev = -1
            else:
                out.append(1 + 2 * f + (1 if prev == f else 0))
                prev = f
        return out

    def _best_tags(self, probs: Any) -> list[int]:
        if self._allowed is None:
            self._allowed = transitions(self.layout.tags)
        return viterbi(probs, *self._allowed)

    @classmethod
    def load(
        cls, adapter_dir: Path, base_model_path: Path | None = None, threads: int | None = None
    ) -> SpanTaggerStudent:
        """Load an adapter directory written by :func:`~kolm_compile._train_tagger.
        train_span_tagger`.

        The base weights come from ``base_model_path`` if given, else from the registry
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
                TAGGER_FILE,
                TRAIN_CONFIG_FILE,
                "tokenizer.json",
            ),
        )
        layout = TaggerLayout.from_bytes(
            (adapter_dir / TAGGER_FILE).read_bytes(), str(adapter_dir / TAGGER_FILE)
        )
        try:
            tc = json.loads((adapter_dir / TRAIN_CONFIG_FILE).read_text())
            max_length = tc["max_length"]
            if tc.get("kind") != "span_tagger":
                raise ValueError(f"kind is {tc.get('kind')!r}, want 'span_tagger'")
            if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 4:
                raise ValueError(f"max_length is {max_length!r}, want an integer >= 4")
        except (ValueError, KeyError, TypeError) as e:
            raise InvalidInput(f"{adapter_dir / TRAIN_CONFIG_FILE}: malformed: {e}") from e

        _check_heads(adapter_dir, layout)
        try:
            lora = LoraConfig.from_pretrained(str(adapter_dir))
        except (OSError, ValueError, TypeError) as e:
            raise InvalidInput(f"{adapter_dir / ADAPTER_CONFIG_FILE}: {e}") from e
        if base_model_path is None:
            base_model_path = resolve_base_model(lora.base_model_name_or_path)
        lora.base_model_name_or_path = str(base_model_path)
        lora.inference_mode = True

        if threads is not None:
            torch.set_num_threads(threads)
        with quiet_hf(), torch.random.fork_rng(devices=[]):
            tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
            net = build_net(Path(base_model_path), layout)
            model = PeftModel.from_pretrained(net, str(adapter_dir), config=lora)
        model.eval()
        return cls(model, tokenizer, layout, max_length)

    @property
    def dtype(self) -> str:
        """The weights' dtype, e.g. ``"float32"`` (recorded with an evaluation)."""
        return str(next(self._model.parameters()).dtype).removeprefix("torch.")

    def _run(
        self, texts: Sequence[str], batch_size: int
    ) -> tuple[list[Encoded], list[Any], list[Any], list[Any]]:
        import torch

        _check_batch_size(batch_size)
        _check_texts(texts)
        encs = encode_words(self._tokenizer, texts, self.max_length)
        n = len(encs)
        word_probs: list[Any] = [None] * n
        enum_logits: list[Any] = [None] * n
        pooled: list[Any] = [None] * n
        self._model.eval()
        with torch.inference_mode():
            for batch in _batches(encs, batch_size):
                inputs = collate_encoded(
                    [encs[i] for i in batch], self._tokenizer.pad_token_id, self.layout.case_types
                )
                tags, enums, hidden = self._model(**inputs)
                probs = torch.softmax(tags.to(torch.float32), dim=-1)
                mean = _masked_mean(hidden, inputs["attention_mask"])
                for row, i in enumerate(batch):
                    firsts = [t for t, w in enumerate(encs[i].first) if w >= 0]
                    word_probs[i] = probs[row, firsts]
                    enum_logits[i] = None if enums is None else enums[row].to(torch.float32)
                    pooled[i] = mean[row]
        return encs, word_probs, enum_logits, pooled

    def predict(self, texts: Sequence[str], batch_size: int = 64) -> list[tuple[str, float]]:
        """Return ``(canonical JSON of the object, confidence)`` per text, in input order
        (the module docstring has the decoding and the confidence rule)."""
        import torch

        if not texts:
            return []
        encs, word_probs, enum_logits, _ = self._run(texts, batch_size)
        layout = self.layout
        out = []
        for text, enc, wp, el in zip(texts, encs, word_probs, enum_logits, strict=True):
            parts: list[float] = []
            tag_idx: list[int] = []
            if len(enc.words):
                if self._decoding == "viterbi":
                    tag_idx = self._best_tags(wp)
                elif self._decoding == "fields":
                    tag_idx = self._field_tags(wp)
                else:
                    tag_idx = wp.argmax(dim=-1).tolist()
                parts.append(float(wp[range(len(tag_idx)), tag_idx].mean()))
            values: dict[str, list[Any]] = dict(
                decode_spans(text, enc.words, [layout.tags[t] for t in tag_idx])
            )
            col = 0
            for head in layout.enums:
                p = torch.softmax(el[col : col + head.width], dim=-1)
                col += head.width
                conf, k = p.max(dim=-1)
                parts.append(float(conf))
                if int(k) < len(head.classes):
                    values[head.path] = [head.classes[int(k)]]
            obj = assemble(values, layout.fields)
            for ptr in layout.objects:
                node = obj
                for key in pointer_parts(ptr):
                    node = node.setdefault(key, {})
            out.append((canonical(obj), min(parts) if parts else 1.0))
        return out

    def embed(self, texts: Sequence[str], batch_size: int = 64) -> numpy.ndarray:
        """L2-normalized mean-pooled last hidden states of the adapted encoder, shape
        ``(len(texts), hidden_size)``, float32 (what a kNN gate compares)."""
        import numpy as np
        import torch

        hidden_size = self._model.get_base_model().encoder.config.hidden_size
        if not texts:
            return np.zeros((0, hidden_size), dtype=np.float32)
        _, _, _, pooled = self._run(texts, batch_size)
        vecs = torch.nn.functional.normalize(torch.stack(pooled), p=2, dim=1)
        return vecs.to(torch.float32).numpy()
