"""The compile gRPC service (``kolm.compile.v1.Compile``) on ``grpc.aio``.

:class:`JobRunner` is the domain object (no gRPC): it keeps jobs in SQLite under the
work folder and runs one :class:`~kolm_compile.pipeline.CompileJob` at a time in a
worker thread, in submission order. Its layout::

    WORK/jobs.sqlite              jobs and their stage events (WAL)
    WORK/jobs/<id>/               the job's folder: stages/, teacher cache, build, the .kolm
    WORK/artifacts/<name>.kolm    a copy of the newest artifact of each name (for inference)

Jobs persist: a restarted runner resumes queued and running jobs. A resumed job runs
again in the same job folder: every stage whose output is there is reported
``resumed`` and skipped (no teacher call is paid twice), and label receipts the
interrupted run already appended are reused (found by the job's subject digest), so
the ledger holds exactly one receipt per trained label of the job.

:class:`CompileServicer` is thin: it parses messages, calls the runner and builds
replies. Errors become statuses in :class:`~kolm_ledger.service.rpc.ErrorInterceptor`:
a bad spec is ``INVALID_ARGUMENT`` naming the field, an unknown job ``NOT_FOUND``,
cancelling a finished job ``FAILED_PRECONDITION``.

Example::

    runner = JobRunner(Path("work"), keys_dir=Path("keys"),
                       sink_factory=lambda: ServiceSink(LedgerClient("127.0.0.1:7070")))
    srv = await start(runner, listen="127.0.0.1:0")
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc

from kolm_ledger.errors import (
    ConflictError,
    InvalidInput,
    KolmError,
    NotFoundError,
    RoleError,
)
from kolm_ledger.service import rpc
from kolm_ledger.service.authz import ALL_ROLES, AuthzInterceptor, Policy

from ._pb import compile_pb2 as pb
from ._pb import compile_pb2_grpc as pb_grpc
from .intake import (
    DEFAULT_MAX_UPLOAD_BYTES,
    LOCAL_OWNER,
    ServicePolicy,
    TeacherProfiles,
    UploadStore,
)
from .pipeline import CompileJob, CompileOptions, JobCancelled, StageEvent
from .sinks import ReceiptSink
from .spec import TaskSpec, load_spec_text

__all__ = [
    "COMPILE_POLICY",
    "FINAL_STATES",
    "Artifact",
    "Caller",
    "CompileServer",
    "CompileServicer",
    "JobInfo",
    "JobRunner",
    "caller_of",
    "parse_spec",
    "serve",
    "start",
]

log = logging.getLogger("kolm.compile")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Compile"].full_name
MAX_MESSAGE = 16 * 1024 * 1024
CHUNK = 1024 * 1024
FINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
#: Which client roles may call each method of this service (kolm_ledger.service.authz: the
#: mechanism; an unlisted method is refused, an admin may call every one)
COMPILE_POLICY: Policy = {
    SERVICE_NAME: {
        "SubmitJob": frozenset({"admin", "compile"}),
        "UploadDataset": frozenset({"admin", "compile"}),
        "CancelJob": frozenset({"admin", "compile"}),
        "WatchJob": ALL_ROLES,
        "GetJob": ALL_ROLES,
        "ListArtifacts": ALL_ROLES,
        "FetchArtifact": frozenset({"admin", "compile", "infer", "auditor"}),
    },
}
#: the pseudo-stage of events that report a change of the job's state
JOB_STAGE = "job"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    spec TEXT NOT NULL,
    bundle_base INTEGER NOT NULL,
    state TEXT NOT NULL,
    stage TEXT NOT NULL DEFAULT '',
    last_finished_stage TEXT NOT NULL DEFAULT '',
    last_event TEXT NOT NULL DEFAULT '',
    error TEXT NOT NULL DEFAULT '',
    result_json TEXT NOT NULL DEFAULT '',
    artifact_digest TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    owner TEXT NOT NULL DEFAULT 'local',
    error_code TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL,
    n INTEGER NOT NULL,
    event TEXT NOT NULL,
    PRIMARY KEY (job_id, n)
);
"""


def parse_spec(text: str, policy: ServicePolicy) -> TaskSpec:
    """A submitted task spec from YAML or JSON text, read through ``policy``: its files
    are uploads or under the data root, its teacher an operator profile or offline
    (kolm_compile.intake). The text is parsed with the caps of
    :func:`~kolm_compile.spec.load_spec_text` (1 MiB, 100 aliases).

    Raises :class:`SpecError` naming the field that is wrong (or the file that is missing).
    """
    raw = load_spec_text(text)
    return TaskSpec.from_dict(raw, policy.data_root or Path("."), policy=policy)


@dataclass(frozen=True)
class Caller:
    """Who calls: ``role`` from the mTLS client certificate (None on a plain-text loopback
    server, where authorization is off) and ``identity``, whom jobs and uploads belong to.

    With TLS the identity is ``<role>|<certificate subject, RFC 4514>``: certificates the
    CA issued with the same subject and role are one client. Without TLS there is no
    client identity: every caller is the operator, :data:`~kolm_compile.intake.LOCAL_OWNER`.
    """

    role: str | None
    identity: str = LOCAL_OWNER

    def manages(self, owner: str) -> bool:
        """May cancel the job of ``owner`` and read its error text: its owner, an
        ``admin``, or anyone on a server without client identities."""
        return self.role is None or self.role == "admin" or self.identity == owner


#: the caller of in-process use (tests, ``kolm up``): the operator
OPERATOR = Caller(None, LOCAL_OWNER)


def caller_of(context: Any) -> Caller:
    """The :class:`Caller` of a gRPC call (from its verified client certificate)."""
    from cryptography import x509

    from kolm_ledger.service.tls import role_of

    role = role_of(context)
    if role is None:
        return OPERATOR
    pem = (context.auth_context() or {})["x509_pem_cert"][0]
    subject = x509.load_pem_x509_certificate(pem).subject.rfc4514_string()
    return Caller(role, f"{role}|{subject}")


@dataclass(frozen=True)
class JobInfo:
    """A job's row. ``error`` is the full text (see :meth:`for_caller`), ``error_code``
    the gRPC status name of the error (``INVALID_ARGUMENT``, ``UNAVAILABLE``, …,
    ``CANCELLED``), which every reader sees."""

    id: str
    state: str
    stage: str = ""
    last_finished_stage: str = ""
    error: str = ""
    result_json: str = ""
    artifact_digest: str = ""
    owner: str = LOCAL_OWNER
    error_code: str = ""

    def for_caller(self, caller: Caller) -> JobInfo:
        """The row as ``caller`` may see it: the error text only for those who
        :meth:`~Caller.manages` the job (it can quote an input or a file name), the code
        for everyone."""
        if caller.manages(self.owner):
            return self
        return replace(self, error="")


@dataclass(frozen=True)
class Artifact:
    """The artifact of a succeeded job."""

    name: str
    digest: str
    file_digest: str
    size: int
    job_id: str
    k_score: float
    path: Path


def _event_dict(job_id: str, e: StageEvent) -> dict[str, Any]:
    return {
        "job_id": job_id,
        "stage": e.stage,
        "state": e.state,
        "done": int(e.done),
        "total": int(e.total),
        "counters": {k: float(v) for k, v in e.counters.items()},
        "message": e.message,
    }


@dataclass
class _Watcher:
    job_id: str
    queue: asyncio.Queue[dict[str, Any]]
    loop: asyncio.AbstractEventLoop


@dataclass
class _Running:
    job_id: str
    cancel: threading.Event = field(default_factory=threading.Event)


class JobRunner:
    """Compile jobs, persisted in ``WORK/jobs.sqlite``, run one at a time in a worker thread.

    ``sink_factory`` makes the receipt sink each job appends to (a
    :class:`~kolm_compile.sinks.ServiceSink` toward the ledger service; closed when the
    job ends if it has ``close()``). Call
    :meth:`start` to begin (and resume) work and :meth:`close` to stop: a job running
    then stops at its next stage or training step and stays ``running``, to be resumed.

    What a submitted spec may read and which teachers it may use
    (kolm_compile.intake): datasets its client uploaded (:meth:`upload`, kept in
    ``WORK/uploads/``, at most ``max_upload_bytes`` each), files under ``data_root``
    (None: uploads only), and the operator's teacher ``profiles`` (or an offline
    backend). Jobs belong to the :class:`Caller` that submitted them.
    """

    def __init__(
        self,
        work_dir: Path,
        *,
        keys_dir: Path,
        sink_factory: Callable[[], ReceiptSink],
        data_root: Path | None = None,
        teachers: TeacherProfiles | None = None,
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
        threads: int | None = None,
        embed: Callable[[list[str]], Any] | None = None,
    ) -> None:
        self.work = Path(work_dir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.keys_dir = Path(keys_dir)
        if not (self.keys_dir / "compile.key").exists():
            raise InvalidInput(f"--keys {self.keys_dir}: no compile.key")
        from kolm_ledger.keys import PrivateKey

        self.key = PrivateKey.load(self.keys_dir / "compile.key")
        self.sink_factory = sink_factory
        if data_root is not None and not Path(data_root).is_dir():
            raise InvalidInput(f"--data-root {data_root}: not a folder")
        self.data_root = Path(data_root) if data_root is not None else None
        self.teachers = teachers or TeacherProfiles()
        self.uploads = UploadStore(self.work / "uploads", max_upload_bytes)
        self.threads = threads
        self.embed = embed
        self._db = sqlite3.connect(
            self.work / "jobs.sqlite", check_same_thread=False, isolation_level=None
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        have = {r[1] for r in self._db.execute("PRAGMA table_info(jobs)")}
        for column in (
            "owner TEXT NOT NULL DEFAULT 'local'",
            "error_code TEXT NOT NULL DEFAULT ''",
        ):
            if column.split()[0] not in have:  # a work folder of an earlier version
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {column}")
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._watchers: list[_Watcher] = []
        self._running: _Running | None = None
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker thread; it resumes running and queued jobs first."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="kolm-compile", daemon=True)
            self._thread.start()

    def close(self, timeout: float = 60.0) -> None:
        """Stop the worker (a running job stays ``running`` for the next start) and the DB."""
        self._closing.set()
        with self._wake:
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._lock:
            self._db.close()

    # ---- jobs ---------------------------------------------------------------------------

    def policy(self, owner: str) -> ServicePolicy:
        """What a spec submitted by ``owner`` may read and use."""
        return ServicePolicy(self.uploads, owner, self.data_root, self.teachers)

    def submit(
        self, spec_text: str, *, bundle_base: bool = False, caller: Caller = OPERATOR
    ) -> JobInfo:
        """Queue a job owned by ``caller``. Raises :class:`SpecError` naming the field if
        the spec is wrong or names something it may not (kolm_compile.intake)."""
        parse_spec(spec_text, self.policy(caller.identity))
        job_id = f"job-{uuid.uuid4().hex[:12]}"
        with self._wake:
            self._db.execute(
                "INSERT INTO jobs (id, spec, bundle_base, state, created, owner) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (job_id, spec_text, int(bundle_base), "queued", time.time(), caller.identity),
            )
            self._append_event(job_id, {"stage": JOB_STAGE, "state": "queued"})
            self._wake.notify_all()
        log.info("job queued", extra={"kolm_job": job_id})
        return self.get(job_id)

    def get(self, job_id: str) -> JobInfo:
        """The job's row; :class:`NotFoundError` if there is none."""
        with self._lock:
            row = self._db.execute(
                "SELECT id, state, stage, last_finished_stage, error, result_json, "
                "artifact_digest, owner, error_code FROM jobs WHERE id = ?",
                (job_id,),
            ).fetchone()
        if row is None:
            raise NotFoundError(f"no compile job {job_id!r}")
        return JobInfo(*row)

    def cancel(self, job_id: str, *, caller: Caller = OPERATOR) -> JobInfo:
        """Cancel a queued job now, or ask a running one to stop at its next stage or step.

        Raises :class:`RoleError` (``PERMISSION_DENIED``) unless ``caller`` owns the job
        or is ``admin``; :class:`ConflictError` (``FAILED_PRECONDITION``) if the job
        already finished.
        """
        with self._wake:
            job = self.get(job_id)
            if not caller.manages(job.owner):
                raise RoleError(
                    f"job {job_id} belongs to another client; only its owner or an admin "
                    "may cancel it"
                )
            if job.state in FINAL_STATES:
                raise ConflictError(f"job {job_id} already {job.state}; nothing to cancel")
            if self._running is not None and self._running.job_id == job_id:
                self._running.cancel.set()
            else:
                self._finish(job_id, "cancelled", error="cancelled before it ran", code="CANCELLED")
        return self.get(job_id)

    def artifacts(self) -> list[Artifact]:
        """The artifacts of succeeded jobs, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, result_json FROM jobs WHERE state = 'succeeded' ORDER BY seq"
            ).fetchall()
        out = []
        for job_id, rj in rows:
            r = json.loads(rj)
            path = Path(r.get("artifact_path") or r["artifact"])
            if not path.exists():
                continue
            out.append(
                Artifact(
                    path.name,
                    r["artifact_digest"],
                    r["file_digest"],
                    path.stat().st_size,
                    job_id,
                    float(r["k_score"]["score"]),
                    path,
                )
            )
        return out

    def artifact(self, digest: str) -> Artifact:
        """The artifact whose artifact digest or file digest is ``digest``."""
        d = digest.removeprefix("sha256:")
        for a in reversed(self.artifacts()):
            if d in (a.digest.removeprefix("sha256:"), a.file_digest.removeprefix("sha256:")):
                return a
        raise NotFoundError(f"no artifact with digest {digest!r}")

    def events(self, job_id: str) -> list[dict[str, Any]]:
        """Every event of the job so far, in order."""
        self.get(job_id)
        with self._lock:
            rows = self._db.execute(
                "SELECT event FROM events WHERE job_id = ? ORDER BY n", (job_id,)
            ).fetchall()
        return [json.loads(r[0]) for r in rows]

    async def watch(self, job_id: str) -> AsyncIterator[dict[str, Any]]:
        """Past events, then new ones as they happen, until the job reaches a final state."""
        loop = asyncio.get_running_loop()
        w = _Watcher(job_id, asyncio.Queue(), loop)
        with self._lock:  # replay and subscribe atomically: no event lost or repeated
            past = self.events(job_id)
            final = self.get(job_id).state in FINAL_STATES
            if not final:
                self._watchers.append(w)
        try:
            for e in past:
                yield e
            if final:
                return
            while True:
                e = await w.queue.get()
                yield e
                if e["stage"] == JOB_STAGE and e["state"] in FINAL_STATES:
                    return
        finally:
            with self._lock:
                if w in self._watchers:
                    self._watchers.remove(w)

    # ---- internals ----------------------------------------------------------------------

    def _append_event(self, job_id: str, e: dict[str, Any]) -> None:
        e = {"job_id": job_id, "done": 0, "total": 0, "counters": {}, "message": "", **e}
        with self._lock:
            (n,) = self._db.execute(
                "SELECT COALESCE(MAX(n), -1) + 1 FROM events WHERE job_id = ?", (job_id,)
            ).fetchone()
            text = json.dumps(e, sort_keys=True)
            self._db.execute("INSERT INTO events VALUES (?, ?, ?)", (job_id, n, text))
            if e["stage"] != JOB_STAGE:
                self._db.execute(
                    "UPDATE jobs SET stage = ?, last_event = ? WHERE id = ?",
                    (e["stage"], text, job_id),
                )
                if e["state"] in ("finished", "resumed"):
                    self._db.execute(
                        "UPDATE jobs SET last_finished_stage = ? WHERE id = ?",
                        (e["stage"], job_id),
                    )
            for w in self._watchers:
                if w.job_id == job_id:
                    w.loop.call_soon_threadsafe(w.queue.put_nowait, e)

    def _finish(
        self, job_id: str, state: str, *, error: str = "", code: str = "", result: str = ""
    ) -> None:
        digest = json.loads(result)["artifact_digest"] if result else ""
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET state = ?, error = ?, error_code = ?, result_json = ?, "
                "artifact_digest = ? WHERE id = ?",
                (state, error, code, result, digest, job_id),
            )
            self._append_event(
                job_id, {"stage": JOB_STAGE, "state": state, "message": error, "error_code": code}
            )
        log.info("job %s", state, extra={"kolm_job": job_id, "kolm_error": error})

    def _next(self) -> tuple[str, str, bool, str, str] | None:
        with self._lock:
            row = self._db.execute(
                "SELECT id, spec, bundle_base, state, owner FROM jobs "
                "WHERE state IN ('running', 'queued') "
                "ORDER BY state = 'queued', seq LIMIT 1"
            ).fetchone()
        return None if row is None else (row[0], row[1], bool(row[2]), row[3], row[4])

    def _work(self) -> None:
        while not self._closing.is_set():
            with self._wake:
                nxt = self._next()
                if nxt is None:
                    self._wake.wait(1.0)
                    continue
                job_id, spec_text, bundle_base, state, owner = nxt
                self._running = _Running(job_id)
                self._db.execute("UPDATE jobs SET state = 'running' WHERE id = ?", (job_id,))
                self._append_event(
                    job_id,
                    {
                        "stage": JOB_STAGE,
                        "state": "running",
                        "message": "resumed" if state == "running" else "",
                    },
                )
            try:
                self._run_one(job_id, spec_text, bundle_base, owner)
            finally:
                with self._lock:
                    self._running = None

    def _run_one(self, job_id: str, spec_text: str, bundle_base: bool, owner: str) -> None:
        running = self._running
        assert running is not None
        sink: Any = None
        try:
            spec = parse_spec(spec_text, self.policy(owner))
            sink = self.sink_factory()
            job = CompileJob(
                spec,
                key=self.key,
                sink=sink,
                job_dir=self.work / "jobs" / job_id,
                job_id=job_id,
                options=CompileOptions(bundle_base=bundle_base, threads=self.threads),
                on_event=lambda e: self._append_event(job_id, _event_dict(job_id, e)),
                should_stop=lambda: running.cancel.is_set() or self._closing.is_set(),
                embed=self.embed,
            )
            result = job.run()
        except (JobCancelled, InterruptedError) as e:
            if running.cancel.is_set():
                self._finish(job_id, "cancelled", error=str(e), code="CANCELLED")
            else:  # the service is stopping: leave it running, to be resumed
                log.info("job interrupted; resumes on restart", extra={"kolm_job": job_id})
            return
        except KolmError as e:
            code = rpc.status_of(e)[0].name
            self._finish(job_id, "failed", error=f"{type(e).__name__}: {e}", code=code)
            return
        except Exception as e:  # a bug or a foreign error: record it, keep serving
            log.exception("job %s failed", job_id)
            self._finish(
                job_id, "failed", error=f"internal error: {type(e).__name__}: {e}", code="INTERNAL"
            )
            return
        finally:
            close = getattr(sink, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:  # closing a channel must not fail the job
                    log.warning("closing the receipt sink failed", exc_info=True)
        shared = self.work / "artifacts"
        shared.mkdir(exist_ok=True)
        tmp = shared / f".{result.artifact_path.name}.tmp"
        shutil.copyfile(result.artifact_path, tmp)
        tmp.replace(shared / result.artifact_path.name)
        self._finish(job_id, "succeeded", result=json.dumps(result.to_dict(), sort_keys=True))


# ---- gRPC -------------------------------------------------------------------------------


def job_pb(j: JobInfo) -> pb.Job:
    """JobInfo → protobuf (pass it through :meth:`JobInfo.for_caller` first)."""
    return pb.Job(
        id=j.id,
        state=j.state,
        stage=j.stage,
        last_finished_stage=j.last_finished_stage,
        error=j.error,
        result_json=j.result_json,
        artifact_digest=j.artifact_digest,
        error_code=j.error_code,
    )


class CompileServicer(pb_grpc.CompileServicer):
    """``kolm.compile.v1.Compile`` over a :class:`JobRunner`."""

    def __init__(self, runner: JobRunner) -> None:
        self.runner = runner

    async def SubmitJob(self, request: pb.SubmitJobRequest, context: Any) -> pb.Job:
        caller = caller_of(context)
        job = await asyncio.to_thread(
            self.runner.submit, request.spec_yaml, bundle_base=request.bundle_base, caller=caller
        )
        return job_pb(job.for_caller(caller))

    async def UploadDataset(self, request_iterator: Any, context: Any) -> pb.Dataset:
        caller = caller_of(context)
        w: Any = None
        expect = ""
        try:
            async for chunk in request_iterator:
                if w is None:
                    w = self.runner.uploads.writer(caller.identity, chunk.filename)
                    name = chunk.filename
                elif chunk.filename and chunk.filename != name:
                    raise InvalidInput("upload: every chunk is of one file (filename changed)")
                expect = chunk.sha256 or expect
                if chunk.data:
                    await asyncio.to_thread(w.write, chunk.data)
            if w is None:
                raise InvalidInput("upload: no chunks")
            ref, size, existed = await asyncio.to_thread(w.commit, expect)
        finally:
            if w is not None:
                w.abort()
        log.info("dataset uploaded", extra={"kolm_ref": ref, "kolm_size": size})
        return pb.Dataset(ref=ref, size=size, existed=existed)

    async def WatchJob(self, request: pb.WatchJobRequest, context: Any) -> AsyncIterator[Any]:
        caller = caller_of(context)
        shown = caller.manages(self.runner.get(request.job_id).owner)
        async for e in self.runner.watch(request.job_id):
            if not shown and e["stage"] == JOB_STAGE and e["state"] in FINAL_STATES:
                e = {**e, "message": ""}
            yield pb.JobEvent(**e)

    async def GetJob(self, request: pb.GetJobRequest, context: Any) -> pb.Job:
        return job_pb(self.runner.get(request.job_id).for_caller(caller_of(context)))

    async def CancelJob(self, request: pb.CancelJobRequest, context: Any) -> pb.Job:
        caller = caller_of(context)
        job = await asyncio.to_thread(self.runner.cancel, request.job_id, caller=caller)
        return job_pb(job.for_caller(caller))

    async def ListArtifacts(
        self, request: pb.ListArtifactsRequest, context: Any
    ) -> pb.ListArtifactsResponse:
        return pb.ListArtifactsResponse(
            artifacts=[
                pb.Artifact(
                    name=a.name,
                    digest=a.digest,
                    file_digest=a.file_digest,
                    size=a.size,
                    job_id=a.job_id,
                    k_score=a.k_score,
                )
                for a in self.runner.artifacts()
            ]
        )

    async def FetchArtifact(
        self, request: pb.FetchArtifactRequest, context: Any
    ) -> AsyncIterator[Any]:
        import hashlib

        a = self.runner.artifact(request.digest)
        h = hashlib.sha256()
        offset = 0
        with open(a.path, "rb") as f:
            data = await asyncio.to_thread(f.read, CHUNK)
            while True:
                nxt = await asyncio.to_thread(f.read, CHUNK) if data else b""
                h.update(data)
                last = not nxt
                yield pb.Chunk(data=data, offset=offset, sha256=h.hexdigest() if last else "")
                if last:
                    return
                offset += len(data)
                data = nxt


@dataclass
class CompileServer:
    """A running compile service (server, runner, health) and its bound port."""

    server: grpc.aio.Server
    runner: JobRunner
    port: int
    health: Any

    async def stop(self, grace: float = 10.0) -> None:
        """Graceful stop: NOT_SERVING, stop the server, stop the worker (jobs resume later)."""
        await rpc.set_serving(self.health, [SERVICE_NAME], False)
        await self.server.stop(grace)
        await asyncio.to_thread(self.runner.close)


async def start(
    runner: JobRunner,
    *,
    listen: str = "127.0.0.1:0",
    credentials: grpc.ServerCredentials | None = None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    authorize: bool | None = None,
) -> CompileServer:
    """Start the service and the runner's worker; ``listen`` port 0 picks a free port.

    With ``credentials`` (mutual TLS) every call is authorized by client role
    (``authorize`` defaults to whether TLS is on).
    """
    if authorize is None:
        authorize = credentials is not None
    server = rpc.new_server(
        [*([AuthzInterceptor(COMPILE_POLICY)] if authorize else []), *interceptors]
    )
    pb_grpc.add_CompileServicer_to_server(CompileServicer(runner), server)  # type: ignore[no-untyped-call]
    port, hs = await rpc.bind_and_start(server, listen, credentials, [SERVICE_NAME])
    runner.start()
    log.info("compile serving", extra={"kolm_port": port})
    return CompileServer(server, runner, port, hs)


async def serve(
    runner: JobRunner, *, listen: str, ready_file: str | None = None, **kw: Any
) -> None:
    """Run the service until SIGTERM/SIGINT (``kolm compile serve``)."""
    srv = await start(runner, listen=listen, **kw)
    await rpc.serve_until_signal(srv, "compile", listen, ready_file=ready_file)
