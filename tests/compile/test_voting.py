"""k-sample voting: acceptance rules, reasons, summaries, and its invariants."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kolm_compile.verifiers import get_verifier
from kolm_compile.voting import (
    REJECT_NO_AGREEMENT,
    REJECT_TIE,
    REJECT_TOO_FEW_VALID,
    SampleFailure,
    VoteResult,
    summarize,
    vote,
)

LABELS = ["a", "b", "c"]
LABEL_SET = get_verifier("label_set", {"labels": LABELS})


def test_majority_accepted_with_normalized_answers() -> None:
    r = vote(["a", " A ", "b", "junk", "a."], LABEL_SET, k=5, min_agreement=3)
    assert r.accepted and r.answer == "a"
    assert r.votes == {"a": 3, "b": 1}
    assert list(r.votes) == ["a", "b"]
    assert r.agreement == pytest.approx(0.6)
    assert r.rejected_code is None and r.rejected_reason is None
    assert r.failures == (
        SampleFailure(hashlib.sha256(b"junk").hexdigest(), "'junk' is not one of the 3 labels"),
    )
    assert r.sample_digests == tuple(
        sorted(hashlib.sha256(s.encode()).hexdigest() for s in ["a", " A ", "b", "junk", "a."])
    )
    assert (r.valid, r.top_votes) == (4, 3)


def test_too_few_valid_samples() -> None:
    r = vote(["x", "y", "z", "a", "a"], LABEL_SET, k=5, min_agreement=3)
    assert not r.accepted and r.answer is None
    assert r.rejected_code == REJECT_TOO_FEW_VALID
    assert r.rejected_reason == "too few valid samples: 2 of 5 passed the verifier, need 3"
    assert len(r.failures) == 3


def test_no_agreement() -> None:
    r = vote(["a", "a", "b", "b", "c"], LABEL_SET, k=5, min_agreement=3)
    assert not r.accepted
    assert r.rejected_code == REJECT_NO_AGREEMENT
    assert r.rejected_reason == "no agreement: top answer has 2 votes, need 3"
    assert r.votes == {"a": 2, "b": 2, "c": 1}


def test_tie_at_the_top_is_rejected() -> None:
    r = vote(["a", "a", "b", "b"], LABEL_SET, k=4, min_agreement=2)
    assert not r.accepted
    assert r.rejected_code == REJECT_TIE
    assert r.rejected_reason is not None and r.rejected_reason.startswith("tie")


def test_fewer_samples_than_k_count_as_missing_votes() -> None:
    r = vote(["b", "b", "b"], LABEL_SET, k=5, min_agreement=3)
    assert r.accepted and r.agreement == pytest.approx(0.6)
    assert not vote([], LABEL_SET, k=5, min_agreement=3).accepted


def test_unanimous_json_answers_differing_in_form() -> None:
    v = get_verifier("json_schema", {"schema": {"type": "object"}})
    r = vote(['{"x": 1, "y": 2}', '{"y":2,"x":1}', '```json\n{"x": 1.0, "y": 2}\n```'], v, 3, 2)
    assert r.accepted and r.answer == '{"x":1,"y":2}' and r.agreement == 1.0


@pytest.mark.parametrize(
    ("samples", "k", "min_agreement"),
    [(["a"], 0, 1), (["a"], 1, 0), (["a"], 1, 2), (["a", "a"], 1, 1), (["a"], True, 1)],
)
def test_preconditions(samples: list[str], k: int, min_agreement: int) -> None:
    with pytest.raises(ValueError):
        vote(samples, LABEL_SET, k, min_agreement)


def test_to_dict_is_json_ready() -> None:
    import json

    r = vote(["a", "b", "a"], LABEL_SET, 3, 2)
    d = r.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["answer"] == "a" and d["votes"] == {"a": 2, "b": 1} and d["k"] == 3


def test_summarize() -> None:
    results = [
        vote(["a", "a", "a"], LABEL_SET, 3, 2),
        vote(["a", "a", "b"], LABEL_SET, 3, 2),
        vote(["a", "b", "c"], LABEL_SET, 3, 2),
        vote(["x", "y", "a"], LABEL_SET, 3, 2),
    ]
    s = summarize(results)
    assert (s.n, s.accepted, s.acceptance_rate) == (4, 2, 0.5)
    assert s.reasons == {REJECT_NO_AGREEMENT: 1, REJECT_TOO_FEW_VALID: 1}
    assert s.top_votes == {1: 2, 2: 1, 3: 1}
    assert s.sample_failures == 2
    assert s.mean_agreement == pytest.approx((3 + 2 + 1 + 1) / 12)
    assert s.to_dict()["top_votes"] == {"1": 2, "2": 1, "3": 1}
    empty = summarize([])
    assert (empty.n, empty.acceptance_rate, empty.mean_agreement) == (0, 0.0, 0.0)


# --------------------------------------------------------------------------- properties

RAW = st.sampled_from(["a", "b", "c", " A", "b.", "C ", "junk", "", "a b"])


@st.composite
def ballots(draw: st.DrawFn) -> tuple[list[str], int, int]:
    k = draw(st.integers(1, 9))
    samples = draw(st.lists(RAW, max_size=k))
    min_agreement = draw(st.integers(1, k))
    return samples, k, min_agreement


@settings(max_examples=300, deadline=None)
@given(ballots())
def test_accepted_means_enough_votes_and_a_verified_answer(
    ballot: tuple[list[str], int, int],
) -> None:
    samples, k, min_agreement = ballot
    r = vote(samples, LABEL_SET, k, min_agreement)
    assert r.valid + len(r.failures) == len(samples)
    assert len(r.sample_digests) == len(samples)
    assert r.accepted == (r.rejected_code is None) == (r.answer is not None)
    if r.accepted:
        assert r.answer is not None
        assert r.votes[r.answer] >= min_agreement
        assert all(n < r.votes[r.answer] for a, n in r.votes.items() if a != r.answer)
        verdict = LABEL_SET.check(r.answer)
        assert verdict.ok and verdict.normalized == r.answer
        assert r.agreement == r.votes[r.answer] / k


@settings(max_examples=300, deadline=None)
@given(ballots(), st.randoms(use_true_random=False))
def test_permuting_samples_never_changes_the_result(
    ballot: tuple[list[str], int, int], rnd: object
) -> None:
    samples, k, min_agreement = ballot
    shuffled = list(samples)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    a: VoteResult = vote(samples, LABEL_SET, k, min_agreement)
    b: VoteResult = vote(shuffled, LABEL_SET, k, min_agreement)
    assert a == b
    assert list(a.votes.items()) == list(b.votes.items())
