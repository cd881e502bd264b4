"""Selective prediction on Banking77 (issue 17): the softmax threshold vs the gate.

The 12 intents of the demo spec (kolm_compile/examples/banking77-router.yaml) are in
scope; out of scope are the test rows of the other 65 intents (1,000 sampled, seed 0).
Two variants of the spec, each trained once with the demo spec's settings:

* ``plain``: the student is trained on the 12 intents' train rows with their gold labels
  (the demo trains on teacher-voted labels; gold keeps the bench about the gate);
* ``none_label``: the spec names ``none_label: out_of_scope``, and the teacher (simulated
  by the gold labels) answers ``out_of_scope`` for train rows of the other 65 intents
  (``--oos-train`` of them sampled, seed 0), which the student learns as a 13th label.

In both, a 10% calibration split (seeded) is held out from training, on which the gate's
temperature and thresholds are chosen for ``--target`` (``kolm_compile.gate.build``, as
the compile does).

Reported per variant, for ``softmax >= 0.5`` and for the gate:
  in-scope coverage, cover K-score (Wilson interval), overall accuracy with the escape
  hatch (escalations answered by an oracle teacher — an upper bound; with a real teacher
  multiply the escalated share by its accuracy), out-of-scope leak (share of
  out-of-scope inputs the student answers itself with an in-scope label; an
  ``out_of_scope`` answer is not a leak), AUROC of the scores (in-scope vs out-of-scope),
  and the CPU cost of the gate per prediction (single-input calls, relative to the
  student's own time). Also, per variant, other rules on the same calibration split (the
  distance score: kNN, class-conditional kNN, Mahalanobis; its level alpha, or the first
  rule's joint search; ``t_prob`` by the point estimate or a Wilson lower bound) and, for
  each gate score, the lowest leak any threshold on it reaches at 90% in-scope coverage
  (chosen on the test rows themselves: an upper bound on what a rule of that score can
  do), and over every pair of thresholds on the calibrated probability and the kNN
  similarity chosen on the test rows, how many meet all three targets at once
  (``oracle_thresholds_on_test``: when none does, no rule of these scores can).

    python bench/bench_gate.py [--variant both|plain|none_label] [--target 99]
        [--threads 2] [--epochs N] [--json out.json] [--save DIR]

Needs the full Banking77 in ../shared/data/banking77 (bench/_shared.py).
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _shared import require

ROOT = Path(__file__).resolve().parents[1]
NONE = "out_of_scope"


def _rows(path: Path) -> list[tuple[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return [(r["text"], r["category"]) for r in csv.DictReader(f)]


def auroc(pos: list[float], neg: list[float]) -> float:
    """P(score of a random in-scope input > that of a random out-of-scope one), ties 1/2."""
    allv = sorted([(v, 1) for v in pos] + [(v, 0) for v in neg])
    i, rsum = 0, 0.0
    while i < len(allv):
        j = i
        while j < len(allv) and allv[j][0] == allv[i][0]:
            j += 1
        rsum += (i + 1 + j) / 2 * sum(1 for k in range(i, j) if allv[k][1] == 1)
        i = j
    n1, n0 = len(pos), len(neg)
    return (rsum - n1 * (n1 + 1) / 2) / (n1 * n0)


def leak_at_coverage(
    pos: list[float], neg: list[float], coverage: float, said_none: list[bool]
) -> float:
    """Out-of-scope share at or above the score that keeps ``coverage`` % of ``pos``
    (an input the student answers with the none label is not counted)."""
    s = sorted(pos, reverse=True)
    t = s[max(0, min(len(s) - 1, round(len(s) * coverage / 100) - 1))]
    return (
        100.0 * sum(1 for v, z in zip(neg, said_none, strict=True) if v >= t and not z) / len(neg)
    )


def other_scores(gate: Any, bank_y: Any, logits: Any, emb: Any) -> dict[str, Any]:
    """Per input: calibrated ``prob``, the predicted ``index``, the gate's kNN ``sim``, the
    class-conditional kNN ``csim`` (k-th neighbour among the predicted class's training
    rows) and ``maha`` (minus the smallest Mahalanobis distance to a class mean, shared
    covariance with 10% shrinkage) — scores tried for the gate."""
    import numpy as np

    from kolm_compile import gate as G

    probs = G.softmax(logits, gate.temperature)
    idx = probs.argmax(axis=1)
    bank = np.asarray(gate.bank, dtype=np.float64)
    e = np.asarray(emb, dtype=np.float64)
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    sims = e @ bank.T
    k = gate.k
    sim = np.sort(sims, axis=1)[:, -k]
    csim = np.empty(len(e))
    for c in np.unique(idx):
        m = idx == c
        sc = sims[m][:, bank_y == c]
        csim[m] = np.sort(sc, axis=1)[:, -min(k, sc.shape[1])]
    classes = int(bank_y.max()) + 1
    mus = np.stack([bank[bank_y == c].mean(axis=0) for c in range(classes)])
    x = bank - mus[bank_y]
    cov = x.T @ x / len(x)
    prec = np.linalg.inv(cov + 0.1 * np.trace(cov) / len(cov) * np.eye(len(cov)))
    d = np.stack(
        [np.einsum("ij,jk,ik->i", e - mus[c], prec, e - mus[c]) for c in range(classes)], axis=1
    )
    return {"index": idx, "prob": probs.max(axis=1), "sim": sim, "csim": csim, "maha": -d.min(1)}


def oracle_region(prob: Any, sim: Any, right: Any, said_none: Any, n_in: int) -> dict[str, Any]:
    """Every pair (``t_prob``, ``t_sim``) over the in-scope test rows' own distinct values
    (4 and 3 decimals), chosen on the **test rows themselves** — an upper bound on any rule
    of these two scores: how many pairs meet the issue's three targets at once (in-scope
    coverage >= 90%, cover K-score >= 98.5, out-of-scope leak <= 10%), and the best cover
    K-score among the pairs with coverage >= 90% and leak <= 10% (``best``)."""
    import numpy as np

    prob, sim = np.asarray(prob), np.asarray(sim)
    ok_in = np.asarray(right, dtype=bool)
    leaks = ~np.asarray(said_none, dtype=bool)
    feasible, best = 0, None
    for tp in np.unique(np.round(prob[:n_in], 4)):
        for ts in np.unique(np.round(sim[:n_in], 3)):
            keep = (prob >= tp) & (sim >= ts)
            m = int(keep[:n_in].sum())
            if m < 0.9 * n_in:
                continue
            leak = 100 * float((keep[n_in:] & leaks).mean())
            if leak > 10:
                continue
            ck = 100 * float((keep[:n_in] & ok_in).sum()) / m
            feasible += int(ck >= 98.5)
            if best is None or ck > best[0]:
                best = (ck, 100 * m / n_in, leak)
    region: dict[str, Any] = {"pairs_meeting_all_three": feasible, "best": None}
    if best is not None:
        region["best"] = {
            "cover_k_score": round(best[0], 2),
            "coverage": round(best[1], 2),
            "oos_leak": round(best[2], 2),
        }
    return region


def choose(
    probs: Any, dist: Any, correct: Any, target: float, alpha: float | None, z: float
) -> tuple[float, float]:
    """``(t_prob, t_sim)`` on the calibration split: ``alpha`` None is the earlier joint
    search (largest coverage over 41 distance quantiles × every probability cut), else
    the conformal distance level; ``t_prob`` meets ``target`` by the point estimate
    (``z == 0``) or by the Wilson lower bound at ``z``."""
    import numpy as np

    from kolm_compile import gate as G

    cands = (
        sorted({-1e9, *np.quantile(dist, np.linspace(0, 0.5, 41)).tolist()})
        if alpha is None
        else [G.distance_threshold(list(dist), alpha) if alpha else -1e9]
    )
    best = (0, 2.0, -1e9)
    for ts in cands:
        keep = dist >= ts
        pp, cc = probs[keep], correct[keep]
        order = np.argsort(-pp, kind="stable")
        pp, cum = pp[order], np.cumsum(cc[order])
        for j in range(len(pp) - 1, -1, -1):
            if j + 1 < len(pp) and pp[j + 1] == pp[j]:
                continue
            m = j + 1
            acc = 100 * cum[j] / m if z == 0 else G.wilson(int(cum[j]), m, z)[0]
            if acc >= target:
                if (m, ts) > (best[0], best[2]):  # ties to the higher distance cut
                    best = (m, float(pp[j]), float(ts))
                break
    if best[0] == 0 and alpha is not None:
        return 2.0, cands[0]
    return best[1], best[2]


def run_variant(variant: str, a: argparse.Namespace, data: Path) -> dict[str, Any]:
    import numpy as np
    import yaml

    from kolm_compile import gate as G
    from kolm_compile._train import TrainConfig, train_classifier
    from kolm_ledger.formats.canonical import digest_hex

    spec = yaml.safe_load((ROOT / "kolm_compile/examples/banking77-router.yaml").read_text())
    in_labels: list[str] = list(spec["labels"])
    none = variant == "none_label"
    labels = [*in_labels, NONE] if none else in_labels
    train_all, test_all = _rows(data / "train.csv"), _rows(data / "test.csv")
    train = [(t, y) for t, y in train_all if y in in_labels]
    oos_train: list[tuple[str, str]] = []
    if none:
        pool = [(t, y) for t, y in train_all if y not in in_labels]
        oos_train = random.Random(0).sample(pool, min(a.oos_train, len(pool)))
        train += [(t, NONE) for t, _ in oos_train]
    ins = [(t, y) for t, y in test_all if y in in_labels]
    oos_pool = [(t, y) for t, y in test_all if y not in in_labels]
    oos = random.Random(0).sample(oos_pool, min(a.oos, len(oos_pool)))
    digests = [digest_hex([t, y]) for t, y in train]
    cal_idx = set(G.calibration_split(digests, G.CALIBRATION_FRACTION, 0))
    fit = [r for i, r in enumerate(train) if i not in cal_idx]
    cal = [r for i, r in enumerate(train) if i in cal_idx]
    st = spec["student"]
    cfg = TrainConfig(
        lora_r=st["lora_r"],
        epochs=a.epochs or st["epochs"],
        learning_rate=st["learning_rate"],
        max_length=st["max_length"],
        batch_size=st["batch_size"],
        seed=0,
        threads=a.threads,
    )
    print(
        f"[{variant}] train {len(fit)} (+{len(cal)} calibration) rows of {len(labels)} labels"
        f"{f' ({len(oos_train)} labelled {NONE})' if none else ''}; "
        f"in-scope test {len(ins)}, out-of-scope test {len(oos)}",
        flush=True,
    )
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        res = train_classifier(
            [t for t, _ in fit], [y for _, y in fit], labels, cfg, Path(tmp) / "adapter"
        )
        train_s = time.perf_counter() - t0
        student = res.student
        assert student is not None
        meta = G.build(
            student,
            [t for t, _ in fit],
            [digest_hex([t, y]) for t, y in fit],
            [t for t, _ in cal],
            [y for _, y in cal],
            target=a.target,
            k=a.k,
            confidence_threshold=0.5,
            calibration={"fraction": G.CALIBRATION_FRACTION, "seed": 0},
            directory=Path(tmp) / "model",
        )
        gate = G.Gate.load(Path(tmp) / "model", meta, "bench")
        texts = [t for t, _ in ins] + [t for t, _ in oos]
        logits, emb = student.analyse(texts)
        g = gate.score(logits, emb)
        cal_logits, cal_emb = student.analyse([t for t, _ in cal])
        if a.save:
            a.save.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(
                a.save / f"{variant}.npz",
                labels=np.array(labels),
                bank=gate.bank,
                bank_y=np.array([labels.index(y) for _, y in fit]),
                cal_logits=cal_logits,
                cal_emb=cal_emb,
                cal_y=np.array([labels.index(y) for _, y in cal]),
                test_logits=logits,
                test_emb=emb,
                n_in=np.array(len(ins)),
                ins_y=np.array([labels.index(y) for _, y in ins]),
                oos_intent=np.array([y for _, y in oos]),
                temperature=np.array(gate.temperature),
            )
        raw = [x["raw"] for x in g]
        pred = [labels[x["index"]] for x in g]
        n_in = len(ins)
        right = [p == y for p, (_, y) in zip(pred[:n_in], ins, strict=True)]
        said_none = [p == NONE for p in pred[n_in:]]

        def figures(keep: list[bool]) -> dict[str, Any]:
            kin, kout = keep[:n_in], keep[n_in:]
            m = sum(kin)
            ok = sum(1 for k, r in zip(kin, right, strict=True) if k and r)
            lo, hi = G.wilson(ok, m)
            # escalated in-scope inputs answered by an oracle teacher
            overall = (ok + (n_in - m)) / n_in
            # a leak: an out-of-scope input the student answers with an in-scope label
            leak = sum(1 for k, z in zip(kout, said_none, strict=True) if k and not z)
            out = {
                "in_scope_coverage": round(100 * m / n_in, 2),
                "cover_k_score": round(100 * ok / m, 2) if m else None,
                "cover_interval": [round(lo, 2), round(hi, 2)],
                "overall_with_escape_hatch_oracle": round(100 * overall, 2),
                "oos_leak": round(100 * leak / len(kout), 2),
            }
            if none:
                out["oos_answered_none_label"] = round(
                    100
                    * sum(1 for k, z in zip(kout, said_none, strict=True) if k and z)
                    / len(kout),
                    2,
                )
                out["oos_escalated"] = round(100 * (len(kout) - sum(kout)) / len(kout), 2)
            return out

        softmax = figures([r >= 0.5 for r in raw])
        softmax["auroc"] = round(auroc(raw[:n_in], raw[n_in:]), 4)
        gated = figures([x["inside"] for x in g])
        cal_y = np.array([labels.index(y) for _, y in cal])
        bank_y = np.array([labels.index(y) for _, y in fit])
        sc = other_scores(gate, bank_y, logits, emb)
        cs = other_scores(gate, bank_y, cal_logits, cal_emb)
        aurocs = {
            name: round(auroc(list(v[:n_in]), list(v[n_in:])), 4)
            for name, v in sc.items()
            if name != "index"
        }
        best90 = {
            name: round(leak_at_coverage(list(v[:n_in]), list(v[n_in:]), 90.0, said_none), 2)
            for name, v in sc.items()
            if name != "index"
        }
        gated["auroc"] = aurocs
        oracle = oracle_region(sc["prob"], sc["sim"], right, said_none, n_in)
        # where the leak comes from: the out-of-scope intents the gate lets through most
        leak_by: dict[str, list[int]] = {}
        for x, (_, y), z in zip(g[n_in:], oos, said_none, strict=True):
            leak_by.setdefault(y, [0, 0])
            leak_by[y][0] += int(x["inside"] and not z)
            leak_by[y][1] += 1
        top: list[list[Any]] = [[y, k, n] for y, (k, n) in leak_by.items()]
        gated["leak_by_intent_top"] = sorted(top, key=lambda r: (-r[1], r[0]))[:8]
        # other rules, thresholds chosen on the same calibration split: the distance
        # score (kNN, class-conditional kNN, Mahalanobis), its level alpha (None: the
        # earlier joint search) and the selection of t_prob (point estimate, or the
        # Wilson lower bound at z = 1 / 1.96)
        crt = cs["index"] == cal_y
        rules: dict[str, Any] = {}
        for dist in ("sim", "csim", "maha"):
            for alpha in (None, 0.02, G.DISTANCE_ALPHA, 0.1):
                for z in (0.0, 1.0, 1.96):
                    tp, ts = choose(cs["prob"], cs[dist], crt, a.target, alpha, z)
                    keep = (sc["prob"] >= tp) & (sc[dist] >= ts)
                    rules[f"{dist}/alpha={alpha}/z={z}"] = figures(keep.tolist())
        # CPU cost per single-input prediction: the student alone vs the gate's extra work
        probe = texts[:: max(1, len(texts) // 200)][:200]
        student.predict(probe[:2], batch_size=1)
        t1 = time.perf_counter()
        for text in probe:
            student.predict([text], batch_size=1)
        predict_s = (time.perf_counter() - t1) / len(probe)
        t1 = time.perf_counter()
        for text in probe:
            lg, em = student.analyse([text], batch_size=1)
            gate.score(lg, em)
        gated_s = (time.perf_counter() - t1) / len(probe)
        t1 = time.perf_counter()
        for i in range(len(probe)):
            gate.score(logits[i : i + 1], emb[i : i + 1])
        score_s = (time.perf_counter() - t1) / len(probe)

    return {
        "variant": variant,
        "labels": len(labels),
        "train_rows": len(fit),
        "oos_train_rows": len(oos_train),
        "calibration_rows": len(cal),
        "in_scope_rows": n_in,
        "oos_rows": len(oos),
        "train_s": round(train_s, 1),
        "student_k_score_in_scope": round(100 * sum(right) / n_in, 2),
        "gate": {
            k: meta.get(k) for k in ("rule", "temperature", "t_prob", "t_sim", "k", "calibration")
        },
        "softmax_0.5": softmax,
        "gate_figures": gated,
        "best_leak_at_90_coverage_on_test": best90,
        "oracle_thresholds_on_test": oracle,
        "rules": rules,
        "cost": {
            "student_predict_ms": round(1000 * predict_s, 3),
            "student_with_gate_ms": round(1000 * gated_s, 3),
            "gate_score_ms": round(1000 * score_s, 4),
            "gate_share_of_predict": round(max(0.0, gated_s - predict_s) / predict_s, 4),
            "score_share_of_predict": round(score_s / predict_s, 4),
            "bank_rows": gate.examples,
        },
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", choices=("both", "plain", "none_label"), default="both")
    ap.add_argument("--target", type=float, default=99.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--oos", type=int, default=1000)
    ap.add_argument("--oos-train", type=int, default=1500, help="none_label: rows labelled")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=None, help="default: the demo spec's")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--save", type=Path, help="write each variant's scores here (.npz)")
    a = ap.parse_args()
    data = require("bench_gate")

    import torch

    torch.set_num_threads(a.threads)
    variants = ("plain", "none_label") if a.variant == "both" else (a.variant,)
    out: dict[str, Any] = {"target_cover_k_score": a.target, "threads": a.threads}
    for v in variants:
        out[v] = run_variant(v, a, data)
        print(json.dumps(out[v], indent=2), flush=True)
    if a.json:
        a.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
