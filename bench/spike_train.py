"""Measure the LoRA training stage on Banking77 (CPU).

Default: the 12 labels with the most training rows, all their training rows,
and the test rows of those labels as the holdout -- the size of the demo
compile. ``--full``: all 77 labels, full train and test sets.

    .venv/bin/python bench/spike_train.py            # 12-label subset
    .venv/bin/python bench/spike_train.py --full     # ~8-10 min on 2 cores
    .venv/bin/python bench/spike_train.py --epochs 1 --max-length 48

Banking77 comes from ../shared/data/banking77 beside the repository (or $KOLM_BANKING77);
kolm does not ship the full set, and without it this stops, saying so.

Prints seconds per stage, the accuracy (= K-score with an exact-match verifier)
with its 95% Wilson interval, and the adapter digest.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _shared import BANKING77, require

from kolm_compile._train import TrainConfig, train_classifier
from kolm_compile.kscore import kscore
from kolm_compile.student import Student, embed_texts

DATA = Path(os.environ.get("KOLM_BANKING77", BANKING77))


def read(path: Path) -> list[tuple[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return [(r["text"], r["category"]) for r in csv.DictReader(f)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--full", action="store_true", help="all 77 labels")
    ap.add_argument("--labels", type=int, default=12, help="number of labels (ignored with --full)")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--max-length", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None, help="adapter dir (default: a temp dir)")
    args = ap.parse_args()

    require("spike_train.py", DATA)
    stages: dict[str, float] = {}
    t = time.perf_counter()
    train, test = read(DATA / "train.csv"), read(DATA / "test.csv")
    if args.full:
        label_set = sorted({y for _, y in train})
    else:
        counts = Counter(y for _, y in train)
        # most rows first; ties by name so the subset is the same everywhere
        label_set = sorted(sorted(counts, key=lambda y: (-counts[y], y))[: args.labels])
    keep = set(label_set)
    train = [(x, y) for x, y in train if y in keep]
    test = [(x, y) for x, y in test if y in keep]
    stages["read data"] = time.perf_counter() - t

    overrides: dict[str, int] = {"seed": args.seed}
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if args.max_length is not None:
        overrides["max_length"] = args.max_length
    if args.threads is not None:
        overrides["threads"] = args.threads
    config = TrainConfig(**{**TrainConfig().to_dict(), **overrides})
    print(f"labels={len(label_set)} train={len(train)} holdout={len(test)}")
    print(f"config={config.to_json().decode()}")

    out = args.out or Path(tempfile.mkdtemp(prefix="kolm-spike-"))
    last = [time.perf_counter()]

    def progress(step: int, total: int, loss: float) -> None:
        if step == 1 or step % 25 == 0 or step == total:
            now = time.perf_counter()
            print(f"  step {step}/{total} loss {loss:.4f} ({now - last[0]:.1f}s)", flush=True)
            last[0] = now

    t = time.perf_counter()
    result = train_classifier(
        [x for x, _ in train], [y for _, y in train], label_set, config, out, progress
    )
    stages["train"] = time.perf_counter() - t

    t = time.perf_counter()
    student = Student.load(out)
    stages["load student"] = time.perf_counter() - t

    t = time.perf_counter()
    preds = student.predict([x for x, _ in test])
    stages["predict holdout"] = time.perf_counter() - t

    t = time.perf_counter()
    student.embed([x for x, _ in test])
    stages["embed holdout (student)"] = time.perf_counter() - t

    t = time.perf_counter()
    embed_texts([x for x, _ in test])
    stages["embed holdout (base, incl. load)"] = time.perf_counter() - t

    score = kscore([p == y for (p, _), (_, y) in zip(preds, test, strict=True)])
    digest = hashlib.sha256((out / "adapter_model.safetensors").read_bytes()).hexdigest()
    for name, secs in stages.items():
        print(f"{name:34s} {secs:8.2f} s")
    print(f"{'train s/step':34s} {stages['train'] / result.steps:8.3f} s ({result.steps} steps)")
    print(
        f"accuracy {score.score:.2f}% ({score.correct}/{score.n}), "
        f"95% CI [{score.low:.2f}, {score.high:.2f}]"
    )
    print(f"adapter sha256 {digest}  dir {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
