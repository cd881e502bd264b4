"""``kolm demo``: the trust-core story, end to end, into one directory.

Layout written under DIR (kept by later stages of the demo)::

    DIR/keys/            admin/compile/infer/log keys (PKCS#8 PEM, 0600) and trust.json
    DIR/ledger.db        the ledger (SQLite, WAL)
    DIR/receipt-N.kolm-receipt.json   one offline bundle
    DIR/tampered.db      a tampered copy (the original stays intact)
"""

from __future__ import annotations

import argparse
import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from kolm_ledger._crypto import PrivateKey
from kolm_ledger._samples import sample_statements
from kolm_ledger.audit.auditor import AuditReport, audit
from kolm_ledger.formats.receipts import KINDS, sign_statement
from kolm_ledger.keys import TrustRoot, init_keys
from kolm_ledger.log.ledger import Ledger
from kolm_ledger.storage import Store
from kolm_ledger.verify.receipt import verify_bundle

__all__ = ["run_demo", "tamper_copy", "trust_core_story"]

_SIGNER_ROLE = {
    "label": "compile",
    "eval": "compile",
    "artifact": "compile",
    "prediction": "infer",
    "key": "admin",
}


def _fresh_dir(arg: str | None) -> Path:
    if arg:
        d = Path(arg)
    else:
        d = Path.cwd() / f"kolm-demo-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"
    d.mkdir(parents=True, exist_ok=True)
    if (d / "ledger.db").exists() or (d / "keys").exists():
        raise SystemExit(f"kolm demo: {d} already holds a demo; pass a fresh --dir")
    return d.resolve()


def trust_core_story(d: Path, per_kind: int, console: Console) -> dict[str, object]:
    """Keys → receipts of every kind → checkpoint → bundle → verify → tamper a copy → audit."""
    t0 = time.perf_counter()
    trust = init_keys(d / "keys")
    keys = {r: PrivateKey.load(d / "keys" / f"{r}.key") for r in ("admin", "compile", "infer")}
    console.print(f"[bold]1. keys[/] written to {d / 'keys'} (trust root: trust.json)")
    ledger = Ledger(
        Store(f"sqlite:///{d / 'ledger.db'}"), trust, PrivateKey.load(d / "keys" / "log.key")
    )

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as prog:
        for kind in KINDS:
            task = prog.add_task(f"2. sign + append {kind:10}", total=per_kind)
            batch = []
            for st in sample_statements(kind, per_kind):
                batch.append(sign_statement(st, keys[_SIGNER_ROLE[kind]]))
                if len(batch) == 100:
                    ledger.append(batch)
                    prog.advance(task, len(batch))
                    batch = []
            if batch:
                ledger.append(batch)
                prog.advance(task, len(batch))

    note = ledger.checkpoint().to_bytes().decode()
    console.print(Panel(note.rstrip(), title="3. newest signed checkpoint (C2SP signed note)"))

    index = ledger.size // 2
    bundle_path = d / f"receipt-{index}.kolm-receipt.json"
    ledger.bundle(index).save(bundle_path)
    v = verify_bundle(ledger.bundle(index), trust)
    console.print(
        f"[bold]4. offline bundle[/] {bundle_path.name}: verified — {v.kind} receipt "
        f"at index {v.index}, {v.role} key {v.keyid[:12]}…, checkpoint size "
        f"{v.checkpoint.size}"
    )

    victim, bad = tamper_copy(d / "ledger.db", d / "tampered.db", trust)
    console.print(
        f"[bold]5. tampered copy[/] (one byte of entry {victim} flipped, triggers "
        f"dropped): audit [red]FAILED[/] at indices {bad.failing_indices()}"
    )
    for f in bad.failures[:3]:
        console.print(f"   {f}")
    good = audit(ledger.store, trust)
    console.print(
        f"[bold]6. original ledger[/]: audit "
        f"{'[green]OK[/]' if good.ok else '[red]FAILED[/]'} — {good.entries} entries, "
        f"{good.checkpoints} checkpoints"
    )
    return {
        "entries": good.entries,
        "checkpoints": good.checkpoints,
        "audit_ok": good.ok,
        "tamper_caught": victim in bad.failing_indices(),
        "bundle": str(bundle_path),
        "seconds": time.perf_counter() - t0,
    }


def tamper_copy(src: Path, dst: Path, trust: TrustRoot) -> tuple[int, AuditReport]:
    """Copy the ledger, drop a trigger, flip one byte of a middle entry, audit the copy.

    The original is only read (SQLite online backup); returns the victim index and the report.
    """
    s = sqlite3.connect(src)
    t = sqlite3.connect(dst)
    s.backup(t)
    s.close()
    victim = int(t.execute("SELECT max(idx) FROM entries").fetchone()[0]) // 3
    t.executescript("DROP TRIGGER entries_no_update;")
    row = t.execute("SELECT envelope FROM entries WHERE idx = ?", (victim,)).fetchone()
    env = bytearray(row[0])
    pos = env.index(b'"payload":"') + 40
    env[pos] = ord("A") if env[pos] != ord("A") else ord("B")
    t.execute("UPDATE entries SET envelope = ? WHERE idx = ?", (bytes(env), victim))
    t.commit()
    t.close()
    return victim, audit(Store(f"sqlite:///{dst}", migrate=False), trust)


def run_demo(a: argparse.Namespace) -> int:
    """Entry point of ``kolm demo``."""
    console = Console()
    d = _fresh_dir(a.dir)
    console.rule("kolm demo — distillation you can prove")
    res = trust_core_story(d, a.receipts, console)
    t = Table(title="trust core")
    t.add_column("what")
    t.add_column("result")
    t.add_row("receipts appended and audited", str(res["entries"]))
    t.add_row("checkpoints signed", str(res["checkpoints"]))
    t.add_row("offline bundle", "verified")
    t.add_row("tampering caught", "yes" if res["tamper_caught"] else "NO")
    t.add_row("ledger audit", "OK" if res["audit_ok"] else "FAILED")
    t.add_row("seconds", f"{res['seconds']:.1f}")
    console.print(t)
    console.print(f"Everything is under [bold]{d}[/]")
    return 0 if res["audit_ok"] and res["tamper_caught"] else 1
