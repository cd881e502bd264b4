"""Full-size reliability campaigns (``make soak``): crash, overload and RPC fuzzing.

Runs the same campaign functions as the CI tests (tests/test_crash.py,
tests/test_fuzz_rpc.py) at full size on 127.0.0.1, prints one JSON object per campaign,
and rewrites the results block of docs/RELIABILITY.md.

    python bench/soak.py [--rounds 20] [--acks 2000] [--fuzz-examples 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_crash import crash_campaign, overload_campaign  # noqa: E402

BEGIN, END = "<!-- soak:begin -->", "<!-- soak:end -->"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=20, help="kill -9 rounds")
    p.add_argument("--acks", type=int, default=2000, help="acknowledged appends per round")
    p.add_argument("--senders", type=int, default=16)
    p.add_argument("--fuzz-examples", type=int, default=2000)
    p.add_argument("--no-docs", action="store_true", help="do not rewrite docs/RELIABILITY.md")
    a = p.parse_args()
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as d:
        results["crash"] = crash_campaign(Path(d), rounds=a.rounds, acks_per_round=a.acks)
        print(json.dumps({"crash": results["crash"]}), flush=True)
    with tempfile.TemporaryDirectory() as d:
        results["overload"] = overload_campaign(
            Path(d), senders=a.senders, messages=20, per_message=500, max_queue=5000
        )
        print(json.dumps({"overload": results["overload"]}), flush=True)
    t0 = time.monotonic()
    env = {**os.environ, "KOLM_FUZZ_EXAMPLES": str(a.fuzz_examples)}
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         str(ROOT / "tests" / "test_fuzz_rpc.py")],
        env=env, cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    results["fuzz"] = {
        "examples_per_property": a.fuzz_examples,
        "passed": r.returncode == 0,
        "summary": (r.stdout.strip().splitlines() or [""])[-1],
        "seconds": round(time.monotonic() - t0, 1),
    }
    print(json.dumps({"fuzz": results["fuzz"]}), flush=True)
    if not a.no_docs:
        doc = ROOT / "docs" / "RELIABILITY.md"
        text = doc.read_text()
        block = (
            f"{BEGIN}\nLast `make soak`: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
            f"{platform.machine()}, {os.cpu_count()} CPUs, SQLite.\n\n```json\n"
            + json.dumps(results, indent=2, sort_keys=True)
            + f"\n```\n{END}"
        )
        head, _, rest = text.partition(BEGIN)
        _, _, tail = rest.partition(END)
        doc.write_text(head + block + tail)
    ok = bool(results["fuzz"]["passed"])  # type: ignore[index]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
