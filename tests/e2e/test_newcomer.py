"""The newcomer path: `kolm demo` (reduced size) and `kolm up`, as a person runs them."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

pytestmark = [pytest.mark.ml, pytest.mark.slow]
KOLM = [sys.executable, "-m", "kolm"]


def test_demo_runs_the_whole_story(tmp_path: Path) -> None:
    d = tmp_path / "demo"
    p = subprocess.run(
        [*KOLM, "demo", "--dir", str(d), "--small", "--tickets", "24", "--threads", "1"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    s = json.loads((d / "summary.json").read_text())
    assert s["audit_ok"] and s["tamper_caught"]
    assert s["predictions"] == 24 and s["k_score"]["score"] > 50
    for f in (
        "ledger.db",
        "keys/trust.json",
        "prediction.kolm-receipt.json",
        "tampered.db",
        "artifacts/banking77-router.kolm",
    ):
        assert (d / f).exists(), f
    assert "kolm demo — summary" in p.stdout and str(d) in p.stdout.replace("\n", "")
    # the bundle it wrote verifies with the CLI an auditor uses
    v = subprocess.run(
        [
            *KOLM,
            "verify",
            str(d / "prediction.kolm-receipt.json"),
            "--trust",
            str(d / "keys" / "trust.json"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert v.returncode == 0, v.stdout + v.stderr
    _assert_recall_shown_and_verified(d, p.stdout)


def _assert_recall_shown_and_verified(d: Path, stdout: str) -> None:
    """Recall end to end: evidence shown, step 10 ok, cited ids are indexed example digests."""
    import base64
    import re

    from kolm_ledger.formats.receipts import example_digest
    from kolm_ledger.keys import TrustRoot
    from kolm_ledger.verify.recall_proof import chunk_digest, read_artifact_corpus

    s = json.loads((d / "summary.json").read_text())
    r = s["recall"]
    assert r is not None, "the demo built no recall index (is kolm[recall] installed?)"
    assert r["k"] == 5 and r["evidence_checked"] and s["verify_steps"]["check evidence"]
    assert all(s["verify_steps"].values()), s["verify_steps"]
    assert "artifact file" in r["corpus_source"]
    out = stdout.replace("\n", " ")
    assert "answered with recall" in out
    assert re.search(r"ok\s+\(10\)\s+check evidence\s+5 cited examples", stdout), stdout
    assert "steps 1-10 passed" in out and "name their evidence" in out
    # the receipt's evidence, read from the bundle itself
    bundle = json.loads((d / "prediction.kolm-receipt.json").read_text())
    stmt = json.loads(base64.b64decode(bundle["envelope"]["payload"]))
    pred = stmt["predicate"]
    ev = pred["evidence"]
    assert [e["id"] for e in ev] == r["evidence_ids"] and len(ev) == 5
    for e in ev[:3]:  # the evidence table shows the top 3 neighbours with digest prefixes
        assert f"{e['id'][:8]}…" in stdout, e["id"]
    assert pred["corpus_root"] == r["corpus_root"]
    # each cited id is the digest of a labelled example in the artifact's signed index
    trust = TrustRoot.load(d / "keys" / "trust.json")
    corpus = read_artifact_corpus(
        d / "artifacts" / "banking77-router.kolm",
        trust,
        artifact_digest=pred["artifact_digest"],
        at=datetime.fromisoformat(pred["time"].replace("Z", "+00:00")),
        positions=[e["position"] for e in ev],
    )
    assert corpus.corpus_root == r["corpus_root"] and corpus.size == r["chunks"]
    for e in ev:
        row = corpus.chunks[e["position"]]
        assert row.id == e["id"] and row.label == e["label"] and row.label
        assert row.id == example_digest(row.text, row.label)
        assert e["digest"] == chunk_digest(row.id, row.text, row.label)
    # an auditor's `kolm verify --artifact` runs step 10 too
    v = subprocess.run(
        [
            *KOLM,
            "verify",
            str(d / "prediction.kolm-receipt.json"),
            "--trust",
            str(d / "keys" / "trust.json"),
            "--artifact",
            str(d / "artifacts" / "banking77-router.kolm"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert v.returncode == 0, v.stdout + v.stderr
    assert "(10)  5 evidence chunk(s) are in the signed corpus" in v.stdout, v.stdout


def test_the_extract_demo_ends_in_a_verified_json_receipt(tmp_path: Path) -> None:
    d = tmp_path / "demo-x"
    p = subprocess.run(
        [*KOLM, "demo", "--task", "extract", "--dir", str(d), "--small", "--tickets", "12",
         "--threads", "2"],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )  # fmt: skip
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    s = json.loads((d / "summary.json").read_text())
    assert s["task"] == "extract" and s["audit_ok"]
    assert s["served"]["n"] == 12
    frame = json.loads(s["prediction_output"])  # the verified receipt's output is JSON
    assert set(frame) <= {"intent", "slots"} and "intent" in frame
    assert all(s["verify_steps"][k] for k in list(s["verify_steps"])[:9])
    assert "kolm demo --task extract — summary" in p.stdout
    assert (d / "artifacts" / "snips-extract.kolm").exists()
    v = subprocess.run(
        [*KOLM, "verify", str(d / "prediction.kolm-receipt.json"), "--trust",
         str(d / "keys" / "trust.json")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )  # fmt: skip
    assert v.returncode == 0, v.stdout + v.stderr


def test_up_serves_three_healthy_services_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    ready = tmp_path / "ready.json"
    proc = subprocess.Popen(
        [
            *KOLM,
            "up",
            "--dir",
            str(tmp_path / "up"),
            "--ledger-port",
            "0",
            "--infer-port",
            "0",
            "--compile-port",
            "0",
            "--ready-file",
            str(ready),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for _ in range(600):
            if ready.exists() or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert ready.exists(), proc.communicate(timeout=10)
        addrs = json.loads(ready.read_text())
        for name in ("ledger", "compile", "infer"):
            with grpc.insecure_channel(addrs[name]) as ch:
                r = health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(), timeout=10
                )
                assert r.status == health_pb2.HealthCheckResponse.SERVING, name
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert "ledger" in out and "stopping" in out
    finally:
        if proc.poll() is None:
            proc.kill()
