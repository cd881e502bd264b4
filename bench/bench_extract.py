"""Extraction compile benchmark (``bench/bench_compile.py --task extract``): span tagger and
generative student, distilled and gold-trained, side by side in one run.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_compile.py --task extract [--quick]
        [--per-intent 400] [--lm-per-intent 100] [--lm-epochs 2] [--lm-test-per-intent 20]
        [--vote per_field|exact] [--skip-lm]

Data: SNIPS (five intents, CC0) from ../shared/data/snips beside the repository (not
shipped; the package has a small subset for the demo). At most ``--per-intent`` training
utterances per intent (400: 2,000 in all) are the teacher's unlabeled inputs; the 500 test
rows are the holdout. The ``simulated`` structured teacher answers the gold frame with
probability 0.8 per sample, else a plausible corruption; k = 5, min agreement 3, votes
field by field (``--vote per_field``, the default: each field's majority, the assembled
object verified again) or on the whole canonical JSON (``--vote exact``); the json_schema
verifier with ``grounded: marked``.

One compile (kolm_compile.pipeline, in-process SQLite ledger) with the span tagger
(``student.kind: auto`` picks it for this schema); then a second compile with
``student.kind: causal_lm`` (SmolLM2-135M-Instruct) whose unlabeled inputs are the first
``--lm-per-intent`` inputs per intent the first job accepted (CPU time: training runs at
about 4 examples/s), with the same teacher and votes; its holdout is the first
``--lm-test-per-intent`` test rows of each intent (20: 100 rows; greedy decoding of a frame
takes 4-13 s on 2 cores, so the 500 rows would take about an hour per generative student;
0 keeps all 500), and the span tagger is scored on the same rows beside it. Beside each,
the same student trained on the **gold** frames of every input the teacher was asked about (for the
generative student, the same per-intent cap drawn from all inputs, accepted or not): what a
perfect teacher would have given, so the gap is the cost of distillation — the inputs whose
votes were rejected and any wrong voted label. (Trained on the gold frames of the accepted
inputs only, a student would be byte-identical to the distilled one whenever the votes are
100% precise: training is deterministic.) Printed: whole-frame exact match (the
K-score, Wilson 95%), slot F1 (micro over /slots/*), intent accuracy, schema-valid share,
the teacher's single-sample and vote scores, compile seconds per stage, and the
single-input CPU latency p50 per student.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
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

from kolm_compile import kscore as ks  # noqa: E402
from kolm_compile.pipeline import STAGES, CompileJob, CompileOptions  # noqa: E402
from kolm_compile.sinks import LocalLedgerSink  # noqa: E402
from kolm_compile.spec import TaskSpec  # noqa: E402
from kolm_compile.structured import canonical, field_scores  # noqa: E402
from kolm_ledger.keys import PrivateKey, init_keys  # noqa: E402

SNIPS = ROOT.parent / "shared" / "data" / "snips"
SCHEMA = ROOT / "kolm_compile" / "data" / "snips" / "schema.json"


def require() -> None:
    missing = [f for f in ("train.jsonl", "test.jsonl") if not (SNIPS / f).is_file()]
    if missing:
        print(
            f"bench_compile.py --task extract: reads SNIPS from {SNIPS} (../shared/data/snips "
            f"beside the repository; kolm ships only a subset) and {', '.join(missing)} "
            "is missing. `make test` does not need it.",
            file=sys.stderr,
        )
        raise SystemExit(2)


def rows_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return path


def prepare(
    work: Path, per_intent: int, test_n: int | None, vote: str = "per_field"
) -> dict[str, Any]:
    train = rows_of(SNIPS / "train.jsonl")
    test = rows_of(SNIPS / "test.jsonl")
    rng = random.Random(7)
    rng.shuffle(train)
    per: Counter[str] = Counter()
    picked = []
    for r in train:
        if per[r["intent"]] < per_intent:
            per[r["intent"]] += 1
            picked.append({"text": r["text"], "output": r["output"]})
    if test_n is not None:
        tper: Counter[str] = Counter()
        test = [r for r in test if (tper.update([r["intent"]]) or tper[r["intent"]] <= test_n)]
    write_jsonl(work / "unlabeled.jsonl", picked)
    write_jsonl(work / "holdout.jsonl", [{"text": r["text"], "output": r["output"]} for r in test])
    write_jsonl(
        work / "gold.jsonl", picked + [{"text": r["text"], "output": r["output"]} for r in test]
    )
    (work / "schema.json").write_text(SCHEMA.read_text())
    return {
        "name": "snips-extract-bench",
        "task": "extract",
        "instructions": (
            "Read the user's request to a voice assistant and return its frame as one JSON "
            "object: the intent and the slots, each slot value copied verbatim from the request."
        ),
        "output_schema": "schema.json",
        "verifier": {"name": "json_schema", "params": {"grounded": "marked"}},
        "teacher": {
            "backend": "simulated",
            "model": "simulated-frontier",
            "dataset": "gold.jsonl",
            "accuracy": 0.8,
            "k": 5,
            "min_agreement": 3,
            "vote": vote,
        },
        "student": {"kind": "auto", "epochs": 10, "batch_size": 32, "max_length": 64},
        "data": {
            "unlabeled": "unlabeled.jsonl",
            "holdout": "holdout.jsonl",
            "text_column": "text",
            "output_column": "output",
        },
        "budget": {"price_per_1k_input_tokens": 0.0025, "price_per_1k_output_tokens": 0.01},
        "seed": 7,
    }


def frame_scores(golds: list[str], preds: list[str]) -> dict[str, float]:
    """Exact match, slot F1 (micro over /slots/*) and intent accuracy, in percent."""
    g = [json.loads(x) for x in golds]
    p: list[Any] = []
    for x in preds:
        try:
            v = json.loads(x)
            p.append(v if isinstance(v, dict) else None)
        except ValueError:
            p.append(None)
    _, slot = field_scores(g, p, prefix="/slots/")
    intent = sum(
        1 for a, b in zip(g, p, strict=True) if b is not None and a.get("intent") == b.get("intent")
    )
    exact = sum(1 for a, b in zip(golds, preds, strict=True) if a == b)
    n = len(golds)
    return {
        "exact": round(100 * exact / n, 2),
        "slot_f1": round(100 * slot.f1, 2),
        "intent_acc": round(100 * intent / n, 2),
    }


def outcomes(job_dir: Path) -> list[str]:
    """The evaluated outputs of the job's last evaluate stage, in holdout order."""
    ev = json.loads((job_dir / "stages" / "evaluate.json").read_text())
    return [json.loads(line)["output"] for line in ev["outcomes"]]


def latency_p50(student: Any, texts: list[str], n: int = 40) -> float:
    student.predict(texts[:2], batch_size=1)
    times = []
    for x in texts[:n]:
        t0 = time.perf_counter()
        student.predict([x], batch_size=1)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def train_on(
    kind: str, spec: TaskSpec, texts: list[str], outs: list[str], out: Path, threads: int
) -> Any:
    """The same student kind trained directly on (texts, outs): the gold baseline."""
    from kolm_compile._train import TrainConfig

    cfg = spec.student.train_config(spec.seed)
    cfg = TrainConfig.from_dict({**cfg.to_dict(), "threads": threads})
    if kind == "span_tagger":
        from kolm_compile._train_tagger import train_span_tagger
        from kolm_compile.fields import thaw

        return train_span_tagger(texts, outs, thaw(spec.output_schema), cfg, out)
    from kolm_compile._train_lm import train_causal_lm

    return train_causal_lm(texts, outs, cfg, out, instructions=spec.instructions)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench_compile.py --task extract")
    ap.add_argument("--quick", action="store_true", help="smoke run: 40 per intent, 20 test each")
    ap.add_argument("--per-intent", type=int, default=400)
    ap.add_argument("--lm-per-intent", type=int, default=100)
    ap.add_argument("--lm-epochs", type=int, default=2)
    ap.add_argument("--lm-test-per-intent", type=int, default=20, help="0: all 500 rows")
    ap.add_argument("--vote", choices=("per_field", "exact"), default="per_field")
    ap.add_argument("--skip-lm", action="store_true", help="span tagger only")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lm-threads", type=int, default=1)
    a = ap.parse_args(argv)
    require()
    from kolm_compile.student import Student, torch_state

    per_intent = 40 if a.quick else a.per_intent
    lm_per = 10 if a.quick else a.lm_per_intent
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="kolm-bench-extract-") as tmp:
        work = Path(tmp)
        raw = prepare(work, per_intent, 20 if a.quick else None, a.vote)
        keys = work / "keys"
        init_keys(keys)
        key = PrivateKey.load(keys / "compile.key")
        sink = LocalLedgerSink.open(f"sqlite:///{work / 'ledger.db'}", keys)
        vote_counters: dict[str, Any] = {}

        def on_event(e: Any) -> None:
            if e.stage == "vote" and e.state == "finished":
                vote_counters.update(e.counters)

        opts = CompileOptions(threads=a.threads)
        spec = TaskSpec.from_dict(raw, work)
        holdout = rows_of(work / "holdout.jsonl")
        h_texts = [r["text"] for r in holdout]
        h_gold = [canonical(r["output"]) for r in holdout]
        t0 = time.perf_counter()
        res = CompileJob(
            spec, key=key, sink=sink, job_dir=work / "job", options=opts, on_event=on_event
        ).run()
        compile_s = time.perf_counter() - t0
        tagger_seconds = dict(res.seconds)
        results["tagger"] = frame_scores(h_gold, outcomes(work / "job"))
        results["tagger"]["k_score"] = res.k_score.to_dict()
        results["tagger"]["schema_valid"] = (res.task_metrics or {}).get("schema_valid")
        student = Student.load(work / "job" / "build" / spec.name / "adapter", threads=a.threads)
        with torch_state(a.threads, False):
            results["tagger"]["p50_ms"] = round(latency_p50(student, h_texts), 2)
        del student
        # the acknowledged labels (ledger order); the gold baseline: every input's gold frame
        signed = json.loads((work / "job" / "stages" / "sign.json").read_text())
        logged = [(r[2], r[3]) for r in signed["logged"]]
        gold_of = {r["text"]: canonical(r["output"]) for r in rows_of(work / "gold.jsonl")}
        t0 = time.perf_counter()
        with torch_state(a.threads, False):
            all_texts = [r["text"] for r in rows_of(work / "unlabeled.jsonl")]
            tr = train_on("span_tagger", spec, all_texts, [gold_of[t] for t in all_texts],
                          work / "gold-tagger", a.threads)  # fmt: skip
            st = tr.student or Student.load(work / "gold-tagger", threads=a.threads)
            preds = [p for p, _ in st.predict(h_texts, batch_size=64)]
        results["tagger_gold"] = frame_scores(h_gold, preds)
        results["tagger_gold"]["seconds"] = round(time.perf_counter() - t0, 1)
        results["tagger_gold"]["labels"] = len(all_texts)
        lm_seconds: dict[str, float] = {}
        if not a.skip_lm:
            # a second job: the generative student on a per-intent cap of the inputs the
            # first job accepted (CPU time), same teacher, votes and holdout
            lm_raw = json.loads(json.dumps(raw))
            # SNIPS prompts reach ~65 tokens, frames with EOS ~79 (bench/spike_lm.py)
            lm_raw["student"] = {"kind": "causal_lm", "epochs": a.lm_epochs, "max_length": 96,
                                 "max_new_tokens": 96, "batch_size": 4,
                                 "learning_rate": 3.0e-3}  # fmt: skip
            lm_raw["data"]["unlabeled"] = "unlabeled-lm.jsonl"
            # the generative students' holdout: the first rows of each intent (time)
            lm_cap = 2 if a.quick else a.lm_test_per_intent
            tcount: Counter[str] = Counter()
            lm_idx = []
            for i, r in enumerate(holdout):
                intent = r["output"]["intent"]
                if lm_cap <= 0 or tcount[intent] < lm_cap:
                    tcount[intent] += 1
                    lm_idx.append(i)
            write_jsonl(work / "holdout-lm.jsonl", [holdout[i] for i in lm_idx])
            lm_raw["data"]["holdout"] = "holdout-lm.jsonl"
            lm_texts = [h_texts[i] for i in lm_idx]
            lm_gold = [h_gold[i] for i in lm_idx]
            tagger_out = outcomes(work / "job")
            results["tagger_on_lm_rows"] = frame_scores(lm_gold, [tagger_out[i] for i in lm_idx])
            results["tagger_on_lm_rows"]["rows"] = len(lm_idx)
            counts: Counter[str] = Counter()
            lm_rows = []
            for t, y in logged:
                intent = json.loads(y)["intent"]
                if counts[intent] < lm_per:
                    counts[intent] += 1
                    lm_rows.append({"text": t})
            write_jsonl(work / "unlabeled-lm.jsonl", lm_rows)
            lm_spec = TaskSpec.from_dict(lm_raw, work)
            t0 = time.perf_counter()
            # one torch thread: a decoding step of a 135M model is faster on one core
            # than split over two busy ones (measured: bench/spike_lm.py)
            lm_res = CompileJob(
                lm_spec, key=key, sink=sink, job_dir=work / "job-lm",
                options=CompileOptions(threads=a.lm_threads),
            ).run()  # fmt: skip
            lm_s = time.perf_counter() - t0
            lm_seconds = dict(lm_res.seconds)
            results["lm"] = frame_scores(lm_gold, outcomes(work / "job-lm"))
            results["lm"]["k_score"] = lm_res.k_score.to_dict()
            results["lm"]["schema_valid"] = (lm_res.task_metrics or {}).get("schema_valid")
            results["lm"]["labels"] = len(lm_rows)
            results["lm"]["compile_s"] = round(lm_s, 1)
            student = Student.load(
                work / "job-lm" / "build" / lm_spec.name / "adapter", threads=a.lm_threads
            )
            with torch_state(a.lm_threads, False):
                results["lm"]["p50_ms"] = round(latency_p50(student, lm_texts, n=10), 2)
            del student
            t0 = time.perf_counter()
            with torch_state(a.lm_threads, False):
                gcount: Counter[str] = Counter()
                g_texts = []
                for t in all_texts:
                    intent = json.loads(gold_of[t])["intent"]
                    if gcount[intent] < lm_per:
                        gcount[intent] += 1
                        g_texts.append(t)
                tr = train_on("causal_lm", lm_spec, g_texts, [gold_of[t] for t in g_texts],
                              work / "gold-lm", a.lm_threads)  # fmt: skip
                st = tr.student or Student.load(work / "gold-lm", threads=a.lm_threads)
                preds = [p for p, _ in st.predict(lm_texts, batch_size=8)]
            results["lm_gold"] = frame_scores(lm_gold, preds)
            results["lm_gold"]["seconds"] = round(time.perf_counter() - t0, 1)
        sink.close()

    def show(k: ks.KScore) -> str:
        return f"{k.score:6.2f} [{k.low:5.1f}, {k.high:5.1f}] n={k.n}"

    lab = res.labels
    print(
        f"\nkolm compile bench --task extract ({'quick' if a.quick else 'full'}): SNIPS, "
        f"{lab['sampled']} unlabeled inputs, {len(h_texts)} holdout rows, simulated teacher "
        f"80%, k=5, {a.vote} vote"
    )
    print(f"{'measure':<52} value")
    rows: list[tuple[str, str]] = [
        ("label precision vs gold: single sample / k-vote",
         f"{vote_counters.get('gold_precision_single', float('nan')):.4f} / "
         f"{vote_counters.get('gold_precision_vote', float('nan')):.4f}"),
        ("acceptance rate", f"{lab['acceptance_rate']:.4f}"),
        ("labels trained on (receipts acknowledged)", str(lab["logged"])),
        ("teacher exact match: single sample", show(res.teacher_single)),
        ("teacher exact match: k-vote", show(res.teacher_vote)),
    ]  # fmt: skip
    lm_n = (results.get("tagger_on_lm_rows") or {}).get("rows")
    for name in ("tagger", "tagger_gold", "tagger_on_lm_rows", "lm", "lm_gold"):
        r = results.get(name)
        if r is None:
            continue
        label = {
            "tagger": f"span tagger, distilled ({len(h_texts)} rows)",
            "tagger_gold": f"span tagger, gold frames of all {r.get('labels')} inputs",
            "tagger_on_lm_rows": f"span tagger, distilled, on the LM's {lm_n} rows",
            "lm": f"SmolLM2-135M LoRA, distilled ({r.get('labels')} labels, {lm_n} rows)",
            "lm_gold": f"SmolLM2-135M LoRA, gold frames ({lm_per} per intent, {lm_n} rows)",
        }[name]
        rows.append((f"{label}: exact / slot F1 / intent acc",
                     f"{r['exact']:.2f} / {r['slot_f1']:.2f} / {r['intent_acc']:.2f}"))  # fmt: skip
        if "p50_ms" in r:
            th = a.lm_threads if name == "lm" else a.threads
            rows.append((f"  single-input CPU latency p50 ({th} threads)", f"{r['p50_ms']:.1f} ms"))
        if r.get("schema_valid") is not None:
            rows.append(("  schema-valid outputs", f"{r['schema_valid']:.2f}%"))
    rows.append(("compile seconds, tagger job (all stages)", f"{compile_s:.1f}"))
    rows += [(f"  stage {s}", f"{tagger_seconds.get(s, 0.0):.1f}") for s in STAGES]
    if lm_seconds:
        rows += [
            (f"  LM re-run: stage {s}", f"{lm_seconds.get(s, 0.0):.1f}")
            for s in STAGES
            if lm_seconds.get(s)
        ]
    for name, value in rows:
        print(f"{name:<52} {value}")
    print(json.dumps({"results": results, "vote": vote_counters, "seconds": tagger_seconds,
                      "lm_seconds": lm_seconds}, sort_keys=True))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
