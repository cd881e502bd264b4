"""Real servers for tests: a ledger service on its own event loop in a thread."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from kolm_ledger.keys import PrivateKey, TrustRoot

__all__ = ["LedgerThread"]


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
        from kolm_ledger.server import start

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
