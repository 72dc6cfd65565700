"""Draw pipeline's import graph (Mermaid, on stdout) and count its circles.

    .venv/bin/python scripts/import_graph.py > imports.mmd

Every import counts, those inside functions too (grimp, import-linter's graph). Exit 1 when a
circle exists, naming one.
"""
from __future__ import annotations

import sys

import grimp


def circles(graph: grimp.ImportGraph, modules: list[str]) -> list[tuple[str, ...]]:
    """One shortest circle through each module that has one."""
    found = set()
    for module in modules:
        for imported in graph.find_modules_directly_imported_by(module):
            back = graph.find_shortest_chain(importer=imported, imported=module)
            if back:
                found.add(tuple(sorted(set(back))))
    return sorted(found)


def main() -> int:
    graph = grimp.build_graph("pipeline")
    modules = sorted(m for m in graph.modules if m.startswith("pipeline."))
    print("graph TD")
    for module in modules:
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            if imported.startswith("pipeline."):
                print(f"  {module.removeprefix('pipeline.')} --> {imported.removeprefix('pipeline.')}")
    found = circles(graph, modules)
    print(f"%% {len(modules)} modules, {len(found)} circles", file=sys.stderr)
    for circle in found[:5]:
        print(f"%% circle: {' -> '.join(circle)}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
