"""The house keeps its shape: every import of mpsearch, lazy ones inside functions included,
goes down the floors of the pipeline, so there is no import circle and no arrow up."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mpsearch"
#: the floors, lowest first: a module imports its own floor and the ones below, never above
FLOORS = [
    "mpsearch._version",
    "mpsearch.core",
    "mpsearch.store",
    "mpsearch.models",
    "mpsearch.measure",
    "mpsearch.quant",
    "mpsearch.kernels",
    "mpsearch.primitives",
    "mpsearch.proxies",
    "mpsearch.solvers",
    "mpsearch.cost",
    "mpsearch.export",
    "mpsearch.report",
    "mpsearch.run",
    "mpsearch.cli",
    "mpsearch",
]


def modules() -> dict[str, Path]:
    out = {}
    for p in PACKAGE.rglob("*.py"):
        parts = p.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def imports() -> dict[str, set[tuple[str, str | None]]]:
    """Per module, every mpsearch module it imports (anywhere in the file) and the name it takes from it."""
    mods = modules()
    out: dict[str, set] = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                target = (f"{base}.{node.module}" if node.module else base) if node.level else (node.module or "")
                for alias in node.names:
                    if f"{target}.{alias.name}" in mods:
                        found.add((f"{target}.{alias.name}", None))
                    elif target in mods:
                        found.add((target, alias.name))
            elif isinstance(node, ast.Import):
                found |= {(a.name, None) for a in node.names if a.name in mods}
        out[name] = {(m, n) for m, n in found if m != name}
    return out


def floor(module: str) -> int:
    return next(i for i, f in enumerate(FLOORS) if module == f or module.startswith(f + "."))


def test_no_import_circles():
    graph = {m: {t for t, _ in ts} for m, ts in imports().items()}
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(t) :] + [t]))
            if t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_every_import_goes_down_the_floors():
    up = sorted((m, t) for m, ts in imports().items() for t, _ in ts if floor(t) > floor(m))
    assert not up, f"{len(up)} imports point up a floor: {up[:5]}"


def test_no_private_name_is_imported_from_another_module():
    private = sorted(
        (m, f"{t}.{n}") for m, ts in imports().items() for t, n in ts if n and n.startswith("_") and n != "__version__"
    )
    assert not private, private
