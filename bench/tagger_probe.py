"""Measure the span-tagger student (``student.kind: span_tagger``) on SNIPS (CPU).

Trains on ``../shared/data/snips/train.jsonl`` (at most ``--per-intent`` rows per intent,
the first ones of each intent in file order; 400 → 2,000 rows) on the gold outputs and
scores all 500 rows of ``test.jsonl``: whole-frame exact match (canonical equality),
slot F1 (micro, ``/slots/`` fields), intent accuracy, the share of schema-valid outputs
and of slot values that are substrings of their input, the training time, and the
single-input latency (batch 1, ``--threads`` torch threads; p50 and p90 over the test
rows, after a warm-up).

    .venv/bin/python bench/tagger_probe.py                       # the tagger defaults
    .venv/bin/python bench/tagger_probe.py --epochs 6 --lr 2e-3  # override one
    .venv/bin/python bench/tagger_probe.py --data tests/data/snips --per-intent 24

SNIPS comes from ``../shared/data/snips`` beside the repository (or ``$KOLM_SNIPS``). The
schema is ``tests/data/snips/schema.json`` (the one every SNIPS copy here shares).
Prints one JSON object (and writes it to ``--json`` when given).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kolm_compile._train import TrainConfig  # noqa: E402
from kolm_compile._train_tagger import TAGGER_DEFAULTS, train_span_tagger  # noqa: E402
from kolm_compile.structured import canonical, field_scores, parse_object  # noqa: E402
from kolm_compile.tagger_student import SpanTaggerStudent  # noqa: E402

SNIPS = Path(os.environ.get("KOLM_SNIPS", ROOT.parent / "shared" / "data" / "snips"))
SCHEMA = ROOT / "tests" / "data" / "snips" / "schema.json"


def _rows(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=SNIPS)
    ap.add_argument("--per-intent", type=int, default=400)
    ap.add_argument("--epochs", type=int, default=TAGGER_DEFAULTS["epochs"])
    ap.add_argument("--lr", type=float, default=TAGGER_DEFAULTS["learning_rate"])
    ap.add_argument("--lora-r", type=int, default=TAGGER_DEFAULTS["lora_r"])
    ap.add_argument("--lora-alpha", type=int, default=TAGGER_DEFAULTS["lora_alpha"])
    ap.add_argument("--batch-size", type=int, default=TAGGER_DEFAULTS["batch_size"])
    ap.add_argument("--max-length", type=int, default=TAGGER_DEFAULTS["max_length"])
    ap.add_argument("--warmup", type=float, default=TAGGER_DEFAULTS.get("warmup_ratio", 0.0))
    ap.add_argument("--modules", default=",".join(TAGGER_DEFAULTS.get("target_modules", ())))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--latency-n", type=int, default=200, help="test rows timed at batch 1")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--keep", type=Path, help="train into this folder and keep it")
    ap.add_argument("--adapter", type=Path, help="score this trained folder (no training)")
    ap.add_argument("--errors", type=Path, help="write the frames that do not match here")
    ap.add_argument("--verbose", action="store_true", help="print training progress")
    args = ap.parse_args()

    if not (args.data / "train.jsonl").is_file():
        print(f"tagger_probe: no {args.data}/train.jsonl (../shared/data/snips)", file=sys.stderr)
        raise SystemExit(2)
    schema = json.loads(SCHEMA.read_text())
    per: dict[str, int] = defaultdict(int)
    train = []
    for r in _rows(args.data / "train.jsonl"):
        intent = r["output"]["intent"]
        if per[intent] < args.per_intent:
            per[intent] += 1
            train.append(r)
    test = _rows(args.data / "test.jsonl")

    opts = dict(
        kind="span_tagger",
        epochs=args.epochs,
        learning_rate=args.lr,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        batch_size=args.batch_size,
        max_length=args.max_length,
        warmup_ratio=args.warmup,
        seed=args.seed,
        threads=args.threads,
    )
    if args.modules:
        opts["target_modules"] = tuple(args.modules.split(","))
    cfg = TrainConfig(**opts)
    with tempfile.TemporaryDirectory() as tmp:
        out: dict[str, Any] = {"train_rows": len(train), "test_rows": len(test)}
        if args.adapter is None:
            adapter = args.keep or Path(tmp) / "adapter"
            t0 = time.perf_counter()
            res = train_span_tagger(
                [r["text"] for r in train],
                [canonical(r["output"]) for r in train],
                schema,
                cfg,
                adapter,
                progress=_progress if args.verbose else None,
            )
            out["train_seconds"] = round(time.perf_counter() - t0, 1)
            out["steps"] = res.steps
            out["final_loss"] = round(sum(res.losses[-10:]) / len(res.losses[-10:]), 4)
            out["unaligned_train_values"] = f"{res.unaligned}/{res.unaligned + res.values}"
        else:
            adapter = args.adapter
        out["config"] = json.loads((adapter / "train_config.json").read_text())
        t0 = time.perf_counter()
        student = SpanTaggerStudent.load(adapter, threads=args.threads)
        out["load_seconds"] = round(time.perf_counter() - t0, 2)

        texts = [r["text"] for r in test]
        golds = [r["output"] for r in test]
        for mode in ("argmax", "fields"):
            student._decoding = mode
            out[mode] = _score(schema, texts, golds, student.predict(texts), None)
        student._decoding = "viterbi"
        t0 = time.perf_counter()
        preds = student.predict(texts)
        out["predict_500_batched_seconds"] = round(time.perf_counter() - t0, 2)
        out.update(_score(schema, texts, golds, preds, args.errors))
        student.predict(texts[:10], batch_size=1)  # warm-up
        lat = []
        for t in texts[: args.latency_n]:
            t0 = time.perf_counter()
            student.predict([t], batch_size=1)
            lat.append((time.perf_counter() - t0) * 1000)
        out["latency_ms_p50"] = round(statistics.median(lat), 2)
        out["latency_ms_p90"] = round(statistics.quantiles(lat, n=10)[-1], 2)

    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


def _progress(step: int, total: int, loss: float) -> None:
    if step % 25 == 0 or step == total:
        print(f"step {step}/{total} loss {loss:.4f}", file=sys.stderr, flush=True)


def _score(
    schema: dict[str, Any],
    texts: list[str],
    golds: list[dict[str, Any]],
    preds: list[tuple[str, float]],
    errors: Path | None,
) -> dict[str, Any]:
    from jsonschema import Draft202012Validator

    validator = Draft202012Validator(schema)
    objs = [parse_object(p) for p, _ in preds]
    exact = [canonical(o) == canonical(g) for o, g in zip(objs, golds, strict=True)]
    intent = sum(o.get("intent") == g["intent"] for o, g in zip(objs, golds, strict=True))
    valid = sum(validator.is_valid(o) for o in objs)
    values = [
        (v, t) for o, t in zip(objs, texts, strict=True) for vs in o["slots"].values() for v in vs
    ]
    grounded = sum(v in t for v, t in values)
    _, slot = field_scores(golds, objs, prefix="/slots/")
    n = len(texts)
    if errors is not None:
        with errors.open("w", encoding="utf-8") as f:
            for t, g, o, ok, (_, conf) in zip(texts, golds, objs, exact, preds, strict=True):
                if not ok:
                    row = {"text": t, "gold": g, "pred": o, "conf": round(conf, 3)}
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return {
        "exact_match": round(100 * sum(exact) / n, 2),
        "slot_f1": round(100 * slot.f1, 2),
        "slot_precision": round(100 * slot.precision, 2),
        "slot_recall": round(100 * slot.recall, 2),
        "intent_accuracy": round(100 * intent / n, 2),
        "schema_valid": round(100 * valid / n, 2),
        "grounded_values": f"{grounded}/{len(values)}",
    }


if __name__ == "__main__":
    main()
