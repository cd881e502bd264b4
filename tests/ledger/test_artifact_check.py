"""The one ``.kolm`` check (kolm_ledger.verify.artifact): the loader's unpacking
(kolm_compile.artifact.verify_artifact) and ``kolm verify --artifact`` refuse the same
files, signature and file list are checked before anything is written, size caps and zip
bombs stop early, and a refused artifact leaves nothing on disk. No torch: the artifacts
are real signed ``.kolm`` files of small made-up content.
"""

from __future__ import annotations

import contextlib
import struct
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from support.artifacts import (
    REFUSED,
    Art,
    _info,
    entries,
    make_bad,
    write_model,
    write_zip,
)

from kolm_compile.artifact import pack, verify_artifact
from kolm_infer.receipts import sign_prediction
from kolm_ledger.errors import ArtifactError
from kolm_ledger.keys import PrivateKey, init_keys
from kolm_ledger.log.ledger import Ledger
from kolm_ledger.storage import Store
from kolm_ledger.verify.artifact import (
    ArtifactLimits,
    check_artifact,
    open_artifact,
)


@pytest.fixture(scope="module")
def art(tmp_path_factory: pytest.TempPathFactory) -> Art:
    root = tmp_path_factory.mktemp("artifact-check")
    trust = init_keys(root / "keys", now=datetime.now(UTC) - timedelta(days=1))
    src = write_model(root / "src")
    path = root / "router.kolm"
    digest = pack(src, path, PrivateKey.load(root / "keys" / "compile.key"))
    return Art(root, root / "keys", trust, path, digest, src)


NOW = datetime.now(UTC)


# --------------------------------------------------------------------------- the check


def test_a_good_artifact_passes_and_unpacks_atomically(art: Art, tmp_path: Path) -> None:
    checked = check_artifact(art.path, art.trust.by_role("compile"), at=NOW)
    assert checked.digest == art.digest and checked.top == "router"
    assert checked.signer.keyid == art.key("compile").keyid()
    va = verify_artifact(art.path, art.trust, into=tmp_path / "u")
    assert va.directory == tmp_path / "u" / "router" and va.digest == art.digest
    got = sorted(p.relative_to(va.directory).as_posix() for p in va.directory.rglob("*"))
    assert got == [
        "adapter",
        "adapter/adapter_model.safetensors",
        "adapter/tokenizer.json",
        "manifest.json",
        "model.sig",
        "task.json",
    ]
    for f in ("manifest.json", "adapter/adapter_model.safetensors"):
        assert (va.directory / f).read_bytes() == (art.src / f).read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["u"]  # no temporary folder left


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_the_check_refuses_and_writes_nothing(
    art: Art, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    bad = make_bad(art, case, tmp_path / "bad.kolm", monkeypatch)
    want = REFUSED[case][1]
    with pytest.raises(ArtifactError) as ei:
        check_artifact(bad, art.trust.by_role("compile"), at=NOW)
    assert want in str(ei.value)
    assert ei.value.grpc_code == "FAILED_PRECONDITION"
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(ArtifactError) as ei:
        verify_artifact(bad, art.trust, into=work / "u")
    assert want in str(ei.value)
    assert list(work.iterdir()) == []  # a refused load leaves nothing on disk


def test_an_untrusted_or_revoked_signer_is_refused_before_any_content(
    art: Art, tmp_path: Path
) -> None:
    other = tmp_path / "rogue.kolm"
    pack(write_model(tmp_path / "src"), other, PrivateKey.generate())
    with pytest.raises(ArtifactError, match="not signed by a trusted, valid compile key"):
        open_artifact(other, art.trust.by_role("compile"), at=NOW)
    ck = art.key("compile").keyid()
    revoked = art.trust.revoke(ck, NOW - timedelta(hours=1))
    with pytest.raises(ArtifactError, match="revoked"):
        open_artifact(art.path, revoked.by_role("compile"), at=NOW)
    # the same key, judged before the revocation, is fine
    open_artifact(art.path, revoked.by_role("compile"), at=NOW - timedelta(hours=2)).close()


def test_bzip2_and_encrypted_entries_are_refused(art: Art, tmp_path: Path) -> None:
    items = entries(art.path)
    for i, _ in items:
        if i.filename.endswith("task.json"):
            i.compress_type = zipfile.ZIP_BZIP2
    with pytest.raises(ArtifactError, match="compression method 12"):
        open_artifact(write_zip(tmp_path / "b.kolm", items), art.trust.by_role("compile"), at=NOW)
    path = write_zip(tmp_path / "e.kolm", entries(art.path))
    _patch_central(path, "router/task.json", 8, "<H", 0x1)  # general purpose flag: encrypted
    with pytest.raises(ArtifactError, match="is encrypted"):
        open_artifact(path, art.trust.by_role("compile"), at=NOW)


def test_a_non_zip_and_a_missing_file_are_artifact_errors(art: Art, tmp_path: Path) -> None:
    (tmp_path / "x.kolm").write_bytes(b"not a zip" * 100)
    with pytest.raises(ArtifactError, match="not a readable zip archive"):
        check_artifact(tmp_path / "x.kolm", art.trust.by_role("compile"), at=NOW)
    with pytest.raises(ArtifactError, match="cannot read the artifact file"):
        check_artifact(tmp_path / "none.kolm", art.trust.by_role("compile"), at=NOW)
    with pytest.raises(ArtifactError, match="not a regular file"):
        check_artifact(tmp_path, art.trust.by_role("compile"), at=NOW)


# --------------------------------------------------------------------------- caps and bombs


def _patch_central(path: Path, member: str, offset: int, fmt: str, value: int) -> None:
    """Rewrite one field of ``member``'s central directory record (offset from ``PK\\1\\2``)."""
    data = bytearray(path.read_bytes())
    name = member.encode()
    at = 0
    while True:
        at = data.index(b"PK\x01\x02", at)
        n = struct.unpack_from("<H", data, at + 28)[0]
        if bytes(data[at + 46 : at + 46 + n]) == name:
            struct.pack_into(fmt, data, at + offset, value)
            break
        at += 4
    path.write_bytes(bytes(data))


def _set_declared_size(path: Path, member: str, size: int) -> None:
    _patch_central(path, member, 24, "<I", size)  # uncompressed size


def test_caps_stop_before_decompressing(art: Art, tmp_path: Path) -> None:
    small = ArtifactLimits(max_file_bytes=32 * 1024)
    with pytest.raises(ArtifactError, match=r"adapter_model\.safetensors declares 65536 bytes"):
        open_artifact(art.path, art.trust.by_role("compile"), at=NOW, limits=small)
    total = ArtifactLimits(max_total_bytes=66 * 1024)
    with pytest.raises(ArtifactError, match=r"unpacks to \d+ bytes, limit 67584 in all"):
        open_artifact(art.path, art.trust.by_role("compile"), at=NOW, limits=total)
    few = ArtifactLimits(max_entries=3)
    with pytest.raises(ArtifactError, match="5 zip entries, limit 3"):
        open_artifact(art.path, art.trust.by_role("compile"), at=NOW, limits=few)
    sig = ArtifactLimits(max_signature_bytes=100)
    with pytest.raises(ArtifactError, match=r"model\.sig declares \d+ bytes, limit 100"):
        open_artifact(art.path, art.trust.by_role("compile"), at=NOW, limits=sig)


def test_an_entry_that_lies_about_its_size_is_refused(art: Art, tmp_path: Path) -> None:
    member = "router/adapter/adapter_model.safetensors"
    for declared, why in ((1000, "has digest"), (10**6, "holds 65536 bytes, its zip entry")):
        bad = write_zip(tmp_path / f"lie{declared}.kolm", entries(art.path))
        _set_declared_size(bad, member, declared)
        work = tmp_path / f"w{declared}"
        work.mkdir()
        with pytest.raises(ArtifactError) as ei:
            verify_artifact(bad, art.trust, into=work / "u")
        assert why in str(ei.value) or "corrupt entry" in str(ei.value), str(ei.value)
        assert list(work.iterdir()) == []


BOMB = 256 * 1024 * 1024  # bytes of zeros, ~0.25 MB deflated


def _bomb_zip(src: Path, out: Path, name: str, replace: bool) -> Path:
    """``src`` plus (or with ``name`` replaced by) ``BOMB`` zero bytes, streamed."""
    block = b"\0" * (1 << 20)
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as w:
        for i in z.infolist():
            if replace and i.filename == name:
                continue
            w.writestr(i, z.read(i))
        info = _info(name)
        with w.open(info, "w", force_zip64=True) as dst:
            for _ in range(BOMB // len(block)):
                dst.write(block)
    return out


def _du(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


@pytest.fixture
def inflated(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Bytes decompressed from each zip entry (by name) while the test runs: every read of
    an entry's content goes through :meth:`zipfile.ZipExtFile.read`."""
    counts: dict[str, int] = {}
    real = zipfile.ZipExtFile.read

    def read(self: zipfile.ZipExtFile, n: int | None = -1) -> bytes:
        block = real(self, n)
        counts[self.name] = counts.get(self.name, 0) + len(block)
        return block

    monkeypatch.setattr(zipfile.ZipExtFile, "read", read)
    return counts


@pytest.fixture
def watch() -> Iterator[Callable[[Path], list[int]]]:
    """Sample a folder's size every 5 ms while the test runs; the largest size seen."""
    stop = threading.Event()
    threads = []

    def start(d: Path) -> list[int]:
        seen = [0]

        def loop() -> None:
            while not stop.is_set():
                with contextlib.suppress(OSError):
                    seen[0] = max(seen[0], _du(d))
                time.sleep(0.005)

        t = threading.Thread(target=loop, daemon=True)
        t.start()
        threads.append(t)
        return seen

    yield start
    stop.set()
    for t in threads:
        t.join(5)


@pytest.mark.parametrize("replace", [False, True], ids=["unsigned bomb", "signed name, bomb"])
def test_a_zip_bomb_is_refused_with_nothing_written(
    art: Art,
    tmp_path: Path,
    watch: Callable[[Path], list[int]],
    inflated: dict[str, int],
    replace: bool,
) -> None:
    """The issue's case: a few hundred KB that unpack to gigabytes. An unsigned entry is
    refused from the zip directory alone; a signed name whose bytes were replaced is hashed
    without a write. Either way the work folder never grows and is empty afterwards."""
    name = "router/adapter/adapter_model.safetensors" if replace else "router/adapter/zeros"
    bomb = _bomb_zip(art.path, tmp_path / "bomb.kolm", name, replace)
    assert bomb.stat().st_size < 4 * 1024 * 1024
    work = tmp_path / "work"
    work.mkdir()
    seen = watch(work)
    with pytest.raises(ArtifactError) as ei:
        verify_artifact(bomb, art.trust, into=work / "u")
    time.sleep(0.02)
    if replace:
        assert "adapter/adapter_model.safetensors has digest" in str(ei.value)
        assert inflated[name] > 0  # hashed (the counter sees a decompression), not written
    else:
        assert "unlisted: ['adapter/zeros']" in str(ei.value)
        assert inflated.get(name, 0) == 0, inflated  # nothing was decompressed
    assert seen[0] == 0 and list(work.iterdir()) == []
    # with a cap below the bomb, even the signed-name case stops at the declared size
    inflated.clear()
    capped = ArtifactLimits(max_file_bytes=1 << 20)
    with pytest.raises(ArtifactError, match=r"limit 1048576 a file|unlisted"):
        verify_artifact(bomb, art.trust, into=work / "u", limits=capped)
    assert inflated.get(name, 0) == 0, inflated  # refused from the zip directory alone
    assert list(work.iterdir()) == []


# --------------------------------------------------------------------------- kolm verify --artifact


@pytest.fixture(scope="module")
def prediction(art: Art) -> Path:
    """A prediction receipt naming the good artifact, logged in a real SQLite ledger."""
    ledger = Ledger(Store(f"sqlite:///{art.root / 'ledger.db'}"), art.trust, art.key("log"))
    env, _, _ = sign_prediction(
        art.key("infer"),
        artifact_digest=art.digest,
        input_value="where is my card?",
        output="a",
        verdict={"ok": True},
        backend="student",
        reason="confident",
        confidence=0.9,
        latency_ms=1.0,
        request_id="r1",
    )
    (res,) = ledger.append([env])
    out = art.root / "prediction.json"
    ledger.bundle(res.index).save(out)
    return out


def kolm_verify(art: Art, bundle: Path, artifact: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "kolm",
            "verify",
            str(bundle),
            "--trust",
            str(art.keys / "trust.json"),
            "--artifact",
            str(artifact),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_kolm_verify_artifact_ok_for_the_signed_file(art: Art, prediction: Path) -> None:
    out = kolm_verify(art, prediction, art.path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "(10)  no evidence cited; the artifact file router.kolm passes the artifact check" in (
        out.stdout
    )


@pytest.mark.parametrize(
    "case",
    [
        "extra unsigned file",
        "signed pickle",
        "missing signed file",
        "symlink entry",
        "dot-dot entry",
    ],
)
def test_kolm_verify_artifact_fails_where_the_loader_refuses(
    art: Art, prediction: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    """Before, ``kolm verify --artifact`` said OK for each of these (it read two entries)."""
    bad = make_bad(art, case, tmp_path / "router.kolm", monkeypatch)
    out = kolm_verify(art, prediction, bad)
    assert out.returncode == 1, out.stdout + out.stderr
    assert out.stdout.startswith("FAILED at step 10: step 10 (check evidence): "), out.stdout
    assert REFUSED[case][1] in out.stdout, out.stdout


def test_the_artifact_file_must_be_the_one_the_prediction_names(
    art: Art, prediction: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other.kolm"
    pack(write_model(tmp_path / "src", "other"), other, art.key("compile"))
    out = kolm_verify(art, prediction, other)
    assert out.returncode == 1
    assert "other.kolm is artifact" in out.stdout and art.digest[:16] in out.stdout
