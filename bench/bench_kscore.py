"""Re-execution bench: an auditor recomputes a K-score and replays predictions
(kolm_ledger.audit.reexec), side by side with the compile's own evaluate stage in the same run.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_kscore.py [--quick] [--full]

Demo part (always): compiles the shipped 12-intent demo spec
(kolm_compile/examples/banking77-router.yaml: 480 holdout rows) into an in-process SQLite
ledger, then times

- the compile's evaluate stage (student already in memory: the holdout prediction, the
  latency probe, the determinism probe) — the reference;
- ``verify_kscore`` end to end, as ``kolm kscore verify`` runs it: the artifact check and
  unpack, loading the student, re-running every holdout input, recomputing every outcome,
  the roots and the K-score, and the environment probe (target: within 1.2x of the stage);
  its student load alone is timed next to it;
- replay of one prediction (``replay_prediction``) p50: cold (artifact check, unpack and
  student load included, as one ``kolm verify --replay`` call pays it) and warm (student
  loaded once), over real prediction receipts signed with the infer key and logged.

``--full`` adds the full Banking77 student (77 intents, 3,080 holdout rows; the data set
of bench_compile.py): it reads ``../shared/data/banking77`` (beside the repository; the
bench exits 2 saying so when it is absent: bench/_shared.py) and compiles it first (10+
minutes on 2 busy cores).
``--quick``: a 4-intent spec of the shipped subset instead of the 12-intent demo spec.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import yaml  # noqa: E402

from kolm_compile import student  # noqa: E402
from kolm_compile.pipeline import CompileJob, CompileOptions  # noqa: E402
from kolm_compile.sinks import LocalLedgerSink  # noqa: E402
from kolm_compile.spec import TaskSpec, read_table  # noqa: E402
from kolm_infer.receipts import sign_prediction  # noqa: E402
from kolm_ledger.audit import reexec  # noqa: E402
from kolm_ledger.keys import PrivateKey, TrustRoot, init_keys  # noqa: E402
from kolm_ledger.verify.receipt import verify_bundle, verify_prediction  # noqa: E402

DEMO_SPEC = ROOT / "kolm_compile" / "examples" / "banking77-router.yaml"


def compile_spec(spec: TaskSpec, work: Path, sink: LocalLedgerSink, key: PrivateKey) -> Any:
    t0 = time.perf_counter()
    res = CompileJob(
        spec, key=key, sink=sink, job_dir=work, options=CompileOptions(),
        embed=student.embed_texts,
    ).run()  # fmt: skip
    return res, time.perf_counter() - t0


def kscore_part(
    name: str, spec: TaskSpec, res: Any, sink: LocalLedgerSink, trust: TrustRoot
) -> dict[str, Any]:
    receipt = verify_bundle(sink.ledger.bundle(res.eval_index), trust)
    assert spec.data.holdout is not None
    t0 = time.perf_counter()
    chk = reexec.verify_kscore(res.artifact_path, spec.data.holdout, receipt, trust)
    total = time.perf_counter() - t0
    if not chk.ok:
        print(chk.render(), file=sys.stderr)
        raise SystemExit(f"{name}: the K-score did not re-execute")
    t0 = time.perf_counter()
    art = reexec.load_student(res.artifact_path, trust.by_role("compile"), at=datetime.now(UTC))
    load = time.perf_counter() - t0
    art.close()
    stage = res.seconds["evaluate"]
    return {
        "name": name,
        "n": chk.n,
        "k_score": chk.k_score,
        "threads": chk.environment.get("threads"),
        "evaluate_stage_s": stage,
        "reexec_s": total,
        "reexec_load_s": load,
        "ratio": total / stage,
        "environment_differences": chk.environment_differences,
    }


def replay_part(
    res: Any, spec: TaskSpec, sink: LocalLedgerSink, keys: Path, trust: TrustRoot, n: int
) -> dict[str, Any]:
    assert spec.data.holdout is not None
    d = spec.data
    texts = [t for t, _ in read_table(d.holdout, d.text_column, d.label_column, "holdout")][:n]
    art = reexec.load_student(res.artifact_path, trust.by_role("compile"), at=datetime.now(UTC))
    ik = PrivateKey.load(keys / "infer.key")
    preds = []
    try:
        answers = art.predict(texts)
        envs, salts = [], []
        for i, (t, (label, conf)) in enumerate(zip(texts, answers, strict=True)):
            env, salt, _ = sign_prediction(
                ik, artifact_digest=res.artifact_digest, input_value=t, output=label,
                verdict={"ok": True}, backend="student", reason="confident", confidence=conf,
                latency_ms=1.0, request_id=f"bench-{i}",
            )  # fmt: skip
            envs.append(env)
            salts.append(salt)
        acked = sink.append(envs)
        for t, salt, a in zip(texts, salts, acked, strict=True):
            b = sink.ledger.bundle(a.index)  # type: ignore[union-attr]
            preds.append((t, verify_prediction(b, trust, input_value=t, salt=salt)))
        cold = []
        for t, p in preds[:5]:
            t0 = time.perf_counter()
            r = reexec.replay_prediction(p, res.artifact_path, t, trust)
            cold.append(time.perf_counter() - t0)
            assert r.status == "matches", r.render()
        warm = []
        for t, p in preds:
            t0 = time.perf_counter()
            r = reexec.replay_prediction(p, art, t, trust)
            warm.append(time.perf_counter() - t0)
            assert r.status == "matches", r.render()
    finally:
        art.close()
    return {
        "cold_p50_ms": statistics.median(cold) * 1000,
        "cold_runs": len(cold),
        "warm_p50_ms": statistics.median(warm) * 1000,
        "warm_runs": len(warm),
    }


def quick_spec() -> TaskSpec:
    raw = yaml.safe_load(DEMO_SPEC.read_text())
    raw["labels"] = raw["labels"][:4]
    raw["data"]["limit_per_label"] = 24
    raw["student"].update(epochs=1, max_length=32)
    return TaskSpec.from_dict(raw, DEMO_SPEC.parent)


def full_spec(work: Path) -> TaskSpec:
    import bench_compile
    from _shared import require

    require("bench_kscore.py --full")  # exits 2 saying where the data goes

    work.mkdir(parents=True, exist_ok=True)
    raw, _, _ = bench_compile.prepare(work, quick=False)
    return TaskSpec.from_dict(raw, work)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a 4-intent spec (smoke run)")
    ap.add_argument(
        "--full", action="store_true", help="also the full Banking77 student (../shared)"
    )
    ap.add_argument("--replays", type=int, default=30, help="prediction receipts replayed")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="kolm-bench-kscore-") as tmp:
        work = Path(tmp)
        keys = work / "keys"
        trust = init_keys(keys)
        key = PrivateKey.load(keys / "compile.key")
        sink = LocalLedgerSink.open(f"sqlite:///{work / 'ledger.db'}", keys)
        full = full_spec(work / "full") if a.full else None  # fail early when data is absent
        spec = quick_spec() if a.quick else TaskSpec.load(DEMO_SPEC)
        res, compile_s = compile_spec(spec, work / "demo", sink, key)
        name = "4-intent quick spec" if a.quick else "12-intent demo spec"
        rows.append(kscore_part(name, spec, res, sink, trust))
        replay = replay_part(res, spec, sink, keys, trust, a.replays)
        if full is not None:
            fres, _ = compile_spec(full, work / "full-job", sink, key)
            rows.append(kscore_part("full Banking77 (77 intents)", full, fres, sink, trust))
        sink.close()
    print(f"\nkolm kscore bench: re-execution vs the compile's evaluate stage (same run); "
          f"compile of the {rows[0]['name']}: {compile_s:.1f} s")  # fmt: skip
    print(f"{'artifact':<30} {'n':>5} {'K-score':>8} {'evaluate s':>11} {'re-exec s':>10} "
          f"{'(load s)':>9} {'ratio':>6}")  # fmt: skip
    for r in rows:
        print(f"{r['name']:<30} {r['n']:>5} {r['k_score']:>8.2f} {r['evaluate_stage_s']:>11.2f} "
              f"{r['reexec_s']:>10.2f} {r['reexec_load_s']:>9.2f} {r['ratio']:>6.2f}")  # fmt: skip
    print(f"replay of one prediction ({rows[0]['name']}): p50 cold {replay['cold_p50_ms']:.0f} ms "
          f"({replay['cold_runs']} runs, artifact check + unpack + load included), "
          f"warm {replay['warm_p50_ms']:.1f} ms ({replay['warm_runs']} runs)")  # fmt: skip
    if not a.full:
        print("full Banking77 student (3,080 rows): not run (give --full; ../shared data)")
    print(json.dumps({"kscore": rows, "replay": replay}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
