"""``model.sig`` parsing (kolm_ledger.formats.model_signing): bad input is an ArtifactError naming it."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from support.mutations import mutations

from kolm_ledger._crypto import PrivateKey
from kolm_ledger.errors import ArtifactError, SignatureError
from kolm_ledger.formats.dsse import IN_TOTO_PAYLOAD_TYPE, pae
from kolm_ledger.formats.model_signing import (
    MODEL_SIGNING_PREDICATE,
    artifact_digest,
    parse_model_signature,
)
from kolm_ledger.keys import TrustedKey

KEY = PrivateKey.generate()
RESOURCES = [("manifest.json", "ab" * 32), ("adapter/w.bin", "cd" * 32)]


def model_sig(statement: object, key: PrivateKey = KEY) -> bytes:
    payload = json.dumps(statement).encode()
    sig = key.sign(pae(IN_TOTO_PAYLOAD_TYPE, payload))
    env = {
        "payload": base64.b64encode(payload).decode(),
        "payloadType": IN_TOTO_PAYLOAD_TYPE,
        "signatures": [{"sig": base64.b64encode(sig).decode()}],
    }
    return json.dumps({"dsseEnvelope": env}).encode()


def statement() -> dict[str, object]:
    return {
        "subject": [{"name": "a", "digest": {"sha256": artifact_digest(RESOURCES)}}],
        "predicateType": MODEL_SIGNING_PREDICATE,
        "predicate": {
            "resources": [{"name": n, "algorithm": "sha256", "digest": d} for n, d in RESOURCES]
        },
    }


def _trusted(key: PrivateKey) -> TrustedKey:
    pub = key.public_key()
    return TrustedKey(
        pub.keyid(), "compile", "ecdsa-p256-sha256", pub, datetime(2020, 1, 1, tzinfo=UTC)
    )


def test_a_valid_signature_parses_and_verifies_only_by_its_key() -> None:
    ms = parse_model_signature(model_sig(statement()), "a.kolm")
    assert ms.resources == tuple(RESOURCES) and ms.claimed == artifact_digest(RESOURCES)
    ms.verify_by(_trusted(KEY))
    with pytest.raises(SignatureError):
        ms.verify_by(_trusted(PrivateKey.generate()))


@pytest.mark.parametrize(
    "st, why",
    [
        ([1, 2], "malformed model.sig"),  # a statement that is not an object
        ({**statement(), "predicateType": "x"}, "predicateType 'x'"),
        ({**statement(), "predicate": {"resources": [1]}}, "malformed model.sig"),
        ({**statement(), "subject": []}, "malformed model.sig"),
    ],
)
def test_a_wrong_statement_is_named(st: object, why: str) -> None:
    with pytest.raises(ArtifactError, match=why) as e:
        parse_model_signature(model_sig(st), "a.kolm")
    assert str(e.value).startswith("a.kolm: malformed model.sig")


@settings(max_examples=300, deadline=None)
@given(mutations(model_sig(statement())))
def test_mutated_bytes_raise_only_artifact_errors(data: bytes) -> None:
    try:
        parse_model_signature(data, "a.kolm")
    except ArtifactError as e:
        assert str(e).startswith("a.kolm: malformed model.sig")
