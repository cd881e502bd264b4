"""Fuzzing every Ledger RPC from a raw channel: garbage never breaks the service.

Clients send (through ``channel.unary_unary`` and friends with identity serializers)
random bytes, truncated and bit-flipped protobuf messages, messages over the 16 MiB
limit, and well-formed envelopes that are wrongly signed or signed by unknown,
revoked, expired or wrong-role keys. Each gets a specific status (never ``INTERNAL``
or ``UNKNOWN``), nothing is written for a rejected request, and health stays SERVING.
"""

from __future__ import annotations

import base64
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import given
from hypothesis import strategies as st
from support.fuzz import FUZZ
from test_ledger_service import ThreadedServer, label_env

from kolm_ledger._crypto import PrivateKey
from kolm_ledger._pb import ledger_pb2 as pb
from kolm_ledger._samples import sample_statement
from kolm_ledger.formats.receipts import key_statement, sign_statement
from kolm_ledger.keys import TrustedKey, init_keys

L = "/kolm.ledger.v1.Ledger/"
UNARY = [
    "Append",
    "GetCheckpoint",
    "GetInclusionProof",
    "GetConsistencyProof",
    "FindEntries",
    "GetReceiptBundle",
    "GetProvenance",
]
#: statuses a malformed or refused request may get; never INTERNAL or UNKNOWN
SPECIFIC = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.OUT_OF_RANGE,
}


@dataclass
class World:
    server: ThreadedServer
    channel: grpc.Channel
    keys: dict[str, PrivateKey]
    valid: bytes  # a valid, already appended envelope

    def size(self) -> int:
        return int(self.server.srv.ledger.size)

    def call(self, method: str, data: bytes) -> grpc.StatusCode:
        f = self.channel.unary_unary(L + method)  # identity serializers: raw bytes
        try:
            f(data, timeout=20)
        except grpc.RpcError as e:
            return e.code()
        return grpc.StatusCode.OK

    def stream(self, messages: list[bytes]) -> list[tuple[int, str]]:
        """AppendStream with raw request messages; per-envelope (code, message) results."""
        f = self.channel.stream_stream(L + "AppendStream")
        out = []
        for raw in f(iter(messages), timeout=20):
            for r in pb.AppendStreamResponse.FromString(raw).results:
                out.append(
                    (0, "") if r.WhichOneof("result") == "ok" else (r.error.code, r.error.message)
                )
        return out

    def serving(self) -> bool:
        h = health_pb2_grpc.HealthStub(self.channel).Check(
            health_pb2.HealthCheckRequest(service="kolm.ledger.v1.Ledger"), timeout=10
        )
        return bool(h.status == health_pb2.HealthCheckResponse.SERVING)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    d: Path = tmp_path_factory.mktemp("fuzz")
    trust = init_keys(d / "keys")
    keys = {
        r: PrivateKey.load(d / "keys" / f"{r}.key") for r in ("admin", "compile", "infer", "log")
    }
    expired = PrivateKey.generate()
    past = datetime.now(UTC) - timedelta(days=1)
    trust = trust.with_key(
        TrustedKey.for_key(
            expired.public_key(), "compile", not_before=past - timedelta(days=9), not_after=past
        )
    )
    keys["expired"] = expired
    srv = ThreadedServer(f"sqlite:///{d / 'ledger.db'}", trust, keys["log"], max_wait_ms=1)
    ch = grpc.insecure_channel(srv.target, options=[("grpc.max_send_message_length", 32 << 20)])
    revoked = PrivateKey.generate()
    keys["revoked"] = revoked
    with srv.client() as c:
        valid = label_env(keys["compile"], 0)
        c.append(valid, wait=True)
        c.append(
            sign_statement(
                key_statement(action="register", public_key=revoked.public_key(), role="compile"),
                keys["admin"],
            )
        )
        c.append(
            sign_statement(
                key_statement(action="revoke", public_key=revoked.public_key(), role="compile"),
                keys["admin"],
            ),
            wait=True,
        )
    w = World(srv, ch, keys, valid.to_bytes())
    yield w
    ch.close()
    srv.stop()


@FUZZ
@given(method=st.sampled_from(UNARY), data=st.binary(max_size=512))
def test_random_bytes_to_every_unary_rpc(world: World, method: str, data: bytes) -> None:
    before = world.size()
    code = world.call(method, data)
    assert code in SPECIFIC | {grpc.StatusCode.OK}, (method, data, code)
    if method == "Append":
        assert world.size() == before


@FUZZ
@given(data=st.binary(max_size=256))
def test_random_bytes_to_the_streaming_rpcs(world: World, data: bytes) -> None:
    before = world.size()
    try:
        world.stream([data])
    except grpc.RpcError as e:
        assert e.code() in SPECIFIC, e.code()
    f = world.channel.unary_stream(L + "GetEntries")
    try:
        list(f(data, timeout=20))
    except grpc.RpcError as e:
        assert e.code() in SPECIFIC, e.code()
    assert world.size() == before


@FUZZ
@given(pos=st.integers(min_value=0), bit=st.integers(min_value=0, max_value=7), cut=st.booleans())
def test_mutated_envelopes_are_refused_with_a_specific_status(
    world: World, pos: int, bit: int, cut: bool
) -> None:
    env = bytearray(world.valid)
    pos %= len(env)
    if cut:
        env = env[:pos]
    else:
        env[pos] ^= 1 << bit
    before = world.size()
    req = pb.AppendRequest(envelope=bytes(env)).SerializeToString()
    code = world.call("Append", req)
    # a flip the parser normalizes away is the same envelope: a duplicate, nothing new
    assert code in SPECIFIC | {grpc.StatusCode.OK}, code
    (res,) = world.stream([pb.AppendStreamRequest(envelopes=[bytes(env)]).SerializeToString()])
    assert res[0] in {c.value[0] for c in SPECIFIC} | {0}, res
    assert world.size() == before
    # truncated or flipped protobuf framing
    raw = pb.AppendRequest(envelope=world.valid).SerializeToString()
    assert world.call("Append", raw[: pos % len(raw)]) in SPECIFIC | {grpc.StatusCode.OK}
    assert world.size() == before


def _resign(env: bytes, key: PrivateKey, claim: str | None = None) -> bytes:
    """``env``'s payload signed by ``key`` (its key id replaced by ``claim`` if given)."""
    obj = json.loads(env)
    from kolm_ledger.formats.dsse import Envelope

    e = Envelope.from_json(obj)
    from kolm_ledger.formats.dsse import pae

    sig = key.sign(pae(e.payload_type, e.payload))
    obj["signatures"] = [{"keyid": claim or key.keyid(), "sig": base64.b64encode(sig).decode()}]
    return json.dumps(obj).encode()


def test_wrong_keys_get_their_specific_status_on_both_append_rpcs(world: World) -> None:
    k = world.keys
    label = sign_statement(sample_statement("label", 7, random.Random(7)), k["compile"]).to_bytes()
    cases: list[tuple[str, bytes, grpc.StatusCode, str]] = [
        (
            "unknown key",
            _resign(label, PrivateKey.generate()),
            grpc.StatusCode.PERMISSION_DENIED,
            "not in the trust root",
        ),
        (
            "wrong role",
            _resign(label, k["infer"]),
            grpc.StatusCode.PERMISSION_DENIED,
            "may not sign 'label'",
        ),
        (
            "wrong signature",
            _resign(label, PrivateKey.generate(), k["compile"].keyid()),
            grpc.StatusCode.INVALID_ARGUMENT,
            "does not verify",
        ),
        (
            "revoked key",
            _resign(label, k["revoked"]),
            grpc.StatusCode.FAILED_PRECONDITION,
            "was revoked at",
        ),
        (
            "expired key",
            _resign(label, k["expired"]),
            grpc.StatusCode.FAILED_PRECONDITION,
            "expired at",
        ),
        ("log key", _resign(label, k["log"]), grpc.StatusCode.PERMISSION_DENIED, "may not sign"),
    ]
    before = world.size()
    f = world.channel.unary_unary(L + "Append")
    for name, env, code, msg in cases:
        with pytest.raises(grpc.RpcError) as e:
            f(pb.AppendRequest(envelope=env).SerializeToString(), timeout=20)
        assert e.value.code() == code, (name, e.value.code(), e.value.details())
        assert msg in (e.value.details() or ""), (name, e.value.details())
        (res,) = world.stream([pb.AppendStreamRequest(envelopes=[env]).SerializeToString()])
        assert res[0] == code.value[0] and msg in res[1], (name, res)
    assert world.size() == before
    assert world.serving()


def test_oversized_messages_are_resource_exhausted(world: World) -> None:
    before = world.size()
    huge = pb.AppendRequest(envelope=b"x" * (17 << 20)).SerializeToString()
    assert world.call("Append", huge) == grpc.StatusCode.RESOURCE_EXHAUSTED
    big_env = pb.AppendRequest(envelope=b'{"payload":"' + b"A" * 200_000 + b'"}')
    assert world.call("Append", big_env.SerializeToString()) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert world.size() == before
    assert world.serving()


def test_service_still_serves_and_audits_after_the_fuzzing(world: World) -> None:
    from kolm_ledger.audit.auditor import audit

    assert world.serving()
    with world.server.client() as c:
        r = c.append(label_env(world.keys["compile"], 1), wait=True)
        assert not r.duplicate
    store = world.server.srv.ledger.store
    rep = audit(store, world.server.srv.ledger.trust.root)
    assert rep.ok, [str(x) for x in rep.failures][:5]
