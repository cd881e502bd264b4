"""Votes on structured outputs: exact votes on canonical objects with the input passed to
the verifier, per-field votes (majority per schema field, assembled, verified again), and
generate votes on the verifier's normalized text."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kolm_compile.structured import canonical
from kolm_compile.verifiers import get_verifier
from kolm_compile.voting import (
    REJECT_ASSEMBLED_INVALID,
    REJECT_NO_AGREEMENT,
    REJECT_TIE,
    REJECT_TOO_FEW_VALID,
    summarize,
    vote,
    vote_per_field,
)

SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["intent", "slots"],
    "additionalProperties": False,
    "properties": {
        "intent": {"type": "string", "enum": ["PlayMusic", "GetWeather"]},
        "slots": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "artist": {
                    "type": "array",
                    "minItems": 1,
                    "items": {"type": "string", "x-kolm-grounded": True},
                },
                "city": {
                    "type": "array",
                    "minItems": 1,
                    "items": {"type": "string", "x-kolm-grounded": True},
                },
            },
        },
    },
}
V = get_verifier("json_schema", {"schema": SCHEMA})
INPUT = "play Nina Simone in Paris"


def frame(intent: str = "PlayMusic", **slots: list[str]) -> str:
    return json.dumps({"slots": slots, "intent": intent})


GOLD = frame(artist=["Nina Simone"], city=["Paris"])


# --------------------------------------------------------------------------- exact


def test_exact_vote_counts_canonical_objects_and_checks_the_input() -> None:
    spaced = '{ "intent": "PlayMusic", "slots": {"city": ["Paris"], "artist": ["Nina Simone"]} }'
    made_up = frame(artist=["Nina Simone"], city=["Rome"])
    samples = [GOLD, spaced, made_up, made_up, made_up]
    r = vote(samples, V, 5, 2, input=INPUT)
    gold = canonical(json.loads(GOLD))
    assert r.accepted and r.answer == gold and r.votes == {gold: 2}
    assert [f.reason for f in r.failures] == [
        "grounded: /slots/city: 'Rome' does not occur in the input"
    ] * 3
    # without the input the invented city is not caught: it wins the vote
    blind = vote(samples, V, 5, 2)
    assert blind.accepted and blind.answer == canonical(json.loads(made_up))


def test_a_sample_that_is_not_json_is_a_failed_sample() -> None:
    r = vote(["Sure, here it is", GOLD, "{", GOLD, GOLD], V, 5, 3, input=INPUT)
    assert r.accepted and len(r.failures) == 2
    assert all(f.reason.startswith("not valid JSON") for f in r.failures)


# --------------------------------------------------------------------------- per field


def test_per_field_accepts_what_no_exact_vote_would() -> None:
    """Five samples, each wrong somewhere else: no two agree on the whole object, but
    every field has a majority."""
    samples = [
        frame(artist=["Nina Simone"], city=["Paris"]),
        frame("GetWeather", artist=["Nina Simone"], city=["Paris"]),
        frame(artist=["Nina"], city=["Paris"]),
        frame(artist=["Nina Simone"]),
        frame(artist=["Simone"], city=["Paris"]),
    ]
    assert not vote(samples, V, 5, 3, input=INPUT).accepted
    r = vote_per_field(samples, V, SCHEMA, 5, 3, input=INPUT)
    assert r.accepted and r.answer == canonical(json.loads(GOLD))
    assert r.agreement == pytest.approx(3 / 5)  # /slots/artist: 3 of 5
    assert sum(r.votes.values()) == 5 and max(r.votes.values()) == 1  # whole objects


def test_per_field_absent_is_a_value() -> None:
    samples = [frame(artist=["Nina Simone"])] * 3 + [GOLD] * 2
    r = vote_per_field(samples, V, SCHEMA, 5, 3, input=INPUT)
    assert r.accepted and json.loads(r.answer or "") == {
        "intent": "PlayMusic",
        "slots": {"artist": ["Nina Simone"]},
    }


def test_per_field_names_the_first_field_without_a_majority() -> None:
    samples = [
        frame(artist=["Nina Simone"], city=["Paris"]),
        frame(artist=["Nina"], city=["Paris"]),
        frame(artist=["Simone"], city=["Paris"]),
        frame(artist=["Nina Simone"], city=["Paris"]),
        frame("GetWeather", artist=["Nina"], city=["Paris"]),
    ]
    r = vote_per_field(samples, V, SCHEMA, 5, 3, input=INPUT)
    assert not r.accepted and r.answer is None
    assert (r.rejected_code, r.rejected_field) == (REJECT_NO_AGREEMENT, "/slots/artist")
    assert r.rejected_reason == (
        "no agreement on field /slots/artist: its top value has 2 votes, need 3"
    )
    assert r.to_dict()["rejected_field"] == "/slots/artist"
    assert "rejected_field" not in vote([GOLD] * 3, V, 3, 2).to_dict()


def test_per_field_tie() -> None:
    samples = [GOLD, GOLD, frame("GetWeather", artist=["Nina Simone"], city=["Paris"])] * 1
    samples += [frame("GetWeather", artist=["Nina Simone"], city=["Paris"])]
    r = vote_per_field(samples, V, SCHEMA, 4, 2, input=INPUT)
    assert (r.rejected_code, r.rejected_field) == (REJECT_TIE, "/intent")
    assert r.rejected_reason == "tie on field /intent: 2 values have 2 votes each"


def test_per_field_counts_only_samples_that_pass_the_verifier() -> None:
    samples = [GOLD, GOLD, frame(city=["Rome"]), "{", frame("Dance")]
    r = vote_per_field(samples, V, SCHEMA, 5, 3, input=INPUT)
    assert (r.rejected_code, r.rejected_field) == (REJECT_TOO_FEW_VALID, None)
    assert r.rejected_reason == "too few valid samples: 2 of 5 passed the verifier, need 3"
    assert len(r.failures) == 3


def test_per_field_verifies_the_assembled_object() -> None:
    """Every sample passes and every field has its majority, but the object built from
    the majorities is one the schema refuses: a, b and c never all three together."""
    schema = {
        "type": "object",
        "properties": {name: {"type": "string", "enum": ["x"]} for name in "abc"},
        "not": {"required": ["a", "b", "c"]},
    }
    v = get_verifier("json_schema", {"schema": schema})
    samples = ['{"a": "x", "b": "x"}', '{"b": "x", "c": "x"}', '{"a": "x", "c": "x"}']
    assert all(v.check(x).ok for x in samples)
    r = vote_per_field(samples, v, schema, 3, 2)
    assert not r.accepted and r.answer is None
    assert (r.rejected_code, r.rejected_field) == (REJECT_ASSEMBLED_INVALID, None)
    assert r.rejected_reason is not None and r.rejected_reason.startswith(
        "the object assembled from the field majorities fails the verifier: schema: "
    )
    assert r.agreement == pytest.approx(2 / 3)


def test_per_field_without_properties_is_the_exact_vote() -> None:
    v = get_verifier("json_schema", {"schema": {"type": "object"}})
    samples = ['{"a": 1}', '{"a":1}', '{"b": 2}']
    assert vote_per_field(samples, v, {"type": "object"}, 3, 2) == vote(samples, v, 3, 2)


def test_per_field_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="min_agreement must be in"):
        vote_per_field([GOLD], V, SCHEMA, 3, 4)
    with pytest.raises(ValueError, match="more than k=1"):
        vote_per_field([GOLD, GOLD], V, SCHEMA, 1, 1)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [
                GOLD,
                frame(artist=["Nina Simone"]),
                frame("GetWeather", city=["Paris"]),
                frame(artist=["Nina"], city=["Paris"]),
                frame(city=["Rome"]),
                "not json",
            ]
        ),
        max_size=5,
    ),
    st.integers(1, 5),
    st.randoms(use_true_random=False),
)
def test_per_field_invariants(samples: list[str], need: int, rng: Any) -> None:
    """Order does not matter; an accepted answer passes the verifier and every field of
    it is the value most samples gave; an exact-vote winner is the per-field winner."""
    need = min(need, 5)
    r = vote_per_field(samples, V, SCHEMA, 5, need, input=INPUT)
    shuffled = list(samples)
    rng.shuffle(shuffled)
    assert vote_per_field(shuffled, V, SCHEMA, 5, need, input=INPUT) == r
    if r.accepted:
        assert r.answer is not None and V.check(r.answer, input=INPUT).ok
        assert r.agreement >= need / 5
    exact = vote(samples, V, 5, need, input=INPUT)
    if exact.accepted and need * 2 > len(samples):
        assert r.accepted and r.answer == exact.answer


# --------------------------------------------------------------------------- generate


@pytest.mark.parametrize(
    ("verifier", "samples", "answer"),
    [
        (
            get_verifier("exact_match", {"collapse_whitespace": True}),
            ["the  cat sat", " the cat\nsat ", "the cat   sat", "the cat sat."],
            "the cat sat",
        ),
        (
            get_verifier("python_ast", {}),
            ["x = (1 + 2)", "x=1+2  # three", "x = 1 + 2\n", "x = 3"],
            "x = 1 + 2",
        ),
        (
            get_verifier("bleu", {"threshold": 0.5}),
            ["hello   world", "hello world", "hello\tworld", ""],
            "hello world",
        ),
    ],
)
def test_generate_votes_count_the_normalized_text(
    verifier: Any, samples: list[str], answer: str
) -> None:
    r = vote(samples, verifier, 4, 3)
    assert r.accepted and r.answer == answer and r.votes[answer] == 3


def test_summary_counts_per_field_rejections() -> None:
    ok = vote_per_field([GOLD] * 3, V, SCHEMA, 3, 2, input=INPUT)
    split = vote_per_field(
        [GOLD, frame(artist=["Nina"], city=["Paris"]), frame(artist=["Simone"], city=["Paris"])],
        V,
        SCHEMA,
        3,
        2,
        input=INPUT,
    )
    s = summarize([ok, split])
    assert (s.accepted, s.reasons) == (1, {REJECT_NO_AGREEMENT: 1})
