"""Import graph of tcm_kernels from the source (AST), function-level imports included.

``python -m tests.import_graph`` prints one line per module: its layer and the tcm_kernels modules
it imports; ``tests/test_layers.py`` checks the layer rules on the same graph.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "tcm_kernels"

# Lowest first. A module may import its own layer or a lower one; packages in one layer that are
# listed together are siblings and may not import each other (reference/ and triton/ see only the base).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("tcm_kernels._core", "tcm_kernels._backend", "tcm_kernels._checks", "tcm_kernels._autocast",
              "tcm_kernels.sparse_tensor", "tcm_kernels._C")),
    ("kernels", ("tcm_kernels.reference", "tcm_kernels.triton")),
    ("ops", ("tcm_kernels.ops",)),
    ("modules", ("tcm_kernels.nn", "tcm_kernels.experimental")),
    ("package", ("tcm_kernels",)),
]
SIBLING_LAYERS = ("kernels", "modules")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    """name -> source path of every module of the package."""
    return {module_name(p): p for p in sorted((ROOT / PACKAGE).rglob("*.py"))}


def _resolve(current: str, is_package: bool, node: ast.ImportFrom, known: dict[str, Path]) -> list[str]:
    if node.level:
        base = current.split(".") if is_package else current.split(".")[:-1]
        base = base[:len(base) - node.level + 1]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    targets = []
    for alias in node.names:
        sub = f"{prefix}.{alias.name}"
        targets.append(sub if sub in known else prefix)
    return targets


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """tcm_kernels modules (or tcm_mim) that ``name`` imports anywhere in its source (functions included)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.update(_resolve(name, is_package, node, known))
    return {t for t in found if t.split(".")[0] in (PACKAGE, "tcm_mim")}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) - {name} for name, path in known.items()}


def layer_of(name: str) -> tuple[int, str]:
    """(layer index, owning prefix) by the longest listed prefix."""
    best = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[1])):
                best = (index, prefix)
    if best is None:
        raise KeyError(f"{name} belongs to no layer; add it to LAYERS in tests/import_graph.py")
    return best


def violations(edges: dict[str, set[str]]) -> list[str]:
    """Upward imports, imports between sibling packages, and imports of tcm_mim."""
    bad = []
    for src, targets in sorted(edges.items()):
        src_layer, src_pkg = layer_of(src)
        for dst in sorted(targets):
            if dst.split(".")[0] == "tcm_mim":
                bad.append(f"{src} -> {dst}: tcm_kernels must not import tcm_mim")
                continue
            dst_layer, dst_pkg = layer_of(dst)
            if dst_layer > src_layer:
                bad.append(f"{src} ({LAYERS[src_layer][0]}) -> {dst} ({LAYERS[dst_layer][0]}): upward import")
            elif dst_layer == src_layer and dst_pkg != src_pkg and LAYERS[src_layer][0] in SIBLING_LAYERS:
                bad.append(f"{src} -> {dst}: sibling packages of layer {LAYERS[src_layer][0]!r} import each other")
    return bad


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in edges:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def main() -> int:
    edges = graph()
    for name in sorted(edges, key=lambda n: (layer_of(n)[0], n)):
        print(f"[{LAYERS[layer_of(name)[0]][0]:>7}] {name} -> {', '.join(sorted(edges[name])) or '-'}")
    problems = violations(edges) + [" -> ".join(c) + ": import cycle" for c in cycles(edges)]
    for line in problems:
        print("VIOLATION", line)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
