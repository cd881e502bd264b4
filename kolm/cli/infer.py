"""``kolm infer serve`` and ``kolm predict`` (a ``kolm.commands`` plug-in).

Importing this module is cheap: torch, the engine and the stubs load only when a
command runs, so ``kolm --help`` stays fast and torch-free.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from kolm_ledger.errors import InvalidInput

__all__ = ["cmd_infer_serve", "cmd_predict", "register"]


def cmd_infer_serve(a: argparse.Namespace) -> int:
    """Run the inference service until SIGTERM/SIGINT."""
    import asyncio

    from kolm.cli._tls_args import channel_credentials_from_args, server_credentials_from_args
    from kolm_infer.service import serve
    from kolm_ledger.keys import PrivateKey, TrustRoot
    from kolm_ledger.service.rpc import configure_logging
    from kolm_ledger.service.tls import client_credentials

    configure_logging(a.log_level)
    creds = server_credentials_from_args(a, "infer", a.listen)
    if a.tls_dir:
        to_ledger = client_credentials(a.tls_dir, "infer")
    else:
        to_ledger = channel_credentials_from_args(a, a.ledger)  # plain text only to loopback
    d = Path(a.artifacts)
    if not d.is_dir():
        raise InvalidInput(f"--artifacts {d}: not a directory")
    teacher = task = None
    if a.teacher:
        from kolm_compile.spec import TaskSpec
        from kolm_compile.teachers import build_teacher

        task = TaskSpec.load(a.teacher, check_files=False)
        teacher = build_teacher(task.teacher, task)
    asyncio.run(
        serve(
            a.ledger,
            TrustRoot.load(a.trust),
            PrivateKey.load(a.key),
            listen=a.listen,
            metrics_port=a.metrics_port,
            ready_file=a.ready_file,
            artifacts=sorted(d.glob("*.kolm")),
            artifacts_dir=d,
            teacher=teacher,
            teacher_task=task,
            spool=a.spool,
            receipt_ack=a.receipt_ack,
            max_batch=a.max_batch,
            max_wait_ms=a.max_wait_ms,
            output_policy=a.output_policy,
            credentials=creds,
            ledger_credentials=to_ledger,
            key_poll_s=a.key_poll_seconds,
            on_teacher_failure=a.on_teacher_failure,
        )
    )
    return 0


def cmd_predict(a: argparse.Namespace) -> int:
    """Send one prediction; print the answer, write its receipt (bundle or promise)."""
    import grpc

    from kolm_infer._pb import infer_pb2 as pb
    from kolm_infer._pb import infer_pb2_grpc as pb_grpc
    from kolm_ledger.service.client import channel_options
    from kolm_ledger.service.rpc import error_from_rpc

    with grpc.insecure_channel(a.to, channel_options()) as ch:
        stub = pb_grpc.InferenceStub(ch)  # type: ignore[no-untyped-call]
        try:
            req = pb.PredictRequest(artifact=a.artifact, input=a.text, wait_for_inclusion=a.wait)
            if a.recall_k is not None:
                if a.recall_k < 0:
                    raise InvalidInput(f"--recall-k {a.recall_k}: want 0 or more")
                req.recall_k = a.recall_k
            r = stub.Predict(req, timeout=a.timeout)
        except grpc.RpcError as e:
            raise error_from_rpc(e) from e
    print(r.output)
    state = "verified" if r.verified else "UNVERIFIED"
    print(
        f"{state}; backend {r.backend} ({r.reason}); confidence {r.confidence:.3f}; "
        f"request {r.request_id}",
        file=sys.stderr,
    )
    print(f"salt {r.salt.hex()}  (keep it: it opens the input commitment)", file=sys.stderr)
    if a.salt_out:
        _write_private(a.salt_out, r.salt.hex() + "\n")
        print(f"wrote the salt to {a.salt_out}", file=sys.stderr)
    if r.evidence:
        print(f"evidence (corpus root {r.corpus_root[:16]}…):", file=sys.stderr)
        for ev in r.evidence:
            label = f" [{ev.label}]" if ev.label else ""
            print(f"  {ev.score:.3f} {ev.id}{label} @ {ev.position}", file=sys.stderr)
    if r.HasField("recall_vote"):
        v = r.recall_vote
        print(
            f"neighbour vote: {v.label} ({v.share:.2f} of {v.neighbours}); "
            f"{'backs' if v.agrees else 'does not back'} the answer",
            file=sys.stderr,
        )
    if a.out:
        kind = r.WhichOneof("receipt")
        if kind == "bundle":
            Path(a.out).write_bytes(r.bundle)
        else:
            obj: dict[str, Any] = {"envelope": json.loads(r.envelope)}
            if kind == "promise":
                from kolm_ledger.formats.promise import Promise

                p = r.promise
                obj["promise"] = Promise(
                    p.origin, p.index, p.leaf_hash, p.integrated_time_us, p.key_id, p.signature
                ).to_json()
            else:
                obj["spooled"] = True
            Path(a.out).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
        print(f"wrote {a.out} ({kind})", file=sys.stderr)
    return 0


def _write_private(path: str, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only (0600): the salt opens the input
    commitment, so whoever holds it and the receipt can test guesses of the input."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        raise InvalidInput(f"--salt-out {path}: {e.strerror}") from e


def register(sub: Any) -> None:
    """Add ``infer`` and ``predict`` to the root ``kolm`` subparsers."""
    from kolm.cli._tls_args import add_server_tls_arguments

    inf = sub.add_parser("infer", help="serve verified artifacts with signed receipts")
    isub = inf.add_subparsers(dest="infer_command", required=True)
    s = isub.add_parser("serve", help="run the inference gRPC service")
    s.add_argument(
        "--artifacts",
        required=True,
        help="directory: every *.kolm in it is loaded at start; LoadArtifact(path=...) may "
        "name only files in it",
    )
    s.add_argument("--ledger", required=True, help="ledger service HOST:PORT")
    s.add_argument("--key", required=True, help="infer private key (PEM)")
    s.add_argument("--trust", required=True, help="trust root (trust.json)")
    s.add_argument("--teacher", help="task spec YAML whose teacher answers the escape hatch")
    s.add_argument(
        "--on-teacher-failure",
        choices=("refuse", "student"),
        default="refuse",
        help="an input outside the student's cover that no teacher answers: refuse it "
        "(default, FAILED_PRECONDITION/UNAVAILABLE naming why) or answer with the student, "
        "unverified, reason teacher_unavailable",
    )
    s.add_argument("--listen", default="127.0.0.1:7071")
    add_server_tls_arguments(s)
    s.add_argument("--spool", help="durable local spool (SQLite) for when the ledger is down")
    s.add_argument(
        "--receipt-ack",
        choices=("ledger", "spool"),
        default="ledger",
        help="ledger (default, fail closed): answer once the ledger acknowledged the receipt;"
        " spool (needs --spool): answer once it is durable in the local spool",
    )
    s.add_argument("--max-batch", type=int, default=32, help="requests per forward pass")
    s.add_argument("--max-wait-ms", type=float, default=1.0, help="longest wait to fill a batch")
    s.add_argument(
        "--output-policy",
        choices=("full", "digest"),
        default="full",
        help="receipts carry the output (full) or only its digest",
    )
    s.add_argument(
        "--key-poll-seconds",
        type=float,
        default=5.0,
        help="read the ledger's key receipts this often: an artifact whose compile key is "
        "revoked stops being served within about that long (default 5)",
    )
    s.add_argument("--metrics-port", type=int, help="Prometheus metrics on this HTTP port")
    s.add_argument("--ready-file", help="write the bound port here once serving")
    s.add_argument("--log-level", default="INFO")
    s.set_defaults(func=cmd_infer_serve)

    p = sub.add_parser("predict", help="ask an inference service for one prediction")
    p.add_argument("text")
    p.add_argument("--to", required=True, help="inference service HOST:PORT")
    p.add_argument("--artifact", required=True, help="artifact name or digest")
    p.add_argument("--out", help="write the receipt bundle (--wait) or the promise here")
    p.add_argument("--wait", action="store_true", help="wait for inclusion: get the bundle")
    p.add_argument(
        "--salt-out",
        help="write the input commitment's salt (hex) here, mode 0600: with the input it "
        "opens the commitment (kolm verify --input FILE --salt HEX)",
    )
    p.add_argument(
        "--recall-k",
        type=int,
        help="recall chunks to retrieve and cite (default: the artifact's; 0: none; max 10)",
    )
    p.add_argument("--timeout", type=float, default=60.0)
    p.set_defaults(func=cmd_predict)
