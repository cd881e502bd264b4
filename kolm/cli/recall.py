"""``kolm recall update``: give a ``.kolm`` a new recall corpus as a new, linked version.

A ``kolm.commands`` plug-in (``recall = "kolm.cli.recall:register"``). Importing
this module is cheap: numpy, sqlite-vec and torch load only when the command runs.

:func:`update_artifact` does the work, in order:
  1. verify the old artifact (signature by a trusted compile key, every file digest) and
     find its ``artifact`` receipt in the ledger (refuses an artifact the ledger never saw);
  2. load and chunk the new corpus (chunking from the flags, else the old manifest's,
     else the defaults) and embed it with the index's embedding model (the old
     ``recall.embedding_model``, else the manifest's ``base_model.id``);
  3. rebuild ``recall/``, set the manifest's ``recall`` and ``previous_artifact``;
  4. re-pack and sign with the compile key, then verify the new file;
  5. append an ``artifact`` receipt for the new version: the old receipt's predicate
     (minus ``time``) plus ``previous_artifact``, ``corpus_root``, ``corpus_chunks``,
     ``evaluated_as`` (the artifact the kept ``eval_receipt``/``k_score`` measured: the
     old digest, or the old receipt's own ``evaluated_as`` along a chain of updates) and
     the current ledger ``checkpoint``.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kolm_ledger.errors import InvalidInput, KolmError, NotFoundError

if TYPE_CHECKING:
    from kolm_compile.sinks import LedgerSink
    from kolm_ledger._crypto import PrivateKey
    from kolm_ledger.verify.trust import TrustState

__all__ = ["UpdateResult", "cmd_recall_update", "register", "update_artifact"]


@dataclass(frozen=True)
class UpdateResult:
    """What :func:`update_artifact` produced."""

    path: Path
    digest: str
    previous: str
    corpus_root: str
    chunks: int
    receipt_index: int
    receipt_leaf_hash: str


def _find_artifact_receipt(sink: LedgerSink, digest: str) -> Any:
    """The newest ``artifact`` receipt whose first subject is ``digest`` (a Statement)."""
    from kolm_ledger.formats.dsse import Envelope
    from kolm_ledger.formats.receipts import Statement

    for e in reversed(sink.find(subject_digest=digest, kind="artifact", limit=1000)):
        st = Statement.from_envelope(Envelope.from_bytes(e.envelope))
        if st.subjects and st.subjects[0].sha256 == digest:
            return st
    raise NotFoundError(
        f"no artifact receipt for {digest[:16]}… in the ledger; refusing to publish a new "
        "version of an artifact the ledger never recorded"
    )


def _checkpoint(sink: LedgerSink) -> dict[str, Any]:
    try:
        return sink.checkpoint()
    except NotFoundError:
        return {"size": 0}


def _append(sink: LedgerSink, env: Any) -> tuple[int, str]:
    (r,) = sink.append([env])
    if isinstance(r, KolmError):
        raise r
    return r.index, r.leaf_hash.hex()


def update_artifact(
    artifact: str | Path,
    corpus: str | Path,
    out: str | Path,
    *,
    key: PrivateKey,
    sink: LedgerSink,
    trust: TrustState | None = None,
    chunking: Any = None,
    embed: Callable[[Sequence[str]], Any] | None = None,
) -> UpdateResult:
    """Publish ``artifact`` with the recall corpus ``corpus`` as a new signed ``.kolm``.

    ``sink`` is the ledger (:func:`kolm_compile.sinks.open_sink`: an in-process ledger
    or the service); ``trust`` defaults to the sink's trust state (the trust root plus
    every key receipt of the ledger). ``chunking`` is a
    :class:`~kolm_compile.recall.ChunkConfig` (default: see the module docstring);
    ``embed`` overrides the embedding function (texts → ``(n, dim)`` array).
    Steps are numbered in the module docstring.
    """
    from kolm_compile import recall
    from kolm_compile.artifact import pack, sha256_file, verify_artifact
    from kolm_ledger.formats.manifest import MANIFEST_FILE
    from kolm_ledger.formats.receipts import REQUIRED, artifact_statement, sign_statement

    artifact, out = Path(artifact), Path(out)
    if trust is None:
        trust = sink.trust_state()
    with tempfile.TemporaryDirectory(prefix="kolm-recall-") as tmp:
        # (1) verify the old artifact; find its receipt
        old = verify_artifact(artifact, trust, into=Path(tmp) / "old")
        old_st = _find_artifact_receipt(sink, old.digest)
        # (2) corpus → chunks → embeddings
        manifest = old.manifest
        old_recall = manifest.recall
        if chunking is None:
            prev = old_recall.chunking if old_recall is not None else {}
            chunking = (
                recall.ChunkConfig.from_dict(prev)
                if prev.get("source") == "documents"
                else recall.ChunkConfig()
            )
        model_id = (old_recall.embedding_model if old_recall is not None else None) or (
            manifest.base_model.id if manifest.base_model is not None else None
        )
        if not model_id:
            raise InvalidInput(f"{artifact.name}: manifest names no embedding model or base model")
        if embed is None:
            from kolm_compile.student import embed_texts

            def embed(texts: Sequence[str]) -> Any:
                return embed_texts(texts, model_id)

        chunks = recall.chunk_documents(recall.load_corpus(corpus), chunking)
        # (3) rebuild recall/ and the manifest
        build = Path(tmp) / "new" / old.name
        shutil.copytree(old.directory, build)
        shutil.rmtree(build / "recall", ignore_errors=True)
        info = recall.build_index(
            chunks,
            embed,
            build / recall.INDEX_FILE,
            embedding_model=model_id,
            chunking=chunking.to_dict(),
        )
        # the artifact's default top-k survives a corpus update
        k = old_recall.k if old_recall is not None else None
        manifest = manifest.replace(recall=info.to_ref(k), previous_artifact=old.digest)
        (build / MANIFEST_FILE).write_bytes(manifest.to_json())
        # (4) re-pack, sign, verify what we wrote
        out.parent.mkdir(parents=True, exist_ok=True)
        digest = pack(build, out, key)
        verify_artifact(out, trust, into=Path(tmp) / "check")
    # (5) the linked artifact receipt
    pred = {k: v for k, v in old_st.predicate.items() if k != "time"}
    required = {k: pred.pop(k) for k in REQUIRED["artifact"]}
    required["checkpoint"] = _checkpoint(sink)
    pred.update(
        previous_artifact=old.digest,
        corpus_root=info.corpus_root,
        corpus_chunks=info.chunks,
        evaluated_as=old_st.predicate.get("evaluated_as", old.digest),
    )
    st = artifact_statement(
        artifact_digest=digest,
        file_name=out.name,
        file_digest=sha256_file(out),
        extra=pred,
        **required,
    )
    index, leaf = _append(sink, sign_statement(st, key))
    return UpdateResult(out, digest, old.digest, info.corpus_root, info.chunks, index, leaf)


def cmd_recall_update(a: argparse.Namespace) -> int:
    """Run ``kolm recall update``."""
    from kolm_compile.recall import ChunkConfig
    from kolm_compile.sinks import open_sink
    from kolm_ledger.keys import PrivateKey, TrustRoot

    keys = Path(a.keys)
    trust_path = Path(a.trust) if a.trust else keys / "trust.json"
    if bool(a.ledger) == bool(a.db):
        raise InvalidInput("give exactly one of --ledger HOST:PORT or --db URL")
    chunking = None
    if a.chunk_size is not None or a.chunk_overlap is not None or a.chunk_unit is not None:
        d = ChunkConfig()
        chunking = ChunkConfig(
            size=a.chunk_size if a.chunk_size is not None else d.size,
            overlap=a.chunk_overlap if a.chunk_overlap is not None else d.overlap,
            unit=a.chunk_unit or d.unit,
        )
    key = PrivateKey.load(keys / "compile.key")
    root = TrustRoot.load(trust_path)
    sink = open_sink(db=a.db, ledger=a.ledger, keys=keys, trust=root, timeout=30.0)
    try:
        # trust: the root plus every key receipt of the ledger (sink.trust_state())
        r = update_artifact(a.artifact, a.corpus, a.out, key=key, sink=sink, chunking=chunking)
    finally:
        sink.close()
    print(f"wrote {r.path} ({r.chunks} chunks, corpus root {r.corpus_root})")
    print(f"artifact {r.digest}")
    print(f"previous {r.previous}")
    print(f"receipt  index {r.receipt_index} leaf {r.receipt_leaf_hash}")
    return 0


def register(sub: Any) -> None:
    """Add ``recall update`` to the root ``kolm`` subparsers."""
    rc = sub.add_parser("recall", help="manage the recall index inside a .kolm")
    rsub = rc.add_subparsers(dest="recall_command", required=True)
    u = rsub.add_parser("update", help="rebuild recall/ from a new corpus as a new signed version")
    u.add_argument("artifact", help="the .kolm to update")
    u.add_argument("corpus", help="a JSONL of {id, text} documents or a folder of text files")
    u.add_argument(
        "--keys",
        required=True,
        help="key folder (kolm keys init): compile.key, trust.json, log.key for --db",
    )
    u.add_argument("--trust", help="trust root (default: KEYS/trust.json)")
    u.add_argument("--ledger", help="ledger service HOST:PORT")
    u.add_argument("--db", help="ledger database URL (in-process ledger; uses KEYS/log.key)")
    u.add_argument("--out", required=True, help="the new .kolm to write")
    u.add_argument("--chunk-size", type=int, help="units per chunk (default 200, or as before)")
    u.add_argument("--chunk-overlap", type=int, help="units shared by neighbours (default 40)")
    u.add_argument("--chunk-unit", choices=["words", "chars"], help="default words")
    u.set_defaults(func=cmd_recall_update)
