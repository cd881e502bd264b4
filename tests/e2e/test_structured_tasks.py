"""Structured distillation end to end (issue 16): an ``extract`` specialist (span tagger,
SNIPS subset) and a ``generate`` specialist (the generative student on a tiny random causal
LM built here) compile through a REAL ledger service, load into the REAL inference service
over gRPC, answer with signed receipts that verify offline, and re-execute to their signed
K-scores; the report shows the per-field table; an output that fails the verifier is
refused (fail closed) or flagged, never passed off as verified."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import pytest
from support.lm import tiny_causal_lm
from support.servers import LedgerThread, ServiceThread

from kolm.cli.main import main
from kolm_ledger.formats.receipts import Statement
from kolm_ledger.keys import PrivateKey, init_keys
from kolm_ledger.service.client import LedgerClient

pytestmark = [pytest.mark.ml, pytest.mark.slow]

SNIPS = Path(__file__).resolve().parents[1] / "data" / "snips"
NAMES = [
    "ada",
    "alan",
    "grace",
    "linus",
    "barbara",
    "ken",
    "dennis",
    "margaret",
    "donald",
    "edsger",
    "john",
    "niklaus",
    "tony",
    "frances",
    "radia",
    "shafi",
    "whitfield",
    "leslie",
    "butler",
    "robin",
]


def _extract_spec() -> Any:
    from kolm_compile.spec import TaskSpec

    raw = {
        "name": "snips-tiny",
        "task": "extract",
        "instructions": "Give the command's intent and its slots as one JSON object.",
        "output_schema": "schema.json",
        "verifier": {"name": "json_schema", "params": {"grounded": "marked"}},
        "teacher": {
            "backend": "simulated",
            "model": "simulated-frontier",
            "dataset": "gold.jsonl",
            "accuracy": 0.8,
            "k": 5,
            "min_agreement": 3,
        },
        "student": {"kind": "auto", "epochs": 12, "max_length": 48, "batch_size": 16},
        "data": {"unlabeled": "train.jsonl", "holdout": "test.jsonl", "output_column": "output"},
        "seed": 7,
    }
    return TaskSpec.from_dict(raw, SNIPS)


def _generate_spec(d: Path, base: str) -> Any:
    from kolm_compile.spec import TaskSpec

    rows = [{"text": f"greet {n}", "output": f"Hello, {n}!"} for n in NAMES]
    (d / "gold.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:16]))
    (d / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[16:]))
    raw = {
        "name": "greeter",
        "task": "generate",
        "instructions": "Greet the person named.",
        "verifier": {"name": "regex", "params": {"pattern": r"^Hello, [a-z]+!$"}},
        "teacher": {
            "backend": "simulated",
            "model": "simulated-frontier",
            "dataset": "gold.jsonl",
            "accuracy": 0.9,
            "k": 3,
            "min_agreement": 2,
        },
        "student": {
            "kind": "causal_lm",
            "base_model": base,
            "epochs": 30,
            "batch_size": 8,
            "learning_rate": 3.0e-3,
            "max_length": 32,
            "max_new_tokens": 12,
        },
        "data": {"unlabeled": "train.jsonl", "holdout": "test.jsonl", "output_column": "output"},
        "seed": 3,
    }
    return TaskSpec.from_dict(raw, d)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from kolm_compile.pipeline import CompileJob, CompileOptions
    from kolm_compile.sinks import ServiceSink

    d = tmp_path_factory.mktemp("structured")
    trust = init_keys(d / "keys")
    db = f"sqlite:///{d / 'ledger.db'}"
    ledger = LedgerThread(db, trust, PrivateKey.load(d / "keys" / "log.key"))
    client = LedgerClient(ledger.target, timeout=120)
    key = PrivateKey.load(d / "keys" / "compile.key")
    base = tiny_causal_lm(d / "tiny")
    (d / "gen").mkdir()
    specs = {"extract": _extract_spec(), "generate": _generate_spec(d / "gen", base)}
    results = {}
    for name, spec in specs.items():
        results[name] = CompileJob(
            spec,
            key=key,
            sink=ServiceSink(client),
            job_dir=d / f"job-{name}",
            out_dir=d / "out",
            options=CompileOptions(threads=2, teacher_cache=d / f"cache-{name}.sqlite"),
        ).run()
    yield {
        "dir": d,
        "db": db,
        "trust": trust,
        "trust_path": str(d / "keys" / "trust.json"),
        "ledger": ledger,
        "client": client,
        "specs": specs,
        "results": results,
    }
    client.close()
    ledger.close()


def _predicate(w: dict[str, Any], index: int) -> dict[str, Any]:
    return dict(Statement.from_envelope(w["client"].bundle(index=index).envelope).predicate)


def _manifest(path: Path) -> dict[str, Any]:
    import zipfile

    with zipfile.ZipFile(path) as z:
        (name,) = [n for n in z.namelist() if n.endswith("/manifest.json")]
        return dict(json.loads(z.read(name)))


def _serve(w: dict[str, Any], name: str, **kw: Any) -> ServiceThread:
    from kolm_infer import service as infer_service

    art = w["results"][name].artifact_path
    return ServiceThread(
        lambda: infer_service.start(
            w["ledger"].target,
            w["trust"],
            PrivateKey.load(w["dir"] / "keys" / "infer.key"),
            artifacts=[art],
            **kw,
        )
    )


def _stub(srv: ServiceThread) -> Any:
    from kolm_infer._pb import infer_pb2_grpc as pb_grpc

    return pb_grpc.InferenceStub(srv.channel)  # type: ignore[no-untyped-call]


# --------------------------------------------------------------------------- extract


def test_the_extract_compile_records_its_student_and_the_per_field_figures(
    world: dict[str, Any],
) -> None:
    r = world["results"]["extract"]
    m = _manifest(r.artifact_path)
    assert m["task_type"] == "extract" and "labels" not in m
    assert m["student"]["kind"] == "span_tagger" and m["student"]["chosen_by"]
    assert m["evaluation"]["label_column"] == "output"
    ap = _predicate(world, r.artifact_index)
    assert ap["student"]["kind"] == "span_tagger"
    ep = _predicate(world, r.eval_index)
    tm = ep["task_metrics"]
    assert tm["schema_valid"] >= 90.0
    assert any(p.startswith("/slots/") for p in tm["fields"]) and "/intent" in tm["fields"]
    assert tm["exact_match"] == pytest.approx(ep["k_score"], abs=1e-6)
    # far better than chance on 40 held-out frames from 120 training utterances
    assert tm["fields"]["/intent"]["f1"] > 0.6, tm["fields"]["/intent"]
    assert ep["k_score"] >= 5.0 and tm["micro"]["f1"] > 0.4, (ep["k_score"], tm["micro"])
    # every trained label is a canonical JSON frame the schema accepts
    sign = json.loads((world["dir"] / "job-extract" / "stages" / "sign.json").read_text())
    schema = json.loads((SNIPS / "schema.json").read_text())
    for _, _, text, label in sign["logged"][:50]:
        obj = json.loads(label)
        jsonschema.validate(obj, schema)
        assert json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False) == label
        for values in obj["slots"].values():
            assert all(v in text for v in values)  # grounded


def test_served_frames_are_json_with_receipts_that_verify_offline(world: dict[str, Any]) -> None:
    from kolm_infer._pb import infer_pb2 as pb
    from kolm_ledger.formats.bundle import Bundle
    from kolm_ledger.verify.receipt import verify_prediction

    r = world["results"]["extract"]
    schema = json.loads((SNIPS / "schema.json").read_text())
    srv = _serve(world, "extract", on_teacher_failure="student")
    try:
        stub = _stub(srv)
        text = "play the song yesterday by the beatles"
        resp = stub.Predict(
            pb.PredictRequest(artifact="snips-tiny", input=text, wait_for_inclusion=True),
            timeout=120,
        )
        obj = json.loads(resp.output)
        jsonschema.validate(obj, schema)
        for values in obj.get("slots", {}).values():
            assert all(v in text for v in values)
        v = verify_prediction(
            Bundle.from_bytes(resp.bundle),
            world["trust"],
            artifact_bundle=world["client"].bundle(index=r.artifact_index),
            input_value=text,
            salt=resp.salt,
        )
        assert v.input_checked and v.artifact is not None
        pred = dict(v.receipt.statement.predicate)
        assert pred["output"] == resp.output and pred["artifact_digest"] == r.artifact_digest
        assert pred["gate"]["rule"] == "span_prob" and 0.0 <= pred["confidence"] <= 1.0
        assert pred["verifier_verdict"]["name"] == "json_schema"
    finally:
        srv.close()


def test_kscore_re_executes_and_the_report_shows_the_field_table(
    world: dict[str, Any], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    r = world["results"]["extract"]
    rc = main(
        ["kscore", "verify", str(r.artifact_path), "--holdout", str(SNIPS / "test.jsonl"),
         "--db", world["db"], "--trust", world["trust_path"]]
    )  # fmt: skip
    out = capsys.readouterr()
    assert rc == 0, out.out + out.err
    assert f"matches the signed eval receipt ({r.k_score.score:.2f}" in out.out
    html = tmp_path / "report.html"
    rc = main(
        ["report", r.artifact_digest, "--db", world["db"], "--trust", world["trust_path"],
         "--out", str(html)]
    )  # fmt: skip
    capsys.readouterr()
    assert rc == 0
    page = html.read_text()
    assert 'id="per-field"' in page and 'id="fig-per-field"' in page and "/slots/" in page


# --------------------------------------------------------------------------- generate


def test_the_generate_compile_scores_the_verifier_pass_rate(world: dict[str, Any]) -> None:
    r = world["results"]["generate"]
    m = _manifest(r.artifact_path)
    assert m["task_type"] == "generate"
    assert m["student"] == {
        "kind": "causal_lm",
        "base_model": "test/tiny-llama",
        "max_new_tokens": 12,
    }
    assert m["gate"]["rule"] == "seq_logprob"
    ep = _predicate(world, r.eval_index)
    tm = ep["task_metrics"]
    assert set(tm) == {"pass_rate", "exact_match", "bleu"}
    # the K-score of a generate task is the verifier's pass rate
    assert tm["pass_rate"] == pytest.approx(ep["k_score"], abs=1e-6)
    outcomes = (world["dir"] / "job-generate" / "stages" / "evaluate.json").read_text()
    assert len(json.loads(outcomes)["outcomes"]) == len(NAMES) - 16


def test_a_generated_output_the_verifier_refuses_is_refused_or_flagged(
    world: dict[str, Any],
) -> None:
    """Input far from the training prompts: whatever the tiny student writes, a reply that
    fails the regex is never served as verified (refused without a teacher; flagged with
    --on-teacher-failure student)."""
    from kolm_infer._pb import infer_pb2 as pb

    odd = "please write three paragraphs about the history of the printing press"
    srv = _serve(world, "generate")
    try:
        stub = _stub(srv)
        try:
            resp = stub.Predict(pb.PredictRequest(artifact="greeter", input=odd), timeout=120)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "no teacher is configured" in (e.details() or "")
        else:  # the student's answer passed the regex and the gate kept it
            assert resp.verified and resp.reason == "confident"
    finally:
        srv.close()
    srv = _serve(world, "generate", on_teacher_failure="student")
    try:
        resp = _stub(srv).Predict(pb.PredictRequest(artifact="greeter", input=odd), timeout=120)
        if resp.reason == "teacher_unavailable":
            assert not resp.verified
        else:
            assert resp.verified and resp.backend == "student"
        seen = _stub(srv).Predict(
            pb.PredictRequest(artifact="greeter", input="greet ada"), timeout=120
        )
        assert seen.confidence > 0.0 and seen.backend == "student"
    finally:
        srv.close()
