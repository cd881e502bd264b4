"""What a client of the compile service may make it read, call and see (issue 14, findings
1 and 2, and the YAML alias bomb).

Real services on 127.0.0.1 with ``kolm certs init`` certificates (mutual TLS), plus a
second ``compile`` client certificate with another subject (another client):

- a spec reads only its client's uploads and files under the operator's data root: the
  issue's reproduction (``recall.corpus`` at the service's keys folder) and absolute,
  ``..`` and symlinked paths are ``INVALID_ARGUMENT`` naming the field, for every file
  field the spec has (one resolver, checked against the spec's own field table);
- ``UploadDataset``: round trip (a job runs on the uploaded data with the simulated
  teacher), the size cap, a wrong digest, another client's upload;
- teachers come from operator profiles: a spec that sets ``endpoint``/``api_key_env`` is
  refused; a real local HTTP teacher that answers an error body holding a secret-looking
  string: the job error names the input and the HTTP status, never the body;
- jobs belong to their submitter: another client may not cancel (``PERMISSION_DENIED``),
  an auditor sees the state and the error code, not the error text;
- the alias bomb and oversized specs are refused before any expansion, locally and at
  the service.

No job trains here: the running service's ledger trusts other keys, so a job that got
through ingest and sampling fails at ``sign`` ("no label receipt was acknowledged").
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
import time
import typing
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from support.servers import LedgerThread, ServiceThread

from kolm.cli.compile import _dataset_chunks
from kolm_compile import spec as spec_mod
from kolm_compile._pb import compile_pb2 as pb
from kolm_compile._pb import compile_pb2_grpc as pb_grpc
from kolm_compile.intake import TeacherProfiles
from kolm_compile.spec import FILE_FIELDS, TaskSpec, load_spec_text
from kolm_compile.teachers import input_sha256, teacher_backends, teacher_options
from kolm_ledger.errors import SpecError
from kolm_ledger.keys import PrivateKey, init_keys
from kolm_ledger.service import tls

LABELS = ["card_arrival", "pin_blocked", "exchange_rate"]
ROWS = [
    ("where is my new card", "card_arrival"),
    ("my card still has not come", "card_arrival"),
    ("my pin is blocked", "pin_blocked"),
    ("I typed the wrong pin three times", "pin_blocked"),
    ("what rate do you use for euros", "exchange_rate"),
    ("how is the exchange rate set", "exchange_rate"),
]
SECRET = "sk-live-THIS-IS-A-SECRET-0123456789abcdef"
TEACHER_KEY = "teacher-credential-abcdef-0123456789"
MAX_UPLOAD = 4096
KOLM = [sys.executable, "-m", "kolm"]


def table(rows: list[tuple[str, str]]) -> bytes:
    return ("text,label\n" + "".join(f"{t},{label}\n" for t, label in rows)).encode()


def base_spec(**teacher: Any) -> dict[str, Any]:
    return {
        "name": "tiny",
        "task": "classify",
        "labels": LABELS,
        "teacher": teacher or {"backend": "simulated", "dataset": "gold.csv", "k": 3},
        "data": {"unlabeled": "train.csv", "holdout": "test.csv"},
        "student": {"epochs": 1, "max_length": 16, "batch_size": 8},
        "seed": 1,
    }


def issue_client_cert(certs: Path, stem: str, role: str, cn: str) -> None:
    """A client certificate of ``role`` with its own subject, from the test CA."""
    ca_key = PrivateKey.load(certs / "ca.key")
    ca = x509.load_pem_x509_certificate((certs / "ca.pem").read_bytes())
    key = PrivateKey.generate()
    builder = (
        tls._builder(tls._name(cn, role), ca.subject, key, ca.not_valid_before_utc)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"{tls.ROLE_URI_PREFIX}{role}")]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    cert = ca_key.sign_certificate(builder)
    key.save(certs / f"{stem}.key")
    (certs / f"{stem}.pem").write_bytes(PrivateKey.certificate_pem(cert))


class ErrorTeacher:
    """A real HTTP server posing as an OpenAI-compatible teacher that answers every request
    with HTTP 400 and an error body quoting a secret-looking string."""

    def __init__(self) -> None:
        self.auth: list[str | None] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                outer.auth.append(self.headers.get("Authorization"))
                body = json.dumps({"error": {"message": f"bad request; key={SECRET}"}}).encode()
                self.send_response(400)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from kolm_compile.service import JobRunner, start
    from kolm_compile.sinks import ServiceSink
    from kolm_ledger.service.client import LedgerClient

    d = tmp_path_factory.mktemp("compile-intake")
    init_keys(d / "keys")
    (d / "keys" / "notes.jsonl").write_text('{"id": "k", "text": "a key folder file"}\n')
    certs = d / "certs"
    tls.init_certs(certs)
    issue_client_cert(certs, "client-compile2", "compile", "another-compile-client")
    data = d / "data"
    data.mkdir()
    (data / "train.csv").write_bytes(table(ROWS))
    (data / "test.csv").write_bytes(table(ROWS))
    (data / "gold.csv").write_bytes(table(ROWS))
    (data / "docs").mkdir()
    (data / "docs" / "a.txt").write_text("card arrival takes a week")
    os.symlink(d / "keys", data / "keys-link")  # a folder symlink out of the root
    os.symlink(d / "keys" / "notes.jsonl", data / "notes-link.jsonl")  # a file symlink out

    teacher = ErrorTeacher()
    os.environ["KOLM_TEST_TEACHER_KEY"] = TEACHER_KEY
    profiles = TeacherProfiles.from_dict(
        {
            "profiles": {
                "local-http": {
                    "backend": "openai",
                    "endpoint": teacher.url,
                    "api_key_env": "KOLM_TEST_TEACHER_KEY",
                    "models": {
                        "tiny-model": {
                            "price_per_1k_input_tokens": 0.5,
                            "price_per_1k_output_tokens": 1.5,
                        }
                    },
                    "max_retries": 0,
                    "timeout_s": 10,
                    "max_teacher_calls": 100,
                }
            }
        }
    )
    # the ledger trusts other keys: every label append is refused, so no job trains
    other = init_keys(d / "other-keys")
    ledger = LedgerThread(
        f"sqlite:///{d / 'ledger.db'}", other, PrivateKey.load(d / "other-keys" / "log.key")
    )
    clients: list[LedgerClient] = []

    def sink() -> ServiceSink:
        c = LedgerClient(ledger.target, timeout=60)
        clients.append(c)
        return ServiceSink(c)

    class IdleRunner(JobRunner):
        """Queues jobs but never runs them (ownership tests: jobs stay queued)."""

        def start(self) -> None:
            pass

    def runner(cls: type, work: str) -> Any:
        return cls(
            d / work,
            keys_dir=d / "keys",
            sink_factory=sink,
            data_root=data,
            teachers=profiles,
            max_upload_bytes=MAX_UPLOAD,
            threads=1,
        )

    creds = tls.server_credentials(certs, "compile")
    running_runner = runner(JobRunner, "work")
    idle_runner = runner(IdleRunner, "idle-work")
    running = ServiceThread(lambda: start(running_runner, credentials=creds))
    idle = ServiceThread(lambda: start(idle_runner, credentials=creds))
    w = {
        "dir": d,
        "certs": certs,
        "data": data,
        "running": running,
        "running_runner": running_runner,
        "idle": idle,
        "idle_runner": idle_runner,
        "teacher": teacher,
        "channels": [],
    }
    yield w
    for ch in w["channels"]:
        ch.close()
    running.close()
    idle.close()
    for c in clients:
        c.close()
    ledger.close()
    teacher.close()
    os.environ.pop("KOLM_TEST_TEACHER_KEY", None)


def stub(world: dict[str, Any], who: str, svc: str = "running") -> Any:
    """A Compile stub for client certificate ``client-<who>`` (role from its name)."""
    certs = world["certs"]
    creds = grpc.ssl_channel_credentials(
        root_certificates=(certs / "ca.pem").read_bytes(),
        private_key=(certs / f"client-{who}.key").read_bytes(),
        certificate_chain=(certs / f"client-{who}.pem").read_bytes(),
    )
    ch = grpc.secure_channel(world[svc].target, creds)
    world["channels"].append(ch)
    return pb_grpc.CompileStub(ch)


def refused(call: Any, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT) -> str:
    with pytest.raises(grpc.RpcError) as e:
        call()
    assert e.value.code() == code, e.value.details()
    return str(e.value.details())


def submit(s: Any, raw: dict[str, Any]) -> Any:
    return s.SubmitJob(pb.SubmitJobRequest(spec_yaml=yaml.safe_dump(raw)), timeout=30)


def upload(s: Any, name: str, data: bytes, sha256: str | None = None) -> Any:
    chunks = list(_dataset_chunks(name, data))
    if sha256 is not None:
        chunks[-1].sha256 = sha256
    return s.UploadDataset(iter(chunks), timeout=30)


def wait_final(s: Any, job_id: str) -> Any:
    for _ in range(600):
        job = s.GetJob(pb.GetJobRequest(job_id=job_id), timeout=30)
        if job.state in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish")


# ---- finding 1: files ---------------------------------------------------------------------


def test_every_path_field_of_the_spec_goes_through_the_resolver() -> None:
    """The mechanism: every ``Path`` field of every spec section is in FILE_FIELDS (the
    table the one resolver walks); a new file field that is not would fail here."""
    listed = {dotted for dotted, _, _ in FILE_FIELDS}
    found = set()
    classes = [(section, cls) for section, cls in spec_mod._SECTIONS.items()]
    # each teacher backend's options are written flat in the teacher section
    classes += [("teacher", teacher_options(b)) for b in teacher_backends()]
    for section, cls in classes:
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            if "Path" in str(hints.get(f.name)):
                found.add(f"{section}.{f.name}")
    assert found == listed


def test_the_issue_reproduction_recall_corpus_at_the_keys_folder(world: dict[str, Any]) -> None:
    """Finding 1 as filed: a ``compile`` client points ``recall.corpus`` at the service's
    keys folder (chars, huge chunks). Today's code accepted it and packed the private keys
    into the artifact; now it is INVALID_ARGUMENT naming the field, and no job exists."""
    s = stub(world, "compile")
    keys = world["dir"] / "keys"
    db = world["running_runner"]._db
    (jobs_before,) = db.execute("SELECT count(*) FROM jobs").fetchone()
    for corpus in (str(keys), "../keys", "keys-link", "notes-link.jsonl"):
        raw = {
            **base_spec(),
            "recall": {"corpus": corpus, "chunk_unit": "chars", "chunk_size": 100000},
        }
        details = refused(lambda raw=raw: submit(s, raw))
        assert details.startswith("spec.recall.corpus: "), details
        assert "PRIVATE KEY" not in details
    assert db.execute("SELECT count(*) FROM jobs").fetchone() == (jobs_before,)


@pytest.mark.parametrize("dotted", [d for d, _, _ in FILE_FIELDS] + ["output_schema"])
@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink", "missing-upload"])
def test_every_file_field_refuses_what_is_outside(
    world: dict[str, Any], dotted: str, how: str
) -> None:
    value = {
        "absolute": str(world["data"] / "train.csv"),  # even inside the root: not absolute
        "dotdot": "docs/../../keys/notes.jsonl",
        "symlink": "notes-link.jsonl",
        "missing-upload": "sha256:" + "ab" * 32,
    }[how]
    raw = base_spec()
    if dotted == "output_schema":
        raw.update(task="extract", labels=None, output_schema=value)
        raw.pop("labels")
    else:
        section, name = dotted.split(".")
        raw.setdefault(section, {})[name] = value
        if section == "recall":
            raw["recall"] = {"corpus": value}
    details = refused(lambda: submit(stub(world, "compile"), raw))
    assert details.startswith(f"spec.{dotted}: "), details


def test_files_under_the_data_root_are_read(world: dict[str, Any]) -> None:
    s = stub(world, "compile", "idle")
    raw = {**base_spec(), "recall": {"corpus": "docs", "chunk_size": 4}}
    job = submit(s, raw)
    assert job.state == "queued"
    details = refused(lambda: submit(s, {**base_spec(), "data": {"unlabeled": "nope.csv"}}))
    assert details.startswith("spec.data.unlabeled: no file or folder 'nope.csv'"), details
    assert str(world["data"]) not in details  # the server's folders are not shown


def test_upload_round_trip_a_job_runs_on_the_uploaded_data(world: dict[str, Any]) -> None:
    s = stub(world, "compile")
    gold, train, test = table(ROWS), table(ROWS[::2]), table(ROWS[1::2])
    refs = {}
    for name, data in (("gold.csv", gold), ("train.csv", train), ("test.csv", test)):
        got = upload(s, name, data)
        assert got.ref == "sha256:" + hashlib.sha256(data).hexdigest() and got.size == len(data)
        refs[name] = got.ref
    again = upload(s, "again.csv", gold)
    assert again.existed and again.ref == refs["gold.csv"]
    raw = base_spec(backend="simulated", dataset=refs["gold.csv"], k=3)
    raw["data"] = {"unlabeled": refs["train.csv"], "holdout": refs["test.csv"]}
    job = submit(s, raw)
    events = list(s.WatchJob(pb.WatchJobRequest(job_id=job.id), timeout=120))
    done = {e.stage: e for e in events if e.state == "finished"}
    assert done["sample"].counters["samples"] == 3 * len(ROWS)  # 3 inputs + 3 holdout, k=3
    got = wait_final(s, job.id)
    # got through ingest, sample, vote; the ledger (other trust) refused every label
    assert got.state == "failed" and "no label receipt was acknowledged" in got.error
    stages = world["running_runner"].work / "jobs" / job.id / "stages"
    sample = json.loads((stages / "sample.json").read_text())
    assert sample["teacher"]["dataset_sha256"] == hashlib.sha256(gold).hexdigest()
    assert sample["teacher"]["backend"] == "simulated"
    ingest = json.loads((stages / "ingest.json").read_text())
    assert sorted(ingest["inputs"]) == sorted(t for t, _ in ROWS[::2])


def test_upload_limits(world: dict[str, Any]) -> None:
    s = stub(world, "compile")
    uploads = world["running_runner"].uploads
    before = sorted(p.name for p in uploads.root.rglob("*") if p.is_file())
    big = table([(f"row {i} " + "x" * 40, "card_arrival") for i in range(100)])
    assert len(big) > MAX_UPLOAD
    details = refused(lambda: upload(s, "big.csv", big), grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert f"larger than {MAX_UPLOAD} bytes" in details and "nothing was stored" in details
    details = refused(lambda: upload(s, "t.csv", table(ROWS), sha256="00" * 32))
    assert "SHA-256" in details
    details = refused(lambda: upload(s, "t.txt", table(ROWS)))
    assert ".csv, .jsonl or .ndjson" in details
    refused(lambda: s.UploadDataset(iter([]), timeout=30))
    after = sorted(p.name for p in uploads.root.rglob("*") if p.is_file())
    assert after == before  # nothing half-written, nothing stored
    # one client's upload is not another's
    ref = upload(s, "mine.csv", table(ROWS[:2])).ref
    raw = base_spec()
    raw["data"]["unlabeled"] = ref
    details = refused(lambda: submit(stub(world, "compile2", "idle"), raw))
    assert details.startswith("spec.data.unlabeled: no dataset sha256:"), details


def test_kolm_compile_submit_uploads_the_local_files(world: dict[str, Any], tmp_path: Path) -> None:
    """The CLI uploads what the spec names (a corpus folder as its JSONL) and submits the
    spec with sha256: references; the service stores them under the client's uploads."""
    for name in ("gold.csv", "train.csv", "test.csv"):
        (tmp_path / name).write_bytes(table(ROWS))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.txt").write_text("the pin is blocked after three tries")
    raw = {**base_spec(), "recall": {"corpus": "docs", "chunk_size": 4}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    p = subprocess.run(
        [*KOLM, "compile", "submit", str(tmp_path / "spec.yaml"), "--to", world["idle"].target,
         "--tls-dir", str(world["certs"]), "--role", "compile"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    job_id = p.stdout.strip().splitlines()[-1]
    assert "uploaded spec.recall.corpus" in p.stderr and "uploaded spec.data.unlabeled" in p.stderr
    runner = world["idle_runner"]
    (text,) = runner._db.execute("SELECT spec FROM jobs WHERE id = ?", (job_id,)).fetchone()
    sent = yaml.safe_load(text)
    digest = "sha256:" + hashlib.sha256(table(ROWS)).hexdigest()
    assert sent["data"] == {"unlabeled": digest, "holdout": digest}
    assert sent["teacher"]["dataset"] == digest
    assert sent["recall"]["corpus"].startswith("sha256:")
    assert runner.uploads.find(runner.get(job_id).owner, digest[7:]) is not None


# ---- finding 2: teachers, error text, ownership ----------------------------------------------


@pytest.mark.parametrize(
    ("teacher", "field"),
    [
        ({"backend": "openai", "model": "m", "endpoint": "http://127.0.0.1:9"}, "endpoint"),
        ({"backend": "openai", "model": "m", "api_key_env": "HOME"}, "api_key_env"),
        ({"profile": "local-http", "endpoint": "http://127.0.0.1:9"}, "endpoint"),
        ({"profile": "local-http", "api_key_env": "PATH"}, "api_key_env"),
        ({"profile": "local-http", "concurrency": 64}, "concurrency"),
        ({"backend": "openai", "model": "m"}, "profile"),
        ({"backend": "transformers", "model": "/root"}, "profile"),
        ({"profile": "nope"}, "profile"),
        ({"profile": "local-http", "model": "gpt-expensive"}, "model"),
        ({"profile": "local-http", "backend": "simulated"}, "backend"),
    ],
)
def test_a_spec_cannot_choose_where_requests_and_credentials_go(
    world: dict[str, Any], teacher: dict[str, Any], field: str
) -> None:
    details = refused(lambda: submit(stub(world, "compile"), base_spec(**teacher)))
    assert details.startswith(f"spec.teacher.{field}: "), details


def test_a_profile_over_its_call_cap_is_refused(world: dict[str, Any]) -> None:
    raw = {**base_spec(profile="local-http"), "budget": {"max_teacher_calls": 101}}
    details = refused(lambda: submit(stub(world, "compile"), raw))
    assert details.startswith("spec.budget.max_teacher_calls: 101 is over"), details


def test_teacher_error_bodies_never_reach_clients(world: dict[str, Any]) -> None:
    """A real HTTP teacher (the operator's profile) answers 400 with a body quoting a
    secret. The operator's credential went to the operator's endpoint; the job error says
    which input and which status, and neither the owner nor an auditor sees the body."""
    owner, auditor = stub(world, "compile"), stub(world, "auditor")
    job = submit(owner, base_spec(profile="local-http", k=1))
    got = wait_final(owner, job.id)
    assert world["teacher"].auth and set(world["teacher"].auth) == {f"Bearer {TEACHER_KEY}"}
    assert got.state == "failed" and got.error_code == "INVALID_ARGUMENT"
    first = input_sha256(ROWS[0][0])
    assert "(HTTP 400)" in got.error and f"sha256 {first}" in got.error, got.error
    as_auditor = auditor.GetJob(pb.GetJobRequest(job_id=job.id), timeout=30)
    assert as_auditor.state == "failed" and as_auditor.error == ""
    assert as_auditor.error_code == "INVALID_ARGUMENT"
    owner_events = list(owner.WatchJob(pb.WatchJobRequest(job_id=job.id), timeout=30))
    auditor_events = list(auditor.WatchJob(pb.WatchJobRequest(job_id=job.id), timeout=30))
    assert owner_events[-1].state == "failed" and "(HTTP 400)" in owner_events[-1].message
    assert auditor_events[-1].state == "failed" and auditor_events[-1].message == ""
    assert auditor_events[-1].error_code == "INVALID_ARGUMENT"
    for message in [got, as_auditor, *owner_events, *auditor_events]:
        text = str(message)
        assert SECRET not in text and SECRET[:16] not in text and TEACHER_KEY not in text


def test_jobs_belong_to_their_submitter(world: dict[str, Any]) -> None:
    owner, other = stub(world, "compile", "idle"), stub(world, "compile2", "idle")
    admin, auditor = stub(world, "admin", "idle"), stub(world, "auditor", "idle")
    a, b = submit(owner, base_spec()), submit(owner, base_spec())

    def cancel(s: Any, job: Any) -> Any:
        return s.CancelJob(pb.CancelJobRequest(job_id=job.id), timeout=30)

    details = refused(lambda: cancel(other, a), grpc.StatusCode.PERMISSION_DENIED)
    assert (
        details == f"job {a.id} belongs to another client; only its owner or an admin may cancel it"
    )
    refused(lambda: cancel(auditor, a), grpc.StatusCode.PERMISSION_DENIED)
    assert cancel(owner, a).state == "cancelled"
    assert cancel(admin, b).state == "cancelled"
    mine = owner.GetJob(pb.GetJobRequest(job_id=a.id), timeout=30)
    assert mine.error == "cancelled before it ran" and mine.error_code == "CANCELLED"
    for s in (auditor, other):
        seen = s.GetJob(pb.GetJobRequest(job_id=a.id), timeout=30)
        assert seen.state == "cancelled" and seen.error == "" and seen.error_code == "CANCELLED"
        (end,) = [e for e in s.WatchJob(pb.WatchJobRequest(job_id=a.id)) if e.state == "cancelled"]
        assert end.message == "" and end.error_code == "CANCELLED"


# ---- the YAML alias bomb ---------------------------------------------------------------------


def bomb(levels: int = 6) -> str:
    """A few hundred bytes that expand to 10**levels values (in verifier.params)."""
    lines = ["x0: &x0 [a, a, a, a, a, a, a, a, a, a]"]
    for i in range(1, levels):
        lines.append(f"x{i}: &x{i} [" + ", ".join([f"*x{i - 1}"] * 10) + "]")
    body = "\n".join("    " + line for line in lines)
    spec = yaml.safe_dump({k: v for k, v in base_spec().items()})
    return spec + f"verifier:\n  name: label_set\n  params:\n{body}\n"


def test_the_alias_bomb_is_refused_locally_and_at_the_service(
    world: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = bomb()
    assert len(text.encode()) < 1200
    # refused while composing, before any expansion: no document is ever constructed
    from kolm_compile import spec as spec_module

    built: list[int] = []
    real = spec_module._StrictLoader.construct_document

    def counting(self: Any, node: Any) -> Any:
        built.append(1)
        return real(self, node)

    monkeypatch.setattr(spec_module._StrictLoader, "construct_document", counting)
    with pytest.raises(SpecError, match=r"^spec: more than 100000 values with its aliases"):
        load_spec_text(text)
    for name in ("gold.csv", "train.csv", "test.csv"):
        (tmp_path / name).write_bytes(table(ROWS))
    (tmp_path / "spec.yaml").write_text(text)
    with pytest.raises(SpecError, match=r"^spec: more than 100000 values"):
        TaskSpec.load(tmp_path / "spec.yaml")
    many = "a: &a 1\nb: [" + ", ".join(["*a"] * 101) + "]\n"
    with pytest.raises(SpecError, match=r"^spec: more than 100 YAML aliases"):
        load_spec_text(many)
    with pytest.raises(SpecError, match=r"^spec: recursive YAML alias"):
        load_spec_text("a: &a [1, *a]\n")
    with pytest.raises(SpecError, match=r"^spec: nested deeper than 64 levels"):
        load_spec_text("[" * 5000 + "]" * 5000)
    with pytest.raises(SpecError, match=r"^spec: big.yaml is larger than 1048576 bytes"):
        load_spec_text("#" * (1 << 20) + "\n", name="big.yaml")
    assert built == []  # every refusal above came before construction
    assert load_spec_text("a: 1\n") == {"a": 1}
    assert built == [1]  # (the counter sees a document that is built)
    monkeypatch.undo()
    s = stub(world, "compile")
    details = refused(lambda: s.SubmitJob(pb.SubmitJobRequest(spec_yaml=text), timeout=30))
    assert details.startswith("spec: more than 100000 values"), details
    deep = "[" * 5000 + "]" * 5000
    details = refused(lambda: s.SubmitJob(pb.SubmitJobRequest(spec_yaml=deep), timeout=30))
    assert details.startswith("spec: nested deeper than 64"), details
    # a spec with a few aliases, as people write them, still loads
    fine = yaml.safe_dump(base_spec()) + "budget: &b {max_teacher_calls: 50}\n"
    assert load_spec_text(fine)["budget"] == {"max_teacher_calls": 50}


# ---- teacher profiles without a service ------------------------------------------------------


def test_profiles_locally_and_bad_profile_files(tmp_path: Path) -> None:
    from kolm_compile.intake import ServicePolicy
    from kolm_ledger.errors import InvalidInput

    for name in ("gold.csv", "train.csv", "test.csv"):
        (tmp_path / name).write_bytes(table(ROWS))
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(base_spec(profile="p", k=1)))
    with pytest.raises(SpecError, match=r"^spec\.teacher\.profile: teacher profiles are the"):
        TaskSpec.load(tmp_path / "spec.yaml")
    (tmp_path / "teachers.yaml").write_text(
        "profiles:\n  p:\n    backend: openai\n    endpoint: http://127.0.0.1:9\n"
        "    api_key_env: KOLM_X\n    models: [small, big]\n"
    )
    profiles = TeacherProfiles.load(tmp_path / "teachers.yaml")
    policy = ServicePolicy(None, profiles=profiles, service=False, base_dir=tmp_path)
    spec = TaskSpec.load(tmp_path / "spec.yaml", policy=policy)
    t = spec.teacher
    assert (t.backend, t.endpoint, t.api_key_env, t.model, t.profile) == (
        "openai", "http://127.0.0.1:9", "KOLM_X", "small", "p"
    )  # fmt: skip
    assert spec.data.unlabeled == tmp_path / "train.csv"  # the operator reads local paths
    for body, where in [
        ("profiles:\n  p: {backend: openai, models: [m], endpoint: 'http://u:pw@h'}", "endpoint"),
        ("profiles:\n  p: {backend: openai}", "models"),
        ("profiles:\n  p: {backend: nope}", "backend"),
        ("profiles:\n  p: {backend: openai, models: [m], secret: x}", "secret"),
        ("profiles:\n  p: {backend: simulated, endpoint: 'http://h'}", "endpoint"),
        ("profiles:\n  p: {backend: openai, models: [m], api_key_env: 'A-B'}", "api_key_env"),
    ]:
        (tmp_path / "bad.yaml").write_text(body)
        with pytest.raises(InvalidInput, match=rf"^--teachers bad\.yaml: profiles\.p\.?.*{where}"):
            TeacherProfiles.load(tmp_path / "bad.yaml")
