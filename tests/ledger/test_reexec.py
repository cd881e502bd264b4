"""Auditors re-execute (kolm_ledger.audit.reexec) against a REAL artifact compiled here at tiny
size (the shipped Banking77 subset, simulated teacher, real ledger service on SQLite):
``kolm kscore verify`` recomputes the K-score from the artifact and catches an inflated
eval receipt and a fabricated outcomes file (both re-signed with the compile key) and a
holdout with one swapped row (named by row); ``kolm verify --replay`` re-runs the student
on a prediction's input and catches a receipt with another label (re-signed with the infer
key), tells an environment difference from tampering, and says a teacher's answer is not
replayable; ``kolm report --holdout`` shows the verdict. Everything through the CLI."""

from __future__ import annotations

import asyncio
import csv
import json
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.servers import LedgerThread

from kolm.cli.main import main
from kolm_ledger.audit import reexec
from kolm_ledger.formats.receipts import Statement, eval_statement, sign_statement
from kolm_ledger.keys import PrivateKey, init_keys
from kolm_ledger.service.client import LedgerClient

pytestmark = [pytest.mark.ml, pytest.mark.slow]

EXAMPLES = Path(__file__).resolve().parents[2] / "kolm_compile" / "examples"


def _tiny_spec() -> Any:
    import yaml

    from kolm_compile.spec import TaskSpec

    raw = yaml.safe_load((EXAMPLES / "banking77-router.yaml").read_text())
    raw["labels"] = raw["labels"][:4]
    raw["data"]["limit_per_label"] = 24
    raw["student"].update(epochs=3, max_length=32, batch_size=16)
    return TaskSpec.from_dict(raw, EXAMPLES)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from kolm_compile.pipeline import CompileJob, CompileOptions
    from kolm_compile.sinks import ServiceSink

    d = tmp_path_factory.mktemp("reexec")
    trust = init_keys(d / "keys")
    db = f"sqlite:///{d / 'ledger.db'}"
    ledger = LedgerThread(db, trust, PrivateKey.load(d / "keys" / "log.key"))
    client = LedgerClient(ledger.target, timeout=120)
    spec = _tiny_spec()
    job = CompileJob(
        spec,
        key=PrivateKey.load(d / "keys" / "compile.key"),
        sink=ServiceSink(client),
        job_dir=d / "job",
        out_dir=d / "out",
        options=CompileOptions(threads=1, teacher_cache=d / "cache.sqlite"),
    )
    result = job.run()
    assert spec.data.holdout is not None
    yield {
        "dir": d,
        "db": db,
        "trust": str(d / "keys" / "trust.json"),
        "keys": d / "keys",
        "ledger": ledger,
        "client": client,
        "result": result,
        "kolm": str(result.artifact_path),
        "holdout": Path(spec.data.holdout),
        "spec": spec,
    }
    client.close()
    ledger.close()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out + out.err


def _member(kolm: str, rel: str) -> bytes:
    with zipfile.ZipFile(kolm) as z:
        (name,) = [n for n in z.namelist() if n.endswith("/" + rel)]
        return z.read(name)


def _eval_predicate(w: dict[str, Any]) -> dict[str, Any]:
    b = w["client"].bundle(index=w["result"].eval_index)
    return dict(Statement.from_envelope(b.envelope).predicate)


# --------------------------------------------------------------------------- the record


def test_the_artifact_publishes_signed_outcomes_whose_root_is_the_eval_receipts(
    world: dict[str, Any],
) -> None:
    ep = _eval_predicate(world)
    raw = _member(world["kolm"], reexec.OUTCOMES_FILE)
    lines = raw.splitlines()
    assert raw.endswith(b"\n") and len(lines) == ep["n"] == world["result"].k_score.n
    assert reexec.outcomes_root(lines) == ep["outcome_root"]
    rows = [json.loads(x) for x in lines]
    assert sum(r["correct"] for r in rows) == ep["correct"]
    assert reexec.holdout_root([r["example"] for r in rows]) == ep["holdout_digest"]
    manifest = json.loads(_member(world["kolm"], "manifest.json"))
    assert manifest["evaluation"]["outcomes"] == reexec.OUTCOMES_FILE
    assert manifest["evaluation"]["outcome_root"] == ep["outcome_root"]
    # the determinism record: in the manifest and the eval receipt, the same
    det = manifest["determinism"]
    assert det == ep["determinism"]
    from importlib import metadata

    assert det["torch"] == metadata.version("torch")
    assert (det["threads"], det["dtype"], det["batch_size"]) == (1, "float32", 64)
    assert det["probe"] == reexec.PROBE_ID and len(det["probe_digest"]) == 64


# --------------------------------------------------------------------------- kscore verify


def test_kscore_verify_re_executes_to_the_signed_kscore(
    world: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out = run(
        capsys, "kscore", "verify", world["kolm"], "--holdout", str(world["holdout"]),
        "--db", world["db"], "--trust", world["trust"],
    )  # fmt: skip
    assert rc == 0, out
    k = world["result"].k_score
    assert f"OK: K-score re-executed: matches the signed eval receipt ({k.score:.2f}" in out
    assert f"re-executed {k.n} examples (1 threads, batch 64): {k.correct} correct" in out
    assert "probe digest matches" in out
    # the same over gRPC
    rc, out = run(
        capsys, "kscore", "verify", world["kolm"], "--holdout", str(world["holdout"]),
        "--ledger", world["ledger"].target, "--trust", world["trust"],
    )  # fmt: skip
    assert rc == 0, out


def test_another_environment_is_reported_and_labels_still_decide(
    world: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out = run(
        capsys, "kscore", "verify", world["kolm"], "--holdout", str(world["holdout"]),
        "--db", world["db"], "--trust", world["trust"], "--threads", "2",
    )  # fmt: skip
    assert rc == 0, out
    assert "(5) environment differs from the evaluation's" in out
    assert "threads: 2 here, 1 at evaluation" in out
    rec = {"torch": "2.0.0", "threads": 1, "dtype": "float32", "batch_size": 64, "cpu": "x",
           "probe": reexec.PROBE_ID, "probe_digest": "0" * 64}  # fmt: skip
    here = {**rec, "torch": "2.13.0", "probe_digest": "1" * 64}
    assert reexec.environment_differences(rec, here) == [
        "torch: '2.13.0' here, '2.0.0' at evaluation",
        "the probe batch's answers differ from the evaluation's (other arithmetic)",
    ]
    assert reexec.environment_differences(None, here) == [
        "the artifact records no determinism settings (made by an older kolm)"
    ]


def test_an_inflated_eval_receipt_resigned_with_the_compile_key_is_caught(
    world: dict[str, Any], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from kolm_compile.kscore import wilson_interval

    ep = _eval_predicate(world)
    n, correct = ep["n"], ep["correct"]
    better = min(n, correct + 5)
    assert better > correct
    low, high = wilson_interval(better, n)
    forged = eval_statement(
        artifact_digest=world["result"].artifact_digest,
        holdout_digest=ep["holdout_digest"],
        n=n,
        correct=better,  # consistent arithmetic: only re-execution can object
        k_score=100.0 * better / n,
        interval=(low, high),
        outcome_root=ep["outcome_root"],
        teacher_k_score=ep["teacher_k_score"],
        extra={"determinism": ep["determinism"]},
    )
    env = sign_statement(forged, PrivateKey.load(world["keys"] / "compile.key"))
    res = world["client"].append(env, wait=True)
    bundle = tmp_path / "eval.kolm-receipt.json"
    bundle.write_bytes(world["client"].bundle(index=res.index).to_bytes())
    rc, out = run(
        capsys, "kscore", "verify", world["kolm"], "--holdout", str(world["holdout"]),
        "--eval-bundle", str(bundle), "--trust", world["trust"],
    )  # fmt: skip
    assert rc == 1, out
    assert "FAILED: K-score re-executed" in out
    assert f"correct: {correct} recomputed, the eval receipt says {better}" in out
    assert f"{correct}/{n} correct, the eval receipt says {better}/{n}" in out


def test_a_fabricated_outcomes_file_resigned_with_the_compile_key_is_caught_by_re_execution(
    world: dict[str, Any], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The whole forgery a compile key allows: every outcome "correct", the artifact
    re-packed and re-signed, eval and artifact receipts consistent with it. Only running
    the student shows it, at the first example the student really gets wrong."""
    from kolm_compile.artifact import pack, sha256_file
    from kolm_compile.kscore import wilson_interval
    from kolm_ledger.formats.receipts import artifact_statement

    ck = PrivateKey.load(world["keys"] / "compile.key")
    src = tmp_path / "unpacked"
    with zipfile.ZipFile(world["kolm"]) as z:
        z.extractall(src)
    (top,) = list(src.iterdir())
    outcomes = top / reexec.OUTCOMES_FILE
    rows = [json.loads(x) for x in outcomes.read_bytes().splitlines()]
    wrong = [i for i, r in enumerate(rows) if not r["correct"]]
    assert wrong, "the tiny student got everything right: nothing to fabricate"
    gold = {}
    for t, y in _holdout_rows(world):
        from kolm_ledger.formats.receipts import example_digest

        gold[example_digest(t, y)] = y
    lines = [reexec.outcome_line(r["example"], gold[r["example"]], True) for r in rows]
    outcomes.write_bytes(b"".join(x + b"\n" for x in lines))
    manifest = json.loads((top / "manifest.json").read_text())
    manifest["evaluation"]["outcome_root"] = reexec.outcomes_root(lines)
    (top / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    (top / "model.sig").unlink()
    forged_kolm = tmp_path / "forged.kolm"
    digest = pack(top, forged_kolm, ck)
    ep = _eval_predicate(world)
    n = len(rows)
    ev = sign_statement(
        eval_statement(
            artifact_digest=digest,
            holdout_digest=ep["holdout_digest"],
            n=n,
            correct=n,
            k_score=100.0,
            interval=wilson_interval(n, n),
            outcome_root=reexec.outcomes_root(lines),
            teacher_k_score=ep["teacher_k_score"],
            extra={"determinism": ep["determinism"]},
        ),
        ck,
    )
    c = world["client"]
    ev_leaf = c.append(ev, wait=True).leaf_hash
    c.append(
        sign_statement(
            artifact_statement(
                artifact_digest=digest,
                file_name=forged_kolm.name,
                file_digest=sha256_file(forged_kolm),
                base_model={"id": "sentence-transformers/all-MiniLM-L6-v2"},
                training_set_root="0" * 64,
                label_count=0,
                eval_receipt=ev_leaf.hex(),
                k_score=100.0,
                verifier=manifest["verifier"],
                compile_config_digest="0" * 64,
                kolm_version="0.1.0",
                checkpoint={"size": 0},
            ),
            ck,
        ),
        wait=True,
    )
    rc, out = run(
        capsys, "kscore", "verify", str(forged_kolm), "--holdout", str(world["holdout"]),
        "--db", world["db"], "--trust", world["trust"],
    )  # fmt: skip
    assert rc == 1, out
    i = wrong[0]
    row = _holdout_row_number(world, i)
    assert f"FAILED: K-score re-executed: differs at example {i} (holdout row {row})" in out
    assert f"example {i} (holdout row {row}): the artifact answers" in out
    assert "(correct: false), the published outcome is" in out


def _holdout_rows(world: dict[str, Any]) -> list[tuple[str, str]]:
    labels = set(world["spec"].labels)
    with world["holdout"].open(newline="", encoding="utf-8") as f:
        return [
            (r["text"].strip(), r["category"].strip())
            for r in csv.DictReader(f)
            if r["category"].strip() in labels
        ]


def _holdout_row_number(world: dict[str, Any], i: int) -> int:
    """The 1-based data row of the file holding evaluated example ``i``."""
    labels = set(world["spec"].labels)
    with world["holdout"].open(newline="", encoding="utf-8") as f:
        kept = [n for n, r in enumerate(csv.DictReader(f), 1) if r["category"] in labels]
    return kept[i]


def test_a_holdout_with_one_swapped_row_is_named_by_row(
    world: dict[str, Any], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    labels = list(world["spec"].labels)
    with world["holdout"].open(newline="", encoding="utf-8") as f:
        r = csv.DictReader(f)
        fields, data = r.fieldnames, list(r)
    assert fields is not None
    kept = [n for n, row in enumerate(data, 1) if row["category"] in labels]
    target = kept[7]  # the 8th evaluated example: give it another of the labels
    row = data[target - 1]
    row["category"] = next(y for y in labels if y != row["category"])
    swapped = tmp_path / "holdout.csv"
    with swapped.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(data)
    rc, out = run(
        capsys, "kscore", "verify", world["kolm"], "--holdout", str(swapped),
        "--db", world["db"], "--trust", world["trust"],
    )  # fmt: skip
    assert rc == 1, out
    assert f"holdout row {target} (example 7) is not the evaluated example" in out
    # the wrong holdout is not run
    assert f"FAILED: K-score not re-executed: holdout row {target} (example 7)" in out


def test_kscore_verify_refuses_an_artifact_not_signed_by_a_trusted_key(
    world: dict[str, Any], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    other = init_keys(tmp_path / "other")
    del other
    rc, out = run(
        capsys, "kscore", "verify", world["kolm"], "--holdout", str(world["holdout"]),
        "--db", world["db"], "--trust", str(tmp_path / "other" / "trust.json"),
    )  # fmt: skip
    assert rc == 1, out
    assert "FAILED: artifact:" in out and "not signed by a trusted, valid compile key" in out


# --------------------------------------------------------------------------- replay


@pytest.fixture(scope="module")
def answered(world: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The inference engine answers a few holdout inputs (batched together, as a service
    would); returns its predictions."""
    from kolm_infer.engine import Engine
    from kolm_ledger.keys import TrustRoot

    trust = TrustRoot.load(world["trust"])
    texts = [t for t, _ in _holdout_rows(world)[:6]]

    async def go() -> list[Any]:
        engine = Engine(
            trust,
            LedgerClient(world["ledger"].target),
            model_threads=1,
            on_teacher_failure="student",  # no teacher here: the flagged answer, not a refusal
        )
        try:
            await asyncio.to_thread(engine.load, Path(world["kolm"]))
            got = await asyncio.gather(
                *(engine.predict(world["spec"].name, t, recall_k=0) for t in texts)
            )
            return [p for _, p in got]
        finally:
            await engine.close()

    preds = asyncio.run(go())
    yield {"texts": texts, "preds": preds}


def _receipt(
    world: dict[str, Any], tmp: Path, text: str, *, output: str, backend: str = "student",
    reason: str = "confident", confidence: float, name: str = "p",
) -> list[str]:  # fmt: skip
    from kolm_infer.receipts import sign_prediction

    env, salt, _ = sign_prediction(
        PrivateKey.load(world["keys"] / "infer.key"),
        artifact_digest=world["result"].artifact_digest,
        input_value=text,
        output=output,
        verdict={"name": "label_set", "version": "1", "spec_digest": "0" * 64, "ok": True},
        backend=backend,
        reason=reason,
        confidence=confidence,
        latency_ms=1.0,
        request_id=name,
    )
    res = world["client"].append(env, wait=True)
    b = tmp / f"{name}.kolm-receipt.json"
    b.write_bytes(world["client"].bundle(index=res.index).to_bytes())
    inp = tmp / f"{name}.txt"
    inp.write_text(text, encoding="utf-8")
    return [
        "verify", str(b), "--trust", world["trust"], "--artifact", world["kolm"],
        "--input", str(inp), "--salt", salt.hex(), "--replay",
    ]  # fmt: skip


def test_replay_reproduces_the_engines_answers(
    world: dict[str, Any],
    answered: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    p = answered["preds"][0]
    assert p.backend == "student"
    argv = _receipt(world, tmp_path, answered["texts"][0], output=p.output, confidence=p.confidence)
    rc, out = run(capsys, *argv)
    assert rc == 0, out
    assert f"(replay) the student answers {json.dumps(p.output)} again" in out
    assert "within 0.0001" in out and "probe digest matches" in out
    # the API, warm: every engine answer (computed in one batch) replays within 1e-4
    from datetime import UTC, datetime

    from kolm_ledger.keys import TrustRoot

    trust = TrustRoot.load(world["trust"])
    art = reexec.load_student(world["kolm"], trust.by_role("compile"), at=datetime.now(UTC))
    try:
        for text, q in zip(answered["texts"], answered["preds"], strict=True):
            ((label, conf),) = art.predict([text])
            assert label == q.output or q.reason != "confident"
            assert abs(conf - q.confidence) <= reexec.REPLAY_TOLERANCE
    finally:
        art.close()


def test_a_prediction_resigned_with_another_label_is_caught_by_replay(
    world: dict[str, Any],
    answered: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    p = answered["preds"][1]
    other = next(y for y in world["spec"].labels if y != p.output)
    argv = _receipt(world, tmp_path, answered["texts"][1], output=other, confidence=p.confidence)
    rc, out = run(capsys, *argv)
    assert rc == 1, out
    assert "FAILED at step replay: the student answers" in out
    assert f"the receipt says {json.dumps(other)}" in out
    # without --replay the same forged receipt passes every other step: that is the gap
    rc, out = run(capsys, *argv[:-1])
    assert rc == 0, out


def test_a_confidence_beyond_the_tolerance_with_the_same_label_is_an_environment_difference(
    world: dict[str, Any],
    answered: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    p = answered["preds"][2]
    argv = _receipt(
        world, tmp_path, answered["texts"][2], output=p.output, confidence=p.confidence - 0.01
    )
    rc, out = run(capsys, *argv)
    assert rc == 0, out
    assert "an environment difference, not tampering" in out


def test_a_teacher_answer_is_not_replayable_and_does_not_fail(
    world: dict[str, Any],
    answered: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    p = answered["preds"][3]
    other = next(y for y in world["spec"].labels if y != p.output)
    argv = _receipt(
        world, tmp_path, answered["texts"][3], output=other, backend="teacher",
        reason="low_confidence", confidence=0.3,
    )  # fmt: skip
    rc, out = run(capsys, *argv)
    assert rc == 0, out
    assert "(replay) not replayable: answered by the teacher" in out


def test_replay_needs_the_input_and_the_artifact(
    world: dict[str, Any],
    answered: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    p = answered["preds"][4]
    argv = _receipt(world, tmp_path, answered["texts"][4], output=p.output, confidence=0.9)
    i = argv.index("--artifact")
    rc, out = run(capsys, *(argv[:i] + argv[i + 2 :]))
    assert rc == 1 and "--replay needs --artifact FILE.kolm" in out, out


# --------------------------------------------------------------------------- report


def test_report_shows_the_re_executed_kscore(
    world: dict[str, Any], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out_html = tmp_path / "r.html"
    rc, out = run(
        capsys, "report", world["result"].artifact_digest, "--db", world["db"],
        "--trust", world["trust"], "--holdout", str(world["holdout"]),
        "--artifact", world["kolm"], "--out", str(out_html),
    )  # fmt: skip
    assert rc == 0 and "K-score re-executed: matches" in out, out
    html = out_html.read_text()
    assert "K-score re-executed: matches" in html
