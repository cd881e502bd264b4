"""The newcomer path: `kolm demo` (reduced size) and `kolm up`, as a person runs them."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

pytestmark = [pytest.mark.ml, pytest.mark.slow]
KOLM = [sys.executable, "-m", "kolm_ledger.cli"]


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
