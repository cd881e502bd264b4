"""Selective prediction: the gate that decides whether the student answers itself.

Two scores per input, both computed from one forward pass of the student:

* **p** — the calibrated class probability: ``max softmax(logits / T)``, with the
  temperature ``T`` fit at compile time by minimising the negative log-likelihood on a
  calibration split of the verified labels, held out from training;
* **sim** — the kNN similarity: the cosine similarity of the input's embedding (the
  student encoder's mean-pooled, L2-normalised last hidden state) to its ``k``-th
  nearest neighbour among the acknowledged training examples (``k`` = ``student.gate_k``,
  default :data:`DEFAULT_K`). An input far from everything the student was taught has a
  low ``sim`` however confident the softmax is.

**Rule** (``calibrated``): the student answers iff ``p >= t_prob`` *and*
``sim >= t_sim``; otherwise the input leaves the cover (to the teacher, or a refusal).
The thresholds are chosen at compile time (:func:`select_thresholds`) on the calibration
split, in two steps:

1. ``t_sim`` — a conformal out-of-distribution test: the ``r``-th smallest calibration
   similarity, ``r = floor(alpha·(n+1))`` with ``alpha`` = :data:`DISTANCE_ALPHA` (no
   distance cut when ``r == 0``). An in-scope input (exchangeable with the calibration
   split) falls below it with probability at most ``alpha``, whatever the out-of-scope
   inputs look like — the calibration split has none, so accuracy alone cannot place
   this threshold (the earlier joint search raised ``t_sim`` only where it helped
   accuracy, and let 26% of out-of-scope inputs through on Banking77);
2. ``t_prob`` — among the calibration inputs with ``sim >= t_sim``, the lowest cut whose
   cover accuracy (point estimate) meets ``student.target_cover_k_score``: the largest
   coverage that meets it. The Wilson interval of the cover accuracy is recorded next to
   it (a 95% Wilson lower bound cannot reach 99 on fewer than ~380 calibration rows, so
   it is reported, not used to select).

With no target set the rule is ``softmax``: the
spec's ``confidence_threshold`` on the uncalibrated softmax (``T = 1``, ``t_sim = -1``),
the old behaviour, with the same values recorded.

**Generative and tagging students** (:func:`build_confidence`): the score is the student's
own confidence — for ``causal_lm`` the geometric-mean token probability of its greedy output
(``exp`` of the mean token log-probability; rule ``seq_logprob``), for ``span_tagger`` the
tagger's confidence (rule ``span_prob``, :mod:`kolm_compile.tagger_student`). The student
answers iff ``conf >= t_prob``; ``t_prob`` is the spec's ``confidence_threshold``, or, with
``student.target_cover_k_score``, the lowest cut whose cover accuracy on the calibration
split meets the target (the same selection as step 2 above, with no distance cut). These
gates have no files: the manifest's ``gate`` object is all of it.

Files in the artifact (signed like every other file): ``gate/embeddings.safetensors``
(tensor ``embeddings``, float32, one row per training example) and ``gate/gate.json``
(the example digests, row for row, and the parameters). The manifest's ``gate`` object
holds the parameters and the calibration and holdout figures.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kolm_ledger.errors import ArtifactError

__all__ = [
    "CALIBRATION_FRACTION",
    "CONFIDENCE_RULES",
    "DEFAULT_K",
    "DISTANCE_ALPHA",
    "EMBEDDINGS_FILE",
    "GATE_FILE",
    "NOTHING",
    "Gate",
    "calibration_split",
    "cover_figures",
    "fit_temperature",
    "knn_similarity",
    "risk_coverage",
    "select_thresholds",
    "softmax",
    "wilson",
]

DEFAULT_K = 5
#: Share of in-scope inputs the distance test may reject (conformal level of ``t_sim``).
DISTANCE_ALPHA = 0.05
#: Share of the acknowledged labels held out from training to calibrate the gate.
CALIBRATION_FRACTION = 0.1
#: student kind → the rule of its confidence gate (:func:`build_confidence`)
CONFIDENCE_RULES = {"causal_lm": "seq_logprob", "span_tagger": "span_prob"}
EMBEDDINGS_FILE = "gate/embeddings.safetensors"
GATE_FILE = "gate/gate.json"
#: ``t_prob`` that keeps nothing (a calibrated probability is at most 1): the target
#: could not be met on the calibration split by any threshold.
NOTHING = 2.0
_ROUND = 6


def r6(x: float) -> float:
    """Round for receipts (RFC 8785 canonical JSON: finite floats, few digits)."""
    return round(float(x), _ROUND)


def _r6_down(x: float) -> float:
    """Round a threshold down to 6 digits: an input at the cut stays kept."""
    scale: int = 10**_ROUND
    return round(math.floor(float(x) * scale) / scale, _ROUND)


def wilson(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of ``correct/n`` in percent (``(0, 100)`` when ``n == 0``)."""
    if n == 0:
        return 0.0, 100.0
    p = correct / n
    d = 1 + z * z / n
    c = p + z * z / (2 * n)
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return 100 * max(0.0, (c - h) / d), 100 * min(1.0, (c + h) / d)


def calibration_split(digests: Sequence[str], fraction: float, seed: int) -> list[int]:
    """Indices of the calibration split: the ``ceil(fraction·n)`` examples whose
    ``sha256(seed:digest)`` sort first (deterministic, independent of order)."""
    n = len(digests)
    m = min(n - 1, max(1, math.ceil(fraction * n))) if n > 1 else 0
    keyed = sorted(
        range(n), key=lambda i: hashlib.sha256(f"{seed}:{digests[i]}".encode()).hexdigest()
    )
    return sorted(keyed[:m])


def softmax(logits: Any, temperature: float = 1.0) -> Any:
    import numpy as np

    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fit_temperature(logits: Any, targets: Sequence[int]) -> float:
    """The temperature minimising the NLL of ``targets`` (a log-spaced grid 0.05–20,
    then a finer grid around the best; deterministic)."""
    import numpy as np

    y = np.asarray(targets, dtype=np.int64)
    if len(y) == 0:
        return 1.0

    def nll(t: float) -> float:
        p = softmax(logits, t)[np.arange(len(y)), y]
        return float(-np.log(np.clip(p, 1e-12, None)).mean())

    grid = np.exp(np.linspace(math.log(0.05), math.log(20.0), 121))
    best = min(grid, key=nll)
    fine = np.linspace(best / 1.06, best * 1.06, 41)
    return r6(min(fine, key=nll))


def knn_similarity(query: Any, bank: Any, k: int) -> Any:
    """Cosine similarity of each (normalised) query row to its ``k``-th nearest bank row
    (``min(k, len(bank))``-th; ``-1`` for an empty bank).

    The product runs in torch, on the thread pool the student already uses: a numpy
    (OpenBLAS) product starts a second pool whose spinning threads slowed the next
    forward pass ~3x on a 2-core box.
    """
    import numpy as np
    import torch

    q = torch.from_numpy(np.ascontiguousarray(query, dtype=np.float32))
    b = torch.from_numpy(np.ascontiguousarray(bank, dtype=np.float32))
    if len(b) == 0:
        return np.full(len(q), -1.0)
    kk = min(k, len(b))
    with torch.inference_mode():
        sims = q @ b.T
        return torch.topk(sims, kk, dim=1).values[:, -1].to(torch.float64).numpy()


def distance_threshold(sims: Sequence[float], alpha: float) -> float:
    """The conformal ``t_sim``: the ``floor(alpha·(n+1))``-th smallest of ``sims``
    (``-1``, no cut, when that rank is 0)."""
    r = math.floor(alpha * (len(sims) + 1))
    return float(sorted(sims)[r - 1]) if r >= 1 else -1.0


def select_thresholds(
    probs: Sequence[float],
    sims: Sequence[float],
    correct: Sequence[bool],
    target: float,
    alpha: float = DISTANCE_ALPHA,
) -> dict[str, Any]:
    """``t_sim`` = :func:`distance_threshold` of ``sims`` at ``alpha``; then, among the
    inputs with ``sim >= t_sim``, the ``t_prob`` with the largest coverage whose cover
    accuracy (point estimate, percent) is ``>= target`` (cuts fall between distinct
    probabilities; :data:`NOTHING` when no cut meets it). Returns ``t_prob``, ``t_sim``,
    ``alpha``, ``coverage`` (percent of all inputs), ``n_cover``, ``cover_correct``.
    """
    import numpy as np

    p = np.asarray(probs, dtype=np.float64)
    s = np.asarray(sims, dtype=np.float64)
    c = np.asarray(correct, dtype=bool)
    n = len(p)
    ts = distance_threshold(s.tolist(), alpha) if n else -1.0
    keep = s >= ts
    pp, cc = p[keep], c[keep]
    order = np.argsort(-pp, kind="stable")
    pp, cc = pp[order], cc[order]
    cum = np.cumsum(cc)
    m, tp, ok = 0, NOTHING, 0
    for j in range(len(pp) - 1, -1, -1):
        if j + 1 < len(pp) and pp[j + 1] == pp[j]:
            continue  # a cut must fall between distinct probabilities
        if 100.0 * cum[j] / (j + 1) >= target:
            m, tp, ok = j + 1, float(pp[j]), int(cum[j])
            break
    return {
        "t_prob": _r6_down(tp) if tp < NOTHING else NOTHING,
        "t_sim": _r6_down(ts),
        "alpha": alpha,
        "n_cover": m,
        "cover_correct": ok,
        "coverage": r6(100.0 * m / n) if n else 0.0,
    }


def cover_figures(
    probs: Sequence[float],
    sims: Sequence[float],
    correct: Sequence[bool],
    t_prob: float,
    t_sim: float,
) -> dict[str, Any]:
    """Coverage and cover K-score (with its Wilson interval) of a threshold pair."""
    keep = [p >= t_prob and s >= t_sim for p, s in zip(probs, sims, strict=True)]
    n, m = len(keep), sum(keep)
    ok = sum(1 for k, c in zip(keep, correct, strict=True) if k and c)
    lo, hi = wilson(ok, m)
    return {
        "n": n,
        "n_cover": m,
        "coverage": r6(100.0 * m / n) if n else 0.0,
        "cover_k_score": r6(100.0 * ok / m) if m else 0.0,
        "cover_interval": [r6(lo), r6(hi)],
        "k_score": r6(100.0 * sum(map(bool, correct)) / n) if n else 0.0,
    }


def risk_coverage(
    scores: Sequence[float], correct: Sequence[bool], points: int = 20
) -> list[list[float]]:
    """``[coverage %, cover accuracy %]`` when keeping the top ``q`` share by ``scores``,
    for ``q`` = 1/points … 1 (the risk–coverage curve; risk = 100 − accuracy)."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    out: list[list[float]] = []
    n = len(order)
    for q in range(1, points + 1):
        m = max(1, round(n * q / points)) if n else 0
        if m == 0:
            continue
        ok = sum(1 for i in order[:m] if correct[i])
        out.append([r6(100.0 * m / n), r6(100.0 * ok / m)])
    return out


@dataclass
class Gate:
    """An artifact's gate, loaded for inference."""

    rule: str  # "calibrated" | "softmax"
    temperature: float
    t_prob: float
    t_sim: float
    k: int
    bank: Any  # (n, d) float32, L2-normalised
    examples: int

    @classmethod
    def write(
        cls, directory: Path, embeddings: Any, digests: Sequence[str], params: Mapping[str, Any]
    ) -> None:
        """Write ``gate/embeddings.safetensors`` and ``gate/gate.json`` into ``directory``."""
        import numpy as np
        from safetensors.numpy import save_file

        (directory / "gate").mkdir(parents=True, exist_ok=True)
        save_file(
            {"embeddings": np.ascontiguousarray(embeddings, dtype=np.float32)},
            str(directory / EMBEDDINGS_FILE),
        )
        body = {"examples": list(digests), **params}
        (directory / GATE_FILE).write_text(json.dumps(body, sort_keys=True, indent=1) + "\n")

    @classmethod
    def load(cls, directory: Path, meta: Mapping[str, Any], name: str) -> Gate:
        """The gate the manifest's ``gate`` object describes; :class:`ArtifactError` naming
        the field when it is malformed or disagrees with the files."""
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        def num(key: str, lo: float, hi: float) -> float:
            v = meta.get(key)
            if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v <= hi:
                raise ArtifactError(f"{name}: manifest gate.{key} is {v!r}, want [{lo}, {hi}]")
            return float(v)

        rule = meta.get("rule")
        if rule in CONFIDENCE_RULES.values():
            return cls(str(rule), 1.0, num("t_prob", 0.0, NOTHING), -1.0, 1, None, 0)
        if rule not in ("calibrated", "softmax"):
            raise ArtifactError(f"{name}: manifest gate.rule is {rule!r}")
        k = meta.get("k")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 100:
            raise ArtifactError(f"{name}: manifest gate.k is {k!r}, want an integer in [1, 100]")
        try:
            bank = load_file(str(directory / EMBEDDINGS_FILE))["embeddings"]
            body = json.loads((directory / GATE_FILE).read_text())
        except (OSError, KeyError, ValueError, SafetensorError) as e:
            raise ArtifactError(f"{name}: gate files: {e}") from e
        if bank.ndim != 2 or len(bank) != len(body.get("examples") or []):
            raise ArtifactError(
                f"{name}: {EMBEDDINGS_FILE} has {len(bank)} rows, {GATE_FILE} names "
                f"{len(body.get('examples') or [])} examples"
            )
        return cls(
            rule=rule,
            temperature=num("temperature", 1e-3, 1e3),
            t_prob=num("t_prob", 0.0, NOTHING),
            t_sim=num("t_sim", -1.0, 1.0),
            k=k,
            bank=bank,
            examples=len(bank),
        )

    def score(self, logits: Any, embeddings: Any) -> list[dict[str, Any]]:
        """Per input: class index, calibrated ``prob``, the uncalibrated softmax ``raw``,
        ``sim``, ``inside`` and which rule
        part decided (``decided_by``: ``cover``, ``prob``, ``distance``, ``prob+distance``)."""
        import numpy as np

        probs = softmax(logits, self.temperature)
        idx = probs.argmax(axis=1)
        top = probs[np.arange(len(probs)), idx]
        raw = softmax(logits).max(axis=1)
        sims = knn_similarity(embeddings, self.bank, self.k)
        out = []
        for i, p, s, r in zip(idx.tolist(), top.tolist(), sims.tolist(), raw.tolist(), strict=True):
            low_p, far = p < self.t_prob, s < self.t_sim
            decided = (
                "prob+distance"
                if low_p and far
                else "prob"
                if low_p
                else "distance"
                if far
                else "cover"
            )
            out.append(
                {
                    "index": i,
                    "prob": p,
                    "raw": r,
                    "sim": s,
                    "inside": not (low_p or far),
                    "by": decided,
                }
            )
        return out

    @property
    def confidence_only(self) -> bool:
        """A gate on the student's own confidence (no logits, no kNN distance)."""
        return self.rule in CONFIDENCE_RULES.values()

    def score_confidence(self, confidences: Sequence[float]) -> list[dict[str, Any]]:
        """Per input of a confidence gate: ``prob`` (the student's confidence), ``inside``
        and ``by`` (``cover`` or ``prob``)."""
        out = []
        for c in confidences:
            inside = float(c) >= self.t_prob
            out.append({"prob": float(c), "inside": inside, "by": "cover" if inside else "prob"})
        return out

    def receipt(self, g: Mapping[str, Any]) -> dict[str, Any]:
        """The gate's values for a prediction receipt (rounded, finite)."""
        if self.confidence_only:
            return {
                "rule": self.rule,
                "prob": r6(g["prob"]),
                "t_prob": r6(self.t_prob),
                "inside": bool(g["inside"]),
                "decided_by": g["by"],
            }
        return {
            "rule": self.rule,
            "prob": r6(g["prob"]),
            "sim": r6(g["sim"]),
            "t_prob": r6(self.t_prob),
            "t_sim": r6(self.t_sim),
            "temperature": r6(self.temperature),
            "k": self.k,
            "inside": bool(g["inside"]),
            "decided_by": g["by"],
        }


def build(
    student: Any,
    train_texts: Sequence[str],
    train_digests: Sequence[str],
    calib_texts: Sequence[str],
    calib_labels: Sequence[str],
    *,
    target: float | None,
    k: int | None,
    confidence_threshold: float,
    calibration: Mapping[str, Any] | None,
    directory: Path,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Compile-time gate: embed the training examples, fit ``T`` and pick the thresholds
    on the calibration split (when ``target`` is set), write the gate files into
    ``directory``; returns the manifest's ``gate`` object (JSON-ready)."""
    k = k or DEFAULT_K
    _, bank = student.analyse(list(train_texts), batch_size=batch_size)
    meta: dict[str, Any] = {
        "embeddings": EMBEDDINGS_FILE,
        "file": GATE_FILE,
        "examples": len(train_texts),
        "k": k,
    }
    if target is None or not calib_texts:
        meta.update(rule="softmax", temperature=1.0, t_prob=r6(confidence_threshold), t_sim=-1.0)
    else:
        index = {y: i for i, y in enumerate(student.labels)}
        logits, emb = student.analyse(list(calib_texts), batch_size=batch_size)
        ys = [index[y] for y in calib_labels]
        t = fit_temperature(logits, ys)
        probs = softmax(logits, t)
        top = probs.max(axis=1).tolist()
        pred = probs.argmax(axis=1).tolist()
        correct = [p == y for p, y in zip(pred, ys, strict=True)]
        sims = knn_similarity(emb, bank, k).tolist()
        sel = select_thresholds(top, sims, correct, target)
        figs = cover_figures(top, sims, correct, sel["t_prob"], sel["t_sim"])
        meta.update(
            rule="calibrated",
            temperature=t,
            t_prob=sel["t_prob"],
            t_sim=sel["t_sim"],
            target_cover_k_score=r6(target),
            distance_alpha=DISTANCE_ALPHA,
            calibration={
                **dict(calibration or {}),
                **figs,
                "selection": "point_estimate",
                "distance": "conformal",
            },
        )
    Gate.write(
        directory,
        bank,
        train_digests,
        {key: meta[key] for key in ("rule", "temperature", "t_prob", "t_sim", "k")},
    )
    return meta


def evaluate(
    gate: Gate, student: Any, texts: Sequence[str], correct: Sequence[bool], batch_size: int = 64
) -> dict[str, Any]:
    """The gate on the holdout: coverage, cover K-score (Wilson interval), overall K-score
    and the risk–coverage curves ranking by ``prob`` and by ``sim``."""
    logits, emb = student.analyse(list(texts), batch_size=batch_size)
    g = gate.score(logits, emb)
    probs = [x["prob"] for x in g]
    sims = [x["sim"] for x in g]
    figs = cover_figures(probs, sims, correct, gate.t_prob, gate.t_sim)
    return {
        **figs,
        "curve": {"prob": risk_coverage(probs, correct), "sim": risk_coverage(sims, correct)},
    }


def build_confidence(
    student: Any,
    calib_texts: Sequence[str],
    calib_outputs: Sequence[str],
    *,
    target: float | None,
    confidence_threshold: float,
    calibration: Mapping[str, Any] | None,
    rule: str,
    correct: Any,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Compile-time gate of a generative or tagging student (module docstring): returns the
    manifest's ``gate`` object. ``correct(text, output, reference)`` is the K-score's
    per-example rule."""
    meta: dict[str, Any] = {"rule": rule}
    if target is None or not calib_texts:
        meta["t_prob"] = r6(confidence_threshold)
        return meta
    preds = student.predict(list(calib_texts), batch_size=batch_size)
    confs = [float(c) for _, c in preds]
    ok = [
        bool(correct(x, p, y))
        for x, (p, _), y in zip(calib_texts, preds, calib_outputs, strict=True)
    ]
    sims = [1.0] * len(confs)  # no distance part
    sel = select_thresholds(confs, sims, ok, target, alpha=0.0)
    figs = cover_figures(confs, sims, ok, sel["t_prob"], -1.0)
    meta.update(
        t_prob=sel["t_prob"],
        target_cover_k_score=r6(target),
        calibration={**dict(calibration or {}), **figs, "selection": "point_estimate"},
    )
    return meta


def evaluate_confidence(
    gate: Gate, confidences: Sequence[float], correct: Sequence[bool]
) -> dict[str, Any]:
    """A confidence gate on the holdout: coverage, cover K-score, the risk–coverage curve."""
    sims = [1.0] * len(confidences)
    figs = cover_figures(list(confidences), sims, correct, gate.t_prob, -1.0)
    return {**figs, "curve": {"prob": risk_coverage(list(confidences), correct)}}
