"""Recall in the inference service, over real gRPC and a real ledger: retrieval per request,
evidence in responses and receipts, the classification rule, the recall_k field's limits,
load refusals of a tampered index, and ``kolm verify`` step 10 on the receipts.

Artifacts: the shared test world's router (no recall); "docs", made from it by
``kolm.cli.recall.update_artifact`` with a small corpus of planted sentences and
Banking77 filler (artifact receipt with corpus_root/corpus_chunks); "examples" and
"rotated", examples indexes of the student's own training rows (rotated: every label
moved to the next one) with confidence threshold 1.0 so every answer meets the rule.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from support.planted import PLANTED
from support.receipts import artifact_statement
from test_infer_engine import (  # the shared world (a session fixture built once)
    JOB,
    LABELS,
    PER_LABEL,
    World,
    flip_byte,
    rezip,
    rows,
    world,  # noqa: F401 - a fixture
)
from test_infer_service import InferThread, kolm

from kolm.cli.main import main as kolm_main
from kolm_infer._pb import infer_pb2 as pb
from kolm_ledger.formats.bundle import Bundle
from kolm_ledger.formats.dsse import Envelope
from kolm_ledger.formats.receipts import Statement, sign_statement
from kolm_ledger.service.client import LedgerClient
from kolm_ledger.verify.recall_proof import chunk_digest, verify_evidence
from kolm_ledger.verify.receipt import step_of, verify_prediction

pytestmark = [pytest.mark.ml, pytest.mark.slow]

MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def rotate(label: str) -> str:
    return LABELS[(LABELS.index(label) + 1) % len(LABELS)]


# --------------------------------------------------------------------------- artifacts


def log_artifact(w: World, path: Path, digest: str, extra: dict[str, Any]) -> int:
    """Append an artifact receipt for ``path`` (with ``extra`` in its predicate)."""
    st = artifact_statement(
        file=path,
        artifact_digest=digest,
        base_model={"id": MODEL, "revision": "test"},
        label_count=PER_LABEL * len(LABELS),
        k_score=w.k_score,
        verifier={"name": "label_set", "version": "1", "params": {"labels": LABELS}},
        checkpoint={"size": 0},
        extra={"job_id": JOB, **extra},
    )
    with LedgerClient(w.ledger.target) as c:
        return int(c.append(sign_statement(st, w.key("compile")), wait=True).index)


def unpack(src: Path, into: Path) -> Path:
    """The top folder of ``src`` unzipped under ``into`` (the signature is re-made by pack)."""
    shutil.rmtree(into, ignore_errors=True)
    with zipfile.ZipFile(src) as z:
        z.extractall(into)
    (top,) = list(into.iterdir())
    return top


def repack(w: World, top: Path, out: Path, extra: dict[str, Any] | None = None) -> str:
    """Sign ``top`` with the compile key into ``out`` and log its artifact receipt."""
    from kolm_compile.artifact import pack

    digest = pack(top, out, w.key("compile"))
    log_artifact(w, out, digest, extra or {})
    return digest


def examples_artifact(w: World, name: str, examples: list[tuple[str, str]], d: Path) -> Path:
    from kolm_compile import recall
    from kolm_compile.student import embed_texts

    top = unpack(w.artifacts["router"], d / name)
    top = top.rename(top.parent / name)
    info = recall.index_from_examples(
        examples, embed_texts, top / recall.INDEX_FILE, embedding_model=MODEL
    )
    m = json.loads((top / "manifest.json").read_text())
    m.update(name=name, confidence_threshold=1.0, recall={**info.to_manifest(), "k": 5})
    (top / "manifest.json").write_text(json.dumps(m, indent=2, sort_keys=True) + "\n")
    out = d / f"{name}.kolm"
    repack(w, top, out, {"corpus_root": info.corpus_root, "corpus_chunks": info.chunks})
    return out


@dataclass
class Recall:
    srv: InferThread
    docs: Path
    docs_digest: str
    corpus_root: str
    chunks: int
    examples: Path


@pytest.fixture(scope="module")
def rec(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Recall]:  # noqa: F811
    from kolm.cli.recall import update_artifact
    from kolm_compile.recall import ChunkConfig
    from kolm_compile.sinks import ServiceSink
    from kolm_ledger.verify.trust import TrustState

    d = tmp_path_factory.mktemp("infer-recall")
    filler = [t for t, _ in rows("train", 10, skip=PER_LABEL)]
    corpus = d / "corpus.jsonl"
    with corpus.open("w") as f:
        for i, t in enumerate(filler):
            f.write(json.dumps({"id": f"bank{i}", "text": t}) + "\n")
        for key, (sentence, _) in PLANTED.items():
            f.write(json.dumps({"id": key, "text": sentence}) + "\n")
    with LedgerClient(world.ledger.target) as c:
        up = update_artifact(
            world.artifacts["router"],
            corpus,
            d / "docs.kolm",
            key=world.key("compile"),
            sink=ServiceSink(c),
            trust=TrustState(world.trust),
            chunking=ChunkConfig(size=40, overlap=10),
        )
    train = rows("train", PER_LABEL)
    ex = examples_artifact(world, "examples", train, d)
    rot = examples_artifact(world, "rotated", [(t, rotate(y)) for t, y in train], d)
    srv = InferThread(
        world,
        world.ledger,
        artifacts=[world.artifacts["router"]],
        artifacts_dir=tmp_path_factory.getbasetemp(),  # LoadArtifact(path=...) reads here
        max_batch=16,
        on_teacher_failure="student",  # no teacher: escalations come back flagged, not refused
    )
    try:
        srv.stub.LoadArtifact(pb.LoadArtifactRequest(path=str(up.path), name="docs"))
        srv.stub.LoadArtifact(pb.LoadArtifactRequest(path=str(ex)))
        srv.stub.LoadArtifact(pb.LoadArtifactRequest(data=rot.read_bytes()))
        yield Recall(srv, up.path, up.digest, up.corpus_root, up.chunks, ex)
    finally:
        srv.close()


def predict(rec: Recall, text: str, artifact: str = "docs", **kw: Any) -> pb.PredictResponse:
    return rec.srv.stub.Predict(pb.PredictRequest(artifact=artifact, input=text, **kw))


def predicate(r: pb.PredictResponse) -> dict[str, Any]:
    return dict(Statement.from_envelope(Envelope.from_bytes(r.envelope)).predicate)


# --------------------------------------------------------------------------- loading


def test_list_artifacts_shows_the_recall_index(rec: Recall) -> None:
    arts = {a.name: a for a in rec.srv.stub.ListArtifacts(pb.ListArtifactsRequest()).artifacts}
    assert set(arts) == {"router", "docs", "examples", "rotated"}
    assert not arts["router"].HasField("recall")
    r = arts["docs"].recall
    assert (r.corpus_root, r.chunks, r.default_k, r.labelled) == (
        rec.corpus_root,
        rec.chunks,
        5,
        False,
    )
    assert r.embedding_model == MODEL
    ex = arts["examples"].recall
    assert ex.labelled and ex.chunks == len(set(rows("train", PER_LABEL))) and ex.default_k == 5


def test_a_tampered_index_is_refused_at_load(
    world: World,  # noqa: F811
    rec: Recall,
    tmp_path: Path,
) -> None:
    def refused(path: Path, name: str) -> str:
        with pytest.raises(grpc.RpcError) as ei:
            rec.srv.stub.LoadArtifact(pb.LoadArtifactRequest(path=str(path), name=name))
        assert ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION, ei.value.details()
        return str(ei.value.details())

    # the index file changed inside the signed artifact: its file digest no longer matches
    bad = rezip(rec.docs, tmp_path / "a.kolm", lambda t: flip_byte(t / "recall/index.db", 200))
    assert "recall/index.db has digest" in refused(bad, "bad-bytes")

    # a chunk's text edited and the artifact re-signed (and logged) by the compile key:
    # the signature holds, the corpus root in the signed manifest does not
    top = unpack(rec.docs, tmp_path / "edit")
    with sqlite3.connect(top / "recall/index.db") as db:
        db.execute("UPDATE chunks SET text = text || ' Not.' WHERE id = 'cheese#0'")
    db.close()
    repack(world, top, tmp_path / "edited.kolm", {"corpus_root": rec.corpus_root})
    why = refused(tmp_path / "edited.kolm", "bad-chunk")
    assert "chunk 'cheese#0' has digest" in why, why

    # an artifact receipt whose corpus root is not the manifest's
    top = unpack(rec.docs, tmp_path / "other")
    m = json.loads((top / "manifest.json").read_text())
    (top / "manifest.json").write_text(json.dumps({**m, "name": "other"}))
    repack(world, top, tmp_path / "other.kolm", {"corpus_root": "ab" * 32})
    why = refused(tmp_path / "other.kolm", "bad-receipt")
    assert "artifact receipt's corpus_root" in why, why

    names = [a.name for a in rec.srv.stub.ListArtifacts(pb.ListArtifactsRequest()).artifacts]
    assert sorted(names) == ["docs", "examples", "rotated", "router"]


# --------------------------------------------------------------------------- retrieval


def test_planted_queries_return_the_known_nearest_chunks(rec: Recall) -> None:
    for key, (sentence, question) in PLANTED.items():
        r = predict(rec, question, recall_k=3, request_id=f"planted-{key}")
        assert r.recall_k == 3 and len(r.evidence) == 3
        top = r.evidence[0]
        assert top.id == f"{key}#0", (key, [e.id for e in r.evidence])
        assert top.text == sentence and top.digest == chunk_digest(top.id, sentence)
        assert [e.score for e in r.evidence] == sorted((e.score for e in r.evidence), reverse=True)
        assert r.corpus_root == rec.corpus_root
        # the receipt cites the same chunks, with proofs into the signed corpus root
        pred = predicate(r)
        assert pred["corpus_root"] == rec.corpus_root
        assert [(e["id"], e["digest"], e["position"]) for e in pred["evidence"]] == [
            (e.id, e.digest, e.position) for e in r.evidence
        ]
        assert all("text" not in e and "score" not in e for e in pred["evidence"])
        verify_evidence(
            pred["evidence"],
            rec.corpus_root,
            rec.chunks,
            texts={e.id: e.text for e in r.evidence},
        )
        assert "recall_vote" not in pred and not r.HasField("recall_vote")  # confident


def test_recall_k_default_zero_and_no_recall(rec: Recall) -> None:
    q = PLANTED["bees"][1]
    r = predict(rec, q)  # unset: the artifact's default (5)
    assert r.recall_k == 5 and len(r.evidence) == 5 and r.evidence[0].id == "bees#0"
    r = predict(rec, q, recall_k=0)  # none
    assert r.recall_k == 0 and not r.evidence and not r.corpus_root
    assert "evidence" not in predicate(r) and "corpus_root" not in predicate(r)
    r = predict(rec, q, recall_k=10)  # the cap itself is fine
    assert len(r.evidence) == 10
    # an artifact without recall behaves as before
    for kw in ({}, {"recall_k": 0}):
        r = predict(rec, q, artifact="router", **kw)
        assert r.output in LABELS and not r.evidence and "evidence" not in predicate(r)


def test_recall_k_over_the_cap_is_invalid_argument(rec: Recall) -> None:
    with pytest.raises(grpc.RpcError) as ei:
        predict(rec, "where is my card?", recall_k=11)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "recall_k is 11, over the cap of 10" in str(ei.value.details())
    with pytest.raises(grpc.RpcError) as ei:
        list(
            rec.srv.stub.PredictStream(
                iter([pb.PredictRequest(artifact="docs", input="x", recall_k=50)])
            )
        )
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_recall_k_on_an_artifact_without_recall_is_failed_precondition(rec: Recall) -> None:
    with pytest.raises(grpc.RpcError) as ei:
        predict(rec, "where is my card?", artifact="router", recall_k=3)
    assert ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "artifact 'router'" in str(ei.value.details())
    assert "no recall index" in str(ei.value.details())


def test_predict_stream_batches_requests_with_different_k(rec: Recall) -> None:
    qs = [q for _, q in PLANTED.values()] * 3
    reqs = [
        pb.PredictRequest(artifact="docs", input=q, request_id=f"s{i}", recall_k=i % 4)
        for i, q in enumerate(qs)
    ]
    before = sum(n * c for n, c in rec.srv.srv.engine.batch_sizes.items())
    out = {r.request_id: r for r in rec.srv.stub.PredictStream(iter(reqs))}
    assert sum(n * c for n, c in rec.srv.srv.engine.batch_sizes.items()) - before == len(qs)
    for i, q in enumerate(qs):
        r = out[f"s{i}"]
        assert len(r.evidence) == i % 4 == r.recall_k
        if i % 4:
            key = next(k for k, (_, qq) in PLANTED.items() if qq == q)
            assert r.evidence[0].id == f"{key}#0"


# --------------------------------------------------------------------------- classification rule


def _expected_vote(r: pb.PredictResponse) -> tuple[str, float, int]:
    labels = [e.label for e in r.evidence if e.label]
    counts = {lb: labels.count(lb) for lb in labels}
    best = max(counts.values())
    winner = next(lb for lb in labels if counts[lb] == best)
    return winner, best / len(labels), len(labels)


def test_the_neighbour_vote_backs_or_escalates_low_confidence_answers(rec: Recall) -> None:
    queries = [t for t, _ in rows("train", 2)]  # the students' own examples, 2 per label
    seen: dict[str, list[str]] = {"examples": [], "rotated": []}
    for art in seen:
        for q in queries:
            r = predict(rec, q, artifact=art, recall_k=5)
            pred = predicate(r)
            assert len(r.evidence) == 5 and all(e.label for e in r.evidence)
            assert [e["label"] for e in pred["evidence"]] == [e.label for e in r.evidence]
            if r.reason == "confident":  # confidence exactly 1.0: the rule does not apply
                assert r.confidence >= 1.0 and not r.HasField("recall_vote")
                continue
            winner, share, n = _expected_vote(r)
            agrees = winner == r.output and share > 0.5
            v = r.recall_vote
            assert (v.label, v.neighbours, v.agrees) == (winner, n, agrees)
            assert v.share == pytest.approx(share, abs=1e-4)
            assert pred["recall_vote"] == {
                "label": winner,
                "share": round(share, 4),
                "neighbours": n,
                "agrees": agrees,
            }
            if agrees:
                assert (r.backend, r.reason, r.verified) == ("student", "recall_backed", True)
            else:  # escalates; with no teacher configured: the student's answer, flagged
                assert (r.backend, r.reason, r.verified) == (
                    "student",
                    "teacher_unavailable",
                    False,
                )
                assert pred["gate"]["routed"] == "low_confidence"
            assert (pred["backend"], pred["reason"]) == (r.backend, r.reason)
            seen[art].append(r.reason)
    assert "recall_backed" in seen["examples"], seen
    assert "teacher_unavailable" in seen["rotated"], seen
    # without retrieval the same low-confidence answer escalates as before
    r = predict(rec, queries[0], artifact="examples", recall_k=0)
    assert r.reason in ("teacher_unavailable", "confident") and not r.HasField("recall_vote")
    from prometheus_client import REGISTRY

    assert REGISTRY.get_sample_value(
        "kolm_infer_predictions_total", {"backend": "student", "reason": "recall_backed"}
    )


# --------------------------------------------------------------------------- kolm verify


def _resign(
    world: World,  # noqa: F811
    r: pb.PredictResponse,
    edit: Any,
) -> Bundle:
    """The receipt with ``edit`` applied to its predicate, signed by the infer key and
    logged: what a dishonest inference service could produce (a forger fails at step 3)."""
    st = json.loads(Envelope.from_bytes(r.envelope).payload)
    edit(st["predicate"])
    env = sign_statement(Statement.from_json(st), world.key("infer"))
    with LedgerClient(world.ledger.target) as c:
        return c.append(env, wait=True).bundle  # type: ignore[return-value]


def test_receipts_verify_with_kolm_verify_and_tampering_fails_at_step_10(
    world: World,  # noqa: F811
    rec: Recall,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    q = PLANTED["chess"][1]
    r = predict(rec, q, recall_k=4, wait_for_inclusion=True)
    assert r.WhichOneof("receipt") == "bundle"
    b = tmp_path / "p.kolm-receipt.json"
    b.write_bytes(r.bundle)
    inp = tmp_path / "input.txt"
    inp.write_text(q)
    trust = world.keys / "trust.json"
    # the real command: root and size from the artifact receipt in the ledger
    out = kolm(
        "verify", b, "--trust", trust, "--ledger", world.ledger.target,
        "--input", inp, "--salt", r.salt.hex(),
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    ids = ", ".join(e.id for e in r.evidence)
    assert (
        f"(10)  4 evidence chunk(s) are in the signed corpus {rec.corpus_root[:16]}… "
        f"(from the artifact receipt): {ids}"
    ) in out.stdout, out.stdout
    assert "OK: prediction receipt" in out.stdout

    def verify(path: Path, *extra: str) -> tuple[int, str]:
        code = kolm_main(["verify", str(path), "--trust", str(trust), *extra])
        return code, capsys.readouterr().out

    # offline, from the artifact file alone (digests recomputed from the chunk texts)
    code, text = verify(b, "--artifact", str(rec.docs))
    assert code == 0 and "(from the artifact file)" in text, text
    # and in Python
    v = verify_prediction(Bundle.from_bytes(r.bundle), world.trust, artifact_file=rec.docs)
    assert v.evidence_checked and [e["id"] for e in v.evidence] == [e.id for e in r.evidence]

    ledger = ("--ledger", world.ledger.target)
    both = (*ledger, "--artifact", str(rec.docs))
    second = r.evidence[1].id
    cases: list[tuple[str, Any, tuple[str, ...], str]] = [
        ("digest", lambda e: e.update(digest="0" * 64), ledger, "not in the corpus"),
        ("position", lambda e: e.update(position=(e["position"] + 1) % rec.chunks), ledger, ""),
        ("proof", lambda e: e.update(proof=e["proof"][::-1]), ledger, "not in the corpus"),
        ("id", lambda e: e.update(id="volcano#0"), both, "id 'volcano#0' is not the artifact"),
    ]
    for field, change, args, why in cases:

        def edit(p: dict[str, Any], change: Any = change) -> None:
            change(p["evidence"][1])

        bad = tmp_path / f"bad-{field}.json"
        bad.write_bytes(_resign(world, r, edit).to_bytes())
        code, text = verify(bad, *args)
        assert code == 1 and text.startswith("FAILED at step 10"), (field, text)
        named = "'volcano#0'" if field == "id" else repr(second)
        assert f"evidence chunk {named}" in text and why in text, (field, text)
    # a receipt whose corpus_root is not the artifact's
    bad = tmp_path / "bad-root.json"
    bad.write_bytes(_resign(world, r, lambda p: p.update(corpus_root="ab" * 32)).to_bytes())
    code, text = verify(bad, *ledger)
    assert code == 1 and "is not the artifact's signed corpus root" in text, text
    with pytest.raises(Exception) as ei:
        verify_prediction(Bundle.from_bytes(bad.read_bytes()), world.trust, artifact_file=rec.docs)
    assert step_of(ei.value) == 10


def test_the_receipt_size_stays_under_the_ledger_cap(rec: Recall) -> None:
    from kolm_ledger.formats.dsse import MAX_ENVELOPE_BYTES

    r = predict(rec, PLANTED["volcano"][1], recall_k=10)
    size = len(Envelope.from_bytes(r.envelope).canonical())
    per_chunk = (len(r.envelope) - len(predict(rec, "x", recall_k=0).envelope)) / 10
    assert size < MAX_ENVELOPE_BYTES
    # what docs/RECALL.md promises: ~(70 + 67·ceil(log2 n)) · 4/3 (base64) bytes per chunk
    assert per_chunk < 1.5 * (70 + 67 * max(1, (rec.chunks - 1).bit_length())) * 4 / 3
