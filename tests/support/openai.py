"""A chat-completions endpoint on 127.0.0.1 (port 0) with scriptable failures: the
OpenAI-compatible teacher's test double (tests/compile/test_teachers*.py)."""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["FakeOpenAI"]


class FakeOpenAI:
    """A chat-completions endpoint with scriptable failures.

    ``script`` is consumed one entry per request: an int status to answer with,
    ("sleep", seconds) to stall before answering normally, or ("status", code,
    headers, body). Without a script entry it answers 200 with ``n`` choices
    (or one, if ``honor_n`` is false) whose content is ``answer(input, i)``.
    """

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.script: list[Any] = []
        self.honor_n = True
        self.delay = 0.0
        self.fail_inputs: set[str] = set()
        self.answer: Callable[[str, int], str] = lambda text, i: "card_arrival"
        self.inflight = 0
        self.max_inflight = 0
        self._lock = threading.Lock()
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake._lock:
                    fake.requests.append(
                        {"path": self.path, "body": body, "auth": self.headers.get("Authorization")}
                    )
                    action = fake.script.pop(0) if fake.script else None
                    fake.inflight += 1
                    fake.max_inflight = max(fake.max_inflight, fake.inflight)
                try:
                    fake.handle(self, body, action)
                finally:
                    with fake._lock:
                        fake.inflight -= 1

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    @property
    def count(self) -> int:
        return len(self.requests)

    def handle(
        self, h: http.server.BaseHTTPRequestHandler, body: dict[str, Any], action: Any
    ) -> None:
        if self.delay:
            time.sleep(self.delay)
        user = body["messages"][-1]["content"]
        text = user.rsplit("Input:\n", 1)[-1]
        if isinstance(action, int):
            action = ("status", action, {}, {"error": {"message": f"injected {action}"}})
        if isinstance(action, tuple) and action[0] == "sleep":
            time.sleep(action[1])
            action = None
        if action is None and text in self.fail_inputs:
            action = ("status", 500, {}, {"error": {"message": "boom"}})
        if action is not None:
            _, status, headers, payload = action
            return self.reply(h, status, payload, headers)
        if h.path != "/v1/chat/completions":
            return self.reply(h, 404, {"error": {"message": "no such path"}})
        n = body.get("n", 1) if self.honor_n else 1
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": self.answer(text, i)},
                "finish_reason": "stop",
            }
            for i in range(n)
        ]
        usage = {"prompt_tokens": 11, "completion_tokens": 3 * n, "total_tokens": 11 + 3 * n}
        self.reply(
            h,
            200,
            {
                "id": "x",
                "object": "chat.completion",
                "model": body["model"],
                "choices": choices,
                "usage": usage,
            },
        )

    @staticmethod
    def reply(h: Any, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            h.send_header(key, value)
        h.end_headers()
        h.wfile.write(data)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
