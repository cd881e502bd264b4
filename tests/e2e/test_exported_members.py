"""The public surface of kolm_ledger cannot drift silently, and it never pulls in torch."""

from __future__ import annotations

import importlib
import json
import pkgutil
import subprocess
import sys
import textwrap
import tomllib
import types
from pathlib import Path

import grpc
import pytest

import kolm_ledger
import kolm_ledger.errors

EXPECTED_LEDGER = [
    "AuditReport",
    "Bundle",
    "Checkpoint",
    "Envelope",
    "KolmError",
    "Ledger",
    "PrivateKey",
    "PublicKey",
    "SignedCheckpoint",
    "Store",
    "TrustRoot",
    "TrustedKey",
    "VerifiedReceipt",
    "__version__",
    "audit",
    "init_keys",
    "receipts",
    "verify_bundle",
]

EXPECTED_ERRORS = [
    "ArtifactError",
    "BackpressureError",
    "BundleFormatError",
    "ChainError",
    "CheckpointError",
    "CheckpointFormatError",
    "ConflictError",
    "ConsistencyProofError",
    "EntryTooLargeError",
    "EnvelopeFormatError",
    "FormatError",
    "InclusionProofError",
    "InvalidInput",
    "KeyFormatError",
    "KeyPolicyError",
    "KeyValidityError",
    "KolmError",
    "NotFoundError",
    "ProofFormatError",
    "ResourceExhaustedError",
    "RoleError",
    "SignatureError",
    "SpecError",
    "StatementFormatError",
    "StorageError",
    "TrustRootFormatError",
    "UnavailableError",
    "UnknownKeyError",
    "VerificationError",
]


@pytest.mark.parametrize(
    ("module", "expected"),
    [(kolm_ledger, EXPECTED_LEDGER), (kolm_ledger.errors, EXPECTED_ERRORS)],
    ids=["kolm_ledger", "kolm_ledger.errors"],
)
def test_exported_members(module: types.ModuleType, expected: list[str]) -> None:
    exported = list(module.__all__)
    assert sorted(exported) == expected
    assert exported == sorted(exported), "keep __all__ sorted"
    for name in exported:
        assert hasattr(module, name), name


def test_star_import_gives_exactly_the_public_names() -> None:
    ns: dict[str, object] = {}
    exec("from kolm_ledger import *", ns)
    assert sorted(k for k in ns if k != "__builtins__") == EXPECTED_LEDGER
    assert kolm_ledger.__version__ == "0.1.0"


def test_every_error_is_a_kolm_error_with_a_grpc_status() -> None:
    doc = kolm_ledger.errors.__doc__ or ""
    for name in EXPECTED_ERRORS:
        cls = getattr(kolm_ledger.errors, name)
        assert issubclass(cls, kolm_ledger.errors.KolmError), name
        assert cls.grpc_code in grpc.StatusCode.__members__, (name, cls.grpc_code)
        assert name in doc, f"{name} is missing from the hierarchy drawn in the docstring"
        assert cls.__doc__, name


def test_every_public_module_exports_what_it_defines() -> None:
    for info in pkgutil.walk_packages(kolm_ledger.__path__, "kolm_ledger."):
        if any(part.startswith("_") for part in info.name.split(".")) or ".migrations" in info.name:
            continue
        mod = importlib.import_module(info.name)
        exported = getattr(mod, "__all__", None)
        assert exported is not None, f"{info.name} has no __all__"
        assert len(set(exported)) == len(exported), info.name
        missing = [n for n in exported if not hasattr(mod, n)]
        assert not missing, (info.name, missing)
        assert mod.__doc__, f"{info.name} has no docstring"


FORBIDDEN = ("torch", "transformers", "peft", "safetensors", "kolm_compile", "kolm_infer")


def test_kolm_ledger_never_imports_torch() -> None:
    """An auditor installs kolm without [ml]: nothing in kolm_ledger may even try."""
    code = textwrap.dedent(
        f"""
        import importlib.abc, json, sys

        FORBIDDEN = set({FORBIDDEN!r})
        attempts = []

        class Watch(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in FORBIDDEN:
                    attempts.append(name)
                return None

        sys.meta_path.insert(0, Watch())
        import kolm_ledger, kolm.cli.main, kolm_ledger.service.server, kolm_ledger.verify.receipt
        import kolm_ledger.audit.auditor, kolm_ledger.service.client, kolm.demo.trust_core
        # the plug-in packages may register their subcommands, but lazily: no ML import
        FORBIDDEN -= {{"kolm_compile", "kolm_infer"}}
        from kolm.cli.main import build_parser
        build_parser()  # loads the kolm.commands plug-ins, as `kolm --help` does
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in FORBIDDEN)
        print(json.dumps({{"attempts": sorted(set(attempts)), "loaded": loaded}}))
        """
    )
    p = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.splitlines()[-1]) == {"attempts": [], "loaded": []}


def test_import_time_has_no_heavy_modules() -> None:
    p = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            "-c",
            "import kolm.cli.main, kolm_ledger.verify.receipt",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert p.returncode == 0, p.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in p.stderr.splitlines() if "|" in line}
    assert not {m for m in imported if m.split(".")[0] in FORBIDDEN}


ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("kolm_ledger", "kolm_compile", "kolm_infer")


def test_every_package_ships_py_typed() -> None:
    """PEP 561: each package carries py.typed and the build's package data lists it."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_data = data["tool"]["setuptools"]["package-data"]
    for pkg in PACKAGES:
        assert (ROOT / pkg / "py.typed").is_file(), pkg
        assert "py.typed" in package_data.get(pkg, []) + package_data.get("*", []), pkg


def test_inference_and_the_auditor_load_students_through_the_public_runtime() -> None:
    """kolm_infer and kolm_ledger never name the private training module; the runtime
    student (kolm_compile.student) does not import training either."""
    for pkg in ("kolm_infer", "kolm_ledger"):
        for path in (ROOT / pkg).rglob("*.py"):
            text = path.read_text()
            assert "kolm_compile._train" not in text, path
            assert "import _train" not in text, path
    code = "import sys, kolm_compile.student\nassert 'kolm_compile._train' not in sys.modules"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
