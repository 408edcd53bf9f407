"""The packages layer one way: maskio at the bottom; maskgen and sslmask on it; maskgen's
``deep`` method the only bridge, through sslmask's public backbone API."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# sslmask's public backbone API: what maskgen's deep method may use
PUBLIC_BACKBONE_API = {
    "sslmask.backbones": {"Backbone", "ResNetTrunk", "build_backbone", "check_batch_memory", "normalize"},
    "sslmask.checkpoint": {"infer_arch", "load_backbone"},
}


def imports(package: str) -> list[tuple[str, str, str | None]]:
    """``(file, module, name)`` for every import in ``package``, also those inside functions."""
    out = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            rel = str(path.relative_to(ROOT))
            if isinstance(node, ast.Import):
                out += [(rel, alias.name, None) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                out += [(rel, node.module, alias.name) for alias in node.names]
    return out


def top(module: str) -> str:
    return module.split(".")[0]


def test_maskio_imports_neither_package_nor_torch():
    found = [i for i in imports("maskio") if top(i[1]) in {"maskgen", "sslmask", "torch", "torchvision"}]
    assert found == []


def test_sslmask_does_not_import_maskgen():
    assert [i for i in imports("sslmask") if top(i[1]) == "maskgen"] == []


def test_only_deep_imports_sslmask_and_only_its_public_backbone_api():
    found = [i for i in imports("maskgen") if top(i[1]) == "sslmask"]
    assert found, "the deep method builds on sslmask's backbones"
    for file, module, name in found:
        assert file.startswith("maskgen/methods/deep/"), f"{file} imports {module}"
        assert name in PUBLIC_BACKBONE_API.get(module, set()), f"{file}: {module}.{name} is not public API"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph(package: str) -> dict[str, set[str]]:
    """Module -> the modules of ``package`` it imports (also inside functions). An import of
    ``a.b`` is an edge to ``a.b`` alone; ``from a import b`` to ``a.b`` when that is a module."""
    modules = {_module_name(p): p for p in (ROOT / package).rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                graph[module] |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    target = sub if sub in modules else node.module
                    if target in modules and target != module:
                        graph[module].add(target)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph``, or None (depth-first search with an explicit stack)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for root in sorted(graph):
        if root in state:
            continue
        path, stack = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycles_in_sslmask_or_maskgen():
    """Each module's imports, lazy ones included, form no circle: the extractor sits below
    the methods and the engine, the evaluations above them."""
    for package in ("sslmask", "maskgen", "maskio"):
        assert _cycle(_import_graph(package)) is None, package


def test_the_methods_and_the_engine_import_no_evaluation_loader():
    graph = _import_graph("sslmask")
    for module, targets in graph.items():
        if module.startswith("sslmask.methods") or module in ("sslmask.engine", "sslmask.features"):
            assert "sslmask.eval.features" not in targets, module
