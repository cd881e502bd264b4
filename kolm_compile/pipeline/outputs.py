"""What the compile stages hand each other: one frozen dataclass per stage.

Each stage returns one of these (:class:`Ingested` … :class:`Packaged`); the job writes
it to ``JOB/stages/<stage>.json`` with ``to_json`` (the same JSON as before these types
existed, so a folder written by an older kolm resumes) and reads it back with
``from_json``. ``counters`` and ``total`` are the stage's progress figures (stored as
``_counters``/``_total``). Free-form records that go into receipts or onto disk for a
person (the teacher's description, rejected inputs, the gate object, the cost report)
stay mappings; what one stage reads from another has a field.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from .. import kscore as ks
from ..voting import VoteSummary

__all__ = [
    "AcceptedLabel",
    "Evaluated",
    "FailedLabel",
    "HoldoutReport",
    "Ingested",
    "LoggedLabel",
    "Packaged",
    "Sampled",
    "Signed",
    "StageOutputs",
    "Trained",
    "Usage",
    "Voted",
]


# --------------------------------------------------------------------------- (1) ingest


@dataclass(frozen=True)
class HoldoutReport:
    """What ingest did to the holdout's rows: ``mapped`` to a label of the spec (case,
    quotes, ``_``/``-``), ``dropped`` (classify: a label not in the spec; extract: an
    output that is not an object valid under the output schema; generate: an output that
    is not text), ``unlabeled`` (empty), and ``leaked`` (also a training input: the
    K-score would flatter the student). ``dropped_rows`` names the first dropped rows of
    a structured task with the reason (``row 4: not JSON: ...``); empty for classify."""

    rows: int
    mapped: int = 0
    dropped: int = 0
    unlabeled: int = 0
    leaked: int = 0
    dropped_rows: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, in the order the receipts and the summary show (``dropped_rows``
        only when there are some)."""
        out: dict[str, Any] = {
            "rows": self.rows,
            "mapped": self.mapped,
            "dropped": self.dropped,
            "unlabeled": self.unlabeled,
            "leaked": self.leaked,
        }
        if self.dropped_rows:
            out["dropped_rows"] = list(self.dropped_rows)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> HoldoutReport:
        """Inverse of :meth:`to_dict`."""
        return cls(**{**d, "dropped_rows": tuple(d.get("dropped_rows", ()))})


@dataclass(frozen=True)
class Ingested:
    """The unlabeled inputs (unique, file order; their gold label when the file has one,
    for diagnostics only; their data row), the seed pairs and the holdout. A label is the
    task's answer text: a label of the set (classify), the canonical JSON of the object
    (extract) or the text (generate)."""

    inputs: Sequence[str]
    input_gold: Sequence[str | None]
    input_rows: Sequence[int | None]
    seeds: Sequence[tuple[str, str]]
    holdout: Sequence[tuple[str, str]]
    holdout_report: HoldoutReport | None  # None: a folder from before the report
    counters: Mapping[str, float] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """Progress total (one step)."""
        return 1

    def to_json(self) -> dict[str, Any]:
        """``stages/ingest.json``."""
        return {
            "inputs": list(self.inputs),
            "input_gold": list(self.input_gold),
            "input_rows": list(self.input_rows),
            "seeds": [[t, y] for t, y in self.seeds],
            "holdout": [[t, y] for t, y in self.holdout],
            **(
                {"holdout_report": self.holdout_report.to_dict()}
                if self.holdout_report is not None
                else {}
            ),
            "_counters": dict(self.counters),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Ingested:
        """Inverse of :meth:`to_json` (a folder from before ``input_rows`` numbers none)."""
        inputs = list(d["inputs"])
        report = d.get("holdout_report")
        return cls(
            inputs=inputs,
            input_gold=list(d.get("input_gold") or [None] * len(inputs)),
            input_rows=list(d.get("input_rows") or [None] * len(inputs)),
            seeds=[(t, y) for t, y in d["seeds"]],
            holdout=[(t, y) for t, y in d["holdout"]],
            holdout_report=HoldoutReport.from_dict(report) if report else None,
            counters=dict(d.get("_counters") or {}),
        )


# --------------------------------------------------------------------------- (2) sample


@dataclass(frozen=True)
class Usage:
    """What the samples of one job cost: ``cost`` prices every sample, whether this run or
    an earlier one paid it; ``cost_paid_now`` only those this run bought."""

    samples: int
    cache_hits: int
    cache_misses: int
    input_tokens: int
    output_tokens: int
    cost: float
    cost_paid_now: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "samples": self.samples,
            "cache_hits": self.cache_hits,
            "cache_misses": self.cache_misses,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cost": self.cost,
            "cost_paid_now": self.cost_paid_now,
        }


@dataclass(frozen=True)
class Sampled:
    """k teacher answers per input and per holdout input; ``teacher_errors``: inputs the
    teacher could not answer (index over inputs then holdout → the error's record)."""

    samples: Sequence[Sequence[str]]
    holdout_samples: Sequence[Sequence[str]]
    teacher_errors: Mapping[str, Mapping[str, Any]]
    teacher: Mapping[str, Any]  # the teacher's description, as the label receipts name it
    usage: Usage
    total: int
    counters: Mapping[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """``stages/sample.json``."""
        return {
            "samples": [list(ss) for ss in self.samples],
            "holdout_samples": [list(ss) for ss in self.holdout_samples],
            "teacher_errors": {k: dict(v) for k, v in self.teacher_errors.items()},
            "teacher": dict(self.teacher),
            "usage": self.usage.to_dict(),
            "_total": self.total,
            "_counters": dict(self.counters),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Sampled:
        """Inverse of :meth:`to_json`."""
        return cls(
            samples=[list(ss) for ss in d["samples"]],
            holdout_samples=[list(ss) for ss in d["holdout_samples"]],
            teacher_errors=dict(d.get("teacher_errors") or {}),
            teacher=dict(d["teacher"]),
            usage=Usage(**d["usage"]),
            total=int(d.get("_total", 1)),
            counters=dict(d.get("_counters") or {}),
        )


# --------------------------------------------------------------------------- (3) vote


class AcceptedLabel(NamedTuple):
    """One accepted k-vote (a JSON array ``[input, answer, votes, digests, agreement]``)."""

    input: int  # index into Ingested.inputs
    answer: str
    votes: dict[str, int]
    sample_digests: list[str]
    agreement: float


@dataclass(frozen=True)
class Voted:
    """The accepted votes, the summary over all votes (with a few answers the verifier
    refused and the first teacher error) and every rejected input's record."""

    accepted: Sequence[AcceptedLabel]
    summary: VoteSummary
    verifier_examples: Sequence[str]
    teacher_examples: Sequence[str]
    rejected: Sequence[Mapping[str, Any]]
    total: int
    counters: Mapping[str, float] = field(default_factory=dict)

    def summary_dict(self) -> dict[str, Any]:
        """The summary as ``stages/vote.json`` records it."""
        return {
            **self.summary.to_dict(),
            "verifier_examples": list(self.verifier_examples),
            "teacher_examples": list(self.teacher_examples),
        }

    def to_json(self) -> dict[str, Any]:
        """``stages/vote.json``."""
        return {
            "accepted": [list(a) for a in self.accepted],
            "summary": self.summary_dict(),
            "rejected": [dict(r) for r in self.rejected],
            "_total": self.total,
            "_counters": dict(self.counters),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Voted:
        """Inverse of :meth:`to_json`."""
        s = d["summary"]
        summary = VoteSummary(
            n=int(s["n"]),
            accepted=int(s["accepted"]),
            reasons=dict(s.get("reasons") or {}),
            top_votes={int(k): v for k, v in (s.get("top_votes") or {}).items()},
            sample_failures=int(s.get("sample_failures", 0)),
            mean_agreement=float(s.get("mean_agreement", 0.0)),
        )
        return cls(
            accepted=[AcceptedLabel(*a) for a in d["accepted"]],
            summary=summary,
            verifier_examples=list(s.get("verifier_examples") or []),
            teacher_examples=list(s.get("teacher_examples") or []),
            rejected=list(d.get("rejected") or []),
            total=int(d.get("_total", 1)),
            counters=dict(d.get("_counters") or {}),
        )


# --------------------------------------------------------------------------- (4) sign


class LoggedLabel(NamedTuple):
    """A label receipt the ledger acknowledged (JSON ``[ledger_index, leaf_hash, text, label]``)."""

    ledger_index: int
    leaf_hash: str  # hex
    text: str
    label: str


class FailedLabel(NamedTuple):
    """A label receipt the ledger refused (JSON ``[text, label, error]``)."""

    text: str
    label: str
    error: str


@dataclass(frozen=True)
class Signed:
    """The acknowledged labels in ledger index order (the training set), the refused ones
    and the training-set root over the acknowledged leaf hashes."""

    logged: Sequence[LoggedLabel]
    failed: Sequence[FailedLabel]
    training_set_root: str
    total: int
    counters: Mapping[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """``stages/sign.json``."""
        return {
            "logged": [list(r) for r in self.logged],
            "failed": [list(r) for r in self.failed],
            "training_set_root": self.training_set_root,
            "_total": self.total,
            "_counters": dict(self.counters),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Signed:
        """Inverse of :meth:`to_json`."""
        return cls(
            logged=[LoggedLabel(*r) for r in d["logged"]],
            failed=[FailedLabel(*r) for r in d["failed"]],
            training_set_root=d["training_set_root"],
            total=int(d.get("_total", 1)),
            counters=dict(d.get("_counters") or {}),
        )


# --------------------------------------------------------------------------- (5) train


@dataclass(frozen=True)
class Trained:
    """The trained student's figures; ``gate`` is the manifest's gate object
    (:func:`kolm_compile.gate.build`), whose files are in the model folder."""

    gate: Mapping[str, Any] | None
    examples: int
    steps: int
    first_loss: float
    final_loss: float
    counters: Mapping[str, float] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """Progress total: the training steps."""
        return self.steps

    def to_json(self) -> dict[str, Any]:
        """``stages/train.json``."""
        return {
            "gate": None if self.gate is None else dict(self.gate),
            "examples": self.examples,
            "steps": self.steps,
            "first_loss": self.first_loss,
            "final_loss": self.final_loss,
            "_total": self.steps,
            "_counters": dict(self.counters),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Trained:
        """Inverse of :meth:`to_json`."""
        gate = d.get("gate")
        return cls(
            gate=None if gate is None else dict(gate),
            examples=int(d["examples"]),
            steps=int(d["steps"]),
            first_loss=d["first_loss"],
            final_loss=d["final_loss"],
            counters=dict(d.get("_counters") or {}),
        )


# --------------------------------------------------------------------------- (6) evaluate


@dataclass(frozen=True)
class Evaluated:
    """The student's K-score on the holdout, the teacher's (one sample, k-vote), per-label
    metrics, the confusion matrix, the signed outcomes and their roots, the determinism
    record, the single-input latency at ``threads``, and the gate on the holdout."""

    k_score: ks.KScore
    teacher_single: ks.KScore
    teacher_vote: ks.KScore
    per_label: Mapping[str, Any]
    confusion: Sequence[Sequence[int]]
    holdout_root: str
    outcome_root: str
    outcomes: Sequence[str]  # one JSON line each (reexec.outcome_line)
    determinism: Mapping[str, Any]
    latency_s: float
    threads: int
    total: int
    gate: Mapping[str, Any] | None = None
    #: extract/generate: per-field P/R/F1, schema-valid share, exact match, BLEU
    #: (:func:`kolm_compile.kscore.task_metrics`); ``None`` for classify
    task_metrics: Mapping[str, Any] | None = None
    counters: Mapping[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """``stages/evaluate.json`` (``gate`` only when the student has one)."""
        return {
            **({"gate": dict(self.gate)} if self.gate is not None else {}),
            **({"task_metrics": dict(self.task_metrics)} if self.task_metrics else {}),
            "k_score": self.k_score.to_dict(),
            "teacher_single": self.teacher_single.to_dict(),
            "teacher_vote": self.teacher_vote.to_dict(),
            "per_label": dict(self.per_label),
            "confusion": [list(row) for row in self.confusion],
            "holdout_root": self.holdout_root,
            "outcome_root": self.outcome_root,
            "outcomes": list(self.outcomes),
            "determinism": dict(self.determinism),
            "latency_s": self.latency_s,
            "threads": self.threads,
            "_total": self.total,
            "_counters": dict(self.counters),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Evaluated:
        """Inverse of :meth:`to_json`."""
        return cls(
            k_score=ks.KScore(**d["k_score"]),
            teacher_single=ks.KScore(**d["teacher_single"]),
            teacher_vote=ks.KScore(**d["teacher_vote"]),
            per_label=dict(d["per_label"]),
            confusion=[list(row) for row in d["confusion"]],
            holdout_root=d["holdout_root"],
            outcome_root=d["outcome_root"],
            outcomes=list(d["outcomes"]),
            determinism=dict(d["determinism"]),
            latency_s=d["latency_s"],
            threads=int(d["threads"]),
            total=int(d.get("_total", 1)),
            gate=dict(d["gate"]) if "gate" in d else None,
            task_metrics=dict(d["task_metrics"]) if "task_metrics" in d else None,
            counters=dict(d.get("_counters") or {}),
        )


# --------------------------------------------------------------------------- (7) package


@dataclass(frozen=True)
class Packaged:
    """The signed ``.kolm`` and where its eval and artifact receipts sit in the ledger;
    ``labels`` and ``cost`` as the artifact receipt signs them; ``recall`` is the
    manifest's recall section (when the artifact has an index)."""

    artifact_path: Path
    artifact_digest: str
    file_digest: str
    eval_leaf: str
    eval_index: int
    artifact_index: int
    labels: Mapping[str, Any]
    cost: Mapping[str, Any]
    recall: Mapping[str, Any] | None
    counters: Mapping[str, float] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """Progress total (one step)."""
        return 1

    def to_json(self) -> dict[str, Any]:
        """``stages/package.json``."""
        return {
            "artifact_path": str(self.artifact_path),
            "artifact_digest": self.artifact_digest,
            "file_digest": self.file_digest,
            "eval_leaf": self.eval_leaf,
            "eval_index": self.eval_index,
            "artifact_index": self.artifact_index,
            "labels": dict(self.labels),
            "cost": dict(self.cost),
            "recall": None if self.recall is None else dict(self.recall),
            "_counters": dict(self.counters),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Packaged:
        """Inverse of :meth:`to_json`."""
        recall = d.get("recall")
        return cls(
            artifact_path=Path(d["artifact_path"]),
            artifact_digest=d["artifact_digest"],
            file_digest=d["file_digest"],
            eval_leaf=d["eval_leaf"],
            eval_index=int(d.get("eval_index", -1)),
            artifact_index=int(d["artifact_index"]),
            labels=dict(d["labels"]),
            cost=dict(d["cost"]),
            recall=dict(recall) if recall else None,
            counters=dict(d.get("_counters") or {}),
        )


@dataclass
class StageOutputs:
    """The outputs of the stages a run reached (:meth:`CompileJob.run_until`)."""

    ingest: Ingested | None = None
    sample: Sampled | None = None
    vote: Voted | None = None
    sign: Signed | None = None
    train: Trained | None = None
    evaluate: Evaluated | None = None
    package: Packaged | None = None
