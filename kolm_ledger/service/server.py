"""The ledger gRPC service (``kolm.ledger.v1.Ledger``) on ``grpc.aio``.

The servicer is thin: it parses messages, calls :class:`~kolm_ledger.log.ledger.Ledger`,
:class:`~kolm_ledger.log.sequencer.Sequencer` and :mod:`kolm_ledger.log.provenance`, and
builds replies. Errors become statuses in :class:`~kolm_ledger.service.rpc.ErrorInterceptor`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import grpc
from prometheus_client import start_http_server

from kolm_ledger._crypto import PrivateKey
from kolm_ledger._pb import ledger_pb2 as pb
from kolm_ledger._pb import ledger_pb2_grpc as pb_grpc
from kolm_ledger.errors import (
    InvalidInput,
    KolmError,
    NotFoundError,
    UnavailableError,
    UnknownKeyError,
)
from kolm_ledger.formats.checkpoint import SignedCheckpoint
from kolm_ledger.keys import TrustRoot
from kolm_ledger.log.ledger import DEFAULT_VERIFY_THREADS, Appended, Ledger, Validated
from kolm_ledger.log.provenance import provenance
from kolm_ledger.log.sequencer import Promise, Sequencer
from kolm_ledger.service import rpc
from kolm_ledger.service.authz import LEDGER_POLICY, AuthzInterceptor, authorize_append
from kolm_ledger.service.tls import role_of
from kolm_ledger.storage import Entry, Store, StoredCheckpoint, micros
from kolm_ledger.storage.repository import from_micros
from kolm_ledger.timefmt import MAX_TIME_SKEW

__all__ = ["LedgerServer", "LedgerServicer", "serve"]

log = logging.getLogger("kolm.ledger")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Ledger"].full_name
MAX_MESSAGE = 16 * 1024 * 1024
_MAX_INT64 = 2**63 - 1


def _int64(value: int, what: str) -> int:
    """``value`` (a uint64 field) if storage can hold it; else :class:`InvalidInput`."""
    if value > _MAX_INT64:
        raise InvalidInput(f"{what} {value} is out of range (at most {_MAX_INT64})")
    return value


def _time_us(us: int, what: str) -> datetime:
    """A µs timestamp field as a datetime; :class:`InvalidInput` if no datetime can hold it."""
    try:
        return from_micros(us)
    except (ValueError, OverflowError, OSError) as e:
        raise InvalidInput(f"{what} {us} is out of range: {e}") from e


def _entries_list(store: Store, start: int, end: int) -> list[Entry]:
    return list(store.entries(start, end))


def entry_pb(e: Entry) -> pb.Entry:
    """Entry → protobuf."""
    return pb.Entry(
        index=e.index,
        leaf_hash=e.leaf_hash,
        chain_hash=e.chain_hash,
        kind=e.kind,
        key_id=e.key_id,
        integrated_time_us=micros(e.integrated_at),
        envelope=e.envelope,
    )


def checkpoint_pb(c: StoredCheckpoint) -> pb.Checkpoint:
    """Stored checkpoint → protobuf."""
    return pb.Checkpoint(note=c.note, size=c.size, root=c.root, chain_head=c.chain_head)


def promise_pb(p: Promise) -> pb.SignedPromise:
    """Promise → protobuf."""
    return pb.SignedPromise(
        origin=p.origin,
        index=p.index,
        leaf_hash=p.leaf_hash,
        integrated_time_us=p.integrated_time_us,
        key_id=p.key_id,
        signature=p.signature,
    )


_THREADED_MIN = 2  # envelopes per request worth validating on the verify threads


class LedgerServicer(pb_grpc.LedgerServicer):
    """Thin servicer over the ledger core.

    With ``authorize`` (a TLS server), each validated envelope's kind is checked against
    the client's role (:func:`~kolm_ledger.service.authz.authorize_append`).
    """

    def __init__(self, ledger: Ledger, sequencer: Sequencer, *, authorize: bool = False) -> None:
        self.ledger = ledger
        self.seq = sequencer
        self.authorize = authorize
        self._ending = False
        self._stream_readers: set[asyncio.Task[None]] = set()

    def _role(self, context: grpc.aio.ServicerContext) -> str | None:
        return role_of(context) if self.authorize else None

    async def _validate_each(
        self, envelopes: Sequence[bytes], role: str | None = None
    ) -> list[Validated | KolmError]:
        """:meth:`Ledger.validate` each envelope: its :class:`Validated` or why it was refused.

        With ``verify_threads`` > 1 (or ``verify_processes``) a request of several
        envelopes is validated on the ledger's verify threads (or worker processes), off
        the event loop, which meanwhile serves other calls while the sequencer commits:
        the same checks, results and errors, in order. A lone envelope is validated here
        (a hand-off would only add latency).
        """
        out: list[Validated | KolmError] = []
        off_loop = self.ledger.verify_threads > 1 or self.ledger.verify_processes > 0
        if off_loop and len(envelopes) >= _THREADED_MIN:
            for f in self.ledger.submit_validation(envelopes):
                part: list[Validated | KolmError] = await asyncio.wrap_future(f)
                out.extend(part)
        else:
            for e in envelopes:
                try:
                    out.append(self.ledger.validate(e))
                except KolmError as err:
                    out.append(err)
        if any(isinstance(r, UnknownKeyError) for r in out):
            # the key may have been registered through another replica since this one
            # last folded key receipts into its trust state
            await asyncio.to_thread(self.ledger.refresh_trust)
            for i, r in enumerate(out):
                if isinstance(r, UnknownKeyError):
                    try:
                        out[i] = self.ledger.validate(envelopes[i])
                    except KolmError as err:
                        out[i] = err
        for i, r in enumerate(out):
            if isinstance(r, Validated):
                try:
                    authorize_append(role, r.kind)
                except KolmError as err:
                    out[i] = err
        return out

    async def _append(
        self, envelopes: Sequence[bytes], wait: bool, role: str | None = None
    ) -> list[pb.AppendResponse]:
        validated: list[Validated] = []
        for r in await self._validate_each(envelopes, role):
            if isinstance(r, KolmError):
                raise r
            validated.append(r)
        results = await self.seq.submit(validated)
        return [await self._response(a, p, c, wait) for a, p, c in results]

    async def _response(
        self, a: Appended, p: Promise, c: SignedCheckpoint | None, wait: bool
    ) -> pb.AppendResponse:
        cp_size = c.checkpoint.size if c is not None and c.checkpoint.size > a.index else 0
        resp = pb.AppendResponse(
            index=a.index,
            leaf_hash=a.leaf_hash,
            duplicate=a.duplicate,
            integrated_time_us=p.integrated_time_us,
            promise=promise_pb(p),
            checkpoint_size=cp_size,
        )
        if wait:
            b = await asyncio.to_thread(self.ledger.bundle, a.index, cp_size or None)
            resp.bundle = b.to_bytes()
            resp.checkpoint_size = SignedCheckpoint.from_bytes(
                b.tlog_proof.checkpoint
            ).checkpoint.size
        return resp

    async def Append(
        self, request: pb.AppendRequest, context: grpc.aio.ServicerContext
    ) -> pb.AppendResponse:
        (resp,) = await self._append(
            [request.envelope], request.wait_for_checkpoint, self._role(context)
        )
        return resp

    def end_streams(self) -> None:
        """Shutdown: stop reading every open ``AppendStream``; each answers what it has read.

        A stream's messages already read are sequenced and answered; the stream then ends
        with ``UNAVAILABLE`` (retry on another replica), so a client holding a long-lived
        stream (the inference service's receipt writer) never holds up the shutdown.
        """
        self._ending = True
        for t in list(self._stream_readers):
            t.cancel()

    async def AppendStream(
        self,
        request_iterator: AsyncIterator[pb.AppendStreamRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.AppendStreamResponse]:
        """Each request is validated per envelope; valid ones are sequenced together.

        Messages are handled concurrently (up to 64 in flight per stream; their validation
        overlaps on the verify threads), sequenced in the order they came and answered in
        that order. A stream may stay open indefinitely (one per client, no
        per-batch call setup); on shutdown it is ended with ``UNAVAILABLE`` once every
        message read so far is answered (:meth:`end_streams`).
        """
        if self._ending:
            raise UnavailableError("the ledger is shutting down; retry on another replica")
        pending: asyncio.Queue[asyncio.Task[pb.AppendStreamResponse] | None] = asyncio.Queue()
        slots = asyncio.Semaphore(64)
        role = self._role(context)

        async def one(
            req: pb.AppendStreamRequest, prev: asyncio.Event | None, queued: asyncio.Event
        ) -> pb.AppendStreamResponse:
            try:
                return await _one(req, prev, queued)
            finally:
                queued.set()

        async def _one(
            req: pb.AppendStreamRequest, prev: asyncio.Event | None, queued: asyncio.Event
        ) -> pb.AppendStreamResponse:
            # validation of messages overlaps (verify threads); sequencing keeps their order
            out: list[pb.AppendResult | None] = [None] * len(req.envelopes)
            ok_pos, valid = [], []
            validated = await self._validate_each(req.envelopes, role)
            if prev is not None:
                await prev.wait()
            for i, r in enumerate(validated):
                if isinstance(r, KolmError):
                    code, msg = rpc.status_of(r)
                    out[i] = pb.AppendResult(error=pb.Status(code=code.value[0], message=msg))
                else:
                    valid.append(r)
                    ok_pos.append(i)
            if valid:
                try:
                    # the next message's waiter runs only once this task yields, which
                    # submit_each does after queueing these items
                    queued.set()
                    outcomes = await self.seq.submit_each(valid)
                except KolmError as e:  # backpressure or shutdown: none was queued
                    code, msg = rpc.status_of(e)
                    retry = getattr(e, "retry_after_ms", 0)
                    for i in ok_pos:
                        out[i] = pb.AppendResult(
                            error=pb.Status(code=code.value[0], message=msg, retry_after_ms=retry)
                        )
                    outcomes = []
                # one result per envelope: some may be committed while another was refused
                for i, o in zip(ok_pos, outcomes, strict=False):
                    try:
                        if isinstance(o, BaseException):
                            raise o
                        out[i] = pb.AppendResult(
                            ok=await self._response(*o, req.wait_for_checkpoint)
                        )
                    except Exception as e:
                        code, msg = rpc.status_of(e)
                        if code == grpc.StatusCode.INTERNAL:
                            log.error("append failed: %s", e)
                        out[i] = pb.AppendResult(error=pb.Status(code=code.value[0], message=msg))
            return pb.AppendStreamResponse(
                batch_id=req.batch_id, results=[r for r in out if r is not None]
            )

        async def reader() -> None:
            # cancelled (by end_streams or when the call ends) only while waiting for the
            # next message or a slot: a message read is always queued, hence answered
            prev: asyncio.Event | None = None
            try:
                async for req in request_iterator:
                    queued = asyncio.Event()
                    pending.put_nowait(asyncio.ensure_future(one(req, prev, queued)))
                    prev = queued
                    await slots.acquire()
            finally:
                pending.put_nowait(None)

        rtask = asyncio.ensure_future(reader())
        self._stream_readers.add(rtask)
        rtask.add_done_callback(self._stream_readers.discard)
        try:
            while True:
                t = await pending.get()
                if t is None:
                    break
                yield await t
                slots.release()
        finally:
            rtask.cancel()
        if self._ending:
            raise UnavailableError("the ledger is shutting down; retry on another replica")

    async def GetCheckpoint(
        self, request: pb.GetCheckpointRequest, context: grpc.aio.ServicerContext
    ) -> pb.Checkpoint:
        return checkpoint_pb(await self._checkpoint(request.size))

    async def _resolve(
        self,
        request: pb.GetInclusionProofRequest | pb.GetReceiptBundleRequest,
    ) -> int:
        which = request.WhichOneof("leaf")
        if which in ("leaf_hash", "statement_digest"):
            h = request.leaf_hash if which == "leaf_hash" else request.statement_digest
            if len(h) != 32:
                raise InvalidInput(f"{which} has {len(h)} bytes, want 32")
            store = self.ledger.store
            find = store.get_by_leaf_hash if which == "leaf_hash" else store.get_by_statement_digest
            return (await asyncio.to_thread(find, h)).index
        if which == "index":
            return _int64(request.index, "index")
        raise InvalidInput("give one of index, leaf_hash or statement_digest")

    async def _checkpoint(self, size: int) -> StoredCheckpoint:
        store = self.ledger.store
        if size:
            return await asyncio.to_thread(store.checkpoint_at, _int64(size, "tree size"))
        c = await asyncio.to_thread(store.latest_checkpoint)
        if c is None:
            raise NotFoundError("the log is empty; no checkpoint yet")
        return c

    async def GetInclusionProof(
        self, request: pb.GetInclusionProofRequest, context: grpc.aio.ServicerContext
    ) -> pb.InclusionProof:
        idx = await self._resolve(request)
        cp = await self._checkpoint(request.tree_size)
        if idx >= cp.size:
            raise NotFoundError(f"index {idx} is not covered by the checkpoint of size {cp.size}")
        store = self.ledger.store
        hashes, leaf = await asyncio.to_thread(
            lambda: (
                store.inclusion_proof(idx, cp.size, check_size=False),
                store.get_nodes([(0, idx)])[0],
            )
        )
        return pb.InclusionProof(
            index=idx, tree_size=cp.size, leaf_hash=leaf, hashes=hashes, checkpoint=cp.note
        )

    async def GetConsistencyProof(
        self, request: pb.GetConsistencyProofRequest, context: grpc.aio.ServicerContext
    ) -> pb.ConsistencyProof:
        cp = await self._checkpoint(request.to_size)
        if not 0 < request.from_size <= cp.size:
            raise InvalidInput(f"from_size must be in 1..{cp.size}, got {request.from_size}")
        hashes = await asyncio.to_thread(
            self.ledger.store.consistency_proof, request.from_size, cp.size
        )
        return pb.ConsistencyProof(
            from_size=request.from_size, to_size=cp.size, hashes=hashes, checkpoint=cp.note
        )

    async def GetEntries(
        self, request: pb.GetEntriesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.Entry]:
        store = self.ledger.store
        size = await asyncio.to_thread(store.size)
        end = request.end or size
        if request.start > end:
            raise InvalidInput(f"start {request.start} is after end {end}")
        end = min(end, size)  # an end past the log must not walk (and query) empty ranges
        pos = request.start
        while pos < end:
            hi = min(pos + 1000, end)
            batch = await asyncio.to_thread(_entries_list, store, pos, hi)
            for e in batch:
                yield entry_pb(e)
            pos = hi

    async def FindEntries(
        self, request: pb.FindEntriesRequest, context: grpc.aio.ServicerContext
    ) -> pb.FindEntriesResponse:
        limit = request.limit or 100
        if limit > 1000:
            raise InvalidInput(f"limit {limit} is over the maximum of 1000")
        if not (
            request.subject_digest
            or request.kind
            or request.key_id
            or request.since_us
            or request.until_us
        ):
            raise InvalidInput("give at least one filter: subject_digest, kind, key_id or time")
        found = await asyncio.to_thread(
            self.ledger.store.find,
            subject_digest=request.subject_digest or None,
            kind=request.kind or None,
            key_id=request.key_id or None,
            since=_time_us(request.since_us, "since_us") if request.since_us else None,
            until=_time_us(request.until_us, "until_us") if request.until_us else None,
            after_index=request.after_index if request.after_index >= 0 else -1,
            limit=limit + 1,
        )
        more = len(found) > limit
        found = found[:limit]
        return pb.FindEntriesResponse(
            entries=[entry_pb(e) for e in found], next_after_index=found[-1].index if more else -1
        )

    async def GetReceiptBundle(
        self, request: pb.GetReceiptBundleRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReceiptBundle:
        idx = await self._resolve(request)
        size = _int64(request.tree_size, "tree size") or None
        b = await asyncio.to_thread(self.ledger.bundle, idx, size)
        return pb.ReceiptBundle(bundle=b.to_bytes(), index=idx)

    async def GetProvenance(
        self, request: pb.GetProvenanceRequest, context: grpc.aio.ServicerContext
    ) -> pb.Provenance:
        p = await asyncio.to_thread(
            provenance,
            self.ledger.store,
            request.artifact_digest,
            include_labels=request.include_labels,
        )
        return pb.Provenance(
            artifact=entry_pb(p.artifact),
            eval=entry_pb(p.eval) if p.eval else None,
            k_score=p.k_score,
            eval_n=p.eval_n,
            eval_correct=p.eval_correct,
            interval_low=p.interval[0],
            interval_high=p.interval[1],
            teacher_k_score=p.teacher_k_score or 0.0,
            training_set_root=p.training_set_root,
            recomputed_root=p.recomputed_root,
            label_count=p.label_count,
            labels_found=p.labels_found,
            labels=[entry_pb(e) for e in p.labels],
            job_id=p.job_id,
        )


@dataclass
class LedgerServer:
    """A running ledger service (server, sequencer, health) and its bound port."""

    server: grpc.aio.Server
    sequencer: Sequencer
    ledger: Ledger
    port: int
    health: object
    servicer: LedgerServicer | None = None

    async def stop(self, grace: float = 10.0) -> None:
        """Graceful stop: NOT_SERVING, end open append streams once what they read is
        answered, refuse new appends, drain the queue, stop the server."""
        await rpc.set_serving(self.health, [SERVICE_NAME], False)
        if self.servicer is not None:
            self.servicer.end_streams()
        await self.sequencer.close()
        await self.server.stop(grace)
        self.ledger.close()
        self.ledger.store.close()


async def start(
    db: str,
    trust: TrustRoot,
    log_key: PrivateKey,
    *,
    listen: str = "127.0.0.1:0",
    max_batch: int = 1000,
    max_wait_ms: float = 0.0,
    max_queue: int = 50_000,
    credentials: grpc.ServerCredentials | None = None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    authorize: bool | None = None,
    extra_log_keys: Sequence[PrivateKey] = (),
    witnesses: Sequence[str] = (),
    witness_policy: str = "best-effort",
    verify_threads: int | None = None,
    verify_processes: int = 0,
    max_time_skew: timedelta = MAX_TIME_SKEW,
) -> LedgerServer:
    """Start a ledger service; ``listen`` port 0 picks a free port (see ``.port``).

    With ``credentials`` (mutual TLS, :func:`kolm_ledger.service.tls.server_credentials`) every
    call is authorized by client role (``authorize`` defaults to whether TLS is on).
    ``extra_log_keys`` also sign every checkpoint (log key rotation); ``witnesses`` are
    witness URLs whose cosignatures each checkpoint collects under ``witness_policy``.
    ``verify_threads`` > 1 validates each multi-envelope request on that many threads
    (see :meth:`LedgerServicer._validate_each`); default ``DEFAULT_VERIFY_THREADS``.
    ``verify_processes`` > 0 validates them in that many worker processes instead.
    ``max_time_skew``: how far a receipt's own time may lie after its integration time.
    """
    if authorize is None:
        authorize = credentials is not None
    store = Store(db)
    ledger = Ledger(
        store,
        trust,
        log_key,
        extra_log_keys=extra_log_keys,
        witnesses=witnesses,
        witness_policy=witness_policy,
        verify_threads=DEFAULT_VERIFY_THREADS if verify_threads is None else verify_threads,
        verify_processes=verify_processes,
        max_time_skew=max_time_skew,
    )
    await asyncio.to_thread(ledger.start_workers)
    seq = Sequencer(
        ledger, log_key, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue
    )
    seq.start()
    server = rpc.new_server(
        [*([AuthzInterceptor(LEDGER_POLICY)] if authorize else []), *interceptors]
    )
    servicer = LedgerServicer(ledger, seq, authorize=authorize)
    pb_grpc.add_LedgerServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    port, hs = await rpc.bind_and_start(server, listen, credentials, [SERVICE_NAME])
    log.info("ledger serving", extra={"kolm_port": port, "kolm_db": store.url.render_as_string()})
    return LedgerServer(server, seq, ledger, port, hs, servicer)


async def serve(
    db: str,
    trust: TrustRoot,
    log_key: PrivateKey,
    *,
    listen: str,
    metrics_port: int | None = None,
    ready_file: str | None = None,
    **kw: Any,
) -> None:
    """Run the service until SIGTERM/SIGINT (``kolm ledger serve``)."""
    if metrics_port is not None:
        start_http_server(metrics_port, addr="127.0.0.1")
    srv = await start(db, trust, log_key, listen=listen, **kw)
    await rpc.serve_until_signal(srv, "ledger", listen, ready_file=ready_file)
