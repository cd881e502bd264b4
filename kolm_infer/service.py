"""The inference gRPC service (``kolm.infer.v1.Inference``) on ``grpc.aio``.

The servicer is thin: it parses messages, calls :class:`~kolm_infer.engine.Engine`
for the answer and :mod:`kolm_infer.receipts` for the signed receipt, and builds the
reply. Fail closed: a reply is sent only after its receipt is acknowledged by the
ledger (the signed promise comes back with the answer; ``wait_for_inclusion`` returns
the offline bundle instead) or, with a spool configured, committed to the spool. The
ledger unreachable without a spool → ``UNAVAILABLE``. Errors become statuses through
:class:`kolm_ledger.service.rpc.ErrorInterceptor` (a refused artifact → ``FAILED_PRECONDITION``).
``request_id`` longer than :data:`~kolm_infer.receipts.MAX_REQUEST_ID_CHARS` →
``INVALID_ARGUMENT``.

Revocation: a :class:`~kolm_infer.revocation.KeyFollower` polls the ledger's key
receipts every ``key_poll_s`` seconds; an artifact whose compile key is revoked stops
being served (``Predict`` → ``FAILED_PRECONDITION`` naming it and the key). Once the
ledger refuses this service's own ``infer`` key (or the follower sees it revoked), every
``Predict`` answers ``FAILED_PRECONDITION`` and health goes ``NOT_SERVING``: fail closed,
in spool-first mode too (refused spooled receipts are kept in the spool's quarantine).

Recall: ``PredictRequest.recall_k`` (unset: the artifact's default; 0: none; over
:data:`~kolm_infer.engine.MAX_RECALL_K` → ``INVALID_ARGUMENT``; above 0 on an artifact
without recall → ``FAILED_PRECONDITION``). The retrieved chunks come back as
``PredictResponse.evidence`` (id, digest, position, label, score, text) and go into the
receipt as ``evidence`` (id, digest, position, inclusion proof, label) with
``corpus_root``; the neighbour vote, when taken, as ``recall_vote`` in both.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import start_http_server

from kolm_ledger._crypto import PrivateKey
from kolm_ledger.errors import InvalidInput
from kolm_ledger.keys import TrustRoot
from kolm_ledger.service import rpc
from kolm_ledger.service.authz import ALL_ROLES, AuthzInterceptor, Policy
from kolm_ledger.service.client import AsyncLedgerClient, LedgerClient

from ._pb import infer_pb2 as pb
from ._pb import infer_pb2_grpc as pb_grpc
from .engine import Engine, LoadedArtifact, Prediction, artifact_path
from .receipts import (
    OUTPUT_POLICIES,
    Ack,
    KeyRefused,
    ReceiptWriter,
    Spool,
    check_ack,
    check_request_id,
    sign_prediction,
)
from .revocation import DEFAULT_KEY_POLL_S, KeyFollower

__all__ = ["INFER_POLICY", "InferenceServer", "InferenceServicer", "serve", "start"]

log = logging.getLogger("kolm.infer")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Inference"].full_name
MAX_MESSAGE = 64 * 1024 * 1024
MAX_INPUT_CHARS = 16_384
#: Which client roles may call each method of this service (kolm_ledger.service.authz: the
#: mechanism; an unlisted method is refused, an admin may call every one)
INFER_POLICY: Policy = {
    SERVICE_NAME: {
        "LoadArtifact": frozenset({"admin", "infer"}),
        "UnloadArtifact": frozenset({"admin", "infer"}),
        "Predict": frozenset({"admin", "infer"}),
        "PredictStream": frozenset({"admin", "infer"}),
        "ListArtifacts": ALL_ROLES,
    },
}


def artifact_pb(a: LoadedArtifact) -> pb.ArtifactInfo:
    """Loaded artifact → protobuf."""
    return pb.ArtifactInfo(
        name=a.name,
        digest=a.digest,
        file_digest=a.file_digest,
        task_type=a.task_type,
        labels=a.labels,
        confidence_threshold=a.confidence_threshold,
        k_score=a.k_score,
        artifact_receipt_index=a.receipt_index,
        verifier=a.manifest.verifier.name if a.manifest.verifier is not None else "",
        signer_key_id=a.signer_keyid,
        recall=pb.RecallInfo(
            corpus_root=a.recall.corpus_root,
            chunks=a.recall.chunks,
            default_k=a.recall.default_k,
            embedding_model=a.recall.embedding_model,
            labelled=a.recall.labelled,
        )
        if a.recall is not None
        else None,
    )


def _recall_pb(resp: pb.PredictResponse, p: Prediction) -> None:
    """Fill the response's recall fields from the prediction."""
    if p.recall is not None:
        resp.recall_k = p.recall.k
        resp.corpus_root = p.recall.corpus_root
        resp.evidence.extend(
            pb.Evidence(
                id=h.chunk_id,
                digest=h.digest,
                position=h.position,
                label=h.label or "",
                score=h.score,
                text=h.text,
            )
            for h in p.recall.hits
        )
    if p.recall_vote is not None:
        v = p.recall_vote
        resp.recall_vote.CopyFrom(
            pb.RecallVote(
                label=v["label"], share=v["share"], neighbours=v["neighbours"], agrees=v["agrees"]
            )
        )


class InferenceServicer(pb_grpc.InferenceServicer):
    """Thin servicer over the engine and the receipt writer."""

    def __init__(
        self,
        engine: Engine,
        writer: ReceiptWriter,
        infer_key: PrivateKey,
        *,
        output_policy: str = "full",
        keys: KeyFollower | None = None,
    ) -> None:
        if output_policy not in OUTPUT_POLICIES:
            raise InvalidInput(f"output policy {output_policy!r}, want one of {OUTPUT_POLICIES}")
        self.engine = engine
        self.writer = writer
        self.key = infer_key
        self.output_policy = output_policy
        self.keys = keys

    async def LoadArtifact(
        self, request: pb.LoadArtifactRequest, context: grpc.aio.ServicerContext
    ) -> pb.ArtifactInfo:
        which = request.WhichOneof("source")
        if which == "path":
            path = artifact_path(self.engine.artifacts_dir, request.path)  # or INVALID_ARGUMENT
            art = await asyncio.to_thread(self.engine.load, path, request.name or None)
        elif which == "data":
            fd, tmp = tempfile.mkstemp(suffix=".kolm")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(request.data)
                art = await asyncio.to_thread(self.engine.load, Path(tmp), request.name or None)
            finally:
                os.unlink(tmp)
        else:
            raise InvalidInput("give the artifact as path or data")
        if self.keys is not None:
            self.keys.forget(art)
        return artifact_pb(art)

    async def ListArtifacts(
        self, request: pb.ListArtifactsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListArtifactsResponse:
        return pb.ListArtifactsResponse(artifacts=[artifact_pb(a) for a in self.engine.list()])

    async def UnloadArtifact(
        self, request: pb.UnloadArtifactRequest, context: grpc.aio.ServicerContext
    ) -> pb.UnloadArtifactResponse:
        art = await self.engine.unload(request.artifact)
        return pb.UnloadArtifactResponse(digest=art.digest)

    async def _predict(self, request: pb.PredictRequest) -> pb.PredictResponse:
        if len(request.input) > MAX_INPUT_CHARS:
            raise InvalidInput(
                f"input has {len(request.input)} characters, limit {MAX_INPUT_CHARS}"
            )
        check_request_id(request.request_id)
        self.writer.check_serving()  # fail closed once the ledger refuses our key
        if self.keys is not None:
            self.keys.check(request.artifact)  # stopped by a revocation
        rid = request.request_id or uuid.uuid4().hex
        k = request.recall_k if request.HasField("recall_k") else None
        art, p = await self.engine.predict(request.artifact, request.input, recall_k=k)
        if self.keys is not None:
            self.keys.check(art.digest)  # revoked while this request was being answered
        extra: dict[str, Any] = {}
        if p.teacher is not None:
            extra["teacher"] = p.teacher
        if p.recall_vote is not None:
            extra["recall_vote"] = p.recall_vote
        if p.gate is not None:
            extra["gate"] = p.gate
        env, salt, commitment = sign_prediction(
            self.key,
            artifact_digest=art.digest,
            input_value=request.input,
            output=p.output,
            verdict=p.verdict,
            backend=p.backend,
            reason=p.reason,
            confidence=p.confidence,
            latency_ms=p.latency_ms,
            request_id=rid,
            output_policy=self.output_policy,
            extra=extra,
            evidence=p.recall.evidence if p.recall is not None else None,
            corpus_root=p.recall.corpus_root if p.recall is not None else None,
        )
        ack = await self.writer.submit(env, wait=request.wait_for_inclusion)
        resp = pb.PredictResponse(
            request_id=rid,
            output=p.output,
            verified=p.verified,
            backend=p.backend,
            reason=p.reason,
            confidence=p.confidence,
            latency_ms=p.latency_ms,
            artifact_digest=art.digest,
            salt=salt,
            input_commitment=commitment,
            envelope=env.to_bytes(),
            verifier_reason=str(p.verdict.get("reason", "")),
        )
        _recall_pb(resp, p)
        _set_receipt(resp, ack)
        return resp

    async def Predict(
        self, request: pb.PredictRequest, context: grpc.aio.ServicerContext
    ) -> pb.PredictResponse:
        return await self._predict(request)

    async def PredictStream(
        self,
        request_iterator: AsyncIterator[pb.PredictRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.PredictResponse]:
        """Requests are answered concurrently; responses come in completion order."""
        out: asyncio.Queue[pb.PredictResponse | BaseException | None] = asyncio.Queue()
        tasks: set[asyncio.Task[None]] = set()

        async def one(req: pb.PredictRequest) -> None:
            try:
                await out.put(await self._predict(req))
            except BaseException as e:  # sent as the stream's status
                await out.put(e)

        async def reader() -> None:
            try:
                async for req in request_iterator:
                    t = asyncio.ensure_future(one(req))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
                while tasks:
                    await asyncio.gather(*list(tasks), return_exceptions=True)
            finally:
                await out.put(None)

        rtask = asyncio.ensure_future(reader())
        try:
            while True:
                item = await out.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            rtask.cancel()
            for t in list(tasks):
                t.cancel()


def _set_receipt(resp: pb.PredictResponse, ack: Ack) -> None:
    if ack.bundle is not None:
        resp.bundle = ack.bundle.to_bytes()
    elif ack.promise is not None:
        p = ack.promise
        resp.promise.CopyFrom(
            pb.Promise(
                origin=p.origin,
                index=p.index,
                leaf_hash=p.leaf_hash,
                integrated_time_us=p.integrated_time_us,
                key_id=p.key_id,
                signature=p.signature,
            )
        )
    else:
        resp.spooled = ack.spooled


@dataclass
class InferenceServer:
    """A running inference service and its bound port."""

    server: grpc.aio.Server
    engine: Engine
    writer: ReceiptWriter
    ledger: AsyncLedgerClient
    port: int
    health: Any
    spool: Spool | None = None
    keys: KeyFollower | None = None

    async def stop(self, grace: float = 10.0) -> None:
        """Graceful stop: NOT_SERVING, finish in-flight RPCs and receipts, close everything."""
        await rpc.set_serving(self.health, [SERVICE_NAME], False)
        if self.keys is not None:
            await self.keys.close()
        await self.server.stop(grace)
        await self.writer.close()
        await self.engine.close()
        await self.ledger.close()
        if self.engine.ledger is not None:
            self.engine.ledger.close()
        if self.spool is not None:
            self.spool.close()


async def start(
    ledger: str,
    trust: TrustRoot,
    infer_key: PrivateKey,
    *,
    artifacts: Sequence[Path] = (),
    artifacts_dir: Path | None = None,
    listen: str = "127.0.0.1:0",
    teacher: Any = None,
    teacher_task: Any = None,
    spool: str | os.PathLike[str] | None = None,
    receipt_ack: str = "ledger",
    max_batch: int = 32,
    max_wait_ms: float = 1.0,
    output_policy: str = "full",
    credentials: grpc.ServerCredentials | None = None,
    ledger_credentials: grpc.ChannelCredentials | None = None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    key_poll_s: float = DEFAULT_KEY_POLL_S,
    on_teacher_failure: str = "refuse",
) -> InferenceServer:
    """Start the service; loads ``artifacts`` first (any refusal raises). Port 0 picks one.

    ``artifacts_dir``: the only folder ``LoadArtifact(path=...)`` may read from (``None``:
    loading by path is refused; ``data`` always works). ``credentials``: mutual TLS for
    this service; ``ledger_credentials``: toward the ledger.
    ``receipt_ack="spool"`` (needs ``spool``): answer once the receipt is in the local
    spool, not the ledger (see :class:`~kolm_infer.receipts.ReceiptWriter`).
    ``key_poll_s``: seconds between two reads of the ledger's key receipts (a revoked
    compile key stops its artifacts within about that long).
    ``on_teacher_failure``: ``"refuse"`` (default: an input outside the cover that no
    teacher answers gets ``FAILED_PRECONDITION``/``UNAVAILABLE`` naming why) or
    ``"student"`` (the student's answer, unverified, ``reason: teacher_unavailable``).
    """
    if output_policy not in OUTPUT_POLICIES:
        raise InvalidInput(f"output policy {output_policy!r}, want one of {OUTPUT_POLICIES}")
    check_ack(receipt_ack, bool(spool))  # before the (slow) artifact loads
    if not key_poll_s > 0:
        raise InvalidInput(f"key poll interval {key_poll_s!r} s, want a number above 0")
    engine = Engine(
        trust,
        LedgerClient(ledger, timeout=10.0, credentials=ledger_credentials),
        teacher=teacher,
        teacher_task=teacher_task,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        artifacts_dir=artifacts_dir,
        on_teacher_failure=on_teacher_failure,
    )
    for path in artifacts:
        await asyncio.to_thread(engine.load, Path(path))
    client = AsyncLedgerClient(ledger, timeout=10.0, credentials=ledger_credentials)
    sp = Spool(spool) if spool else None
    loop = asyncio.get_running_loop()
    health: list[Any] = []  # set once bound

    def not_serving(err: KeyRefused | str) -> None:  # on the loop (writer) or a thread
        if health:
            asyncio.run_coroutine_threadsafe(
                rpc.set_serving(health[0], [SERVICE_NAME], False), loop
            )

    writer = ReceiptWriter(
        client, spool=sp, ack=receipt_ack, key_id=infer_key.keyid(), on_key_refused=not_serving
    )
    await writer.start()
    assert engine.ledger is not None
    keys = KeyFollower(
        engine,
        engine.ledger,
        trust,
        writer=writer,
        infer_key_id=infer_key.keyid(),
        interval_s=key_poll_s,
        on_untrusted=not_serving,  # key receipts that do not prove: fail closed
    )
    server = rpc.new_server(
        [*([AuthzInterceptor(INFER_POLICY)] if credentials else []), *interceptors]
    )
    pb_grpc.add_InferenceServicer_to_server(  # type: ignore[no-untyped-call]
        InferenceServicer(engine, writer, infer_key, output_policy=output_policy, keys=keys),
        server,
    )
    port, hs = await rpc.bind_and_start(server, listen, credentials, [SERVICE_NAME])
    health.append(hs)
    keys.start()
    log.info("inference serving", extra={"kolm_port": port})
    return InferenceServer(server, engine, writer, client, port, hs, sp, keys)


async def serve(
    ledger: str,
    trust: TrustRoot,
    infer_key: PrivateKey,
    *,
    listen: str,
    metrics_port: int | None = None,
    ready_file: str | None = None,
    **kw: Any,
) -> None:
    """Run until SIGTERM/SIGINT (``kolm infer serve``)."""
    if metrics_port is not None:
        start_http_server(metrics_port, addr="127.0.0.1")
    srv = await start(ledger, trust, infer_key, listen=listen, **kw)
    await rpc.serve_until_signal(srv, "infer", listen, ready_file=ready_file)
