"""Development CA and mTLS certificates, role extraction, loopback-only plain text, CLI flags."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from test_ledger_service import Keys, ThreadedServer, keys, label_env  # noqa: F401

from kolm.cli.main import main as kolm_main
from kolm_ledger.errors import InvalidInput, KeyFormatError, RoleError
from kolm_ledger.service.tls import (
    CLIENT_ROLES,
    ROLE_URI_PREFIX,
    channel_credentials,
    check_insecure_listen,
    client_credentials,
    init_certs,
    is_loopback,
    role_from_certificate,
    server_credentials,
    serving_credentials,
)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("certs")
    assert kolm_main(["certs", "init", str(d)]) == 0
    return d


def test_certs_init_writes_ca_services_and_role_clients(certs: Path) -> None:
    ca = x509.load_pem_x509_certificate((certs / "ca.pem").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for svc in ("ledger", "compile", "infer"):
        cert = x509.load_pem_x509_certificate((certs / f"{svc}.pem").read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert "localhost" in san.get_values_for_type(x509.DNSName)
        assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
        assert cert.issuer == ca.subject
        assert (certs / f"{svc}.key").stat().st_mode & 0o077 == 0
    for role in CLIENT_ROLES:
        pem = (certs / f"client-{role}.pem").read_bytes()
        assert role_from_certificate(pem) == role
        cert = x509.load_pem_x509_certificate(pem)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
            f"{ROLE_URI_PREFIX}{role}"
        ]


def test_certs_init_refuses_to_overwrite_a_ca(certs: Path) -> None:
    with pytest.raises(KeyFormatError, match="refusing to overwrite"):
        init_certs(certs)


def test_a_certificate_without_a_role_is_refused(certs: Path) -> None:
    with pytest.raises(RoleError, match="names 0 kolm roles"):
        role_from_certificate((certs / "ledger.pem").read_bytes())
    with pytest.raises(RoleError, match="does not parse"):
        role_from_certificate(b"not a certificate")


def test_missing_files_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(KeyFormatError, match=r"ledger\.key.*kolm certs init"):
        server_credentials(tmp_path, "ledger")
    with pytest.raises(InvalidInput, match="client role 'root'"):
        client_credentials(tmp_path, "root")


@pytest.mark.parametrize(
    ("addr", "loop"),
    [
        ("127.0.0.1:7070", True),
        ("127.5.0.1:1", True),
        ("localhost:7070", True),
        ("[::1]:7070", True),
        ("unix:/tmp/sock", True),
        ("0.0.0.0:7070", False),
        ("[::]:7070", False),
        ("10.0.0.5:7070", False),
        ("ledger.internal:7070", False),
    ],
)
def test_loopback_detection(addr: str, loop: bool) -> None:
    assert is_loopback(addr) is loop
    if not loop:
        with pytest.raises(InvalidInput, match="only allowed on loopback"):
            check_insecure_listen(addr)


def test_the_library_chooses_tls_or_loopback_plain_text_from_explicit_parameters(
    certs: Path,
) -> None:
    """What the --tls-dir/--insecure/--role flags (kolm/cli/_tls_args.py) hand in."""
    assert serving_credentials("ledger", "0.0.0.0:7070", tls_dir=str(certs)) is not None
    assert serving_credentials("ledger", "127.0.0.1:7070", insecure=True) is None
    with pytest.raises(InvalidInput, match="needs an explicit --insecure"):
        serving_credentials("ledger", "127.0.0.1:7070")
    with pytest.raises(InvalidInput, match="only allowed on loopback"):
        serving_credentials("ledger", "0.0.0.0:7070", insecure=True)
    assert channel_credentials("ledger.internal:7070", tls_dir=str(certs), role="admin")
    assert channel_credentials("127.0.0.1:7070") is None
    with pytest.raises(InvalidInput, match="not a loopback address"):
        channel_credentials("ledger.internal:7070")


def test_serve_refuses_insecure_on_a_public_address(
    tmp_path: Path,
    keys: Keys,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    for flags in (["--insecure"], []):
        code = kolm_main(
            [
                "ledger",
                "serve",
                "--db",
                f"sqlite:///{tmp_path / 'l.db'}",
                "--trust",
                str(keys.dir / "trust.json"),
                "--log-key",
                str(keys.dir / "log.key"),
                "--listen",
                "0.0.0.0:0",
                *flags,
            ]
        )
        assert code == 2
        assert "only allowed on loopback" in capsys.readouterr().err


@pytest.fixture
def tls_server(tmp_path: Path, keys: Keys, certs: Path) -> Iterator[ThreadedServer]:  # noqa: F811
    s = ThreadedServer(
        f"sqlite:///{tmp_path / 'ledger.db'}",
        keys.trust,
        keys.log,
        credentials=server_credentials(certs, "ledger"),
        max_wait_ms=1,
    )
    yield s
    s.stop()


def test_cli_audit_verify_and_provenance_over_mtls(
    tls_server: ThreadedServer,
    certs: Path,
    keys: Keys,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    from kolm_ledger.service.client import LedgerClient

    with LedgerClient(tls_server.target, credentials=client_credentials(certs, "compile")) as c:
        for i in range(3):
            c.append(label_env(keys.compile, i), wait=True)
    target = f"localhost:{tls_server.port}"
    trust = str(keys.dir / "trust.json")
    tls = ["--tls-dir", str(certs), "--role", "auditor"]
    assert kolm_main(["audit", "--ledger", target, "--trust", trust, *tls]) == 0
    assert "OK: 3 entries" in capsys.readouterr().out
    assert kolm_main(["verify", "--ledger", target, "--trust", trust, "--index", "1", *tls]) == 0
    assert "OK: label receipt at index 1" in capsys.readouterr().out
    # plain text to a TLS server fails cleanly (exit 2, not a traceback)
    assert kolm_main(["audit", "--ledger", target, "--trust", trust]) == 2
    capsys.readouterr()
    # plain text to a non-loopback target is refused before connecting
    assert kolm_main(["audit", "--ledger", "10.1.2.3:7070", "--trust", trust]) == 2
    assert "not a loopback address" in capsys.readouterr().err
    assert kolm_main(["provenance", "0" * 64, "--ledger", target, *tls]) == 2
    assert "kolm: error:" in capsys.readouterr().err
