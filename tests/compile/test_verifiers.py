"""Verifiers: registry, each verifier's verdicts, params errors, digests."""

from __future__ import annotations

import hashlib
import json

import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from kolm_compile.verifiers import (
    BaseVerifier,
    Verdict,
    Verifier,
    get_verifier,
    register_verifier,
    sentence_bleu,
    verifier_names,
)
from kolm_ledger.errors import SpecError

LABELS = ["card_arrival", "pin_blocked", "exchange_rate"]
SCHEMA = {
    "type": "object",
    "properties": {"amount": {"type": "number"}, "currency": {"enum": ["EUR", "USD"]}},
    "required": ["amount", "currency"],
    "additionalProperties": False,
}


def test_registry_lists_every_builtin_verifier() -> None:
    assert verifier_names() == sorted(
        ["bleu", "exact_match", "json_schema", "label_set", "python_ast", "regex"]
    )


def test_unknown_verifier_names_the_field() -> None:
    with pytest.raises(SpecError, match=r"^spec\.verifier\.name: unknown verifier 'nope'"):
        get_verifier("nope", {})


def test_registering_a_name_twice_fails() -> None:
    with pytest.raises(ValueError, match="already registered"):

        @register_verifier("regex", "9")
        class Again(BaseVerifier):
            pass


def test_every_verifier_satisfies_the_protocol() -> None:
    params = {
        "label_set": {"labels": LABELS},
        "json_schema": {"schema": SCHEMA},
        "regex": {"pattern": "x"},
        "bleu": {"threshold": 0.5},
    }
    for name in verifier_names():
        v = get_verifier(name, params.get(name, {}))
        assert isinstance(v, Verifier)
        # json_schema 2: the grounded check (kolm_compile.verifiers docstring)
        assert v.name == name and v.version == ("2" if name == "json_schema" else "1")
        described = v.describe()
        assert described["spec_digest"] == v.spec_digest()
        assert set(described) == {"name", "params", "spec_digest", "version"}


@pytest.mark.parametrize(
    ("name", "params", "field"),
    [
        ("label_set", {}, "labels"),
        ("label_set", {"labels": []}, "labels"),
        ("label_set", {"labels": "a,b"}, "labels"),
        ("label_set", {"labels": ["a", "a"]}, "labels"),
        ("label_set", {"labels": ["a", 3]}, r"labels\[1\]"),
        ("label_set", {"labels": ["Card", "card"]}, r"labels\[1\]"),
        ("label_set", {"labels": ["a"], "case_sensitive": "no"}, "case_sensitive"),
        ("label_set", {"labels": ["a"], "colour": 1}, "colour"),
        ("json_schema", {}, "schema"),
        ("json_schema", {"schema": {"type": "banana"}}, "schema"),
        ("json_schema", {"schema": []}, "schema"),
        ("regex", {"pattern": "("}, "pattern"),
        ("regex", {"pattern": 5}, "pattern"),
        ("python_ast", {"mode": "single"}, "mode"),
        ("bleu", {}, "threshold"),
        ("bleu", {"threshold": 1.5}, "threshold"),
        ("bleu", {"threshold": True}, "threshold"),
        ("bleu", {"threshold": 0.5, "max_n": 0}, "max_n"),
        ("exact_match", {"strip": 1}, "strip"),
    ],
)
def test_bad_params_name_the_field(name: str, params: dict, field: str) -> None:
    with pytest.raises(SpecError, match=rf"^spec\.verifier\.params\.{field}: "):
        get_verifier(name, params)


def test_params_must_be_a_mapping() -> None:
    with pytest.raises(SpecError, match=r"^spec\.verifier\.params: must be a mapping"):
        get_verifier("regex", ["x"])  # type: ignore[arg-type]


def test_spec_digest_is_sha256_of_canonical_name_version_params() -> None:
    v = get_verifier("label_set", {"labels": LABELS})
    body = {
        "name": "label_set",
        "version": "1",
        "params": {"case_sensitive": False, "labels": LABELS, "strip": True},
    }
    assert v.spec_digest() == hashlib.sha256(rfc8785.dumps(body)).hexdigest()
    # defaults spelled out give the same digest; another value gives another
    same = get_verifier("label_set", {"labels": LABELS, "strip": True, "case_sensitive": False})
    assert same.spec_digest() == v.spec_digest()
    other = get_verifier("label_set", {"labels": LABELS, "case_sensitive": True})
    assert other.spec_digest() != v.spec_digest()


def test_params_are_a_copy() -> None:
    v = get_verifier("label_set", {"labels": LABELS})
    v.params["labels"].append("x")
    assert v.params["labels"] == LABELS


# --------------------------------------------------------------------------- label_set


@pytest.mark.parametrize(
    ("output", "ok", "normalized"),
    [
        ("card_arrival", True, "card_arrival"),
        ("  Card_Arrival. ", True, "card_arrival"),
        ('"pin_blocked"', True, "pin_blocked"),
        ("`exchange_rate`\n", True, "exchange_rate"),
        ("card arrival", False, "card arrival"),
        ("card_arrival, pin_blocked", False, "card_arrival, pin_blocked"),
        ("", False, ""),
    ],
)
def test_label_set(output: str, ok: bool, normalized: str) -> None:
    verdict = get_verifier("label_set", {"labels": LABELS}).check(output)
    assert (verdict.ok, verdict.normalized) == (ok, normalized)
    assert (verdict.reason == "ok") == ok


def test_label_set_case_sensitive_and_no_strip() -> None:
    strict = get_verifier("label_set", {"labels": LABELS, "case_sensitive": True, "strip": False})
    assert strict.check("card_arrival").ok
    assert not strict.check("Card_arrival").ok
    assert not strict.check(" card_arrival").ok


def test_label_set_rejects_non_text() -> None:
    with pytest.raises(TypeError):
        get_verifier("label_set", {"labels": LABELS}).check(None)  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=30))
def test_label_set_normalized_is_a_fixed_point(output: str) -> None:
    v = get_verifier("label_set", {"labels": LABELS})
    verdict = v.check(output)
    if verdict.ok:
        assert verdict.normalized in LABELS
        assert v.check(verdict.normalized) == verdict


# --------------------------------------------------------------------------- json_schema


def test_json_schema_accepts_and_canonicalizes() -> None:
    v = get_verifier("json_schema", {"schema": SCHEMA})
    a = v.check('{"currency": "EUR", "amount": 12.50}')
    b = v.check('```json\n{ "amount": 12.5,\n  "currency": "EUR" }\n```')
    assert a == b == Verdict(True, '{"amount":12.5,"currency":"EUR"}', "ok")


@pytest.mark.parametrize(
    ("output", "reason"),
    [
        (
            '{"amount": "12", "currency": "EUR"}',
            r"schema: \$\.amount: '12' is not of type 'number'",
        ),
        ('{"amount": 1}', "schema: .*'currency' is a required property"),
        ('{"amount": 1, "currency": "GBP"}', r"schema: \$\.currency"),
        ('{"amount": 1, "amount": 2, "currency": "EUR"}', "duplicate key 'amount'"),
        ('{"amount": NaN, "currency": "EUR"}', "NaN is not valid JSON"),
        ("amount: 1", "not valid JSON"),
        ("", "not valid JSON"),
    ],
)
def test_json_schema_rejects(output: str, reason: str) -> None:
    verdict = get_verifier("json_schema", {"schema": SCHEMA}).check(output)
    assert not verdict.ok
    assert __import__("re").search(reason, verdict.reason), verdict.reason


def test_json_schema_fences_can_be_kept() -> None:
    v = get_verifier("json_schema", {"schema": SCHEMA, "strip_code_fences": False})
    assert not v.check('```json\n{"amount": 1, "currency": "EUR"}\n```').ok


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53) + 1, 2**53 - 1) | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_json_schema_normalized_is_canonical_and_a_fixed_point(value: object) -> None:
    v = get_verifier("json_schema", {"schema": {}})
    verdict = v.check(json.dumps(value, indent=1))
    assert verdict.ok
    assert verdict.normalized == rfc8785.dumps(value).decode()
    assert v.check(verdict.normalized) == verdict


# --------------------------------------------------------------------------- regex, exact_match


def test_regex_full_match() -> None:
    v = get_verifier("regex", {"pattern": r"[A-Z]{2}\d{4}"})
    assert v.check(" AB1234\n") == Verdict(True, "AB1234", "ok")
    assert not v.check("AB12345").ok
    assert not v.check("xAB1234").ok
    assert not get_verifier("regex", {"pattern": "ab", "strip": False}).check(" ab").ok
    assert get_verifier("regex", {"pattern": "ab", "ignore_case": True}).check("AB").ok


def test_exact_match() -> None:
    v = get_verifier("exact_match", {})
    assert v.check(" Paris ", reference="Paris") == Verdict(True, "Paris", "ok")
    assert not v.check("paris", reference="Paris").ok
    loose = get_verifier("exact_match", {"case_sensitive": False, "collapse_whitespace": True})
    assert loose.check("New   york\n", reference="new York").ok


def test_reference_verifiers_without_reference_check_form_only() -> None:
    assert get_verifier("exact_match", {}).check(" x ") == Verdict(
        True, "x", "no reference: form only"
    )
    assert (
        get_verifier("bleu", {"threshold": 0.9}).check("a  b").reason == "no reference: form only"
    )
    assert not get_verifier("bleu", {"threshold": 0.9}).check("   ").ok
    assert get_verifier("python_ast", {}).check("x=1").normalized == "x = 1"


# --------------------------------------------------------------------------- python_ast


def test_python_ast_equivalence_ignores_formatting() -> None:
    v = get_verifier("python_ast", {})
    reference = "def f(a, b):\n    return a + b\n"
    candidate = "def f(a,b):  # add\n    return (a + b)"
    verdict = v.check(candidate, reference=reference)
    assert verdict == Verdict(True, "def f(a, b):\n    return a + b", "ok")
    assert v.check("```python\ndef f(a, b): return a+b\n```", reference=reference).ok
    assert v.check("x = 'a'", reference='x = "a"').ok


def test_python_ast_detects_differences() -> None:
    v = get_verifier("python_ast", {})
    assert v.check("x = a - b", reference="x = a + b").reason == "AST differs from the reference"
    bad = v.check("def f(:\n", reference="x = 1")
    assert not bad.ok and bad.reason.startswith("not valid Python: line 1")
    assert v.check("x = 1", reference="def (").reason == "reference is not valid Python"
    assert not v.check("a\x00b").ok


def test_python_ast_eval_mode() -> None:
    v = get_verifier("python_ast", {"mode": "eval"})
    assert v.check("(1 +2)", reference="1+2").ok
    assert not v.check("x = 1").ok


# --------------------------------------------------------------------------- bleu


def test_sentence_bleu_known_value() -> None:
    # p1 = 3/4; p2 = (2+1)/(3+1); p3 = (1+1)/(2+1); p4 = (0+1)/(1+1); BP = 1
    expected = (3 / 4 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25
    assert sentence_bleu(["a", "b", "c", "d"], ["a", "b", "c", "e"]) == pytest.approx(expected)
    assert expected == pytest.approx(0.658037, abs=1e-6)


def test_sentence_bleu_edges() -> None:
    ref = ["the", "cat", "sat", "on", "the", "mat"]
    assert sentence_bleu(ref, ref) == pytest.approx(1.0)
    assert sentence_bleu(ref, []) == 0.0
    assert sentence_bleu(ref, ["dog"]) == 0.0
    # brevity penalty: a correct but short hypothesis loses
    short = sentence_bleu(ref, ["the", "cat", "sat"])
    assert 0 < short < sentence_bleu(ref, ["the", "cat", "sat", "on", "the"]) < 1
    # clipping: repeating a reference word does not earn more than it occurs
    assert sentence_bleu(ref, ["the"] * 6) < 0.5
    with pytest.raises(ValueError):
        sentence_bleu(ref, ref, max_n=0)


def test_bleu_verifier_threshold_and_reason() -> None:
    v = get_verifier("bleu", {"threshold": 0.6})
    ok = v.check("a b c e", reference="a b c d")
    assert ok.ok and ok.reason == "BLEU-4 0.6580 >= 0.6000"
    low = get_verifier("bleu", {"threshold": 0.7}).check("a b c e", reference="a b c d")
    assert not low.ok and low.reason == "BLEU-4 0.6580 < 0.7000"
    assert (
        get_verifier("bleu", {"threshold": 1.0, "lowercase": True}).check("A B", reference="a b").ok
    )
    assert (
        get_verifier("bleu", {"threshold": 0.99}).check("Hi, there!", reference="Hi , there !").ok
    )
