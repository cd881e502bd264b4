"""The task author's path (issue 18): their own spec and data, an OpenAI-compatible teacher
over REAL HTTP (a local server answering from a gold table, with injected faults), a real
ledger database. A per-job budget counted across resumes; a job identity that survives
operational edits and a teacher cache shared by content; one bad input never sinks a job;
a plain message when nothing is accepted; wrong key folders refused before any teacher
call; holdout label mapping and leakage; BOM CSVs; keys pasted into api_key_env.

Most tests stop before training (the stages are run one by one); one CLI test trains the
smallest student (``-m slow``)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.data import banking77
from test_teachers import FakeOpenAI

from kolm_compile.pipeline import CompileJob, CompileOptions, StageOutputs
from kolm_compile.sinks import LocalLedgerSink
from kolm_compile.spec import TaskSpec, read_table
from kolm_compile.teachers import InputRejected, TeacherSpend
from kolm_ledger.errors import ConflictError, KolmError, ResourceExhaustedError, SpecError
from kolm_ledger.keys import PrivateKey, init_keys

KOLM = [sys.executable, "-m", "kolm"]
LABELS = ["card_arrival", "exchange_rate", "lost_or_stolen_card", "top_up_failed"]


def _rows(split: str, per_label: int) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for label in LABELS:
        out += [r for r in banking77(split) if r[1] == label][:per_label]
    return out


def write_csv(path: Path, rows: list[tuple[str, str]], *, bom: bool = False) -> None:
    with path.open("w", newline="", encoding="utf-8-sig" if bom else "utf-8") as f:
        w = csv.writer(f)
        w.writerow(["message", "intent"])
        w.writerows(rows)


class GoldServer(FakeOpenAI):
    """Answers every input with its gold label; ``faults[text]`` is a list of actions for
    that input's requests (int status, ("status", code, headers, body), "empty" for empty
    choices, "junk" for invalid JSON), consumed one per request; the last one repeats."""

    def __init__(self, gold: dict[str, str]) -> None:
        super().__init__()
        self.gold = dict(gold)
        self.faults: dict[str, list[Any]] = {}
        self.answer = lambda text, i: self.gold.get(text, "no idea")

    def handle(self, h: Any, body: dict[str, Any], action: Any) -> None:
        text = body["messages"][-1]["content"].rsplit("Input:\n", 1)[-1]
        plan = self.faults.get(text)
        if action is None and plan:
            action = plan.pop(0) if len(plan) > 1 else plan[0]
        if action == "empty":
            return self.reply(h, 200, {"choices": [], "usage": {}})
        if action == "junk":
            return self.reply(h, 200, b"{not json")
        super().handle(h, body, action)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[dict[str, Any]]:
    train, test = _rows("train", 3), _rows("test", 2)
    d = tmp_path / "task"
    d.mkdir()
    write_csv(d / "inputs.csv", train)
    write_csv(d / "holdout.csv", test)
    server = GoldServer(dict(train + test))
    keys = tmp_path / "keys"
    init_keys(keys)
    raw = {
        "name": "author-task",
        "task": "classify",
        "labels": LABELS,
        "teacher": {"backend": "openai", "model": "gpt-test", "endpoint": server.url, "k": 3,
                    "concurrency": 1, "max_retries": 2, "timeout_s": 5},
        "data": {"unlabeled": "inputs.csv", "holdout": "holdout.csv",
                 "text_column": "message", "label_column": "intent"},
        "student": {"epochs": 1, "max_length": 16, "batch_size": 8, "lora_r": 4},
        "budget": {"price_per_1k_input_tokens": 1.0, "price_per_1k_output_tokens": 2.0},
    }  # fmt: skip
    sink = LocalLedgerSink.open(f"sqlite:///{tmp_path / 'ledger.db'}", keys)
    try:
        yield {"dir": d, "tmp": tmp_path, "server": server, "raw": raw, "keys": keys,
               "sink": sink, "train": train, "test": test}  # fmt: skip
    finally:
        sink.close()
        server.close()


def spec_of(w: dict[str, Any], **changes: Any) -> TaskSpec:
    raw = json.loads(json.dumps(w["raw"]))
    for dotted, value in changes.items():
        section, _, name = dotted.rpartition(".")
        (raw[section] if section else raw)[name] = value
    return TaskSpec.from_dict(raw, w["dir"])


def job_of(w: dict[str, Any], spec: TaskSpec, name: str = "job", **kw: Any) -> CompileJob:
    return CompileJob(
        spec,
        key=PrivateKey.load(w["keys"] / "compile.key"),
        sink=w["sink"],
        job_dir=w["tmp"] / name,
        options=CompileOptions(threads=1, teacher_cache=w["tmp"] / "shared-cache.sqlite"),
        **kw,
    )


def until(job: CompileJob, last: str) -> StageOutputs:
    """Run the stages up to ``last`` (no training); returns their outputs."""
    return job.run_until(last)


# --------------------------------------------------------------------------- (1) the budget


def test_the_budget_is_per_job_and_counted_across_resumes(world: dict[str, Any]) -> None:
    """12 inputs + 8 holdout = 20 requests (k=3 in one request each). A budget of 8
    stops the first run at 8 billed requests; the same command again sends nothing (the
    job has spent its budget); raising the budget (an operational edit: same job) buys
    exactly the 12 still needed; the cost report signs all 60 samples and 20 requests.
    A 429 is counted as a failed request, not billed and not against the budget."""
    server = world["server"]
    server.script = [("status", 429, {"Retry-After": "0"}, {"error": {"message": "slow"}})]
    with pytest.raises(ResourceExhaustedError, match="max_teacher_calls is 8"):
        until(job_of(world, spec_of(world, **{"budget.max_teacher_calls": 8})), "sample")
    assert server.count == 9  # 8 billed + the 429
    with pytest.raises(ResourceExhaustedError, match="over all its runs"):
        until(job_of(world, spec_of(world, **{"budget.max_teacher_calls": 8})), "sample")
    assert server.count == 9  # a rerun got no fresh budget
    job = job_of(world, spec_of(world, **{"budget.max_teacher_calls": 20}))
    out = until(job, "sample")
    assert server.count == 21
    spent = TeacherSpend(world["tmp"] / "job" / "spend.json").to_dict()
    assert spent["requests"] == 20 and spent["failed_requests"] == 1
    assert spent["samples"] == 60
    cost = job.cost_report(out.sample, latency_s=0.001, threads=1)
    assert cost["teacher_samples_bought_by_this_job"] == 60
    assert cost["teacher_calls_paid_by_this_job"] == 60  # the old name: samples, all runs
    assert cost["teacher_requests_billed_by_this_job"] == 20
    assert cost["teacher_requests_failed_not_billed"] == 1
    assert cost["cost_paid_by_this_job"] == pytest.approx(spent["cost"]) and spent["cost"] > 0
    # only this run's cache misses (36) would have been reported before
    assert out.sample.usage.cache_misses == 36


def test_a_budget_in_samples_or_dollars(world: dict[str, Any]) -> None:
    server = world["server"]
    with pytest.raises(ResourceExhaustedError, match="max_teacher_samples 7"):
        until(job_of(world, spec_of(world, **{"budget.max_teacher_samples": 7}), "s"), "sample")
    assert server.count == 2  # 6 samples bought; 3 more would pass 7
    before = server.count
    with pytest.raises(ResourceExhaustedError, match=r"budget\.max_cost is \$0\.0001"):
        until(job_of(world, spec_of(world, **{"budget.max_cost": 0.0001}), "c"), "sample")
    assert server.count - before == 1  # the first request's price already passes it


# --------------------------------------------------------------------------- (3) identity


def test_operational_and_student_edits_keep_the_job_and_the_cache_is_shared(
    world: dict[str, Any],
) -> None:
    server = world["server"]
    until(job_of(world, spec_of(world)), "sample")
    assert server.count == 20
    stages = world["tmp"] / "job" / "stages"
    # stand-ins for finished training stages (training itself is tested elsewhere)
    for s in ("train", "evaluate", "package"):
        (stages / f"{s}.json").write_text("{}")
    edited = spec_of(
        world,
        **{"budget.max_teacher_calls": 1000, "teacher.timeout_s": 9, "teacher.max_retries": 4,
           "teacher.concurrency": 2, "student.epochs": 2},
    )  # fmt: skip
    job = job_of(world, edited)
    assert not any((stages / f"{s}.json").exists() for s in ("train", "evaluate", "package"))
    assert "train, evaluate, package will run again" in job.notes[0]
    assert (stages / "sample.json").exists()  # the paid answers are kept
    until(job, "sample")
    assert server.count == 20
    # another task (one CSV row fixed) is another job: refused in this folder, naming it ...
    rows = list(world["train"])
    rows[0] = ("my card has still not arrived, where is it?", "card_arrival")
    server.gold[rows[0][0]] = "card_arrival"
    write_csv(world["dir"] / "inputs.csv", rows)
    with pytest.raises(ConflictError, match="its data part differs") as e:
        job_of(world, spec_of(world))
    assert "teacher cache" in str(e.value)
    # ... and a fresh folder pays only for the one new input (the cache is shared)
    until(job_of(world, spec_of(world), "job-2"), "sample")
    assert server.count == 21


# --------------------------------------------------------------------------- (4) bad inputs


def test_one_bad_input_never_sinks_a_job(world: dict[str, Any]) -> None:
    """A content-filter 400 on one input, three malformed answers on another, three empty
    choices on a third, a 503 then an answer on a fourth: three inputs are rejected with
    their reasons (vote.json, the summary counters), the other nine are signed, and
    running the job again does not fail at the same input."""
    server, train = world["server"], world["train"]
    filt = ("status", 400, {}, {"error": {"code": "content_filter", "message": "no"}})
    server.faults = {train[1][0]: [filt], train[4][0]: ["junk"], train[7][0]: ["empty"],
                     train[10][0]: [503, None]}  # fmt: skip
    job = job_of(world, spec_of(world))
    out = until(job, "sign")
    vt = out.vote
    assert vt.summary.reasons == {"teacher_error": 3}
    assert vt.counters["rejected_teacher_error"] == 3
    rejected = {r["input"]: r for r in vt.rejected}
    assert set(rejected) == {1, 4, 7}
    assert rejected[1]["teacher_error"]["status"] == 400
    assert rejected[1]["teacher_error"]["reason"] == "refused"
    assert rejected[1]["prompt_id"] == "spec.data.unlabeled row 2"
    assert rejected[4]["teacher_error"]["status"] == 200
    assert rejected[7]["teacher_error"]["reason"] == "malformed_response"
    assert "empty choices" in rejected[7]["teacher_error"]["message"]
    for r in rejected.values():
        assert r["input_sha256"] in r["teacher_error"]["message"]
    assert len(out.sign.logged) == 9
    on_disk = json.loads((world["tmp"] / "job" / "stages" / "vote.json").read_text())
    assert on_disk["rejected"] == list(vt.rejected)
    # a rerun resumes: nothing fails, nothing is asked again
    before = server.count
    until(job_of(world, spec_of(world)), "sign")
    assert server.count == before


def test_a_teacher_that_rejects_every_input_stops_the_job_early(world: dict[str, Any]) -> None:
    server = world["server"]
    filt = ("status", 400, {}, {"error": {"message": "model not allowed"}})
    server.faults = {t: [filt] for t, _ in world["train"] + world["test"]}
    with pytest.raises(InputRejected, match="rejected the first 5 inputs and answered none"):
        until(job_of(world, spec_of(world)), "sample")
    assert 5 <= server.count <= 6  # the one in flight (concurrency 1) may finish


def test_job_errors_name_the_input_row_digest_and_status(world: dict[str, Any]) -> None:
    server, train = world["server"], world["train"]
    server.faults = {train[2][0]: [503]}
    with pytest.raises(KolmError) as e:
        until(job_of(world, spec_of(world)), "sample")
    msg = str(e.value)
    assert "spec.data.unlabeled row 3" in msg and "HTTP 503" in msg
    from kolm_compile.teachers import input_sha256

    assert input_sha256(train[2][0]) in msg


# --------------------------------------------------------------------------- (5) 0 accepted


def test_zero_accepted_labels_say_why(world: dict[str, Any]) -> None:
    world["server"].gold = {}  # every answer is "no idea": not a label
    with pytest.raises(KolmError) as e:
        until(job_of(world, spec_of(world)), "sign")
    msg = str(e.value)
    assert msg.startswith("0 of 12 inputs accepted: 12 failed the verifier (examples: ")
    assert "not one of the 4 labels" in msg
    assert "ledger" not in msg.split(";")[0]
    vt = json.loads((world["tmp"] / "job" / "stages" / "vote.json").read_text())
    assert vt["summary"]["reasons"] == {"too_few_valid": 12}


# --------------------------------------------------------------------------- (13) holdout


def test_holdout_labels_are_mapped_counted_and_leakage_reported(world: dict[str, Any]) -> None:
    test, train = world["test"], world["train"]
    rows = [
        (test[0][0], "Card Arrival"),  # case and a space: mapped
        (test[1][0], "card-arrival"),  # '-': mapped
        (test[2][0], "exchange_rate"),
        (test[3][0], "not_an_intent"),  # dropped, counted
        (train[0][0], "card_arrival"),  # also a training input: leakage
    ]
    write_csv(world["dir"] / "holdout.csv", rows)
    ing = until(job_of(world, spec_of(world)), "ingest").ingest
    assert [y for _, y in ing.holdout] == [
        "card_arrival", "card_arrival", "exchange_rate", "card_arrival",
    ]  # fmt: skip
    assert ing.holdout_report.to_dict() == {
        "rows": 5, "mapped": 2, "dropped": 1, "unlabeled": 0, "leaked": 1,
    }  # fmt: skip
    assert ing.counters["holdout_leaked"] == 1


def test_holdout_without_its_label_column_or_empty_is_named(world: dict[str, Any]) -> None:
    (world["dir"] / "holdout.csv").write_text("message\nwhere is my card\n")
    with pytest.raises(
        SpecError, match=r"spec\.data\.holdout: holdout\.csv has no column 'intent'"
    ):
        until(job_of(world, spec_of(world), "a"), "ingest")
    (world["dir"] / "holdout.csv").write_text("message,intent\n")
    with pytest.raises(SpecError, match=r"spec.data.holdout: holdout.csv is empty"):
        until(job_of(world, spec_of(world), "b"), "ingest")


# --------------------------------------------------------------------------- (10) BOM


def test_a_csv_with_a_byte_order_mark_reads_its_first_column(tmp_path: Path) -> None:
    write_csv(tmp_path / "bom.csv", [("where is my card", "card_arrival")], bom=True)
    assert (tmp_path / "bom.csv").read_bytes().startswith(b"\xef\xbb\xbf")
    assert read_table(tmp_path / "bom.csv", "message", "intent", "spec.data.unlabeled") == [
        ("where is my card", "card_arrival")
    ]


# --------------------------------------------------------------------------- (11) keys


@pytest.mark.parametrize(
    "value",
    ["sk-proj-AbCdEf0123456789xyzXYZ", "sk_live_51HabcdefGHIJ0123456789", "ghp_abc123def456",
     "a8f3e9b2c7d14e6f9a0b1c2d3e4f5a6b"],
)  # fmt: skip
def test_a_key_pasted_into_api_key_env_is_never_echoed(world: dict[str, Any], value: str) -> None:
    with pytest.raises(SpecError) as e:
        spec_of(world, **{"teacher.api_key_env": value})
    assert "looks like a key, not a variable name" in str(e.value)
    assert value not in str(e.value) and value[:8] not in str(e.value)


def test_a_real_variable_name_is_still_accepted(world: dict[str, Any]) -> None:
    assert spec_of(world, **{"teacher.api_key_env": "OPENAI_API_KEY"}).teacher.api_key_env


# --------------------------------------------------------------------------- (14) --keys


def test_a_key_folder_of_another_ledger_is_refused_before_any_teacher_call(
    world: dict[str, Any],
) -> None:
    other = world["tmp"] / "other-keys"
    init_keys(other)
    job = CompileJob(
        spec_of(world),
        key=PrivateKey.load(other / "compile.key"),
        sink=world["sink"],
        job_dir=world["tmp"] / "job",
        options=CompileOptions(threads=1, teacher_cache=world["tmp"] / "c.sqlite"),
    )
    with pytest.raises(ConflictError, match="is not trusted by the ledger database"):
        job.run()
    assert world["server"].count == 0


def run_kolm(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    e = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
         "TOKENIZERS_PARALLELISM": "false", **(env or {})}  # fmt: skip
    return subprocess.run(
        [*KOLM, *args], capture_output=True, text=True, timeout=500, check=False, env=e
    )


def write_spec(w: dict[str, Any], **changes: Any) -> Path:
    raw = json.loads(json.dumps(w["raw"]))
    for dotted, value in changes.items():
        section, _, name = dotted.rpartition(".")
        (raw[section] if section else raw)[name] = value
    path = w["dir"] / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_cli_refuses_a_wrong_keys_folder_in_plain_words(world: dict[str, Any]) -> None:
    spec = write_spec(world)
    db = f"sqlite:///{world['tmp'] / 'cli.db'}"
    for keys, want in [
        (world["tmp"] / "nope", "no such folder"),
        (world["dir"], "no compile.key or trust.json there"),
    ]:
        p = run_kolm("compile", "run", str(spec), "--db", db, "--keys", str(keys),
                     "--work", str(world["tmp"] / "w"))  # fmt: skip
        assert p.returncode == 2, p.stderr
        assert f"--keys {keys}: {want}" in p.stderr
    # a folder mixing two setups: compile.key not in its own trust.json
    mixed = world["tmp"] / "mixed"
    init_keys(mixed)
    (mixed / "compile.key").write_bytes((world["keys"] / "compile.key").read_bytes())
    p = run_kolm("compile", "run", str(spec), "--db", db, "--keys", str(mixed),
                 "--work", str(world["tmp"] / "w"))  # fmt: skip
    assert "is not listed in its own trust.json" in p.stderr, p.stderr
    assert world["server"].count == 0


# --------------------------------------------------------------------------- (2) check


def test_compile_check_estimates_without_calling_the_teacher(world: dict[str, Any]) -> None:
    spec = write_spec(world, **{"budget.max_teacher_calls": 10})
    p = run_kolm("compile", "check", str(spec), "--json")
    assert p.returncode == 0, p.stderr
    est = json.loads(p.stdout)
    assert (est["inputs"], est["holdout"], est["k"]) == (12, 8, 3)
    assert (est["samples"], est["requests"], est["samples_to_buy"]) == (60, 20, 60)
    assert est["input_tokens"] > 0 and est["output_tokens"] > 0 and est["estimated_cost"] > 0
    assert any("max_teacher_calls 10 < 20 requests" in n for n in est["notes"])
    assert world["server"].count == 0
    # a cache that holds answers makes them free in the estimate
    until(job_of(world, spec_of(world)), "sample")
    n = world["server"].count
    p = run_kolm("compile", "check", str(spec), "--json",
                 "--teacher-cache", str(world["tmp"] / "shared-cache.sqlite"))  # fmt: skip
    est = json.loads(p.stdout)
    assert (est["samples_cached"], est["samples_to_buy"], est["requests"]) == (60, 0, 0)
    assert world["server"].count == n
    # a bad spec is named, as a run would name it
    bad = write_spec(world, **{"data.text_column": "text"})
    p = run_kolm("compile", "check", str(bad))
    assert p.returncode == 2 and "spec.data.unlabeled: inputs.csv has no column 'text'" in p.stderr


# --------------------------------------------------------------------------- (6, 7, 9) the CLI


@pytest.mark.ml
@pytest.mark.slow
def test_cli_json_is_only_json_progress_is_plain_and_digests_are_whole(
    world: dict[str, Any],
) -> None:
    """In a pipe: ``--json`` prints only JSON on stdout (progress on stderr, one plain line
    per step), a budget stop is resumed by the same command after raising the budget,
    the signed cost is the job's total, and the table prints whole digests."""
    from kolm_ledger.storage import Store

    db = f"sqlite:///{world['tmp'] / 'cli.db'}"
    cache = str(world["tmp"] / "cli-cache.sqlite")

    def run(*extra: str) -> subprocess.CompletedProcess[str]:
        return run_kolm("compile", "run", str(world["dir"] / "spec.yaml"), "--db", db,
                        "--keys", str(world["keys"]), "--work", str(world["tmp"] / "w"),
                        "--out", str(world["tmp"]), "--threads", "1",
                        "--teacher-cache", cache, *extra)  # fmt: skip

    write_spec(world, **{"budget.max_teacher_calls": 10})
    p = run("--json")
    assert p.returncode == 2 and "max_teacher_calls is 10" in p.stderr
    assert p.stdout == ""
    assert world["server"].count == 10
    write_spec(world, **{"budget.max_teacher_calls": 100})
    p = run("--json")
    assert p.returncode == 0, p.stderr
    result = json.loads(p.stdout)  # the whole of stdout
    assert world["server"].count == 20
    cost = result["cost"]
    assert cost["teacher_samples_bought_by_this_job"] == 60
    assert cost["teacher_requests_billed_by_this_job"] == 20
    # the signed artifact receipt carries that same total
    store = Store(db)
    try:
        (entry,) = list(store.find(kind="artifact", limit=10))
        from kolm_ledger.formats.dsse import Envelope
        from kolm_ledger.formats.receipts import Statement

        st = Statement.from_envelope(Envelope.from_bytes(entry.envelope))
        assert st.predicate["cost"]["teacher_samples_bought_by_this_job"] == 60
    finally:
        store.close()
    lines = p.stderr.splitlines()
    assert any(line.startswith("2 teacher k-sampling: progress 1/20") for line in lines), p.stderr
    assert any(line.startswith("5 LoRA train: finished") for line in lines), p.stderr
    assert "\x1b[" not in p.stderr  # no terminal control codes in a log
    # the table (a resumed, finished job) prints whole digests
    p = run()
    assert p.returncode == 0, p.stderr
    assert result["artifact_digest"] in p.stdout and result["training_set_root"] in p.stdout
    # (8) the whole digest goes straight into kolm provenance --db, like audit and report
    trust = str(world["keys"] / "trust.json")
    p = run_kolm("provenance", result["artifact_digest"], "--db", db, "--trust", trust)
    assert p.returncode == 0, p.stdout + p.stderr


def test_kolm_version() -> None:
    from kolm_ledger import __version__

    p = run_kolm("--version")
    assert p.returncode == 0 and p.stdout.strip() == f"kolm {__version__}"


# --------------------------------------------------------------------------- (12) transformers


@pytest.mark.ml
def test_a_transformers_teacher_that_is_not_there_is_one_line_naming_the_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from kolm_compile.student import DEFAULT_BASE_MODEL, resolve_base_model
    from kolm_compile.teachers import build_teacher

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_csv(tmp_path / "inputs.csv", [("where is my card", "card_arrival")])
    encoder = tmp_path / "encoder"
    shutil.copytree(resolve_base_model(DEFAULT_BASE_MODEL), encoder)
    (tmp_path / "empty").mkdir()
    for model, want in [
        ("./no-such-folder", "folder './no-such-folder' not found"),
        ("empty", "folder 'empty' holds no saved model (no config.json)"),
        ("nobody-xyz/no-such-model", "is neither a folder nor a model in the local Hugging Face"),
        (str(encoder), "model without a generation head (BertModel)"),
    ]:
        spec = TaskSpec.from_dict(
            {"name": "t", "task": "classify", "labels": LABELS,
             "teacher": {"backend": "transformers", "model": model, "device": "cpu"},
             "data": {"unlabeled": "inputs.csv", "text_column": "message",
                      "label_column": "intent"}},
            tmp_path,
        )  # fmt: skip
        with pytest.raises(SpecError) as e:
            build_teacher(spec.teacher, spec)
        msg = str(e.value)
        assert msg.startswith("spec.teacher.model: ") and want in msg, msg
        assert "\n" not in msg
