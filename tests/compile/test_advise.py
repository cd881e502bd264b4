"""``kolm advise``: the decision guide over every combination of answers, and the CLI."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from dataclasses import fields

import pytest

from kolm_compile.advise import (
    DISTILL,
    DISTILL_ESCAPE,
    DISTILL_RECALL,
    FINETUNE,
    FRONTIER,
    RAG,
    RAG_FINETUNE,
    TECHNIQUES,
    Answers,
    Figures,
    advise,
    payback_months,
)
from kolm_ledger.errors import InvalidInput

VOLUMES = (1, 500, 5_000, 50_000, 1_000_000)
BOOLS = (False, True)
COMBOS = [
    Answers(data_changes=dc, structured=st, calls_per_month=n, data_local=dl, verifier=v)
    for dc, st, dl, v in itertools.product(BOOLS, repeat=4)
    for n in VOLUMES
]
RETRIEVAL = {RAG, RAG_FINETUNE, DISTILL_RECALL}
DISTILLATION = {DISTILL, DISTILL_RECALL, DISTILL_ESCAPE}
LOCAL = {FINETUNE, RAG_FINETUNE, DISTILL, DISTILL_RECALL}


def _id(a: Answers) -> str:
    yn = {True: "y", False: "n"}
    return (
        f"chg{yn[a.data_changes]}-str{yn[a.structured]}-loc{yn[a.data_local]}"
        f"-ver{yn[a.verifier]}-{a.calls_per_month}"
    )


@pytest.mark.parametrize("answers", COMBOS, ids=_id)
def test_invariants_over_every_combination(answers: Answers) -> None:
    f = Figures()
    adv = advise(answers, f)
    t = adv.technique
    assert t in TECHNIQUES
    assert adv.reasons and all(isinstance(r, str) and r for r in adv.reasons)
    # data changes ⇒ retrieval (recall or RAG); never retrieval when nothing changes
    assert (t in RETRIEVAL) == answers.data_changes, (t, adv.reasons)
    # distillation needs a verifier to vote labels and measure the K-score
    if not answers.verifier:
        assert t not in DISTILLATION
    # data must stay local ⇒ nothing leaves at call time
    if answers.data_local:
        assert t in LOCAL, t
        assert adv.row(t).data_leaves in ("no", "compile only")
    # structured + verifier + high volume ⇒ distillation
    if answers.structured and answers.verifier and answers.calls_per_month >= f.high_volume:
        assert t in DISTILLATION
        if not answers.data_changes:
            assert t == (DISTILL if answers.data_local else DISTILL_ESCAPE)
    # structured + verifier + changing data ⇒ distillation + recall at any volume
    if answers.structured and answers.verifier and answers.data_changes:
        assert t == DISTILL_RECALL
    # the frontier API only when the data may leave and nothing changes
    if t == FRONTIER:
        assert not answers.data_local and not answers.data_changes
    # every driving answer is cited by its question number
    assert any(r.startswith("(") for r in adv.reasons)
    # the matrix: every technique once, payback as defined
    assert [r.technique for r in adv.matrix] == list(TECHNIQUES)
    for row in adv.matrix:
        n = answers.calls_per_month
        assert row.monthly_cost == pytest.approx(row.cost_per_call * n)
        if row.setup_cost == 0:
            assert row.payback_months == 0
        elif row.cost_per_call >= f.frontier_cost_per_call:
            assert math.isinf(row.payback_months)
        else:
            want = row.setup_cost / (f.frontier_cost_per_call - row.cost_per_call) / n
            assert row.payback_months == pytest.approx(want)
    # JSON has no Infinity (null instead) and round-trips
    text = json.dumps(adv.to_json(), allow_nan=False)
    assert json.loads(text)["technique"] == t


def test_volume_is_monotone_toward_a_setup() -> None:
    """Once a setup is recommended at some volume, a higher volume never falls back to prompting."""
    for dc, st, dl, v in itertools.product(BOOLS, repeat=4):
        seen_setup = False
        for n in (1, 10, 100, 1_000, 3_000, 10_000, 50_000, 100_000, 10**7):
            t = advise(Answers(dc, st, n, dl, v), Figures()).technique
            if t != FRONTIER:
                seen_setup = True
            else:
                assert not seen_setup, (dc, st, dl, v, n)


def test_payback_formula() -> None:
    assert payback_months(300, 0.0002, 0.01, 1000) == pytest.approx(300 / 0.0098 / 1000)
    assert math.isinf(payback_months(2000, 0.012, 0.01, 10**6))
    assert math.isinf(payback_months(2000, 0.01, 0.01, 10**6))
    assert payback_months(0, 0.5, 0.01, 10) == 0
    with pytest.raises(InvalidInput, match="calls is 0"):
        payback_months(1, 0, 1, 0)


def test_overridden_figures_change_the_outcome() -> None:
    a = Answers(
        data_changes=False, structured=True, calls_per_month=5_000, data_local=False, verifier=True
    )
    assert advise(a, Figures()).technique == DISTILL_ESCAPE
    # a compile that costs a fortune no longer pays back: prompt the frontier API
    assert advise(a, Figures(distill_setup_cost=1e7)).technique == FRONTIER
    # a free frontier API: nothing is cheaper per call
    adv = advise(a, Figures(frontier_cost_per_call=0.0))
    assert all(math.isinf(r.payback_months) or r.setup_cost == 0 for r in adv.matrix)


@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        ({"frontier_cost_per_call": -1}, "frontier_cost_per_call is -1, want >= 0"),
        ({"escape_rate": 2}, "escape_rate is 2"),
        ({"rag_latency_ms": math.nan}, "rag_latency_ms is nan, want a finite number"),
    ],
)
def test_bad_figures(kw: dict[str, float], msg: str) -> None:
    with pytest.raises(InvalidInput, match=msg):
        Figures(**kw)


def test_bad_answers() -> None:
    with pytest.raises(InvalidInput, match="calls per month is 0"):
        Answers(False, False, 0, False, False)


# ---- CLI --------------------------------------------------------------------------------

FLAGS = [
    "--data-changes",
    "no",
    "--structured",
    "yes",
    "--calls-per-month",
    "200,000",
    "--data-local",
    "yes",
    "--verifier",
    "yes",
]


def _kolm(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "160"}
    return subprocess.run(
        [sys.executable, "-m", "kolm", "advise", *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env=env,
        timeout=60,
    )


def test_cli_json_and_overrides() -> None:
    r = _kolm(*FLAGS, "--json", "--distill-setup-cost", "1000", "--frontier-latency-ms", "900")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["technique"] == DISTILL
    assert out["answers"] == {
        "calls_per_month": 200_000,
        "data_changes": False,
        "data_local": True,
        "structured": True,
        "verifier": True,
    }
    assert out["figures"]["distill_setup_cost"] == 1000
    assert out["figures"]["frontier_latency_ms"] == 900
    rows = {r["technique"]: r for r in out["matrix"]}
    assert rows[DISTILL]["setup_cost"] == 1000
    assert rows[DISTILL]["payback_months"] == pytest.approx(1000 / (0.01 - 0.0002) / 200_000)
    assert rows[RAG]["payback_months"] is None  # never: RAG costs more per call
    assert "illustrative" in out["figures_note"]


def test_cli_every_figure_has_a_flag() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "kolm", "advise", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert r.returncode == 0
    for f in fields(Figures):
        assert Figures.flag(f.name) in r.stdout, f.name


def test_cli_human_output() -> None:
    r = _kolm(*FLAGS)
    assert r.returncode == 0, r.stderr
    assert "Recommended: distillation" in r.stdout
    assert "(4) the data must stay local" in r.stdout
    assert "payback vs" in r.stdout and "illustrative" in r.stdout


def test_cli_missing_answer_with_no_input_names_the_flag() -> None:
    r = _kolm(*FLAGS[:-2], "--no-input")
    assert r.returncode == 2
    assert "--verifier" in r.stderr and "--no-input" in r.stderr


def test_cli_missing_answer_without_a_terminal() -> None:
    r = _kolm("--structured", "yes")
    assert r.returncode == 2
    assert "--data-changes" in r.stderr and "not a terminal" in r.stderr


def test_cli_rejects_bad_values() -> None:
    r = _kolm(*FLAGS[:-1], "maybe")
    assert r.returncode == 2 and "want yes or no" in r.stderr
    r = _kolm("--calls-per-month", "0", *FLAGS[:4], *FLAGS[6:])
    assert r.returncode == 2 and "at least 1" in r.stderr
