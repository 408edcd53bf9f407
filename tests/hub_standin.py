"""A local stand-in for the Hugging Face Hub endpoints ``maskgen publish`` uses, on 127.0.0.1.

Implements: whoami-v2, repo creation, branch creation, repo info, preupload (upload modes
and the oids of files already committed), the LFS batch API (no upload action for objects it
already stores), basic LFS PUT uploads, NDJSON commits, the file tree, and file downloads (HEAD and GET
``/datasets/REPO/resolve/REVISION/PATH``, with the headers ``hf_hub_download`` reads). ``fail_put_after`` makes the
n+1-th LFS upload fail with HTTP 403 (not retried by the client), to interrupt a publish.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import yaml

TOKEN = "hf_standin_secret_token_123"


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubState:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.repos: dict[str, dict[str, Any]] = {}
        self.lfs: dict[str, bytes] = {}
        self.puts: dict[str, int] = {}
        self.commits: list[dict[str, Any]] = []
        self.fail_put_after: int | None = None
        self.headers_seen: list[str] = []
        self.validated: list[dict[str, Any]] = []
        self.echo_token = False  # a hostile Hub: whoami's user name is the Authorization header
        # hostile modes (issue 35): "zero_width" (whoami's name is the token with a zero-width
        # space inside), "whoami_list" (whoami answers a JSON list), "repo_url" (create_repo's
        # URL is not a Hub URL and holds the token), "warning" (every answer carries an
        # X-HF-Warning header with the token, which huggingface_hub logs itself);
        # issue 44, the read path: "error_message" (every download answers 403 with the token in
        # X-Error-Message), "redirect" (every download redirects to a URL holding the token, which
        # answers 404); issue 47, disguised tokens: "combining" and "filler" (whoami's name is the
        # token with U+034F or U+3164 inside), "nested_name" (the name is a list holding the token
        # with a zero-width space), "percent_url" (create_repo's URL holds the token
        # percent-encoded)
        self.hostile: str | None = None


class Handler(BaseHTTPRequestHandler):
    state: HubState
    base: str

    def log_message(self, *args: Any) -> None:  # keep test output clean
        pass

    def _send(self, status: int, body: Any = None, error_code: str | None = None) -> None:
        data = json.dumps(body if body is not None else {}).encode()
        self.send_response(status)
        if error_code:  # how the Hub tells a missing revision from a missing repo
            self.send_header("X-Error-Code", error_code)
        if self.state.hostile == "warning":
            self.send_header("X-HF-Warning", f"leak; your token is {TOKEN}")
        if self.state.hostile == "error_message" and status >= 400:
            self.send_header("X-Error-Message", f"token {TOKEN} is not valid")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _authorized(self) -> bool:
        self.state.headers_seen.append(self.headers.get("Authorization", ""))
        return self.headers.get("Authorization") == f"Bearer {TOKEN}"

    def _resolve(self, head_only: bool) -> bool:
        """Serve ``/datasets/REPO/resolve/REVISION/PATH`` (REVISION: a branch or the head sha);
        False when the path is not a download."""
        m = re.fullmatch(r"/datasets/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", self.path.split("?")[0])
        if not m:
            return False
        repo = self.state.repos.get(m.group(1))
        revision = m.group(2)
        if repo is None or (revision not in repo["branches"] and revision != repo["head"]):
            self._send(404, {"error": "Repository or revision not found"})
            return True
        branch = repo["branches"].get(revision) or repo["branches"]["main"]
        entry = branch.get(m.group(3))
        if entry is None:
            self._send(404, {"error": "Entry not found"})
            return True
        self.send_response(200)
        self.send_header("X-Repo-Commit", repo["head"])
        self.send_header("ETag", f'"{entry["oid"]}"')
        if len(entry["oid"]) == 64:  # an LFS file: the Hub reports the sha256 as the linked etag
            self.send_header("X-Linked-Etag", f'"{entry["oid"]}"')
            self.send_header("X-Linked-Size", str(entry["size"]))
        self.send_header("Content-Length", str(len(entry["data"])))
        self.end_headers()
        if not head_only:
            self.wfile.write(entry["data"])
        return True

    def _hostile_read(self) -> bool:
        """The read-path modes: True when the request was answered by one of them."""
        if self.path.startswith("/leak/"):
            self._send(404, {"error": "gone"})
            return True
        download = "/resolve/" in self.path or "/revision/" in self.path
        if self.state.hostile == "error_message" and download:
            self._send(403, {"error": "Forbidden"})
            return True
        if self.state.hostile == "redirect" and download:
            self.send_response(302)
            self.send_header("Location", f"{self.base}/leak/{TOKEN}/x")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return True
        return False

    def do_HEAD(self) -> None:  # noqa: N802
        if self._hostile_read():
            return None
        if not self._authorized():
            return self._send(401, {"error": "Invalid credentials in Authorization header"})
        if not self._resolve(head_only=True):
            self._send(404, {"error": "not found"})

    def do_GET(self) -> None:  # noqa: N802
        if self._hostile_read():
            return None
        if not self._authorized():
            return self._send(401, {"error": "Invalid credentials in Authorization header"})
        if self._resolve(head_only=False):
            return None
        if self.path == "/api/whoami-v2":
            if self.state.hostile == "whoami_list":
                return self._send(200, ["tester", TOKEN])
            name = f"user-{self.headers.get('Authorization')}" if self.state.echo_token else "tester"
            disguise = {"zero_width": "\u200b", "combining": "\u034f", "filler": "\u3164"}
            if self.state.hostile in disguise:
                name = f"user-{TOKEN[:5]}{disguise[self.state.hostile]}{TOKEN[5:]}"
            if self.state.hostile == "nested_name":
                name = ["user", f"{TOKEN[:5]}\u200b{TOKEN[5:]}"]
            return self._send(200, {"type": "user", "name": name, "auth": {"accessToken": {"role": "write"}}})
        m = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/tree/([^?]+)(\?.*)?", self.path)
        if m and m.group(1) in self.state.repos:  # list_repo_tree, as snapshot_download asks it
            repo = self.state.repos[m.group(1)]
            files = repo["branches"].get(m.group(2)) or repo["branches"]["main"]
            entries = []
            for path, f in sorted(files.items()):
                entry = {"type": "file", "path": path, "oid": f["oid"], "size": f["size"]}
                if len(f["oid"]) == 64:
                    entry.update(
                        oid=git_sha1(f["data"]), lfs={"oid": f["oid"], "size": f["size"], "pointerSize": 134}
                    )
                entries.append(entry)
            return self._send(200, entries)
        m = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/revision/([^?]+)(\?.*)?", self.path)
        if m and m.group(1) in self.state.repos:
            repo = self.state.repos[m.group(1)]
            revision = m.group(2).replace("%2F", "/")
            if revision not in repo["branches"] and revision != repo["head"]:
                return self._send(
                    404, {"error": f"Invalid rev id: {revision}"}, error_code="RevisionNotFound"
                )
            files = repo["branches"].get(revision) or repo["branches"]["main"]
            return self._send(200, {"id": m.group(1), "sha": repo["head"], "private": repo["private"],
                                    "siblings": [{"rfilename": f} for f in sorted(files)]})  # fmt: skip
        return self._send(404, {"error": "Repository not found"}, error_code="RepoNotFound")

    def do_PUT(self) -> None:  # noqa: N802
        m = re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", self.path)
        if not m:
            return self._send(404)
        data = self._body()
        with self.state.lock:
            done = sum(self.state.puts.values())
            if self.state.fail_put_after is not None and done >= self.state.fail_put_after:
                return self._send(403, {"error": "upload refused (test interruption)"})
            if hashlib.sha256(data).hexdigest() != m.group(1):
                return self._send(400, {"error": "sha256 mismatch"})
            self.state.lfs[m.group(1)] = data
            self.state.puts[m.group(1)] = self.state.puts.get(m.group(1), 0) + 1
        return self._send(200)

    def _upload_modes(self, files: dict[str, Any], body: bytes) -> list[dict[str, Any]]:
        out = []
        for f in json.loads(body)["files"]:
            lfs = f["path"].endswith(".tar") or f["size"] > 10_000_000
            have = files.get(f["path"])
            out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                        "oid": have["oid"] if have else None})  # fmt: skip
        return out

    def _commit(
        self, repo_id: str, repo: dict[str, Any], revision: str, files: dict[str, Any], body: bytes
    ) -> None:
        added = []
        for line in (json.loads(raw) for raw in body.splitlines() if raw.strip()):
            value = line["value"]
            if line["key"] == "file":
                data = base64.b64decode(value["content"])
                files[value["path"]] = {"oid": git_sha1(data), "size": len(data), "data": data}
            elif line["key"] == "lfsFile":
                if value["oid"] not in self.state.lfs:
                    return self._send(422, {"error": f"LFS object {value['oid']} missing"})
                files[value["path"]] = {
                    "oid": value["oid"],
                    "size": value["size"],
                    "data": self.state.lfs[value["oid"]],
                }
            else:
                continue
            added.append(value["path"])
        repo["head"] = hashlib.sha1(json.dumps(sorted(added)).encode() + repo["head"].encode()).hexdigest()
        self.state.commits.append({"repo": repo_id, "revision": revision, "files": added})
        return self._send(200, {"commitUrl": f"{self.base}/datasets/{repo_id}/commit/{repo['head']}",
                                "commitOid": repo["head"], "success": True})  # fmt: skip

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?")[0]
        if not self._authorized():
            return self._send(401, {"error": "Invalid credentials in Authorization header"})
        body = self._body()
        st = self.state
        if path == "/api/validate-yaml":
            content = json.loads(body)["content"]
            try:
                meta = yaml.safe_load(content.split("---\n")[1]) if content.startswith("---\n") else None
            except yaml.YAMLError as exc:
                return self._send(400, {"error": f"invalid YAML: {exc}"})
            if not isinstance(meta, dict) or "license" not in meta:
                return self._send(400, {"error": "metadata must be a mapping with a license"})
            st.validated.append(meta)
            return self._send(200, {"warnings": []})
        if path == "/api/repos/create":
            req = json.loads(body)
            repo_id = (
                f"{req['organization']}/{req['name']}" if req.get("organization") else f"tester/{req['name']}"
            )
            if req.get("type") != "dataset":
                return self._send(400, {"error": "expected a dataset repo"})
            with st.lock:
                if repo_id in st.repos:
                    return self._send(
                        409,
                        {
                            "error": "You already created this dataset repo",
                            "url": f"{self.base}/datasets/{repo_id}",
                        },
                    )
                st.repos[repo_id] = {
                    "private": req.get("visibility") == "private" or bool(req.get("private")),
                    "branches": {"main": {}},
                    "head": "0" * 40,
                }
            if st.hostile == "repo_url":
                return self._send(200, {"url": f"weird://{TOKEN}/{repo_id}", "name": repo_id})
            if st.hostile == "percent_url":
                encoded = "".join(f"%{ord(c):02X}" if c == "_" else c for c in TOKEN)
                return self._send(
                    200, {"url": f"{self.base}/datasets/{repo_id}?t={encoded}", "name": repo_id}
                )
            return self._send(200, {"url": f"{self.base}/datasets/{repo_id}", "name": repo_id})
        m = re.fullmatch(r"/datasets/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path)
        if m:
            objects = []
            for obj in json.loads(body)["objects"]:
                entry = {"oid": obj["oid"], "size": obj["size"]}
                if obj["oid"] not in st.lfs:
                    entry["actions"] = {"upload": {"href": f"{self.base}/lfs-upload/{obj['oid']}"}}
                objects.append(entry)
            return self._send(200, {"transfer": "basic", "objects": objects})
        m = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/(branch|preupload|commit)/([^/]+)", path)
        if m:
            repo = st.repos.get(m.group(1))
            if repo is None:
                return self._send(404, {"error": "Repository not found"})
            action, revision = m.group(2), m.group(3)
            if action == "branch":
                if revision in repo["branches"]:
                    return self._send(409, {"error": "Reference already exists"})
                repo["branches"][revision] = dict(repo["branches"]["main"])
                return self._send(200)
            files = repo["branches"].setdefault(revision, {})
            if action == "preupload":
                return self._send(200, {"files": self._upload_modes(files, body), "commitOid": repo["head"]})
            return self._commit(m.group(1), repo, revision, files, body)
        return self._send(404, {"error": f"no such endpoint {path}"})


def start() -> tuple[ThreadingHTTPServer, HubState, str]:
    state = HubState()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    handler = type("BoundHandler", (Handler,), {"state": state, "base": base})
    server.RequestHandlerClass = handler
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, state, base


def seed(state: HubState, repo_id: str, folder) -> None:
    """Put a staged folder into ``repo_id`` as if it had been published (tars as LFS files)."""
    from pathlib import Path

    files = {}
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        data = path.read_bytes()
        lfs = path.suffix == ".tar"
        oid = hashlib.sha256(data).hexdigest() if lfs else git_sha1(data)
        files[path.relative_to(folder).as_posix()] = {"oid": oid, "size": len(data), "data": data}
    head = hashlib.sha1(json.dumps(sorted(files)).encode()).hexdigest()
    state.repos[repo_id] = {"private": False, "branches": {"main": files}, "head": head}


def start_silent() -> tuple[object, str]:
    """An endpoint on 127.0.0.1 that accepts every connection and never answers (issue 47 item 4);
    ``stop()`` on the returned object closes it."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    listener.settimeout(0.2)
    held: list[socket.socket] = []
    stopping = threading.Event()

    def accept() -> None:
        while not stopping.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    threading.Thread(target=accept, daemon=True).start()

    class Silent:
        def stop(self) -> None:
            stopping.set()
            for conn in held:
                conn.close()
            listener.close()

    return Silent(), f"http://127.0.0.1:{listener.getsockname()[1]}"
