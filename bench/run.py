"""`make bench`: run every benchmark in turn (each prints its own side-by-side ratios).

.venv/bin/python bench/run.py [--quick] [--only ledger,compile,extract,infer,recall,kscore]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = {
    "ledger": "bench_ledger.py",
    "infer": "bench_infer.py",
    "recall": "bench_recall.py",
    "compile": "bench_compile.py",
    "extract": "bench_compile.py --task extract",
    "kscore": "bench_kscore.py",
}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="reduced sizes (smoke run)")
    ap.add_argument("--only", default=",".join(BENCHES), help="comma-separated subset")
    a = ap.parse_args()
    rc = 0
    for name in a.only.split(","):
        file, *args = BENCHES[name].split()
        script = HERE / file
        if not script.exists():
            print(f"== {name}: {script.name} missing", flush=True)
            rc = 1
            continue
        print(f"\n== {name} ({script.name}) {time.strftime('%Y-%m-%d %H:%M:%S')}", flush=True)
        cmd = [sys.executable, str(script), *args, *(["--quick"] if a.quick else [])]
        rc |= subprocess.call(cmd)
    return rc


if __name__ == "__main__":
    sys.exit(main())
