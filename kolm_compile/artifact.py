"""The ``.kolm`` artifact: a deterministic zip signed in the OpenSSF model-signing v1.0 layout.

Layout (every entry sorted, timestamps fixed at 1980-01-01, mode 0644)::

    <name>/manifest.json        format, name, base model, labels, threshold, kolm version
    <name>/task.json            the task spec (canonical)
    <name>/verifier.json        verifier name, version, params
    <name>/adapter/...          LoRA adapter (safetensors + config), head, labels, tokenizer
    <name>/base/...             optional: base weights (--bundle-base)
    <name>/recall/...           optional: recall index
    <name>/model.sig            sigstore bundle: DSSE envelope over an in-toto statement
                                (predicate https://model_signing/signature/v1.0) listing
                                every other file's SHA-256

``manifest.json`` fields (all required unless marked optional)::

    format            "kolm/v1"
    name              the task name
    task_type         "classify" | "extract" | "generate"
    labels            ordered label list (classify)
    base_model        {"id", "revision", "weights_digest"}   logical id, never a local path
    adapter           "adapter"                               folder holding the student
    max_length        tokenizer max length used in training
    confidence_threshold   escape-hatch threshold (student confidence below it → teacher)
    verifier          {"name", "version", "params"}
    spec_digest       the task spec digest
    kolm_version
    recall            optional: {"index": "recall/index.db", "corpus_root", "chunks", "dim",
                      "embedding_model", "chunking", "k"} (docs/RECALL.md)

Unzipped, ``<name>/`` verifies with ``model_signing verify key <name> --signature
<name>/model.sig --public_key compile.pub``. The **artifact digest** is that statement's
subject digest: SHA-256 over the file digests in name order. Signing uses RFC 6979
deterministic ECDSA, so the same inputs give a byte-identical ``.kolm``.

:func:`verify_artifact` re-implements the check with kolm's own code (no model_signing
needed at load time): (1) safe unzip (2) every file listed, nothing extra (3) each file
digest (4) the subject digest (5) the DSSE signature by a trusted, valid ``compile`` key
(6) with ``manifest["recall"]``: the index is a signed file and
:func:`kolm_compile.recall.verify_index` recomputes every chunk digest and the corpus
root, which must equal the manifest's (so the text a prediction cites is the signed text).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import stat
import tempfile
import zipfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from kolm_ledger._crypto import PrivateKey
from kolm_ledger.dsse import IN_TOTO_PAYLOAD_TYPE
from kolm_ledger.errors import ArtifactError, KolmError
from kolm_ledger.keys import TrustedKey
from kolm_ledger.model_signing import (
    MODEL_SIGNING_PREDICATE,
    SIGNATURE_FILE,
    artifact_digest,
    parse_model_signature,
)
from kolm_ledger.trust import TrustState

__all__ = [
    "FORMAT",
    "MODEL_SIGNING_PREDICATE",
    "SIGNATURE_FILE",
    "VerifiedArtifact",
    "artifact_digest",
    "pack",
    "sha256_file",
    "verify_artifact",
]

FORMAT = "kolm/v1"
BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
MAX_UNPACKED = 4 * 1024**3
MAX_FILES = 10_000


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(root: Path) -> list[str]:
    out = []
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            raise ArtifactError(f"{p.relative_to(root)} is a symlink; artifacts hold plain files")
        if p.is_file():
            out.append(p.relative_to(root).as_posix())
    return out


def _statement(name: str, resources: list[tuple[str, str]]) -> dict[str, Any]:
    return {
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [{"name": name, "digest": {"sha256": artifact_digest(resources)}}],
        "predicateType": MODEL_SIGNING_PREDICATE,
        "predicate": {
            "serialization": {
                "method": "files",
                "hash_type": "sha256",
                "allow_symlinks": False,
                "ignore_paths": [SIGNATURE_FILE],
            },
            "resources": [{"name": n, "algorithm": "sha256", "digest": d} for n, d in resources],
        },
    }


def sign_directory(model_dir: Path, key: PrivateKey) -> str:
    """Write ``model_dir/model.sig`` over every other file; returns the artifact digest."""
    files = [f for f in _files(model_dir) if f != SIGNATURE_FILE]
    resources = sorted((f, sha256_file(model_dir / f)) for f in files)
    st = _statement(model_dir.name, resources)
    payload = json.dumps(st, indent=2, sort_keys=False).encode()
    from kolm_ledger.dsse import pae

    sig = key.sign(pae(IN_TOTO_PAYLOAD_TYPE, payload), deterministic=True)
    pem = key.public_key().pem().encode()
    bundle = {
        "mediaType": BUNDLE_MEDIA_TYPE,
        "verificationMaterial": {
            "publicKey": {"hint": hashlib.sha256(pem).hexdigest()},
            "tlogEntries": [],
        },
        "dsseEnvelope": {
            "payload": base64.b64encode(payload).decode(),
            "payloadType": IN_TOTO_PAYLOAD_TYPE,
            "signatures": [{"sig": base64.b64encode(sig).decode()}],
        },
    }
    (model_dir / SIGNATURE_FILE).write_text(json.dumps(bundle, indent=2) + "\n")
    return str(st["subject"][0]["digest"]["sha256"])


def pack(model_dir: Path, out: Path, key: PrivateKey) -> str:
    """Sign ``model_dir`` and zip it deterministically to ``out``; returns the artifact digest.

    The zip holds ``<model_dir.name>/...`` entries.
    """
    digest = sign_directory(model_dir, key)
    tmp = out.with_name(out.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as z:
        for f in _files(model_dir):
            info = zipfile.ZipInfo(f"{model_dir.name}/{f}", date_time=_ZIP_TIME)
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3
            with open(model_dir / f, "rb") as src, z.open(info, "w") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    os.replace(tmp, out)
    return digest


@dataclass(frozen=True)
class VerifiedArtifact:
    """A ``.kolm`` that passed :func:`verify_artifact`, unpacked in ``directory``."""

    path: Path
    directory: Path
    name: str
    digest: str
    file_digest: str
    signer: TrustedKey
    manifest: dict[str, Any]
    resources: tuple[tuple[str, str], ...]


def _safe_extract(zpath: Path, dest: Path) -> str:
    try:
        z = zipfile.ZipFile(zpath)
    except (zipfile.BadZipFile, OSError) as e:
        raise ArtifactError(f"{zpath.name}: not a readable zip archive: {e}") from e
    with z:
        infos = z.infolist()
        if len(infos) > MAX_FILES:
            raise ArtifactError(f"{zpath.name}: {len(infos)} entries, limit {MAX_FILES}")
        if sum(i.file_size for i in infos) > MAX_UNPACKED:
            raise ArtifactError(f"{zpath.name}: unpacks to more than {MAX_UNPACKED} bytes")
        names = [i.filename for i in infos]
        if len(set(names)) != len(names):
            raise ArtifactError(f"{zpath.name}: duplicate entry names")
        tops = set()
        for i in infos:
            p = PurePosixPath(i.filename)
            if p.is_absolute() or ".." in p.parts or "\\" in i.filename or len(p.parts) < 2:
                raise ArtifactError(f"{zpath.name}: unsafe entry name {i.filename[:80]!r}")
            if stat.S_ISLNK(i.external_attr >> 16):
                raise ArtifactError(f"{zpath.name}: entry {i.filename[:80]!r} is a symlink")
            tops.add(p.parts[0])
        if len(tops) != 1:
            raise ArtifactError(f"{zpath.name}: want one top-level folder, found {sorted(tops)}")
        try:
            for i in infos:
                if i.is_dir():
                    continue
                target = dest / i.filename
                target.parent.mkdir(parents=True, exist_ok=True)
                with z.open(i) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        except (zipfile.BadZipFile, OSError, EOFError, zlib_error()) as e:
            raise ArtifactError(f"{zpath.name}: corrupt entry: {e}") from e
    return tops.pop()


def zlib_error() -> type[Exception]:
    """zlib's error class (corrupt deflate streams)."""
    import zlib

    return zlib.error


def verify_artifact(
    path: Path, trust: TrustState, *, at: datetime | None = None, into: Path | None = None
) -> VerifiedArtifact:
    """Verify a ``.kolm`` against the trust state; raises :class:`ArtifactError` naming why.

    Unpacks into ``into`` (default: a fresh temporary directory, kept for loading).
    """
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: no such artifact file")
    file_digest = sha256_file(path)
    dest = Path(into) if into else Path(tempfile.mkdtemp(prefix="kolm-artifact-"))
    # (1) safe unzip
    name = _safe_extract(path, dest)
    root = dest / name
    sig_path = root / SIGNATURE_FILE
    if not sig_path.is_file():
        raise ArtifactError(f"{path.name}: no {SIGNATURE_FILE} signature")
    ms = parse_model_signature(sig_path.read_bytes(), path.name)
    resources, claimed = ms.resources, ms.claimed
    # (2) every file listed, nothing extra
    on_disk = {f for f in _files(root) if f != SIGNATURE_FILE}
    listed = {n for n, _ in resources}
    if on_disk != listed:
        extra, missing = sorted(on_disk - listed), sorted(listed - on_disk)
        raise ArtifactError(
            f"{path.name}: files differ from the signed manifest "
            f"(unlisted: {extra[:5]}, missing: {missing[:5]})"
        )
    # (3) each file digest
    for n, d in resources:
        actual = sha256_file(root / n)
        if actual != d:
            raise ArtifactError(
                f"{path.name}: {n} has digest {actual[:16]}…, the signed manifest says {d[:16]}…"
            )
    # (4) subject digest
    digest = artifact_digest(resources)
    if digest != claimed:
        raise ArtifactError(
            f"{path.name}: subject digest {claimed[:16]}… does not match the files ({digest[:16]}…)"
        )
    # (5) signature by a trusted compile key, valid now (or ``at``) and not revoked
    signer: TrustedKey | None = None
    reasons = []
    for k in trust.keys():  # noqa: SIM118 - TrustState.keys() is a method, not a dict
        if k.role != "compile":
            continue
        try:
            ms.verify_by(k)
        except KolmError:
            continue
        try:
            k.check_valid_at(at or datetime.now(UTC))
        except KolmError as e:
            reasons.append(str(e))
            continue
        signer = k
        break
    if signer is None:
        why = f" ({'; '.join(reasons)})" if reasons else ""
        raise ArtifactError(
            f"{path.name}: {SIGNATURE_FILE} is not signed by a trusted, valid compile key{why}"
        )
    try:
        manifest = json.loads((root / "manifest.json").read_bytes())
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            fmt = manifest.get("format") if isinstance(manifest, dict) else None
            raise ValueError(f"format {fmt!r}, want {FORMAT!r}")
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path.name}: bad manifest.json: {e}") from e
    # (6) the recall index, if any, against the corpus root the signed manifest gives
    if manifest.get("recall") is not None:
        _verify_recall(path.name, root, manifest["recall"], listed)
    return VerifiedArtifact(path, root, name, digest, file_digest, signer, manifest, resources)


def _verify_recall(name: str, root: Path, field: Any, listed: set[str]) -> None:
    """Step (6) of :func:`verify_artifact`; raises :class:`ArtifactError` naming why."""
    from kolm_compile.recall import IndexInfo, verify_index

    if not isinstance(field, dict):
        raise ArtifactError(f"{name}: manifest recall field must be an object")
    info = IndexInfo.from_manifest(field)
    k = field.get("k")
    if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
        raise ArtifactError(f"{name}: manifest recall.k must be an integer >= 1, got {k!r}")
    if info.index not in listed:
        raise ArtifactError(
            f"{name}: manifest recall.index {info.index[:80]!r} is not a signed file of the artifact"
        )
    try:
        verify_index(root / info.index, info.corpus_root, expected_chunks=info.chunks)
    except ArtifactError as e:
        raise ArtifactError(f"{name}: {e}") from e


def read_bytes_of(zpath: Path, member: str) -> bytes:
    """One member's bytes (for tests and tools)."""
    with zipfile.ZipFile(zpath) as z:
        return z.read(member)
