"""Stages (2)–(4): the ingested inputs become acknowledged label receipts.

(2) :func:`sample` asks the teacher k times per input and holdout input; (3) :func:`vote`
verifies every sample and takes the majority; (4) :func:`sign` signs one ``label``
receipt per accepted label and seed pair and appends them to the ledger in batches: only
acknowledged labels go on (the training set, in ledger index order).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

from kolm_ledger.errors import KolmError
from kolm_ledger.formats.receipts import (
    Statement,
    example_digest,
    label_statement,
    sign_statement,
)
from kolm_ledger.log.provenance import training_set_root

from ..cache import CachedTeacher
from ..fields import thaw
from ..sinks import Acked
from ..teachers import InputRejected, SampleRequest, TeacherSample
from ..voting import VoteResult, summarize, vote_per_field
from ..voting import vote as vote_on
from .context import StageContext, dump_json, stage_time
from .outputs import (
    AcceptedLabel,
    FailedLabel,
    Ingested,
    LoggedLabel,
    Sampled,
    Signed,
    Usage,
    Voted,
)

__all__ = [
    "REJECT_TEACHER_ERROR",
    "nothing_accepted",
    "prompt_ids",
    "sample",
    "sign",
    "vote",
    "vote_one",
]

#: rejection code of an input the teacher could not answer (voting has the others)
REJECT_TEACHER_ERROR = "teacher_error"
#: this many inputs rejected by the teacher before it answered any: a setting, not an input
_REJECTED_BEFORE_ANY = 5
_SEED_TEACHER = "seed-pairs"


# --------------------------------------------------------------------------- (2) sample


def prompt_ids(ing: Ingested) -> list[str]:
    """How errors name each input: its file field and data row (1 = first after a
    CSV header), with the input's SHA-256 beside it (the teacher adds that)."""
    ids = [
        f"spec.data.unlabeled row {r}" if r is not None else f"x{i}"
        for i, r in enumerate(ing.input_rows)
    ]
    return ids + [f"spec.data.holdout #{j + 1}" for j in range(len(ing.holdout))]


def sample(ctx: StageContext, teacher: CachedTeacher, ing: Ingested) -> Sampled:
    """Stage (2): k samples per input, then per holdout input, through the teacher cache.
    An input the teacher rejects is recorded (``teacher_errors``), not fatal; five
    rejected before any answer is a teacher setting and stops the job."""
    k = ctx.spec.teacher.k
    texts = list(ing.inputs) + [t for t, _ in ing.holdout]
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
            ctx.progress("sample", done[0], total, **counters)

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

    ids = prompt_ids(ing)
    reqs = [SampleRequest(ids[i], t, k) for i, t in enumerate(texts)]
    samples = teacher.sample_many(reqs, ctx.spec, on_result=on_result, on_error=on_error)
    hits, misses = teacher.hits - h0, teacher.misses - m0
    flat: list[TeacherSample] = [s for ss in samples for s in ss]
    n_in = len(ing.inputs)
    return Sampled(
        samples=[[s.text for s in ss] for ss in samples[:n_in]],
        holdout_samples=[[s.text for s in ss] for ss in samples[n_in:]],
        # inputs the teacher could not answer: index (inputs, then holdout) → why
        teacher_errors={str(i): errors[i] for i in sorted(errors)},
        teacher=teacher.describe(),
        usage=Usage(
            samples=len(flat),
            cache_hits=hits,
            cache_misses=misses,
            input_tokens=sum(s.input_tokens for s in flat),
            output_tokens=sum(s.output_tokens for s in flat),
            # every sample's price, whether this run or an earlier one paid it
            cost=round(sum(s.cost for s in flat), 8),
            cost_paid_now=round(sum(s.cost for s in flat if not s.cached), 8),
        ),
        total=total,
        counters={
            "samples": len(flat),
            "cache_hits": hits,
            "cache_misses": misses,
            **({"rejected_by_teacher": len(errors)} if errors else {}),
        },
    )


# --------------------------------------------------------------------------- (3) vote


def vote_one(ctx: StageContext, text: str, samples: Sequence[str]) -> VoteResult:
    """The spec's vote over one input's samples: the whole answer, or field by field with
    ``teacher.vote: per_field``; the input goes to the verifier (grounded checks)."""
    spec = ctx.spec
    t = spec.teacher
    need = t.min_agreement or t.k // 2 + 1
    if t.vote == "per_field" and spec.output_schema is not None:
        schema = thaw(spec.output_schema)
        return vote_per_field(samples, ctx.verifier, schema, t.k, need, input=text)
    return vote_on(samples, ctx.verifier, t.k, need, input=text)


def vote(ctx: StageContext, ing: Ingested, smp: Sampled) -> Voted:
    """Stage (3): verify every sample (given its input: the grounded check of an extract
    task needs it) and take the majority (``teacher.min_agreement``, default a strict
    majority of k) of the whole answer, or field by field with ``teacher.vote:
    per_field`` (kolm_compile.voting.vote_per_field); an input the teacher rejected is
    rejected with code ``teacher_error``. With gold answers in the input file, the label
    precision of one sample and of the vote are counted (diagnostics; they never reach
    training)."""
    spec = ctx.spec
    t = spec.teacher
    need = t.min_agreement or t.k // 2 + 1
    errors = smp.teacher_errors
    votes = []
    for i, ss in enumerate(smp.samples):
        err = errors.get(str(i))
        if err is None:
            votes.append(vote_one(ctx, ing.inputs[i], ss))
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
            "input_sha256": hashlib.sha256(ing.inputs[i].encode("utf-8")).hexdigest(),
            "code": v.rejected_code,
            "reason": v.rejected_reason,
            **({"field": v.rejected_field} if v.rejected_field is not None else {}),
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
    accepted: list[AcceptedLabel] = []
    for i, v in enumerate(votes):
        if v.accepted:
            assert v.answer is not None  # an accepted vote has an answer
            accepted.append(
                AcceptedLabel(i, v.answer, dict(v.votes), list(v.sample_digests), v.agreement)
            )
    counters: dict[str, float] = {
        "accepted": len(accepted),
        "rejected": len(votes) - len(accepted),
        "acceptance_rate": round(summary.acceptance_rate, 4),
    }
    gold = ing.input_gold
    if gold and all(g is not None for g in gold):  # diagnostics when inputs carry gold

        def first(sample: str, text: str) -> str:
            """The first sample as the vote would count it (structured: normalized)."""
            if spec.task == "classify":
                return sample
            return ctx.verifier.check(sample, input=text).normalized

        single = [
            first(ss[0], x) == g
            for ss, g, x in zip(smp.samples, gold, ing.inputs, strict=True)
            if ss
        ]
        voted = [gold[a.input] == a.answer for a in accepted]
        counters["gold_precision_single"] = round(sum(single) / max(1, len(single)), 4)
        counters["gold_precision_vote"] = round(sum(voted) / max(1, len(voted)), 4)
    for code, count in summary.reasons.items():
        counters[f"rejected_{code}"] = count
    return Voted(
        accepted=accepted,
        summary=summary,
        verifier_examples=refused,
        teacher_examples=[e["message"] for _, e in sorted(errors.items())][:1],
        rejected=rejected,
        total=len(votes),
        counters=counters,
    )


def nothing_accepted(vt: Voted) -> str:
    """``0 of 30 inputs accepted: 30 failed the verifier (examples …)``."""
    words = {
        "too_few_valid": "failed the verifier",
        "no_agreement": "had no agreement",
        "tie": "were ties",
        "assembled_invalid": "had field majorities the verifier refuses together",
        REJECT_TEACHER_ERROR: "were rejected by the teacher",
    }
    reasons = vt.summary.reasons or {}
    parts = [f"{n} {words.get(code, code)}" for code, n in sorted(reasons.items())]
    text = f"0 of {vt.summary.n} inputs accepted: {', '.join(parts) or 'none sampled'}"
    examples = list(vt.verifier_examples) + list(vt.teacher_examples)
    if examples:
        text += f" (examples: {'; '.join(examples)})"
    return text + "; nothing to sign or train on (stages/vote.json lists every input)"


# --------------------------------------------------------------------------- (4) sign


def sign(ctx: StageContext, ing: Ingested, smp: Sampled, vt: Voted) -> Signed:
    """Stage (4): one signed ``label`` receipt per seed pair and accepted label, appended
    in batches of ``options.label_batch``. Batches an interrupted run already had
    acknowledged are not signed again (``stages/sign.partial.json``), and labels the
    ledger already holds for this job (``sink.job_labels``) are reused. Raises when
    nothing was accepted or nothing acknowledged: there is nothing to train on."""
    spec, stage_dir = ctx.spec, ctx.stage_dir
    if not vt.accepted and not ing.seeds:
        raise KolmError(nothing_accepted(vt))
    # the spec as the labels were first signed: a budget raised mid-way does not make
    # the job's label receipts name two specs
    frozen = stage_dir / "sign.spec_digest"
    if not frozen.exists():
        frozen.write_text(spec.digest())
    task = {"name": spec.name, "type": spec.task, "spec_digest": frozen.read_text().strip()}
    v = ctx.verifier
    vdesc = {"name": v.name, "version": v.version, "spec_digest": v.spec_digest()}
    at = stage_time(stage_dir / "sign.time")
    items: list[tuple[str, str, Statement]] = []  # (text, label, statement)
    seed_teacher = {"backend": _SEED_TEACHER, "source": "spec.data.seed_pairs"}
    for text, label in ing.seeds:
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
            job_id=ctx.job_id,
            include_input=True,
            time=at,
        )
        items.append((text, label, st))
    for a in vt.accepted:
        text = ing.inputs[a.input]
        st = label_statement(
            input_value=text,
            output_value=a.answer,
            task=task,
            teacher=dict(smp.teacher),
            k=spec.teacher.k,
            votes=a.votes,
            sample_digests=a.sample_digests,
            verifier=vdesc,
            agreement=a.agreement,
            job_id=ctx.job_id,
            include_input=True,
            time=at,
        )
        items.append((text, a.answer, st))
    logged, failed, reused = _append_labels(ctx, items)
    logged.sort(key=lambda r: r.ledger_index)
    if not logged:
        why = f" (first refusal: {failed[0].error})" if failed else ""
        raise KolmError(
            f"no label receipt was acknowledged by the ledger (0 of {len(items)}){why}; "
            "nothing to train on"
        )
    root = training_set_root([bytes.fromhex(r.leaf_hash) for r in logged])
    return Signed(
        logged=logged,
        failed=failed,
        training_set_root=root,
        total=len(items),
        counters={
            "signed": len(items),
            "logged": len(logged),
            "append_failed": len(failed),
            "reused": reused,
        },
    )


def _append_labels(
    ctx: StageContext, items: Sequence[tuple[str, str, Statement]]
) -> tuple[list[LoggedLabel], list[FailedLabel], int]:
    """Sign and append ``items`` batch by batch, resuming after the last batch an earlier
    run recorded; returns the acknowledged, the refused and how many were reused."""
    # batches already acknowledged by an interrupted run are not signed again
    partial_path = ctx.stage_dir / "sign.partial.json"
    partial = json.loads(partial_path.read_text()) if partial_path.exists() else {}
    logged = [LoggedLabel(*r) for r in partial.get("logged", [])]
    failed = [FailedLabel(*r) for r in partial.get("failed", [])]
    start = int(partial.get("next", 0))
    # labels the ledger already holds for this job (an earlier run of it appended them
    # and died before recording so) are reused, never logged a second time
    job_labels = getattr(ctx.sink, "job_labels", None)
    already: Mapping[str, Acked] = job_labels(ctx.job_id) if job_labels else {}
    reused = 0
    batch = ctx.opts.label_batch
    for b in range(start, len(items), batch):
        ctx.check_stop("sign")
        chunk = items[b : b + batch]
        results: list[Acked | KolmError | None] = [
            already.get(example_digest(text, label)) for text, label, _ in chunk
        ]
        todo = [i for i, known in enumerate(results) if known is None]
        reused += len(chunk) - len(todo)
        if todo:
            res = ctx.sink.append(
                [sign_statement(chunk[i][2], ctx.key, deterministic=True) for i in todo]
            )
            if len(res) != len(todo):
                raise KolmError(f"ledger answered {len(res)} results for {len(todo)} receipts")
            for i, answer in zip(todo, res, strict=True):
                results[i] = answer
        for (text, label, _), r in zip(chunk, results, strict=True):
            if isinstance(r, Acked):
                logged.append(LoggedLabel(r.index, r.leaf_hash.hex(), text, label))
            else:
                failed.append(FailedLabel(text, label, f"{type(r).__name__}: {r}"))
        dump_json(partial_path, {"logged": logged, "failed": failed, "next": b + batch})
        ctx.progress("sign", min(b + batch, len(items)), len(items), logged=len(logged))
    return logged, failed, reused
