"""The packages layer one way: maskio at the bottom; maskgen and sslmask on it; maskgen's
``deep`` method the only bridge, through sslmask's public backbone API."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# sslmask's public backbone API: what maskgen's deep method may use
PUBLIC_BACKBONE_API = {
    "sslmask.backbones": {"Backbone", "ResNetTrunk", "build_backbone", "normalize"},
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
