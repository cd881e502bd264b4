"""``manifest.json`` of a ``.kolm`` artifact: the one reading and writing of it.

The compile job writes it (:meth:`Manifest.to_json`), and every reader parses it with
:meth:`Manifest.from_json`: the inference loader, ``kolm recall update``, the auditor's
recall check (:func:`kolm_ledger.verify.recall_proof.read_artifact_corpus`) and the K-score
re-execution (:mod:`kolm_ledger.audit.reexec`). Torch-free: an auditor's install reads it.

Fields (only ``format`` is required; a field left ``None`` is absent from the JSON)::

    format                "kolm/v1"
    name                  the task name
    task_type             "classify" | "extract" | "generate"
    labels                ordered label list (classify)
    none_label            the label meaning "none of these" (optional)
    base_model            {"id", "revision", "weights_digest"}: a logical id, never a path
    student               {"kind", "base_model", "chosen_by"?, "max_new_tokens"?}: the student
                          kind (classifier | causal_lm | span_tagger) and, when the spec said
                          ``kind: auto``, why it was chosen
    adapter               folder holding the student (relative)
    max_length            tokenizer max length used in training
    confidence_threshold  escape-hatch threshold (student confidence below it → teacher)
    verifier              {"name", "version", "params"}
    spec_digest           the task spec digest
    kolm_version          the kolm that compiled it
    evaluation            {"outcomes", "n", "holdout_digest", "outcome_root", "text_column",
                          "label_column"} (docs/FORMATS.md)
    determinism           what the evaluation ran on (:func:`kolm_ledger.audit.reexec.
                          determinism_record`): a JSON object
    gate                  the selective-prediction gate (:mod:`kolm_compile.gate`): a JSON
                          object that module reads
    base                  folder of the bundled base weights (``--bundle-base``)
    recall                {"index", "corpus_root", "chunks", "dim", "embedding_model",
                          "chunking", "k"?} (docs/RECALL.md)
    previous_artifact     the artifact ``kolm recall update`` made this one from

Keys this version does not know are kept as read (:attr:`Manifest.extra`) and written back.
A field of the wrong type raises :class:`~kolm_ledger.errors.ArtifactError` naming it,
e.g. ``manifest.recall.chunks: want an integer >= 1, got '3'``.

:meth:`Manifest.to_json` is ``json.dumps(..., indent=2, sort_keys=True)`` plus a newline,
the bytes the artifact's signature covers: a parsed manifest written back is byte-identical
(JSON numbers keep their int or float form).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from kolm_ledger.errors import ArtifactError

__all__ = [
    "FORMAT",
    "MANIFEST_FILE",
    "BaseModelRef",
    "EvaluationRef",
    "Manifest",
    "RecallRef",
    "VerifierRef",
]

FORMAT = "kolm/v1"
MANIFEST_FILE = "manifest.json"

_HEX64 = re.compile(r"[0-9a-f]{64}")
_T = TypeVar("_T")


def _fail(where: str, want: str, got: object) -> ArtifactError:
    return ArtifactError(f"{where}: want {want}, got {_show(got)}")


def _show(v: object) -> str:
    r = repr(v)
    return r if len(r) <= 80 else r[:77] + "..."


def _object(v: object, where: str) -> dict[str, Any]:
    if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
        raise _fail(where, "a JSON object", v)
    return v


def _str(d: Mapping[str, Any], key: str, where: str, *, required: bool = True) -> Any:
    v = d.get(key)
    if v is None and not required:
        return None
    if not isinstance(v, str) or not v:
        raise _fail(f"{where}.{key}", "a non-empty string", v)
    return v


def _int(d: Mapping[str, Any], key: str, where: str, lo: int, *, required: bool = True) -> Any:
    v = d.get(key)
    if v is None and not required:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise _fail(f"{where}.{key}", f"an integer >= {lo}", v)
    return v


def _number(d: Mapping[str, Any], key: str, where: str) -> Any:
    v = d.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise _fail(f"{where}.{key}", "a finite number", v)
    return v


def _relpath(d: Mapping[str, Any], key: str, where: str, *, required: bool = True) -> Any:
    v = _str(d, key, where, required=required)
    if v is not None:
        p = PurePosixPath(v)
        if p.is_absolute() or "\\" in v or any(part in ("", ".", "..") for part in v.split("/")):
            raise _fail(f"{where}.{key}", "a relative path inside the artifact", v)
    return v


def _digest(d: Mapping[str, Any], key: str, where: str) -> Any:
    v = d.get(key)
    if not isinstance(v, str) or not _HEX64.fullmatch(v):
        raise _fail(f"{where}.{key}", "64 lowercase hex digits", v)
    return v


def _known(d: Mapping[str, Any], cls: type[Any], where: str) -> None:
    """Nested sections have a fixed key set: an unknown key is an error naming it."""
    names = {f.name for f in fields(cls)}
    extra = sorted(set(d) - names)
    if extra:
        raise ArtifactError(f"{where}.{extra[0]}: unknown field; known: {sorted(names)}")


def _section(
    d: Mapping[str, Any], key: str, parse: Callable[[Mapping[str, Any], str], _T], where: str
) -> _T | None:
    v = d.get(key)
    if v is None:
        return None
    return parse(_object(v, f"{where}.{key}"), f"{where}.{key}")


@dataclass(frozen=True)
class BaseModelRef:
    """``manifest.base_model``: the base encoder by logical id (never a path)."""

    id: str
    revision: str
    weights_digest: str

    @classmethod
    def _parse(cls, d: Mapping[str, Any], where: str) -> BaseModelRef:
        _known(d, cls, where)
        return cls(
            _str(d, "id", where), _str(d, "revision", where), _str(d, "weights_digest", where)
        )

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "revision": self.revision, "weights_digest": self.weights_digest}


@dataclass(frozen=True)
class VerifierRef:
    """``manifest.verifier``: the verifier the labels were checked with."""

    name: str
    version: str
    params: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def _parse(cls, d: Mapping[str, Any], where: str) -> VerifierRef:
        _known(d, cls, where)
        return cls(
            _str(d, "name", where),
            _str(d, "version", where),
            dict(_object(d.get("params"), f"{where}.params")),
        )

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "params": dict(self.params)}


@dataclass(frozen=True)
class EvaluationRef:
    """``manifest.evaluation``: the signed per-example outcomes an auditor re-executes."""

    outcomes: str
    n: int
    holdout_digest: str
    outcome_root: str
    text_column: str
    label_column: str

    @classmethod
    def _parse(cls, d: Mapping[str, Any], where: str) -> EvaluationRef:
        _known(d, cls, where)
        return cls(
            _relpath(d, "outcomes", where),
            _int(d, "n", where, 0),
            _digest(d, "holdout_digest", where),
            _digest(d, "outcome_root", where),
            _str(d, "text_column", where),
            _str(d, "label_column", where),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "outcomes": self.outcomes,
            "n": self.n,
            "holdout_digest": self.holdout_digest,
            "outcome_root": self.outcome_root,
            "text_column": self.text_column,
            "label_column": self.label_column,
        }


@dataclass(frozen=True)
class RecallRef:
    """``manifest.recall``: the recall index the artifact ships and what it commits to.

    ``k``: the number of chunks a prediction retrieves by default (``None``: the reader's
    default)."""

    index: str
    corpus_root: str
    chunks: int
    dim: int
    embedding_model: str
    chunking: Mapping[str, Any]
    k: int | None = None

    @classmethod
    def _parse(cls, d: Mapping[str, Any], where: str) -> RecallRef:
        _known(d, cls, where)
        return cls(
            _relpath(d, "index", where),
            _digest(d, "corpus_root", where),
            _int(d, "chunks", where, 1),
            _int(d, "dim", where, 1),
            _str(d, "embedding_model", where),
            dict(_object(d.get("chunking"), f"{where}.chunking")),
            _int(d, "k", where, 1, required=False),
        )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RecallRef:
        """Parse a ``recall`` section on its own (e.g. ``IndexInfo.to_manifest()``)."""
        return cls._parse(_object(d, "manifest.recall"), "manifest.recall")

    def to_dict(self) -> dict[str, Any]:
        out = {
            "chunking": dict(self.chunking),
            "chunks": self.chunks,
            "corpus_root": self.corpus_root,
            "dim": self.dim,
            "embedding_model": self.embedding_model,
            "index": self.index,
        }
        if self.k is not None:
            out["k"] = self.k
        return out


#: top-level keys, in the order of the dataclass (``extra`` is not one)
_TOP = (
    "format",
    "name",
    "task_type",
    "labels",
    "none_label",
    "base_model",
    "student",
    "adapter",
    "max_length",
    "confidence_threshold",
    "verifier",
    "spec_digest",
    "kolm_version",
    "evaluation",
    "determinism",
    "gate",
    "base",
    "recall",
    "previous_artifact",
)


@dataclass(frozen=True)
class Manifest:
    """A ``.kolm`` artifact's ``manifest.json`` (module docstring)."""

    format: str = FORMAT
    name: str | None = None
    task_type: str | None = None
    labels: tuple[str, ...] | None = None
    none_label: str | None = None
    base_model: BaseModelRef | None = None
    student: Mapping[str, Any] | None = None
    adapter: str | None = None
    max_length: int | None = None
    confidence_threshold: float | None = None
    verifier: VerifierRef | None = None
    spec_digest: str | None = None
    kolm_version: str | None = None
    evaluation: EvaluationRef | None = None
    determinism: Mapping[str, Any] | None = None
    gate: Mapping[str, Any] | None = None
    base: str | None = None
    recall: RecallRef | None = None
    previous_artifact: str | None = None
    #: keys this version does not know, kept as read
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: object) -> Manifest:
        """Parse a decoded manifest; raises :class:`ArtifactError` naming the bad field."""
        w = "manifest"
        obj = _object(d, w)
        fmt = obj.get("format")
        if fmt != FORMAT:
            raise _fail(f"{w}.format", repr(FORMAT), fmt)
        labels = obj.get("labels")
        if labels is not None and (
            not isinstance(labels, list) or not all(isinstance(y, str) and y for y in labels)
        ):
            raise _fail(f"{w}.labels", "a list of non-empty strings", labels)
        for key in ("determinism", "gate", "student"):
            if obj.get(key) is not None:
                _object(obj[key], f"{w}.{key}")
        if obj.get("student") is not None:
            _str(obj["student"], "kind", f"{w}.student")
        prev = obj.get("previous_artifact")
        return cls(
            format=FORMAT,
            name=_str(obj, "name", w, required=False),
            task_type=_str(obj, "task_type", w, required=False),
            labels=tuple(labels) if labels is not None else None,
            none_label=_str(obj, "none_label", w, required=False),
            base_model=_section(obj, "base_model", BaseModelRef._parse, w),
            student=dict(obj["student"]) if obj.get("student") is not None else None,
            adapter=_relpath(obj, "adapter", w, required=False),
            max_length=_int(obj, "max_length", w, 1, required=False),
            confidence_threshold=_number(obj, "confidence_threshold", w),
            verifier=_section(obj, "verifier", VerifierRef._parse, w),
            spec_digest=_str(obj, "spec_digest", w, required=False),
            kolm_version=_str(obj, "kolm_version", w, required=False),
            evaluation=_section(obj, "evaluation", EvaluationRef._parse, w),
            determinism=dict(obj["determinism"]) if obj.get("determinism") is not None else None,
            gate=dict(obj["gate"]) if obj.get("gate") is not None else None,
            base=_relpath(obj, "base", w, required=False),
            recall=_section(obj, "recall", RecallRef._parse, w),
            previous_artifact=_digest(obj, "previous_artifact", w) if prev is not None else None,
            extra={k: v for k, v in obj.items() if k not in _TOP},
        )

    @classmethod
    def from_json(cls, data: bytes | str) -> Manifest:
        """Parse ``manifest.json``'s bytes; raises :class:`ArtifactError` naming why."""
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise ArtifactError(f"manifest: not JSON: {e}") from e
        return cls.from_dict(obj)

    @classmethod
    def parse(cls, data: bytes, name: str) -> Manifest:
        """:meth:`from_json` for the artifact file ``name``: raises :class:`ArtifactError` as
        ``<name>: bad manifest.json: <why>``."""
        try:
            return cls.from_json(data)
        except ArtifactError as e:
            raise ArtifactError(f"{name}: bad {MANIFEST_FILE}: {e}") from e

    @classmethod
    def read(cls, folder: Path, name: str) -> Manifest:
        """:meth:`parse` of ``folder/manifest.json`` (an unpacked, already checked artifact)."""
        try:
            data = (Path(folder) / MANIFEST_FILE).read_bytes()
        except OSError as e:
            raise ArtifactError(f"{name}: bad {MANIFEST_FILE}: {e}") from e
        return cls.parse(data, name)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object (``None`` fields left out, unknown keys kept)."""
        out: dict[str, Any] = dict(self.extra)
        for key in _TOP:
            v = getattr(self, key)
            if v is None:
                continue
            if isinstance(v, BaseModelRef | VerifierRef | EvaluationRef | RecallRef):
                v = v.to_dict()
            elif isinstance(v, tuple):
                v = list(v)
            elif isinstance(v, Mapping):
                v = dict(v)
            out[key] = v
        return out

    def to_json(self) -> bytes:
        """The bytes of ``manifest.json`` (sorted keys, 2-space indent, final newline)."""
        return (json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n").encode()

    def replace(self, **changes: Any) -> Manifest:
        """A copy with ``changes`` (checked as :meth:`from_dict` checks a read manifest)."""
        return Manifest.from_dict(replace(self, **changes).to_dict())

    @property
    def adapter_dir(self) -> str:
        """The student's folder (``adapter``; ``"adapter"`` when absent)."""
        return self.adapter or "adapter"
