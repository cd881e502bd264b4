"""Recall benchmark: sqlite-vec search vs exact numpy search, and predict with/without recall.

Run::

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_recall.py            # everything
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_recall.py --sizes 10000 --no-real --no-predict
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_recall.py --quick     # smoke run (2k, 50 queries)

Prints, per corpus: index build time and size, per-query latency p50/p99 of
``RecallIndex.search`` (one query per call, k=10) next to an exact numpy brute-force
search over the same in-memory matrix, and recall@10 of the index against that exact
search. Synthetic corpora are random unit vectors (dim 384); queries are corpus vectors
plus Gaussian noise (so each has real near neighbours). The real corpus is Banking77
train texts embedded with all-MiniLM-L6-v2, queried with Banking77 test texts. Banking77
comes from ../shared/data/banking77 beside the repository (not shipped): the runs that need
it (the real corpus, predict, service) stop the bench, saying so, when it is absent; with
``--no-real --no-predict --no-service`` the synthetic runs need nothing.

The last two tables use one small student (MiniLM + LoRA, 8 Banking77 labels, trained
here) and an examples index of its training rows. First, one-text prediction in-process
with and without a retrieval step (query embedding + search + evidence + vote). Then
end to end through the inference service: a ``kolm infer serve`` subprocess serving one
signed artifact (with that index), a ``kolm ledger serve`` subprocess (SQLite) taking the
receipts (fail closed: each answer waits for the ledger's acknowledgement), and gRPC
``Predict`` calls from this process, one text per call, alternating ``recall_k=0`` and
``recall_k=10`` on the same artifact and the same inputs.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _bench_artifact import log_artifact, package
from _shared import BANKING77, require  # BANKING77: ../shared/data/banking77

from kolm_compile import recall

K = 10


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


def unit(m: np.ndarray) -> np.ndarray:
    return (m / np.linalg.norm(m, axis=1, keepdims=True)).astype(np.float32)


def run_corpus(
    name: str, vecs: np.ndarray, queries: np.ndarray, texts: list[str], tmp: Path
) -> dict[str, object]:
    chunks = [recall.Chunk.make(f"c#{i}", t, i) for i, t in enumerate(texts)]
    path = tmp / f"{name}.db"
    t0 = time.perf_counter()
    recall.build_index(chunks, vecs, path, embedding_model="bench")
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    recall.verify_index(path, recall.corpus_root([c.digest for c in chunks]))
    verify_s = time.perf_counter() - t0
    idx = recall.RecallIndex.open(path)
    idx.search(queries[:2], k=K)  # warm the page cache
    lat_idx, got = [], []
    for q in queries:
        t0 = time.perf_counter()
        (row,) = idx.search(q[None, :], k=K)
        lat_idx.append((time.perf_counter() - t0) * 1000)
        got.append([h.position for h in row])
    t0 = time.perf_counter()
    idx.corpus_tree()
    tree_s = time.perf_counter() - t0
    lat_ev = []
    for q in queries[:50]:
        (row,) = idx.search(q[None, :], k=K)
        t0 = time.perf_counter()
        recall.evidence(row, idx)
        lat_ev.append((time.perf_counter() - t0) * 1000)
    idx.close()
    lat_np, want = [], []
    for q in queries:
        t0 = time.perf_counter()
        ix, _ = recall.exact_search(vecs, q[None, :], K)
        lat_np.append((time.perf_counter() - t0) * 1000)
        want.append(ix[0].tolist())
    rec = float(np.mean([len(set(g) & set(w)) / K for g, w in zip(got, want, strict=True)]))
    return {
        "corpus": name,
        "n": len(texts),
        "build_s": build_s,
        "verify_s": verify_s,
        "tree_s": tree_s,
        "mb": path.stat().st_size / 2**20,
        "idx_p50": statistics.median(lat_idx),
        "idx_p99": pct(lat_idx, 99),
        "np_p50": statistics.median(lat_np),
        "np_p99": pct(lat_np, 99),
        "ev_p50": statistics.median(lat_ev),
        "recall": rec,
    }


def synthetic(n: int, nq: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    vecs = unit(rng.standard_normal((n, 384)).astype(np.float32))
    base = vecs[rng.choice(n, nq, replace=False)]
    return vecs, unit(base + 0.05 * rng.standard_normal(base.shape).astype(np.float32))


def banking(split: str, n: int) -> list[str]:
    with open(BANKING77 / f"{split}.csv", newline="") as f:
        return [r["text"] for r, _ in zip(csv.DictReader(f), range(n), strict=False)]


def train_small(tmp: Path) -> tuple[Any, list[str], list[tuple[str, str]], recall.IndexInfo]:
    """The student (8 Banking77 labels, 160 rows, 1 epoch) and an examples index of its
    training rows at ``tmp/model/recall/index.db``."""
    from kolm_compile._train import TrainConfig, train_classifier
    from kolm_compile.student import DEFAULT_BASE_MODEL, embed_texts

    with open(BANKING77 / "train.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    labels = sorted({r["category"] for r in rows})[:8]
    train = [(r["text"], r["category"]) for r in rows if r["category"] in labels][:160]
    cfg = TrainConfig(epochs=1, batch_size=16, max_length=32, threads=2)
    res = train_classifier(
        [t for t, _ in train], [y for _, y in train], labels, cfg, tmp / "model" / "adapter"
    )
    info = recall.index_from_examples(
        train, embed_texts, tmp / "model" / recall.INDEX_FILE, embedding_model=DEFAULT_BASE_MODEL
    )
    return res, labels, train, info


def bench_predict(nq: int, tmp: Path, trained: Any) -> dict[str, float]:
    from kolm_compile.student import Student, embed_texts

    res, _, _, info = trained
    student = res.student or Student.load(res.adapter_dir)
    path = tmp / "model" / recall.INDEX_FILE
    idx = recall.RecallIndex.open(path, expected_root=info.corpus_root)
    queries = banking("test", nq)
    student.predict(queries[:4])
    embed_texts(queries[:4])
    plain, with_recall = [], []
    for q in queries:
        t0 = time.perf_counter()
        student.predict([q])
        plain.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        student.predict([q])
        (hits,) = idx.search([q], k=K)
        recall.evidence(hits, idx)
        recall.neighbour_vote(hits)
        with_recall.append((time.perf_counter() - t0) * 1000)
    idx.close()
    return {
        "plain_p50": statistics.median(plain),
        "plain_p99": pct(plain, 99),
        "rec_p50": statistics.median(with_recall),
        "rec_p99": pct(with_recall, 99),
    }


def _serve(args: list[str], ready: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    with log.open("ab") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kolm", *args, "--insecure",
             "--listen", "127.0.0.1:0", "--ready-file", str(ready), "--log-level", "WARNING"],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )  # fmt: skip
    end = time.monotonic() + 180
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > end:
            proc.kill()
            raise SystemExit(f"{args[:2]} did not start:\n{log.read_text()[-2000:]}")
        time.sleep(0.05)
    return proc, f"127.0.0.1:{ready.read_text().strip()}"


def bench_service(nq: int, tmp: Path, trained: Any) -> dict[str, float]:
    """End-to-end ``Predict`` latency through ``kolm infer serve``, recall_k 0 vs K."""
    import grpc

    from kolm_compile.student import DEFAULT_BASE_MODEL
    from kolm_infer._pb import infer_pb2 as pb
    from kolm_infer._pb import infer_pb2_grpc as pb_grpc
    from kolm_ledger.keys import init_keys

    _, labels, train, info = trained
    keys = tmp / "keys"
    init_keys(keys)
    d = tmp / "model"
    arts = tmp / "artifacts"
    arts.mkdir()
    out = arts / "bench-recall.kolm"
    recall_m = {**info.to_manifest(), "k": K}
    digest, verifier = package(
        d, out, keys, "bench-recall", labels, DEFAULT_BASE_MODEL, recall=recall_m
    )
    ledger, target = _serve(
        ["ledger", "serve", "--db", f"sqlite:///{tmp / 'ledger.db'}",
         "--trust", str(keys / "trust.json"), "--log-key", str(keys / "log.key"),
         "--max-wait-ms", "0.5"],
        tmp / "ledger.port",
        tmp / "ledger.log",
    )  # fmt: skip
    infer = None
    try:
        log_artifact(target, out, digest, keys, DEFAULT_BASE_MODEL, len(train), verifier,
                     corpus_root=info.corpus_root, corpus_chunks=info.chunks)  # fmt: skip
        infer, itarget = _serve(
            ["infer", "serve", "--artifacts", str(arts), "--ledger", target,
             "--key", str(keys / "infer.key"), "--trust", str(keys / "trust.json")],
            tmp / "infer.port",
            tmp / "infer.log",
        )  # fmt: skip
        queries = banking("test", nq)
        plain: list[float] = []
        with_recall: list[float] = []
        sizes: dict[int, list[int]] = {0: [], K: []}
        with grpc.insecure_channel(itarget) as ch:
            stub = pb_grpc.InferenceStub(ch)
            for q in queries[:8]:  # warm-up: both paths
                for k in (0, K):
                    stub.Predict(pb.PredictRequest(artifact="bench-recall", input=q, recall_k=k))
            for i, q in enumerate(queries):
                # alternate which goes first, so drift and caching favour neither
                for k in (0, K) if i % 2 == 0 else (K, 0):
                    t0 = time.perf_counter()
                    r = stub.Predict(
                        pb.PredictRequest(artifact="bench-recall", input=q, recall_k=k)
                    )
                    ms = (time.perf_counter() - t0) * 1000
                    assert len(r.evidence) == k and r.WhichOneof("receipt") == "promise"
                    (with_recall if k else plain).append(ms)
                    sizes[k].append(len(r.envelope))
    finally:
        for proc in (infer, ledger):
            if proc is not None:
                proc.terminate()
                proc.wait(30)
    return {
        "plain_p50": statistics.median(plain),
        "plain_p99": pct(plain, 99),
        "rec_p50": statistics.median(with_recall),
        "rec_p99": pct(with_recall, 99),
        "plain_bytes": statistics.mean(sizes[0]),
        "rec_bytes": statistics.mean(sizes[K]),
        "chunks": info.chunks,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--no-real", action="store_true", help="skip the Banking77 MiniLM run")
    ap.add_argument("--no-predict", action="store_true", help="skip predict with/without recall")
    ap.add_argument(
        "--no-service", action="store_true", help="skip the end-to-end inference service run"
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke run (what `bench/run.py --quick` passes): --sizes 2000 --queries 50, "
        "2,000 Banking77 texts for the real corpus",
    )
    a = ap.parse_args()
    if a.quick:
        a.sizes, a.queries = [2000], 50
    if not (a.no_real and a.no_predict and a.no_service):
        require("bench_recall.py (or pass --no-real --no-predict --no-service)")
    rng = np.random.default_rng(0)
    print(
        f"sqlite backend: {recall.sqlite_backend().__name__} "
        f"{recall.sqlite_backend().sqlite_version}; k={K}; {a.queries} queries, one per call"
    )
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-recall-") as td:
        tmp = Path(td)
        for n in a.sizes:
            vecs, queries = synthetic(n, a.queries, rng)
            results.append(
                run_corpus(
                    f"synthetic-{n // 1000}k", vecs, queries, [f"chunk {i}" for i in range(n)], tmp
                )
            )
        if not a.no_real:
            from kolm_compile.student import embed_texts

            texts = banking("train", 2000 if a.quick else 10_000)
            t0 = time.perf_counter()
            vecs = embed_texts(texts)
            emb_s = time.perf_counter() - t0
            queries = embed_texts(banking("test", a.queries))
            r = run_corpus("banking77-minilm", vecs, queries, texts, tmp)
            r["embed_s"] = emb_s
            results.append(r)
        print()
        print(
            f"{'corpus':18} {'n':>7} {'build s':>8} {'MB':>6} {'verify s':>8} {'tree s':>6} "
            f"{'index p50/p99 ms':>17} {'numpy p50/p99 ms':>17} {'idx/np p50':>10} "
            f"{'evidence ms':>11} {'recall@10':>9}"
        )
        for r in results:
            print(
                f"{r['corpus']:18} {r['n']:>7} {r['build_s']:>8.2f} {r['mb']:>6.1f} "
                f"{r['verify_s']:>8.2f} {r['tree_s']:>6.2f} "
                f"{r['idx_p50']:>8.2f}/{r['idx_p99']:<8.2f} {r['np_p50']:>8.2f}/{r['np_p99']:<8.2f}"
                f" {r['idx_p50'] / r['np_p50']:>10.2f} {r['ev_p50']:>11.3f} {r['recall']:>9.4f}"
            )
        for r in results:
            if "embed_s" in r:
                print(
                    f"(banking77: embedding {r['n']} texts with MiniLM took {r['embed_s']:.1f} s)"
                )
        want_predict = not a.no_predict
        want_service = not a.no_service
        trained = train_small(tmp) if want_predict or want_service else None
        if want_predict:
            p = bench_predict(min(a.queries, 200), tmp, trained)
            print()
            print("in-process student predict, one text per call")
            print(f"{'path':34} {'p50 ms':>8} {'p99 ms':>8}")
            print(f"{'predict':34} {p['plain_p50']:>8.2f} {p['plain_p99']:>8.2f}")
            print(
                f"{'predict + embed + search + evidence':34} {p['rec_p50']:>8.2f} "
                f"{p['rec_p99']:>8.2f}"
            )
            print(
                f"{'ratio':34} {p['rec_p50'] / p['plain_p50']:>8.2f} "
                f"{p['rec_p99'] / p['plain_p99']:>8.2f}"
            )
        if want_service:
            s = bench_service(min(a.queries, 200), tmp, trained)
            print()
            print(
                f"end to end through kolm infer serve (gRPC Predict, receipt acknowledged by "
                f"kolm ledger serve), one text per call, {s['chunks']}-chunk examples index"
            )
            print(f"{'path':34} {'p50 ms':>8} {'p99 ms':>8} {'receipt B':>10}")
            print(
                f"{'Predict recall_k=0':34} {s['plain_p50']:>8.2f} {s['plain_p99']:>8.2f} "
                f"{s['plain_bytes']:>10.0f}"
            )
            print(
                f"{f'Predict recall_k={K}':34} {s['rec_p50']:>8.2f} {s['rec_p99']:>8.2f} "
                f"{s['rec_bytes']:>10.0f}"
            )
            print(
                f"{'ratio':34} {s['rec_p50'] / s['plain_p50']:>8.2f} "
                f"{s['rec_p99'] / s['plain_p99']:>8.2f} {s['rec_bytes'] / s['plain_bytes']:>10.2f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
