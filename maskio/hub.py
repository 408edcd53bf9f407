"""Published mask datasets as shard sources: a Hub dataset repo (``hf://datasets/OWNER/NAME``,
optionally ``@REVISION``) or a local snapshot of one (``huggingface_hub.snapshot_download``'s
folder, or ``hf download``'s), wherever a build folder works.

A published repo holds ``data/train/*.tar`` (the shards), ``README.md`` (the card) and
``maskgen.json`` (the build's manifest without its run history: method, parameters, class
names). Downloads go through huggingface_hub's cache, so a second run reads the cache and
``HF_HUB_OFFLINE=1`` works once the files are there.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from maskio.errors import ShardError
from maskio.hubtoken import Scrub, first_line, hub_guard
from maskio.metadata import read_manifest

HF_PREFIX = "hf://datasets/"
PUBLISHED_MANIFEST = "maskgen.json"
SNAPSHOT_FILES = ["data/*/*.tar", "README.md", PUBLISHED_MANIFEST]
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def is_hub_spec(spec: str) -> bool:
    return str(spec).startswith(HF_PREFIX)


def snapshot_tars(folder: Path) -> list[Path]:
    """The shards of a published dataset's snapshot folder (none: not such a folder)."""
    if not folder.is_dir() or (folder / "shards").is_dir():
        return []
    return sorted(folder.glob("data/*/*.tar"))


def download_snapshot(spec: str) -> Path:
    """The local snapshot folder of ``hf://datasets/OWNER/NAME[@REVISION]`` (from the cache when
    it is there); one ShardError line for a bad name, an unknown repo or revision, or no network
    and no cached copy."""
    repo, _, revision = spec[len(HF_PREFIX) :].partition("@")
    if not _REPO_ID.fullmatch(repo):
        raise ShardError(f"{spec}: expected hf://datasets/OWNER/NAME[@REVISION]")
    with hub_guard() as scrub:
        folder = _snapshot(spec, repo, revision, scrub)
    if not snapshot_tars(Path(folder)):
        raise ShardError(f"{spec}: the repo has no data/*/*.tar (not a maskgen dataset?)")
    return Path(folder)


def _snapshot(spec: str, repo: str, revision: str, scrub: Scrub) -> str:
    """``snapshot_download`` with each failure as one ShardError line, scrubbed of the token: a
    hostile endpoint may echo it in an error header or a redirect URL."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return snapshot_download(
            repo_id=repo, repo_type="dataset", revision=revision or None, allow_patterns=SNAPSHOT_FILES
        )
    except RevisionNotFoundError:
        raise ShardError(f"{spec}: the dataset has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise ShardError(f"{spec}: no such dataset repo on the Hub (or no access to it)") from None
    except LocalEntryNotFoundError as exc:
        cause = first_line(exc.__cause__, scrub) if exc.__cause__ else "offline, or HF_HUB_OFFLINE=1"
        raise ShardError(
            f"{spec}: not in the local Hugging Face cache, and the Hub cannot be reached ({cause})"
        ) from None
    except Exception as exc:  # the client raises many types (HTTP, OS, timeouts)
        raise ShardError(
            f"{spec}: download failed ({type(exc).__name__}: {first_line(exc, scrub)})"
        ) from None


def published_manifest(folder: Path) -> dict[str, Any] | None:
    """A snapshot's ``maskgen.json`` (None when absent; one ShardError line when doctored)."""
    path = folder / PUBLISHED_MANIFEST
    return read_manifest(path) if path.is_file() else None
