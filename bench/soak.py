"""Full-size reliability campaigns (``make soak``): crash, overload, tamper and RPC fuzzing.

Runs the same campaign functions as the CI tests (tests/test_crash.py,
tests/test_audit.py, tests/test_fuzz_rpc.py, tests/test_fuzz_compile_infer.py) at full
size on 127.0.0.1, on SQLite and on PostgreSQL (a fresh database per campaign, dropped
after; ``KOLM_TEST_PG`` names the server, default 127.0.0.1:5432), prints one JSON
object per campaign, and rewrites the results block of docs/RELIABILITY.md.

    python bench/soak.py [--rounds 20] [--acks 2000] [--tamper-cases 2000]
                         [--fuzz-examples 2000] [--engines sqlite,postgresql]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_audit import tamper_campaign  # noqa: E402
from test_crash import crash_campaign, overload_campaign, pg_database  # noqa: E402

BEGIN, END = "<!-- soak:begin -->", "<!-- soak:end -->"


def _run(name: str, fn: Callable[[], dict[str, object]]) -> dict[str, object]:
    """One campaign: its result, or ``passed: false`` and the error (the others still run)."""
    t0 = time.monotonic()
    try:
        out = {"passed": True, **fn()}
    except Exception as e:  # an assertion of the campaign, or a crash of the harness
        traceback.print_exc()
        out = {
            "passed": False,
            "error": f"{type(e).__name__}: {str(e)[:500]}",
            "seconds": round(time.monotonic() - t0, 1),
        }
    print(json.dumps({name: out}, sort_keys=True), flush=True)
    return out


def _crash(engine: str, rounds: int, acks: int, witness: bool = False) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as d:
        if engine == "sqlite":
            return crash_campaign(Path(d), rounds=rounds, acks_per_round=acks, witness=witness)
        with pg_database() as db:
            return crash_campaign(
                Path(d), rounds=rounds, acks_per_round=acks, db=db, witness=witness
            )


def _tamper(engine: str, n: int, seed: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as d:
        r = tamper_campaign(engine, n, seed, Path(d))
    assert r["detected"] == n and r["named"] == n, r
    return r


def _overload(senders: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as d:
        r = overload_campaign(
            Path(d), senders=senders, messages=20, per_message=500, max_queue=5000
        )
    assert r["audit_ok"] and r["missing_accepted"] == 0, r
    return r


def _fuzz(test_file: str, examples: int) -> dict[str, object]:
    t0 = time.monotonic()
    env = {**os.environ, "KOLM_FUZZ_EXAMPLES": str(examples)}
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         str(ROOT / "tests" / test_file)],
        env=env, cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    summary = (r.stdout.strip().splitlines() or [""])[-1]
    assert r.returncode == 0, r.stdout[-3000:]
    return {
        "examples_per_property": examples,
        "summary": summary,
        "seconds": round(time.monotonic() - t0, 1),
    }


def _table(results: dict[str, dict[str, object]]) -> str:
    rows = ["| campaign | result | numbers | seconds |", "|---|---|---|---|"]
    for name, r in results.items():
        if not r.get("passed"):
            nums = str(r.get("error", ""))[:120]
        elif name.startswith("crash"):
            nums = (
                f"{r['rounds']} kill -9 rounds, {r['acknowledged']} acknowledged appends, "
                "0 missing, audit clean after every restart"
            )
            if "witness_size" in r:
                nums += f", witness at {r['witness_size']} (never forked)"
        elif name.startswith("tamper"):
            nums = (
                f"{r['cases']} mutations ({r['mutations']} kinds): {r['detected']} detected "
                f"({100 * float(str(r['detection_rate'])):.1f}%), {r['named']} named the index"
            )
        elif name == "overload":
            refused = r["refused"]
            n = sum(refused.values()) if isinstance(refused, dict) else 0
            nums = (
                f"{r['sent']} sent, {r['accepted']} accepted (0 missing), {n} refused "
                f"(RESOURCE_EXHAUSTED), RSS {r['rss_start_mib']} → {r['rss_peak_mib']} MiB"
            )
        else:
            nums = f"{r['examples_per_property']} examples/property: {r['summary']}"
        rows.append(
            f"| {name} | {'pass' if r.get('passed') else 'FAIL'} | {nums} | {r['seconds']} |"
        )
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=20, help="kill -9 rounds per engine")
    p.add_argument("--acks", type=int, default=2000, help="acknowledged appends per round")
    p.add_argument("--witness-rounds", type=int, default=5, help="kill -9 rounds with a witness")
    p.add_argument("--senders", type=int, default=16)
    p.add_argument("--tamper-cases", type=int, default=2000, help="mutations per engine")
    p.add_argument("--fuzz-examples", type=int, default=2000)
    p.add_argument("--engines", default="sqlite,postgresql")
    p.add_argument("--only", help="comma-separated campaigns: crash,overload,tamper,fuzz")
    p.add_argument("--no-docs", action="store_true", help="do not rewrite docs/RELIABILITY.md")
    a = p.parse_args()
    engines = [e for e in a.engines.split(",") if e]
    only = set(a.only.split(",")) if a.only else {"crash", "overload", "tamper", "fuzz"}
    t0 = time.monotonic()
    results: dict[str, dict[str, object]] = {}
    if "crash" in only:
        for eng in engines:
            results[f"crash/{eng}"] = _run(
                f"crash/{eng}", lambda eng=eng: _crash(eng, a.rounds, a.acks)
            )
        if a.witness_rounds:
            results["crash/sqlite+witness"] = _run(
                "crash/sqlite+witness",
                lambda: _crash("sqlite", a.witness_rounds, a.acks, witness=True),
            )
    if "overload" in only:
        results["overload"] = _run("overload", lambda: _overload(a.senders))
    if "tamper" in only:
        for seed, eng in enumerate(engines, start=3):  # CI uses seeds 1 and 2
            results[f"tamper/{eng}"] = _run(
                f"tamper/{eng}", lambda eng=eng, seed=seed: _tamper(eng, a.tamper_cases, seed)
            )
    if "fuzz" in only:
        results["fuzz/ledger"] = _run(
            "fuzz/ledger", lambda: _fuzz("test_fuzz_rpc.py", a.fuzz_examples)
        )
        results["fuzz/compile+inference"] = _run(
            "fuzz/compile+inference",
            lambda: _fuzz("test_fuzz_compile_infer.py", a.fuzz_examples),
        )
    total = round(time.monotonic() - t0, 1)
    ok = all(r.get("passed") for r in results.values())
    print(json.dumps({"passed": ok, "seconds": total}), flush=True)
    if not a.no_docs:
        doc = ROOT / "docs" / "RELIABILITY.md"
        text = doc.read_text()
        cmd = shlex.join([".venv/bin/python", "bench/soak.py", *sys.argv[1:]])
        block = (
            f"{BEGIN}\nLast `make soak`: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
            f"{platform.machine()}, {os.cpu_count()} CPUs, engines {', '.join(engines)}; "
            f"`{cmd}`, {total} s in all. {'All passed.' if ok else 'FAILED.'}\n\n"
            + _table(results)
            + "\n\n```json\n"
            + json.dumps(results, indent=2, sort_keys=True)
            + f"\n```\n{END}"
        )
        head, _, rest = text.partition(BEGIN)
        _, _, tail = rest.partition(END)
        doc.write_text(head + block + tail)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
