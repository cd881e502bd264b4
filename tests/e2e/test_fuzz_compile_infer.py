"""Fuzzing every RPC of the compile and inference services from a raw channel.

Like tests/ledger/test_fuzz_rpc.py for the ledger: hypothesis-driven clients send, through
``channel.unary_unary`` (and the streaming variants) with identity serializers, random
bytes, bit-flipped and truncated protobuf messages, messages over the 16 MiB limit, and
well-formed messages with wrong field values. Each gets the specific status of the
service's error table (``INVALID_ARGUMENT`` for a malformed message or a wrong spec
field, which it names; ``NOT_FOUND`` for an unknown job, artifact or digest;
``FAILED_PRECONDITION`` for a refused artifact or a finished job; ``RESOURCE_EXHAUSTED``
over the size limit; never ``INTERNAL`` or ``UNKNOWN``), nothing is written for a
rejected request (no compile job is created, no prediction receipt reaches the ledger,
no artifact is loaded or unloaded), and health stays SERVING.

The compile service runs without its worker thread: a request that got through by
mistake would show up as a job, and could not start training. The inference service
serves the tiny real artifact of tests/infer/test_infer_engine.py (its session ``world``).
"""

from __future__ import annotations

import copy
import sqlite3
import string
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from support.fuzz import FUZZ
from support.servers import ServiceThread

from kolm_compile._pb import compile_pb2 as cpb
from kolm_infer._pb import infer_pb2 as ipb
from kolm_ledger.keys import init_keys

C = "/kolm.compile.v1.Compile/"
I = "/kolm.infer.v1.Inference/"  # noqa: E741
OK = grpc.StatusCode.OK
#: the statuses the services' error tables allow for a bad request
SPECIFIC = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
EXAMPLES = Path(__file__).resolve().parents[2] / "kolm_compile" / "examples"
SAFE_TEXT = st.text(alphabet=string.ascii_letters + string.digits + "-_./ ", max_size=40)


def _code(f: Any, arg: Any) -> tuple[grpc.StatusCode, str]:
    """Call ``f`` (unary or streaming response); the status and its details."""
    try:
        out = f(arg, timeout=30)
        if not isinstance(out, bytes):
            for _ in out:
                pass
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    return OK, ""


# ---- compile ----------------------------------------------------------------------------

COMPILE_UNARY = ["SubmitJob", "GetJob", "CancelJob", "ListArtifacts"]
COMPILE_STREAM = ["WatchJob", "FetchArtifact"]


def valid_spec() -> dict[str, Any]:
    """The example spec, its files named relative to the service's data root."""
    raw = yaml.safe_load((EXAMPLES / "banking77-router.yaml").read_text())
    assert isinstance(raw, dict)
    raw["teacher"]["dataset"] = raw["teacher"]["dataset"].removeprefix("../data/")
    for k in ("unlabeled", "holdout"):
        raw["data"][k] = raw["data"][k].removeprefix("../data/")
    return raw


def invalid_spec_text() -> str:
    """A spec no single bit flip and no truncation can make valid.

    Two independent wrong values come first (one flip fixes at most one of them); a
    prefix that stops before them lacks the required fields.
    """
    raw = valid_spec()
    raw.pop("seed", None)
    raw.pop("budget", None)
    body = yaml.safe_dump(raw, sort_keys=False)
    return "seed: -1\nbudget: {max_teacher_calls: -5}\n" + body


@dataclass
class CompileWorld:
    svc: ServiceThread
    jobs_db: Path

    def jobs(self) -> int:
        con = sqlite3.connect(f"file:{self.jobs_db}?mode=ro", uri=True)
        try:
            return int(con.execute("SELECT count(*) FROM jobs").fetchone()[0])
        finally:
            con.close()

    def call(self, method: str, data: bytes) -> tuple[grpc.StatusCode, str]:
        ch = self.svc.channel
        f = ch.unary_stream(C + method) if method in COMPILE_STREAM else ch.unary_unary(C + method)
        return _code(f, data)


@pytest.fixture(scope="module")
def compile_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CompileWorld]:
    from kolm_compile.service import JobRunner, start
    from kolm_ledger.errors import UnavailableError

    d = tmp_path_factory.mktemp("fuzz-compile")
    init_keys(d / "keys")

    class IdleRunner(JobRunner):
        """Queues jobs but never runs them: nothing can train here."""

        def start(self) -> None:
            pass

    def no_sink() -> Any:
        raise UnavailableError("fuzzing: no ledger")

    runner = IdleRunner(
        d / "work",
        keys_dir=d / "keys",
        sink_factory=no_sink,
        data_root=EXAMPLES.parent / "data",
        threads=1,
    )
    svc = ServiceThread(lambda: start(runner))
    w = CompileWorld(svc, d / "work" / "jobs.sqlite")
    assert w.jobs() == 0
    yield w
    svc.close()


@FUZZ
@given(method=st.sampled_from(COMPILE_UNARY + COMPILE_STREAM), data=st.binary(max_size=512))
def test_random_bytes_to_every_compile_rpc(
    compile_world: CompileWorld, method: str, data: bytes
) -> None:
    code, details = compile_world.call(method, data)
    assert code in SPECIFIC | {OK}, (method, data, code, details)
    assert compile_world.jobs() == 0, (method, data)


@FUZZ
@given(pos=st.integers(min_value=0), bit=st.integers(min_value=0, max_value=7), cut=st.booleans())
def test_flipped_and_truncated_submit_requests_are_invalid_argument(
    compile_world: CompileWorld, pos: int, bit: int, cut: bool
) -> None:
    raw = bytearray(cpb.SubmitJobRequest(spec_yaml=invalid_spec_text()).SerializeToString())
    pos %= len(raw)
    if cut:
        raw = raw[:pos]
    else:
        raw[pos] ^= 1 << bit
    code, details = compile_world.call("SubmitJob", bytes(raw))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (pos, bit, cut, code, details)
    assert compile_world.jobs() == 0


def _set(spec: dict[str, Any], path: str, value: object) -> None:
    cur = spec
    *parents, leaf = path.split(".")
    for p in parents:
        cur = cur.setdefault(p, {})
    cur[leaf] = value


#: (field path, a strategy of values the spec refuses there)
WRONG_FIELDS: list[tuple[str, st.SearchStrategy[Any]]] = [
    ("task", SAFE_TEXT.map(lambda t: "x-" + t)),
    ("name", st.sampled_from(["", "Upper", "-lead", "x" * 65, "a b"])),
    ("labels", st.lists(st.from_regex(r"[a-z]{1,8}", fullmatch=True), max_size=1)),
    ("student", st.one_of(st.integers(), SAFE_TEXT, st.lists(st.integers(), max_size=2))),
    ("student.epochs", st.integers(max_value=0)),
    ("teacher.k", st.integers(max_value=0)),
    ("teacher.backend", SAFE_TEXT.map(lambda t: "x-" + t)),
    ("data.limit_per_label", st.integers(max_value=0)),
    ("data.unlabeled", SAFE_TEXT.map(lambda t: f"missing-{t.replace('/', '_')}.csv")),
    ("budget.max_teacher_calls", st.integers(max_value=0)),
    ("seed", st.integers(max_value=-1)),
]


@FUZZ
@given(data=st.data(), which=st.integers(min_value=0, max_value=len(WRONG_FIELDS) - 1))
def test_wrong_spec_fields_are_invalid_argument_naming_the_field(
    compile_world: CompileWorld, data: st.DataObject, which: int
) -> None:
    path, values = WRONG_FIELDS[which]
    spec = copy.deepcopy(valid_spec())
    _set(spec, path, data.draw(values))
    unknown = "zz_" + data.draw(st.from_regex(r"[a-z]{1,10}", fullmatch=True))
    if data.draw(st.booleans()):
        spec[unknown] = 1  # an unknown top-level field as well
    text = yaml.safe_dump(spec) if data.draw(st.booleans()) else yaml.safe_dump(spec, indent=4)
    req = cpb.SubmitJobRequest(spec_yaml=text, bundle_base=data.draw(st.booleans()))
    code, details = compile_world.call("SubmitJob", req.SerializeToString())
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (path, code, details)
    top = path.split(".")[0]
    assert f"spec.{top}" in details or f"spec.{unknown}" in details, (path, details)
    assert compile_world.jobs() == 0


@FUZZ
@given(ref=SAFE_TEXT)
def test_unknown_jobs_and_artifacts_are_not_found(compile_world: CompileWorld, ref: str) -> None:
    for method, req in [
        ("GetJob", cpb.GetJobRequest(job_id=ref)),
        ("CancelJob", cpb.CancelJobRequest(job_id=ref)),
        ("WatchJob", cpb.WatchJobRequest(job_id=ref)),
        ("FetchArtifact", cpb.FetchArtifactRequest(digest=ref)),
    ]:
        code, details = compile_world.call(method, req.SerializeToString())
        assert code == grpc.StatusCode.NOT_FOUND, (method, ref, code, details)
    assert compile_world.jobs() == 0


def test_oversized_compile_requests_are_resource_exhausted(compile_world: CompileWorld) -> None:
    huge = cpb.SubmitJobRequest(spec_yaml="# " + "x" * (17 << 20)).SerializeToString()
    assert compile_world.call("SubmitJob", huge)[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    # under the limit but large: parsed and refused, not queued
    big = cpb.SubmitJobRequest(spec_yaml="# " + "x" * (1 << 20) + "\n" + invalid_spec_text())
    code, details = compile_world.call("SubmitJob", big.SerializeToString())
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert compile_world.jobs() == 0
    assert compile_world.svc.serving("kolm.compile.v1.Compile")


def test_compile_service_healthy_after_the_fuzzing(compile_world: CompileWorld) -> None:
    """Still SERVING, still answering: a valid job is queued (the worker is idle, so it
    never trains), cancelled, and cancelling it again is FAILED_PRECONDITION."""
    w = compile_world
    assert w.svc.serving("kolm.compile.v1.Compile")
    assert w.call("ListArtifacts", b"")[0] == OK
    ok = cpb.SubmitJobRequest(spec_yaml=yaml.safe_dump(valid_spec()))
    job = cpb.Job.FromString(w.svc.channel.unary_unary(C + "SubmitJob")(ok.SerializeToString()))
    assert job.state == "queued" and w.jobs() == 1
    cancel = cpb.CancelJobRequest(job_id=job.id).SerializeToString()
    assert w.call("CancelJob", cancel)[0] == OK
    code, details = w.call("CancelJob", cancel)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "already cancelled" in details
    assert w.jobs() == 1


# ---- inference --------------------------------------------------------------------------

INFER_UNARY = ["LoadArtifact", "Predict", "ListArtifacts", "UnloadArtifact"]
CARD = "I am still waiting on my card?"


@dataclass
class InferWorld:
    svc: ServiceThread
    ledger: Any  # tests/_servers.LedgerThread
    artifact: Path
    digest: str

    def size(self) -> int:
        return int(self.ledger.srv.ledger.size)

    def loaded(self) -> list[str]:
        raw = self.svc.channel.unary_unary(I + "ListArtifacts")(b"", timeout=30)
        return sorted(a.name for a in ipb.ListArtifactsResponse.FromString(raw).artifacts)

    def call(self, method: str, data: bytes) -> tuple[grpc.StatusCode, str]:
        return _code(self.svc.channel.unary_unary(I + method), data)

    def stream(self, messages: list[bytes]) -> tuple[grpc.StatusCode, str]:
        return _code(self.svc.channel.stream_stream(I + "PredictStream"), iter(messages))

    def checked(
        self, code: grpc.StatusCode, size_before: int, what: object, predict: bool = False
    ) -> None:
        """A refusal wrote nothing; an answered prediction wrote exactly its receipt; nothing
        was loaded or unloaded."""
        assert code in SPECIFIC | {OK}, (what, code)
        assert self.size() == size_before + (predict and code == OK), (what, code)
        assert self.loaded() == ["router"], what


@pytest.fixture(scope="module")
def infer_world(
    world: Any,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[InferWorld]:
    from kolm_infer.service import start

    art = world.artifacts["router"]
    svc = ServiceThread(
        lambda: start(
            world.ledger.target,
            world.trust,
            world.key("infer"),
            artifacts=[art],
            artifacts_dir=tmp_path_factory.getbasetemp(),  # LoadArtifact(path=) reads here
        )
    )
    info = ipb.ListArtifactsResponse.FromString(
        svc.channel.unary_unary(I + "ListArtifacts")(b"", timeout=30)
    ).artifacts[0]
    yield InferWorld(svc, world.ledger, art, info.digest)
    svc.close()


ml = pytest.mark.ml
slow = pytest.mark.slow


@ml
@slow
@FUZZ
@given(method=st.sampled_from([*INFER_UNARY, "PredictStream"]), data=st.binary(max_size=512))
def test_random_bytes_to_every_inference_rpc(
    infer_world: InferWorld, method: str, data: bytes
) -> None:
    before = infer_world.size()
    if method == "PredictStream":
        code, details = infer_world.stream([data])
    else:
        code, details = infer_world.call(method, data)
    infer_world.checked(code, before, (method, data, details), method.startswith("Predict"))


@ml
@slow
@FUZZ
@given(
    pos=st.integers(min_value=0),
    bit=st.integers(min_value=0, max_value=7),
    cut=st.booleans(),
    stream=st.booleans(),
)
def test_flipped_and_truncated_predict_requests(
    infer_world: InferWorld, pos: int, bit: int, cut: bool, stream: bool
) -> None:
    raw = bytearray(ipb.PredictRequest(artifact="router", input=CARD).SerializeToString())
    pos %= len(raw)
    if cut:
        raw = raw[:pos]
    else:
        raw[pos] ^= 1 << bit
    before = infer_world.size()
    if stream:
        code, details = infer_world.stream([bytes(raw)])
    else:
        code, details = infer_world.call("Predict", bytes(raw))
    infer_world.checked(code, before, (pos, bit, cut, details), predict=True)


def _has_field(msg: Any, name: str) -> bool:
    return name in msg.DESCRIPTOR.fields_by_name


@ml
@slow
@FUZZ
@given(data=st.data(), which=st.sampled_from(["artifact", "input", "recall_k", "unload"]))
def test_wrong_predict_fields_get_their_status(
    infer_world: InferWorld, data: st.DataObject, which: str
) -> None:
    before = infer_world.size()
    name = data.draw(SAFE_TEXT.filter(lambda t: t not in ("router", infer_world.digest)))
    if which == "artifact":
        req = ipb.PredictRequest(artifact=name, input=CARD)
        want = {grpc.StatusCode.NOT_FOUND}
    elif which == "input":
        n = data.draw(st.integers(min_value=16_385, max_value=200_000))
        req = ipb.PredictRequest(artifact="router", input="x" * n)
        want = {grpc.StatusCode.INVALID_ARGUMENT}
    elif which == "recall_k" and _has_field(ipb.PredictRequest(), "recall_k"):
        # the router artifact has no recall: any k > 0 is refused, as is one over the maximum
        k = data.draw(st.integers(min_value=1, max_value=2**31 - 1))
        req = ipb.PredictRequest(artifact="router", input=CARD, recall_k=k)
        want = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION}
    else:
        code, details = infer_world.call(
            "UnloadArtifact", ipb.UnloadArtifactRequest(artifact=name).SerializeToString()
        )
        assert code == grpc.StatusCode.NOT_FOUND, (name, code, details)
        infer_world.checked(code, before, name)
        return
    code, details = infer_world.call("Predict", req.SerializeToString())
    assert code in want, (which, code, details)
    infer_world.checked(code, before, (which, details))
    code, details = infer_world.stream([req.SerializeToString()])
    assert code in want, (which, "stream", code, details)
    infer_world.checked(code, before, (which, details))


@ml
@slow
@FUZZ
@given(
    source=st.sampled_from(["garbage", "truncated", "flipped", "missing-path", "directory"]),
    data=st.data(),
)
def test_refused_artifacts_are_failed_precondition_and_nothing_loads(
    infer_world: InferWorld, tmp_path_factory: pytest.TempPathFactory, source: str, data: Any
) -> None:
    real = infer_world.artifact.read_bytes()
    if source == "garbage":
        req = ipb.LoadArtifactRequest(data=data.draw(st.binary(max_size=4096)), name="fuzz")
    elif source == "truncated":
        cut = data.draw(st.integers(min_value=0, max_value=len(real) - 1))
        req = ipb.LoadArtifactRequest(data=real[:cut], name="fuzz")
    elif source == "flipped":
        b = bytearray(real)
        # flip within the stored (deflated) member data, past the first local header
        pos = data.draw(st.integers(min_value=64, max_value=len(b) - 256))
        b[pos] ^= 1 << data.draw(st.integers(min_value=0, max_value=7))
        req = ipb.LoadArtifactRequest(data=bytes(b), name="fuzz")
    elif source == "missing-path":
        path = tmp_path_factory.getbasetemp() / f"nope-{data.draw(SAFE_TEXT).replace('/', '_')}"
        req = ipb.LoadArtifactRequest(path=str(path))
    else:
        req = ipb.LoadArtifactRequest(path=str(tmp_path_factory.getbasetemp()))
    before = infer_world.size()
    code, details = infer_world.call("LoadArtifact", req.SerializeToString())
    # a flip in bytes no digest covers (zip metadata) still loads: the same artifact,
    # already loaded, so nothing changes; anything else is refused
    if not (source == "flipped" and code == OK):
        assert code in {grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND}, (
            source,
            code,
            details,
        )
    infer_world.checked(code, before, (source, details))
    # no source at all
    code, details = infer_world.call("LoadArtifact", b"")
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details


@ml
@slow
def test_oversized_inference_requests_are_resource_exhausted(infer_world: InferWorld) -> None:
    before = infer_world.size()
    for method, req in [
        ("Predict", ipb.PredictRequest(artifact="router", input="x" * (17 << 20))),
        ("LoadArtifact", ipb.LoadArtifactRequest(data=b"\0" * (17 << 20))),
    ]:
        code, details = infer_world.call(method, req.SerializeToString())
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (method, code, details)
    infer_world.checked(grpc.StatusCode.RESOURCE_EXHAUSTED, before, "oversized")


@ml
@slow
def test_inference_service_healthy_after_the_fuzzing(infer_world: InferWorld) -> None:
    from kolm_ledger.audit.auditor import audit

    w = infer_world
    assert w.svc.serving("kolm.infer.v1.Inference")
    before = w.size()
    raw = w.svc.channel.unary_unary(I + "Predict")(
        ipb.PredictRequest(artifact="router", input=CARD).SerializeToString(), timeout=30
    )
    assert ipb.PredictResponse.FromString(raw).WhichOneof("receipt") == "promise"
    assert w.size() == before + 1
    ledger = w.ledger.srv.ledger
    rep = audit(ledger.store, ledger.trust.root)
    assert rep.ok, [str(f) for f in rep.failures][:5]


from test_infer_engine import world  # noqa: E402,F401 - the shared session fixture
