"""verify_prediction: prediction bundles from a real ledger (SQLite), every tampering fails
at the right numbered step (1-10). No torch: the receipts are signed directly with
kolm_infer.receipts.sign_prediction; the recall artifact of step 10 is a real signed .kolm
whose index is built from random vectors.
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
from support.receipts import artifact_statement

from kolm_infer.receipts import sign_prediction
from kolm_ledger.errors import InvalidInput, KolmError
from kolm_ledger.formats.bundle import Bundle
from kolm_ledger.formats.canonical import canonical_json, digest_hex
from kolm_ledger.formats.dsse import Envelope
from kolm_ledger.formats.receipts import (
    Statement,
    prediction_statement,
    sign_statement,
)
from kolm_ledger.formats.tlogproof import TlogProof
from kolm_ledger.keys import PrivateKey, TrustRoot, init_keys
from kolm_ledger.log.ledger import Ledger
from kolm_ledger.storage import Store
from kolm_ledger.verify.receipt import (
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
            base_model={"id": "m", "revision": "r"},
            label_count=64,
            k_score=k,
            verifier={"name": "label_set", "version": "1", "params": {"labels": ["a"]}},
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
    assert STEPS[7:] == ("check artifact receipt", "check input commitment", "check evidence")


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
    env = dataclasses.replace(b.envelope, payload=canonical_json(st))
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
        [sys.executable, "-m", "kolm", *map(str, args)],
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


# --------------------------------------------------------------------------- (10) evidence

CHUNKS = 37  # not a power of two: proofs of different lengths


@dataclasses.dataclass
class Rec:
    env: Env
    path: Path  # the signed .kolm with recall/index.db
    digest: str
    root: str
    chunks: list[Any]
    artifact: Bundle  # artifact receipt with corpus_root / corpus_chunks
    bare_artifact: Bundle  # artifact receipt for the same digest without them
    tree: Any

    def evidence(self, positions: list[int], proofs: bool = True) -> list[dict[str, Any]]:
        out = []
        for i in positions:
            c = self.chunks[i]
            item: dict[str, Any] = {"id": c.id, "digest": c.digest, "position": i}
            if proofs:
                item["proof"] = [h.hex() for h in self.tree.proof(i)]
            out.append(item)
        return out

    def predict(self, evidence: list[dict[str, Any]], root: str | None = None) -> Bundle:
        envelope, _, _ = sign_prediction(
            self.env.key("infer"),
            artifact_digest=self.digest,
            input_value=TEXT,
            output="card_arrival",
            verdict={"ok": True},
            backend="student",
            reason="confident",
            confidence=0.9,
            latency_ms=1.0,
            request_id="rec",
            evidence=evidence,
            corpus_root=root or self.root,
        )
        return self.env.log(envelope)


@pytest.fixture(scope="module")
def rec(env: Env, tmp_path_factory: pytest.TempPathFactory) -> Rec:
    import numpy as np

    from kolm_compile import recall
    from kolm_compile.artifact import pack
    from kolm_ledger.verify.recall_proof import CorpusTree

    d = tmp_path_factory.mktemp("rec") / "docs"
    docs = [recall.Document(f"doc{i}", f"text of document {i} " * 3) for i in range(CHUNKS)]
    chunks = recall.chunk_documents(docs, recall.ChunkConfig(size=50, overlap=0))
    vecs = np.random.default_rng(0).standard_normal((len(chunks), 8)).astype(np.float32)
    info = recall.build_index(chunks, vecs, d / "recall" / "index.db", embedding_model="m")
    (d / "manifest.json").write_text(
        json.dumps({"format": "kolm/v1", "name": "docs", "recall": info.to_manifest()})
    )
    path = d.parent / "docs.kolm"
    digest = pack(d, path, env.key("compile"))
    ck = env.key("compile")

    def artifact(extra: dict[str, Any]) -> Bundle:
        st = json.loads(_artifact(digest, ck, 80.0).payload)
        st["predicate"].update(extra)
        return env.log(sign_statement(Statement.from_json(st), ck))

    bare = artifact({})
    full = artifact({"corpus_root": info.corpus_root, "corpus_chunks": info.chunks})
    tree = CorpusTree([c.digest for c in chunks])
    return Rec(env, path, digest, info.corpus_root, chunks, full, bare, tree)


def test_evidence_verifies_against_the_artifact_receipt_and_file(rec: Rec) -> None:
    b = rec.predict(rec.evidence([0, 5, 36]))
    v = verify_prediction(b, rec.env.trust, artifact_bundle=rec.artifact)
    assert v.evidence_checked and v.corpus_source == "artifact receipt"
    assert [e["id"] for e in v.evidence] == ["doc0#0", "doc5#0", "doc36#0"]
    assert v.corpus_root == rec.root
    v = verify_prediction(b, rec.env.trust, artifact_file=rec.path)
    assert v.evidence_checked and v.corpus_source == "artifact file"
    v = verify_prediction(b, rec.env.trust, artifact_bundle=rec.artifact, artifact_file=rec.path)
    assert v.corpus_source == "artifact receipt and artifact file"
    # no trusted corpus: the step does not run (the receipt's own root proves nothing)
    v = verify_prediction(b, rec.env.trust)
    assert not v.evidence_checked and v.corpus_source is None and len(v.evidence) == 3
    v = verify_prediction(b, rec.env.trust, artifact_bundle=rec.bare_artifact)
    assert not v.evidence_checked and v.k_score == 80.0
    # a receipt without evidence: the file still gets the artifact check, and must be the
    # artifact the prediction names
    e = fails_at(
        10, lambda: verify_prediction(rec.env.prediction, rec.env.trust, artifact_file=rec.path)
    )
    assert f"docs.kolm is artifact {rec.digest[:16]}" in str(e)


def test_receipts_without_proofs_need_the_artifact_file(rec: Rec) -> None:
    b = rec.predict(rec.evidence([3, 4], proofs=False))
    e = fails_at(10, lambda: verify_prediction(b, rec.env.trust, artifact_bundle=rec.artifact))
    assert "'doc3#0'" in str(e) and "no inclusion proof" in str(e)
    v = verify_prediction(b, rec.env.trust, artifact_bundle=rec.artifact, artifact_file=rec.path)
    assert v.evidence_checked


@pytest.mark.parametrize(
    ("field", "value", "with_file", "why"),
    [
        ("digest", "ab" * 32, False, "not in the corpus"),
        ("digest", "ab" * 32, True, "digest 'abab"),
        ("position", 6, False, "not in the corpus"),
        ("position", 6, True, "not the artifact's chunk at position 6"),
        ("position", CHUNKS, False, "out of range"),
        ("id", "doc9#0", True, "id 'doc9#0' is not the artifact's chunk"),
        ("id", "nowhere#0", True, "id 'nowhere#0' is not the artifact's chunk"),
        ("label", "x", True, "label 'x' is not the artifact's chunk"),
        ("proof", [], False, "not in the corpus"),
    ],
)
def test_tampered_evidence_fails_at_step_10_naming_the_chunk(
    rec: Rec, field: str, value: Any, with_file: bool, why: str
) -> None:
    ev = rec.evidence([2, 7, 8])
    ev[1][field] = value
    b = rec.predict(ev)  # signed by the infer key: a dishonest service, not a forger
    kw: dict[str, Any] = {"artifact_file": rec.path} if with_file else {}
    e = fails_at(
        10, lambda: verify_prediction(b, rec.env.trust, artifact_bundle=rec.artifact, **kw)
    )
    name = "'doc7#0'" if field != "id" else repr(value)
    assert f"evidence chunk {name}" in str(e), str(e)
    assert why in str(e), str(e)


def test_an_id_change_needs_the_file_to_be_seen(rec: Rec) -> None:
    """The chunk digest commits to the id through the text: without the text (the artifact
    file) a renamed chunk still proves into the corpus. Documented in docs/RECALL.md."""
    ev = rec.evidence([2])
    ev[0]["id"] = "renamed"
    b = rec.predict(ev)
    assert verify_prediction(b, rec.env.trust, artifact_bundle=rec.artifact).evidence_checked
    fails_at(10, lambda: verify_prediction(b, rec.env.trust, artifact_file=rec.path))


def test_the_corpus_root_must_come_from_the_artifact(rec: Rec, tmp_path: Path) -> None:
    from kolm_ledger.verify.recall_proof import CorpusTree

    # a receipt naming another corpus (with proofs valid in that corpus) fails
    fake = [rec.chunks[0].digest, "11" * 32, "22" * 32]
    tree = CorpusTree(fake)
    ev = [
        {
            "id": "doc0#0",
            "digest": fake[0],
            "position": 0,
            "proof": [h.hex() for h in tree.proof(0)],
        }
    ]
    b = rec.predict(ev, root=tree.root_hex)
    verify_prediction(b, rec.env.trust)  # nothing trusted to compare with: not checked
    e = fails_at(10, lambda: verify_prediction(b, rec.env.trust, artifact_bundle=rec.artifact))
    assert "is not the artifact's signed corpus root" in str(e)
    # an artifact receipt and an artifact file that disagree
    ck = rec.env.key("compile")
    st = json.loads(_artifact(rec.digest, ck, 80.0).payload)
    st["predicate"].update(corpus_root=tree.root_hex, corpus_chunks=3)
    other = rec.env.log(sign_statement(Statement.from_json(st), ck))
    good = rec.predict(rec.evidence([1]))
    e = fails_at(
        10,
        lambda: verify_prediction(
            good, rec.env.trust, artifact_bundle=other, artifact_file=rec.path
        ),
    )
    assert "is not the artifact file's" in str(e)
    # the artifact file is checked: signature, digest, index bytes
    e = fails_at(
        10, lambda: verify_prediction(env_pred(rec), rec.env.trust, artifact_file=rec.path)
    )
    assert "the prediction names" in str(e)
    no_compile = TrustRoot(tuple(k for k in rec.env.trust.keys if k.role != "compile"))
    e = fails_at(10, lambda: verify_prediction(good, no_compile, artifact_file=rec.path))
    assert "not signed by a trusted, valid compile key" in str(e)
    tampered = _rezip(rec.path, tmp_path / "t.kolm", "recall/index.db")
    e = fails_at(10, lambda: verify_prediction(good, rec.env.trust, artifact_file=tampered))
    assert "recall/index.db has digest" in str(e)


def env_pred(rec: Rec) -> Bundle:
    """A prediction with evidence that names another artifact (OTHER)."""
    envelope, _, _ = sign_prediction(
        rec.env.key("infer"),
        artifact_digest=OTHER,
        input_value=TEXT,
        output="x",
        verdict={"ok": True},
        backend="student",
        reason="confident",
        confidence=0.9,
        latency_ms=1.0,
        request_id="other",
        evidence=rec.evidence([0]),
        corpus_root=rec.root,
    )
    return rec.env.log(envelope)


def _rezip(src: Path, out: Path, member: str) -> Path:
    import zipfile

    with zipfile.ZipFile(src) as z, zipfile.ZipFile(out, "w") as w:
        for i in z.infolist():
            data = z.read(i)
            if i.filename.endswith("/" + member):
                data = data[:-1] + bytes([data[-1] ^ 1])
            w.writestr(i, data)
    return out


def test_kolm_verify_prints_step_10(rec: Rec, tmp_path: Path) -> None:
    from kolm.cli.main import main

    good = tmp_path / "good.json"
    rec.predict(rec.evidence([4, 9])).save(good)
    trust = rec.env.keys / "trust.json"
    out = kolm("verify", good, "--trust", trust, "--artifact", rec.path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "(10)  2 evidence chunk(s) are in the signed corpus" in out.stdout
    assert "(from the artifact file): doc4#0, doc9#0" in out.stdout
    # offline without the file: one line saying the evidence was not checked
    out = kolm("verify", good, "--trust", trust)
    assert out.returncode == 0 and out.stdout.count("\n") == 1, out.stdout
    assert "2 evidence chunk(s) not checked" in out.stdout
    ev = rec.evidence([4, 9])
    ev[1]["digest"] = "cd" * 32
    bad = tmp_path / "bad.json"
    rec.predict(ev).save(bad)
    assert main(["verify", str(bad), "--trust", str(trust), "--artifact", str(rec.path)]) == 1
