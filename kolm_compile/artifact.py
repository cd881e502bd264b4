"""The ``.kolm`` artifact: a deterministic zip signed in the OpenSSF model-signing v1.0 layout.

Layout (every entry sorted, timestamps fixed at 1980-01-01, mode 0644)::

    <name>/manifest.json        format, name, base model, labels, threshold, kolm version
    <name>/task.json            the task spec (canonical)
    <name>/verifier.json        verifier name, version, params
    <name>/adapter/...          LoRA adapter (safetensors + config), head, labels, tokenizer
    <name>/evaluation/outcomes.jsonl   per-example outcomes of the evaluation (one RFC 8785
                                line each; their root is the eval receipt's outcome_root)
    <name>/base/...             optional: base weights (--bundle-base)
    <name>/recall/...           optional: recall index
    <name>/model.sig            sigstore bundle: DSSE envelope over an in-toto statement
                                (predicate https://model_signing/signature/v1.0) listing
                                every other file's SHA-256

``manifest.json`` is :class:`kolm_ledger.formats.manifest.Manifest` (its fields are listed
there): the compile job writes it with :meth:`~kolm_ledger.formats.manifest.Manifest.to_json`, and
:func:`verify_artifact` parses it (a field of the wrong type is refused, naming it).

Unzipped, ``<name>/`` verifies with ``model_signing verify key <name> --signature
<name>/model.sig --public_key compile.pub``. The **artifact digest** is that statement's
subject digest: SHA-256 over the file digests in name order. Signing uses RFC 6979
deterministic ECDSA, so the same inputs give a byte-identical ``.kolm``.

:func:`verify_artifact` re-implements the check with kolm's own code (no model_signing
needed at load time), through :mod:`kolm_ledger.verify.artifact` — the one check that
``kolm verify --artifact`` and the auditor run too — and checks before it unpacks:
(1) the zip directory (one top folder, safe names, no symlinks, no duplicates, entry
count) (2) ``model.sig`` (size-capped), its subject digest and the DSSE signature by a
trusted ``compile`` key valid now (or ``at``) and not revoked (3) every file listed,
nothing extra, no pickle-format file, declared sizes within the caps (4) each file's
digest, streamed with nothing written (5) only then unpacking, atomically, and
``manifest.json`` parsed (:meth:`~kolm_ledger.formats.manifest.Manifest.read`) (6) with a
``recall`` section: the index is a signed file and
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
from kolm_ledger.errors import ArtifactError
from kolm_ledger.formats.dsse import IN_TOTO_PAYLOAD_TYPE
from kolm_ledger.formats.manifest import FORMAT, Manifest, RecallRef
from kolm_ledger.formats.model_signing import (
    MODEL_SIGNING_PREDICATE,
    SIGNATURE_FILE,
    artifact_digest,
)
from kolm_ledger.keys import TrustedKey, TrustRoot
from kolm_ledger.verify.artifact import (
    DEFAULT_LIMITS,
    PICKLE_SUFFIXES,
    ArtifactLimits,
    OpenedArtifact,
    open_artifact,
)
from kolm_ledger.verify.trust import TrustState

__all__ = [
    "FORMAT",
    "MODEL_SIGNING_PREDICATE",
    "SIGNATURE_FILE",
    "Manifest",
    "VerifiedArtifact",
    "artifact_digest",
    "open_verified",
    "pack",
    "sha256_file",
    "unpack_verified",
    "verify_artifact",
]

BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


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
    for f in files:
        if PurePosixPath(f).suffix.lower() in PICKLE_SUFFIXES:
            raise ArtifactError(
                f"{model_dir.name}/{f} is a pickle-format file; artifacts hold no pickles "
                "(loaders refuse them: save weights as safetensors)"
            )
    resources = sorted((f, sha256_file(model_dir / f)) for f in files)
    st = _statement(model_dir.name, resources)
    payload = json.dumps(st, indent=2, sort_keys=False).encode()
    from kolm_ledger.formats.dsse import pae

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
    manifest: Manifest
    resources: tuple[tuple[str, str], ...]


def _signers(trust: TrustState | TrustRoot) -> list[TrustedKey]:
    keys = trust.keys
    return list(keys() if callable(keys) else keys)


def open_verified(
    path: Path,
    trust: TrustState | TrustRoot,
    *,
    at: datetime | None = None,
    limits: ArtifactLimits = DEFAULT_LIMITS,
) -> OpenedArtifact:
    """Steps (1)-(3) of :func:`verify_artifact` with nothing unpacked: the zip directory,
    ``model.sig``, its signer and the signed file list (:func:`kolm_ledger.verify.artifact.
    open_artifact`). The caller closes it; :func:`unpack_verified` finishes the check."""
    return open_artifact(path, _signers(trust), at=at or datetime.now(UTC), limits=limits)


def unpack_verified(opened: OpenedArtifact, into: Path) -> VerifiedArtifact:
    """Steps (4)-(6) of :func:`verify_artifact` on an opened artifact: every entry hashed,
    then unpacked atomically into ``into`` (missing or empty), the manifest and recall
    index checked. A refusal leaves ``into`` absent."""
    into = Path(into)
    root = opened.extract(into)
    try:
        manifest = Manifest.read(root, opened.name)
        # (6) the recall index, if any, against the corpus root the signed manifest gives
        listed = {n for n, _ in opened.resources}
        if manifest.recall is not None:
            _verify_recall(opened.name, root, manifest.recall, listed)
        file_digest = sha256_file(opened.path)
    except BaseException:
        shutil.rmtree(into, ignore_errors=True)
        raise
    return VerifiedArtifact(
        opened.path,
        root,
        opened.top,
        opened.digest,
        file_digest,
        opened.signer,
        manifest,
        opened.resources,
    )


def verify_artifact(
    path: Path,
    trust: TrustState | TrustRoot,
    *,
    at: datetime | None = None,
    into: Path | None = None,
    limits: ArtifactLimits = DEFAULT_LIMITS,
) -> VerifiedArtifact:
    """Verify a ``.kolm`` against the trust state; raises :class:`ArtifactError` naming why.

    The checks are :mod:`kolm_ledger.verify.artifact`'s, the same ``kolm verify --artifact``
    and the auditor run, then the manifest and recall index. Unpacks into ``into`` (missing
    or empty; default: a fresh temporary directory, kept for loading) only once every
    entry matched its signed digest; a refused artifact leaves nothing unpacked.
    """
    with open_verified(Path(path), trust, at=at, limits=limits) as opened:
        dest = Path(into) if into else Path(tempfile.mkdtemp(prefix="kolm-artifact-"))
        return unpack_verified(opened, dest)


def _verify_recall(name: str, root: Path, field: RecallRef, listed: set[str]) -> None:
    """Step (6) of :func:`verify_artifact`; raises :class:`ArtifactError` naming why."""
    from kolm_compile.recall import IndexInfo, verify_index

    info = IndexInfo.from_ref(field)
    if info.index not in listed:
        raise ArtifactError(
            f"{name}: manifest recall.index {info.index[:80]!r} is not a signed file of the artifact"
        )
    try:
        verify_index(root / info.index, info.corpus_root, expected_chunks=info.chunks)
    except ArtifactError as e:
        raise ArtifactError(f"{name}: {e}") from e
