"""The compile job: teacher → verified, voted, signed labels → LoRA student → K-score → signed .kolm.

Seven stages, each reported through ``on_event``::

    ingest → sample (teacher k-sampling) → vote (verify & vote) → sign (label receipts)
           → train (LoRA) → evaluate (K-score) → package (.kolm + eval/artifact receipts)

Only labels whose receipts the ledger acknowledged reach training. The training-set
root is the RFC 6962 root over those receipts' leaf hashes in ledger index order —
exactly what ``kolm provenance`` recomputes. Nothing inside the ``.kolm`` carries a time
or a local path, so the same spec, seed and teacher cache give a byte-identical file.

Example::

    spec = TaskSpec.load("kolm_compile/examples/banking77-router.yaml")
    result = CompileJob(spec, keys_dir=Path("keys"), sink=LedgerSink(ledger),
                        work_dir=Path("work")).run()
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from kolm_ledger._crypto import PrivateKey
from kolm_ledger.canonical import canonical_json, digest_hex
from kolm_ledger.dsse import Envelope
from kolm_ledger.errors import KolmError, SpecError
from kolm_ledger.merkle import root_from_leaves
from kolm_ledger.receipts import (
    artifact_statement,
    eval_statement,
    example_digest,
    job_digest,
    label_statement,
    sign_statement,
)

from . import artifact as kolm_artifact
from . import kscore as ks
from .cache import CachedTeacher, TeacherCache
from .spec import TaskSpec, kolm_version
from .teachers import SampleRequest, build_teacher
from .voting import summarize, vote

__all__ = [
    "STAGES",
    "ClientSink",
    "CompileJob",
    "CompileResult",
    "LedgerSink",
    "ReceiptSink",
    "StageEvent",
    "read_pairs",
]

STAGES = ("ingest", "sample", "vote", "sign", "train", "evaluate", "package")
SERVE_DOLLARS_PER_CPU_HOUR = 0.05  # assumed price of one CPU core-hour for serving the student


@dataclass(frozen=True)
class StageEvent:
    """Progress of one stage."""

    stage: str
    state: str  # started | progress | finished
    done: int = 0
    total: int = 0
    counters: Mapping[str, float] = field(default_factory=dict)
    message: str = ""


class ReceiptSink(Protocol):
    """Where receipts go: returns, per envelope, (index, leaf hash) or the error."""

    def append(self, envelopes: Sequence[Envelope]) -> list[tuple[int, bytes] | KolmError]:
        """Append a batch; one result per envelope, in order."""
        ...

    def checkpoint(self) -> dict[str, Any]:
        """The newest checkpoint as ``{"origin", "size", "root"}``."""
        ...

    def job_labels(self, job_id: str) -> list[Any]:
        """Label entries already logged for ``job_id`` (a resumed job reuses them)."""
        ...


class LedgerSink:
    """An in-process :class:`kolm_ledger.ledger.Ledger` (``kolm compile run --db``)."""

    def __init__(self, ledger: Any) -> None:
        self.ledger = ledger

    def append(self, envelopes: Sequence[Envelope]) -> list[tuple[int, bytes] | KolmError]:
        out: list[tuple[int, bytes] | KolmError] = []
        for env in envelopes:  # validate each, so one bad receipt only loses itself
            try:
                (a,) = self.ledger.append([env])
                out.append((a.index, a.leaf_hash))
            except KolmError as e:
                out.append(e)
        return out

    def checkpoint(self) -> dict[str, Any]:
        cp = self.ledger.checkpoint().checkpoint
        return {"origin": cp.origin, "size": cp.size, "root": cp.root.hex()}

    def job_labels(self, job_id: str) -> list[Any]:
        return list(
            self.ledger.store.find(
                subject_digest=job_digest(job_id), kind="label", limit=10_000_000
            )
        )


class ClientSink:
    """The ledger service through :class:`kolm_ledger.client.LedgerClient` (AppendStream)."""

    def __init__(self, client: Any, batch: int = 500) -> None:
        self.client = client
        self.batch = batch

    def append(self, envelopes: Sequence[Envelope]) -> list[tuple[int, bytes] | KolmError]:
        res = self.client.append_many(list(envelopes), batch=self.batch)
        return [r if isinstance(r, KolmError) else (r.index, r.leaf_hash) for r in res]

    def checkpoint(self) -> dict[str, Any]:
        cp = self.client.checkpoint().checkpoint
        return {"origin": cp.origin, "size": cp.size, "root": cp.root.hex()}

    def job_labels(self, job_id: str) -> list[Any]:
        return list(
            self.client.find(subject_digest=job_digest(job_id), kind="label", limit=10_000_000)
        )


@dataclass
class CompileResult:
    """What a compile produced and measured."""

    job_id: str
    artifact_path: Path
    artifact_digest: str
    file_digest: str
    k_score: ks.KScore
    teacher_single: ks.KScore | None
    teacher_vote: ks.KScore | None
    labels_sampled: int
    labels_accepted: int
    labels_rejected: int
    labels_logged: int
    training_set_root: str
    eval_index: int
    artifact_index: int
    seconds: dict[str, float]
    cost: dict[str, Any]
    vote_summary: dict[str, Any]
    per_label: dict[str, dict[str, float]]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {
            "job_id": self.job_id,
            "artifact": str(self.artifact_path),
            "artifact_digest": self.artifact_digest,
            "file_digest": self.file_digest,
            "k_score": self.k_score.to_dict(),
            "teacher_k_score_single": self.teacher_single.to_dict()
            if self.teacher_single
            else None,
            "teacher_k_score_vote": self.teacher_vote.to_dict() if self.teacher_vote else None,
            "labels": {
                "sampled": self.labels_sampled,
                "accepted": self.labels_accepted,
                "rejected": self.labels_rejected,
                "logged": self.labels_logged,
            },
            "training_set_root": self.training_set_root,
            "eval_index": self.eval_index,
            "artifact_index": self.artifact_index,
            "seconds": self.seconds,
            "cost": self.cost,
            "votes": self.vote_summary,
        }


def read_pairs(path: Path, text_col: str, label_col: str | None) -> list[tuple[str, str | None]]:
    """Rows of a CSV or JSONL file as (text, label-or-None)."""
    rows: list[tuple[str, str | None]] = []
    try:
        if path.suffix.lower() == ".csv":
            with open(path, newline="", encoding="utf-8") as f:
                for r in csv.DictReader(f):
                    rows.append((r[text_col], r.get(label_col) if label_col else None))
        else:
            with open(path, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        r = json.loads(line)
                        rows.append(
                            (
                                str(r[text_col]),
                                str(r[label_col]) if label_col and label_col in r else None,
                            )
                        )
    except KeyError as e:
        raise SpecError(f"spec.data: {path.name} has no column {e.args[0]!r}") from e
    except (OSError, ValueError) as e:
        raise SpecError(f"spec.data: cannot read {path}: {e}") from e
    return rows


def _select(
    rows: Iterable[tuple[str, str | None]], labels: Sequence[str] | None, limit: int | None
) -> list[tuple[str, str | None]]:
    keep = set(labels) if labels else None
    counts: Counter[str] = Counter()
    out = []
    for text, label in rows:
        if keep is not None and label not in keep:
            continue
        if limit is not None and label is not None:
            if counts[label] >= limit:
                continue
            counts[label] += 1
        out.append((text, label))
    return out


class CompileJob:
    """One compile, run stage by stage (see the module docstring)."""

    def __init__(
        self,
        spec: TaskSpec,
        *,
        keys_dir: Path,
        sink: ReceiptSink,
        work_dir: Path,
        job_id: str | None = None,
        out_dir: Path | None = None,
        on_event: Callable[[StageEvent], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        bundle_base: bool = False,
        threads: int | None = None,
        embed: Callable[[list[str]], Any] | None = None,
    ) -> None:
        if spec.task != "classify":
            raise SpecError(
                f"spec.task: {spec.task!r} is not supported by the trainer yet (classify only)"
            )
        self.spec = spec
        self.key = PrivateKey.load(Path(keys_dir) / "compile.key")
        self.sink = sink
        self.work = Path(work_dir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.job_id = job_id or f"job-{uuid.uuid4().hex[:12]}"
        self.out_dir = Path(out_dir) if out_dir else self.work
        self._emit = on_event or (lambda e: None)
        self._stop = should_stop or (lambda: False)
        self.bundle_base = bundle_base
        self.threads = threads
        self.embed = embed
        self.seconds: dict[str, float] = {}

    # ---- helpers -----------------------------------------------------------------------

    def _stage(self, name: str, total: int = 0, message: str = "") -> float:
        if self._stop():
            raise InterruptedError(f"job {self.job_id} cancelled before {name}")
        self._emit(StageEvent(name, "started", 0, total, {}, message))
        return time.perf_counter()

    def _done(self, name: str, t0: float, counters: Mapping[str, float], total: int = 0) -> None:
        self.seconds[name] = round(time.perf_counter() - t0, 3)
        self._emit(StageEvent(name, "finished", total, total, dict(counters)))

    # ---- the job -----------------------------------------------------------------------

    def run(self) -> CompileResult:
        """Run all seven stages; returns the result (raises on failure or cancel)."""
        spec = self.spec
        labels = list(spec.labels or ())
        verifier = spec.build_verifier()
        d = spec.data

        # (1) ingest
        t0 = self._stage("ingest")
        keep = d.labels or spec.labels  # rows of other intents are out of this task
        unl = (
            _select(read_pairs(d.unlabeled, d.text_column, d.label_column), keep, d.limit_per_label)
            if d.unlabeled
            else []
        )
        hold = (
            _select(read_pairs(d.holdout, d.text_column, d.label_column), keep, None)
            if d.holdout
            else []
        )
        if not unl:
            raise SpecError("spec.data.unlabeled: no inputs after filtering")
        if not hold:
            raise SpecError("spec.data.holdout: no labelled holdout rows after filtering")
        inputs = list(dict.fromkeys(t for t, _ in unl))  # unique, in file order
        self._done("ingest", t0, {"inputs": len(inputs), "holdout": len(hold)})

        # (2) teacher k-sampling (cached by content hash in the job dir)
        k = spec.teacher.k
        min_agree = spec.teacher.min_agreement or (k // 2 + 1)
        opts: dict[str, Any] = {}
        if spec.teacher.backend == "simulated" and self.embed is not None:
            opts["embed"] = self.embed
        cache = TeacherCache(self.work / "teacher-cache.sqlite")
        teacher = CachedTeacher(build_teacher(spec.teacher, spec, **opts), cache)
        t0 = self._stage("sample", len(inputs))
        done = [0]

        def on_result(i: int, samples: Any) -> None:
            done[0] += 1
            if done[0] % 50 == 0 or done[0] == len(inputs):
                self._emit(StageEvent("sample", "progress", done[0], len(inputs)))

        reqs = [SampleRequest(f"u{i}", text, k) for i, text in enumerate(inputs)]
        samples = teacher.sample_many(reqs, spec, on_result=on_result)
        tokens_in = sum(s.input_tokens for ss in samples for s in ss)
        tokens_out = sum(s.output_tokens for ss in samples for s in ss)
        cost = sum(s.cost for ss in samples for s in ss if not s.cached)
        self._done(
            "sample",
            t0,
            {
                "samples": sum(len(s) for s in samples),
                "cache_hits": teacher.hits,
                "cache_misses": teacher.misses,
            },
            len(inputs),
        )

        # (3) verify & vote
        t0 = self._stage("vote", len(inputs))
        votes = [vote([s.text for s in ss], verifier, k, min_agree) for ss in samples]
        summary = summarize(votes)
        accepted = [(inputs[i], v) for i, v in enumerate(votes) if v.accepted]
        self._done(
            "vote",
            t0,
            {
                "accepted": len(accepted),
                "rejected": len(votes) - len(accepted),
                "acceptance_rate": summary.acceptance_rate,
            },
            len(inputs),
        )

        # (4) sign label receipts; only acknowledged ones reach training
        t0 = self._stage("sign", len(accepted))
        tdesc = teacher.describe()
        vdesc = {
            "name": verifier.name,
            "version": verifier.version,
            "spec_digest": verifier.spec_digest(),
        }
        task = {"name": spec.name, "type": spec.task, "spec_digest": spec.digest()}
        # a resumed job reuses the label receipts its first run already logged, so the
        # ledger holds exactly one receipt per trained label of the job (provenance counts them)
        already: dict[str, tuple[int, bytes]] = {}
        for e in self.sink.job_labels(self.job_id):
            st_json = json.loads(Envelope.from_bytes(e.envelope).payload)
            for sub in st_json["subject"]:
                if sub["name"] == "example":
                    already[sub["digest"]["sha256"]] = (e.index, e.leaf_hash)
        logged: list[tuple[int, bytes, str, str]] = []  # (index, leaf, text, label)
        fresh = []
        for text, v in accepted:
            hit = already.get(example_digest(text, v.answer))
            if hit is not None:
                logged.append((hit[0], hit[1], text, str(v.answer)))
            else:
                fresh.append((text, v))
        accepted_all, accepted = accepted, fresh
        envs = []
        for text, v in accepted:
            st = label_statement(
                input_value=text,
                output_value=v.answer,
                task=task,
                teacher=tdesc,
                k=k,
                votes=dict(v.votes),
                sample_digests=list(v.sample_digests),
                verifier=vdesc,
                agreement=v.agreement,
                job_id=self.job_id,
                include_input=True,
            )
            envs.append(sign_statement(st, self.key))
        failed = 0
        for i in range(0, len(envs), 500):
            res = self.sink.append(envs[i : i + 500])
            for (text, v), r in zip(accepted[i : i + 500], res, strict=True):
                if isinstance(r, KolmError):
                    failed += 1
                else:
                    logged.append((r[0], r[1], text, str(v.answer)))
            self._emit(StageEvent("sign", "progress", min(i + 500, len(envs)), len(envs)))
        accepted = accepted_all
        logged.sort()
        training_root = root_from_leaves([leaf for _, leaf, _, _ in logged]).hex()
        self._done("sign", t0, {"logged": len(logged), "append_failed": failed}, len(envs))
        if not logged:
            raise KolmError("no label receipt was acknowledged by the ledger; nothing to train on")

        # (5) LoRA train on acknowledged labels only
        from . import _train

        cfg = spec.student.train_config(spec.seed)
        if self.threads is not None:
            cfg = _train.TrainConfig(**{**cfg.to_dict(), "threads": self.threads})
        model_dir = self.work / "build" / spec.name
        if model_dir.exists():
            shutil.rmtree(model_dir)
        model_dir.mkdir(parents=True)
        t0 = self._stage("train", 0)
        texts = [t for _, _, t, _ in logged]
        ys = [y for _, _, _, y in logged]

        def progress(step: int, total: int, loss: float) -> None:
            self._emit(StageEvent("train", "progress", step, total, {"loss": round(loss, 4)}))

        tr = _train.train_classifier(
            texts, ys, labels, cfg, model_dir / "adapter", progress=progress, should_stop=self._stop
        )
        self._done("train", t0, {"steps": tr.steps, "final_loss": round(tr.losses[-1], 4)})

        # (6) evaluate: K-score of the student and of the teacher on the holdout
        t0 = self._stage("evaluate", len(hold))
        student = (
            tr.student
            if getattr(tr, "student", None) is not None
            else _train.Student.load(model_dir / "adapter")
        )
        ht = [t for t, _ in hold]
        refs = [str(y) for _, y in hold]
        tp = time.perf_counter()
        preds = student.predict(ht)
        per_pred_s = (time.perf_counter() - tp) / max(1, len(ht))
        outcomes = [
            verifier.check(p, reference=r).ok and p == r
            for (p, _), r in zip(preds, refs, strict=True)
        ]
        kscore = ks.kscore(outcomes)
        hsamples = teacher.sample_many(
            [SampleRequest(f"h{i}", t, k) for i, t in enumerate(ht)], spec
        )
        t_single = ks.kscore(
            [
                bool(ss)
                and verifier.check(ss[0].text, reference=r).ok
                and verifier.check(ss[0].text).normalized == r
                for ss, r in zip(hsamples, refs, strict=True)
            ]
        )
        t_vote = ks.kscore(
            [
                (vr := vote([s.text for s in ss], verifier, k, min_agree)).accepted
                and vr.answer == r
                for ss, r in zip(hsamples, refs, strict=True)
            ]
        )
        per_label = ks.per_label_metrics(refs, [p for p, _ in preds])
        confusion = ks.confusion_matrix(refs, [p for p, _ in preds], labels)
        holdout_root = root_from_leaves(
            [bytes.fromhex(example_digest(t, y)) for t, y in zip(ht, refs, strict=True)]
        ).hex()
        outcome_root = root_from_leaves(
            [
                hashlib.sha256(canonical_json({"i": i, "ok": o})).digest()
                for i, o in enumerate(outcomes)
            ]
        ).hex()
        self._done(
            "evaluate",
            t0,
            {
                "k_score": kscore.score,
                "teacher_single": t_single.score,
                "teacher_vote": t_vote.score,
            },
            len(hold),
        )

        # (7) package & sign: .kolm, then eval and artifact receipts
        t0 = self._stage("package")
        manifest = {
            "format": kolm_artifact.FORMAT,
            "name": spec.name,
            "task_type": spec.task,
            "labels": labels,
            "base_model": {
                "id": cfg.base_model,
                "revision": "packaged",
                "weights_digest": _base_digest(cfg.base_model),
            },
            "adapter": "adapter",
            "max_length": cfg.max_length,
            "confidence_threshold": spec.student.confidence_threshold,
            "verifier": {
                "name": verifier.name,
                "version": verifier.version,
                "params": dict(getattr(verifier, "params", {}) or {}),
            },
            # no job id, time or path: the same spec, seed and cache give the same bytes; the
            # artifact receipt links the artifact to its job
            "spec_digest": spec.digest(),
            "kolm_version": kolm_version(),
        }
        if self.bundle_base:
            base = _train.resolve_base_model(cfg.base_model)
            shutil.copytree(base, model_dir / "base")
            manifest["base"] = "base"
        (model_dir / "manifest.json").write_bytes(
            (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
        )
        (model_dir / "task.json").write_bytes(canonical_json(spec.to_dict()) + b"\n")
        (model_dir / "verifier.json").write_bytes(
            (json.dumps(manifest["verifier"], indent=2, sort_keys=True) + "\n").encode()
        )
        self.out_dir.mkdir(parents=True, exist_ok=True)
        out = self.out_dir / f"{spec.name}.kolm"
        digest = kolm_artifact.pack(model_dir, out, self.key)
        file_digest = kolm_artifact.sha256_file(out)
        ev = eval_statement(
            artifact_digest=digest,
            holdout_digest=holdout_root,
            n=kscore.n,
            correct=kscore.correct,
            k_score=kscore.score,
            interval=(kscore.low, kscore.high),
            outcome_root=outcome_root,
            teacher_k_score=t_vote.score,
            extra={
                "teacher_k_score_single": t_single.score,
                "job_id": self.job_id,
                "per_label": per_label,
                "confusion": {"labels": labels, "matrix": confusion},
            },
        )
        (ev_res,) = self.sink.append([sign_statement(ev, self.key)])
        if isinstance(ev_res, KolmError):
            raise ev_res
        checkpoint = self.sink.checkpoint()
        serve_cost = per_pred_s / 3600 * SERVE_DOLLARS_PER_CPU_HOUR
        teacher_calls = sum(1 for ss in samples for s in ss if not s.cached)
        per_call_teacher = (cost / teacher_calls) if teacher_calls else None
        cost_report = {
            "teacher_calls": teacher_calls,
            "teacher_samples": sum(len(s) for s in samples),
            "input_tokens": tokens_in,
            "output_tokens": tokens_out,
            "estimated_cost": round(cost, 6),
            "teacher_cost_per_call": per_call_teacher,
            "student_seconds_per_call": per_pred_s,
            "student_cost_per_call": serve_cost,
            "assumed_dollars_per_cpu_hour": SERVE_DOLLARS_PER_CPU_HOUR,
        }
        art = artifact_statement(
            artifact_digest=digest,
            file_name=out.name,
            file_digest=file_digest,
            base_model=manifest["base_model"],
            training_set_root=training_root,
            label_count=len(logged),
            eval_receipt=ev_res[1].hex(),
            k_score=kscore.score,
            verifier=manifest["verifier"],
            compile_config_digest=spec.digest(),
            kolm_version=kolm_version(),
            checkpoint=checkpoint,
            extra={
                "job_id": self.job_id,
                "teacher": tdesc,
                "label_acceptance": {
                    "sampled": len(inputs),
                    "accepted": len(accepted),
                    "rejected": len(inputs) - len(accepted),
                    "logged": len(logged),
                },
                "cost": cost_report,
            },
        )
        (art_res,) = self.sink.append([sign_statement(art, self.key)])
        if isinstance(art_res, KolmError):
            raise art_res
        self._done("package", t0, {"artifact_index": art_res[0]})
        return CompileResult(
            self.job_id,
            out,
            digest,
            file_digest,
            kscore,
            t_single,
            t_vote,
            len(inputs),
            len(accepted),
            len(inputs) - len(accepted),
            len(logged),
            training_root,
            ev_res[0],
            art_res[0],
            dict(self.seconds),
            cost_report,
            {
                "acceptance_rate": summary.acceptance_rate,
                "reasons": dict(summary.reasons),
                "top_votes": {str(a): b for a, b in dict(summary.top_votes).items()},
            },
            per_label,
        )


def _base_digest(model_id: str) -> str:
    from . import _train

    path = _train.resolve_base_model(model_id)
    weights = sorted(Path(path).glob("*.safetensors"))
    return digest_hex({p.name: kolm_artifact.sha256_file(p) for p in weights})
