"""The README's operator commands, as a person types them: compile serve/submit, infer
serve, predict and verify, each a real `kolm` process on loopback."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from support.servers import LedgerThread

from kolm_ledger.keys import PrivateKey, init_keys

pytestmark = [pytest.mark.ml, pytest.mark.slow]
KOLM = [sys.executable, "-m", "kolm"]
EXAMPLES = Path(__file__).resolve().parents[2] / "kolm_compile" / "examples"


def _serve(args: list[str], ready: Path) -> subprocess.Popen[str]:
    p = subprocess.Popen(
        [*KOLM, *args, "--ready-file", str(ready)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for _ in range(1200):
        if ready.exists() and ready.read_text().strip():
            return p
        if p.poll() is not None:
            raise AssertionError(p.communicate())
        time.sleep(0.1)
    p.kill()
    raise AssertionError("server did not start")


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    ps: list[subprocess.Popen[str]] = []
    yield ps
    for p in ps:
        p.terminate()
        try:
            p.communicate(timeout=30)  # reap it and close its pipes
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()


def test_compile_serve_submit_infer_predict_verify(tmp_path: Path, procs: list) -> None:
    keys = tmp_path / "keys"
    trust = init_keys(keys)
    ledger = LedgerThread(
        f"sqlite:///{tmp_path / 'ledger.db'}", trust, PrivateKey.load(keys / "log.key")
    )
    try:
        work = tmp_path / "jobs"
        procs.append(
            _serve(
                [
                    "compile",
                    "serve",
                    "--ledger",
                    ledger.target,
                    "--keys",
                    str(keys),
                    "--work",
                    str(work),
                    "--listen",
                    "127.0.0.1:0",
                    "--insecure",
                    "--threads",
                    "1",
                ],
                tmp_path / "compile.port",
            )
        )
        compile_at = f"127.0.0.1:{(tmp_path / 'compile.port').read_text().strip()}"
        raw = yaml.safe_load((EXAMPLES / "banking77-router.yaml").read_text())
        raw["labels"] = raw["labels"][:3]
        raw["data"]["limit_per_label"] = 10
        raw["teacher"]["dataset"] = str((EXAMPLES / raw["teacher"]["dataset"]).resolve())
        for k in ("unlabeled", "holdout"):
            raw["data"][k] = str((EXAMPLES / raw["data"][k]).resolve())
        raw["student"].update(epochs=2, max_length=32, batch_size=16)
        spec = tmp_path / "spec.yaml"
        spec.write_text(yaml.safe_dump(raw))
        out = tmp_path / "router.kolm"
        s = subprocess.run(
            [
                *KOLM,
                "compile",
                "submit",
                str(spec),
                "--to",
                compile_at,
                "--watch",
                "--fetch",
                str(out),
            ],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert s.returncode == 0, s.stdout[-2000:] + s.stderr[-2000:]
        assert out.is_file()

        arts = tmp_path / "artifacts"
        arts.mkdir()
        out.rename(arts / out.name)
        procs.append(
            _serve(
                [
                    "infer",
                    "serve",
                    "--artifacts",
                    str(arts),
                    "--ledger",
                    ledger.target,
                    "--key",
                    str(keys / "infer.key"),
                    "--trust",
                    str(keys / "trust.json"),
                    "--spool",
                    str(tmp_path / "spool.db"),
                    "--listen",
                    "127.0.0.1:0",
                    "--insecure",
                ],
                tmp_path / "infer.port",
            )
        )
        infer_at = f"127.0.0.1:{(tmp_path / 'infer.port').read_text().strip()}"
        answer = tmp_path / "answer.kolm-receipt.json"
        p = subprocess.run(
            [
                *KOLM,
                "predict",
                "--to",
                infer_at,
                "--artifact",
                "banking77-router",
                "my card payment was declined",
                "--wait",
                "--out",
                str(answer),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert p.returncode == 0, p.stdout + p.stderr
        assert p.stdout.strip() in raw["labels"]
        v = subprocess.run(
            [
                *KOLM,
                "verify",
                str(answer),
                "--trust",
                str(keys / "trust.json"),
                "--ledger",
                ledger.target,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert v.returncode == 0, v.stdout + v.stderr
        assert "K-score" in v.stdout

        # without --wait: a promise file, and the salt saved (0600) to open the commitment
        text = tmp_path / "input.txt"
        text.write_text("my card payment was declined")
        promise, salt = tmp_path / "promise.json", tmp_path / "salt.hex"
        p = subprocess.run(
            [
                *KOLM,
                "predict",
                "--to",
                infer_at,
                "--artifact",
                "banking77-router",
                text.read_text(),
                "--out",
                str(promise),
                "--salt-out",
                str(salt),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert p.returncode == 0, p.stdout + p.stderr
        assert "(promise)" in p.stderr
        assert salt.stat().st_mode & 0o777 == 0o600
        assert len(bytes.fromhex(salt.read_text().strip())) >= 16
        verify_promise = [
            *KOLM,
            "verify",
            str(promise),
            "--trust",
            str(keys / "trust.json"),
            "--ledger",
            ledger.target,
            "--input",
            str(text),
            "--salt-file",
            str(salt),
        ]
        for _ in range(100):  # the ledger checkpoints the entry shortly after the promise
            v = subprocess.run(
                verify_promise, capture_output=True, text=True, timeout=120, check=False
            )
            if v.returncode == 0 or "has no entry" not in v.stdout:
                break
            time.sleep(0.2)
        assert v.returncode == 0, v.stdout + v.stderr
        assert "the input matches the commitment" in v.stdout, v.stdout
        text.write_text("some other input")  # the commitment opens for the input only
        v = subprocess.run(verify_promise, capture_output=True, text=True, timeout=120, check=False)
        assert v.returncode == 1, v.stdout + v.stderr
        assert v.stdout.startswith("FAILED at step 9"), v.stdout
    finally:
        ledger.close()
