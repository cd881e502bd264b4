"""Real servers for tests: a ledger service, or any kolm service, on its own loop in a thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from kolm_ledger.formats.dsse import Envelope
from kolm_ledger.formats.receipts import sign_statement
from kolm_ledger.keys import PrivateKey, TrustRoot
from support.receipts import label_statement

__all__ = ["LedgerThread", "ServiceThread", "label_envelope"]


def label_envelope(key: PrivateKey, who: str, i: int) -> Envelope:
    """A distinct signed ``label`` receipt per (``who``, ``i``): load for crash/shutdown tests."""
    st = label_statement(input_value=f"{who} ticket {i}", job_id=f"job-{who}")
    return sign_statement(st, key)


class LedgerThread:
    """A real ledger service on its own event loop in a thread; can stop and restart."""

    def __init__(self, db: str, trust: TrustRoot, log_key: PrivateKey) -> None:
        self.db, self.trust, self.log_key = db, trust, log_key
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port = 0
        self.srv: Any = None
        self.start()

    def run(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        from kolm_ledger.service.server import start

        self.srv = self.run(
            start(
                self.db, self.trust, self.log_key, listen=f"127.0.0.1:{self.port}", max_wait_ms=0.5
            )
        )
        self.port = self.srv.port

    def stop(self) -> None:
        if self.srv is not None:
            self.run(self.srv.stop(0.5))
            self.srv = None

    def close(self) -> None:
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class ServiceThread:
    """A started kolm service (``.port``, ``async stop(grace)``) on its own event loop in a thread.

    ``starter`` is called on that loop and returns the coroutine that starts the service,
    e.g. ``lambda: kolm_compile.service.start(runner)``.
    """

    def __init__(self, starter: Callable[[], Awaitable[Any]], timeout: float = 120) -> None:
        import grpc

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def go() -> Any:
            return await starter()

        self.srv = self.run(go(), timeout)
        self.port: int = self.srv.port
        # a client that can send more than the servers accept (to provoke RESOURCE_EXHAUSTED)
        self.channel = grpc.insecure_channel(
            self.target, options=[("grpc.max_send_message_length", 64 << 20)]
        )

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def run(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def serving(self, service: str) -> bool:
        """Whether the gRPC health check says ``service`` is SERVING."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        r = health_pb2_grpc.HealthStub(self.channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=10
        )
        return bool(r.status == health_pb2.HealthCheckResponse.SERVING)

    def close(self, grace: float = 0.5) -> None:
        self.channel.close()
        self.run(self.srv.stop(grace), 120)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
