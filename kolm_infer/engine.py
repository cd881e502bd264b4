"""The prediction engine: verified artifacts, dynamic micro-batching, the escape hatch.

No gRPC here (the servicer in :mod:`kolm_infer.service` is a thin layer over this).

Loading (:meth:`Engine.load`) refuses, with :class:`~kolm_ledger.errors.ArtifactError`
(``FAILED_PRECONDITION``) naming the reason, any ``.kolm`` that fails:

1. :func:`kolm_compile.artifact.verify_artifact`: safe unzip, every file listed, each
   file digest, the subject digest, the signature by a trusted compile key that is
   valid now and not revoked (revocations come from the trust root and from ``key``
   receipts in the ledger);
2. ledger inclusion: the ledger holds an ``artifact`` receipt whose subject is the
   artifact digest (``FindEntries``), and its offline bundle (``GetReceiptBundle``)
   verifies against the trust root with :func:`kolm_ledger.verify.verify_bundle`:
   signed by a compile key, included in a checkpoint signed by a trusted log key.

Prediction (:meth:`Engine.predict`): requests for one artifact queue up; a worker
takes up to ``max_batch`` of them (waiting at most ``max_wait_ms`` for the batch to
fill) and runs the student once for the whole batch on the model thread. While the
model runs, new requests queue, so under load batches fill by themselves: batching,
not threads, gives throughput. Each answer is checked with the artifact's verifier.
Escape hatch: confidence below the manifest's ``confidence_threshold`` or a failed
verifier sends the request to the teacher (if one is configured, k=1); otherwise
the student's answer is returned marked unverified.

Example::

    engine = Engine(trust_root, LedgerClient("127.0.0.1:7070"))
    engine.load(Path("router.kolm"))
    art, p = await engine.predict("banking77-router", "where is my card?")
    p.output, p.backend, p.reason      # ('card_arrival', 'student', 'confident')
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import threading
import time
from collections import Counter as _Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Histogram

from kolm_ledger.bundle import Bundle
from kolm_ledger.client import LedgerClient
from kolm_ledger.dsse import Envelope, verify_signature
from kolm_ledger.errors import (
    ArtifactError,
    InvalidInput,
    KolmError,
    NotFoundError,
    UnavailableError,
)
from kolm_ledger.keys import TrustRoot
from kolm_ledger.receipts import Statement
from kolm_ledger.trust import TrustState
from kolm_ledger.verify import verify_bundle

__all__ = [
    "REASONS",
    "Engine",
    "LoadedArtifact",
    "Prediction",
    "check_ledger_inclusion",
    "ledger_trust_state",
]

log = logging.getLogger("kolm.infer")

#: Why a backend answered: the receipt's ``reason`` field.
REASONS = ("confident", "low_confidence", "verifier_failed")

PREDICTIONS = Counter(
    "kolm_infer_predictions_total", "Predictions by backend and reason", ["backend", "reason"]
)
BATCH_SIZE = Histogram(
    "kolm_infer_batch_size",
    "Requests per student forward pass",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
LATENCY = Histogram(
    "kolm_infer_latency_seconds",
    "From request to answer (before the receipt)",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5),
)


@dataclass(frozen=True)
class Prediction:
    """One answer, before its receipt."""

    output: str
    verified: bool
    backend: str  # "student" | "teacher"
    reason: str  # one of REASONS
    confidence: float  # the student's confidence
    verdict: dict[str, Any]  # verifier name/version/spec digest, ok, reason
    latency_ms: float
    teacher: dict[str, Any] | None = None


@dataclass
class LoadedArtifact:
    """An artifact that passed every load check, with its student and verifier."""

    name: str
    digest: str
    file_digest: str
    manifest: dict[str, Any]
    labels: list[str]
    task_type: str
    confidence_threshold: float
    k_score: float
    receipt_index: int
    receipt_bundle: Bundle
    signer_keyid: str
    verifier: Any
    student: Any
    directory: Path
    batcher: _Batcher | None = field(default=None, repr=False)


def ledger_trust_state(client: LedgerClient, trust: TrustRoot) -> TrustState:
    """The trust root plus the ledger's ``key`` receipts (registrations and revocations).

    Each key receipt must be signed by an ``admin`` key of the trust root.
    """
    state = TrustState(trust)
    admins = trust.by_role("admin")
    for e in client.find(kind="key"):
        env = Envelope.from_bytes(e.envelope)
        for k in admins:
            try:
                verify_signature(env, k.public_key)
                break
            except KolmError:
                continue
        else:
            log.warning("ignoring key receipt %d: not signed by a trusted admin key", e.index)
            continue
        state = state.apply(Statement.from_envelope(env), e.integrated_at)
    return state


def check_ledger_inclusion(
    client: LedgerClient, trust: TrustRoot, digest: str
) -> tuple[Bundle, Statement, int]:
    """Find and verify the ``artifact`` receipt of ``digest``; returns (bundle, statement, index).

    Raises :class:`ArtifactError` naming why (none logged, or its bundle does not verify).
    """
    entries = client.find(subject_digest=digest, kind="artifact")
    if not entries:
        raise ArtifactError(
            f"artifact {digest[:16]}… has no artifact receipt in the ledger at {client.target}"
        )
    reasons = []
    for e in entries:
        bundle = client.bundle(index=e.index)
        try:
            v = verify_bundle(bundle, trust)
        except KolmError as err:
            reasons.append(f"entry {e.index}: {err}")
            continue
        if v.kind != "artifact" or digest not in v.statement.subject_digests():
            reasons.append(f"entry {e.index}: not an artifact receipt for this digest")
            continue
        return bundle, v.statement, e.index
    raise ArtifactError(
        f"artifact {digest[:16]}…: no artifact receipt in the ledger verifies "
        f"({'; '.join(reasons)})"
    )


# --------------------------------------------------------------------------- batching


@dataclass
class _Request:
    text: str
    future: asyncio.Future[tuple[str, float]]


class _Batcher:
    """Collects requests for one model; runs each batch once on the model thread."""

    def __init__(
        self,
        predict: Callable[[Sequence[str]], list[tuple[str, float]]],
        executor: ThreadPoolExecutor,
        max_batch: int,
        max_wait_s: float,
        on_batch: Callable[[int], None],
    ) -> None:
        self._predict = predict
        self._executor = executor
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._on_batch = on_batch
        self._queue: asyncio.Queue[_Request | None] = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="kolm-batcher")

    async def submit(self, text: str) -> tuple[str, float]:
        fut: asyncio.Future[tuple[str, float]] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Request(text, fut))
        return await fut

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._queue.get()
            if first is None:
                return
            batch = [first]
            stop = False
            deadline = loop.time() + self.max_wait_s
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    left = deadline - loop.time()
                    if left <= 0:
                        break
                    try:
                        item = await asyncio.wait_for(self._queue.get(), left)
                    except TimeoutError:
                        break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            self._on_batch(len(batch))
            try:
                out = await loop.run_in_executor(
                    self._executor, self._predict, [r.text for r in batch]
                )
            except Exception as e:
                for r in batch:
                    if not r.future.done():
                        r.future.set_exception(e)
            else:
                for r, o in zip(batch, out, strict=True):
                    if not r.future.done():
                        r.future.set_result(o)
            if stop:
                return

    async def close(self) -> None:
        self._queue.put_nowait(None)
        await asyncio.gather(self._task, return_exceptions=True)


# --------------------------------------------------------------------------- engine


class Engine:
    """Loaded artifacts by digest and by name, micro-batched prediction, escape hatch.

    ``ledger`` is a synchronous :class:`LedgerClient` used at load time (inclusion
    check and key receipts). ``teacher`` is a :mod:`kolm_compile.teachers` teacher and
    ``teacher_task`` the task spec it prompts with; without one, low-confidence or
    unverifiable answers are returned marked unverified.
    """

    def __init__(
        self,
        trust: TrustRoot,
        ledger: LedgerClient | None,
        *,
        teacher: Any = None,
        teacher_task: Any = None,
        max_batch: int = 32,
        max_wait_ms: float = 1.0,
        model_threads: int | None = None,
        workdir: Path | None = None,
    ) -> None:
        if not isinstance(max_batch, int) or max_batch < 1:
            raise InvalidInput(f"max_batch is {max_batch!r}, want an integer >= 1")
        if not max_wait_ms >= 0:
            raise InvalidInput(f"max_wait_ms is {max_wait_ms!r}, want >= 0")
        self.trust = trust
        self.ledger = ledger
        self.teacher = teacher
        self.teacher_task = teacher_task
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000
        self.model_threads = model_threads
        self._workdir = Path(workdir or tempfile.mkdtemp(prefix="kolm-infer-"))
        self._own_workdir = workdir is None
        self._lock = threading.Lock()
        self._by_digest: dict[str, LoadedArtifact] = {}
        self._by_name: dict[str, str] = {}
        # one model thread: torch parallelises inside a forward pass already
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="kolm-model")
        self._teacher_pool = ThreadPoolExecutor(8, thread_name_prefix="kolm-teacher")
        self.batch_sizes: _Counter[int] = _Counter()

    # ---------------------------------------------------------------- registry

    def verify(self, path: Path) -> tuple[Any, Bundle, Statement, int]:
        """Run every load check on ``path`` without loading the model (see module docstring)."""
        from kolm_compile.artifact import verify_artifact

        if self.ledger is None:
            raise ArtifactError("no ledger is configured: cannot check the artifact receipt")
        try:
            state = ledger_trust_state(self.ledger, self.trust)
        except UnavailableError as e:
            raise UnavailableError(f"cannot read key receipts from the ledger: {e}") from e
        into = Path(tempfile.mkdtemp(prefix="a-", dir=self._workdir))
        try:
            va = verify_artifact(Path(path), state, into=into)
            bundle, statement, index = check_ledger_inclusion(self.ledger, self.trust, va.digest)
        except BaseException:
            shutil.rmtree(into, ignore_errors=True)
            raise
        return va, bundle, statement, index

    def load(self, path: Path, name: str | None = None) -> LoadedArtifact:
        """Verify and load one ``.kolm``; returns it (already loaded: the same object).

        Call from a worker thread when an event loop is running (it loads torch).
        """
        from kolm_compile._train import Student
        from kolm_compile.verifiers import get_verifier

        va, bundle, statement, index = self.verify(path)
        m = va.manifest
        name = name or str(m.get("name") or va.name)
        try:
            labels = [str(x) for x in m.get("labels") or []]
            threshold = float(m["confidence_threshold"])
            v = m["verifier"]
            verifier = get_verifier(v["name"], v.get("params") or {})
            adapter = va.directory / str(m.get("adapter", "adapter"))
            task_type = str(m.get("task_type", "classify"))
        except (KeyError, TypeError, ValueError, KolmError) as e:
            raise ArtifactError(f"{Path(path).name}: bad manifest.json: {e}") from e
        if task_type != "classify":
            raise ArtifactError(f"{Path(path).name}: task_type {task_type!r} is not served yet")
        with self._lock:
            have = self._by_digest.get(va.digest)
            if have is not None:
                shutil.rmtree(va.directory.parent, ignore_errors=True)
                return have
            if name in self._by_name:
                raise ArtifactError(
                    f"the name {name!r} is already used by artifact {self._by_name[name][:16]}…"
                )
        student = Student.load(adapter, threads=self.model_threads)
        ks = statement.predicate.get("k_score")
        art = LoadedArtifact(
            name=name,
            digest=va.digest,
            file_digest=va.file_digest,
            manifest=m,
            labels=labels or list(student.labels),
            task_type=task_type,
            confidence_threshold=threshold,
            k_score=float(ks) if isinstance(ks, int | float) else float("nan"),
            receipt_index=index,
            receipt_bundle=bundle,
            signer_keyid=va.signer.keyid,
            verifier=verifier,
            student=student,
            directory=va.directory,
        )
        with self._lock:
            if name in self._by_name or va.digest in self._by_digest:
                raise ArtifactError(f"artifact {name!r} was loaded concurrently")
            self._by_digest[va.digest] = art
            self._by_name[name] = va.digest
        log.info("loaded artifact %s (%s…) k_score %.1f", name, va.digest[:16], art.k_score)
        return art

    def get(self, ref: str) -> LoadedArtifact:
        """A loaded artifact by name or digest; raises :class:`NotFoundError`."""
        with self._lock:
            digest = self._by_name.get(ref, ref)
            art = self._by_digest.get(digest)
        if art is None:
            raise NotFoundError(f"no artifact named or with digest {ref[:80]!r} is loaded")
        return art

    def list(self) -> list[LoadedArtifact]:
        """Loaded artifacts, by name."""
        with self._lock:
            return sorted(self._by_digest.values(), key=lambda a: a.name)

    async def unload(self, ref: str) -> LoadedArtifact:
        """Unload by name or digest (requests already queued are answered first)."""
        art = self.get(ref)
        with self._lock:
            self._by_digest.pop(art.digest, None)
            self._by_name.pop(art.name, None)
        if art.batcher is not None:
            await art.batcher.close()
        shutil.rmtree(art.directory.parent, ignore_errors=True)
        return art

    # ---------------------------------------------------------------- prediction

    def _batcher(self, art: LoadedArtifact) -> _Batcher:
        if art.batcher is None:
            art.batcher = _Batcher(
                art.student.predict,
                self._model_thread,
                self.max_batch,
                self.max_wait_s,
                self._record_batch,
            )
        return art.batcher

    def _record_batch(self, n: int) -> None:
        self.batch_sizes[n] += 1
        BATCH_SIZE.observe(n)

    async def predict(self, ref: str, text: str) -> tuple[LoadedArtifact, Prediction]:
        """Answer one input with the artifact named (or with the digest) ``ref``."""
        t0 = time.perf_counter()
        if not isinstance(text, str):
            raise InvalidInput(f"input is {type(text).__name__}, want str")
        art = self.get(ref)
        label, conf = await self._batcher(art).submit(text)
        p = await self._finish(art, text, label, conf)
        p = replace(p, latency_ms=(time.perf_counter() - t0) * 1000)
        PREDICTIONS.labels(p.backend, p.reason).inc()
        LATENCY.observe(p.latency_ms / 1000)
        return art, p

    def _verdict(self, art: LoadedArtifact, output: str) -> tuple[Any, dict[str, Any]]:
        v = art.verifier.check(output)
        d = art.verifier.describe()
        return v, {
            "name": d["name"],
            "version": d["version"],
            "spec_digest": d["spec_digest"],
            "ok": v.ok,
            "reason": v.reason,
        }

    async def _finish(self, art: LoadedArtifact, text: str, label: str, conf: float) -> Prediction:
        verdict, vd = self._verdict(art, label)
        output = verdict.normalized if verdict.ok else label
        if conf < art.confidence_threshold:
            reason = "low_confidence"
        elif not verdict.ok:
            reason = "verifier_failed"
        else:
            return Prediction(output, True, "student", "confident", conf, vd, 0.0)
        if self.teacher is None:
            return Prediction(output, False, "student", reason, conf, vd, 0.0)
        try:
            samples = await asyncio.get_running_loop().run_in_executor(
                self._teacher_pool,
                lambda: self.teacher.sample(f"infer-{art.digest[:12]}", text, 1, self.teacher_task),
            )
            answer = samples[0].text
        except KolmError as e:
            log.warning("teacher failed (%s); answering with the student, unverified", e)
            return Prediction(output, False, "student", reason, conf, vd, 0.0)
        tv, tvd = self._verdict(art, answer)
        desc = self.teacher.describe()
        teacher = {"backend": desc.get("backend"), "model": desc.get("model")}
        return Prediction(
            tv.normalized if tv.ok else answer, tv.ok, "teacher", reason, conf, tvd, 0.0, teacher
        )

    async def close(self) -> None:
        """Drain the batchers and release threads and unpacked files."""
        for art in self.list():
            if art.batcher is not None:
                await art.batcher.close()
        self._model_thread.shutdown(wait=True)
        self._teacher_pool.shutdown(wait=False)
        if self.teacher is not None and hasattr(self.teacher, "close"):
            self.teacher.close()
        if self._own_workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)
