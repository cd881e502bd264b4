"""Client-side check of K-score provenance (``kolm provenance``).

Given what the ledger returned for an artifact, recompute — trusting nothing the
server computed:

1. each returned entry's leaf hash from its envelope and integration time, and (with a
   trust root or the ledger's trust state: :func:`kolm_ledger.verify.trust.ledger_trust_state`)
   its signature,
   that a ``compile`` key signed it, and that the key was valid (not revoked) at the
   entry's integration time;
2. the artifact receipt names the eval receipt's leaf hash, and that eval receipt's
   subject is the artifact;
3. the K-score: ``100 * correct / n`` in the eval receipt equals the K-score in both
   receipts;
4. the training-set root: the Merkle root over the label receipts' leaf hashes (in
   ledger order) equals the artifact's claim, and the count matches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from kolm_ledger.errors import KolmError
from kolm_ledger.formats.dsse import Envelope, verify_signature
from kolm_ledger.formats.leaf import entry_leaf_hash
from kolm_ledger.formats.merkle import root_from_leaves
from kolm_ledger.keys import TrustRoot
from kolm_ledger.log.provenance import Provenance, predicate_of
from kolm_ledger.storage import Entry, micros
from kolm_ledger.verify.trust import TrustState, check_key_policy

__all__ = ["ProvenanceReport", "check_provenance"]


@dataclass
class ProvenanceReport:
    """The recomputed chain and every failed check."""

    artifact_digest: str
    k_score: float
    eval_n: int
    interval: tuple[float, float]
    teacher_k_score: float | None
    label_count: int
    claimed_root: str
    recomputed_root: str
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every check passed."""
        return not self.failures

    def render(self) -> str:
        """Human-readable chain."""
        lines = [
            f"artifact  {self.artifact_digest}",
            f"  └─ eval   K-score {self.k_score:.2f} (n={self.eval_n}, 95% CI "
            f"{self.interval[0]:.1f}–{self.interval[1]:.1f}), teacher "
            f"{'n/a' if self.teacher_k_score is None else f'{self.teacher_k_score:.2f}'}",
            f"  └─ labels {self.label_count} label receipts, training-set root "
            f"{self.recomputed_root[:16]}… "
            f"({'matches' if self.claimed_root == self.recomputed_root else 'MISMATCH'})",
        ]
        if self.failures:
            lines.append("FAILED:")
            lines += [f"  {f}" for f in self.failures]
        else:
            lines.append("OK: provenance recomputed from the receipts")
        return "\n".join(lines)


def _leaf(e: Entry) -> bytes:
    """The entry's leaf recomputed from its envelope and integration time (format v2)."""
    try:
        return entry_leaf_hash(e.envelope, micros(e.integrated_at))
    except KolmError:
        return b""


def _check_entry(e: Entry, what: str, state: TrustState | None, fails: list[str]) -> None:
    if _leaf(e) != e.leaf_hash:
        fails.append(
            f"{what} (index {e.index}): leaf hash does not match its envelope and integration time"
        )
    if state is None:
        return
    try:
        env = Envelope.from_bytes(e.envelope)
        key = state.get(env.signatures[0].keyid)
        verify_signature(env, key.public_key)
        check_key_policy(key, e.kind, e.integrated_at)
    except KolmError as err:
        fails.append(f"{what} (index {e.index}): {err}")


def check_provenance(
    p: Provenance, trust: TrustRoot | TrustState | None = None
) -> ProvenanceReport:
    """Run checks (1)-(4) of the module docstring on ``p`` (keys judged by ``trust``: a
    root alone, or the ledger's trust state)."""
    fails: list[str] = []
    state = TrustState(trust) if isinstance(trust, TrustRoot) else trust
    ap = predicate_of(p.artifact)
    art_digest = ""
    env = Envelope.from_bytes(p.artifact.envelope)
    import json

    st = json.loads(env.payload)
    art_digest = st["subject"][0]["digest"]["sha256"]
    # (1)
    _check_entry(p.artifact, "artifact receipt", state, fails)
    if p.eval is None:
        fails.append("no eval receipt for this artifact")
        ep: dict[str, object] = {}
    else:
        _check_entry(p.eval, "eval receipt", state, fails)
        ep = predicate_of(p.eval)
        # (2)
        if ap.get("eval_receipt") != p.eval.leaf_hash.hex():
            fails.append("artifact receipt does not name this eval receipt's leaf hash")
        ev_subjects = [
            s["digest"]["sha256"]
            for s in json.loads(Envelope.from_bytes(p.eval.envelope).payload)["subject"]
        ]
        if art_digest not in ev_subjects:
            fails.append(
                f"eval receipt (index {p.eval.index}) evaluates "
                f"{', '.join(d[:16] for d in ev_subjects)}, not artifact {art_digest[:16]}"
            )
    # (3)
    n = int(ep.get("n", 0) or 0)  # type: ignore[call-overload]
    correct = int(ep.get("correct", 0) or 0)  # type: ignore[call-overload]
    k = 100.0 * correct / n if n else 0.0
    for name, claimed in (("eval", ep.get("k_score")), ("artifact", ap.get("k_score"))):
        if not isinstance(claimed, int | float) or not math.isclose(k, claimed, abs_tol=1e-9):
            fails.append(f"{name} receipt K-score {claimed} != 100*{correct}/{n} = {k:.4f}")
    # (4)
    for e in p.labels:
        _check_entry(e, "label receipt", state, fails)
    root = root_from_leaves([_leaf(e) for e in sorted(p.labels, key=lambda e: e.index)]).hex()
    claimed_root = str(ap.get("training_set_root", ""))
    if root != claimed_root:
        fails.append(
            f"training-set root {claimed_root[:16]}… claimed, {root[:16]}… recomputed "
            f"from {len(p.labels)} label receipts"
        )
    if len(p.labels) != int(ap.get("label_count", -1)):  # type: ignore[call-overload]
        fails.append(
            f"artifact claims {ap.get('label_count')} labels, ledger holds {len(p.labels)}"
        )
    interval = ep.get("interval") or {}
    assert isinstance(interval, dict)
    t = ep.get("teacher_k_score")
    return ProvenanceReport(
        art_digest,
        k,
        n,
        (float(interval.get("low", 0)), float(interval.get("high", 0))),
        float(t) if isinstance(t, int | float) else None,
        len(p.labels),
        claimed_root,
        root,
        fails,
    )
