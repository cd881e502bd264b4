"""K-score, Wilson interval and per-label metrics."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kolm_compile.kscore import (
    Z_95,
    KScore,
    confusion_matrix,
    kscore,
    per_label_metrics,
    wilson_interval,
)
from kolm_ledger.errors import InvalidInput

# Reference values: roots of (c/n - p)^2 = z^2 p (1 - p) / n solved with mpmath at
# 40 digits (independent of the closed form used by the implementation), in percent.
WILSON_VECTORS = [
    (81, 100, 72.22115462, 87.48524849),
    (50, 100, 40.38315304, 59.61684696),
    (1, 10, 1.78762131, 40.41500268),
    (9, 10, 59.58499732, 98.21237869),
    (0, 10, 0.0, 27.75327999),
    (10, 10, 72.24672001, 100.0),
    (0, 1, 0.0, 79.34506856),
    (1, 1, 20.65493144, 100.0),
    (920, 1000, 90.1533561, 93.52519619),
]


@pytest.mark.parametrize(("correct", "n", "low", "high"), WILSON_VECTORS)
def test_wilson_known_values(correct: int, n: int, low: float, high: float) -> None:
    got_low, got_high = wilson_interval(correct, n)
    assert got_low == pytest.approx(low, abs=1e-7)
    assert got_high == pytest.approx(high, abs=1e-7)


def test_wilson_closed_form_81_of_100() -> None:
    # Recompute from the textbook formula independently of the implementation.
    p, n, z = 0.81, 100, Z_95
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert wilson_interval(81, 100) == pytest.approx((100 * (centre - half), 100 * (centre + half)))


def test_wilson_z_quantile() -> None:
    assert Z_95 == 1.959963984540054
    assert 0.5 * math.erfc(-Z_95 / math.sqrt(2)) == pytest.approx(0.975, abs=1e-15)


def test_wilson_edges_are_exact() -> None:
    for n in (1, 2, 7, 100, 10**6):
        assert wilson_interval(0, n)[0] == 0.0
        assert wilson_interval(n, n)[1] == 100.0


def test_wilson_wider_z_wider_interval() -> None:
    lo95, hi95 = wilson_interval(30, 50)
    lo99, hi99 = wilson_interval(30, 50, z=2.5758293035489)
    assert lo99 < lo95 and hi99 > hi95


@pytest.mark.parametrize(
    ("correct", "n", "word"),
    [(0, 0, "n"), (1, 0, "n"), (-1, 5, "correct"), (6, 5, "correct"), (True, 5, "correct")],
)
def test_wilson_rejects(correct: int, n: int, word: str) -> None:
    with pytest.raises(InvalidInput, match=rf"^{word} "):
        wilson_interval(correct, n)


def test_wilson_rejects_bad_z() -> None:
    for z in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(InvalidInput, match=r"^z "):
            wilson_interval(1, 2, z=z)


def test_invalid_input_is_a_value_error_family() -> None:
    with pytest.raises(InvalidInput) as info:
        wilson_interval(0, 0)
    assert info.value.grpc_code == "INVALID_ARGUMENT"


@given(
    st.integers(min_value=1, max_value=10**7).flatmap(
        lambda n: st.tuples(st.integers(0, n), st.just(n))
    )
)
def test_wilson_encloses_point_estimate(cn: tuple[int, int]) -> None:
    correct, n = cn
    low, high = wilson_interval(correct, n)
    score = 100.0 * correct / n
    assert 0.0 <= low <= score <= high <= 100.0


@given(st.lists(st.booleans(), min_size=1, max_size=500))
def test_kscore_properties(outcomes: list[bool]) -> None:
    s = kscore(outcomes)
    assert s.n == len(outcomes)
    assert s.correct == sum(outcomes)
    assert s.score == 100.0 * s.correct / s.n
    assert 0.0 <= s.low <= s.score <= s.high <= 100.0
    assert (s.low, s.high) == wilson_interval(s.correct, s.n)


def test_kscore_values_and_dict() -> None:
    s = kscore([True] * 81 + [False] * 19)
    assert s == KScore(correct=81, n=100, score=81.0, low=s.low, high=s.high)
    assert round(s.low, 1) == 72.2 and round(s.high, 1) == 87.5
    d = s.to_dict()
    assert list(d) == ["correct", "high", "low", "n", "score"]
    assert d["correct"] == 81 and d["n"] == 100


def test_kscore_all_right_all_wrong() -> None:
    assert kscore([True] * 5).score == 100.0 and kscore([True] * 5).high == 100.0
    assert kscore([False] * 5).score == 0.0 and kscore([False] * 5).low == 0.0


def test_kscore_rejects() -> None:
    with pytest.raises(InvalidInput, match=r"^n is 0"):
        kscore([])
    with pytest.raises(InvalidInput, match=r"outcomes\[1\]"):
        kscore([True, 1])  # type: ignore[list-item]


def test_per_label_metrics() -> None:
    golds = ["a", "a", "a", "b", "b", "c"]
    preds = ["a", "a", "b", "b", "c", "c"]
    m = per_label_metrics(golds, preds)
    assert list(m) == ["a", "b", "c"]
    assert m["a"] == {"f1": pytest.approx(0.8), "precision": 1.0, "recall": 2 / 3, "support": 3}
    assert m["b"]["precision"] == 0.5 and m["b"]["recall"] == 0.5 and m["b"]["f1"] == 0.5
    assert m["c"]["precision"] == 0.5 and m["c"]["recall"] == 1.0 and m["c"]["support"] == 1


def test_per_label_metrics_zero_division() -> None:
    m = per_label_metrics(["a", "a"], ["b", "b"])
    assert m["a"] == {"f1": 0.0, "precision": 0.0, "recall": 0.0, "support": 2}
    assert m["b"] == {"f1": 0.0, "precision": 0.0, "recall": 0.0, "support": 0}
    assert per_label_metrics([], []) == {}


@given(
    st.lists(st.tuples(st.sampled_from("abcd"), st.sampled_from("abcd")), min_size=1, max_size=100)
)
def test_metrics_agree_with_confusion_matrix(pairs: list[tuple[str, str]]) -> None:
    golds = [g for g, _ in pairs]
    preds = [p for _, p in pairs]
    labels = list("abcd")
    cm = confusion_matrix(golds, preds, labels)
    assert sum(map(sum, cm)) == len(pairs)
    m = per_label_metrics(golds, preds)
    for i, y in enumerate(labels):
        if y not in m:
            assert sum(cm[i]) == 0 and sum(row[i] for row in cm) == 0
            continue
        assert m[y]["support"] == sum(cm[i])
        col = sum(row[i] for row in cm)
        assert m[y]["precision"] == (cm[i][i] / col if col else 0.0)
        assert 0.0 <= m[y]["f1"] <= 1.0
    # accuracy from the diagonal equals the K-score of exact matches
    diag = sum(cm[i][i] for i in range(len(labels)))
    assert kscore([g == p for g, p in pairs]).correct == diag


def test_confusion_matrix_layout() -> None:
    cm = confusion_matrix(["x", "x", "y"], ["x", "y", "y"], ["y", "x"])
    assert cm == [[1, 0], [1, 1]]


def test_confusion_matrix_rejects() -> None:
    with pytest.raises(InvalidInput, match="golds has 2 items, preds has 1"):
        confusion_matrix(["a", "b"], ["a"], ["a", "b"])
    with pytest.raises(InvalidInput, match=r"preds\[0\] is 'z'"):
        confusion_matrix(["a"], ["z"], ["a", "b"])
    with pytest.raises(InvalidInput, match="duplicates"):
        confusion_matrix(["a"], ["a"], ["a", "a"])
