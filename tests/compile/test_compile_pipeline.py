"""The resumable compile pipeline (kolm_compile.pipeline) through a REAL ledger service:
simulated teacher → voted, signed, acknowledged labels → LoRA student → K-score → signed
.kolm, checked by kolm, by model_signing and by ``kolm provenance``; determinism; labels
the ledger refused are not trained on; tampered cache entries; bad specs; stage resume."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import sys
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.servers import LedgerThread

from kolm_compile.artifact import verify_artifact
from kolm_compile.pipeline import (
    STAGES,
    CompileJob,
    CompileOptions,
    CompileResult,
    JobCancelled,
    StageEvent,
)
from kolm_compile.sinks import Acked, LocalLedgerSink, ServiceSink
from kolm_compile.spec import TaskSpec
from kolm_ledger.errors import KolmError, SpecError, VerificationError
from kolm_ledger.formats.dsse import Envelope
from kolm_ledger.formats.receipts import Statement, job_digest
from kolm_ledger.keys import PrivateKey, init_keys
from kolm_ledger.log.provenance import training_set_root
from kolm_ledger.service.client import LedgerClient
from kolm_ledger.verify.trust import TrustState

pytestmark = [pytest.mark.ml]

EXAMPLES = Path(__file__).resolve().parents[2] / "kolm_compile" / "examples"
KOLM = [sys.executable, "-m", "kolm"]


def tiny_raw(labels: int = 4, per_label: int = 24) -> dict[str, Any]:
    raw = yaml.safe_load((EXAMPLES / "banking77-router.yaml").read_text())
    raw["labels"] = raw["labels"][:labels]
    raw["data"]["limit_per_label"] = per_label
    raw["student"].update(epochs=3, max_length=32, batch_size=16)
    return raw


def tiny_spec(**kw: Any) -> TaskSpec:
    return TaskSpec.from_dict(tiny_raw(**kw), EXAMPLES)


def _embed(texts: list[str]) -> Any:
    from kolm_compile.student import embed_texts

    return embed_texts(texts)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    d = tmp_path_factory.mktemp("pipeline")
    trust = init_keys(d / "keys")
    ledger = LedgerThread(
        f"sqlite:///{d / 'ledger.db'}", trust, PrivateKey.load(d / "keys" / "log.key")
    )
    client = LedgerClient(ledger.target, timeout=120)
    key = PrivateKey.load(d / "keys" / "compile.key")

    def compile_(name: str, **kw: Any) -> tuple[CompileJob, list[StageEvent]]:
        events: list[StageEvent] = []
        kw.setdefault("options", CompileOptions(threads=1, teacher_cache=d / "cache.sqlite"))
        kw.setdefault("sink", ServiceSink(client))
        job = CompileJob(
            kw.pop("spec", None) or tiny_spec(),
            key=key,
            job_dir=d / name,
            on_event=events.append,
            embed=_embed,
            **kw,
        )
        return job, events

    job, events = compile_("job-a", out_dir=d / "out-a")
    result = job.run()
    yield {
        "dir": d,
        "trust": trust,
        "ledger": ledger,
        "client": client,
        "key": key,
        "compile": compile_,
        "job": job,
        "result": result,
        "events": events,
    }
    client.close()
    ledger.close()


@pytest.mark.slow
def test_stages_in_order_with_progress(world: dict[str, Any]) -> None:
    ev: Sequence[StageEvent] = world["events"]
    assert [e.stage for e in ev if e.state == "started"] == list(STAGES)
    assert [e.stage for e in ev if e.state == "finished"] == list(STAGES)
    assert any(e.stage == "train" and e.state == "progress" for e in ev)
    assert any(e.stage == "sign" and e.state == "progress" for e in ev)


@pytest.mark.slow
def test_each_stage_file_reads_back_into_its_dataclass_and_writes_the_same_json(
    world: dict[str, Any],
) -> None:
    """A resumed job reads stages/<stage>.json with the stage's from_json: nothing is
    lost or renamed on the way (to_json gives the file's JSON back, bar _seconds)."""
    from kolm_compile.pipeline import outputs as result

    classes = (result.Ingested, result.Sampled, result.Voted, result.Signed, result.Trained,
               result.Evaluated, result.Packaged)  # fmt: skip
    types = dict(zip(STAGES, classes, strict=True))
    for stage, cls in types.items():
        stored = json.loads((world["job"].stage_dir / f"{stage}.json").read_text())
        assert stored.pop("_seconds") >= 0
        assert json.dumps(cls.from_json(stored).to_json(), sort_keys=True) == json.dumps(
            stored, sort_keys=True
        ), stage
    sign = result.Signed.from_json(json.loads((world["job"].stage_dir / "sign.json").read_text()))
    assert [r.ledger_index for r in sign.logged] == sorted(r.ledger_index for r in sign.logged)


@pytest.mark.slow
def test_student_beats_chance_and_every_trained_label_has_a_receipt(
    world: dict[str, Any],
) -> None:
    r: CompileResult = world["result"]
    assert r.k_score.score > 100 / 4 + 25, r.k_score  # 4 labels: chance is 25
    assert r.k_score.low <= r.k_score.score <= r.k_score.high and r.k_score.n > 100
    assert r.teacher_vote.score >= r.teacher_single.score
    trained = json.loads((world["job"].dir / "train_set.json").read_text())
    labels = world["client"].find(subject_digest=job_digest(r.job_id), kind="label")
    assert len(labels) == len(trained["texts"]) == r.labels["logged"] == r.labels["accepted"]
    # trained examples are exactly the receipts' {input, output}, in ledger index order
    got = [Statement.from_envelope(Envelope.from_bytes(e.envelope)).predicate for e in labels]
    assert [(p["input"], p["output"]) for p in got] == list(
        zip(trained["texts"], trained["labels"], strict=True)
    )
    c = r.cost
    assert c["teacher_calls"] > 0 and c["estimated_cost"] > 0
    assert 0 < c["student_cost_per_call"] < c["teacher_cost_per_call"]
    assert c["assumed_dollars_per_cpu_hour"] == 0.05


@pytest.mark.slow
def test_artifact_verifies_with_kolm_model_signing_and_provenance(world: dict[str, Any]) -> None:
    r: CompileResult = world["result"]
    d = world["dir"]
    v = verify_artifact(r.artifact_path, TrustState(world["trust"]), into=d / "v")
    assert v.digest == r.artifact_digest
    assert v.manifest.labels == tuple(tiny_spec().labels or ())
    assert v.manifest.format == "kolm/v1" and v.manifest.adapter == "adapter"
    unz = d / "unzipped"
    with zipfile.ZipFile(r.artifact_path) as z:
        z.extractall(unz)
        for n in z.namelist():  # no local path, no job id inside
            body = z.read(n).decode("utf-8", "replace")
            assert str(d) not in body and r.job_id not in body, n
    cli = Path(sys.executable).with_name("model_signing")
    p = subprocess.run(
        [str(cli), "verify", "key", str(unz / v.name), "--signature",
         str(unz / v.name / "model.sig"), "--public_key", str(d / "keys" / "compile.pub")],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    p = subprocess.run(
        [*KOLM, "provenance", "--ledger", world["ledger"].target, r.artifact_digest,
         "--trust", str(d / "keys" / "trust.json")],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    assert "matches" in p.stdout and f"{r.k_score.score:.2f}" in p.stdout
    prov = world["client"].provenance(r.artifact_digest)
    assert prov.recomputed_root == prov.training_set_root == r.training_set_root


@pytest.mark.slow
def test_same_spec_seed_and_cache_give_a_byte_identical_kolm(world: dict[str, Any]) -> None:
    d = world["dir"]
    job, _ = world["compile"]("job-b", out_dir=d / "out-b")
    r2 = job.run()
    r1: CompileResult = world["result"]
    assert job.teacher_misses == 0  # the shared cache answered every sample
    assert r2.job_id != r1.job_id
    assert r2.artifact_digest == r1.artifact_digest
    assert hashlib.sha256(r2.artifact_path.read_bytes()).hexdigest() == r1.file_digest
    a1 = world["job"].model_dir() / "adapter" / "adapter_model.safetensors"
    assert (
        a1.read_bytes() == (job.model_dir() / "adapter" / "adapter_model.safetensors").read_bytes()
    )
    # both jobs' provenance holds on the same ledger (each names its own labels)
    for r in (r1, r2):
        assert world["client"].provenance(r.artifact_digest).root_matches


class RefusingSink:
    """Refuses every 4th label receipt, as a ledger that rejected them would."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.refused, self.n = inner, set(), 0

    def append(self, envelopes: Sequence[Envelope]) -> list[Acked | KolmError]:
        keep, out = [], []
        for env in envelopes:
            st = Statement.from_envelope(env)
            if st.kind == "label":
                self.n += 1
                if self.n % 4 == 0:
                    self.refused.add(st.predicate["input"])
                    out.append(None)
                    continue
            keep.append(env)
            out.append(True)
        res = iter(self.inner.append(keep) if keep else [])
        return [KolmError("refused by test") if o is None else next(res) for o in out]

    def checkpoint(self) -> dict[str, Any]:
        return self.inner.checkpoint()


@pytest.mark.slow
def test_a_label_whose_append_failed_is_not_trained_on(world: dict[str, Any]) -> None:
    sink = RefusingSink(ServiceSink(world["client"]))
    stop = {"now": False}
    job, events = world["compile"]("job-refused", sink=sink, should_stop=lambda: stop["now"])
    job.emit = lambda e: (events.append(e), stop.update(now=e.stage == "train"))
    with pytest.raises(JobCancelled):
        job.run()
    assert sink.refused
    trained = json.loads((job.dir / "train_set.json").read_text())
    assert not sink.refused & set(trained["texts"])
    sign = json.loads((job.dir / "stages" / "sign.json").read_text())
    assert len(sign["failed"]) == len(sink.refused)
    assert len(trained["texts"]) == sign["_counters"]["signed"] - len(sink.refused)
    labels = world["client"].find(subject_digest=job_digest(job.job_id), kind="label")
    assert len(labels) == len(trained["texts"])


@pytest.mark.slow
def test_resume_after_an_interrupted_training_pays_no_teacher_call(
    world: dict[str, Any], tmp_path: Path
) -> None:
    stop = {"now": False}
    spec = tiny_spec(labels=3, per_label=16)
    opts = CompileOptions(threads=1, teacher_cache=tmp_path / "cache.sqlite")
    job, events = world["compile"]("job-resume", spec=spec, options=opts,
                                   should_stop=lambda: stop["now"])  # fmt: skip

    def on_event(e: StageEvent) -> None:
        events.append(e)
        if e.stage == "train" and e.state == "progress":
            stop["now"] = True

    job.emit = on_event
    with pytest.raises(JobCancelled):
        job.run()
    assert job.teacher_misses > 0
    assert job.finished_stages() == ["ingest", "sample", "vote", "sign"]
    again, ev2 = world["compile"]("job-resume", spec=spec, options=opts)
    r = again.run()
    assert again.job_id == job.job_id and again.teacher_misses == 0
    assert [e.stage for e in ev2 if e.state == "resumed"] == ["ingest", "sample", "vote", "sign"]
    # labels were signed once: provenance still recomputes the root and the count
    prov = world["client"].provenance(r.artifact_digest)
    assert prov.root_matches and prov.label_count == r.labels["logged"]


@pytest.mark.slow
def test_a_tampered_teacher_cache_entry_is_detected(world: dict[str, Any], tmp_path: Path) -> None:
    cache = tmp_path / "cache.sqlite"
    spec = tiny_spec(labels=2, per_label=4)
    opts = CompileOptions(threads=1, teacher_cache=cache)
    stop = {"now": False}
    job, _ = world["compile"]("job-tamper-1", spec=spec, options=opts,
                              should_stop=lambda: stop["now"])  # fmt: skip
    job.emit = lambda e: stop.update(
        now=stop["now"] or (e.stage, e.state) == ("sample", "finished")
    )
    with pytest.raises(JobCancelled):
        job.run()
    db = sqlite3.connect(cache)
    key, value = db.execute("SELECT key, value FROM teacher_cache LIMIT 1").fetchone()
    v = json.loads(value)
    v["text"] = "request_refund" if v["text"] != "request_refund" else "cash_withdrawal_charge"
    db.execute("UPDATE teacher_cache SET value = ? WHERE key = ?", (json.dumps(v), key))
    db.commit()
    db.close()
    job2, _ = world["compile"]("job-tamper-2", spec=spec, options=opts)
    with pytest.raises(VerificationError, match="digest mismatch"):
        job2.run()


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (
            lambda r: (
                r.update(task="extract", verifier=None),
                r.pop("labels"),
                # classify's own data fields (extract reads data.output_column)
                r["data"].pop("label_column"),
                r["data"].pop("limit_per_label"),
            ),
            "spec.output_schema",
        ),
        (lambda r: r["teacher"].update(k=0), "spec.teacher.k"),
        (lambda r: r["student"].update(max_length=2), "spec.student.max_length"),
        (lambda r: r["data"].pop("holdout"), "spec.data.holdout"),
        (lambda r: r["data"].update(text_column="nope"), "spec.data.unlabeled"),
        (lambda r: r.update(labels=["only_one"]), "spec.labels"),
    ],
)
def test_bad_specs_are_rejected_naming_the_field(
    edit: Any, field: str, tmp_path: Path, keydir: Path
) -> None:
    raw = tiny_raw()
    edit(raw)
    key = PrivateKey.load(keydir / "compile.key")
    sink = LocalLedgerSink.open(f"sqlite:///{tmp_path / 'l.db'}", keydir)
    try:
        with pytest.raises(SpecError, match=field.replace(".", r"\.")):
            spec = TaskSpec.from_dict(raw, EXAMPLES)
            CompileJob(spec, key=key, sink=sink, job_dir=tmp_path / "j").run()
    finally:
        sink.close()


class DiesAfterAppending:
    """Appends the 2nd batch, then dies before the job can record the acknowledgement."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.calls = inner, 0

    def append(self, envelopes: Sequence[Envelope]) -> list[Acked | KolmError]:
        self.calls += 1
        res = self.inner.append(envelopes)
        if self.calls == 2:
            raise ConnectionError("process died after the ledger acknowledged the batch")
        return res

    def checkpoint(self) -> dict[str, Any]:
        return self.inner.checkpoint()


@pytest.mark.slow
def test_a_crash_after_an_acknowledged_batch_does_not_log_labels_twice(
    world: dict[str, Any], tmp_path: Path
) -> None:
    spec = tiny_spec(labels=3, per_label=12)
    opts = CompileOptions(threads=1, teacher_cache=world["dir"] / "cache.sqlite", label_batch=10)
    job, _ = world["compile"](
        "job-crash-sign",
        spec=spec,
        options=opts,
        sink=DiesAfterAppending(ServiceSink(world["client"])),
    )
    with pytest.raises(ConnectionError):
        job.run()
    stop = {"now": False}
    again, _ = world["compile"](
        "job-crash-sign", spec=spec, options=opts, should_stop=lambda: stop["now"]
    )
    again.emit = lambda e: stop.update(now=e.stage == "train")
    with pytest.raises(JobCancelled):
        again.run()
    sign = json.loads((again.dir / "stages" / "sign.json").read_text())
    labels = world["client"].find(subject_digest=job_digest(again.job_id), kind="label")
    # the re-signed batch was byte-identical: the ledger answered duplicates, same indices
    assert len(labels) == len(sign["logged"]) == sign["_counters"]["signed"]
    assert [e.index for e in labels] == [r[0] for r in sign["logged"]]
    assert training_set_root([e.leaf_hash for e in labels]) == sign["training_set_root"]


@pytest.mark.slow
def test_bundle_base_ships_the_base_weights(world: dict[str, Any]) -> None:
    import shutil

    d = world["dir"]
    shutil.copytree(world["job"].dir, d / "job-bundle")
    (d / "job-bundle" / "stages" / "package.json").unlink()
    opts = CompileOptions(threads=1, teacher_cache=d / "cache.sqlite", bundle_base=True)
    job, events = world["compile"]("job-bundle", options=opts, out_dir=d / "out-bundle")
    r = job.run()
    assert [e.stage for e in events if e.state == "started"] == ["package"]
    v = verify_artifact(r.artifact_path, TrustState(world["trust"]), into=d / "vb")
    assert v.manifest.base == "base" and (v.directory / "base" / "config.json").is_file()
    assert r.artifact_digest != world["result"].artifact_digest
    assert world["client"].provenance(r.artifact_digest).root_matches
