"""What the demos share: the fresh output folder and the offline-verification step table."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = ["fresh_dir", "verify_steps"]


def fresh_dir(arg: str | None) -> Path:
    d = Path(arg) if arg else Path.cwd() / f"kolm-demo-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    d.mkdir(parents=True, exist_ok=True)
    if any(d.iterdir()):
        raise SystemExit(f"kolm demo: {d} already holds a demo (not empty); pass a fresh --dir")
    return d.resolve()


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
