"""Regenerate the committed gRPC stubs from ``proto/`` (``make proto``; needs grpcio-tools).

Stubs are internal: ``proto/kolm/<svc>/v1/<svc>.proto`` → ``kolm_<pkg>/_pb/<svc>_pb2*.py``,
with the generated absolute import rewritten to a relative one. A test regenerates
into a temporary directory and fails if the committed stubs differ.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: proto name → package that owns its stubs
TARGETS = {"ledger": "kolm_ledger", "compile": "kolm_compile", "infer": "kolm_infer"}


def generate(out_root: Path) -> list[Path]:
    """Generate every stub under ``out_root`` (mirroring the repo layout); returns the files."""
    from grpc_tools import protoc

    written: list[Path] = []
    for svc, pkg in TARGETS.items():
        proto = ROOT / "proto" / "kolm" / svc / "v1" / f"{svc}.proto"
        if not proto.exists():
            continue
        with tempfile.TemporaryDirectory() as tmp:
            args = [
                "protoc",
                f"-I{ROOT / 'proto'}",
                f"--python_out={tmp}",
                f"--grpc_python_out={tmp}",
                f"--pyi_out={tmp}",
                str(proto),
            ]
            if protoc.main(args) != 0:
                raise SystemExit(f"protoc failed for {proto}")
            gen = Path(tmp) / "kolm" / svc / "v1"
            dest = out_root / pkg / "_pb"
            dest.mkdir(parents=True, exist_ok=True)
            for f in sorted(gen.iterdir()):
                text = f.read_text().replace(
                    f"from kolm.{svc}.v1 import {svc}_pb2", f"from . import {svc}_pb2"
                )
                (dest / f.name).write_text(text)
                written.append(dest / f.name)
            init = dest / "__init__.py"
            init.write_text('"""Generated protobuf/gRPC stubs (internal; see proto/)."""\n')
            written.append(init)
    return written


def main() -> int:
    """Regenerate in place."""
    with tempfile.TemporaryDirectory() as tmp:
        files = generate(Path(tmp))
        for f in files:
            rel = f.relative_to(tmp)
            (ROOT / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, ROOT / rel)
            print(f"wrote {rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
