"""What every stage of one compile shares: the spec, its verifier, the job's name and
folder, the options, the signing key and the receipt sink, and the job's progress and
stop callbacks (:class:`StageContext`, built once by :class:`~.job.CompileJob`)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kolm_ledger._crypto import PrivateKey

from ..sinks import ReceiptSink
from ..spec import TaskSpec
from ..verifiers import Verifier
from .result import CompileOptions, JobCancelled, StageEvent

if TYPE_CHECKING:
    from .._train import TrainConfig

__all__ = ["StageContext", "dump_json", "stage_time"]


def stage_time(path: Path) -> datetime:
    """The time a stage first started (kept across resumes, so its receipts replay exactly)."""
    if path.exists():
        return datetime.fromisoformat(path.read_text().strip())
    now = datetime.now(UTC).replace(microsecond=0)
    path.write_text(now.isoformat())
    return now


def dump_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as sorted JSON through a temporary file (a crash leaves the old one)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, sort_keys=True))
    os.replace(tmp, path)


@dataclass(frozen=True)
class StageContext:
    """One job's shared state for its stage functions."""

    spec: TaskSpec
    verifier: Verifier
    job_id: str
    dir: Path  # the job folder
    out_dir: Path  # where the .kolm goes
    opts: CompileOptions
    key: PrivateKey
    sink: ReceiptSink
    emit: Callable[[StageEvent], None]
    should_stop: Callable[[], bool]

    @property
    def stage_dir(self) -> Path:
        """``JOB/stages``: each finished stage's output, and a stage's own working files."""
        return self.dir / "stages"

    @property
    def model_dir(self) -> Path:
        """The folder packed into the ``.kolm`` (named after the task)."""
        return self.dir / "build" / self.spec.name

    def progress(self, stage: str, done: int, total: int, **counters: float) -> None:
        """Report a stage's progress."""
        self.emit(StageEvent(stage, "progress", done, total, counters))

    def check_stop(self, stage: str) -> None:
        """Raise :class:`JobCancelled` when the job was asked to stop."""
        if self.should_stop():
            raise JobCancelled(f"job {self.job_id} cancelled before stage {stage}")

    def train_config(self) -> TrainConfig:
        """The student's training configuration (``options.threads`` overrides the spec's)."""
        from .. import _train

        cfg = self.spec.student.train_config(self.spec.seed)
        if self.opts.threads is not None:
            cfg = _train.TrainConfig.from_dict({**cfg.to_dict(), "threads": self.opts.threads})
        return cfg
