"""A real compile: simulated teacher → voted, signed labels through a real ledger service →
LoRA student → K-score → signed .kolm, verified by kolm, by model_signing and by provenance."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml
from _servers import LedgerThread

from kolm_compile.artifact import verify_artifact
from kolm_compile.compiler import STAGES, ClientSink, CompileJob, StageEvent
from kolm_compile.spec import TaskSpec
from kolm_ledger.client import LedgerClient
from kolm_ledger.dsse import Envelope
from kolm_ledger.errors import KolmError, SpecError, UnavailableError
from kolm_ledger.keys import PrivateKey, TrustRoot, init_keys
from kolm_ledger.trust import TrustState

pytestmark = [pytest.mark.ml, pytest.mark.slow]

EXAMPLES = Path(__file__).resolve().parents[1] / "kolm_compile" / "examples"
KOLM = [sys.executable, "-m", "kolm_ledger.cli"]


def tiny_spec(labels: int = 4, per_label: int = 20) -> TaskSpec:
    raw = yaml.safe_load((EXAMPLES / "banking77-router.yaml").read_text())
    raw["labels"] = raw["labels"][:labels]
    raw["data"]["limit_per_label"] = per_label
    raw["student"].update(epochs=3, max_length=32, batch_size=16)
    return TaskSpec.from_dict(raw, EXAMPLES)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    d = tmp_path_factory.mktemp("compile")
    trust = init_keys(d / "keys")
    ledger = LedgerThread(
        f"sqlite:///{d / 'ledger.db'}", trust, PrivateKey.load(d / "keys" / "log.key")
    )
    events: list[StageEvent] = []
    client = LedgerClient(ledger.target, timeout=120)
    job = CompileJob(
        tiny_spec(),
        keys_dir=d / "keys",
        sink=ClientSink(client),
        work_dir=d / "work",
        out_dir=d / "out",
        threads=1,
        on_event=events.append,
    )
    result = job.run()
    yield {
        "dir": d,
        "trust": trust,
        "ledger": ledger,
        "client": client,
        "result": result,
        "events": events,
    }
    client.close()
    ledger.close()


def test_stages_run_in_order_with_progress(world: dict[str, Any]) -> None:
    started = [e.stage for e in world["events"] if e.state == "started"]
    finished = [e.stage for e in world["events"] if e.state == "finished"]
    assert started == list(STAGES) == finished
    assert any(e.stage == "train" and e.state == "progress" for e in world["events"])


def test_student_learned_and_every_trained_label_is_logged(world: dict[str, Any]) -> None:
    r = world["result"]
    assert r.k_score.score > 100 / 4 + 20, r.k_score  # well above chance on 4 labels
    assert r.k_score.low <= r.k_score.score <= r.k_score.high
    assert r.teacher_vote.score >= r.teacher_single.score  # voting helps the teacher
    assert r.labels_logged == r.labels_accepted <= r.labels_sampled
    labels = world["client"].find(kind="label", limit=10_000)
    assert len(labels) == r.labels_logged


def test_artifact_verifies_with_kolm_and_with_model_signing(world: dict[str, Any]) -> None:
    r, d = world["result"], world["dir"]
    v = verify_artifact(r.artifact_path, TrustState(world["trust"]), into=d / "v")
    assert v.digest == r.artifact_digest
    assert v.manifest["labels"] == list(tiny_spec().labels or ())
    unz = d / "unzipped"
    with zipfile.ZipFile(r.artifact_path) as z:
        z.extractall(unz)
    cli = Path(sys.executable).with_name("model_signing")
    p = subprocess.run(
        [
            str(cli),
            "verify",
            "key",
            str(unz / v.name),
            "--signature",
            str(unz / v.name / "model.sig"),
            "--public_key",
            str(d / "keys" / "compile.pub"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    # nothing in the artifact names a local path
    with zipfile.ZipFile(r.artifact_path) as z:
        for n in z.namelist():
            assert str(d) not in z.read(n).decode("utf-8", "replace"), n


def test_provenance_recomputes_from_the_ledger(world: dict[str, Any]) -> None:
    r, d = world["result"], world["dir"]
    p = subprocess.run(
        [
            *KOLM,
            "provenance",
            "--ledger",
            world["ledger"].target,
            r.artifact_digest,
            "--trust",
            str(d / "keys" / "trust.json"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert "matches" in p.stdout and f"{r.k_score.score:.2f}" in p.stdout


def test_same_spec_seed_and_cache_give_a_byte_identical_kolm(world: dict[str, Any]) -> None:
    d = world["dir"]
    work2 = d / "work2"
    shutil.copytree(d / "work", work2)  # same teacher cache
    r2 = CompileJob(
        tiny_spec(),
        keys_dir=d / "keys",
        sink=ClientSink(world["client"]),
        work_dir=work2,
        out_dir=d / "out2",
        threads=1,
    ).run()
    first = world["result"]
    assert r2.artifact_digest == first.artifact_digest
    sha = [
        hashlib.sha256(p.read_bytes()).hexdigest() for p in (first.artifact_path, r2.artifact_path)
    ]
    assert sha[0] == sha[1]


class RejectingSink(ClientSink):
    """Refuses every third label receipt, as a ledger would refuse an append."""

    def append(self, envelopes: Sequence[Envelope]) -> list[tuple[int, bytes] | KolmError]:
        out: list[tuple[int, bytes] | KolmError] = []
        keep = []
        for i in range(len(envelopes)):
            if len(envelopes) > 1 and i % 3 == 0:
                out.append(UnavailableError("refused by the test"))
            else:
                keep.append(i)
                out.append(None)  # type: ignore[arg-type]
        got = super().append([envelopes[i] for i in keep]) if keep else []
        for i, g in zip(keep, got, strict=True):
            out[i] = g
        return out


def test_a_label_whose_append_failed_is_not_trained_on(
    world: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kolm_compile import _train

    seen: list[list[str]] = []
    real = _train.train_classifier

    def spy(texts: Any, labels: Any, *a: Any, **kw: Any) -> Any:
        seen.append(list(texts))
        return real(texts, labels, *a, **kw)

    monkeypatch.setattr(_train, "train_classifier", spy)
    spec = tiny_spec(labels=3, per_label=9)
    r = CompileJob(
        spec,
        keys_dir=world["dir"] / "keys",
        sink=RejectingSink(world["client"]),
        work_dir=tmp_path / "w",
        threads=1,
    ).run()
    assert r.labels_logged < r.labels_accepted
    assert len(seen[0]) == r.labels_logged
    logged = {e.envelope for e in world["client"].find(kind="label", limit=100_000)}
    import base64
    import json

    logged_inputs = set()
    for raw in logged:
        st = json.loads(base64.b64decode(json.loads(raw)["payload"]))
        if st["predicate"]["job_id"] == r.job_id:
            logged_inputs.add(st["predicate"]["input"])
    assert set(seen[0]) == logged_inputs


def test_bad_spec_names_the_field() -> None:
    raw = yaml.safe_load((EXAMPLES / "banking77-router.yaml").read_text())
    raw["teacher"]["k"] = 0
    with pytest.raises(SpecError, match=r"spec\.teacher\.k"):
        TaskSpec.from_dict(raw, EXAMPLES)


def test_compile_run_cli_end_to_end(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    init_keys(keys)
    raw = yaml.safe_load((EXAMPLES / "banking77-router.yaml").read_text())
    raw["labels"] = raw["labels"][:3]
    raw["data"]["limit_per_label"] = 8
    for k in ("dataset",):
        raw["teacher"][k] = str((EXAMPLES / raw["teacher"][k]).resolve())
    for k in ("unlabeled", "holdout"):
        raw["data"][k] = str((EXAMPLES / raw["data"][k]).resolve())
    raw["student"].update(epochs=1, max_length=32, batch_size=16)
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(raw))
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    p = subprocess.run(
        [
            *KOLM,
            "compile",
            "run",
            str(spec),
            "--db",
            db,
            "--keys",
            str(keys),
            "--work",
            str(tmp_path / "work"),
            "--out",
            str(tmp_path),
            "--threads",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert (tmp_path / "banking77-router.kolm").is_file()
    a = subprocess.run(
        [*KOLM, "audit", "--db", db, "--trust", str(keys / "trust.json")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert a.returncode == 0, a.stdout + a.stderr
    assert TrustRoot.load(keys / "trust.json")
