"""A local stand-in for the Hugging Face Hub, so hub downloads can be tested without network.

    with HubServer({"org/tiny": folder}, delays={"model-00002-of-00003.safetensors": 0.5}) as srv, \\
            hub_endpoint(srv.url):                  # or the `hub` fixture + hub.add_repo("org/tiny", folder)
        snapshot_download("org/tiny", cache_dir=tmp_path / "hf")
    srv.downloaded(), srv.bytes_served[name], srv.requests  # files sent / bytes per file / every request

Checked against huggingface_hub 2.4.0 (httpx2 client):
- HF_ENDPOINT is read at import into constants.ENDPOINT *and* constants.HUGGINGFACE_CO_URL_TEMPLATE
  (used by hf_hub_url); HF_HUB_OFFLINE too, and TRANSFORMERS_OFFLINE=1 also sets it (oracle.py
  setdefaults both). Under pytest the library is usually imported already, so env vars set by a fixture
  do nothing in-process: hub_endpoint() patches those constants (the library reads them per call) and
  sets the env vars for subprocesses. HfApi() copies ENDPOINT when built: build it inside the block.
  HF_HUB_CACHE likewise: for calls without cache_dir (fastround._hf.resolve_model_dir) monkeypatch
  constants.HF_HUB_CACHE, not HF_HOME.
- Telemetry is turned off: otherwise the first request's user agent GETs {ENDPOINT}/api/agent-harnesses.
- No X-Xet-Hash / xetHash is ever sent, so hf_xet (installed) stays unused: plain HTTP GETs.
- LFS files (LFS_PATTERNS) behave as on the Hub: HEAD /resolve -> 302 + X-Linked-Etag (sha256) +
  X-Linked-Size, Location on a second "cdn" server. Another port is another origin, so the client does
  not follow it on HEAD and GETs the Location directly. Other files: 200, ETag = git blob sha1.
- snapshot_download: GET /api/models/{id}/revision/main, GET .../tree/{sha}?recursive=True, then per file
  HEAD /{id}/resolve/{sha}/{file} + GET, in threads. It keeps the listing in trees/<sha>.json (cache repo
  dir, or local_dir/.cache/huggingface/) and then skips /tree. A file cached for a commit sha: no request.
- A GET delay counts against HF_HUB_DOWNLOAD_TIMEOUT (10 s); past it the client retries.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import re
import shutil
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pytest

PathLike = str | os.PathLike[str]
LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf", "*.onnx")
_RESOLVE = re.compile(r"^/(?P<repo>.+?)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_CDN = re.compile(r"^/cdn/(?P<repo>.+?)/(?P<rev>[0-9a-f]{40})/(?P<file>.+)$")
_API = re.compile(r"^/api/models/(?P<repo>.+?)(?:/(?P<kind>revision|tree|paths-info)/(?P<rev>[^/]+)(?P<rest>/.*)?)?$")


def _git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class HubFile:
    path: str  # repo-relative, "/"-separated
    local: Path
    size: int
    git_sha1: str
    sha256: str
    lfs: bool

    @property
    def pointer_size(self) -> int:
        return len(f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {self.size}\n")

    @property
    def blob_id(self) -> str:  # for LFS files git stores the pointer, not the content
        return _git_sha1(f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {self.size}\n"
                         .encode()) if self.lfs else self.git_sha1

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.git_sha1


def scan_repo(folder: PathLike, lfs_patterns: Iterable[str] = LFS_PATTERNS) -> dict[str, HubFile]:
    root, pats, out = Path(folder), tuple(lfs_patterns), {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel.split("/")[0] not in (".git", ".cache"):  # .cache: a local_dir's metadata
            data = p.read_bytes()
            lfs = any(fnmatch.fnmatch(p.name, pat) for pat in pats)
            out[rel] = HubFile(rel, p, len(data), _git_sha1(data), hashlib.sha256(data).hexdigest(), lfs)
    return out


def commit_of(files: Mapping[str, HubFile]) -> str:
    """Deterministic fake commit sha, shared by HubServer and populate_cache so their caches agree."""
    return hashlib.sha1("".join(f"{f.path}\0{f.etag}\n" for f in files.values()).encode()).hexdigest()


@dataclass
class Request:
    method: str
    path: str  # with query string
    server: str  # "hub" or "cdn"
    file: str | None  # repo file the request resolved to, if any
    range: str | None
    start: float  # time.monotonic()
    end: float | None = None
    status: int = 0
    bytes: int = 0  # file bytes sent (JSON bodies are not counted)


class HubServer:
    """Serves folders as model repos, at revision "main" and at their commit sha (commit_of)."""

    def __init__(self, repos: Mapping[str, PathLike] | None = None, *, delays: Mapping[str, float] | None = None,
                 fail: Mapping[str, int] | None = None, lfs_patterns: Iterable[str] = LFS_PATTERNS) -> None:
        self.repos: dict[str, tuple[str, dict[str, HubFile]]] = {}
        self.delays = dict(delays or {})  # file -> seconds slept before its GET reply
        self.fail = dict(fail or {})  # file -> HTTP status answered to its GET
        self.requests: list[Request] = []
        self.bytes_served: Counter[str] = Counter()
        self.lock = threading.Lock()
        self._lfs = tuple(lfs_patterns)
        self._servers: dict[str, ThreadingHTTPServer] = {}
        for repo_id, folder in (repos or {}).items():
            self.add_repo(repo_id, folder)

    def add_repo(self, repo_id: str, folder: PathLike) -> str:
        """(Re)publish `folder` as `repo_id`, hashing its files now; returns the commit sha."""
        files = scan_repo(folder, self._lfs)
        self.repos[repo_id] = (commit_of(files), files)
        return self.repos[repo_id][0]

    def start(self) -> HubServer:
        for role in ("hub", "cdn"):
            srv = ThreadingHTTPServer(("127.0.0.1", 0), type("Handler", (_Handler,), {"hub": self, "role": role}))
            srv.daemon_threads = True  # idle keep-alive connections must not block stop()
            threading.Thread(target=srv.serve_forever, name=f"hub-server-{role}", daemon=True).start()
            self._servers[role] = srv
        return self

    def stop(self) -> None:
        for srv in self._servers.values():
            srv.shutdown()
            srv.server_close()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def url_of(self, role: str = "hub") -> str:
        return "http://127.0.0.1:%d" % self._servers[role].server_address[1]

    url = property(url_of)

    def downloaded(self) -> list[str]:
        """Files whose content was sent, by request start; a file fetched twice appears twice."""
        with self.lock:
            return [r.file for r in self.requests if r.method == "GET" and r.file and r.bytes]

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()
            self.bytes_served.clear()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive like the real Hub; every reply sets Content-Length
    hub: HubServer
    role: str
    rec: Request

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        self.rec = Request(self.command, self.path, self.role, None, self.headers.get("Range"), time.monotonic())
        with self.hub.lock:
            self.hub.requests.append(self.rec)
        try:
            query = parse_qs(url.query)
            if self.command == "POST":  # paths-info posts a form
                query.update(parse_qs(self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()))
            if m := (_CDN if self.role == "cdn" else _RESOLVE).match(url.path):
                self._resolve(unquote(m["repo"]), unquote(m["rev"]), unquote(m["file"]))
            elif self.role == "hub" and (m := _API.match(url.path)):
                self._api(unquote(m["repo"]), m["kind"], unquote(m["rev"] or "main"), unquote(m["rest"] or ""), query)
            else:
                self._error(404, None, "not a Hub route")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout, cancelled download)
        finally:
            self.rec.end = time.monotonic()

    do_HEAD = do_POST = do_GET

    def _repo(self, repo_id: str, rev: str) -> tuple[str, dict[str, HubFile]] | None:
        commit, files = self.hub.repos.get(repo_id, ("", {}))
        if not commit or rev not in ("main", commit):
            code = "RevisionNotFound" if commit else "RepoNotFound"
            return self._error(404, code, f"{repo_id}@{rev} not found")
        return commit, files

    def _resolve(self, repo_id: str, rev: str, name: str) -> None:
        if not (found := self._repo(repo_id, rev)):
            return
        commit, files = found
        if (f := files.get(name)) is None:  # X-Repo-Commit lets the client cache the miss in .no_exist/
            return self._error(404, "EntryNotFound", f"{name} not found", {"X-Repo-Commit": commit})
        self.rec.file, head = f.path, self.command == "HEAD"
        hdr = {"X-Repo-Commit": commit, "Accept-Ranges": "bytes"}
        if f.lfs and self.role == "hub":
            loc = f"{self.hub.url_of('cdn')}/cdn/{repo_id}/{commit}/{quote(f.path)}"
            return self._send(302, {**hdr, "Location": loc, "ETag": f'"{f.blob_id}"',
                                    "X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(f.size)}, b"")
        if not head and (status := self.hub.fail.get(f.path)):
            return self._error(status, None, "injected failure")
        data = f.local.read_bytes()
        code, start, end = 200, 0, len(data)
        rng = re.fullmatch(r"bytes=(\d*)-(\d*)", (self.headers.get("Range") or "").strip())
        if rng and not head and any(rng.groups()):  # "a-b", "a-" or suffix "-n"
            a, b = rng.groups()
            start, end = (int(a), int(b) + 1 if b else end) if a else (max(0, end - int(b)), end)
            if start >= (end := min(end, len(data))):
                return self._error(416, None, "range not satisfiable", {"Content-Range": f"bytes */{len(data)}"})
            code, hdr["Content-Range"] = 206, f"bytes {start}-{end - 1}/{len(data)}"
        if not head and (delay := self.hub.delays.get(f.path)):
            time.sleep(delay)
        self._send(code, {**hdr, "ETag": f'"{f.etag}"', "Content-Type": "application/octet-stream"}, data[start:end])

    def _api(self, repo_id: str, kind: str | None, rev: str, rest: str, query: dict[str, list[str]]) -> None:
        if not (found := self._repo(repo_id, rev)):
            return
        commit, files = found
        flag = lambda k: query.get(k, ["false"])[0].lower() in ("1", "true")  # noqa: E731
        lfs = {p: {"size": f.size, "pointerSize": f.pointer_size} for p, f in files.items() if f.lfs}
        dirs = sorted({p.rsplit("/", i)[0] for p in files for i in range(1, p.count("/") + 1)})
        entries: dict[str, dict[str, Any]] = {
            d: {"type": "directory", "oid": _git_sha1(d.encode()), "size": 0, "path": d} for d in dirs}
        for p, f in files.items():  # the tree names the LFS sha256 "oid", siblings name it "sha256"
            entries[p] = {"type": "file", "oid": f.blob_id, "size": f.size, "path": p,
                          **({"lfs": {"oid": f.sha256, **lfs[p]}} if f.lfs else {})}
        body: Any
        if kind in (None, "revision"):  # model_info / repo_info; files_metadata=True sends blobs=True
            sibs = [{"rfilename": p, **({"size": f.size, "blobId": f.blob_id,
                                         "lfs": {"sha256": f.sha256, **lfs[p]} if f.lfs else None}
                                        if flag("blobs") else {})} for p, f in files.items()]
            body = {"id": repo_id, "modelId": repo_id, "sha": commit, "private": False, "disabled": False,
                    "gated": False, "siblings": sibs, "tags": [], "lastModified": "2024-01-01T00:00:00.000Z"}
        elif kind == "tree":
            if (prefix := rest.strip("/")) and prefix not in dirs:
                return self._error(404, "EntryNotFound", f"{prefix} is not a folder")
            depth = prefix.count("/") + 1 if prefix else 0
            body = [e for p, e in entries.items() if (not prefix or p.startswith(prefix + "/"))
                    and (flag("recursive") or p.count("/") == depth)]
        else:  # paths-info
            body = [entries[p] for p in query.get("paths", []) if p in entries]
        self._send(200, {"Content-Type": "application/json"}, json.dumps(body).encode())

    def _error(self, code: int, error_code: str | None, msg: str, extra: Mapping[str, str] | None = None) -> None:
        hdr = {"Content-Type": "application/json", "X-Error-Message": msg, **(extra or {})}
        if error_code:  # hf_raise_for_status maps it to RepositoryNotFoundError, EntryNotFoundError, ...
            hdr["X-Error-Code"] = error_code
        self._send(code, hdr, json.dumps({"error": msg}).encode())

    def _send(self, code: int, headers: Mapping[str, str], body: bytes) -> None:
        self.send_response(code)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))  # on HEAD too: the client reads the size from it
        self.end_headers()
        self.rec.status = code
        if self.command == "HEAD":
            return
        counted = code < 300 and self.rec.file is not None
        for i in range(0, len(body), 1 << 16):  # in pieces, so bytes_served moves during a transfer
            self.wfile.write(chunk := body[i:i + (1 << 16)])
            if counted:
                with self.hub.lock:
                    self.rec.bytes += len(chunk)
                    self.hub.bytes_served[self.rec.file] += len(chunk)  # type: ignore[index]


@contextlib.contextmanager
def hub_endpoint(url: str = "http://127.0.0.1:9", *, offline: bool = False) -> Iterator[None]:
    """Point huggingface_hub, imported or not, at `url` (default: a port that refuses connections)."""
    from huggingface_hub import constants

    url = url.rstrip("/")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(constants, "ENDPOINT", url)
        mp.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
        mp.setattr(constants, "HF_HUB_OFFLINE", offline)
        mp.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
        for k, v in {"HF_ENDPOINT": url, "HF_HUB_OFFLINE": str(int(offline)), "HF_HUB_DISABLE_TELEMETRY": "1"}.items():
            mp.setenv(k, v)  # for subprocesses
        yield


@pytest.fixture
def hub() -> Iterator[HubServer]:
    """A started, empty HubServer that huggingface_hub talks to; publish with hub.add_repo(id, folder)."""
    with HubServer() as server, hub_endpoint(server.url):
        yield server


def populate_cache(cache_dir: PathLike, repo_id: str, src_folder: PathLike, files: Iterable[str] | None = None,
                   commit: str | None = None, *, revision: str = "main", write_tree: bool = False,
                   lfs_patterns: Iterable[str] = LFS_PATTERNS) -> Path:
    """Lay `files` (default: all) of `src_folder` out as huggingface_hub's cache does; returns the snapshot dir.

    commit defaults to what HubServer serves for the same folder. write_tree also writes trees/<commit>.json
    listing *all* files: offline snapshot_download then raises IncompleteSnapshotError when `files` is a
    subset (without it, a partial snapshot is returned as is), and online it skips the /tree call.
    """
    every = scan_repo(src_folder, lfs_patterns)
    commit = commit or commit_of(every)
    repo_dir = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo_dir / "blobs").mkdir(exist_ok=True)
    for name in every if files is None else files:
        blob, link = repo_dir / "blobs" / every[name].etag, snapshot / name
        if not blob.exists():
            shutil.copyfile(every[name].local, blob)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))  # relative, as the library makes them
    if not re.fullmatch(r"[0-9a-f]{40}", revision):
        (repo_dir / "refs").mkdir(exist_ok=True)
        (repo_dir / "refs" / revision).write_text(commit)  # no newline: the ref is read verbatim
    if write_tree:  # huggingface_hub's _tree_cache format_version 1
        listing = {p: {"size": f.size, "blob_id": f.blob_id, **({"lfs_sha256": f.sha256, "lfs_size": f.size}
                                                                  if f.lfs else {})} for p, f in every.items()}
        (repo_dir / "trees").mkdir(exist_ok=True)
        (repo_dir / "trees" / f"{commit}.json").write_text(json.dumps({"format_version": 1, "files": listing}))
    return snapshot
