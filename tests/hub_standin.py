"""A small loopback stand-in of the Hugging Face Hub HTTP API, for testing the real upload/download code.

Only what huggingface_hub (2.x, with ``HF_HUB_DISABLE_XET=1``) and transformers' ``from_pretrained`` call
for model repositories is implemented, the way the Hub answers it:

- ``POST /api/repos/create``                       -> 200 ``{"url"}``; 409 when the repo exists
- ``POST /api/validate-yaml``                      -> README front matter check (errors when unclosed)
- ``POST /api/{type}s/{repo}/preupload/{rev}``     -> every file ``uploadMode: "regular"`` (content goes inline in
                                                      the commit; no LFS / Xet), ``oid`` = git blob sha1 of the
                                                      current remote file so unchanged files are skipped
- ``POST /api/{type}s/{repo}/branch/{branch}``    -> a new branch at ``startingPoint`` (default: main); 409 when it
                                                      exists
- ``POST /api/{type}s/{repo}/commit/{rev}``        -> NDJSON commit: header, file (base64), deletedFile, deletedFolder
                                                      (``lfsFile`` is refused: the stand-in stores no LFS objects)
- ``GET  /api/{type}s/{repo}[/revision/{rev}]``    -> repo info (sha, siblings)
- ``GET  /api/{type}s/{repo}/tree/{rev}[/{path}]`` -> file listing
- ``HEAD/GET /[{type}s/]{repo}/resolve/{rev}/{path}`` -> the file, with ``X-Repo-Commit``, ``ETag`` (git sha1),
                                                      ``Content-Length``; 404 + ``X-Error-Code`` (RepoNotFound,
                                                      RevisionNotFound, EntryNotFound) like the Hub

Repositories live in memory. Writes need an ``Authorization: Bearer ...`` header (any token). The server
listens on 127.0.0.1 port 0 in a daemon thread, refuses bodies over ``max_body`` bytes, times out idle
connections, and shuts itself down after ``lifetime_s`` seconds if the test does not stop it first.
Every request is logged in ``HubStandin.log`` (method, path, status) so a failing test can show it, and the token
each request carried in ``HubStandin.tokens`` (method, path, token or None).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool = False
    commits: list = field(default_factory=list)  # [(oid, {path: bytes}, summary)], oldest first
    branches: dict = field(default_factory=dict)  # branch -> commit oid

    def snapshot(self, revision: str):
        """(commit oid, files) of a branch name or a commit oid; None when unknown."""
        oid = self.branches.get(revision, revision)
        for commit_oid, files, _ in self.commits:
            if commit_oid == oid:
                return commit_oid, files
        return None

    def commit(self, branch: str, files: dict, summary: str) -> str:
        parent = self.branches.get(branch, "")
        payload = json.dumps(
            {"parent": parent, "summary": summary, "files": {p: git_blob_sha1(b) for p, b in sorted(files.items())}}
        )
        oid = hashlib.sha1(payload.encode() + str(len(self.commits)).encode()).hexdigest()
        self.commits.append((oid, dict(files), summary))
        self.branches[branch] = oid
        return oid


class HubStandin:
    """``with HubStandin() as hub: ... hub.endpoint ...``; repos in ``hub.repos[(repo_type, repo_id)]``."""

    def __init__(self, max_body: int = 64 * 2**20, lifetime_s: float = 300.0, request_timeout_s: float = 30.0):
        self.repos: dict[tuple[str, str], Repo] = {}
        self.log: list[tuple[str, str, int]] = []
        self.tokens: list[tuple[str, str, str | None]] = []
        self.lock = threading.Lock()
        self.max_body = max_body
        self.lifetime_s = lifetime_s
        handler = type("Handler", (_Handler,), {"hub": self, "timeout": request_timeout_s})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread: threading.Thread | None = None
        self._timer: threading.Timer | None = None

    # -- lifecycle -----------------------------------------------------------------------------------
    def start(self) -> HubStandin:
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()
        self._timer = threading.Timer(self.lifetime_s, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._thread is not None and self._thread.is_alive():
            self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> HubStandin:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- test helpers --------------------------------------------------------------------------------
    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """The files of a repo at a revision (empty dict when the repo or revision does not exist)."""
        repo = self.repos.get((repo_type, repo_id))
        snap = repo.snapshot(revision) if repo else None
        return dict(snap[1]) if snap else {}

    def seed(self, repo_id: str, files: dict[str, bytes], repo_type: str = "model", summary: str = "seed") -> str:
        """Create a repo holding ``files`` directly (a fixture repo), returns the commit oid."""
        with self.lock:
            repo = self.repos.setdefault((repo_type, repo_id), Repo(repo_id, repo_type))
            if not repo.commits:
                repo.commit("main", {".gitattributes": b""}, "initial commit")
            _, current = repo.snapshot("main")
            return repo.commit("main", {**current, **files}, summary)

    def requests(self) -> str:
        return "\n".join(f"{m} {p} -> {s}" for m, p, s in self.log)


class _Error(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, commit: str | None = None, **extra):
        super().__init__(message)
        self.status, self.message, self.code, self.commit, self.extra = status, message, code, commit, extra


_REPO = r"(?P<repo>[\w.-]+(?:/[\w.-]+)?)"
_TYPE = r"(?P<type>models|datasets|spaces)"
ROUTES = [
    ("POST", re.compile(r"/api/repos/create"), "create_repo"),
    ("POST", re.compile(r"/api/validate-yaml"), "validate_yaml"),
    ("POST", re.compile(rf"/api/{_TYPE}/{_REPO}/preupload/(?P<rev>[^/]+)"), "preupload"),
    ("POST", re.compile(rf"/api/{_TYPE}/{_REPO}/commit/(?P<rev>[^/]+)"), "commit"),
    ("POST", re.compile(rf"/api/{_TYPE}/{_REPO}/branch/(?P<branch>[^/]+)"), "create_branch"),
    ("GET", re.compile(rf"/api/{_TYPE}/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?"), "tree"),
    ("GET", re.compile(rf"/api/{_TYPE}/{_REPO}(?:/revision/(?P<rev>[^/]+))?"), "repo_info"),
    ("GET", re.compile(rf"/(?:(?P<type>datasets|spaces)/)?{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)"), "resolve"),
]


class _Handler(BaseHTTPRequestHandler):
    hub: HubStandin
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects; every answer carries a Content-Length

    def log_message(self, *args) -> None:  # quiet; requests are recorded in hub.log
        pass

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    # -- plumbing ------------------------------------------------------------------------------------
    def _dispatch(self, method: str) -> None:
        path = urlsplit(self.path).path  # matched quoted: a revision may hold an encoded "/"
        status = 500
        try:
            self._raw = self._read_body()
            for route_method, pattern, name in ROUTES:
                match = pattern.fullmatch(path)
                if match and (route_method == method or (route_method == "GET" and method == "HEAD")):
                    groups = {k: unquote(v) if v is not None else None for k, v in match.groupdict().items()}
                    status = getattr(self, name)(method, **groups)
                    break
            else:
                raise _Error(404, f"the stand-in does not implement {method} {path}")
        except _Error as error:
            status = error.status
            headers = {"X-Error-Message": error.message}
            if error.code:
                headers["X-Error-Code"] = error.code
            if error.commit:
                headers["X-Repo-Commit"] = error.commit
            self._send(
                status, json.dumps({"error": error.message, **error.extra}).encode(), headers, head=method == "HEAD"
            )
        except Exception as error:  # a bug in the stand-in: answer 500 rather than hang the client
            self._send(500, json.dumps({"error": repr(error)}).encode(), {}, head=method == "HEAD")
        finally:
            auth = self.headers.get("Authorization", "")
            with self.hub.lock:
                self.hub.log.append((method, path, status))
                self.hub.tokens.append((method, path, auth[len("Bearer ") :] if auth.startswith("Bearer ") else None))

    def _send(
        self, status: int, body: bytes, headers: dict, content_type: str = "application/json", head: bool = False
    ):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, payload, status: int = 200, head: bool = False) -> int:
        self._send(status, json.dumps(payload).encode(), {}, head=head)
        return status

    def _body(self) -> bytes:
        return self._raw

    def _read_body(self) -> bytes:
        """Read the whole request body first, so an early error answer never leaves it in the stream."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks, total = [], 0
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    break
                total += size
                if total > self.hub.max_body:
                    self.close_connection = True
                    raise _Error(413, "request body too large")
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        if length > self.hub.max_body:
            self.close_connection = True
            raise _Error(413, "request body too large")
        return self.rfile.read(length)

    def _need_token(self) -> None:
        if not self.headers.get("Authorization", "").startswith("Bearer "):
            raise _Error(401, "Invalid credentials in Authorization header")

    def _repo(self, type_plural: str | None, repo_id: str) -> Repo:
        repo = self.hub.repos.get((REPO_TYPES[type_plural or "models"], repo_id))
        if repo is None:
            raise _Error(404, "Repository not found", code="RepoNotFound")
        return repo

    def _snapshot(self, repo: Repo, rev: str):
        snap = repo.snapshot(rev)
        if snap is None:
            raise _Error(404, f"Invalid rev id: {rev}", code="RevisionNotFound")
        return snap

    # -- routes --------------------------------------------------------------------------------------
    def create_repo(self, method: str) -> int:
        self._need_token()
        payload = json.loads(self._body() or b"{}")
        name, organization = payload.get("name"), payload.get("organization")
        if not name:
            raise _Error(400, "name is required")
        repo_id = f"{organization}/{name}" if organization else f"user/{name}"
        repo_type = payload.get("type") or "model"
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        url = f"{self.hub.endpoint}/{prefix}{repo_id}"
        with self.hub.lock:
            if (repo_type, repo_id) in self.hub.repos:  # the Hub names the existing repo's url in its 409 answer
                raise _Error(409, f"You already created this {repo_type} repo", url=url)
            repo = Repo(repo_id, repo_type, private=payload.get("visibility") == "private")
            repo.commit("main", {".gitattributes": b""}, "initial commit")
            self.hub.repos[(repo_type, repo_id)] = repo
        return self._json({"url": url, "name": repo_id, "id": repo_id})

    def validate_yaml(self, method: str) -> int:
        content = json.loads(self._body() or b"{}").get("content", "")
        lines = content.splitlines()
        if lines and lines[0].strip() == "---" and "---" not in (line.strip() for line in lines[1:]):
            return self._json({"errors": [{"message": "unclosed YAML front matter"}]}, status=400)
        return self._json({"errors": [], "warnings": []})

    def preupload(self, method: str, type: str, repo: str, rev: str) -> int:
        self._need_token()
        repo_obj = self._repo(type, repo)
        _, files = self._snapshot(repo_obj, rev)
        payload = json.loads(self._body())
        answer = [
            {
                "path": f["path"],
                "uploadMode": "regular",
                "shouldIgnore": False,
                "oid": git_blob_sha1(files[f["path"]]) if f["path"] in files else None,
            }
            for f in payload.get("files", [])
        ]
        return self._json({"files": answer, "commitOid": repo_obj.branches.get(rev, rev)})

    def commit(self, method: str, type: str, repo: str, rev: str) -> int:
        self._need_token()
        repo_obj = self._repo(type, repo)
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _Error(400, "the commit payload must start with a header line")
        header = lines[0]["value"]
        with self.hub.lock:
            parent, files = self._snapshot(repo_obj, rev)
            if header.get("parentCommit") not in (None, parent):
                raise _Error(412, "A commit has happened since. Please refresh and try again.")
            files = dict(files)
            for line in lines[1:]:
                key, value = line.get("key"), line.get("value", {})
                if key == "file":
                    if value.get("encoding") != "base64":
                        raise _Error(400, f"unsupported encoding {value.get('encoding')!r}")
                    files[value["path"]] = base64.b64decode(value["content"])
                elif key == "deletedFile":
                    if value["path"] not in files:
                        raise _Error(404, "A file with this name doesn't exist", code="EntryNotFound")
                    del files[value["path"]]
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    files = {p: b for p, b in files.items() if not p.startswith(prefix)}
                elif key == "lfsFile":
                    raise _Error(
                        400, f"the stand-in stores no LFS objects ({value.get('path')}); preupload answers 'regular'"
                    )
                else:
                    raise _Error(400, f"unknown commit operation {key!r}")
            branch = rev if rev in repo_obj.branches else None
            if branch is None:
                raise _Error(400, f"can only commit on a branch, not {rev!r}")
            oid = repo_obj.commit(branch, files, header.get("summary", ""))
        prefix = "" if repo_obj.repo_type == "model" else f"{repo_obj.repo_type}s/"
        return self._json(
            {
                "success": True,
                "commitOid": oid,
                "commitUrl": f"{self.hub.endpoint}/{prefix}{repo}/commit/{oid}",
                "hookOutput": "",
            }
        )

    def create_branch(self, method: str, type: str, repo: str, branch: str) -> int:
        self._need_token()
        repo_obj = self._repo(type, repo)
        start = json.loads(self._body() or b"{}").get("startingPoint") or "main"
        with self.hub.lock:
            if branch in repo_obj.branches:
                raise _Error(409, f"Reference already exists: refs/heads/{branch}")
            oid, _ = self._snapshot(repo_obj, start)
            repo_obj.branches[branch] = oid
        return self._json({})

    def repo_info(self, method: str, type: str, repo: str, rev: str | None = None) -> int:
        repo_obj = self._repo(type, repo)
        oid, files = self._snapshot(repo_obj, rev or "main")
        return self._json(
            {
                "id": repo,
                "modelId": repo,
                "sha": oid,
                "private": repo_obj.private,
                "gated": False,
                "disabled": False,
                "tags": [],
                "downloads": 0,
                "likes": 0,
                "lastModified": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
                "siblings": [{"rfilename": p} for p in sorted(files)],
            },
            head=method == "HEAD",
        )

    def tree(self, method: str, type: str, repo: str, rev: str, path: str | None = None) -> int:
        repo_obj = self._repo(type, repo)
        _, files = self._snapshot(repo_obj, rev)
        query = urlsplit(self.path).query
        recursive = "recursive=true" in query.lower() or "recursive=1" in query
        base = (path or "").strip("/")
        prefix = base + "/" if base else ""
        if base and not any(p.startswith(prefix) for p in files):
            raise _Error(404, f"{base} does not exist", code="EntryNotFound")
        entries, dirs = [], set()
        for p in sorted(files):
            if not p.startswith(prefix):
                continue
            rest = p[len(prefix) :]
            parts = rest.split("/")
            for depth in range(1, len(parts)):
                if recursive or depth == 1:
                    dirs.add(prefix + "/".join(parts[:depth]))
            if recursive or len(parts) == 1:
                entries.append({"type": "file", "oid": git_blob_sha1(files[p]), "size": len(files[p]), "path": p})
        entries += [
            {"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
            for d in sorted(dirs)
        ]
        return self._json(entries, head=method == "HEAD")

    def resolve(self, method: str, type: str | None, repo: str, rev: str, path: str) -> int:
        repo_obj = self._repo(type, repo)
        oid, files = self._snapshot(repo_obj, rev)
        if path not in files:
            raise _Error(404, "Entry not found", code="EntryNotFound", commit=oid)
        data = files[path]
        headers = {"X-Repo-Commit": oid, "ETag": f'"{git_blob_sha1(data)}"', "Accept-Ranges": "none"}
        self._send(200, data, headers, content_type="application/octet-stream", head=method == "HEAD")
        return 200
