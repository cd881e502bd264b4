"""What a compile will ask of its teacher, before it asks: ``kolm compile check SPEC``.

:func:`estimate` reads the spec's data exactly as the ingest stage does (the same
checks, the same errors naming the field), then counts inputs (unlabeled and holdout),
the requests and samples the sample stage would need, the samples a teacher cache
already holds (free), and estimates tokens and cost at the spec's budget prices. No
teacher is called, no job folder is written, no ledger is opened.

Token estimate: the prompt is what :func:`~kolm_compile.teachers.build_messages` sends,
at 4 characters per token; an answer is the longest label (classify) at 4 characters
per token, plus one. Real tokenizers differ: the estimate is for budgeting, not billing.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from kolm_ledger.errors import KolmError

from .spec import TaskSpec
from .teachers import build_messages

__all__ = ["estimate"]


def _tokens(chars: int) -> int:
    return math.ceil(chars / 4)


def estimate(spec: TaskSpec, *, teacher_cache: Path | None = None) -> dict[str, Any]:
    """The estimate as a JSON-ready dict (``table``: rows for a person; ``notes``: what
    would stop or slow the job). Raises :class:`SpecError` for bad data, as a run would."""
    from .pipeline.ingest import ingest

    ing = ingest(spec)  # the compile's own ingest stage: no folder, no ledger
    inputs = list(ing.inputs) + [t for t, _ in ing.holdout]
    k = spec.teacher.k
    per_request = k if getattr(spec.teacher.options, "batch_samples", True) else 1
    notes: list[str] = []

    cached = 0
    teacher_ok = True
    try:
        from .cache import CachedTeacher, TeacherCache, cache_key
        from .teachers import build_teacher, teacher_prompt

        teacher = build_teacher(spec.teacher, spec)
    except KolmError as e:
        teacher_ok = False
        notes.append(f"the teacher cannot be built: {e}")
    else:
        if teacher_cache is not None and teacher_cache.is_file():
            cache = TeacherCache(teacher_cache)
            try:
                desc = CachedTeacher(teacher, cache).describe()
                for text in inputs:
                    prompt = teacher_prompt(teacher, spec, text)
                    cached += sum(
                        cache.get(cache_key(desc, prompt, text, i)) is not None for i in range(k)
                    )
            finally:
                cache.close()
        close = getattr(teacher, "close", None)
        if close is not None:
            close()

    samples = len(inputs) * k
    to_buy = samples - cached
    # requests: one per input with a missing sample (more when batch_samples is off)
    requests = math.ceil(to_buy / per_request) if to_buy else 0
    prompt_tokens = [
        _tokens(sum(len(m["content"]) for m in build_messages(spec, t))) for t in inputs
    ]
    mean_prompt = sum(prompt_tokens) / len(prompt_tokens) if prompt_tokens else 0.0
    answer = (max((len(x) for x in spec.labels or ()), default=16) if spec.labels else 64) // 4 + 1
    input_tokens = round(mean_prompt * requests)
    output_tokens = answer * to_buy
    b = spec.budget
    cost = b.cost(input_tokens, output_tokens)
    if b.max_teacher_calls is not None and requests > b.max_teacher_calls:
        notes.append(
            f"budget.max_teacher_calls {b.max_teacher_calls} < {requests} requests needed: the "
            "job stops there; raise it and run again to resume (paid answers are kept)"
        )
    if b.max_teacher_samples is not None and to_buy > b.max_teacher_samples:
        notes.append(
            f"budget.max_teacher_samples {b.max_teacher_samples} < {to_buy} samples to buy"
        )
    if b.max_cost is not None and cost > b.max_cost:
        notes.append(f"budget.max_cost ${b.max_cost:.4f} < estimated ${cost:.4f}")
    assert ing.holdout_report is not None  # ingest always reports
    hold = ing.holdout_report.to_dict()
    if spec.task != "classify" and (hold.get("dropped") or hold.get("unlabeled")):
        why = (
            "not an object valid under spec.output_schema" if spec.task == "extract" else "not text"
        )
        notes.append(
            f"spec.data.holdout: {hold['dropped']} rows dropped (output {why}), "
            f"{hold['unlabeled']} without an output"
        )
    elif hold.get("mapped") or hold.get("dropped") or hold.get("unlabeled"):
        notes.append(
            f"spec.data.holdout: {hold['mapped']} labels mapped to spec.labels (case, _ or -), "
            f"{hold['dropped']} rows dropped (label not in spec.labels), "
            f"{hold['unlabeled']} without a label"
        )
    if hold.get("leaked"):
        notes.append(
            f"spec.data.holdout: {hold['leaked']} holdout texts are also training inputs "
            "(leakage: the K-score would flatter the student)"
        )
    out: dict[str, Any] = {
        "spec": spec.name,
        "identity_digest": spec.identity_digest(),
        "inputs": len(ing.inputs),
        "seed_pairs": len(ing.seeds),
        "holdout": len(ing.holdout),
        "holdout_report": hold,
        "k": k,
        "samples": samples,
        "samples_cached": cached,
        "samples_to_buy": to_buy,
        "requests": requests,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "estimated_cost": round(cost, 6),
        "prices": {
            "per_1k_input_tokens": b.price_per_1k_input_tokens,
            "per_1k_output_tokens": b.price_per_1k_output_tokens,
        },
        "teacher": spec.teacher.backend,
        "teacher_ready": teacher_ok,
        "notes": notes,
    }
    out["table"] = [
        ("inputs (unlabeled / seed pairs / holdout)",
         f"{out['inputs']} / {out['seed_pairs']} / {out['holdout']}"),
        ("teacher samples (k per input)", f"{samples} (k={k})"),
        ("already in the teacher cache", str(cached)),
        ("requests to send / samples to buy", f"{requests} / {to_buy}"),
        ("tokens in / out (estimate)", f"{input_tokens} / {output_tokens}"),
        ("cost at the spec's prices (estimate)", f"${cost:.4f}"),
    ]  # fmt: skip
    return out
