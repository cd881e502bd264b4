"""``kolm demo``: the whole kolm story on the embedded default, into one directory.

1. keys (and development TLS certificates) under ``DIR/keys`` and ``DIR/tls``;
2. the ledger service on loopback (SQLite at ``DIR/ledger.db``);
3. a compile of the 12-queue Banking77 ticket router (bundled subset, CC BY 4.0) with the
   simulated teacher and k-sample voting, every label receipt in the ledger;
   (with ``kolm[recall]``: the accepted examples become a signed recall index in the
   ``.kolm``, ``recall: {source: examples, k: 5}`` in the demo's copy of the spec);
4. the inference service loads the signed ``.kolm`` (refusing anything that does not
   verify) and answers held-out tickets, one signed receipt per prediction (bulk with
   ``recall_k=0``), then a few with recall: each answer's receipt names the labelled
   training examples that grounded it (ids, digests, inclusion proofs, corpus root);
5. one prediction's offline bundle is written and verified (steps 1-10, the last being
   "check evidence": every cited example is in the artifact's signed corpus);
6. ``kolm audit`` over the whole ledger, and a tampered copy caught;
7. a closing table, with the cost comparison of the seed note.

The services run on 127.0.0.1 in plain text (loopback only); ``kolm up --tls-dir``
and deploy/ show mTLS.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import random
import time
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console, Group
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import kolm_compile
from kolm.demo.common import (
    compile_job,
    fresh_dir,
    start_demo_inference,
    start_demo_ledger,
    verify_steps,
)

__all__ = ["register_demo", "run_full_demo"]

#: the example spec shipped inside kolm_compile (found through the package, wherever it is)
EXAMPLE = Path(kolm_compile.__file__).resolve().parent / "examples" / "banking77-router.yaml"
#: the recall section the demo adds to its copy of the example spec (see _spec)
RECALL = {"source": "examples", "k": 5}
#: tickets answered with recall and shown with their evidence
EVIDENCE_TICKETS = 3
#: the seed note's illustrative figures (override with flags)
FRONTIER_COST_PER_CALL = 0.01
MONTHLY_CALLS = 100_000


def register_demo(sub: Any) -> None:
    """``kolm demo`` (the full story; replaces the trust-core-only demo when installed)."""
    d = sub.add_parser("demo", help="run the whole story end to end into a fresh directory")
    d.add_argument("--dir", help="output directory (default: a fresh ./kolm-demo-<time>)")
    d.add_argument(
        "--small",
        action="store_true",
        help="reduced size (4 queues, few examples): for tests and a quick look",
    )
    d.add_argument(
        "--task",
        choices=("classify", "extract"),
        default="classify",
        help="classify: the Banking77 ticket router (default); extract: a SNIPS frame "
        "extractor (JSON output, span-tagger student)",
    )
    d.add_argument("--tickets", type=int, default=200, help="held-out tickets to send")
    d.add_argument(
        "--frontier-cost-per-call",
        type=float,
        default=FRONTIER_COST_PER_CALL,
        help="illustrative $/call of the frontier model (seed note)",
    )
    d.add_argument(
        "--monthly-calls", type=int, default=MONTHLY_CALLS, help="volume used for the payback line"
    )
    d.add_argument("--threads", type=int, default=None, help="torch threads for training")
    d.add_argument(
        "--trust-core",
        action="store_true",
        help="only the trust-core part: keys, receipts, checkpoint, bundle, tamper",
    )
    d.add_argument(
        "--receipts",
        type=int,
        default=300,
        help="with --trust-core: receipts of each kind to append",
    )
    d.set_defaults(func=run_full_demo)


def _recall_unavailable() -> str | None:
    """Why a recall index cannot be built here (``None``: it can)."""
    try:
        from kolm_compile.recall import sqlite_backend

        sqlite_backend()
    except Exception as e:  # ImportError, RecallUnavailable: the [recall] extra is missing
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    return None


def _spec(small: bool, recall: bool = False) -> Any:
    """The example spec, reduced with ``small``; ``recall`` adds :data:`RECALL`.

    Recall is turned on here rather than in the shipped example spec: that spec is what
    the compile tests and benchmarks load, and an index there would add an embedding
    pass of every accepted example to each of them and make it need ``kolm[recall]``.
    """
    from kolm_compile.spec import TaskSpec

    raw = yaml.safe_load(EXAMPLE.read_text())
    if recall:
        raw["recall"] = dict(RECALL)
    if small:
        raw["labels"] = raw["labels"][:4]
        raw["data"]["limit_per_label"] = 16
        raw["student"].update(epochs=3, max_length=32, batch_size=16)
    return TaskSpec.from_dict(raw, EXAMPLE.parent)


def run_full_demo(a: argparse.Namespace) -> int:
    """Entry point of ``kolm demo``."""
    if a.trust_core:
        from kolm.demo.trust_core import run_demo

        return run_demo(a)
    if a.task == "extract":
        from kolm.demo.extract import run_extract_demo

        return run_extract_demo(a)
    return asyncio.run(_demo(a))


async def _demo(a: argparse.Namespace) -> int:
    from kolm.cli.compile import run_with_progress
    from kolm.demo.trust_core import tamper_copy
    from kolm_infer._pb import infer_pb2 as pb
    from kolm_infer._pb import infer_pb2_grpc as pb_grpc
    from kolm_ledger.audit.auditor import audit, audit_remote
    from kolm_ledger.keys import init_keys
    from kolm_ledger.service.client import LedgerClient
    from kolm_ledger.service.tls import init_certs
    from kolm_ledger.verify.receipt import verify_prediction

    t_all = time.perf_counter()
    console = Console()
    d = fresh_dir(a.dir)
    console.rule("kolm demo — distillation you can prove")
    trust = init_keys(d / "keys")
    init_certs(d / "tls")
    console.print(
        f"[bold]1.[/] keys in {d / 'keys'} (trust root trust.json), dev certificates in {d / 'tls'}"
    )

    ledger, target = await start_demo_ledger(d, trust)
    console.print(f"[bold]2.[/] ledger service on {target} (SQLite {d / 'ledger.db'})")
    infer = None
    try:
        # 3. compile
        no_recall = _recall_unavailable()
        spec = _spec(a.small, recall=no_recall is None)
        console.print(
            f"[bold]3.[/] compiling [bold]{spec.name}[/]: {len(spec.labels or ())} "
            "queues, simulated teacher (85% per sample), k="
            f"{spec.teacher.k} votes, LoRA student on all-MiniLM-L6-v2"
            + (
                f", recall index of the accepted examples (k={RECALL['k']})"
                if no_recall is None
                else f" [yellow](no recall index: {no_recall}; pip install 'kolm[recall]')[/]"
            )
        )
        from kolm_compile.student import embed_texts

        client = LedgerClient(target, timeout=600)
        job = compile_job(d, spec, client, a.threads, embed=embed_texts)
        t0 = time.perf_counter()
        result = await asyncio.to_thread(run_with_progress, job, console)
        compile_s = time.perf_counter() - t0

        # 4. serve and predict
        infer = await start_demo_inference(d, target, trust, result.artifact_path)
        itarget = f"127.0.0.1:{infer.port}"
        recall_on = bool(result.recall)
        console.print(
            f"[bold]4.[/] inference service on {itarget} loaded "
            f"{result.artifact_path.name} (signature, file digests and ledger "
            "inclusion verified)"
        )
        tickets = _held_out(spec, a.tickets)
        import grpc

        answers: list[Any] = []
        async with grpc.aio.insecure_channel(itarget) as ch:
            stub = pb_grpc.InferenceStub(ch)  # type: ignore[no-untyped-call]
            sem = asyncio.Semaphore(16)
            with Progress(
                TextColumn("{task.description:<24}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console,
            ) as prog:
                task = prog.add_task("   predict + receipt", total=len(tickets))

                async def ask(text: str) -> Any:
                    # the bulk skips retrieval (recall_k=0); the few below cite evidence
                    req = pb.PredictRequest(artifact=spec.name, input=text)
                    if recall_on:
                        req.recall_k = 0
                    async with sem:
                        r = await stub.Predict(req, timeout=60)
                        prog.advance(task)
                        return r

                answers = list(await asyncio.gather(*(ask(t) for t, _ in tickets)))
            # a few tickets with recall (recall_k unset: the artifact's default k); the
            # first one waits for inclusion and becomes the offline bundle of step 5
            one_text, one_gold = tickets[0]
            one = await stub.Predict(
                pb.PredictRequest(artifact=spec.name, input=one_text, wait_for_inclusion=True),
                timeout=60,
            )
            shown: list[tuple[str, str, Any]] = [(one_text, one_gold, one)]
            if recall_on:
                for text, gold in tickets[1:EVIDENCE_TICKETS]:
                    r = await stub.Predict(
                        pb.PredictRequest(artifact=spec.name, input=text), timeout=60
                    )
                    shown.append((text, gold, r))
        right = sum(r.output == y for r, (_, y) in zip(answers, tickets, strict=True))
        by_backend: dict[str, int] = {}
        for r in answers:
            by_backend[r.backend] = by_backend.get(r.backend, 0) + 1
        console.print(
            f"   {len(answers)} tickets answered, {right} match the gold queue; "
            f"receipts acknowledged by the ledger: {sum(r.HasField('promise') for r in answers)}"
            + (" (recall_k=0: no retrieval for the bulk)" if recall_on else "")
        )
        if recall_on:
            console.print(_evidence_table(shown))

        # 5. one offline bundle, verified like a downstream system would
        from kolm_ledger.formats.bundle import Bundle

        bundle_path = d / "prediction.kolm-receipt.json"
        bundle_path.write_bytes(one.bundle)
        # the ledger serves on this event loop: sync client calls go to a thread
        art_bundle = await asyncio.to_thread(client.bundle, index=result.artifact_index)
        v = verify_prediction(
            Bundle.from_bytes(one.bundle),
            trust,
            artifact_bundle=art_bundle,
            input_value=one_text,
            salt=one.salt,
            artifact_file=result.artifact_path if recall_on else None,
        )
        steps = verify_steps(v)
        passed = [n for n, _, ok, _ in steps if ok]
        st = Table.grid(padding=(0, 1))
        st.add_column()
        st.add_column(justify="right")
        st.add_column(no_wrap=True)
        st.add_column()
        for n, name, ok, what in steps:
            st.add_row("[green]ok[/]" if ok else "[dim]--[/]", f"({n})", name, what)
        console.print(
            Panel(
                Group(
                    f"ticket: {one_text!r}\nanswer: {one.output} (gold {one_gold}), backend "
                    f"{one.backend}, confidence {one.confidence:.2f}",
                    st,
                    f"→ {bundle_path.name}: verified offline, steps "
                    + (
                        f"1-{len(steps)} passed"
                        if len(passed) == len(steps)
                        else ", ".join(map(str, passed)) + " passed"
                    ),
                ),
                title="5. one prediction, verified offline",
            )
        )

        # 6. audit the whole ledger over gRPC, and catch a tampered copy
        rep = await asyncio.to_thread(
            audit_remote, client, trust, state_path=d / "audit-state.json"
        )
        console.print(
            f"[bold]6.[/] kolm audit --ledger {target}: "
            f"{'[green]OK[/]' if rep.ok else '[red]FAILED[/]'} — {rep.entries} "
            f"receipts re-verified ({', '.join(f'{k} {n}' for k, n in sorted(rep.by_kind.items()))})"
        )
    finally:
        if infer is not None:
            await infer.stop(2)
        await ledger.stop(2)
    victim, bad = await asyncio.to_thread(tamper_copy, d / "ledger.db", d / "tampered.db", trust)
    console.print(
        f"   tampered copy (entry {victim}: one byte flipped, triggers dropped): audit "
        f"[red]FAILED[/] at {bad.failing_indices()}; {d / 'ledger.db'} stays clean"
    )
    from kolm_ledger.storage import Store

    local = await asyncio.to_thread(audit, Store(f"sqlite:///{d / 'ledger.db'}"), trust)

    # 7. the closing table
    cost = result.cost
    teacher_call = a.frontier_cost_per_call
    student_call = cost["student_cost_per_call"]
    compile_cost = cost["estimated_cost"] + compile_s / 3600 * cost["assumed_dollars_per_cpu_hour"]
    saving = (teacher_call - student_call) * a.monthly_calls
    payback_days = compile_cost / saving * 30 if saving > 0 else float("inf")
    t = Table(title="kolm demo — summary")
    t.add_column("what")
    t.add_column("result", justify="right")
    t.add_row(
        "labels sampled / accepted / rejected",
        f"{result.labels_sampled} / {result.labels_accepted} / {result.labels_rejected}",
    )
    t.add_row(
        "student K-score (95% CI, n)",
        f"{result.k_score.score:.1f} ({result.k_score.low:.1f}–{result.k_score.high:.1f}, "
        f"{result.k_score.n})",
    )
    if result.teacher_single and result.teacher_vote:
        t.add_row(
            "teacher K-score: one sample / k-vote",
            f"{result.teacher_single.score:.1f} / {result.teacher_vote.score:.1f}",
        )
    receipts = rep.entries
    t.add_row("receipts issued / re-verified by the audit", f"{receipts} / {rep.entries}")
    t.add_row(
        "prediction receipts (student / teacher)",
        f"{by_backend.get('student', 0)} / {by_backend.get('teacher', 0)}",
    )
    if recall_on:
        cited = [r for _, _, r in shown if len(r.evidence)]
        t.add_row(
            f"receipts that name their evidence (recall k={result.recall.get('k', 5)}, "
            f"{result.recall['chunks']} examples)",
            f"{len(cited)}; step 10 {'ok' if v.evidence_checked else 'NOT RUN'}",
        )
    t.add_row(
        "hash chain + Merkle root + checkpoints", "intact" if rep.ok and local.ok else "BROKEN"
    )
    t.add_row("tampered copy caught", "yes" if victim in bad.failing_indices() else "NO")
    t.add_row("compile time", f"{compile_s:.0f} s")
    t.add_row(
        "per call: frontier (illustrative) vs student",
        f"${teacher_call:.4f} vs ${student_call:.2e}",
    )
    t.add_row(
        f"payback of the compile (${compile_cost:.2f}) at {a.monthly_calls:,} calls/month",
        f"{payback_days * 24 * 60:.1f} minutes"
        if payback_days < 1 / 24
        else f"{payback_days * 24:.1f} hours"
        if payback_days < 1
        else f"{payback_days:.1f} days",
    )
    t.add_row("total demo time", f"{time.perf_counter() - t_all:.0f} s")
    console.print(t)
    console.print(
        f"Everything is under [bold]{d}[/] (ledger.db, keys/, artifacts/"
        f"{result.artifact_path.name}, prediction.kolm-receipt.json, tampered.db)"
    )
    (d / "summary.json").write_text(
        json.dumps(
            {
                "k_score": result.k_score.to_dict(),
                "labels_accepted": result.labels_accepted,
                "receipts": receipts,
                "audit_ok": rep.ok and local.ok,
                "tamper_caught": victim in bad.failing_indices(),
                "compile_seconds": compile_s,
                "artifact": str(result.artifact_path),
                "artifact_digest": result.artifact_digest,
                "predictions": len(answers),
                "payback_days": payback_days,
                "verify_steps": {name: ok for _, name, ok, _ in steps},
                "recall": {
                    "corpus_root": result.recall["corpus_root"],
                    "chunks": result.recall["chunks"],
                    "k": result.recall.get("k"),
                    "shown": len(shown),
                    "evidence_ids": [str(e["id"]) for e in v.evidence],
                    "evidence_checked": v.evidence_checked,
                    "corpus_source": v.corpus_source,
                }
                if recall_on
                else None,
            },
            indent=2,
        )
        + "\n"
    )
    ok = rep.ok and local.ok and victim in bad.failing_indices()
    if recall_on:
        ok = ok and v.evidence_checked
    return 0 if ok else 1


def _evidence_table(shown: list[tuple[str, str, Any]], top: int = 3) -> Table:
    """The answers given with recall: ticket, answer, confidence and cited neighbours."""
    k = max((len(r.evidence) for _, _, r in shown), default=0)
    t = Table(
        title="   answered with recall: receipts name the examples that grounded them",
        title_justify="left",
        show_lines=True,
        expand=True,
    )
    t.add_column("ticket", ratio=2, min_width=14)
    t.add_column("answer / confidence", ratio=2, min_width=16, overflow="fold")
    t.add_column(
        f"cited neighbours: cosine, label, example digest (top {min(top, k)} of {k})",
        ratio=6,
        overflow="fold",
    )
    for text, gold, r in shown:
        mark = "[green]✓[/]" if r.output == gold else f"[red]✗ gold {gold}[/]"
        near = "\n".join(
            f"{e.score:.2f} {'[green]' if e.label == r.output else '[yellow]'}{e.label}[/] "
            f"[dim]{e.id[:8]}…[/]"
            for e in r.evidence[:top]
        )
        t.add_row(text, f"{r.output} {mark}\n{r.confidence:.2f} [dim]{r.reason}[/]", near or "—")
    return t


def _held_out(spec: Any, n: int) -> list[tuple[str, str]]:
    keep = set(spec.labels or ())
    with open(spec.data.holdout, newline="", encoding="utf-8") as f:
        rows = [
            (r[spec.data.text_column], r[spec.data.label_column])
            for r in csv.DictReader(f)
            if r[spec.data.label_column] in keep
        ]
    random.Random(spec.seed).shuffle(rows)
    return rows[:n]
