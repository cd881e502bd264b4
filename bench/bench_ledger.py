"""Ledger benchmarks (trust core + gRPC service), ratios measured side by side in one run.

    .venv/bin/python bench/bench_ledger.py [--quick] [--append-only] [--proof-size N] [--skip-grpc]

1. ceiling: one core doing the per-entry crypto the ledger must do for real receipts
   (kolm log format v2): verify the ECDSA P-256 DSSE signature (strict DER, low-S), hash
   the v2 leaf (envelope + integration time, ``kolm_ledger.formats.leaf.entry_leaf_hash``) and the
   statement digest (``statement_digest``). Every ratio is printed twice: to that ceiling,
   and (column "verify") to the verify alone, timed inside the same paired loop — the
   ceiling of the records before 2026-12-03, so those ratios compare with them. Then the
   issue's reference loop (parse, verify, v2 leaf hash, statement digest, one durable
   insert; batch 1000, SQLite), paired with the ceiling the same way as the append rows;
2. in-process durable append (validate + sequence + fsync'd commit + checkpoint) at batch
   1, 100, 1000 on SQLite and PostgreSQL, as receipts/s and as a ratio to the ceiling.
   Each append row's ratio is to a ceiling measured paired with it, group by group of
   appends (the box is shared; load drifts within seconds). Rows run on one thread unless they say
   "verify on N threads" (``Ledger(verify_threads=N)``: cryptography verifies with the
   GIL released); those also print the N-thread verify ceiling for comparison. The
   "worker processes" row is ``Ledger(verify_processes=N)`` (parse + verify in N spawned
   processes, no shared GIL; trust checks and sequencing stay on the caller's thread).
   ``--append-only`` stops after these rows;
3. inclusion-proof generation at N entries from storage (SQLite, PostgreSQL) vs the
   PyPI package pymerkle (SqliteTree) on the same N;
4. the gRPC service (``kolm ledger serve`` subprocess) with client load from separate
   processes: unary Append and AppendStream, receipts/s and ratio to the in-process
   batched append; append → covering checkpoint latency p50/p99 at half the max rate;
   GetInclusionProof served per second at N entries.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kolm_ledger._crypto import PrivateKey  # noqa: E402
from kolm_ledger._samples import sample_statements  # noqa: E402
from kolm_ledger.formats.dsse import Envelope, pae, parse_envelope  # noqa: E402
from kolm_ledger.formats.leaf import chain_next, entry_leaf_hash, statement_digest  # noqa: E402
from kolm_ledger.formats.merkle import CompactRange, hash_leaf  # noqa: E402
from kolm_ledger.formats.receipts import sign_statement  # noqa: E402
from kolm_ledger.keys import init_keys  # noqa: E402
from kolm_ledger.log.ledger import Ledger  # noqa: E402
from kolm_ledger.storage import NewEntry, Store, StoredCheckpoint  # noqa: E402
from kolm_ledger.storage.repository import Head  # noqa: E402

PG_ADMIN = os.environ.get("KOLM_BENCH_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def pg_db(name: str) -> str:
    import sqlalchemy as sa

    eng = sa.create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        c.execute(sa.text(f'CREATE DATABASE "{name}"'))
    eng.dispose()
    return PG_ADMIN.rsplit("/", 1)[0] + "/" + name


def pg_settle() -> None:
    """``CHECKPOINT`` the server, so that the work ``CREATE DATABASE`` (or an earlier row)
    left behind does not run in the background of the next measurement."""
    import sqlalchemy as sa

    eng = sa.create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    try:
        with eng.connect() as c:
            c.execute(sa.text("CHECKPOINT"))
    except sa.exc.DBAPIError as e:  # not a superuser: measure anyway
        print(f"(CHECKPOINT refused: {e.orig}; PostgreSQL rows may carry setup work)")
    finally:
        eng.dispose()


def signed(keydir: Path, n: int, seed: int = 0) -> list[bytes]:
    key = PrivateKey.load(keydir / "infer.key")
    return [sign_statement(s, key).to_bytes() for s in sample_statements("prediction", n, seed)]


def _parsed(envs: list[bytes]) -> list[tuple[Envelope, bytes]]:
    """(envelope, canonical JSON) of each receipt, parsed before any clock runs."""
    return [parse_envelope(e) for e in envs]


def _verify(pub, part: list[tuple[Envelope, bytes]]) -> None:
    for e, _ in part:
        pub.verify(e.signatures[0].sig, pae(e.payload_type, e.payload))


def _hashes(part: list[tuple[Envelope, bytes]], now_us: int) -> None:
    """The rest of the per-entry crypto of log format v2: the leaf hash (the envelope and
    its integration time) and the statement digest (one statement, one entry)."""
    for e, canonical in part:
        entry_leaf_hash(canonical, now_us)
        statement_digest(e)


def _now_us() -> int:
    return time.time_ns() // 1000


def ceiling(keydir: Path, envs: list[bytes]) -> float:
    """One core: verify + v2 leaf hash + statement digest per receipt (pre-parsed), /s."""
    pub = PrivateKey.load(keydir / "infer.key").public_key()
    parsed = _parsed(envs)
    t = time.perf_counter()
    _verify(pub, parsed)
    _hashes(parsed, _now_us())
    return len(parsed) / (time.perf_counter() - t)


def ceiling_threads(keydir: Path, envs: list[bytes], threads: int) -> float:
    """The ceiling's work split over ``threads`` threads (the verifies release the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    pub = PrivateKey.load(keydir / "infer.key").public_key()
    parsed = _parsed(envs)
    now_us = _now_us()

    def run(part: list[tuple[Envelope, bytes]]) -> None:
        _verify(pub, part)
        _hashes(part, now_us)

    with ThreadPoolExecutor(threads) as ex:
        t = time.perf_counter()
        list(ex.map(run, [parsed[i::threads] for i in range(threads)]))
        return len(parsed) / (time.perf_counter() - t)


def paired(
    keydir: Path, envs: list[bytes], group: int, work: Callable[[int, int], object]
) -> tuple[float, float, float]:
    """(receipts/s of ``work``, paired one-core ceiling/s, paired one-core verify-only/s).

    The box is shared and its load drifts within seconds, so the ceiling is measured
    paired with the work: before each group of ``group`` receipts one thread does the
    ceiling's per-entry crypto on them (pre-parsed, as in :func:`ceiling`: verify, then
    the v2 leaf hash and statement digest, each timed), then ``work(lo, hi)`` handles
    ``envs[lo:hi]``; each side's time is summed over the groups.
    """
    pub = PrivateKey.load(keydir / "infer.key").public_key()
    parsed = _parsed(envs)
    t_work = t_ver = t_hash = 0.0
    for lo in range(0, len(envs), group):
        hi = min(lo + group, len(envs))
        part = parsed[lo:hi]
        t = time.perf_counter()
        _verify(pub, part)
        t2 = time.perf_counter()
        _hashes(part, _now_us())
        t3 = time.perf_counter()
        t_ver += t2 - t
        t_hash += t3 - t2
        work(lo, hi)
        t_work += time.perf_counter() - t3
    n = len(envs)
    return n / t_work, n / (t_ver + t_hash), n / t_ver


def inproc_append(
    url: str,
    trust,
    keydir: Path,
    envs: list[bytes],
    batch: int,
    threads: int = 1,
    pipeline: bool = True,
    processes: int = 0,
) -> tuple[float, float, float]:
    """(append receipts/s, paired ceiling/s, paired verify-only/s), groups of one batch or
    100 appends of batch 1 (:func:`paired`)."""
    ledger = Ledger(
        Store(url),
        trust,
        PrivateKey.load(keydir / "log.key"),
        verify_threads=threads,
        verify_processes=processes,
    )
    ledger.pipeline = pipeline  # False: validate the whole batch, then sequence it
    ledger.start_workers()  # spawn them before the clock runs

    def work(lo: int, hi: int) -> None:
        for i in range(lo, hi, batch):
            ledger.append(envs[i : min(i + batch, hi)])

    try:
        return paired(keydir, envs, max(batch, 100), work)
    finally:
        ledger.close()
        ledger.store.close()


def bare_loop(
    path: Path, keydir: Path, envs: list[bytes], batch: int = 1000
) -> tuple[float, float, float]:
    """(receipts/s, paired ceiling/s, paired verify-only/s) of the issue's reference loop.

    Parse the envelope, verify its signature, hash the v2 leaf (envelope + integration
    time) and the statement digest, insert one row (index, leaf hash, statement digest
    with a unique index, envelope) into a WAL SQLite table, one ``synchronous=FULL``
    commit per ``batch``: no statement parse, no trust checks, no chain, tree, subjects,
    other indexes or checkpoint. It shows how much of the gap to the ceiling is the
    ledger's own work.
    """
    import sqlite3

    pub = PrivateKey.load(keydir / "infer.key").public_key()
    c = sqlite3.connect(path, isolation_level=None)
    c.execute("PRAGMA journal_mode=WAL")
    c.execute("PRAGMA synchronous=FULL")
    c.execute("CREATE TABLE e (idx INTEGER PRIMARY KEY, leaf BLOB, digest BLOB UNIQUE, env BLOB)")

    def work(lo: int, hi: int) -> None:
        rows = []
        now_us = _now_us()
        for i in range(lo, hi):
            e, canonical = parse_envelope(envs[i])
            pub.verify(e.signatures[0].sig, pae(e.payload_type, e.payload))
            leaf = entry_leaf_hash(canonical, now_us)
            rows.append((i, leaf, statement_digest(e), canonical))
        c.execute("BEGIN")
        c.executemany("INSERT INTO e VALUES (?, ?, ?, ?)", rows)
        c.execute("COMMIT")

    try:
        return paired(keydir, envs, batch, work)
    finally:
        c.close()


def build_synthetic(url: str, n: int) -> Store:
    """N synthetic leaves with their nodes (no signatures: this measures proof reads)."""
    store = Store(url)
    tree, chain, idx = CompactRange.empty(), bytes(32), 0
    chunk = 50_000
    while idx < n:
        rows, nodes = [], []
        for _ in range(min(chunk, n - idx)):
            data = b'{"synthetic":%d}' % idx
            lh = hash_leaf(data)
            chain = chain_next(chain, lh)
            nodes.extend(tree.append(lh))
            rows.append(NewEntry(idx, lh, chain, "prediction", "0" * 64, 0, data, ()))
            idx += 1
        with store.sequencing() as tx:
            cp = StoredCheckpoint(idx, tree.root(), chain, b"synthetic\n", _now())
            tx.write(rows, nodes, cp, Head(idx, tree.copy(), chain))
    return store


def _now():
    from datetime import UTC, datetime

    return datetime.now(UTC)


def proof_rate(store: Store, n: int, count: int) -> float:
    rng = random.Random(1)
    idxs = [rng.randrange(n) for _ in range(count)]
    t = time.perf_counter()
    for i in idxs:
        store.inclusion_proof(i, n)
    return count / (time.perf_counter() - t)


def pymerkle_rate(path: Path, n: int, count: int) -> tuple[float, float]:
    from pymerkle import SqliteTree

    tree = SqliteTree(str(path))
    t = time.perf_counter()
    tree.append_entries([b'{"synthetic":%d}' % i for i in range(n)])
    build = time.perf_counter() - t
    rng = random.Random(1)
    idxs = [rng.randrange(1, n + 1) for _ in range(count)]
    t = time.perf_counter()
    for i in idxs:
        tree.prove_inclusion(i, n)
    rate = count / (time.perf_counter() - t)
    tree.close()
    return rate, build


# ---- gRPC --------------------------------------------------------------------------------


def start_server(db: str, keydir: Path, work: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    ready = work / f"ready-{time.monotonic_ns()}"
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kolm",
            "ledger",
            "serve",
            "--insecure",
            "--db",
            db,
            "--trust",
            str(keydir / "trust.json"),
            "--log-key",
            str(keydir / "log.key"),
            "--listen",
            "127.0.0.1:0",
            "--ready-file",
            str(ready),
            "--log-level",
            "WARNING",
            *extra,
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
    )
    for _ in range(600):
        if ready.exists() and ready.read_text():
            return p, f"127.0.0.1:{ready.read_text()}"
        time.sleep(0.05)
    p.kill()
    raise RuntimeError("ledger server did not start")


def _client(args: tuple[str, str, list[bytes], int, mp.Barrier]) -> tuple[int, float]:
    target, mode, envs, batch, barrier = args
    from kolm_ledger.service.client import LedgerClient

    c = LedgerClient(target, timeout=600)
    barrier.wait()
    t = time.perf_counter()
    if mode == "unary":
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(16) as ex:
            list(ex.map(c.append, envs))
    else:
        res = c.append_many(envs, batch=batch)
        bad = [r for r in res if isinstance(r, Exception)]
        if bad:
            raise RuntimeError(f"{len(bad)} appends failed: {bad[0]}")
    return len(envs), time.perf_counter() - t


def grpc_rate(target: str, mode: str, envs: list[bytes], procs: int, batch: int) -> float:
    ctx = mp.get_context("spawn")
    barrier = ctx.Manager().Barrier(procs)
    parts = [envs[i::procs] for i in range(procs)]
    t = time.perf_counter()
    with ctx.Pool(procs) as pool:
        res = pool.map(_client, [(target, mode, p, batch, barrier) for p in parts])
    wall = time.perf_counter() - t
    total = sum(n for n, _ in res)
    return total / max(max(s for _, s in res), 1e-9) if wall else 0.0


def checkpoint_latency(target: str, envs: list[bytes], rate: float) -> tuple[float, float]:
    """Send batches of 10 at ``rate`` receipts/s; time from send to acknowledged (covered)."""
    from kolm_ledger.service.client import LedgerClient

    c = LedgerClient(target)
    lat = []
    interval = 10 / rate
    nxt = time.perf_counter()
    for i in range(0, len(envs), 10):
        now = time.perf_counter()
        if now < nxt:
            time.sleep(nxt - now)
        t = time.perf_counter()
        res = c.append_many(envs[i : i + 10], batch=10)
        assert all(not isinstance(r, Exception) and r.checkpoint_size > r.index for r in res)
        lat.append(time.perf_counter() - t)
        nxt += interval
    lat.sort()
    return statistics.median(lat) * 1000, lat[int(len(lat) * 0.99) - 1] * 1000


def served_proofs(target: str, n: int, count: int) -> float:
    from concurrent.futures import ThreadPoolExecutor

    from kolm_ledger._pb import ledger_pb2 as pb
    from kolm_ledger.service.client import LedgerClient

    c = LedgerClient(target)
    rng = random.Random(2)
    idxs = [rng.randrange(n) for _ in range(count)]
    t = time.perf_counter()
    with ThreadPoolExecutor(8) as ex:
        list(
            ex.map(
                lambda i: c._call(
                    "GetInclusionProof", pb.GetInclusionProofRequest(index=i, tree_size=0)
                ),
                idxs,
            )
        )
    return count / (time.perf_counter() - t)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    ap.add_argument("--proof-size", type=int, default=None, help="entries for proof benchmarks")
    ap.add_argument("--skip-grpc", action="store_true")
    ap.add_argument("--skip-postgres", action="store_true")
    ap.add_argument(
        "--append-only", action="store_true", help="only the ceiling and the append rows"
    )
    ap.add_argument(
        "--verify-threads",
        type=int,
        default=2,
        help="extra batch-1000 rows with Ledger(verify_threads=N) (1: none)",
    )
    ap.add_argument(
        "--verify-processes",
        type=int,
        default=2,
        help="an extra batch-1000 row with Ledger(verify_processes=N) (0: none)",
    )
    a = ap.parse_args()
    q = a.quick
    n_proof = a.proof_size or (20_000 if q else 1_000_000)
    work = Path(tempfile.mkdtemp(prefix="kolm-bench-"))
    keydir = work / "keys"
    trust = init_keys(keydir)
    n = 2000 if q else 6000
    envs = signed(keydir, n)
    rows: list[tuple[str, str, str]] = []

    def row(what: str, value: str, ratio: str = "", verify: str = "") -> None:
        rows.append((what, value, ratio))
        print(f"{what:62} {value:>16} {ratio:>10} {verify:>7}", flush=True)

    print(f"{'':62} {'':>16} {'ratio':>10} {'verify':>7}")
    ceil = ceiling(keydir, envs)
    row("ceiling: verify + v2 leaf hash + statement digest, one core", f"{ceil:,.0f}/s", "1.00")
    r, c, v = bare_loop(work / "bare.db", keydir, envs)
    row(
        "reference: bare parse + verify + hashes + insert loop, SQLite",
        f"{r:,.0f}/s",
        f"{r / c:.2f}",
        f"{r / v:.2f}",
    )
    row("  (paired ceiling / verify alone, same loop)", f"{c:,.0f}/s", f"{c / v:.2f}")
    engines = [("sqlite", lambda tag: f"sqlite:///{work / f'{tag}.db'}")]
    if not a.skip_postgres:
        engines.append(("postgresql", lambda tag: pg_db(f"kolm_bench_{tag}")))
    best: dict[str, float] = {}
    nthr = a.verify_threads
    nproc = a.verify_processes
    ceil_sample = envs[:2000]
    for eng, url in engines:
        runs = [(1, 200 if q else 500, 1), (100, n, 1), (1000, n, 1)]
        if nthr > 1:
            runs.append((1000, n, -nthr))  # threads, validation not pipelined (before)
            runs.append((1000, n, nthr))
        if nproc > 0:
            runs.append((1000, n, 0))  # worker processes (verify_threads=1)
        for batch, count, threads in runs:
            pipe, threads = threads >= 0, abs(threads)
            procs = nproc if threads == 0 else 0
            db = url(f"{eng}_b{batch}_t{threads}p{procs}{'' if pipe else 'np'}")
            if eng == "postgresql":
                pg_settle()
            r, c, v = inproc_append(
                db, trust, keydir, envs[:count], batch, max(threads, 1), pipe, procs
            )
            if procs:
                what = f"  same, parse + verify in {procs} worker processes, pipelined"
            elif threads == 1:
                best[eng] = max(best.get(eng, 0), r)
                what = f"in-process durable append, {eng}, batch {batch}"
            elif not pipe:
                what = f"  same, verify on {threads} threads, then sequence (no pipeline)"
            else:
                what = f"  same, verify on {threads} threads pipelined with sequencing"
            row(what, f"{r:,.0f}/s", f"{r / c:.2f}", f"{r / v:.2f}")
            if threads > 1 and pipe:
                c0 = ceiling(keydir, ceil_sample)
                ct = ceiling_threads(keydir, ceil_sample, threads)
                row(
                    f"  ({threads}-thread ceiling {ct:,.0f}/s = {ct / c0:.2f} x one core)",
                    "",
                    f"{r / ct:.2f}",
                )
    if a.append_only:
        print(
            "\n(ratio: each append row vs a one-core ceiling (verify + v2 leaf hash + "
            "statement digest) measured paired with it, group by group; verify: vs the "
            "verify alone in the same loop, as in the records before 2026-12-03; the "
            "N-thread row's second ratio is vs the N-thread ceiling)"
        )
        shutil.rmtree(work, ignore_errors=True)
        return 0

    sq = build_synthetic(f"sqlite:///{work / 'proofs.db'}", n_proof)
    r_sq = proof_rate(sq, n_proof, 2000)
    row(f"inclusion proofs from SQLite at {n_proof:,} entries", f"{r_sq:,.0f}/s")
    pg_store = None
    if not a.skip_postgres:
        pg_store = build_synthetic(pg_db("kolm_bench_proofs"), n_proof)
        r_pg = proof_rate(pg_store, n_proof, 2000)
        row(f"inclusion proofs from PostgreSQL at {n_proof:,} entries", f"{r_pg:,.0f}/s")
    r_pm, build = pymerkle_rate(work / "pymerkle.db", n_proof, 300 if not q else 500)
    row(
        f"peer: pymerkle SqliteTree proofs at {n_proof:,} (build {build:.0f}s)",
        f"{r_pm:,.0f}/s",
        "",
    )
    row("  kolm SQLite proofs / pymerkle", "", f"{r_sq / r_pm:.1f}x")

    if not a.skip_grpc:
        genvs = signed(keydir, 4000 if q else 20_000, seed=7)
        for eng, url in engines:
            db = url(f"{eng}_grpc")
            proc, target = start_server(db, keydir, work)
            try:
                r_u = grpc_rate(target, "unary", genvs[: (1000 if q else 3000)], 2, 0)
                row(
                    f"gRPC Append (unary), {eng}, 2 client procs x 16 threads",
                    f"{r_u:,.0f}/s",
                    f"{r_u / best[eng]:.2f}",
                )
                r_s = grpc_rate(target, "stream", genvs[(1000 if q else 3000) :], 2, 500)
                row(
                    f"gRPC AppendStream (batches of 500), {eng}, 2 client procs",
                    f"{r_s:,.0f}/s",
                    f"{r_s / best[eng]:.2f}",
                )
                lat_envs = signed(keydir, 600 if q else 2000, seed=11)
                p50, p99 = checkpoint_latency(target, lat_envs, r_s / 2)
                row(
                    f"append -> covering checkpoint at {r_s / 2:,.0f}/s, {eng}",
                    f"p50 {p50:.1f} ms",
                    f"p99 {p99:.0f}",
                )
            finally:
                proc.terminate()
                proc.wait(30)
            if nproc > 0:  # the same stream load on a server validating in worker processes
                proc, target = start_server(
                    url(f"{eng}_grpc_procs"), keydir, work, "--verify-processes", str(nproc)
                )
                try:
                    r_p = grpc_rate(target, "stream", genvs[(1000 if q else 3000) :], 2, 500)
                    row(
                        f"  same, server --verify-processes {nproc}",
                        f"{r_p:,.0f}/s",
                        f"{r_p / best[eng]:.2f}",
                    )
                finally:
                    proc.terminate()
                    proc.wait(30)
        sq.close()
        proc, target = start_server(f"sqlite:///{work / 'proofs.db'}", keydir, work)
        try:
            r = served_proofs(target, n_proof, 2000)
            row(f"GetInclusionProof served at {n_proof:,} entries (SQLite)", f"{r:,.0f}/s")
        finally:
            proc.terminate()
            proc.wait(30)
    print(
        "\n(ratio: append rows vs a one-core ceiling (verify + v2 leaf hash + statement "
        "digest) measured paired with each row; verify: vs the verify alone in the same "
        "loop; gRPC rows vs the best in-process append on the same engine)"
    )
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
