"""The log's side of C2SP tlog-witness: step 7 of :mod:`kolm_ledger.log.ledger`.

:func:`add_checkpoint` POSTs a checkpoint with a consistency proof to a witness's
``/add-checkpoint`` and reads back its cosignature lines (formats in
:mod:`kolm_ledger.formats.witness`; the witness process is :mod:`kolm_ledger.service.witness`).
:class:`WitnessRound` runs the log's offer rounds: the newest committed checkpoint to every
witness that has not cosigned it, all at once, storing the cosignatures that come back.
"""

from __future__ import annotations

import base64
import http.client
import logging
import threading
import urllib.parse
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

from kolm_ledger.errors import (
    CheckpointFormatError,
    ConflictError,
    InvalidInput,
    KolmError,
    UnavailableError,
)
from kolm_ledger.formats.checkpoint import SignedCheckpoint
from kolm_ledger.formats.merkle import consistency_proof
from kolm_ledger.formats.note import NoteSignature
from kolm_ledger.formats.witness import SIZE_CONTENT_TYPE
from kolm_ledger.storage import Store, StoredCheckpoint

__all__ = ["WitnessConflict", "WitnessRound", "add_checkpoint"]

log = logging.getLogger("kolm.ledger")


class WitnessConflict(ConflictError):
    """The witness last cosigned another size (``.size``): resend from there."""

    def __init__(self, message: str, size: int) -> None:
        super().__init__(message)
        self.size = size


def add_checkpoint(
    url: str, old: int, proof: Sequence[bytes], note: bytes, *, timeout: float = 5.0
) -> list[NoteSignature]:
    """POST a checkpoint to the witness at ``url``; return its cosignature lines.

    Raises :class:`WitnessConflict` on 409 with a size, :class:`UnavailableError` when
    the witness cannot be reached or refuses.
    """
    body = f"old {old}\n".encode()
    body += b"".join(base64.b64encode(h) + b"\n" for h in proof) + b"\n" + note
    u = urllib.parse.urlparse(url)
    conn_cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
    try:
        conn = conn_cls(u.netloc, timeout=timeout)
        try:
            conn.request(
                "POST", u.path.rstrip("/") + "/add-checkpoint", body, {"Content-Type": "text/plain"}
            )
            r = conn.getresponse()
            data = r.read()
            ct = r.getheader("Content-Type", "")
        finally:
            conn.close()
    except OSError as e:
        raise UnavailableError(f"witness {url} unreachable: {e}") from e
    text = data.decode("utf-8", "replace")
    if r.status == 409 and ct.startswith(SIZE_CONTENT_TYPE) and text.strip().isdigit():
        raise WitnessConflict(f"witness {url} last cosigned size {text.strip()}", int(text))
    if r.status != 200:
        raise UnavailableError(f"witness {url} answered {r.status}: {text.strip()[:200]}")
    try:
        return [NoteSignature.from_line(ln, "cosignature") for ln in text.splitlines() if ln]
    except CheckpointFormatError as e:
        raise UnavailableError(f"witness {url} sent a malformed cosignature: {e}") from e


class WitnessRound:
    """Offers a log's committed checkpoints to its ``witnesses`` and stores their cosignatures.

    ``policy`` is ``"required"`` (an append returns only once every witness cosigned) or
    ``"best-effort"``; ``timeout`` bounds one witness's answer. Rounds run one at a time,
    in size order; each asks its witnesses at once, one thread each.
    """

    def __init__(
        self, store: Store, witnesses: Sequence[str], *, policy: str, timeout: float
    ) -> None:
        if policy not in ("required", "best-effort"):
            raise InvalidInput(f"witness_policy {policy!r}, want 'required' or 'best-effort'")
        self.store = store
        self.witnesses = list(witnesses)
        self.policy = policy
        self.timeout = timeout
        # the size each witness last cosigned, as far as we know (re-synced from its 409)
        self._witness_sizes: dict[str, int] = {}
        # the checkpoint size whose cosignature by each witness this process stored
        self._cosigned: dict[str, int] = {}
        self._lock = threading.Lock()  # one offer round at a time, in size order
        self._pool_lock = threading.Lock()
        #: asks the witnesses at once (started by the first round with two or more to ask)
        self.pool: ThreadPoolExecutor | None = None

    def offer_latest(self, clock: Callable[[], datetime]) -> SignedCheckpoint | None:
        """Offer the newest committed checkpoint to the witnesses that have not cosigned it.

        Failures are logged, not raised. Returns the checkpoint with every cosignature
        stored for it, or None for an empty log. ``clock`` stamps the stored cosignatures.
        """
        try:
            return self.collect(strict=False, clock=clock)
        except KolmError as e:
            log.warning("offering the newest checkpoint to witnesses failed: %s", e)
            return None

    def cosign(
        self, signed: SignedCheckpoint | None, clock: Callable[[], datetime]
    ) -> SignedCheckpoint | None:
        """Step 7, after a batch committed ``signed``.

        ``signed`` is None when the batch added nothing (only duplicates): under
        ``"required"`` the newest checkpoint must still be cosigned before the duplicates
        are acknowledged (a retry after a witness failed); under ``"best-effort"`` nobody
        is asked.
        """
        if signed is None and self.policy != "required":
            return None
        out = self.collect(strict=self.policy == "required", clock=clock)
        return out if out is not None else signed

    def collect(self, *, strict: bool, clock: Callable[[], datetime]) -> SignedCheckpoint | None:
        """Offer the newest committed checkpoint to each witness; store what comes back.

        With ``strict``, raises :class:`UnavailableError` unless every witness has
        cosigned it (the cosignatures that did come back are stored either way).
        """
        with self._lock:
            failed: dict[str, KolmError] = {}
            latest: StoredCheckpoint | None = None
            for _ in range(3):  # again if another replica committed (and offered) a newer one
                latest = self.store.latest_checkpoint()
                if latest is None:
                    return None
                signed = SignedCheckpoint.from_bytes(latest.note)
                size, ahead = latest.size, False
                failed.clear()
                got: dict[str, list[NoteSignature]] = {}
                todo = [u for u in self.witnesses if self._cosigned.get(u) != size]
                for url, answer in zip(todo, self._ask(todo, signed), strict=True):
                    if isinstance(answer, WitnessConflict):
                        ahead = ahead or answer.size > size
                        failed[url] = answer
                    elif isinstance(answer, KolmError):
                        failed[url] = answer
                    else:
                        got[url] = answer
                if got:  # one short write for all of them, then serve what is stored
                    sigs = [(g.name, g.key_id, g.sig) for gs in got.values() for g in gs]
                    self.store.add_cosignatures(size, sigs, clock())
                    self._cosigned.update(dict.fromkeys(got, size))
                    latest = self.store.checkpoint_at(size)
                if not ahead:
                    break
            assert latest is not None
            for url, err in failed.items():
                log.warning("witness %s did not cosign checkpoint %d: %s", url, latest.size, err)
            if strict and failed:
                url, err = next(iter(failed.items()))
                raise UnavailableError(
                    f"witness {url} did not cosign checkpoint {latest.size}: {err} (the entries "
                    "are committed; retrying the append waits for the cosignatures again)"
                )
            return SignedCheckpoint.from_bytes(latest.note)

    def _ask(
        self, urls: Sequence[str], signed: SignedCheckpoint
    ) -> list[list[NoteSignature] | KolmError]:
        """Each witness's cosignatures on ``signed`` or why not, in ``urls`` order.

        Several witnesses are asked at once, one thread each: an offer round takes as
        long as the slowest witness (at most ``timeout`` for one that does not answer),
        not the sum of them.
        """

        def one(url: str) -> list[NoteSignature] | KolmError:
            try:
                return self._one(url, signed)
            except KolmError as e:
                return e

        if len(urls) < 2:
            return [one(u) for u in urls]
        with self._pool_lock:
            if self.pool is None:
                self.pool = ThreadPoolExecutor(
                    len(self.witnesses), thread_name_prefix="kolm-witness"
                )
            pool = self.pool
        return list(pool.map(one, urls))

    def _one(self, url: str, signed: SignedCheckpoint) -> list[NoteSignature]:
        """One witness's cosignatures on ``signed`` (committed: its nodes are in the store).

        Raises :class:`WitnessConflict` (its ``size`` beyond ``signed``) when the witness
        has already cosigned a larger checkpoint.
        """
        size = signed.checkpoint.size
        old = self._witness_sizes.get(url, 0)
        for _ in range(2):  # once more after a 409 tells us the witness's size
            if old > size:
                raise WitnessConflict(f"witness {url} has cosigned size {old}, beyond {size}", old)
            proof = [] if old in (0, size) else consistency_proof(old, size, self.store.get_nodes)
            try:
                out = add_checkpoint(url, old, proof, signed.to_bytes(), timeout=self.timeout)
            except WitnessConflict as c:
                old = self._witness_sizes[url] = c.size
                continue
            self._witness_sizes[url] = size
            return out
        raise ConflictError(f"witness {url} keeps answering 409 (last said size {old})")

    def close(self) -> None:
        """Stop the threads that ask the witnesses (started again by the next round)."""
        with self._pool_lock:
            pool, self.pool = self.pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
