"""verify_prediction: prediction bundles from a real ledger (SQLite), every tampering fails
at the right numbered step (1-9). No torch: the receipts are signed directly with
kolm_infer.receipts.sign_prediction.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from kolm_infer.receipts import sign_prediction
from kolm_ledger.bundle import Bundle
from kolm_ledger.canonical import digest_hex
from kolm_ledger.dsse import Envelope
from kolm_ledger.errors import InvalidInput, KolmError
from kolm_ledger.keys import PrivateKey, TrustRoot, init_keys
from kolm_ledger.ledger import Ledger
from kolm_ledger.receipts import artifact_statement, prediction_statement, sign_statement
from kolm_ledger.storage import Store
from kolm_ledger.tlogproof import TlogProof
from kolm_ledger.verify import (
    SALT_BYTES,
    STEPS,
    VerifiedPrediction,
    input_commitment,
    step_of,
    verify_bundle,
    verify_prediction,
)

DIGEST = "ab" * 32
OTHER = "cd" * 32
TEXT = "I am still waiting on my card?"


@dataclasses.dataclass
class Env:
    keys: Path
    trust: TrustRoot
    ledger: Ledger
    prediction: Bundle
    artifact: Bundle
    other_artifact: Bundle
    salt: bytes

    def key(self, role: str) -> PrivateKey:
        return PrivateKey.load(self.keys / f"{role}.key")

    def log(self, env: Envelope) -> Bundle:
        (a,) = self.ledger.append([env])
        return self.ledger.bundle(a.index)


def _artifact(digest: str, key: PrivateKey, k: float) -> Envelope:
    return sign_statement(
        artifact_statement(
            artifact_digest=digest,
            file_name="router.kolm",
            file_digest="ef" * 32,
            base_model={"id": "m", "revision": "r"},
            training_set_root="01" * 32,
            label_count=64,
            eval_receipt="02" * 32,
            k_score=k,
            verifier={"name": "label_set", "version": "1", "params": {"labels": ["a"]}},
            compile_config_digest="03" * 32,
            kolm_version="0.1.0",
            checkpoint={"size": 0},
            extra={"job_id": "j"},
        ),
        key,
    )


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    d = tmp_path_factory.mktemp("vp")
    trust = init_keys(d / "keys", now=datetime.now(UTC) - timedelta(days=1))
    ledger = Ledger(
        Store(f"sqlite:///{d / 'l.db'}"), trust, PrivateKey.load(d / "keys" / "log.key")
    )
    e = Env(d / "keys", trust, ledger, None, None, None, b"")  # type: ignore[arg-type]
    e.artifact = e.log(_artifact(DIGEST, e.key("compile"), 87.5))
    e.other_artifact = e.log(_artifact(OTHER, e.key("compile"), 50.0))
    envelope, salt, _ = sign_prediction(
        e.key("infer"),
        artifact_digest=DIGEST,
        input_value=TEXT,
        output="card_arrival",
        verdict={"name": "label_set", "version": "1", "ok": True, "reason": "ok"},
        backend="student",
        reason="confident",
        confidence=0.93,
        latency_ms=4.2,
        request_id="r1",
    )
    e.salt = salt
    e.prediction = e.log(envelope)
    return e


def check(env: Env, **kw: Any) -> VerifiedPrediction:
    args: dict[str, Any] = {
        "bundle": env.prediction,
        "trust": env.trust,
        "artifact_bundle": env.artifact,
        "input_value": TEXT,
        "salt": env.salt,
    }
    args.update(kw)
    return verify_prediction(args.pop("bundle"), args.pop("trust"), **args)


def fails_at(step: int, fn: Callable[[], Any]) -> KolmError:
    with pytest.raises(KolmError) as ei:
        fn()
    assert step_of(ei.value) == step, str(ei.value)
    assert str(ei.value).startswith(f"step {step} ({STEPS[step - 1]}): "), str(ei.value)
    return ei.value


def test_steps_extend_the_bundle_steps() -> None:
    assert STEPS[:7] == (
        "parse bundle",
        "parse statement",
        "check signature",
        "check key policy",
        "compute leaf hash",
        "check checkpoint",
        "check inclusion",
    )
    assert STEPS[7:] == ("check artifact receipt", "check input commitment")


def test_input_commitment_is_sha256_of_salt_and_jcs() -> None:
    import hashlib

    salt = bytes(range(32))
    want = hashlib.sha256(salt + b'"caf\xc3\xa9"').hexdigest()
    assert input_commitment("café", salt) == want
    with pytest.raises(InvalidInput, match="want 32"):
        input_commitment("x", b"short")


def test_a_prediction_verifies_through_step_9(env: Env) -> None:
    v = check(env)
    assert v.k_score == 87.5 and v.input_checked and v.artifact is not None
    assert (v.artifact_digest, v.output, v.backend, v.reason) == (
        DIGEST,
        "card_arrival",
        "student",
        "confident",
    )
    assert v.receipt.role == "infer"
    # steps 8 and 9 are optional
    v = verify_prediction(env.prediction, env.trust)
    assert v.artifact is None and v.k_score is None and not v.input_checked


def _with_payload(b: Bundle, edit: Callable[[dict[str, Any]], None]) -> Bundle:
    st = json.loads(b.envelope.payload)
    edit(st)
    env = dataclasses.replace(b.envelope, payload=json.dumps(st).encode())
    return dataclasses.replace(b, envelope=env)


@pytest.mark.parametrize(
    "field", ["output", "artifact_digest", "input_commitment", "backend", "reason", "confidence"]
)
def test_any_changed_field_fails_the_signature(env: Env, field: str) -> None:
    def edit(st: dict[str, Any]) -> None:
        p = st["predicate"]
        p[field] = {"backend": "teacher", "confidence": 0.1}.get(field, OTHER)

    fails_at(3, lambda: check(env, bundle=_with_payload(env.prediction, edit)))


def test_tampering_fails_at_the_right_step(env: Env) -> None:
    b = env.prediction
    # (2) not a prediction receipt
    fails_at(2, lambda: check(env, bundle=env.artifact))
    # (3) the infer key is not in the trust root
    no_infer = TrustRoot(tuple(k for k in env.trust.keys if k.role != "infer"))
    fails_at(3, lambda: check(env, trust=no_infer))
    # (4) the infer key had expired at the receipt's time
    ik = env.trust.get(env.key("infer").keyid())
    expired = env.trust.with_key(dataclasses.replace(ik, not_after=ik.not_before))
    fails_at(4, lambda: check(env, trust=expired))
    # (6) the log key is not trusted
    no_log = TrustRoot(tuple(k for k in env.trust.keys if k.role != "log"))
    fails_at(6, lambda: check(env, trust=no_log))
    # (7) a proof for another index
    p = b.tlog_proof
    moved = dataclasses.replace(b, tlog_proof=TlogProof(p.index - 1, p.hashes, p.checkpoint))
    fails_at(7, lambda: check(env, bundle=moved))
    # (8) the artifact bundle names another artifact, is not an artifact receipt, or is forged
    e = fails_at(8, lambda: check(env, artifact_bundle=env.other_artifact))
    assert "prediction names artifact" in str(e)
    fails_at(8, lambda: check(env, artifact_bundle=b))
    forged = _with_payload(env.artifact, lambda st: st["predicate"].update(k_score=100.0))
    fails_at(8, lambda: check(env, artifact_bundle=forged))
    # (9) another input, another salt, or only half of the pair
    fails_at(9, lambda: check(env, input_value=TEXT + "!"))
    fails_at(9, lambda: check(env, salt=bytes(SALT_BYTES)))
    fails_at(9, lambda: check(env, salt=None))
    fails_at(9, lambda: check(env, salt=b"\x00"))


def test_an_output_that_does_not_match_the_subject_fails_step_2(env: Env) -> None:
    st = prediction_statement(
        output_digest=digest_hex("card_arrival"),
        artifact_digest=DIGEST,
        input_commitment="00" * 32,
        output="exchange_rate",
        verifier_verdict={"ok": True},
        backend="student",
        confidence=0.9,
        latency_ms=1.0,
        request_id="r2",
    )
    bad = env.log(sign_statement(st, env.key("infer")))
    verify_bundle(bad, env.trust)  # steps 1-7 pass
    e = fails_at(2, lambda: verify_prediction(bad, env.trust))
    assert "does not match the subject digest" in str(e)


def test_digest_only_policy(env: Env) -> None:
    envelope, salt, _ = sign_prediction(
        env.key("infer"),
        artifact_digest=DIGEST,
        input_value=TEXT,
        output="card_arrival",
        verdict={"ok": True},
        backend="teacher",
        reason="low_confidence",
        confidence=0.2,
        latency_ms=1.0,
        request_id="r3",
        output_policy="digest",
    )
    b = env.log(envelope)
    v = verify_prediction(b, env.trust, artifact_bundle=env.artifact, input_value=TEXT, salt=salt)
    assert v.output is None and v.backend == "teacher" and v.reason == "low_confidence"
    assert v.receipt.statement.subjects[0].sha256 == digest_hex("card_arrival")


def kolm(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kolm_ledger.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_kolm_verify_offline(env: Env, tmp_path: Path) -> None:
    b = tmp_path / "p.kolm-receipt.json"
    env.prediction.save(b)
    (tmp_path / "in.txt").write_text(TEXT)
    trust = env.keys / "trust.json"
    out = kolm(
        "verify", b, "--trust", trust, "--input", tmp_path / "in.txt", "--salt", env.salt.hex()
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "(9)   the input matches the commitment" in out.stdout
    last = out.stdout.rstrip().splitlines()[-1]
    assert last.startswith("OK: prediction receipt at index 2 signed by infer key"), last
    assert 'output "card_arrival", backend student (confident)' in last
    b.write_text("{not json")
    out = kolm("verify", b, "--trust", trust)
    assert out.returncode == 1 and out.stdout.startswith("FAILED at step 1"), out.stdout
    obj = json.loads(env.prediction.to_bytes())
    sig = bytearray(base64.b64decode(obj["envelope"]["signatures"][0]["sig"]))
    sig[8] ^= 1
    obj["envelope"]["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()
    b.write_text(json.dumps(obj))
    out = kolm("verify", b, "--trust", trust)
    assert out.returncode == 1 and out.stdout.startswith("FAILED at step 3"), out.stdout
