"""Random zip surgery on a valid signed ``.kolm`` (issue 14, finding 10 and the low ones).

hypothesis applies one to three mutations to the entries of a real signed artifact (the
small, torch-free one of tests/ledger/test_artifact_check.py) and writes a new zip: an extra
entry, a renamed entry, a symlink, a device, a huge compressible entry (added, or in
place of a signed file's bytes), a ``..``/absolute/backslash/empty/control-character
name, a duplicate name, a second top-level folder, a dropped signed file, changed bytes
in a signed file or in ``model.sig``, a bzip2 entry, a truncated file. Every result must
be refused by ``kolm_ledger.verify.artifact`` (``ArtifactError``, ``FAILED_PRECONDITION``)
and by the loader's unpacking (``kolm_compile.artifact.verify_artifact``), and leave
nothing in the folder it would unpack into. "Huge" is relative to the caps: half the
examples run with caps of 256 KiB a file and 512 KiB in all, so a few MiB of zeros
stands in for the issue's gigabytes (tests/ledger/test_artifact_check.py holds the real 256 MiB
bomb to the default caps).

CI runs :data:`FUZZ` examples (60); ``make soak`` thousands.
"""

from __future__ import annotations

import random
import shutil
import stat
import zipfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support.artifacts import Art, _info, entries, write_zip
from support.fuzz import FUZZ
from test_artifact_check import art as art

from kolm_compile.artifact import verify_artifact
from kolm_ledger.errors import ArtifactError
from kolm_ledger.verify.artifact import ArtifactLimits, check_artifact

Entries = list[tuple[zipfile.ZipInfo, bytes]]
Mutation = Callable[[Entries, random.Random], Entries]
SMALL = ArtifactLimits(max_file_bytes=256 * 1024, max_total_bytes=512 * 1024)
REG = stat.S_IFREG | 0o644


def _copy(
    info: zipfile.ZipInfo, name: str | None = None, mode: int | None = None
) -> zipfile.ZipInfo:
    i = _info(name or info.filename, mode if mode is not None else info.external_attr >> 16)
    i.compress_type = info.compress_type
    return i


def _files(items: Entries) -> list[int]:
    return [k for k, (i, _) in enumerate(items) if not i.filename.endswith("/")]


def _top(items: Entries) -> str:
    return items[0][0].filename.split("/", 1)[0]


def _rel(rng: random.Random) -> str:
    parts = [
        "".join(rng.choices("abcxyz019_-.", k=rng.randint(1, 8))) for _ in range(rng.randint(1, 3))
    ]
    parts = [p if p not in (".", "..") else p + "x" for p in parts]
    return "/".join(parts)


def extra_entry(items: Entries, rng: random.Random) -> Entries:
    name = f"{_top(items)}/{_rel(rng)}"
    return [*items, (_info(name), rng.randbytes(rng.randint(0, 2000)))]


def renamed_entry(items: Entries, rng: random.Random) -> Entries:
    k = rng.choice(_files(items))
    info, data = items[k]
    top, _, rel = info.filename.partition("/")
    new = rng.choice(
        [
            f"{top}/{_rel(rng)}",
            f"{top}/{rel.upper()}" if rel.upper() != rel else f"{top}/{rel}.orig",
            f"{top}/{rel}/x",
            f"other/{rel}",  # a second top-level folder
        ]
    )
    return [*items[:k], (_copy(info, new), data), *items[k + 1 :]]


def symlink(items: Entries, rng: random.Random) -> Entries:
    mode = stat.S_IFLNK | 0o777
    if rng.random() < 0.5:  # a new link
        target = rng.choice([b"/etc/passwd", b"../../keys/admin.key", b"model.sig"])
        return [*items, (_info(f"{_top(items)}/{_rel(rng)}", mode), target)]
    k = rng.choice(_files(items))  # a signed file turned into a link
    info, data = items[k]
    return [*items[:k], (_copy(info, mode=mode), data), *items[k + 1 :]]


def device(items: Entries, rng: random.Random) -> Entries:
    mode = rng.choice([stat.S_IFIFO, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFSOCK]) | 0o644
    return [*items, (_info(f"{_top(items)}/{_rel(rng)}", mode), b"")]


def huge_entry(items: Entries, rng: random.Random) -> Entries:
    zeros = b"\0" * (rng.randint(1, 4) << 20)
    if rng.random() < 0.5:
        return [*items, (_info(f"{_top(items)}/{_rel(rng)}"), zeros)]
    k = rng.choice([k for k in _files(items) if not items[k][0].filename.endswith("model.sig")])
    return [*items[:k], (_copy(items[k][0]), zeros), *items[k + 1 :]]


UNSAFE = [
    "../{r}",
    "{t}/../{r}",
    "{t}/../../{r}",
    "/{r}",
    "/{t}/{r}",
    "{t}\\{r}",
    "{t}/a\\..\\{r}",
    "{t}//{r}",
    "{t}/./{r}",
    "{t}/{r}/..",
    "{t}/\x01{r}",
    "{t}/{r}\n",
    "C:/{r}",
]


def unsafe_name(items: Entries, rng: random.Random) -> Entries:
    name = rng.choice(UNSAFE).format(t=_top(items), r=_rel(rng))
    if rng.random() < 0.5:
        return [*items, (_info(name), b"x")]
    k = rng.choice(_files(items))
    return [*items[:k], (_copy(items[k][0], name), items[k][1]), *items[k + 1 :]]


def duplicate(items: Entries, rng: random.Random) -> Entries:
    k = rng.choice(_files(items))
    info, data = items[k]
    other = data if rng.random() < 0.5 else rng.randbytes(len(data) or 1)
    return [*items, (_copy(info), other)]


def dropped(items: Entries, rng: random.Random) -> Entries:
    k = rng.choice(_files(items))
    return items[:k] + items[k + 1 :]


def changed_bytes(items: Entries, rng: random.Random) -> Entries:
    k = rng.choice(_files(items))  # model.sig included
    info, data = items[k]
    if data and rng.random() < 0.7:
        j = rng.randrange(len(data))
        data = data[:j] + bytes([data[j] ^ rng.randint(1, 255)]) + data[j + 1 :]
    else:
        data += rng.randbytes(rng.randint(1, 64))
    return [*items[:k], (_copy(info), data), *items[k + 1 :]]


def bzip2(items: Entries, rng: random.Random) -> Entries:
    k = rng.choice(_files(items))
    info = _copy(items[k][0])
    info.compress_type = zipfile.ZIP_BZIP2
    return [*items[:k], (info, items[k][1]), *items[k + 1 :]]


MUTATIONS: dict[str, Mutation] = {
    "extra entry": extra_entry,
    "renamed entry": renamed_entry,
    "symlink": symlink,
    "device": device,
    "huge compressible entry": huge_entry,
    "unsafe name": unsafe_name,
    "duplicate name": duplicate,
    "dropped signed file": dropped,
    "changed bytes": changed_bytes,
    "bzip2 entry": bzip2,
}


@FUZZ
@given(
    names=st.lists(st.sampled_from(sorted(MUTATIONS)), min_size=1, max_size=3, unique=True),
    seed=st.integers(0, 2**32 - 1),
    small_caps=st.booleans(),
    truncate=st.none() | st.floats(0.0, 0.999),
)
def test_random_zip_surgery_is_refused_and_leaves_nothing(
    art: Art,
    tmp_path_factory: pytest.TempPathFactory,
    names: list[str],
    seed: int,
    small_caps: bool,
    truncate: float | None,
) -> None:
    rng = random.Random(seed)
    items = entries(art.path)
    # a drop first: after the others it could take away exactly what they added
    for name in sorted(names, key=lambda n: n != "dropped signed file"):
        items = MUTATIONS[name](items, rng)
    d = tmp_path_factory.mktemp("surgery")
    try:
        bad = write_zip(d / "bad.kolm", items)
        if truncate is not None:
            data = bad.read_bytes()
            bad.write_bytes(data[: int(len(data) * truncate)])
        limits = SMALL if small_caps else ArtifactLimits()
        now = datetime.now(UTC)
        with pytest.raises(ArtifactError) as ei:
            check_artifact(bad, art.trust.by_role("compile"), at=now, limits=limits)
        assert ei.value.grpc_code == "FAILED_PRECONDITION"
        work = d / "work"
        work.mkdir()
        with pytest.raises(ArtifactError) as ej:
            verify_artifact(bad, art.trust, into=work / "u", limits=limits)
        assert str(ej.value) == str(ei.value), (names, str(ei.value), str(ej.value))
        assert list(work.iterdir()) == [], (names, list(work.rglob("*")))
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_the_unmutated_artifact_passes_under_both_caps(art: Art, tmp_path: Path) -> None:
    """The control: the same zip written back untouched is accepted, so each refusal above
    is the mutation's doing."""
    good = write_zip(tmp_path / "good.kolm", entries(art.path))
    for limits in (SMALL, ArtifactLimits()):
        checked = check_artifact(
            good, art.trust.by_role("compile"), at=datetime.now(UTC), limits=limits
        )
        assert checked.digest == art.digest
        shutil.rmtree(tmp_path / "u", ignore_errors=True)
        va = verify_artifact(good, art.trust, into=tmp_path / "u", limits=limits)
        assert va.digest == art.digest
