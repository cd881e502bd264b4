"""Graceful shutdown: SIGTERM while clients stream appends loses nothing acknowledged.

A ``kolm ledger serve`` process takes appends from several client threads (two
``AppendStream`` streams and two ``Append`` loops); once enough are acknowledged it
gets SIGTERM. Clients must see only successes or clean ``UNAVAILABLE``/``CANCELLED``
errors; after a restart on the same database every acknowledged (index, leaf hash) is
there, both audits pass, and the log takes new appends.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from support.servers import label_envelope

from kolm_ledger._crypto import PrivateKey
from kolm_ledger._pb import ledger_pb2 as pb
from kolm_ledger._pb import ledger_pb2_grpc as pb_grpc
from kolm_ledger.formats.dsse import Envelope
from kolm_ledger.formats.leaf import entry_leaf_hash
from kolm_ledger.keys import TrustRoot
from kolm_ledger.service.client import LedgerClient
from kolm_ledger.verify.receipt import verify_bundle

pytestmark = pytest.mark.slow

KOLM = Path(sys.executable).with_name("kolm")
CLEAN = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
ACKS_BEFORE_SIGTERM = 150


class Serve:
    """One ``kolm ledger serve`` process."""

    def __init__(self, db: str, keydir: Path, ready: Path) -> None:
        self.proc = subprocess.Popen(
            [
                str(KOLM),
                "ledger",
                "serve",
                "--insecure",
                "--db",
                db,
                "--trust",
                str(keydir / "trust.json"),
                "--log-key",
                str(keydir / "log.key"),
                "--listen",
                "127.0.0.1:0",
                "--ready-file",
                str(ready),
                "--max-wait-ms",
                "5",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 60
        while not (ready.exists() and ready.read_text().strip()):
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited {self.proc.returncode}: {self._err()}")
            assert time.monotonic() < deadline, "serve did not become ready"
            time.sleep(0.05)
        self.target = f"127.0.0.1:{int(ready.read_text())}"

    def _err(self) -> str:
        return self.proc.stderr.read().decode()[-3000:] if self.proc.stderr else ""

    def terminate(self, timeout: float = 30) -> tuple[int, str]:
        """SIGTERM and wait; returns (exit code, stderr)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            raise AssertionError(f"serve did not stop within {timeout} s of SIGTERM") from None
        return self.proc.returncode, err.decode()


@pytest.fixture
def servers() -> Iterator[list[Serve]]:
    started: list[Serve] = []
    yield started
    for s in started:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.communicate()


@dataclass
class Log:
    """What the clients saw."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    acks: list[tuple[int, bytes, bytes]] = field(default_factory=list)  # index, ack leaf, own leaf
    errors: list[tuple[str, grpc.StatusCode, str]] = field(default_factory=list)

    def ack(self, index: int, leaf: bytes, own: bytes) -> None:
        with self.lock:
            self.acks.append((index, leaf, own))

    def error(self, who: str, code: grpc.StatusCode, msg: str) -> None:
        with self.lock:
            self.errors.append((who, code, msg))


def _streamer(target: str, key: PrivateKey, who: str, log: Log, stop: threading.Event) -> None:
    """Stream messages of 5 envelopes (at most 2 in flight) until told to stop or refused."""
    done = threading.Event()
    window = threading.Semaphore(2)
    sent: dict[int, list[Envelope]] = {}

    def requests() -> Iterator[pb.AppendStreamRequest]:
        n = 0
        for batch_id in range(10_000):
            while not window.acquire(timeout=0.05):
                if done.is_set():
                    return
            if done.is_set() or stop.is_set():
                return
            envs = [label_envelope(key, who, n + j) for j in range(5)]
            n += 5
            sent[batch_id] = envs
            yield pb.AppendStreamRequest(batch_id=batch_id, envelopes=[e.to_bytes() for e in envs])

    with grpc.insecure_channel(target) as ch:
        try:
            for resp in pb_grpc.LedgerStub(ch).AppendStream(requests(), timeout=120):
                for env, r in zip(sent.pop(resp.batch_id), resp.results, strict=True):
                    if r.WhichOneof("result") == "ok":
                        own = entry_leaf_hash(env, r.ok.integrated_time_us)
                        log.ack(r.ok.index, r.ok.leaf_hash, own)
                    else:
                        code = next(c for c in grpc.StatusCode if c.value[0] == r.error.code)
                        log.error(who, code, r.error.message)
                        done.set()  # a refused append: stop sending, as a client would
                window.release()
        except grpc.RpcError as e:
            log.error(who, e.code(), e.details() or "")
        finally:
            done.set()


def _unary(target: str, key: PrivateKey, who: str, log: Log, stop: threading.Event) -> None:
    """Append one envelope at a time until told to stop or refused."""
    with grpc.insecure_channel(target) as ch:
        stub = pb_grpc.LedgerStub(ch)
        for i in range(100_000):
            if stop.is_set():
                return
            env = label_envelope(key, who, i)
            try:
                r = stub.Append(pb.AppendRequest(envelope=env.to_bytes()), timeout=60)
            except grpc.RpcError as e:
                log.error(who, e.code(), e.details() or "")
                return
            log.ack(r.index, r.leaf_hash, entry_leaf_hash(env, r.integrated_time_us))


def test_sigterm_during_streaming_appends_loses_nothing_acknowledged(
    db_url: str, keydir: Path, tmp_path: Path, servers: list[Serve]
) -> None:
    key = PrivateKey.load(keydir / "compile.key")
    trust = TrustRoot.load(keydir / "trust.json")
    srv = Serve(db_url, keydir, tmp_path / "ready-1")
    servers.append(srv)
    log, stop = Log(), threading.Event()
    threads = [
        threading.Thread(target=fn, args=(srv.target, key, f"{fn.__name__}-{i}", log, stop))
        for i in range(2)
        for fn in (_streamer, _unary)
    ]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 60
        while len(log.acks) < ACKS_BEFORE_SIGTERM:
            assert time.monotonic() < deadline, f"only {len(log.acks)} acks in 60 s: {log.errors}"
            assert not log.errors, log.errors
            time.sleep(0.01)
        t_term = time.monotonic()
        rc, err = srv.terminate()
        stopped_in = time.monotonic() - t_term
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert rc == 0, err
    assert stopped_in < 15, f"shutdown took {stopped_in:.1f} s"

    # (1) clients saw only successes or clean refusals
    unclean = [(who, code.name, msg) for who, code, msg in log.errors if code not in CLEAN]
    assert not unclean, unclean
    # (2) every acknowledgement is for the client's own envelope, each index once
    for index, leaf, own in log.acks:
        assert leaf == own, f"index {index}: acknowledged another envelope's leaf hash"
    indices = [a[0] for a in log.acks]
    assert len(set(indices)) == len(indices), "an index was acknowledged twice"

    # (3) restart on the same database: everything acknowledged is there
    srv2 = Serve(db_url, keydir, tmp_path / "ready-2")
    servers.append(srv2)
    with LedgerClient(srv2.target) as c:
        stored = {e.index: e.leaf_hash for e in c.entries()}
        size = c.checkpoint().checkpoint.size
        assert size == len(stored) and sorted(stored) == list(range(size))
        lost = [(i, leaf.hex()) for i, leaf, _ in log.acks if stored.get(i) != leaf]
        assert not lost, f"{len(lost)} acknowledged entries lost or changed: {lost[:5]}"
        last = max(indices)
        assert verify_bundle(c.bundle(index=last), trust).leaf_hash == stored[last]
        # (4) and the log goes on from where it stopped
        r = c.append(label_envelope(key, "after-restart", 0), wait=True)
        assert r.index == size
        assert r.bundle is not None and verify_bundle(r.bundle, trust).index == size

    # (5) both audits pass
    trust_path = str(keydir / "trust.json")
    for argv in (
        ["audit", "--db", db_url, "--trust", trust_path],
        ["audit", "--ledger", srv2.target, "--trust", trust_path],
    ):
        res = subprocess.run(
            [str(KOLM), *argv], capture_output=True, timeout=120, env={**os.environ}
        )
        assert res.returncode == 0, (argv, res.stdout.decode(), res.stderr.decode())
        assert f"OK: {size + 1} entries" in res.stdout.decode()
    rc, err = srv2.terminate()
    assert rc == 0, err
