"""The declared runtime dependencies are exactly what the packages import.

A plain ``pip install .`` has to run every command the README shows, so every third-party
module that maskgen, sslmask or maskio imports (at the top or inside a function, as the
publish path does) must come from a runtime dependency, not from a test extra or from another
package's dependencies; and a runtime dependency nothing imports should not be one. Read from
the source with ``ast``, so a new import that is not declared fails here, on any machine.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("maskgen", "sslmask", "maskio")
# modules whose distribution's name differs from what importlib reports here, or is ambiguous:
# cv2 comes from the plain headless wheel at run time (make install swaps in the contrib build
# for the tests' reference segmentation; both provide cv2)
MODULE_DISTRIBUTION = {"cv2": "opencv-python-headless"}
# runtime dependencies used without an import of their own
INDIRECT = {"tensorboard": "torch.utils.tensorboard writes the training curves through it"}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared(extra: str | None = None) -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] if extra is None else project["optional-dependencies"][extra]
    return {normalise(re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0]) for spec in specs}


def imported_modules() -> dict[str, set[str]]:
    """Third-party top-level module -> the files importing it."""
    found: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in PACKAGES:
                        found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


@functools.cache
def installed() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def distribution_of(module: str) -> str:
    if module in MODULE_DISTRIBUTION:
        return MODULE_DISTRIBUTION[module]
    dists = installed().get(module)
    assert dists, f"module {module!r} comes from no installed distribution: add it to MODULE_DISTRIBUTION"
    return normalise(dists[0])


def test_every_imported_package_is_a_runtime_dependency():
    runtime = declared()
    missing = {
        f"{distribution_of(m)} (imported as {m} in {sorted(files)[0]})"
        for m, files in imported_modules().items()
        if distribution_of(m) not in runtime
    }
    assert not missing, f"imported but not in [project.dependencies]: {sorted(missing)}"


def test_every_runtime_dependency_is_imported():
    used = {distribution_of(m) for m in imported_modules()} | set(INDIRECT)
    unused = declared() - used
    assert not unused, f"runtime dependencies nothing in {PACKAGES} imports: {sorted(unused)}"


def test_test_only_packages_stay_out_of_the_runtime():
    assert "webdataset" not in declared() and "webdataset" in declared("test")
    assert not ({"pytest", "hypothesis", "ruff"} & declared())
