"""Authorization by client role on the compile and inference services: every RPC × role.

Real services with ``kolm certs init`` certificates (mutual TLS) on 127.0.0.1. Each
role's client calls every method of ``kolm.compile.v1.Compile`` and
``kolm.infer.v1.Inference`` with an empty request. A role the policy refuses gets
``PERMISSION_DENIED`` naming the role and the method; a role it allows never does (it
gets the method's own answer to an empty request: ``OK``, ``INVALID_ARGUMENT``,
``NOT_FOUND``...). Nothing is written for a refused call, and health stays SERVING for
every role. (tests/ledger/test_authz.py does the same for the ledger.)
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support.servers import LedgerThread, ServiceThread

from kolm_compile._pb import compile_pb2_grpc
from kolm_compile.service import COMPILE_POLICY
from kolm_infer._pb import infer_pb2_grpc
from kolm_infer.service import INFER_POLICY
from kolm_ledger.keys import PrivateKey, init_keys
from kolm_ledger.service.authz import LEDGER_POLICY, allowed
from kolm_ledger.service.tls import CLIENT_ROLES, client_credentials, init_certs, server_credentials

EXAMPLES = Path(__file__).resolve().parents[2] / "kolm_compile" / "examples"
COMPILE = "kolm.compile.v1.Compile"
INFER = "kolm.infer.v1.Inference"


def _methods(servicer_cls: type) -> set[str]:
    return {m for m in vars(servicer_cls) if not m.startswith("_")}


def test_the_policy_covers_every_method_of_both_services() -> None:
    assert set(COMPILE_POLICY[COMPILE]) == _methods(compile_pb2_grpc.CompileServicer)
    assert set(INFER_POLICY[INFER]) == _methods(infer_pb2_grpc.InferenceServicer)
    # each service declares its own table; kolm_ledger's lists only the ledger
    assert set(COMPILE_POLICY) == {COMPILE} and set(INFER_POLICY) == {INFER}
    assert COMPILE not in LEDGER_POLICY and INFER not in LEDGER_POLICY


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from kolm_compile.service import JobRunner
    from kolm_compile.service import start as start_compile
    from kolm_infer.service import start as start_infer
    from kolm_ledger.errors import UnavailableError

    d = tmp_path_factory.mktemp("authz-services")
    trust = init_keys(d / "keys")
    init_certs(d / "certs")

    class IdleRunner(JobRunner):
        """Queues jobs but never runs them: nothing can train here."""

        def start(self) -> None:
            pass

    def no_sink() -> Any:
        raise UnavailableError("authz test: no ledger")

    ledger = LedgerThread(f"sqlite:///{d / 'ledger.db'}", trust, PrivateKey.load(d / "keys" / "log.key"))  # fmt: skip
    runner = IdleRunner(
        d / "work",
        keys_dir=d / "keys",
        sink_factory=no_sink,
        data_root=EXAMPLES.parent / "data",
        threads=1,
    )
    comp = ServiceThread(
        lambda: start_compile(runner, credentials=server_credentials(d / "certs", "compile"))
    )
    inf = ServiceThread(
        lambda: start_infer(
            ledger.target,
            trust,
            PrivateKey.load(d / "keys" / "infer.key"),
            credentials=server_credentials(d / "certs", "infer"),
        )
    )
    yield {"certs": d / "certs", "compile": comp, "infer": inf, "ledger": ledger,
           "jobs": d / "work" / "jobs.sqlite", "ledger_db": d / "ledger.db"}  # fmt: skip
    inf.close()
    comp.close()
    ledger.stop()


def _count(path: Path, table: str) -> int:
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return int(con.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
    finally:
        con.close()


def _call(ch: grpc.Channel, method: str, streaming: str) -> tuple[grpc.StatusCode, str]:
    try:
        if streaming == "response":
            for _ in ch.unary_stream(method)(b"", timeout=30):
                pass
        elif streaming == "both":
            for _ in ch.stream_stream(method)(iter([b""]), timeout=30):
                pass
        else:
            ch.unary_unary(method)(b"", timeout=30)
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


STREAMING = {"WatchJob": "response", "FetchArtifact": "response", "PredictStream": "both"}


@pytest.mark.parametrize("role", CLIENT_ROLES)
@pytest.mark.parametrize("service", [COMPILE, INFER])
def test_every_rpc_by_every_role(world: dict[str, Any], service: str, role: str) -> None:
    svc = world["compile" if service == COMPILE else "infer"]
    jobs_before = _count(world["jobs"], "jobs")
    ledger_before = _count(world["ledger_db"], "entries")
    with grpc.secure_channel(svc.target, client_credentials(world["certs"], role)) as ch:
        policy = COMPILE_POLICY if service == COMPILE else INFER_POLICY
        for name in sorted(policy[service]):
            method = f"/{service}/{name}"
            code, details = _call(ch, method, STREAMING.get(name, "unary"))
            if allowed(role, method, policy):
                assert code != grpc.StatusCode.PERMISSION_DENIED, (role, name, details)
                assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (
                    role,
                    name,
                    code,
                    details,
                )
            else:
                assert code == grpc.StatusCode.PERMISSION_DENIED, (role, name, code, details)
                assert details == f"role {role!r} may not call {service}/{name}"
        h = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert h.status == health_pb2.HealthCheckResponse.SERVING
    assert _count(world["jobs"], "jobs") == jobs_before  # empty SubmitJob: refused or invalid
    assert (
        _count(world["ledger_db"], "entries") == ledger_before
    )  # no artifact, so no prediction receipt


def test_a_client_without_a_certificate_is_refused(world: dict[str, Any]) -> None:
    """Mutual TLS: a client that presents no certificate never reaches a handler."""
    ca = (world["certs"] / "ca.pem").read_bytes()
    for svc in (world["compile"], world["infer"]):
        with grpc.secure_channel(svc.target, grpc.ssl_channel_credentials(ca)) as ch:
            code, _ = _call(ch, f"/{COMPILE}/ListArtifacts", "unary")
            assert code == grpc.StatusCode.UNAVAILABLE
