"""What a build folder and a run folder hold, and the one guard every writer's ``--out`` passes:
no command may write over a file that belongs to a build (its shards, manifest, report, stats,
errors, lock), a training run (checkpoint, config, log, index cache, TensorBoard files) or a
published snapshot (its tars and ``maskgen.json``). An ``eval --out RUN/checkpoint.pt`` used to
replace the checkpoint with a JSON line and exit 0.
"""

from __future__ import annotations

from pathlib import Path

from maskio.buildlock import LOCK
from maskio.errors import ShardError
from maskio.shard_format import ERRORS, INDEX, MANIFEST, REPORT_HTML, REPORT_JSON, SHARDS_DIR

# a training run's folder (written by sslmask.engine)
CHECKPOINT = "checkpoint.pt"
CONFIG_FILE = "config.yaml"
LOG_FILE = "log.jsonl"
INDEX_CACHE = "shard-index.npz"
RUN_FILES = (CHECKPOINT, CONFIG_FILE, LOG_FILE, INDEX_CACHE)
RUN_TENSORBOARD = "tb"
BUILD_FILES = (MANIFEST, INDEX, REPORT_JSON, REPORT_HTML, ERRORS, LOCK)
PUBLISHED_MANIFEST = "maskgen.json"


def owner_of(path: str | Path) -> str | None:
    """``"the build B"``, ``"the run R"`` or ``"the published dataset D"`` when ``path`` is one of
    that folder's own files (whether or not the file exists yet); None otherwise."""
    path = Path(path).absolute()
    folder = path.parent
    if path.name in BUILD_FILES and (folder / MANIFEST).is_file():
        return f"the build {folder}"
    if folder.name == SHARDS_DIR and (folder.parent / MANIFEST).is_file():
        return f"the build {folder.parent}"
    if path.name in RUN_FILES and ((folder / CHECKPOINT).is_file() or (folder / CONFIG_FILE).is_file()):
        return f"the run {folder}"
    if folder.name == RUN_TENSORBOARD and (folder.parent / CONFIG_FILE).is_file():
        return f"the run {folder.parent}"
    if path.name == PUBLISHED_MANIFEST and (folder / "data").is_dir():
        return f"the published dataset {folder}"
    if (
        path.suffix == ".tar"
        and folder.parent.name == "data"
        and (folder.parent.parent / PUBLISHED_MANIFEST).is_file()
    ):
        return f"the published dataset {folder.parent.parent}"
    return None


def refuse_protected(path: str | Path, option: str = "--out") -> None:
    """One ShardError line when ``path`` would overwrite a build's, run's or dataset's own file."""
    owner = owner_of(path)
    if owner is not None:
        raise ShardError(f"{option} {path}: is a file of {owner}; write the result elsewhere")
