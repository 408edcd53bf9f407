"""Upload a staged folder to a Hub dataset repo, resumably, with ``huggingface_hub``.

Files go up in commits of ``files_per_commit``; before each commit the library asks the Hub
which files it already holds with the same content (``preupload``) and which LFS objects it
already stores (the LFS batch call), so a publish restarted after an interruption sends only
what did not arrive. The token comes from where ``huggingface_hub`` looks (``HF_TOKEN``, the
login cache); it is passed only in request headers and never printed, logged or written.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from maskgen.pipeline import BuildError
from maskgen.publish.stage import Staged
from maskio.hubtoken import first_line, hub_guard


@dataclass
class UploadResult:
    url: str
    commits: int
    files: int


def network_errors() -> tuple[type[BaseException], ...]:
    """What a failed connection raises, whichever HTTP client this huggingface_hub uses
    (requests' errors are OSErrors; httpx's, and its fork httpx2's, are not)."""
    errors: list[type[BaseException]] = [OSError]
    for module, name in (("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests", "RequestException")):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def _hub_error(exc: BaseException, what: str, scrub: Callable[[str], str]) -> BuildError:
    """One line, status code first, with the token scrubbed in case a server echoed it.

    The library wraps failed parallel uploads in ``RuntimeError``; the HTTP status is on the
    exception it was raised from.
    """
    status, cause = None, exc
    while cause is not None and status is None:
        status = getattr(getattr(cause, "response", None), "status_code", None)
        cause = cause.__cause__
    return BuildError(
        scrub(f"{what} failed{f' (HTTP {status})' if status else ''}: {first_line(exc, scrub)}")
    )


def upload(
    staged: Staged,
    repo: str,
    private: bool = False,
    revision: str | None = None,
    endpoint: str | None = None,
    files_per_commit: int = 50,
    echo: Callable[[str], None] = print,
) -> UploadResult:
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()  # per-commit lines below instead; bars would bury a one-line error

    token = get_token()
    if not token:
        raise BuildError("no Hugging Face token: set HF_TOKEN or run `hf auth login`")
    with hub_guard(echo) as scrub:
        say = lambda text: echo(scrub(text))  # noqa: E731 -- nothing printed below bypasses the scrub
        api = HfApi(endpoint=endpoint, token=token)
        user = _whoami(api, scrub)
        name = user.get("name")  # printed only as plain text: a repr would show escapes the scrub cannot see
        say(f"maskgen: publishing to {repo} as {name if isinstance(name, str) else '?'}")
        try:
            url = str(api.create_repo(repo, repo_type="dataset", private=private, exist_ok=True))
            if revision and revision != "main":
                api.create_branch(repo, repo_type="dataset", branch=revision, exist_ok=True)
            commits = _commit_batches(api, staged, repo, revision, files_per_commit, say)
        except Exception as exc:  # any failure of the client (HTTP, network, a malformed answer): one line
            raise _hub_error(exc, f"uploading to {repo}", scrub) from None
    return UploadResult(scrub(url), commits, len(staged.files))


def _whoami(api, scrub: Callable[[str], str]) -> dict:
    """Check the token; one line (scrubbed) for a refusal, a failure or a malformed answer."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        user = api.whoami()
    except HfHubHTTPError as exc:
        status = getattr(exc.response, "status_code", None)
        if status in (401, 403):
            raise BuildError(
                scrub(f"the Hugging Face token was refused by {api.endpoint} (HTTP {status})")
            ) from None
        raise _hub_error(exc, "checking the token", scrub) from None
    except network_errors() as exc:
        raise _hub_error(exc, f"reaching {api.endpoint}", scrub) from None
    except Exception as exc:  # a malformed answer the client could not parse
        raise _hub_error(exc, "checking the token", scrub) from None
    if not isinstance(user, dict):
        raise BuildError(f"checking the token failed: {api.endpoint} answered with a {type(user).__name__}, "
                         "not a user")  # fmt: skip
    return user


def _commit_batches(api, staged: Staged, repo: str, revision: str | None, per_commit: int, say) -> int:
    """Commit ``staged`` in batches of ``per_commit`` files; the number of commits made."""
    from huggingface_hub import CommitOperationAdd

    files = staged.files
    commits = 0
    for start in range(0, len(files), per_commit):
        batch = files[start : start + per_commit]
        ops = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(staged.folder / f)) for f in batch]
        api.create_commit(repo, ops, repo_type="dataset", revision=revision,
                          commit_message=f"maskgen publish: files {start + 1}-{start + len(batch)} of {len(files)}")  # fmt: skip
        commits += 1
        say(f"maskgen: {start + len(batch)}/{len(files)} files on the Hub")
    return commits
