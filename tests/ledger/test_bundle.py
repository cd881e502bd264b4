"""Offline receipt bundles: JSON round trips, files, and strict parsing."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from support.receipts import artifact_statement

from kolm_ledger._crypto import PrivateKey
from kolm_ledger.errors import BundleFormatError
from kolm_ledger.formats import merkle, receipts
from kolm_ledger.formats.bundle import FILE_EXTENSION, MAX_BUNDLE_BYTES, Bundle
from kolm_ledger.formats.checkpoint import Checkpoint, sign_checkpoint
from kolm_ledger.formats.dsse import Envelope
from kolm_ledger.formats.leaf import MAX_INTEGRATED_TIME_US, entry_leaf_hash
from kolm_ledger.formats.note import NoteSigner
from kolm_ledger.formats.tlogproof import TlogProof

ORIGIN = "example.com/kolm"
LOG_KEY = PrivateKey.generate("ed25519")
COMPILE_KEY = PrivateKey.generate()
T0 = datetime(2026, 1, 1, 12, tzinfo=UTC)
T0_US = 1_767_268_800_000_000  # T0 in µs since the epoch


def artifact_envelope(key: PrivateKey = COMPILE_KEY) -> Envelope:
    return receipts.sign_statement(artifact_statement(time=T0), key)


def make_bundle(env: Envelope, index: int = 3, size: int = 10, at: int = T0_US) -> Bundle:
    tree = merkle.MemoryTree()
    for i in range(size):
        tree.append(entry_leaf_hash(env, at) if i == index else merkle.hash_leaf(b"%d" % i))
    cp = Checkpoint(ORIGIN, size, tree.root(), bytes(32))
    note = sign_checkpoint(cp, [NoteSigner(ORIGIN, LOG_KEY)]).to_bytes()
    return Bundle(env, TlogProof(index, tuple(tree.inclusion_proof(index, size)), note), at)


BUNDLE = make_bundle(artifact_envelope())
GOOD = BUNDLE.to_json()


def names_something(e: BaseException) -> None:
    msg = str(e)
    assert len(msg) >= 8 and re.search(r"[a-z]{3}", msg), repr(msg)


def test_round_trip() -> None:
    assert Bundle.from_json(BUNDLE.to_json()) == BUNDLE
    assert Bundle.from_bytes(BUNDLE.to_bytes()) == BUNDLE


def test_bytes_are_pretty_sorted_and_end_in_newline() -> None:
    data = BUNDLE.to_bytes()
    assert data.endswith(b"}\n")
    assert data == (json.dumps(json.loads(data), indent=2, sort_keys=True) + "\n").encode()
    obj = json.loads(data)
    assert list(obj) == ["envelope", "integrated_time", "tlog_proof"]
    assert obj["envelope"] == BUNDLE.envelope.to_json()
    assert obj["integrated_time"] == T0_US and type(obj["integrated_time"]) is int
    assert obj["tlog_proof"].startswith("c2sp.org/tlog-proof@v1\nindex 3\n")
    assert BUNDLE.to_bytes() == data  # deterministic


def test_save_and_load(tmp_path: Path) -> None:
    path = tmp_path / f"receipt{FILE_EXTENSION}"
    BUNDLE.save(path)
    assert Bundle.load(path) == BUNDLE
    assert path.read_bytes() == BUNDLE.to_bytes()


def test_load_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(BundleFormatError, match=r"cannot read bundle .*missing"):
        Bundle.load(tmp_path / "missing.kolm-receipt.json")
    bad = tmp_path / "bad.kolm-receipt.json"
    bad.write_text("[]")
    with pytest.raises(
        BundleFormatError, match=re.escape("bad.kolm-receipt.json: bundle: want a JSON object")
    ):
        Bundle.load(bad)


def _with(**changes: Any) -> dict[str, Any]:
    obj: dict[str, Any] = json.loads(json.dumps(GOOD))
    for k, v in changes.items():
        if v is ...:
            del obj[k]
        else:
            obj[k] = v
    return obj


@pytest.mark.parametrize(
    ("obj", "match"),
    [
        ([], "want a JSON object, got list"),
        (_with(envelope=...), "missing field.*envelope"),
        (_with(tlog_proof=...), "missing field.*tlog_proof"),
        (_with(integrated_time=...), "missing field.*integrated_time"),
        (_with(integrated_time="1767268800000000"), "bundle.integrated_time: .*want an integer"),
        (_with(integrated_time=1.7e15), "bundle.integrated_time: .*want an integer"),
        (_with(integrated_time=True), "bundle.integrated_time: .*want an integer"),
        (_with(integrated_time=-1), "bundle.integrated_time: .*want an integer"),
        (
            _with(integrated_time=MAX_INTEGRATED_TIME_US + 1),
            "bundle.integrated_time: .*want an integer",
        ),
        (_with(extra=1), "unknown field.*extra"),
        (_with(envelope=[]), "bundle.envelope: envelope: want a JSON object"),
        (_with(envelope={**GOOD["envelope"], "payload": "!"}), "bundle.envelope.*payload"),
        (_with(envelope={**GOOD["envelope"], "signatures": []}), "bundle.envelope.*signatures"),
        (
            _with(envelope={**GOOD["envelope"], "payloadType": "a\ud800"}),
            "bundle.envelope.*payloadType",
        ),
        (_with(tlog_proof=5), "bundle.tlog_proof: want a tlog-proof string, got int"),
        (_with(tlog_proof=""), "bundle.tlog_proof: tlog-proof has no blank line"),
        (
            _with(tlog_proof=GOOD["tlog_proof"].replace("index 3", "index 03")),
            "bundle.tlog_proof.*leading zeros",
        ),
        (
            _with(tlog_proof=GOOD["tlog_proof"].replace("—", "-")),
            "bundle.tlog_proof: tlog-proof checkpoint",
        ),
    ],
)
def test_malformed_objects(obj: object, match: str) -> None:
    with pytest.raises(BundleFormatError, match=match) as e:
        Bundle.from_json(obj)
    names_something(e.value)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "not JSON"),
        (b"\xff\xfe\x00", "not JSON"),
        (b"{", "not JSON"),
        (b"[" * 100_000, "nested too deeply"),
        (b'{"envelope": {}, "envelope": {}, "tlog_proof": ""}', "duplicate JSON key 'envelope'"),
        (b" " * (MAX_BUNDLE_BYTES + 1), "over the"),
        (b"null", "want a JSON object, got NoneType"),
    ],
)
def test_malformed_bytes(data: bytes, match: str) -> None:
    with pytest.raises(BundleFormatError, match=match) as e:
        Bundle.from_bytes(data)
    names_something(e.value)


def test_duplicate_keys_inside_the_envelope_are_refused() -> None:
    text = BUNDLE.to_bytes().decode()
    dup = text.replace('"payloadType":', '"payloadType": "x",\n    "payloadType":', 1)
    assert dup != text
    with pytest.raises(BundleFormatError, match="duplicate JSON key 'payloadType'"):
        Bundle.from_bytes(dup.encode())
