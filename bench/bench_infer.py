"""Inference benchmark: what do per-prediction receipts cost? Side by side, in one run.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_infer.py [--n 400] [--clients 16]

Same artifact (a tiny real student: MiniLM + LoRA on 4 Banking77 labels, trained
here), same inputs, same engine settings, two modes:

- **without receipts**: the engine alone (micro-batched student + verifier);
- **with receipts**: exactly the servicer's path minus the gRPC transport: engine,
  sign the ``prediction`` receipt (ECDSA P-256), submit it to the receipt writer and
  wait for the ledger's acknowledgement (fail closed; batched ``AppendStream`` to a
  real ``kolm ledger serve`` subprocess on SQLite).

Each at batch 1 (one client, sequential requests) and under concurrent load
(``--clients`` concurrent clients, each sequential). Prints predictions/s, p50/p99
latency and the ratios (goal: receipts add <= 0.3 ms p50, keep >= 0.95x throughput).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from kolm_ledger.canonical import digest_hex  # noqa: E402
from kolm_ledger.client import LedgerClient  # noqa: E402
from kolm_ledger.keys import PrivateKey, init_keys  # noqa: E402
from kolm_ledger.receipts import artifact_statement, sign_statement  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "banking77"  # ../shared
LABELS = ["card_arrival", "exchange_rate", "lost_or_stolen_card", "top_up_failed"]


def rows(split: str, per_label: int) -> list[tuple[str, str]]:
    seen: dict[str, int] = {}
    out = []
    with (DATA / f"{split}.csv").open(newline="") as f:
        for r in csv.DictReader(f):
            y = r["category"]
            if y in LABELS and seen.get(y, 0) < per_label:
                seen[y] = seen.get(y, 0) + 1
                out.append((r["text"], y))
    return out


def build_artifact(d: Path, keys: Path, ledger: str) -> Path:
    from kolm_compile._train import TrainConfig, train_classifier
    from kolm_compile.artifact import pack, sha256_file

    train = rows("train", 16)
    cfg = TrainConfig(epochs=4, batch_size=16, max_length=32, seed=0, threads=1)
    m = d / "bench-router"
    train_classifier([t for t, _ in train], [y for _, y in train], LABELS, cfg, m / "adapter")
    verifier = {"name": "label_set", "version": "1", "params": {"labels": LABELS}}
    task = {"name": "bench-router", "task": "classify", "labels": LABELS}
    manifest = {
        "format": "kolm/v1",
        "name": "bench-router",
        "task_type": "classify",
        "labels": LABELS,
        "base_model": {"id": cfg.base_model, "revision": "bench", "weights_digest": "0" * 64},
        "adapter": "adapter",
        "max_length": 32,
        "confidence_threshold": 0.0,
        "verifier": verifier,
        "spec_digest": digest_hex(task),
        "job_id": "bench",
        "kolm_version": "0.1.0",
    }
    (m / "manifest.json").write_text(json.dumps(manifest, sort_keys=True))
    (m / "task.json").write_text(json.dumps(task, sort_keys=True))
    (m / "verifier.json").write_text(json.dumps(verifier, sort_keys=True))
    out = d / "bench-router.kolm"
    ck = PrivateKey.load(keys / "compile.key")
    digest = pack(m, out, ck)
    st = artifact_statement(
        artifact_digest=digest,
        file_name=out.name,
        file_digest=sha256_file(out),
        base_model={"id": cfg.base_model},
        training_set_root="0" * 64,
        label_count=len(train),
        eval_receipt="0" * 64,
        k_score=0.0,
        verifier=verifier,
        compile_config_digest="0" * 64,
        kolm_version="0.1.0",
        checkpoint={"size": 0},
        extra={"job_id": "bench"},
    )
    with LedgerClient(ledger) as c:
        c.append(sign_statement(st, ck), wait=True)
    return out


def start_ledger(d: Path, keys: Path) -> tuple[subprocess.Popen[bytes], str]:
    ready = d / "ledger.port"
    proc = subprocess.Popen(
        [sys.executable, "-m", "kolm_ledger.cli", "ledger", "serve",
         "--insecure",
         "--db", f"sqlite:///{d / 'ledger.db'}", "--trust", str(keys / "trust.json"),
         "--log-key", str(keys / "log.key"), "--listen", "127.0.0.1:0",
         "--ready-file", str(ready), "--max-wait-ms", "0.5", "--log-level", "WARNING"],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    end = time.monotonic() + 60
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > end:
            raise SystemExit("ledger did not start")
        time.sleep(0.05)
    return proc, f"127.0.0.1:{ready.read_text()}"


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def run_mode(call: Any, texts: list[str], clients: int, n: int) -> dict[str, float]:
    lat: list[float] = []

    async def client(i: int) -> None:
        for j in range(n // clients):
            t0 = time.perf_counter()
            await call(texts[(i * 7 + j) % len(texts)])
            lat.append((time.perf_counter() - t0) * 1000)

    t0 = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    wall = time.perf_counter() - t0
    return {
        "rps": len(lat) / wall,
        "p50": statistics.median(lat),
        "p99": pct(lat, 0.99),
        "n": len(lat),
    }


async def bench(art: Path, keys: Path, ledger: str, args: argparse.Namespace) -> None:
    from kolm_infer._pb import infer_pb2 as pb
    from kolm_infer.engine import Engine
    from kolm_infer.receipts import ReceiptWriter
    from kolm_infer.service import InferenceServicer
    from kolm_ledger.client import AsyncLedgerClient
    from kolm_ledger.keys import TrustRoot

    trust = TrustRoot.load(keys / "trust.json")
    sync = LedgerClient(ledger)
    engine = Engine(trust, sync, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms)
    await asyncio.to_thread(engine.load, art)
    client = AsyncLedgerClient(ledger)
    writer = ReceiptWriter(client)
    await writer.start()
    servicer = InferenceServicer(engine, writer, PrivateKey.load(keys / "infer.key"))
    texts = [t for t, _ in rows("test", 50)]

    async def without(text: str) -> None:
        await engine.predict("bench-router", text)

    async def with_receipts(text: str) -> None:
        r = await servicer._predict(pb.PredictRequest(artifact="bench-router", input=text))
        assert r.WhichOneof("receipt") == "promise"

    # warm up both paths
    await run_mode(without, texts, 4, 64)
    await run_mode(with_receipts, texts, 4, 64)
    results: dict[tuple[str, int], dict[str, float]] = {}
    for clients in (1, args.clients):
        for _ in range(args.rounds):  # interleave, keep the best round of each
            for name, call in (("without", without), ("with", with_receipts)):
                r = await run_mode(call, texts, clients, args.n)
                best = results.get((name, clients))
                if best is None or r["rps"] > best["rps"]:
                    results[(name, clients)] = r
    await writer.close()
    await engine.close()
    await client.close()
    sync.close()

    print(f"\n{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs, "
          f"max_batch {args.max_batch}, max_wait_ms {args.max_wait_ms}")  # fmt: skip
    print(f"{'load':<14}{'mode':<18}{'pred/s':>9}{'p50 ms':>9}{'p99 ms':>9}")
    for clients in (1, args.clients):
        for name in ("without", "with"):
            r = results[(name, clients)]
            label = "no receipts" if name == "without" else "receipts (FC)"
            print(
                f"{clients:>3} client(s)  {label:<18}{r['rps']:9.1f}{r['p50']:9.2f}{r['p99']:9.2f}"
            )
        a, b = results[("without", clients)], results[("with", clients)]
        print(
            f"{'':14}ratio: throughput {b['rps'] / a['rps']:.3f}x, "
            f"p50 +{b['p50'] - a['p50']:.2f} ms, p99 +{b['p99'] - a['p99']:.2f} ms"
        )
    sizes = writer.batches
    print(f"receipt batches sent: {len(sizes)}, mean size {statistics.mean(sizes):.1f}, "
          f"max {max(sizes)}; student batch sizes: {dict(sorted(engine.batch_sizes.items()))}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=400, help="predictions per measurement")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=1.0)
    args = ap.parse_args()
    d = Path(tempfile.mkdtemp(prefix="kolm-bench-infer-"))
    proc = None
    try:
        keys = d / "keys"
        init_keys(keys)
        proc, ledger = start_ledger(d, keys)
        art = build_artifact(d, keys, ledger)
        asyncio.run(bench(art, keys, ledger, args))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
