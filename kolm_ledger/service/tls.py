"""Mutual TLS for the kolm services: a development CA, service and client certificates.

``kolm certs init DIR`` writes::

    DIR/ca.pem  ca.key                          the development certificate authority
    DIR/<service>.pem  <service>.key            server certificates: ledger, compile, infer
                                                (SAN: DNS localhost, IP 127.0.0.1, ::1)
    DIR/client-<role>.pem  client-<role>.key    client certificates: admin, compile, infer, auditor

A client's role is carried in its certificate as a **URI subject alternative name**
``kolm:role:<role>`` (exactly one; the subject CN ``kolm-<role>`` is for people only and
is never read). Servers require a client certificate signed by the CA
(``require_client_auth``) and :func:`role_of` reads the role from the peer certificate
gRPC verified. Keys are ECDSA P-256, made and used through :mod:`kolm_ledger._crypto`.

For production use your own CA (the files only have to be PEM); the layout above is
all :func:`server_credentials` and :func:`client_credentials` expect.

Plain text is allowed only where nobody else can listen in: on loopback addresses, and
for servers only with an explicit ``--insecure`` (:func:`check_insecure_listen`).

Example::

    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> sorted(init_certs(d))[:3]
    ['ca', 'client-admin', 'client-auditor']
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import grpc
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kolm_ledger._crypto import PrivateKey
from kolm_ledger.errors import InvalidInput, KeyFormatError, RoleError

__all__ = [
    "CLIENT_ROLES",
    "ROLE_URI_PREFIX",
    "SERVICES",
    "ClientRole",
    "channel_credentials",
    "check_insecure_listen",
    "client_credentials",
    "init_certs",
    "is_loopback",
    "role_from_certificate",
    "role_of",
    "server_credentials",
    "serving_credentials",
]

ClientRole = Literal["admin", "compile", "infer", "auditor"]
CLIENT_ROLES: tuple[ClientRole, ...] = ("admin", "compile", "infer", "auditor")
SERVICES: tuple[str, ...] = ("ledger", "compile", "infer")
#: A client certificate's role is the URI SAN ``kolm:role:<role>``.
ROLE_URI_PREFIX = "kolm:role:"

_VALIDITY = timedelta(days=365)


def _name(cn: str, ou: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kolm development")]
    if ou:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    return x509.Name(attrs)


def _builder(subject: x509.Name, issuer: x509.Name, key: PrivateKey, now: datetime) -> Any:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key().x509_public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
    )


def _write(d: Path, stem: str, key: PrivateKey, cert: x509.Certificate) -> None:
    key.save(d / f"{stem}.key")
    (d / f"{stem}.pem").write_bytes(PrivateKey.certificate_pem(cert))


def init_certs(
    directory: str | os.PathLike[str],
    *,
    services: Iterable[str] = SERVICES,
    roles: Iterable[ClientRole] = CLIENT_ROLES,
    now: datetime | None = None,
) -> dict[str, Path]:
    """Create a development CA, server certificates and role client certificates.

    Returns ``{stem: certificate path}``. Refuses to overwrite an existing ``ca.key``.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    if (d / "ca.key").exists():
        raise KeyFormatError(f"{d / 'ca.key'} exists; refusing to overwrite a CA")
    t = (now or datetime.now(UTC)).replace(microsecond=0)
    ca_key = PrivateKey.generate()
    ca_name = _name("kolm development CA")
    ca_pub = ca_key.public_key().x509_public_key()
    ca = ca_key.sign_certificate(
        _builder(ca_name, ca_name, ca_key, t)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_pub), critical=False)
    )
    _write(d, "ca", ca_key, ca)
    out = {"ca": d / "ca.pem"}
    aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_pub)
    for svc in services:
        key = PrivateKey.generate()
        san = x509.SubjectAlternativeName(
            [
                x509.DNSName("localhost"),
                x509.DNSName(f"kolm-{svc}"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                x509.IPAddress(ipaddress.ip_address("::1")),
            ]
        )
        cert = ca_key.sign_certificate(
            _builder(_name(f"kolm-{svc}", "service"), ca_name, key, t)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(san, critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(aki, critical=False)
        )
        _write(d, svc, key, cert)
        out[svc] = d / f"{svc}.pem"
    for role in roles:
        if role not in CLIENT_ROLES:
            raise InvalidInput(f"client role {role!r} is not one of {list(CLIENT_ROLES)}")
        key = PrivateKey.generate()
        cert = ca_key.sign_certificate(
            _builder(_name(f"kolm-{role}", role), ca_name, key, t)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(f"{ROLE_URI_PREFIX}{role}")]
                ),
                critical=False,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(aki, critical=False)
        )
        _write(d, f"client-{role}", key, cert)
        out[f"client-{role}"] = d / f"client-{role}.pem"
    return out


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise KeyFormatError(
            f"cannot read {path}: {e.strerror} (make one with `kolm certs init DIR`)"
        ) from e


def _pair(d: Path, stem: str) -> tuple[bytes, bytes]:
    """(key, certificate) ``<stem>.key``/``<stem>.pem``, else a per-service directory's
    ``key.pem``/``cert.pem`` (the deploy/ layout: one directory per container)."""
    if not (d / f"{stem}.pem").exists() and (d / "cert.pem").exists():
        return _read(d / "key.pem"), _read(d / "cert.pem")
    return _read(d / f"{stem}.key"), _read(d / f"{stem}.pem")


def server_credentials(directory: str | os.PathLike[str], service: str) -> grpc.ServerCredentials:
    """TLS credentials of ``service`` that require a client certificate signed by the CA.

    Reads ``DIR/ca.pem`` and ``DIR/<service>.key``/``.pem`` (or ``DIR/key.pem``/``cert.pem``).
    """
    d = Path(directory)
    return grpc.ssl_server_credentials(
        [_pair(d, service)],
        root_certificates=_read(d / "ca.pem"),
        require_client_auth=True,
    )


def client_credentials(directory: str | os.PathLike[str], role: str) -> grpc.ChannelCredentials:
    """TLS credentials presenting the ``client-<role>`` certificate, trusting only the CA.

    Reads ``DIR/ca.pem`` and ``DIR/client-<role>.key``/``.pem`` (or ``DIR/key.pem``/
    ``cert.pem``, which must then carry the role URI SAN).
    """
    if role not in CLIENT_ROLES:
        raise InvalidInput(f"client role {role!r} is not one of {list(CLIENT_ROLES)}")
    d = Path(directory)
    key, cert = _pair(d, f"client-{role}")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(d / "ca.pem"), private_key=key, certificate_chain=cert
    )


def role_from_certificate(pem: bytes) -> ClientRole:
    """The role named by a client certificate's ``kolm:role:<role>`` URI SAN.

    Raises :class:`RoleError` when there is none, more than one, or an unknown role.
    """
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as e:
        raise RoleError(f"client certificate does not parse: {e}") from e
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    roles = [u[len(ROLE_URI_PREFIX) :] for u in uris if u.startswith(ROLE_URI_PREFIX)]
    if len(roles) != 1:
        raise RoleError(
            f"client certificate names {len(roles)} kolm roles (URI SAN {ROLE_URI_PREFIX}<role>), "
            "want exactly 1"
        )
    if roles[0] not in CLIENT_ROLES:
        raise RoleError(
            f"client certificate role {roles[0][:20]!r} is not one of {list(CLIENT_ROLES)}"
        )
    return roles[0]


def role_of(context: Any) -> ClientRole | None:
    """The role of the peer of a gRPC call (its verified client certificate).

    ``None`` on a plain-text connection (no certificate). Raises :class:`RoleError` for
    a TLS peer whose certificate names no valid role.
    """
    auth: Mapping[str, list[bytes]] = context.auth_context() or {}
    pems = auth.get("x509_pem_cert")
    if not pems:
        if auth.get("transport_security_type") == [b"ssl"]:
            raise RoleError("TLS peer presented no client certificate")
        return None
    return role_from_certificate(pems[0])


def is_loopback(address: str) -> bool:
    """Whether ``HOST:PORT`` (or ``[v6]:PORT``, ``unix:PATH``) stays on this machine."""
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    host = address.rsplit(":", 1)[0] if ":" in address else address
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_insecure_listen(listen: str) -> None:
    """Refuse plain text on a non-loopback listen address (raises :class:`InvalidInput`)."""
    if not is_loopback(listen):
        raise InvalidInput(
            f"--insecure (plain-text gRPC) is only allowed on loopback; {listen} is not. "
            "Use --tls-dir DIR (make one with `kolm certs init DIR`)"
        )


# ---- the choice every service and client makes: mutual TLS, or plain text to loopback ------


def serving_credentials(
    service: str, listen: str, *, tls_dir: str | None = None, insecure: bool = False
) -> grpc.ServerCredentials | None:
    """Server credentials for ``service``: mutual TLS from ``tls_dir``; ``None`` means plain
    text, which needs an explicit ``insecure`` and a loopback ``listen`` (the ``--tls-dir``
    / ``--insecure`` flags of every ``serve`` command, read in :mod:`kolm.cli`)."""
    if tls_dir:
        return server_credentials(tls_dir, service)
    check_insecure_listen(listen)
    if not insecure:
        raise InvalidInput(
            f"--listen {listen}: plain-text gRPC needs an explicit --insecure (and is only "
            "allowed on loopback); or give --tls-dir DIR for mutual TLS"
        )
    return None


def channel_credentials(
    target: str, *, tls_dir: str | None = None, role: str | None = None
) -> grpc.ChannelCredentials | None:
    """Channel credentials toward ``target``: mutual TLS as ``role`` (default auditor) with
    the certificates in ``tls_dir``; ``None`` (plain text) only to a loopback target."""
    if tls_dir:
        return client_credentials(tls_dir, role or "auditor")
    if not is_loopback(target):
        raise InvalidInput(
            f"{target} is not a loopback address: give --tls-dir DIR (and --role) to use TLS"
        )
    return None
