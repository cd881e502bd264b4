"""Authorization of gRPC calls by client role (read from the mTLS client certificate).

One policy table, :data:`POLICY`, says which roles may call each method of each kolm
service; anything not listed is refused (default deny). Health checking and reflection
are open to every authenticated client. The ledger's appends need one more check that
depends on the receipt, done in the servicer after validation by
:func:`authorize_append` against :data:`APPEND_KINDS`:

=========  ===============================================  ==========================
role       may call                                         may append
=========  ===============================================  ==========================
admin      every method of every service                    ``key`` receipts
compile    ledger reads + appends; the compile service      ``label``, ``eval``, ``artifact``
infer      ledger reads + appends; the inference service    ``prediction``
auditor    ledger reads; read-only compile/infer methods    nothing
=========  ===============================================  ==========================

Every refusal is ``PERMISSION_DENIED`` naming the role and the operation, e.g.
``role 'auditor' may not call kolm.ledger.v1.Ledger/Append`` or
``role 'compile' may not append 'key' receipts``.

Example::

    >>> authorize_append("compile", "label")
    >>> allowed("auditor", "/kolm.ledger.v1.Ledger/GetCheckpoint")
    True
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import grpc

from .errors import RoleError
from .tls import CLIENT_ROLES, role_of

__all__ = [
    "APPEND_KINDS",
    "OPEN_SERVICES",
    "POLICY",
    "AuthzInterceptor",
    "allowed",
    "authorize_append",
    "authorize_call",
]

_ALL = frozenset(CLIENT_ROLES)
_LEDGER_READ = _ALL
_LEDGER_WRITE = frozenset({"admin", "compile", "infer"})

#: service full name → method → roles that may call it. Missing: refused.
POLICY: Mapping[str, Mapping[str, frozenset[str]]] = {
    "kolm.ledger.v1.Ledger": {
        "Append": _LEDGER_WRITE,
        "AppendStream": _LEDGER_WRITE,
        "GetCheckpoint": _LEDGER_READ,
        "GetInclusionProof": _LEDGER_READ,
        "GetConsistencyProof": _LEDGER_READ,
        "GetEntries": _LEDGER_READ,
        "FindEntries": _LEDGER_READ,
        "GetReceiptBundle": _LEDGER_READ,
        "GetProvenance": _LEDGER_READ,
    },
    "kolm.compile.v1.Compile": {
        "SubmitJob": frozenset({"admin", "compile"}),
        "UploadDataset": frozenset({"admin", "compile"}),
        "CancelJob": frozenset({"admin", "compile"}),
        "WatchJob": _ALL,
        "GetJob": _ALL,
        "ListArtifacts": _ALL,
        "FetchArtifact": frozenset({"admin", "compile", "infer", "auditor"}),
    },
    "kolm.infer.v1.Inference": {
        "LoadArtifact": frozenset({"admin", "infer"}),
        "UnloadArtifact": frozenset({"admin", "infer"}),
        "Predict": frozenset({"admin", "infer"}),
        "PredictStream": frozenset({"admin", "infer"}),
        "ListArtifacts": _ALL,
    },
}

#: Services every authenticated role may call (health checking, reflection).
OPEN_SERVICES: frozenset[str] = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)

#: Which receipt kinds a client role may append to the ledger.
APPEND_KINDS: Mapping[str, frozenset[str]] = {
    "admin": frozenset({"key"}),
    "compile": frozenset({"label", "eval", "artifact"}),
    "infer": frozenset({"prediction"}),
    "auditor": frozenset(),
}


def _split(method: str) -> tuple[str, str]:
    service, _, name = method.lstrip("/").partition("/")
    return service, name


def allowed(role: str, method: str) -> bool:
    """Whether ``role`` may call the full method name ``/package.Service/Method``."""
    service, name = _split(method)
    if role not in _ALL:
        return False
    if service in OPEN_SERVICES:
        return True
    if role == "admin" and service in POLICY:
        return True
    return role in POLICY.get(service, {}).get(name, frozenset())


def authorize_call(role: str, method: str) -> None:
    """Raise :class:`RoleError` unless ``role`` may call ``method``."""
    if not allowed(role, method):
        raise RoleError(f"role {role!r} may not call {method.lstrip('/')}")


def authorize_append(role: str | None, kind: str) -> None:
    """Raise :class:`RoleError` unless a client of ``role`` may append ``kind`` receipts.

    ``None`` (a plain-text loopback connection, authorization off) allows everything.
    """
    if role is None:
        return
    if kind not in APPEND_KINDS.get(role, frozenset()):
        raise RoleError(f"role {role!r} may not append {kind!r} receipts")


async def _deny(context: grpc.aio.ServicerContext, e: RoleError) -> None:
    await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(e))


def _check(context: Any, method: str) -> RoleError | None:
    try:
        role = role_of(context)
        if role is None:
            raise RoleError(f"{method.lstrip('/')} needs a client certificate with a kolm role")
        authorize_call(role, method)
    except RoleError as e:
        return e
    return None


class AuthzInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses calls whose client role may not call the method (``PERMISSION_DENIED``).

    Install it only on a TLS server that requires client certificates: the role comes
    from the verified peer certificate, and a call without one is refused.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method: str = handler_call_details.method

        def unary(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
            async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
                err = _check(context, method)
                if err is not None:
                    await _deny(context, err)
                return await fn(request, context)

            return wrapper

        def stream(fn: Callable[..., Any]) -> Callable[..., Any]:
            async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
                err = _check(context, method)
                if err is not None:
                    await _deny(context, err)
                async for item in fn(request, context):
                    yield item

            return wrapper

        des, ser = handler.request_deserializer, handler.response_serializer
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), des, ser)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(stream(handler.unary_stream), des, ser)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), des, ser)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(stream(handler.stream_stream), des, ser)
        return handler
