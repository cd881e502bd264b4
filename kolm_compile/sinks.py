"""Where a compile job's receipts go: the ledger service, or an in-process ledger.

A :class:`ReceiptSink` appends a batch of signed envelopes and answers, per envelope
and in order, either an :class:`Acked` (the ledger index and leaf hash) or the
:class:`~kolm_ledger.errors.KolmError` that refused it. Only acknowledged label
receipts may reach training, so an error for one envelope loses that one label only.
``job_labels(job_id)`` (optional for other sinks) answers the label receipts the ledger
already holds for a job, by example digest, so a resumed job reuses them instead of
logging a label twice.

Example::

    from kolm_ledger.client import LedgerClient
    sink = ServiceSink(LedgerClient("127.0.0.1:7000"))
    acks = sink.append([envelope])            # [Acked(index=..., leaf_hash=...)] or errors
    sink.checkpoint()                         # {"origin": ..., "size": ..., "root": "<hex>"}
    sink.job_labels("job-1")                  # {example digest: Acked(...)} already logged
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from kolm_ledger.dsse import Envelope
from kolm_ledger.errors import KolmError
from kolm_ledger.receipts import Statement, job_digest

__all__ = ["Acked", "LocalLedgerSink", "ReceiptSink", "ServiceSink", "labels_by_example"]

#: label receipts per append call (one AppendStream message / one ledger batch)
LABEL_BATCH = 500


@dataclass(frozen=True)
class Acked:
    """The ledger accepted an envelope: its index and RFC 6962 leaf hash."""

    index: int
    leaf_hash: bytes


class ReceiptSink(Protocol):
    """Appends receipts; one result per envelope, in order."""

    def append(self, envelopes: Sequence[Envelope]) -> list[Acked | KolmError]:
        """Append a batch; an error for one envelope does not stop the others."""
        ...

    def checkpoint(self) -> dict[str, Any]:
        """The newest checkpoint as ``{"origin", "size", "root"}`` (root in hex)."""
        ...

    # optional: def job_labels(self, job_id: str) -> dict[str, Acked]
    # optional: def check_signer(self, key: PrivateKey) -> None  (before any teacher call)
    #   the label receipts already logged for ``job_id``, by example digest (a resumed
    #   job reuses them); a sink without it makes the job rely on deterministic re-signing


def _checkpoint_dict(signed: Any) -> dict[str, Any]:
    cp = signed.checkpoint
    return {"origin": cp.origin, "size": cp.size, "root": cp.root.hex()}


#: more label receipts than any one job logs (find() follows pages up to this)
_JOB_LABELS_LIMIT = 10_000_000


def labels_by_example(entries: Iterable[Any]) -> dict[str, Acked]:
    """Ledger entries of label receipts → ``{example digest: Acked(index, leaf_hash)}``.

    The example digest is the receipt's ``example`` subject (SHA-256 of the canonical
    ``{input, output}``); the first entry wins for a digest logged twice.
    """
    out: dict[str, Acked] = {}
    for e in entries:
        st = Statement.from_envelope(Envelope.from_bytes(e.envelope))
        for sub in st.subjects:
            if sub.name == "example":
                out.setdefault(sub.sha256, Acked(int(e.index), bytes(e.leaf_hash)))
    return out


def _check_trusted_signer(trust: Any, key: Any, where: str) -> None:
    """Raise :class:`ConflictError` in plain words unless ``key`` is a usable compile key
    in ``trust`` (a :class:`~kolm_ledger.trust.TrustState`)."""
    from datetime import UTC, datetime

    from kolm_ledger.errors import ConflictError, UnknownKeyError

    keyid = key.keyid()
    try:
        k = trust.get(keyid)
    except UnknownKeyError:
        raise ConflictError(
            f"the compile key in --keys (key id {keyid}) is not trusted by {where}: this key "
            "folder belongs to another kolm setup; give the --keys folder the ledger was set "
            "up with (nothing was sent to the teacher)"
        ) from None
    now = datetime.now(UTC)
    if k.role != "compile":
        raise ConflictError(
            f"the key in --keys (key id {keyid}) has role {k.role} at {where}, not compile "
            "(nothing was sent to the teacher)"
        )
    if k.revoked_at is not None or (k.not_after is not None and k.not_after <= now):
        raise ConflictError(
            f"the compile key in --keys (key id {keyid}) is revoked or expired at {where} "
            "(nothing was sent to the teacher)"
        )


class ServiceSink:
    """The ledger service through :meth:`kolm_ledger.client.LedgerClient.append_many`.

    With ``trust`` (the key folder's trust root) :meth:`check_signer` checks, before a
    job spends anything, that the service's checkpoint is signed by that root's log key
    and that the compile key is trusted there.
    """

    def __init__(self, client: Any, batch: int = LABEL_BATCH, *, trust: Any = None) -> None:
        self.client = client
        self.batch = batch
        self.trust = trust

    def check_signer(self, key: Any) -> None:
        """Refuse a compile key this ledger service will not accept (needs ``trust``)."""
        if self.trust is None:
            return
        from kolm_ledger.checkpoint import verify_checkpoint
        from kolm_ledger.errors import CheckpointError, ConflictError
        from kolm_ledger.trust import ledger_trust_state

        try:
            verify_checkpoint(self.client.checkpoint().to_bytes(), self.trust)
        except CheckpointError as e:
            raise ConflictError(
                "the ledger service's checkpoint is not signed by the log key of the --keys "
                f"folder's trust.json ({e}): this key folder belongs to another ledger "
                "(nothing was sent to the teacher)"
            ) from e
        _check_trusted_signer(ledger_trust_state(self.client, self.trust), key, "the ledger")

    def append(self, envelopes: Sequence[Envelope]) -> list[Acked | KolmError]:
        """AppendStream in messages of ``batch``; a transport failure fails the whole call."""
        res = self.client.append_many(list(envelopes), batch=self.batch)
        if len(res) != len(envelopes):
            raise KolmError(f"ledger answered {len(res)} results for {len(envelopes)} envelopes")
        return [r if isinstance(r, KolmError) else Acked(r.index, r.leaf_hash) for r in res]

    def checkpoint(self) -> dict[str, Any]:
        """GetCheckpoint."""
        return _checkpoint_dict(self.client.checkpoint())

    def job_labels(self, job_id: str) -> dict[str, Acked]:
        """FindEntries(subject = SHA-256 of the job id, kind label), by example digest."""
        return labels_by_example(
            self.client.find(
                subject_digest=job_digest(job_id), kind="label", limit=_JOB_LABELS_LIMIT
            )
        )

    def close(self) -> None:
        """Close the client channel."""
        self.client.close()


class LocalLedgerSink:
    """An in-process :class:`kolm_ledger.ledger.Ledger` (``kolm compile run --db URL``).

    Each envelope is validated on its own (a refused one takes its error), the valid ones
    are sequenced as one batch with one checkpoint.
    """

    def __init__(self, ledger: Any) -> None:
        self.ledger = ledger

    @classmethod
    def open(cls, db: str, keys_dir: Any) -> LocalLedgerSink:
        """Open the ledger database ``db`` with ``keys_dir``'s trust root and log key."""
        from pathlib import Path

        from kolm_ledger.keys import PrivateKey, TrustRoot
        from kolm_ledger.ledger import Ledger
        from kolm_ledger.storage import Store

        keys = Path(keys_dir)
        return cls(
            Ledger(
                Store(db),
                TrustRoot.load(keys / "trust.json"),
                PrivateKey.load(keys / "log.key"),
            )
        )

    def append(self, envelopes: Sequence[Envelope]) -> list[Acked | KolmError]:
        """Validate each, then one ``append_validated`` batch."""
        out: list[Acked | KolmError | None] = [None] * len(envelopes)
        valid, where = [], []
        for i, env in enumerate(envelopes):
            try:
                valid.append(self.ledger.validate(env))
                where.append(i)
            except KolmError as e:
                out[i] = e
        if valid:
            results, _ = self.ledger.append_validated(valid, skip_refused=True)
            for i, r in zip(where, results, strict=True):
                out[i] = r if isinstance(r, KolmError) else Acked(r.index, r.leaf_hash)
        return [r for r in out if r is not None]

    def checkpoint(self) -> dict[str, Any]:
        """The ledger's newest checkpoint."""
        return _checkpoint_dict(self.ledger.checkpoint())

    def check_signer(self, key: Any) -> None:
        """Refuse a compile key this ledger will not accept, before any teacher call."""
        _check_trusted_signer(self.ledger.trust, key, "the ledger database")

    def job_labels(self, job_id: str) -> dict[str, Acked]:
        """The job's label receipts in the store, by example digest."""
        return labels_by_example(
            self.ledger.store.find(
                subject_digest=job_digest(job_id), kind="label", limit=_JOB_LABELS_LIMIT
            )
        )

    def close(self) -> None:
        """Close the store."""
        self.ledger.store.close()
