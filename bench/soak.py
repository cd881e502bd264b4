"""Full-size reliability campaigns (``make soak``): crash, overload, tamper and fuzzing.

Runs the same campaign functions as the CI tests (tests/ledger/test_crash.py,
tests/ledger/test_audit.py, tests/ledger/test_fuzz_rpc.py, tests/e2e/test_fuzz_compile_infer.py,
tests/ledger/test_fuzz_append.py, tests/ledger/test_fuzz_artifact.py) at full size on 127.0.0.1, on
SQLite and on PostgreSQL (a fresh database per campaign, dropped after; ``KOLM_TEST_PG``
names the server, default 127.0.0.1:5432), prints one JSON object per campaign, and
rewrites the results block of docs/RELIABILITY.md.

Sections (``--only`` takes groups or section names, comma-separated): ``crash``,
``overload``, ``tamper`` (its issue-14 mutations counted apart: moved and swapped
integration times, duplicate statements, planted non-canonical and future-dated
receipts), ``fuzz`` = ``fuzz/ledger``, ``fuzz/compile+inference``, ``fuzz/append-strict``
(non-canonical payloads, base64, signatures and times refused at append),
``fuzz/key-lifecycle`` (a revoked key id never registered again), ``fuzz/artifact``
(random zip surgery on a signed ``.kolm``).

    python bench/soak.py [--rounds 20] [--acks 2000] [--tamper-cases 2000]
                         [--fuzz-examples 2000] [--engines sqlite,postgresql]
                         [--only tamper,fuzz/artifact]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
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


def _fuzz(
    test_file: str, examples: int, select: str | None = None, engines: list[str] | None = None
) -> dict[str, object]:
    """One fuzz test file (``select``: a pytest ``-k`` expression) with ``examples`` per
    property; PostgreSQL-parametrized tests are left out when it is not in ``engines``."""
    t0 = time.monotonic()
    env = {**os.environ, "KOLM_FUZZ_EXAMPLES": str(examples)}
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
            str(ROOT / "tests" / test_file)]  # fmt: skip
    if select:
        args += ["-k", select]
    if engines is not None and "postgresql" not in engines:
        args += ["-m", "not postgres"]
    r = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True)
    summary = (r.stdout.strip().splitlines() or [""])[-1]
    assert r.returncode == 0, r.stdout[-3000:]
    return {
        "examples_per_property": examples,
        "summary": summary,
        "seconds": round(time.monotonic() - t0, 1),
    }


#: fuzz sections: name -> (test file, -k selection, what one example is)
FUZZ_SECTIONS: dict[str, tuple[str, str | None, str]] = {
    "fuzz/ledger": ("test_fuzz_rpc.py", None, "garbage, truncated, flipped or wrongly signed"),
    "fuzz/compile+inference": (
        "test_fuzz_compile_infer.py",
        None,
        "garbage, truncated, flipped or wrong-valued requests",
    ),
    "fuzz/append-strict": (
        "test_fuzz_append.py",
        "not revoked",
        "a trusted-signed receipt with a non-canonical payload, non-canonical base64, a "
        "high-S or loose-DER signature, or a bad receipt time: refused at Append and "
        "AppendStream, nothing written",
    ),
    "fuzz/key-lifecycle": (
        "test_fuzz_append.py",
        "revoked",
        "a revoked key id's registration replayed, malleated or signed afresh (random "
        "action, role, replaces, times): never valid again",
    ),
    "fuzz/artifact": (
        "test_fuzz_artifact.py",
        None,
        "one to three random zip mutations of a signed .kolm: refused by the check and "
        "the loader, nothing on disk",
    ),
}


def _table(results: dict[str, dict[str, object]]) -> str:
    rows = ["| campaign | result | numbers | seconds | run |", "|---|---|---|---|---|"]
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
            by = r.get("by_class")
            if isinstance(by, dict) and by:
                nums += "; issue-14 classes: " + ", ".join(
                    f"{k} {v}" for k, v in sorted(by.items())
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
            if name in FUZZ_SECTIONS:
                nums += f" ({FUZZ_SECTIONS[name][2]})"
        run = f"{r.get('when', '')}: `{r['command']}`" if r.get("command") else ""
        rows.append(
            f"| {name} | {'pass' if r.get('passed') else 'FAIL'} | {nums} | {r['seconds']} "
            f"| {run} |"
        )
    return "\n".join(rows)


def _previous(text: str) -> dict[str, dict[str, object]]:
    """The results recorded in the docs block (each with the run it came from)."""
    block = text.partition(BEGIN)[2].partition(END)[0]
    m = re.search(r"```json\n(.*?)\n```", block, re.S)
    if not m:
        return {}
    try:
        old: dict[str, dict[str, object]] = json.loads(m.group(1))
    except ValueError:
        return {}
    head = re.search(r"Last `make soak`: ([^,]+), .*?; `([^`]+)`", block)
    for r in old.values():  # results written before rows carried their run
        if head and "when" not in r:
            r["when"], r["command"] = head.group(1), head.group(2)
    return old


def _write_docs(
    results: dict[str, dict[str, object]],
    engines: list[str],
    total: float,
    ok: bool,
    partial: bool,
) -> None:
    """Rewrite the results block of docs/RELIABILITY.md. A partial run (``--only``)
    replaces only its own sections; the others keep the run they came from (each row
    says when and how it was run)."""
    doc = ROOT / "docs" / "RELIABILITY.md"
    text = doc.read_text()
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    cmd = shlex.join([".venv/bin/python", "bench/soak.py", *sys.argv[1:]])
    for r in results.values():
        r["when"], r["command"] = when, cmd
    merged = {**_previous(text), **results} if partial else results
    groups = ["crash", "overload", "tamper", "fuzz"]
    merged = dict(
        sorted(
            merged.items(),
            key=lambda kv: (groups.index(g) if (g := kv[0].split("/")[0]) in groups else 9, kv[0]),
        )
    )
    block = (
        f"{BEGIN}\nLast run: {when}, {platform.machine()}, {os.cpu_count()} CPUs, engines "
        f"{', '.join(engines)}; `{cmd}`, {total} s in all"
        f"{' (a partial run: the other rows are from earlier runs, as dated)' if partial else ''}"
        f". {'All passed.' if ok else 'FAILED.'}\n\n"
        + _table(merged)
        + "\n\n```json\n"
        + json.dumps(merged, indent=2, sort_keys=True)
        + f"\n```\n{END}"
    )
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    doc.write_text(head + block + tail)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=20, help="kill -9 rounds per engine")
    p.add_argument("--acks", type=int, default=2000, help="acknowledged appends per round")
    p.add_argument("--witness-rounds", type=int, default=5, help="kill -9 rounds with a witness")
    p.add_argument("--senders", type=int, default=16)
    p.add_argument("--tamper-cases", type=int, default=2000, help="mutations per engine")
    p.add_argument("--fuzz-examples", type=int, default=2000)
    p.add_argument("--engines", default="sqlite,postgresql")
    p.add_argument(
        "--only",
        help="comma-separated groups (crash, overload, tamper, fuzz) or sections "
        "(e.g. fuzz/artifact, tamper/sqlite)",
    )
    p.add_argument("--no-docs", action="store_true", help="do not rewrite docs/RELIABILITY.md")
    a = p.parse_args()
    engines = [e for e in a.engines.split(",") if e]
    only = set(a.only.split(",")) if a.only else {"crash", "overload", "tamper", "fuzz"}

    def wanted(section: str) -> bool:
        return section in only or section.split("/", 1)[0] in only

    t0 = time.monotonic()
    results: dict[str, dict[str, object]] = {}
    for eng in engines:
        if wanted(f"crash/{eng}"):
            results[f"crash/{eng}"] = _run(
                f"crash/{eng}", lambda eng=eng: _crash(eng, a.rounds, a.acks)
            )
    if wanted("crash/sqlite+witness") and a.witness_rounds:
        results["crash/sqlite+witness"] = _run(
            "crash/sqlite+witness",
            lambda: _crash("sqlite", a.witness_rounds, a.acks, witness=True),
        )
    if wanted("overload"):
        results["overload"] = _run("overload", lambda: _overload(a.senders))
    for seed, eng in enumerate(engines, start=3):  # CI uses seeds 1 and 2
        if wanted(f"tamper/{eng}"):
            results[f"tamper/{eng}"] = _run(
                f"tamper/{eng}", lambda eng=eng, seed=seed: _tamper(eng, a.tamper_cases, seed)
            )
    for name, (test_file, select, _) in FUZZ_SECTIONS.items():
        if wanted(name):
            results[name] = _run(
                name,
                lambda f=test_file, k=select: _fuzz(f, a.fuzz_examples, k, engines),
            )
    total = round(time.monotonic() - t0, 1)
    ok = all(r.get("passed") for r in results.values())
    print(json.dumps({"passed": ok, "seconds": total}), flush=True)
    if not a.no_docs:
        _write_docs(results, engines, total, ok, partial=a.only is not None)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
