"""``kolm advise``: the command line of :mod:`kolm_compile.advise` (the five questions as
flags or prompts, one flag per cost figure, the rich table or ``--json``)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import fields
from typing import Any

from kolm_compile.advise import FRONTIER, QUESTIONS, Advice, Answers, Figures, advise
from kolm_ledger.errors import InvalidInput

__all__ = ["add_arguments", "cmd_advise", "register"]


def register(sub: Any) -> None:
    """``kolm advise`` (stdlib and the advice logic only; rich loads when it runs)."""
    adv = sub.add_parser("advise", help="which technique fits: RAG, fine-tune or distillation")
    add_arguments(adv)
    adv.set_defaults(func=cmd_advise)


def _yes_no(s: str) -> bool:
    v = s.strip().lower()
    if v in ("yes", "y", "true", "1"):
        return True
    if v in ("no", "n", "false", "0"):
        return False
    raise argparse.ArgumentTypeError(f"{s!r}: want yes or no")


def _calls(s: str) -> int:
    try:
        v = int(s.replace(",", "").replace("_", ""))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{s!r}: want a whole number of calls") from e
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v}: want at least 1 call a month")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the five question flags, one flag per figure, ``--no-input`` and ``--json``."""
    for name, flag, q in QUESTIONS:
        if name == "calls_per_month":
            p.add_argument(flag, type=_calls, metavar="N", help=q)
        else:
            p.add_argument(flag, type=_yes_no, metavar="yes|no", help=q)
    p.add_argument(
        "--no-input", action="store_true", help="never prompt; a missing answer is an error"
    )
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    g = p.add_argument_group("figures (illustrative defaults; override with your own)")
    for f in fields(Figures):
        g.add_argument(
            Figures.flag(f.name),
            type=float,
            dest=f"fig_{f.name}",
            metavar="X",
            help=f"{f.metadata['help']} (default {f.default})",
        )


def _ask(name: str, flag: str, question: str) -> Any:
    from rich.prompt import Confirm, IntPrompt

    if name == "calls_per_month":
        while True:
            v = IntPrompt.ask(question)
            if v >= 1:
                return v
    return Confirm.ask(question)


def _answers(a: argparse.Namespace) -> Answers:
    got: dict[str, Any] = {}
    interactive = not a.no_input and sys.stdin.isatty()
    for name, flag, q in QUESTIONS:
        v = getattr(a, name)
        if v is None:
            if not interactive:
                why = "--no-input" if a.no_input else "stdin is not a terminal"
                raise InvalidInput(f"missing answer: give {flag} ({q}) — cannot prompt ({why})")
            v = _ask(name, flag, q)
        got[name] = v
    return Answers(**got)


def _money(x: float, per_call: bool = False) -> str:
    if per_call:
        return f"${x:,.4f}"
    return f"${x:,.2f}" if x < 100 else f"${x:,.0f}"


def _render(adv: Advice) -> None:
    from rich.console import Console
    from rich.table import Table

    c = Console(width=max(Console().width, 120))
    c.print(f"[bold]Recommended:[/bold] [green]{adv.technique}[/green]")
    for r in adv.reasons:
        c.print(f"  • {r}")
    t = Table(
        title=f"Cost matrix at {adv.answers.calls_per_month:,} calls/month "
        "(illustrative defaults unless overridden)"
    )
    t.add_column("technique", no_wrap=True)
    for col in (
        "setup",
        "per call",
        "latency",
        "data leaves",
        "verifier",
        "per month",
        "payback vs frontier",
    ):
        t.add_column(col, justify="left" if col in ("data leaves", "verifier") else "right")
    for row in adv.matrix:
        pb = (
            "—"
            if row.technique == FRONTIER
            else "never"
            if math.isinf(row.payback_months)
            else f"{row.payback_months:.1f} mo"
        )
        mark = "→ " if row.technique == adv.technique else ""
        t.add_row(
            mark + row.technique,
            _money(row.setup_cost),
            _money(row.cost_per_call, per_call=True),
            f"{row.latency_ms:,.0f} ms",
            row.data_leaves,
            row.verifier,
            _money(row.monthly_cost),
            pb,
        )
    c.print(t)


def cmd_advise(a: argparse.Namespace) -> int:
    """Handler of ``kolm advise``."""
    overrides = {
        f.name: getattr(a, f"fig_{f.name}")
        for f in fields(Figures)
        if getattr(a, f"fig_{f.name}", None) is not None
    }
    figures = Figures(**overrides)
    adv = advise(_answers(a), figures)
    if a.json:
        print(json.dumps(adv.to_json(), indent=2, sort_keys=True))
    else:
        _render(adv)
    return 0
