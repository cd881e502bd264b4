"""Teachers: the models that label inputs, k samples at a time.

One registry; each backend is a class registered with :func:`register_teacher`
and built from the spec's teacher section with :func:`build_teacher`::

    >>> from kolm_compile.spec import TaskSpec
    >>> from kolm_compile.teachers import build_teacher
    >>> spec = TaskSpec.load("kolm_compile/examples/banking77-router.yaml")  # doctest: +SKIP
    >>> teacher = build_teacher(spec.teacher, spec)                          # doctest: +SKIP
    >>> [s.text for s in teacher.sample("ex-1", "my card has not arrived yet", 3, spec)]  # doctest: +SKIP
    ['card_arrival', 'card_arrival', 'activate_my_card']

Every teacher offers ``describe()`` (backend, model, sampling params: what a
label receipt records; never a secret), ``sample(prompt_id, input_text, k,
task, first_index=0)`` and ``sample_many(requests, task, on_result=None)``.
Samples are numbered: ``sample(..., k=3, first_index=2)`` returns samples 2, 3
and 4 of that input, which lets the response cache ask only for the samples it
lacks and lets deterministic backends (replay, simulated) give the same sample
for the same number whatever the batching.

Backends:

- ``openai``: any OpenAI-compatible ``POST {endpoint}/v1/chat/completions``
  (httpx; one retry helper, kolm_compile.retry). ``n = k`` per request (more requests if the server returns fewer
  choices), retries with exponential backoff and jitter on 429/5xx/timeouts/
  connection errors, a concurrency limit, token usage and cost accounting, and
  ``max_teacher_calls`` from the budget. The API key is read from the
  environment variable the spec names (at the compile service: the operator's teacher
  profile, kolm_compile.intake) and appears in no message, log or receipt. Errors name
  the endpoint, the input (prompt id and SHA-256) and the HTTP status, never text the
  endpoint sent (a rejected request's body goes to the service log only).
- ``transformers``: a local causal or seq2seq LM (imported lazily).
- ``replay``: responses recorded in a JSONL file, looked up by input SHA-256.
- ``simulated``: answers from gold labels with a set per-sample accuracy, wrong
  answers drawn toward similar labels. For offline demos and benchmarks only;
  ``describe()`` says ``"simulated": true``.

Token accounting: one request's prompt and completion tokens are split over the
samples it returned (integer parts that add up to the request's usage), so
summing any field over all samples gives what was billed. ``cost`` uses the
spec's budget prices; a sample served from the cache is marked ``cached`` and
its recorded tokens and cost are what it cost when it was bought.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import random
import re
import ssl
import threading
import time
import urllib.parse
import weakref
from bisect import bisect_right
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Protocol, TypeVar, runtime_checkable

import httpx
from pydantic import PlainValidator

from kolm_compile.fields import (
    MAX_SEED,
    Section,
    boolean,
    check_text,
    file_path,
    integer,
    invalid,
    key_env_name,
    number,
    optional,
    section,
    string,
    table_path,
    text,
)
from kolm_compile.retry import Backoff, Retry, retry, retry_after
from kolm_compile.structured import (
    GROUNDED_KEY,
    SchemaField,
    canonical,
    field_pairs,
    grounded_paths,
    pointer_parts,
    schema_fields,
)
from kolm_compile.tables import read_outputs, read_rows
from kolm_ledger.errors import (
    FormatError,
    InvalidInput,
    NotFoundError,
    ResourceExhaustedError,
    SpecError,
    UnavailableError,
)

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "EXTRACT_CORRUPTIONS",
    "PROMPT_VERSION",
    "RESPONSE_FORMATS",
    "SIMULATION_VERSION",
    "BaseTeacher",
    "InputRejected",
    "OpenAIOptions",
    "OpenAITeacher",
    "PromptTask",
    "ReplayOptions",
    "ReplayTeacher",
    "SampleRequest",
    "SimulatedOptions",
    "SimulatedTeacher",
    "Teacher",
    "TeacherOptions",
    "TeacherSample",
    "TeacherSection",
    "TeacherSpend",
    "TransformersOptions",
    "TransformersTeacher",
    "build_messages",
    "build_teacher",
    "input_sha256",
    "register_teacher",
    "teacher_backends",
    "teacher_options",
    "teacher_prompt",
    "trigram_similarity",
]

log = logging.getLogger(__name__)

PROMPT_VERSION = "2"
"""Bumped whenever :func:`build_messages` changes what it sends; recorded by ``describe()``."""


# --------------------------------------------------------------------------- what a teacher reads


class _Budget(Protocol):
    @property
    def max_teacher_calls(self) -> int | None: ...
    @property
    def max_teacher_samples(self) -> int | None: ...
    @property
    def max_cost(self) -> float | None: ...
    def cost(self, input_tokens: int, output_tokens: int) -> float: ...


class _Columns(Protocol):
    @property
    def text_column(self) -> str: ...
    @property
    def label_column(self) -> str: ...
    @property
    def output_column(self) -> str: ...


class PromptTask(Protocol):
    """What a teacher reads of a task (kolm_compile.spec.TaskSpec is one): what to ask
    (name, task type, labels, output schema, instructions), the budget, the seed, where
    files are."""

    @property
    def name(self) -> str: ...
    @property
    def task(self) -> str: ...
    @property
    def labels(self) -> tuple[str, ...] | None: ...
    @property
    def none_label(self) -> str | None: ...
    @property
    def output_schema(self) -> Mapping[str, Any] | None: ...
    @property
    def instructions(self) -> str | None: ...
    @property
    def seed(self) -> int: ...
    @property
    def base_dir(self) -> Path: ...
    @property
    def budget(self) -> _Budget: ...
    @property
    def data(self) -> _Columns: ...


class TeacherSection(Protocol):
    """The spec's teacher section as a teacher reads it (kolm_compile.spec.TeacherSpec is
    one): the fields every backend shares, and ``options``, the backend's own."""

    @property
    def backend(self) -> str: ...
    @property
    def model(self) -> str | None: ...
    @property
    def profile(self) -> str | None: ...
    @property
    def params(self) -> Mapping[str, Any]: ...
    @property
    def options(self) -> TeacherOptions | None: ...


def _help(text: str) -> dict[str, str]:
    return {"help": text}


def _operational(text: str) -> dict[str, Any]:
    """Metadata of an option a job may change between runs without becoming another job
    (timeouts, retries, concurrency, batching: how it asks, not what it asks)."""
    return {"help": text, "operational": True}


@section
class TeacherOptions(Section):
    """Base of a backend's options: the teacher-section fields only that backend reads.

    A spec writes them flat in its teacher section (``teacher.endpoint``); the spec's
    loader hands each backend the keys its options class declares (peft's pattern: a
    method registers its config class with its model class, :func:`register_teacher`).
    A backend registered without options takes none.
    """

    PATH: ClassVar[str] = "spec.teacher"
    #: the backend these options belong to (set by :func:`register_teacher`)
    BACKEND: ClassVar[str] = ""
    #: whether the backend needs ``teacher.model``
    NEEDS_MODEL: ClassVar[bool] = False


# --------------------------------------------------------------------------- value types


@dataclass(frozen=True)
class TeacherSample:
    """One sampled answer and what it cost (see the module docstring on accounting)."""

    text: str
    input_tokens: int = 0
    output_tokens: int = 0
    cost: float = 0.0
    cached: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, without ``cached`` (a property of where it came from, not of the sample)."""
        return {
            "cost": self.cost,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "text": self.text,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, cached: bool = False) -> TeacherSample:
        """Inverse of :meth:`to_dict`; raises ``FormatError`` on wrong types."""
        text, cost = d.get("text"), d.get("cost", 0.0)
        tokens = (d.get("input_tokens", 0), d.get("output_tokens", 0))
        if not isinstance(text, str):
            raise FormatError(f"teacher sample text must be a string, got {type(text).__name__}")
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in tokens):
            raise FormatError(f"teacher sample token counts must be integers >= 0, got {tokens}")
        if isinstance(cost, bool) or not isinstance(cost, int | float) or not cost >= 0:
            raise FormatError(f"teacher sample cost must be a number >= 0, got {cost!r}")
        return cls(text, tokens[0], tokens[1], float(cost), cached)


@dataclass(frozen=True)
class SampleRequest:
    """Ask for samples ``first_index .. first_index + k - 1`` of one input.

    ``prompt_id`` is the caller's name for the request (e.g. the example id),
    used in logs and errors only: the same input under another id is the same
    request to a cache.
    """

    prompt_id: str
    input_text: str
    k: int
    first_index: int = 0


def input_sha256(input_text: str) -> str:
    """Hex SHA-256 of the UTF-8 input: how replay files and errors name an input."""
    return hashlib.sha256(input_text.encode("utf-8")).hexdigest()


class InputRejected(InvalidInput):
    """The teacher cannot answer this one input (it refused it with HTTP 400/413/422, e.g.
    a content filter, or kept sending a malformed answer for it). A compile job rejects
    that input like a failed vote, records why, and goes on (``on_error`` of
    ``sample_many``); called alone, ``sample`` raises it.

    ``input_sha256``, ``status`` (the HTTP status, 200 for a malformed answer) and
    ``reason`` (``refused`` | ``malformed_response``) say what happened.
    """

    def __init__(self, message: str, *, input_sha256: str, status: int, reason: str) -> None:
        super().__init__(message)
        self.input_sha256 = input_sha256
        self.status = status
        self.reason = reason

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (what ``stages/vote.json`` records)."""
        return {
            "input_sha256": self.input_sha256,
            "status": self.status,
            "reason": self.reason,
            "message": str(self),
        }


class TeacherSpend:
    """What one job spent on its teacher, summed over all its runs (resumes included).

    ``requests``: HTTP requests the endpoint answered with 200 (what a provider bills);
    ``failed_requests``: attempts that got 429, 5xx, a timeout or a reset (not billed by
    OpenAI-style providers; counted, never charged); ``samples``, ``input_tokens``,
    ``output_tokens``, ``cost``: what the billed requests returned, at the spec's prices.
    With a ``path`` every change is written there at once (atomically), so a job killed
    mid-way still knows what it bought. Thread-safe.
    """

    FIELDS = ("requests", "failed_requests", "samples", "input_tokens", "output_tokens", "cost")

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = None if path is None else os.fspath(path)
        self.lock = threading.RLock()
        self.requests = self.failed_requests = self.samples = 0
        self.input_tokens = self.output_tokens = 0
        self.cost = 0.0
        if self.path is not None and os.path.exists(self.path):
            with open(self.path, encoding="utf-8") as f:
                d = json.load(f)
            for name in self.FIELDS:
                setattr(self, name, type(getattr(self, name))(d.get(name, 0)))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready totals."""
        with self.lock:
            return {name: getattr(self, name) for name in self.FIELDS}

    def save(self) -> None:
        """Write the totals to ``path`` (no-op without one)."""
        if self.path is None:
            return
        with self.lock:
            tmp = self.path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(self.to_dict(), f, sort_keys=True)
            os.replace(tmp, self.path)

    def add(self, **amounts: float) -> None:
        """Add ``amounts`` (field → amount) and save."""
        with self.lock:
            for name, amount in amounts.items():
                setattr(self, name, getattr(self, name) + amount)
            self.cost = round(self.cost, 10)
            self.save()

    def add_samples(self, samples: Sequence[TeacherSample]) -> None:
        """Record samples bought (count, tokens, cost)."""
        self.add(
            samples=len(samples),
            input_tokens=sum(s.input_tokens for s in samples),
            output_tokens=sum(s.output_tokens for s in samples),
            cost=sum(s.cost for s in samples),
        )


@runtime_checkable
class Teacher(Protocol):
    """What every teacher offers."""

    backend: str

    def describe(self) -> dict[str, Any]:
        """Backend, model and sampling params (no secrets): what label receipts record."""
        ...

    def sample(
        self, prompt_id: str, input_text: str, k: int, task: PromptTask, *, first_index: int = 0
    ) -> list[TeacherSample]:
        """Samples ``first_index .. first_index + k - 1`` for one input."""
        ...

    def sample_many(
        self,
        requests: Sequence[SampleRequest],
        task: PromptTask,
        *,
        on_result: Callable[[int, list[TeacherSample]], None] | None = None,
        on_error: Callable[[int, InputRejected], None] | None = None,
    ) -> list[list[TeacherSample]]:
        """Samples for each request, in request order; ``on_result(i, samples)``
        is called as each request completes (from any thread). With ``on_error`` an
        input the teacher cannot answer (:class:`InputRejected`) is reported there and
        gets no samples; without it the error is raised."""
        ...


# --------------------------------------------------------------------------- prompts


_SYSTEM = (
    "You are a careful annotator. Follow the instructions exactly and answer with "
    "the answer only: no explanation, no formatting."
)


def _classify_prompt(task: PromptTask, input_text: str) -> str:
    labels = "\n".join(f"- {label}" for label in task.labels or ())
    none = (
        f"If the input fits none of the other labels, answer {task.none_label}.\n"
        if getattr(task, "none_label", None)
        else ""
    )
    return (
        "Classify the input into exactly one of these labels:\n"
        f"{labels}\n\n{none}"
        "Answer with exactly one label from the list, written exactly as shown, and nothing else."
        f"\n\nInput:\n{input_text}"
    )


_ONE_OBJECT = "Answer with one JSON object only, without code fences or commentary."


def _extract_prompt(task: PromptTask, input_text: str, schema_in_prompt: bool = True) -> str:
    schema = dict(_plain(task.output_schema or {}))
    if schema_in_prompt:
        body = (
            "Extract the requested information from the input as one JSON object that is "
            f"valid against this JSON Schema (Draft 2020-12):\n"
            f"{json.dumps(schema, indent=2, sort_keys=True)}\n\n"
        )
    else:  # the schema travels in the request's response_format
        body = (
            "Extract the requested information from the input as one JSON object that is "
            "valid against the response format's JSON Schema.\n\n"
        )
    if grounded_paths(schema):
        body += (
            f'Copy the values of the fields marked "{GROUNDED_KEY}": true exactly as they '
            "are written in the input.\n"
        )
    return f"{body}{_ONE_OBJECT}\n\nInput:\n{input_text}"


def _generate_prompt(task: PromptTask, input_text: str) -> str:
    return f"Input:\n{input_text}"


def _plain(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {k: _plain(v[k]) for k in sorted(v)}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    return v


def build_messages(
    task: PromptTask, input_text: str, *, schema_in_prompt: bool = True
) -> list[dict[str, str]]:
    """The chat messages every backend sends for ``input_text`` (system, user).

    The user message starts with the spec's ``instructions`` (when set), then
    what the task type needs: the label list (classify); for extract, the request for
    one JSON object, the output schema (unless ``schema_in_prompt`` is false: the openai
    backend sends it as ``response_format``) and, when the schema marks fields
    ``x-kolm-grounded``, that their values are copied from the input; nothing more for
    generate. The input comes last.
    """
    if task.task == "extract":
        body = _extract_prompt(task, input_text, schema_in_prompt)
    elif task.task == "classify":
        body = _classify_prompt(task, input_text)
    else:
        body = _generate_prompt(task, input_text)
    if task.instructions:
        body = f"{task.instructions.strip()}\n\n{body}"
    return [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": body}]


def teacher_prompt(teacher: Any, task: PromptTask, input_text: str) -> Any:
    """What ``teacher`` sends for ``input_text`` besides its ``describe()``: its
    ``prompt(task, input_text)`` when it has one (:class:`BaseTeacher` does), else
    :func:`build_messages`. The teacher cache keys samples by it."""
    prompt = getattr(teacher, "prompt", None)
    return prompt(task, input_text) if callable(prompt) else build_messages(task, input_text)


def _split(total: int, parts: int) -> list[int]:
    """``total`` in ``parts`` integers that differ by at most 1 and add up to ``total``."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _samples(
    texts: Sequence[str], input_tokens: int, output_tokens: int, task: PromptTask
) -> list[TeacherSample]:
    ins, outs = _split(input_tokens, len(texts)), _split(output_tokens, len(texts))
    return [
        TeacherSample(text, i, o, task.budget.cost(i, o))
        for text, i, o in zip(texts, ins, outs, strict=True)
    ]


def _check_k(k: int, first_index: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InvalidInput(f"k must be an integer >= 1, got {k!r}")
    if isinstance(first_index, bool) or not isinstance(first_index, int) or first_index < 0:
        raise InvalidInput(f"first_index must be an integer >= 0, got {first_index!r}")


# --------------------------------------------------------------------------- base and registry


class BaseTeacher:
    """Base class: a sequential ``sample_many`` and a no-op ``close``."""

    backend: str = ""

    def describe(self) -> dict[str, Any]:
        """Backend, model and sampling params; override."""
        raise NotImplementedError

    def sample(
        self, prompt_id: str, input_text: str, k: int, task: PromptTask, *, first_index: int = 0
    ) -> list[TeacherSample]:
        """Samples ``first_index .. first_index + k - 1`` for one input; override."""
        raise NotImplementedError

    def prompt(self, task: PromptTask, input_text: str) -> Any:
        """What this teacher asks for ``input_text`` (JSON-ready): the teacher cache's key
        covers it with ``describe()``. :func:`build_messages` here; a backend that sends
        more (the openai backend's ``response_format``) says so."""
        return build_messages(task, input_text)

    def sample_many(
        self,
        requests: Sequence[SampleRequest],
        task: PromptTask,
        *,
        on_result: Callable[[int, list[TeacherSample]], None] | None = None,
        on_error: Callable[[int, InputRejected], None] | None = None,
    ) -> list[list[TeacherSample]]:
        """Samples for each request, in order (sequentially here)."""
        return [
            self._sample_request(i, r, task, on_result, on_error) for i, r in enumerate(requests)
        ]

    def _sample_request(
        self,
        i: int,
        r: SampleRequest,
        task: PromptTask,
        on_result: Callable[[int, list[TeacherSample]], None] | None,
        on_error: Callable[[int, InputRejected], None] | None,
    ) -> list[TeacherSample]:
        """One request of :meth:`sample_many`: its samples, or ``[]`` once a rejected
        input went to ``on_error`` (re-raised without one); ``on_result`` sees either."""
        try:
            samples = self.sample(r.prompt_id, r.input_text, r.k, task, first_index=r.first_index)
        except InputRejected as e:
            if on_error is None:
                raise
            on_error(i, e)
            samples = []
        if on_result is not None:
            on_result(i, samples)
        return samples

    def close(self) -> None:
        """Release resources (connections, models)."""

    def __enter__(self) -> BaseTeacher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()!r})"


_T = TypeVar("_T", bound=type)
_REGISTRY: dict[str, Callable[..., Teacher]] = {}
_OPTIONS: dict[str, type[TeacherOptions]] = {}


def register_teacher(
    name: str, *, options: type[TeacherOptions] = TeacherOptions
) -> Callable[[_T], _T]:
    """Class decorator: register a teacher backend under ``name``, with its options class.

    The class is called as ``cls(spec: TeacherSection, task: PromptTask, **kwargs)``,
    ``spec.options`` being an ``options`` instance, and gets ``backend = name``.
    Registering a name twice raises ``ValueError``.
    """

    def decorate(cls: _T) -> _T:
        if name in _REGISTRY:
            raise ValueError(f"teacher backend {name!r} is already registered")
        cls.backend = name  # type: ignore[attr-defined]
        if options is not TeacherOptions:
            options.BACKEND = name
            options.REQUIRED = f"required for backend {name}"
        _REGISTRY[name] = cls
        _OPTIONS[name] = options
        return cls

    return decorate


_O = TypeVar("_O", bound=TeacherOptions)


def _options(spec: TeacherSection, cls: type[_O]) -> _O:
    """``spec.options`` as the backend's own options class."""
    opts = spec.options
    if not isinstance(opts, cls):
        raise SpecError(
            f"spec.teacher: backend {spec.backend} needs {cls.__name__}, got {type(opts).__name__}"
        )
    return opts


def teacher_backends() -> list[str]:
    """The registered backend names, sorted."""
    return sorted(_REGISTRY)


def teacher_options(backend: str) -> type[TeacherOptions]:
    """The options class registered with ``backend`` (``KeyError`` if none is)."""
    return _OPTIONS[backend]


def build_teacher(spec: TeacherSection, task: PromptTask, **kwargs: Any) -> Teacher:
    """Build the teacher for ``spec`` (the spec's teacher section) and ``task``.

    ``kwargs`` go to the backend: ``embed=`` for ``simulated``,
    ``model=``/``tokenizer=`` for ``transformers``, ``sleep=``/``rng=``/
    ``backoff_base_s=``/``backoff_max_s=`` for ``openai``. Unknown backend →
    :class:`SpecError` naming ``spec.teacher.backend``.
    """
    factory = _REGISTRY.get(spec.backend)
    if factory is None:
        raise SpecError(
            f"spec.teacher.backend: unknown teacher backend {spec.backend!r} "
            f"(known: {', '.join(teacher_backends())})"
        )
    return factory(spec, task, **kwargs)


# --------------------------------------------------------------------------- openai


_RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
#: statuses that are about one request's content: that input is rejected, the job goes on
_INPUT_STATUS = frozenset({400, 413, 422})
#: a malformed answer (invalid JSON, no or empty choices) is asked again this many times
_MALFORMED_RETRIES = 2


class _Malformed(UnavailableError):
    """An HTTP 200 answer that is not a usable chat completion."""


def _display_url(url: str) -> str:
    """The URL without user:password@ (safe for messages and receipts)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))


def _chat_url(endpoint: str) -> str:
    base = endpoint.rstrip("/")
    return f"{base}/chat/completions" if base.endswith("/v1") else f"{base}/v1/chat/completions"


_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
#: ``teacher.response_format`` of the openai backend (task extract)
RESPONSE_FORMATS = ("json_schema", "json_object", "none")


@functools.cache
def _tls() -> ssl.SSLContext:
    """The system's default TLS context (its trust store, as before httpx), built once:
    building one per teacher costs ~0.1 s."""
    return ssl.create_default_context()


def _http_url(v: Any) -> str:
    url = check_text(v)
    if not re.match(r"https?://[^/\\s]+", url):
        invalid(f"must be an http(s) URL, got {url!r}")
    return url


@section
class OpenAIOptions(TeacherOptions):
    """Options of the ``openai`` backend."""

    NEEDS_MODEL: ClassVar[bool] = True

    endpoint: Annotated[str, PlainValidator(_http_url)] = field(
        default="https://api.openai.com",
        metadata=_help("openai: base URL; requests go to {endpoint}/v1/chat/completions"),
    )
    api_key_env: Annotated[str | None, optional(key_env_name())] = field(
        default=None, metadata=_help("openai: name of the environment variable with the API key")
    )
    # operational: a job may change them between runs and stay the same job
    concurrency: Annotated[int, integer(1, 1024)] = field(
        default=4, metadata=_operational("openai: requests in flight")
    )
    timeout_s: Annotated[float, number(0.0, 3600.0, lo_open=True)] = field(
        default=60.0, metadata=_operational("openai: per-request timeout")
    )
    max_retries: Annotated[int, integer(0, 100)] = field(
        default=5,
        metadata=_operational("openai: retries on 429, 5xx, timeouts and connection errors"),
    )
    batch_samples: Annotated[bool, boolean()] = field(
        default=True, metadata=_operational("openai: request all k samples at once with `n`")
    )
    response_format: Annotated[str | None, optional(string(RESPONSE_FORMATS))] = field(
        default=None,
        metadata=_help(
            "openai, task extract: how JSON is asked for: json_schema (default; the output "
            "schema goes in response_format), json_object (response_format json_object, the "
            "schema in the prompt) or none (the schema in the prompt only)"
        ),
    )


@register_teacher("openai", options=OpenAIOptions)
class OpenAITeacher(BaseTeacher):
    """An OpenAI-compatible chat-completions endpoint (see the module docstring).

    ``sleep`` and ``rng`` are injectable so tests can observe backoff without
    waiting. Backoff before retry ``a`` (0-based) is ``d/2 + uniform(0, d/2)``
    with ``d = min(backoff_max_s, backoff_base_s * 2**a)``, at least the server's
    ``Retry-After`` (capped at ``backoff_max_s``).
    """

    def __init__(
        self,
        spec: TeacherSection,
        task: PromptTask,
        *,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30.0,
        spend: TeacherSpend | None = None,
    ) -> None:
        opts = _options(spec, OpenAIOptions)
        assert spec.model is not None
        self._spec = spec
        self._batch = opts.batch_samples
        self._url = _chat_url(opts.endpoint)
        self.endpoint = _display_url(opts.endpoint)
        self._api_key: str | None = None
        if opts.api_key_env:
            key = os.environ.get(opts.api_key_env, "")
            if not key.strip():
                raise SpecError(
                    f"spec.teacher.api_key_env: environment variable {opts.api_key_env} "
                    "is not set or empty"
                )
            self._api_key = key.strip()
        self._params = _plain(spec.params)
        self._timeout = float(opts.timeout_s)
        self._retries = int(opts.max_retries)
        self._concurrency = int(opts.concurrency)
        self._slots = threading.BoundedSemaphore(self._concurrency)
        self._backoff = Backoff(backoff_base_s, backoff_max_s, rng=rng, sleep=sleep)
        self._budget = task.budget
        # extract: JSON asked for through response_format (OpenAIOptions.response_format)
        self._format = (opts.response_format or "json_schema") if task.task == "extract" else None
        # the job's spend over all its runs (the pipeline passes the job folder's); the
        # budget is checked against it, so a resumed job does not get a fresh budget
        self.spend = spend if spend is not None else TeacherSpend()
        self.records_spend = True  # CachedTeacher: this teacher records what it bought
        self._calls = 0  # requests sent by this object (retries included)
        self._retries_done = 0
        self._inflight = [0, 0]  # requests, samples reserved by requests in flight
        host = urllib.parse.urlsplit(self._url).hostname or ""
        self._client = httpx.Client(
            timeout=httpx.Timeout(self._timeout),
            verify=_tls(),
            # a redirect would resend the Authorization header elsewhere: a 3xx is an error
            follow_redirects=False,
            trust_env=host not in _LOOPBACK,  # never send loopback through a proxy
            limits=httpx.Limits(
                max_connections=self._concurrency, max_keepalive_connections=self._concurrency
            ),
        )
        # kept-alive connections close with the teacher, closed or dropped
        self._closer = weakref.finalize(self, self._client.close)

    @property
    def calls(self) -> int:
        """HTTP requests sent so far by this object (retries included)."""
        return self._calls

    @property
    def retries(self) -> int:
        """Retries so far (after a 429, 5xx, timeout, reset or malformed answer)."""
        return self._retries_done

    def describe(self) -> dict[str, Any]:
        """Backend, model, endpoint (no credentials), sampling params, prompt version, and
        for extract how JSON is asked for (``response_format``)."""
        return {
            "backend": self.backend,
            "endpoint": self.endpoint,
            "model": self._spec.model,
            "params": self._params,
            "prompt_version": PROMPT_VERSION,
            **({"profile": self._spec.profile} if self._spec.profile else {}),
            **({"response_format": self._format} if self._format is not None else {}),
        }

    def _response_format(self, task: PromptTask) -> dict[str, Any] | None:
        """The request's ``response_format`` (extract only; see :class:`OpenAIOptions`)."""
        if self._format == "json_schema":
            return {
                "type": "json_schema",
                "json_schema": {
                    "name": task.name,
                    "schema": _plain(task.output_schema or {}),
                    "strict": False,
                },
            }
        if self._format == "json_object":
            return {"type": "json_object"}
        return None

    def _messages(self, task: PromptTask, input_text: str) -> list[dict[str, str]]:
        return build_messages(task, input_text, schema_in_prompt=self._format != "json_schema")

    def prompt(self, task: PromptTask, input_text: str) -> Any:
        """The messages, and the ``response_format`` when the request carries one."""
        messages = self._messages(task, input_text)
        fmt = self._response_format(task)
        return messages if fmt is None else {"messages": messages, "response_format": fmt}

    def __repr__(self) -> str:
        return f"OpenAITeacher(endpoint={self.endpoint!r}, model={self._spec.model!r})"

    def _scrub(self, text: str) -> str:
        if self._api_key:
            text = text.replace(self._api_key, "[redacted]")
        return text

    def sample(
        self, prompt_id: str, input_text: str, k: int, task: PromptTask, *, first_index: int = 0
    ) -> list[TeacherSample]:
        """POST until ``k`` choices arrived (one request when the server honours ``n``).

        Raises :class:`UnavailableError` (endpoint named, key never) when the
        endpoint stays unreachable through ``max_retries`` retries,
        :class:`ResourceExhaustedError` past ``budget.max_teacher_calls``.
        """
        _check_k(k, first_index)
        messages = self._messages(task, input_text)
        fmt = self._response_format(task)
        digest = input_sha256(input_text)
        where = f"input {prompt_id} (sha256 {digest})"
        out: list[TeacherSample] = []
        malformed = 0
        while len(out) < k:
            n = k - len(out) if self._batch else 1
            body = {**self._params, "messages": messages, "model": self._spec.model}
            if fmt is not None:
                body["response_format"] = fmt
            if n > 1:
                body["n"] = n
            try:
                texts, usage = self._parse(self._post(body, where, n), n, where)
            except _Malformed as e:
                # a malformed answer (invalid JSON, no or empty choices) is asked again
                # twice; then this input is rejected, not the job
                malformed += 1
                if malformed > _MALFORMED_RETRIES:
                    raise InputRejected(
                        f"{e} ({malformed} answers in a row; input rejected)",
                        input_sha256=digest,
                        status=200,
                        reason="malformed_response",
                    ) from e
                with self.spend.lock:
                    self._retries_done += 1
                log.warning("%s; asking again (%d/%d)", e, malformed, _MALFORMED_RETRIES)
                continue
            got = _samples(texts, usage[0], usage[1], task)
            self.spend.add_samples(got)
            out.extend(got)
        return out

    def sample_many(
        self,
        requests: Sequence[SampleRequest],
        task: PromptTask,
        *,
        on_result: Callable[[int, list[TeacherSample]], None] | None = None,
        on_error: Callable[[int, InputRejected], None] | None = None,
    ) -> list[list[TeacherSample]]:
        """All requests, ``concurrency`` in flight at once; results in request order.

        The first failure cancels the requests not yet started and is raised (an
        :class:`InputRejected` goes to ``on_error`` instead, when given).
        """
        if not requests:
            return []

        def run(i: int) -> list[TeacherSample]:
            return self._sample_request(i, requests[i], task, on_result, on_error)

        pool = ThreadPoolExecutor(min(self._concurrency, len(requests)), "kolm-teacher")
        try:
            futures = [pool.submit(run, i) for i in range(len(requests))]
            return [f.result() for f in futures]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _take_call(self, n: int) -> None:
        """Reserve one request for ``n`` samples within the job's budget (all its runs)."""
        b, sp = self._budget, self.spend
        with sp.lock:
            where = "this job (over all its runs) has"
            if b.max_teacher_calls is not None and (
                sp.requests + self._inflight[0] >= b.max_teacher_calls
            ):
                raise ResourceExhaustedError(
                    f"teacher call budget exhausted: {where} made {sp.requests} billed "
                    f"requests ({sp.samples} samples, ${sp.cost:.4f}); budget.max_teacher_calls "
                    f"is {b.max_teacher_calls}. Raise it in the spec and run the same command "
                    "again: the job resumes and pays only for what it still needs"
                )
            if b.max_teacher_samples is not None and (
                sp.samples + self._inflight[1] + n > b.max_teacher_samples
            ):
                raise ResourceExhaustedError(
                    f"teacher sample budget exhausted: {where} bought {sp.samples} samples, "
                    f"{n} more would pass budget.max_teacher_samples {b.max_teacher_samples}. "
                    "Raise it in the spec and run the same command again"
                )
            if b.max_cost is not None and sp.cost >= b.max_cost:
                raise ResourceExhaustedError(
                    f"teacher cost budget exhausted: {where} spent ${sp.cost:.4f} at the spec's "
                    f"prices; budget.max_cost is ${b.max_cost:.4f}. Raise it in the spec and "
                    "run the same command again"
                )
            self._inflight[0] += 1
            self._inflight[1] += n
            self._calls += 1

    def _settle(self, n: int, *, billed: bool) -> None:
        """Release a reservation; a billed request (HTTP 200) counts against the budget."""
        with self.spend.lock:
            self._inflight[0] -= 1
            self._inflight[1] -= n
            self.spend.add(**({"requests": 1} if billed else {"failed_requests": 1}))

    def close(self) -> None:
        """Close the HTTP connections."""
        self._closer()

    def _post(self, body: dict[str, Any], where: str, n: int = 1) -> Any:
        """POST with retries (:func:`kolm_compile.retry.retry`). Errors name the endpoint,
        the input (``where``) and the HTTP status or the local error class, never text the
        endpoint sent: its body may carry anything, and job errors reach clients (the body
        goes to the service log only)."""
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"

        def attempt() -> Any:
            self._take_call(n)
            try:
                with self._slots:
                    response = self._client.post(self._url, content=data, headers=headers)
            except httpx.RequestError as e:
                self._settle(n, billed=False)
                return Retry(_local_reason(e))
            status = response.status_code
            self._settle(n, billed=status == 200)
            if status == 200:
                try:
                    return json.loads(response.content)
                except ValueError as e:
                    raise _Malformed(
                        f"teacher endpoint {self.endpoint} answered HTTP 200 with invalid "
                        f"JSON for {where}"
                    ) from e
            if status not in _RETRY_STATUS and status < 500:
                raise self._client_error(status, response.content, where)
            return Retry(f"HTTP {status}", retry_after(response.headers))

        def on_retry(attempt: int, why: Retry, delay: float) -> None:
            with self.spend.lock:
                self._retries_done += 1
            log.warning(
                "teacher %s request for %s failed (%s); retry %d/%d in %.2fs",
                self.endpoint, where, why.reason, attempt + 1, self._retries, delay,
            )  # fmt: skip

        out = retry(attempt, retries=self._retries, backoff=self._backoff, on_retry=on_retry)
        if isinstance(out, Retry):
            raise UnavailableError(
                f"teacher endpoint {self.endpoint} unreachable after {self._retries + 1} "
                f"attempts (last: {out.reason}) for {where}"
            )
        return out

    def _client_error(self, status: int, payload: bytes, where: str) -> Exception:
        if status in (401, 403):
            # The body of an auth error may quote (part of) the key: never show or log it.
            return UnavailableError(
                f"teacher endpoint {self.endpoint} refused the credentials (HTTP {status}) "
                f"for {where}"
            )
        body = self._scrub(payload[:300].decode("utf-8", "replace"))
        log.warning("teacher %s rejected %s (HTTP %d): %r", self.endpoint, where, status, body)
        message = (
            f"teacher endpoint {self.endpoint} rejected the request (HTTP {status}) for "
            f"{where}; its response body is in the service log, not shown here"
        )
        if status in _INPUT_STATUS:  # about this input (a content filter, too long, ...)
            digest = where.rsplit("sha256 ", 1)[-1].rstrip(")")
            return InputRejected(message, input_sha256=digest, status=status, reason="refused")
        return InvalidInput(message)

    def _parse(self, response: Any, n: int, where: str) -> tuple[list[str], tuple[int, int]]:
        def bad(why: str) -> UnavailableError:
            return _Malformed(
                f"teacher endpoint {self.endpoint} sent a malformed response for {where}: {why}"
            )

        if not isinstance(response, dict) or not isinstance(response.get("choices"), list):
            raise bad("no choices list")
        choices = response["choices"]
        if not choices:
            raise bad("empty choices")
        try:
            choices = sorted(choices, key=lambda c: c.get("index", 0))
            texts = [(c["message"].get("content") or "") for c in choices[:n]]
        except (AttributeError, KeyError, TypeError) as e:
            raise bad("a choice without a message") from e
        if not all(isinstance(t, str) for t in texts):
            raise bad("message content is not a string")
        usage = response.get("usage") or {}
        prompt = usage.get("prompt_tokens", 0) if isinstance(usage, dict) else 0
        completion = usage.get("completion_tokens", 0) if isinstance(usage, dict) else 0
        if not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in (prompt, completion)
        ):
            raise bad("usage token counts are not integers >= 0")
        return texts, (prompt, completion)


def _local_reason(e: BaseException) -> str:
    """What went wrong with a request, in this machine's words only: a timeout, or the
    OS error under the HTTP library's (its class and errno text), else the library error's
    class. Never the error's message: a protocol error can quote the peer's bytes."""
    if isinstance(e, httpx.TimeoutException):
        return "TimeoutError: timed out"
    err: BaseException | None = e
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, TimeoutError):
            return f"{type(err).__name__}: timed out"
        strerror = getattr(err, "strerror", None)
        if isinstance(err, OSError) and isinstance(strerror, str):
            return f"{type(err).__name__}: {strerror}"
        err = err.__cause__ or err.__context__
    return type(e).__name__


# --------------------------------------------------------------------------- transformers


def _seed_int(*parts: object) -> int:
    data = "\x1f".join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big")


_GENERATIVE = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration", "ForSeq2SeqLM")


def _transformers_preflight(name: str, task: PromptTask) -> tuple[str, Any]:
    """Where ``spec.teacher.model`` is and its config, or one :class:`SpecError` line naming
    the field: a folder that is not there or holds no saved model, a hub id that is not in
    the local Hugging Face cache (kolm runs offline), a model without a generation head."""
    import transformers

    local = task.base_dir / os.path.expanduser(name)
    pathlike = name.startswith((".", "/", "~")) or name.endswith("/") or local.exists()
    if pathlike:
        if not local.is_dir():
            raise SpecError(
                f"spec.teacher.model: folder {name!r} not found (relative to the spec's folder "
                f"{task.base_dir})"
            )
        if not (local / "config.json").is_file():
            raise SpecError(
                f"spec.teacher.model: folder {name!r} holds no saved model (no config.json)"
            )
        source = str(local)
    else:
        source = name
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    try:
        config = transformers.AutoConfig.from_pretrained(source, local_files_only=offline)
    except (OSError, ValueError) as e:
        if pathlike:
            raise SpecError(
                f"spec.teacher.model: folder {name!r} has an unreadable config.json "
                f"({type(e).__name__})"
            ) from None
        raise SpecError(
            f"spec.teacher.model: {name!r} is neither a folder nor a model in the local Hugging "
            "Face cache (kolm runs offline: download it first, or give its folder)"
        ) from None
    archs = list(getattr(config, "architectures", None) or [])
    if not config.is_encoder_decoder and archs and not any(a.endswith(_GENERATIVE) for a in archs):
        raise SpecError(
            f"spec.teacher.model: {name!r} is a {config.model_type} model without a generation "
            f"head ({', '.join(archs)}); the transformers teacher needs a causal or seq2seq "
            "language model"
        )
    return source, config


@section
class TransformersOptions(TeacherOptions):
    """Options of the ``transformers`` backend."""

    NEEDS_MODEL: ClassVar[bool] = True

    device: Annotated[str | None, optional(text())] = field(
        default=None, metadata=_help("transformers: torch device")
    )
    seed: Annotated[int | None, optional(integer(0, MAX_SEED - 1))] = field(
        default=None, metadata=_help("simulated/transformers: sampling seed; default spec.seed")
    )


@register_teacher("transformers", options=TransformersOptions)
class TransformersTeacher(BaseTeacher):
    """A local causal (decoder-only) or seq2seq language model as the teacher.

    ``spec.model`` is a local directory (relative to the spec's directory or
    absolute) or a model id already in the Hugging Face cache; ``model=`` and
    ``tokenizer=`` may be passed ready-made instead. Sampling is seeded from
    ``(teacher seed, input digest, sample number)``, so a sample can be repeated.
    The chat template is used when the tokenizer has one, else the messages
    are written as ``role: content`` paragraphs ending in ``assistant:``.
    """

    def __init__(
        self, spec: TeacherSection, task: PromptTask, *, model: Any = None, tokenizer: Any = None
    ) -> None:
        import torch
        import transformers

        assert spec.model is not None
        self._spec = spec
        self._params = _plain(spec.params)
        opts = _options(spec, TransformersOptions)
        self._seed = opts.seed if opts.seed is not None else task.seed
        self._lock = threading.Lock()
        source = spec.model
        if model is None or tokenizer is None:
            source, config = _transformers_preflight(spec.model, task)
        try:
            if tokenizer is None:
                tokenizer = transformers.AutoTokenizer.from_pretrained(source)
            if model is None:
                auto = (
                    transformers.AutoModelForSeq2SeqLM
                    if config.is_encoder_decoder
                    else transformers.AutoModelForCausalLM
                )
                model = auto.from_pretrained(source)
        except (OSError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            raise SpecError(
                f"spec.teacher.model: {spec.model!r} cannot be loaded as a language model "
                f"({type(e).__name__}: {first})"
            ) from None
        device = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._model = model.to(device).eval()
        self._tokenizer = tokenizer
        self._device = device
        self._seq2seq = bool(model.config.is_encoder_decoder)

    def describe(self) -> dict[str, Any]:
        """Backend, model, sampling params, seed and prompt version."""
        return {
            "backend": self.backend,
            "model": self._spec.model,
            "params": self._params,
            "prompt_version": PROMPT_VERSION,
            "seed": self._seed,
        }

    def _prompt(self, task: PromptTask, input_text: str) -> str:
        messages = build_messages(task, input_text)
        if getattr(self._tokenizer, "chat_template", None):
            return str(
                self._tokenizer.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=False
                )
            )
        return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\n\nassistant:"

    def sample(
        self, prompt_id: str, input_text: str, k: int, task: PromptTask, *, first_index: int = 0
    ) -> list[TeacherSample]:
        """Generate samples ``first_index .. first_index + k - 1``, one seeded call each."""
        import torch

        _check_k(k, first_index)
        max_new = int(self._params.get("max_tokens", 32))
        temperature = float(self._params.get("temperature", 0.7))
        config = self._model.config
        limit = getattr(config, "max_position_embeddings", None) or getattr(
            config, "n_positions", None
        )
        tok = self._tokenizer
        tok.truncation_side = "left"  # keep the end of the prompt: the input and the cue
        encoded = tok(
            self._prompt(task, input_text),
            return_tensors="pt",
            add_special_tokens=self._seq2seq,
            truncation=limit is not None,
            max_length=(max(1, limit - max_new) if not self._seq2seq else limit) if limit else None,
        )
        ids = encoded["input_ids"].to(self._device)
        mask = encoded["attention_mask"].to(self._device)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_new,
            "pad_token_id": pad,
            "do_sample": temperature > 0,
        }
        if temperature > 0:
            kwargs["temperature"] = temperature
            if "top_p" in self._params:
                kwargs["top_p"] = float(self._params["top_p"])
        digest = input_sha256(input_text)
        texts, produced = [], 0
        # One generate call per sample, each seeded by its number, so sample i is
        # the same whether it was asked for alone or in a batch.
        with self._lock, torch.random.fork_rng(devices=[]), torch.inference_mode():
            for index in range(first_index, first_index + k):
                torch.manual_seed(_seed_int(self._seed, digest, index))
                out = self._model.generate(input_ids=ids, attention_mask=mask, **kwargs)[0]
                new = out if self._seq2seq else out[ids.shape[1] :]
                kept = [int(t) for t in new if pad is None or int(t) != pad]
                produced += len(kept)
                texts.append(tok.decode(kept, skip_special_tokens=True).strip())
        return _samples(texts, int(ids.shape[1]), produced, task)


# --------------------------------------------------------------------------- replay


@section
class ReplayOptions(TeacherOptions):
    """Options of the ``replay`` backend."""

    path: Annotated[Path, file_path((".jsonl", ".ndjson"), blank_is_empty=False)] = field(
        metadata=_help("replay: JSONL of recorded samples")
    )


@register_teacher("replay", options=ReplayOptions)
class ReplayTeacher(BaseTeacher):
    """Answers recorded earlier: one JSONL line per input.

    Line format: ``{"input_sha256": hex, "samples": [str | {text, input_tokens,
    output_tokens}, ...], "model": str}`` (``model`` optional). Samples are
    served by number; a missing input or too few samples raise
    :class:`NotFoundError` naming the input digest.
    """

    def __init__(self, spec: TeacherSection, task: PromptTask) -> None:
        self._path = _options(spec, ReplayOptions).path
        self._records: dict[str, list[TeacherSample]] = {}
        models: set[str] = set()
        try:
            raw = self._path.read_bytes()
        except OSError as e:
            raise SpecError(
                f"spec.teacher.path: cannot read {self._path}: {e.strerror or e}"
            ) from e
        self._file_sha256 = hashlib.sha256(raw).hexdigest()
        for n, line in enumerate(raw.decode("utf-8", "replace").splitlines(), 1):
            if not line.strip():
                continue
            digest, samples, model = self._parse_line(line, n)
            if digest in self._records:
                raise FormatError(
                    f"replay file {self._path.name} line {n}: input {digest} repeated"
                )
            self._records[digest] = samples
            if model:
                models.add(model)
        self._model = spec.model or (models.pop() if len(models) == 1 else "replay")

    def _parse_line(self, line: str, n: int) -> tuple[str, list[TeacherSample], str | None]:
        where = f"replay file {self._path.name} line {n}"
        try:
            rec = json.loads(line)
        except ValueError as e:
            raise FormatError(f"{where}: not JSON: {e}") from e
        if not isinstance(rec, dict):
            raise FormatError(f"{where}: must be a JSON object")
        digest, samples, model = rec.get("input_sha256"), rec.get("samples"), rec.get("model")
        if not isinstance(digest, str) or len(digest) != 64 or digest != digest.lower():
            raise FormatError(f"{where}: input_sha256 must be 64 lowercase hex characters")
        if not isinstance(samples, list) or not samples:
            raise FormatError(f"{where}: samples must be a non-empty list")
        if model is not None and not isinstance(model, str):
            raise FormatError(f"{where}: model must be a string")
        parsed = []
        for s in samples:
            try:
                parsed.append(
                    TeacherSample(s) if isinstance(s, str) else TeacherSample.from_dict(s)
                )
            except (FormatError, AttributeError) as e:
                raise FormatError(f"{where}: bad sample: {e}") from e
        return (
            digest,
            [TeacherSample(s.text, s.input_tokens, s.output_tokens) for s in parsed],
            model,
        )

    def describe(self) -> dict[str, Any]:
        """Backend, model, the recording's SHA-256 and prompt version."""
        return {
            "backend": self.backend,
            "file_sha256": self._file_sha256,
            "model": self._model,
            "prompt_version": PROMPT_VERSION,
        }

    def sample(
        self, prompt_id: str, input_text: str, k: int, task: PromptTask, *, first_index: int = 0
    ) -> list[TeacherSample]:
        """Recorded samples ``first_index .. first_index + k - 1`` (no cost: already paid)."""
        _check_k(k, first_index)
        digest = input_sha256(input_text)
        recorded = self._records.get(digest)
        if recorded is None:
            raise NotFoundError(
                f"replay file {self._path.name} has no samples for input sha256 {digest}"
            )
        if len(recorded) < first_index + k:
            raise NotFoundError(
                f"replay file {self._path.name} has {len(recorded)} samples for input sha256 "
                f"{digest}, need {first_index + k}"
            )
        return recorded[first_index : first_index + k]


# --------------------------------------------------------------------------- simulated


def _label_words(label: str) -> str:
    return " ".join(label.replace("_", " ").replace("-", " ").split()).lower()


def _trigrams(text: str) -> set[str]:
    padded = f"  {text} "
    return {padded[i : i + 3] for i in range(len(padded) - 2)}


def trigram_similarity(names: Sequence[str]) -> list[list[float]]:
    """Pairwise Jaccard similarity of the character-trigram sets of ``names``."""
    grams = [_trigrams(n) for n in names]
    return [[len(a & b) / len(a | b) if a | b else 0.0 for b in grams] for a in grams]


def _cosine(matrix: np.ndarray) -> list[list[float]]:
    import numpy as np

    m = np.asarray(matrix, dtype=np.float64)
    norms = np.linalg.norm(m, axis=1, keepdims=True)
    m = m / np.where(norms == 0, 1.0, norms)
    return (m @ m.T).tolist()  # type: ignore[no-any-return]


@section
class SimulatedOptions(TeacherOptions):
    """Options of the ``simulated`` backend."""

    dataset: Annotated[Path, table_path()] = field(metadata=_help("simulated: gold-labelled table"))
    accuracy: Annotated[float, number(0.0, 1.0)] = field(
        default=0.85, metadata=_help("simulated: chance that one sample is the gold label")
    )
    similarity_temperature: Annotated[float, number(0.0, 100.0, lo_open=True)] = field(
        default=0.1, metadata=_help("simulated: softmax temperature over label similarity")
    )
    seed: Annotated[int | None, optional(integer(0, MAX_SEED - 1))] = field(
        default=None, metadata=_help("simulated/transformers: sampling seed; default spec.seed")
    )


#: the corruption scheme of the simulated teacher's wrong structured answers; recorded by
#: ``describe()`` (so the teacher cache and receipts tell schemes apart): bump it whenever
#: a wrong answer for some input and sample number could change
SIMULATION_VERSION = "1"
#: what a wrong extract answer of the simulated teacher may be (SimulatedTeacher)
EXTRACT_CORRUPTIONS = ("drop_field", "extra_field", "span_shift", "wrong_enum", "invalid_json")


@register_teacher("simulated", options=SimulatedOptions)
class SimulatedTeacher(BaseTeacher):
    """A stand-in teacher for offline demos and benchmarks — not a model.

    Knows the gold answer of every input in ``spec.dataset`` (the first row wins for a
    repeated text). Each sample is the gold answer with probability ``accuracy``,
    otherwise a plausible wrong one. Sample ``i`` of an input uses its own RNG seeded
    from ``(seed, input digest, i)``: reproducible and independent of order and
    batching. Token counts are estimated at 4 characters per token so cost demos have
    numbers; ``describe()`` says ``"simulated": true``.

    * **classify** — gold labels from ``data.text_column``/``data.label_column`` (rows
      whose label is not in the task's label set are skipped). A wrong sample is another
      label ``j`` with probability ∝ ``exp(sim(gold, j) / similarity_temperature)``, where
      ``sim`` is the cosine similarity of ``embed([label names])`` (names with ``_``/``-``
      read as spaces) or, without ``embed``, the character-trigram Jaccard similarity.
    * **extract** — gold objects from ``data.text_column``/``data.output_column``
      (kolm_compile.tables.read_outputs: an object or JSON text; rows whose output is not
      valid under the output schema are skipped); the answer is the gold object's
      canonical JSON. A wrong sample is one corruption, drawn uniformly among those that
      apply (:data:`EXTRACT_CORRUPTIONS`): ``drop_field`` (a field of the gold object
      left out), ``extra_field`` (a field the gold object lacks, with an invented value:
      for a string field either a phrase of the input or another row's value of that
      field, for an enum another value), ``span_shift`` (a grounded value one word longer
      or shorter at either end, its neighbour taken from the input), ``wrong_enum`` (an
      enum field with another of its values), ``invalid_json`` (the answer cut short).
    * **generate** — gold texts from ``data.output_column``; a wrong sample drops or
      repeats one word of the gold text (its spacing kept).
    """

    def __init__(
        self,
        spec: TeacherSection,
        task: PromptTask,
        *,
        embed: Callable[[list[str]], np.ndarray] | None = None,
    ) -> None:
        opts = _options(spec, SimulatedOptions)
        self._spec = spec
        self._task = task.task
        self._accuracy = float(opts.accuracy)
        self._temperature = float(opts.similarity_temperature)
        self._seed = opts.seed if opts.seed is not None else task.seed
        dataset = opts.dataset
        try:
            self._dataset_sha256 = hashlib.sha256(dataset.read_bytes()).hexdigest()
        except OSError as e:
            raise SpecError(
                f"spec.teacher.dataset: cannot read {dataset}: {e.strerror or e}"
            ) from e
        self._gold: dict[str, str] = {}
        if task.task == "classify":
            self._init_labels(dataset, task, embed)
        else:
            self._init_outputs(dataset, task)

    def _init_labels(
        self, dataset: Path, task: PromptTask, embed: Callable[[list[str]], np.ndarray] | None
    ) -> None:
        assert task.labels is not None
        self._labels = list(task.labels)
        text_col, label_col = task.data.text_column, task.data.label_column
        known = set(self._labels)
        try:
            for n, row in enumerate(read_rows(dataset), 1):
                if text_col not in row or label_col not in row:
                    raise FormatError(
                        f"{dataset.name} row {n}: needs columns {text_col!r} and {label_col!r}"
                    )
                text, label = str(row[text_col]).strip(), str(row[label_col]).strip()
                if label in known:
                    self._gold.setdefault(input_sha256(text), label)
        except OSError as e:
            raise SpecError(
                f"spec.teacher.dataset: cannot read {dataset}: {e.strerror or e}"
            ) from e
        names = [_label_words(label) for label in self._labels]
        self._similarity_kind = "embedding-cosine" if embed else "char-trigram-jaccard"
        sim = _cosine(embed(names)) if embed else trigram_similarity(names)
        self._wrong: dict[str, tuple[list[str], list[float]]] = {}
        for i, gold in enumerate(self._labels):
            others = [j for j in range(len(self._labels)) if j != i]
            if not others:
                continue
            top = max(sim[i][j] for j in others)
            weights = [math.exp((sim[i][j] - top) / self._temperature) for j in others]
            total, cumulative, acc = sum(weights), [], 0.0
            for w in weights:
                acc += w / total
                cumulative.append(acc)
            self._wrong[gold] = ([self._labels[j] for j in others], cumulative)

    def _init_outputs(self, dataset: Path, task: PromptTask) -> None:
        schema = _plain(task.output_schema) if task.output_schema is not None else None
        table = read_outputs(
            dataset,
            task.data.text_column,
            task.data.output_column,
            "spec.teacher.dataset",
            task=task.task,
            schema=schema,
        )
        if table.rows and not table.has_column:
            raise SpecError(
                f"spec.teacher.dataset: {dataset.name} has no column "
                f"{task.data.output_column!r} (spec.data.output_column): the simulated "
                "teacher answers from it"
            )
        self._fields = schema_fields(schema) if schema is not None else []
        # every value each field takes over the table: another row's value is an invented
        # one for this row (extra_field)
        pool: dict[str, set[str]] = {}
        for r in table.rows:
            if r.output is None:
                continue
            self._gold.setdefault(input_sha256(r.text), r.output)
            if schema is not None:
                for ptr, value in field_pairs(json.loads(r.output)):
                    pool.setdefault(ptr, set()).add(value)
        self._pool = {ptr: sorted(values) for ptr, values in pool.items()}

    def describe(self) -> dict[str, Any]:
        """Says ``backend: simulated`` and ``simulated: true``, with every knob."""
        out: dict[str, Any] = {
            "accuracy": self._accuracy,
            "backend": self.backend,
            "dataset_sha256": self._dataset_sha256,
            "model": self._spec.model or "simulated",
            "prompt_version": PROMPT_VERSION,
            "seed": self._seed,
            "simulated": True,
        }
        if self._task == "classify":
            out["similarity"] = self._similarity_kind
            out["similarity_temperature"] = self._temperature
        else:
            out["simulation"] = f"{self._task}-v{SIMULATION_VERSION}"
        return out

    def confusion_probability(self, gold: str, answer: str) -> float:
        """Probability that one sample for an input with label ``gold`` is ``answer``
        (classify only)."""
        if self._task != "classify":
            raise InvalidInput(f"confusion_probability is for task classify, not {self._task}")
        if answer == gold:
            return self._accuracy if gold in self._wrong else 1.0
        labels, cumulative = self._wrong[gold]
        i = labels.index(answer)
        p = cumulative[i] - (cumulative[i - 1] if i else 0.0)
        return (1.0 - self._accuracy) * p

    def sample(
        self, prompt_id: str, input_text: str, k: int, task: PromptTask, *, first_index: int = 0
    ) -> list[TeacherSample]:
        """Samples ``first_index .. first_index + k - 1``; unknown input → NotFoundError."""
        _check_k(k, first_index)
        digest = input_sha256(input_text.strip())
        gold = self._gold.get(digest)
        if gold is None:
            what = "label" if self._task == "classify" else "output"
            raise NotFoundError(f"simulated teacher has no gold {what} for input sha256 {digest}")
        texts = []
        for index in range(first_index, first_index + k):
            rng = random.Random(_seed_int(self._seed, digest, index))
            if self._task == "classify":
                texts.append(self._label_sample(gold, rng))
            elif rng.random() < self._accuracy:
                texts.append(gold)
            elif self._task == "extract":
                texts.append(self._wrong_object(gold, input_text.strip(), rng))
            else:
                texts.append(_wrong_text(gold, rng))
        prompt_chars = sum(len(m["content"]) for m in build_messages(task, input_text))
        out_chars = sum(len(t) for t in texts)
        return _samples(texts, math.ceil(prompt_chars / 4), math.ceil(out_chars / 4), task)

    def _label_sample(self, gold: str, rng: random.Random) -> str:
        if gold not in self._wrong or rng.random() < self._accuracy:
            return gold
        labels, cumulative = self._wrong[gold]
        pick = min(bisect_right(cumulative, rng.random()), len(labels) - 1)
        return labels[pick]

    def _wrong_object(self, gold: str, input_text: str, rng: random.Random) -> str:
        """One corruption of the gold object (see the class docstring)."""
        obj = json.loads(gold)
        words = input_text.split()
        present = [f for f in self._fields if _slot(obj, f.path) is not None]
        options: list[tuple[str, Callable[[], Any]]] = []
        if present:
            options.append(("drop_field", lambda: _drop(obj, rng.choice(present).path)))
        absent = [
            f
            for f in self._fields
            if f.kind in ("span", "enum") and f not in present and _can_add(obj, f.path)
        ]
        if absent:
            options.append(("extra_field", lambda: self._add(obj, rng.choice(absent), words, rng)))
        spans = [
            (f, i)
            for f in present
            if f.kind == "span"
            for i, v in enumerate(_values(obj, f))
            if isinstance(v, str) and _shifts(v, words)
        ]
        if spans:
            options.append(("span_shift", lambda: _shift(obj, *rng.choice(spans), words, rng)))
        enums = [f for f in present if f.kind == "enum" and not f.many and len(f.enum) > 1]
        if enums:
            options.append(("wrong_enum", lambda: _other_enum(obj, rng.choice(enums), rng)))
        options.append(("invalid_json", lambda: None))
        name, corrupt = rng.choice(options)
        if name == "invalid_json":
            return gold[: rng.randint(1, len(gold) - 1)] if len(gold) > 1 else "{"
        corrupt()
        return canonical(obj)

    def _add(self, obj: Any, f: SchemaField, words: list[str], rng: random.Random) -> None:
        if f.kind == "enum":
            value: Any = rng.choice(f.enum)
        elif rng.random() < 0.5 and words:  # a phrase of the input: grounded, but wrong
            i = rng.randrange(len(words))
            value = " ".join(words[i : i + rng.randint(1, 2)])
        else:  # another row's value: most likely not in this input at all
            pool = self._pool.get(f.path) or [json.dumps("unknown")]
            value = json.loads(rng.choice(pool))
        parent, key = _slot(obj, f.path, make=True)  # type: ignore[misc]
        parent[key] = [value] if f.many else value


def _slot(obj: Any, ptr: str, *, make: bool = False) -> tuple[dict[str, Any], str] | None:
    """The (object, key) that holds field ``ptr`` in ``obj``: with ``make``, missing
    objects on the way are created and the key need not be there; without it, the key
    must be there. ``None`` when the way is blocked (an array or a scalar)."""
    parts = pointer_parts(ptr)
    if not parts:
        return None
    node = obj
    for key in parts[:-1]:
        if not isinstance(node, dict):
            return None
        if key not in node:
            if not make:
                return None
            node[key] = {}
        node = node[key]
    if not isinstance(node, dict) or (not make and parts[-1] not in node):
        return None
    return node, parts[-1]


def _can_add(obj: Any, ptr: str) -> bool:
    """Whether field ``ptr`` can be set in ``obj`` (objects only on the way, or none yet)."""
    parts = pointer_parts(ptr)
    node = obj
    for key in parts[:-1]:
        if not isinstance(node, dict):
            return False
        if key not in node:
            return True
        node = node[key]
    return bool(parts) and isinstance(node, dict)


def _values(obj: Any, f: SchemaField) -> list[Any]:
    slot = _slot(obj, f.path)
    if slot is None:
        return []
    value = slot[0][slot[1]]
    return list(value) if f.many and isinstance(value, list) else [value]


def _drop(obj: Any, ptr: str) -> None:
    parent, key = _slot(obj, ptr)  # type: ignore[misc]
    del parent[key]


def _find(value: str, words: list[str]) -> int | None:
    """Where the words of ``value`` start among ``words`` (the first place), or None."""
    vw = value.split()
    for i in range(len(words) - len(vw) + 1):
        if vw and words[i : i + len(vw)] == vw:
            return i
    return None


def _shifts(value: str, words: list[str]) -> list[str]:
    """A span one word longer (a neighbour of the input) or shorter, at either end."""
    i = _find(value, words)
    if i is None:
        return []
    j = i + len(value.split())
    out = []
    if i > 0:
        out.append(" ".join(words[i - 1 : j]))
    if j < len(words):
        out.append(" ".join(words[i : j + 1]))
    if j - i >= 2:
        out += [" ".join(words[i + 1 : j]), " ".join(words[i : j - 1])]
    return out


def _shift(obj: Any, f: SchemaField, index: int, words: list[str], rng: random.Random) -> None:
    parent, key = _slot(obj, f.path)  # type: ignore[misc]
    if f.many:
        parent[key][index] = rng.choice(_shifts(parent[key][index], words))
    else:
        parent[key] = rng.choice(_shifts(parent[key], words))


def _other_enum(obj: Any, f: SchemaField, rng: random.Random) -> None:
    parent, key = _slot(obj, f.path)  # type: ignore[misc]
    parent[key] = rng.choice([e for e in f.enum if e != parent[key]])


_WORDS = re.compile(r"(\s+)")


def _wrong_text(gold: str, rng: random.Random) -> str:
    """The gold text with one word dropped or repeated (its spacing kept)."""
    parts = _WORDS.split(gold)  # words at even indices, the spaces between at odd
    words = list(range(0, len(parts), 2))
    i = rng.choice(words)
    if len(words) > 1 and rng.random() < 0.5:  # drop word i and the space after (or before)
        cut = i + 1 if i + 1 < len(parts) else i - 1
        del parts[min(i, cut) : max(i, cut) + 1]
    else:
        parts[i] = f"{parts[i]} {parts[i]}"
    return "".join(parts)
