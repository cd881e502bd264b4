"""Where a compile job's receipts go: the ledger service, or an in-process ledger.

A :class:`ReceiptSink` appends a batch of signed envelopes and answers, per envelope
and in order, either an :class:`Acked` (the ledger index and leaf hash) or the
:class:`~kolm_ledger.errors.KolmError` that refused it. Only acknowledged label
receipts may reach training, so an error for one envelope loses that one label only.
``job_labels(job_id)`` (optional for other sinks) answers the label receipts the ledger
already holds for a job, by example digest, so a resumed job reuses them instead of
logging a label twice. Both sinks here also read the ledger (:class:`LedgerSink`:
``find``, ``trust_state``), which republishing an artifact needs.

:func:`open_sink` is the one place a command turns ``--db URL`` or ``--ledger HOST:PORT``
into a sink (``kolm compile run``, ``kolm recall update``).

Example::

    from kolm_ledger.service.client import LedgerClient
    sink = ServiceSink(LedgerClient("127.0.0.1:7000"))
    acks = sink.append([envelope])            # [Acked(index=..., leaf_hash=...)] or errors
    sink.checkpoint()                         # {"origin": ..., "size": ..., "root": "<hex>"}
    sink.job_labels("job-1")                  # {example digest: Acked(...)} already logged
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from kolm_ledger.errors import InvalidInput, KolmError
from kolm_ledger.formats.dsse import Envelope
from kolm_ledger.formats.receipts import Statement, job_digest

if TYPE_CHECKING:
    from kolm_ledger.keys import TrustRoot
    from kolm_ledger.verify.trust import TrustState

__all__ = [
    "Acked",
    "LedgerSink",
    "LocalLedgerSink",
    "ReceiptSink",
    "ServiceSink",
    "labels_by_example",
    "open_sink",
]

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


class LedgerSink(ReceiptSink, Protocol):
    """A :class:`ReceiptSink` that also reads the ledger: what republishing an artifact
    (:func:`kolm.cli.recall.update_artifact`) needs. Both sinks here are one."""

    def find(self, *, subject_digest: str, kind: str, limit: int) -> Sequence[Any]:
        """Ledger entries whose subject is ``subject_digest`` and kind ``kind``, in index
        order (at most ``limit``)."""
        ...

    def trust_state(self) -> TrustState:
        """The ledger's trust state: its trust root plus every key receipt in it."""
        ...


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
    in ``trust`` (a :class:`~kolm_ledger.verify.trust.TrustState`): the key policy
    (:meth:`~kolm_ledger.verify.trust.TrustState.authorize`: may it sign ``label`` receipts
    now?), and no revocation of it logged yet, even one that takes effect later."""
    from datetime import UTC, datetime

    from kolm_ledger.errors import ConflictError, KeyValidityError, RoleError, UnknownKeyError

    keyid = key.keyid()
    try:
        k = trust.authorize(keyid, "label", datetime.now(UTC))
    except UnknownKeyError:
        raise ConflictError(
            f"the compile key in --keys (key id {keyid}) is not trusted by {where}: this key "
            "folder belongs to another kolm setup; give the --keys folder the ledger was set "
            "up with (nothing was sent to the teacher)"
        ) from None
    except RoleError:
        raise ConflictError(
            f"the key in --keys (key id {keyid}) has role {trust.get(keyid).role} at {where}, "
            "not compile (nothing was sent to the teacher)"
        ) from None
    except KeyValidityError as e:
        raise ConflictError(
            f"the compile key in --keys (key id {keyid}) is revoked or expired at {where}, or "
            f"not valid yet ({e}) (nothing was sent to the teacher)"
        ) from None
    if k.revoked_at is not None:
        raise ConflictError(
            f"the compile key in --keys (key id {keyid}) is revoked or expired at {where} "
            "(nothing was sent to the teacher)"
        )


class ServiceSink:
    """The ledger service through :meth:`kolm_ledger.service.client.LedgerClient.append_many`.

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
        from kolm_ledger.errors import CheckpointError, ConflictError
        from kolm_ledger.formats.checkpoint import verify_checkpoint
        from kolm_ledger.verify.trust import ledger_trust_state

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
            self.find(subject_digest=job_digest(job_id), kind="label", limit=_JOB_LABELS_LIMIT)
        )

    def find(self, *, subject_digest: str, kind: str, limit: int) -> Sequence[Any]:
        """FindEntries, following the service's pages up to ``limit``."""
        found: Sequence[Any] = self.client.find(
            subject_digest=subject_digest, kind=kind, limit=limit
        )
        return found

    def trust_state(self) -> TrustState:
        """``trust`` plus every key receipt of the service, each proven against its signed
        checkpoint (:func:`kolm_ledger.verify.trust.ledger_trust_state`); needs ``trust``."""
        from kolm_ledger.verify.trust import ledger_trust_state

        if self.trust is None:
            raise InvalidInput("this ledger service sink has no trust root: give trust=")
        return ledger_trust_state(self.client, self.trust)

    def close(self) -> None:
        """Close the client channel."""
        self.client.close()


class LocalLedgerSink:
    """An in-process :class:`kolm_ledger.log.ledger.Ledger` (``kolm compile run --db URL``).

    Each envelope is validated on its own (a refused one takes its error), the valid ones
    are sequenced as one batch with one checkpoint.
    """

    def __init__(self, ledger: Any) -> None:
        self.ledger = ledger

    @classmethod
    def open(cls, db: str, keys_dir: Any, trust: TrustRoot | None = None) -> LocalLedgerSink:
        """Open the ledger database ``db`` with ``keys_dir``'s log key and trust root (or
        ``trust``)."""
        from pathlib import Path

        from kolm_ledger.keys import PrivateKey, TrustRoot
        from kolm_ledger.log.ledger import Ledger
        from kolm_ledger.storage import Store

        keys = Path(keys_dir)
        return cls(
            Ledger(
                Store(db),
                trust if trust is not None else TrustRoot.load(keys / "trust.json"),
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
            self.find(subject_digest=job_digest(job_id), kind="label", limit=_JOB_LABELS_LIMIT)
        )

    def find(self, *, subject_digest: str, kind: str, limit: int) -> Sequence[Any]:
        """The store's matching entries."""
        found: Sequence[Any] = self.ledger.store.find(
            subject_digest=subject_digest, kind=kind, limit=limit
        )
        return found

    def trust_state(self) -> TrustState:
        """The in-process ledger's trust state."""
        state: TrustState = self.ledger.trust
        return state

    def close(self) -> None:
        """Close the store."""
        self.ledger.store.close()


def open_sink(
    *,
    db: str | None = None,
    ledger: str | None = None,
    keys: str | os.PathLike[str],
    trust: TrustRoot | None = None,
    timeout: float = 600.0,
) -> LocalLedgerSink | ServiceSink:
    """The receipt sink that ``--db URL`` or ``--ledger HOST:PORT`` names (exactly one):
    the one place a command chooses between an in-process ledger and the service.

    ``db``: a :class:`LocalLedgerSink` on that database, its checkpoints signed with
    ``keys/log.key``. ``ledger``: a :class:`ServiceSink` toward that service (a client
    with ``timeout`` seconds per call). ``trust`` is the trust root (default:
    ``keys/trust.json``; for a service, only when that file exists): the service sink
    checks the service's checkpoint and the compile key against it before a job spends
    anything (:meth:`ServiceSink.check_signer`). Close the sink when done.
    """
    from pathlib import Path

    from kolm_ledger.keys import TrustRoot

    if bool(db) == bool(ledger):
        raise InvalidInput("give exactly one of --db URL or --ledger HOST:PORT")
    folder = Path(keys)
    if db:
        return LocalLedgerSink.open(db, folder, trust)
    from kolm_ledger.service.client import LedgerClient

    if trust is None and (folder / "trust.json").is_file():
        trust = TrustRoot.load(folder / "trust.json")
    return ServiceSink(LedgerClient(str(ledger), timeout=timeout), trust=trust)
