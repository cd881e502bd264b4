"""Compile benchmark: is a verified, voted, receipted student worth it? Side by side, one run.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_compile.py [--quick]
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_compile.py --task extract [--quick]
        (SNIPS: the span tagger and the generative student; bench/bench_extract.py)

Full run: Banking77 (all 77 intents) from ../shared/data/banking77 beside the repository
(not shipped; without it the bench stops, saying so: bench/_shared.py).
200 gold **seed pairs** are drawn from train; the other train rows are the teacher's
**unlabeled** inputs; test is the **holdout**. The ``simulated`` teacher (85% per-sample
accuracy, similar-intent mistakes, k=5, min agreement 3) labels them; the pipeline
(kolm_compile.pipeline, in-process SQLite ledger) signs every accepted label and seed
pair, trains the LoRA student on the acknowledged ones, K-scores it and packages it.

Printed side by side:

- label precision against gold: the teacher's single sample vs the k-vote; acceptance rate;
- K-score (holdout, Wilson 95%): the compiled student, the teacher (single sample, k-vote),
  the same student trained on **all gold** train labels, and on the **200 seed pairs alone**;
- seconds per stage; and the compile time of the shipped 12-intent demo spec.

``--quick`` uses 10 intents, 40 unlabeled inputs and 4 seed pairs per intent, 1 epoch.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from _shared import BANKING77, require  # noqa: E402

from kolm_compile import _train  # noqa: E402
from kolm_compile import kscore as ks  # noqa: E402
from kolm_compile.pipeline import STAGES, CompileJob, CompileOptions  # noqa: E402
from kolm_compile.sinks import LocalLedgerSink  # noqa: E402
from kolm_compile.spec import TaskSpec, read_table  # noqa: E402
from kolm_compile.student import embed_texts  # noqa: E402
from kolm_ledger.keys import PrivateKey, init_keys  # noqa: E402

DATA = BANKING77  # ../shared/data/banking77
DEMO_SPEC = ROOT / "kolm_compile" / "examples" / "banking77-router.yaml"


def read(path: Path) -> list[tuple[str, str]]:
    """Labelled rows of a Banking77 CSV, read like a spec's data files."""
    return [(t, str(y)) for t, y in read_table(path, "text", "category", str(path))]


def write(path: Path, rows: list[tuple[str, str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "category"])
        w.writerows(rows)
    return path


def prepare(work: Path, quick: bool) -> tuple[dict[str, Any], list[tuple[str, str]], list[Any]]:
    """Write the bench's data files; returns (spec dict, gold train rows, seed rows)."""
    train, test = read(DATA / "train.csv"), read(DATA / "test.csv")
    counts = Counter(y for _, y in train)
    labels = sorted(counts) if not quick else sorted(y for y, _ in counts.most_common(10))
    keep = set(labels)
    train = [r for r in train if r[1] in keep]
    test = [r for r in test if r[1] in keep]
    rng = random.Random(7)
    if quick:
        per: Counter[str] = Counter()
        picked = []
        for r in rng.sample(train, len(train)):
            if per[r[1]] < 44:
                per[r[1]] += 1
                picked.append(r)
        train = picked
        tper: Counter[str] = Counter()
        test = [r for r in test if (tper.update([r[1]]) or tper[r[1]] <= 20)]
        n_seeds = 4 * len(labels)
    else:
        n_seeds = 200
    seeds = rng.sample(train, n_seeds)
    seed_set = set(seeds)
    unlabeled = [r for r in train if r not in seed_set]
    write(work / "seeds.csv", seeds)
    write(work / "unlabeled.csv", unlabeled)
    write(work / "holdout.csv", test)
    write(work / "gold.csv", train + test)
    spec = {
        "name": "banking77-bench",
        "task": "classify",
        "instructions": "Route a bank customer's message to its intent.",
        "labels": labels,
        "verifier": {"name": "label_set", "params": {"case_sensitive": False}},
        "teacher": {
            "backend": "simulated",
            "model": "simulated-frontier",
            "dataset": "gold.csv",
            "accuracy": 0.85,
            "similarity_temperature": 0.1,
            "k": 5,
            "min_agreement": 3,
        },
        "student": {
            "epochs": 1 if quick else 2,
            "max_length": 32 if quick else 64,
            "batch_size": 32,
            "learning_rate": 3.0e-3,
        },
        "data": {
            "seed_pairs": "seeds.csv",
            "unlabeled": "unlabeled.csv",
            "holdout": "holdout.csv",
            "text_column": "text",
            "label_column": "category",
        },
        "budget": {"price_per_1k_input_tokens": 0.0025, "price_per_1k_output_tokens": 0.01},
        "seed": 7,
    }
    return spec, train, seeds


def student_kscore(spec: TaskSpec, texts: list[str], ys: list[str], out: Path) -> ks.KScore:
    """Train the same student on (texts, ys) and K-score it on the spec's holdout."""
    cfg = spec.student.train_config(spec.seed)
    tr = _train.train_classifier(texts, ys, list(spec.labels or ()), cfg, out)
    assert spec.data.holdout is not None
    hold = read(spec.data.holdout)
    preds = tr.student.predict([t for t, _ in hold])  # type: ignore[union-attr]
    return ks.kscore([p == y for (p, _), (_, y) in zip(preds, hold, strict=True)])


def fmt(k: ks.KScore) -> str:
    return f"{k.score:6.2f}  [{k.low:5.1f}, {k.high:5.1f}]  n={k.n}"


def main() -> int:
    if "--task" in sys.argv:  # --task classify (this file) | extract (bench_extract.py)
        i = sys.argv.index("--task")
        task = sys.argv[i + 1] if i + 1 < len(sys.argv) else ""
        rest = sys.argv[1:i] + sys.argv[i + 2 :]
        if task == "extract":
            from bench_extract import main as extract_main

            return extract_main(rest)
        if task != "classify":
            print(f"bench_compile.py: --task {task!r}: want classify or extract", file=sys.stderr)
            return 2
        sys.argv = [sys.argv[0], *rest]
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="reduced size (smoke run)")
    ap.add_argument("--skip-demo", action="store_true", help="skip the 12-intent demo compile")
    a = ap.parse_args()
    require("bench_compile.py", DATA)
    with tempfile.TemporaryDirectory(prefix="kolm-bench-compile-") as tmp:
        work = Path(tmp)
        raw, train, seeds = prepare(work, a.quick)
        spec = TaskSpec.from_dict(raw, work)
        keys = work / "keys"
        init_keys(keys)
        key = PrivateKey.load(keys / "compile.key")
        sink = LocalLedgerSink.open(f"sqlite:///{work / 'ledger.db'}", keys)
        vote_counters: dict[str, Any] = {}

        def on_event(e: Any) -> None:
            if e.stage == "vote" and e.state == "finished":
                vote_counters.update(e.counters)

        t0 = time.perf_counter()
        res = CompileJob(
            spec, key=key, sink=sink, job_dir=work / "job", options=CompileOptions(),
            on_event=on_event, embed=embed_texts,
        ).run()  # fmt: skip
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        gold_k = student_kscore(spec, [t for t, _ in train], [y for _, y in train], work / "gold")
        gold_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        seed_k = student_kscore(spec, [t for t, _ in seeds], [y for _, y in seeds], work / "seed")
        seed_s = time.perf_counter() - t0
        demo_s = None
        if not a.skip_demo:
            demo = TaskSpec.load(DEMO_SPEC)
            t0 = time.perf_counter()
            CompileJob(demo, key=key, sink=sink, job_dir=work / "demo", embed=embed_texts).run()
            demo_s = time.perf_counter() - t0
        sink.close()

    lab = res.labels
    print(f"\nkolm compile bench ({'quick' if a.quick else 'full'}): Banking77, "
          f"{len(raw['labels'])} intents, {lab['sampled']} unlabeled inputs, "
          f"{lab['seed_pairs']} seed pairs, simulated teacher 85%, k=5")  # fmt: skip
    print(f"{'measure':<44} value")
    rows = [
        ("label precision vs gold: single sample", f"{vote_counters['gold_precision_single']:.4f}"),
        ("label precision vs gold: k-vote (accepted)", f"{vote_counters['gold_precision_vote']:.4f}"),
        ("acceptance rate", f"{lab['acceptance_rate']:.4f}"),
        ("labels trained on (receipts acknowledged)", str(lab["logged"])),
        ("K-score student (compiled)", fmt(res.k_score)),
        ("K-score teacher, single sample", fmt(res.teacher_single)),
        ("K-score teacher, k-vote", fmt(res.teacher_vote)),
        ("K-score same student on all gold labels", fmt(gold_k)),
        (f"K-score same student on {len(seeds)} seed pairs only", fmt(seed_k)),
        ("teacher calls / estimated cost", f"{res.cost['teacher_calls']} / ${res.cost['estimated_cost']:.2f}"),
        ("per call: teacher vs student", f"${res.cost['teacher_cost_per_call']:.6f} vs "
                                        f"${res.cost['student_cost_per_call']:.8f} "
                                        f"({res.cost['student_latency_ms']:.1f} ms CPU)"),
        ("compile seconds (all stages)", f"{compile_s:.1f}"),
        *((f"  stage {s}", f"{res.seconds.get(s, 0.0):.1f}") for s in STAGES),
        ("train+eval seconds: all gold / seeds only", f"{gold_s:.1f} / {seed_s:.1f}"),
        ("12-intent demo spec compile seconds", "skipped" if demo_s is None else f"{demo_s:.1f}"),
    ]  # fmt: skip
    for name, value in rows:
        print(f"{name:<44} {value}")
    print(json.dumps({"k_score": res.k_score.to_dict(), "gold": gold_k.to_dict(),
                      "seeds": seed_k.to_dict(), "vote": vote_counters,
                      "seconds": res.seconds, "cost": res.cost}, sort_keys=True))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
