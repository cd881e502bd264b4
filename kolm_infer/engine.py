"""The prediction engine: verified artifacts, dynamic micro-batching, the escape hatch.

No gRPC here (the servicer in :mod:`kolm_infer.service` is a thin layer over this).

Loading (:meth:`Engine.load`) refuses, with :class:`~kolm_ledger.errors.ArtifactError`
(``FAILED_PRECONDITION``) naming the reason, any ``.kolm`` that fails:

1. the artifact check (:mod:`kolm_ledger.verify.artifact`, through
   :func:`kolm_compile.artifact.open_verified` and :func:`~kolm_compile.artifact.
   unpack_verified`), in this order: the zip directory (safe names, no symlinks or
   duplicates, entry count), ``model.sig`` and its signature by a trusted compile key
   valid now and not revoked (revocations come from the trust root and from ``key``
   receipts in the ledger), the subject digest, the signed file list (nothing extra,
   nothing missing, no pickle) and the size caps (:class:`~kolm_ledger.verify.artifact.
   ArtifactLimits`) — all before any content is read; then, after check 2, every file
   hashed against its signed digest with nothing written, and only then the unpacking
   into ``<workdir>/<digest>`` (a temporary folder renamed into place). Loads of one
   digest run one at a time and share that copy; a refused load leaves nothing;
2. ledger inclusion: the ledger holds an ``artifact`` receipt whose subject is the
   artifact digest (``FindEntries``), and its offline bundle (``GetReceiptBundle``)
   verifies against the trust root with :func:`kolm_ledger.verify.receipt.verify_bundle`:
   signed by a compile key, included in a checkpoint signed by a trusted log key;
3. recall (only when the manifest has ``recall``): the index file the manifest names
   passes :func:`kolm_compile.recall.verify_index` against the manifest's
   ``corpus_root`` and ``chunks`` (every chunk digest recomputed from its text, the
   name of a tampered chunk in the error), the artifact receipt's ``corpus_root`` /
   ``corpus_chunks`` (when it records them) equal the manifest's, and the optional
   ``recall.k`` is an integer in ``[1, MAX_RECALL_K]``. Loading then opens the index,
   builds the corpus Merkle tree (for the receipts' inclusion proofs) and loads the
   query embedder (the manifest's ``embedding_model``), checking its dimension.

Prediction (:meth:`Engine.predict`): requests for one artifact queue up; a worker
takes up to ``max_batch`` of them (waiting at most ``max_wait_ms`` for the batch to
fill) and runs the student once for the whole batch on the model thread. While the
model runs, new requests queue, so under load batches fill by themselves: batching,
not threads, gives throughput. Each answer is checked with the artifact's verifier.
Gate and escape hatch (docs/INFERENCE.md): an artifact with a manifest ``gate``
(:mod:`kolm_compile.gate`) keeps an input in the student's *cover* iff its calibrated
probability and its kNN similarity to the training examples reach the compile-time
thresholds (older artifacts: softmax confidence >= ``confidence_threshold``). An input
outside the cover, or one whose answer the verifier refuses, goes to the teacher (if one
is configured, k=1). When no teacher is configured or it fails, the request is refused
(:class:`NoTeacher`, ``FAILED_PRECONDITION``; :class:`TeacherFailed`, ``UNAVAILABLE``)
unless the engine runs with ``on_teacher_failure="student"``: then the student's answer
comes back unverified, ``reason="teacher_unavailable"``. Each prediction carries the gate's
values, thresholds and decision (``Prediction.gate``, recorded in the receipt).

Recall (an artifact with a recall index): each request retrieves ``recall_k`` chunks
(default: the manifest's ``recall.k``, else :data:`DEFAULT_RECALL_K`; at most
:data:`MAX_RECALL_K`). The query embeddings of a micro-batch are computed in one pass,
right after the student's, on the model thread; the hits become the receipt's
``evidence`` (id, digest, position, inclusion proof, label). **Classification rule**:
when the student's confidence is below the threshold, its answer passes the verifier,
and at least :data:`RECALL_VOTE_MIN_NEIGHBOURS` retrieved chunks carry labels, the
neighbours vote (:func:`kolm_compile.recall.neighbour_vote`: majority label, ties to
the best-ranked); if the winner is the student's label with a share above one half,
the answer is accepted as ``backend="student"``, ``reason="recall_backed"``, verified,
and the teacher is not asked. Otherwise the escape hatch runs as without recall. A
verifier failure is never backed by recall.

Example::

    engine = Engine(trust_root, LedgerClient("127.0.0.1:7070"))
    engine.load(Path("router.kolm"))
    art, p = await engine.predict("banking77-router", "where is my card?")
    p.output, p.backend, p.reason      # ('card_arrival', 'student', 'confident')
    art, p = await engine.predict("router-docs", "where is my card?", recall_k=3)
    [h.chunk_id for h in p.recall.hits]  # the 3 nearest chunks, best first
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import threading
import time
from collections import Counter as _Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter, Histogram

from kolm_ledger.errors import (
    ArtifactError,
    InvalidInput,
    KolmError,
    NotFoundError,
    UnavailableError,
)
from kolm_ledger.formats.bundle import Bundle
from kolm_ledger.formats.manifest import Manifest
from kolm_ledger.formats.receipts import Statement
from kolm_ledger.keys import TrustRoot
from kolm_ledger.service.client import LedgerClient
from kolm_ledger.verify.artifact import DEFAULT_LIMITS, ArtifactLimits
from kolm_ledger.verify.receipt import verify_bundle
from kolm_ledger.verify.trust import TrustState
from kolm_ledger.verify.trust import ledger_trust_state as _ledger_trust_state

if TYPE_CHECKING:
    from kolm_compile.recall import Hit, IndexInfo, RecallIndex

__all__ = [
    "DEFAULT_RECALL_K",
    "MAX_RECALL_K",
    "ON_TEACHER_FAILURE",
    "REASONS",
    "RECALL_VOTE_MIN_NEIGHBOURS",
    "ArtifactRecall",
    "Engine",
    "LoadedArtifact",
    "NoRecallIndex",
    "NoTeacher",
    "Prediction",
    "RecallResult",
    "TeacherFailed",
    "artifact_path",
    "check_ledger_inclusion",
    "ledger_trust_state",
]

log = logging.getLogger("kolm.infer")

#: Why a backend answered: the receipt's ``reason`` field. ``out_of_distribution``: the
#: gate's kNN similarity is below its threshold; ``teacher_unavailable``: the input left the
#: cover, the teacher could not answer, and the engine runs with
#: ``on_teacher_failure="student"`` (the student's answer, unverified).
REASONS = (
    "confident",
    "recall_backed",
    "low_confidence",
    "out_of_distribution",
    "verifier_failed",
    "teacher_unavailable",
)
#: What happens when an input leaves the cover and no teacher answers.
ON_TEACHER_FAILURE = ("refuse", "student")

#: Most chunks one prediction may retrieve and cite. Each cited chunk puts its inclusion
#: proof in the receipt (about 70 + 67·ceil(log2(chunks)) bytes; ~1.2 KB at 100k chunks)
#: and the ledger caps an entry at 64 KiB.
MAX_RECALL_K = 10
#: Chunks retrieved when the request does not say and the manifest has no ``recall.k``.
DEFAULT_RECALL_K = 5
#: Labelled neighbours needed before their vote may back a low-confidence answer.
RECALL_VOTE_MIN_NEIGHBOURS = 3


class NoRecallIndex(KolmError):
    """Retrieval was asked of an artifact that has no recall index."""

    grpc_code = "FAILED_PRECONDITION"


class NoTeacher(KolmError):
    """The input left the cover and no teacher is configured (fail closed)."""

    grpc_code = "FAILED_PRECONDITION"


class TeacherFailed(UnavailableError):
    """The input left the cover and the teacher failed (fail closed)."""


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
    recall: RecallResult | None = None
    recall_vote: dict[str, Any] | None = None  # label, share, neighbours, agrees
    gate: dict[str, Any] | None = None  # the gate's values, thresholds and decision


@dataclass(frozen=True)
class RecallResult:
    """The chunks retrieved for one request (``k`` asked; ``hits`` best first)."""

    k: int
    hits: tuple[Hit, ...]
    evidence: tuple[dict[str, Any], ...]  # the receipt's items, with inclusion proofs
    corpus_root: str


@dataclass
class ArtifactRecall:
    """An artifact's verified, open recall index."""

    index: RecallIndex
    corpus_root: str
    chunks: int
    default_k: int
    embedding_model: str
    labelled: bool


@dataclass
class LoadedArtifact:
    """An artifact that passed every load check, with its student and verifier."""

    name: str
    digest: str
    file_digest: str
    manifest: Manifest
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
    recall: ArtifactRecall | None = field(default=None, repr=False)
    gate: Any = field(default=None, repr=False)  # kolm_compile.gate.Gate, when the artifact has one


def ledger_trust_state(client: LedgerClient, trust: TrustRoot) -> TrustState:
    """The trust root plus *every* ``key`` receipt of the ledger (registrations, rotations,
    revocations), paged through ``FindEntries`` and folded by
    :func:`kolm_ledger.verify.trust.fold_key_receipts` (each must be signed by an ``admin`` key
    of the state so far, valid at its integration time; others are left out)."""
    return _ledger_trust_state(client, trust)


def artifact_path(artifacts_dir: Path | None, requested: str) -> Path:
    """The file a client's ``LoadArtifact(path=...)`` names, if it lies in ``artifacts_dir``.

    Relative paths are taken from ``artifacts_dir``; the result, symlinks resolved, must be
    inside it. Any other path — an existing host file or a missing one alike — gets the
    same :class:`InvalidInput`, so the answer reveals nothing about files outside.
    """
    if artifacts_dir is None:
        raise InvalidInput(
            "path: this service has no artifacts folder (kolm infer serve --artifacts DIR); "
            "send the artifact's bytes as data"
        )
    root = Path(artifacts_dir).resolve()
    try:
        target = (root / requested).resolve()
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL byte
        target = None
    if target is None or not target.is_relative_to(root):
        raise InvalidInput(
            f"path {requested[:200]!r} is not a file in the service's artifacts folder; "
            "put the .kolm there or send its bytes as data"
        )
    return target


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


_Raw = tuple[str, float, "RecallResult | None", "dict[str, Any] | None"]
"""One batch result: the student's label and confidence, what recall retrieved, and the
gate's scores (artifacts with a gate)."""


@dataclass
class _Request:
    text: str
    k: int  # chunks to retrieve (0: none)
    future: asyncio.Future[_Raw]


class _Batcher:
    """Collects requests for one model; runs each batch once on the model thread."""

    def __init__(
        self,
        predict: Callable[[Sequence[tuple[str, int]]], list[_Raw]],
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

    async def submit(self, text: str, k: int = 0) -> _Raw:
        fut: asyncio.Future[_Raw] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Request(text, k, fut))
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
                    self._executor, self._predict, [(r.text, r.k) for r in batch]
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
    ``teacher_task`` the task spec it prompts with. ``on_teacher_failure``: what an input
    outside the cover gets when no teacher answers — ``"refuse"`` (default:
    :class:`NoTeacher` / :class:`TeacherFailed`) or ``"student"`` (the student's answer,
    unverified, ``reason="teacher_unavailable"``). ``artifacts_dir`` is the only folder the
    service's ``LoadArtifact(path=...)`` may name (:func:`artifact_path`).
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
        limits: ArtifactLimits = DEFAULT_LIMITS,
        artifacts_dir: Path | None = None,
        on_teacher_failure: str = "refuse",
    ) -> None:
        if on_teacher_failure not in ON_TEACHER_FAILURE:
            raise InvalidInput(
                f"on_teacher_failure is {on_teacher_failure!r}, want one of {ON_TEACHER_FAILURE}"
            )
        self.on_teacher_failure = on_teacher_failure
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
        self._workdir.mkdir(parents=True, exist_ok=True)
        self.limits = limits
        self.artifacts_dir = artifacts_dir  # where LoadArtifact(path=...) may read; None: nowhere
        self._lock = threading.Lock()
        self._unpack_locks: dict[str, threading.Lock] = {}  # one per artifact digest
        self._by_digest: dict[str, LoadedArtifact] = {}
        self._by_name: dict[str, str] = {}
        # one model thread: torch parallelises inside a forward pass already
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="kolm-model")
        self._teacher_pool = ThreadPoolExecutor(8, thread_name_prefix="kolm-teacher")
        self.batch_sizes: _Counter[int] = _Counter()

    # ---------------------------------------------------------------- registry

    def verify(self, path: Path) -> tuple[Any, Bundle, Statement, int]:
        """Run every load check on ``path`` without loading the model (see module docstring).

        The artifact is unpacked into the work folder for the checks and removed again."""
        with self._open(path) as opened:
            bundle, statement, index = self._included(opened.digest)
            tmp = Path(tempfile.mkdtemp(prefix=".verify-", dir=self._workdir))
            try:
                va = self._unpack(opened, tmp / "a", statement)[0]
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return va, bundle, statement, index

    def _open(self, path: Path) -> Any:
        """Load check 1, up to the signed file list: nothing is read past it or written."""
        from kolm_compile.artifact import open_verified

        if self.ledger is None:
            raise ArtifactError("no ledger is configured: cannot check the artifact receipt")
        try:
            state = ledger_trust_state(self.ledger, self.trust)
        except UnavailableError as e:
            raise UnavailableError(f"cannot read key receipts from the ledger: {e}") from e
        return open_verified(Path(path), state, limits=self.limits)

    def _included(self, digest: str) -> tuple[Bundle, Statement, int]:
        assert self.ledger is not None
        return check_ledger_inclusion(self.ledger, self.trust, digest)

    def _unpack(self, opened: Any, dest: Path, statement: Statement) -> tuple[Any, Any]:
        """The rest of load checks 1 and 3: hash, unpack atomically into ``dest``, recall."""
        from kolm_compile.artifact import unpack_verified

        va = unpack_verified(opened, dest)
        try:
            info = _verify_recall(opened.name, va, statement)
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise
        return va, info

    @contextmanager
    def _unpack_lock(self, digest: str) -> Iterator[None]:
        """Serialises the loads (and the removal) of one artifact digest."""
        with self._lock:
            lock = self._unpack_locks.setdefault(digest, threading.Lock())
        with lock:
            yield

    def load(self, path: Path, name: str | None = None) -> LoadedArtifact:
        """Verify and load one ``.kolm``; returns it (already loaded: the same object).

        Nothing is unpacked before the signature and the signed file list pass, and
        nothing at all unless every file matches its signed digest. Loads of one artifact
        digest run one at a time and share one unpacked copy (``<workdir>/<digest>``);
        a refused load leaves nothing there. Call from a worker thread when an event
        loop is running (it loads torch).
        """
        with self._open(path) as opened, self._unpack_lock(opened.digest):
            with self._lock:
                have = self._by_digest.get(opened.digest)
            if have is not None:
                opened.check()  # the file given is checked all the same; nothing written
                return have
            dest = self._workdir / opened.digest
            shutil.rmtree(dest, ignore_errors=True)  # a leftover of an earlier process
            bundle, statement, index = self._included(opened.digest)
            va, info = self._unpack(opened, dest, statement)
            try:
                return self._load_unpacked(path, name, va, bundle, statement, index, info)
            except BaseException:
                shutil.rmtree(dest, ignore_errors=True)
                raise

    def _load_unpacked(
        self,
        path: Path,
        name: str | None,
        va: Any,
        bundle: Bundle,
        statement: Statement,
        index: int,
        info: IndexInfo | None,
    ) -> LoadedArtifact:
        from kolm_compile.student import Student
        from kolm_compile.verifiers import get_verifier

        m: Manifest = va.manifest
        name = name or m.name or va.name
        try:
            labels = list(m.labels or ())
            if m.confidence_threshold is None:
                raise ArtifactError("manifest.confidence_threshold: missing")
            threshold = float(m.confidence_threshold)
            if m.verifier is None:
                raise ArtifactError("manifest.verifier: missing")
            verifier = get_verifier(m.verifier.name, dict(m.verifier.params))
            adapter = va.directory / m.adapter_dir
            task_type = m.task_type or "classify"
        except KolmError as e:
            raise ArtifactError(f"{Path(path).name}: bad manifest.json: {e}") from e
        if task_type not in ("classify", "extract", "generate"):
            raise ArtifactError(f"{Path(path).name}: task_type {task_type!r} is not served")
        with self._lock:
            if name in self._by_name:
                raise ArtifactError(
                    f"the name {name!r} is already used by artifact {self._by_name[name][:16]}…"
                )
        gate = None
        if m.gate is not None:
            from kolm_compile.gate import Gate

            gate = Gate.load(va.directory, dict(m.gate), Path(path).name)
        student = Student.load(adapter, threads=self.model_threads)
        rec = _open_recall(Path(path).name, va, info) if info is not None else None
        ks = statement.predicate.get("k_score")
        art = LoadedArtifact(
            name=name,
            digest=va.digest,
            file_digest=va.file_digest,
            manifest=m,
            labels=labels or list(getattr(student, "labels", None) or ()),
            task_type=task_type,
            confidence_threshold=threshold,
            k_score=float(ks) if isinstance(ks, int | float) else float("nan"),
            receipt_index=index,
            receipt_bundle=bundle,
            signer_keyid=va.signer.keyid,
            verifier=verifier,
            student=student,
            directory=va.directory,
            recall=rec,
            gate=gate,
        )
        with self._lock:
            if name in self._by_name or va.digest in self._by_digest:
                if rec is not None:
                    rec.index.close()
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
        if art.recall is not None:
            art.recall.index.close()
        await asyncio.to_thread(self._discard, art.digest)
        return art

    def _discard(self, digest: str) -> None:
        """Remove the unpacked copy of ``digest`` unless it was loaded again meanwhile."""
        with self._unpack_lock(digest):
            with self._lock:
                if digest in self._by_digest:
                    return
            shutil.rmtree(self._workdir / digest, ignore_errors=True)

    # ---------------------------------------------------------------- prediction

    def _batcher(self, art: LoadedArtifact) -> _Batcher:
        if art.batcher is None:
            art.batcher = _Batcher(
                lambda items: _run_batch(art, items),
                self._model_thread,
                self.max_batch,
                self.max_wait_s,
                self._record_batch,
            )
        return art.batcher

    def _record_batch(self, n: int) -> None:
        self.batch_sizes[n] += 1
        BATCH_SIZE.observe(n)

    async def predict(
        self, ref: str, text: str, *, recall_k: int | None = None
    ) -> tuple[LoadedArtifact, Prediction]:
        """Answer one input with the artifact named (or with the digest) ``ref``.

        ``recall_k``: chunks to retrieve and cite (``None``: the artifact's default, none
        without recall; 0: none). Requires ``0 <= recall_k <= MAX_RECALL_K`` (else
        :class:`InvalidInput`) and, above 0, an artifact with recall (else
        :class:`NoRecallIndex`).
        """
        t0 = time.perf_counter()
        if not isinstance(text, str):
            raise InvalidInput(f"input is {type(text).__name__}, want str")
        art = self.get(ref)
        k = _recall_k(art, recall_k)
        label, conf, rec, g = await self._batcher(art).submit(text, k)
        p = await self._finish(art, text, label, conf, rec, g)
        p = replace(p, latency_ms=(time.perf_counter() - t0) * 1000)
        PREDICTIONS.labels(p.backend, p.reason).inc()
        LATENCY.observe(p.latency_ms / 1000)
        return art, p

    def _verdict(self, art: LoadedArtifact, output: str, text: str) -> tuple[Any, dict[str, Any]]:
        v = art.verifier.check(output, input=text)
        d = art.verifier.describe()
        return v, {
            "name": d["name"],
            "version": d["version"],
            "spec_digest": d["spec_digest"],
            "ok": v.ok,
            "reason": v.reason,
        }

    async def _finish(
        self,
        art: LoadedArtifact,
        text: str,
        label: str,
        conf: float,
        rec: RecallResult | None = None,
        g: dict[str, Any] | None = None,
    ) -> Prediction:
        verdict, vd = self._verdict(art, label, text)
        output = verdict.normalized if verdict.ok else label
        if g is not None:  # the artifact's gate decides (kolm_compile.gate)
            gate = art.gate.receipt(g)
        else:  # an artifact without a gate: the softmax threshold, recorded alike
            inside = conf >= art.confidence_threshold
            gate = {
                "rule": "softmax",
                "prob": round(float(conf), 6),
                "t_prob": round(float(art.confidence_threshold), 6),
                "inside": inside,
                "decided_by": "cover" if inside else "prob",
            }
        if not gate["inside"]:
            far = gate["decided_by"] in ("distance", "prob+distance")
            reason = "out_of_distribution" if far else "low_confidence"
        elif not verdict.ok:
            reason = "verifier_failed"
        else:
            return Prediction(
                output, True, "student", "confident", conf, vd, 0.0, recall=rec, gate=gate
            )
        vote = _vote(rec, label) if reason == "low_confidence" and verdict.ok else None
        if vote is not None and vote["agrees"]:
            return Prediction(
                output, True, "student", "recall_backed", conf, vd, 0.0, None, rec, vote, gate
            )
        if self.teacher is None:
            why = "no teacher is configured"
            return self._no_teacher(art, why, reason, output, conf, vd, rec, vote, gate)
        try:
            samples = await asyncio.get_running_loop().run_in_executor(
                self._teacher_pool,
                lambda: self.teacher.sample(f"infer-{art.digest[:12]}", text, 1, self.teacher_task),
            )
            answer = samples[0].text
        except KolmError as e:
            log.warning("teacher failed: %s", e)
            why = f"the teacher failed ({type(e).__name__}: {str(e)[:200]})"
            return self._no_teacher(art, why, reason, output, conf, vd, rec, vote, gate)
        tv, tvd = self._verdict(art, answer, text)
        desc = self.teacher.describe()
        teacher = {"backend": desc.get("backend"), "model": desc.get("model")}
        return Prediction(
            tv.normalized if tv.ok else answer,
            tv.ok,
            "teacher",
            reason,
            conf,
            tvd,
            0.0,
            teacher,
            rec,
            vote,
            gate,
        )

    def _no_teacher(
        self,
        art: LoadedArtifact,
        why: str,
        reason: str,
        output: str,
        conf: float,
        vd: dict[str, Any],
        rec: RecallResult | None,
        vote: dict[str, Any] | None,
        gate: dict[str, Any],
    ) -> Prediction:
        """The input left the cover and nobody else can answer: refuse (fail closed), or,
        with ``on_teacher_failure="student"``, the student's answer flagged
        ``teacher_unavailable`` (``gate.routed`` keeps why it left the cover)."""
        if self.on_teacher_failure == "student":
            return Prediction(
                output,
                False,
                "student",
                "teacher_unavailable",
                conf,
                vd,
                0.0,
                None,
                rec,
                vote,
                {**gate, "routed": reason},
            )
        values = ", ".join(
            f"{k} {gate[k]}" for k in ("prob", "t_prob", "sim", "t_sim") if k in gate
        )
        msg = (
            f"artifact {art.name!r}: the input is outside the student's cover ({reason}; "
            f"{values}) and {why}; refusing rather than answering unverified (serve with "
            "--teacher, or --on-teacher-failure student to get the student's flagged answer)"
        )
        if self.teacher is None:
            raise NoTeacher(msg)
        raise TeacherFailed(msg)

    async def close(self) -> None:
        """Drain the batchers and release threads and unpacked files."""
        for art in self.list():
            if art.batcher is not None:
                await art.batcher.close()
        self._model_thread.shutdown(wait=True)
        for art in self.list():
            if art.recall is not None:
                art.recall.index.close()
        self._teacher_pool.shutdown(wait=False)
        if self.teacher is not None and hasattr(self.teacher, "close"):
            self.teacher.close()
        if self._own_workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)


# --------------------------------------------------------------------------- recall


def _verify_recall(name: str, va: Any, statement: Statement) -> IndexInfo | None:
    """Load check 3 (see the module docstring); ``None`` for an artifact without recall."""
    from kolm_compile.recall import IndexInfo

    rc = va.manifest.recall
    if rc is None:
        return None
    info = IndexInfo.from_ref(rc)
    k = DEFAULT_RECALL_K if rc.k is None else rc.k
    if not 1 <= k <= MAX_RECALL_K:
        raise ArtifactError(
            f"{name}: manifest recall.k is {k!r}, want an integer in [1, {MAX_RECALL_K}]"
        )
    rel = PurePosixPath(info.index)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise ArtifactError(f"{name}: manifest recall.index {info.index[:80]!r} is unsafe")
    pred = statement.predicate
    for field_, want in (("corpus_root", info.corpus_root), ("corpus_chunks", info.chunks)):
        if field_ in pred and pred[field_] != want:
            raise ArtifactError(
                f"{name}: the artifact receipt's {field_} {str(pred[field_])[:16]} is not the "
                f"manifest's {str(want)[:16]}"
            )
    # every chunk digest and the corpus root were recomputed by verify_artifact (verify_index)
    return info


def _open_recall(name: str, va: Any, info: IndexInfo) -> ArtifactRecall:
    """Open a verified index, build its corpus tree, load and check the query embedder."""
    from kolm_compile.recall import RecallIndex
    from kolm_compile.student import embed_texts

    model_id = info.embedding_model

    def embed(texts: Sequence[str]) -> Any:
        return embed_texts(texts, model_id)

    idx = RecallIndex.open(va.directory / info.index, k_cap=MAX_RECALL_K, embed=embed)
    try:
        tree = idx.corpus_tree()
        try:
            dim = int(embed(["kolm"]).shape[1])
        except KolmError as e:
            raise ArtifactError(f"{name}: recall embedding model {model_id!r}: {e}") from e
        if dim != idx.dim:
            raise ArtifactError(
                f"{name}: recall embedding model {model_id!r} gives {dim}-d vectors, "
                f"the index holds {idx.dim}-d"
            )
        labelled = idx.chunk(0).label is not None
    except BaseException:
        idx.close()
        raise
    rc = va.manifest.recall
    k = DEFAULT_RECALL_K if rc is None or rc.k is None else rc.k
    return ArtifactRecall(idx, tree.root_hex, tree.size, k, model_id, labelled)


def _recall_k(art: LoadedArtifact, requested: int | None) -> int:
    """The number of chunks to retrieve for one request (see :meth:`Engine.predict`)."""
    if requested is None:
        return art.recall.default_k if art.recall is not None else 0
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 0:
        raise InvalidInput(f"recall_k is {requested!r}, want an integer in [0, {MAX_RECALL_K}]")
    if requested > MAX_RECALL_K:
        raise InvalidInput(
            f"recall_k is {requested}, over the cap of {MAX_RECALL_K} chunks per prediction "
            "(each cited chunk's inclusion proof goes into the receipt, and the ledger caps "
            "an entry at 64 KiB)"
        )
    if requested and art.recall is None:
        raise NoRecallIndex(
            f"artifact {art.name!r} ({art.digest[:16]}…) has no recall index; "
            "send recall_k 0 or leave it unset"
        )
    return requested


def _run_batch(art: LoadedArtifact, items: Sequence[tuple[str, int]]) -> list[_Raw]:
    """On the model thread: the student over the batch, then one query-embedding pass and
    the searches for the requests that asked for recall."""
    from kolm_compile.recall import evidence

    texts = [t for t, _ in items]
    gates: list[dict[str, Any] | None] = [None] * len(items)
    if art.gate is not None and not art.gate.confidence_only:
        # a classifier: one forward pass gives the logits and the embeddings
        logits, emb = art.student.analyse(texts)
        gates = list(art.gate.score(logits, emb))
        labels = art.student.labels
        preds = [(labels[x["index"]], float(x["raw"])) for x in gates]  # type: ignore[index]
    else:  # a generative or tagging student (padding-aware micro-batch), or no gate
        preds = art.student.predict(texts, batch_size=max(1, len(texts)))
        if art.gate is not None:
            gates = list(art.gate.score_confidence([c for _, c in preds]))
    recalls: list[RecallResult | None] = [None] * len(items)
    want = [i for i, (_, k) in enumerate(items) if k > 0]
    if want and art.recall is not None:
        rc = art.recall
        rows = rc.index.search([texts[i] for i in want], k=max(items[i][1] for i in want))
        for i, row in zip(want, rows, strict=True):
            hits = tuple(row[: items[i][1]])
            recalls[i] = RecallResult(
                items[i][1], hits, tuple(evidence(hits, rc.index)), rc.corpus_root
            )
    return [(label, conf, r, g) for (label, conf), r, g in zip(preds, recalls, gates, strict=True)]


def _vote(rec: RecallResult | None, label: str) -> dict[str, Any] | None:
    """The neighbour vote of the classification rule (module docstring), or ``None`` when
    fewer than :data:`RECALL_VOTE_MIN_NEIGHBOURS` retrieved chunks carry labels."""
    if rec is None:
        return None
    labelled = [h for h in rec.hits if h.label is not None]
    if len(labelled) < RECALL_VOTE_MIN_NEIGHBOURS:
        return None
    from kolm_compile.recall import neighbour_vote

    winner, share = neighbour_vote(labelled)
    return {
        "label": winner,
        "share": round(share, 4),
        "neighbours": len(labelled),
        "agrees": winner == label and share > 0.5,
    }
