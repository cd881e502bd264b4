"""Receipt checks that need no trust state, and a process pool that runs them.

:func:`parse_receipt` is checks (1)-(2) of :mod:`kolm_ledger.log.ledger` (size, DSSE
envelope, in-toto statement, one signature); the ledger runs it for every envelope it
validates. :class:`ProcessVerifier` runs it, the signature check (4) and the leaf hash
in worker processes, for ``Ledger(verify_processes=N)``: threads verify signatures with
the GIL released, but the parsing around each signature holds it, so on two cores
threads gain little; processes do not share a GIL. The caller keeps every check that
depends on the trust state's policy (3, 5) and the sequencing, so a worker only ever
answers "these bytes parse, and this key signed them".

Workers are started with ``spawn`` (safe in a process that already runs threads, such
as a gRPC server) on first use; each is handed the public keys of the caller's trust
state with every chunk (a few hundred bytes), so it never holds state of its own
beyond a cache of parsed keys.
"""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from kolm_ledger._crypto import PublicKey
from kolm_ledger.errors import (
    EntryTooLargeError,
    EnvelopeFormatError,
    KolmError,
    StatementFormatError,
    UnavailableError,
)
from kolm_ledger.formats.dsse import MAX_ENVELOPE_BYTES, Envelope, parse_envelope, verify_signature
from kolm_ledger.formats.leaf import statement_digest
from kolm_ledger.formats.receipts import Statement
from kolm_ledger.timefmt import micros, receipt_time

__all__ = ["Checked", "ProcessVerifier", "parse_receipt"]


def _parse(envelope: Envelope | bytes | Mapping[str, object]) -> tuple[Envelope, bytes]:
    if isinstance(envelope, bytes | bytearray):
        if len(envelope) > 2 * MAX_ENVELOPE_BYTES:
            raise EntryTooLargeError(
                f"entry is {len(envelope)} bytes; the ledger accepts at most {MAX_ENVELOPE_BYTES}"
            )
        # canonical input (the usual case) is its own leaf data: one pass, no JSON parse
        envelope, canonical = parse_envelope(bytes(envelope))
    else:
        if isinstance(envelope, Mapping):
            envelope = Envelope.from_json(dict(envelope))
        if not isinstance(envelope, Envelope):
            raise EnvelopeFormatError(f"want a DSSE envelope, got {type(envelope).__name__}")
        canonical = envelope.canonical()
    if len(canonical) > MAX_ENVELOPE_BYTES:
        raise EntryTooLargeError(
            f"entry is {len(canonical)} bytes (canonical JSON); the ledger accepts at most "
            f"{MAX_ENVELOPE_BYTES}"
        )
    return envelope, canonical


def parse_receipt(
    envelope: Envelope | bytes | Mapping[str, object],
) -> tuple[Envelope, bytes, Statement]:
    """Checks (1)-(2): size, then parse; returns (envelope, canonical JSON, statement).

    Raises the specific error: :class:`EntryTooLargeError`, :class:`EnvelopeFormatError`
    (also for anything but exactly one signature), :class:`StatementFormatError`.
    """
    try:
        env, canonical = _parse(envelope)
    except RecursionError as e:  # json.loads on deeply nested input
        raise EnvelopeFormatError("envelope is nested too deeply to parse") from e
    try:
        st = Statement.from_envelope(env)
    except RecursionError as e:
        raise StatementFormatError("envelope payload is nested too deeply to parse") from e
    if len(env.signatures) != 1:
        raise EnvelopeFormatError(
            f"receipt envelope has {len(env.signatures)} signatures, want exactly 1"
        )
    return env, canonical, st


#: A worker's answer for one envelope that parsed and verified:
#: (statement digest, kind, key id, subject digests, receipt time µs); or the string "unknown" (its key id is not
#: among the keys handed over, so the caller raises the trust state's own error), "key"
#: (a key receipt: the caller validates those itself, they change the trust state), or
#: the :class:`KolmError` it was refused with.
Checked = tuple[bytes, str, str, tuple[str, ...], int] | str | KolmError

_KEYS: dict[tuple[str, str], PublicKey] = {}  # worker side: parsed keys by (id, PEM)


def check_chunk(keys: Mapping[str, str], chunk: Sequence[bytes]) -> list[Checked]:
    """Worker entry point: :func:`parse_receipt`, the receipt's time, check (4) and the
    statement digest of each envelope.

    ``keys`` maps key id → public key PEM (every key of the caller's trust state).
    """
    out: list[Checked] = []
    for data in chunk:
        try:
            env, _, st = parse_receipt(data)
            kind = st.kind
            if kind == "key":
                out.append("key")
                continue
            t = receipt_time(st.predicate)
            keyid = env.signatures[0].keyid
            pem = keys.get(keyid)
            if pem is None:
                out.append("unknown")
                continue
            key = _KEYS.get((keyid, pem))
            if key is None:
                key = _KEYS[(keyid, pem)] = PublicKey.from_pem(pem)
            verify_signature(env, key)
            out.append(
                (
                    statement_digest(env),
                    kind,
                    keyid,
                    tuple(st.subject_digests()),
                    micros(t),
                )
            )
        except KolmError as e:
            out.append(e)
    return out


def _warm() -> None:
    """Import everything a worker needs before the first chunk arrives."""


class ProcessVerifier:
    """``processes`` worker processes running :func:`check_chunk`; started on first use."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start the workers now (a server does, so its first request does not wait)."""
        self._executor()

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    self.processes, mp_context=multiprocessing.get_context("spawn")
                )
                # start every worker now (one short task each), not during a timed batch
                for f in [self._pool.submit(_warm) for _ in range(self.processes)]:
                    f.result()
            return self._pool

    def submit(self, keys: Mapping[str, str], chunk: Sequence[bytes]) -> Future[Any]:
        """Check ``chunk`` in a worker; the future gives one :data:`Checked` per envelope.

        A pool whose worker died (killed, out of memory) is replaced here; the chunks it
        held fail with :class:`UnavailableError` (see :func:`result`).
        """
        try:
            return self._executor().submit(check_chunk, dict(keys), list(chunk))
        except BrokenProcessPool:
            self.close()
            return self._executor().submit(check_chunk, dict(keys), list(chunk))

    @staticmethod
    def result(f: Future[Any]) -> list[Checked]:
        """``f``'s answers; :class:`UnavailableError` if its worker died meanwhile."""
        try:
            out: list[Checked] = f.result()
        except BrokenProcessPool as e:
            raise UnavailableError(f"a verify worker process died: {e}; retry") from e
        return out

    def close(self) -> None:
        """Stop the workers (they are started again on the next :meth:`submit`)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
