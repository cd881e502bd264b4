"""The compile job beyond tests/compile/test_compile_pipeline.py: the one table reader, a resumed
job that reuses the label receipts the ledger already holds (``job_labels``), a job folder
that refuses another spec, and ``kolm compile run`` end to end (a rerun resumes)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from kolm_compile.pipeline import CompileJob, CompileOptions, JobCancelled, StageEvent
from kolm_compile.sinks import Acked, LocalLedgerSink
from kolm_compile.spec import TaskSpec, read_rows, read_table
from kolm_ledger.errors import ConflictError, FormatError, KolmError, SpecError
from kolm_ledger.formats.dsse import Envelope
from kolm_ledger.formats.receipts import job_digest
from kolm_ledger.keys import PrivateKey, TrustRoot, init_keys
from kolm_ledger.log.provenance import training_set_root

EXAMPLES = Path(__file__).resolve().parents[2] / "kolm_compile" / "examples"
KOLM = [sys.executable, "-m", "kolm"]


def tiny_raw(labels: int = 3, per_label: int = 8, epochs: int = 1) -> dict[str, Any]:
    raw = yaml.safe_load((EXAMPLES / "banking77-router.yaml").read_text())
    raw["labels"] = raw["labels"][:labels]
    raw["data"]["limit_per_label"] = per_label
    raw["student"].update(epochs=epochs, max_length=32, batch_size=16)
    return raw


# --------------------------------------------------------------------------- tables


def test_one_table_reader_for_csv_and_jsonl(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text("text,label,x\n  hi there ,  a \nbye,,1\n")
    (tmp_path / "t.jsonl").write_text(
        json.dumps({"text": " hi ", "label": "a"}) + "\n\n" + json.dumps({"text": "yo"}) + "\n"
    )
    assert read_table(tmp_path / "t.csv", "text", "label", "spec.data.unlabeled") == [
        ("hi there", "a"),
        ("bye", None),
    ]
    assert read_table(tmp_path / "t.jsonl", "text", "label", "spec.data.holdout") == [
        ("hi", "a"),
        ("yo", None),
    ]
    assert read_table(tmp_path / "t.csv", "text", None, "f") == [("hi there", None), ("bye", None)]
    with pytest.raises(SpecError, match=r"^spec\.data\.holdout: t\.csv has no column 'input'"):
        read_table(tmp_path / "t.csv", "input", "label", "spec.data.holdout")
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n[1]\n')
    with pytest.raises(SpecError, match=r"^spec\.data\.seed_pairs: bad\.jsonl line 2: must be"):
        read_table(tmp_path / "bad.jsonl", "text", "label", "spec.data.seed_pairs")
    with pytest.raises(SpecError, match=r"^spec\.data\.unlabeled: cannot read absent\.csv"):
        read_table(tmp_path / "absent.csv", "text", "label", "spec.data.unlabeled")
    # the simulated teacher reads its gold table with the same reader
    (tmp_path / "nojson.jsonl").write_text("{\n")
    with pytest.raises(FormatError, match=r"nojson\.jsonl line 1: not JSON"):
        list(read_rows(tmp_path / "nojson.jsonl"))


# --------------------------------------------------------------------------- resume


def _embed(texts: list[str]) -> Any:
    from kolm_compile.student import embed_texts

    return embed_texts(texts)


class CountingSink:
    """A LocalLedgerSink that counts the label receipts actually sent to the ledger."""

    def __init__(self, inner: LocalLedgerSink) -> None:
        self.inner, self.sent = inner, 0

    def append(self, envelopes: Sequence[Envelope]) -> list[Acked | KolmError]:
        self.sent += len(envelopes)
        return self.inner.append(envelopes)

    def checkpoint(self) -> dict[str, Any]:
        return self.inner.checkpoint()

    def job_labels(self, job_id: str) -> dict[str, Acked]:
        return self.inner.job_labels(job_id)


@pytest.mark.ml
@pytest.mark.slow
def test_a_job_that_lost_its_sign_progress_reuses_the_labels_the_ledger_holds(
    tmp_path: Path,
) -> None:
    keys = tmp_path / "keys"
    init_keys(keys)
    key = PrivateKey.load(keys / "compile.key")
    local = LocalLedgerSink.open(f"sqlite:///{tmp_path / 'ledger.db'}", keys)
    spec = TaskSpec.from_dict(tiny_raw(), EXAMPLES)
    opts = CompileOptions(threads=1, label_batch=7)
    stop = {"now": False}

    def on_event(e: StageEvent) -> None:
        if e.stage == "train":
            stop["now"] = True

    try:
        job = CompileJob(spec, key=key, sink=local, job_dir=tmp_path / "job", options=opts,
                         on_event=on_event, should_stop=lambda: stop["now"], embed=_embed)  # fmt: skip
        with pytest.raises(JobCancelled):
            job.run()
        logged = local.job_labels(job.job_id)
        assert logged and all(isinstance(a, Acked) for a in logged.values())
        # the job folder forgets that it signed (as if it died before writing it down); its
        # stage time is gone too, so re-signed receipts would differ from the logged ones
        for name in ("sign.json", "sign.partial.json", "sign.time"):
            (job.stage_dir / name).unlink(missing_ok=True)
        counting = CountingSink(local)
        events: list[StageEvent] = []
        again = CompileJob(spec, key=key, sink=counting, job_dir=tmp_path / "job", options=opts,
                           on_event=events.append, embed=_embed)  # fmt: skip
        r = again.run()
        assert again.job_id == job.job_id
        sign = json.loads((again.stage_dir / "sign.json").read_text())
        assert sign["_counters"]["reused"] == len(logged) == r.labels_logged
        assert counting.sent == 2  # only the eval and the artifact receipts were appended
        entries = local.ledger.store.find(
            subject_digest=job_digest(r.job_id), kind="label", limit=100_000
        )
        assert len(entries) == r.labels_logged == len(sign["logged"])
        assert training_set_root([e.leaf_hash for e in entries]) == r.training_set_root
        assert (r.labels_sampled, r.labels_accepted) == (r.labels["sampled"], r.labels["accepted"])
        assert r.labels_rejected == r.labels_sampled - r.labels_accepted
        assert r.eval_index >= 0 and r.recall is None
    finally:
        local.close()


def test_a_job_folder_refuses_another_spec(tmp_path: Path, keydir: Path) -> None:
    key = PrivateKey.load(keydir / "compile.key")
    sink = LocalLedgerSink.open(f"sqlite:///{tmp_path / 'l.db'}", keydir)
    try:
        CompileJob(TaskSpec.from_dict(tiny_raw(), EXAMPLES), key=key, sink=sink,
                   job_dir=tmp_path / "j")  # fmt: skip
        with pytest.raises(ConflictError, match="of another spec"):
            CompileJob(TaskSpec.from_dict(tiny_raw(labels=4), EXAMPLES), key=key, sink=sink,
                       job_dir=tmp_path / "j")  # fmt: skip
    finally:
        sink.close()


# --------------------------------------------------------------------------- the CLI


@pytest.mark.ml
@pytest.mark.slow
def test_compile_run_cli_end_to_end_and_a_rerun_resumes(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    init_keys(keys)
    raw = tiny_raw()
    raw["teacher"]["dataset"] = str((EXAMPLES / raw["teacher"]["dataset"]).resolve())
    for k in ("unlabeled", "holdout"):
        raw["data"][k] = str((EXAMPLES / raw["data"][k]).resolve())
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(raw))
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    cmd = [*KOLM, "compile", "run", str(spec), "--db", db, "--keys", str(keys),
           "--work", str(tmp_path / "work"), "--out", str(tmp_path), "--threads", "1", "--json"]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    first = json.loads(p.stdout[p.stdout.index("{\n") :])
    assert (tmp_path / "banking77-router.kolm").is_file()
    assert first["labels"]["logged"] > 0 and first["cost"]["teacher_calls"] > 0
    a = subprocess.run(
        [*KOLM, "audit", "--db", db, "--trust", str(keys / "trust.json")],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert a.returncode == 0, a.stdout + a.stderr
    # the same command again resumes the finished job: same artifact, no new receipt
    from kolm_ledger.storage import Store

    store = Store(db)
    size = store.size()
    store.close()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    again = json.loads(p.stdout[p.stdout.index("{\n") :])
    assert again["artifact_digest"] == first["artifact_digest"]
    assert again["job_id"] == first["job_id"]
    store = Store(db)
    assert store.size() == size
    store.close()
    assert TrustRoot.load(keys / "trust.json")
