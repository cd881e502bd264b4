"""Measures of the code's shape, for the redesign's before → after (docs/ARCHITECTURE.md).

    .venv/bin/python scripts/arch_metrics.py [--root DIR]

Prints: the largest classes and functions (lines), the modules over 400 lines, and the
import cycles between modules of kolm_ledger, kolm_compile and kolm_infer (strongly
connected components of the import graph built by grimp, lazy imports included). Generated
protobuf modules (``_pb``) are left out.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

PACKAGES = ("kolm", "kolm_ledger", "kolm_compile", "kolm_infer")


def _sources(root: Path) -> list[Path]:
    out = []
    for pkg in PACKAGES:
        if (root / pkg).is_dir():
            out += [p for p in sorted((root / pkg).rglob("*.py")) if "_pb" not in p.parts]
    return out


def _sizes(
    root: Path,
) -> tuple[list[tuple[int, str]], list[tuple[int, str]], list[tuple[int, str]]]:
    classes, funcs, modules = [], [], []
    for path in _sources(root):
        text = path.read_text(encoding="utf-8")
        rel = path.relative_to(root).as_posix()
        modules.append((len(text.splitlines()), rel))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef):
                classes.append((node.end_lineno - node.lineno + 1, f"{rel}:{node.name}"))
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                funcs.append((node.end_lineno - node.lineno + 1, f"{rel}:{node.name}"))
    return sorted(classes, reverse=True), sorted(funcs, reverse=True), sorted(modules, reverse=True)


def cycles(root: Path) -> list[list[str]]:
    import grimp

    sys.path.insert(0, str(root))
    pkgs = [p for p in PACKAGES if (root / p).is_dir()]
    graph = grimp.build_graph(*pkgs, cache_dir=None)
    mods = sorted(m for m in graph.modules if "._pb" not in m)
    edges = {m: sorted(graph.find_modules_directly_imported_by(m) & set(mods)) for m in mods}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    sccs: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:  # Tarjan, iterative enough for this graph's depth
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for m in mods:
        if m not in index:
            strong(m)
    return sccs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    ap.add_argument("--top", type=int, default=5)
    a = ap.parse_args()
    classes, funcs, modules = _sizes(a.root)
    print("largest classes:", ", ".join(f"{n} {name}" for n, name in classes[: a.top]))
    print("largest functions:", ", ".join(f"{n} {name}" for n, name in funcs[: a.top]))
    over = [m for m in modules if m[0] > 400]
    print(f"modules over 400 lines: {len(over)} of {len(modules)}")
    for n, name in over:
        print(f"  {n:5d} {name}")
    found = cycles(a.root)
    print(f"import cycles (strongly connected module groups): {len(found)}")
    for c in found:
        print(f"  {len(c)}: {', '.join(c)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
