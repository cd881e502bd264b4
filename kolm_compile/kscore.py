"""K-score and the metrics reported next to it (pure Python).

The K-score of a model on a holdout is ``100 * correct / n`` where an example
is correct when the model's output passes the verifier *and* equals the
reference (classify: the label; extract: the RFC 8785 canonical object — whole-frame
exact match; generate: the verifier passes given the reference —
:func:`kolm_ledger.audit.reexec.example_outcome`). It is always reported with ``n`` and
its 95% Wilson score interval::

    >>> s = kscore([True] * 81 + [False] * 19)
    >>> (s.score, round(s.low, 2), round(s.high, 2))
    (81.0, 72.22, 87.49)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from kolm_ledger.errors import InvalidInput

__all__ = [
    "Z_95",
    "KScore",
    "confusion_matrix",
    "kscore",
    "per_label_metrics",
    "task_metrics",
    "wilson_interval",
]

#: the two-sided 95% standard normal quantile, Φ⁻¹(0.975)
Z_95 = 1.959963984540054


@dataclass(frozen=True)
class KScore:
    """A K-score with its sample size and 95% Wilson interval (all in percent)."""

    correct: int
    n: int
    score: float
    low: float
    high: float

    def to_dict(self) -> dict[str, float | int]:
        """Fields as a dict with sorted keys."""
        return dict(sorted(asdict(self).items()))


def wilson_interval(correct: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for ``correct`` successes in ``n`` trials, in percent.

    Requires ``n >= 1``, ``0 <= correct <= n`` and ``z > 0``; raises
    :class:`InvalidInput` naming the offending argument otherwise. The bounds
    lie in ``[0, 100]`` and enclose ``100 * correct / n``.
    """
    for name, value in (("correct", correct), ("n", n)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise InvalidInput(f"{name} is {value!r}, want an integer")
    if n < 1:
        raise InvalidInput(f"n is {n}, want n >= 1")
    if not 0 <= correct <= n:
        raise InvalidInput(f"correct is {correct}, want 0 <= correct <= n = {n}")
    if not (isinstance(z, int | float) and math.isfinite(z) and z > 0):
        raise InvalidInput(f"z is {z!r}, want a finite number > 0")
    p = correct / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    # The exact bounds at p = 0 and p = 1 are 0 and 1; pin them so rounding
    # cannot put the interval a hair away from the point estimate.
    low = 0.0 if correct == 0 else max(0.0, centre - half)
    high = 1.0 if correct == n else min(1.0, centre + half)
    return 100.0 * low, 100.0 * high


def kscore(outcomes: Sequence[bool]) -> KScore:
    """K-score of per-example outcomes (True = passes the verifier and equals the reference).

    Requires at least one outcome; raises :class:`InvalidInput` otherwise or if
    an outcome is not a bool.
    """
    n = len(outcomes)
    if n == 0:
        raise InvalidInput("n is 0, want at least one holdout outcome")
    correct = 0
    for i, o in enumerate(outcomes):
        if not isinstance(o, bool):
            raise InvalidInput(f"outcomes[{i}] is {type(o).__name__}, want bool")
        correct += o
    low, high = wilson_interval(correct, n)
    return KScore(correct=correct, n=n, score=100.0 * correct / n, low=low, high=high)


def _check_pair(golds: Sequence[str], preds: Sequence[str]) -> None:
    if len(golds) != len(preds):
        raise InvalidInput(f"golds has {len(golds)} items, preds has {len(preds)}; want equal")


def per_label_metrics(
    golds: Sequence[str], preds: Sequence[str]
) -> dict[str, dict[str, float | int]]:
    """Precision, recall, F1 and support per label, keys sorted.

    Labels are those appearing in either sequence. A ratio with a zero
    denominator is 0.0 (scikit-learn's ``zero_division=0``). Requires
    ``len(golds) == len(preds)``.
    """
    _check_pair(golds, preds)
    tp: dict[str, int] = {}
    gold_n: dict[str, int] = {}
    pred_n: dict[str, int] = {}
    for g, p in zip(golds, preds, strict=True):
        gold_n[g] = gold_n.get(g, 0) + 1
        pred_n[p] = pred_n.get(p, 0) + 1
        if g == p:
            tp[g] = tp.get(g, 0) + 1
    out: dict[str, dict[str, float | int]] = {}
    for label in sorted(set(gold_n) | set(pred_n)):
        t = tp.get(label, 0)
        precision = t / pred_n[label] if pred_n.get(label) else 0.0
        recall = t / gold_n[label] if gold_n.get(label) else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out[label] = {
            "f1": f1,
            "precision": precision,
            "recall": recall,
            "support": gold_n.get(label, 0),
        }
    return out


def confusion_matrix(
    golds: Sequence[str], preds: Sequence[str], labels: Sequence[str]
) -> list[list[int]]:
    """``m[i][j]`` = number of examples with gold ``labels[i]`` predicted as ``labels[j]``.

    Requires ``len(golds) == len(preds)``, ``labels`` distinct, and every gold
    and predicted label in ``labels``; raises :class:`InvalidInput` otherwise.
    """
    _check_pair(golds, preds)
    index = {y: i for i, y in enumerate(labels)}
    if len(index) != len(labels):
        raise InvalidInput("labels has duplicates")
    m = [[0] * len(labels) for _ in labels]
    for k, (g, p) in enumerate(zip(golds, preds, strict=True)):
        for name, y in (("golds", g), ("preds", p)):
            if y not in index:
                raise InvalidInput(f"{name}[{k}] is {y!r}, which is not in labels")
        m[index[g]][index[p]] += 1
    return m


def task_metrics(
    task: str, verifier: Any, texts: Sequence[str], preds: Sequence[str], refs: Sequence[str]
) -> dict[str, Any]:
    """The figures an ``extract`` or ``generate`` eval receipt carries beside the K-score.

    extract: ``schema_valid`` (percent of outputs the verifier accepts), ``exact_match``
    (percent whose canonical object equals the reference), ``fields`` (per JSON Pointer:
    precision, recall, F1, support — :func:`kolm_compile.structured.field_scores`; an
    output the verifier refuses predicts no field) and ``micro`` (over every field).
    generate: ``pass_rate`` (percent the verifier accepts given the reference),
    ``exact_match`` (normalized output equals the reference) and ``bleu`` (mean sentence
    BLEU-4 against the reference, whitespace tokens, in percent).
    """
    import json

    from .structured import field_scores
    from .verifiers import sentence_bleu

    n = len(preds)
    if len(texts) != n or len(refs) != n:
        raise InvalidInput(f"{len(texts)} inputs, {n} outputs, {len(refs)} references")

    def pct(k: int) -> float:
        return round(100.0 * k / n, 4) if n else 0.0

    verdicts = [verifier.check(p, input=x) for x, p in zip(texts, preds, strict=True)]
    if task == "extract":
        golds = [json.loads(r) for r in refs]
        objs = [json.loads(v.normalized) if v.ok else None for v in verdicts]
        per, micro = field_scores(golds, objs)
        return {
            "schema_valid": pct(sum(v.ok for v in verdicts)),
            "exact_match": pct(
                sum(v.ok and v.normalized == r for v, r in zip(verdicts, refs, strict=True))
            ),
            "fields": {k: f.to_dict() for k, f in per.items()},
            "micro": micro.to_dict(),
        }
    passed = sum(bool(verifier.check(p, reference=r).ok) for p, r in zip(preds, refs, strict=True))
    bleu = [
        sentence_bleu(r.split(), v.normalized.split()) for v, r in zip(verdicts, refs, strict=True)
    ]
    return {
        "pass_rate": pct(passed),
        "exact_match": pct(sum(v.normalized == r for v, r in zip(verdicts, refs, strict=True))),
        "bleu": round(100.0 * sum(bleu) / n, 4) if n else 0.0,
    }
