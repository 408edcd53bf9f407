"""Pipelines: YAML recipes that chain ``maskgen`` and ``sslmask`` commands.

A recipe::

    name: demo
    vars: {out: out}                       # ${out} in commands; --var out=/data overrides
    stages:
      - name: masks
        run: maskgen build --source sample --method drfi --out ${out}/demo
        outputs: [${out}/demo/report.json]

A stage is complete when its record (``<record>``, default ``${out}/pipelines/<name>.json``)
says it finished with exactly this command and every output exists; complete stages are
skipped. Commands are split with ``shlex`` and run without a shell; ``maskgen``,
``sslmask`` and ``torchrun`` run under this Python (so a recipe works from a venv without activating it).
The record, written atomically after every stage, says what ran, when, for how long and
with which exit status.

A recipe is a program: its stages may run any command (``run: bash -c "..."`` works), like a
Makefile's rules, so run only recipes you trust. What the loader guarantees is about parsing,
not intent: a recipe is read with limits on nesting and alias expansion
(``maskio.safeload``), and nothing in it runs under a shell unless a stage asks for one.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from maskio.atomic import write_json
from maskio.safeload import UnsafeDocument, safe_yaml

ENTRY_POINTS = {"maskgen": "maskgen.cli", "sslmask": "sslmask.cli", "torchrun": "torch.distributed.run"}
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class RecipeError(Exception):
    """A recipe that cannot be read or run (bad file, unknown variable, failed stage)."""


@dataclass(frozen=True)
class Stage:
    name: str
    command: str
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class Recipe:
    name: str
    path: Path
    stages: tuple[Stage, ...]
    record: Path


def _substitute(text: str, variables: dict[str, str], where: str) -> str:
    def repl(m: re.Match) -> str:
        if m.group(1) not in variables:
            raise RecipeError(f"{where}: unknown variable ${{{m.group(1)}}}")
        return variables[m.group(1)]

    return _VAR.sub(repl, text)


def load_recipe(path: str | Path, overrides: dict[str, str] | None = None) -> Recipe:
    path = Path(path)
    try:
        data = safe_yaml(path.read_text())
    except (OSError, yaml.YAMLError, UnsafeDocument) as exc:
        raise RecipeError(f"{path}: cannot read recipe ({exc})".replace("\n", " ")) from exc
    if not isinstance(data, dict) or not isinstance(data.get("stages"), list) or not data["stages"]:
        raise RecipeError(f"{path}: a recipe is a mapping with a non-empty 'stages' list")
    unknown = set(data) - {"name", "description", "vars", "stages", "record"}
    if unknown:
        raise RecipeError(f"{path}: unknown recipe key {sorted(unknown)[0]!r}")
    variables = {str(k): str(v) for k, v in (data.get("vars") or {}).items()}
    for key in overrides or {}:
        if key not in variables:
            raise RecipeError(f"{path}: --var {key}: the recipe has no such variable")
    variables.update(overrides or {})
    name = str(data.get("name") or path.stem)
    stages, seen = [], set()
    for i, raw in enumerate(data["stages"]):
        where = f"{path}: stage {i + 1}"
        if not isinstance(raw, dict) or not raw.get("name") or not raw.get("run"):
            raise RecipeError(f"{where}: a stage needs 'name' and 'run'")
        if set(raw) - {"name", "run", "outputs"}:
            raise RecipeError(
                f"{where}: unknown stage key {sorted(set(raw) - {'name', 'run', 'outputs'})[0]!r}"
            )
        if raw["name"] in seen:
            raise RecipeError(f"{where}: duplicate stage name {raw['name']!r}")
        seen.add(raw["name"])
        outputs = tuple(_substitute(str(o), variables, where) for o in raw.get("outputs") or [])
        if not outputs:
            raise RecipeError(f"{where}: list the stage's 'outputs' (how the runner knows it is complete)")
        command = _substitute(" ".join(str(raw["run"]).split()), variables, where)
        stages.append(Stage(str(raw["name"]), command, outputs))
    default_record = f"{variables.get('out', 'out')}/pipelines/{name}.json"
    record = Path(_substitute(str(data.get("record") or default_record), variables, str(path)))
    return Recipe(name, path, tuple(stages), record)


def _argv(command: str) -> list[str]:
    argv = shlex.split(command)
    if argv and argv[0] in ENTRY_POINTS:
        return [sys.executable, "-m", ENTRY_POINTS[argv[0]], *argv[1:]]
    return argv


def _die_with_parent(parent: int) -> None:
    """In the stage's process, before it runs: ask Linux to SIGTERM it when the pipeline dies
    (a SIGKILLed pipeline left its build running, holding the build's lock). A build stopped so
    resumes like any interrupted one. Elsewhere a no-op."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the pipeline died before prctl took effect
        os._exit(1)


def _read_record(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {"stages": {}}


def _write_record(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, record)


def is_complete(stage: Stage, record: dict[str, Any]) -> bool:
    done = record.get("stages", {}).get(stage.name)
    return (
        bool(done)
        and done.get("status") == "done"
        and done.get("command") == stage.command
        and all(Path(o).exists() for o in stage.outputs)
    )


def run_recipe(recipe: Recipe, force: tuple[str, ...] = (), dry_run: bool = False, echo=print) -> list[str]:
    """Run the stages that are not complete, in order; returns the names of those that ran."""
    for name in force:
        if name not in {s.name for s in recipe.stages}:
            raise RecipeError(f"{recipe.path}: --force {name}: no such stage")
    record = _read_record(recipe.record)
    record.setdefault("stages", {})
    record["recipe"], record["name"] = str(recipe.path), recipe.name
    ran = []
    for stage in recipe.stages:
        if stage.name not in force and is_complete(stage, record):
            echo(f"pipeline {recipe.name}: {stage.name}: complete, skipped")
            continue
        echo(f"pipeline {recipe.name}: {stage.name}: {stage.command}")
        if dry_run:
            ran.append(stage.name)
            continue
        started = time.time()
        entry = {"command": stage.command, "status": "running", "started": started}
        record["stages"][stage.name] = entry
        _write_record(recipe.record, record)
        try:
            guard = functools.partial(_die_with_parent, os.getpid())
            rc = subprocess.run(_argv(stage.command), preexec_fn=guard).returncode
        except FileNotFoundError as exc:
            rc = 127
            echo(f"pipeline {recipe.name}: {stage.name}: {exc.strerror}: {exc.filename}")
        entry.update(returncode=rc, seconds=round(time.time() - started, 1))
        missing = [o for o in stage.outputs if not Path(o).exists()]
        entry["status"] = "done" if rc == 0 and not missing else "failed"
        _write_record(recipe.record, record)
        if rc != 0:
            raise RecipeError(f"{recipe.path}: stage {stage.name!r} failed (exit status {rc})")
        if missing:
            raise RecipeError(f"{recipe.path}: stage {stage.name!r} did not write {missing[0]}")
        ran.append(stage.name)
    return ran
