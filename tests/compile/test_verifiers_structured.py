"""The json_schema verifier on structured outputs: the grounded check (values that must
occur in the input), the input argument every verifier takes, and no exception for any
text a teacher may send."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.data import SNIPS

from kolm_compile.structured import canonical
from kolm_compile.verifiers import Verdict, get_verifier, verifier_names
from kolm_ledger.errors import SpecError

SCHEMA = {
    "type": "object",
    "required": ["intent"],
    "properties": {
        "intent": {"type": "string", "enum": ["PlayMusic", "GetWeather"]},
        "note": {"type": "string"},
        "slots": {
            "type": "object",
            "properties": {
                "artist": {"type": "array", "items": {"type": "string", "x-kolm-grounded": True}},
                "city": {"type": "string", "x-kolm-grounded": True},
            },
        },
    },
}
INPUT = "play Nina Simone in Paris"


def verifier(grounded: str | None = None) -> object:
    params: dict[str, object] = {"schema": SCHEMA}
    if grounded is not None:
        params["grounded"] = grounded
    return get_verifier("json_schema", params)


def check(out: dict[str, object], grounded: str | None = None, **kw: object) -> Verdict:
    v = verifier(grounded)
    return v.check(json.dumps(out), **kw)  # type: ignore[attr-defined,no-any-return]


def test_grounded_defaults_to_marked_and_is_in_the_digest() -> None:
    v = get_verifier("json_schema", {"schema": SCHEMA})
    assert v.params["grounded"] == "marked" and v.version == "2"
    assert (
        v.spec_digest()
        != get_verifier("json_schema", {"schema": SCHEMA, "grounded": "none"}).spec_digest()
    )
    with pytest.raises(
        SpecError, match=r"^spec\.verifier\.params\.grounded: must be one of none, marked, all"
    ):
        get_verifier("json_schema", {"schema": SCHEMA, "grounded": "some"})


def test_marked_fields_must_occur_in_the_input() -> None:
    good = {"intent": "PlayMusic", "slots": {"artist": ["Nina Simone"], "city": "Paris"}}
    assert check(good, input=INPUT) == Verdict(True, canonical(good), "ok")
    # an invented value in a marked field: named by its pointer and value
    made_up = {"intent": "PlayMusic", "slots": {"artist": ["Nina Simone", "Miles Davis"]}}
    verdict = check(made_up, input=INPUT)
    assert not verdict.ok and verdict.normalized == canonical(made_up)
    assert verdict.reason == "grounded: /slots/artist: 'Miles Davis' does not occur in the input"
    assert not check({"intent": "PlayMusic", "slots": {"city": "paris"}}, input=INPUT).ok
    # a field that is not marked is not checked (the enum, the free note)
    assert check({"intent": "GetWeather", "note": "anything"}, input=INPUT).ok


def test_all_checks_every_string_and_none_checks_nothing() -> None:
    out = {"intent": "PlayMusic", "slots": {"city": "Paris"}}
    verdict = check(out, "all", input=INPUT)
    assert not verdict.ok and verdict.reason.startswith("grounded: /intent: 'PlayMusic'")
    assert check({"intent": "PlayMusic", "note": "play"}, "all", input="PlayMusic: play").ok
    made_up = {"intent": "PlayMusic", "slots": {"city": "Rome"}}
    assert check(made_up, "none", input=INPUT) == Verdict(True, canonical(made_up), "ok")


def test_long_values_are_cut_in_the_reason() -> None:
    verdict = check({"intent": "PlayMusic", "slots": {"city": "x" * 500}}, input=INPUT)
    assert not verdict.ok and len(verdict.reason) < 140 and "…" in verdict.reason


def test_without_an_input_the_grounded_check_is_skipped_and_says_so() -> None:
    made_up = {"intent": "PlayMusic", "slots": {"city": "Rome"}}
    assert check(made_up) == Verdict(True, canonical(made_up), "no input: grounded check skipped")
    # nothing to skip: no marked field and not "all"
    plain = get_verifier("json_schema", {"schema": {"type": "object"}})
    assert plain.check("{}") == Verdict(True, "{}", "ok")


def test_the_schema_comes_before_the_grounded_check() -> None:
    verdict = check({"intent": "Dance", "slots": {"city": "Rome"}}, input=INPUT)
    assert not verdict.ok and verdict.reason.startswith("schema: $.intent")


def test_every_verifier_takes_an_input() -> None:
    params = {
        "label_set": {"labels": ["a", "b"]},
        "json_schema": {"schema": {"type": "object"}},
        "regex": {"pattern": ".+"},
        "bleu": {"threshold": 0.1},
    }
    for name in verifier_names():
        v = get_verifier(name, params.get(name, {}))
        assert v.check("a", input="a") == v.check("a"), name


def test_snips_gold_frames_pass_with_their_input() -> None:
    schema = json.loads((SNIPS / "schema.json").read_text())
    v = get_verifier("json_schema", {"schema": schema})
    rows = [json.loads(line) for line in (SNIPS / "train.jsonl").read_text().splitlines()]
    for row in rows:
        verdict = v.check(json.dumps(row["output"]), input=row["text"])
        assert verdict == Verdict(True, canonical(row["output"]), "ok"), row
    # the same frame against another utterance: its slot values are not in it
    other = next(r for r in rows if r["output"]["slots"])
    assert not v.check(json.dumps(other["output"]), input="hello").ok


@pytest.mark.parametrize(
    ("output", "reason"),
    [
        ("", r"^not valid JSON"),
        ("Sure! Here is the JSON:", r"^not valid JSON"),
        ('{"intent": "PlayMusic"', r"^not valid JSON"),
        ("[" * 100_000, r"^not valid JSON"),
        ('{"a": ' * 5000 + "1" + "}" * 5000, r"^(not valid JSON|schema: )"),
        ("1e400", r"^(not valid JSON|not representable)"),
        ('{"intent": 18446744073709551616}', r"^not representable as canonical JSON"),
        ('"\\ud800"', r"^not representable as canonical JSON"),
        ("null", r"^schema: \$: None is not of type 'object'"),
    ],
)
def test_text_that_is_not_a_schema_object_is_a_failed_check(output: str, reason: str) -> None:
    verdict = verifier().check(output, input=INPUT)  # type: ignore[attr-defined]
    assert not verdict.ok
    assert re.search(reason, verdict.reason), verdict.reason


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60), st.text(max_size=30))
def test_no_text_makes_the_verifier_raise(output: str, input_text: str) -> None:
    v = verifier("all")
    verdict = v.check(output, input=input_text)  # type: ignore[attr-defined]
    assert isinstance(verdict, Verdict)
    if verdict.ok:
        assert verdict.normalized == canonical(json.loads(verdict.normalized))
