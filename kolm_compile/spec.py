"""The task spec: what to distill, from which teacher, checked how, trained how.

A spec is a YAML (or JSON) file; :meth:`TaskSpec.load` turns it into validated,
frozen dataclasses. Every problem raises :class:`~kolm_ledger.errors.SpecError`
whose message starts with the dotted path of the field::

    >>> from kolm_compile.spec import TaskSpec
    >>> spec = TaskSpec.load("kolm_compile/examples/banking77-router.yaml")  # doctest: +SKIP
    >>> spec.teacher.k, spec.teacher.min_agreement                          # doctest: +SKIP
    (5, 3)
    >>> TaskSpec.from_dict({"name": "x", "task": "classify"}, ".")          # doctest: +SKIP
    Traceback (most recent call last):
    kolm_ledger.errors.SpecError: spec.labels: required for task classify

Schema (``*`` = required; unknown fields are rejected by name)::

    name*: str                [a-z0-9][a-z0-9-_]{0,63}
    task*: classify | extract | generate
    labels: [str, ...]        classify: the closed label set (required, >= 2, distinct)
    none_label: str           classify: the label (one of labels) meaning "none of these"
    output_schema: {..} | path  extract (required): JSON Schema (Draft 2020-12) of the output,
                              one JSON object (top-level type "object"); a path is a JSON
                              file relative to the spec. A string field marked
                              "x-kolm-grounded": true is a span of the input
    instructions: str         what the teacher is asked to do (prepended to every prompt)
    verifier:                 default: label_set (classify), json_schema (extract);
      name*: str              generate needs one: regex, exact_match, python_ast, bleu, ...
      params: {..}            see kolm_compile.verifiers; label_set gets `labels` and
                              json_schema gets `schema` (= output_schema) filled in from the task
    teacher:
      backend*: openai | transformers | replay | simulated   (or any registered teacher)
      profile: str            an operator's teacher profile (kolm compile serve --teachers,
                              kolm_compile.intake): fills in backend, endpoint, api_key_env, ...
      model: str              required for openai and transformers
      params: {temperature: 0.7, max_tokens, top_p, stop, seed,
               presence_penalty, frequency_penalty}
      k: int = 5              samples per input
      min_agreement: int      votes the winning answer needs; default floor(k/2)+1
      vote: exact | per_field = exact   exact: min_agreement samples agree on the whole
                              (normalized) answer; per_field (extract only): on each field
                              of output_schema (kolm_compile.voting.vote_per_field)
      # each backend's own options, written flat here: declared by its options class
      # and registered with its teacher (kolm_compile.teachers.register_teacher)
      # openai only (OpenAIOptions)
      endpoint: url = https://api.openai.com      POST {endpoint}/v1/chat/completions
      api_key_env: str        name of the environment variable holding the API key
      concurrency: int = 4    requests in flight at once
      timeout_s: float = 60   per request
      max_retries: int = 5    on 429, 5xx, timeouts and connection errors
      batch_samples: bool = true   ask for all k samples in one request (`n`)
      response_format: json_schema | json_object | none   extract only; default json_schema
                              (the schema goes in response_format; otherwise in the prompt)
      # transformers only
      device: str             default: cuda if available, else cpu
      # replay only
      path*: path             JSONL of {input_sha256, samples: [...], model}
      # simulated only (offline demos and benchmarks)
      dataset*: path          CSV/JSONL with gold answers (data.text_column and
                              data.label_column for classify, data.output_column otherwise)
      accuracy: float = 0.85  chance that one sample is the gold answer
      similarity_temperature: float = 0.1   classify: wrong answers ~ softmax(similarity / t)
      # simulated and transformers
      seed: int               default: the spec's seed
    student:                  defaults: kolm_compile._train.TrainConfig
      kind: auto | classifier | causal_lm | span_tagger = auto   auto: classify → classifier;
                              extract → span_tagger when every field of output_schema is a
                              grounded string or a single enum, else causal_lm; generate →
                              causal_lm. The spec holds the resolved kind once loaded
      base_model: str         default by kind: sentence-transformers/all-MiniLM-L6-v2
                              (classifier, span_tagger), HuggingFaceTB/SmolLM2-135M-Instruct
                              (causal_lm)
      max_new_tokens: int = 64   causal_lm only: the most tokens one output may have
      lora_r, epochs, learning_rate, max_length, batch_size
      confidence_threshold: float = 0.5   below it, inference escalates to the teacher
      target_cover_k_score: float   K-score promised on the cover; the compile picks the gate
                              thresholds for it (docs/INFERENCE.md, selective prediction)
      gate_k: int = 5         neighbour rank of the kNN distance gate
    data:                     at least one of seed_pairs, unlabeled
      seed_pairs: path        CSV/JSONL of pairs (text and label, or text and output)
      unlabeled: path         CSV/JSONL of inputs for the teacher to label
      holdout: path           CSV/JSONL of pairs for the K-score
      text_column: str = text
      label_column: str = label    classify only: the label column
      output_column: str = output  extract/generate only: the reference output column (in
                              JSON Lines an object or JSON text; in CSV JSON text for extract)
      limit_per_label: int    classify only: keep at most this many rows per label
      labels: [str, ...]      classify only: keep only rows with these labels (subset of `labels`)
    budget:                   per JOB, summed over every run of it (resumes included);
                              operational: changing it keeps the job (docs/COMPILE.md)
      max_teacher_calls: int  billed requests (HTTP 200 answers) the job may make (unset: no
                              limit); 429s, 5xx, timeouts and resets are counted apart, not billed
      max_teacher_samples: int  samples the job may buy (one request asks for up to k)
      max_cost: float         dollars the job may spend at the prices below
      price_per_1k_input_tokens: float = 0
      price_per_1k_output_tokens: float = 0
    recall:                   optional: ship a recall index (recall/index.db) in the .kolm
      corpus: path            a JSONL of {"id", "text"} documents or a folder of text files
      source: documents | examples   default documents with a corpus; examples (classify
                              only, no corpus): the acknowledged training examples are the index
      chunk_size: int = 200   units per chunk (documents only)
      chunk_overlap: int      units shared by neighbouring chunks; default min(40, chunk_size // 5)
      chunk_unit: words | chars = words
      k: int = 5              chunks a prediction retrieves by default (manifest recall.k), 1..10
    seed: int = 0             in [0, 2**53)

Paths are relative to the spec file's directory (``base_dir``). A spec submitted to
the compile service names a file as ``sha256:<hex>`` (an upload) or a path under the
operator's data root, and its teacher as a profile: :meth:`TaskSpec.from_dict` sends
every file field (:data:`FILE_FIELDS`) through one resolver, the ``policy``'s
(kolm_compile.intake). Spec text is parsed by :func:`load_spec_text` (1 MiB, 100 YAML
aliases, 100,000 expanded values, 64 levels at most). ``to_dict()`` is
deterministic (sorted keys, paths relative to ``base_dir`` or the reference a
resolver gave, kolm version stamped); ``digest()`` is the SHA-256 of its RFC 8785 canonical JSON with every
referenced file's SHA-256 added (a corpus folder: a digest over its files), so it
changes when the data changes.

Tables (``data.*``, ``teacher.dataset``) are read by :func:`read_table` /
:func:`read_rows` (kolm_compile.tables): a CSV with a header row, or JSON Lines of objects.
Every field check is kolm_compile.fields (pydantic v2): one kit for the spec's sections,
the teacher options and the verifier params.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import typing
from collections.abc import Mapping, Sequence
from dataclasses import field, fields, replace
from pathlib import Path
from typing import Annotated, Any, ClassVar, Protocol, TypeVar

import rfc8785
import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from pydantic import PlainValidator

from kolm_compile import _train
from kolm_compile.fields import (
    MAX_SEED,
    TABLE_SUFFIXES,
    Section,
    at,
    check_int,
    check_key_env_name,
    check_num,
    check_str,
    check_text,
    file_path,
    freeze,
    from_mapping,
    instance_of,
    integer,
    invalid,
    json_mapping,
    label_list,
    looks_like_key,
    number,
    optional,
    pattern,
    section,
    string,
    table_path,
    text,
    thaw,
)
from kolm_compile.structured import schema_fields, span_schema
from kolm_compile.tables import read_rows, read_table
from kolm_compile.teachers import TeacherOptions, teacher_backends, teacher_options
from kolm_compile.verifiers import Verifier, get_verifier
from kolm_ledger.errors import InvalidInput, SpecError

__all__ = [
    "CAUSAL_LM_BASE_MODEL",
    "CAUSAL_LM_TARGET_MODULES",
    "DEFAULT_MAX_NEW_TOKENS",
    "ENCODER_BASE_MODEL",
    "FILE_FIELDS",
    "MAX_SPEC_ALIASES",
    "MAX_SPEC_BYTES",
    "MAX_SPEC_DEPTH",
    "MAX_SPEC_NODES",
    "OPERATIONAL_TEACHER_FIELDS",
    "RECALL_K_MAX",
    "STUDENT_KINDS",
    "TAGGER_TARGET_MODULES",
    "TASK_TYPES",
    "VOTE_KINDS",
    "BudgetSpec",
    "DataSpec",
    "RecallSpec",
    "SpecPolicy",
    "StudentSpec",
    "TaskSpec",
    "TeacherSpec",
    "VerifierSpec",
    "check_key_env_name",
    "default_base_model",
    "kolm_version",
    "load_spec_text",
    "looks_like_key",
    "read_rows",
    "read_table",
]

TASK_TYPES = ("classify", "extract", "generate")
#: ``teacher.vote``: how k samples become one label (kolm_compile.voting)
VOTE_KINDS = ("exact", "per_field")
_NAME = re.compile(r"[a-z0-9][a-z0-9\-_]{0,63}")
_CORPUS_SUFFIXES = (".jsonl", ".ndjson")
#: most chunks a prediction may retrieve by default (a receipt cites ~10 at most: RECALL.md)
RECALL_K_MAX = 10


def kolm_version() -> str:
    """The kolm version stamped into every serialized spec."""
    from kolm_ledger import __version__

    return __version__


# --------------------------------------------------------------------------- sections


#: (kept for code that imports them from here) the kit lives in kolm_compile.fields
_thaw = thaw
_freeze = freeze
_Section = Section
_MAX_SEED = MAX_SEED
_TABLE_SUFFIXES = TABLE_SUFFIXES


def _help(text: str) -> dict[str, str]:
    return {"help": text}


#: a value the section's ``__post_init__`` checks (with other fields, or with its own words)
_CHECKED_LATER = PlainValidator(lambda v: v)


@section
class VerifierSpec(Section):
    """Which verifier decides whether an output is acceptable (see kolm_compile.verifiers)."""

    PATH: ClassVar[str] = "spec.verifier"

    name: Annotated[str, text()] = field(metadata=_help("registered verifier name"))
    params: Annotated[Mapping[str, Any], json_mapping()] = field(
        default_factory=dict, metadata=_help("verifier parameters (defaults filled in)")
    )

    def build(self) -> Verifier:
        """The configured verifier."""
        return get_verifier(self.name, thaw(self.params))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, sorted."""
        return {"name": self.name, "params": thaw(self.params)}


_SAMPLING_PARAMS = (
    "frequency_penalty",
    "max_tokens",
    "presence_penalty",
    "seed",
    "stop",
    "temperature",
    "top_p",
)


def _check_sampling_params(raw: Any) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        invalid(f"must be a mapping, got {type(raw).__name__!r}")
    out: dict[str, Any] = {"temperature": 0.7}
    for key, v in raw.items():
        sub = f".{key}"
        if key == "temperature":
            out[key] = check_num(v, 0.0, 2.0, at=sub)
        elif key == "top_p":
            out[key] = check_num(v, 0.0, 1.0, lo_open=True, at=sub)
        elif key in ("presence_penalty", "frequency_penalty"):
            out[key] = check_num(v, -2.0, 2.0, at=sub)
        elif key == "max_tokens":
            out[key] = check_int(v, 1, 1_000_000, at=sub)
        elif key == "seed":
            out[key] = check_int(v, 0, MAX_SEED - 1, at=sub)
        elif key == "stop":
            stops = [v] if isinstance(v, str) else v
            if not isinstance(stops, list | tuple) or not 1 <= len(stops) <= 4:
                invalid(f"must be a string or a list of 1 to 4 strings, got {v!r}", sub)
            out[key] = tuple(check_text(s, at=f"{sub}[{i}]") for i, s in enumerate(stops))
        else:
            invalid(f"unknown sampling parameter (known: {', '.join(_SAMPLING_PARAMS)})", sub)
    frozen: Mapping[str, Any] = freeze(out)
    return frozen


def _check_backend(value: Any) -> str:
    """A registered teacher backend's name (raises :class:`SpecError` naming the field)."""
    backend = at("spec.teacher.backend", check_text, value)
    known = teacher_backends()
    if backend not in known:
        raise SpecError(
            f"spec.teacher.backend: unknown teacher backend {backend!r} (known: {', '.join(known)})"
        )
    return backend


def _is_path(hint: Any) -> bool:
    return hint is Path or any(_is_path(arg) for arg in typing.get_args(hint))


def _path_fields(cls: type[Any]) -> set[str]:
    """The fields of a section that name a file or folder."""
    return {name for name, hint in typing.get_type_hints(cls).items() if _is_path(hint)}


def _option_owners() -> dict[str, list[str]]:
    """Option name → the backends whose options class declares it."""
    owners: dict[str, list[str]] = {}
    for backend in teacher_backends():
        for f in fields(teacher_options(backend)):
            owners.setdefault(f.name, []).append(backend)
    return owners


@section
class TeacherSpec(Section):
    """The model that labels inputs: k samples each, then verify and vote.

    The fields every backend shares, and ``options``: the backend's own
    (:class:`~kolm_compile.teachers.OpenAIOptions`, ...), registered with its teacher
    (:func:`~kolm_compile.teachers.register_teacher`). A spec writes both flat in its
    teacher section; :meth:`from_mapping` hands the backend its keys, and a backend's
    option reads through the section too (``spec.teacher.endpoint``).
    """

    PATH: ClassVar[str] = "spec.teacher"

    backend: Annotated[str, PlainValidator(_check_backend)] = field(
        metadata=_help("registered teacher backend")
    )
    model: Annotated[str | None, optional(text())] = field(
        default=None, metadata=_help("model name, or a local path")
    )
    profile: Annotated[str | None, optional(text())] = field(
        default=None,
        metadata=_help("the operator's teacher profile (kolm compile serve --teachers FILE)"),
    )
    params: Annotated[Mapping[str, Any], PlainValidator(_check_sampling_params)] = field(
        default_factory=dict, metadata=_help("sampling parameters sent with every request")
    )
    k: Annotated[int, integer(1, 100)] = field(default=5, metadata=_help("samples per input"))
    min_agreement: Annotated[int | None, optional(integer(1))] = field(
        default=None, metadata=_help("votes the winning answer needs; default floor(k/2)+1")
    )
    vote: Annotated[str, string(VOTE_KINDS)] = field(
        default="exact",
        metadata=_help(
            "exact: min_agreement samples agree on the whole normalized answer; per_field "
            "(extract): on each field of the output schema"
        ),
    )
    options: Annotated[TeacherOptions | None, optional(instance_of(TeacherOptions))] = field(
        default=None,
        metadata=_help("the backend's own options (default: its options class's defaults)"),
    )

    def __post_init__(self) -> None:
        p = self.PATH
        cls = teacher_options(self.backend)
        if self.options is None:
            object.__setattr__(self, "options", cls())
        elif not isinstance(self.options, cls):
            raise SpecError(
                f"{p}.options: must be a {cls.__name__} (backend {self.backend}), got "
                f"{type(self.options).__name__!r}"
            )
        if cls.NEEDS_MODEL and self.model is None:
            raise SpecError(f"{p}.model: required for backend {self.backend}")
        if self.min_agreement is None:
            object.__setattr__(self, "min_agreement", self.k // 2 + 1)
        elif self.min_agreement > self.k:
            raise SpecError(f"{p}.min_agreement: must be <= {self.k}, got {self.min_agreement}")

    def __getattr__(self, name: str) -> Any:
        # a backend's option reads through the section, as the spec writes it
        opts = self.__dict__.get("options")
        if name.startswith("_") or opts is None or name not in opts.__dataclass_fields__:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(opts, name)

    @classmethod
    def from_mapping(cls, raw: Any, **extra: Any) -> TeacherSpec:
        """The section from a spec's flat mapping: the shared fields go to this class,
        the rest to the backend's options class (a key no backend declares is unknown; one
        another backend declares is named as that backend's)."""
        p = cls.PATH
        if not isinstance(raw, Mapping):
            raise SpecError(f"{p}: must be a mapping, got {type(raw).__name__!r}")
        shared = {f.name for f in fields(cls) if f.name != "options"}
        owners = _option_owners()
        for key in raw:
            if key not in shared and key not in owners:
                known = ", ".join(sorted(shared | set(owners)))
                raise SpecError(f"{p}.{key}: unknown field (known: {known})")
        if raw.get("backend") is None:
            raise SpecError(f"{p}.backend: required")
        backend = _check_backend(raw["backend"])
        options_cls = teacher_options(backend)
        own = {f.name for f in fields(options_cls)}
        for name in sorted(_path_fields(options_cls) - _TEACHER_FILES):
            # every file a spec names goes through the one resolver (FILE_FIELDS): a file
            # option it does not know would be read from anywhere, uploads and data root aside
            raise SpecError(
                f"{p}.{name}: backend {backend} declares a file option that is not in "
                "kolm_compile.spec.FILE_FIELDS (the one file resolver); add it there"
            )
        for key, value in raw.items():
            if key not in shared and key not in own and value is not None:
                users = "/".join(sorted(owners[key]))
                raise SpecError(f"{p}.{key}: only used by backend {users}, not {backend}")
        options = from_mapping(options_cls, {k: v for k, v in raw.items() if k in own})
        given = {k: v for k, v in raw.items() if k in shared and v is not None}
        return cls(**given, options=options, **extra)

    def flat(self) -> dict[str, Any]:
        """The shared fields and the backend's options in one mapping, as a spec writes
        them (``None`` for what is not set)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "options"}
        assert self.options is not None
        out.update({f.name: getattr(self.options, f.name) for f in fields(self.options)})
        return out


_TRAIN_DEFAULTS = _train.TrainConfig()

#: ``student.kind`` values: ``auto`` and the kinds a student may be
#: (kolm_compile._train.STUDENT_KINDS)
STUDENT_KINDS = ("auto", *_train.STUDENT_KINDS)
#: the default base model of the encoder students (classifier, span_tagger)
ENCODER_BASE_MODEL = _TRAIN_DEFAULTS.base_model
#: the default base model of the generative student (causal_lm)
CAUSAL_LM_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
#: the layers a causal LM student puts LoRA adapters on (Llama-style attention projections)
CAUSAL_LM_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
#: the span tagger's LoRA targets: every linear layer of the encoder (attention query, key,
#: value and the three ``dense`` layers). Measured on SNIPS (2,000 rows, 10 epochs): 79.6
#: exact match with LoRA on query/value/key/dense vs 72.6 on query/value alone (bench/
#: tagger_probe.py, docs/BENCHMARKS.md)
TAGGER_TARGET_MODULES = ("query", "key", "value", "dense")
_KIND_TARGET_MODULES = {
    "causal_lm": CAUSAL_LM_TARGET_MODULES,
    "span_tagger": TAGGER_TARGET_MODULES,
}
#: default ``student.max_new_tokens`` of a causal_lm student
DEFAULT_MAX_NEW_TOKENS = _TRAIN_DEFAULTS.max_new_tokens


def default_base_model(kind: str) -> str:
    """The base model a student of ``kind`` gets when the spec names none."""
    return CAUSAL_LM_BASE_MODEL if kind == "causal_lm" else ENCODER_BASE_MODEL


def _check_gate_k(k: Any) -> int | None:
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 100):
        invalid(f"want an integer in [1, 100], got {k!r}")
    return k


@section
class StudentSpec(Section):
    """The small model trained on the verified labels: which kind, on which base, how.

    ``kind: auto`` is resolved by the task spec (:meth:`resolved`); a :class:`TaskSpec`
    holds the resolved kind, its base model and (causal_lm) ``max_new_tokens``, so
    ``to_dict`` and the training digest record what is trained.
    """

    PATH: ClassVar[str] = "spec.student"

    kind: Annotated[str, string(STUDENT_KINDS)] = field(
        default="auto",
        metadata=_help(
            "auto | classifier | causal_lm | span_tagger; auto: classify → classifier, "
            "extract → span_tagger when the schema allows it else causal_lm, generate → "
            "causal_lm"
        ),
    )
    chosen_by: Annotated[str | None, optional(string(("auto",)))] = field(
        default=None,
        metadata=_help(
            'set when loading resolves kind auto ("auto"): the manifest and the artifact '
            "receipt say the kind was chosen, with the reason"
        ),
    )
    # base_model .. batch_size: the trainer's own checks (TrainConfig), with our field path
    base_model: Annotated[str | None, _CHECKED_LATER] = field(
        default=None,
        metadata=_help(
            f"logical id of the base model; default {ENCODER_BASE_MODEL} (classifier, "
            f"span_tagger), {CAUSAL_LM_BASE_MODEL} (causal_lm)"
        ),
    )
    max_new_tokens: Annotated[int | None, _CHECKED_LATER] = field(
        default=None,
        metadata=_help(
            f"causal_lm: the most tokens one output may have (default {DEFAULT_MAX_NEW_TOKENS})"
        ),
    )
    lora_r: Annotated[int, _CHECKED_LATER] = field(
        default=_TRAIN_DEFAULTS.lora_r, metadata=_help("LoRA rank")
    )
    epochs: Annotated[int, _CHECKED_LATER] = field(
        default=_TRAIN_DEFAULTS.epochs, metadata=_help("passes over the labels")
    )
    learning_rate: Annotated[float, _CHECKED_LATER] = field(
        default=_TRAIN_DEFAULTS.learning_rate, metadata=_help("peak AdamW learning rate")
    )
    max_length: Annotated[int, _CHECKED_LATER] = field(
        default=_TRAIN_DEFAULTS.max_length, metadata=_help("token limit per input")
    )
    batch_size: Annotated[int, _CHECKED_LATER] = field(
        default=_TRAIN_DEFAULTS.batch_size, metadata=_help("examples per optimizer step")
    )
    confidence_threshold: Annotated[float, number(0.0, 1.0)] = field(
        default=0.5, metadata=_help("inference escalates to the teacher below this confidence")
    )
    target_cover_k_score: Annotated[float | None, optional(number(0.0, 100.0))] = field(
        default=None,
        metadata=_help(
            "K-score promised on the inputs the student keeps (the cover): the compile holds "
            "out a calibration split and picks the gate thresholds (calibrated probability, "
            "kNN similarity) with the largest coverage meeting it; unset: confidence_threshold"
        ),
    )
    gate_k: Annotated[int | None, PlainValidator(_check_gate_k)] = field(
        default=None, metadata=_help("neighbour rank of the kNN distance gate (default 5)")
    )

    def __post_init__(self) -> None:
        p = self.PATH
        if self.kind not in ("auto", "causal_lm") and self.max_new_tokens is not None:
            raise SpecError(f"{p}.max_new_tokens: only used by kind causal_lm, not {self.kind}")
        # the trainer's own checks, with our field path (auto: as the kind it will most
        # likely be; TaskSpec resolves it and checks again)
        self._config("classifier" if self.kind == "auto" else self.kind, 0)

    def resolved(self, task: str, output_schema: Mapping[str, Any] | None = None) -> StudentSpec:
        """This section with ``kind: auto`` resolved for ``task`` (and its output schema)
        and the kind's defaults filled in: ``base_model``, and ``max_new_tokens`` for
        causal_lm. Raises :class:`SpecError` naming ``spec.student.kind`` for a kind the
        task cannot train: classifier needs classify; span_tagger needs extract and a
        schema whose every field is a grounded string or a single enum
        (:func:`kolm_compile.structured.span_schema`; the message names the first field
        that is not)."""
        p = self.PATH
        schema = thaw(output_schema) if output_schema is not None else None
        kind = self.kind
        if kind == "auto":
            if task == "classify":
                kind = "classifier"
            elif task == "extract" and schema is not None and span_schema(schema):
                kind = "span_tagger"
            else:
                kind = "causal_lm"
        if kind == "classifier" and task != "classify":
            raise SpecError(f"{p}.kind: classifier needs task classify, not {task}")
        if kind == "span_tagger":
            if task != "extract":
                raise SpecError(f"{p}.kind: span_tagger needs task extract, not {task}")
            assert schema is not None  # TaskSpec requires output_schema for extract
            bad = _first_untaggable(schema)
            if bad is not None:
                raise SpecError(
                    f"{p}.kind: span_tagger needs every field of spec.output_schema to be a "
                    f"grounded string (x-kolm-grounded) or a single enum; {bad}"
                )
        changes: dict[str, Any] = {"kind": kind}
        if self.kind == "auto":
            changes["chosen_by"] = "auto"
        if self.base_model is None:
            changes["base_model"] = default_base_model(kind)
        if kind == "causal_lm" and self.max_new_tokens is None:
            changes["max_new_tokens"] = DEFAULT_MAX_NEW_TOKENS
        return replace(self, **changes)

    def train_config(self, seed: int) -> _train.TrainConfig:
        """The :class:`~kolm_compile._train.TrainConfig` these settings mean: the kind, its
        base model, ``max_new_tokens`` (causal_lm) and the LoRA target modules of the kind
        (:data:`CAUSAL_LM_TARGET_MODULES` for causal_lm, :data:`TAGGER_TARGET_MODULES` for
        span_tagger, the encoder's query/value otherwise). Requires
        a resolved kind (:meth:`resolved`; a :class:`TaskSpec`'s student is)."""
        if self.kind == "auto":
            raise SpecError(
                f"{self.PATH}.kind: auto is resolved by the task (TaskSpec holds the resolved "
                "kind); call StudentSpec.resolved(task, output_schema) first"
            )
        return self._config(self.kind, seed)

    def _config(self, kind: str, seed: int) -> _train.TrainConfig:
        try:
            return _train.TrainConfig(
                kind=kind,
                max_new_tokens=(
                    DEFAULT_MAX_NEW_TOKENS if self.max_new_tokens is None else self.max_new_tokens
                ),
                base_model=self.base_model or default_base_model(kind),
                target_modules=_KIND_TARGET_MODULES.get(kind, _TRAIN_DEFAULTS.target_modules),
                lora_r=self.lora_r,
                epochs=self.epochs,
                learning_rate=self.learning_rate,
                max_length=self.max_length,
                batch_size=self.batch_size,
                seed=seed,
            )
        except SpecError as e:
            raise SpecError(f"{self.PATH}.{e}") from e


def _first_untaggable(schema: Mapping[str, Any]) -> str | None:
    """Why ``schema`` is not one a span tagger can produce (its first field that is neither
    a grounded string nor a single enum), or ``None`` when it is."""
    fs = schema_fields(schema)
    if not fs:
        return "it has no fields"
    for f in fs:
        where = f.path or "/ (the whole output)"
        if f.kind == "other":
            return f"field {where} is not (neither a grounded string nor an enum)"
        if f.kind == "enum" and f.many:
            return f"field {where} is not (an enum inside an array: several values)"
    return None


@section
class DataSpec(Section):
    """Where the inputs and labelled pairs come from."""

    PATH: ClassVar[str] = "spec.data"

    seed_pairs: Annotated[Path | None, optional(table_path())] = field(
        default=None, metadata=_help("labelled pairs (CSV/JSONL)")
    )
    unlabeled: Annotated[Path | None, optional(table_path())] = field(
        default=None, metadata=_help("inputs for the teacher")
    )
    holdout: Annotated[Path | None, optional(table_path())] = field(
        default=None, metadata=_help("labelled pairs for the K-score")
    )
    text_column: Annotated[str, text()] = field(
        default="text", metadata=_help("column with the input text")
    )
    label_column: Annotated[str, text()] = field(
        default="label", metadata=_help("classify: column with the label")
    )
    output_column: Annotated[str, text()] = field(
        default="output",
        metadata=_help(
            "extract/generate: column with the reference output (JSON Lines: an object or "
            "JSON text for extract; CSV: JSON text for extract)"
        ),
    )
    limit_per_label: Annotated[int | None, optional(integer(1))] = field(
        default=None, metadata=_help("classify: rows kept per label")
    )
    labels: Annotated[tuple[str, ...] | None, optional(label_list())] = field(
        default=None, metadata=_help("classify: keep only rows with these labels")
    )

    def column(self, task: str) -> str:
        """The column holding the reference answer of ``task``: ``label_column`` for
        classify, ``output_column`` for extract and generate."""
        return self.label_column if task == "classify" else self.output_column

    def __post_init__(self) -> None:
        if self.seed_pairs is None and self.unlabeled is None:
            raise SpecError(f"{self.PATH}: needs seed_pairs or unlabeled")


@section
class BudgetSpec(Section):
    """What teacher calls may cost."""

    PATH: ClassVar[str] = "spec.budget"

    max_teacher_calls: Annotated[int | None, optional(integer(1))] = field(
        default=None,
        metadata=_help(
            "billed requests (HTTP 200) a job may make over all its runs; unset: no limit"
        ),
    )
    max_teacher_samples: Annotated[int | None, optional(integer(1))] = field(
        default=None, metadata=_help("samples a job may buy over all its runs; unset: no limit")
    )
    max_cost: Annotated[float | None, optional(number(0.0, 1e9, lo_open=True))] = field(
        default=None,
        metadata=_help(
            "dollars a job may spend at these prices over all its runs; unset: no limit"
        ),
    )
    price_per_1k_input_tokens: Annotated[float, number(0.0, 1e9)] = field(
        default=0.0, metadata=_help("price of 1000 prompt tokens")
    )
    price_per_1k_output_tokens: Annotated[float, number(0.0, 1e9)] = field(
        default=0.0, metadata=_help("price of 1000 completion tokens")
    )

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        """The price of that many tokens."""
        return (
            input_tokens * self.price_per_1k_input_tokens
            + output_tokens * self.price_per_1k_output_tokens
        ) / 1000.0


@section
class RecallSpec(Section):
    """A recall index to ship in the ``.kolm`` (see docs/RECALL.md and kolm_compile.recall).

    ``source: documents`` (the default when ``corpus`` is given) chunks the corpus;
    ``source: examples`` indexes the acknowledged training examples (classify only).
    """

    PATH: ClassVar[str] = "spec.recall"

    corpus: Annotated[
        Path | None, optional(file_path((), "a path (a .jsonl file or a folder)"))
    ] = field(
        default=None,
        metadata=_help('a JSONL of {"id", "text"} documents or a folder of files'),
    )
    source: Annotated[str | None, optional(string(("documents", "examples")))] = field(
        default=None,
        metadata=_help("documents (the corpus, default) | examples (the training examples)"),
    )
    chunk_size: Annotated[int | None, _CHECKED_LATER] = field(
        default=None, metadata=_help("units per chunk (200)")
    )
    chunk_overlap: Annotated[int | None, _CHECKED_LATER] = field(
        default=None, metadata=_help("units shared by neighbouring chunks (min(40, size // 5))")
    )
    chunk_unit: Annotated[str | None, _CHECKED_LATER] = field(
        default=None, metadata=_help("words (default) | chars")
    )
    k: Annotated[int, _CHECKED_LATER] = field(
        default=5, metadata=_help(f"chunks a prediction retrieves by default, 1..{RECALL_K_MAX}")
    )

    def __post_init__(self) -> None:
        p = self.PATH

        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        if self.source is None and self.corpus is not None:
            put("source", "documents")
        if self.source is None:
            raise SpecError(
                f"{p}: needs corpus (a JSONL of {{id, text}} or a folder) or source: examples"
            )
        chunk_fields = ("chunk_size", "chunk_overlap", "chunk_unit")
        if self.source == "examples":
            if self.corpus is not None:
                raise SpecError(
                    f"{p}.corpus: not used with source examples (the training examples are "
                    "the corpus); drop one of them"
                )
            for name in chunk_fields:
                if getattr(self, name) is not None:
                    raise SpecError(f"{p}.{name}: only used with a corpus (source documents)")
        else:
            if self.corpus is None:
                raise SpecError(f"{p}.corpus: required for source documents")
            size = 200 if self.chunk_size is None else self.chunk_size
            size = at(f"{p}.chunk_size", check_int, size, 1)
            if size > 100_000:
                raise SpecError(f"{p}.chunk_size: must be <= 100000, got {size}")
            overlap = min(40, size // 5) if self.chunk_overlap is None else self.chunk_overlap
            overlap = at(f"{p}.chunk_overlap", check_int, overlap, 0)
            if overlap >= size:
                raise SpecError(f"{p}.chunk_overlap: must be < chunk_size ({size}), got {overlap}")
            unit = "words" if self.chunk_unit is None else self.chunk_unit
            put("chunk_unit", at(f"{p}.chunk_unit", check_str, unit, ("words", "chars")))
            put("chunk_size", size)
            put("chunk_overlap", overlap)
        put("k", at(f"{p}.k", check_int, self.k, 1, RECALL_K_MAX))

    def chunk_config(self) -> Any:
        """The corpus chunking as a :class:`kolm_compile.recall.ChunkConfig` (documents only)."""
        from kolm_compile.recall import ChunkConfig

        assert self.source == "documents"
        return ChunkConfig(
            size=int(self.chunk_size or 200),
            overlap=int(self.chunk_overlap or 0),
            unit=str(self.chunk_unit or "words"),
        )

    def check_corpus(self) -> None:
        """Raise :class:`SpecError` (``spec.recall.corpus: ...``) unless the corpus exists:
        a ``.jsonl``/``.ndjson`` file or a folder."""
        p, c = self.PATH, self.corpus
        if c is None:
            return
        if c.is_dir():
            return
        if not c.is_file():
            raise SpecError(f"{p}.corpus: file or folder not found: {c}")
        if c.suffix.lower() not in _CORPUS_SUFFIXES:
            raise SpecError(
                f"{p}.corpus: must be a {', '.join(_CORPUS_SUFFIXES)} file or a folder, "
                f"got {c.name!r}"
            )

    def corpus_chunks(self) -> list[Any]:
        """The corpus cut into :class:`kolm_compile.recall.Chunk` s (documents only).

        Raises :class:`SpecError` naming ``spec.recall.corpus`` and the problem (missing,
        unreadable, a bad line, a duplicate or empty id, no documents, no text at all).
        """
        from kolm_compile.recall import chunk_documents, load_corpus

        p = self.PATH
        self.check_corpus()
        assert self.corpus is not None
        try:
            chunks = chunk_documents(load_corpus(self.corpus), self.chunk_config())
        except InvalidInput as e:
            raise SpecError(f"{p}.corpus: {e}") from e
        except (OSError, UnicodeDecodeError) as e:
            raise SpecError(f"{p}.corpus: cannot read {self.corpus}: {e}") from e
        if not chunks:
            raise SpecError(f"{p}.corpus: gives no chunk (every document is empty)")
        return chunks


# --------------------------------------------------------------------------- the task spec


#: Every file a spec section points at: (dotted field, section attribute, field name).
#: :meth:`TaskSpec.from_dict` sends each through one resolver (and ``output_schema``, which
#: may name a file too); tests/compile/test_compile_intake.py checks that every ``Path`` field of
#: every section is listed here.
FILE_FIELDS = (
    ("data.holdout", "data", "holdout"),
    ("data.seed_pairs", "data", "seed_pairs"),
    ("data.unlabeled", "data", "unlabeled"),
    ("teacher.dataset", "teacher", "dataset"),
    ("teacher.path", "teacher", "path"),
    ("recall.corpus", "recall", "corpus"),
)
#: TaskSpec fields a spec file may not set (they say where it came from)
_INTERNAL = frozenset({"base_dir", "file_refs"})
_TEACHER_FILES = frozenset(name for _, attr, name in FILE_FIELDS if attr == "teacher")
_SECTIONS: dict[str, type[Section]] = {
    "budget": BudgetSpec,
    "data": DataSpec,
    "recall": RecallSpec,
    "student": StudentSpec,
    "teacher": TeacherSpec,
    "verifier": VerifierSpec,
}


def _check_base_dir(v: Any) -> Path:
    if not isinstance(v, str | Path):
        invalid(f"must be a path, got {v!r}")
    return Path(os.path.abspath(v))


_Sec = TypeVar("_Sec")


@section
class TaskSpec(Section):
    """A whole task spec; see the module docstring for the schema."""

    PATH: ClassVar[str] = "spec"
    INTERNAL: ClassVar[frozenset[str]] = _INTERNAL

    name: Annotated[str, pattern(_NAME.pattern, "a name matching [a-z0-9][a-z0-9-_]{0,63}")] = (
        field(metadata=_help("job name: [a-z0-9][a-z0-9-_]{0,63}"))
    )
    task: Annotated[str, string(TASK_TYPES)] = field(
        metadata=_help("classify | extract | generate")
    )
    teacher: Annotated[TeacherSpec, instance_of(TeacherSpec)] = field(
        metadata=_help("the teacher section")
    )
    data: Annotated[DataSpec, instance_of(DataSpec)] = field(metadata=_help("the data section"))
    labels: Annotated[tuple[str, ...] | None, optional(label_list(min_len=2))] = field(
        default=None, metadata=_help("classify: label set")
    )
    none_label: Annotated[str | None, _CHECKED_LATER] = field(
        default=None,
        metadata=_help(
            "classify: the label (one of labels) meaning 'none of the others': the teacher "
            "prompt offers it, the student learns it, callers receive it as an answer"
        ),
    )
    output_schema: Annotated[Mapping[str, Any] | None, optional(json_mapping())] = field(
        default=None,
        metadata=_help("extract: JSON Schema (Draft 2020-12) of the output, one JSON object"),
    )
    instructions: Annotated[str | None, optional(text())] = field(
        default=None, metadata=_help("what the teacher is asked")
    )
    verifier: Annotated[VerifierSpec | None, optional(instance_of(VerifierSpec))] = field(
        default=None, metadata=_help("the verifier section")
    )
    student: Annotated[StudentSpec, instance_of(StudentSpec)] = field(
        default_factory=StudentSpec, metadata=_help("the student section")
    )
    budget: Annotated[BudgetSpec, instance_of(BudgetSpec)] = field(
        default_factory=BudgetSpec, metadata=_help("the budget section")
    )
    recall: Annotated[RecallSpec | None, optional(instance_of(RecallSpec))] = field(
        default=None, metadata=_help("the recall section (a recall index in the .kolm)")
    )
    seed: Annotated[int, integer(0, MAX_SEED - 1)] = field(
        default=0, metadata=_help("seed for every random choice of the job")
    )
    base_dir: Annotated[Path, PlainValidator(_check_base_dir)] = field(
        default=Path("."), compare=False, metadata=_help("directory relative paths start from")
    )
    file_refs: Annotated[Mapping[str, str], _CHECKED_LATER] = field(
        default_factory=dict,
        compare=False,
        metadata=_help("dotted file field → the reference to_dict() records (e.g. sha256:<hex>)"),
    )

    def __post_init__(self) -> None:
        p = self.PATH
        task = self.task

        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        # (1) what the task type needs
        if task == "classify" and self.labels is None:
            raise SpecError(f"{p}.labels: required for task classify")
        if task != "classify" and self.labels is not None:
            raise SpecError(f"{p}.labels: only used by task classify, not {task}")
        if self.none_label is not None:
            if task != "classify":
                raise SpecError(f"{p}.none_label: only used by task classify, not {task}")
            if self.none_label not in (self.labels or ()):
                raise SpecError(
                    f"{p}.none_label: {str(self.none_label)[:80]!r} is not one of labels; "
                    "list it there too (the student learns it as a class)"
                )
        if task == "extract" and self.output_schema is None:
            raise SpecError(f"{p}.output_schema: required for task extract")
        if task != "extract" and self.output_schema is not None:
            raise SpecError(f"{p}.output_schema: only used by task extract, not {task}")
        if self.output_schema is not None:
            _check_output_schema(thaw(self.output_schema))
        if task != "classify":
            for name in ("limit_per_label", "labels"):
                if getattr(self.data, name) is not None:
                    raise SpecError(f"{p}.data.{name}: only used by task classify, not {task}")
        if self.teacher.vote == "per_field" and task != "extract":
            raise SpecError(
                f"{p}.teacher.vote: per_field needs task extract (the fields of a JSON "
                f"object), not {task}"
            )
        if getattr(self.teacher.options, "response_format", None) is not None and task != (
            "extract"
        ):
            raise SpecError(f"{p}.teacher.response_format: only used by task extract, not {task}")
        # the student: kind auto resolved, the kind's defaults filled in
        put("student", self.student.resolved(task, self.output_schema))

        # (2) the verifier, filled in from the task (building it checks the params)
        put("verifier", self._complete_verifier())

        # (3) file paths, relative to base_dir; the spec's seed for a seeded backend
        put("data", self._resolved(self.data, ("seed_pairs", "unlabeled", "holdout")))
        assert self.teacher.options is not None  # TeacherSpec fills it in
        options = self._resolved(self.teacher.options, ("path", "dataset"))
        if getattr(options, "seed", 0) is None:
            options = replace(options, **{"seed": self.seed})  # a seeded backend's
        if options is not self.teacher.options:
            put("teacher", replace(self.teacher, options=options))
        if self.data.labels is not None and self.labels is not None:
            extra = [label for label in self.data.labels if label not in self.labels]
            if extra:
                raise SpecError(f"{p}.data.labels: {extra[0]!r} is not in spec.labels")

        # (4) recall: the corpus path is relative to base_dir; examples need labels
        if self.recall is not None:
            put("recall", self._resolved(self.recall, ("corpus",)))
            if self.recall.source == "examples" and task != "classify":
                raise SpecError(
                    f"{p}.recall.source: examples needs task classify (labelled training "
                    f"examples), not {task}; give a corpus instead"
                )

    def _complete_verifier(self) -> VerifierSpec:
        """The verifier section with task-given params and defaults filled in."""
        p = self.PATH
        v = self.verifier
        want = {"classify": "label_set", "extract": "json_schema"}.get(self.task)
        if v is None:
            if want is None:
                raise SpecError(f"{p}.verifier: required for task {self.task}")
            v = VerifierSpec(want)
        if want is not None and v.name != want:
            raise SpecError(
                f"{p}.verifier.name: task {self.task} needs verifier {want}, got {v.name!r}"
            )
        params = thaw(v.params)
        given = {"label_set": ("labels", "labels"), "json_schema": ("schema", "output_schema")}
        if want in given:
            param, source = given[want]
            value = thaw(getattr(self, source))
            if param in params and params[param] != value:
                raise SpecError(f"{p}.verifier.params.{param}: must equal spec.{source}")
            params[param] = value
        return VerifierSpec(v.name, get_verifier(v.name, params).params)

    def _resolved(self, section: _Sec, names: Sequence[str]) -> _Sec:
        changes = {}
        for name in names:
            value = getattr(section, name, None)
            if isinstance(value, Path) and not value.is_absolute():
                changes[name] = Path(os.path.normpath(self.base_dir / value))
        return replace(section, **changes) if changes else section  # type: ignore[type-var]

    # ----------------------------------------------------------------------- loading

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        check_files: bool = True,
        policy: SpecPolicy | None = None,
    ) -> TaskSpec:
        """Read a YAML or JSON spec file; relative paths start at its directory.

        With ``check_files`` every referenced file must exist (``SpecError``
        naming the field otherwise). The file is parsed by :func:`load_spec_text`
        (size, alias and nesting caps); ``policy`` as in :meth:`from_dict`.
        """
        path = Path(path)
        try:
            with path.open("rb") as f:
                data = f.read(MAX_SPEC_BYTES + 1)
        except OSError as e:
            raise SpecError(f"spec: cannot read {path}: {e.strerror or e}") from e
        raw = load_spec_text(data, json_only=path.suffix.lower() == ".json", name=path.name)
        return cls.from_dict(raw, path.parent, check_files=check_files, policy=policy)

    @classmethod
    def from_dict(
        cls,
        d: Any,
        base_dir: str | os.PathLike[str],
        *,
        check_files: bool = True,
        policy: SpecPolicy | None = None,
    ) -> TaskSpec:
        """Validate a parsed spec (the inverse of :meth:`to_dict`).

        ``kolm_version`` in ``d`` is accepted and ignored; ``output_schema`` may be
        a path to a JSON file. With ``check_files`` every referenced file must
        exist. A data section naming the other task's answer column
        (``data.label_column`` outside classify, ``data.output_column`` in classify) is
        refused, naming it.

        Every file a spec names (:data:`FILE_FIELDS` and an ``output_schema`` path) goes
        through one resolver: ``policy.resolve_file`` when a ``policy`` is given (the
        compile service's: uploads and its data root only, see kolm_compile.intake),
        else paths relative to ``base_dir``. ``policy.teacher`` fills the teacher (and
        budget) sections in from an operator's teacher profile; without a policy a
        spec naming ``teacher.profile`` is refused.
        """
        if not isinstance(d, Mapping):
            raise SpecError(f"spec: must be a mapping, got {type(d).__name__!r}")
        raw = {k: v for k, v in d.items() if k != "kolm_version"}
        base = Path(base_dir)
        resolve = policy.resolve_file if policy is not None else _local_resolver(base)
        refs: dict[str, str] = {}
        if raw.get("output_schema") is not None and not isinstance(raw["output_schema"], Mapping):
            where, _ = resolve("spec.output_schema", raw["output_schema"])
            if isinstance(where, Path):
                raw["output_schema"] = _load_output_schema(where)
        _check_task_column(raw)
        for dotted, attr, name in FILE_FIELDS:
            section = raw.get(attr)
            if isinstance(section, Mapping) and section.get(name) is not None:
                where, ref = resolve(f"spec.{dotted}", section[name])
                raw[attr] = {**section, name: where}
                if ref is not None:
                    refs[dotted] = ref
        teacher = raw.get("teacher")
        if policy is not None and isinstance(teacher, Mapping):
            budget = raw.get("budget")
            raw["teacher"], new_budget = policy.teacher(
                teacher, budget if isinstance(budget, Mapping) else None
            )
            if new_budget is not None:
                raw["budget"] = new_budget
        elif isinstance(teacher, Mapping) and teacher.get("profile") is not None:
            raise SpecError(
                "spec.teacher.profile: teacher profiles are the operator's (kolm compile serve "
                "--teachers FILE); for a local run give kolm compile run --teachers FILE"
            )
        for name, section in _SECTIONS.items():
            if raw.get(name) is not None:
                raw[name] = section.from_mapping(raw[name])
        spec = cls.from_mapping(raw, base_dir=base, file_refs=refs)
        if check_files:
            spec.check_files()
        return spec

    def files(self) -> dict[str, Path]:
        """Dotted field → absolute path, for every file the spec points at."""
        out = {}
        for dotted, attr, name in FILE_FIELDS:
            value = getattr(getattr(self, attr), name, None)
            if value is not None:
                out[dotted] = value
        return out

    def check_files(self) -> None:
        """Raise :class:`SpecError` naming the field of the first missing file.

        A recall corpus may be a folder; it is also read and chunked here, so a bad
        corpus entry (duplicate id, empty file, bad line) is reported at load time.
        """
        for dotted, path in self.files().items():
            if dotted == "recall.corpus":
                continue
            if not path.is_file():
                raise SpecError(f"spec.{dotted}: file not found: {path}")
        if self.recall is not None and self.recall.corpus is not None:
            self.recall.corpus_chunks()

    def build_verifier(self) -> Verifier:
        """The task's verifier."""
        assert self.verifier is not None
        return self.verifier.build()

    # ----------------------------------------------------------------------- serializing

    def to_dict(self, *, with_file_digests: bool = False) -> dict[str, Any]:
        """Deterministic JSON-ready form: sorted keys, unset fields left out,
        paths relative to ``base_dir`` (POSIX), ``kolm_version`` stamped.

        With ``with_file_digests`` a ``files`` entry maps each referenced file's
        dotted field to its SHA-256 (the files must exist).
        """
        out: dict[str, Any] = {"kolm_version": kolm_version()}
        for f in fields(self):
            if f.name in _INTERNAL:
                continue
            value = getattr(self, f.name)
            if value is None:
                continue
            if f.name == "verifier":
                value = self.verifier.to_dict()  # type: ignore[union-attr]
            elif isinstance(value, Section):
                items = (
                    value.flat()
                    if isinstance(value, TeacherSpec)
                    else {g.name: getattr(value, g.name) for g in fields(value)}  # type: ignore[arg-type]
                )
                if isinstance(value, DataSpec):  # only the task's own answer column
                    other = {n for n in _TASK_COLUMNS if n != _task_column(self.task)}
                    items = {n: v for n, v in items.items() if n not in other}
                value = {
                    name: self.file_refs.get(f"{f.name}.{name}", self._relative(item))
                    for name, item in items.items()
                    if item is not None
                }
            out[f.name] = value
        if with_file_digests:
            out["files"] = {dotted: _file_sha256(dotted, p) for dotted, p in self.files().items()}
        plain: dict[str, Any] = thaw(out)
        return plain

    def _relative(self, value: Any) -> Any:
        if isinstance(value, Path):
            return Path(os.path.relpath(value, self.base_dir)).as_posix()
        return value

    def digest(self) -> str:
        """Hex SHA-256 of RFC 8785 canonical ``to_dict(with_file_digests=True)``."""
        return hashlib.sha256(rfc8785.dumps(self.to_dict(with_file_digests=True))).hexdigest()

    def identity(self) -> dict[str, str]:
        """What makes a compile job this job: part name → SHA-256 (RFC 8785 canonical).

        Parts: ``task`` (name, type, labels, schema, instructions, verifier, seed),
        ``data`` (the data section and its files' digests), ``teacher`` (the teacher
        section without the options its backend marks operational, plus a replay or
        simulated teacher's file digest) and ``recall``. Left out: the budget and the
        teacher's operational settings (:data:`OPERATIONAL_TEACHER_FIELDS`: timeouts,
        retries, concurrency, batching), which a job may change between runs, and the
        student section, whose change re-runs training only (:meth:`training_digest`).
        ``kolm_version`` is left out too, and so is ``teacher.vote`` when it is ``exact``
        (the vote of every job before the field existed): a job an older kolm started keeps
        its identity.
        """
        d = self.to_dict(with_file_digests=True)
        files = d.pop("files", {})
        d.pop("kolm_version", None)
        d.pop("budget", None)
        d.pop("student", None)
        assert self.teacher.options is not None
        operational = {
            f.name for f in fields(self.teacher.options) if f.metadata.get("operational")
        }
        teacher = {k: v for k, v in d.pop("teacher").items() if k not in operational}
        if teacher.get("vote") == "exact":
            # the one vote before teacher.vote existed: a job an older kolm started resumes
            del teacher["vote"]
        parts: dict[str, Any] = {
            "data": {**(d.pop("data", None) or {}), "files": {
                k: v for k, v in files.items() if k.startswith("data.")}},
            "teacher": {**teacher, "files": {
                k: v for k, v in files.items() if k.startswith("teacher.")}},
            "recall": {**(d.pop("recall", None) or {}), "files": {
                k: v for k, v in files.items() if k.startswith("recall.")}},
        }  # fmt: skip
        parts["task"] = d
        return {k: hashlib.sha256(rfc8785.dumps(v)).hexdigest() for k, v in sorted(parts.items())}

    def identity_digest(self) -> str:
        """Hex SHA-256 of canonical :meth:`identity`: a job folder holds one such job."""
        return hashlib.sha256(rfc8785.dumps(self.identity())).hexdigest()

    def training_digest(self) -> str:
        """Hex SHA-256 of the canonical student section: when it changes, a job re-runs
        training, evaluation and packaging only."""
        return hashlib.sha256(rfc8785.dumps(self.to_dict().get("student", {}))).hexdigest()


#: teacher fields a job may change between runs without becoming another job: the options
#: each registered backend marks ``operational`` (openai: timeout_s, max_retries,
#: concurrency, batch_samples)
OPERATIONAL_TEACHER_FIELDS = frozenset(
    f.name
    for backend in teacher_backends()
    for f in fields(teacher_options(backend))
    if f.metadata.get("operational")
)


def _file_sha256(dotted: str, path: Path) -> str:
    if path.is_dir():
        return _folder_sha256(dotted, path)
    h = hashlib.sha256()
    try:
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as e:
        raise SpecError(f"spec.{dotted}: cannot read {path}: {e.strerror or e}") from e
    return h.hexdigest()


def _folder_sha256(dotted: str, path: Path) -> str:
    """SHA-256 over ``relative POSIX path NUL file SHA-256 LF`` of every file a corpus
    folder holds (the files :func:`kolm_compile.recall.load_corpus` reads, in its order)."""
    h = hashlib.sha256()
    files = []
    for f in path.rglob("*"):
        rel = f.relative_to(path)
        if any(part.startswith(".") for part in rel.parts) or not f.is_file():
            continue
        files.append((rel.as_posix(), f))
    for rel_name, f in sorted(files):
        h.update(rel_name.encode("utf-8") + b"\0")
        h.update(_file_sha256(dotted, f).encode() + b"\n")
    return h.hexdigest()


def _load_output_schema(path: Path) -> Any:
    """The JSON Schema a spec's ``output_schema`` path names (:class:`SpecError` naming
    ``spec.output_schema`` when it cannot be read or is not JSON)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise SpecError(f"spec.output_schema: cannot read {path}: {e.strerror or e}") from e
    except ValueError as e:
        raise SpecError(f"spec.output_schema: {path.name} is not JSON: {e}") from e


def _check_output_schema(schema: Any) -> None:
    """A Draft 2020-12 JSON Schema of one JSON object, or :class:`SpecError` naming
    ``spec.output_schema``."""
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as e:
        where = "".join(f"/{p}" for p in e.path)
        raise SpecError(
            f"spec.output_schema: not a valid JSON Schema (Draft 2020-12)"
            f"{' at ' + where if where else ''}: {e.message}"
        ) from None
    if schema.get("type") != "object":
        raise SpecError(
            f'spec.output_schema.type: must be "object" (an extract output is one JSON '
            f"object), got {schema.get('type')!r}"
        )


#: the data column each task reads its reference answers from, and the other's
_TASK_COLUMNS = ("label_column", "output_column")


def _task_column(task: Any) -> str:
    return "label_column" if task == "classify" else "output_column"


def _check_task_column(raw: Mapping[str, Any]) -> None:
    """Refuse a data section that names the other task's answer column."""
    data, task = raw.get("data"), raw.get("task")
    if not isinstance(data, Mapping) or task not in TASK_TYPES:
        return
    own = _task_column(task)
    for name in _TASK_COLUMNS:
        if name != own and data.get(name) is not None:
            raise SpecError(
                f"spec.data.{name}: not used by task {task}; its reference answers are in "
                f"data.{own}"
            )


# --------------------------------------------------------------------------- where files come from


class SpecPolicy(Protocol):
    """What a spec may name, when it is not the operator's own (kolm_compile.intake).

    ``resolve_file(field, value)`` turns the value a spec gives a file field (dotted
    ``spec.…`` name) into ``(path to read, reference to record or None)``, or raises
    :class:`SpecError` naming the field; ``teacher(raw_teacher, raw_budget)`` returns
    the teacher section (and the budget section, or None to leave it) after applying
    the operator's teacher profile, or raises :class:`SpecError` naming the field.
    """

    def resolve_file(self, field: str, value: Any) -> tuple[Any, str | None]: ...

    def teacher(
        self, raw: Mapping[str, Any], budget: Mapping[str, Any] | None
    ) -> tuple[dict[str, Any], dict[str, Any] | None]: ...


def _local_resolver(base: Path) -> Any:
    """The resolver of a spec the operator runs (``kolm compile run``): any path, relative
    ones starting at ``base``. A value that is not a path is left for the field's check."""

    def resolve(field: str, value: Any) -> tuple[Any, str | None]:
        if isinstance(value, str) and value.strip():
            value = Path(value)
        if isinstance(value, Path) and not value.is_absolute():
            value = Path(os.path.normpath(Path(os.path.abspath(base)) / value))
        return value, None

    return resolve


# --------------------------------------------------------------------------- parsing the text

#: the largest spec text, in bytes, that is parsed at all
MAX_SPEC_BYTES = 1 << 20
#: the most YAML aliases (``*name``) a spec may use
MAX_SPEC_ALIASES = 100
#: the most YAML nodes a spec may hold with every alias expanded
MAX_SPEC_NODES = 100_000
#: the deepest nesting of mappings and lists a spec may have
MAX_SPEC_DEPTH = 64


def load_spec_text(text: str | bytes, *, json_only: bool = False, name: str = "spec") -> Any:
    """Parse a spec's text (YAML, or JSON with ``json_only``) into plain Python values.

    The one spec parser of the local and the service paths. It refuses, with a
    :class:`SpecError` starting ``spec:``, before any expansion: text over
    :data:`MAX_SPEC_BYTES`, more than :data:`MAX_SPEC_ALIASES` aliases, more than
    :data:`MAX_SPEC_NODES` nodes once aliases are expanded (an alias "bomb": a few
    hundred bytes that expand to millions of values), a recursive alias, nesting deeper
    than :data:`MAX_SPEC_DEPTH`, duplicate keys, and text that is not UTF-8.
    """
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    if len(data) > MAX_SPEC_BYTES:
        raise SpecError(
            f"spec: {name} is larger than {MAX_SPEC_BYTES} bytes (1 MiB), the most a spec may be"
        )
    try:
        decoded = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(f"spec: {name} is not UTF-8 text") from e
    try:
        if json_only:
            return json.loads(decoded)
        return yaml.load(decoded, _StrictLoader)
    except RecursionError as e:
        raise SpecError(f"spec: {name} is nested too deeply") from e
    except (ValueError, yaml.YAMLError) as e:
        raise SpecError(f"spec: {name} does not parse: {e}") from e


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys instead of keeping the last one, and counts
    aliases, expanded nodes and depth while it composes (caps in :func:`load_spec_text`)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        st = self.__dict__.setdefault("_kolm", {"aliases": 0, "nodes": 0, "depth": 0, "size": {}})
        mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
        where = f"line {mark.line + 1}"
        if self.check_event(yaml.AliasEvent):
            st["aliases"] += 1
            if st["aliases"] > MAX_SPEC_ALIASES:
                raise SpecError(
                    f"spec: more than {MAX_SPEC_ALIASES} YAML aliases ({where}); "
                    "a spec may use at most that many"
                )
            node = super().compose_node(parent, index)
            size = st["size"].get(id(node))
            if size is None:
                raise SpecError(f"spec: recursive YAML alias ({where})")
            self._kolm_count(st, size, where)
            return node
        st["depth"] += 1
        if st["depth"] > MAX_SPEC_DEPTH:
            raise SpecError(f"spec: nested deeper than {MAX_SPEC_DEPTH} levels ({where})")
        before = st["nodes"]
        node = super().compose_node(parent, index)
        st["depth"] -= 1
        self._kolm_count(st, 1, where)
        st["size"][id(node)] = st["nodes"] - before
        return node

    @staticmethod
    def _kolm_count(st: dict[str, Any], n: int, where: str) -> None:
        st["nodes"] += n
        if st["nodes"] > MAX_SPEC_NODES:
            raise SpecError(
                f"spec: more than {MAX_SPEC_NODES} values with its aliases expanded ({where}); "
                "a spec may hold at most that many"
            )


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
# YAML 1.1 reads "3e-4" (no dot) as a string; read it as the float people mean.
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)
