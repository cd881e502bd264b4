"""The layer rules of docs/ARCHITECTURE.md hold: import-linter's contracts (.importlinter)
and no import cycle between the packages' modules (lazy imports inside functions count)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _lint(config: Path) -> subprocess.CompletedProcess[str]:
    lint = Path(sys.executable).with_name("lint-imports")
    return subprocess.run(
        [str(lint), "--no-cache", "--config", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_import_contracts_are_kept() -> None:
    p = _lint(ROOT / ".importlinter")
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    assert " 0 broken" in p.stdout, p.stdout[-2000:]


def test_a_broken_contract_is_caught(tmp_path: Path) -> None:
    """The checker sees real imports: inference does import the ledger package."""
    cfg = tmp_path / "contracts.ini"
    cfg.write_text(
        "[importlinter]\nroot_packages =\n    kolm_ledger\n    kolm_infer\n\n"
        "[importlinter:contract:x]\nname = x\ntype = forbidden\n"
        "source_modules =\n    kolm_infer.receipts\nforbidden_modules =\n    kolm_ledger.formats.dsse\n"
    )
    p = _lint(cfg)
    assert p.returncode != 0
    assert "kolm_infer.receipts -> kolm_ledger.formats.dsse" in p.stdout, p.stdout[-2000:]


def test_no_import_cycles() -> None:
    spec = importlib.util.spec_from_file_location("arch_metrics", ROOT / "scripts/arch_metrics.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.cycles(ROOT) == []
