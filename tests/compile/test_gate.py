"""Selective prediction (issue 17): the gate's pieces, the compile-time thresholds, and the
gate at inference through the real engine and the real gRPC service — inputs far from
everything the student was taught leave the cover; nobody to answer means a refusal.

The gated artifact reuses the session world of test_infer_engine (a 4-intent student
trained once): the gate is built on its training rows, calibrated on rows it never saw.
"""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import Any

import grpc
import pytest
from test_infer_engine import (  # the shared world (a session fixture built once)
    LABELS,
    PER_LABEL,
    World,
    engine_for,
    fake_teacher,  # noqa: F401 - a fixture
    rows,
    world,  # noqa: F401 - a fixture
)

from kolm_compile import gate as G

# far from card arrival, exchange rates, lost cards and failed top-ups
OUT_OF_SCOPE = [
    "What is the boiling point of water at sea level?",
    "Write me a short poem about autumn leaves.",
    "How many players are on a football team?",
    "Give me a recipe for chocolate chip cookies.",
    "Who painted the Mona Lisa?",
    "What time does the train to Paris leave?",
    "Translate good morning into Japanese.",
    "How tall is Mount Everest?",
    "Recommend a good science fiction novel.",
    "Is it going to rain tomorrow in London?",
    "How do I change a flat tyre on my bike?",
    "What is the capital of Australia?",
]
TARGET = 95.0


# --------------------------------------------------------------------------- pieces


def test_select_thresholds_takes_the_largest_coverage_that_meets_the_target() -> None:
    rnd = random.Random(7)
    probs = [rnd.random() for _ in range(120)]
    sims = [rnd.random() for _ in range(120)]
    # right answers concentrate where both scores are high
    correct = [
        rnd.random() < 0.25 + 0.75 * min(p, s) ** 0.5 for p, s in zip(probs, sims, strict=True)
    ]
    for target in (80.0, 90.0, 97.0):
        sel = G.select_thresholds(probs, sims, correct, target)
        # t_sim: the conformal level, the floor(0.05 * 121) = 6th smallest similarity
        assert abs(sel["t_sim"] - sorted(sims)[5]) < 1e-6 and sel["alpha"] == G.DISTANCE_ALPHA
        assert sum(s < sel["t_sim"] for s in sims) == 5
        figs = G.cover_figures(probs, sims, correct, sel["t_prob"], sel["t_sim"])
        assert figs["n_cover"] == sel["n_cover"] > 0
        assert figs["cover_k_score"] >= target
        # brute force over every probability cut at that t_sim: none meeting the target
        # covers more
        best = 0
        for tp in probs:
            f = G.cover_figures(probs, sims, correct, tp, sel["t_sim"])
            if f["n_cover"] and f["cover_k_score"] >= target:
                best = max(best, f["n_cover"])
        assert sel["n_cover"] == best, (target, sel, best)
    # a split too small for the level: no distance cut
    assert G.distance_threshold([0.3, 0.9, 0.5], 0.05) == -1.0
    assert G.distance_threshold([0.3, 0.9, 0.5], 0.25) == 0.3


def test_an_unreachable_target_keeps_nothing() -> None:
    sel = G.select_thresholds([0.9, 0.8], [0.5, 0.5], [False, False], 99.0)
    assert sel["t_prob"] == G.NOTHING and sel["n_cover"] == 0 and sel["coverage"] == 0.0


def test_calibration_split_is_seeded_and_independent_of_order() -> None:
    digests = [f"{i:064x}" for i in range(200)]
    a = G.calibration_split(digests, 0.1, seed=3)
    assert len(a) == 20
    rev = list(reversed(digests))
    b = G.calibration_split(rev, 0.1, seed=3)
    assert sorted(digests[i] for i in a) == sorted(rev[i] for i in b)
    assert G.calibration_split(digests, 0.1, seed=4) != a


def test_fit_temperature_undoes_a_scaling() -> None:
    import numpy as np

    rnd = np.random.default_rng(0)
    true = rnd.normal(size=(2000, 5))
    y = [int(rnd.choice(5, p=G.softmax(row[None])[0])) for row in true]
    t = G.fit_temperature(true * 4.0, y)  # over-confident logits, 4x too sharp
    assert 3.3 < t < 4.8, t


def test_knn_similarity_is_the_kth_neighbour() -> None:
    import numpy as np

    bank = np.eye(4, dtype=np.float32)
    q = np.array([[1.0, 0.0, 0.0, 0.0]], dtype=np.float32)
    assert G.knn_similarity(q, bank, 1).tolist() == [1.0]
    assert G.knn_similarity(q, bank, 2).tolist() == [0.0]
    assert G.knn_similarity(q, bank[:0], 2).tolist() == [-1.0]


# --------------------------------------------------------------------------- a gated artifact


@pytest.fixture(scope="module")
def gated(world: World) -> dict[str, Any]:  # noqa: F811
    """The world's student with a gate: built on its training rows, thresholds chosen on
    32 rows it was not trained on, packed and logged as the artifact ``gated``."""
    from kolm_compile.student import Student
    from kolm_ledger.formats.canonical import digest_hex

    student = Student.load(world.adapter, threads=1)
    train = rows("train", PER_LABEL)
    cal = rows("train", 8, skip=PER_LABEL)
    d = world.root / "gate-build"
    meta = G.build(
        student,
        [t for t, _ in train],
        [digest_hex([t, y]) for t, y in train],
        [t for t, _ in cal],
        [y for _, y in cal],
        target=TARGET,
        k=3,
        confidence_threshold=0.5,
        calibration={"fraction": None, "seed": 0},
        directory=d,
    )
    path, digest = world.build("gated", threshold=0.5, gate=(d, meta))
    return {"path": path, "digest": digest, "meta": meta, "cal": cal, "student": student}


@pytest.mark.ml
@pytest.mark.slow
def test_the_compile_time_thresholds_meet_the_target_on_the_calibration_split(
    gated: dict[str, Any],
) -> None:
    meta = gated["meta"]
    cal = meta["calibration"]
    assert meta["rule"] == "calibrated" and meta["target_cover_k_score"] == TARGET
    assert cal["n"] == len(gated["cal"]) and cal["selection"] == "point_estimate"
    assert cal["n_cover"] > 0 and cal["cover_k_score"] >= TARGET
    lo, hi = cal["cover_interval"]
    assert lo <= cal["cover_k_score"] <= hi
    # the loaded gate reproduces the figures from the artifact's files
    gate = G.Gate.load(gated["path"].parent.parent / "build" / "gated", meta, "gated")
    logits, emb = gated["student"].analyse([t for t, _ in gated["cal"]])
    g = gate.score(logits, emb)
    correct = [LABELS[x["index"]] == y for x, (_, y) in zip(g, gated["cal"], strict=True)]
    again = G.cover_figures(
        [x["prob"] for x in g], [x["sim"] for x in g], correct, gate.t_prob, gate.t_sim
    )
    assert again["n_cover"] == cal["n_cover"] and again["cover_k_score"] == cal["cover_k_score"]
    # the receipt-bound values are finite and rounded (RFC 8785 canonical JSON)
    json.dumps(meta, allow_nan=False)


@pytest.mark.ml
@pytest.mark.slow
def test_out_of_scope_inputs_leave_the_cover_where_the_softmax_gate_keeps_them(
    world: World,  # noqa: F811
    gated: dict[str, Any],
) -> None:
    async def main() -> tuple[list[Any], list[Any]]:
        eng = engine_for(world, on_teacher_failure="student")
        try:
            await asyncio.to_thread(eng.load, gated["path"])
            oos = await asyncio.gather(*(eng.predict("gated", t) for t in OUT_OF_SCOPE))
            ins = await asyncio.gather(*(eng.predict("gated", t) for t, _ in world.holdout))
            return [p for _, p in oos], [p for _, p in ins]
        finally:
            await eng.close()

    oos, ins = asyncio.run(main())
    # the plain softmax gate (confidence >= 0.5) would let these through as answers
    softmax_keeps = [p for p in oos if p.confidence >= 0.5]
    assert len(softmax_keeps) >= len(OUT_OF_SCOPE) // 2, [p.confidence for p in oos]
    # the gate keeps none of the out-of-scope inputs: each is flagged, never "confident"
    assert all(p.reason == "teacher_unavailable" and not p.verified for p in oos)
    assert any(p.gate["routed"] == "out_of_distribution" for p in softmax_keeps)
    for p in oos:
        assert p.gate["inside"] is False and p.gate["decided_by"] != "cover"
        assert set(p.gate) >= {"rule", "prob", "sim", "t_prob", "t_sim", "temperature", "k"}
    # in-scope inputs still mostly stay in the cover
    kept = [p for p in ins if p.reason == "confident"]
    assert len(kept) >= len(ins) // 2, [p.gate for p in ins]


# --------------------------------------------------------------------------- the real service


def _serve(world: World, gated: dict[str, Any], **kw: Any) -> Any:  # noqa: F811
    from test_infer_service import InferThread

    return InferThread(world, world.ledger, artifacts=[gated["path"]], max_batch=8, **kw)


def _predict(srv: Any, text: str, **kw: Any) -> Any:
    from kolm_infer._pb import infer_pb2 as pb

    return srv.stub.Predict(pb.PredictRequest(artifact="gated", input=text, **kw), timeout=60)


@pytest.mark.ml
@pytest.mark.slow
def test_with_no_teacher_an_input_outside_the_cover_is_refused_by_the_service(
    world: World,  # noqa: F811
    gated: dict[str, Any],
) -> None:
    srv = _serve(world, gated)
    try:
        with pytest.raises(grpc.RpcError) as e:
            _predict(srv, OUT_OF_SCOPE[0])
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        details = e.value.details() or ""
        assert "outside the student's cover" in details and "no teacher is configured" in details
        assert "--on-teacher-failure student" in details
    finally:
        srv.close()


@pytest.mark.ml
@pytest.mark.slow
def test_a_failing_teacher_gets_unavailable(
    world: World,  # noqa: F811
    gated: dict[str, Any],
    fake_teacher: Any,  # noqa: F811
) -> None:
    teacher, task = fake_teacher.build(world.root / "gate-teacher")
    fake_teacher.close()  # the teacher's endpoint is gone: connection refused
    srv = _serve(world, gated, teacher=teacher, teacher_task=task)
    try:
        with pytest.raises(grpc.RpcError) as e:
            _predict(srv, OUT_OF_SCOPE[1])
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "the teacher failed" in (e.value.details() or "")
    finally:
        srv.close()


@pytest.mark.ml
@pytest.mark.slow
def test_on_teacher_failure_student_gives_the_flagged_answer_with_the_gate_in_the_receipt(
    world: World,  # noqa: F811
    gated: dict[str, Any],
    tmp_path: Path,
) -> None:
    from kolm_ledger.formats.bundle import Bundle
    from kolm_ledger.service.client import LedgerClient
    from kolm_ledger.verify.receipt import verify_prediction

    srv = _serve(world, gated, on_teacher_failure="student")
    try:
        r = _predict(srv, OUT_OF_SCOPE[0], wait_for_inclusion=True)
        art_index = srv.srv.engine.get("gated").receipt_index
    finally:
        srv.close()
    assert (r.backend, r.reason, r.verified) == ("student", "teacher_unavailable", False)
    assert r.output in LABELS
    # verified offline: signature, inclusion, the artifact receipt; the gate is in the
    # signed predicate
    v = verify_prediction(
        Bundle.from_bytes(r.bundle),
        world.trust,
        artifact_bundle=LedgerClient(world.ledger.target).bundle(index=art_index),
    )
    pred = v.receipt.statement.predicate
    assert pred["reason"] == "teacher_unavailable"
    g = pred["gate"]
    meta = gated["meta"]
    assert g["rule"] == "calibrated" and g["inside"] is False
    assert g["routed"] in ("out_of_distribution", "low_confidence")
    assert (g["t_prob"], g["t_sim"], g["temperature"], g["k"]) == (
        meta["t_prob"],
        meta["t_sim"],
        meta["temperature"],
        meta["k"],
    )
    assert g["prob"] < g["t_prob"] or g["sim"] < g["t_sim"]
    assert all(round(x, 6) == x for x in (g["prob"], g["sim"]))
    # kolm verify step 8 says whether the prediction was inside the cover
    from test_infer_service import kolm

    b = tmp_path / "p.kolm-receipt.json"
    b.write_bytes(r.bundle)
    out = kolm("verify", b, "--trust", world.keys / "trust.json", "--ledger", world.ledger.target)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "this prediction was outside the cover (prob" in out.stdout, out.stdout


def test_verify_step_8_reads_the_cover_and_rechecks_the_gate_values() -> None:
    from kolm.cli.main import cover_line

    cover = {
        "rule": "calibrated",
        "cover_k_score": 99.2,
        "cover_interval": [97.1, 99.8],
        "coverage": 91.5,
        "target_cover_k_score": 99.0,
        "t_prob": 0.8,
        "t_sim": 0.4,
    }
    gate = {"prob": 0.9, "t_prob": 0.8, "sim": 0.3, "t_sim": 0.4, "inside": False}
    line = cover_line(cover, gate)
    assert "K-score 99.2 [97.1, 99.8] on 91.5% of the holdout (target 99.0)" in line
    assert "this prediction was outside the cover" in line and "WARNING" not in line
    # a receipt whose decision does not follow from its values, or whose thresholds are
    # not the artifact's, is called out
    assert "does not follow" in cover_line(cover, {**gate, "inside": True})
    assert "t_sim is not the artifact's" in cover_line(cover, {**gate, "t_sim": 0.1})
    assert "records no cover" in cover_line(None, gate)
    assert "records no gate values" in cover_line(cover, None)


# --------------------------------------------------------------------------- the compile


@pytest.mark.ml
@pytest.mark.slow
def test_a_compile_with_a_target_records_the_thresholds_in_manifest_and_receipts(
    tmp_path: Path,
) -> None:
    import zipfile

    from support.servers import LedgerThread
    from test_compile_pipeline import EXAMPLES, _embed, tiny_raw

    from kolm_compile.artifact import verify_artifact
    from kolm_compile.pipeline import CompileJob, CompileOptions
    from kolm_compile.sinks import ServiceSink
    from kolm_compile.spec import TaskSpec
    from kolm_ledger.formats.receipts import Statement
    from kolm_ledger.keys import PrivateKey, init_keys
    from kolm_ledger.service.client import LedgerClient

    trust = init_keys(tmp_path / "keys")
    ledger = LedgerThread(
        f"sqlite:///{tmp_path / 'ledger.db'}", trust, PrivateKey.load(tmp_path / "keys/log.key")
    )
    client = LedgerClient(ledger.target, timeout=120)
    try:
        raw = tiny_raw()
        raw["student"].update(target_cover_k_score=90.0, gate_k=3)
        spec = TaskSpec.from_dict(raw, EXAMPLES)
        job = CompileJob(
            spec,
            key=PrivateKey.load(tmp_path / "keys/compile.key"),
            job_dir=tmp_path / "job",
            out_dir=tmp_path / "out",
            sink=ServiceSink(client),
            options=CompileOptions(threads=1, teacher_cache=tmp_path / "cache.sqlite"),
            embed=_embed,
        )
        res = job.run()
        with zipfile.ZipFile(res.artifact_path) as z:
            top = z.namelist()[0].split("/")[0]
            manifest = json.loads(z.read(f"{top}/manifest.json"))
            names = set(z.namelist())
        verify_artifact(res.artifact_path, trust)  # the gate files are signed like the rest
        assert {f"{top}/{G.EMBEDDINGS_FILE}", f"{top}/{G.GATE_FILE}"} <= names
        gate = manifest["gate"]
        assert gate["rule"] == "calibrated" and gate["k"] == 3
        cal = gate["calibration"]
        assert cal["n"] >= 1 and cal["seed"] == spec.seed and cal["fraction"] == 0.1
        assert cal["n_cover"] == 0 or cal["cover_k_score"] >= 90.0
        # the calibration split was held out from training
        trained = json.loads((job.dir / "train_set.json").read_text())["texts"]
        logged = [r[2] for r in json.loads((job.stage_dir / "sign.json").read_text())["logged"]]
        assert len(trained) == len(logged) - cal["n"] == gate["examples"]
        hold = gate["holdout"]
        assert hold["n"] == res.k_score.n and len(hold["curve"]["prob"]) == 20
        # the eval receipt and the artifact receipt carry them
        ev = Statement.from_envelope(client.bundle(index=res.eval_index).envelope).predicate
        assert ev["gate"]["t_prob"] == gate["t_prob"] and ev["gate"]["holdout"] == hold
        art = Statement.from_envelope(client.bundle(index=res.artifact_index).envelope)
        cover = art.predicate["cover"]
        assert cover["cover_k_score"] == hold["cover_k_score"]
        assert cover["coverage"] == hold["coverage"] and cover["target_cover_k_score"] == 90.0
    finally:
        client.close()
        ledger.close()


# --------------------------------------------------------------------------- none_label


def test_none_label_is_a_label_the_teacher_is_offered() -> None:
    import yaml

    from kolm_compile.spec import TaskSpec
    from kolm_compile.teachers import build_messages
    from kolm_ledger.errors import SpecError

    examples = Path(__file__).resolve().parents[2] / "kolm_compile" / "examples"
    raw = yaml.safe_load((examples / "banking77-router.yaml").read_text())
    plain = TaskSpec.from_dict(raw, examples)
    assert "fits none" not in build_messages(plain, "hi")[1]["content"]
    raw["labels"] = [*raw["labels"], "out_of_scope"]
    raw["none_label"] = "out_of_scope"
    spec = TaskSpec.from_dict(raw, examples)
    body = build_messages(spec, "what is the capital of France?")[1]["content"]
    assert "- out_of_scope" in body
    assert "If the input fits none of the other labels, answer out_of_scope." in body
    assert spec.to_dict()["none_label"] == "out_of_scope"
    raw["none_label"] = "unknown"
    with pytest.raises(SpecError, match=r"spec\.none_label: 'unknown' is not one of labels"):
        TaskSpec.from_dict(raw, examples)
