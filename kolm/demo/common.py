"""What the demos share: the fresh output folder, the services they start in it (ledger,
compile job, inference), and the offline-verification step table."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = ["compile_job", "fresh_dir", "start_demo_inference", "start_demo_ledger", "verify_steps"]


def fresh_dir(arg: str | None) -> Path:
    d = Path(arg) if arg else Path.cwd() / f"kolm-demo-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    d.mkdir(parents=True, exist_ok=True)
    if any(d.iterdir()):
        raise SystemExit(f"kolm demo: {d} already holds a demo (not empty); pass a fresh --dir")
    return d.resolve()


async def start_demo_ledger(d: Path, trust: Any) -> tuple[Any, str]:
    """The ledger service on SQLite in ``d`` (log key from ``d/keys``): ``(server, target)``."""
    from kolm_ledger._crypto import PrivateKey
    from kolm_ledger.service.server import start

    key = PrivateKey.load(d / "keys" / "log.key")
    ledger = await start(f"sqlite:///{d / 'ledger.db'}", trust, key, max_wait_ms=1.0)
    return ledger, f"127.0.0.1:{ledger.port}"


def compile_job(d: Path, spec: Any, client: Any, threads: int, embed: Any = None) -> Any:
    """A compile job of ``spec`` in ``d`` whose receipts go to the ledger ``client``."""
    from kolm_compile.pipeline import CompileJob, CompileOptions
    from kolm_compile.sinks import ServiceSink
    from kolm_ledger._crypto import PrivateKey

    return CompileJob(
        spec,
        key=PrivateKey.load(d / "keys" / "compile.key"),
        sink=ServiceSink(client),
        job_dir=d / "compile",
        out_dir=d / "artifacts",
        options=CompileOptions(threads=threads),
        embed=embed,
    )


async def start_demo_inference(d: Path, target: str, trust: Any, artifact: Path) -> Any:
    """The inference service serving ``artifact``. The demos serve no teacher: an input
    outside the cover gets the student's answer flagged ``teacher_unavailable`` instead
    of a refusal."""
    from kolm_infer import service
    from kolm_ledger._crypto import PrivateKey

    return await service.start(
        target,
        trust,
        PrivateKey.load(d / "keys" / "infer.key"),
        artifacts=[artifact],
        spool=d / "spool.sqlite",
        on_teacher_failure="student",
    )


def verify_steps(v: Any) -> list[tuple[int, str, bool, str]]:
    """``(n, step name, ran and passed, what it established)`` for steps 1-10."""
    from kolm_ledger.verify.receipt import STEPS

    r = v.receipt
    what = {
        1: "bundle, DSSE envelope, tlog-proof",
        2: f"in-toto statement of a {r.kind} receipt",
        3: f"signed by trusted key {r.keyid[:16]}",
        4: f"role {getattr(r.role, 'value', r.role)} may sign it, key valid then",
        5: "SHA-256 leaf of the envelope",
        6: f"signed checkpoint, size {r.checkpoint.size}",
        7: f"leaf {r.index} is under its Merkle root",
        8: f"names this artifact; K-score {v.k_score:.2f}"
        if v.artifact is not None
        else "not run (no artifact receipt given)",
        9: "ticket + salt open the commitment" if v.input_checked else "not run (no input given)",
        10: f"{len(v.evidence)} cited examples are in the signed corpus "
        f"{(v.corpus_root or '')[:12]}… ({v.corpus_source})"
        if v.evidence_checked
        else "not run (no evidence cited)",
    }
    ran = {8: v.artifact is not None, 9: v.input_checked, 10: v.evidence_checked}
    return [(n, name, ran.get(n, True), what[n]) for n, name in enumerate(STEPS, 1)]
