"""k-sample voting: turn k teacher samples into one verified label, or none.

::

    >>> from kolm_compile.verifiers import get_verifier
    >>> from kolm_compile.voting import vote
    >>> v = get_verifier("label_set", {"labels": ["card_arrival", "pin_blocked"]})
    >>> r = vote(["card_arrival", "Card_Arrival", "pin_blocked", "no idea", "card_arrival"], v, k=5, min_agreement=3)
    >>> r.accepted, r.answer, r.votes, r.agreement
    (True, 'card_arrival', {'card_arrival': 3, 'pin_blocked': 1}, 0.6)

The procedure (numbered as in :func:`vote`):

1. check every sample with the verifier; a failing sample casts no vote (its
   digest and the verifier's reason are kept in ``failures``);
2. count the verifier's *normalized* answers, so outputs that differ only in
   form are one answer;
3. reject when fewer than ``min_agreement`` samples passed ("too few valid
   samples"), when the top answer has fewer than ``min_agreement`` votes ("no
   agreement"), or when two answers share the top count ("tie");
4. otherwise accept the top answer. ``agreement`` = top count / k.

The result does not depend on the order of the samples: digests and failures
are sorted.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kolm_compile.verifiers import Verifier

__all__ = [
    "REJECT_NO_AGREEMENT",
    "REJECT_TIE",
    "REJECT_TOO_FEW_VALID",
    "SampleFailure",
    "VoteResult",
    "VoteSummary",
    "summarize",
    "vote",
]

REJECT_TOO_FEW_VALID = "too_few_valid"
REJECT_NO_AGREEMENT = "no_agreement"
REJECT_TIE = "tie"


@dataclass(frozen=True, order=True)
class SampleFailure:
    """A sample the verifier rejected: its SHA-256 and the verifier's reason."""

    sample_digest: str
    reason: str


@dataclass(frozen=True)
class VoteResult:
    """The outcome of voting over one input's samples.

    ``votes``: normalized answer → count, most votes first (ties by answer).
    ``sample_digests``: hex SHA-256 of every raw sample (UTF-8), sorted.
    ``rejected_code``: ``None`` or one of ``too_few_valid``, ``no_agreement``,
    ``tie``; ``rejected_reason`` says it in words with the numbers.
    """

    accepted: bool
    answer: str | None
    votes: Mapping[str, int]
    agreement: float
    k: int
    min_agreement: int
    sample_digests: tuple[str, ...]
    failures: tuple[SampleFailure, ...] = ()
    rejected_code: str | None = None
    rejected_reason: str | None = None

    @property
    def top_votes(self) -> int:
        """Votes of the most-voted answer (0 when no sample passed)."""
        return max(self.votes.values(), default=0)

    @property
    def valid(self) -> int:
        """Samples that passed the verifier."""
        return sum(self.votes.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (what a label receipt records about the vote)."""
        return {
            "accepted": self.accepted,
            "agreement": self.agreement,
            "answer": self.answer,
            "failures": [
                {"reason": f.reason, "sample_digest": f.sample_digest} for f in self.failures
            ],
            "k": self.k,
            "min_agreement": self.min_agreement,
            "rejected_code": self.rejected_code,
            "rejected_reason": self.rejected_reason,
            "sample_digests": list(self.sample_digests),
            "votes": dict(self.votes),
        }


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def vote(samples: Sequence[str], verifier: Verifier, k: int, min_agreement: int) -> VoteResult:
    """Verify ``samples`` and pick the majority answer (see the module docstring).

    Requires ``1 <= min_agreement <= k`` and ``len(samples) <= k`` (a teacher may
    return fewer samples than asked; missing ones count as no vote). Raises
    ``ValueError`` otherwise.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if isinstance(min_agreement, bool) or not isinstance(min_agreement, int):
        raise ValueError(f"min_agreement must be an integer, got {min_agreement!r}")
    if not 1 <= min_agreement <= k:
        raise ValueError(f"min_agreement must be in [1, k={k}], got {min_agreement}")
    if len(samples) > k:
        raise ValueError(f"got {len(samples)} samples, more than k={k}")

    # (1) verify each sample
    counts: Counter[str] = Counter()
    failures = []
    digests = []
    for sample in samples:
        digest = _sha256(sample)
        digests.append(digest)
        verdict = verifier.check(sample)
        if verdict.ok:
            counts[verdict.normalized] += 1  # (2) count normalized answers
        else:
            failures.append(SampleFailure(digest, verdict.reason))

    votes = dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    ranked = list(votes.items())
    top_answer, top = ranked[0] if ranked else (None, 0)

    # (3) reject
    valid = sum(counts.values())
    reject: tuple[str, str] | None = None
    if valid < min_agreement:
        reject = (
            REJECT_TOO_FEW_VALID,
            f"too few valid samples: {valid} of {k} passed the verifier, need {min_agreement}",
        )
    elif top < min_agreement:
        reject = (
            REJECT_NO_AGREEMENT,
            f"no agreement: top answer has {top} votes, need {min_agreement}",
        )
    elif len(ranked) > 1 and ranked[1][1] == top:
        tied = [answer for answer, n in ranked if n == top]
        reject = (REJECT_TIE, f"tie: {len(tied)} answers have {top} votes each")
    # (4) accept unless rejected
    return VoteResult(
        accepted=reject is None,
        answer=top_answer if reject is None else None,
        votes=votes,
        agreement=top / k,
        k=k,
        min_agreement=min_agreement,
        sample_digests=tuple(sorted(digests)),
        failures=tuple(sorted(failures)),
        rejected_code=reject[0] if reject else None,
        rejected_reason=reject[1] if reject else None,
    )


@dataclass(frozen=True)
class VoteSummary:
    """Totals over many votes.

    ``reasons``: rejected_code → count. ``top_votes``: top-vote count → number
    of inputs (the distribution of agreement). ``sample_failures``: samples the
    verifier rejected.
    """

    n: int
    accepted: int
    reasons: Mapping[str, int] = field(default_factory=dict)
    top_votes: Mapping[int, int] = field(default_factory=dict)
    sample_failures: int = 0
    mean_agreement: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        """accepted / n (0.0 when n is 0)."""
        return self.accepted / self.n if self.n else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (histogram keys as strings)."""
        return {
            "acceptance_rate": self.acceptance_rate,
            "accepted": self.accepted,
            "mean_agreement": self.mean_agreement,
            "n": self.n,
            "reasons": dict(self.reasons),
            "sample_failures": self.sample_failures,
            "top_votes": {str(k): v for k, v in self.top_votes.items()},
        }


def summarize(results: Iterable[VoteResult]) -> VoteSummary:
    """Acceptance rate, rejection reasons and the agreement histogram of ``results``."""
    results = list(results)
    reasons = Counter(r.rejected_code for r in results if r.rejected_code is not None)
    top_votes = Counter(r.top_votes for r in results)
    return VoteSummary(
        n=len(results),
        accepted=sum(r.accepted for r in results),
        reasons=dict(sorted(reasons.items())),
        top_votes=dict(sorted(top_votes.items())),
        sample_failures=sum(len(r.failures) for r in results),
        mean_agreement=sum(r.agreement for r in results) / len(results) if results else 0.0,
    )
