"""Authorization by client role over mutual TLS: every Ledger RPC × every role.

A real ledger server with ``kolm certs init`` certificates on 127.0.0.1; each role's
client calls every RPC. Refusals are ``PERMISSION_DENIED`` naming the role and the
operation; allowed calls never are. Appends are checked per receipt kind (the kind is
only known after validation), so each role × kind pair is tried with an envelope signed
by the right producer key: the client role is the only reason for a refusal.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_ledger_service import Keys, ThreadedServer, keys, sample_env  # noqa: F401

from kolm_ledger._crypto import PrivateKey
from kolm_ledger._pb import ledger_pb2 as pb
from kolm_ledger._pb import ledger_pb2_grpc as pb_grpc
from kolm_ledger.errors import RoleError
from kolm_ledger.formats.receipts import key_statement, sign_statement
from kolm_ledger.service.authz import (
    APPEND_KINDS,
    LEDGER_POLICY,
    allowed,
    authorize_append,
    authorize_call,
)
from kolm_ledger.service.client import LedgerClient
from kolm_ledger.service.tls import CLIENT_ROLES, client_credentials, init_certs

LEDGER = "kolm.ledger.v1.Ledger"
KINDS = ("label", "eval", "artifact", "prediction", "key")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("certs")
    init_certs(d)
    return d


@pytest.fixture
def tls_server(tmp_path: Path, keys: Keys, certs: Path) -> Iterator[ThreadedServer]:  # noqa: F811
    from kolm_ledger.service.tls import server_credentials

    s = ThreadedServer(
        f"sqlite:///{tmp_path / 'ledger.db'}",
        keys.trust,
        keys.log,
        credentials=server_credentials(certs, "ledger"),
        max_wait_ms=1,
    )
    yield s
    s.stop()


def _stub(server: ThreadedServer, certs: Path, role: str) -> tuple[grpc.Channel, Any]:
    ch = grpc.secure_channel(server.target, client_credentials(certs, role))
    return ch, pb_grpc.LedgerStub(ch)


def _signer(keys: Keys, kind: str) -> PrivateKey:  # noqa: F811
    return {"label": keys.compile, "eval": keys.compile, "artifact": keys.compile}.get(
        kind, keys.infer if kind == "prediction" else keys.admin
    )


def _env(keys: Keys, kind: str, i: int) -> bytes:  # noqa: F811
    if kind == "key":
        st = key_statement(
            action="register", public_key=PrivateKey.generate().public_key(), role="infer"
        )
        return sign_statement(st, keys.admin).to_bytes()
    return sample_env(kind, _signer(keys, kind), i).to_bytes()


def _reads(stub: Any) -> dict[str, Callable[[], Any]]:
    return {
        "GetCheckpoint": lambda: stub.GetCheckpoint(pb.GetCheckpointRequest(), timeout=10),
        "GetInclusionProof": lambda: stub.GetInclusionProof(
            pb.GetInclusionProofRequest(index=0), timeout=10
        ),
        "GetConsistencyProof": lambda: stub.GetConsistencyProof(
            pb.GetConsistencyProofRequest(from_size=1), timeout=10
        ),
        "GetEntries": lambda: list(stub.GetEntries(pb.GetEntriesRequest(start=0), timeout=10)),
        "FindEntries": lambda: stub.FindEntries(pb.FindEntriesRequest(kind="label"), timeout=10),
        "GetReceiptBundle": lambda: stub.GetReceiptBundle(
            pb.GetReceiptBundleRequest(index=0), timeout=10
        ),
        "GetProvenance": lambda: stub.GetProvenance(
            pb.GetProvenanceRequest(artifact_digest="0" * 64), timeout=10
        ),
    }


def test_policy_table_covers_every_ledger_rpc() -> None:
    methods = set(pb.DESCRIPTOR.services_by_name["Ledger"].methods_by_name)
    assert set(LEDGER_POLICY[LEDGER]) == methods


def test_every_ledger_read_rpc_by_every_role(
    tls_server: ThreadedServer,
    certs: Path,
    keys: Keys,  # noqa: F811
) -> None:
    ch, stub = _stub(tls_server, certs, "compile")
    with ch:
        stub.Append(pb.AppendRequest(envelope=_env(keys, "label", 0), wait_for_checkpoint=True))
    for role in CLIENT_ROLES:
        ch, stub = _stub(tls_server, certs, role)
        with ch:
            for name, call in _reads(stub).items():
                try:
                    call()
                except grpc.RpcError as e:
                    # GetProvenance of an unknown artifact: NOT_FOUND, never a refusal
                    assert (name, e.code()) == ("GetProvenance", grpc.StatusCode.NOT_FOUND), (
                        role,
                        name,
                        e.code(),
                        e.details(),
                    )
            h = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert h.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("role", CLIENT_ROLES)
def test_append_and_append_stream_by_role_and_kind(
    tls_server: ThreadedServer,
    certs: Path,
    keys: Keys,  # noqa: F811
    role: str,
) -> None:
    ch, stub = _stub(tls_server, certs, role)
    with ch:
        for i, kind in enumerate(KINDS):
            want = kind in APPEND_KINDS[role]
            env = _env(keys, kind, 100 + i)
            # unary Append
            if role == "auditor":
                with pytest.raises(grpc.RpcError) as e:
                    stub.Append(pb.AppendRequest(envelope=env), timeout=10)
                assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
                assert f"role 'auditor' may not call {LEDGER}/Append" in (e.value.details() or "")
            elif want:
                r = stub.Append(pb.AppendRequest(envelope=env), timeout=10)
                assert not r.duplicate
            else:
                with pytest.raises(grpc.RpcError) as e:
                    stub.Append(pb.AppendRequest(envelope=env), timeout=10)
                assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
                assert e.value.details() == f"role {role!r} may not append {kind!r} receipts"
            # AppendStream: a per-envelope result
            env2 = _env(keys, kind, 200 + i)
            req = pb.AppendStreamRequest(batch_id=i, envelopes=[env2])
            if role == "auditor":
                with pytest.raises(grpc.RpcError) as e:
                    list(stub.AppendStream(iter([req]), timeout=10))
                assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
                assert "AppendStream" in (e.value.details() or "")
                continue
            (resp,) = list(stub.AppendStream(iter([req]), timeout=10))
            (res,) = resp.results
            if want:
                assert res.WhichOneof("result") == "ok"
            else:
                assert res.error.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
                assert res.error.message == f"role {role!r} may not append {kind!r} receipts"


def test_refused_appends_write_nothing(
    tls_server: ThreadedServer,
    certs: Path,
    keys: Keys,  # noqa: F811
) -> None:
    ch, stub = _stub(tls_server, certs, "infer")
    with ch, pytest.raises(grpc.RpcError):
        stub.Append(pb.AppendRequest(envelope=_env(keys, "label", 1)), timeout=10)
    assert tls_server.srv.ledger.size == 0


def test_tls_server_refuses_plain_text_and_foreign_certificates(
    tls_server: ThreadedServer, tmp_path: Path
) -> None:
    with LedgerClient(tls_server.target, timeout=5) as c, pytest.raises(Exception) as e:
        c.checkpoint()
    assert getattr(e.value, "grpc_code", "") == "UNAVAILABLE"
    other = tmp_path / "other-ca"
    init_certs(other, services=(), roles=("admin",))
    ch = grpc.secure_channel(tls_server.target, client_credentials(other, "admin"))
    with ch, pytest.raises(grpc.RpcError) as e2:
        pb_grpc.LedgerStub(ch).GetCheckpoint(pb.GetCheckpointRequest(), timeout=5)
    assert e2.value.code() == grpc.StatusCode.UNAVAILABLE


def test_policy_helpers_name_role_and_operation() -> None:
    authorize_append(None, "key")  # plain-text loopback: authorization off
    authorize_append("admin", "key")
    with pytest.raises(RoleError, match="role 'admin' may not append 'label' receipts"):
        authorize_append("admin", "label")
    with pytest.raises(RoleError, match="role 'auditor' may not append 'prediction'"):
        authorize_append("auditor", "prediction")
    assert allowed("auditor", "/grpc.health.v1.Health/Check")
    from kolm_compile.service import COMPILE_POLICY
    from kolm_infer.service import INFER_POLICY

    assert allowed("infer", "/kolm.infer.v1.Inference/Predict", INFER_POLICY)
    assert not allowed("compile", "/kolm.infer.v1.Inference/Predict", INFER_POLICY)
    assert allowed("compile", "/kolm.compile.v1.Compile/SubmitJob", COMPILE_POLICY)
    assert not allowed("auditor", "/kolm.compile.v1.Compile/SubmitJob", COMPILE_POLICY)
    # each service's table is its own: the ledger's lists no other service's methods,
    # and a service's table grants nothing on another service (not even to an admin)
    assert set(LEDGER_POLICY) == {LEDGER}
    assert not allowed("infer", "/kolm.infer.v1.Inference/Predict")
    assert not allowed("admin", "/kolm.compile.v1.Compile/SubmitJob", INFER_POLICY)
    assert allowed("admin", "/kolm.compile.v1.Compile/SubmitJob", COMPILE_POLICY)
    assert not allowed("nobody", "/kolm.ledger.v1.Ledger/GetCheckpoint")
    with pytest.raises(RoleError, match=r"role 'infer' may not call some.Unknown/Method"):
        authorize_call("infer", "/some.Unknown/Method")
