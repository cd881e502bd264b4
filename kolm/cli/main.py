"""The ``kolm`` command.

The root parser. Each package's subcommands live in one module here (``kolm.cli.compile``,
``kolm.cli.recall``, ``kolm.cli.infer``; the ledger's, keys', verify's and audit's in this
one) whose ``register(subparsers)`` adds its parsers and sets ``func`` on them; imports
stay inside the handlers, so ``kolm verify`` never loads torch.

Exit codes: 0 success; 1 a verification or audit failed; 2 bad input or another error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kolm_ledger.errors import KolmError, VerificationError

__all__ = ["main"]

Handler = Callable[[argparse.Namespace], int]


def _trust_default(keyfile: str) -> Path:
    return Path(keyfile).resolve().parent / "trust.json"


def cmd_keys_init(a: argparse.Namespace) -> int:
    from kolm_ledger.keys import init_keys

    root = init_keys(a.dir, origin=a.origin)
    for k in root.keys:
        print(f"{k.role:8} {k.algorithm:18} {k.keyid}")
    print(f"wrote {Path(a.dir) / 'trust.json'}")
    return 0


def _open_ledger(db: str, trust_path: str | Path, log_key_path: str | Path) -> Any:
    from kolm_ledger.keys import PrivateKey, TrustRoot
    from kolm_ledger.log.ledger import Ledger
    from kolm_ledger.storage import Store

    return Ledger(Store(db), TrustRoot.load(trust_path), PrivateKey.load(log_key_path))


def cmd_ledger_append(a: argparse.Namespace) -> int:
    from kolm_ledger.formats.receipts import Statement, sign_statement
    from kolm_ledger.keys import PrivateKey

    trust = a.trust or _trust_default(a.key)
    log_key = a.log_key or Path(trust).parent / "log.key"
    try:
        data = Path(a.statement).read_bytes()
    except OSError as e:
        raise KolmError(f"cannot read statement {a.statement}: {e.strerror}") from e
    st = Statement.from_document(data)  # a person's file; signed as canonical JSON
    env = sign_statement(st, PrivateKey.load(a.key))
    ledger = _open_ledger(a.db, trust, log_key)
    (res,) = ledger.append([env])
    print(res.index)
    return 0


def cmd_ledger_checkpoint(a: argparse.Namespace) -> int:
    from kolm_ledger.errors import NotFoundError
    from kolm_ledger.storage import Store

    cp = Store(a.db).latest_checkpoint()
    if cp is None:
        raise NotFoundError("the log is empty; no checkpoint yet")
    sys.stdout.write(cp.note.decode())
    return 0


def cmd_ledger_bundle(a: argparse.Namespace) -> int:
    from kolm_ledger.formats.bundle import Bundle
    from kolm_ledger.storage import Store

    store = Store(a.db)
    try:
        b = Bundle.from_store(store, a.index)
    finally:
        store.close()
    sys.stdout.write(b.to_bytes().decode())
    return 0


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def cover_line(cover: Any, gate: Any) -> str:
    """Step 8's selective-prediction line: the artifact receipt's ``cover`` (its cover
    K-score and coverage on the holdout) and whether the prediction receipt's ``gate``
    put this input inside the cover (its values re-checked against the thresholds)."""
    if not isinstance(cover, dict):
        head = "the artifact receipt records no cover (compiled before selective prediction)"
    else:
        ks, cov = _num(cover.get("cover_k_score")), _num(cover.get("coverage"))
        iv = cover.get("cover_interval")
        ivs = (
            f" [{iv[0]:.1f}, {iv[1]:.1f}]"
            if isinstance(iv, list) and len(iv) == 2 and all(_num(x) is not None for x in iv)
            else ""
        )
        tgt = _num(cover.get("target_cover_k_score"))
        head = (
            f"cover ({str(cover.get('rule'))[:20]} gate): K-score "
            + (f"{ks:.1f}{ivs}" if ks is not None else "?")
            + " on "
            + (f"{cov:.1f}%" if cov is not None else "?")
            + " of the holdout"
            + (f" (target {tgt:.1f})" if tgt is not None else "")
        )
    if not isinstance(gate, dict):
        return head + "; the prediction receipt records no gate values"
    inside = gate.get("inside")
    vals = {k: _num(gate.get(k)) for k in ("prob", "t_prob", "sim", "t_sim")}
    parts = [f"{k} {v:g}" for k, v in vals.items() if v is not None]
    recomputed = None
    if vals["prob"] is not None and vals["t_prob"] is not None:
        recomputed = vals["prob"] >= vals["t_prob"] and (
            vals["sim"] is None or vals["t_sim"] is None or vals["sim"] >= vals["t_sim"]
        )
    where = "inside" if inside is True else "outside" if inside is False else "?"
    line = f"{head}; this prediction was {where} the cover ({', '.join(parts)})"
    if recomputed is not None and recomputed is not inside:
        line += "; WARNING: the recorded decision does not follow from the recorded values"
    if isinstance(cover, dict):
        for k in ("t_prob", "t_sim"):
            if k in cover and vals[k] is not None and _num(cover[k]) != vals[k]:
                line += f"; WARNING: its {k} is not the artifact's ({cover[k]})"
    return line


class _PendingReceipt:
    """A receipt file that is not yet a bundle: what ``kolm predict --out`` writes without
    ``--wait`` — a *promise* (the envelope and the log's signed promise to include it) or a
    *spooled* receipt (the envelope only, the ledger was down). ``kolm verify --ledger``
    fetches its entry (by the promise's leaf hash, or by the envelope's statement digest),
    demands that the log holds exactly this envelope, and checks that the log kept its
    signed promise (same origin, index, leaf hash and integration time)."""

    def __init__(self, envelope: Any, promise: Any, path: str) -> None:
        self.envelope = envelope
        self.promise = promise
        self.path = path
        self.what = "promise" if promise is not None else "spooled receipt"

    def fetch(self, client: Any, trust: Any, ledger: str) -> Any:
        from kolm_ledger.formats.leaf import statement_digest
        from kolm_ledger.formats.note import key_id
        from kolm_ledger.formats.promise import verify_promise

        p = self.promise
        try:
            if p is not None:
                bundle = client.bundle(leaf_hash=p.leaf_hash)
            else:
                bundle = client.bundle(statement_digest=statement_digest(self.envelope))
        except KolmError as e:
            raise _at(
                1,
                f"the ledger at {ledger} has no entry for this {self.what} "
                f"({'leaf hash ' + p.leaf_hash.hex()[:16] if p is not None else 'statement'}…): "
                f"{e}",
            ) from e
        if bundle.envelope != self.envelope:
            raise _at(1, f"the ledger's entry does not hold the envelope in {self.path}")
        if p is not None:
            logs = [
                k
                for k in trust.log_keys(p.origin)
                if key_id(p.origin, k.public_key).hex() == p.key_id
            ]
            if not logs:
                raise _at(
                    3,
                    f"promise key {p.key_id[:16]!r} for origin {p.origin[:60]!r} is not a log "
                    "key in the trust root",
                )
            try:
                verify_promise(p, logs[0].public_key)
            except KolmError as e:
                raise _at(3, str(e)) from e
        return bundle

    def check_kept(self, v: Any, bundle: Any) -> None:
        p = self.promise
        if p is None:
            return
        got = (v.checkpoint.origin, v.index, bundle.integrated_time)
        want = (p.origin, p.index, p.integrated_time_us)
        if got != want:
            raise _at(
                7,
                f"the log broke its signed promise: it promised origin/index/time {want}, "
                f"the entry is at {got}",
            )


def _at(step: int, msg: str) -> KolmError:
    """A verification failure at ``step``, named as every other step's (``at_step``)."""
    from kolm_ledger.verify.receipt import at_step

    return at_step(step, VerificationError(msg))


def _pending_receipt(data: bytes, path: str) -> _PendingReceipt | None:
    """Recognise a promise or spooled-receipt file; ``None`` for anything else (a bundle,
    or bytes that step 1 of the bundle check will name)."""
    from kolm_ledger.formats.bundle import MAX_BUNDLE_BYTES
    from kolm_ledger.formats.canonical import parse_json
    from kolm_ledger.formats.dsse import Envelope
    from kolm_ledger.formats.promise import Promise

    if len(data) > MAX_BUNDLE_BYTES:  # the bundle parser refuses it at step 1, by size
        return None
    try:
        obj = parse_json(data)
    except KolmError:  # not JSON: the bundle parser names it at step 1
        return None
    if not isinstance(obj, dict) or "tlog_proof" in obj:
        return None
    if "promise" not in obj and obj.get("spooled") is not True:
        return None
    extra = set(obj) - {"envelope", "promise", "spooled"}
    if extra:
        raise _at(1, f"{path}: unknown field(s) {', '.join(sorted(extra))[:200]}")
    try:
        envelope = Envelope.from_json(obj.get("envelope"))
    except KolmError as e:
        raise _at(1, f"{path}: envelope: {e}") from e
    if "promise" not in obj:
        return _PendingReceipt(envelope, None, path)
    try:
        promise = Promise.from_json(obj["promise"], f"{path}: promise")
    except KolmError as e:
        raise _at(1, str(e)) from e
    return _PendingReceipt(envelope, promise, path)


def cmd_verify(a: argparse.Namespace) -> int:
    from kolm_ledger.errors import BundleFormatError
    from kolm_ledger.formats.bundle import Bundle
    from kolm_ledger.formats.receipts import Statement
    from kolm_ledger.keys import TrustRoot
    from kolm_ledger.verify.receipt import verify_bundle, verify_bundle_bytes, verify_prediction

    trust = TrustRoot.load(a.trust)
    client = None
    try:
        if a.ledger:
            from kolm_ledger.verify.trust import ledger_trust_state

            client = _client(a)
            # judge keys by the ledger's trust state: trust.json plus every key receipt
            # (registrations, rotations, revocations) the ledger holds, each checked
            trust = ledger_trust_state(client, trust).as_root()
        witnesses = _witness_policy(a)
        if a.bundle:
            # (1) parse the bundle
            try:
                data = Path(a.bundle).read_bytes()
            except OSError as e:
                raise BundleFormatError(f"cannot read bundle {a.bundle}: {e.strerror}") from e
            if (a.index is not None) or a.leaf_hash:
                raise KolmError("give a BUNDLE file or --index/--leaf-hash, not both")
            pending = _pending_receipt(data, a.bundle)
            if pending is None:
                v = verify_bundle_bytes(data, trust, **witnesses, max_time_skew=_skew(a))
                bundle = Bundle.from_bytes(data)
            else:
                if client is None:
                    raise KolmError(
                        f"{a.bundle} is a {pending.what}, not a bundle: give --ledger HOST:PORT "
                        "to fetch its entry and proofs from the log"
                    )
                bundle = pending.fetch(client, trust, a.ledger)
                v = verify_bundle(bundle, trust, **witnesses, max_time_skew=_skew(a))
                pending.check_kept(v, bundle)
        elif client is not None:
            if (a.index is None) == (a.leaf_hash is None):
                raise KolmError("with --ledger give exactly one of --index or --leaf-hash")
            bundle = client.bundle(
                index=a.index, leaf_hash=bytes.fromhex(a.leaf_hash) if a.leaf_hash else None
            )
            v = verify_bundle(bundle, trust, **witnesses, max_time_skew=_skew(a))
        else:
            raise KolmError("give a BUNDLE file or --ledger HOST:PORT with --index/--leaf-hash")
        if a.salt_file is not None:
            if a.salt is not None:
                raise KolmError("give --salt or --salt-file, not both")
            try:
                a.salt = Path(a.salt_file).read_text(encoding="ascii").strip()
            except (OSError, UnicodeDecodeError) as e:
                raise KolmError(f"cannot read --salt-file {a.salt_file}: {e}") from e
        if (a.input is None) != (a.salt is None):
            raise KolmError("give --input and --salt (or --salt-file) together")
        if v.kind != "prediction":
            if a.input is not None:
                raise KolmError(f"--input/--salt apply to prediction receipts, not {v.kind!r}")
            if a.artifact is not None:
                raise KolmError(f"--artifact applies to prediction receipts, not {v.kind!r}")
            print(
                f"OK: {v.kind} receipt at index {v.index} signed by {v.role} key "
                f"{v.keyid[:16]}, included in checkpoint {v.checkpoint.origin} "
                f"size {v.checkpoint.size}, integrated {_fmt_time(v.integrated_at)}"
            )
            return 0
        artifact_bundle = None
        if client is not None:
            digest = Statement.from_envelope(bundle.envelope).predicate.get("artifact_digest")
            found = client.find(subject_digest=str(digest), kind="artifact", limit=1)
            if not found:
                raise _at(
                    8, f"the ledger at {a.ledger} has no artifact receipt for {str(digest)[:16]}…"
                )
            artifact_bundle = client.bundle(index=found[0].index)
        input_value = None
        salt = None
        if a.input is not None:
            try:
                input_value = Path(a.input).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise KolmError(f"cannot read --input {a.input}: {e}") from e
            try:
                salt = bytes.fromhex(a.salt)
            except ValueError as e:
                raise KolmError(f"--salt: not hex: {e}") from e
        if a.artifact is not None and not Path(a.artifact).is_file():
            raise KolmError(f"--artifact {a.artifact}: no such file")
        p = verify_prediction(
            bundle,
            trust,
            artifact_bundle=artifact_bundle,
            input_value=input_value,
            salt=salt,
            artifact_file=a.artifact,
            max_time_skew=_skew(a),
        )
        replay = None
        if a.replay:  # re-execute the student on the input (kolm_ledger.audit.reexec)
            from kolm_ledger.audit.reexec import replay_prediction

            if a.artifact is None or a.input is None:
                raise KolmError("--replay needs --artifact FILE.kolm, --input FILE and --salt HEX")
            replay = replay_prediction(p, a.artifact, input_value, trust)
    except KolmError as e:
        from kolm_ledger.audit.reexec import ReplayMismatch

        step = "replay" if isinstance(e, ReplayMismatch) else getattr(e, "step", None)
        print(f"FAILED{f' at step {step}' if step is not None else ''}: {e}")
        return 1
    finally:
        if client is not None:
            client.close()
    r = p.receipt
    head = (
        f"OK: prediction receipt at index {r.index} signed by {r.role} key {r.keyid[:16]}, "
        f"included in checkpoint {r.checkpoint.origin} size {r.checkpoint.size}, "
        f"integrated {_fmt_time(r.integrated_at)}"
    )
    out = json.dumps(p.output)[:80] if p.output is not None else "(digest only)"
    tail = f"; output {out}, backend {p.backend}{f' ({p.reason})' if p.reason else ''}" + (
        f", artifact K-score {p.k_score:.1f}" if p.k_score is not None else ""
    )
    if (
        p.artifact is None
        and not p.input_checked
        and not p.evidence_checked
        and not p.artifact_file_checked
    ):
        if p.evidence:
            tail += f"; {len(p.evidence)} evidence chunk(s) not checked (give --artifact FILE)"
        print(head + tail)  # steps 1-7 only: one line, like every other kind
        return 0
    print(f"(1-3) signature by infer key {r.keyid[:16]} verifies")
    print(f"(4)   key role {r.role!r} may sign predictions; valid at {r.time.isoformat()}")
    print(f"(5-7) included at index {r.index} in checkpoint {r.checkpoint.origin} size "
          f"{r.checkpoint.size}")  # fmt: skip
    if p.artifact is not None:
        print(
            f"(8)   artifact {p.artifact_digest[:16]}… has an artifact receipt at index "
            f"{p.artifact.index} signed by compile key {p.artifact.keyid[:16]}; "
            f"K-score {p.k_score:.1f}"
        )
        cover = p.artifact.statement.predicate.get("cover")
        print(f"(8)   {cover_line(cover, r.statement.predicate.get('gate'))}")
    else:
        print("(8)   artifact receipt not checked (give --ledger HOST:PORT)")
    if p.input_checked:
        print("(9)   the input matches the commitment")
    else:
        print("(9)   input commitment not checked (give --input FILE --salt HEX)")
    ids = ", ".join(str(e.get("id"))[:60] for e in p.evidence[:10])
    if p.evidence_checked:
        print(
            f"(10)  {len(p.evidence)} evidence chunk(s) are in the signed corpus "
            f"{str(p.corpus_root)[:16]}… (from the {p.corpus_source}): {ids}"
        )
    elif p.evidence:
        why = (
            "the artifact receipt records no corpus root; give --artifact FILE.kolm"
            if p.artifact is not None
            else "give --ledger HOST:PORT or --artifact FILE.kolm"
        )
        print(f"(10)  {len(p.evidence)} evidence chunk(s) not checked ({why}): {ids}")
    elif p.artifact_file_checked:
        print(f"(10)  no evidence cited; the artifact file {Path(a.artifact).name} passes the "
              f"artifact check and is artifact {p.artifact_digest[:16]}…")  # fmt: skip
    else:
        print("(10)  no evidence cited (no recall)")
    if replay is not None:
        print(replay.render())
    print(head + tail)
    return 0


def _client(a: argparse.Namespace) -> Any:
    """A LedgerClient for ``--ledger``: mutual TLS with ``--tls-dir``/``--role``, else loopback."""
    from kolm.cli._tls_args import ledger_client_from_args

    return ledger_client_from_args(a)


def _fmt_time(t: Any) -> str:
    from kolm_ledger.keys import format_time

    return str(format_time(t))


def _skew(a: argparse.Namespace) -> Any:
    """``--max-time-skew`` as a timedelta (how far a receipt's own time may lie after its
    integration time)."""
    from datetime import timedelta

    s = float(getattr(a, "max_time_skew", 300.0))
    if not 0 <= s <= 86_400:
        raise KolmError(f"--max-time-skew {s}: want seconds in [0, 86400]")
    return timedelta(seconds=s)


def _add_skew_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-time-skew",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="how far a receipt's own time may lie after its integration time (default 300;"
        " the ledger, the audit and kolm verify apply one rule: docs/FORMATS.md)",
    )


def _witness_policy(a: argparse.Namespace) -> dict[str, Any]:
    from kolm_ledger.formats.witness import load_witness_verifiers

    wfile = getattr(a, "witnesses", None)
    k = getattr(a, "min_witnesses", None)
    if wfile is None:
        if k:
            raise KolmError("--min-witnesses needs --witnesses FILE")
        return {}
    ws = load_witness_verifiers(wfile)
    return {"witnesses": ws, "min_witnesses": len(ws) if k is None else k}


def cmd_audit(a: argparse.Namespace) -> int:
    from kolm_ledger.audit.auditor import audit
    from kolm_ledger.keys import TrustRoot
    from kolm_ledger.storage import Store

    trust = TrustRoot.load(a.trust)
    if a.ledger:
        from rich.progress import Progress

        from kolm_ledger.audit.auditor import audit_remote

        with _client(a) as c, Progress(transient=True) as prog:
            task = prog.add_task("auditing", total=None)
            rep = audit_remote(
                c,
                trust,
                state_path=a.state,
                progress=lambda n, t: prog.update(task, completed=n, total=t),
                max_time_skew=_skew(a),
            )
    elif a.db:
        store = Store(a.db)
        try:
            rep = audit(store, trust, state_path=a.state, max_time_skew=_skew(a))
        finally:
            store.close()
    else:
        raise KolmError("give --db URL or --ledger HOST:PORT")
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(rep.by_kind.items()))
    if rep.ok:
        print(
            f"OK: {rep.entries} entries ({kinds}), {rep.checkpoints} checkpoints, "
            f"root {rep.root.hex()}"
        )
        return 0
    print(
        f"FAILED: {len(rep.failures)} failure(s) in {rep.entries} entries; "
        f"failing indices: {rep.failing_indices()[:50]}"
    )
    for f in rep.failures[:200]:
        print(f"  {f}")
    return 1


def cmd_ledger_serve(a: argparse.Namespace) -> int:
    import asyncio

    from kolm.cli._tls_args import server_credentials_from_args
    from kolm_ledger.keys import PrivateKey, TrustRoot
    from kolm_ledger.service.rpc import configure_logging
    from kolm_ledger.service.server import serve

    credentials = server_credentials_from_args(a, "ledger", a.listen)
    configure_logging(a.log_level)
    asyncio.run(
        serve(
            a.db,
            TrustRoot.load(a.trust),
            PrivateKey.load(a.log_key),
            listen=a.listen,
            credentials=credentials,
            extra_log_keys=[PrivateKey.load(k) for k in a.extra_log_key or ()],
            witnesses=a.witness or (),
            witness_policy=a.witness_policy,
            metrics_port=a.metrics_port,
            max_batch=a.max_batch,
            max_wait_ms=a.max_wait_ms,
            max_queue=a.max_queue,
            verify_threads=a.verify_threads,
            verify_processes=a.verify_processes,
            max_time_skew=_skew(a),
            ready_file=a.ready_file,
        )
    )
    return 0


def cmd_provenance(a: argparse.Namespace) -> int:
    from kolm_ledger.audit.provenance import check_provenance
    from kolm_ledger.keys import TrustRoot
    from kolm_ledger.verify.trust import ledger_trust_state

    root = TrustRoot.load(a.trust) if a.trust else None
    if a.db:  # the ledger database itself, like kolm audit --db and kolm report --db
        from kolm_ledger.log.provenance import provenance
        from kolm_ledger.storage import Store

        store = Store(a.db)
        try:
            trust = ledger_trust_state(store, root) if root is not None else None
            prov = provenance(store, a.artifact_digest, include_labels=True)
            report = check_provenance(prov, trust)
        finally:
            store.close()
        print(report.render())
        return 0 if report.ok else 1
    with _client(a) as c:
        # keys judged by the ledger's trust state (trust.json plus every key receipt)
        trust = ledger_trust_state(c, root) if root is not None else None
        report = check_provenance(c.provenance(a.artifact_digest, include_labels=True), trust)
    print(report.render())
    return 0 if report.ok else 1


def _key_target(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--ledger", help="append the key receipt through this ledger (HOST:PORT)")
    g.add_argument("--db", help="append the key receipt directly to this ledger database")
    p.add_argument("--tls-dir", help="with --ledger: mutual TLS as the admin client")
    p.set_defaults(role_cert="admin")


def _append_key_receipt(a: argparse.Namespace, env: Any) -> int:
    """Append an admin-signed key receipt through --ledger or --db; returns its index."""
    return _append_key_receipt_at(a, env)[0]


def _append_key_receipt_at(a: argparse.Namespace, env: Any) -> tuple[int, Any]:
    """:func:`_append_key_receipt`, with the receipt's integration time (a UTC datetime)."""
    if a.ledger:
        from kolm_ledger.service.client import LedgerClient
        from kolm_ledger.service.tls import channel_credentials
        from kolm_ledger.storage.repository import from_micros

        creds = channel_credentials(a.ledger, tls_dir=a.tls_dir, role="admin")
        with LedgerClient(a.ledger, credentials=creds) as c:
            r = c.append(env, wait=True)
            return int(r.index), from_micros(r.promise.integrated_time_us)
    keys = Path(a.keys)
    (res,) = _open_ledger(a.db, keys / "trust.json", keys / "log.key").append([env])
    return int(res.index), res.integrated_at


def cmd_keys_rotate(a: argparse.Namespace) -> int:
    from datetime import UTC, datetime, timedelta

    from kolm_ledger.formats.receipts import key_statement, sign_statement
    from kolm_ledger.keys import PrivateKey, TrustedKey, TrustRoot

    keys = Path(a.keys)
    old_path = keys / f"{a.role}.key"
    old = PrivateKey.load(old_path)
    admin = PrivateKey.load(keys / "admin.key")
    new = PrivateKey.generate(old.algorithm)
    staged = keys / f"{a.role}.key.new"
    new.save(staged)  # kept if the append fails half way: nothing is lost
    now = datetime.now(UTC).replace(microsecond=0)
    st = key_statement(
        action="rotate",
        public_key=new.public_key(),
        role=a.role,
        replaces=old.keyid(),
        effective_at=now,
        time=now,
    )
    index = _append_key_receipt(a, sign_statement(st, admin))
    retired = keys / f"{a.role}.key.{old.keyid()[:8]}.retired"
    old_path.replace(retired)
    staged.replace(old_path)
    (keys / f"{a.role}.pub").write_text(new.public_key().pem())
    trust_path = keys / "trust.json"
    if trust_path.exists():  # offline verifiers read trust.json: list the new key there too
        root = TrustRoot.load(trust_path)
        try:
            k = root.get(old.keyid())
            if k.not_after is None or k.not_after > now:
                from dataclasses import replace

                # validity is second-granular; the receipt takes effect when integrated
                root = root.with_key(replace(k, not_after=now + timedelta(seconds=1)))
        except KolmError:
            pass
        root = root.with_key(TrustedKey.for_key(new.public_key(), a.role, not_before=now))
        root.save(trust_path)
    print(f"rotated {a.role}: {old.keyid()[:16]} -> {new.keyid()[:16]} (key receipt {index})")
    print(f"old key moved to {retired}")
    return 0


def cmd_keys_revoke(a: argparse.Namespace) -> int:
    from dataclasses import replace
    from datetime import UTC, datetime, timedelta

    from kolm_ledger.formats.receipts import key_statement, sign_statement
    from kolm_ledger.keys import PrivateKey, TrustRoot, format_time

    keys = Path(a.keys)
    admin = PrivateKey.load(keys / "admin.key")
    root = TrustRoot.load(keys / "trust.json")
    found = [k for k in root.keys if k.keyid.startswith(a.keyid.lower())]
    if len(found) != 1:
        raise KolmError(
            f"key id {a.keyid[:16]!r} matches {len(found)} keys in {keys / 'trust.json'}, want 1"
        )
    k = found[0]
    if k.role == "log":
        raise KolmError("log keys are rotated with --extra-log-key, not revoked by key receipt")
    now = datetime.now(UTC).replace(microsecond=0)
    st = key_statement(
        action="revoke",
        public_key=k.public_key,
        role=k.role,
        reason=a.reason,
        effective_at=now,
        time=now,
    )
    index, integrated = _append_key_receipt_at(a, sign_statement(st, admin))
    # offline verifiers read trust.json: the key's validity ends where the revocation
    # takes effect (when the ledger integrated it; not_after is the last valid instant)
    last = max(now, integrated) - timedelta(microseconds=1)
    root = TrustRoot.load(keys / "trust.json")
    k = root.get(k.keyid)
    if k.not_after is None or k.not_after > last:
        k = replace(k, not_after=last)
        root.with_key(k).save(keys / "trust.json")
    print(f"revoked {k.role} key {k.keyid[:16]} (key receipt {index})")
    print(f"{keys / 'trust.json'}: key {k.keyid[:16]} not_after {format_time(k.not_after or last)}")
    return 0


def cmd_certs_init(a: argparse.Namespace) -> int:
    from kolm_ledger.service.tls import ROLE_URI_PREFIX, init_certs

    for stem, path in init_certs(a.dir).items():
        print(f"{stem:16} {path}")
    print(f"client roles are URI SANs {ROLE_URI_PREFIX}<role>")
    return 0


def cmd_ledger_vkey(a: argparse.Namespace) -> int:
    from kolm_ledger.formats.checkpoint import log_verifiers
    from kolm_ledger.keys import TrustRoot

    for v in log_verifiers(TrustRoot.load(a.trust)):
        print(v.vkey())
    return 0


def cmd_witness_keygen(a: argparse.Namespace) -> int:
    from kolm_ledger.formats.witness import Cosigner
    from kolm_ledger.keys import PrivateKey

    if Path(a.key).exists():
        raise KolmError(f"{a.key} exists; refusing to overwrite a key")
    key = PrivateKey.generate("ed25519")
    key.save(a.key)
    print(Cosigner(a.name, key).verifier().vkey())
    return 0


def cmd_witness_serve(a: argparse.Namespace) -> int:
    import signal
    import threading

    from kolm_ledger.formats.note import NoteVerifier
    from kolm_ledger.formats.witness import Cosigner
    from kolm_ledger.keys import PrivateKey
    from kolm_ledger.service.witness import Witness, start_witness

    w = Witness(
        Cosigner(a.name, PrivateKey.load(a.key)),
        a.state,
        [NoteVerifier.from_vkey(v) for v in a.log_vkey],
    )
    srv = start_witness(w, a.listen)
    port = srv.server_address[1]
    print(f"kolm witness {w.cosigner.verifier().vkey()} listening on port {port}", flush=True)
    if a.ready_file:
        tmp = Path(a.ready_file + ".tmp")
        tmp.write_text(str(port))
        tmp.replace(a.ready_file)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    srv.shutdown()
    return 0


def build_parser() -> tuple[argparse.ArgumentParser, Any]:
    """The root parser with every built-in and plug-in subcommand."""
    p = argparse.ArgumentParser(prog="kolm", description="kolm: distillation you can prove")
    from kolm.cli._tls_args import add_client_tls_arguments, add_server_tls_arguments
    from kolm_ledger import __version__

    p.add_argument("--version", action="version", version=f"kolm {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    keys = sub.add_parser("keys", help="create and manage signing keys")
    ksub = keys.add_subparsers(dest="keys_command", required=True)
    ki = ksub.add_parser("init", help="create admin/compile/infer/log keys and trust.json")
    ki.add_argument("dir")
    ki.add_argument("--origin", default="kolm.dev/ledger", help="checkpoint origin of the log key")
    ki.set_defaults(func=cmd_keys_init)
    kr = ksub.add_parser("rotate", help="replace a producer key (admin-signed key receipt)")
    kr.add_argument("--keys", required=True, help="key directory (admin.key, trust.json, ...)")
    kr.add_argument("--role", required=True, choices=("admin", "compile", "infer"))
    _key_target(kr)
    kr.set_defaults(func=cmd_keys_rotate)
    kv = ksub.add_parser("revoke", help="revoke a producer key (admin-signed key receipt)")
    kv.add_argument("--keys", required=True, help="key directory (admin.key, trust.json, ...)")
    kv.add_argument("--keyid", required=True, help="key id (hex; a unique prefix is enough)")
    kv.add_argument("--reason", help="recorded in the key receipt")
    _key_target(kv)
    kv.set_defaults(func=cmd_keys_revoke)

    ce = sub.add_parser("certs", help="development CA and mTLS certificates")
    csub = ce.add_subparsers(dest="certs_command", required=True)
    cei = csub.add_parser(
        "init", help="CA, ledger/compile/infer server certs, admin/compile/infer/auditor clients"
    )
    cei.add_argument("dir")
    cei.set_defaults(func=cmd_certs_init)

    wi = sub.add_parser("witness", help="run a C2SP tlog-witness that cosigns checkpoints")
    wsub = wi.add_subparsers(dest="witness_command", required=True)
    wk = wsub.add_parser("keygen", help="create a witness key and print its vkey")
    wk.add_argument("--key", required=True, help="write the Ed25519 private key here")
    wk.add_argument("--name", default="kolm-witness", help="witness name (key name)")
    wk.set_defaults(func=cmd_witness_keygen)
    ws = wsub.add_parser("serve", help="serve POST /add-checkpoint")
    ws.add_argument("--key", required=True, help="the witness's Ed25519 private key (PEM)")
    ws.add_argument("--name", default="kolm-witness", help="witness name (key name)")
    ws.add_argument("--state", required=True, help="state file (written atomically)")
    ws.add_argument(
        "--log-vkey", required=True, action="append", help="signed-note vkey of a log (repeatable)"
    )
    ws.add_argument("--listen", default="127.0.0.1:7380")
    ws.add_argument("--ready-file", help="write the bound port here once serving")
    ws.set_defaults(func=cmd_witness_serve)

    led = sub.add_parser("ledger", help="append to and read a ledger database")
    lsub = led.add_subparsers(dest="ledger_command", required=True)
    la = lsub.add_parser("append", help="sign an in-toto statement and append it")
    la.add_argument("--db", required=True, help="SQLAlchemy URL")
    la.add_argument("--key", required=True, help="producer private key (PEM)")
    la.add_argument("--trust", help="trust root (default: trust.json beside --key)")
    la.add_argument("--log-key", help="log private key (default: log.key beside the trust root)")
    la.add_argument("statement")
    la.set_defaults(func=cmd_ledger_append)
    lc = lsub.add_parser("checkpoint", help="print the newest signed checkpoint")
    lc.add_argument("--db", required=True)
    lc.set_defaults(func=cmd_ledger_checkpoint)
    lb = lsub.add_parser("bundle", help="print the offline receipt bundle of one entry")
    lb.add_argument("--db", required=True)
    lb.add_argument("--index", type=int, required=True)
    lb.set_defaults(func=cmd_ledger_bundle)

    ls = lsub.add_parser("serve", help="run the ledger gRPC service")
    ls.add_argument("--db", required=True, help="SQLAlchemy URL")
    ls.add_argument("--trust", required=True)
    ls.add_argument("--log-key", required=True)
    ls.add_argument("--listen", default="127.0.0.1:7070")
    ls.add_argument("--metrics-port", type=int, help="Prometheus metrics on this HTTP port")
    ls.add_argument("--max-batch", type=int, default=1000, help="entries per group commit")
    ls.add_argument(
        "--max-wait-ms",
        type=float,
        default=0.0,
        help="extra wait to fill a batch (default 0: commit at once; what arrives"
        " during a commit goes in the next batch)",
    )
    ls.add_argument(
        "--max-queue", type=int, default=50_000, help="queued entries before RESOURCE_EXHAUSTED"
    )
    ls.add_argument(
        "--verify-threads",
        type=int,
        default=None,
        help="threads validating multi-envelope requests (signatures verify with the GIL"
        " released; default: min(2, CPUs))",
    )
    ls.add_argument(
        "--verify-processes",
        type=int,
        default=0,
        help="parse and verify multi-envelope requests in this many worker processes"
        " instead of threads (no shared GIL; default 0: threads)",
    )
    _add_skew_argument(ls)
    ls.add_argument("--ready-file", help="write the bound port here once serving")
    ls.add_argument("--log-level", default="INFO")
    ls.add_argument(
        "--extra-log-key",
        action="append",
        help="also sign checkpoints with this log key (log key rotation; repeatable)",
    )
    ls.add_argument(
        "--witness", action="append", help="witness URL to collect cosignatures from (repeatable)"
    )
    ls.add_argument(
        "--witness-policy",
        choices=("required", "best-effort"),
        default="best-effort",
        help=(
            "required: an append is acknowledged only once every witness cosigned its"
            " checkpoint; otherwise UNAVAILABLE, though the entries are already durable"
            " and a retry returns them once the witnesses cosign"
        ),
    )
    add_server_tls_arguments(ls)
    ls.set_defaults(func=cmd_ledger_serve)

    lv = lsub.add_parser("vkey", help="print the signed-note verifier keys of the log keys")
    lv.add_argument("--trust", required=True)
    lv.set_defaults(func=cmd_ledger_vkey)

    v = sub.add_parser(
        "verify",
        help="verify an offline receipt bundle (or, with --ledger, a promise or spooled receipt)",
    )
    v.add_argument(
        "bundle",
        nargs="?",
        help="a bundle file; or a promise / spooled-receipt file written by kolm predict --out "
        "without --wait (needs --ledger: its entry is fetched and the promise checked)",
    )
    v.add_argument("--trust", required=True)
    v.add_argument("--ledger", help="fetch the bundle from this ledger (HOST:PORT)")
    v.add_argument("--index", type=int)
    v.add_argument("--leaf-hash", help="hex leaf hash")
    v.add_argument("--input", help="prediction: a file holding the input text, to check")
    v.add_argument("--salt", help="prediction: the hex salt returned with the answer")
    v.add_argument("--salt-file", help="prediction: a file holding it (kolm predict --salt-out)")
    v.add_argument(
        "--artifact",
        help="prediction: the .kolm it names; checks cited recall chunks against its index",
    )
    v.add_argument(
        "--replay",
        action="store_true",
        help="prediction: re-run the artifact's student on --input; its output must be the "
        "receipt's and its confidence within 1e-4 (needs --artifact, --input, --salt)",
    )
    v.add_argument(
        "--witnesses", help="file of witness vkeys (one per line) to demand cosignatures"
    )
    v.add_argument(
        "--min-witnesses",
        type=int,
        help="cosignatures needed from --witnesses (default: all of them)",
    )
    _add_skew_argument(v)
    add_client_tls_arguments(v)
    v.set_defaults(func=cmd_verify)

    au = sub.add_parser("audit", help="audit a whole ledger")
    au.add_argument("--db", help="SQLAlchemy URL of the ledger database")
    au.add_argument("--ledger", help="audit a ledger service over gRPC (HOST:PORT)")
    au.add_argument("--trust", required=True)
    au.add_argument(
        "--state",
        help="remember the verified checkpoint here; demand consistency with it next time",
    )
    _add_skew_argument(au)
    add_client_tls_arguments(au)
    au.set_defaults(func=cmd_audit)

    from kolm.cli import kscore as kscore_cli  # torch-free; the predictor loads when it runs

    kscore_cli.register(sub)

    pv = sub.add_parser("provenance", help="artifact → eval → training labels, recomputed")
    pv.add_argument("artifact_digest")
    pv_src = pv.add_mutually_exclusive_group(required=True)
    pv_src.add_argument("--ledger", help="ledger service HOST:PORT")
    pv_src.add_argument("--db", help="SQLAlchemy URL of the ledger database")
    pv.add_argument("--trust", help="also verify every receipt's signature and key role")
    add_client_tls_arguments(pv)
    pv.set_defaults(func=cmd_provenance)

    from kolm.cli import advise as advise_cli  # no heavy imports; rich loads when it runs

    advise_cli.register(sub)

    from kolm.cli import report as report_cli

    report_cli.register(sub)

    from kolm.cli import compile as compile_cli
    from kolm.cli import infer as infer_cli
    from kolm.cli import recall as recall_cli
    from kolm.demo.full import register_demo
    from kolm.up import register_up

    for register in (
        compile_cli.register,
        register_demo,
        infer_cli.register,
        recall_cli.register,
        register_up,
    ):
        register(sub)
    return p, sub


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``kolm`` command; returns the exit code."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser, _ = build_parser()
    a = parser.parse_args(argv)
    func: Handler = a.func
    try:
        return func(a)
    except VerificationError as e:
        step = getattr(e, "step", None)
        print(f"FAILED{f' at step {step}' if step else ''}: {e}", file=sys.stderr)
        return 1
    except KolmError as e:
        print(f"kolm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
