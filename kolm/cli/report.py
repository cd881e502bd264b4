"""``kolm report``: the command line of :mod:`kolm_ledger.audit.report` (collect from a
ledger database or service, optionally re-execute the K-score, write the HTML)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from kolm.cli._tls_args import add_client_tls_arguments
from kolm_ledger.errors import KolmError

__all__ = ["cmd_report", "register"]


def register(sub: Any) -> None:
    """``kolm report`` (the report module loads when it runs)."""
    rp = sub.add_parser("report", help="self-contained HTML audit report of one artifact")
    rp.add_argument("artifact_digest")
    rp_src = rp.add_mutually_exclusive_group(required=True)
    rp_src.add_argument("--ledger", help="ledger service HOST:PORT")
    rp_src.add_argument("--db", help="SQLAlchemy URL of the ledger database")
    add_client_tls_arguments(rp)  # --tls-dir/--role toward a mutual-TLS --ledger
    rp.add_argument("--trust", required=True, help="trust root (trust.json)")
    rp.add_argument("--out", help="write the HTML here (default: report-<digest>.html)")
    rp.add_argument(
        "--holdout", help="re-execute the K-score on this holdout file (needs --artifact)"
    )
    rp.add_argument("--artifact", help="the artifact's .kolm file (with --holdout)")
    rp.set_defaults(func=cmd_report)


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "(unparsable URL)"


def cmd_report(a: argparse.Namespace) -> int:
    """Handler of ``kolm report``: exit 0 when provenance and audit pass, 1 when not."""
    from kolm_ledger.audit.report import collect_from_client, collect_from_store, render_html
    from kolm_ledger.keys import TrustRoot
    from kolm_ledger.storage import Store

    trust = TrustRoot.load(a.trust)
    if a.ledger:
        from kolm.cli._tls_args import channel_credentials_from_args
        from kolm_ledger.service.client import LedgerClient

        # mutual TLS with --tls-dir/--role (default role auditor); plain text only to loopback
        creds = channel_credentials_from_args(a, a.ledger)
        with LedgerClient(a.ledger, credentials=creds) as c:
            data = collect_from_client(c, a.artifact_digest, trust)
    elif a.db:
        store = Store(a.db, migrate=False)
        try:
            data = collect_from_store(
                store, a.artifact_digest, trust, source=f"ledger database {_redact(a.db)}"
            )
        finally:
            store.close()
    else:
        raise KolmError("give --db URL or --ledger HOST:PORT")
    if getattr(a, "holdout", None):
        if not getattr(a, "artifact", None):
            raise KolmError("--holdout needs --artifact FILE.kolm (the artifact to re-execute)")
        from kolm.cli.kscore import kscore_from_args

        data.reexec = kscore_from_args(a, a.artifact, a.holdout)
    out = Path(a.out or f"report-{data.artifact_digest[:16]}.html")
    try:
        out.write_text(render_html(data), encoding="utf-8")
    except OSError as e:
        raise KolmError(f"cannot write {out}: {e.strerror}") from e
    ok = data.chain.ok and data.audit.ok and (data.reexec is None or data.reexec.ok)
    reexec = "" if data.reexec is None else f", K-score {data.reexec.verdict}"
    print(
        f"{'OK' if ok else 'FAILED'}: wrote {out} (provenance {'ok' if data.chain.ok else 'FAILED'}, "
        f"audit {'ok' if data.audit.ok else 'FAILED'}{reexec})"
    )
    return 0 if ok else 1
