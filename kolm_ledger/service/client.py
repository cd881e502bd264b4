"""Python clients of the ledger service: :class:`LedgerClient` (sync) and
:class:`AsyncLedgerClient` (``grpc.aio``). They take and return domain types
(envelopes, bundles, checkpoints, entries) and raise :class:`KolmError` subclasses.

Both are built on one request layer: each read and the single append is written once,
as a *plan* (a generator that yields the unary calls it needs — several, for
``find``'s pages — and returns the decoded answer), and each client only runs plans, on
its own channel (:func:`_sync`, :func:`_async`). So the two clients have the same
methods, signatures, defaults and paging, and cannot drift apart.

Example::

    client = LedgerClient("127.0.0.1:7070")
    res = client.append(envelope, wait=True)
    res.bundle.save("receipt.kolm-receipt.json")
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import itertools
import logging
from collections.abc import (
    AsyncIterator,
    Callable,
    Coroutine,
    Generator,
    Iterable,
    Iterator,
    Sequence,
)
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

import grpc

from kolm_ledger._pb import ledger_pb2 as pb
from kolm_ledger._pb import ledger_pb2_grpc as pb_grpc
from kolm_ledger.errors import BackpressureError, KolmError, UnavailableError
from kolm_ledger.formats.bundle import Bundle
from kolm_ledger.formats.checkpoint import SignedCheckpoint
from kolm_ledger.formats.dsse import Envelope
from kolm_ledger.formats.promise import Promise
from kolm_ledger.log.provenance import Provenance
from kolm_ledger.service.rpc import error_from_rpc
from kolm_ledger.storage import Entry, micros
from kolm_ledger.storage.repository import from_micros

__all__ = ["AppendPipe", "AppendResult", "AsyncLedgerClient", "LedgerClient", "channel_options"]

log = logging.getLogger("kolm.client")


def channel_options() -> list[tuple[str, Any]]:
    """Channel options shared by every kolm client."""
    return [
        ("grpc.max_receive_message_length", 16 * 1024 * 1024),
        ("grpc.max_send_message_length", 16 * 1024 * 1024),
    ]


@dataclass(frozen=True)
class AppendResult:
    """The ledger's answer to one append."""

    index: int
    leaf_hash: bytes  # binds the envelope and integrated_time_us: keep this one
    duplicate: bool
    promise: Promise
    checkpoint_size: int
    bundle: Bundle | None = None
    integrated_time_us: int = 0


def _result(r: pb.AppendResponse) -> AppendResult:
    p = r.promise
    return AppendResult(
        r.index,
        r.leaf_hash,
        r.duplicate,
        Promise(p.origin, p.index, p.leaf_hash, p.integrated_time_us, p.key_id, p.signature),
        r.checkpoint_size,
        Bundle.from_bytes(r.bundle) if r.bundle else None,
        r.integrated_time_us or p.integrated_time_us,
    )


def _status_error(s: pb.Status) -> KolmError:
    code = grpc.StatusCode.UNKNOWN
    for c in grpc.StatusCode:
        if c.value[0] == s.code:
            code = c
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and s.retry_after_ms:
        err: KolmError = BackpressureError(s.message, s.retry_after_ms)
    else:
        from kolm_ledger.service.rpc import _CODE_TO_ERROR

        err = _CODE_TO_ERROR.get(code, KolmError)(s.message)
    err.grpc_code = code.name
    return err


def _results(resp: pb.AppendStreamResponse) -> list[AppendResult | KolmError]:
    return [
        _result(r.ok) if r.WhichOneof("result") == "ok" else _status_error(r.error)
        for r in resp.results
    ]


def _entry(e: pb.Entry) -> Entry:
    return Entry(
        e.index,
        e.leaf_hash,
        e.chain_hash,
        e.kind,
        e.key_id,
        from_micros(e.integrated_time_us),
        e.envelope,
    )


def _env_bytes(e: Envelope | bytes) -> bytes:
    return e.to_bytes() if isinstance(e, Envelope) else e


def _provenance(p: pb.Provenance) -> Provenance:
    return Provenance(
        artifact=_entry(p.artifact),
        eval=_entry(p.eval) if p.HasField("eval") else None,
        k_score=p.k_score,
        eval_n=p.eval_n,
        eval_correct=p.eval_correct,
        interval=(p.interval_low, p.interval_high),
        teacher_k_score=p.teacher_k_score,
        training_set_root=p.training_set_root,
        recomputed_root=p.recomputed_root,
        label_count=p.label_count,
        labels_found=p.labels_found,
        job_id=p.job_id,
        labels=[_entry(e) for e in p.labels],
    )


def _find_request(
    subject_digest: str | None,
    kind: str | None,
    key_id: str | None,
    since: datetime | None,
    until: datetime | None,
    after_index: int,
    limit: int,
) -> pb.FindEntriesRequest:
    return pb.FindEntriesRequest(
        subject_digest=subject_digest or "",
        kind=kind or "",
        key_id=key_id or "",
        since_us=micros(since) if since else 0,
        until_us=micros(until) if until else 0,
        after_index=after_index,
        limit=limit,
    )


def _leaf(
    index: int | None, leaf_hash: bytes | None, statement_digest: bytes | None = None
) -> dict[str, Any]:
    given = {
        k: v
        for k, v in (
            ("index", index),
            ("leaf_hash", leaf_hash),
            ("statement_digest", statement_digest),
        )
        if v is not None
    }
    if len(given) != 1:
        raise KolmError("give exactly one of index, leaf_hash or statement_digest")
    return given


# --------------------------------------------------------------------------- the requests

_P = ParamSpec("_P")
_T = TypeVar("_T")

#: service page size of ``FindEntries``
FIND_PAGE = 1000


@dataclass(frozen=True)
class _Unary:
    """One unary call a plan needs: method name, request message, deadline (None: the
    client's ``timeout``)."""

    method: str
    request: Any
    timeout: float | None = None


#: A request plan: yields the calls it needs, is sent each response, returns the answer.
_Plan = Generator[_Unary, Any, _T]


def _append_plan(envelope: Envelope | bytes, *, wait: bool = False) -> _Plan[AppendResult]:
    """Append one envelope; with ``wait`` the result carries the offline bundle."""
    r = yield _Unary(
        "Append", pb.AppendRequest(envelope=_env_bytes(envelope), wait_for_checkpoint=wait)
    )
    return _result(r)


def _checkpoint_plan(size: int = 0) -> _Plan[SignedCheckpoint]:
    """The newest signed checkpoint (or the one of ``size``)."""
    r = yield _Unary("GetCheckpoint", pb.GetCheckpointRequest(size=size))
    return SignedCheckpoint.from_bytes(r.note)


def _inclusion_proof_plan(
    *, index: int | None = None, leaf_hash: bytes | None = None, tree_size: int = 0
) -> _Plan[pb.InclusionProof]:
    """Inclusion proof message (index, tree_size, leaf_hash, hashes, checkpoint)."""
    proof: pb.InclusionProof = yield _Unary(
        "GetInclusionProof",
        pb.GetInclusionProofRequest(tree_size=tree_size, **_leaf(index, leaf_hash)),
    )
    return proof


def _consistency_proof_plan(from_size: int, to_size: int = 0) -> _Plan[tuple[list[bytes], bytes]]:
    """(hashes, signed checkpoint note of to_size)."""
    r = yield _Unary(
        "GetConsistencyProof", pb.GetConsistencyProofRequest(from_size=from_size, to_size=to_size)
    )
    return list(r.hashes), bytes(r.checkpoint)


def _find_plan(
    *,
    subject_digest: str | None = None,
    kind: str | None = None,
    key_id: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    after_index: int = -1,
    limit: int = 1000,
) -> _Plan[list[Entry]]:
    """Matching entries after ``after_index``, in index order, up to ``limit`` (follows
    the service's pages)."""
    out: list[Entry] = []
    after = after_index
    while True:
        r = yield _Unary(
            "FindEntries",
            _find_request(subject_digest, kind, key_id, since, until, after, min(limit, FIND_PAGE)),
        )
        out.extend(_entry(e) for e in r.entries)
        if r.next_after_index < 0 or len(out) >= limit:
            return out[:limit]
        after = r.next_after_index


def _bundle_plan(
    *,
    index: int | None = None,
    leaf_hash: bytes | None = None,
    statement_digest: bytes | None = None,
    tree_size: int = 0,
) -> _Plan[Bundle]:
    """The offline receipt bundle of one entry: by index, by the leaf hash the ledger
    gave, or by :func:`kolm_ledger.formats.leaf.statement_digest` of its envelope."""
    r = yield _Unary(
        "GetReceiptBundle",
        pb.GetReceiptBundleRequest(
            tree_size=tree_size, **_leaf(index, leaf_hash, statement_digest)
        ),
    )
    return Bundle.from_bytes(r.bundle)


def _provenance_plan(artifact_digest: str, *, include_labels: bool = True) -> _Plan[Provenance]:
    """Artifact → eval → labels, as the server sees it (re-verify client-side)."""
    r = yield _Unary(
        "GetProvenance",
        pb.GetProvenanceRequest(artifact_digest=artifact_digest, include_labels=include_labels),
        timeout=300,
    )
    return _provenance(r)


def _entries_request(start: int, end: int) -> pb.GetEntriesRequest:
    return pb.GetEntriesRequest(start=start, end=end)


def _sync(plan: Callable[_P, _Plan[_T]]) -> Callable[Concatenate[LedgerClient, _P], _T]:
    """A :class:`LedgerClient` method that runs ``plan``."""

    @functools.wraps(plan)
    def method(self: LedgerClient, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        return self._run(plan(*args, **kwargs))

    _name(method, plan, "LedgerClient")
    return method


def _async(
    plan: Callable[_P, _Plan[_T]],
) -> Callable[Concatenate[AsyncLedgerClient, _P], Coroutine[Any, Any, _T]]:
    """An :class:`AsyncLedgerClient` method that runs ``plan`` (awaitable)."""

    @functools.wraps(plan)
    async def method(self: AsyncLedgerClient, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        return await self._run(plan(*args, **kwargs))

    _name(method, plan, "AsyncLedgerClient")
    return method


def _name(method: Callable[..., Any], plan: Callable[..., Any], owner: str) -> None:
    """``_find_plan`` → ``LedgerClient.find(self, *, ...) -> list[Entry]`` (for help(),
    inspect and tracebacks)."""
    name = plan.__name__.removeprefix("_").removesuffix("_plan")
    method.__name__ = name
    method.__qualname__ = f"{owner}.{name}"
    sig = inspect.signature(plan)
    ret = sig.return_annotation
    if isinstance(ret, str) and ret.startswith("_Plan[") and ret.endswith("]"):
        ret = ret[len("_Plan[") : -1]
    self_ = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    method.__signature__ = sig.replace(  # type: ignore[attr-defined]
        parameters=[self_, *sig.parameters.values()], return_annotation=ret
    )
    del method.__wrapped__  # type: ignore[attr-defined]


class LedgerClient:
    """Synchronous client. ``credentials`` None means plain text (loopback only)."""

    def __init__(
        self,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self._channel = (
            grpc.secure_channel(target, credentials, channel_options())
            if credentials
            else grpc.insecure_channel(target, channel_options())
        )
        self._stub = pb_grpc.LedgerStub(self._channel)  # type: ignore[no-untyped-call]

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> LedgerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, req: Any, timeout: float | None = None) -> Any:
        try:
            return getattr(self._stub, method)(req, timeout=timeout or self.timeout)
        except grpc.RpcError as e:
            raise error_from_rpc(e) from e

    def _run(self, plan: _Plan[_T]) -> _T:
        """Run a request plan: each call it yields, on this channel, its response sent back."""
        try:
            call = next(plan)
            while True:
                call = plan.send(self._call(call.method, call.request, call.timeout))
        except StopIteration as done:
            return cast(_T, done.value)

    append = _sync(_append_plan)
    checkpoint = _sync(_checkpoint_plan)
    inclusion_proof = _sync(_inclusion_proof_plan)
    consistency_proof = _sync(_consistency_proof_plan)
    find = _sync(_find_plan)
    bundle = _sync(_bundle_plan)
    provenance = _sync(_provenance_plan)

    def append_many(
        self, envelopes: Iterable[Envelope | bytes], *, batch: int = 500, wait: bool = False
    ) -> list[AppendResult | KolmError]:
        """Append through ``AppendStream`` in messages of ``batch``; one result per envelope."""
        envs = [_env_bytes(e) for e in envelopes]

        def reqs() -> Iterator[pb.AppendStreamRequest]:
            for i in range(0, len(envs), batch):
                yield pb.AppendStreamRequest(
                    batch_id=i // batch, envelopes=envs[i : i + batch], wait_for_checkpoint=wait
                )

        out: list[AppendResult | KolmError] = []
        try:
            for resp in self._stub.AppendStream(reqs(), timeout=max(self.timeout, 600)):
                out.extend(_results(resp))
        except grpc.RpcError as e:
            raise error_from_rpc(e) from e
        return out

    def entries(self, start: int = 0, end: int = 0) -> Iterator[Entry]:
        """Stream entries ``start <= index < end`` (0: to the current size)."""
        try:
            for e in self._stub.GetEntries(_entries_request(start, end), timeout=None):
                yield _entry(e)
        except grpc.RpcError as e:
            raise error_from_rpc(e) from e


class AsyncLedgerClient:
    """``grpc.aio`` client with the same surface as :class:`LedgerClient` (awaitable; the
    same request plans), plus batched and pipelined appends."""

    def __init__(
        self,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self._channel = (
            grpc.aio.secure_channel(target, credentials, channel_options())
            if credentials
            else grpc.aio.insecure_channel(target, channel_options())
        )
        self._stub = pb_grpc.LedgerStub(self._channel)  # type: ignore[no-untyped-call]
        self._pipe: AppendPipe | None = None

    async def close(self) -> None:
        """Close the persistent append stream (if any), then the channel."""
        if self._pipe is not None:
            await self._pipe.close()
        await self._channel.close()

    async def _call(self, method: str, req: Any, timeout: float | None = None) -> Any:
        try:
            return await getattr(self._stub, method)(req, timeout=timeout or self.timeout)
        except grpc.RpcError as e:
            raise error_from_rpc(e) from e

    async def _run(self, plan: _Plan[_T]) -> _T:
        """Run a request plan: each call it yields, awaited on this channel."""
        try:
            call = next(plan)
            while True:
                call = plan.send(await self._call(call.method, call.request, call.timeout))
        except StopIteration as done:
            return cast(_T, done.value)

    append = _async(_append_plan)
    checkpoint = _async(_checkpoint_plan)
    inclusion_proof = _async(_inclusion_proof_plan)
    consistency_proof = _async(_consistency_proof_plan)
    find = _async(_find_plan)
    bundle = _async(_bundle_plan)
    provenance = _async(_provenance_plan)

    async def entries(self, start: int = 0, end: int = 0) -> AsyncIterator[Entry]:
        """Stream entries ``start <= index < end`` (0: to the current size)."""
        try:
            async for e in self._stub.GetEntries(_entries_request(start, end), timeout=None):
                yield _entry(e)
        except grpc.RpcError as e:
            raise error_from_rpc(e) from e

    async def append_batch(
        self, envelopes: Sequence[Envelope | bytes], *, wait: bool = False
    ) -> list[AppendResult | KolmError]:
        """Append one batch through a short ``AppendStream`` call."""
        return (await self.append_batches([envelopes], wait=wait))[0]

    @property
    def append_streams_opened(self) -> int:
        """How many persistent ``AppendStream`` calls this client has opened so far."""
        return self._pipe.opened if self._pipe is not None else 0

    async def append_pipelined(
        self, envelopes: Sequence[Envelope | bytes], *, wait: bool = False
    ) -> list[AppendResult | KolmError]:
        """Append one batch over this client's persistent ``AppendStream`` (:class:`AppendPipe`).

        Concurrent calls are pipelined on the one stream; each waits at most ``timeout``.
        """
        if self._pipe is None:
            self._pipe = AppendPipe(self._stub, timeout=self.timeout)
        return await self._pipe.append(envelopes, wait=wait)

    async def append_batches(
        self, batches: Sequence[Sequence[Envelope | bytes]], *, wait: bool = False
    ) -> list[list[AppendResult | KolmError]]:
        """Several batches over one ``AppendStream`` call; results per batch, in order."""

        async def reqs() -> AsyncIterator[pb.AppendStreamRequest]:
            for i, b in enumerate(batches):
                yield pb.AppendStreamRequest(
                    batch_id=i, envelopes=[_env_bytes(e) for e in b], wait_for_checkpoint=wait
                )

        out: list[list[AppendResult | KolmError]] = []
        try:
            async for resp in self._stub.AppendStream(reqs(), timeout=self.timeout):
                out.append(_results(resp))
        except grpc.RpcError as e:
            raise error_from_rpc(e) from e
        return out


class AppendPipe:
    """One long-lived ``AppendStream`` call that batches are written to as they come.

    ``append`` writes one message (a batch) and waits for its response, matched by
    ``batch_id``; several batches may be in flight at once (the ledger answers them in
    order). No per-batch stream setup: the call is opened on first use and kept open.

    If the call ends for any reason (the ledger restarted or shut down, the connection
    dropped) every batch still waiting fails (:class:`UnavailableError`, or the error the
    ledger ended the call with) and the next ``append`` opens a new call. A batch that gets no answer within ``timeout`` seconds
    fails the same way and tears the call down (an unresponsive ledger is unavailable).
    A failed batch may still have been sequenced: appending it again is idempotent (the
    ledger answers ``duplicate`` with the original index and a promise).
    """

    def __init__(self, stub: Any, *, timeout: float = 30.0) -> None:
        self._stub = stub
        self.timeout = timeout
        self._call: Any = None
        self._pending: dict[int, asyncio.Future[pb.AppendStreamResponse]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._ids = itertools.count()
        self._write_lock = asyncio.Lock()
        self.opened = 0  # calls opened so far (for tests and metrics)

    def _open(self) -> tuple[Any, dict[int, asyncio.Future[pb.AppendStreamResponse]]]:
        if self._call is None:
            self._call = self._stub.AppendStream()  # no deadline: it lives as long as we do
            self._pending = {}
            self._reader = asyncio.get_running_loop().create_task(
                self._read(self._call, self._pending), name="kolm-append-pipe"
            )
            self.opened += 1
        return self._call, self._pending

    def _drop(self, call: Any) -> None:
        """Forget ``call`` (the next append opens a new one) and cancel it."""
        if self._call is call:
            self._call = None
        call.cancel()

    async def _read(
        self, call: Any, pending: dict[int, asyncio.Future[pb.AppendStreamResponse]]
    ) -> None:
        err: KolmError = UnavailableError("the ledger closed the append stream")
        try:
            while True:
                resp = await call.read()
                if resp is grpc.aio.EOF:
                    break
                fut = pending.pop(resp.batch_id, None)
                if fut is not None and not fut.done():
                    fut.set_result(resp)
        except grpc.RpcError as e:
            err = error_from_rpc(e)  # UNAVAILABLE, or why the ledger refused the stream
        except asyncio.CancelledError:
            err = UnavailableError("the append stream was closed")
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # this task itself was cancelled (close)
        finally:
            if self._call is call:
                self._call = None
            for fut in pending.values():
                if not fut.done():
                    fut.set_exception(err)
            pending.clear()

    async def append(
        self, envelopes: Sequence[Envelope | bytes], *, wait: bool = False
    ) -> list[AppendResult | KolmError]:
        """Send one batch; one result per envelope (raises :class:`KolmError` if none came)."""
        call, pending = self._open()
        bid = next(self._ids)
        fut: asyncio.Future[pb.AppendStreamResponse] = asyncio.get_running_loop().create_future()
        pending[bid] = fut
        req = pb.AppendStreamRequest(
            batch_id=bid, envelopes=[_env_bytes(e) for e in envelopes], wait_for_checkpoint=wait
        )
        try:
            async with asyncio.timeout(self.timeout):  # the write and the answer together
                try:
                    async with self._write_lock:
                        await call.write(req)
                except asyncio.CancelledError:
                    self._drop(call)
                    task = asyncio.current_task()
                    if task is not None and task.cancelling():
                        raise  # our deadline, or the caller cancelled us
                    # the call was cancelled under us (another batch's deadline)
                    raise UnavailableError("the append stream was closed") from None
                except grpc.RpcError as e:
                    self._drop(call)
                    raise error_from_rpc(e) from e
                except asyncio.InvalidStateError as e:  # the call had already ended
                    self._drop(call)
                    raise UnavailableError(f"the append stream ended: {e}") from e
                resp = await fut
        except TimeoutError:
            log.warning("no answer from the ledger in %g s: reopening the append stream",
                        self.timeout)  # fmt: skip
            self._drop(call)
            raise UnavailableError(f"the ledger did not answer within {self.timeout:g} s") from None
        finally:
            pending.pop(bid, None)
        return _results(resp)

    async def close(self, grace: float = 5.0) -> None:
        """Half-close the call, let pending batches finish (at most ``grace`` s), then stop."""
        call, reader = self._call, self._reader
        self._call = None
        if call is None or reader is None:
            return
        with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError):
            await call.done_writing()
        try:
            await asyncio.wait_for(asyncio.shield(reader), grace)
        except TimeoutError:
            pass
        finally:
            call.cancel()
            if not reader.done():
                reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
