"""Validation: checks (1)-(5) of :mod:`kolm_ledger.log.ledger`, on the caller's thread, on
verify threads, or in worker processes.

:class:`Validator` owns the two pools: a thread pool (signature verification runs with
the GIL released, so threads verify on as many cores) and, opt-in, the worker processes
of :mod:`kolm_ledger.log.verify_pool` (which parse and verify without sharing a GIL). It
holds no trust state and reads no clock: each call is given the trust state and the
time to judge against, so one batch is judged against one of each. What it hands on is
a :class:`Validated` per envelope, ready for :func:`kolm_ledger.log.integrate.integrate_batch`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar, cast

from kolm_ledger.errors import InvalidInput, KolmError
from kolm_ledger.formats.dsse import Envelope, verify_signature
from kolm_ledger.formats.leaf import statement_digest
from kolm_ledger.formats.receipts import Statement
from kolm_ledger.keys import TrustedKey
from kolm_ledger.log.verify_pool import Checked, ProcessVerifier, parse_receipt
from kolm_ledger.timefmt import check_receipt_time, from_micros, micros, receipt_time
from kolm_ledger.verify.trust import TrustState, check_key_policy

__all__ = ["DEFAULT_VERIFY_THREADS", "Validated", "Validator"]

_MIN_CHUNK = 64  # fewer envelopes per thread than this are not worth a hand-off
_T = TypeVar("_T")
#: ``verify_threads`` when not given: two cores verify while one sequences (see BENCHMARKS.md)
DEFAULT_VERIFY_THREADS = min(2, os.cpu_count() or 1)

Source = Envelope | bytes | Mapping[str, object]
#: (key id, kind) -> the key that passed checks (3) and (5) for that pair, in one batch
Passed = dict[tuple[str, str], TrustedKey]


@dataclass(frozen=True)
class Validated:
    """An envelope that passed every check and is ready to sequence.

    ``envelope`` and ``statement`` are None when a worker process validated it
    (``Ledger(verify_processes=N)``); a ``key`` receipt always has its statement. Its
    leaf hash is made when it is sequenced: it binds the integration time.
    """

    envelope: Envelope | None
    canonical: bytes
    statement: Statement | None
    kind: str
    key_id: str
    subjects: tuple[str, ...]  # subject SHA-256 digests, in statement order
    digest: bytes  # kolm_ledger.formats.leaf.statement_digest: one statement, one entry
    time_us: int  # the receipt's own ``time`` (µs since the epoch)


def _split(items: Sequence[_T], workers: int) -> list[Sequence[_T]]:
    """``items`` in contiguous chunks for :meth:`Validator.submit`: one per worker, but
    none under ``_MIN_CHUNK // 2`` items unless there are fewer than that in all."""
    n = max(1, min(workers, len(items) // (_MIN_CHUNK // 2)))
    step = max(1, -(-len(items) // n))
    return [items[i : i + step] for i in range(0, len(items), step)]


class Validator:
    """Checks (1)-(5) for the ledger, with ``verify_threads`` threads and
    ``verify_processes`` worker processes (0: none); see :class:`~kolm_ledger.log.ledger.Ledger`.
    """

    def __init__(
        self, *, max_time_skew: timedelta, verify_threads: int, verify_processes: int
    ) -> None:
        if max_time_skew < timedelta(0):
            raise InvalidInput(f"max_time_skew {max_time_skew}, want 0 or more")
        #: how far a receipt's own ``time`` may lie after its integration time
        self.max_time_skew = max_time_skew
        self._skew_us = max_time_skew // timedelta(microseconds=1)
        if verify_threads < 1:
            raise InvalidInput(f"verify_threads {verify_threads}, want at least 1")
        if verify_processes < 0:
            raise InvalidInput(f"verify_processes {verify_processes}, want 0 or more")
        self.verify_processes = verify_processes
        self.processes = ProcessVerifier(verify_processes) if verify_processes else None
        self._pems: tuple[TrustState, dict[str, str]] | None = None
        # cryptography verifies with the GIL released, so threads verify in parallel
        self.verify_threads = verify_threads
        self._verify_pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    def validate(
        self,
        envelope: Source,
        now: datetime,
        trust: TrustState,
        passed: Passed | None,
    ) -> Validated:
        """Checks (1)-(5) against ``trust`` at ``now``; raises the specific error.

        ``passed`` (one batch: same ``trust``, same ``now``) remembers the keys that
        passed checks (3) and (5) for a (key id, kind); those checks depend on nothing
        else, so the next receipt of that pair skips straight to its own signature (4).
        """
        env, canonical, st = parse_receipt(envelope)  # (1)+(2) size, then parse
        kind = st.kind
        t = receipt_time(st.predicate)  # (2) the receipt's own time: present, RFC 3339
        keyid = env.signatures[0].keyid
        key = passed.get((keyid, kind)) if passed is not None else None
        if key is not None:
            verify_signature(env, key.public_key)  # (4); (3) and (5) passed for this pair
        else:
            # (3) key in the trust state
            key = trust.get(keyid)
            if kind == "key":
                # (4), (5) and the change, as the one fold (trust.fold_key_receipts) runs
                # them: a key receipt that does not apply to the trust state must be refused
                # here, once committed it would break every later refresh_trust (and reopen)
                trust.admit(env, now)
            else:
                # (4) signature
                verify_signature(env, key.public_key)
                # (5) role and validity: the key policy
                check_key_policy(key, kind, now)
                if passed is not None:
                    passed[(keyid, kind)] = key
        # (5) the receipt time rule, against now (again at the integration time); in whole
        # microseconds (exact: datetimes hold µs), check_receipt_time only to name a failure
        t_us = micros(t)
        if not micros(key.not_before) <= t_us <= micros(now) + self._skew_us:
            check_receipt_time(
                t, not_before=key.not_before, integrated_at=now, skew=self.max_time_skew
            )
        return Validated(
            env,
            canonical,
            st,
            kind,
            keyid,
            tuple(st.subject_digests()),
            statement_digest(env),
            t_us,
        )

    def pipelines(self, envelopes: Sequence[Source]) -> bool | None:
        """How :meth:`~kolm_ledger.log.ledger.Ledger.append` validates ``envelopes``: None
        on the caller's thread (a small batch, or one verify thread), False on the verify
        threads, True in the worker processes (only envelope bytes go there)."""
        if len(envelopes) < 2 * _MIN_CHUNK:
            return None
        if self.processes is not None and all(type(e) is bytes for e in envelopes):
            return True
        return False if self.verify_threads > 1 else None

    def _pool(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._verify_pool is None:
                self._verify_pool = ThreadPoolExecutor(
                    self.verify_threads, thread_name_prefix="kolm-verify"
                )
            return self._verify_pool

    @contextmanager
    def pipelined(
        self,
        envelopes: Sequence[Source],
        now: datetime,
        trust: TrustState,
        *,
        processes: bool = False,
    ) -> Iterator[tuple[Iterator[Validated], Callable[[], list[Validated]]]]:
        """Validate ``envelopes`` on the verify threads, to overlap their sequencing.

        Yields ``(items, every)``: ``items`` gives the envelopes' :class:`Validated` in
        order as the chunks finish, and raises the first refused envelope's error when
        its turn comes (a chunk stops at its first invalid envelope), so every envelope
        before it validated; ``every()`` validates what ``items`` did not reach and
        returns all of them. Chunks not yet started are cancelled on exit.
        ``processes``: the chunks are parsed and verified in the worker processes
        (``envelopes`` are all bytes), and :meth:`_from_workers` finishes each on this
        thread.
        """
        # small enough chunks that little is left to sequence after the last one; a
        # process hand-off costs more than a thread's, so two chunks per worker there
        # (measured best: four per worker cost PostgreSQL 0.86 -> 0.74 of the ceiling)
        workers = self.verify_processes if processes else self.verify_threads
        step = max(_MIN_CHUNK // 2, -(-len(envelopes) // ((2 if processes else 4) * workers)))
        passed: Passed = {}

        def run(chunk: Sequence[Source]) -> tuple[list[Validated], BaseException | None]:
            out: list[Validated] = []
            try:
                for e in chunk:
                    out.append(self.validate(e, now, trust, passed))
            except Exception as err:  # re-raised by the sequencing thread, in order
                return out, err
            return out, None

        chunks = [envelopes[i : i + step] for i in range(0, len(envelopes), step)]
        futures: list[Future[Any]]
        if processes:
            assert self.processes is not None
            pems = self._public_pems(trust)
            futures = [self.processes.submit(pems, cast(Sequence[bytes], c)) for c in chunks]
        else:
            pool = self._pool()
            futures = [pool.submit(run, c) for c in chunks]
        got: list[Validated] = []

        def stream() -> Iterator[Validated]:
            for c, f in zip(chunks, futures, strict=True):
                if processes:
                    out, err = self._from_workers(
                        cast(Sequence[bytes], c), ProcessVerifier.result(f), now, trust, passed
                    )
                else:
                    out, err = f.result()
                got.extend(out)
                if err is not None:
                    raise err
                yield from out

        items = stream()

        def every() -> list[Validated]:
            for _ in items:  # validate what the aborted transaction did not reach
                pass
            return got

        try:
            yield items, every
        finally:
            for f in futures:
                f.cancel()

    def _public_pems(self, trust: TrustState) -> dict[str, str]:
        """Key id → public key PEM of every key of ``trust`` (what :meth:`TrustState.get` finds)."""
        cached = self._pems
        if cached is None or cached[0] is not trust:
            pems: dict[str, str] = {str(k.keyid): k.public_key.pem() for k in trust.root.keys}
            pems.update((str(k.keyid), k.public_key.pem()) for k in trust.extra)
            cached = self._pems = (trust, pems)
        return cached[1]

    def _from_workers(
        self,
        chunk: Sequence[bytes],
        checked: Sequence[Checked],
        now: datetime,
        trust: TrustState,
        passed: Passed,
    ) -> tuple[list[Validated], BaseException | None]:
        """Finish a chunk the workers checked: checks (3) and (5) here, as :meth:`validate` does.

        Stops at the first refused envelope (its error second). An envelope whose key
        the workers did not have, and a key receipt, are validated here in full, so
        their errors (and a key receipt's trust check) are exactly :meth:`validate`'s.
        """
        out: list[Validated] = []
        try:
            for data, c in zip(chunk, checked, strict=True):
                out.append(self._finish(data, c, now, trust, passed))
        except KolmError as e:
            return out, e
        return out, None

    def _finish(
        self,
        data: bytes,
        c: Checked,
        now: datetime,
        trust: TrustState,
        passed: Passed,
    ) -> Validated:
        """One envelope the workers checked, finished as :meth:`validate` would; raises."""
        if isinstance(c, KolmError):
            raise c
        if isinstance(c, str):  # "unknown" key or a "key" receipt: validate it here
            return self.validate(data, now, trust, passed)
        digest, kind, keyid, subjects, time_us = c
        key = passed.get((keyid, kind))
        if key is None:
            key = trust.authorize(keyid, kind, now)  # (3) and (5)
            passed[(keyid, kind)] = key
        # the receipt time rule in µs, as in validate (this runs on the caller's thread for
        # every receipt the workers checked: no datetime round trip unless it fails)
        if not micros(key.not_before) <= time_us <= micros(now) + self._skew_us:
            check_receipt_time(
                from_micros(time_us),
                not_before=key.not_before,
                integrated_at=now,
                skew=self.max_time_skew,
            )
        return Validated(None, data, None, kind, keyid, subjects, digest, time_us)

    def submit(
        self, envelopes: Sequence[Source], now: datetime, trust: TrustState
    ) -> list[Future[list[Validated | KolmError]]]:
        """:meth:`validate` each envelope on the verify threads, in contiguous chunks.

        Returns one future per chunk, in order; each gives, per envelope, its
        :class:`Validated` or the :class:`KolmError` it was refused with (other
        exceptions propagate). With worker processes and envelope bytes, the chunks are
        parsed and verified in the workers instead, and finished (checks 3 and 5) as they
        come back.
        """
        passed: Passed = {}
        if self.processes is not None and all(type(e) is bytes for e in envelopes):
            return self._submit_to_workers(cast(Sequence[bytes], envelopes), now, trust, passed)

        def run(chunk: Sequence[Source]) -> list[Validated | KolmError]:
            out: list[Validated | KolmError] = []
            for e in chunk:
                try:
                    out.append(self.validate(e, now, trust, passed))
                except KolmError as err:
                    out.append(err)
            return out

        pool = self._pool()
        return [pool.submit(run, c) for c in _split(envelopes, self.verify_threads)]

    def _submit_to_workers(
        self,
        envelopes: Sequence[bytes],
        now: datetime,
        trust: TrustState,
        passed: Passed,
    ) -> list[Future[list[Validated | KolmError]]]:
        """:meth:`submit` on the worker processes."""
        assert self.processes is not None
        pems = self._public_pems(trust)
        lock = threading.Lock()  # ``passed`` is shared by the chunks' callbacks
        out: list[Future[list[Validated | KolmError]]] = []
        for chunk in _split(envelopes, self.verify_processes):
            done: Future[list[Validated | KolmError]] = Future()

            def finish(
                f: Future[Any],
                chunk: Sequence[bytes] = chunk,
                done: Future[list[Validated | KolmError]] = done,
            ) -> None:
                try:
                    res: list[Validated | KolmError] = []
                    with lock:
                        for data, c in zip(chunk, ProcessVerifier.result(f), strict=True):
                            try:
                                res.append(self._finish(data, c, now, trust, passed))
                            except KolmError as err:
                                res.append(err)
                    done.set_result(res)
                except BaseException as e:  # the pool broke, or was shut down
                    done.set_exception(e)

            self.processes.submit(pems, chunk).add_done_callback(finish)
            out.append(done)
        return out

    def start_workers(self) -> None:
        """Start the worker processes now rather than on first use (no-op without)."""
        if self.processes is not None:
            self.processes.start()

    def close(self) -> None:
        """Stop the verify threads and the worker processes (started again on next use)."""
        with self._pool_lock:
            pool, self._verify_pool = self._verify_pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if self.processes is not None:
            self.processes.close()
