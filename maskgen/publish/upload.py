"""Upload a staged folder to a Hub dataset repo, resumably, with ``huggingface_hub``.

Files go up in commits of ``files_per_commit``; before each commit the library asks the Hub
which files it already holds with the same content (``preupload``) and which LFS objects it
already stores (the LFS batch call), so a publish restarted after an interruption sends only
what did not arrive. The token comes from where ``huggingface_hub`` looks (``HF_TOKEN``, the
login cache); it is passed only in request headers and never printed, logged or written.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from maskgen.pipeline import BuildError
from maskgen.publish.stage import Staged


@dataclass
class UploadResult:
    url: str
    commits: int
    files: int


def _hub_error(exc: BaseException, what: str, token: str | None) -> BuildError:
    """One line, status code first, with the token scrubbed in case a server echoed it.

    The library wraps failed parallel uploads in ``RuntimeError``; the HTTP status is on the
    exception it was raised from.
    """
    status, cause = None, exc
    while cause is not None and status is None:
        status = getattr(getattr(cause, "response", None), "status_code", None)
        cause = cause.__cause__
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if token:
        text = text.replace(token, "***")
    return BuildError(f"{what} failed{f' (HTTP {status})' if status else ''}: {text}")


def upload(
    staged: Staged,
    repo: str,
    private: bool = False,
    revision: str | None = None,
    endpoint: str | None = None,
    files_per_commit: int = 50,
    echo: Callable[[str], None] = print,
) -> UploadResult:
    from huggingface_hub import CommitOperationAdd, HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()  # per-commit lines below instead; bars would bury a one-line error

    token = get_token()
    if not token:
        raise BuildError("no Hugging Face token: set HF_TOKEN or run `hf auth login`")
    api = HfApi(endpoint=endpoint, token=token)
    try:
        user = api.whoami()
    except HfHubHTTPError as exc:
        status = getattr(exc.response, "status_code", None)
        if status in (401, 403):
            raise BuildError(
                f"the Hugging Face token was refused by {api.endpoint} (HTTP {status})"
            ) from None
        raise _hub_error(exc, "checking the token", token) from None
    except OSError as exc:
        raise BuildError(f"cannot reach {api.endpoint}: {exc}") from None
    echo(f"maskgen: publishing to {repo} as {user.get('name', '?')}")
    try:
        url = str(api.create_repo(repo, repo_type="dataset", private=private, exist_ok=True))
        if revision and revision != "main":
            api.create_branch(repo, repo_type="dataset", branch=revision, exist_ok=True)
        files = staged.files
        commits = 0
        for start in range(0, len(files), files_per_commit):
            batch = files[start : start + files_per_commit]
            ops = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(staged.folder / f)) for f in batch]
            api.create_commit(
                repo,
                ops,
                repo_type="dataset",
                revision=revision,
                commit_message=f"maskgen publish: files {start + 1}-{start + len(batch)} of {len(files)}",
            )
            commits += 1
            echo(f"maskgen: {start + len(batch)}/{len(files)} files on the Hub")
    except (HfHubHTTPError, RuntimeError) as exc:
        raise _hub_error(exc, f"uploading to {repo}", token) from None
    except OSError as exc:
        raise BuildError(f"uploading to {repo} failed: {exc}") from None
    return UploadResult(url, commits, len(files))
