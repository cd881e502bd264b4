"""What a compile hands its caller: the stage names, :class:`StageEvent` (progress),
:class:`CompileOptions` (knobs outside the spec), :class:`CompileResult` and
:class:`JobCancelled`. What the stages hand each other is in :mod:`.outputs`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kolm_ledger.errors import KolmError

from .. import kscore as ks
from ..sinks import LABEL_BATCH

__all__ = [
    "DEFAULT_DOLLARS_PER_CPU_HOUR",
    "STAGES",
    "STAGE_TITLES",
    "CompileOptions",
    "CompileResult",
    "JobCancelled",
    "StageEvent",
]

STAGES = ("ingest", "sample", "vote", "sign", "train", "evaluate", "package")
STAGE_TITLES = {
    "ingest": "1 ingest",
    "sample": "2 teacher k-sampling",
    "vote": "3 verify & vote",
    "sign": "4 sign labels",
    "train": "5 LoRA train",
    "evaluate": "6 evaluate (K-score)",
    "package": "7 package & sign",
}
#: assumed price of one CPU core-hour when serving the student (stated in every cost report)
DEFAULT_DOLLARS_PER_CPU_HOUR = 0.05


class JobCancelled(KolmError):
    """The job was cancelled (between stages or between training steps)."""

    grpc_code = "CANCELLED"


@dataclass(frozen=True)
class StageEvent:
    """Progress of one stage: ``state`` is started | progress | finished | resumed | note
    (``message`` says something about the job, e.g. that training runs again)."""

    stage: str
    state: str
    done: int = 0
    total: int = 0
    counters: Mapping[str, float] = field(default_factory=dict)
    message: str = ""


@dataclass(frozen=True)
class CompileOptions:
    """Knobs of one compile that are not part of the task spec."""

    bundle_base: bool = False  # copy the base weights into base/ of the artifact
    threads: int | None = None  # torch CPU threads (part of reproducibility); spec default 2
    dollars_per_cpu_hour: float = DEFAULT_DOLLARS_PER_CPU_HOUR
    label_batch: int = LABEL_BATCH
    teacher_cache: Path | None = None  # default: <job_dir>/teacher-cache.sqlite
    latency_probe: int = 32  # holdout inputs predicted one at a time to measure latency


# --------------------------------------------------------------------------- the result


@dataclass
class CompileResult:
    """What a compile produced and measured (JSON round-trips through :meth:`to_dict`)."""

    job_id: str
    artifact_path: Path
    artifact_digest: str
    file_digest: str
    k_score: ks.KScore
    teacher_single: ks.KScore
    teacher_vote: ks.KScore
    labels: dict[str, Any]
    training_set_root: str
    eval_leaf: str
    artifact_index: int
    seconds: dict[str, float]
    cost: dict[str, Any]
    per_label: dict[str, Any]
    eval_index: int = -1
    recall: dict[str, Any] | None = None  # the manifest's recall section, when it has an index
    #: extract/generate: per-field P/R/F1, schema-valid share, ... (kscore.task_metrics)
    task_metrics: dict[str, Any] | None = None

    @property
    def labels_sampled(self) -> int:
        """Unlabeled inputs the teacher was asked about."""
        return int(self.labels["sampled"])

    @property
    def labels_accepted(self) -> int:
        """Inputs whose k-vote was accepted."""
        return int(self.labels["accepted"])

    @property
    def labels_rejected(self) -> int:
        """Inputs whose k-vote was rejected."""
        return int(self.labels["rejected"])

    @property
    def labels_logged(self) -> int:
        """Label receipts the ledger acknowledged (seed pairs included): the training set."""
        return int(self.labels["logged"])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {
            "job_id": self.job_id,
            "artifact": self.artifact_path.name,
            "artifact_path": str(self.artifact_path),
            "artifact_digest": self.artifact_digest,
            "file_digest": self.file_digest,
            "k_score": self.k_score.to_dict(),
            "teacher_k_score_single": self.teacher_single.to_dict(),
            "teacher_k_score_vote": self.teacher_vote.to_dict(),
            "labels": self.labels,
            "training_set_root": self.training_set_root,
            "eval_leaf": self.eval_leaf,
            "artifact_index": self.artifact_index,
            "seconds": self.seconds,
            "cost": self.cost,
            "per_label": self.per_label,
            "eval_index": self.eval_index,
            "recall": self.recall,
            **({"task_metrics": self.task_metrics} if self.task_metrics else {}),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CompileResult:
        """Inverse of :meth:`to_dict`."""
        return cls(
            d["job_id"],
            Path(d["artifact_path"]),
            d["artifact_digest"],
            d["file_digest"],
            ks.KScore(**d["k_score"]),
            ks.KScore(**d["teacher_k_score_single"]),
            ks.KScore(**d["teacher_k_score_vote"]),
            dict(d["labels"]),
            d["training_set_root"],
            d["eval_leaf"],
            int(d["artifact_index"]),
            dict(d["seconds"]),
            dict(d["cost"]),
            dict(d["per_label"]),
            int(d.get("eval_index", -1)),
            dict(d["recall"]) if d.get("recall") else None,
            dict(d["task_metrics"]) if d.get("task_metrics") else None,
        )
