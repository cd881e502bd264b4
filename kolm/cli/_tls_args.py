"""The ``--tls-dir``/``--insecure``/``--role`` flags every service and client command shares,
and the credentials they name (:func:`kolm_ledger.service.tls.serving_credentials`,
:func:`kolm_ledger.service.tls.channel_credentials`)."""

from __future__ import annotations

import argparse
from typing import Any

import grpc

from kolm_ledger.service.tls import CLIENT_ROLES, channel_credentials, serving_credentials

__all__ = [
    "add_client_tls_arguments",
    "add_server_tls_arguments",
    "channel_credentials_from_args",
    "ledger_client_from_args",
    "server_credentials_from_args",
]


def add_server_tls_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--tls-dir DIR`` and ``--insecure`` to a ``serve`` command."""
    g = parser.add_mutually_exclusive_group()
    g.add_argument(
        "--tls-dir",
        help="mutual TLS with the certificates of `kolm certs init DIR` (clients need a role cert)",
    )
    g.add_argument(
        "--insecure",
        action="store_true",
        help="plain-text gRPC without authorization; loopback listen addresses only",
    )


def server_credentials_from_args(
    a: argparse.Namespace, service: str, listen: str
) -> grpc.ServerCredentials | None:
    """Server credentials from ``--tls-dir``/``--insecure``; ``None`` means plain text.

    Plain text needs an explicit ``--insecure`` and a loopback ``listen``.
    """
    return serving_credentials(
        service,
        listen,
        tls_dir=getattr(a, "tls_dir", None),
        insecure=bool(getattr(a, "insecure", False)),
    )


def add_client_tls_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--tls-dir DIR`` and ``--role ROLE`` to a command that calls a service."""
    parser.add_argument("--tls-dir", help="connect with mutual TLS using the certificates in DIR")
    parser.add_argument(
        "--role",
        choices=CLIENT_ROLES,
        default="auditor",
        help="which client certificate (client-<role>.pem) to present (default: auditor)",
    )


def channel_credentials_from_args(
    a: argparse.Namespace, target: str
) -> grpc.ChannelCredentials | None:
    """Channel credentials from ``--tls-dir``/``--role``; plain text only to loopback."""
    return channel_credentials(
        target, tls_dir=getattr(a, "tls_dir", None), role=getattr(a, "role", None)
    )


def ledger_client_from_args(a: argparse.Namespace) -> Any:
    """A :class:`~kolm_ledger.service.client.LedgerClient` for ``--ledger``: mutual TLS with
    ``--tls-dir``/``--role``, else plain text to loopback only."""
    from kolm_ledger.service.client import LedgerClient

    return LedgerClient(a.ledger, credentials=channel_credentials_from_args(a, a.ledger))
