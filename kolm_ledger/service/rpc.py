"""gRPC plumbing shared by the three kolm services (and their clients).

- :func:`status_of` is the one table from error class to gRPC status: each
  :class:`~kolm_ledger.errors.KolmError` subclass declares ``grpc_code``; anything
  else is ``INTERNAL`` with a generic message (the detail goes to the log only).
- :class:`ErrorInterceptor` applies it to every RPC of a ``grpc.aio`` server.
- :func:`error_from_rpc` maps a status back to the error class on the client side.
- :func:`add_standard_services` adds health checking and reflection.
- :func:`serve_until_signal` serves until SIGTERM/SIGINT, then stops gracefully.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kolm_ledger import errors
from kolm_ledger.errors import BackpressureError, InvalidInput, KolmError

__all__ = [
    "ErrorInterceptor",
    "JsonFormatter",
    "add_standard_services",
    "configure_logging",
    "error_from_rpc",
    "serve_until_signal",
    "status_of",
]

log = logging.getLogger("kolm.rpc")

#: Client-side mapping from status code back to the most specific class we can name.
_CODE_TO_ERROR: dict[grpc.StatusCode, type[KolmError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidInput,
    grpc.StatusCode.PERMISSION_DENIED: errors.KeyPolicyError,
    grpc.StatusCode.FAILED_PRECONDITION: errors.ConflictError,
    grpc.StatusCode.NOT_FOUND: errors.NotFoundError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: errors.UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.UnavailableError,
}


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and message for ``exc``."""
    if isinstance(exc, KolmError):
        return grpc.StatusCode[exc.grpc_code], str(exc) or type(exc).__name__
    return grpc.StatusCode.INTERNAL, "internal error"


def error_from_rpc(e: grpc.RpcError) -> KolmError:
    """Translate a client-side ``RpcError`` into a :class:`KolmError` (raise it ``from e``)."""
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    detail = e.details() if hasattr(e, "details") else str(e)
    base = _CODE_TO_ERROR.get(code, KolmError)
    err: KolmError
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        retry = 0
        md = e.trailing_metadata() if hasattr(e, "trailing_metadata") else None
        for k, v in md or ():
            if k == "retry-after-ms":
                retry = int(v)
        err = BackpressureError(detail or "", retry) if retry else base(detail or "")
    else:
        err = base(f"{detail}" if detail else code.name)
    err.grpc_code = code.name
    return err


def _wrap_unary(fn: Callable[..., Awaitable[Any]], method: str) -> Callable[..., Awaitable[Any]]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await fn(request, context)
        except (KolmError, Exception) as e:
            await _abort(context, e, method)

    return wrapper


def _wrap_stream(fn: Callable[..., Any], method: str) -> Callable[..., Any]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            async for item in fn(request, context):
                yield item
        except (KolmError, Exception) as e:
            await _abort(context, e, method)

    return wrapper


async def _abort(context: grpc.aio.ServicerContext, e: BaseException, method: str) -> None:
    if isinstance(e, asyncio.CancelledError):
        raise e
    if isinstance(e, grpc.aio.AbortError) or type(e).__name__ == "AbortError":
        raise e
    code, msg = status_of(e)
    if code == grpc.StatusCode.INTERNAL:
        ref = uuid.uuid4().hex[:12]
        log.exception("internal error in %s (ref %s)", method, ref, exc_info=e)
        msg = f"internal error (ref {ref})"
    if isinstance(e, BackpressureError):
        context.set_trailing_metadata((("retry-after-ms", str(e.retry_after_ms)),))
    await context.abort(code, msg)


class ErrorInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Maps exceptions raised by servicers to gRPC statuses through :func:`status_of`."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, method),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, method),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                _wrap_unary(handler.stream_unary, method),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                _wrap_stream(handler.stream_stream, method),
                handler.request_deserializer,
                handler.response_serializer,
            )
        return handler


def add_standard_services(
    server: grpc.aio.Server, service_names: Sequence[str]
) -> health.aio.HealthServicer:
    """Add gRPC health checking (every service SERVING) and server reflection."""
    hs = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    reflection.enable_server_reflection(
        (
            *service_names,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    return hs


async def set_serving(
    hs: health.aio.HealthServicer, service_names: Sequence[str], serving: bool
) -> None:
    """Mark the overall server and each service SERVING or NOT_SERVING."""
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for name in ("", *service_names):
        await hs.set(name, status)


class Stoppable(Protocol):
    """A started service: its bound port and its own graceful stop."""

    port: int

    async def stop(self, grace: float = 10.0) -> None:
        """NOT_SERVING, finish in-flight work, stop the server, release resources."""
        ...


async def serve_until_signal(
    srv: Stoppable,
    name: str,
    listen: str,
    *,
    ready_file: str | None = None,
    grace: float = 10.0,
) -> None:
    """Announce ``srv``, serve until SIGTERM or SIGINT, then ``srv.stop(grace)``.

    The service's own ``stop`` is the one shutdown path, for ``kolm ... serve`` and tests alike.
    """
    print(f"kolm {name} listening on {listen.rsplit(':', 1)[0]}:{srv.port}", flush=True)
    write_ready_file(ready_file, srv.port)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down (grace %.1fs)", grace)
    await srv.stop(grace)


class JsonFormatter(logging.Formatter):
    """One JSON object per log line (structured logs)."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in record.__dict__.items():
            if k.startswith("kolm_"):
                obj[k[5:]] = v
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return json.dumps(obj, default=str)


def configure_logging(level: str = "INFO") -> None:
    """Structured JSON logs on stderr."""
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [h]
    root.setLevel(level)


class _Malformed:
    """Stands in for a request message whose bytes did not parse."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _tolerant(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as e:  # DecodeError and friends: answered as INVALID_ARGUMENT
            return _Malformed(e)

    return parse


_MALFORMED = "request is not a valid {} protobuf message"


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Answers request bytes that do not parse with ``INVALID_ARGUMENT`` (not ``UNKNOWN``).

    Must be the outermost interceptor: its request deserializer is the one gRPC uses.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        msg = _MALFORMED.format(handler_call_details.method.rsplit("/", 1)[-1] + " request")
        des, ser = _tolerant(handler.request_deserializer), handler.response_serializer

        async def check(request: Any, context: grpc.aio.ServicerContext) -> None:
            if isinstance(request, _Malformed):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, msg)

        def checked_iter(it: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            async def gen() -> AsyncIterator[Any]:
                async for r in it:
                    await check(r, context)
                    yield r

            return gen()

        if handler.unary_unary:
            fn_uu = handler.unary_unary

            async def uu(request: Any, context: grpc.aio.ServicerContext) -> Any:
                await check(request, context)
                return await fn_uu(request, context)

            return grpc.unary_unary_rpc_method_handler(uu, des, ser)
        if handler.unary_stream:
            fn_us = handler.unary_stream

            async def us(request: Any, context: grpc.aio.ServicerContext) -> Any:
                await check(request, context)
                async for item in fn_us(request, context):
                    yield item

            return grpc.unary_stream_rpc_method_handler(us, des, ser)
        if handler.stream_unary:
            fn_su = handler.stream_unary

            async def su(it: Any, context: grpc.aio.ServicerContext) -> Any:
                return await fn_su(checked_iter(it, context), context)

            return grpc.stream_unary_rpc_method_handler(su, des, ser)
        if handler.stream_stream:
            fn_ss = handler.stream_stream

            async def ss(it: Any, context: grpc.aio.ServicerContext) -> Any:
                async for item in fn_ss(checked_iter(it, context), context):
                    yield item

            return grpc.stream_stream_rpc_method_handler(ss, des, ser)
        return handler


#: gRPC message size limit of every kolm server and client
MAX_MESSAGE = 16 * 1024 * 1024


def new_server(interceptors: Sequence[grpc.aio.ServerInterceptor] = ()) -> grpc.aio.Server:
    """A ``grpc.aio`` server with kolm's interceptor chain and message limits.

    Outermost :class:`MalformedRequestInterceptor` (undecodable bytes → INVALID_ARGUMENT),
    then ``interceptors`` (e.g. authorization), then :class:`ErrorInterceptor`.
    """
    return grpc.aio.server(
        interceptors=[MalformedRequestInterceptor(), *interceptors, ErrorInterceptor()],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
        ],
    )


async def bind_and_start(
    server: grpc.aio.Server,
    listen: str,
    credentials: grpc.ServerCredentials | None,
    service_names: Sequence[str],
) -> tuple[int, health.aio.HealthServicer]:
    """Add health + reflection, bind ``listen`` (TLS when ``credentials``), start, mark SERVING."""
    hs = add_standard_services(server, service_names)
    port = (
        server.add_secure_port(listen, credentials)
        if credentials
        else server.add_insecure_port(listen)
    )
    if port == 0:
        raise InvalidInput(f"cannot listen on {listen}")
    await server.start()
    await set_serving(hs, service_names, True)
    return port, hs


def write_ready_file(path: str | None, port: int) -> None:
    """Write the bound port to ``path`` atomically (for scripts waiting on a server)."""
    if path:
        from pathlib import Path

        tmp = Path(path).with_name(Path(path).name + ".tmp")
        tmp.write_text(str(port))
        tmp.replace(path)
