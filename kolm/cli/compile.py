"""``kolm compile ...`` subcommands (registered through the ``kolm.commands`` entry point)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["register", "run_with_progress"]

#: the compile service's usual port (ledger 7070, inference 7071)
DEFAULT_LISTEN = "127.0.0.1:7072"


def register(sub: Any) -> None:
    """Add ``kolm compile run`` to the root parser (imports stay lazy)."""
    p = sub.add_parser("compile", help="turn a teacher into a signed Specialist (.kolm)")
    csub = p.add_subparsers(dest="compile_command", required=True)
    r = csub.add_parser("run", help="run a compile job locally, with progress bars")
    r.add_argument("spec", help="task spec (YAML or JSON)")
    where = r.add_mutually_exclusive_group(required=True)
    where.add_argument("--db", help="append receipts to this ledger database (in-process)")
    where.add_argument("--ledger", help="append receipts to this ledger service (HOST:PORT)")
    r.add_argument("--keys", required=True, help="key folder (compile.key, trust.json, log.key)")
    r.add_argument("--out", help="where the .kolm goes (default: the work folder)")
    r.add_argument(
        "--work",
        help="job folder: stages, teacher cache, build (default: ./kolm-work); a folder that "
        "holds an interrupted job of the same spec resumes it",
    )
    r.add_argument("--bundle-base", action="store_true", help="ship the base weights inside")
    r.add_argument("--threads", type=int, help="torch threads (part of reproducibility)")
    r.add_argument(
        "--teachers", help="teacher profiles (YAML) for a spec that names teacher.profile"
    )
    r.add_argument(
        "--teacher-cache",
        help="teacher answers by content, shared by jobs (default: $KOLM_TEACHER_CACHE or "
        "~/.cache/kolm/teacher-cache.sqlite): a new job pays only for samples none bought",
    )
    r.add_argument(
        "--json",
        action="store_true",
        help="print only the result, as JSON, on stdout (progress goes to stderr)",
    )
    r.set_defaults(func=_cmd_run)

    c = csub.add_parser(
        "check",
        help="validate a spec and its data, and estimate requests, samples, tokens and cost "
        "(calls no teacher)",
    )
    c.add_argument("spec", help="task spec (YAML or JSON)")
    c.add_argument("--teachers", help="teacher profiles (YAML), as for run")
    c.add_argument(
        "--teacher-cache", help="count samples this cache already holds as free (as for run)"
    )
    c.add_argument("--json", action="store_true", help="print the estimate as JSON")
    c.set_defaults(func=_cmd_check)

    from kolm.cli._tls_args import add_server_tls_arguments

    s = csub.add_parser("serve", help="run the compile gRPC service (jobs persist in --work)")
    s.add_argument("--ledger", required=True, help="ledger service HOST:PORT")
    s.add_argument(
        "--keys", required=True, help="key folder holding compile.key (or that file itself)"
    )
    s.add_argument("--work", required=True, help="jobs database, job folders, uploads/, artifacts/")
    s.add_argument(
        "--data-root",
        help="folder whose files submitted specs may name (relative paths; default: none, "
        "specs read only datasets their client uploaded)",
    )
    s.add_argument(
        "--teachers",
        help="teacher profiles (YAML: backend, endpoint, api_key_env, models, prices) that "
        "submitted specs name as teacher.profile; default: none (only simulated and replay)",
    )
    s.add_argument(
        "--max-upload-bytes",
        type=int,
        default=256 << 20,
        help="largest dataset UploadDataset accepts (default: 268435456, 256 MiB)",
    )
    s.add_argument("--listen", default=DEFAULT_LISTEN)
    add_server_tls_arguments(s)
    s.add_argument("--threads", type=int, help="torch threads per job")
    s.add_argument("--ready-file", help="write the bound port here once serving")
    s.add_argument("--log-level", default="INFO")
    s.set_defaults(func=_cmd_serve)

    u = csub.add_parser("submit", help="submit a task spec to a compile service")
    u.add_argument(
        "spec",
        help="task spec (YAML or JSON); the local files it names are uploaded first (a path "
        "that is not here is left for the service's --data-root)",
    )
    u.add_argument("--to", required=True, help="compile service HOST:PORT")
    u.add_argument("--bundle-base", action="store_true", help="ship the base weights inside")
    u.add_argument("--watch", action="store_true", help="print stage events until the job ends")
    u.add_argument("--fetch", metavar="OUT.kolm", help="download the artifact (implies --watch)")
    u.add_argument("--tls-dir", help="connect with mutual TLS using the certificates in DIR")
    u.add_argument(
        "--role", default="compile", help="client certificate role to present (default: compile)"
    )
    u.set_defaults(func=_cmd_submit)


def run_with_progress(job: Any, console: Any) -> Any:
    """Run a :class:`~kolm_compile.pipeline.CompileJob` with one rich progress bar per stage
    on a terminal, else (a pipe, a CI log) with plain lines (:func:`plain_progress`)."""
    if not console.is_terminal:
        job.emit = plain_progress(console.file)
        return job.run()
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from kolm_compile.pipeline import STAGE_TITLES as names
    from kolm_compile.pipeline import STAGES

    with Progress(
        TextColumn("{task.description:<24}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
    ) as prog:
        tasks = {s: prog.add_task(names[s], total=None, info="", start=False) for s in STAGES}

        def on_event(e: Any) -> None:
            t = tasks[e.stage]
            if e.state == "started":
                prog.start_task(t)
                prog.update(t, total=e.total or None)
            elif e.state == "progress":
                info = " ".join(f"{k}={v}" for k, v in e.counters.items())
                prog.update(t, completed=e.done, total=e.total or None, info=info)
            elif e.state == "resumed":  # done by an earlier run of this job folder
                prog.start_task(t)
                prog.update(t, completed=1, total=1, info="resumed")
            elif e.state == "note":
                prog.console.print(e.message)
            else:
                info = " ".join(
                    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in e.counters.items()
                )
                prog.update(t, completed=e.total or 1, total=e.total or 1, info=info)

        job.emit = on_event
        return job.run()


def digest_lines(result: Any) -> list[str]:
    """The whole digests a later command needs (``kolm report``, ``kolm provenance``)."""
    return [
        f"artifact digest: {result.artifact_digest}",
        f"training-set root: {result.training_set_root}",
        f"eval receipt leaf: {result.eval_leaf}",
    ]


def _fmt_counters(counters: Any) -> str:
    return " ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in counters.items()
    )


def plain_progress(out: Any, *, every_s: float = 5.0) -> Any:
    """An ``on_event`` that writes one plain line per stage step to ``out``: each start,
    finish, resume and note, and progress (done/total, counters such as rate and retries)
    at most every ``every_s`` seconds per stage (the first step and the last always)."""
    import time

    from kolm_compile.pipeline import STAGE_TITLES

    last: dict[str, float] = {}

    def on_event(e: Any) -> None:
        now = time.monotonic()
        if e.state == "progress":
            first = e.stage not in last
            if not first and e.done != e.total and now - last[e.stage] < every_s:
                return
            last[e.stage] = now
        title = STAGE_TITLES.get(e.stage, e.stage)
        if e.state == "note":
            line = f"{title}: {e.message}"
        else:
            prog = f" {e.done}/{e.total}" if e.total and e.state == "progress" else ""
            line = f"{title}: {e.state}{prog} {_fmt_counters(e.counters)}".rstrip()
            if e.state == "started":
                last.pop(e.stage, None)
        print(line, file=out, flush=True)

    return on_event


def summary_table(result: Any) -> Any:
    """The closing table of a compile."""
    from rich.table import Table

    t = Table(title=f"compiled {result.artifact_path.name}")
    t.add_column("measure")
    t.add_column("value", justify="right")
    k = result.k_score
    t.add_row(
        "labels sampled / accepted / rejected",
        f"{result.labels_sampled} / {result.labels_accepted} / {result.labels_rejected}",
    )
    reasons = result.labels.get("rejected_reasons") or {}
    if reasons:
        t.add_row("rejected, by reason", ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())))
    hold = result.labels.get("holdout") or {}
    if hold.get("leaked") or hold.get("mapped") or hold.get("dropped"):
        t.add_row(
            "holdout rows: mapped / dropped / also in training",
            f"{hold.get('mapped', 0)} / {hold.get('dropped', 0)} / {hold.get('leaked', 0)}",
        )
    t.add_row("label receipts acknowledged", str(result.labels_logged))
    t.add_row("student K-score (95% CI)", f"{k.score:.2f} ({k.low:.1f}–{k.high:.1f}), n={k.n}")
    if result.teacher_single and result.teacher_vote:
        t.add_row(
            "teacher K-score: single sample / k-vote",
            f"{result.teacher_single.score:.2f} / {result.teacher_vote.score:.2f}",
        )
    c = result.cost
    t.add_row(
        "teacher samples, estimated cost", f"{c['teacher_calls']}, ${c['estimated_cost']:.4f}"
    )
    if "teacher_requests_billed_by_this_job" in c:
        t.add_row(
            "bought by this job (all runs)",
            f"{c['teacher_samples_bought_by_this_job']} samples in "
            f"{c['teacher_requests_billed_by_this_job']} requests, ${c['cost_paid_by_this_job']:.4f}"
            f" ({c['teacher_requests_failed_not_billed']} failed requests, not billed)",
        )
    if c.get("teacher_cost_per_call"):
        t.add_row(
            "per call: teacher vs student",
            f"${c['teacher_cost_per_call']:.6f} vs ${c['student_cost_per_call']:.8f}",
        )
    if result.recall:
        r = result.recall
        t.add_row(
            "recall index",
            f"{r['chunks']} chunks ({r['chunking'].get('source')}), k={r.get('k')}, "
            f"corpus root {r['corpus_root']}",
        )
    t.add_row("seconds per stage", ", ".join(f"{s} {v:.1f}" for s, v in result.seconds.items()))
    return t


def _cmd_run(a: argparse.Namespace) -> int:
    from rich.console import Console

    from kolm_compile.cache import default_teacher_cache
    from kolm_compile.pipeline import CompileJob, CompileOptions
    from kolm_compile.sinks import open_sink

    # with --json stdout carries the result only: progress and notes go to stderr
    console = Console(stderr=a.json)
    spec = _load_spec(a)
    keys = Path(a.keys)
    key, trust = _load_keys(keys)
    sink = open_sink(db=a.db, ledger=a.ledger, keys=keys, trust=trust)
    from kolm_compile.student import embed_texts

    cache = Path(a.teacher_cache) if a.teacher_cache else default_teacher_cache()
    try:
        job = CompileJob(
            spec,
            key=key,
            sink=sink,
            job_dir=Path(a.work or "kolm-work"),
            out_dir=Path(a.out) if a.out else None,
            options=CompileOptions(
                bundle_base=a.bundle_base, threads=a.threads, teacher_cache=cache
            ),
            embed=embed_texts,
        )
        result = run_with_progress(job, console)
    finally:
        sink.close()
    if a.json:
        print(json.dumps(result.to_dict(), indent=2, sort_keys=True))
    else:
        console.print(summary_table(result))
        # whole digests, one a line and never wrapped: kolm report / provenance take them
        for line in digest_lines(result):
            print(line, flush=True)
        print(f"wrote {result.artifact_path}", flush=True)
    return 0


def _load_spec(a: argparse.Namespace) -> Any:
    from kolm_compile.spec import TaskSpec

    policy = None
    if a.teachers:
        from kolm_compile.intake import ServicePolicy, TeacherProfiles

        policy = ServicePolicy(
            None,
            profiles=TeacherProfiles.load(a.teachers),
            service=False,
            base_dir=Path(a.spec).parent,
        )
    return TaskSpec.load(a.spec, policy=policy)


def _load_keys(keys: Path) -> tuple[Any, Any]:
    """compile.key and trust.json of a key folder, refused in plain words when the folder
    is not one (checked before any teacher call)."""
    from kolm_ledger._crypto import PrivateKey
    from kolm_ledger.errors import KolmError, SpecError
    from kolm_ledger.keys import TrustRoot

    hint = "a key folder from `kolm init` holds compile.key, trust.json and log.key"
    if not keys.is_dir():
        raise SpecError(f"--keys {keys}: no such folder ({hint})")
    missing = [n for n in ("compile.key", "trust.json") if not (keys / n).is_file()]
    if missing:
        raise SpecError(f"--keys {keys}: no {' or '.join(missing)} there ({hint})")
    try:
        key = PrivateKey.load(keys / "compile.key")
        trust = TrustRoot.load(keys / "trust.json")
    except (KolmError, OSError, ValueError) as e:
        raise SpecError(f"--keys {keys}: cannot read its keys ({e})") from e
    try:
        k = trust.get(key.keyid())
    except KolmError:
        raise SpecError(
            f"--keys {keys}: its compile.key (key id {key.keyid()}) is not listed in its own "
            "trust.json; the folder is mixed up from two setups"
        ) from None
    if k.role != "compile":
        raise SpecError(f"--keys {keys}: compile.key has role {k.role} in trust.json, not compile")
    return key, trust


def _cmd_check(a: argparse.Namespace) -> int:
    """``kolm compile check SPEC``: validate and estimate; no teacher is called."""
    from rich.console import Console
    from rich.table import Table

    from kolm_compile.estimate import estimate

    spec = _load_spec(a)
    est = estimate(spec, teacher_cache=Path(a.teacher_cache) if a.teacher_cache else None)
    if a.json:
        print(json.dumps(est, indent=2, sort_keys=True))
        return 0
    t = Table(title=f"kolm compile check {Path(a.spec).name}: the spec and its data are valid")
    t.add_column("measure")
    t.add_column("value", justify="right")
    for label, value in est["table"]:
        t.add_row(label, value)
    Console().print(t)
    for note in est["notes"]:
        print(note)
    return 0


def _cmd_serve(a: argparse.Namespace) -> int:
    import asyncio

    from kolm.cli._tls_args import server_credentials_from_args
    from kolm_compile.intake import TeacherProfiles
    from kolm_compile.service import JobRunner, serve
    from kolm_compile.sinks import ServiceSink
    from kolm_compile.student import embed_texts
    from kolm_ledger.service.client import LedgerClient
    from kolm_ledger.service.rpc import configure_logging
    from kolm_ledger.service.tls import client_credentials

    configure_logging(a.log_level)
    teachers = TeacherProfiles.load(a.teachers) if a.teachers else None
    creds = server_credentials_from_args(a, "compile", a.listen)
    to_ledger = client_credentials(a.tls_dir, "compile") if a.tls_dir else None
    if to_ledger is None:
        from kolm.cli._tls_args import channel_credentials_from_args

        channel_credentials_from_args(a, a.ledger)  # plain text only toward loopback
    keys = Path(a.keys)
    runner = JobRunner(
        Path(a.work),
        keys_dir=keys.parent if keys.name == "compile.key" and keys.is_file() else keys,
        sink_factory=lambda: ServiceSink(
            LedgerClient(a.ledger, timeout=600, credentials=to_ledger)
        ),
        data_root=Path(a.data_root) if a.data_root else None,
        teachers=teachers,
        max_upload_bytes=a.max_upload_bytes,
        threads=a.threads,
        embed=embed_texts,
    )
    asyncio.run(serve(runner, listen=a.listen, ready_file=a.ready_file, credentials=creds))
    return 0


def _dataset_chunks(filename: str, what: Path | bytes) -> Any:
    """``DatasetChunk`` messages of a file (or bytes): 1 MiB each, the first naming the
    file, the last carrying its SHA-256."""
    import hashlib

    from kolm_compile._pb import compile_pb2 as pb

    h = hashlib.sha256()
    if isinstance(what, bytes):
        h.update(what)
        parts: Any = (what[i : i + (1 << 20)] for i in range(0, len(what), 1 << 20))
    else:
        with what.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)

        def read() -> Any:
            with what.open("rb") as f:
                yield from iter(lambda: f.read(1 << 20), b"")

        parts = read()
    first = True
    for block in parts:
        yield pb.DatasetChunk(filename=filename if first else "", data=block)
        first = False
    yield pb.DatasetChunk(filename=filename if first else "", sha256=h.hexdigest())


def _cmd_submit(a: argparse.Namespace) -> int:
    import hashlib

    import grpc
    import yaml

    from kolm.cli._tls_args import channel_credentials_from_args
    from kolm_compile._pb import compile_pb2 as pb
    from kolm_compile._pb import compile_pb2_grpc as pb_grpc
    from kolm_compile.intake import prepare_submission
    from kolm_compile.spec import MAX_SPEC_BYTES, load_spec_text
    from kolm_ledger.errors import SpecError
    from kolm_ledger.service.client import channel_options
    from kolm_ledger.service.rpc import error_from_rpc

    spec_path = Path(a.spec)
    try:
        with spec_path.open("rb") as f:
            data = f.read(MAX_SPEC_BYTES + 1)
    except OSError as e:
        raise SpecError(f"spec: cannot read {a.spec}: {e.strerror or e}") from e
    raw = load_spec_text(data, json_only=spec_path.suffix.lower() == ".json", name=spec_path.name)
    if not isinstance(raw, dict):
        raise SpecError(f"spec: must be a mapping, got {type(raw).__name__}")
    creds = channel_credentials_from_args(a, a.to)
    ch = (
        grpc.secure_channel(a.to, creds, channel_options())
        if creds
        else grpc.insecure_channel(a.to, channel_options())
    )
    with ch:
        stub = pb_grpc.CompileStub(ch)  # type: ignore[no-untyped-call]

        def upload(filename: str, what: Path | bytes) -> str:
            got = stub.UploadDataset(_dataset_chunks(filename, what), timeout=600)
            return str(got.ref)

        try:
            raw, uploaded = prepare_submission(raw, spec_path.parent, upload)
            for dotted, local, ref in uploaded:
                print(f"uploaded spec.{dotted}: {local} as {ref}", file=sys.stderr, flush=True)
            text = yaml.safe_dump(raw, sort_keys=False, allow_unicode=True)
            job = stub.SubmitJob(
                pb.SubmitJobRequest(spec_yaml=text, bundle_base=a.bundle_base), timeout=60
            )
            print(job.id, flush=True)
            if not (a.watch or a.fetch):
                return 0
            for ev in stub.WatchJob(pb.WatchJobRequest(job_id=job.id)):
                counters = " ".join(f"{k}={v:.4g}" for k, v in sorted(ev.counters.items()))
                prog = f" {ev.done}/{ev.total}" if ev.total else ""
                print(
                    f"{ev.stage:<9} {ev.state:<9}{prog} {counters} {ev.message}".rstrip(),
                    flush=True,
                )
            job = stub.GetJob(pb.GetJobRequest(job_id=job.id), timeout=60)
            if job.state != "succeeded":
                print(f"job {job.id} {job.state}: {job.error or job.error_code}", file=sys.stderr)
                return 1
            r = json.loads(job.result_json)
            k = r["k_score"]
            print(
                f"job {job.id} succeeded: {Path(r['artifact']).name} "
                f"K-score {k['score']:.2f} ({k['low']:.1f}-{k['high']:.1f}, n={k['n']}), "
                f"labels {r['labels']['logged']}/{r['labels']['sampled']}, "
                f"artifact {job.artifact_digest}"
            )
            if a.fetch:
                h = hashlib.sha256()
                want = ""
                with open(a.fetch, "wb") as out:
                    for c in stub.FetchArtifact(
                        pb.FetchArtifactRequest(digest=job.artifact_digest)
                    ):
                        out.write(c.data)
                        h.update(c.data)
                        want = c.sha256 or want
                if h.hexdigest() != want:
                    print(f"{a.fetch}: sha256 {h.hexdigest()}, server says {want}", file=sys.stderr)
                    return 1
                print(f"wrote {a.fetch}")
        except grpc.RpcError as e:
            raise error_from_rpc(e) from e
    return 0
