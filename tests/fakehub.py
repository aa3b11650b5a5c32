"""A local stand-in for the Hugging Face Hub, for the ``rkllm pull`` tests.

It serves exactly what ``huggingface_hub`` 2.4.0 asks for when ``rkllm pull`` runs:

* ``GET /api/models/{owner}/{repo}/revision/{rev}?blobs=True``: the repository's
  ``sha`` and ``siblings`` (``rfilename``, ``size``, ``blobId`` and, for LFS
  files, ``lfs`` with ``sha256``/``size``/``pointerSize``);
* ``GET``/``HEAD /{owner}/{repo}/resolve/{rev}/{path}``: a small file itself, with ``ETag``
  and ``X-Repo-Commit``; for an LFS file, like the Hub, a 302 to a storage address
  (``/cdn/{owner}/{repo}/{path}`` here) with ``X-Linked-Etag``/``X-Linked-Size``;
  ``Range: bytes=N-`` answers 206 with the rest;
* errors the way the Hub sends them: 401 with ``X-Error-Code: RepoNotFound`` for an
  unknown repository, 404 with ``RevisionNotFound``/``EntryNotFound``.

It never advertises Xet storage (no ``X-Xet-*`` headers, no ``xetHash``), so
downloads go over plain HTTP. Every request is recorded with its headers.
Bound to 127.0.0.1 on a free port, served from a thread.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".rkllm", ".rknn", ".safetensors", ".bin")


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


@dataclass
class FakeRepo:
    """A repository: its files by path, and the bytes actually served for some of them (to corrupt one)."""

    files: dict[str, bytes]
    served: dict[str, bytes] = field(default_factory=dict)
    commit: str = "0123456789abcdef0123456789abcdef01234567"
    token: str | None = None  # a private repository: only this Bearer token sees it

    def is_lfs(self, path: str) -> bool:
        return path.endswith(LFS_SUFFIXES) or path.rsplit("/", 1)[-1] == "tokenizer.json"

    def sibling(self, path: str) -> dict[str, object]:
        data = self.files[path]
        entry: dict[str, object] = {"rfilename": path, "size": len(data), "blobId": git_blob_id(data)}
        if self.is_lfs(path):
            entry["size"] = len(data)
            entry["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    sent: int = 0  # body bytes sent
    status: int = 0


@dataclass
class Cut:
    """Cut the first GET of a file after ``after`` bytes; refuse the following GETs while ``refuse`` is set."""

    after: int
    refuse: bool = True
    done: bool = False
    hold: threading.Event | None = None  # when given, wait for it before closing the cut connection


class FakeHub:
    """The server: repositories by id, the requests seen, and faults to inject."""

    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.requests: list[Request] = []
        self.cuts: dict[str, Cut] = {}
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def add(self, repo_id: str, files: dict[str, bytes], **kwargs: object) -> FakeRepo:
        repo = FakeRepo(dict(files), **kwargs)  # type: ignore[arg-type]
        self.repos[repo_id] = repo
        return repo

    def file_gets(self, path_suffix: str = "") -> list[Request]:
        """The GETs answered with a file's bytes (not redirects, not errors), path ending with ``path_suffix``."""
        with self.lock:
            return [r for r in self.requests if r.method == "GET" and r.status in (200, 206)
                    and "/api/" not in r.path and r.path.endswith(path_suffix)]  # fmt: skip


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def _record(self) -> Request:
            request = Request(
                self.command, unquote(urlsplit(self.path).path), {k.lower(): v for k, v in self.headers.items()}
            )
            with hub.lock:
                hub.requests.append(request)
            return request

        def _error(self, status: int, code: str) -> None:
            self.request_record.status = status
            body = json.dumps({"error": code}).encode()
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_HEAD(self) -> None:
            self.do_GET()

        def do_GET(self) -> None:
            request = self.request_record = self._record()
            parts = request.path.strip("/").split("/")
            if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "revision":
                self._model_info("/".join(parts[2:4]), parts[5])
            elif len(parts) >= 5 and parts[2] == "resolve":
                self._resolve(request, "/".join(parts[:2]), parts[3], "/".join(parts[4:]))
            elif len(parts) >= 4 and parts[0] == "cdn" and "/".join(parts[1:3]) in hub.repos:
                repo_id, path = "/".join(parts[1:3]), "/".join(parts[3:])
                self._resolve(request, repo_id, hub.repos[repo_id].commit, path, from_storage=True)
            else:
                self._error(404, "NotFound")

        def _visible(self, repo: FakeRepo | None) -> bool:
            if repo is None:
                return False
            return repo.token is None or self.headers.get("Authorization") == f"Bearer {repo.token}"

        def _model_info(self, repo_id: str, revision: str) -> None:
            repo = hub.repos.get(repo_id)
            if repo is None or not self._visible(repo):
                return self._error(401, "RepoNotFound")
            if revision not in ("main", repo.commit):
                return self._error(404, "RevisionNotFound")
            info = {"id": repo_id, "sha": repo.commit, "siblings": [repo.sibling(p) for p in sorted(repo.files)]}
            body = json.dumps(info).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _resolve(
            self, request: Request, repo_id: str, revision: str, path: str, from_storage: bool = False
        ) -> None:
            repo = hub.repos.get(repo_id)
            if repo is None or not (from_storage or self._visible(repo)):
                return self._error(401, "RepoNotFound")
            if revision not in ("main", repo.commit):
                return self._error(404, "RevisionNotFound")
            if path not in repo.files:
                return self._error(404, "EntryNotFound")
            if repo.is_lfs(path) and not from_storage:
                return self._redirect(request, repo, repo_id, path)
            data = repo.served.get(path, repo.files[path])
            cut = hub.cuts.get(path)
            if self.command == "GET" and cut is not None and cut.done and cut.refuse:
                return self._error(500, "Internal")
            start = int(self.headers["Range"].split("=")[1].split("-")[0]) if "Range" in self.headers else 0
            self._send_file(request, repo, path, data, start, cut)

        def _redirect(self, request: Request, repo: FakeRepo, repo_id: str, path: str) -> None:
            request.status = 302
            self.send_response(302)
            self.send_header("Location", f"/cdn/{repo_id}/{path}")
            self.send_header("X-Repo-Commit", repo.commit)
            self.send_header("X-Linked-Etag", f'"{hashlib.sha256(repo.files[path]).hexdigest()}"')
            self.send_header("X-Linked-Size", str(len(repo.files[path])))
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _send_file(self, request: Request, repo: FakeRepo, path: str, data: bytes, start: int,
                       cut: Cut | None) -> None:  # fmt: skip
            request.status = 206 if start else 200
            self.send_response(request.status)
            etag = hashlib.sha256(repo.files[path]).hexdigest() if repo.is_lfs(path) else git_blob_id(repo.files[path])
            self.send_header("ETag", f'"{etag}"')
            self.send_header("X-Repo-Commit", repo.commit)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()
            if self.command == "HEAD":
                return
            body = data[start:]
            if cut is not None and not cut.done:
                cut.done = True
                body = body[: cut.after]
                self.close_connection = True
            self.wfile.write(body)
            self.wfile.flush()
            request.sent = len(body)
            if cut is not None and cut.hold is not None and len(body) < len(data) - start:
                cut.hold.wait()

    return Handler


@contextmanager
def serve() -> Iterator[FakeHub]:
    hub = FakeHub()
    thread = threading.Thread(target=hub.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        for cut in hub.cuts.values():
            if cut.hold is not None:
                cut.hold.set()
        hub.server.shutdown()
        hub.server.server_close()
        thread.join()
