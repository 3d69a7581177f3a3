"""Loopback Hugging Face Hub for tests (stdlib only), enough for the real ``huggingface_hub`` 2.x.

The preupload endpoint answers ``uploadMode: "regular"`` for every file, so contents travel
base64-encoded in the NDJSON commit body (no LFS, no Xet). Storage is in memory; every commit is
an immutable ``{path: bytes}`` snapshot with a 40-hex sha. Any ``Authorization`` header is accepted.

    with LoopbackHub() as hub, hub.client_env():
        HfApi(endpoint=hub.url).create_repo("me/x")
        snapshot_download("me/x", endpoint=hub.url, cache_dir=tmp)
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator
from urllib.parse import SplitResult, parse_qs, unquote, urlsplit

MAX_BODY = 256 * 1024 * 1024  # larger request bodies are refused
_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_API_RE = re.compile(
    r"^/api/(models|datasets|spaces)/([^/]+(?:/[^/]+)?)"
    r"(?:/(revision|tree|preupload|commit|paths-info|branch)/([^/]+)(/.*)?)?$"
)
_RESOLVE_RE = re.compile(r"^/(?:(datasets|spaces)/)?([^/]+(?:/[^/]+)?)/resolve/([^/]+)/(.+)$")


def git_blob_sha(data: bytes) -> str:
    """Git blob oid of ``data``: the Hub's oid / ETag of a regular (non-LFS) file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _url_prefix(repo_type: str) -> str:
    return "" if repo_type == "model" else f"{repo_type}s/"


class HubError(Exception):
    """Answered as ``status`` with the ``X-Error-Code`` header that huggingface_hub maps to errors."""

    def __init__(self, status: int, code: str | None, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass
class Repo:
    """One in-memory repo: file snapshots by commit sha, and branch refs."""

    private: bool = False
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)

    def snapshot(self, revision: str) -> tuple[str, dict[str, bytes]]:
        """``(sha, files)`` for a branch name or a full commit sha."""
        sha = self.refs.get(revision, revision)
        if sha not in self.commits:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return sha, self.commits[sha]


class HubStore:
    """Thread-safe ``(repo_type, repo_id) -> Repo`` map."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.repos: dict[tuple[str, str], Repo] = {}
        self._counter = 0

    def get(self, repo_type: str, repo_id: str) -> Repo:
        """The repo, or a RepoNotFound error."""
        if (repo := self.repos.get((repo_type, repo_id))) is None:
            raise HubError(404, "RepoNotFound", "Repository not found")
        return repo

    def create(self, repo_type: str, repo_id: str, private: bool = False) -> bool:
        """Create an empty repo (one empty initial commit on main); False if it exists."""
        with self.lock:
            if (repo_type, repo_id) in self.repos:
                return False
            self.repos[(repo_type, repo_id)] = repo = Repo(private=private)
            self.commit(repo, "main", {}, [], "initial commit")
            return True

    def commit(self, repo: Repo, branch: str, add: dict[str, bytes], delete: list[str], msg: str) -> str:
        """Apply additions, then deletions (files or folders), on ``branch``; return the new sha."""
        with self.lock:
            parent = repo.refs.get(branch)
            files = {**(repo.commits[parent] if parent else {}), **add}
            for path in delete:
                folder = path.rstrip("/") + "/"
                for key in [k for k in files if k == path or k.startswith(folder)]:
                    del files[key]
            self._counter += 1
            sha = hashlib.sha1(f"{parent}:{self._counter}:{msg}".encode()).hexdigest()
            repo.commits[sha], repo.refs[branch] = files, sha
            return sha

    def put(self, repo_id: str, files: dict[str, bytes], repo_type: str = "model") -> str:
        """Test seeding helper: create the repo if needed and commit ``files`` to main."""
        with self.lock:
            self.create(repo_type, repo_id)
            return self.commit(self.get(repo_type, repo_id), "main", files, [], "seed")


def _tree(files: dict[str, bytes], base: str, recursive: bool) -> list[dict[str, Any]]:
    """Tree listing under ``base`` in the Hub's JSON shape (``type`` file/directory, ``oid``, ...)."""
    prefix = base.strip("/") + "/" if base.strip("/") else ""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in files if p.startswith(prefix)):
        parts = path[len(prefix) :].split("/")
        dirs = range(1, len(parts)) if recursive else range(1, min(len(parts), 2))
        for folder in (prefix + "/".join(parts[:depth]) for depth in dirs):
            out.setdefault(folder, {"type": "directory", "oid": git_blob_sha(folder.encode()), "path": folder})
        if recursive or len(parts) == 1:
            data = files[path]
            out[path] = {"type": "file", "oid": git_blob_sha(data), "size": len(data), "path": path}
    if prefix and not out:
        raise HubError(404, "EntryNotFound", f"{base} does not exist")
    return list(out.values())


class _Handler(BaseHTTPRequestHandler):
    """Routes Hub requests to ``self.server.store``."""

    protocol_version = "HTTP/1.1"
    timeout = 60  # drop idle keep-alive connections after this many seconds
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence access logs
        pass

    def _body(self) -> bytes:
        # huggingface_hub always sends a Content-Length (bytes / json / form bodies, never chunked).
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self.close_connection = True
            raise HubError(413, None, "Request body too large")
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for key, value in {"Content-Type": "application/json", **headers}.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers or {})

    def _dispatch(self) -> None:
        extra: dict[str, str] = {}  # headers also sent on errors (e.g. X-Repo-Commit on EntryNotFound)
        try:
            body = self._body() if self.command in ("POST", "PUT", "DELETE") else b""
            self._route(urlsplit(self.path), body, extra)
        except HubError as err:
            extra |= {"X-Error-Message": err.message, **({"X-Error-Code": err.code} if err.code else {})}
            self._json({"error": err.message}, err.status, extra)
        except Exception as err:  # surfaced to the client as a 500
            self._json({"error": f"{type(err).__name__}: {err}"}, 500)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

    def _base(self) -> str:
        return "http://" + (self.headers.get("Host") or "%s:%d" % self.server.server_address[:2])

    def _route(self, url: SplitResult, body: bytes, extra: dict[str, str]) -> None:
        store, path, method = self.server.store, url.path, self.command
        if m := _RESOLVE_RE.match(path):
            rtype = _TYPES[m.group(1)] if m.group(1) else "model"
            return self._resolve(rtype, *(unquote(g) for g in m.group(2, 3, 4)), extra)
        if path in ("/api/repos/create", "/api/repos/delete"):
            payload = json.loads(body or b"{}")
            rtype = payload.get("type") or "model"
            repo_id = "/".join(p for p in (payload.get("organization"), payload["name"]) if p)
            if path.endswith("delete"):
                with store.lock:
                    store.get(rtype, repo_id)
                    del store.repos[(rtype, repo_id)]
                return self._json({})
            private = payload.get("visibility") == "private" or bool(payload.get("private"))
            created = store.create(rtype, repo_id, private)
            reply = {"url": f"{self._base()}/{_url_prefix(rtype)}{repo_id}", "name": repo_id}
            if not created:
                return self._json({**reply, "error": "Repo already exists"}, 409)
            return self._json(reply)
        if path == "/api/validate-yaml":
            return self._json({"warnings": [], "errors": []})
        if path == "/api/whoami-v2":
            return self._json({"type": "user", "name": "loopback", "orgs": [], "auth": {}})
        if (m := _API_RE.match(path)) is None:
            raise HubError(404, None, f"Not found: {method} {path}")
        rtype, repo_id, action, revision = _TYPES[m.group(1)], unquote(m.group(2)), m.group(3), m.group(4)
        with store.lock:
            repo = store.get(rtype, repo_id)
            if action == "branch" and method == "POST":  # create_branch: from startingPoint, else main
                branch, start = unquote(revision), json.loads(body or b"{}").get("startingPoint") or "main"
                if branch in repo.refs:
                    raise HubError(409, None, f"Reference already exists: {branch}")
                repo.refs[branch] = repo.snapshot(start)[0]
                return self._json({})
            sha, files = repo.snapshot(unquote(revision or "main"))
            extra["X-Repo-Commit"] = sha
            if action in (None, "revision") and method == "GET":
                siblings = [{"rfilename": p, "size": len(b), "blobId": git_blob_sha(b)} for p, b in files.items()]
                info = {"id": repo_id, "_id": repo_id, "modelId": repo_id, "author": repo_id.split("/")[0]}
                info |= {"sha": sha, "private": repo.private, "disabled": False, "gated": False, "tags": []}
                return self._json({**info, "siblings": siblings, "downloads": 0, "likes": 0}, 200, extra)
            if action == "tree" and method == "GET":
                recursive = parse_qs(url.query).get("recursive", ["false"])[0].lower() in ("1", "true")
                return self._json(_tree(files, unquote(m.group(5) or ""), recursive), 200, extra)
            if action == "paths-info" and method == "POST":
                wanted = set(parse_qs(body.decode()).get("paths", []))
                return self._json([e for e in _tree(files, "", True) if e["path"] in wanted], 200, extra)
            if action == "preupload" and method == "POST":
                out = [
                    {"path": p, "uploadMode": "regular", "shouldIgnore": False,
                     "oid": git_blob_sha(files[p]) if p in files else None}
                    for p in (f["path"] for f in json.loads(body or b"{}").get("files", []))
                ]
                return self._json({"files": out, "commitOid": sha}, 200, extra)
            if action == "commit" and method == "POST":
                return self._commit(repo, rtype, repo_id, unquote(revision or "main"), body)
        raise HubError(404, None, f"Not found: {method} {path}")

    def _commit(self, repo: Repo, rtype: str, repo_id: str, branch: str, body: bytes) -> None:
        add: dict[str, bytes] = {}
        delete: list[str] = []
        summary = ""
        for item in (json.loads(line) for line in body.splitlines() if line.strip()):
            key, value = item.get("key"), item.get("value", {})
            if key == "header":
                summary = value.get("summary", "")
            elif key == "file":
                raw = value["content"]
                add[value["path"]] = base64.b64decode(raw) if value.get("encoding") == "base64" else raw.encode()
            elif key in ("deletedFile", "deletedFolder"):
                delete.append(value["path"])
            else:
                raise HubError(400, None, f"Unsupported commit operation {key!r} (no LFS on the loopback hub)")
        if branch not in repo.refs:  # commits go to existing branches only
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {branch}")
        sha = self.server.store.commit(repo, branch, add, delete, summary)
        url = f"{self._base()}/{_url_prefix(rtype)}{repo_id}/commit/{sha}"
        self._json({"success": True, "commitOid": sha, "commitUrl": url, "pullRequestUrl": None})

    def _resolve(self, rtype: str, repo_id: str, revision: str, filename: str, extra: dict[str, str]) -> None:
        with self.server.store.lock:
            sha, files = self.server.store.get(rtype, repo_id).snapshot(revision)
        extra["X-Repo-Commit"] = sha
        if filename not in files:
            raise HubError(404, "EntryNotFound", f"{filename} does not exist at {revision}")
        data = files[filename]
        etag = f'"{git_blob_sha(data)}"'
        self._send(200, data, {**extra, "ETag": etag, "Content-Type": "application/octet-stream"})


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    store: HubStore


class LoopbackHub:
    """Hub-compatible server on 127.0.0.1 (a free port unless ``port`` is given); a context manager."""

    def __init__(self, port: int = 0, store: HubStore | None = None) -> None:
        self.store = store or HubStore()
        self._port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Base URL, for ``HF_ENDPOINT`` or ``endpoint=``."""
        if self._server is None:
            raise RuntimeError("LoopbackHub is not started")
        return "http://%s:%d" % self._server.server_address[:2]

    def start(self) -> LoopbackHub:
        """Bind and serve from a daemon thread (idempotent)."""
        if self._server is None:
            self._server = _Server(("127.0.0.1", self._port), _Handler)
            self._server.store = self.store
            self._thread = threading.Thread(target=self._server.serve_forever, name="loopback-hub", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            if self._thread is not None:
                self._thread.join(timeout=10)
            self._server = self._thread = None

    def __enter__(self) -> LoopbackHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def env(self) -> dict[str, str]:
        """Environment for a subprocess whose huggingface_hub should use this server."""
        no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1", "localhost"]))
        return {
            "HF_ENDPOINT": self.url, "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0",
            "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "NO_PROXY": no_proxy, "no_proxy": no_proxy,
        }

    @contextlib.contextmanager
    def client_env(self) -> Iterator[str]:
        """Point the already-imported huggingface_hub (and child processes) here; restore on exit.

        huggingface_hub copies ``HF_ENDPOINT`` / ``HF_HUB_OFFLINE`` / ``HF_HUB_DISABLE_XET`` into
        ``huggingface_hub.constants`` at import and reads those attributes at call time, so they are
        patched (with ``HUGGINGFACE_CO_URL_TEMPLATE``, which ``hf_hub_url`` formats) and ``os.environ``
        is updated for subprocesses. The shared HTTP client is reset to pick up ``NO_PROXY``.
        """
        from huggingface_hub import constants
        from huggingface_hub.utils import _http

        patched = {
            "ENDPOINT": self.url,
            "HUGGINGFACE_CO_URL_TEMPLATE": self.url + "/{repo_id}/resolve/{revision}/{filename}",
            "HF_HUB_OFFLINE": False, "HF_HUB_DISABLE_XET": True, "HF_HUB_DISABLE_TELEMETRY": True,
        }
        saved = {name: getattr(constants, name) for name in patched}
        new_env = self.env()
        saved_env = {key: os.environ.get(key) for key in new_env}
        try:
            os.environ.update(new_env)
            for name, value in patched.items():
                setattr(constants, name, value)
            _http.close_session()
            yield self.url
        finally:
            for name, value in saved.items():
                setattr(constants, name, value)
            for key, old in saved_env.items():
                if old is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = old
            _http.close_session()
