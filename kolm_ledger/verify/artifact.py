"""The one check of a ``.kolm`` file: signature and file list first, then capped streaming.

Every reader of a ``.kolm`` goes through :func:`open_artifact`: the inference loader
(``kolm_compile.artifact.verify_artifact``, which unpacks), ``kolm verify --artifact`` and
an auditor's recall check (:func:`kolm_ledger.verify.recall_proof.read_artifact_corpus`, which
hash every entry and unpack at most two). Torch-free and ``kolm_compile``-free. Nothing
is written to disk before the signature and the signed file list are checked, and nothing
is written at all for an artifact whose content does not match them. The order:

1. **The zip's directory only** (no entry is decompressed): the end record's entry count
   is at most :attr:`ArtifactLimits.max_entries` before the central directory is parsed;
   every entry is a regular file or a directory (no symlink, device or FIFO), not
   encrypted, stored or deflated (no bzip2/lzma: their decoders cannot bound their
   output), named ``<top>/<relative path>`` under one top-level folder with no empty,
   ``.`` or ``..`` component, no backslash, no control character, and no name twice.
2. **``model.sig``** (declared and read size at most
   :attr:`ArtifactLimits.max_signature_bytes`) parses
   (:func:`kolm_ledger.formats.model_signing.parse_model_signature`); its listed names obey the
   same name rules, none twice, each digest 64 lowercase hex; the subject digest is the
   SHA-256 over the listed digests; it is signed by one of the given ``compile`` keys
   valid (and not revoked) at the given time.
3. **The file list**: the zip's files (besides ``model.sig``) are exactly the listed
   files — an unsigned extra entry and a missing signed file are both refused; no listed
   file has a pickle-format suffix (:data:`PICKLE_SUFFIXES`: loading one runs code); the
   declared sizes fit :attr:`ArtifactLimits.max_file_bytes` each and
   :attr:`ArtifactLimits.max_total_bytes` together; with ``expect_digest``, the subject
   digest is that artifact.
4. **Content** (:meth:`OpenedArtifact.check`): each listed entry is decompressed in 1 MiB
   blocks and hashed, with no write; reading stops (refused) as soon as an entry passes
   its declared size or a cap, and an entry that ends short of its declared size, fails
   its CRC or hashes to anything but its listed digest is refused.
5. **Unpacking** (:meth:`OpenedArtifact.extract`), only after step 4 passed for every
   entry: the listed files (or a chosen subset) are written into a fresh temporary
   folder beside the destination, hashed again while written (the zip could change
   underneath), and the folder is renamed into place in one step; on any failure the
   temporary folder is removed, so a refused artifact leaves nothing behind.

Its ``manifest.json`` is read with :meth:`OpenedArtifact.read_manifest` (in the zip) or
:meth:`kolm_ledger.formats.manifest.Manifest.read` (unpacked): one parser,
:class:`kolm_ledger.formats.manifest.Manifest`.

Example::

    with open_artifact("router.kolm", trust.by_role("compile"), at=now) as art:
        art.digest, art.signer.keyid       # known after step 2, before any content is read
        root = art.extract(workdir / art.digest)   # workdir/<digest>/<top>/...
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import stat
import tempfile
import zipfile
import zlib
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO

from kolm_ledger.errors import ArtifactError, KolmError
from kolm_ledger.formats.manifest import MANIFEST_FILE, Manifest
from kolm_ledger.formats.model_signing import (
    SIGNATURE_FILE,
    ModelSignature,
    artifact_digest,
    parse_model_signature,
)
from kolm_ledger.keys import TrustedKey, format_time

__all__ = [
    "DEFAULT_LIMITS",
    "PICKLE_SUFFIXES",
    "ArtifactLimits",
    "OpenedArtifact",
    "check_artifact",
    "open_artifact",
]

#: Suffixes of pickle-format files (PyTorch ``.bin``/``.pt``, joblib, ...): loading one runs
#: code, so an artifact holding one is refused even when it is signed. Weights travel as
#: safetensors.
PICKLE_SUFFIXES = frozenset({".bin", ".ckpt", ".dill", ".joblib", ".pickle", ".pkl", ".pt", ".pth"})

_BLOCK = 1 << 20
_HEX64 = re.compile(r"[0-9a-f]{64}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_METHODS = frozenset({zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED})


@dataclass(frozen=True)
class ArtifactLimits:
    """Caps on what one ``.kolm`` may hold (every reader uses the same defaults)."""

    max_entries: int = 10_000
    max_file_bytes: int = 2 * 1024**3  # one unpacked file
    max_total_bytes: int = 4 * 1024**3  # every unpacked file together
    max_signature_bytes: int = 4 * 1024**2  # model.sig (lists up to max_entries files)


DEFAULT_LIMITS = ArtifactLimits()


def _short(s: str) -> str:
    return repr(s[:80])


def _check_rel(rel: str, where: str) -> None:
    """A relative POSIX path with no empty, ``.`` or ``..`` part, backslash or control char."""
    parts = rel.split("/")
    if (
        not rel
        or rel.startswith("/")
        or "\\" in rel
        or _CONTROL.search(rel)
        or any(p in ("", ".", "..") for p in parts)
    ):
        raise ArtifactError(f"{where}: unsafe entry name {_short(rel)}")


def _entry_count(f: IO[bytes]) -> int | None:
    """The entry count the zip's end record declares (read before the directory is parsed)."""
    end_rec = getattr(zipfile, "_EndRecData", None)
    if end_rec is None:  # pragma: no cover - every CPython since 2.6 has it
        return None
    try:
        rec = end_rec(f)
    except OSError:
        return None
    if not rec:
        return None
    return int(rec[getattr(zipfile, "_ECD_ENTRIES_TOTAL", 4)])


class OpenedArtifact:
    """A ``.kolm`` whose directory, signature and file list passed (steps 1-3).

    Use as a context manager (or call :meth:`close`). :meth:`check` and :meth:`extract`
    run the content steps. ``name`` is the file name used in messages.
    """

    def __init__(
        self,
        path: Path,
        zf: zipfile.ZipFile,
        f: IO[bytes],
        top: str,
        signature: ModelSignature,
        signature_bytes: bytes,
        signer: TrustedKey,
        infos: dict[str, zipfile.ZipInfo],
        limits: ArtifactLimits,
    ) -> None:
        self.path = path
        self.name = path.name
        self.top = top
        self.signature = signature
        self.signer = signer
        self.resources = signature.resources
        self.digest = signature.claimed
        self.limits = limits
        self._zf = zf
        self._f = f
        self._sig_bytes = signature_bytes
        self._infos = infos
        self._digests = dict(signature.resources)
        self._checked = False

    def __enter__(self) -> OpenedArtifact:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the zip file."""
        self._zf.close()
        self._f.close()

    @property
    def unpacked_bytes(self) -> int:
        """The declared size of every listed file together."""
        return sum(self._infos[n].file_size for n, _ in self.resources)

    def _stream(self, rel: str, dst: IO[bytes] | None, budget: list[int]) -> None:
        """Decompress one listed entry (capped), hash it, optionally write it; check it."""
        info = self._infos[rel]
        want = self._digests[rel]
        h = hashlib.sha256()
        n = 0
        try:
            with self._zf.open(info) as src:
                while True:
                    block = src.read(_BLOCK)
                    if not block:
                        break
                    n += len(block)
                    budget[0] -= len(block)
                    if n > info.file_size:
                        raise ArtifactError(
                            f"{self.name}: {rel} holds more than the {info.file_size} bytes "
                            "its zip entry declares"
                        )
                    if n > self.limits.max_file_bytes or budget[0] < 0:
                        raise ArtifactError(
                            f"{self.name}: {rel} unpacks past the cap "
                            f"({self.limits.max_file_bytes} bytes a file, "
                            f"{self.limits.max_total_bytes} in all)"
                        )
                    h.update(block)
                    if dst is not None:
                        dst.write(block)
        except ArtifactError:
            raise
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error, ValueError) as e:
            raise ArtifactError(f"{self.name}: corrupt entry {rel}: {e}") from e
        if n != info.file_size:
            raise ArtifactError(
                f"{self.name}: {rel} holds {n} bytes, its zip entry declares {info.file_size}"
            )
        got = h.hexdigest()
        if got != want:
            raise ArtifactError(
                f"{self.name}: {rel} has digest {got[:16]}…, the signed manifest says {want[:16]}…"
            )

    def check(self) -> None:
        """Step 4: hash every listed entry (capped, nothing written); idempotent."""
        if self._checked:
            return
        budget = [self.limits.max_total_bytes]
        for rel, _ in self.resources:
            self._stream(rel, None, budget)
        self._checked = True

    def extract(self, dest: str | os.PathLike[str], *, only: Collection[str] | None = None) -> Path:
        """Steps 4-5: check, then unpack into ``dest`` (atomically); returns ``dest/<top>``.

        ``dest`` must not exist or be an empty folder. ``only``: unpack just these listed
        files (``model.sig`` is written only with the full set). Every listed file is
        checked either way.
        """
        self.check()
        dest = Path(dest)
        listed = self._digests
        if only is not None:
            unknown = sorted(set(only) - set(listed))
            if unknown:
                raise ArtifactError(f"{self.name}: {unknown[0][:80]!r} is not a listed file")
        wanted = [rel for rel, _ in self.resources if only is None or rel in only]
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.part-", dir=dest.parent))
        try:
            root = tmp / self.top
            budget = [self.limits.max_total_bytes]
            for rel in wanted:
                target = root / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
                with os.fdopen(fd, "wb") as out:
                    self._stream(rel, out, budget)
            if only is None:
                root.mkdir(parents=True, exist_ok=True)
                (root / SIGNATURE_FILE).write_bytes(self._sig_bytes)
            try:
                os.rename(tmp, dest)  # onto a missing or empty folder, in one step
            except OSError as e:
                raise ArtifactError(f"{self.name}: cannot unpack into {dest}: {e.strerror}") from e
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return dest / self.top

    def read_manifest(self) -> Manifest:
        """``manifest.json``, checked against its digest (:meth:`read`) and parsed
        (:meth:`kolm_ledger.formats.manifest.Manifest.parse`)."""
        return Manifest.parse(self.read(MANIFEST_FILE), self.name)

    def read(self, rel: str) -> bytes:
        """One listed file's bytes (checked against its digest; at most ``max_file_bytes``)."""
        if rel not in self._digests:
            raise ArtifactError(f"{self.name}: {rel[:80]!r} is not listed in {SIGNATURE_FILE}")
        buf = io.BytesIO()
        self._stream(rel, buf, [self.limits.max_total_bytes])
        return buf.getvalue()


def _open_regular(path: Path) -> IO[bytes]:
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise ArtifactError(f"{path.name}: not a regular file")
        f = open(path, "rb")  # noqa: SIM115 - closed by OpenedArtifact.close or below
    except OSError as e:
        raise ArtifactError(f"{path.name}: cannot read the artifact file: {e.strerror}") from e
    return f


def find_signer(
    ms: ModelSignature, keys: Iterable[TrustedKey], at: datetime, name: str
) -> TrustedKey:
    """The first ``compile`` key among ``keys`` that signed ``ms`` and is valid at ``at``."""
    reasons = []
    for k in keys:
        if k.role != "compile":
            continue
        try:
            ms.verify_by(k)
        except KolmError:
            continue
        try:
            k.check_valid_at(at)
        except KolmError as e:
            reasons.append(str(e))
            continue
        return k
    why = f" ({'; '.join(reasons)})" if reasons else ""
    raise ArtifactError(
        f"{name}: {SIGNATURE_FILE} is not signed by a trusted, valid compile key "
        f"at {format_time(at)}{why}"
    )


def open_artifact(
    path: str | os.PathLike[str],
    keys: Iterable[TrustedKey],
    *,
    at: datetime,
    limits: ArtifactLimits = DEFAULT_LIMITS,
    expect_digest: str | None = None,
) -> OpenedArtifact:
    """Steps 1-3 (module docstring) on ``path``; raises :class:`ArtifactError` naming why.

    ``keys``: candidate signers (only ``compile`` keys count), judged at ``at``.
    """
    p = Path(path)
    name = p.name
    f = _open_regular(p)
    try:
        count = _entry_count(f)
        if count is not None and count > limits.max_entries:
            raise ArtifactError(f"{name}: {count} zip entries, limit {limits.max_entries}")
        try:
            zf = zipfile.ZipFile(f)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
            raise ArtifactError(f"{name}: not a readable zip archive: {e}") from e
    except BaseException:
        f.close()
        raise
    try:
        return _open(p, zf, f, keys, at, limits, expect_digest)
    except BaseException:
        zf.close()
        f.close()
        raise


def _open(
    p: Path,
    zf: zipfile.ZipFile,
    f: IO[bytes],
    keys: Iterable[TrustedKey],
    at: datetime,
    limits: ArtifactLimits,
    expect_digest: str | None,
) -> OpenedArtifact:
    name = p.name
    infos = zf.infolist()
    # (1) the directory
    if len(infos) > limits.max_entries:
        raise ArtifactError(f"{name}: {len(infos)} zip entries, limit {limits.max_entries}")
    seen: set[str] = set()
    tops: set[str] = set()
    files: dict[str, zipfile.ZipInfo] = {}
    for i in infos:
        raw = i.filename
        if raw in seen:
            raise ArtifactError(f"{name}: duplicate entry name {_short(raw)}")
        seen.add(raw)
        is_dir = raw.endswith("/")
        entry = raw[:-1] if is_dir else raw
        _check_rel(entry, name)
        mode = i.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise ArtifactError(f"{name}: entry {_short(raw)} is a symlink")
        if mode and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise ArtifactError(f"{name}: entry {_short(raw)} is not a regular file")
        if i.flag_bits & 0x1:
            raise ArtifactError(f"{name}: entry {_short(raw)} is encrypted")
        if i.compress_type not in _METHODS:
            raise ArtifactError(
                f"{name}: entry {_short(raw)} uses compression method {i.compress_type}; "
                "only stored (0) and deflated (8) are read"
            )
        top, _, rel = entry.partition("/")
        tops.add(top)
        if is_dir or (mode and stat.S_ISDIR(mode)):
            if i.file_size:
                raise ArtifactError(f"{name}: directory entry {_short(raw)} holds data")
            continue
        if not rel:
            raise ArtifactError(f"{name}: entry {_short(raw)} is outside the top-level folder")
        files[rel] = i
    if len(tops) != 1:
        raise ArtifactError(f"{name}: want one top-level folder, found {sorted(tops)[:5]}")
    (top,) = tops
    # (2) model.sig: size-capped, parsed, digests, signer
    sig_info = files.pop(SIGNATURE_FILE, None)
    if sig_info is None:
        raise ArtifactError(f"{name}: no {SIGNATURE_FILE} signature")
    if sig_info.file_size > limits.max_signature_bytes:
        raise ArtifactError(
            f"{name}: {SIGNATURE_FILE} declares {sig_info.file_size} bytes, "
            f"limit {limits.max_signature_bytes}"
        )
    try:
        with zf.open(sig_info) as src:
            sig_bytes = src.read(limits.max_signature_bytes + 1)
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error, ValueError) as e:
        raise ArtifactError(f"{name}: corrupt entry {SIGNATURE_FILE}: {e}") from e
    if len(sig_bytes) > limits.max_signature_bytes:
        raise ArtifactError(f"{name}: {SIGNATURE_FILE} is over {limits.max_signature_bytes} bytes")
    ms = parse_model_signature(sig_bytes, name)
    listed: set[str] = set()
    for rel, digest in ms.resources:
        _check_rel(rel, f"{name}: {SIGNATURE_FILE}")
        if rel in listed or rel == SIGNATURE_FILE:
            raise ArtifactError(f"{name}: {SIGNATURE_FILE} lists {_short(rel)} twice")
        if not _HEX64.fullmatch(digest):
            raise ArtifactError(
                f"{name}: {SIGNATURE_FILE} gives {_short(rel)} a digest that is not "
                "64 lowercase hex digits"
            )
        listed.add(rel)
    if artifact_digest(ms.resources) != ms.claimed:
        raise ArtifactError(
            f"{name}: subject digest {ms.claimed[:16]}… does not match the listed files "
            f"({artifact_digest(ms.resources)[:16]}…)"
        )
    signer = find_signer(ms, keys, at, name)
    # (3) the file list, suffixes and declared sizes
    have = set(files)
    if have != listed:
        extra, missing = sorted(have - listed), sorted(listed - have)
        raise ArtifactError(
            f"{name}: files differ from the signed manifest "
            f"(unlisted: {extra[:5]}, missing: {missing[:5]})"
        )
    for rel in sorted(listed):
        suffix = Path(rel).suffix.lower()
        if suffix in PICKLE_SUFFIXES:
            raise ArtifactError(
                f"{name}: {rel[:80]} is a pickle-format file ({suffix}); artifacts hold no "
                "pickles (weights travel as safetensors)"
            )
        if files[rel].file_size > limits.max_file_bytes:
            raise ArtifactError(
                f"{name}: {rel[:80]} declares {files[rel].file_size} bytes, "
                f"limit {limits.max_file_bytes} a file"
            )
    total = sum(i.file_size for i in files.values())
    if total > limits.max_total_bytes:
        raise ArtifactError(
            f"{name}: unpacks to {total} bytes, limit {limits.max_total_bytes} in all"
        )
    if expect_digest is not None and ms.claimed != expect_digest:
        raise ArtifactError(f"{name} is artifact {ms.claimed[:16]}…, want {expect_digest[:16]}…")
    return OpenedArtifact(p, zf, f, top, ms, sig_bytes, signer, files, limits)


def check_artifact(
    path: str | os.PathLike[str],
    keys: Iterable[TrustedKey],
    *,
    at: datetime,
    limits: ArtifactLimits = DEFAULT_LIMITS,
    expect_digest: str | None = None,
) -> OpenedArtifact:
    """Steps 1-4 with nothing written: the whole check of ``kolm verify --artifact``.

    Returns the (closed) :class:`OpenedArtifact` for its ``digest``, ``signer``, ``resources``.
    """
    with open_artifact(path, keys, at=at, limits=limits, expect_digest=expect_digest) as art:
        art.check()
    return art
