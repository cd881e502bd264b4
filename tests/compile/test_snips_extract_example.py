"""The shipped extraction example (kolm_compile/examples/snips-extract.yaml) on the SNIPS
subset in the package: it loads, and its simulated teacher (80% per sample, k = 5) with
the vote stage accepts most inputs, exact or per field, with gold precision near 1.

The numbers are printed (pytest -s): acceptance and gold precision of one sample and of
the vote, for each vote kind.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from kolm_compile.pipeline import labels
from kolm_compile.pipeline.ingest import ingest
from kolm_compile.pipeline.outputs import Ingested, Sampled, Usage
from kolm_compile.spec import TaskSpec
from kolm_compile.teachers import SampleRequest, build_teacher

EXAMPLE = Path(__file__).resolve().parents[2] / "kolm_compile" / "examples" / "snips-extract.yaml"


@pytest.fixture(scope="module")
def sampled() -> tuple[TaskSpec, Ingested, Sampled]:
    spec = TaskSpec.load(EXAMPLE)
    ing = ingest(spec)
    teacher = build_teacher(spec.teacher, spec)
    reqs = [SampleRequest(f"row {i}", t, spec.teacher.k) for i, t in enumerate(ing.inputs)]
    samples = teacher.sample_many(reqs, spec)
    smp = Sampled(
        samples=[[s.text for s in ss] for ss in samples],
        holdout_samples=[],
        teacher_errors={},
        teacher=teacher.describe(),
        usage=Usage(0, 0, 0, 0, 0, 0.0, 0.0),
        total=len(reqs),
    )
    return spec, ing, smp


def with_vote(spec: TaskSpec, kind: str) -> TaskSpec:
    d = spec.to_dict()
    d["teacher"]["vote"] = kind
    return TaskSpec.from_dict(d, spec.base_dir)


def test_the_example_loads() -> None:
    spec = TaskSpec.load(EXAMPLE)
    assert (spec.name, spec.task, spec.seed) == ("snips-extract", "extract", 7)
    assert spec.student.kind == "span_tagger"  # auto: every field grounded or the enum
    assert spec.verifier is not None and spec.verifier.params["grounded"] == "marked"
    t = spec.teacher
    assert (t.backend, t.accuracy, t.k, t.min_agreement, t.vote) == (
        "simulated",
        0.8,
        5,
        3,
        "per_field",
    )
    assert spec.data.output_column == "output"
    assert set(spec.files()) == {"data.holdout", "data.unlabeled", "teacher.dataset"}
    schema = json.loads((EXAMPLE.parent / "../data/snips/schema.json").read_text())
    assert spec.to_dict()["output_schema"] == schema


@pytest.mark.parametrize("kind", ["exact", "per_field"])
def test_simulated_teacher_and_vote_accept_most_inputs(
    sampled: tuple[TaskSpec, Ingested, Sampled], kind: str
) -> None:
    spec, ing, smp = sampled
    assert len(ing.inputs) == 400 and len(ing.holdout) == 100
    assert all(g is not None for g in ing.input_gold)
    s = with_vote(spec, kind)
    ctx: Any = SimpleNamespace(spec=s, verifier=s.build_verifier())
    vt = labels.vote(ctx, ing, smp)
    c = vt.counters
    print(
        f"\nSNIPS package subset, simulated teacher 80%, k=5, min_agreement 3, vote {kind}: "
        f"accepted {c['accepted']}/{vt.total} ({c['acceptance_rate']:.3f}), "
        f"gold precision single {c['gold_precision_single']:.3f}, "
        f"vote {c['gold_precision_vote']:.3f}, rejected {dict(vt.summary.reasons)}"
    )
    assert 0.75 < c["gold_precision_single"] < 0.88  # one sample: about the accuracy
    assert c["acceptance_rate"] >= 0.9
    assert c["gold_precision_vote"] >= 0.98  # the vote filters the corruptions out
    # every accepted label is the canonical JSON its receipt will carry
    for a in vt.accepted:
        assert ctx.verifier.check(a.answer, input=ing.inputs[a.input]).normalized == a.answer


def test_per_field_accepts_at_least_what_exact_accepts(
    sampled: tuple[TaskSpec, Ingested, Sampled],
) -> None:
    spec, ing, smp = sampled
    got = {}
    for kind in ("exact", "per_field"):
        s = with_vote(spec, kind)
        vt = labels.vote(SimpleNamespace(spec=s, verifier=s.build_verifier()), ing, smp)  # type: ignore[arg-type]
        got[kind] = {a.input: a.answer for a in vt.accepted}
    # an input the exact vote accepts has a majority object, so a majority on every field
    assert set(got["exact"]) <= set(got["per_field"])
    assert all(got["per_field"][i] == a for i, a in got["exact"].items())
    assert len(got["per_field"]) > len(got["exact"])


def test_the_grounded_check_refuses_invented_values(
    sampled: tuple[TaskSpec, Ingested, Sampled],
) -> None:
    spec, ing, smp = sampled
    s = with_vote(spec, "per_field")
    vt = labels.vote(SimpleNamespace(spec=s, verifier=s.build_verifier()), ing, smp)  # type: ignore[arg-type]
    verifier = s.build_verifier()
    grounded = sum(
        verifier.check(x, input=text).reason.startswith("grounded: /slots/")
        for ss, text in zip(smp.samples, ing.inputs, strict=True)
        for x in ss
    )
    assert grounded > 20  # extra slots with another row's value: not in this input
    assert vt.counters["gold_precision_vote"] >= 0.98
