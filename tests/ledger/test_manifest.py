"""``manifest.json`` of a ``.kolm`` (kolm_ledger.formats.manifest): the bytes the compile wrote
before the type existed are the bytes it writes now, a read manifest writes back
byte-identical, and a field of the wrong type is refused naming it."""

from __future__ import annotations

import json
import zipfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from kolm_compile.artifact import pack, verify_artifact
from kolm_ledger.errors import ArtifactError
from kolm_ledger.formats.manifest import (
    BaseModelRef,
    EvaluationRef,
    Manifest,
    RecallRef,
    VerifierRef,
)
from kolm_ledger.keys import PrivateKey, init_keys
from kolm_ledger.verify.artifact import open_artifact

H1, H2, H3 = "1" * 64, "2" * 64, "3" * 64


def _old_literal(**opt: Any) -> bytes:
    """What ``CompileJob._package`` wrote before :class:`Manifest` (the dict literal, then
    ``json.dumps(indent=2, sort_keys=True)`` and a newline), for the same inputs."""
    manifest: dict[str, Any] = {
        "format": "kolm/v1",
        "name": "router",
        "task_type": "classify",
        "labels": ["a", "b", "c"],
        **({"none_label": opt["none_label"]} if opt.get("none_label") is not None else {}),
        "base_model": {
            "id": "sentence-transformers/all-MiniLM-L6-v2",
            "revision": "registered",
            "weights_digest": H1,
        },
        "adapter": "adapter",
        "max_length": 64,
        "confidence_threshold": opt.get("threshold", 0.5),
        "verifier": {"name": "label_set", "version": "1", "params": {"case_sensitive": False}},
        "spec_digest": H2,
        "kolm_version": "0.1.0",
    }
    manifest["evaluation"] = {
        "outcomes": "evaluation/outcomes.jsonl",
        "n": 120,
        "holdout_digest": H3,
        "outcome_root": H1,
        "text_column": "text",
        "label_column": "category",
    }
    manifest["determinism"] = {"batch_size": 64, "threads": 1, "torch": "2.13.0", "cpu": "x"}
    if opt.get("gate"):
        manifest["gate"] = {"rule": "prob_and_knn", "t_prob": 0.61, "k": 5, "holdout": {"n": 3}}
    if opt.get("bundle_base"):
        manifest["base"] = "base"
    if opt.get("recall"):
        manifest["recall"] = {
            "chunking": {"overlap": 3, "size": 12, "source": "documents", "unit": "words"},
            "chunks": 7,
            "corpus_root": H2,
            "dim": 384,
            "embedding_model": "sentence-transformers/all-MiniLM-L6-v2",
            "index": "recall/index.db",
            "k": 3,
        }
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()


def _typed(**opt: Any) -> Manifest:
    """The same inputs through :class:`Manifest` (what ``CompileJob._package`` does now)."""
    return Manifest(
        name="router",
        task_type="classify",
        labels=("a", "b", "c"),
        none_label=opt.get("none_label"),
        base_model=BaseModelRef("sentence-transformers/all-MiniLM-L6-v2", "registered", H1),
        adapter="adapter",
        max_length=64,
        confidence_threshold=opt.get("threshold", 0.5),
        verifier=VerifierRef("label_set", "1", {"case_sensitive": False}),
        spec_digest=H2,
        kolm_version="0.1.0",
        evaluation=EvaluationRef("evaluation/outcomes.jsonl", 120, H3, H1, "text", "category"),
        determinism={"batch_size": 64, "threads": 1, "torch": "2.13.0", "cpu": "x"},
        gate={"rule": "prob_and_knn", "t_prob": 0.61, "k": 5, "holdout": {"n": 3}}
        if opt.get("gate")
        else None,
        base="base" if opt.get("bundle_base") else None,
        recall=RecallRef(
            index="recall/index.db",
            corpus_root=H2,
            chunks=7,
            dim=384,
            embedding_model="sentence-transformers/all-MiniLM-L6-v2",
            chunking={"overlap": 3, "size": 12, "source": "documents", "unit": "words"},
            k=3,
        )
        if opt.get("recall")
        else None,
    ).replace()


OPTIONS = [
    {},
    {"none_label": "other"},
    {"threshold": 1},  # an integer threshold stays an integer in the JSON
    {"gate": True, "bundle_base": True, "recall": True},
    {"none_label": "other", "threshold": 0.25, "gate": True, "recall": True},
]


@pytest.mark.parametrize("opt", OPTIONS)
def test_the_compile_writes_the_bytes_the_dict_literal_wrote(opt: dict[str, Any]) -> None:
    old = _old_literal(**opt)
    assert _typed(**opt).to_json() == old
    # and a reader that writes it back (kolm recall update) changes nothing
    assert Manifest.from_json(old).to_json() == old
    assert Manifest.from_json(old) == _typed(**opt)


def test_unknown_top_level_keys_are_kept_and_written_back() -> None:
    raw = json.loads(_old_literal())
    raw["job_id"] = "j-1"
    b = (json.dumps(raw, indent=2, sort_keys=True) + "\n").encode()
    m = Manifest.from_json(b)
    assert m.extra == {"job_id": "j-1"} and m.to_json() == b
    # a minimal manifest (format only) is one too
    assert Manifest.from_json(b'{"format": "kolm/v1"}').to_dict() == {"format": "kolm/v1"}


def test_replace_sets_fields_and_checks_them() -> None:
    m = _typed().replace(previous_artifact=H3)
    assert m.previous_artifact == H3 and json.loads(m.to_json())["previous_artifact"] == H3
    with pytest.raises(ArtifactError, match=r"^manifest\.previous_artifact: want 64 lowercase"):
        _typed().replace(previous_artifact="abc")


def _with(path: str, value: Any) -> dict[str, Any]:
    raw: dict[str, Any] = json.loads(_old_literal(recall=True))
    *parents, last = path.split(".")
    node = raw
    for p in parents:
        node = node[p]
    node[last] = value
    return raw


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("format", "kolm/v2", r"manifest\.format: want 'kolm/v1', got 'kolm/v2'"),
        ("name", 7, r"manifest\.name: want a non-empty string, got 7"),
        ("labels", "a,b", r"manifest\.labels: want a list of non-empty strings, got 'a,b'"),
        ("labels", ["a", 2], r"manifest\.labels: want a list of non-empty strings"),
        ("max_length", 0, r"manifest\.max_length: want an integer >= 1, got 0"),
        ("max_length", True, r"manifest\.max_length: want an integer >= 1, got True"),
        ("confidence_threshold", "0.5", r"manifest\.confidence_threshold: want a finite number"),
        ("adapter", "../x", r"manifest\.adapter: want a relative path inside the artifact"),
        ("adapter", "/abs", r"manifest\.adapter: want a relative path inside the artifact"),
        ("base_model", "x", r"manifest\.base_model: want a JSON object, got 'x'"),
        ("base_model.id", "", r"manifest\.base_model\.id: want a non-empty string, got ''"),
        ("verifier.params", [], r"manifest\.verifier\.params: want a JSON object, got \[\]"),
        ("verifier.extra", 1, r"manifest\.verifier\.extra: unknown field"),
        ("evaluation.n", -1, r"manifest\.evaluation\.n: want an integer >= 0, got -1"),
        ("evaluation.outcome_root", "AB", r"manifest\.evaluation\.outcome_root: want 64 lower"),
        ("determinism", [1], r"manifest\.determinism: want a JSON object, got \[1\]"),
        ("gate", "on", r"manifest\.gate: want a JSON object, got 'on'"),
        ("recall.chunks", "7", r"manifest\.recall\.chunks: want an integer >= 1, got '7'"),
        ("recall.k", 0, r"manifest\.recall\.k: want an integer >= 1, got 0"),
        ("recall.index", "../db", r"manifest\.recall\.index: want a relative path"),
        ("recall.chunking", None, r"manifest\.recall\.chunking: want a JSON object, got None"),
    ],
)
def test_a_field_of_the_wrong_type_is_refused_naming_it(
    path: str, value: Any, message: str
) -> None:
    with pytest.raises(ArtifactError, match=f"^{message}"):
        Manifest.from_dict(_with(path, value))


def test_not_json_and_not_an_object() -> None:
    with pytest.raises(ArtifactError, match=r"^manifest: not JSON"):
        Manifest.from_json(b"{")
    with pytest.raises(ArtifactError, match=r"^manifest: want a JSON object, got \[\]"):
        Manifest.from_json(b"[]")


def test_the_loader_refuses_a_signed_manifest_with_a_bad_field(tmp_path: Path) -> None:
    """A signed artifact whose manifest names an unsafe adapter folder is refused at load,
    naming the artifact, the file and the field; nothing stays unpacked."""
    trust = init_keys(tmp_path / "keys")
    key = PrivateKey.load(tmp_path / "keys" / "compile.key")
    d = tmp_path / "build" / "tiny"
    (d / "adapter").mkdir(parents=True)
    (d / "adapter" / "w.safetensors").write_bytes(b"\0" * 16)
    raw = json.loads(_old_literal())
    raw["adapter"] = "../../elsewhere"
    (d / "manifest.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    pack(d, tmp_path / "tiny.kolm", key)
    bad = r"^tiny\.kolm: bad manifest\.json: manifest\.adapter: want a relative"
    with pytest.raises(ArtifactError, match=bad):
        verify_artifact(tmp_path / "tiny.kolm", trust, into=tmp_path / "v")
    assert not (tmp_path / "v").exists()
    # the auditor's reading, in the zip, says the same
    with (
        open_artifact(tmp_path / "tiny.kolm", trust.keys, at=datetime.now(UTC)) as art,
        pytest.raises(ArtifactError, match=bad),
    ):
        art.read_manifest()
    # the same artifact with a good manifest loads, and its manifest is the typed one
    raw["adapter"] = "adapter"
    (d / "manifest.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    pack(d, tmp_path / "tiny.kolm", key)
    v = verify_artifact(tmp_path / "tiny.kolm", trust, into=tmp_path / "v")
    assert v.manifest == Manifest.from_json((d / "manifest.json").read_bytes())
    with zipfile.ZipFile(tmp_path / "tiny.kolm") as z:
        assert z.read("tiny/manifest.json") == v.manifest.to_json()
