"""A local stand-in for the Hugging Face Hub: the part of its HTTP API that huggingface_hub's
`snapshot_download`, `resolve_revision`, `list_repo_files` and `hf_hub_download` use, served
from files in memory on a thread, so hub downloads are tested without the internet.

    GET  /api/models/{repo}[/revision/{rev}] repo info: sha (the commit), siblings (rfilename)
    GET  /api/models/{repo}/tree/{rev}      the file list (type, path, size, oid), one page
    HEAD /{repo}/resolve/{rev}/{file}       ETag, X-Repo-Commit, Content-Length
    GET  /{repo}/resolve/{rev}/{file}       the bytes, same headers

Errors carry the X-Error-Code header huggingface_hub maps to its exceptions (RepoNotFound,
RevisionNotFound, EntryNotFound, GatedRepo). Every request is recorded in `requests`.

    with HubEndpoint() as hub:
        hub.add_commit("acme/tiny", model_dir, refs=("main",))
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
"""
from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from urllib.parse import unquote, urlsplit


@dataclass
class _Repo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> files
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> sha
    gated: bool = False

    def commit_of(self, revision: str) -> str | None:
        if revision in self.commits:
            return revision
        return self.refs.get(revision)


class HubEndpoint:
    def __init__(self) -> None:
        self._repos: dict[str, _Repo] = {}
        self._lock = threading.Lock()
        self.requests: list[tuple[str, str]] = []  # (method, path)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> HubEndpoint:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add_commit(self, repo_id: str, directory: Path, *, refs: tuple[str, ...] = ("main",),
                   gated: bool = False) -> str:
        """Every file under `directory` as one commit of `repo_id`, pointed to by `refs`;
        returns the commit's sha (derived from the content, so it is stable)."""
        files = {path.relative_to(directory).as_posix(): path.read_bytes()
                 for path in sorted(directory.rglob("*")) if path.is_file()}
        digest = hashlib.sha1()
        for name, data in files.items():
            digest.update(name.encode() + b"\0" + hashlib.sha1(data).digest())
        sha = digest.hexdigest()
        with self._lock:
            repo = self._repos.setdefault(repo_id, _Repo())
            repo.commits[sha] = files
            repo.refs.update(dict.fromkeys(refs, sha))
            repo.gated = gated
        return sha

    def clear_requests(self) -> None:
        with self._lock:
            self.requests.clear()

    def _record(self, method: str, path: str) -> None:
        with self._lock:
            self.requests.append((method, path))

    def _lookup(self, repo_id: str, revision: str) -> tuple[int, str, object]:
        """(status, error code, commit files or None)."""
        repo = self._repos.get(repo_id)
        if repo is None:
            return 404, "RepoNotFound", None
        if repo.gated:
            return 403, "GatedRepo", None
        sha = repo.commit_of(revision)
        if sha is None:
            return 404, "RevisionNotFound", None
        return 200, sha, repo.commits[sha]


def _handler_for(hub: HubEndpoint) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as httpx pools connections

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass  # the test reads `hub.requests`, not stderr

        def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
            self._serve(send_body=False)

        def do_GET(self) -> None:  # noqa: N802
            self._serve(send_body=True)

        def _serve(self, *, send_body: bool) -> None:
            path = urlsplit(self.path).path
            hub._record(self.command, path)
            parts = [unquote(part) for part in path.strip("/").split("/")]
            if parts[:2] == ["api", "models"] and len(parts) == 4:  # no revision: main
                self._api(f"{parts[2]}/{parts[3]}", "revision", "main", send_body)
            elif parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
                self._api(f"{parts[2]}/{parts[3]}", parts[4], parts[5], send_body)
            elif len(parts) >= 5 and parts[2] == "resolve":
                self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]), send_body)
            else:
                self._error(404, "RepoNotFound", send_body)

        def _api(self, repo_id: str, kind: str, revision: str, send_body: bool) -> None:
            status, sha, files = hub._lookup(repo_id, revision)
            if files is None:
                self._error(status, sha, send_body)
                return
            assert isinstance(files, dict)
            if kind == "revision":
                body: object = {"id": repo_id, "modelId": repo_id, "sha": sha, "private": False,
                                "siblings": [{"rfilename": name} for name in files]}
            else:
                body = [{"type": "file", "path": name, "size": len(data),
                         "oid": hashlib.sha1(data).hexdigest()} for name, data in files.items()]
            self._send(200, json.dumps(body).encode(), {"Content-Type": "application/json"},
                       send_body)

        def _resolve(self, repo_id: str, revision: str, filename: str, send_body: bool) -> None:
            status, sha, files = hub._lookup(repo_id, revision)
            if files is None:
                self._error(status, sha, send_body)
                return
            assert isinstance(files, dict)
            data = files.get(filename)
            if data is None:
                self._error(404, "EntryNotFound", send_body, {"X-Repo-Commit": sha})
                return
            self._send(200, data, {"ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                                   "X-Repo-Commit": sha,
                                   "Content-Type": "application/octet-stream"}, send_body)

        def _error(self, status: int, code: str, send_body: bool,
                   headers: dict[str, str] | None = None) -> None:
            body = json.dumps({"error": code}).encode()
            self._send(status, body, {"X-Error-Code": code, "X-Error-Message": code,
                                      "Content-Type": "application/json", **(headers or {})},
                       send_body)

        def _send(self, status: int, body: bytes, headers: dict[str, str],
                  send_body: bool) -> None:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if send_body:
                self.wfile.write(body)

    return Handler
