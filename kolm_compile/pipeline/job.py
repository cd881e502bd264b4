"""The compile job: the stages in order, each output durably written, a restart resuming
after the last finished stage (the package docstring, :mod:`kolm_compile.pipeline`,
describes the seven stages; :mod:`.labels`, :mod:`.training` and :mod:`.package` hold
them, :mod:`.result` the dataclasses they exchange)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from kolm_ledger._crypto import PrivateKey
from kolm_ledger.errors import ConflictError, SpecError

from ..cache import CachedTeacher, TeacherCache
from ..sinks import ReceiptSink
from ..spec import TaskSpec
from ..teachers import TeacherSpend, build_teacher
from . import ingest, labels, package, training
from .context import StageContext, dump_json
from .outputs import Evaluated, Ingested, Packaged, Sampled, Signed, StageOutputs, Trained, Voted
from .result import STAGES, CompileOptions, CompileResult, StageEvent

if TYPE_CHECKING:
    from ..student import Student

__all__ = ["CompileJob"]

#: stages a changed student section re-runs
_TRAINING_STAGES = ("train", "evaluate", "package")


class _Output(Protocol):
    """What every stage returns (the dataclasses of :mod:`.result`)."""

    @property
    def counters(self) -> Mapping[str, float]: ...

    @property
    def total(self) -> int: ...

    def to_json(self) -> dict[str, Any]: ...


_O = TypeVar("_O", bound=_Output)


class CompileJob:
    """One compile, stage by stage, resumable from its job folder (package docstring).

    Any task kind (classify, extract, generate; the student kind the spec resolved). Requires
    a ``compile`` key listed in the ledger's trust root. ``on_event`` gets every :class:`StageEvent`;
    ``should_stop`` is polled between stages and training steps (→ :class:`JobCancelled`);
    ``on_stage_done(stage)`` runs after a stage's output is durably written.
    """

    def __init__(
        self,
        spec: TaskSpec,
        *,
        key: PrivateKey,
        sink: ReceiptSink,
        job_dir: Path,
        job_id: str | None = None,
        out_dir: Path | None = None,
        options: CompileOptions | None = None,
        on_event: Callable[[StageEvent], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        on_stage_done: Callable[[str], None] | None = None,
        embed: Callable[[list[str]], Any] | None = None,
    ) -> None:
        if spec.data.unlabeled is None and spec.data.seed_pairs is None:
            raise SpecError("spec.data: needs unlabeled inputs or seed_pairs")
        if spec.data.holdout is None:
            raise SpecError("spec.data.holdout: required (the K-score is measured on it)")
        self.spec = spec
        self.key = key
        self.sink = sink
        self.dir = Path(job_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.stage_dir = self.dir / "stages"
        self.stage_dir.mkdir(exist_ok=True)
        self.job_id = job_id or self._stored_job_id() or f"job-{uuid.uuid4().hex[:16]}"
        self.notes: list[str] = []  # what opening the folder decided (retrain, ...)
        self._check_same_spec()
        (self.dir / "job_id").write_text(self.job_id)
        #: what this job bought from its teacher over all its runs (JOB/spend.json)
        self.spend = TeacherSpend(self.dir / "spend.json")
        self.out_dir = Path(out_dir) if out_dir else self.dir
        self.opts = options or CompileOptions()
        self.emit = on_event or (lambda e: None)
        self._stop = should_stop or (lambda: False)
        self._stage_done = on_stage_done or (lambda s: None)
        self.embed = embed
        self.verifier = spec.build_verifier()
        self.seconds: dict[str, float] = {}
        self.teacher_misses = 0  # samples bought from the teacher by this run
        self._teacher: CachedTeacher | None = None
        self._cache: TeacherCache | None = None
        self._student: Student | None = None  # the one this run trained, if it did
        #: what the stage functions share
        self.ctx = StageContext(
            spec=spec,
            verifier=self.verifier,
            job_id=self.job_id,
            dir=self.dir,
            out_dir=self.out_dir,
            opts=self.opts,
            key=key,
            sink=sink,
            emit=lambda e: self.emit(e),  # through the attribute: a caller may swap it
            should_stop=self._stop,
        )

    def _stored_job_id(self) -> str | None:
        p = self.dir / "job_id"
        return p.read_text().strip() if p.exists() else None

    def _check_same_spec(self) -> None:
        """A job folder resumes only the job it was started with (``JOB/identity.json``:
        :meth:`TaskSpec.identity`). The budget and operational teacher settings may change;
        a changed student section (``JOB/training_digest``) re-runs train, evaluate and
        package. ``JOB/spec_digest`` is the whole spec of the latest run."""
        spec = self.spec
        ident, legacy = self.dir / "identity.json", self.dir / "spec_digest"
        mine = spec.identity()
        if ident.exists():
            stored = json.loads(ident.read_text())
            differ = sorted(k for k in set(stored) | set(mine) if stored.get(k) != mine.get(k))
            if differ:
                raise ConflictError(
                    f"job folder {self.dir} holds job {self.job_id} of another spec: its "
                    f"{', '.join(differ)} {'parts differ' if len(differ) > 1 else 'part differs'} "
                    "(a budget, timeout, retry, concurrency or student change would not); use "
                    "a fresh --work folder: answers the teacher cache holds are not paid again"
                )
        elif legacy.exists() and legacy.read_text().strip() != spec.digest():
            raise ConflictError(
                f"job folder {self.dir} holds job {self.job_id} of another spec (started by an "
                "older kolm, which kept no identity); use a fresh --work folder: answers the "
                "teacher cache holds are not paid again"
            )
        train = self.dir / "training_digest"
        now = spec.training_digest()
        if train.exists() and train.read_text().strip() != now:
            gone = [s for s in _TRAINING_STAGES if (self.stage_dir / f"{s}.json").exists()]
            for stage in _TRAINING_STAGES:
                for name in (f"{stage}.json", f"{stage}.time"):
                    (self.stage_dir / name).unlink(missing_ok=True)
            if gone:
                self.notes.append(
                    f"spec.student changed: {', '.join(gone)} will run again (labels kept)"
                )
        dump_json(ident, mine)
        train.write_text(now)
        legacy.write_text(spec.digest())

    # ---- stage bookkeeping --------------------------------------------------------

    def finished_stages(self) -> list[str]:
        """Stages whose output is in the job folder, in order."""
        return [s for s in STAGES if (self.stage_dir / f"{s}.json").exists()]

    def _run_stage(
        self, stage: str, fn: Callable[[], _O], load: Callable[[Mapping[str, Any]], _O]
    ) -> _O:
        """``fn()``'s output, written to ``stages/<stage>.json``; or, when that file
        exists (a finished stage of an earlier run), ``load`` of it."""
        path = self.stage_dir / f"{stage}.json"
        if path.exists():
            stored = json.loads(path.read_text())
            self.seconds[stage] = stored.get("_seconds", 0.0)
            out = load(stored)
            self.emit(StageEvent(stage, "resumed", 1, 1, out.counters, "resumed"))
            return out
        self.ctx.check_stop(stage)
        self.emit(StageEvent(stage, "started"))
        t0 = time.perf_counter()
        out = fn()
        self.seconds[stage] = round(time.perf_counter() - t0, 3)
        dump_json(path, {**out.to_json(), "_seconds": self.seconds[stage]})
        self._stage_done(stage)
        self.emit(StageEvent(stage, "finished", out.total, out.total, out.counters))
        return out

    # ---- the teacher -----------------------------------------------------------------

    def teacher(self) -> CachedTeacher:
        """The spec's teacher behind the content-hash cache (built once, lazily)."""
        if self._teacher is None:
            opts: dict[str, Any] = {}
            if self.spec.teacher.backend == "simulated" and self.embed is not None:
                opts["embed"] = self.embed
            if self.spec.teacher.backend == "openai":
                opts["spend"] = self.spend
            self._cache = TeacherCache(self.opts.teacher_cache or self.dir / "teacher-cache.sqlite")
            self._teacher = CachedTeacher(
                build_teacher(self.spec.teacher, self.spec, **opts), self._cache, spend=self.spend
            )
        return self._teacher

    def close(self) -> None:
        """Release the teacher and its cache."""
        if self._teacher is not None:
            self._teacher.close()
        if self._cache is not None:
            self._cache.close()
        self._teacher = self._cache = None

    # ---- what the stages share -------------------------------------------------------

    def model_dir(self) -> Path:
        """The folder packed into the ``.kolm`` (named after the task)."""
        return self.ctx.model_dir

    def cost_report(self, smp: Sampled, latency_s: float, threads: int) -> dict[str, Any]:
        """Teacher calls, tokens and cost, beside the projected per-call cost of the student
        (:func:`kolm_compile.pipeline.package.cost_report`)."""
        return package.cost_report(
            self.spec.teacher.k, self.opts, self.spend, smp, latency_s, threads
        )

    # ---- the stages ------------------------------------------------------------------

    def _sample(self, ing: Ingested) -> Sampled:
        smp = labels.sample(self.ctx, self.teacher(), ing)
        self.teacher_misses += smp.usage.cache_misses
        return smp

    def _train(self, sgn: Signed) -> Trained:
        out, self._student = training.train(self.ctx, sgn)
        return out

    # ---- run --------------------------------------------------------------------------

    def run_until(self, last: str = "package") -> StageOutputs:
        """Run (or resume) the stages up to and including ``last``; returns their outputs.
        Raises on failure or cancel."""
        if last not in STAGES:
            raise ValueError(f"last: {last!r} is not a stage ({', '.join(STAGES)})")
        ctx, out = self.ctx, StageOutputs()
        stop = STAGES.index(last)
        try:
            for note in self.notes:
                self.emit(StageEvent("ingest", "note", message=note))
            ing = out.ingest = self._run_stage(
                "ingest", lambda: ingest.ingest(self.spec), Ingested.from_json
            )
            if stop == 0:
                return out
            if not (self.stage_dir / "sign.json").exists():
                # a key the ledger will refuse is found before the teacher is paid
                check = getattr(self.sink, "check_signer", None)
                if check is not None:
                    check(self.key)
            smp = out.sample = self._run_stage(
                "sample", lambda: self._sample(ing), Sampled.from_json
            )
            if stop == 1:
                return out
            vt = out.vote = self._run_stage(
                "vote", lambda: labels.vote(ctx, ing, smp), Voted.from_json
            )
            if stop == 2:
                return out
            sgn = out.sign = self._run_stage(
                "sign", lambda: labels.sign(ctx, ing, smp, vt), Signed.from_json
            )
            if stop == 3:
                return out
            tr = out.train = self._run_stage("train", lambda: self._train(sgn), Trained.from_json)
            if stop == 4:
                return out
            ev = out.evaluate = self._run_stage(
                "evaluate",
                lambda: training.evaluate(ctx, ing, smp, tr, self._student),
                Evaluated.from_json,
            )
            if stop == 5:
                return out
            out.package = self._run_stage(
                "package",
                lambda: package.package(ctx, ing, smp, vt, sgn, tr, ev, self.spend),
                Packaged.from_json,
            )
            return out
        finally:
            self.close()

    def run(self) -> CompileResult:
        """Run (or resume) every stage; returns the result. Raises on failure or cancel."""
        out = self.run_until("package")
        sgn, ev, pk = out.sign, out.evaluate, out.package
        assert sgn is not None and ev is not None and pk is not None
        return CompileResult(
            job_id=self.job_id,
            artifact_path=pk.artifact_path,
            artifact_digest=pk.artifact_digest,
            file_digest=pk.file_digest,
            k_score=ev.k_score,
            teacher_single=ev.teacher_single,
            teacher_vote=ev.teacher_vote,
            labels=dict(pk.labels),
            training_set_root=sgn.training_set_root,
            eval_leaf=pk.eval_leaf,
            artifact_index=pk.artifact_index,
            seconds=dict(self.seconds),
            cost=dict(pk.cost),
            per_label=dict(ev.per_label),
            eval_index=pk.eval_index,
            recall=None if pk.recall is None else dict(pk.recall),
            task_metrics=None if ev.task_metrics is None else dict(ev.task_metrics),
        )
