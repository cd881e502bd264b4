"""Authorization of gRPC calls by client role (read from the mTLS client certificate).

This module is the mechanism; each service declares its own table. A :data:`Policy`
says which roles may call each method of a service; anything not listed is refused
(default deny). The ledger's is :data:`LEDGER_POLICY` here; the compile and inference
services declare theirs beside their servicers (``kolm_compile.service.COMPILE_POLICY``,
``kolm_infer.service.INFER_POLICY``) and hand it to :class:`AuthzInterceptor`, so a new
RPC of theirs never touches ``kolm_ledger``. Health checking and reflection are open to
every authenticated client. The ledger's appends need one more check that depends on the
receipt, done in the servicer after validation by :func:`authorize_append` against
:data:`APPEND_KINDS`:

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

from kolm_ledger.errors import RoleError
from kolm_ledger.service.tls import CLIENT_ROLES, role_of

__all__ = [
    "ALL_ROLES",
    "APPEND_KINDS",
    "LEDGER_POLICY",
    "OPEN_SERVICES",
    "AuthzInterceptor",
    "Policy",
    "allowed",
    "authorize_append",
    "authorize_call",
]

#: Every client role (a method open to all of them lists this).
ALL_ROLES: frozenset[str] = frozenset(CLIENT_ROLES)
_LEDGER_READ = ALL_ROLES
_LEDGER_WRITE = frozenset({"admin", "compile", "infer"})

#: A service's method policy: service full name → method → roles that may call it.
#: Missing: refused.
Policy = Mapping[str, Mapping[str, frozenset[str]]]

#: The ledger service's methods.
LEDGER_POLICY: Policy = {
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


def allowed(role: str, method: str, policy: Policy = LEDGER_POLICY) -> bool:
    """Whether ``role`` may call the full method name ``/package.Service/Method`` under
    ``policy`` (an ``admin`` may call every method of a service the policy names)."""
    service, name = _split(method)
    if role not in ALL_ROLES:
        return False
    if service in OPEN_SERVICES:
        return True
    if role == "admin" and service in policy:
        return True
    return role in policy.get(service, {}).get(name, frozenset())


def authorize_call(role: str, method: str, policy: Policy = LEDGER_POLICY) -> None:
    """Raise :class:`RoleError` unless ``role`` may call ``method`` under ``policy``."""
    if not allowed(role, method, policy):
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


def _check(context: Any, method: str, policy: Policy) -> RoleError | None:
    try:
        role = role_of(context)
        if role is None:
            raise RoleError(f"{method.lstrip('/')} needs a client certificate with a kolm role")
        authorize_call(role, method, policy)
    except RoleError as e:
        return e
    return None


class AuthzInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses calls whose client role may not call the method (``PERMISSION_DENIED``).

    ``policy`` is the serving service's own table (:data:`LEDGER_POLICY`, or the one its
    package declares). Install it only on a TLS server that requires client
    certificates: the role comes from the verified peer certificate, and a call without
    one is refused.
    """

    def __init__(self, policy: Policy) -> None:
        self.policy = policy

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method: str = handler_call_details.method
        policy = self.policy

        def unary(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
            async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
                err = _check(context, method, policy)
                if err is not None:
                    await _deny(context, err)
                return await fn(request, context)

            return wrapper

        def stream(fn: Callable[..., Any]) -> Callable[..., Any]:
            async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
                err = _check(context, method, policy)
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
