"""Stage the exact folder a publish uploads: ``README.md`` (the card), ``data/train/*.tar``,
``report.json`` and ``maskgen.json``.

Staging is deterministic (hard links to the build's shards, or masks-only tars repacked in
the same order with the same fixed headers), so a restarted publish stages byte-identical
files and the Hub's content hashes let it skip what already arrived.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from maskgen.pipeline import BuildError
from maskgen.publish.card import render_card
from maskgen.tarwriter import DeterministicTarWriter
from maskio.atomic import atomic_open, write_json
from maskio.metadata import read_manifest, read_report
from maskio.shard_format import (
    FIELD_IMAGE,
    FIELD_ORDER,
    MANIFEST,
    REPORT_JSON,
    iter_tar_samples,
    shard_paths,
)

STAGING_DIR = "publish"
DATA_DIR = "data/train"


@dataclass
class Staged:
    folder: Path
    files: list[str]  # relative paths, upload order (shards first, card last)
    n_samples: int
    n_shards: int


def load_build(out: Path) -> tuple[dict[str, Any], dict[str, Any], list[Path]]:
    """Manifest, report and shards of a finished build, or a one-line error."""
    for name in (MANIFEST, REPORT_JSON):
        if not (out / name).is_file():
            raise BuildError(f"{out}: not a finished maskgen build (no {name})")
    manifest, report = read_manifest(out / MANIFEST), read_report(out / REPORT_JSON)
    shards = shard_paths(out)
    if not manifest.get("complete") or len(shards) != manifest.get("n_shards", -1):
        raise BuildError(
            f"{out}: the build is not complete ({len(shards)} of {manifest.get('n_shards')} shards)"
        )
    return manifest, report, shards


def _scrub(obj: Any, prefixes: list[str]) -> Any:
    """Replace local absolute paths (the source root, the build folder) with placeholders."""
    if isinstance(obj, dict):
        return {k: _scrub(v, prefixes) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_scrub(v, prefixes) for v in obj]
    if isinstance(obj, str):
        for prefix, name in prefixes:
            obj = obj.replace(prefix, name)
    return obj


def _public_command(command: str | None) -> str | None:
    if not command:
        return command
    first, _, rest = command.partition(" ")
    return f"{os.path.basename(first)} {rest}".strip()


def _link_or_copy(src: Path, dst: Path) -> None:
    if dst.exists() and dst.stat().st_size == src.stat().st_size and os.path.samefile(src, dst):
        return
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _repack_masks_only(src: Path, dst: Path) -> None:
    if dst.exists() and dst.stat().st_mtime >= src.stat().st_mtime:
        return
    keep = set(FIELD_ORDER) - {FIELD_IMAGE}
    with atomic_open(dst) as f:
        writer = DeterministicTarWriter(f)
        for key, fields in iter_tar_samples(src, keep):
            writer.write_sample(key, fields)
        writer.close()


def stage(out: str | Path, repo: str, masks_only: bool = False, license_id: str | None = None) -> Staged:
    out = Path(out)
    manifest, report, shards = load_build(out)
    folder = out / STAGING_DIR
    data = folder / DATA_DIR
    data.mkdir(parents=True, exist_ok=True)
    names = {p.name for p in shards}
    for stale in data.glob("*.tar"):
        if stale.name not in names:
            stale.unlink()
    for shard in shards:
        if masks_only:
            _repack_masks_only(shard, data / shard.name)
        else:
            _link_or_copy(shard, data / shard.name)
    prefixes = [(str(out.resolve()), "<build>")]
    if manifest.get("root"):
        prefixes.insert(0, (str(Path(manifest["root"]).resolve()), f"<{manifest['source']} root>"))
    public_manifest = _scrub(manifest, prefixes)
    public_manifest["command"] = _public_command(public_manifest.get("command"))
    public_manifest.pop("runs", None)
    write_json(folder / "maskgen.json", public_manifest)
    write_json(folder / REPORT_JSON, _scrub(report, prefixes))
    with atomic_open(folder / "README.md", "w") as f:
        f.write(render_card(public_manifest, report, repo, masks_only, license_id))
    files = [f"{DATA_DIR}/{p.name}" for p in shards] + [REPORT_JSON, "maskgen.json", "README.md"]
    return Staged(folder, files, int(manifest["n_samples"]), len(shards))
