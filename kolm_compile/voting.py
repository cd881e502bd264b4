"""k-sample voting: turn k teacher samples into one verified label, or none.

::

    >>> from kolm_compile.verifiers import get_verifier
    >>> from kolm_compile.voting import vote
    >>> v = get_verifier("label_set", {"labels": ["card_arrival", "pin_blocked"]})
    >>> r = vote(["card_arrival", "Card_Arrival", "pin_blocked", "no idea", "card_arrival"], v, k=5, min_agreement=3)
    >>> r.accepted, r.answer, r.votes, r.agreement
    (True, 'card_arrival', {'card_arrival': 3, 'pin_blocked': 1}, 0.6)

The procedure of :func:`vote` (``teacher.vote: exact``, every task):

1. check every sample with the verifier (given the ``input`` it answers, so
   ``json_schema``'s grounded check runs); a failing sample casts no vote (its
   digest and the verifier's reason are kept in ``failures``);
2. count the verifier's *normalized* answers, so outputs that differ only in
   form are one answer;
3. reject when fewer than ``min_agreement`` samples passed ("too few valid
   samples"), when the top answer has fewer than ``min_agreement`` votes ("no
   agreement"), or when two answers share the top count ("tie");
4. otherwise accept the top answer. ``agreement`` = top count / k.

What "the same answer" is, is the verifier's normalized form (step 2), so for each task:

* classify (``label_set``): the label as the label set writes it (case, surrounding
  spaces, quotes and a final full stop ignored by default);
* extract (``json_schema``): the RFC 8785 canonical JSON of the object
  (kolm_compile.structured.canonical): key order, spacing and number spelling never split
  a vote;
* generate — no reference is known while voting, so each verifier checks the form and
  counts: ``exact_match`` the text stripped (``strip``), with whitespace runs collapsed
  (``collapse_whitespace``) and case-folded (``case_sensitive: false``) as configured;
  ``python_ast`` the code re-printed from its AST (``ast.unparse``: formatting, comments
  and quote style do not split a vote; code that does not parse is a failed sample);
  ``regex`` the stripped text that matches; ``bleu`` the text with whitespace collapsed.

:func:`vote_per_field` (``teacher.vote: per_field``, extract only) votes field by field
instead (its docstring numbers the steps): an object is accepted when every field of the
schema has a majority among the samples that pass the verifier, and the object assembled
from those majorities passes it too. It records ``votes`` like :func:`vote` (whole
canonical objects → count, so a receipt shows how the samples split), which may not hold
the answer: the assembled object need not equal any one sample; its ``agreement`` is the
weakest field's majority / k and a rejection names the field (``rejected_field``).

The result does not depend on the order of the samples: digests and failures
are sorted.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kolm_compile.structured import SchemaField, assemble, canonical, pointer_parts, schema_fields
from kolm_compile.verifiers import Verifier

__all__ = [
    "REJECT_ASSEMBLED_INVALID",
    "REJECT_NO_AGREEMENT",
    "REJECT_TIE",
    "REJECT_TOO_FEW_VALID",
    "SampleFailure",
    "VoteResult",
    "VoteSummary",
    "summarize",
    "vote",
    "vote_per_field",
]

REJECT_TOO_FEW_VALID = "too_few_valid"
REJECT_NO_AGREEMENT = "no_agreement"
REJECT_TIE = "tie"
#: per_field: the object assembled from the field majorities fails the verifier
REJECT_ASSEMBLED_INVALID = "assembled_invalid"


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
    ``tie``, ``assembled_invalid`` (per_field); ``rejected_reason`` says it in words with
    the numbers; ``rejected_field``: per_field, the JSON Pointer of the first field without
    a majority (``no_agreement`` or ``tie`` on that field), else ``None``.
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
    rejected_field: str | None = None

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
            **({"rejected_field": self.rejected_field} if self.rejected_field is not None else {}),
        }


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _check_args(samples: Sequence[str], k: int, min_agreement: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if isinstance(min_agreement, bool) or not isinstance(min_agreement, int):
        raise ValueError(f"min_agreement must be an integer, got {min_agreement!r}")
    if not 1 <= min_agreement <= k:
        raise ValueError(f"min_agreement must be in [1, k={k}], got {min_agreement}")
    if len(samples) > k:
        raise ValueError(f"got {len(samples)} samples, more than k={k}")


def _verify(
    samples: Sequence[str], verifier: Verifier, input: str | None
) -> tuple[list[str], list[SampleFailure], list[str]]:
    """(normalized answers of the passing samples, failures, digests of all samples)."""
    passed, failures, digests = [], [], []
    for sample in samples:
        digest = _sha256(sample)
        digests.append(digest)
        verdict = verifier.check(sample, input=input)
        if verdict.ok:
            passed.append(verdict.normalized)
        else:
            failures.append(SampleFailure(digest, verdict.reason))
    return passed, failures, digests


def _ranked(counts: Counter[str]) -> dict[str, int]:
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def vote(
    samples: Sequence[str],
    verifier: Verifier,
    k: int,
    min_agreement: int,
    *,
    input: str | None = None,
) -> VoteResult:
    """Verify ``samples`` and pick the majority answer (see the module docstring).

    ``input``: the text the samples answer, passed to ``verifier.check`` (the grounded
    check of ``json_schema`` needs it). Requires ``1 <= min_agreement <= k`` and
    ``len(samples) <= k`` (a teacher may return fewer samples than asked; missing ones
    count as no vote). Raises ``ValueError`` otherwise.
    """
    _check_args(samples, k, min_agreement)

    # (1) verify each sample; (2) count normalized answers
    passed, failures, digests = _verify(samples, verifier, input)
    counts = Counter(passed)

    votes = _ranked(counts)
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


def _values_at(node: Any, parts: Sequence[str], many: bool) -> tuple[str, ...]:
    """The canonical JSON values a field holds in an object: ``()`` when absent; a
    ``many`` field's list items in order; an array met on the way contributes each
    item's values (as :func:`kolm_compile.structured.field_pairs` reads arrays)."""
    if not parts:
        return (canonical(node),)
    if isinstance(node, list):
        return tuple(v for item in node for v in _values_at(item, parts, many))
    if not isinstance(node, Mapping) or parts[0] not in node:
        return ()
    child = node[parts[0]]
    if len(parts) == 1 and many and isinstance(child, list):
        return tuple(canonical(x) for x in child)
    return _values_at(child, parts[1:], many)


def _field_value(obj: Any, f: SchemaField) -> tuple[str, ...]:
    return _values_at(obj, pointer_parts(f.path), f.many)


def vote_per_field(
    samples: Sequence[str],
    verifier: Verifier,
    schema: Mapping[str, Any],
    k: int,
    min_agreement: int,
    *,
    input: str | None = None,
) -> VoteResult:
    """Vote field by field on JSON objects (``teacher.vote: per_field``).

    1. check every sample with ``verifier`` (given ``input``), as :func:`vote` does;
    2. reject (``too_few_valid``) when fewer than ``min_agreement`` passed;
    3. for each field of ``schema`` (:func:`kolm_compile.structured.schema_fields`, in
       pointer order) take each passing sample's value: the tuple of canonical JSON
       values the field holds (a ``many`` field's items in order), or absent; the top
       value needs ``min_agreement`` samples (else ``no_agreement``) and no other value
       may have as many (else ``tie``); the first field without a majority is named in
       ``rejected_field`` and the reason. Absent is a value like any other: a field
       most samples leave out is left out;
    4. assemble the object from the majorities (:func:`kolm_compile.structured.assemble`)
       and check it with the verifier again (``assembled_invalid`` when it fails);
    5. accept its normalized form (canonical JSON). ``agreement`` = the weakest
       field's majority / k; ``votes`` = whole canonical objects → count, as in
       :func:`vote` (the answer need not be among them).

    Values at places the schema does not name (``additionalProperties``) are not voted
    and do not reach the answer. A schema whose only field is the whole object (no
    ``properties``) has nothing to vote field by field: that is :func:`vote`. Requires
    what :func:`vote` requires (``ValueError`` otherwise).
    """
    _check_args(samples, k, min_agreement)
    fields = schema_fields(schema)
    if any(f.path == "" for f in fields):
        return vote(samples, verifier, k, min_agreement, input=input)

    # (1) verify each sample
    passed, failures, digests = _verify(samples, verifier, input)
    votes = _ranked(Counter(passed))
    objects = [json.loads(text) for text in passed]

    def result(
        answer: str | None, agreement: float, reject: tuple[str, str, str | None] | None
    ) -> VoteResult:
        return VoteResult(
            accepted=reject is None,
            answer=answer if reject is None else None,
            votes=votes,
            agreement=agreement,
            k=k,
            min_agreement=min_agreement,
            sample_digests=tuple(sorted(digests)),
            failures=tuple(sorted(failures)),
            rejected_code=reject[0] if reject else None,
            rejected_reason=reject[1] if reject else None,
            rejected_field=reject[2] if reject else None,
        )

    # (2) enough valid samples
    valid = len(objects)
    if valid < min_agreement:
        why = f"too few valid samples: {valid} of {k} passed the verifier, need {min_agreement}"
        return result(None, 0.0, (REJECT_TOO_FEW_VALID, why, None))

    # (3) a majority per field
    chosen: dict[str, list[Any]] = {}
    weakest = valid
    for f in fields:
        counts = Counter(_field_value(obj, f) for obj in objects)
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        value, top = ranked[0]
        weakest = min(weakest, top)
        if top < min_agreement:
            why = (
                f"no agreement on field {f.path}: its top value has {top} votes, "
                f"need {min_agreement}"
            )
            return result(None, top / k, (REJECT_NO_AGREEMENT, why, f.path))
        if len(ranked) > 1 and ranked[1][1] == top:
            tied = sum(1 for _, n in ranked if n == top)
            why = f"tie on field {f.path}: {tied} values have {top} votes each"
            return result(None, top / k, (REJECT_TIE, why, f.path))
        if value:
            chosen[f.path] = [json.loads(v) for v in value]

    # (4) the assembled object must pass the verifier too
    verdict = verifier.check(canonical(assemble(chosen, fields)), input=input)
    if not verdict.ok:
        why = f"the object assembled from the field majorities fails the verifier: {verdict.reason}"
        return result(None, weakest / k, (REJECT_ASSEMBLED_INVALID, why, None))
    # (5) accept
    return result(verdict.normalized, weakest / k, None)


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
