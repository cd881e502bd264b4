"""Recall at compile time (GitHub issue #8): a task spec's ``recall`` section puts a signed,
verifiable index in the ``.kolm``. Real (tiny) LoRA compiles on an in-process ledger:
the manifest's ``recall`` field, the artifact receipt's ``corpus_root``/``corpus_chunks``,
a planted query retrieving its chunk, ``source: examples``, byte-identical artifacts,
corpus errors named by field, and a tampered chunk refused at load."""

from __future__ import annotations

import json
import sqlite3
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kolm_compile import recall
from kolm_compile.artifact import pack, verify_artifact
from kolm_compile.pipeline import CompileJob, CompileOptions, CompileResult
from kolm_compile.sinks import LocalLedgerSink
from kolm_compile.spec import TaskSpec
from kolm_ledger.errors import ArtifactError, SpecError
from kolm_ledger.formats.dsse import Envelope
from kolm_ledger.formats.receipts import Statement, example_digest, job_digest
from kolm_ledger.keys import PrivateKey, init_keys
from kolm_ledger.verify.recall_proof import corpus_root, verify_evidence
from kolm_ledger.verify.trust import TrustState

EXAMPLES = Path(__file__).resolve().parents[2] / "kolm_compile" / "examples"

PLANTED = (
    "The spare vault key for the Reykjavik branch is taped under the third lighthouse "
    "postcard in the staff kitchen."
)
DOCS = [
    {"id": "fees", "text": "Card payments abroad cost a fee of one percent. " * 4},
    {"id": "transfers", "text": "A bank transfer can take up to three working days to arrive."},
    {"id": "planted", "text": PLANTED},
    {"id": "refunds", "text": "Refunds go back to the card that paid, within ten days. " * 3},
    {"id": "cash", "text": "Withdrawing cash at an ATM abroad may carry a charge."},
]


def spec_raw(recall_section: dict[str, Any] | None) -> dict[str, Any]:
    """The example spec shrunk to 3 intents x 8 inputs, 1 epoch; data paths absolute."""
    raw = yaml.safe_load((EXAMPLES / "banking77-router.yaml").read_text())
    raw["labels"] = raw["labels"][:3]
    raw["data"]["limit_per_label"] = 8
    raw["student"].update(epochs=1, max_length=32, batch_size=16)
    raw["teacher"]["dataset"] = str((EXAMPLES / raw["teacher"]["dataset"]).resolve())
    for k in ("unlabeled", "holdout"):
        raw["data"][k] = str((EXAMPLES / raw["data"][k]).resolve())
    raw.pop("recall", None)
    if recall_section is not None:
        raw["recall"] = recall_section
    return raw


def write_spec(d: Path, recall_section: dict[str, Any] | None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    p = d / "spec.yaml"
    p.write_text(yaml.safe_dump(spec_raw(recall_section)))
    return p


def write_corpus(path: Path, docs: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(doc) + "\n" for doc in docs))


def _embed(texts: list[str]) -> Any:
    from kolm_compile.student import embed_texts

    return embed_texts(texts)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    d = tmp_path_factory.mktemp("compile-recall")
    trust = init_keys(d / "keys")
    sink = LocalLedgerSink.open(f"sqlite:///{d / 'ledger.db'}", d / "keys")
    key = PrivateKey.load(d / "keys" / "compile.key")
    cache = d / "teacher-cache.sqlite"

    def compile_(spec: TaskSpec, name: str) -> CompileResult:
        job = CompileJob(spec, key=key, sink=sink, job_dir=d / name, out_dir=d / f"out-{name}",
                         options=CompileOptions(threads=1, teacher_cache=cache), embed=_embed)  # fmt: skip
        return job.run()

    spec_dir = d / "spec"
    spec_dir.mkdir()
    write_corpus(spec_dir / "corpus.jsonl", DOCS)
    section = {"corpus": "corpus.jsonl", "chunk_size": 12, "chunk_overlap": 3, "k": 3}
    spec = TaskSpec.load(write_spec(spec_dir, section))
    result = compile_(spec, "docs")
    yield {
        "dir": d,
        "trust": TrustState(trust),
        "sink": sink,
        "key": key,
        "compile": compile_,
        "spec": spec,
        "result": result,
    }
    sink.close()


def artifact_receipt(sink: LocalLedgerSink, digest: str) -> dict[str, Any]:
    (e,) = sink.ledger.store.find(subject_digest=digest, kind="artifact", limit=10)
    return Statement.from_envelope(Envelope.from_bytes(e.envelope)).predicate


# --------------------------------------------------------------------------- a corpus


@pytest.mark.ml
@pytest.mark.slow
def test_corpus_index_is_in_the_manifest_and_matches_the_artifact_receipt(
    world: dict[str, Any],
) -> None:
    r: CompileResult = world["result"]
    v = verify_artifact(r.artifact_path, world["trust"], into=world["dir"] / "v-docs")
    assert v.manifest.recall is not None and v.manifest.base_model is not None
    rc = v.manifest.recall.to_dict()
    assert set(rc) == {"index", "corpus_root", "chunks", "dim", "embedding_model", "chunking", "k"}
    assert rc["index"] == "recall/index.db" and rc["index"] in dict(v.resources)
    assert rc["chunking"] == {"overlap": 3, "size": 12, "source": "documents", "unit": "words"}
    assert rc["dim"] == 384 and rc["k"] == 3
    assert rc["embedding_model"] == v.manifest.base_model.id
    assert r.recall == rc
    # the corpus as the spec cuts it is exactly what the index commits to
    chunks = world["spec"].recall.corpus_chunks()
    assert rc["chunks"] == len(chunks) > len(DOCS)  # some documents span several chunks
    assert rc["corpus_root"] == corpus_root([c.digest for c in chunks])
    # the artifact receipt in the ledger names the same corpus; the index verifies against it
    pred = artifact_receipt(world["sink"], r.artifact_digest)
    assert (pred["corpus_root"], pred["corpus_chunks"]) == (rc["corpus_root"], rc["chunks"])
    index = v.directory / rc["index"]
    info = recall.verify_index(index, pred["corpus_root"], expected_chunks=pred["corpus_chunks"])
    assert info.embedding_model == rc["embedding_model"]
    # task.json keeps the corpus path relative to the spec, never a local path
    task = json.loads((v.directory / "task.json").read_text())
    assert task["recall"]["corpus"] == "corpus.jsonl"


@pytest.mark.ml
@pytest.mark.slow
def test_a_planted_query_retrieves_its_chunk_with_verifiable_evidence(
    world: dict[str, Any],
) -> None:
    v = verify_artifact(world["result"].artifact_path, world["trust"], into=world["dir"] / "v-q")
    rc = v.manifest.recall
    assert rc is not None and rc.k is not None
    with recall.RecallIndex.open(v.directory / rc.index, embed=_embed) as idx:
        (hits,) = idx.search(["where is the spare vault key of the Reykjavik branch?"], k=rc.k)
        assert hits[0].chunk_id == "planted#0", [h.chunk_id for h in hits]
        assert "vault key" in hits[0].text
        ev = recall.evidence(hits, idx)
    verify_evidence(ev, rc.corpus_root, rc.chunks, texts={h.chunk_id: h.text for h in hits})


@pytest.mark.ml
@pytest.mark.slow
def test_same_spec_and_cache_give_a_byte_identical_kolm_with_recall(world: dict[str, Any]) -> None:
    r1: CompileResult = world["result"]
    r2 = world["compile"](world["spec"], "docs-again")
    assert r2.job_id != r1.job_id
    assert r2.artifact_digest == r1.artifact_digest
    assert r2.artifact_path.read_bytes() == r1.artifact_path.read_bytes()


# --------------------------------------------------------------------------- examples


@pytest.mark.ml
@pytest.mark.slow
def test_source_examples_indexes_the_acknowledged_training_examples(
    world: dict[str, Any],
) -> None:
    spec = TaskSpec.load(write_spec(world["dir"] / "spec-ex", {"source": "examples"}))
    r = world["compile"](spec, "examples")
    v = verify_artifact(r.artifact_path, world["trust"], into=world["dir"] / "v-ex")
    assert v.manifest.recall is not None
    rc = v.manifest.recall.to_dict()
    assert rc["chunking"] == {"source": "examples"} and rc["k"] == 5
    trained = json.loads((world["dir"] / "examples" / "train_set.json").read_text())
    pairs = list(zip(trained["texts"], trained["labels"], strict=True))
    assert rc["chunks"] == len(set(pairs)) == r.labels_logged
    pred = artifact_receipt(world["sink"], r.artifact_digest)
    assert (pred["corpus_root"], pred["corpus_chunks"]) == (rc["corpus_root"], rc["chunks"])
    with recall.RecallIndex.open(
        v.directory / rc["index"], embed=_embed, expected_root=pred["corpus_root"]
    ) as idx:
        text, label = pairs[0]
        (hits,) = idx.search([text], k=3)
        assert (hits[0].text, hits[0].label) == (text, label)
        # a cited neighbour leads to its label receipt: chunk id = the example digest
        assert hits[0].chunk_id == example_digest(text, label)
        # (the other jobs on this ledger labelled the same example: one receipt is this job's)
        entries = world["sink"].ledger.store.find(
            subject_digest=hits[0].chunk_id, kind="label", limit=100
        )
        jobs = [
            {s.sha256 for s in Statement.from_envelope(Envelope.from_bytes(e.envelope)).subjects}
            for e in entries
        ]
        assert sum(job_digest(r.job_id) in j for j in jobs) == 1


# --------------------------------------------------------------------------- tampering


def _tamper_chunk(unpacked: Path, chunk_id: str) -> None:
    conn = sqlite3.connect(unpacked / "recall" / "index.db")
    with conn:
        n = conn.execute(
            "UPDATE chunks SET text = text || ' (and the PIN is 0000)' WHERE id = ?", (chunk_id,)
        ).rowcount
    conn.close()
    assert n == 1


@pytest.mark.ml
@pytest.mark.slow
def test_a_tampered_chunk_is_refused_at_load(world: dict[str, Any], tmp_path: Path) -> None:
    art: Path = world["result"].artifact_path
    with zipfile.ZipFile(art) as z:
        z.extractall(tmp_path / "x")
    (folder,) = (tmp_path / "x").iterdir()
    _tamper_chunk(folder, "planted#0")
    # (a) repacked as it is: the index no longer matches its signed file digest
    bad = tmp_path / "bad.kolm"
    with zipfile.ZipFile(art) as src, zipfile.ZipFile(bad, "w") as dst:
        for info in src.infolist():
            name = info.filename
            data = src.read(name)
            if name == f"{folder.name}/recall/index.db":
                data = (folder / "recall" / "index.db").read_bytes()
            dst.writestr(info, data)
    with pytest.raises(ArtifactError, match=r"recall/index\.db has digest"):
        verify_artifact(bad, world["trust"], into=tmp_path / "v-bad")
    # (b) re-signed by the compile key (a builder bug, or a stolen key): the signature and
    # file digests hold, but the chunk no longer matches the corpus root of the manifest
    resigned = tmp_path / "resigned.kolm"
    pack(folder, resigned, world["key"])
    with pytest.raises(ArtifactError, match=r"chunk 'planted#0' has digest"):
        verify_artifact(resigned, world["trust"], into=tmp_path / "v-resigned")
    # and a manifest whose recall field names no signed index is refused too
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["recall"]["index"] = "recall/other.db"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    pack(folder, resigned, world["key"])
    with pytest.raises(ArtifactError, match=r"recall\.index 'recall/other\.db' is not a signed"):
        verify_artifact(resigned, world["trust"], into=tmp_path / "v-other")


# --------------------------------------------------------------------------- spec errors


def _load_with_corpus(d: Path, name: str, body: str | None, **section: Any) -> TaskSpec:
    if body is not None:
        (d / name).write_text(body)
    return TaskSpec.load(write_spec(d, {"corpus": name, **section}))


@pytest.mark.parametrize(
    ("name", "body", "message"),
    [
        (
            "dup.jsonl",
            '{"id": "a", "text": "x"}\n{"id": "b", "text": "y"}\n{"id": "a", "text": "z"}\n',
            r"^spec\.recall\.corpus: corpus dup\.jsonl line 3: duplicate id 'a'$",
        ),
        ("empty.jsonl", "", r"^spec\.recall\.corpus: corpus .*empty\.jsonl: no documents$"),
        ("noid.jsonl", '{"id": "", "text": "x"}\n', r"^spec\.recall\.corpus: .*line 1: id must"),
        ("notjson.jsonl", "{\n", r"^spec\.recall\.corpus: corpus notjson\.jsonl line 1: not JSON"),
        (
            "blank.jsonl",
            '{"id": "a", "text": "   "}\n',
            r"^spec\.recall\.corpus: gives no chunk \(every document is empty\)$",
        ),
        ("missing.jsonl", None, r"^spec\.recall\.corpus: file or folder not found: .*missing"),
        ("corpus.csv", "id,text\na,b\n", r"^spec\.recall\.corpus: must be a \.jsonl, \.ndjson"),
    ],
)
def test_a_bad_corpus_is_a_spec_error_naming_it(
    tmp_path: Path, name: str, body: str | None, message: str
) -> None:
    with pytest.raises(SpecError, match=message):
        _load_with_corpus(tmp_path, name, body)


def test_a_corpus_folder_and_its_digest(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "a.txt").write_text("alpha beta gamma")
    (docs / "sub" / "b.md").write_text("delta epsilon")
    (docs / ".hidden").write_text("not part of the corpus")
    spec = TaskSpec.load(write_spec(tmp_path, {"corpus": "docs", "chunk_size": 2}))
    assert spec.recall is not None and spec.recall.chunk_overlap == 0  # min(40, 2 // 5)
    assert [c.id for c in spec.recall.corpus_chunks()] == ["a.txt#0", "a.txt#1", "sub/b.md#0"]
    before = spec.digest()
    (docs / ".hidden").write_text("still not part of it")
    assert TaskSpec.load(tmp_path / "spec.yaml").digest() == before
    (docs / "sub" / "b.md").write_text("delta epsilon zeta")
    assert TaskSpec.load(tmp_path / "spec.yaml").digest() != before
    (docs / "bad.txt").write_bytes(b"\xff\xfe")
    with pytest.raises(SpecError, match=r"^spec\.recall\.corpus: corpus .*bad\.txt is not UTF-8"):
        TaskSpec.load(tmp_path / "spec.yaml")


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({}, r"^spec\.recall: needs corpus .* or source: examples$"),
        ({"source": "web"}, r"^spec\.recall\.source: must be one of documents, examples"),
        ({"source": "documents"}, r"^spec\.recall\.corpus: required for source documents$"),
        ({"source": "examples", "corpus": "c.jsonl"}, r"^spec\.recall\.corpus: not used with"),
        ({"source": "examples", "chunk_size": 10}, r"^spec\.recall\.chunk_size: only used"),
        ({"corpus": "c.jsonl", "k": 0}, r"^spec\.recall\.k: must be >= 1, got 0$"),
        ({"corpus": "c.jsonl", "k": 11}, r"^spec\.recall\.k: must be <= 10, got 11$"),
        ({"corpus": "c.jsonl", "chunk_size": 0}, r"^spec\.recall\.chunk_size: must be >= 1"),
        (
            {"corpus": "c.jsonl", "chunk_size": 10, "chunk_overlap": 10},
            r"^spec\.recall\.chunk_overlap: must be < chunk_size \(10\), got 10$",
        ),
        ({"corpus": "c.jsonl", "chunk_unit": "tokens"}, r"^spec\.recall\.chunk_unit: must be one"),
        ({"corpus": "c.jsonl", "top_k": 3}, r"^spec\.recall\.top_k: unknown field"),
        ({"corpus": 3}, r"^spec\.recall\.corpus: must be a path"),
    ],
)
def test_a_bad_recall_section_names_the_field(
    tmp_path: Path, section: dict[str, Any], message: str
) -> None:
    write_corpus(tmp_path / "c.jsonl", DOCS)
    with pytest.raises(SpecError, match=message):
        TaskSpec.load(write_spec(tmp_path, section))


def test_recall_defaults_and_no_recall_by_default(tmp_path: Path) -> None:
    write_corpus(tmp_path / "c.jsonl", DOCS)
    spec = TaskSpec.load(write_spec(tmp_path, {"corpus": "c.jsonl"}))
    r = spec.recall
    assert r is not None
    assert (r.source, r.chunk_size, r.chunk_overlap, r.chunk_unit, r.k) == (
        "documents", 200, 40, "words", 5
    )  # fmt: skip
    assert r.chunk_config() == recall.ChunkConfig()
    assert spec.to_dict()["recall"]["corpus"] == "c.jsonl"
    assert "recall.corpus" in spec.to_dict(with_file_digests=True)["files"]
    assert TaskSpec.load(write_spec(tmp_path / "none", None)).recall is None
    raw = spec_raw({"source": "examples"})
    del raw["labels"]
    raw.update(task="generate", verifier={"name": "regex", "params": {"pattern": ".+"}},
               teacher={"backend": "openai", "model": "m"})  # fmt: skip
    # classify's own data fields (generate reads data.output_column)
    for key in ("label_column", "limit_per_label", "labels"):
        raw["data"].pop(key, None)
    with pytest.raises(SpecError, match=r"^spec\.recall\.source: examples needs task classify"):
        TaskSpec.from_dict(raw, tmp_path)


@pytest.mark.ml
@pytest.mark.slow
def test_recall_update_keeps_the_artifacts_default_k(world: dict[str, Any], tmp_path: Path) -> None:
    from kolm.cli.recall import update_artifact

    corpus = tmp_path / "new.jsonl"
    write_corpus(corpus, [{"id": "fresh", "text": "the branch moved to a new street in May"}])
    out = tmp_path / "updated.kolm"
    res = update_artifact(world["result"].artifact_path, corpus, out, key=world["key"],
                          sink=world["sink"], trust=world["trust"], embed=_embed)  # fmt: skip
    v = verify_artifact(out, world["trust"], into=tmp_path / "v")
    assert v.manifest.recall is not None
    assert v.manifest.recall.k == 3 and v.manifest.recall.chunks == 1
    assert v.manifest.previous_artifact == world["result"].artifact_digest
    assert res.digest != world["result"].artifact_digest
