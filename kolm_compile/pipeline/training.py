"""Stages (5) and (6): the LoRA student on the acknowledged labels, its selective-
prediction gate, and its K-score on the holdout.

(5) :func:`train` trains on the acknowledged labels in ledger index order; with
``student.target_cover_k_score`` a seeded calibration split of them is held out and the
gate's thresholds are chosen on it (:mod:`kolm_compile.gate`). (6) :func:`evaluate`
measures the student (K-score, per-label metrics, confusion matrix, each example's
outcome at recorded settings), the teacher (one sample, k-vote) and the gate on the
holdout, and the single-input latency.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kolm_ledger.audit import reexec
from kolm_ledger.formats.receipts import example_digest

from .. import gate as _gate
from .. import kscore as ks
from ..fields import thaw
from .context import StageContext, dump_json
from .labels import vote_one
from .outputs import Evaluated, Ingested, Sampled, Signed, Trained
from .result import JobCancelled

if TYPE_CHECKING:
    pass

__all__ = ["evaluate", "train"]


def train(ctx: StageContext, sgn: Signed) -> tuple[Trained, Any]:
    """Stage (5): train the student into ``model_dir/adapter`` and build its gate there;
    returns the stage output and the trained student (``None`` when the trainer keeps
    none in memory; :func:`evaluate` then loads it)."""
    from ..student import Student, torch_state

    spec = ctx.spec
    cfg = ctx.train_config()
    mdir = ctx.model_dir
    if mdir.exists():
        shutil.rmtree(mdir)
    mdir.mkdir(parents=True)
    texts = [r.text for r in sgn.logged]
    ys = [r.label for r in sgn.logged]
    # selective prediction (kolm_compile.gate): with a target, a seeded calibration
    # split of the acknowledged labels is held out from training
    st = spec.student
    digests = [example_digest(x, y) for x, y in zip(texts, ys, strict=True)]
    cal = (
        _gate.calibration_split(digests, _gate.CALIBRATION_FRACTION, spec.seed)
        if st.target_cover_k_score is not None
        else []
    )
    cal_set = set(cal)
    cal_texts, cal_ys = [texts[i] for i in cal], [ys[i] for i in cal]
    calibration = {
        "fraction": _gate.CALIBRATION_FRACTION,
        "seed": spec.seed,
        "examples_digest": hashlib.sha256("".join(digests[i] for i in cal).encode()).hexdigest(),
    }
    keep = [i for i in range(len(texts)) if i not in cal_set]
    texts, ys, digests = (
        [texts[i] for i in keep],
        [ys[i] for i in keep],
        [digests[i] for i in keep],
    )
    dump_json(ctx.dir / "train_set.json", {"texts": texts, "labels": ys})

    def progress(step: int, total: int, loss: float) -> None:
        ctx.progress("train", step, total, loss=round(loss, 4))

    try:
        tr = _train_student(ctx, texts, ys, mdir / "adapter", progress)
    except InterruptedError as e:
        raise JobCancelled(f"job {ctx.job_id} cancelled during training") from e
    student = tr.student or Student.load(mdir / "adapter", threads=cfg.threads)
    with torch_state(cfg.threads, False):
        if cfg.kind == "classifier":
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
        else:  # a generative or tagging student: its own confidence is the gate's score
            gate_meta = _gate.build_confidence(
                student,
                cal_texts,
                cal_ys,
                target=st.target_cover_k_score,
                confidence_threshold=st.confidence_threshold,
                calibration=calibration,
                rule=_gate.CONFIDENCE_RULES[cfg.kind],
                correct=lambda x, p, y: reexec.example_outcome(
                    ctx.verifier, p, y, task=spec.task, input=x
                ),
            )
    out = Trained(
        gate=gate_meta,
        examples=len(texts),
        steps=tr.steps,
        first_loss=tr.losses[0],
        final_loss=tr.losses[-1],
        counters={
            "examples": len(texts),
            "steps": tr.steps,
            "final_loss": round(tr.losses[-1], 4),
        },
    )
    return out, tr.student


def _train_student(
    ctx: StageContext,
    texts: list[str],
    outputs: list[str],
    adapter: Path,
    progress: Callable[[int, int, float], None],
) -> Any:
    """Train the spec's student kind (``student.kind``, resolved at load) into ``adapter``;
    returns the trainer's :class:`~kolm_compile._train.TrainResult`."""
    spec, cfg = ctx.spec, ctx.train_config()
    if cfg.kind == "causal_lm":
        from .. import _train_lm

        return _train_lm.train_causal_lm(
            texts,
            outputs,
            cfg,
            adapter,
            instructions=spec.instructions,
            progress=progress,
            should_stop=ctx.should_stop,
        )
    if cfg.kind == "span_tagger":
        from .. import _train_tagger

        assert spec.output_schema is not None  # the spec refuses span_tagger without one
        return _train_tagger.train_span_tagger(
            texts,
            outputs,
            thaw(spec.output_schema),
            cfg,
            adapter,
            progress=progress,
            should_stop=ctx.should_stop,
        )
    from .. import _train

    return _train.train_classifier(
        texts,
        outputs,
        list(spec.labels or ()),
        cfg,
        adapter,
        progress=progress,
        should_stop=ctx.should_stop,
    )


def evaluate(
    ctx: StageContext,
    ing: Ingested,
    smp: Sampled,
    trained: Trained,
    student: Any = None,
) -> Evaluated:
    """Stage (6): the student on the holdout at the recorded settings (threads, batch
    size, a determinism record: :func:`kolm_ledger.audit.reexec.determinism_record`), each
    example's signed outcome line and their root, the teacher's K-score per sample and
    per k-vote, the gate's coverage and risk–coverage curve, and the single-input latency
    over ``options.latency_probe`` holdout inputs. ``student``: the one :func:`train`
    just trained (else it is loaded from the model folder)."""
    from ..student import Student, torch_state

    cfg = ctx.train_config()
    student = student or Student.load(ctx.model_dir / "adapter", threads=cfg.threads)
    texts = [t for t, _ in ing.holdout]
    refs = [y for _, y in ing.holdout]
    bs = reexec.EVAL_BATCH_SIZE

    def predict(xs: Sequence[str]) -> list[tuple[str, float]]:
        assert student is not None
        return list(student.predict(list(xs), batch_size=bs))

    # at the recorded settings (threads, batch size), so an auditor can re-execute it
    with torch_state(cfg.threads, False):
        answers = predict(texts)
        determinism = reexec.determinism_record(
            predict, threads=cfg.threads, batch_size=bs, dtype=student.dtype
        )
    preds = [p for p, _ in answers]
    v, task = ctx.verifier, ctx.spec.task
    outcomes = [
        reexec.example_outcome(v, p, r, task=task, input=x)
        for x, p, r in zip(texts, preds, refs, strict=True)
    ]
    score = ks.kscore(outcomes)

    def teacher_ok(x: str, answer: str | None, ref: str) -> bool:
        return answer is not None and reexec.example_outcome(v, answer, ref, task=task, input=x)

    hs = smp.holdout_samples
    single = ks.kscore(
        [bool(ss) and teacher_ok(x, ss[0], r) for x, ss, r in zip(texts, hs, refs, strict=True)]
    )
    voted = ks.kscore(
        [
            (vr := vote_one(ctx, x, ss)).accepted and teacher_ok(x, vr.answer, r)
            for x, ss, r in zip(texts, hs, refs, strict=True)
        ]
    )
    # latency: one input per call, as a service would see it
    probe = texts[: ctx.opts.latency_probe]
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
    if trained.gate is not None:
        gate = _gate.Gate.load(ctx.model_dir, trained.gate, ctx.spec.name)
        if gate.confidence_only:
            gate_ev = _gate.evaluate_confidence(gate, [c for _, c in answers], outcomes)
        else:
            with torch_state(cfg.threads, False):
                gate_ev = _gate.evaluate(gate, student, texts, [bool(o) for o in outcomes])
    labels = list(ctx.spec.labels or ())
    classify = task == "classify"
    return Evaluated(
        gate=gate_ev,
        k_score=score,
        teacher_single=single,
        teacher_vote=voted,
        per_label=ks.per_label_metrics(refs, preds) if classify else {},
        confusion=ks.confusion_matrix(refs, preds, labels) if classify else [],
        task_metrics=None if classify else ks.task_metrics(task, v, texts, preds, refs),
        holdout_root=holdout_root,
        outcome_root=outcome_root,
        outcomes=[x.decode() for x in lines],
        determinism=determinism,
        latency_s=latency,
        threads=cfg.threads,
        total=len(texts),
        counters={
            "k_score": score.score,
            "teacher_single": single.score,
            "teacher_vote": voted.score,
        },
    )
