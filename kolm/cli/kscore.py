"""``kolm kscore verify``: re-execute an artifact's K-score (the command line of
:func:`kolm_ledger.audit.reexec.kscore_check`; torch loads only when it runs)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from kolm.cli._tls_args import add_client_tls_arguments

if TYPE_CHECKING:
    from kolm_ledger.audit.reexec import KScoreCheck

__all__ = ["cmd_kscore_verify", "kscore_from_args", "register"]


def register(sub: Any) -> None:
    """``kolm kscore verify`` (registered by :func:`kolm.cli.main.build_parser`)."""
    ks = sub.add_parser("kscore", help="re-execute an artifact's K-score (auditors)")
    ksub = ks.add_subparsers(dest="kscore_command", required=True)
    v = ksub.add_parser(
        "verify",
        help="re-run the artifact's student on the holdout and compare with its eval receipt",
    )
    v.add_argument("artifact", help="the .kolm file")
    v.add_argument("--holdout", required=True, help="the holdout file (CSV or JSON Lines)")
    src = v.add_mutually_exclusive_group(required=True)
    src.add_argument("--db", help="SQLAlchemy URL of the ledger database")
    src.add_argument("--ledger", help="ledger service HOST:PORT")
    src.add_argument("--eval-bundle", help="the eval receipt's offline bundle (JSON)")
    v.add_argument("--trust", required=True, help="trust root (trust.json)")
    v.add_argument("--text-column", help="default: the artifact's (task.json data.text_column)")
    v.add_argument("--label-column", help="default: the artifact's (data.label_column)")
    v.add_argument(
        "--threads", type=int, help="torch threads (default: the recorded ones; a difference "
        "is reported)"
    )  # fmt: skip
    add_client_tls_arguments(v)
    v.set_defaults(func=cmd_kscore_verify)


def kscore_from_args(a: argparse.Namespace, artifact: str, holdout: str) -> KScoreCheck:
    """:func:`~kolm_ledger.audit.reexec.kscore_check` with the eval receipt named by
    ``--db``/``--ledger``/``--eval-bundle`` (``kolm kscore verify`` and ``kolm report``)."""
    from kolm.cli._tls_args import channel_credentials_from_args
    from kolm_ledger.audit.reexec import kscore_check
    from kolm_ledger.keys import TrustRoot

    ledger = getattr(a, "ledger", None)
    eval_bundle = getattr(a, "eval_bundle", None)
    return kscore_check(
        artifact,
        holdout,
        TrustRoot.load(a.trust),
        eval_bundle=eval_bundle,
        db=getattr(a, "db", None),
        ledger=ledger,
        ledger_credentials=(
            channel_credentials_from_args(a, ledger) if ledger and not eval_bundle else None
        ),
        text_column=getattr(a, "text_column", None),
        label_column=getattr(a, "label_column", None),
        threads=getattr(a, "threads", None),
    )


def cmd_kscore_verify(a: argparse.Namespace) -> int:
    """Handler of ``kolm kscore verify``: exit 0 when the K-score re-executes to the signed
    one, 1 when it does not (or the eval receipt fails to verify)."""
    from kolm_ledger.errors import ArtifactError, KeyPolicyError, VerificationError

    try:
        res = kscore_from_args(a, a.artifact, a.holdout)
    except ArtifactError as e:
        print(f"FAILED: artifact: {e}")
        return 1
    except (VerificationError, KeyPolicyError) as e:  # the eval receipt did not verify
        step = getattr(e, "step", None)
        print(f"FAILED: eval receipt{f' at step {step}' if step is not None else ''}: {e}")
        return 1
    print(res.render())
    return 0 if res.ok else 1
