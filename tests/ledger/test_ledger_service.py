"""The ledger gRPC service end to end: every RPC (streaming included) on both engines.

Servers are real ``grpc.aio`` servers on loopback port 0 (run on their own event loop
in a background thread, or as a ``kolm ledger serve`` subprocess); every call goes
through the synchronous :class:`~kolm_ledger.service.client.LedgerClient` or the generated
stub over a real channel. Each error status is provoked from a real client and its
message is checked to name what was wrong.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import inspect
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from support.receipts import label_statement as placeholder_label

from kolm.cli.main import main as kolm_main
from kolm_ledger._crypto import PrivateKey
from kolm_ledger._pb import ledger_pb2 as pb
from kolm_ledger._pb import ledger_pb2_grpc as pb_grpc
from kolm_ledger._samples import sample_statement
from kolm_ledger.audit.auditor import audit
from kolm_ledger.audit.provenance import check_provenance
from kolm_ledger.errors import BackpressureError, KolmError, SignatureError
from kolm_ledger.formats import merkle
from kolm_ledger.formats.canonical import canonical_json
from kolm_ledger.formats.checkpoint import check_consistent, verify_checkpoint
from kolm_ledger.formats.dsse import MAX_ENVELOPE_BYTES, Envelope
from kolm_ledger.formats.leaf import chain_next, entry_leaf_hash
from kolm_ledger.formats.receipts import (
    artifact_statement,
    eval_statement,
    job_digest,
    key_statement,
    label_statement,
    sign_statement,
)
from kolm_ledger.keys import TrustedKey, TrustRoot
from kolm_ledger.log.provenance import training_set_root
from kolm_ledger.log.sequencer import verify_promise
from kolm_ledger.service.client import AppendResult, LedgerClient
from kolm_ledger.service.server import LedgerServer, start
from kolm_ledger.storage import Store, micros
from kolm_ledger.verify.receipt import verify_bundle

SERVICE = "kolm.ledger.v1.Ledger"
KOLM = Path(sys.executable).with_name("kolm")


# ---- keys, receipts, servers -------------------------------------------------------------


@dataclass(frozen=True)
class Keys:
    """The keys made by ``kolm keys init`` and the trust root listing them."""

    dir: Path
    trust: TrustRoot
    log: PrivateKey
    admin: PrivateKey
    compile: PrivateKey
    infer: PrivateKey


@pytest.fixture
def keys(keydir: Path) -> Keys:
    def load(role: str) -> PrivateKey:
        return PrivateKey.load(keydir / f"{role}.key")

    return Keys(
        keydir,
        TrustRoot.load(keydir / "trust.json"),
        load("log"),
        load("admin"),
        load("compile"),
        load("infer"),
    )


def _h(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def label_env(key: PrivateKey, i: int, job_id: str = "job-svc") -> Envelope:
    """A label receipt of ``job_id`` signed by ``key``."""
    st = label_statement(
        input_value=f"ticket {i}: where is my card?",
        output_value="card_arrival",
        task={"name": "router", "spec_digest": _h("spec")},
        teacher={"backend": "simulated", "model": "gold", "params": {"temperature": 1.0}},
        k=5,
        votes={"card_arrival": 5},
        sample_digests=[_h(i, s) for s in range(5)],
        verifier={"name": "label_set", "version": "1", "spec_digest": _h("verifier")},
        agreement=1.0,
        job_id=job_id,
    )
    return sign_statement(st, key)


def sample_env(kind: str, key: PrivateKey, i: int) -> Envelope:
    """A well-formed receipt of ``kind`` signed by ``key``."""
    return sign_statement(sample_statement(kind, i, random.Random(i)), key)


class ThreadedServer:
    """``kolm_ledger.service.server.start`` on its own event loop in a background thread."""

    def __init__(self, db: str, trust: TrustRoot, log_key: PrivateKey, **kw: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="ledger-server", daemon=True
        )
        self._thread.start()
        try:
            self.srv: LedgerServer = self.run(start(db, trust, log_key, **kw))
        except BaseException:
            self._close_loop()
            raise
        self.port = self.srv.port
        self.target = f"127.0.0.1:{self.port}"

    def run(self, coro: Any, timeout: float = 60) -> Any:
        """Run ``coro`` on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def client(self, timeout: float = 30.0) -> LedgerClient:
        """A sync client of this server."""
        return LedgerClient(self.target, timeout=timeout)

    def stop(self) -> None:
        """Graceful stop, then close the loop."""
        try:
            self.run(self.srv.stop(2.0))
        finally:
            self._close_loop()

    def _close_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._loop.close()


ServerFactory = Callable[..., ThreadedServer]


@pytest.fixture
def serve(db_url: str, keys: Keys) -> Iterator[ServerFactory]:
    """Start ledger servers on ``db_url`` (stopped at teardown); kwargs go to ``start``."""
    servers: list[ThreadedServer] = []

    def _start(trust: TrustRoot | None = None, **kw: Any) -> ThreadedServer:
        s = ThreadedServer(db_url, trust or keys.trust, keys.log, **kw)
        servers.append(s)
        return s

    yield _start
    for s in reversed(servers):
        s.stop()


@pytest.fixture
def server(serve: ServerFactory) -> ThreadedServer:
    return serve()


@pytest.fixture
def client(server: ThreadedServer) -> Iterator[LedgerClient]:
    with server.client() as c:
        yield c


@pytest.fixture
def channel(server: ThreadedServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as ch:
        yield ch


def wire(e: pytest.ExceptionInfo[KolmError]) -> grpc.RpcError:
    """The real ``RpcError`` a client error was translated from."""
    cause = e.value.__cause__
    assert isinstance(cause, grpc.RpcError), f"{e.value!r} did not come from an RPC"
    return cause


def ok(results: list[AppendResult | KolmError]) -> list[AppendResult]:
    """Assert every result is a success."""
    bad = [r for r in results if not isinstance(r, AppendResult)]
    assert not bad, bad
    return results  # type: ignore[return-value]


# ---- Append ------------------------------------------------------------------------------


def test_append_answers_index_leaf_hash_and_a_signed_promise(
    client: LedgerClient, keys: Keys
) -> None:
    envs = [label_env(keys.compile, i) for i in range(3)]
    results = [client.append(e) for e in envs]
    assert [r.index for r in results] == [0, 1, 2]
    log_pub = keys.log.public_key()
    origin = keys.trust.log_keys()[0].origin
    for env, r in zip(envs, results, strict=True):
        # log format v2: the leaf binds the envelope and the time the log integrated it
        leaf_data = canonical_json(
            {"envelope": env.to_json(), "integrated_time": r.integrated_time_us}
        )
        assert r.leaf_hash == hashlib.sha256(b"\x00" + leaf_data).digest()
        assert r.integrated_time_us == r.promise.integrated_time_us
        assert not r.duplicate
        assert r.bundle is None  # not asked to wait
        p = r.promise
        assert (p.origin, p.index, p.leaf_hash) == (origin, r.index, r.leaf_hash)
        assert abs(p.integrated_time_us / 1e6 - time.time()) < 120
        verify_promise(p, log_pub)
        # the promise binds index, leaf hash and time: change any and it fails
        for forged in (
            replace(p, index=p.index + 1),
            replace(p, leaf_hash=bytes(32)),
            replace(p, integrated_time_us=p.integrated_time_us + 1),
            replace(p, origin="evil.example/log"),
        ):
            with pytest.raises(SignatureError, match=f"index {forged.index}"):
                verify_promise(forged, log_pub)
        # by no other key
        with pytest.raises(SignatureError):
            verify_promise(p, PrivateKey.generate("ed25519").public_key())
    # appending the same envelope again answers its existing index
    again = client.append(envs[1])
    assert (again.index, again.leaf_hash, again.duplicate) == (1, results[1].leaf_hash, True)
    # ... with that entry's integration time, in the answer and in its signed promise
    assert again.integrated_time_us == results[1].integrated_time_us
    assert again.promise.integrated_time_us == results[1].integrated_time_us
    verify_promise(again.promise, log_pub)
    assert client.checkpoint().checkpoint.size == 3


def test_wait_for_checkpoint_returns_a_bundle_that_verifies_offline(
    client: LedgerClient, keys: Keys
) -> None:
    client.append(label_env(keys.compile, 0))
    env = sample_env("prediction", keys.infer, 1)
    r = client.append(env, wait=True)
    assert r.bundle is not None
    assert r.checkpoint_size >= r.index + 1
    v = verify_bundle(r.bundle, keys.trust)
    assert (v.index, v.leaf_hash, v.kind, v.role) == (r.index, r.leaf_hash, "prediction", "infer")
    assert v.checkpoint.size == r.checkpoint_size
    # the bundle survives its own file format, and a wrong trust root refuses it
    assert verify_bundle(type(r.bundle).from_bytes(r.bundle.to_bytes()), keys.trust).index == 1
    other = TrustRoot(tuple(k for k in keys.trust.keys if k.role != "log"))
    with pytest.raises(KolmError, match="step 6"):
        verify_bundle(r.bundle, other)
    # also through AppendStream
    (s,) = ok(client.append_many([label_env(keys.compile, 2)], wait=True))
    assert s.bundle is not None
    assert verify_bundle(s.bundle, keys.trust).index == s.index == 2


# ---- AppendStream ------------------------------------------------------------------------


def test_append_stream_many_envelopes_per_message_in_order(
    client: LedgerClient, keys: Keys
) -> None:
    envs = [label_env(keys.compile, i) for i in range(23)]
    results = ok(client.append_many(envs, batch=5))
    assert [r.index for r in results] == list(range(23))
    log_pub = keys.log.public_key()
    for env, r in zip(envs, results, strict=True):
        assert r.leaf_hash == entry_leaf_hash(env, r.integrated_time_us)
        verify_promise(r.promise, log_pub)
    # one message mixing duplicates, a malformed envelope and a wrong role: one result
    # per envelope, in order, and the good ones are sequenced
    mixed: list[Envelope | bytes] = [
        envs[3],
        label_env(keys.compile, 100),
        b'{"payload": 1}',
        label_env(keys.infer, 101),
        label_env(keys.compile, 102),
    ]
    out = client.append_many(mixed, batch=10)
    assert len(out) == 5
    a, b, c, d, e = out
    assert isinstance(a, AppendResult) and a.duplicate and a.index == 3
    assert isinstance(b, AppendResult) and b.index == 23
    assert isinstance(c, KolmError) and c.grpc_code == "INVALID_ARGUMENT"
    assert "envelope" in str(c)
    assert isinstance(d, KolmError) and d.grpc_code == "PERMISSION_DENIED"
    assert "may not sign 'label'" in str(d)
    assert isinstance(e, AppendResult) and e.index == 24
    assert client.checkpoint().checkpoint.size == 25


def test_append_stream_echoes_batch_ids_one_response_per_message(
    channel: grpc.Channel, keys: Keys
) -> None:
    stub = pb_grpc.LedgerStub(channel)
    msgs = [
        pb.AppendStreamRequest(
            batch_id=1000 + m,
            envelopes=[label_env(keys.compile, 10 * m + j).to_bytes() for j in range(m + 1)],
        )
        for m in range(6)
    ]
    resps = list(stub.AppendStream(iter(msgs), timeout=60))
    assert [r.batch_id for r in resps] == [1000 + m for m in range(6)]
    assert [len(r.results) for r in resps] == [m + 1 for m in range(6)]
    indices = [x.ok.index for r in resps for x in r.results]
    assert sorted(indices) == list(range(21))
    # an empty stream is fine too
    assert list(stub.AppendStream(iter([]), timeout=10)) == []


# ---- reads -------------------------------------------------------------------------------


def _fill(client: LedgerClient, keys: Keys, batches: list[int]) -> list[AppendResult]:
    """Append ``batches`` (sizes), one checkpoint each; returns every result."""
    out: list[AppendResult] = []
    n = 0
    for size in batches:
        out += ok(client.append_many([label_env(keys.compile, n + j) for j in range(size)]))
        n += size
    return out


def test_get_checkpoint_newest_and_by_size(client: LedgerClient, keys: Keys) -> None:
    with pytest.raises(KolmError, match="empty") as e:
        client.checkpoint()
    assert wire(e).code() == grpc.StatusCode.NOT_FOUND
    _fill(client, keys, [3, 4, 6])
    newest = client.checkpoint()
    v = verify_checkpoint(newest.to_bytes(), keys.trust).checkpoint
    assert v.size == 13
    for size in (3, 7, 13):
        cp = verify_checkpoint(client.checkpoint(size).to_bytes(), keys.trust).checkpoint
        assert cp.size == size
        assert cp.origin == v.origin
    with pytest.raises(KolmError, match="no checkpoint at tree size 5") as e:
        client.checkpoint(5)
    assert wire(e).code() == grpc.StatusCode.NOT_FOUND


def test_get_inclusion_proof_by_index_and_leaf_hash_at_sizes(
    client: LedgerClient, keys: Keys
) -> None:
    results = _fill(client, keys, [5, 4, 8])
    for size in (5, 9, 17, 0):
        cp = client.checkpoint(size).checkpoint
        for r in results[: cp.size]:
            by_idx = client.inclusion_proof(index=r.index, tree_size=size)
            by_leaf = client.inclusion_proof(leaf_hash=r.leaf_hash, tree_size=size)
            assert by_idx == by_leaf
            assert (by_idx.index, by_idx.tree_size, by_idx.leaf_hash) == (
                r.index,
                cp.size,
                r.leaf_hash,
            )
            signed = verify_checkpoint(by_idx.checkpoint, keys.trust).checkpoint
            assert signed == cp
            merkle.verify_inclusion(r.index, cp.size, r.leaf_hash, list(by_idx.hashes), cp.root)
    # an entry past the requested tree size is not covered by it
    with pytest.raises(KolmError, match="index 12 is not covered by the checkpoint of size 9") as e:
        client.inclusion_proof(index=12, tree_size=9)
    assert wire(e).code() == grpc.StatusCode.NOT_FOUND


def test_get_consistency_proof_between_checkpoints(client: LedgerClient, keys: Keys) -> None:
    _fill(client, keys, [1, 2, 5, 9])
    sizes = [1, 3, 8, 17]
    cps = {s: client.checkpoint(s).checkpoint for s in sizes}
    for i, a in enumerate(sizes):
        for b in sizes[i:]:
            hashes, note = client.consistency_proof(a, b)
            new = verify_checkpoint(note, keys.trust).checkpoint
            assert new == cps[b]
            check_consistent(cps[a], new, hashes)
    hashes, note = client.consistency_proof(3)  # to the newest
    assert verify_checkpoint(note, keys.trust).checkpoint.size == 17
    check_consistent(cps[3], cps[17], hashes)
    with pytest.raises(KolmError, match=r"from_size must be in 1\.\.17, got 0") as e:
        client.consistency_proof(0)
    assert wire(e).code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(KolmError, match=r"from_size must be in 1\.\.8, got 9") as e:
        client.consistency_proof(9, 8)
    assert wire(e).code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(KolmError, match="no checkpoint at tree size 40") as e:
        client.consistency_proof(3, 40)
    assert wire(e).code() == grpc.StatusCode.NOT_FOUND


def test_get_entries_streams_a_range_that_recomputes(client: LedgerClient, keys: Keys) -> None:
    envs = [label_env(keys.compile, i) for i in range(12)] + [
        sample_env("prediction", keys.infer, i) for i in range(5)
    ]
    for chunk in (envs[:4], envs[4:11], envs[11:]):
        ok(client.append_many(chunk))
    got = list(client.entries())
    assert [e.index for e in got] == list(range(17))
    chain = bytes(32)
    for e, env in zip(got, envs, strict=True):
        assert e.envelope == env.canonical()
        assert e.leaf_hash == entry_leaf_hash(env, micros(e.integrated_at))
        chain = chain_next(chain, e.leaf_hash)
        assert e.chain_hash == chain
        assert e.kind == ("label" if e.index < 12 else "prediction")
        assert e.key_id == (keys.compile if e.index < 12 else keys.infer).keyid()
    assert (
        merkle.root_from_leaves([e.leaf_hash for e in got]) == client.checkpoint().checkpoint.root
    )
    assert [e.index for e in client.entries(3, 9)] == list(range(3, 9))
    assert list(client.entries(17, 17)) == []
    with pytest.raises(KolmError, match="start 9 is after end 3") as e:
        list(client.entries(9, 3))
    assert wire(e).code() == grpc.StatusCode.INVALID_ARGUMENT


def test_find_entries_by_subject_kind_key_and_time(
    client: LedgerClient, channel: grpc.Channel, keys: Keys
) -> None:
    first = ok(client.append_many([label_env(keys.compile, i, "job-a") for i in range(4)]))
    time.sleep(0.01)
    second = ok(
        client.append_many(
            [label_env(keys.compile, i, "job-b") for i in range(3)]
            + [sample_env("prediction", keys.infer, i) for i in range(2)]
        )
    )
    t_first = client.find(kind="label")[0].integrated_at
    (fifth,) = client.entries(4, 5)
    t_second = fifth.integrated_at
    assert t_second > t_first
    # subject digest: the job id subject of label receipts
    assert [e.index for e in client.find(subject_digest=job_digest("job-a"))] == [0, 1, 2, 3]
    assert [e.index for e in client.find(subject_digest=job_digest("job-b"))] == [4, 5, 6]
    assert client.find(subject_digest=job_digest("job-none")) == []
    # kind and key
    assert [e.index for e in client.find(kind="prediction")] == [7, 8]
    assert [e.index for e in client.find(key_id=keys.infer.keyid())] == [7, 8]
    assert [e.index for e in client.find(key_id=keys.compile.keyid(), kind="label")] == list(
        range(7)
    )
    assert client.find(key_id=keys.admin.keyid()) == []
    # time range: since is inclusive, until exclusive
    assert [e.index for e in client.find(since=t_second)] == [r.index for r in second]
    assert [e.index for e in client.find(until=t_second)] == [r.index for r in first]
    assert [e.index for e in client.find(since=t_first, until=t_second, kind="label")] == [
        0,
        1,
        2,
        3,
    ]
    # paging over the wire
    stub = pb_grpc.LedgerStub(channel)
    seen: list[int] = []
    after = -1
    for _ in range(10):
        r = stub.FindEntries(pb.FindEntriesRequest(kind="label", after_index=after, limit=3))
        seen += [e.index for e in r.entries]
        if r.next_after_index < 0:
            break
        after = r.next_after_index
    assert seen == list(range(7))
    # filters are required, and limits bounded
    with pytest.raises(grpc.RpcError) as e:
        stub.FindEntries(pb.FindEntriesRequest())
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "give at least one filter" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stub.FindEntries(pb.FindEntriesRequest(kind="label", limit=5000))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "limit 5000 is over the maximum of 1000" in e.value.details()


def test_get_receipt_bundle_by_index_and_leaf_hash(client: LedgerClient, keys: Keys) -> None:
    results = _fill(client, keys, [3, 6])
    for r in results:
        by_idx = client.bundle(index=r.index)
        by_leaf = client.bundle(leaf_hash=r.leaf_hash)
        assert by_idx.to_bytes() == by_leaf.to_bytes()
        v = verify_bundle(by_idx, keys.trust)
        assert (v.index, v.leaf_hash, v.checkpoint.size) == (r.index, r.leaf_hash, 9)
    old = client.bundle(index=1, tree_size=3)
    assert verify_bundle(old, keys.trust).checkpoint.size == 3
    with pytest.raises(KolmError, match="no checkpoint covers index 5") as e:
        client.bundle(index=5, tree_size=3)
    assert wire(e).code() == grpc.StatusCode.NOT_FOUND


def test_kolm_verify_against_a_ledger(
    client: LedgerClient, server: ThreadedServer, keys: Keys, capsys: pytest.CaptureFixture[str]
) -> None:
    results = _fill(client, keys, [4])
    trust = str(keys.dir / "trust.json")
    assert kolm_main(["verify", "--trust", trust, "--ledger", server.target, "--index", "2"]) == 0
    assert "OK: label receipt at index 2 signed by compile key" in capsys.readouterr().out
    leaf = results[3].leaf_hash.hex()
    assert (
        kolm_main(["verify", "--trust", trust, "--ledger", server.target, "--leaf-hash", leaf]) == 0
    )
    assert "at index 3" in capsys.readouterr().out
    assert kolm_main(["verify", "--trust", trust, "--ledger", server.target, "--index", "99"]) == 1
    assert "no entry at index 99" in capsys.readouterr().out


# ---- errors: each status from a real client, naming what was wrong ----------------------


def test_malformed_envelopes_are_invalid_argument(client: LedgerClient, keys: Keys) -> None:
    good = label_env(keys.compile, 0)
    obj = good.to_json()
    bad_sig = dict(
        obj, signatures=[{"keyid": keys.compile.keyid(), "sig": obj["signatures"][0]["sig"]}]
    )
    changed = json.loads(good.payload)
    changed["predicate"]["k"] += 1  # still canonical JSON, so the signature check runs
    bad_sig["payload"] = base64.b64encode(canonical_json(changed)).decode()
    cases: list[tuple[bytes, str]] = [
        (b"not json at all", "envelope is not JSON"),
        (b"[1, 2]", "envelope: want a JSON object, got list"),
        (
            json.dumps({k: v for k, v in obj.items() if k != "payloadType"}).encode(),
            "missing field payloadType",
        ),
        (json.dumps(dict(obj, payload="***")).encode(), "envelope.payload: not valid base64"),
        (
            json.dumps(dict(obj, signatures=[])).encode(),
            "envelope.signatures: want a non-empty list",
        ),
        (json.dumps(dict(obj, payloadType="text/plain")).encode(), "payloadType is 'text/plain'"),
        (
            json.dumps(dict(obj, payload=base64.b64encode(b'{"_type":"x"}').decode())).encode(),
            "statement._type",
        ),
        (json.dumps(bad_sig).encode(), "does not verify"),
    ]
    for raw, phrase in cases:
        with pytest.raises(KolmError) as e:
            client.append(raw)
        assert wire(e).code() == grpc.StatusCode.INVALID_ARGUMENT, (phrase, wire(e).details())
        assert phrase in wire(e).details()
    assert list(client.entries()) == []


def test_wrong_role_and_unknown_key_are_permission_denied(client: LedgerClient, keys: Keys) -> None:
    cases = [
        (
            label_env(keys.infer, 0),
            f"key {keys.infer.keyid()[:16]} has role 'infer', which may not sign 'label'",
        ),
        (
            sample_env("prediction", keys.compile, 0),
            "role 'compile', which may not sign 'prediction'",
        ),
        (sample_env("label", keys.admin, 0), "role 'admin', which may not sign 'label'"),
        (
            sign_statement(
                key_statement(
                    action="register", public_key=PrivateKey.generate().public_key(), role="infer"
                ),
                keys.compile,
            ),
            "may not sign 'key'",
        ),
    ]
    stranger = PrivateKey.generate()
    cases.append((label_env(stranger, 0), f"key {stranger.keyid()[:16]} is not in the trust root"))
    for env, phrase in cases:
        with pytest.raises(KolmError) as e:
            client.append(env)
        assert wire(e).code() == grpc.StatusCode.PERMISSION_DENIED
        assert phrase in wire(e).details()
        assert e.value.grpc_code == "PERMISSION_DENIED"
    assert list(client.entries()) == []


def test_revoked_and_expired_keys_are_failed_precondition(serve: ServerFactory, keys: Keys) -> None:
    expired_key = PrivateKey.generate()
    past = datetime.now(UTC) - timedelta(days=1)
    trust = keys.trust.with_key(
        TrustedKey.for_key(
            expired_key.public_key(),
            "compile",
            not_before=past - timedelta(days=30),
            not_after=past,
        )
    )
    srv = serve(trust)
    with srv.client() as c:
        with pytest.raises(KolmError) as e:
            c.append(label_env(expired_key, 0))
        assert wire(e).code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"key {expired_key.keyid()[:16]} (compile) expired at" in wire(e).details()
        # a producer key registered through the log, then revoked through the log
        new = PrivateKey.generate()
        reg = key_statement(action="register", public_key=new.public_key(), role="compile")
        c.append(sign_statement(reg, keys.admin))
        r = c.append(label_env(new, 1))
        assert r.index == 1
        rev = key_statement(
            action="revoke", public_key=new.public_key(), role="compile", reason="leaked"
        )
        c.append(sign_statement(rev, keys.admin))
        with pytest.raises(KolmError) as e:
            c.append(label_env(new, 2))
        assert wire(e).code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"key {new.keyid()[:16]} (compile) was revoked at" in wire(e).details()
        # the same refusal inside a stream, per envelope
        (res,) = c.append_many([label_env(new, 3)])
        assert isinstance(res, KolmError) and res.grpc_code == "FAILED_PRECONDITION"
        assert "was revoked at" in str(res)
        assert c.checkpoint().checkpoint.size == 3


def test_revocation_applies_to_entries_queued_behind_it(
    serve: ServerFactory, keys: Keys, db_url: str
) -> None:
    # one message: a label by K, K's revocation, another label by K. All three pass
    # validation (K is valid when they arrive); the last must still be refused, since
    # once the revocation is sequenced K may sign nothing more
    srv = serve()
    k = PrivateKey.generate()
    with srv.client() as c:
        c.append(
            sign_statement(
                key_statement(action="register", public_key=k.public_key(), role="compile"),
                keys.admin,
            )
        )
        rev = sign_statement(
            key_statement(action="revoke", public_key=k.public_key(), role="compile"), keys.admin
        )
        before, revoked, after = c.append_many([label_env(k, 0), rev, label_env(k, 1)])
        assert isinstance(before, AppendResult) and isinstance(revoked, AppendResult)
        assert isinstance(after, KolmError) and after.grpc_code == "FAILED_PRECONDITION"
        assert f"key {k.keyid()[:16]} (compile) was revoked at" in str(after)
        assert c.checkpoint().checkpoint.size == 3
    store = Store(db_url)
    try:
        rep = audit(store, keys.trust)
        assert rep.ok, [str(f) for f in rep.failures]
    finally:
        store.close()


def test_unknown_index_and_leaf_are_not_found(
    client: LedgerClient, channel: grpc.Channel, keys: Keys
) -> None:
    _fill(client, keys, [3])
    unknown_leaf = hashlib.sha256(b"nothing").digest()
    calls: list[tuple[Callable[[], object], str]] = [
        (lambda: client.bundle(index=42), "no entry at index 42"),
        (
            lambda: client.bundle(leaf_hash=unknown_leaf),
            f"no entry with leaf hash {unknown_leaf.hex()}",
        ),
        (
            lambda: client.inclusion_proof(index=42),
            "index 42 is not covered by the checkpoint of size 3",
        ),
        (lambda: client.inclusion_proof(leaf_hash=unknown_leaf), "no entry with leaf hash"),
        (lambda: client.inclusion_proof(index=0, tree_size=2), "no checkpoint at tree size 2"),
        (lambda: client.provenance("ab" * 32), f"no artifact receipt for digest {'ab' * 32}"),
    ]
    for call, phrase in calls:
        with pytest.raises(KolmError) as e:
            call()
        assert wire(e).code() == grpc.StatusCode.NOT_FOUND, phrase
        assert phrase in wire(e).details()
    stub = pb_grpc.LedgerStub(channel)
    with pytest.raises(grpc.RpcError) as e:
        stub.GetInclusionProof(pb.GetInclusionProofRequest(leaf_hash=b"short"))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "leaf_hash has 5 bytes, want 32" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stub.GetReceiptBundle(pb.GetReceiptBundleRequest())
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "give one of index, leaf_hash or statement_digest" in e.value.details()


def test_numbers_out_of_range_are_invalid_argument_not_internal(
    client: LedgerClient, channel: grpc.Channel, keys: Keys
) -> None:
    _fill(client, keys, [5])
    stub = pb_grpc.LedgerStub(channel)
    huge = 2**64 - 1
    calls: list[tuple[Callable[[], object], str]] = [
        (lambda: stub.GetReceiptBundle(pb.GetReceiptBundleRequest(index=huge)), f"index {huge}"),
        (
            lambda: stub.GetReceiptBundle(pb.GetReceiptBundleRequest(index=0, tree_size=huge)),
            f"tree size {huge}",
        ),
        (lambda: stub.GetCheckpoint(pb.GetCheckpointRequest(size=huge)), f"tree size {huge}"),
        (
            lambda: stub.GetInclusionProof(pb.GetInclusionProofRequest(index=0, tree_size=huge)),
            f"tree size {huge}",
        ),
        (
            lambda: stub.GetConsistencyProof(
                pb.GetConsistencyProofRequest(from_size=1, to_size=huge)
            ),
            f"tree size {huge}",
        ),
        (
            lambda: stub.FindEntries(pb.FindEntriesRequest(since_us=2**62)),
            f"since_us {2**62} is out of range",
        ),
        (
            lambda: stub.FindEntries(pb.FindEntriesRequest(until_us=-(2**62))),
            f"until_us {-(2**62)} is out of range",
        ),
    ]
    for call, phrase in calls:
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (phrase, e.value.details())
        assert phrase in e.value.details()
    # an end past the log streams what there is (and does not walk empty ranges up to it)
    got = list(stub.GetEntries(pb.GetEntriesRequest(start=2, end=2**63), timeout=10))
    assert [e.index for e in got] == [2, 3, 4]
    assert list(stub.GetEntries(pb.GetEntriesRequest(start=huge - 1, end=huge), timeout=10)) == []


def test_oversized_entry_is_resource_exhausted(client: LedgerClient, keys: Keys) -> None:
    st = placeholder_label(input_value="x" * 70_000, job_id="job-big", include_input=True)
    env = sign_statement(st, keys.compile)
    size = len(env.canonical())
    assert MAX_ENVELOPE_BYTES < size < 2 * MAX_ENVELOPE_BYTES
    with pytest.raises(KolmError) as e:
        client.append(env)
    assert wire(e).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"entry is {size} bytes" in wire(e).details()
    assert f"at most {MAX_ENVELOPE_BYTES}" in wire(e).details()
    # far over the limit: refused before parsing
    with pytest.raises(KolmError) as e:
        client.append(b" " * (3 * MAX_ENVELOPE_BYTES))
    assert wire(e).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"entry is {3 * MAX_ENVELOPE_BYTES} bytes" in wire(e).details()
    (res,) = client.append_many([env])
    assert isinstance(res, KolmError) and res.grpc_code == "RESOURCE_EXHAUSTED"
    assert list(client.entries()) == []


def test_full_queue_pushes_back_with_retry_after_ms(serve: ServerFactory, keys: Keys) -> None:
    # the sequencer waits 400 ms to fill a batch, so a tiny queue fills up at once
    srv = serve(max_queue=2, max_wait_ms=400)
    envs = [label_env(keys.compile, i) for i in range(8)]
    with srv.client() as c:
        barrier = threading.Barrier(len(envs))

        def once(env: Envelope) -> AppendResult | KolmError:
            barrier.wait()
            try:
                return c.append(env)
            except KolmError as e:
                return e

        with ThreadPoolExecutor(len(envs)) as pool:
            out = list(pool.map(once, envs))
        accepted = [r for r in out if isinstance(r, AppendResult)]
        refused = [r for r in out if not isinstance(r, AppendResult)]
        assert accepted and refused, out  # the first two queue; the rest find it full
        for e in refused:
            assert isinstance(e, BackpressureError), e
            assert e.grpc_code == "RESOURCE_EXHAUSTED"
            assert e.retry_after_ms >= 400  # the queued batch first waits max_wait to fill
            assert "sequencer queue is full" in str(e) and "limit 2" in str(e)
            cause = e.__cause__
            assert isinstance(cause, grpc.RpcError)
            assert cause.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            md = dict(cause.trailing_metadata() or ())
            assert int(md["retry-after-ms"]) == e.retry_after_ms
        # a stream message larger than the whole queue is refused per envelope, with the hint
        results = c.append_many(envs[:5], batch=5)
        assert all(isinstance(r, BackpressureError) and r.retry_after_ms > 0 for r in results)

        # honouring the hint, everything gets in
        def with_retry(env: Envelope) -> AppendResult:
            deadline = time.monotonic() + 30
            while True:
                try:
                    return c.append(env)
                except BackpressureError as e:
                    assert time.monotonic() < deadline, "still refused after 30 s"
                    time.sleep(e.retry_after_ms / 1000)

        with ThreadPoolExecutor(len(envs)) as pool:
            retried = list(pool.map(with_retry, envs))
        stored = {e.leaf_hash: e.index for e in c.entries()}
        assert len(stored) == len(envs)
        for r in accepted + retried:
            assert stored[r.leaf_hash] == r.index


def test_deadline_shorter_than_the_work_is_deadline_exceeded(
    serve: ServerFactory, keys: Keys
) -> None:
    srv = serve(max_wait_ms=3000)  # every batch waits three seconds to fill
    env = label_env(keys.compile, 0)
    with srv.client(timeout=0.2) as c:
        with pytest.raises(KolmError) as e:
            c.append(env, wait=True)
        assert wire(e).code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert e.value.grpc_code == "DEADLINE_EXCEEDED"
        # the call ended at its own deadline, not when the work was done: nothing is in
        # the log yet (the batch is still waiting to fill)
        assert list(c.entries()) == []
    # the server finished the work anyway: a retry is answered with the same entry
    with srv.client(timeout=30) as c:
        r = c.append(env)
        assert r.index == 0
        (only,) = c.entries()
        assert only.leaf_hash == r.leaf_hash and only.envelope == env.canonical()


# ---- provenance --------------------------------------------------------------------------


def _eval(keys: Keys, artifact: str, correct: int, n: int) -> Envelope:
    return sign_statement(
        eval_statement(
            artifact_digest=artifact,
            holdout_digest=_h("holdout"),
            n=n,
            correct=correct,
            k_score=100 * correct / n,
            interval=(78.6, 95.7),
            outcome_root=_h("outcomes", artifact),
            teacher_k_score=92.0,
        ),
        keys.compile,
    )


def _artifact(
    keys: Keys, artifact: str, root: str, count: int, eval_leaf: bytes, k: float, job: str
) -> Envelope:
    return sign_statement(
        artifact_statement(
            artifact_digest=artifact,
            file_name="router.kolm",
            file_digest=_h("file", artifact),
            base_model={"id": "tiny", "revision": "main", "weights_digest": _h("weights")},
            training_set_root=root,
            label_count=count,
            eval_receipt=eval_leaf.hex(),
            k_score=k,
            verifier={"name": "label_set", "version": "1"},
            compile_config_digest=_h("config"),
            kolm_version="0.1.0",
            checkpoint={"origin": "kolm.dev/ledger", "size": 0},
            extra={"job_id": job},
        ),
        keys.compile,
    )


def test_get_provenance_and_kolm_provenance(
    client: LedgerClient, server: ThreadedServer, keys: Keys, capsys: pytest.CaptureFixture[str]
) -> None:
    job = "job-prov-1"
    # the job's labels interleave with another job's, over several batches
    envs = []
    for i in range(9):
        envs.append(label_env(keys.compile, i, job if i % 3 else "job-other"))
    acks = ok(client.append_many(envs[:4])) + ok(client.append_many(envs[4:]))
    # the leaf hashes the ledger answered with (they bind the integration time)
    job_leaves = [
        a.leaf_hash
        for e, a in zip(envs, acks, strict=True)
        if json.loads(e.payload)["predicate"]["job_id"] == job
    ]
    assert len(job_leaves) == 6
    root = training_set_root(job_leaves)
    good = _h("artifact", "good")
    ev = client.append(_eval(keys, good, 45, 50))
    art = client.append(_artifact(keys, good, root, 6, ev.leaf_hash, 90.0, job), wait=True)
    assert art.bundle is not None

    p = client.provenance(good)
    assert p.artifact.index == art.index and p.artifact.leaf_hash == art.leaf_hash
    assert p.eval is not None and p.eval.leaf_hash == ev.leaf_hash
    assert (p.k_score, p.eval_n, p.eval_correct) == (90.0, 50, 45)
    assert p.interval == (78.6, 95.7)
    assert p.teacher_k_score == 92.0
    assert (p.training_set_root, p.recomputed_root) == (root, root)
    assert (p.label_count, p.labels_found, p.job_id) == (6, 6, job)
    assert p.root_matches
    assert [e.leaf_hash for e in p.labels] == job_leaves
    assert [e.index for e in p.labels] == sorted(e.index for e in p.labels)
    assert check_provenance(p, keys.trust).ok
    lean = client.provenance(good, include_labels=False)
    assert lean.labels == [] and lean.labels_found == 6 and lean.recomputed_root == root

    trust = str(keys.dir / "trust.json")
    for extra in ([], ["--trust", trust]):
        assert kolm_main(["provenance", "--ledger", server.target, *extra, good]) == 0
        out = capsys.readouterr().out
        assert f"artifact  {good}" in out
        assert "K-score 90.00 (n=50, 95% CI 78.6–95.7), teacher 92.00" in out
        assert f"6 label receipts, training-set root {root[:16]}… (matches)" in out
        assert "OK: provenance recomputed from the receipts" in out

    # an artifact that claims a root the labels do not give (wrong order)
    bad = _h("artifact", "bad")
    wrong = training_set_root(job_leaves[::-1])
    ev2 = client.append(_eval(keys, bad, 45, 50))
    client.append(_artifact(keys, bad, wrong, 6, ev2.leaf_hash, 90.0, job))
    pb_ = client.provenance(bad)
    assert pb_.training_set_root == wrong and pb_.recomputed_root == root
    assert not pb_.root_matches
    assert kolm_main(["provenance", "--ledger", server.target, "--trust", trust, bad]) == 1
    out = capsys.readouterr().out
    assert "MISMATCH" in out
    assert (
        f"training-set root {wrong[:16]}… claimed, {root[:16]}… recomputed from 6 label receipts"
        in out
    )
    # and one whose K-score does not follow from its eval receipt
    k_bad = _h("artifact", "kbad")
    ev3 = client.append(_eval(keys, k_bad, 40, 50))
    client.append(_artifact(keys, k_bad, root, 6, ev3.leaf_hash, 90.0, job))
    assert kolm_main(["provenance", "--ledger", server.target, k_bad]) == 1
    assert "artifact receipt K-score 90 != 100*40/50 = 80.0000" in capsys.readouterr().out

    # re-evaluated later: provenance follows the eval the artifact names, not the newest
    client.append(_eval(keys, good, 30, 50))
    again = client.provenance(good)
    assert again.eval is not None and again.eval.leaf_hash == ev.leaf_hash
    assert (again.eval_n, again.eval_correct) == (50, 45)
    assert kolm_main(["provenance", "--ledger", server.target, "--trust", trust, good]) == 0
    capsys.readouterr()
    # an artifact that names another artifact's evaluation is caught
    borrowed = _h("artifact", "borrowed")
    client.append(_artifact(keys, borrowed, root, 6, ev.leaf_hash, 90.0, job))
    assert kolm_main(["provenance", "--ledger", server.target, borrowed]) == 1
    out = capsys.readouterr().out
    assert (
        f"eval receipt (index {ev.index}) evaluates {good[:16]}, not artifact {borrowed[:16]}"
        in out
    )


# ---- the `kolm ledger serve` process: health, reflection, metrics ------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(proc: subprocess.Popen[bytes], ready: Path, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready.exists() and ready.read_text().strip():
            return int(ready.read_text())
        if proc.poll() is not None:
            raise AssertionError(
                f"kolm ledger serve exited {proc.returncode}: {proc.stderr.read() if proc.stderr else ''!r}"
            )
        time.sleep(0.05)
    raise AssertionError("kolm ledger serve did not become ready")


def test_serve_with_verify_processes_validates_in_workers(keys: Keys, tmp_path: Path) -> None:
    """``kolm ledger serve --verify-processes 2``: two worker processes, the same answers."""
    import psutil

    ready = tmp_path / "ready"
    proc = subprocess.Popen(
        [str(KOLM), "ledger", "serve", "--insecure", "--db", f"sqlite:///{tmp_path / 'l.db'}",
         "--trust", str(keys.dir / "trust.json"), "--log-key", str(keys.dir / "log.key"),
         "--listen", "127.0.0.1:0", "--ready-file", str(ready), "--verify-processes", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        port = _wait_ready(proc, ready)
        # started with the server, not on the first request
        workers = [c for c in psutil.Process(proc.pid).children() if c.is_running()]
        assert len(workers) >= 2, workers
        with LedgerClient(f"127.0.0.1:{port}") as c:
            envs: list[Envelope | bytes] = [label_env(keys.compile, i) for i in range(40)]
            envs[7] = label_env(keys.infer, 1000)  # role may not sign 'label'
            results = c.append_many(envs, batch=40)
            assert [r.index for r in results if isinstance(r, AppendResult)] == list(range(39))
            assert isinstance(results[7], KolmError) and results[7].grpc_code == "PERMISSION_DENIED"
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()
    _, alive = psutil.wait_procs(workers, timeout=10)  # stopped with the server
    assert not alive, alive


def test_serve_process_health_reflection_and_metrics(
    db_url: str, keys: Keys, tmp_path: Path
) -> None:
    ready = tmp_path / "ready"
    mport = _free_port()
    proc = subprocess.Popen(
        [
            str(KOLM),
            "ledger",
            "serve",
            "--insecure",
            "--db",
            db_url,
            "--trust",
            str(keys.dir / "trust.json"),
            "--log-key",
            str(keys.dir / "log.key"),
            "--listen",
            "127.0.0.1:0",
            "--metrics-port",
            str(mport),
            "--ready-file",
            str(ready),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )
    try:
        port = _wait_ready(proc, ready)
        target = f"127.0.0.1:{port}"
        with grpc.insecure_channel(target) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            for name in ("", SERVICE):
                r = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
                assert r.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as e:
                health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
            assert e.value.code() == grpc.StatusCode.NOT_FOUND

            refl = reflection_pb2_grpc.ServerReflectionStub(ch)
            reqs = [
                reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE),
            ]
            listed, by_symbol = list(refl.ServerReflectionInfo(iter(reqs), timeout=10))
            names = {s.name for s in listed.list_services_response.service}
            assert {SERVICE, "grpc.health.v1.Health"} <= names
            assert by_symbol.file_descriptor_response.file_descriptor_proto

        with LedgerClient(target) as c:
            envs = [label_env(keys.compile, i) for i in range(3)]
            ok(c.append_many(envs))
            assert c.append(envs[0]).duplicate
        body = (
            urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10).read().decode()
        )
        assert 'kolm_ledger_appends_total{result="ok"} 3.0' in body
        assert 'kolm_ledger_appends_total{result="duplicate"} 1.0' in body
        assert "kolm_ledger_batch_size_bucket" in body
        assert "kolm_ledger_queue_depth" in body
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()
    assert f"kolm ledger listening on 127.0.0.1:{port}".encode() in out
    # structured logs: one JSON object per line on stderr
    lines = [json.loads(line) for line in err.decode().splitlines() if line.strip()]
    assert any(rec["msg"] == "ledger serving" and rec["port"] == port for rec in lines)


@pytest.mark.parametrize(
    "off_loop", [{"verify_threads": 3}, {"verify_threads": 1, "verify_processes": 2}]
)
def test_verify_threads_give_the_same_results_and_errors_in_order(
    serve: ServerFactory, keys: Keys, tmp_path: Path, off_loop: dict[str, int]
) -> None:
    """Multi-envelope requests validated on threads or in worker processes: as on one thread."""
    threaded = serve(**off_loop)
    reference = ThreadedServer(
        f"sqlite:///{tmp_path / 'ref.db'}", keys.trust, keys.log, verify_threads=1
    )
    try:
        envs: list[Envelope | bytes] = [label_env(keys.compile, i) for i in range(150)]
        envs[3] = b'{"payload": 1}'
        envs[70] = label_env(keys.infer, 1000)  # role may not sign 'label'
        envs[71] = envs[20]  # duplicate within the request
        envs[149] = b"not json at all"
        outs = []
        for srv in (threaded, reference):
            with srv.client() as c:
                first = c.append_many(envs, batch=150)
                again = c.append_many(envs[:80], batch=40)  # duplicates of the log
                with pytest.raises(KolmError) as e:
                    c.append(label_env(keys.infer, 1001))  # unary: the error itself
            outs.append(
                [
                    (r.index, r.duplicate) if isinstance(r, AppendResult) else (r.grpc_code, str(r))
                    for r in first + again
                ]
                + [(e.value.grpc_code, str(e.value))]
            )
        assert outs[0] == outs[1]
        assert outs[0][3][0] == "INVALID_ARGUMENT" and outs[0][70][0] == "PERMISSION_DENIED"
        assert outs[0][71] == (outs[0][20][0], True)
    finally:
        reference.stop()


def test_stream_messages_are_sequenced_in_order_while_validated_on_threads(
    serve: ServerFactory, keys: Keys
) -> None:
    """Validation of a stream's messages overlaps on the verify threads; order does not."""
    srv = serve(verify_threads=3)
    envs = [label_env(keys.compile, i) for i in range(240)]
    with srv.client() as c:
        for n, batch in enumerate((2, 3, 5, 7)):  # many small messages in flight at once
            chunk = envs[60 * n : 60 * (n + 1)]
            results = c.append_many(chunk, batch=batch)
            got = [r.index if isinstance(r, AppendResult) else r for r in results]
            assert got == list(range(60 * n, 60 * (n + 1))), (batch, got)


# ---- the sync and async clients: one request layer ---------------------------------------

#: methods each client has for itself: appends over AppendStream, and the lifecycle
_OWN = {"append_many", "append_batch", "append_batches", "append_pipelined", "close"}


def _surface(cls: type) -> dict[str, inspect.Signature]:
    return {
        n: inspect.signature(getattr(cls, n))
        for n in dir(cls)
        if not n.startswith("_") and callable(getattr(cls, n)) and n not in _OWN
    }


def test_the_sync_and_async_clients_have_one_surface() -> None:
    from kolm_ledger.service.client import AsyncLedgerClient

    sync, aio = _surface(LedgerClient), _surface(AsyncLedgerClient)
    # every read (and the single append) on both, with the same parameters and defaults:
    # inclusion_proof, consistency_proof and entries were sync-only, find took fewer
    # filters and provenance defaulted include_labels=False on the async client
    assert set(sync) == set(aio)
    assert {"find", "provenance", "inclusion_proof", "consistency_proof", "entries"} <= set(aio)
    for name in sync:
        assert sync[name].parameters == aio[name].parameters, name


def test_the_async_client_answers_as_the_sync_one(
    client: LedgerClient, server: ThreadedServer, keys: Keys
) -> None:
    from kolm_ledger.service.client import AsyncLedgerClient

    job = "job-parity"
    envs = [label_env(keys.compile, i, job) for i in range(1005)]  # more than a page
    acks = ok(client.append_many(envs))
    good = _h("artifact", "parity")
    ev = client.append(_eval(keys, good, 45, 50))
    root = training_set_root([a.leaf_hash for a in acks])
    client.append(_artifact(keys, good, root, len(acks), ev.leaf_hash, 90.0, job))
    size = client.checkpoint().checkpoint.size

    async def both() -> dict[str, Any]:
        c = AsyncLedgerClient(server.target, timeout=30)
        try:
            return {
                "find": await c.find(kind="label", limit=2000),
                "after": await c.find(kind="label", after_index=1000, limit=3),
                "prov": await c.provenance(good),
                "incl": await c.inclusion_proof(index=7, tree_size=size),
                "cons": await c.consistency_proof(5, size),
                "entries": [e async for e in c.entries(0, 4)],
            }
        finally:
            await c.close()

    got = asyncio.run(both())
    want = {
        "find": client.find(kind="label", limit=2000),
        "after": client.find(kind="label", after_index=1000, limit=3),
        "prov": client.provenance(good),
        "incl": client.inclusion_proof(index=7, tree_size=size),
        "cons": client.consistency_proof(5, size),
        "entries": list(client.entries(0, 4)),
    }
    # every page followed (the async find returned the first 1000 only)
    assert len(got["find"]) == len(want["find"]) == 1005
    assert [e.index for e in got["after"]] == [1001, 1002, 1003]
    # the same default: the labels are listed (the async client left them out)
    assert len(got["prov"].labels) == 1005 and got["prov"].root_matches
    assert got == want
