"""Stage (7): the model folder becomes a signed ``.kolm``, and the ledger gets its
``eval`` and ``artifact`` receipts.

:func:`package` writes ``manifest.json`` (:func:`build_manifest`, a typed
:class:`~kolm_ledger.formats.manifest.Manifest`), ``task.json``, ``verifier.json`` and
``evaluation/outcomes.jsonl`` (and ``base/``, ``recall/index.db``) into the model
folder, packs and signs it deterministically, then appends the eval receipt (subject =
the artifact digest: :func:`sign_eval`) and the artifact receipt (training-set root, eval
leaf hash, ledger checkpoint, cost: :func:`sign_artifact`). Nothing in the ``.kolm``
holds a time, a job id or a local path.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kolm_ledger.audit import reexec
from kolm_ledger.formats.canonical import canonical_json
from kolm_ledger.formats.manifest import (
    MANIFEST_FILE,
    BaseModelRef,
    EvaluationRef,
    Manifest,
    RecallRef,
    VerifierRef,
)
from kolm_ledger.formats.receipts import (
    Statement,
    artifact_statement,
    eval_statement,
    sign_statement,
)

from .. import artifact as kolm_artifact
from ..sinks import Acked
from ..spec import kolm_version
from ..teachers import TeacherSpend
from .context import StageContext, stage_time
from .outputs import Evaluated, Ingested, Packaged, Sampled, Signed, Trained, Voted
from .result import CompileOptions

if TYPE_CHECKING:
    from .._train import TrainConfig

__all__ = [
    "base_weights_digest",
    "build_manifest",
    "cost_report",
    "package",
    "sign_artifact",
    "sign_eval",
]

_CONFUSION_MAX_LABELS = 80  # the eval receipt carries the confusion matrix up to this many
#: what the packer replaces in the model folder (the trainer's adapter/ and gate/ stay)
_PACKAGED = (
    MANIFEST_FILE,
    "task.json",
    "verifier.json",
    "base",
    "recall",
    "evaluation",
    kolm_artifact.SIGNATURE_FILE,
)

_BASE_DIGESTS: dict[str, str] = {}


def base_weights_digest(model_id: str) -> str:
    """SHA-256 over the base model's file digests (name order): what ``base_model`` pins."""
    if model_id not in _BASE_DIGESTS:
        from ..student import base_model_files

        root, files = base_model_files(model_id)
        files = sorted(files)
        _BASE_DIGESTS[model_id] = kolm_artifact.artifact_digest(
            (f, kolm_artifact.sha256_file(root / f)) for f in files
        )
    return _BASE_DIGESTS[model_id]


@dataclass(frozen=True)
class _Packed:
    """The signed file and what its receipts say about it."""

    manifest: Manifest
    base_model: BaseModelRef
    digest: str  # the artifact digest (model_signing)
    file_digest: str
    cover: dict[str, Any] | None  # the eval receipt's gate
    recall: dict[str, Any] | None  # the manifest's recall section


def package(
    ctx: StageContext,
    ing: Ingested,
    smp: Sampled,
    vt: Voted,
    sgn: Signed,
    trained: Trained,
    ev: Evaluated,
    spend: TeacherSpend,
) -> Packaged:
    """Stage (7): pack the signed ``.kolm`` into ``out_dir``, then sign and append its
    eval and artifact receipts (both at the stage's first start time, so a resumed
    package replays them exactly)."""
    out = ctx.out_dir / f"{ctx.spec.name}.kolm"
    packed = _pack(ctx, sgn, trained, ev, out)
    at = stage_time(ctx.stage_dir / "package.time")
    ev_res = _append_one(ctx, sign_eval(ctx, ing, ev, packed, at=at))
    cost = cost_report(ctx.spec.teacher.k, ctx.opts, spend, smp, ev.latency_s, ev.threads)
    labels = _labels(ing, vt, sgn)
    art_res = _append_one(
        ctx, sign_artifact(ctx, smp, sgn, ev, packed, out, ev_res, labels, cost, at=at)
    )
    return Packaged(
        artifact_path=out,
        artifact_digest=packed.digest,
        file_digest=packed.file_digest,
        eval_leaf=ev_res.leaf_hash.hex(),
        eval_index=ev_res.index,
        artifact_index=art_res.index,
        labels=labels,
        cost=cost,
        recall=packed.recall,
        counters={
            "artifact_index": art_res.index,
            "bytes": out.stat().st_size,
            **({"recall_chunks": packed.recall["chunks"]} if packed.recall else {}),
        },
    )


def _pack(ctx: StageContext, sgn: Signed, trained: Trained, ev: Evaluated, out: Path) -> _Packed:
    """Write the manifest and the files beside the trained adapter, then pack ``out``."""
    from ..student import base_model_files

    spec, v = ctx.spec, ctx.verifier
    cfg = ctx.train_config()
    mdir = ctx.model_dir
    base_model = _base_model(cfg)
    for extra in _PACKAGED:
        p = mdir / extra
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    # the evaluation an auditor re-executes (kolm kscore verify): the signed outcomes
    # and what it ran on
    outcomes = mdir / reexec.OUTCOMES_FILE
    outcomes.parent.mkdir(parents=True)
    outcomes.write_text("".join(x + "\n" for x in ev.outcomes), encoding="utf-8")
    gate = None
    if trained.gate is not None:  # the selective-prediction gate (kolm_compile.gate)
        gate = {**trained.gate, **({"holdout": ev.gate} if ev.gate is not None else {})}
    if ctx.opts.bundle_base:  # a folder's files, or a single GGUF file
        root, files = base_model_files(cfg.base_model)
        for rel in files:
            (mdir / "base" / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / rel, mdir / "base" / rel)
    recall_info = build_recall(ctx, sgn, cfg) if spec.recall is not None else None
    manifest = build_manifest(ctx, cfg, base_model, ev, gate, recall_info)
    (mdir / MANIFEST_FILE).write_bytes(manifest.to_json())
    (mdir / "task.json").write_bytes(canonical_json(spec.to_dict()) + b"\n")
    vdict = {"name": v.name, "version": v.version, "params": dict(v.params)}
    (mdir / "verifier.json").write_text(json.dumps(vdict, indent=2, sort_keys=True) + "\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    digest = kolm_artifact.pack(mdir, out, ctx.key)
    return _Packed(
        manifest=manifest,
        base_model=base_model,
        digest=digest,
        file_digest=kolm_artifact.sha256_file(out),
        cover=_cover_summary(gate),
        recall=recall_info,
    )


def build_manifest(
    ctx: StageContext,
    cfg: TrainConfig,
    base_model: BaseModelRef,
    ev: Evaluated,
    gate: Mapping[str, Any] | None,
    recall_info: Mapping[str, Any] | None,
) -> Manifest:
    """``manifest.json`` of the artifact (checked as a reader checks it)."""
    spec, v = ctx.spec, ctx.verifier
    return Manifest(
        name=spec.name,
        task_type=spec.task,
        labels=tuple(spec.labels) if spec.labels is not None else None,
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
            n=len(ev.outcomes),
            holdout_digest=ev.holdout_root,
            outcome_root=ev.outcome_root,
            text_column=spec.data.text_column,
            label_column=spec.data.column(spec.task),
        ),
        determinism=dict(ev.determinism),
        student=student_record(ctx),
        gate=None if gate is None else dict(gate),
        base="base" if ctx.opts.bundle_base else None,
        recall=RecallRef.from_dict(recall_info) if recall_info is not None else None,
    ).replace()  # checked as a reader checks it


def student_record(ctx: StageContext) -> dict[str, Any]:
    """What the manifest's and the artifact receipt's ``student`` say: the kind, whether
    ``student.kind: auto`` chose it (and why), and a generative student's token cap."""
    cfg = ctx.train_config()
    out: dict[str, Any] = {"kind": cfg.kind, "base_model": cfg.base_model}
    if ctx.spec.student.chosen_by == "auto":  # student.kind: auto, and why this kind
        out["chosen_by"] = "auto: " + auto_reason(ctx.spec.task, cfg.kind)
    if cfg.kind == "causal_lm":
        out["max_new_tokens"] = cfg.max_new_tokens
    return out


def auto_reason(task: str, kind: str) -> str:
    """Why ``student.kind: auto`` gave ``kind`` for ``task`` (kolm_compile.spec)."""
    if task == "classify":
        return "task classify trains a classifier"
    if kind == "span_tagger":
        return "every field of the output schema is a grounded string or a single enum"
    if task == "extract":
        return "a field of the output schema is neither a grounded string nor a single enum"
    return f"task {task} trains a generative student"


def _base_model(cfg: TrainConfig) -> BaseModelRef:
    return BaseModelRef(
        id=cfg.base_model,
        revision="registered",
        weights_digest=base_weights_digest(cfg.base_model),
    )


def build_recall(ctx: StageContext, sgn: Signed, cfg: TrainConfig) -> dict[str, Any]:
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

    rs = ctx.spec.recall
    assert rs is not None
    if rs.source == "examples":
        chunks = recall.chunks_from_examples([(r.text, r.label) for r in sgn.logged])
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
            ctx.model_dir / recall.INDEX_FILE,
            embedding_model=model_id,
            chunking=chunking,
        )
    return {**info.to_manifest(), "k": rs.k}


# --------------------------------------------------------------------------- the receipts


def _append_one(ctx: StageContext, statement: Statement) -> Acked:
    (res,) = ctx.sink.append([sign_statement(statement, ctx.key, deterministic=True)])
    if not isinstance(res, Acked):
        raise res
    return res


def sign_eval(
    ctx: StageContext, ing: Ingested, ev: Evaluated, packed: _Packed, *, at: datetime
) -> Statement:
    """The ``eval`` receipt's statement: the student's K-score on the holdout (subject =
    the artifact digest), the teacher's, per-label metrics, the determinism record, the
    gate's cover and (up to 80 labels) the confusion matrix."""
    spec = ctx.spec
    score, t_single, t_vote = ev.k_score, ev.teacher_single, ev.teacher_vote
    hr = ing.holdout_report.to_dict() if ing.holdout_report is not None else None
    return eval_statement(
        time=at,
        artifact_digest=packed.digest,
        holdout_digest=ev.holdout_root,
        n=score.n,
        correct=score.correct,
        k_score=score.score,
        interval=(score.low, score.high),
        outcome_root=ev.outcome_root,
        teacher_k_score=t_vote.score,
        extra={
            "job_id": ctx.job_id,
            # holdout rows mapped/dropped and those also among the training inputs
            **({"holdout": hr} if hr else {}),
            **({"gate": packed.cover} if packed.cover is not None else {}),
            "teacher_k_score_single": t_single.score,
            "teacher_k_score_vote": t_vote.score,
            "per_label": dict(ev.per_label),
            # extract: per-field P/R/F1 and the schema-valid share; generate: pass rate,
            # exact match, BLEU (kolm_compile.kscore.task_metrics)
            **({"task_metrics": dict(ev.task_metrics)} if ev.task_metrics else {}),
            "determinism": dict(ev.determinism),
            # the matrix grows as labels²: left out past 80 labels (64 KiB entry cap)
            **(
                {"confusion": {"labels": list(spec.labels or ()), "matrix": ev.confusion}}
                if len(spec.labels or ()) <= _CONFUSION_MAX_LABELS
                else {}
            ),
        },
    )


def sign_artifact(
    ctx: StageContext,
    smp: Sampled,
    sgn: Signed,
    ev: Evaluated,
    packed: _Packed,
    out: Path,
    ev_res: Acked,
    labels: Mapping[str, Any],
    cost: Mapping[str, Any],
    *,
    at: datetime,
) -> Statement:
    """The ``artifact`` receipt's statement: the file, its base model, the training-set
    root and label count, the eval receipt's leaf hash, the verifier, the compile
    configuration's digest, the ledger checkpoint, and the job's teacher, labels, cost,
    cover and (with a recall index) signed corpus."""
    spec, v = ctx.spec, ctx.verifier
    cfg = ctx.train_config()
    vdict = {"name": v.name, "version": v.version, "params": dict(v.params)}
    recall_info = packed.recall
    return artifact_statement(
        time=at,
        artifact_digest=packed.digest,
        file_name=out.name,
        file_digest=packed.file_digest,
        base_model=packed.base_model.to_dict(),
        training_set_root=sgn.training_set_root,
        label_count=len(sgn.logged),
        eval_receipt=ev_res.leaf_hash.hex(),
        k_score=ev.k_score.score,
        verifier={**vdict, "spec_digest": v.spec_digest()},
        compile_config_digest=hashlib.sha256(
            canonical_json(
                {
                    "spec": spec.digest(),
                    "train": cfg.to_dict(),
                    "bundle_base": ctx.opts.bundle_base,
                }
            )
        ).hexdigest(),
        kolm_version=kolm_version(),
        checkpoint=ctx.sink.checkpoint(),
        extra={
            "job_id": ctx.job_id,
            "student": student_record(ctx),
            "teacher": dict(smp.teacher),
            "labels": dict(labels),
            "cost": dict(cost),
            **({"cover": _cover_brief(packed.cover)} if packed.cover is not None else {}),
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


def _labels(ing: Ingested, vt: Voted, sgn: Signed) -> dict[str, Any]:
    """The artifact receipt's ``labels``: what was sampled, accepted, rejected (and why),
    the holdout report, the seed pairs, and what the ledger acknowledged or refused."""
    summary = vt.summary
    return {
        "sampled": summary.n,
        "accepted": summary.accepted,
        "rejected": summary.n - summary.accepted,
        "acceptance_rate": summary.acceptance_rate,
        "rejected_reasons": dict(summary.reasons or {}),
        # holdout rows mapped/dropped, and those also among the training inputs
        "holdout": ing.holdout_report.to_dict() if ing.holdout_report is not None else {},
        "seed_pairs": len(ing.seeds),
        "logged": len(sgn.logged),
        "append_failed": len(sgn.failed),
    }


def cost_report(
    k: int,
    opts: CompileOptions,
    spend: TeacherSpend,
    smp: Sampled,
    latency_s: float,
    threads: int,
) -> dict[str, Any]:
    """Teacher calls, tokens and cost, beside the projected per-call cost of the student
    (``latency_s`` on ``threads`` CPU threads at ``opts.dollars_per_cpu_hour``)."""
    u = smp.usage
    per_sample = u.cost / u.samples if u.samples else 0.0
    cpu_s = latency_s * threads
    student = cpu_s / 3600.0 * opts.dollars_per_cpu_hour
    spent = spend.to_dict()
    # a folder from before JOB/spend.json: this run's cache misses are all it knows
    bought = spent["samples"] if spend.path and os.path.exists(spend.path) else (u.cache_misses)
    return {
        # units: a SAMPLE is one answer; a REQUEST is one HTTP call (asks for up to k
        # samples). The budget's max_teacher_calls counts billed requests.
        "teacher_samples": u.samples,
        "teacher_calls": u.samples,  # older name of teacher_samples (one call = one sample)
        "teacher_samples_bought_by_this_job": bought,
        "teacher_calls_paid_by_this_job": bought,  # older name, same value (samples)
        "teacher_requests_billed_by_this_job": spent["requests"],
        "teacher_requests_failed_not_billed": spent["failed_requests"],
        "cost_paid_by_this_job": round(spent["cost"], 8),
        "input_tokens": u.input_tokens,
        "output_tokens": u.output_tokens,
        "estimated_cost": u.cost,
        "teacher_cost_per_call": per_sample,
        "teacher_cost_per_voted_answer": per_sample * k,
        "student_latency_ms": round(latency_s * 1000, 3),
        "student_threads": threads,
        "student_cost_per_call": student,
        "assumed_dollars_per_cpu_hour": opts.dollars_per_cpu_hour,
        "note": "student cost = mean single-input CPU latency x threads x assumed $/CPU-hour",
    }


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
