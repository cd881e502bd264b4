"""``kolm verify FILE --ledger`` on what ``kolm predict --out`` writes without ``--wait``: a
promise file (the envelope and the log's signed promise) or a spooled receipt. The entry is
fetched from a real ledger service by the promise's leaf hash (or the envelope's statement
digest), and the promise must be the log's and kept."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.servers import LedgerThread

from kolm.cli.main import main
from kolm_ledger._samples import sample_statement
from kolm_ledger.formats.promise import Promise, promise_message
from kolm_ledger.formats.receipts import sign_statement
from kolm_ledger.keys import PrivateKey, init_keys
from kolm_ledger.service.client import AppendResult, LedgerClient


class World:
    def __init__(self, tmp: Path) -> None:
        self.keys = tmp / "keys"
        self.trust = init_keys(self.keys)
        self.log_key = PrivateKey.load(self.keys / "log.key")
        self.ledger = LedgerThread(f"sqlite:///{tmp / 'ledger.db'}", self.trust, self.log_key)
        self.client = LedgerClient(self.ledger.target)
        self.tmp = tmp

    def append(self, i: int) -> tuple[dict[str, Any], AppendResult]:
        env = sign_statement(
            sample_statement("label", i, random.Random(i)),
            PrivateKey.load(self.keys / "compile.key"),
        )
        r = self.client.append(env)
        return env.to_json(), r

    def verify(self, obj: dict[str, Any] | bytes, *extra: str, ledger: bool = True) -> Any:
        path = self.tmp / "receipt.json"
        path.write_bytes(obj if isinstance(obj, bytes) else json.dumps(obj).encode())
        args = ["verify", str(path), "--trust", str(self.keys / "trust.json"), *extra]
        if ledger:
            args += ["--ledger", self.ledger.target]
        return main(args)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    yield w
    w.client.close()
    w.ledger.close()


def _until_covered(world: World, index: int) -> None:
    """A promise comes before the checkpoint: wait until one covers ``index``."""
    for _ in range(200):
        try:
            world.client.bundle(index=index)
            return
        except Exception:
            time.sleep(0.05)
    raise AssertionError(f"no checkpoint covered index {index}")


def test_a_promise_file_verifies_with_the_ledger(world: World, capsys: Any) -> None:
    env, r = world.append(0)
    world.append(1)
    promise = {"envelope": env, "promise": r.promise.to_json()}
    assert Promise.from_json(promise["promise"]) == r.promise  # the file form round-trips
    # without --ledger it is named for what it is, not a step-1 bundle parse error
    assert world.verify(promise, ledger=False) == 1
    out = capsys.readouterr().out
    assert "is a promise, not a bundle: give --ledger" in out, out
    _until_covered(world, r.index)
    assert world.verify(promise) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"OK: label receipt at index {r.index} signed by compile key"), out
    # a spooled receipt (no promise): found by its statement digest
    env1, r1 = world.append(2)
    _until_covered(world, r1.index)
    assert world.verify({"envelope": env1, "spooled": True}) == 0
    assert f"at index {r1.index}" in capsys.readouterr().out


def _failed(world: World, capsys: Any, obj: dict[str, Any], step: int, words: str) -> None:
    assert world.verify(obj) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"FAILED at step {step}"), out
    assert words in out, out


def test_a_promise_that_is_not_the_logs_or_not_kept_fails(world: World, capsys: Any) -> None:
    env, r = world.append(0)
    other_env, other = world.append(1)
    _until_covered(world, other.index)
    good = r.promise.to_json()

    # the envelope is not the one the promised entry holds
    _failed(world, capsys, {"envelope": other_env, "promise": good}, 1, "does not hold")
    # a promise whose fields were edited no longer verifies under the log key
    _failed(world, capsys, {"envelope": env, "promise": {**good, "index": 5}}, 3, "does not verify")
    # signed by a key that is not a log key of the trust root
    stranger = PrivateKey.generate("ed25519")
    p = r.promise
    forged = {
        **good,
        "signature": stranger.sign(
            promise_message(p.origin, p.index, p.leaf_hash, p.integrated_time_us)
        ).hex(),
    }
    _failed(world, capsys, {"envelope": env, "promise": forged}, 3, "does not verify")
    _failed(
        world, capsys, {"envelope": env, "promise": {**good, "key_id": "00" * 4}}, 3, "not a log"
    )
    # signed by the log key, but for a place the entry is not at: the log broke its promise
    broken = {
        **good,
        "index": 9,
        "signature": world.log_key.sign(
            promise_message(p.origin, 9, p.leaf_hash, p.integrated_time_us)
        ).hex(),
    }
    _failed(world, capsys, {"envelope": env, "promise": broken}, 7, "broke its signed promise")
    # a leaf hash the log does not hold
    absent = {**good, "leaf_hash": "ab" * 32}
    _failed(world, capsys, {"envelope": env, "promise": absent}, 1, "has no entry")


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("leaf_hash", "AB" * 32, "promise.leaf_hash"),
        ("leaf_hash", "ab" * 31, "promise.leaf_hash"),
        ("index", -1, "promise.index"),
        ("index", "3", "promise.index"),
        ("integrated_time_us", 1.5, "promise.integrated_time_us"),
        ("origin", "a\nb", "promise.origin"),
        ("key_id", "xyz", "promise.key_id"),
        ("extra", 1, "unknown extra"),
    ],
)
def test_a_malformed_promise_file_names_the_field(
    world: World, capsys: Any, field: str, value: Any, words: str
) -> None:
    env, r = world.append(0)
    bad = {**r.promise.to_json(), field: value}
    _failed(world, capsys, {"envelope": env, "promise": bad}, 1, words)


def test_salt_file_is_read_for_the_input_commitment(world: World, capsys: Any) -> None:
    env, r = world.append(0)
    _until_covered(world, r.index)
    salt = world.tmp / "salt.hex"
    salt.write_text("00" * 16 + "\n")
    promise = {"envelope": env, "promise": r.promise.to_json()}
    # --salt and --salt-file together are refused; --salt-file alone needs --input
    assert world.verify(promise, "--salt", "00", "--salt-file", str(salt)) == 1
    assert "not both" in capsys.readouterr().out
    assert world.verify(promise, "--salt-file", str(world.tmp / "none")) == 1
    assert "cannot read --salt-file" in capsys.readouterr().out
    assert world.verify(promise, "--salt-file", str(salt)) == 1
    assert "give --input and --salt (or --salt-file) together" in capsys.readouterr().out


def test_a_promise_file_with_an_unknown_field_is_refused_at_step_1(
    world: World, capsys: Any
) -> None:
    env, r = world.append(0)
    bad = {"envelope": env, "promise": r.promise.to_json(), "x" * 500: 1}
    assert world.verify(bad) == 1
    out = capsys.readouterr().out
    assert out.startswith("FAILED at step 1") and "unknown field(s) xxxx" in out, out
    assert "x" * 201 not in out  # a hostile field name is not echoed whole
