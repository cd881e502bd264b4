"""``kolm advise``: which technique fits a task — prompting, RAG, fine-tuning, distillation.

Five questions decide it:

1. does the right answer change with the data (new records, prices, policies)?
2. is the task structured (classification or extraction) rather than free generation?
3. how many calls a month?
4. must the data stay local (nothing may leave for a third-party API)?
5. is a verifier available (a program that says whether an output is acceptable)?

:func:`advise` is a pure function of the answers and the cost :class:`Figures`. Every
figure is an **illustrative default** (round numbers of the right order of magnitude, not
measurements or quotes); override each one with its flag to get your own numbers.
The payback time of a technique's setup cost at the user's volume, against prompting the
frontier API, is ``setup / (frontier per call − technique per call) / calls per month``
months — infinite when the technique is not cheaper per call.

Example::

    >>> a = advise(Answers(data_changes=False, structured=True, calls_per_month=200_000,
    ...                    data_local=True, verifier=True), Figures())
    >>> a.technique
    'distillation'
    >>> round(a.row(a.technique).payback_months, 2)
    0.15
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from kolm_ledger.errors import InvalidInput

__all__ = [
    "DISTILL",
    "DISTILL_ESCAPE",
    "DISTILL_RECALL",
    "FINETUNE",
    "FRONTIER",
    "QUESTIONS",
    "RAG",
    "RAG_FINETUNE",
    "TECHNIQUES",
    "Advice",
    "Answers",
    "Figures",
    "MatrixRow",
    "advise",
    "payback_months",
]

FRONTIER = "frontier API (prompting)"
RAG = "RAG"
FINETUNE = "fine-tune"
RAG_FINETUNE = "RAG + fine-tune"
DISTILL = "distillation"
DISTILL_RECALL = "distillation + recall"
DISTILL_ESCAPE = "distillation + frontier escape hatch"
TECHNIQUES: tuple[str, ...] = (
    FRONTIER,
    RAG,
    FINETUNE,
    RAG_FINETUNE,
    DISTILL,
    DISTILL_RECALL,
    DISTILL_ESCAPE,
)

#: (answer field, flag, question) in the order they are asked.
QUESTIONS: tuple[tuple[str, str, str], ...] = (
    ("data_changes", "--data-changes", "Does the right answer change as your data changes?"),
    (
        "structured",
        "--structured",
        "Is the task structured (classification / extraction) rather than free generation?",
    ),
    ("calls_per_month", "--calls-per-month", "How many calls a month?"),
    ("data_local", "--data-local", "Must the data stay local (never sent to a third-party API)?"),
    (
        "verifier",
        "--verifier",
        "Is a verifier available (a program that accepts or rejects an output)?",
    ),
)


@dataclass(frozen=True)
class Answers:
    """The five answers. Requires ``calls_per_month >= 1``."""

    data_changes: bool
    structured: bool
    calls_per_month: int
    data_local: bool
    verifier: bool

    def __post_init__(self) -> None:
        if isinstance(self.calls_per_month, bool) or not isinstance(self.calls_per_month, int):
            raise InvalidInput(f"calls per month is {self.calls_per_month!r}, want an integer")
        if self.calls_per_month < 1:
            raise InvalidInput(f"calls per month is {self.calls_per_month}, want >= 1")


def _fig(default: float, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Figures:
    """Cost, latency and policy figures. ILLUSTRATIVE DEFAULTS: override them with your own.

    Costs are US dollars; latencies are milliseconds per call. Combined techniques are
    derived: RAG + fine-tune = both setups, the fine-tuned model's per-call cost plus RAG's
    retrieval overhead (RAG per call − frontier per call); distillation + recall = both
    setups and both per-call costs; the escape hatch adds ``escape_rate`` × a frontier call.
    """

    frontier_cost_per_call: float = _fig(0.01, "frontier API: $ per call (prompt + answer)")
    frontier_latency_ms: float = _fig(800.0, "frontier API: ms per call")
    rag_setup_cost: float = _fig(2000.0, "RAG: $ to build ingestion, chunking, index, evals")
    rag_cost_per_call: float = _fig(0.012, "RAG: $ per call (frontier call + retrieved context)")
    rag_latency_ms: float = _fig(1000.0, "RAG: ms per call (retrieval + frontier call)")
    finetune_setup_cost: float = _fig(5000.0, "fine-tune: $ for labelled data, training, evals")
    finetune_cost_per_call: float = _fig(0.002, "fine-tune: $ per call (self-hosted model)")
    finetune_latency_ms: float = _fig(150.0, "fine-tune: ms per call")
    distill_setup_cost: float = _fig(300.0, "distillation: $ per compile (teacher calls + GPU)")
    distill_cost_per_call: float = _fig(0.0002, "distillation: $ per call (small student)")
    distill_latency_ms: float = _fig(15.0, "distillation: ms per call")
    recall_setup_cost: float = _fig(200.0, "recall: $ to build the local evidence index")
    recall_cost_per_call: float = _fig(0.0001, "recall: $ per call (local lookup)")
    recall_latency_ms: float = _fig(10.0, "recall: ms per call")
    escape_rate: float = _fig(0.05, "escape hatch: fraction of calls sent to the frontier")
    high_volume: float = _fig(50_000.0, "calls a month from which a setup is worth it")
    payback_horizon_months: float = _fig(12.0, "longest acceptable payback time, months")

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise InvalidInput(f"{f.name} is {v!r}, want a finite number")
            if v < 0:
                raise InvalidInput(f"{f.name} is {v}, want >= 0")
        if self.escape_rate > 1:
            raise InvalidInput(f"escape_rate is {self.escape_rate}, want 0 <= escape_rate <= 1")

    @staticmethod
    def flag(name: str) -> str:
        """The command-line flag of figure ``name`` (``--frontier-cost-per-call``)."""
        return "--" + name.replace("_", "-")


def payback_months(
    setup: float, cost_per_call: float, frontier_per_call: float, calls: int
) -> float:
    """Months until ``setup`` is recovered by the per-call saving over the frontier API.

    ``setup / (frontier_per_call - cost_per_call) / calls``; ``0`` when there is no setup
    cost, ``math.inf`` when the technique is not cheaper per call. Requires ``calls >= 1``.
    """
    if calls < 1:
        raise InvalidInput(f"calls is {calls}, want >= 1")
    if setup == 0:
        return 0.0
    saving = frontier_per_call - cost_per_call
    if saving <= 0:
        return math.inf
    return setup / saving / calls


@dataclass(frozen=True)
class MatrixRow:
    """One technique's costs at the user's volume."""

    technique: str
    setup_cost: float
    cost_per_call: float
    latency_ms: float
    data_leaves: str
    verifier: str
    monthly_cost: float
    payback_months: float  # math.inf: never (not cheaper per call than the frontier API)

    def to_json(self) -> dict[str, Any]:
        """A JSON object (an infinite payback is ``null``)."""
        d = asdict(self)
        if not math.isfinite(self.payback_months):
            d["payback_months"] = None
        return d


@dataclass(frozen=True)
class Advice:
    """The recommendation, the answers that drove it, and the cost matrix."""

    technique: str
    reasons: tuple[str, ...]
    matrix: tuple[MatrixRow, ...]
    answers: Answers
    figures: Figures

    def row(self, technique: str) -> MatrixRow:
        """The matrix row of ``technique``."""
        for r in self.matrix:
            if r.technique == technique:
                return r
        raise KeyError(technique)

    def to_json(self) -> dict[str, Any]:
        """Machine-readable advice (``kolm advise --json``)."""
        return {
            "technique": self.technique,
            "reasons": list(self.reasons),
            "answers": asdict(self.answers),
            "figures": asdict(self.figures),
            "figures_note": "illustrative defaults unless overridden by flags",
            "matrix": [r.to_json() for r in self.matrix],
        }


def _matrix(a: Answers, f: Figures) -> tuple[MatrixRow, ...]:
    n = a.calls_per_month
    retrieval = max(0.0, f.rag_cost_per_call - f.frontier_cost_per_call)
    retrieval_ms = max(0.0, f.rag_latency_ms - f.frontier_latency_ms)
    # (technique, setup, per call, latency, data leaves, verifier)
    spec: list[tuple[str, float, float, float, str, str]] = [
        (FRONTIER, 0.0, f.frontier_cost_per_call, f.frontier_latency_ms, "yes", "optional"),
        (
            RAG,
            f.rag_setup_cost,
            f.rag_cost_per_call,
            f.rag_latency_ms,
            "yes (+ records)",
            "optional",
        ),
        (
            FINETUNE,
            f.finetune_setup_cost,
            f.finetune_cost_per_call,
            f.finetune_latency_ms,
            "no",
            "optional",
        ),
        (
            RAG_FINETUNE,
            f.rag_setup_cost + f.finetune_setup_cost,
            f.finetune_cost_per_call + retrieval,
            f.finetune_latency_ms + retrieval_ms,
            "no",
            "optional",
        ),
        (
            DISTILL,
            f.distill_setup_cost,
            f.distill_cost_per_call,
            f.distill_latency_ms,
            "compile only",
            "required",
        ),
        (
            DISTILL_RECALL,
            f.distill_setup_cost + f.recall_setup_cost,
            f.distill_cost_per_call + f.recall_cost_per_call,
            f.distill_latency_ms + f.recall_latency_ms,
            "compile only",
            "required",
        ),
        (
            DISTILL_ESCAPE,
            f.distill_setup_cost,
            f.distill_cost_per_call + f.escape_rate * f.frontier_cost_per_call,
            f.distill_latency_ms + f.escape_rate * f.frontier_latency_ms,
            f"{f.escape_rate:.0%} of calls",
            "required",
        ),
    ]
    return tuple(
        MatrixRow(
            t,
            setup,
            per_call,
            lat,
            leaves,
            ver,
            per_call * n,
            payback_months(setup, per_call, f.frontier_cost_per_call, n),
        )
        for t, setup, per_call, lat, leaves, ver in spec
    )


def advise(answers: Answers, figures: Figures) -> Advice:
    """Recommend a technique for ``answers`` under ``figures``; pure and deterministic.

    The decision, in order:

    1. the answer changes with the data → retrieval is needed: with a structured task and a
       verifier, distillation + recall; otherwise RAG + fine-tune when the data must stay
       local or the volume is high and it pays back, else RAG;
    2. a verifier, and a structured task or a high volume, and either the data must stay
       local or distillation pays back within the horizon → distillation (data local) or
       distillation + frontier escape hatch (the hard tail may go to the teacher);
    3. the data must stay local → fine-tune (a self-hosted model);
    4. a high volume at which fine-tuning pays back → fine-tune;
    5. otherwise no setup pays for itself → prompt the frontier API.
    """
    a, f = answers, figures
    matrix = _matrix(a, f)
    n = a.calls_per_month
    rows = {r.technique: r for r in matrix}
    high = n >= f.high_volume

    def pays(t: str) -> bool:
        return rows[t].payback_months <= f.payback_horizon_months

    def months(t: str) -> str:
        m = rows[t].payback_months
        return "never (not cheaper per call)" if math.isinf(m) else f"{m:.1f} months"

    reasons: list[str] = []
    vol = f"{n:,} calls/month ({'at or above' if high else 'below'} the {f.high_volume:,.0f} high-volume mark)"
    if a.data_changes:
        reasons.append(
            "(1) the answer changes with the data: the model must look records up at "
            "call time, not memorise them — retrieval (RAG or recall) is required"
        )
        if a.structured and a.verifier:
            reasons.append(
                "(2)+(5) structured task with a verifier: labels can be verified and "
                "voted, so a small student can be distilled; recall supplies fresh records"
            )
            t = DISTILL_RECALL
        elif a.data_local:
            reasons.append(
                "(4) the data must stay local: no frontier call, so retrieval feeds a "
                "self-hosted fine-tuned model"
                + (
                    ""
                    if a.verifier
                    else "; (5) without a verifier distillation cannot check its labels"
                )
            )
            t = RAG_FINETUNE
        elif high and pays(RAG_FINETUNE):
            reasons.append(
                f"(3) {vol}: a self-hosted fine-tune behind retrieval pays back in "
                f"{months(RAG_FINETUNE)}"
            )
            t = RAG_FINETUNE
        else:
            why = "(5) no verifier to distil against" if not a.verifier else "(2) free generation"
            reasons.append(
                f"{why}; (3) {vol}: RAG on the frontier API, whose setup is for "
                f"freshness, not savings (payback {months(RAG)})"
            )
            t = RAG
    elif a.verifier and (a.structured or high) and (a.data_local or pays(DISTILL)):
        reasons.append("(1) the answer does not change with the data: nothing to retrieve")
        reasons.append(
            "(5) a verifier exists: teacher labels can be verified and voted, and "
            "the student's K-score measured on a holdout"
        )
        reasons.append(
            "(2) structured task: a small student matches the teacher on a closed output space"
            if a.structured
            else f"(2) free generation, but (3) {vol} justifies distilling it"
        )
        if a.data_local:
            reasons.append(
                "(4) the data must stay local: no escape hatch to a frontier API "
                "(point it at a local teacher, or leave it off)"
            )
            t = DISTILL
        else:
            reasons.append(
                f"(4) data may leave: low-confidence or verifier-failing calls "
                f"({f.escape_rate:.0%}) escape to the frontier; payback "
                f"{months(DISTILL_ESCAPE)}"
            )
            t = DISTILL_ESCAPE
    elif a.data_local:
        reasons.append(
            "(4) the data must stay local: a self-hosted fine-tuned model"
            + (
                "; (5) without a verifier distillation cannot check its labels"
                if not a.verifier
                else f"; (2) free generation at (3) {vol}"
            )
        )
        t = FINETUNE
    elif high and pays(FINETUNE):
        reasons.append(
            f"(3) {vol}: fine-tuning pays back in {months(FINETUNE)}"
            + (
                "; (5) without a verifier distillation cannot check its labels"
                if not a.verifier
                else ""
            )
        )
        t = FINETUNE
    else:
        feasible = [r for r in matrix if r.setup_cost and (a.verifier or r.verifier != "required")]
        best = min(feasible, key=lambda r: r.payback_months)
        reasons.append(
            f"(3) {vol}: no setup pays back within {f.payback_horizon_months:g} "
            f"months (best: {best.technique}, {months(best.technique)}) and (4) the "
            "data may leave: prompt the frontier API"
            + ("; add a verifier and distillation becomes an option" if not a.verifier else "")
        )
        t = FRONTIER
    return Advice(t, tuple(reasons), matrix, a, f)
