"""The inference service over real gRPC: load refusals, receipts, batching, escape hatch,
fail-closed, the spool (with kill -9 of a ``kolm infer serve`` process), verification.

Real servers throughout: a ledger service in a thread (SQLite), the inference service
in another thread or in a subprocess, the small real artifact of test_infer_engine.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from test_infer_engine import (  # the shared world (a session fixture built once)
    LABELS,
    FakeTeacher,
    LedgerThread,
    World,
    fake_teacher,  # noqa: F401 - a fixture
    flip_byte,
    rezip,
    world,  # noqa: F401 - a fixture
)

from kolm_infer._pb import infer_pb2 as pb
from kolm_infer._pb import infer_pb2_grpc as pb_grpc
from kolm_ledger.errors import ArtifactError
from kolm_ledger.formats.bundle import Bundle
from kolm_ledger.formats.canonical import canonical_json
from kolm_ledger.formats.dsse import Envelope
from kolm_ledger.formats.leaf import entry_leaf_hash, statement_digest
from kolm_ledger.formats.receipts import Statement
from kolm_ledger.keys import PrivateKey
from kolm_ledger.log.sequencer import Promise, verify_promise
from kolm_ledger.service.client import LedgerClient
from kolm_ledger.verify.receipt import input_commitment, verify_prediction

pytestmark = [pytest.mark.ml, pytest.mark.slow]

CARD = "I am still waiting on my card?"


class InferThread:
    """The inference service on its own event loop in a thread."""

    def __init__(self, w: World, ledger: LedgerThread, **kw: Any) -> None:
        from kolm_infer.service import start

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.srv = self.run(start(ledger.target, w.trust, w.key("infer"), **kw), timeout=120)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.srv.port}")
        self.stub = pb_grpc.InferenceStub(self.channel)

    def run(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.channel.close()
        self.run(self.srv.stop(1))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def infer(
    world: World,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[InferThread]:
    srv = InferThread(
        world,
        world.ledger,
        artifacts=[world.artifacts["router"]],
        artifacts_dir=tmp_path_factory.getbasetemp(),  # LoadArtifact(path=...) reads here
        max_batch=16,
    )
    try:
        yield srv
    finally:
        srv.close()


def predict(stub: Any, text: str = CARD, **kw: Any) -> pb.PredictResponse:
    return stub.Predict(pb.PredictRequest(artifact=kw.pop("artifact", "router"), input=text, **kw))


def statement_of(r: pb.PredictResponse) -> Statement:
    return Statement.from_envelope(Envelope.from_bytes(r.envelope))


# --------------------------------------------------------------------------- load refusals


def _edit_manifest(top: Path) -> None:
    m = json.loads((top / "manifest.json").read_text())
    m["confidence_threshold"] = 0.01
    (top / "manifest.json").write_text(json.dumps(m))


def _edit_signature(top: Path) -> None:
    b = json.loads((top / "model.sig").read_text())
    sig = bytearray(base64.b64decode(b["dsseEnvelope"]["signatures"][0]["sig"]))
    sig[len(sig) // 2] ^= 1
    b["dsseEnvelope"]["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()
    (top / "model.sig").write_text(json.dumps(b))


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("adapter byte", "adapter/adapter_model.safetensors has digest"),
        ("manifest", "manifest.json has digest"),
        ("signature", "not signed by a trusted, valid compile key"),
        ("untrusted key", "not signed by a trusted, valid compile key"),
        ("never logged", "has no artifact receipt in the ledger"),
        ("extra file", "files differ from the signed manifest"),
    ],
)
def test_load_refuses_with_failed_precondition(
    world: World,  # noqa: F811
    infer: InferThread,
    tmp_path: Path,
    case: str,
    reason: str,
) -> None:
    src = world.artifacts["router"]
    if case == "adapter byte":
        bad = rezip(
            src, tmp_path / "a.kolm", lambda t: flip_byte(t / "adapter/adapter_model.safetensors")
        )
    elif case == "manifest":
        bad = rezip(src, tmp_path / "a.kolm", _edit_manifest)
    elif case == "signature":
        bad = rezip(src, tmp_path / "a.kolm", _edit_signature)
    elif case == "extra file":
        bad = rezip(src, tmp_path / "a.kolm", lambda t: (t / "evil.py").write_text("x"))
    elif case == "untrusted key":
        bad, _ = world.build("rogue", key=PrivateKey.generate(), out_dir=tmp_path)
    else:
        bad, _ = world.build("unlogged", threshold=0.25, log_to=None, out_dir=tmp_path)
    with pytest.raises(grpc.RpcError) as ei:
        infer.stub.LoadArtifact(pb.LoadArtifactRequest(path=str(bad), name=f"bad-{case}"))
    assert ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION, ei.value.details()
    assert reason in ei.value.details()
    names = [a.name for a in infer.stub.ListArtifacts(pb.ListArtifactsRequest()).artifacts]
    assert names == ["router"]


@pytest.mark.parametrize(
    "case",
    ["extra unsigned file", "signed pickle", "missing signed file", "symlink entry",
     "dot-dot entry", "duplicate entry"],
)  # fmt: skip
def test_load_refuses_what_kolm_verify_artifact_refuses(
    world: World,  # noqa: F811
    infer: InferThread,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    case: str,
) -> None:
    """The loader and ``kolm verify --artifact`` run one check (kolm_ledger.verify.artifact):
    the cases of test_artifact_check are refused here with the same words."""
    from support.artifacts import REFUSED, Art, make_bad

    a = Art(world.root, world.keys, world.trust, world.artifacts["router"], "", world.adapter)
    bad = make_bad(a, case, tmp_path / "bad.kolm", monkeypatch)
    with pytest.raises(grpc.RpcError) as ei:
        infer.stub.LoadArtifact(pb.LoadArtifactRequest(path=str(bad), name=f"bad-{case}"))
    assert ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION, ei.value.details()
    assert REFUSED[case][1] in str(ei.value.details())
    names = [a.name for a in infer.stub.ListArtifacts(pb.ListArtifactsRequest()).artifacts]
    assert names == ["router"]


def test_load_by_path_reads_only_the_artifacts_folder(
    world: World,  # noqa: F811
    infer: InferThread,
    tmp_path: Path,
) -> None:
    """An existing host file and a missing one outside the folder get the same answer
    (before, "no such artifact file" vs "not a readable zip archive" told them apart)."""
    inside = infer.srv.engine.artifacts_dir
    assert inside is not None and tmp_path.is_relative_to(inside)
    link = tmp_path / "link.kolm"
    link.symlink_to("/etc/hostname")
    answers = []
    for path in ("/etc/hostname", "/etc/no-such-file.kolm", f"{inside}/../etc/hostname", link):
        with pytest.raises(grpc.RpcError) as ei:
            infer.stub.LoadArtifact(pb.LoadArtifactRequest(path=str(path)))
        answers.append((ei.value.code(), str(ei.value.details()).replace(repr(str(path)), "P")))
    assert answers[0][0] == grpc.StatusCode.INVALID_ARGUMENT
    assert "is not a file in the service's artifacts folder" in answers[0][1]
    assert all(a == answers[0] for a in answers), answers
    # inside the folder a missing file is the loader's ordinary refusal
    with pytest.raises(grpc.RpcError) as ei:
        infer.stub.LoadArtifact(pb.LoadArtifactRequest(path=str(tmp_path / "none.kolm")))
    assert ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # a relative path is taken from the folder; a good artifact there loads
    good = world.build("in-folder", threshold=0.35, out_dir=tmp_path)[0]
    info = infer.stub.LoadArtifact(
        pb.LoadArtifactRequest(path=str(good.relative_to(inside)), name="in-folder")
    )
    assert info.name == "in-folder"
    infer.stub.UnloadArtifact(pb.UnloadArtifactRequest(artifact="in-folder"))


def test_without_an_artifacts_folder_load_by_path_is_refused(world: World) -> None:  # noqa: F811
    srv = InferThread(world, world.ledger)
    try:
        for path in (str(world.artifacts["router"]), "/etc/hostname"):
            with pytest.raises(grpc.RpcError) as ei:
                srv.stub.LoadArtifact(pb.LoadArtifactRequest(path=path))
            assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "this service has no artifacts folder" in str(ei.value.details())
        info = srv.stub.LoadArtifact(
            pb.LoadArtifactRequest(data=world.artifacts["router"].read_bytes())
        )
        assert info.name == "router"
    finally:
        srv.close()


def test_a_revoked_compile_key_is_refused(world: World) -> None:  # noqa: F811
    from kolm_infer.engine import Engine

    ck = world.key("compile").keyid()
    revoked = world.trust.revoke(ck, datetime.now(UTC) - timedelta(seconds=1))
    with LedgerClient(world.ledger.target) as c:
        eng = Engine(revoked, c)
        try:
            with pytest.raises(ArtifactError, match="revoked") as ei:
                eng.verify(world.artifacts["router"])
            assert ei.value.grpc_code == "FAILED_PRECONDITION"
        finally:
            asyncio.run(eng.close())


# --------------------------------------------------------------------------- predictions


def test_predict_returns_the_answer_with_an_acknowledged_receipt(
    world: World,  # noqa: F811
    infer: InferThread,
) -> None:
    r = predict(infer.stub, request_id="req-1")
    assert r.output in LABELS and r.verified and r.backend == "student"
    assert r.reason == "confident" and r.request_id == "req-1"
    assert r.WhichOneof("receipt") == "promise"
    env = Envelope.from_bytes(r.envelope)
    p = r.promise
    promise = Promise(p.origin, p.index, p.leaf_hash, p.integrated_time_us, p.key_id, p.signature)
    verify_promise(promise, world.key("log").public_key())
    # log format v2: the leaf binds the envelope and its integration time
    assert promise.leaf_hash == entry_leaf_hash(env, p.integrated_time_us)
    st = statement_of(r)
    pred = st.predicate
    assert st.kind == "prediction"
    assert pred["artifact_digest"] == r.artifact_digest
    assert len(r.salt) == 32
    assert pred["input_commitment"] == input_commitment(CARD, r.salt) == r.input_commitment
    assert pred["output"] == r.output and pred["backend"] == "student"
    assert pred["reason"] == "confident" and pred["request_id"] == "req-1"
    assert pred["verifier_verdict"]["ok"] is True
    assert CARD not in r.envelope.decode()  # only the commitment
    assert pred["latency_ms"] > 0 and 0 < pred["confidence"] <= 1
    # the salt is fresh per request
    assert predict(infer.stub).salt != r.salt


def test_wait_for_inclusion_returns_a_bundle_that_kolm_verify_accepts(
    world: World,  # noqa: F811
    infer: InferThread,
    tmp_path: Path,
) -> None:
    r = predict(infer.stub, wait_for_inclusion=True)
    assert r.WhichOneof("receipt") == "bundle"
    b = tmp_path / "p.kolm-receipt.json"
    b.write_bytes(r.bundle)
    inp = tmp_path / "input.txt"
    inp.write_text(CARD)
    trust = world.keys / "trust.json"
    base = ["verify", str(b), "--trust", str(trust)]
    out = kolm(*base, "--ledger", world.ledger.target, "--input", inp, "--salt", r.salt.hex())
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"K-score {world.k_score:.1f}" in out.stdout
    assert "(9)   the input matches the commitment" in out.stdout
    assert "OK: prediction receipt" in out.stdout
    # offline, with no ledger: steps 1-7 only
    out = kolm(*base)
    assert out.returncode == 0 and out.stdout.count("\n") == 1, out.stdout
    assert out.stdout.startswith("OK: prediction receipt at index")
    # the wrong salt fails at step 9
    out = kolm(*base, "--ledger", world.ledger.target, "--input", inp, "--salt", "00" * 32)
    assert out.returncode == 1 and out.stdout.startswith("FAILED at step 9"), out.stdout
    # another input fails at step 9
    inp.write_text(CARD + " ")
    out = kolm(*base, "--input", inp, "--salt", r.salt.hex())
    assert out.returncode == 1 and out.stdout.startswith("FAILED at step 9"), out.stdout
    # a changed output fails the signature (step 3)
    obj = json.loads(r.bundle)
    payload = json.loads(base64.b64decode(obj["envelope"]["payload"]))
    payload["predicate"]["output"] = "exchange_rate" if r.output != "exchange_rate" else "x"
    obj["envelope"]["payload"] = base64.b64encode(canonical_json(payload)).decode()
    b.write_text(json.dumps(obj))
    out = kolm(*base)
    assert out.returncode == 1 and out.stdout.startswith("FAILED at step 3"), out.stdout
    # and in Python: the API names the same step
    v = verify_prediction(
        Bundle.from_bytes(r.bundle),
        world.trust,
        artifact_bundle=LedgerClient(world.ledger.target).bundle(
            index=infer.srv.engine.get("router").receipt_index
        ),
        input_value=CARD,
        salt=r.salt,
    )
    assert v.k_score == pytest.approx(world.k_score) and v.input_checked


def kolm(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kolm", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def test_concurrent_clients_all_get_answers_and_receipts_in_batches(
    world: World,  # noqa: F811
    infer: InferThread,
) -> None:
    texts = [t for t, _ in world.holdout]
    before = dict(infer.srv.engine.batch_sizes)

    def client(i: int) -> list[pb.PredictResponse]:
        with grpc.insecure_channel(f"127.0.0.1:{infer.srv.port}") as ch:
            stub = pb_grpc.InferenceStub(ch)
            return [predict(stub, texts[(i + j) % len(texts)]) for j in range(4)]

    with ThreadPoolExecutor(16) as ex:
        results = [r for rs in ex.map(client, range(16)) for r in rs]
    assert len(results) == 64
    assert all(r.WhichOneof("receipt") == "promise" for r in results)
    assert len({r.promise.index for r in results}) == 64
    after = infer.srv.engine.batch_sizes
    grown = {n: c - before.get(n, 0) for n, c in after.items() if c > before.get(n, 0)}
    assert max(grown) > 1, grown
    assert max(infer.srv.writer.batches) > 1, "receipts were not appended in batches"
    # prometheus saw them too
    from prometheus_client import REGISTRY

    assert REGISTRY.get_sample_value("kolm_infer_batch_size_count") >= sum(grown.values())
    assert REGISTRY.get_sample_value(
        "kolm_infer_predictions_total", {"backend": "student", "reason": "confident"}
    )


def test_predict_stream(infer: InferThread, world: World) -> None:  # noqa: F811
    texts = [t for t, _ in world.holdout][:12]
    reqs = [
        pb.PredictRequest(artifact="router", input=t, request_id=f"s{i}")
        for i, t in enumerate(texts)
    ]
    out = list(infer.stub.PredictStream(iter(reqs)))
    assert sorted(r.request_id for r in out) == sorted(f"s{i}" for i in range(12))
    by_id = {r.request_id: r for r in out}
    for i, t in enumerate(texts):
        assert by_id[f"s{i}"].input_commitment == input_commitment(t, by_id[f"s{i}"].salt)


def test_list_unload_and_unknown_artifacts(world: World, infer: InferThread) -> None:  # noqa: F811
    path, digest = world.build("second", threshold=0.1)
    info = infer.stub.LoadArtifact(pb.LoadArtifactRequest(data=path.read_bytes(), name="two"))
    assert info.digest == digest and info.name == "two"
    assert info.k_score == pytest.approx(world.k_score) and info.signer_key_id
    arts = {a.name: a for a in infer.stub.ListArtifacts(pb.ListArtifactsRequest()).artifacts}
    assert set(arts) == {"router", "two"}
    assert arts["router"].digest != digest  # another manifest, another digest
    r = predict(infer.stub, artifact=digest)  # addressed by digest
    assert r.artifact_digest == digest
    assert infer.stub.UnloadArtifact(pb.UnloadArtifactRequest(artifact="two")).digest == digest
    with pytest.raises(grpc.RpcError) as ei:
        predict(infer.stub, artifact="two")
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_and_reflection(infer: InferThread) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    h = health_pb2_grpc.HealthStub(infer.channel)
    r = h.Check(health_pb2.HealthCheckRequest(service="kolm.infer.v1.Inference"))
    assert r.status == health_pb2.HealthCheckResponse.SERVING


# --------------------------------------------------------------------------- escape hatch, policy


def test_escape_hatch_receipt_says_teacher_and_why(
    world: World,  # noqa: F811
    fake_teacher: FakeTeacher,  # noqa: F811
) -> None:
    strict, _ = world.build("strict", threshold=1.0)
    teacher, task = fake_teacher.build(world.root / "teacher-svc")
    srv = InferThread(
        world,
        world.ledger,
        artifacts=[strict, world.artifacts["router"]],
        teacher=teacher,
        teacher_task=task,
        output_policy="digest",
    )
    try:
        r = predict(srv.stub, artifact="strict")
        assert (r.backend, r.reason, r.output, r.verified) == (
            "teacher",
            "low_confidence",
            "card_arrival",
            True,
        )
        pred = statement_of(r).predicate
        assert pred["backend"] == "teacher" and pred["reason"] == "low_confidence"
        assert pred["teacher"] == {"backend": "openai", "model": "gpt-test"}
        assert "output" not in pred  # output policy: digest only
        from kolm_ledger.formats.canonical import digest_hex

        assert statement_of(r).subjects[0].sha256 == digest_hex("card_arrival")
        r = predict(srv.stub, artifact="router")
        assert statement_of(r).predicate["backend"] == "student"
        assert fake_teacher.calls == 1
    finally:
        srv.close()


# --------------------------------------------------------------------------- ledger down


@pytest.fixture
def ledger2(world: World, tmp_path: Path) -> Iterator[tuple[LedgerThread, Path]]:  # noqa: F811
    """A second ledger (stoppable) holding the router artifact's receipts."""
    led = LedgerThread(f"sqlite:///{tmp_path / 'l2.db'}", world.trust, world.key("log"))
    try:
        path, _ = world.build("router", log_to=led, out_dir=tmp_path / "arts")
        yield led, path
    finally:
        led.close()


def test_ledger_down_fails_closed_with_unavailable(
    world: World,  # noqa: F811
    ledger2: tuple[LedgerThread, Path],
) -> None:
    led, path = ledger2
    srv = InferThread(world, led, artifacts=[path])
    try:
        assert predict(srv.stub).WhichOneof("receipt") == "promise"
        led.stop()
        with pytest.raises(grpc.RpcError) as ei:
            predict(srv.stub)
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "ledger" in ei.value.details()
        led.start()
        # the service's channel reconnects with backoff: the ledger is soon reachable again
        wait_for(lambda: _answers(srv.stub), timeout=30)
    finally:
        srv.close()


def _answers(stub: Any) -> bool:
    try:
        return predict(stub).WhichOneof("receipt") == "promise"
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.UNAVAILABLE
        return False


def sd(envelope: bytes) -> bytes:
    """The statement digest of an envelope: what the spool keys a receipt by (its leaf
    hash binds the integration time, known only once the ledger integrated it)."""
    return statement_digest(Envelope.from_bytes(envelope))


def ledger_statements(target: str) -> list[bytes]:
    """The statement digests of the ledger's entries, in index order."""
    with LedgerClient(target) as c:
        return [sd(e.envelope) for e in c.entries()]


def wait_for(cond: Any, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("timed out")
        time.sleep(0.1)


def test_spool_answers_while_the_ledger_is_down_then_replays_in_order(
    world: World,  # noqa: F811
    ledger2: tuple[LedgerThread, Path],
    tmp_path: Path,
) -> None:
    led, path = ledger2
    spool = tmp_path / "spool.db"
    srv = InferThread(world, led, artifacts=[path], spool=spool)
    try:
        led.stop()
        rs = [predict(srv.stub, t) for t, _ in world.holdout[:6]]
        assert all(r.WhichOneof("receipt") == "spooled" and r.spooled for r in rs)
        leaves = [sd(r.envelope) for r in rs]
        assert srv.srv.spool.leaf_hashes() == leaves
        led.start()
        wait_for(lambda: srv.srv.spool.depth() == 0)
        got = ledger_statements(led.target)
        # every spooled receipt is in the ledger, in the order the answers were made
        assert [h for h in got if h in set(leaves)] == leaves
        assert predict(srv.stub).WhichOneof("receipt") == "promise"
    finally:
        srv.close()


def test_spool_survives_kill_9_of_kolm_infer_serve(
    world: World,  # noqa: F811
    ledger2: tuple[LedgerThread, Path],
    tmp_path: Path,
) -> None:
    led, path = ledger2
    spool = tmp_path / "spool.db"

    def serve() -> tuple[subprocess.Popen[bytes], pb_grpc.InferenceStub, grpc.Channel]:
        ready = tmp_path / "ready"
        ready.unlink(missing_ok=True)
        logf = tmp_path / "serve.log"
        with logf.open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "kolm", "infer", "serve",
                 "--insecure",
                 "--artifacts", str(path.parent), "--ledger", led.target,
                 "--key", str(world.keys / "infer.key"), "--trust", str(world.keys / "trust.json"),
                 "--spool", str(spool), "--listen", "127.0.0.1:0", "--ready-file", str(ready),
                 "--log-level", "WARNING"],
                env={**os.environ, "HF_HUB_OFFLINE": "1"},
                stdout=subprocess.DEVNULL,
                stderr=log,
            )  # fmt: skip
        end = time.monotonic() + 120
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > end:
                proc.kill()
                raise AssertionError(logf.read_text())
            time.sleep(0.1)
        ch = grpc.insecure_channel(f"127.0.0.1:{ready.read_text()}")
        return proc, pb_grpc.InferenceStub(ch), ch

    proc, stub, ch = serve()
    try:
        assert predict(stub).WhichOneof("receipt") == "promise"
        led.stop()
        rs = [predict(stub, t) for t, _ in world.holdout[:5]]
        assert all(r.spooled for r in rs)
        leaves = [sd(r.envelope) for r in rs]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        ch.close()
    with sqlite3.connect(spool) as db:
        assert [r[0] for r in db.execute("SELECT leaf_hash FROM spool ORDER BY seq")] == leaves
    led.start()
    proc, stub, ch = serve()
    try:
        wait_for(lambda: set(leaves) <= set(ledger_statements(led.target)))
        got = ledger_statements(led.target)
        assert [h for h in got if h in set(leaves)] == leaves
        assert predict(stub).WhichOneof("receipt") == "promise"
    finally:
        ch.close()
        proc.send_signal(signal.SIGTERM)  # graceful shutdown
        assert proc.wait(30) == 0


# --------------------------------------------------------------------------- receipt transport


def _receipts(world: World, n: int, tag: str) -> list[Envelope]:  # noqa: F811
    from kolm_infer.receipts import sign_prediction

    key = world.key("infer")
    return [
        sign_prediction(
            key,
            artifact_digest="a" * 64,
            input_value=f"{tag} {i}",
            output="card_arrival",
            verdict={"ok": True},
            backend="student",
            reason="confident",
            confidence=0.9,
            latency_ms=1.0,
            request_id=f"{tag}-{i}",
        )[0]
        for i in range(n)
    ]


def test_receipts_share_one_persistent_append_stream(
    world: World,  # noqa: F811
    infer: InferThread,
) -> None:
    predict(infer.stub)
    client = infer.srv.ledger
    opened = client.append_streams_opened
    assert opened >= 1
    texts = [t for t, _ in world.holdout][:16]
    with ThreadPoolExecutor(8) as ex:
        rs = list(ex.map(lambda t: predict(infer.stub, t), texts))
    assert all(r.WhichOneof("receipt") == "promise" for r in rs)
    assert client.append_streams_opened == opened, "a stream per batch, not one for all"


def test_ledger_shutdown_ends_an_open_append_stream_and_the_client_reopens_one(
    world: World,  # noqa: F811
    tmp_path: Path,
) -> None:
    from kolm_ledger.errors import UnavailableError
    from kolm_ledger.service.client import AppendResult, AsyncLedgerClient

    led = LedgerThread(f"sqlite:///{tmp_path / 'l3.db'}", world.trust, world.key("log"))
    envs = _receipts(world, 6, "pipe")

    async def scenario() -> None:
        c = AsyncLedgerClient(led.target, timeout=10)
        try:
            first = await c.append_pipelined(envs[:2])
            assert all(isinstance(r, AppendResult) for r in first)
            # several batches in flight at once on the one stream, answered in order
            rs = await asyncio.gather(*(c.append_pipelined([e]) for e in envs[2:4]))
            assert (
                [r[0].leaf_hash for r in rs]
                == [  # type: ignore[union-attr]
                    entry_leaf_hash(e, r[0].integrated_time_us)  # type: ignore[union-attr]
                    for e, r in zip(envs[2:4], rs, strict=True)
                ]
            )
            assert c.append_streams_opened == 1
            # a graceful stop is not held up by the open stream: with a grace far longer
            # than the test may take, the stop still returns (the bound only fails a hang)
            await asyncio.wait_for(asyncio.to_thread(led.run, led.srv.stop(3600)), 120)
            led.srv = None
            with pytest.raises(UnavailableError):
                await c.append_pipelined([envs[4]])
            await asyncio.to_thread(led.start)
            end = time.monotonic() + 30
            while True:  # the channel reconnects with backoff
                try:
                    (r,) = await c.append_pipelined([envs[4]])
                    break
                except UnavailableError:
                    assert time.monotonic() < end
                    await asyncio.sleep(0.1)
            assert isinstance(r, AppendResult) and not r.duplicate
            assert c.append_streams_opened >= 2
            # appending again is idempotent: the original index, and a promise
            (d,) = await c.append_pipelined([envs[0]])
            assert isinstance(d, AppendResult) and d.duplicate
            assert d.index == first[0].index  # type: ignore[union-attr]
        finally:
            await c.close()

    try:
        asyncio.run(scenario())
    finally:
        led.close()


def test_spool_first_ack_needs_a_spool(tmp_path: Path) -> None:
    from kolm_infer.receipts import ReceiptWriter, Spool
    from kolm_ledger.errors import InvalidInput
    from kolm_ledger.service.client import AsyncLedgerClient

    async def scenario() -> None:
        c = AsyncLedgerClient("127.0.0.1:1")
        try:
            with pytest.raises(InvalidInput, match="needs a spool"):
                ReceiptWriter(c, ack="spool")
            with pytest.raises(InvalidInput, match="receipt ack"):
                ReceiptWriter(c, spool=Spool(tmp_path / "s.db"), ack="local")
        finally:
            await c.close()

    asyncio.run(scenario())


def test_spool_first_answers_from_the_spool_and_ships_to_the_ledger_in_order(
    world: World,  # noqa: F811
    ledger2: tuple[LedgerThread, Path],
    tmp_path: Path,
) -> None:
    led, path = ledger2
    srv = InferThread(
        world, led, artifacts=[path], spool=tmp_path / "spool.db", receipt_ack="spool"
    )
    try:
        texts = [t for t, _ in world.holdout]
        rs = [predict(srv.stub, t) for t in texts[:6]]
        # the answer came once the receipt was in the local spool: no promise
        assert all(r.WhichOneof("receipt") == "spooled" and r.spooled for r in rs)
        leaves = [sd(r.envelope) for r in rs]
        wait_for(lambda: srv.srv.spool.depth() == 0)
        got = ledger_statements(led.target)
        assert [h for h in got if h in set(leaves)] == leaves  # shipped, in order
        # wait_for_inclusion still goes to the ledger and returns the bundle
        assert predict(srv.stub, wait_for_inclusion=True).WhichOneof("receipt") == "bundle"
        # the ledger down: answers still come (durable locally), and are shipped later
        led.stop()
        more = [predict(srv.stub, t) for t in texts[6:9]]
        assert all(r.spooled for r in more)
        with pytest.raises(grpc.RpcError) as ei:  # the bundle needs the ledger
            predict(srv.stub, wait_for_inclusion=True)
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
        later = [sd(r.envelope) for r in more]
        assert srv.srv.spool.leaf_hashes() == later
        led.start()
        wait_for(lambda: srv.srv.spool.depth() == 0)
        got = ledger_statements(led.target)
        assert [h for h in got if h in set(leaves + later)] == leaves + later
    finally:
        srv.close()


_SPOOL_FIRST_WRITER = """
import asyncio, sys
from kolm_infer.receipts import ReceiptWriter, Spool, sign_prediction
from kolm_ledger.service.client import AsyncLedgerClient
from kolm_ledger.keys import PrivateKey
from kolm_ledger.formats.leaf import statement_digest

async def main() -> None:
    key = PrivateKey.load(sys.argv[2])
    w = ReceiptWriter(AsyncLedgerClient(sys.argv[3], timeout=5), spool=Spool(sys.argv[1]),
                      ack="spool")
    await w.start()
    for i in range(5):
        env = sign_prediction(key, artifact_digest="b" * 64, input_value=f"kill {i}",
                              output="card_arrival", verdict={"ok": True}, backend="student",
                              reason="confident", confidence=0.9, latency_ms=1.0,
                              request_id=f"kill-{i}")[0]
        ack = await w.submit(env)
        assert ack.spooled
        print(statement_digest(env).hex(), flush=True)  # the answer would go out now
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def test_spool_first_acks_survive_kill_9(
    world: World,  # noqa: F811
    tmp_path: Path,
) -> None:
    from kolm_infer.receipts import ReceiptWriter, Spool
    from kolm_ledger.service.client import AsyncLedgerClient

    led = LedgerThread(f"sqlite:///{tmp_path / 'l4.db'}", world.trust, world.key("log"))
    spool = tmp_path / "spool.db"
    try:
        led.stop()  # nothing can be shipped: every ack is the spool's alone
        proc = subprocess.Popen(
            [sys.executable, "-c", _SPOOL_FIRST_WRITER, str(spool),
             str(world.keys / "infer.key"), led.target],
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            acked = [bytes.fromhex(proc.stdout.readline().strip()) for _ in range(5)]
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            if proc.stdout is not None:
                proc.stdout.close()
        with sqlite3.connect(spool) as db:
            assert [r[0] for r in db.execute("SELECT leaf_hash FROM spool ORDER BY seq")] == acked
        led.start()

        async def replay() -> None:
            c = AsyncLedgerClient(led.target, timeout=10)
            w = ReceiptWriter(c, spool=Spool(spool), ack="spool")
            await w.start()
            try:
                end = time.monotonic() + 30
                while w.spool is not None and w.spool.depth() > 0:
                    assert time.monotonic() < end
                    await asyncio.sleep(0.05)
            finally:
                await w.close()
                await c.close()

        asyncio.run(replay())
        order = ledger_statements(led.target)
        assert set(acked) <= set(order)
        assert [h for h in order if h in set(acked)] == acked
    finally:
        led.close()
