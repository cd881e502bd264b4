"""An explicit out-of-scope answer (issue 17, part 3) through the real compile path: a
classify spec names ``none_label: out_of_scope``; the simulated teacher answers it for
the rows of intents outside the spec, votes accept it, its label receipts are ordinary
label receipts, the student learns it and the served prediction returns it.

Data: the 12-intent Banking77 subset the package ships; the spec keeps 4 intents, the
rows of 4 others are labelled ``out_of_scope`` (in the teacher's dataset, the unlabeled
file's gold column and the holdout) — what a teacher offered ``out_of_scope`` answers.
"""

from __future__ import annotations

import asyncio
import csv
import json
import zipfile
from pathlib import Path
from typing import Any

import pytest
from support.servers import LedgerThread
from test_compile_pipeline import EXAMPLES, _embed, tiny_raw

NONE = "out_of_scope"
SHIPPED = EXAMPLES.parent / "data" / "banking77"

pytestmark = [pytest.mark.ml, pytest.mark.slow]


def _relabel(src: Path, dst: Path, keep: list[str], other: list[str]) -> int:
    """Copy ``src`` keeping rows of ``keep`` and relabelling rows of ``other`` as NONE;
    the number of rows relabelled."""
    n = 0
    with src.open(newline="", encoding="utf-8") as f, dst.open("w", newline="") as g:
        w = csv.writer(g)
        w.writerow(["text", "category"])
        for r in csv.DictReader(f):
            if r["category"] in keep:
                w.writerow([r["text"], r["category"]])
            elif r["category"] in other:
                w.writerow([r["text"], NONE])
                n += 1
    return n


def test_a_none_label_spec_compiles_and_serves_the_out_of_scope_answer(tmp_path: Path) -> None:
    from kolm_compile import gate as G
    from kolm_compile.artifact import verify_artifact
    from kolm_compile.pipeline import CompileJob, CompileOptions
    from kolm_compile.sinks import ServiceSink
    from kolm_compile.spec import TaskSpec
    from kolm_compile.teachers import build_messages
    from kolm_infer.engine import Engine
    from kolm_ledger.formats.dsse import Envelope
    from kolm_ledger.formats.receipts import Statement, job_digest
    from kolm_ledger.keys import PrivateKey, init_keys
    from kolm_ledger.service.client import LedgerClient

    raw = tiny_raw()
    all_labels = list(raw["labels"])  # tiny_raw keeps 4 of the demo's 12
    import yaml

    demo = yaml.safe_load((EXAMPLES / "banking77-router.yaml").read_text())["labels"]
    other = [y for y in demo if y not in all_labels][:4]
    data = tmp_path / "data"
    data.mkdir()
    counts = {
        name: _relabel(SHIPPED / f"{name}.csv", data / f"{name}.csv", all_labels, other)
        for name in ("train", "test", "gold")
    }
    assert min(counts.values()) > 0, counts
    raw["labels"] = [*all_labels, NONE]
    raw["none_label"] = NONE
    raw["teacher"]["dataset"] = str(data / "gold.csv")
    raw["data"].update(unlabeled=str(data / "train.csv"), holdout=str(data / "test.csv"))
    spec = TaskSpec.from_dict(raw, EXAMPLES)
    assert spec.none_label == NONE
    # the teacher is offered the answer
    prompt = build_messages(spec, "hi")[1]["content"]
    assert f"If the input fits none of the other labels, answer {NONE}." in prompt

    trust = init_keys(tmp_path / "keys")
    ledger = LedgerThread(
        f"sqlite:///{tmp_path / 'ledger.db'}", trust, PrivateKey.load(tmp_path / "keys/log.key")
    )
    client = LedgerClient(ledger.target, timeout=120)
    try:
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

        # votes accepted it: label receipts with output out_of_scope, as ordinary as any
        entries = client.find(subject_digest=job_digest(res.job_id), kind="label")
        stmts = [Statement.from_envelope(Envelope.from_bytes(e.envelope)) for e in entries]
        none_st = [s for s in stmts if s.predicate["output"] == NONE]
        in_st = [s for s in stmts if s.predicate["output"] != NONE]
        assert len(none_st) >= 10 and in_st, (len(none_st), len(in_st))
        for s in none_st:
            ref = in_st[0]
            assert s.predicate_type == ref.predicate_type
            assert set(s.predicate) == set(ref.predicate)
            assert s.predicate["verifier"] == ref.predicate["verifier"]
            assert s.predicate["agreement"] >= 0.59  # min_agreement 3 of k 5
        # the student learned it: trained on those labels, a label of the artifact
        trained = json.loads((job.dir / "train_set.json").read_text())
        assert trained["labels"].count(NONE) == len(none_st)
        with zipfile.ZipFile(res.artifact_path) as z:
            top = z.namelist()[0].split("/")[0]
            manifest = json.loads(z.read(f"{top}/manifest.json"))
        verify_artifact(res.artifact_path, trust)
        assert manifest["none_label"] == NONE and manifest["labels"][-1] == NONE
        assert manifest["gate"]["examples"] == len(trained["texts"])
        assert G.GATE_FILE in json.dumps(manifest)

        # served: an out-of-scope input gets the answer out_of_scope, a verified one
        with (data / "test.csv").open(newline="", encoding="utf-8") as f:
            holdout_none = [r["text"] for r in csv.DictReader(f) if r["category"] == NONE]

        async def serve() -> list[Any]:
            eng = Engine(trust, LedgerClient(ledger.target), on_teacher_failure="student")
            try:
                await asyncio.to_thread(eng.load, res.artifact_path)
                got = await asyncio.gather(*(eng.predict(spec.name, t) for t in holdout_none[:40]))
                return [p for _, p in got]
            finally:
                await eng.close()

        preds = asyncio.run(serve())
        answered = [p for p in preds if p.output == NONE and p.reason == "confident"]
        assert len(answered) >= len(preds) // 2, [(p.output, p.reason) for p in preds]
        for p in answered:
            assert p.backend == "student" and p.verified is True
            assert p.verdict["ok"] is True
    finally:
        client.close()
        ledger.close()
