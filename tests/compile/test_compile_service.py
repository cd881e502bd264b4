"""The compile service end to end: a real ledger service, the compile service on port 0,
jobs submitted, watched, cancelled, fetched, and resumed after a restart."""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from support.servers import LedgerThread

from kolm_compile._pb import compile_pb2 as pb
from kolm_compile._pb import compile_pb2_grpc as pb_grpc
from kolm_compile.artifact import verify_artifact
from kolm_compile.pipeline import STAGES
from kolm_compile.service import JobRunner
from kolm_compile.sinks import ServiceSink
from kolm_ledger.keys import PrivateKey, init_keys
from kolm_ledger.service.client import LedgerClient
from kolm_ledger.verify.trust import TrustState

pytestmark = [pytest.mark.ml, pytest.mark.slow]

EXAMPLES = Path(__file__).resolve().parents[2] / "kolm_compile" / "examples"
#: the service's --data-root here: the shipped Banking77 subset
DATA = EXAMPLES.parent / "data"


def example_spec() -> dict[str, Any]:
    """The example spec with its files named relative to :data:`DATA` (a submitted spec
    may not name ``..``)."""
    raw = yaml.safe_load((EXAMPLES / "banking77-router.yaml").read_text())
    raw["teacher"]["dataset"] = raw["teacher"]["dataset"].removeprefix("../data/")
    for k in ("unlabeled", "holdout"):
        raw["data"][k] = raw["data"][k].removeprefix("../data/")
    assert isinstance(raw, dict)
    return raw


def spec_text(labels: int = 3, per_label: int = 12, epochs: int = 2, **student: Any) -> str:
    raw = example_spec()
    raw["labels"] = raw["labels"][:labels]
    raw["data"]["limit_per_label"] = per_label
    raw["student"].update(epochs=epochs, max_length=32, batch_size=16, **student)
    return yaml.safe_dump(raw)


class CompileThread:
    """The compile service on its own event loop in a thread."""

    def __init__(self, work: Path, keys: Path, ledger: str) -> None:
        self.work, self.keys, self.ledger = work, keys, ledger
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.clients: list[LedgerClient] = []
        self.srv: Any = None
        self.start()

    def _sink(self) -> ServiceSink:
        c = LedgerClient(self.ledger, timeout=120)
        self.clients.append(c)
        return ServiceSink(c)

    def start(self) -> None:
        from kolm_compile.service import start

        runner = JobRunner(
            self.work, keys_dir=self.keys, sink_factory=self._sink, data_root=DATA, threads=1
        )
        self.srv = asyncio.run_coroutine_threadsafe(start(runner), self.loop).result(60)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.srv.port}")
        self.stub = pb_grpc.CompileStub(self.channel)

    def stop(self) -> None:
        if self.srv is not None:
            self.channel.close()
            asyncio.run_coroutine_threadsafe(self.srv.stop(0.5), self.loop).result(120)
            self.srv = None
            for c in self.clients:
                c.close()
            self.clients.clear()

    def close(self) -> None:
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    d = tmp_path_factory.mktemp("compile-service")
    trust = init_keys(d / "keys")
    ledger = LedgerThread(
        f"sqlite:///{d / 'ledger.db'}", trust, PrivateKey.load(d / "keys" / "log.key")
    )
    yield {"dir": d, "trust": trust, "ledger": ledger}
    ledger.close()


@pytest.fixture(scope="module")
def svc(world: dict[str, Any]) -> Iterator[CompileThread]:
    s = CompileThread(world["dir"] / "work", world["dir"] / "keys", world["ledger"].target)
    yield s
    s.close()


def watch(stub: Any, job_id: str) -> list[Any]:
    return list(stub.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=300))


def test_submit_watch_get_list_fetch(svc: CompileThread, world: dict[str, Any]) -> None:
    job = svc.stub.SubmitJob(pb.SubmitJobRequest(spec_yaml=spec_text()))
    assert job.id and job.state in ("queued", "running")
    events = watch(svc.stub, job.id)
    stage_events = [e for e in events if e.stage != "job"]
    assert [e.stage for e in stage_events if e.state == "started"] == list(STAGES)
    assert [e.stage for e in stage_events if e.state == "finished"] == list(STAGES)
    assert [e.state for e in events if e.stage == "job"] == ["queued", "running", "succeeded"]

    got = svc.stub.GetJob(pb.GetJobRequest(job_id=job.id))
    assert got.state == "succeeded", got.error
    assert got.last_finished_stage == "package"
    result = json.loads(got.result_json)
    assert got.artifact_digest == result["artifact_digest"]
    assert result["k_score"]["score"] > 100 / 3  # learned: beats chance on 3 labels

    listed = svc.stub.ListArtifacts(pb.ListArtifactsRequest()).artifacts
    (art,) = [a for a in listed if a.job_id == job.id]
    assert art.digest == got.artifact_digest and art.name == "banking77-router.kolm"

    chunks = list(svc.stub.FetchArtifact(pb.FetchArtifactRequest(digest=art.digest)))
    data = b"".join(c.data for c in chunks)
    assert [c.offset for c in chunks] == [i * 1024 * 1024 for i in range(len(chunks))]
    assert len(data) == art.size
    assert all(not c.sha256 for c in chunks[:-1])
    assert chunks[-1].sha256 == hashlib.sha256(data).hexdigest()
    assert art.file_digest.removeprefix("sha256:") == chunks[-1].sha256
    out = world["dir"] / "fetched.kolm"
    out.write_bytes(data)
    v = verify_artifact(out, TrustState(world["trust"]), into=world["dir"] / "v")
    assert v.digest == got.artifact_digest
    # a copy for the inference service
    assert (svc.work / "artifacts" / "banking77-router.kolm").read_bytes() == data


def test_errors_name_the_problem(svc: CompileThread) -> None:
    bad = yaml.safe_load(spec_text())
    bad["student"]["epochs"] = 0
    with pytest.raises(grpc.RpcError) as e:
        svc.stub.SubmitJob(pb.SubmitJobRequest(spec_yaml=yaml.safe_dump(bad)))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "spec.student.epochs" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        svc.stub.SubmitJob(pb.SubmitJobRequest(spec_yaml="name: [unclosed"))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for call in (
        lambda: svc.stub.GetJob(pb.GetJobRequest(job_id="job-nope")),
        lambda: svc.stub.CancelJob(pb.CancelJobRequest(job_id="job-nope")),
        lambda: watch(svc.stub, "job-nope"),
    ):
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.NOT_FOUND, e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        svc.stub.FetchArtifact(pb.FetchArtifactRequest(digest="sha256:00")).next()
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_cancel_running_and_queued_jobs(svc: CompileThread) -> None:
    running = svc.stub.SubmitJob(pb.SubmitJobRequest(spec_yaml=spec_text(epochs=50)))
    queued = svc.stub.SubmitJob(pb.SubmitJobRequest(spec_yaml=spec_text()))
    c = svc.stub.CancelJob(pb.CancelJobRequest(job_id=queued.id))
    assert c.state == "cancelled"
    for e in svc.stub.WatchJob(pb.WatchJobRequest(job_id=running.id), timeout=300):
        if e.stage == "train" and e.state == "progress":
            break
    svc.stub.CancelJob(pb.CancelJobRequest(job_id=running.id))
    events = watch(svc.stub, running.id)
    assert events[-1].stage == "job" and events[-1].state == "cancelled"
    got = svc.stub.GetJob(pb.GetJobRequest(job_id=running.id))
    assert got.state == "cancelled" and got.last_finished_stage == "sign"
    with pytest.raises(grpc.RpcError) as e:
        svc.stub.CancelJob(pb.CancelJobRequest(job_id=running.id))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "already cancelled" in e.value.details()


def test_restart_resumes_without_paying_the_teacher_twice(world: dict[str, Any]) -> None:
    d = world["dir"]
    s = CompileThread(d / "work-resume", d / "keys", world["ledger"].target)
    try:
        job = s.stub.SubmitJob(pb.SubmitJobRequest(spec_yaml=spec_text(epochs=30)))
        first: dict[str, float] = {}
        for e in s.stub.WatchJob(pb.WatchJobRequest(job_id=job.id), timeout=300):
            if e.stage == "sample" and e.state == "finished":
                first = dict(e.counters)
            if e.stage == "train" and e.state == "progress":
                break
        assert first["cache_misses"] > 0 and first["cache_hits"] == 0
        s.stop()  # mid-training: the job stays running, to be resumed

        s.start()  # a new service on the same work folder
        events = watch(s.stub, job.id)
        got = s.stub.GetJob(pb.GetJobRequest(job_id=job.id))
        assert got.state == "succeeded", got.error
        resumed = [i for i, e in enumerate(events) if e.stage == "job" and e.message == "resumed"]
        assert len(resumed) == 1
        second = events[resumed[0] :]
        # the finished stages are not run again: no teacher call is paid twice
        assert [e.stage for e in second if e.state == "resumed"] == [
            "ingest",
            "sample",
            "vote",
            "sign",
        ]
        assert not [e for e in second if e.stage in ("sample", "sign") and e.state == "started"]
        (again,) = [dict(e.counters) for e in second if e.stage == "sample"]
        assert again == first
        assert [e.stage for e in second if e.state == "finished"] == [
            "train",
            "evaluate",
            "package",
        ]
        # the resumed run reused the label receipts of the first: provenance still adds up
        from kolm_ledger.service.client import LedgerClient

        with LedgerClient(world["ledger"].target) as c:
            prov = c.provenance(got.artifact_digest, include_labels=True)
        assert prov.labels_found == prov.label_count
        assert prov.recomputed_root == prov.training_set_root
    finally:
        s.close()
