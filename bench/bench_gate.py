"""Selective prediction on Banking77 (issue 17): the softmax threshold vs the gate.

The 12 intents of the demo spec (kolm_compile/examples/banking77-router.yaml) are in
scope; out of scope are the test rows of the other 65 intents (1,000 sampled, seed 0).
The student is trained with the demo spec's settings on the 12 intents' train rows with
their gold labels (the demo trains on teacher-voted labels; gold keeps the bench about the
gate), less a 10% calibration split (seeded) on which the gate's temperature and
thresholds are chosen for ``--target`` (``kolm_compile.gate.build``, as the compile does).

Reported, for ``softmax >= 0.5`` and for the gate:
  in-scope coverage, cover K-score (Wilson interval), overall accuracy with the escape
  hatch (escalations answered by an oracle teacher — an upper bound; with a real teacher
  multiply the escalated share by its accuracy), out-of-scope leak (share the student
  answers itself), AUROC of the score (in-scope vs out-of-scope), and the CPU cost of
  the gate per prediction (single-input calls, relative to the student's own time).

    python bench/bench_gate.py [--target 99] [--threads 2] [--json out.json]

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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", type=float, default=99.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--oos", type=int, default=1000)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=None, help="default: the demo spec's")
    ap.add_argument("--json", type=Path)
    ap.add_argument(
        "--also",
        type=lambda v: [float(x) for x in v.split(",") if x],
        default=[],
        help="more targets, e.g. 99.5,99.9 (thresholds re-chosen on the same calibration)",
    )
    a = ap.parse_args()
    data = require("bench_gate")

    import numpy as np
    import torch
    import yaml

    from kolm_compile import gate as G
    from kolm_compile._train import TrainConfig, train_classifier
    from kolm_ledger.canonical import digest_hex

    torch.set_num_threads(a.threads)
    spec = yaml.safe_load((ROOT / "kolm_compile/examples/banking77-router.yaml").read_text())
    labels: list[str] = list(spec["labels"])
    train_all, test_all = _rows(data / "train.csv"), _rows(data / "test.csv")
    train = [(t, y) for t, y in train_all if y in labels]
    ins = [(t, y) for t, y in test_all if y in labels]
    oos_pool = [(t, y) for t, y in test_all if y not in labels]
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
        f"train {len(fit)} (+{len(cal)} calibration) rows of {len(labels)} intents; "
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
        raw = [x["raw"] for x in g]
        pred = [labels[x["index"]] for x in g]
        n_in = len(ins)
        right = [p == y for p, (_, y) in zip(pred[:n_in], ins, strict=True)]

        def figures(keep: list[bool]) -> dict[str, Any]:
            kin, kout = keep[:n_in], keep[n_in:]
            m = sum(kin)
            ok = sum(1 for k, r in zip(kin, right, strict=True) if k and r)
            lo, hi = G.wilson(ok, m)
            # escalated in-scope inputs answered by an oracle teacher
            overall = (ok + (n_in - m)) / n_in
            return {
                "in_scope_coverage": round(100 * m / n_in, 2),
                "cover_k_score": round(100 * ok / m, 2) if m else None,
                "cover_interval": [round(lo, 2), round(hi, 2)],
                "overall_with_escape_hatch_oracle": round(100 * overall, 2),
                "oos_leak": round(100 * sum(kout) / len(kout), 2),
            }

        softmax = figures([r >= 0.5 for r in raw])
        softmax["auroc"] = round(auroc(raw[:n_in], raw[n_in:]), 4)
        gated = figures([x["inside"] for x in g])
        probs = [x["prob"] for x in g]
        sims = [x["sim"] for x in g]
        gated["auroc_prob"] = round(auroc(probs[:n_in], probs[n_in:]), 4)
        gated["auroc_sim"] = round(auroc(sims[:n_in], sims[n_in:]), 4)
        # a single gate score: the smaller margin over its threshold, each scaled by its
        # in-scope spread
        sp, ss = float(np.std(probs[:n_in])) or 1.0, float(np.std(sims[:n_in])) or 1.0
        comb = [
            min((p - gate.t_prob) / sp, (s - gate.t_sim) / ss)
            for p, s in zip(probs, sims, strict=True)
        ]
        gated["auroc_combined"] = round(auroc(comb[:n_in], comb[n_in:]), 4)
        # where the leak comes from: the out-of-scope intents the gate lets through most
        leak_by: dict[str, list[int]] = {}
        for x, (_, y) in zip(g[n_in:], oos, strict=True):
            leak_by.setdefault(y, [0, 0])
            leak_by[y][0] += int(x["inside"])
            leak_by[y][1] += 1
        gated["leak_by_intent_top"] = sorted(
            ([y, k, n] for y, (k, n) in leak_by.items()), key=lambda r: (-r[1], r[0])
        )[:8]
        # other targets, same student and temperature: thresholds re-chosen on calibration
        others: dict[str, Any] = {}
        if a.also:
            gc = gate.score(*student.analyse([t for t, _ in cal]))
            cc = [labels[x["index"]] == y for x, (_, y) in zip(gc, cal, strict=True)]
            for tgt in a.also:
                sel = G.select_thresholds([x["prob"] for x in gc], [x["sim"] for x in gc], cc, tgt)
                keep = [x["prob"] >= sel["t_prob"] and x["sim"] >= sel["t_sim"] for x in g]
                others[str(tgt)] = {**sel, **figures(keep)}

        # CPU cost per single-input prediction: the student alone vs the gate's extra work
        probe = texts[:: max(1, len(texts) // 200)][:200]
        student.predict(probe[:2], batch_size=1)
        t1 = time.perf_counter()
        for x in probe:
            student.predict([x], batch_size=1)
        predict_s = (time.perf_counter() - t1) / len(probe)
        t1 = time.perf_counter()
        for x in probe:
            lg, em = student.analyse([x], batch_size=1)
            gate.score(lg, em)
        gated_s = (time.perf_counter() - t1) / len(probe)
        t1 = time.perf_counter()
        one = emb[:1]
        for _ in probe:
            G.knn_similarity(one, gate.bank, gate.k)
        knn_s = (time.perf_counter() - t1) / len(probe)

    out = {
        "target_cover_k_score": a.target,
        "train_rows": len(fit),
        "calibration_rows": len(cal),
        "in_scope_rows": n_in,
        "oos_rows": len(oos),
        "train_s": round(train_s, 1),
        "threads": a.threads,
        "student_k_score_in_scope": round(100 * sum(right) / n_in, 2),
        "gate": {
            k: meta[k] for k in ("rule", "temperature", "t_prob", "t_sim", "k", "calibration")
        },
        "softmax_0.5": softmax,
        "gate_figures": gated,
        "other_targets": others,
        "cost": {
            "student_predict_ms": round(1000 * predict_s, 3),
            "student_with_gate_ms": round(1000 * gated_s, 3),
            "knn_ms": round(1000 * knn_s, 4),
            "gate_share_of_predict": round(max(0.0, gated_s - predict_s) / predict_s, 4),
            "knn_share_of_predict": round(knn_s / predict_s, 4),
            "bank_rows": gate.examples,
        },
    }
    print(json.dumps(out, indent=2))
    if a.json:
        a.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
