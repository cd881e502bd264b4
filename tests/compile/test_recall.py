"""Recall: chunking, the sqlite-vec index, corpus proofs, evidence, and ``kolm recall update``."""

from __future__ import annotations

import argparse
import hashlib
import json
import sqlite3
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support.data import banking77
from support.planted import PLANTED

from kolm_compile import recall
from kolm_compile.recall import Chunk, ChunkConfig, Document, Hit
from kolm_ledger.errors import ArtifactError, InclusionProofError, InvalidInput, NotFoundError
from kolm_ledger.verify.recall_proof import CorpusTree, chunk_digest, corpus_root, verify_evidence

DIM = 24


def unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def small_corpus(n_docs: int = 40) -> list[Chunk]:
    docs = [
        Document(f"doc{i}", " ".join(f"w{i}_{j}" for j in range(7 + i % 9))) for i in range(n_docs)
    ]
    return recall.chunk_documents(docs, ChunkConfig(size=5, overlap=2))


@pytest.fixture
def built(tmp_path: Path) -> tuple[Path, recall.IndexInfo, list[Chunk], np.ndarray]:
    chunks = small_corpus()
    vecs = unit(np.random.default_rng(1), len(chunks))
    path = tmp_path / "recall" / "index.db"
    info = recall.build_index(
        chunks, vecs, path, embedding_model="test/random", chunking=ChunkConfig(5, 2).to_dict()
    )
    return path, info, chunks, vecs


# --------------------------------------------------------------------------- extension loading


def test_backend_is_one_that_loads_sqlite_vec() -> None:
    mod = recall.sqlite_backend()
    stdlib_can = hasattr(sqlite3.Connection, "enable_load_extension")
    assert mod.__name__ == ("sqlite3" if stdlib_can else "pysqlite3.dbapi2")
    conn = recall.connect(":memory:", read_only=False)
    try:
        assert conn.execute("SELECT vec_version()").fetchone()[0].startswith("v")
    finally:
        conn.close()


def test_no_loadable_sqlite_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    recall.sqlite_backend.cache_clear()
    try:
        monkeypatch.setitem(sys.modules, "sqlite_vec", None)
        with pytest.raises(recall.RecallUnavailable, match=r"kolm\[recall\]"):
            recall.sqlite_backend()
        monkeypatch.undo()
        recall.sqlite_backend.cache_clear()
        if not hasattr(sqlite3.Connection, "enable_load_extension"):
            monkeypatch.setitem(sys.modules, "pysqlite3", None)
            monkeypatch.setitem(sys.modules, "pysqlite3.dbapi2", None)
            with pytest.raises(recall.RecallUnavailable, match=r"kolm\[recall\].*") as e:
                recall.sqlite_backend()
            assert "sqlite3" in str(e.value) and "pysqlite3: not installed" in str(e.value)
    finally:
        monkeypatch.undo()
        recall.sqlite_backend.cache_clear()
    assert recall.sqlite_backend() is not None


# --------------------------------------------------------------------------- corpus and chunking


def test_word_chunking_windows_and_ids() -> None:
    docs = [
        Document("a", " ".join(f"t{i}" for i in range(12))),
        Document("empty", "  \n"),
        Document("b", "one two"),
    ]
    chunks = recall.chunk_documents(docs, ChunkConfig(size=5, overlap=2))
    assert [c.id for c in chunks] == ["a#0", "a#1", "a#2", "a#3", "b#0"]
    assert [c.text for c in chunks[:4]] == [
        "t0 t1 t2 t3 t4",
        "t3 t4 t5 t6 t7",
        "t6 t7 t8 t9 t10",
        "t9 t10 t11",
    ]
    assert [c.position for c in chunks] == list(range(5))
    assert chunks[4].digest == chunk_digest("b#0", "one two")
    # deterministic: same inputs, same chunks and root
    again = recall.chunk_documents(docs, ChunkConfig(size=5, overlap=2))
    assert again == chunks
    assert corpus_root([c.digest for c in again]) == corpus_root([c.digest for c in chunks])


def test_char_chunking_and_config_validation() -> None:
    chunks = recall.chunk_documents([Document("d", "abcdefghij")], ChunkConfig(4, 1, "chars"))
    assert [c.text for c in chunks] == ["abcd", "defg", "ghij"]
    for bad in ({"size": 0}, {"size": 5, "overlap": 5}, {"unit": "tokens"}, {"size": True}):
        with pytest.raises(InvalidInput):
            ChunkConfig(**bad)  # type: ignore[arg-type]
    cfg = ChunkConfig(30, 5)
    assert ChunkConfig.from_dict(cfg.to_dict()) == cfg


def test_load_corpus_jsonl_and_folder(tmp_path: Path) -> None:
    j = tmp_path / "c.jsonl"
    j.write_text('{"id": "z", "text": "last"}\n\n{"id": "a", "text": "first"}\n')
    assert recall.load_corpus(j) == [Document("z", "last"), Document("a", "first")]
    j.write_text('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n')
    with pytest.raises(InvalidInput, match="line 2: duplicate id 'a'"):
        recall.load_corpus(j)
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "b.txt").write_text("bee")
    (d / "a.md").write_text("ay")
    (d / ".hidden").write_text("no")
    assert recall.load_corpus(d) == [Document("a.md", "ay"), Document("sub/b.txt", "bee")]
    (d / "bin.dat").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(InvalidInput, match=r"bin\.dat is not UTF-8"):
        recall.load_corpus(d)


# --------------------------------------------------------------------------- index


def test_index_is_deterministic_and_verifies(built: Any, tmp_path: Path) -> None:
    path, info, chunks, vecs = built
    other = tmp_path / "again.db"
    info2 = recall.build_index(
        chunks, vecs, other, embedding_model="test/random", chunking=ChunkConfig(5, 2).to_dict()
    )
    assert info2 == info
    assert hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(other.read_bytes()).digest()
    assert info.to_manifest() == {
        "index": "recall/index.db",
        "corpus_root": corpus_root([c.digest for c in chunks]),
        "chunks": len(chunks),
        "dim": DIM,
        "embedding_model": "test/random",
        "chunking": {"overlap": 2, "size": 5, "source": "documents", "unit": "words"},
    }
    assert recall.IndexInfo.from_manifest(info.to_manifest()) == info
    assert recall.verify_index(path, info.corpus_root, expected_chunks=len(chunks)) == info
    with pytest.raises(ArtifactError, match="corpus root"):
        recall.verify_index(path, "0" * 64)
    with pytest.raises(ArtifactError, match="holds"):
        recall.verify_index(path, info.corpus_root, expected_chunks=len(chunks) + 1)


def _tamper(path: Path, sql: str, *args: Any) -> None:
    conn = recall.connect(path, read_only=False)
    try:
        with conn:
            conn.execute(sql, args)
    finally:
        conn.close()


def test_tampered_chunk_text_is_caught(built: Any) -> None:
    path, info, chunks, _ = built
    victim = chunks[17]
    _tamper(path, "UPDATE chunks SET text = ? WHERE position = ?", victim.text + "!", 17)
    with pytest.raises(ArtifactError, match=f"chunk '{victim.id}' has digest"):
        recall.verify_index(path, info.corpus_root)
    with pytest.raises(ArtifactError, match=f"chunk '{victim.id}'"):
        recall.RecallIndex.open(path, expected_root=info.corpus_root)


def test_tampered_text_with_matching_digest_breaks_the_root(built: Any) -> None:
    path, info, chunks, _ = built
    c = chunks[3]
    _tamper(
        path,
        "UPDATE chunks SET text = ?, digest = ? WHERE position = ?",
        "forged",
        chunk_digest(c.id, "forged"),
        3,
    )
    with pytest.raises(ArtifactError, match="corpus root"):
        recall.verify_index(path, info.corpus_root)


def test_build_refuses_bad_chunks(tmp_path: Path) -> None:
    c = Chunk.make("x#0", "hello", 0)
    vec = unit(np.random.default_rng(0), 1)
    with pytest.raises(InvalidInput, match="no chunks"):
        recall.build_index([], vec, tmp_path / "a.db", embedding_model="m")
    with pytest.raises(InvalidInput, match="position 1, want 0"):
        recall.build_index(
            [Chunk.make("x#0", "hello", 1)], vec, tmp_path / "a.db", embedding_model="m"
        )
    with pytest.raises(InvalidInput, match="digest does not match"):
        recall.build_index(
            [Chunk(c.id, "other", 0, c.digest)], vec, tmp_path / "a.db", embedding_model="m"
        )
    with pytest.raises(InvalidInput, match="2 vectors for 1 chunks"):
        recall.build_index(
            [c], unit(np.random.default_rng(0), 2), tmp_path / "a.db", embedding_model="m"
        )


# --------------------------------------------------------------------------- search


def test_search_matches_exact_brute_force(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    n = 3000
    chunks = [Chunk.make(f"c#{i}", f"text {i}", i) for i in range(n)]
    vecs = unit(rng, n)
    path = tmp_path / "big.db"
    recall.build_index(chunks, vecs, path, embedding_model="test/random")
    queries = unit(rng, 40)
    with recall.RecallIndex.open(path) as idx:
        np.testing.assert_array_equal(idx.vectors(), vecs)
        hits = idx.search(queries, k=10)
    want, scores = recall.exact_search(vecs, queries, 10)
    got = np.array([[h.position for h in row] for row in hits])
    assert (got == want).mean() == 1.0
    np.testing.assert_allclose([[h.score for h in row] for row in hits], scores, atol=1e-5)
    assert hits[0][0].chunk_id == f"c#{want[0][0]}" and hits[0][0].text == f"text {want[0][0]}"


def test_k_cap_is_enforced(built: Any) -> None:
    path, _, chunks, vecs = built
    with recall.RecallIndex.open(path) as idx:
        assert len(idx.search(vecs[:2], k=50)[0]) == 50
        with pytest.raises(InvalidInput, match="k is 51, over the cap of 50"):
            idx.search(vecs[:1], k=51)
        with pytest.raises(InvalidInput, match="k is 0"):
            idx.search(vecs[:1], k=0)
        with pytest.raises(InvalidInput, match="dim 3, the index has 24"):
            idx.search(np.ones((1, 3), dtype=np.float32), k=1)
    with recall.RecallIndex.open(path, k_cap=5) as idx:
        with pytest.raises(InvalidInput, match="k is 6, over the cap of 5"):
            idx.search(vecs[:1], k=6)
        assert len(idx.search(vecs[:1], k=5)[0]) == 5
    with recall.RecallIndex.open(path, k_cap=1000) as idx:  # k above the corpus size
        assert len(idx.search(vecs[:1], k=len(chunks) + 10)[0]) == len(chunks)


def test_text_queries_use_the_given_embedder(built: Any) -> None:
    path, _, chunks, vecs = built
    lookup = {c.text: vecs[c.position] for c in chunks}
    with recall.RecallIndex.open(path, embed=lambda ts: np.stack([lookup[t] for t in ts])) as idx:
        (row,) = idx.search([chunks[9].text], k=3)
    assert row[0].chunk_id == chunks[9].id and row[0].score == pytest.approx(1.0, abs=1e-5)


# --------------------------------------------------------------------------- evidence


def test_evidence_verifies_against_the_corpus_root(built: Any) -> None:
    path, info, chunks, vecs = built
    with recall.RecallIndex.open(path) as idx:
        hits = idx.search(vecs[5:6], k=8)[0]
        ev = recall.evidence(hits, idx)
    assert [e["id"] for e in ev] == [h.chunk_id for h in hits]
    assert set(ev[0]) == {"id", "digest", "position", "proof"}
    verify_evidence(ev, info.corpus_root, info.chunks)
    verify_evidence(ev, info.corpus_root, info.chunks, texts={c.id: c.text for c in chunks})
    json.dumps(ev)  # receipt-ready


@pytest.mark.parametrize("mutate", ["digest", "proof", "position", "size", "text", "short"])
def test_tampered_evidence_fails_naming_the_chunk(built: Any, mutate: str) -> None:
    path, info, _chunks, vecs = built
    with recall.RecallIndex.open(path) as idx:
        ev = recall.evidence(idx.search(vecs[11:12], k=3)[0], idx)
    bad = json.loads(json.dumps(ev))
    target = bad[1]
    size = info.chunks
    texts = None
    if mutate == "digest":
        target["digest"] = ("1" if target["digest"][0] != "1" else "2") + target["digest"][1:]
    elif mutate == "proof":
        h = target["proof"][2]
        target["proof"][2] = ("f" if h[0] != "f" else "e") + h[1:]
    elif mutate == "position":
        target["position"] = (target["position"] + 1) % size
    elif mutate == "size":
        # (a size off by one can give the same proof for leaves of the left subtree, which
        # is why corpus_size must come from the signed manifest, never from the evidence)
        size *= 2
        bad = [target]
    elif mutate == "text":
        texts = {target["id"]: "not the text"}
    else:
        target["proof"] = target["proof"][:-1]
    with pytest.raises(InclusionProofError, match=f"evidence chunk '{target['id']}'"):
        verify_evidence(bad, info.corpus_root, size, texts=texts)


def test_corpus_tree_matches_root_from_leaves() -> None:
    for n in (1, 2, 3, 7, 8, 33):
        digests = [chunk_digest(f"d#{i}", str(i)) for i in range(n)]
        tree = CorpusTree(digests)
        assert tree.root_hex == corpus_root(digests)
        for i in range(n):
            verify_evidence(
                [
                    {
                        "id": f"d#{i}",
                        "digest": digests[i],
                        "position": i,
                        "proof": [h.hex() for h in tree.proof(i)],
                    }
                ],
                tree.root,
                n,
            )


# --------------------------------------------------------------------------- examples index


def test_examples_index_and_neighbour_vote(tmp_path: Path) -> None:
    examples = [
        ("card lost", "lost_card"),
        ("lost my card", "lost_card"),
        {"input": "where is my card", "output": "card_arrival"},
        ("card lost", "lost_card"),
    ]  # duplicate, kept once
    chunks = recall.chunks_from_examples(examples)
    assert len(chunks) == 3 and chunks[2].label == "card_arrival"
    from kolm_ledger.formats.receipts import example_digest

    assert chunks[0].id == example_digest("card lost", "lost_card")
    assert chunks[0].digest == chunk_digest(chunks[0].id, "card lost", "lost_card")
    vecs = unit(np.random.default_rng(3), 3)
    path = tmp_path / "ex.db"
    info = recall.index_from_examples(examples, vecs, path, embedding_model="m")
    assert info.chunking == {"source": "examples"}
    recall.verify_index(path, info.corpus_root)
    with recall.RecallIndex.open(path) as idx:
        hits = idx.search(vecs[2:3], k=3)[0]
        assert hits[0].label == "card_arrival"
        ev = recall.evidence(hits, idx)
    assert ev[0]["label"] == "card_arrival"
    verify_evidence(ev, info.corpus_root, 3, texts={c.id: c.text for c in chunks})
    _tamper(path, "UPDATE chunks SET label = 'lost_card' WHERE position = 2")
    with pytest.raises(ArtifactError, match=f"chunk '{chunks[2].id}'"):
        recall.verify_index(path, info.corpus_root)

    def hit(label: str | None, pos: int = 0) -> Hit:
        return Hit("x", "0" * 64, "t", 0.5, pos, label)

    assert recall.neighbour_vote([hit("a"), hit("b"), hit("b"), hit(None)]) == ("b", 2 / 3)
    assert recall.neighbour_vote([hit("a"), hit("b")]) == ("a", 0.5)  # tie: best-ranked first
    with pytest.raises(InvalidInput, match="no labelled hits"):
        recall.neighbour_vote([hit(None)])


# --------------------------------------------------------------------------- real embeddings


def _filler() -> list[Document]:
    """60 real bank questions (tests/data/banking77) the planted sentences hide among."""
    rows = [t for t, _ in banking77("train")[:60]]
    assert len(rows) == 60
    return [Document(f"bank{i}", t) for i, t in enumerate(rows)]


@pytest.mark.ml
def test_planted_sentences_are_retrieved_by_paraphrase(tmp_path: Path) -> None:
    from kolm_compile.student import DEFAULT_BASE_MODEL, embed_texts

    docs = _filler() + [Document(k, s) for k, (s, _) in PLANTED.items()]
    chunks = recall.chunk_documents(docs, ChunkConfig(size=40, overlap=10))
    path = tmp_path / "index.db"
    info = recall.build_index(
        chunks,
        embed_texts,
        path,
        embedding_model=DEFAULT_BASE_MODEL,
        chunking=ChunkConfig(40, 10).to_dict(),
    )
    assert info.dim == 384
    with recall.RecallIndex.open(path, expected_root=info.corpus_root) as idx:
        hits = idx.search([q for _, q in PLANTED.values()], k=10)
        for (key, _), row in zip(PLANTED.items(), hits, strict=True):
            assert row[0].chunk_id == f"{key}#0", (key, [h.chunk_id for h in row[:3]])
        verify_evidence(recall.evidence(hits[0], idx), info.corpus_root, info.chunks)
        exact, _ = recall.exact_search(
            idx.vectors(), embed_texts([q for _, q in PLANTED.values()]), 10
        )
    assert [[h.position for h in row] for row in hits] == exact.tolist()


# --------------------------------------------------------------------------- recall update


def _world(tmp_path: Path) -> tuple[Path, Any, Any, Path, str]:
    from support.receipts import artifact_statement

    from kolm_compile.artifact import pack
    from kolm_ledger.formats.receipts import eval_statement, sign_statement
    from kolm_ledger.keys import PrivateKey, init_keys
    from kolm_ledger.log.ledger import Ledger
    from kolm_ledger.storage import Store

    keys = tmp_path / "keys"
    trust = init_keys(keys)
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    ledger = Ledger(Store(db), trust, PrivateKey.load(keys / "log.key"))
    ck = PrivateKey.load(keys / "compile.key")
    d = tmp_path / "build" / "tiny"
    (d / "adapter").mkdir(parents=True)
    (d / "adapter" / "fake_adapter.dat").write_bytes(b"\x00" * 64)
    manifest = {
        "format": "kolm/v1",
        "name": "tiny",
        "task_type": "classify",
        "labels": ["a", "b"],
        "base_model": {
            "id": "sentence-transformers/all-MiniLM-L6-v2",
            "revision": "test",
            "weights_digest": "0" * 64,
        },
        "adapter": "adapter",
        "kolm_version": "0.1.0",
    }
    (d / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    art = tmp_path / "tiny.kolm"
    digest = pack(d, art, ck)
    ev = sign_statement(
        eval_statement(
            artifact_digest=digest,
            holdout_digest="1" * 64,
            n=10,
            correct=9,
            k_score=90.0,
            interval=(60.0, 98.0),
            outcome_root="2" * 64,
            teacher_k_score=None,
        ),
        ck,
    )
    (evr,) = ledger.append([ev])
    ar = sign_statement(
        artifact_statement(
            file=art,
            artifact_digest=digest,
            base_model=manifest["base_model"],
            label_count=20,
            eval_receipt=evr.leaf_hash.hex(),  # the leaf hash the ledger answered with
            k_score=90.0,
            verifier={"name": "label_set"},
            checkpoint={"size": 0},
            extra={"job_id": "job-1"},
        ),
        ck,
    )
    ledger.append([ar])
    return keys, ledger, ck, art, digest


def _receipt(ledger: Any, digest: str) -> dict[str, Any]:
    from kolm_ledger.formats.dsse import Envelope
    from kolm_ledger.formats.receipts import Statement

    (e,) = ledger.store.find(subject_digest=digest, kind="artifact")
    return dict(Statement.from_envelope(Envelope.from_bytes(e.envelope)).predicate)


@pytest.mark.ml
def test_recall_update_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kolm.cli import recall as recall_cli
    from kolm_compile.artifact import verify_artifact
    from kolm_compile.sinks import LocalLedgerSink

    keys, ledger, ck, art, old = _world(tmp_path)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        "".join(json.dumps({"id": k, "text": s}) + "\n" for k, (s, _) in PLANTED.items())
    )
    parser = argparse.ArgumentParser()
    recall_cli.register(parser.add_subparsers(dest="command"))
    out = tmp_path / "tiny-v2.kolm"
    a = parser.parse_args(
        [
            "recall",
            "update",
            str(art),
            str(corpus),
            "--keys",
            str(keys),
            "--db",
            str(ledger.store.engine.url),
            "--out",
            str(out),
            "--chunk-size",
            "50",
            "--chunk-overlap",
            "5",
        ]
    )
    assert a.func(a) == 0
    printed = capsys.readouterr().out
    new = verify_artifact(out, ledger.trust, into=tmp_path / "v2")
    assert f"artifact {new.digest}" in printed
    m = new.manifest
    assert m.previous_artifact == old and m.recall is not None
    rc = m.recall.to_dict()
    assert rc["index"] == "recall/index.db" and rc["chunks"] == len(PLANTED) and rc["dim"] == 384
    assert rc["chunking"] == {"overlap": 5, "size": 50, "source": "documents", "unit": "words"}
    assert rc["embedding_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    recall.verify_index(new.directory / rc["index"], rc["corpus_root"], expected_chunks=4)
    assert (new.directory / "adapter" / "fake_adapter.dat").read_bytes() == b"\x00" * 64

    ledger.refresh_trust()
    old_pred, new_pred = _receipt(ledger, old), _receipt(ledger, new.digest)
    assert new_pred["previous_artifact"] == old and new_pred["evaluated_as"] == old
    assert new_pred["corpus_root"] == rc["corpus_root"] and new_pred["corpus_chunks"] == 4
    for k in ("eval_receipt", "k_score", "training_set_root", "base_model", "job_id"):
        assert new_pred[k] == old_pred[k], k
    assert new_pred["checkpoint"]["size"] == 2

    # a second update along the chain keeps pointing at the evaluated artifact
    corpus2 = tmp_path / "docs"
    corpus2.mkdir()
    (corpus2 / "x.txt").write_text("new knowledge " * 30)
    r = recall_cli.update_artifact(
        out,
        corpus2,
        tmp_path / "tiny-v3.kolm",
        key=ck,
        sink=LocalLedgerSink(ledger),
        embed=lambda ts: np.ones((len(ts), 384), dtype=np.float32),
    )
    p3 = _receipt(ledger, r.digest)
    assert p3["previous_artifact"] == new.digest and p3["evaluated_as"] == old
    assert r.chunks == 2 and r.receipt_index == 3  # 60 words, chunking 50/5 inherited


def test_recall_update_refuses_an_unlogged_or_untrusted_artifact(tmp_path: Path) -> None:
    from kolm.cli import recall as recall_cli
    from kolm_compile.artifact import pack
    from kolm_compile.sinks import LocalLedgerSink
    from kolm_ledger.keys import PrivateKey

    _keys, ledger, ck, _art, _ = _world(tmp_path)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"id": "a", "text": "hello"}\n')
    d = tmp_path / "build" / "tiny"
    (d / "adapter" / "fake_adapter.dat").write_bytes(b"\x01" * 64)
    unlogged = tmp_path / "unlogged.kolm"
    pack(d, unlogged, ck)

    def fake(ts: Any) -> np.ndarray:
        return np.ones((len(ts), 8), dtype=np.float32)

    with pytest.raises(NotFoundError, match="no artifact receipt"):
        recall_cli.update_artifact(
            unlogged, corpus, tmp_path / "o.kolm", key=ck, sink=LocalLedgerSink(ledger), embed=fake
        )
    rogue = tmp_path / "rogue.kolm"
    pack(d, rogue, PrivateKey.generate())
    with pytest.raises(ArtifactError, match="not signed by a trusted"):
        recall_cli.update_artifact(
            rogue, corpus, tmp_path / "o.kolm", key=ck, sink=LocalLedgerSink(ledger), embed=fake
        )
    assert ledger.size == 2
