"""Revocation reaches the inference service, and spool-first mode keeps every receipt.

Real servers throughout: a ledger service in a thread (SQLite) with its own keys, the
inference service in another thread, the small real artifact of test_infer_engine's
world (trained once per session) packed and logged under those keys.

- finding 9: after 1000+ ``register`` key receipts a compile-key revocation is still
  honoured by the inference loader (``LoadArtifact`` → ``FAILED_PRECONDITION``);
- finding 11: revoking the compile key stops a *loaded* artifact within the key poll
  interval (``Predict`` → ``FAILED_PRECONDITION`` naming the artifact and the key);
  ``kolm verify --ledger`` judges keys by the ledger's key receipts (a prediction made
  after the revocation fails at step 8 even against the old trust.json);
  ``kolm keys revoke`` writes ``not_after`` into trust.json;
- finding 8: with ``--receipt-ack spool`` a 70,000-character ``request_id`` is refused
  up front; a spooled receipt the ledger refuses lands in the spool's quarantine with
  its reason (and the metric); after the infer key is revoked the service fails closed,
  and every receipt it answered for is in the ledger or in quarantine.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from test_infer_engine import LedgerThread, World, world  # noqa: F401 - a fixture
from test_infer_service import InferThread, predict, wait_for

from kolm.cli.main import main as kolm_main
from kolm_infer._pb import infer_pb2 as pb
from kolm_infer.receipts import sign_prediction
from kolm_ledger.formats.dsse import Envelope
from kolm_ledger.formats.receipts import key_statement, sign_statement
from kolm_ledger.keys import PrivateKey, TrustRoot, init_keys
from kolm_ledger.service.client import AppendResult, LedgerClient

pytestmark = [pytest.mark.ml, pytest.mark.slow]


@pytest.fixture
def site(world: World, tmp_path: Path) -> Iterator[tuple[World, Path, str]]:  # noqa: F811
    """A world of its own: fresh keys (so revoking them spares the session's), a ledger,
    and the router artifact packed with that compile key and logged there."""
    keys = tmp_path / "keys"
    trust = init_keys(keys)
    led = LedgerThread(
        f"sqlite:///{tmp_path / 'ledger.db'}", trust, PrivateKey.load(keys / "log.key")
    )
    try:
        w = replace(world, root=tmp_path, keys=keys, trust=trust, ledger=led, artifacts={})
        path, digest = w.build("router")
        yield w, path, digest
    finally:
        led.close()


def revoke(w: World, role: str, capsys: pytest.CaptureFixture[str]) -> str:
    """``kolm keys revoke`` of the ``role`` key through the ledger service; its key id."""
    kid = w.key(role).keyid()
    args = ["keys", "revoke", "--keys", str(w.keys), "--keyid", kid[:12], "--reason", "leaked"]
    assert kolm_main([*args, "--ledger", w.ledger.target]) == 0
    out = capsys.readouterr().out
    assert f"revoked {role} key {kid[:16]}" in out
    return kid


def prediction_env(w: World, digest: str, tag: str, key: PrivateKey | None = None) -> Envelope:
    return sign_prediction(
        key or w.key("infer"),
        artifact_digest=digest,
        input_value=f"{tag} input",
        output="card_arrival",
        verdict={"ok": True},
        backend="student",
        reason="confident",
        confidence=0.9,
        latency_ms=1.0,
        request_id=tag,
    )[0]


def refused(call: Any) -> grpc.RpcError | None:
    try:
        call()
    except grpc.RpcError as e:
        return e
    return None


# --------------------------------------------------------------------------- finding 9


def test_a_revocation_after_1000_key_receipts_is_honoured_by_the_loader(
    site: tuple[World, Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    w, path, _ = site
    admin = w.key("admin")
    regs = [
        sign_statement(
            key_statement(
                action="register", public_key=PrivateKey.generate().public_key(), role="infer"
            ),
            admin,
        )
        for _ in range(1005)
    ]
    with LedgerClient(w.ledger.target) as c:
        got = c.append_many(regs, batch=500)
        assert all(isinstance(r, AppendResult) for r in got)
    kid = revoke(w, "compile", capsys)
    with LedgerClient(w.ledger.target) as c:
        assert len(c.find(kind="key", limit=5000)) == 1006  # the revocation is the 1006th
    # kolm keys revoke wrote not_after into trust.json ...
    on_disk = TrustRoot.load(w.keys / "trust.json").get(kid)
    assert on_disk.not_after is not None and on_disk.not_after <= datetime.now(UTC)
    # ... but the service trusts the trust root from before it: only the ledger says revoked
    assert w.trust.get(kid).not_after is None
    srv = InferThread(w, w.ledger, artifacts_dir=path.parent)  # LoadArtifact(path=) there
    try:
        e = refused(lambda: srv.stub.LoadArtifact(pb.LoadArtifactRequest(path=str(path))))
        assert e is not None, "the loader served an artifact whose compile key is revoked"
        assert e.code() == grpc.StatusCode.FAILED_PRECONDITION, e.details()
        assert "revoked" in e.details()
        assert not srv.stub.ListArtifacts(pb.ListArtifactsRequest()).artifacts
    finally:
        srv.close()


# --------------------------------------------------------------------------- finding 11


def test_revoking_the_compile_key_stops_a_loaded_artifact(
    site: tuple[World, Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    w, path, digest = site
    old_trust = tmp_path / "trust-before.json"
    shutil.copy(w.keys / "trust.json", old_trust)
    srv = InferThread(w, w.ledger, artifacts=[path], artifacts_dir=path.parent, key_poll_s=0.2)
    try:
        before = predict(srv.stub, request_id="before", wait_for_inclusion=True)
        assert before.WhichOneof("receipt") == "bundle"
        polls = srv.srv.keys.polls
        kid = revoke(w, "compile", capsys)
        # the next poll of the ledger's key receipts picks the revocation up (poll interval
        # 0.2 s; the bound only fails a revocation that is never seen)
        wait_for(lambda: refused(lambda: predict(srv.stub)) is not None, timeout=30)
        assert srv.srv.keys.polls > polls  # seen by a poll, not by a restart or a reload
        for ref in ("router", digest):
            e = refused(lambda ref=ref: predict(srv.stub, artifact=ref))
            assert e is not None and e.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "'router'" in e.details() and digest[:16] in e.details()
            assert kid[:16] in e.details() and "revoked" in e.details()
        assert not srv.stub.ListArtifacts(pb.ListArtifactsRequest()).artifacts  # unloaded
        e = refused(lambda: srv.stub.LoadArtifact(pb.LoadArtifactRequest(path=str(path))))
        assert e is not None and e.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert srv.srv.keys.polls >= 1
    finally:
        srv.close()
    # kolm verify --ledger judges keys by the ledger's key receipts, even with the old
    # trust.json: a prediction from before the revocation verifies, one after does not
    bundles = tmp_path / "b"
    bundles.mkdir()
    (bundles / "before.json").write_bytes(before.bundle)
    with LedgerClient(w.ledger.target) as c:
        after = c.append(prediction_env(w, digest, "after"), wait=True)
    assert after.bundle is not None
    (bundles / "after.json").write_bytes(after.bundle.to_bytes())

    def verify(name: str, trust: Path, *ledger: str) -> tuple[int, str]:
        code = kolm_main(["verify", str(bundles / name), "--trust", str(trust), *ledger])
        return code, capsys.readouterr().out

    online = ("--ledger", w.ledger.target)
    code, out = verify("before.json", old_trust, *online)
    assert code == 0 and "OK: prediction receipt" in out, out
    code, out = verify("after.json", old_trust, *online)
    assert code == 1 and out.startswith("FAILED at step 8"), out
    assert "compile key" in out and "revoked" in out
    # offline the old trust.json cannot know; with the one kolm keys revoke updated, too
    code, out = verify("after.json", old_trust)
    assert code == 0, out
    code, out = verify("after.json", w.keys / "trust.json", *online)
    assert code == 1 and out.startswith("FAILED at step 8"), out


def test_a_key_receipt_that_does_not_prove_stops_the_service(
    site: tuple[World, Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """A database writer moves the compile key's revocation to 2100 before the service's
    next poll: folded unproven, the key would stay valid (the artifact kept answering).
    The follower proves every key receipt against the signed checkpoint first; this one
    does not prove, so the service fails closed: Predict FAILED_PRECONDITION, NOT_SERVING."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from support.db import drop_triggers, set_time

    w, path, digest = site
    url = f"sqlite:///{w.root / 'ledger.db'}"
    srv = InferThread(w, w.ledger, artifacts=[path], key_poll_s=600)  # polls by hand here
    keys = srv.srv.keys
    try:
        wait_for(lambda: keys.polls >= 1)  # the first poll, at start, proved and folded
        assert predict(srv.stub, wait_for_inclusion=True).WhichOneof("receipt") == "bundle"
        revoke(w, "compile", capsys)
        with LedgerClient(w.ledger.target) as c:
            idx = c.find(kind="key", limit=5000)[-1].index  # the revocation
        drop_triggers(url)
        set_time(url, idx, int(datetime(2100, 1, 1, tzinfo=UTC).timestamp() * 1_000_000))
        assert srv.run(keys.poll_once()) == 0
        assert keys.untrusted is not None and f"entry {idx}" in keys.untrusted, keys.untrusted
        for ref in ("router", digest):
            e = refused(lambda ref=ref: predict(srv.stub, artifact=ref))
            assert e is not None, "served after a key receipt that does not prove"
            assert e.code() == grpc.StatusCode.FAILED_PRECONDITION, e.details()
            assert "do not prove" in e.details() and "stopped serving" in e.details()
        health_stub = health_pb2_grpc.HealthStub(srv.channel)
        req = health_pb2.HealthCheckRequest(service="kolm.infer.v1.Inference")
        wait_for(
            lambda: health_stub.Check(req).status == health_pb2.HealthCheckResponse.NOT_SERVING
        )
        assert srv.run(keys.poll_once()) == 0 and keys.untrusted is not None  # stays closed
    finally:
        srv.close()


# --------------------------------------------------------------------------- finding 8


def test_spool_first_bounds_request_id_quarantines_refusals_and_fails_closed(
    site: tuple[World, Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from prometheus_client import REGISTRY

    def quarantined_total() -> float:
        v = REGISTRY.get_sample_value("kolm_infer_receipts_total", {"outcome": "quarantined"})
        return v or 0.0

    w, path, digest = site
    # a long poll: here the ledger's answer to the spooled receipts trips the fail-closed
    srv = InferThread(
        w,
        w.ledger,
        artifacts=[path],
        spool=tmp_path / "spool.db",
        receipt_ack="spool",
        key_poll_s=600,
    )
    spool = srv.srv.spool
    writer = srv.srv.writer
    try:
        with LedgerClient(w.ledger.target) as c:
            size = c.checkpoint().checkpoint.size
        # (1) a 70,000-character request_id: refused up front, nothing spooled or logged
        e = refused(lambda: predict(srv.stub, request_id="x" * 70_000))
        assert e is not None and e.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "request_id" in e.details() and "70000" in e.details()
        assert spool.depth() == 0 and spool.quarantine_depth() == 0
        ok = [predict(srv.stub, request_id=f"ok-{i}") for i in range(3)]
        assert all(r.spooled for r in ok)
        wait_for(lambda: spool.depth() == 0)
        # (2) a spooled receipt the ledger refuses (signed by a key it does not know) is
        # kept in quarantine with the ledger's reason, counted, and the service goes on
        q0 = quarantined_total()
        rogue = prediction_env(w, digest, "rogue", key=PrivateKey.generate())
        assert srv.run(writer.submit(rogue)).spooled
        wait_for(lambda: spool.quarantine_depth() == 1)
        (q,) = spool.quarantined()
        assert q.envelope == rogue.to_bytes()
        assert q.code == "PERMISSION_DENIED" and "not in the trust root" in q.reason
        assert quarantined_total() == q0 + 1
        assert predict(srv.stub).spooled and writer.key_refused is None
        # (that receipt is shipped before the revocation below: else the ledger refuses
        # it for the revoked key, the service fails closed early and step 3 has no answer)
        wait_for(lambda: spool.depth() == 0)
        assert writer.key_refused is None
        # (3) the infer key revoked: the next receipt is refused by the ledger (kept in
        # quarantine), and from then on the service answers nothing
        kid = revoke(w, "infer", capsys)
        last = predict(srv.stub, request_id="after-revocation")
        assert last.spooled  # spool-first: its receipt was only on this disk yet
        wait_for(lambda: writer.key_refused is not None)
        for i in range(5):
            e = refused(lambda i=i: predict(srv.stub, request_id=f"refused-{i}"))
            assert e is not None and e.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert kid[:16] in e.details() and "failing closed" in e.details()
        health = health_pb2_grpc.HealthStub(srv.channel).Check(
            health_pb2.HealthCheckRequest(service="kolm.infer.v1.Inference")
        )
        assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
        wait_for(lambda: spool.depth() == 0)
        held = {x.envelope: x for x in spool.quarantined()}
        late = last.envelope
        assert held[late].code == "FAILED_PRECONDITION" and "revoked" in held[late].reason
        # no receipt silently dropped: every answer's receipt is in the ledger or held
        with LedgerClient(w.ledger.target) as c:
            logged = {x.envelope for x in c.entries()}
        answered = [r.envelope for r in [*ok, last]]
        assert all(h in logged or h in held for h in answered)
        assert len(logged) > size
    finally:
        srv.close()
