"""Signed ``.kolm`` files and the zip surgery that breaks them: the cases the artifact
check (``kolm verify --artifact``) and the inference loader both refuse, with their words."""

from __future__ import annotations

import os
import stat
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from kolm_compile import artifact as artifact_mod
from kolm_compile.artifact import pack
from kolm_ledger.keys import PrivateKey, TrustRoot

Entries = list[tuple[zipfile.ZipInfo, bytes]]


@dataclass
class Art:
    root: Path
    keys: Path
    trust: TrustRoot
    path: Path  # the good signed .kolm
    digest: str
    src: Path  # the folder it was packed from

    def key(self, role: str) -> PrivateKey:
        return PrivateKey.load(self.keys / f"{role}.key")


def write_model(d: Path, name: str = "router") -> Path:
    top = d / name
    (top / "adapter").mkdir(parents=True, exist_ok=True)
    (top / "manifest.json").write_text(f'{{"format": "kolm/v1", "name": "{name}"}}\n')
    (top / "task.json").write_text('{"labels": ["a", "b"]}\n')
    (top / "adapter" / "adapter_model.safetensors").write_bytes(os.urandom(64 * 1024))
    (top / "adapter" / "tokenizer.json").write_text('{"model": "x"}\n' * 200)
    return top


# --------------------------------------------------------------------------- zip surgery


def entries(path: Path) -> Entries:
    with zipfile.ZipFile(path) as z:
        return [(i, z.read(i)) for i in z.infolist()]


def write_zip(out: Path, items: Entries) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Duplicate name" is the point of one case
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
            for info, data in items:
                z.writestr(info, data)
    return out


def _info(name: str, mode: int = stat.S_IFREG | 0o644) -> zipfile.ZipInfo:
    i = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    i.external_attr = mode << 16
    i.compress_type = zipfile.ZIP_DEFLATED
    i.create_system = 3
    return i


def add(name: str, data: bytes = b"x", mode: int = stat.S_IFREG | 0o644) -> Callable[..., Entries]:
    return lambda items: [*items, (_info(name, mode), data)]


def drop(suffix: str) -> Callable[[Entries], Entries]:
    return lambda items: [(i, d) for i, d in items if not i.filename.endswith(suffix)]


def flip(suffix: str) -> Callable[[Entries], Entries]:
    def edit(items: Entries) -> Entries:
        out = []
        for i, d in items:
            if i.filename.endswith(suffix):
                d = d[:-1] + bytes([d[-1] ^ 1])
            out.append((i, d))
        return out

    return edit


def signed_pickle(a: Art, out: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A .kolm whose signed file list holds a pickle (signed by the trusted compile key:
    pack refuses pickles, so its check is switched off for this one build)."""
    d = write_model(out.parent / f"{out.stem}-src")
    (d / "adapter" / "training_args.bin").write_bytes(b"\x80\x04\x95" + b"\0" * 16)
    with monkeypatch.context() as m:
        m.setattr(artifact_mod, "PICKLE_SUFFIXES", frozenset())
        pack(d, out, a.key("compile"))
    return out


#: The cases ``kolm verify --artifact`` and the loader both refuse, with what they say.
REFUSED: dict[str, tuple[Callable[[Entries], Entries] | None, str]] = {
    "extra unsigned file": (add("router/evil.py"), "unlisted: ['evil.py']"),
    "unsigned pickle": (add("router/adapter/x.pkl"), "unlisted: ['adapter/x.pkl']"),
    "signed pickle": (None, "adapter/training_args.bin is a pickle-format file"),
    "missing signed file": (drop("/task.json"), "missing: ['task.json']"),
    "symlink entry": (
        add("router/adapter/link", b"/etc/passwd", stat.S_IFLNK | 0o777),
        "is a symlink",
    ),
    "dot-dot entry": (add("router/../evil.py"), "unsafe entry name 'router/../evil.py'"),
    "leading dot-dot entry": (add("../evil.py"), "unsafe entry name '../evil.py'"),
    "absolute entry": (add("/tmp/evil.py"), "unsafe entry name '/tmp/evil.py'"),
    "duplicate entry": (add("router/task.json"), "duplicate entry name 'router/task.json'"),
    "second top folder": (add("other/x"), "want one top-level folder"),
    "tampered file": (flip("/tokenizer.json"), "adapter/tokenizer.json has digest"),
    "no signature": (drop("/model.sig"), "no model.sig signature"),
}


def make_bad(a: Art, case: str, out: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    edit, _ = REFUSED[case]
    if edit is None:
        return signed_pickle(a, out, monkeypatch)
    return write_zip(out, edit(entries(a.path)))
