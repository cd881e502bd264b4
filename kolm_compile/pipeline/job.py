"""The compile pipeline: a teacher becomes a signed, provable Specialist (``.kolm``).

Seven stages, each reported as :class:`StageEvent` s and each persisted in the job
folder when it finishes, so a restarted job resumes after the last finished stage::

    (1) ingest      read unlabeled inputs, seed pairs and the holdout
    (2) sample      k teacher samples per input (and per holdout input, for the
                    teacher's own K-score), through the content-hash teacher cache
    (3) vote        verify every sample, majority vote, accept or reject the input
    (4) sign        one signed ``label`` receipt per accepted label (and per seed
                    pair), appended to the ledger in batches; only acknowledged
                    labels go on
    (5) train       LoRA student on the acknowledged labels, in ledger index order
    (6) evaluate    K-score of the student on the holdout (n, Wilson interval), the
                    teacher's K-score per single sample and per k-vote, per-label P/R;
                    each example's outcome, at recorded settings (threads, batch size,
                    a probe-batch digest: :func:`kolm_ledger.reexec.determinism_record`)
    (7) package     manifest.json, task.json, verifier.json, adapter/,
                    evaluation/outcomes.jsonl (the signed outcomes; their root is the
                    eval receipt's ``outcome_root``), (base/ with
                    ``bundle_base``, recall/index.db with a ``recall`` spec section)
                    → deterministic signed ``.kolm``; then the ``eval`` receipt
                    (subject = artifact digest) and the ``artifact`` receipt
                    (training-set root, eval leaf hash, ledger checkpoint, and
                    ``corpus_root``/``corpus_chunks`` when there is a recall index)

The training-set root is :func:`kolm_ledger.provenance.training_set_root` over the
leaf hashes of the acknowledged label receipts in ledger index order — what
``kolm provenance`` recomputes. Nothing inside the ``.kolm`` holds a time, a job id
or a local path: the same spec, seed and teacher cache give a byte-identical file.

A resumed job (the same job folder, or the same ``job_id`` on a sink with
``job_labels``) reuses the label receipts the ledger already holds for it, so the
ledger has exactly one receipt per trained label of a job.

A job folder holds one job: :meth:`TaskSpec.identity` (task, data and its files,
teacher, recall). The budget and the teacher's operational settings (timeouts,
retries, concurrency, batching) may change between runs; a changed student section
re-runs train, evaluate and package only. What the job bought from its teacher,
over all its runs, is ``JOB/spend.json`` (:class:`~kolm_compile.teachers.TeacherSpend`):
the budget is checked against it and the artifact receipt's cost signs it.

One input the teacher cannot answer (:class:`~kolm_compile.teachers.InputRejected`:
an HTTP 400 content filter, a malformed answer after two retries) is rejected like a
failed vote (code ``teacher_error``, its status and reason in ``stages/vote.json``
and the summary); the job goes on.

Only ``classify`` tasks can be trained today; ``extract``/``generate`` are refused
with a :class:`~kolm_ledger.errors.SpecError` ("not supported by the trainer yet").

Example::

    from kolm_compile.pipeline import CompileJob
    from kolm_compile.sinks import LocalLedgerSink
    from kolm_compile.spec import TaskSpec

    spec = TaskSpec.load("kolm_compile/examples/banking77-router.yaml")
    job = CompileJob(spec, key=compile_key, sink=LocalLedgerSink.open(db, "keys"),
                     job_dir=Path("work/job-1"))
    result = job.run()          # result.artifact_path, result.k_score, result.cost
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kolm_ledger import reexec
from kolm_ledger._crypto import PrivateKey
from kolm_ledger.canonical import canonical_json
from kolm_ledger.errors import ConflictError, KolmError, SpecError
from kolm_ledger.manifest import (
    MANIFEST_FILE,
    BaseModelRef,
    EvaluationRef,
    Manifest,
    RecallRef,
    VerifierRef,
)
from kolm_ledger.provenance import training_set_root
from kolm_ledger.receipts import (
    artifact_statement,
    eval_statement,
    example_digest,
    label_statement,
    sign_statement,
)

from .. import artifact as kolm_artifact
from .. import gate as _gate
from .. import kscore as ks
from ..cache import CachedTeacher, TeacherCache
from ..sinks import LABEL_BATCH, Acked, ReceiptSink
from ..spec import TaskSpec, kolm_version, read_table
from ..teachers import InputRejected, SampleRequest, TeacherSpend, build_teacher
from ..voting import VoteResult, summarize, vote

__all__ = [
    "DEFAULT_DOLLARS_PER_CPU_HOUR",
    "STAGES",
    "STAGE_TITLES",
    "CompileJob",
    "CompileOptions",
    "CompileResult",
    "JobCancelled",
    "StageEvent",
    "base_weights_digest",
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
_SEED_TEACHER = "seed-pairs"
_CONFUSION_MAX_LABELS = 80  # the eval receipt carries the confusion matrix up to this many
#: rejection code of an input the teacher could not answer (voting has the others)
REJECT_TEACHER_ERROR = "teacher_error"
#: this many inputs rejected by the teacher before it answered any: a setting, not an input
_REJECTED_BEFORE_ANY = 5
#: stages a changed student section re-runs
_TRAINING_STAGES = ("train", "evaluate", "package")


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
        )


# --------------------------------------------------------------------------- data


def _select(rows: Sequence[Any], keep: set[str] | None, limit: int | None) -> list[Any]:
    counts: Counter[str | None] = Counter()
    out = []
    for row in rows:
        label = row[1]
        if keep is not None and label is not None and label not in keep:
            continue
        if limit is not None:
            if counts[label] >= limit:
                continue
            counts[label] += 1
        out.append(tuple(row))
    return out


def _nothing_accepted(summary: Mapping[str, Any]) -> str:
    """``0 of 30 inputs accepted: 30 failed the verifier (examples …)``."""
    words = {
        "too_few_valid": "failed the verifier",
        "no_agreement": "had no agreement",
        "tie": "were ties",
        REJECT_TEACHER_ERROR: "were rejected by the teacher",
    }
    reasons = summary.get("reasons") or {}
    parts = [f"{n} {words.get(code, code)}" for code, n in sorted(reasons.items())]
    text = f"0 of {summary['n']} inputs accepted: {', '.join(parts) or 'none sampled'}"
    examples = (summary.get("verifier_examples") or []) + (summary.get("teacher_examples") or [])
    if examples:
        text += f" (examples: {'; '.join(examples)})"
    return text + "; nothing to sign or train on (stages/vote.json lists every input)"


def _rows_raw(path: Path) -> Any:
    from ..spec import read_rows

    return read_rows(path)


def _stage_time(path: Path) -> datetime:
    """The time a stage first started (kept across resumes, so its receipts replay exactly)."""
    if path.exists():
        return datetime.fromisoformat(path.read_text().strip())
    now = datetime.now(UTC).replace(microsecond=0)
    path.write_text(now.isoformat())
    return now


def _dump(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, sort_keys=True))
    os.replace(tmp, path)


_BASE_DIGESTS: dict[str, str] = {}


def base_weights_digest(model_id: str) -> str:
    """SHA-256 over the base model's file digests (name order): what ``base_model`` pins."""
    if model_id not in _BASE_DIGESTS:
        from ..student import resolve_base_model

        root = resolve_base_model(model_id)
        files = sorted(
            p.relative_to(root).as_posix()
            for p in root.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
        )
        _BASE_DIGESTS[model_id] = kolm_artifact.artifact_digest(
            (f, kolm_artifact.sha256_file(root / f)) for f in files
        )
    return _BASE_DIGESTS[model_id]


# --------------------------------------------------------------------------- the job


class CompileJob:
    """One compile, stage by stage, resumable from its job folder (module docstring).

    Requires ``spec.task == "classify"`` (else :class:`SpecError`) and a ``compile``
    key listed in the ledger's trust root. ``on_event`` gets every :class:`StageEvent`;
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
        if spec.task != "classify":
            raise SpecError(
                f"spec.task: {spec.task!r} is not supported by the trainer yet (classify only)"
            )
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
        _dump(ident, mine)
        train.write_text(now)
        legacy.write_text(spec.digest())

    # ---- stage bookkeeping --------------------------------------------------------

    def finished_stages(self) -> list[str]:
        """Stages whose output is in the job folder, in order."""
        return [s for s in STAGES if (self.stage_dir / f"{s}.json").exists()]

    def _load(self, stage: str) -> Any:
        return json.loads((self.stage_dir / f"{stage}.json").read_text())

    def _check_stop(self, stage: str) -> None:
        if self._stop():
            raise JobCancelled(f"job {self.job_id} cancelled before stage {stage}")

    def _run_stage(self, stage: str, fn: Callable[[], Any]) -> Any:
        path = self.stage_dir / f"{stage}.json"
        if path.exists():
            out = json.loads(path.read_text())
            self.seconds[stage] = out.get("_seconds", 0.0)
            self.emit(StageEvent(stage, "resumed", 1, 1, out.get("_counters", {}), "resumed"))
            return out
        self._check_stop(stage)
        self.emit(StageEvent(stage, "started"))
        t0 = time.perf_counter()
        out = fn()
        self.seconds[stage] = round(time.perf_counter() - t0, 3)
        out["_seconds"] = self.seconds[stage]
        _dump(path, out)
        self._stage_done(stage)
        total = int(out.get("_total", 1))
        self.emit(StageEvent(stage, "finished", total, total, out.get("_counters", {})))
        return out

    def _progress(self, stage: str, done: int, total: int, **counters: float) -> None:
        self.emit(StageEvent(stage, "progress", done, total, counters))

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

    # ---- (1) ingest ----------------------------------------------------------------

    def _ingest(self) -> dict[str, Any]:
        spec, d = self.spec, self.spec.data
        keep = set(d.labels or spec.labels or ()) or None
        label_set = set(spec.labels or ())
        seeds: list[Any] = []
        if d.seed_pairs is not None:
            rows = read_table(d.seed_pairs, d.text_column, d.label_column, "spec.data.seed_pairs")
            seeds = list(dict(r for r in _select(rows, keep, None) if r[1]).items())
            bad = sorted({y for _, y in seeds if y not in label_set})
            if bad:
                raise SpecError(f"spec.data.seed_pairs: label {bad[0]!r} is not in spec.labels")
        seed_texts = {t for t, _ in seeds}
        inputs: list[Any] = []
        if d.unlabeled is not None:
            # a label column, when the file has one, selects rows (limit_per_label, other
            # intents out) and measures label precision; it never reaches training
            rows = read_table(d.unlabeled, d.text_column, d.label_column, "spec.data.unlabeled")
            numbered = _select(
                [(t, y, n) for n, (t, y) in enumerate(rows, 1)], keep, d.limit_per_label
            )
            # unique, in file order; the gold column (if any) is kept only for diagnostics
            seen: dict[str, tuple[str | None, int]] = {}
            for t, y, n in numbered:
                if t and t not in seed_texts and t not in seen:
                    seen[t] = (y, n)
            inputs = [(t, y, n) for t, (y, n) in seen.items()]
        assert d.holdout is not None  # checked in __init__
        holdout, hold_report = self._holdout(label_set)
        if not inputs and not seeds:
            raise SpecError("spec.data.unlabeled: no inputs left after filtering")
        # holdout texts the student may be trained on: the K-score would flatter it
        training = {t for t, *_ in inputs} | seed_texts
        leaked = sum(1 for t, _ in holdout if t in training)
        hold_report["leaked"] = leaked
        return {
            "inputs": [t for t, _, _ in inputs],
            "input_gold": [y for _, y, _ in inputs],
            "input_rows": [n for _, _, n in inputs],
            "seeds": [[t, y] for t, y in seeds],
            "holdout": [[t, y] for t, y in holdout],
            "holdout_report": hold_report,
            "_counters": {
                "inputs": len(inputs),
                "seeds": len(seeds),
                "holdout": len(holdout),
                **{f"holdout_{k}": v for k, v in hold_report.items() if k != "rows" and v},
            },
        }

    def _holdout(self, label_set: set[str]) -> tuple[list[tuple[str, str]], dict[str, Any]]:
        """The holdout's ``(text, label)`` rows and what was done to them.

        A label that differs from one of ``spec.labels`` only by case, surrounding
        quotes/spaces or ``_``/``-``/space is mapped to it (counted as ``mapped``); a row
        whose label is not in the set (``dropped``) or empty (``unlabeled``) is left out
        and counted. A file without the label column, an empty file and a file with no
        usable row are refused, naming ``spec.data.holdout``.
        """
        d = self.spec.data
        assert d.holdout is not None
        field_name = "spec.data.holdout"
        rows = read_table(d.holdout, d.text_column, d.label_column, field_name)
        if not rows:
            raise SpecError(f"{field_name}: {d.holdout.name} is empty (no data rows)")
        first: Mapping[str, Any] = next(iter(_rows_raw(d.holdout)), {})
        if d.label_column not in first:
            raise SpecError(
                f"{field_name}: {d.holdout.name} has no column {d.label_column!r} "
                "(spec.data.label_column): a holdout needs labels"
            )

        def key(label: str) -> str:
            return " ".join(
                label.strip(" \t\"'`.").replace("_", " ").replace("-", " ").split()
            ).casefold()

        canon = {key(x): x for x in label_set}
        out: list[tuple[str, str]] = []
        mapped = dropped = unlabeled = 0
        for t, y in rows:
            if y is None:
                unlabeled += 1
            elif y in label_set:
                out.append((t, y))
            elif key(y) in canon:
                mapped += 1
                out.append((t, canon[key(y)]))
            else:
                dropped += 1
        if not out:
            raise SpecError(
                f"{field_name}: none of its {len(rows)} rows has a label from spec.labels "
                f"({dropped} other labels, {unlabeled} empty)"
            )
        return out, {"rows": len(rows), "mapped": mapped, "dropped": dropped,
                     "unlabeled": unlabeled}  # fmt: skip

    # ---- (2) sample --------------------------------------------------------------------

    def _prompt_ids(self, ing: Mapping[str, Any]) -> list[str]:
        """How errors name each input: its file field and data row (1 = first after a
        CSV header), with the input's SHA-256 beside it (the teacher adds that)."""
        n_in = len(ing["inputs"])
        rows = ing.get("input_rows") or [None] * n_in
        ids = [
            f"spec.data.unlabeled row {r}" if r is not None else f"x{i}" for i, r in enumerate(rows)
        ]
        return ids + [f"spec.data.holdout #{j + 1}" for j in range(len(ing["holdout"]))]

    def _sample(self, ing: Mapping[str, Any]) -> dict[str, Any]:
        k = self.spec.teacher.k
        teacher = self.teacher()
        texts = list(ing["inputs"]) + [t for t, _ in ing["holdout"]]
        total = len(texts)
        done = [0, 0]  # finished, answered
        errors: dict[int, dict[str, Any]] = {}
        h0, m0 = teacher.hits, teacher.misses
        t0 = time.monotonic()
        last = [0.0]

        def on_result(i: int, samples: Any) -> None:
            done[0] += 1
            if samples:
                done[1] += 1
            now = time.monotonic()
            # every input moves the bar; a flood of cache hits is thinned to ~10 events/s
            if now - last[0] >= 0.1 or done[0] == total or done[0] < 10:
                last[0] = now
                counters: dict[str, float] = {
                    "cache_misses": teacher.misses - m0,
                    "per_s": round(done[0] / max(now - t0, 1e-6), 2),
                }
                retries = getattr(teacher.teacher, "retries", None)
                if retries is not None:
                    counters["retries"] = retries
                if errors:
                    counters["rejected_by_teacher"] = len(errors)
                self._progress("sample", done[0], total, **counters)

        def on_error(i: int, e: InputRejected) -> None:
            errors[i] = {**e.to_dict(), "prompt_id": reqs[i].prompt_id}
            if len(errors) >= _REJECTED_BEFORE_ANY and done[1] == 0:
                first = errors[min(errors)]
                raise InputRejected(
                    f"the teacher rejected the first {len(errors)} inputs and answered none "
                    f"(first: {first['message']}): a teacher setting (model, endpoint, params) "
                    "is wrong, not the inputs",
                    input_sha256=first["input_sha256"],
                    status=first["status"],
                    reason=first["reason"],
                ) from e

        ids = self._prompt_ids(ing)
        reqs = [SampleRequest(ids[i], t, k) for i, t in enumerate(texts)]
        samples = teacher.sample_many(reqs, self.spec, on_result=on_result, on_error=on_error)
        hits, misses = teacher.hits - h0, teacher.misses - m0
        self.teacher_misses += misses
        flat = [s for ss in samples for s in ss]
        n_in = len(ing["inputs"])
        return {
            "samples": [[s.text for s in ss] for ss in samples[:n_in]],
            "holdout_samples": [[s.text for s in ss] for ss in samples[n_in:]],
            # inputs the teacher could not answer: index (inputs, then holdout) → why
            "teacher_errors": {str(i): errors[i] for i in sorted(errors)},
            "teacher": teacher.describe(),
            "usage": {
                "samples": len(flat),
                "cache_hits": hits,
                "cache_misses": misses,
                "input_tokens": sum(s.input_tokens for s in flat),
                "output_tokens": sum(s.output_tokens for s in flat),
                # every sample's price, whether this run or an earlier one paid it
                "cost": round(sum(s.cost for s in flat), 8),
                "cost_paid_now": round(sum(s.cost for s in flat if not s.cached), 8),
            },
            "_total": total,
            "_counters": {
                "samples": len(flat),
                "cache_hits": hits,
                "cache_misses": misses,
                **({"rejected_by_teacher": len(errors)} if errors else {}),
            },
        }

    # ---- (3) vote -----------------------------------------------------------------------

    def _vote(self, ing: Mapping[str, Any], smp: Mapping[str, Any]) -> dict[str, Any]:
        t = self.spec.teacher
        need = t.min_agreement or t.k // 2 + 1
        errors = smp.get("teacher_errors") or {}
        votes = []
        for i, ss in enumerate(smp["samples"]):
            err = errors.get(str(i))
            if err is None:
                votes.append(vote(ss, self.verifier, t.k, need))
                continue
            votes.append(
                VoteResult(
                    accepted=False,
                    answer=None,
                    votes={},
                    agreement=0.0,
                    k=t.k,
                    min_agreement=need,
                    sample_digests=(),
                    rejected_code=REJECT_TEACHER_ERROR,
                    rejected_reason=f"teacher: {err['reason']} (HTTP {err['status']})",
                )
            )
        summary = summarize(votes)
        # every rejected input with its reason; a few answers the verifier refused
        rejected = [
            {
                "input": i,
                "prompt_id": (errors.get(str(i)) or {}).get("prompt_id"),
                "input_sha256": hashlib.sha256(ing["inputs"][i].encode("utf-8")).hexdigest(),
                "code": v.rejected_code,
                "reason": v.rejected_reason,
                **({"teacher_error": errors[str(i)]} if str(i) in errors else {}),
            }
            for i, v in enumerate(votes)
            if not v.accepted
        ]
        refused: list[str] = []
        for v in votes:
            for f in v.failures:
                if f.reason not in refused and len(refused) < 3:
                    refused.append(f.reason)
        accepted: list[list[Any]] = [
            [i, v.answer, dict(v.votes), list(v.sample_digests), v.agreement]
            for i, v in enumerate(votes)
            if v.accepted
        ]
        counters: dict[str, float] = {
            "accepted": len(accepted),
            "rejected": len(votes) - len(accepted),
            "acceptance_rate": round(summary.acceptance_rate, 4),
        }
        gold = ing.get("input_gold") or []
        if gold and all(g is not None for g in gold):  # diagnostics when inputs carry gold
            single = [ss[0] == g for ss, g in zip(smp["samples"], gold, strict=True) if ss]
            voted = [gold[i] == a for i, a, *_ in accepted]
            counters["gold_precision_single"] = round(sum(single) / max(1, len(single)), 4)
            counters["gold_precision_vote"] = round(sum(voted) / max(1, len(voted)), 4)
        for code, count in summary.reasons.items():
            counters[f"rejected_{code}"] = count
        return {
            "accepted": accepted,
            "summary": {
                **summary.to_dict(),
                "verifier_examples": refused,
                "teacher_examples": [e["message"] for _, e in sorted(errors.items())][:1],
            },
            "rejected": rejected,
            "_total": len(votes),
            "_counters": counters,
        }

    # ---- (4) sign -----------------------------------------------------------------------

    def _sign(
        self, ing: Mapping[str, Any], smp: Mapping[str, Any], vt: Mapping[str, Any]
    ) -> dict[str, Any]:
        spec = self.spec
        if not vt["accepted"] and not ing["seeds"]:
            raise KolmError(_nothing_accepted(vt["summary"]))
        # the spec as the labels were first signed: a budget raised mid-way does not make
        # the job's label receipts name two specs
        frozen = self.stage_dir / "sign.spec_digest"
        if not frozen.exists():
            frozen.write_text(spec.digest())
        task = {"name": spec.name, "type": spec.task, "spec_digest": frozen.read_text().strip()}
        vdesc = {
            "name": self.verifier.name,
            "version": self.verifier.version,
            "spec_digest": self.verifier.spec_digest(),
        }
        at = _stage_time(self.stage_dir / "sign.time")
        items: list[tuple[str, str, Any]] = []  # (text, label, statement)
        seed_teacher = {"backend": _SEED_TEACHER, "source": "spec.data.seed_pairs"}
        for text, label in ing["seeds"]:
            st = label_statement(
                input_value=text,
                output_value=label,
                task=task,
                teacher=seed_teacher,
                k=1,
                votes={label: 1},
                sample_digests=[],
                verifier=vdesc,
                agreement=1.0,
                job_id=self.job_id,
                include_input=True,
                time=at,
            )
            items.append((text, label, st))
        for i, answer, votes, digests, agreement in vt["accepted"]:
            text = ing["inputs"][i]
            st = label_statement(
                input_value=text,
                output_value=answer,
                task=task,
                teacher=smp["teacher"],
                k=spec.teacher.k,
                votes=votes,
                sample_digests=digests,
                verifier=vdesc,
                agreement=agreement,
                job_id=self.job_id,
                include_input=True,
                time=at,
            )
            items.append((text, answer, st))
        # batches already acknowledged by an interrupted run are not signed again
        partial_path = self.stage_dir / "sign.partial.json"
        partial = json.loads(partial_path.read_text()) if partial_path.exists() else {}
        logged: list[list[Any]] = partial.get("logged", [])
        failed: list[list[Any]] = partial.get("failed", [])
        start = int(partial.get("next", 0))
        # labels the ledger already holds for this job (an earlier run of it appended them
        # and died before recording so) are reused, never logged a second time
        job_labels = getattr(self.sink, "job_labels", None)
        already: Mapping[str, Acked] = job_labels(self.job_id) if job_labels else {}
        reused = 0
        batch = self.opts.label_batch
        for b in range(start, len(items), batch):
            self._check_stop("sign")
            chunk = items[b : b + batch]
            results: list[Acked | KolmError | None] = [
                already.get(example_digest(text, label)) for text, label, _ in chunk
            ]
            todo = [i for i, known in enumerate(results) if known is None]
            reused += len(chunk) - len(todo)
            if todo:
                res = self.sink.append(
                    [sign_statement(chunk[i][2], self.key, deterministic=True) for i in todo]
                )
                if len(res) != len(todo):
                    raise KolmError(f"ledger answered {len(res)} results for {len(todo)} receipts")
                for i, answer in zip(todo, res, strict=True):
                    results[i] = answer
            for (text, label, _), r in zip(chunk, results, strict=True):
                if isinstance(r, Acked):
                    logged.append([r.index, r.leaf_hash.hex(), text, label])
                else:
                    failed.append([text, label, f"{type(r).__name__}: {r}"])
            _dump(partial_path, {"logged": logged, "failed": failed, "next": b + batch})
            self._progress("sign", min(b + batch, len(items)), len(items), logged=len(logged))
        logged.sort(key=lambda r: r[0])
        if not logged:
            why = f" (first refusal: {failed[0][2]})" if failed else ""
            raise KolmError(
                f"no label receipt was acknowledged by the ledger (0 of {len(items)}){why}; "
                "nothing to train on"
            )
        root = training_set_root([bytes.fromhex(r[1]) for r in logged])
        return {
            "logged": logged,
            "failed": failed,
            "training_set_root": root,
            "_total": len(items),
            "_counters": {
                "signed": len(items),
                "logged": len(logged),
                "append_failed": len(failed),
                "reused": reused,
            },
        }

    # ---- (5) train ----------------------------------------------------------------------

    def _train_config(self) -> Any:
        from .. import _train

        cfg = self.spec.student.train_config(self.spec.seed)
        if self.opts.threads is not None:
            cfg = _train.TrainConfig.from_dict({**cfg.to_dict(), "threads": self.opts.threads})
        return cfg

    def model_dir(self) -> Path:
        """The folder packed into the ``.kolm`` (named after the task)."""
        return self.dir / "build" / self.spec.name

    def _train(self, sgn: Mapping[str, Any]) -> dict[str, Any]:
        from .. import _train
        from ..student import Student, torch_state

        cfg = self._train_config()
        mdir = self.model_dir()
        if mdir.exists():
            shutil.rmtree(mdir)
        mdir.mkdir(parents=True)
        texts = [r[2] for r in sgn["logged"]]
        ys = [r[3] for r in sgn["logged"]]
        # selective prediction (kolm_compile.gate): with a target, a seeded calibration
        # split of the acknowledged labels is held out from training
        st = self.spec.student
        digests = [example_digest(x, y) for x, y in zip(texts, ys, strict=True)]
        cal = (
            _gate.calibration_split(digests, _gate.CALIBRATION_FRACTION, self.spec.seed)
            if st.target_cover_k_score is not None
            else []
        )
        cal_set = set(cal)
        cal_texts, cal_ys = [texts[i] for i in cal], [ys[i] for i in cal]
        calibration = {
            "fraction": _gate.CALIBRATION_FRACTION,
            "seed": self.spec.seed,
            "examples_digest": hashlib.sha256(
                "".join(digests[i] for i in cal).encode()
            ).hexdigest(),
        }
        keep = [i for i in range(len(texts)) if i not in cal_set]
        texts, ys, digests = (
            [texts[i] for i in keep],
            [ys[i] for i in keep],
            [digests[i] for i in keep],
        )
        _dump(self.dir / "train_set.json", {"texts": texts, "labels": ys})

        def progress(step: int, total: int, loss: float) -> None:
            self._progress("train", step, total, loss=round(loss, 4))

        try:
            tr = _train.train_classifier(
                texts,
                ys,
                list(self.spec.labels or ()),
                cfg,
                mdir / "adapter",
                progress=progress,
                should_stop=self._stop,
            )
        except InterruptedError as e:
            raise JobCancelled(f"job {self.job_id} cancelled during training") from e
        self._student = tr.student
        student = tr.student or Student.load(mdir / "adapter", threads=cfg.threads)
        with torch_state(cfg.threads, False):
            gate_meta = _gate.build(
                student,
                texts,
                digests,
                cal_texts,
                cal_ys,
                target=st.target_cover_k_score,
                k=st.gate_k,
                confidence_threshold=st.confidence_threshold,
                calibration=calibration,
                directory=mdir,
            )
        return {
            "gate": gate_meta,
            "examples": len(texts),
            "steps": tr.steps,
            "first_loss": tr.losses[0],
            "final_loss": tr.losses[-1],
            "_total": tr.steps,
            "_counters": {
                "examples": len(texts),
                "steps": tr.steps,
                "final_loss": round(tr.losses[-1], 4),
            },
        }

    # ---- (6) evaluate -------------------------------------------------------------------

    def _evaluate(self, ing: Mapping[str, Any], smp: Mapping[str, Any]) -> dict[str, Any]:
        from ..student import Student, torch_state

        cfg = self._train_config()
        student = getattr(self, "_student", None) or Student.load(
            self.model_dir() / "adapter", threads=cfg.threads
        )
        texts = [t for t, _ in ing["holdout"]]
        refs = [y for _, y in ing["holdout"]]
        bs = reexec.EVAL_BATCH_SIZE

        def predict(xs: Sequence[str]) -> list[tuple[str, float]]:
            return list(student.predict(list(xs), batch_size=bs))

        # at the recorded settings (threads, batch size), so an auditor can re-execute it
        with torch_state(cfg.threads, False):
            preds = [p for p, _ in predict(texts)]
            determinism = reexec.determinism_record(
                predict, threads=cfg.threads, batch_size=bs, dtype=student.dtype
            )
        v = self.verifier
        outcomes = [reexec.example_outcome(v, p, r) for p, r in zip(preds, refs, strict=True)]
        score = ks.kscore(outcomes)

        def teacher_ok(answer: str | None, ref: str) -> bool:
            return (
                answer is not None
                and v.check(answer, reference=ref).ok
                and (v.check(answer).normalized == ref)
            )

        t = self.spec.teacher
        hs = smp["holdout_samples"]
        single = ks.kscore(
            [bool(ss) and teacher_ok(ss[0], r) for ss, r in zip(hs, refs, strict=True)]
        )
        voted = ks.kscore(
            [
                (vr := vote(ss, v, t.k, t.min_agreement or t.k // 2 + 1)).accepted
                and teacher_ok(vr.answer, r)
                for ss, r in zip(hs, refs, strict=True)
            ]
        )
        # latency: one input per call, as a service would see it
        probe = texts[: self.opts.latency_probe]
        student.predict(probe[:2], batch_size=1)  # warm-up
        t0 = time.perf_counter()
        for x in probe:
            student.predict([x], batch_size=1)
        latency = (time.perf_counter() - t0) / max(1, len(probe))
        examples = [example_digest(x, y) for x, y in zip(texts, refs, strict=True)]
        holdout_root = reexec.holdout_root(examples)
        # the per-example outcomes, published (signed) in the artifact: their root is the
        # eval receipt's outcome_root
        lines = [
            reexec.outcome_line(e, p, o) for e, p, o in zip(examples, preds, outcomes, strict=True)
        ]
        outcome_root = reexec.outcomes_root(lines)
        # the gate on the holdout: the cover's coverage and K-score, the risk-coverage curve
        gate_ev = None
        if (gate_meta := self._load("train").get("gate")) is not None:
            gate = _gate.Gate.load(self.model_dir(), gate_meta, self.spec.name)
            with torch_state(cfg.threads, False):
                gate_ev = _gate.evaluate(gate, student, texts, [bool(o) for o in outcomes])
        return {
            **({"gate": gate_ev} if gate_ev is not None else {}),
            "k_score": score.to_dict(),
            "teacher_single": single.to_dict(),
            "teacher_vote": voted.to_dict(),
            "per_label": ks.per_label_metrics(refs, preds),
            "confusion": ks.confusion_matrix(refs, preds, list(self.spec.labels or ())),
            "holdout_root": holdout_root,
            "outcome_root": outcome_root,
            "outcomes": [x.decode() for x in lines],
            "determinism": determinism,
            "latency_s": latency,
            "threads": cfg.threads,
            "_total": len(texts),
            "_counters": {
                "k_score": score.score,
                "teacher_single": single.score,
                "teacher_vote": voted.score,
            },
        }

    # ---- (7) package --------------------------------------------------------------------

    def _package(
        self,
        smp: Mapping[str, Any],
        vt: Mapping[str, Any],
        sgn: Mapping[str, Any],
        ev: Mapping[str, Any],
    ) -> dict[str, Any]:
        from ..student import resolve_base_model

        spec, v = self.spec, self.verifier
        cfg = self._train_config()
        mdir = self.model_dir()
        for extra in (
            MANIFEST_FILE,
            "task.json",
            "verifier.json",
            "base",
            "recall",
            "evaluation",
            kolm_artifact.SIGNATURE_FILE,
        ):
            p = mdir / extra
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        vdict = {"name": v.name, "version": v.version, "params": dict(v.params)}
        base_model = BaseModelRef(
            id=cfg.base_model,
            revision="registered",
            weights_digest=base_weights_digest(cfg.base_model),
        )
        # the evaluation an auditor re-executes (kolm kscore verify): the signed outcomes
        # and what it ran on
        outcomes = mdir / reexec.OUTCOMES_FILE
        outcomes.parent.mkdir(parents=True)
        outcomes.write_text("".join(x + "\n" for x in ev["outcomes"]), encoding="utf-8")
        gate_meta = self._load("train").get("gate")
        gate = None
        if gate_meta is not None:  # the selective-prediction gate (kolm_compile.gate)
            gate = {**gate_meta, **({"holdout": ev["gate"]} if "gate" in ev else {})}
        cover = _cover_summary(gate)
        if self.opts.bundle_base:
            src = resolve_base_model(cfg.base_model)
            shutil.copytree(src, mdir / "base", ignore=shutil.ignore_patterns(".*"))
        recall_info = self._build_recall(sgn, cfg) if spec.recall is not None else None
        manifest = Manifest(
            name=spec.name,
            task_type=spec.task,
            labels=tuple(spec.labels or ()),
            none_label=spec.none_label,
            base_model=base_model,
            adapter="adapter",
            max_length=cfg.max_length,
            confidence_threshold=spec.student.confidence_threshold,
            verifier=VerifierRef(v.name, v.version, dict(v.params)),
            spec_digest=spec.digest(),
            kolm_version=kolm_version(),
            evaluation=EvaluationRef(
                outcomes=reexec.OUTCOMES_FILE,
                n=len(ev["outcomes"]),
                holdout_digest=ev["holdout_root"],
                outcome_root=ev["outcome_root"],
                text_column=spec.data.text_column,
                label_column=spec.data.label_column,
            ),
            determinism=dict(ev["determinism"]),
            gate=gate,
            base="base" if self.opts.bundle_base else None,
            recall=RecallRef.from_dict(recall_info) if recall_info is not None else None,
        ).replace()  # checked as a reader checks it
        (mdir / MANIFEST_FILE).write_bytes(manifest.to_json())
        (mdir / "task.json").write_bytes(canonical_json(spec.to_dict()) + b"\n")
        (mdir / "verifier.json").write_text(json.dumps(vdict, indent=2, sort_keys=True) + "\n")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        out = self.out_dir / f"{spec.name}.kolm"
        digest = kolm_artifact.pack(mdir, out, self.key)
        file_digest = kolm_artifact.sha256_file(out)

        score = ks.KScore(**ev["k_score"])
        t_single, t_vote = ks.KScore(**ev["teacher_single"]), ks.KScore(**ev["teacher_vote"])
        at = _stage_time(self.stage_dir / "package.time")
        est = eval_statement(
            time=at,
            artifact_digest=digest,
            holdout_digest=ev["holdout_root"],
            n=score.n,
            correct=score.correct,
            k_score=score.score,
            interval=(score.low, score.high),
            outcome_root=ev["outcome_root"],
            teacher_k_score=t_vote.score,
            extra={
                "job_id": self.job_id,
                # holdout rows mapped/dropped and those also among the training inputs
                **({"holdout": hr} if (hr := self._load("ingest").get("holdout_report")) else {}),
                **({"gate": cover} if cover is not None else {}),
                "teacher_k_score_single": t_single.score,
                "teacher_k_score_vote": t_vote.score,
                "per_label": ev["per_label"],
                "determinism": dict(ev["determinism"]),
                # the matrix grows as labels²: left out past 80 labels (64 KiB entry cap)
                **(
                    {"confusion": {"labels": list(spec.labels or ()), "matrix": ev["confusion"]}}
                    if len(spec.labels or ()) <= _CONFUSION_MAX_LABELS
                    else {}
                ),
            },
        )
        (ev_res,) = self.sink.append([sign_statement(est, self.key, deterministic=True)])
        if not isinstance(ev_res, Acked):
            raise ev_res
        cost = self.cost_report(smp, ev)
        summary = vt["summary"]
        labels = {
            "sampled": summary["n"],
            "accepted": summary["accepted"],
            "rejected": summary["n"] - summary["accepted"],
            "acceptance_rate": summary["acceptance_rate"],
            "rejected_reasons": dict(summary.get("reasons") or {}),
            # holdout rows mapped/dropped, and those also among the training inputs
            "holdout": self._load("ingest").get("holdout_report") or {},
            "seed_pairs": len(self._load("ingest")["seeds"]),
            "logged": len(sgn["logged"]),
            "append_failed": len(sgn["failed"]),
        }
        ast = artifact_statement(
            time=at,
            artifact_digest=digest,
            file_name=out.name,
            file_digest=file_digest,
            base_model=base_model.to_dict(),
            training_set_root=sgn["training_set_root"],
            label_count=len(sgn["logged"]),
            eval_receipt=ev_res.leaf_hash.hex(),
            k_score=score.score,
            verifier={**vdict, "spec_digest": v.spec_digest()},
            compile_config_digest=hashlib.sha256(
                canonical_json(
                    {
                        "spec": spec.digest(),
                        "train": cfg.to_dict(),
                        "bundle_base": self.opts.bundle_base,
                    }
                )
            ).hexdigest(),
            kolm_version=kolm_version(),
            checkpoint=self.sink.checkpoint(),
            extra={
                "job_id": self.job_id,
                "teacher": smp["teacher"],
                "labels": labels,
                "cost": cost,
                **({"cover": _cover_brief(cover)} if cover is not None else {}),
                # what `kolm recall update` records too: the signed corpus of this artifact
                **(
                    {
                        "corpus_root": recall_info["corpus_root"],
                        "corpus_chunks": recall_info["chunks"],
                    }
                    if recall_info is not None
                    else {}
                ),
            },
        )
        (art_res,) = self.sink.append([sign_statement(ast, self.key, deterministic=True)])
        if not isinstance(art_res, Acked):
            raise art_res
        return {
            "artifact_path": str(out),
            "artifact_digest": digest,
            "file_digest": file_digest,
            "eval_leaf": ev_res.leaf_hash.hex(),
            "eval_index": ev_res.index,
            "artifact_index": art_res.index,
            "labels": labels,
            "cost": cost,
            "recall": recall_info,
            "_counters": {
                "artifact_index": art_res.index,
                "bytes": out.stat().st_size,
                **({"recall_chunks": recall_info["chunks"]} if recall_info else {}),
            },
        }

    def _build_recall(self, sgn: Mapping[str, Any], cfg: Any) -> dict[str, Any]:
        """Build ``recall/index.db`` in the model folder; returns the manifest's ``recall``.

        ``source: documents`` chunks the spec's corpus; ``source: examples`` indexes the
        acknowledged training examples (ledger index order; chunk id = the example digest
        = the subject of its label receipt). Embeddings: the plain base model
        (:func:`kolm_compile.student.embed_texts`, ``cfg.threads`` torch threads), as
        ``kolm recall update`` does. The manifest field is :meth:`IndexInfo.to_manifest`
        plus ``k``, the default number of chunks a prediction retrieves.
        """
        from .. import recall
        from ..student import embed_texts, torch_state

        rs = self.spec.recall
        assert rs is not None
        if rs.source == "examples":
            chunks = recall.chunks_from_examples([(r[2], r[3]) for r in sgn["logged"]])
            chunking: dict[str, Any] = {"source": "examples"}
        else:
            chunks = rs.corpus_chunks()
            chunking = rs.chunk_config().to_dict()
        model_id = cfg.base_model

        def embed(texts: Sequence[str]) -> Any:
            return embed_texts(list(texts), model_id)

        with torch_state(cfg.threads, False):
            info = recall.build_index(
                chunks,
                embed,
                self.model_dir() / recall.INDEX_FILE,
                embedding_model=model_id,
                chunking=chunking,
            )
        return {**info.to_manifest(), "k": rs.k}

    def cost_report(self, smp: Mapping[str, Any], ev: Mapping[str, Any]) -> dict[str, Any]:
        """Teacher calls, tokens and cost, beside the projected per-call cost of the student."""
        u = smp["usage"]
        k = self.spec.teacher.k
        per_sample = u["cost"] / u["samples"] if u["samples"] else 0.0
        cpu_s = ev["latency_s"] * ev["threads"]
        student = cpu_s / 3600.0 * self.opts.dollars_per_cpu_hour
        spent = self.spend.to_dict()
        # a folder from before JOB/spend.json: this run's cache misses are all it knows
        bought = (
            spent["samples"]
            if self.spend.path and os.path.exists(self.spend.path)
            else (u["cache_misses"])
        )
        return {
            # units: a SAMPLE is one answer; a REQUEST is one HTTP call (asks for up to k
            # samples). The budget's max_teacher_calls counts billed requests.
            "teacher_samples": u["samples"],
            "teacher_calls": u["samples"],  # older name of teacher_samples (one call = one sample)
            "teacher_samples_bought_by_this_job": bought,
            "teacher_calls_paid_by_this_job": bought,  # older name, same value (samples)
            "teacher_requests_billed_by_this_job": spent["requests"],
            "teacher_requests_failed_not_billed": spent["failed_requests"],
            "cost_paid_by_this_job": round(spent["cost"], 8),
            "input_tokens": u["input_tokens"],
            "output_tokens": u["output_tokens"],
            "estimated_cost": u["cost"],
            "teacher_cost_per_call": per_sample,
            "teacher_cost_per_voted_answer": per_sample * k,
            "student_latency_ms": round(ev["latency_s"] * 1000, 3),
            "student_threads": ev["threads"],
            "student_cost_per_call": student,
            "assumed_dollars_per_cpu_hour": self.opts.dollars_per_cpu_hour,
            "note": "student cost = mean single-input CPU latency x threads x assumed $/CPU-hour",
        }

    # ---- run --------------------------------------------------------------------------

    def run(self) -> CompileResult:
        """Run (or resume) every stage; returns the result. Raises on failure or cancel."""
        try:
            for note in self.notes:
                self.emit(StageEvent("ingest", "note", message=note))
            ing = self._run_stage("ingest", self._ingest)
            if not (self.stage_dir / "sign.json").exists():
                # a key the ledger will refuse is found before the teacher is paid
                check = getattr(self.sink, "check_signer", None)
                if check is not None:
                    check(self.key)
            smp = self._run_stage("sample", lambda: self._sample(ing))
            vt = self._run_stage("vote", lambda: self._vote(ing, smp))
            sgn = self._run_stage("sign", lambda: self._sign(ing, smp, vt))
            self._run_stage("train", lambda: self._train(sgn))
            ev = self._run_stage("evaluate", lambda: self._evaluate(ing, smp))
            pk = self._run_stage("package", lambda: self._package(smp, vt, sgn, ev))
        finally:
            self.close()
        return CompileResult(
            job_id=self.job_id,
            artifact_path=Path(pk["artifact_path"]),
            artifact_digest=pk["artifact_digest"],
            file_digest=pk["file_digest"],
            k_score=ks.KScore(**ev["k_score"]),
            teacher_single=ks.KScore(**ev["teacher_single"]),
            teacher_vote=ks.KScore(**ev["teacher_vote"]),
            labels=pk["labels"],
            training_set_root=sgn["training_set_root"],
            eval_leaf=pk["eval_leaf"],
            artifact_index=pk["artifact_index"],
            seconds=dict(self.seconds),
            cost=pk["cost"],
            per_label=ev["per_label"],
            eval_index=int(pk.get("eval_index", -1)),
            recall=pk.get("recall"),
        )


def _cover_summary(gate: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The eval receipt's ``gate``: rule, thresholds, calibration and holdout figures of the
    cover, and the holdout risk-coverage curve (20 points per score)."""
    if gate is None:
        return None
    keys = ("rule", "temperature", "t_prob", "t_sim", "k", "target_cover_k_score")
    out: dict[str, Any] = {k: gate[k] for k in keys if k in gate}
    if "calibration" in gate:
        out["calibration"] = dict(gate["calibration"])
    if "holdout" in gate:
        out["holdout"] = dict(gate["holdout"])
    return out


def _cover_brief(cover: Mapping[str, Any]) -> dict[str, Any]:
    """The artifact receipt's ``cover``: what ``kolm verify`` shows at step 8."""
    out: dict[str, Any] = {
        k: cover[k] for k in ("rule", "t_prob", "t_sim", "temperature", "k") if k in cover
    }
    if "target_cover_k_score" in cover:
        out["target_cover_k_score"] = cover["target_cover_k_score"]
    h = cover.get("holdout")
    if h is not None:
        for k in ("coverage", "cover_k_score", "cover_interval", "k_score", "n", "n_cover"):
            out[k] = h[k]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m kolm_compile.pipeline SPEC (--db URL | --ledger HOST:PORT) --keys DIR``."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m kolm_compile.pipeline", description=__doc__)
    ap.add_argument("spec")
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--db", help="in-process ledger database URL")
    where.add_argument("--ledger", help="ledger service HOST:PORT")
    ap.add_argument(
        "--keys", required=True, help="folder with compile.key (and trust.json, log.key)"
    )
    ap.add_argument("--work", default="kolm-work", help="job folder (resumes if it holds one)")
    ap.add_argument("--out", help="where the .kolm goes (default: the job folder)")
    ap.add_argument("--bundle-base", action="store_true")
    ap.add_argument("--threads", type=int)
    a = ap.parse_args(argv)
    from ..sinks import open_sink
    from ..student import embed_texts

    sink = open_sink(db=a.db, ledger=a.ledger, keys=a.keys)

    def show(e: StageEvent) -> None:
        if e.state != "progress":
            print(f"{STAGE_TITLES[e.stage]:<22} {e.state:<9} {dict(e.counters)}", flush=True)

    job = CompileJob(
        TaskSpec.load(a.spec),
        key=PrivateKey.load(Path(a.keys) / "compile.key"),
        sink=sink,
        job_dir=Path(a.work),
        out_dir=Path(a.out) if a.out else None,
        options=CompileOptions(bundle_base=a.bundle_base, threads=a.threads),
        on_event=show,
        embed=embed_texts,
    )
    try:
        print(json.dumps(job.run().to_dict(), indent=2, sort_keys=True))
    finally:
        sink.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
