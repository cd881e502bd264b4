"""The committed gRPC stubs are exactly what ``proto/`` generates (``make proto``).

Regenerates every stub into a temporary directory with the pinned grpcio-tools and
compares byte for byte with the committed ``kolm_*/_pb`` files, in both directions:
a changed ``.proto`` without regenerated stubs fails, and so does a stale stub with
no ``.proto`` behind it.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from kolm_ledger import _proto_gen

ROOT = _proto_gen.ROOT


def _protos() -> list[Path]:
    return sorted((ROOT / "proto").glob("kolm/*/v1/*.proto"))


def test_every_proto_has_a_stub_target() -> None:
    protos = _protos()
    assert protos, "no .proto files under proto/"
    for p in protos:
        svc = p.parent.parent.name
        assert p.name == f"{svc}.proto", f"{p}: want proto/kolm/<svc>/v1/<svc>.proto"
        assert svc in _proto_gen.TARGETS, f"{p}: no package owns its stubs in _proto_gen.TARGETS"


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("stubs")
    files = _proto_gen.generate(out)
    return {f.relative_to(out).as_posix(): f.read_bytes() for f in files}


def test_regenerating_the_stubs_changes_nothing(generated: dict[str, bytes]) -> None:
    want_svcs = {p.parent.parent.name for p in _protos()}
    for svc in want_svcs:
        pkg = _proto_gen.TARGETS[svc]
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            assert f"{pkg}/_pb/{svc}{suffix}" in generated
    differ, missing = [], []
    for rel, data in sorted(generated.items()):
        committed = ROOT / rel
        if not committed.exists():
            missing.append(rel)
        elif committed.read_bytes() != data:
            differ.append(rel)
    assert not missing, f"stubs not committed (run python -m kolm_ledger._proto_gen): {missing}"
    assert not differ, (
        f"committed stubs differ from proto/ (run python -m kolm_ledger._proto_gen): {differ}"
    )


def test_no_stale_committed_stubs(generated: dict[str, bytes]) -> None:
    committed = {
        f.relative_to(ROOT).as_posix()
        for pkg in set(_proto_gen.TARGETS.values())
        for f in (ROOT / pkg / "_pb").glob("*_pb2*")
        if f.suffix in (".py", ".pyi")
    }
    stale = sorted(committed - generated.keys())
    assert not stale, f"stubs with no .proto behind them: {stale}"


def test_generated_imports_are_relative_and_stubs_import(generated: dict[str, bytes]) -> None:
    for rel, data in generated.items():
        if rel.endswith("_pb2_grpc.py"):
            text = data.decode()
            assert "from kolm." not in text, f"{rel} keeps an absolute kolm.* import"
            svc = Path(rel).name.removesuffix("_pb2_grpc.py")
            assert f"from . import {svc}_pb2" in text
    for p in _protos():
        svc = p.parent.parent.name
        mod = importlib.import_module(f"{_proto_gen.TARGETS[svc]}._pb.{svc}_pb2")
        assert mod.DESCRIPTOR.name == f"kolm/{svc}/v1/{svc}.proto"
        assert mod.DESCRIPTOR.package == f"kolm.{svc}.v1"
