"""K-score provenance: artifact receipt → eval receipt → the label receipts it was trained on.

The training-set root is the RFC 6962 Merkle root over the leaf hashes of the job's
label receipts, in ledger index order. Label receipts carry a second subject, the
SHA-256 of their compile job id, so they are found through the subject index.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import cast

from kolm_ledger.errors import NotFoundError
from kolm_ledger.formats.merkle import root_from_leaves
from kolm_ledger.formats.receipts import job_digest
from kolm_ledger.storage import Entry, Store

__all__ = ["Provenance", "predicate_of", "provenance", "training_set_root"]


def predicate_of(entry: Entry) -> dict[str, object]:
    """The predicate of the statement stored in ``entry`` (already validated at append)."""
    import base64

    env = json.loads(entry.envelope)
    st = json.loads(base64.b64decode(env["payload"]))
    pred = st.get("predicate", {})
    return pred if isinstance(pred, dict) else {}


def training_set_root(leaf_hashes: list[bytes]) -> str:
    """Hex Merkle root over label receipts' leaf hashes (in ledger order)."""
    return root_from_leaves(leaf_hashes).hex()


@dataclass
class Provenance:
    """What the ledger holds about one artifact."""

    artifact: Entry
    eval: Entry | None
    k_score: float
    eval_n: int
    eval_correct: int
    interval: tuple[float, float]
    teacher_k_score: float | None
    training_set_root: str
    recomputed_root: str
    label_count: int
    labels_found: int
    job_id: str
    labels: list[Entry] = field(default_factory=list)

    @property
    def root_matches(self) -> bool:
        """The artifact's claimed training-set root equals the recomputed one."""
        return self.training_set_root == self.recomputed_root and (
            self.label_count == self.labels_found
        )


def _named_eval(store: Store, leaf_hex: object) -> Entry | None:
    """The eval entry whose leaf hash the artifact receipt names (an artifact may be
    evaluated more than once; it names the evaluation it reports)."""
    if not isinstance(leaf_hex, str) or len(leaf_hex) != 64:
        return None
    try:
        e = store.get_by_leaf_hash(bytes.fromhex(leaf_hex))
    except (ValueError, NotFoundError):
        return None
    return e if e.kind == "eval" else None


def provenance(store: Store, artifact_digest: str, *, include_labels: bool = False) -> Provenance:
    """Look up an artifact's receipts; raises :class:`NotFoundError` if it was never logged."""
    arts = store.find(subject_digest=artifact_digest, kind="artifact", limit=10)
    if not arts:
        raise NotFoundError(f"no artifact receipt for digest {artifact_digest}")
    art = arts[-1]
    ap = predicate_of(art)
    ev = _named_eval(store, ap.get("eval_receipt"))
    if ev is None:  # fall back to the newest eval of this artifact; the check will object
        evals = store.find(subject_digest=artifact_digest, kind="eval", limit=10)
        ev = evals[-1] if evals else None
    ep = predicate_of(ev) if ev else {}
    job_id = str(ap.get("job_id", ""))
    labels: list[Entry] = []
    if job_id:
        after = -1
        while True:
            page = store.find(
                subject_digest=job_digest(job_id), kind="label", after_index=after, limit=5000
            )
            labels.extend(page)
            if len(page) < 5000:
                break
            after = page[-1].index
    interval = ep.get("interval") or {}
    assert isinstance(interval, dict)
    return Provenance(
        artifact=art,
        eval=ev,
        k_score=float(ap.get("k_score", 0.0)),  # type: ignore[arg-type]
        eval_n=int(cast(int, ep.get("n", 0))),
        eval_correct=int(ep.get("correct", 0)),  # type: ignore[call-overload]
        interval=(float(interval.get("low", 0.0)), float(interval.get("high", 0.0))),
        teacher_k_score=ep.get("teacher_k_score"),  # type: ignore[arg-type]
        training_set_root=str(ap.get("training_set_root", "")),
        recomputed_root=training_set_root([e.leaf_hash for e in labels]),
        label_count=int(ap.get("label_count", 0)),  # type: ignore[call-overload]
        labels_found=len(labels),
        job_id=job_id,
        labels=labels if include_labels else [],
    )
