"""A local Hugging Face Hub on 127.0.0.1 for the tests: the few HTTP calls huggingface_hub
makes to read a model repository through ``HfFileSystem`` and to publish one commit through
``HfApi.create_commit`` with the LFS "basic" transfer.

Implemented (model repositories only, everything in memory):

- reading: ``GET /api/models/{repo}[/revision/{rev}]`` (repo info: sha, siblings),
  ``GET /api/models/{repo}/tree/{rev}[/{path}]`` (listing, ``recursive``),
  ``POST /api/models/{repo}/paths-info/{rev}``, ``HEAD``/``GET /{repo}/resolve/{rev}/{path}``
  with ``Range``;
- writing: ``POST /api/repos/create``, ``POST /api/models/{repo}/branch/{branch}``,
  ``POST /api/validate-yaml``, ``POST /api/models/{repo}/preupload/{rev}``,
  ``POST /{repo}.git/info/lfs/objects/batch`` (basic transfer, an upload href on this
  server), ``PUT /lfs-upload/{oid}`` (checks the sha256), ``POST /api/models/{repo}/commit/{rev}``
  (ndjson: header, file, lfsFile, deletedFile; an LFS file must have been uploaded).

Errors carry the ``X-Error-Code`` header huggingface_hub maps to its exceptions (RepoNotFound,
RevisionNotFound, EntryNotFound). With ``token`` set, every request must carry
``Authorization: Bearer <token>`` (401 otherwise). Every request is logged in ``requests``;
``deny_commits`` makes commits fail with 403. A request that matches nothing gets a 404 and is logged in ``unhandled`` so a test can assert that
nothing went unanswered. Not implemented: Xet storage (tests disable it, so huggingface_hub
uses LFS), multipart LFS, pull requests, pagination of listings, other repository types.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt")
LFS_MIN = 10 * 2**20


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    sha: str
    message: str
    files: dict[str, str]          # path -> sha256 of the content (a key of Hub.blobs)
    lfs: set[str] = field(default_factory=set)


@dataclass
class Repo:
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)       # commit shas, oldest first


class Hub:
    def __init__(self, *, token: str | None = None) -> None:
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.blobs: dict[str, bytes] = {}
        self.requests: list[str] = []
        self.unhandled: list[str] = []
        self.deny_commits = False          # answer commits 403 (a token that may not write)
        self.lock = threading.Lock()
        self._secret = uuid.uuid4().hex
        hub = self

        class Handler(_Handler):
            server_hub = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def sign(self, oid: str) -> str:
        return hashlib.sha256(f"{self._secret}:{oid}".encode()).hexdigest()[:32]

    # -- test helpers --------------------------------------------------------------------------
    def create_repo(self, repo_id: str) -> Repo:
        with self.lock:
            repo = self.repos.setdefault(repo_id, Repo())
            if "main" not in repo.branches:
                self._commit(repo, "main", "initial commit", {}, set())
            return repo

    def upload_folder(self, folder, repo_id: str, *, branch: str = "main") -> str:
        """Every file of ``folder`` in one commit on ``branch``; returns the commit sha."""
        from pathlib import Path

        repo = self.create_repo(repo_id)
        with self.lock:
            head = repo.commits[repo.branches.get(branch, repo.branches["main"])]
            files, lfs = dict(head.files), set(head.lfs)
            for f in sorted(Path(folder).iterdir()):
                if f.is_file():
                    data = f.read_bytes()
                    oid = hashlib.sha256(data).hexdigest()
                    self.blobs[oid] = data
                    files[f.name] = oid
                    if f.name.endswith(LFS_SUFFIXES):
                        lfs.add(f.name)
            return self._commit(repo, branch, f"upload {Path(folder).name}", files, lfs)

    def file(self, repo_id: str, path: str, revision: str = "main") -> bytes:
        repo = self.repos[repo_id]
        return self.blobs[repo.commits[repo.branches.get(revision, revision)].files[path]]

    def head(self, repo_id: str, revision: str = "main") -> Commit:
        repo = self.repos[repo_id]
        return repo.commits[repo.branches[revision]]

    # -- the model -----------------------------------------------------------------------------
    def _commit(self, repo: Repo, branch: str, message: str, files: dict[str, str], lfs: set[str]) -> str:
        sha = hashlib.sha1(uuid.uuid4().bytes).hexdigest()
        repo.commits[sha] = Commit(sha=sha, message=message, files=files, lfs=lfs & set(files))
        repo.branches[branch] = sha
        repo.log.append(sha)
        return sha

    def _resolve(self, repo_id: str, rev: str | None) -> tuple[Repo | None, Commit | None, str]:
        repo = self.repos.get(repo_id)
        if repo is None:
            return None, None, "RepoNotFound"
        rev = rev or "main"
        sha = repo.branches.get(rev, rev)
        commit = repo.commits.get(sha)
        return repo, commit, ("" if commit else "RevisionNotFound")

    def _entry(self, commit: Commit, path: str) -> dict:
        data = self.blobs[commit.files[path]]
        e = {"type": "file", "oid": _git_oid(data), "size": len(data), "path": path}
        if path in commit.lfs:
            e["lfs"] = {"oid": commit.files[path], "size": len(data), "pointerSize": 134}
        return e

    def _listing(self, commit: Commit, path: str, recursive: bool) -> list[dict] | None:
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        if prefix and prefix.rstrip("/") in commit.files:
            return None
        out, dirs = [], set()
        for p in sorted(commit.files):
            if not p.startswith(prefix):
                continue
            rest = p[len(prefix):]
            if "/" in rest and not recursive:
                dirs.add(prefix + rest.split("/", 1)[0])
                continue
            parts = rest.split("/")[:-1]
            for i in range(len(parts)):
                dirs.add(prefix + "/".join(parts[:i + 1]))
            out.append(self._entry(commit, p))
        if prefix and not out and not dirs:
            return None
        return [{"type": "directory", "oid": "0" * 40, "path": d} for d in sorted(dirs)] + out


class _Handler(BaseHTTPRequestHandler):
    server_hub: Hub
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):      # quiet
        pass

    # -- plumbing ------------------------------------------------------------------------------
    def _body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, body: bytes = b"", *, headers: dict | None = None,
              ctype: str = "application/json", head: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, obj, **kw) -> None:
        self._send(status, json.dumps(obj).encode(), **kw)

    def _error(self, status: int, code: str, message: str, head: bool = False) -> None:
        self._send(status, json.dumps({"error": message}).encode(),
                   headers={"X-Error-Code": code, "X-Error-Message": message}, head=head)

    def _authorized(self) -> bool:
        hub = self.server_hub
        if hub.token is None or self.headers.get("Authorization") == f"Bearer {hub.token}":
            return True
        self._body()
        self._error(401, "Unauthorized", "Invalid credentials in Authorization header",
                    head=self.command == "HEAD")
        return False

    def _dispatch(self) -> None:
        hub = self.server_hub
        url = urlsplit(self.path)
        path, query = unquote(url.path), parse_qs(url.query)
        with hub.lock:
            hub.requests.append(f"{self.command} {url.path}")
        presigned = path.startswith("/lfs-upload/")      # authorized by its signature instead
        if not presigned and not self._authorized():
            return
        for method, pattern, fn in ROUTES:
            if method == self.command:
                m = re.fullmatch(pattern, path)
                if m:
                    with hub.lock:
                        return fn(self, hub, query, *m.groups())
        self._body()
        with hub.lock:
            hub.unhandled.append(f"{self.command} {self.path}")
        self._error(404, "NotImplemented", f"{self.command} {path}: not implemented by the test hub",
                    head=self.command == "HEAD")

    do_GET = do_POST = do_PUT = do_HEAD = _dispatch

    # -- reading -------------------------------------------------------------------------------
    def repo_info(self, hub: Hub, query, repo_id: str, rev: str | None = None) -> None:
        repo, commit, err = hub._resolve(repo_id, rev)
        if err:
            return self._error(404, err, f"{repo_id}@{rev}: {err}")
        self._json(200, {"id": repo_id, "modelId": repo_id, "sha": commit.sha, "private": True,
                         "disabled": False, "gated": False, "downloads": 0, "likes": 0, "tags": [],
                         "lastModified": "2026-01-01T00:00:00.000Z",
                         "siblings": [{"rfilename": p} for p in sorted(commit.files)]})

    def tree(self, hub: Hub, query, repo_id: str, rev: str, path: str | None) -> None:
        repo, commit, err = hub._resolve(repo_id, rev)
        if err:
            return self._error(404, err, f"{repo_id}@{rev}: {err}")
        recursive = (query.get("recursive") or ["false"])[0].lower() in ("1", "true")
        out = hub._listing(commit, path or "", recursive)
        if out is None:
            return self._error(404, "EntryNotFound", f"{path}: no such folder")
        self._json(200, out)

    def paths_info(self, hub: Hub, query, repo_id: str, rev: str) -> None:
        body = self._body()
        repo, commit, err = hub._resolve(repo_id, rev)
        if err:
            return self._error(404, err, f"{repo_id}@{rev}: {err}")
        if "json" in (self.headers.get("Content-Type") or ""):
            paths = json.loads(body or b"{}").get("paths", [])
        else:
            paths = parse_qs(body.decode()).get("paths", [])
        out = []
        for p in paths:
            p = p.strip("/")
            if p in commit.files:
                out.append(hub._entry(commit, p))
            elif any(f.startswith(p + "/") for f in commit.files):
                out.append({"type": "directory", "oid": "0" * 40, "path": p})
        self._json(200, out)

    def resolve(self, hub: Hub, query, repo_id: str, rev: str, path: str) -> None:
        head = self.command == "HEAD"
        repo, commit, err = hub._resolve(repo_id, rev)
        if err:
            return self._error(404, err, f"{repo_id}@{rev}: {err}", head=head)
        if path not in commit.files:
            return self._error(404, "EntryNotFound", f"{path}: no such file", head=head)
        data = hub.blobs[commit.files[path]]
        etag = commit.files[path] if path in commit.lfs else _git_oid(data)
        headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        if path in commit.lfs:
            headers["X-Linked-ETag"] = f'"{etag}"'
            headers["X-Linked-Size"] = str(len(data))
        rng = self.headers.get("Range")
        if rng:
            m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
            if not m:
                return self._error(416, "RangeNotSatisfiable", rng, head=head)
            a = int(m.group(1)) if m.group(1) else max(0, len(data) - int(m.group(2)))
            b = int(m.group(2)) if m.group(1) and m.group(2) else len(data) - 1
            if a >= len(data):
                return self._send(416, b"", headers={"Content-Range": f"bytes */{len(data)}"}, head=head)
            b = min(b, len(data) - 1)
            headers["Content-Range"] = f"bytes {a}-{b}/{len(data)}"
            return self._send(206, data[a:b + 1], headers=headers,
                              ctype="application/octet-stream", head=head)
        self._send(200, data, headers=headers, ctype="application/octet-stream", head=head)

    # -- writing -------------------------------------------------------------------------------
    def create_repo(self, hub: Hub, query) -> None:
        req = json.loads(self._body() or b"{}")
        if req.get("type", "model") not in (None, "model"):
            return self._error(400, "BadRequest", "only model repositories")
        repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
        if repo_id in hub.repos:
            return self._json(409, {"error": "You already created this model repo", "url": f"{hub.endpoint}/{repo_id}"})
        repo = hub.repos[repo_id] = Repo()
        hub._commit(repo, "main", "initial commit", {}, set())
        self._json(200, {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id})

    def create_branch(self, hub: Hub, query, repo_id: str, branch: str) -> None:
        req = json.loads(self._body() or b"{}")
        repo, commit, err = hub._resolve(repo_id, req.get("startingPoint"))
        if err:
            return self._error(404, err, f"{repo_id}: {err}")
        if branch in repo.branches:
            return self._error(409, "Conflict", f"branch {branch} already exists")
        repo.branches[branch] = commit.sha
        self._json(200, {})

    def validate_yaml(self, hub: Hub, query) -> None:
        req = json.loads(self._body() or b"{}")
        content = req.get("content", "")
        if content.startswith("---"):
            import yaml

            try:
                yaml.safe_load(content.split("---", 2)[1])
            except yaml.YAMLError as err:
                return self._json(400, {"errors": [{"message": str(err)}], "warnings": []})
        self._json(200, {"errors": [], "warnings": []})

    def preupload(self, hub: Hub, query, repo_id: str, rev: str) -> None:
        req = json.loads(self._body() or b"{}")
        repo, commit, err = hub._resolve(repo_id, rev)
        if err:
            return self._error(404, err, f"{repo_id}@{rev}: {err}")
        files = []
        for f in req.get("files", []):
            lfs = f["path"].endswith(LFS_SUFFIXES) or int(f["size"]) >= LFS_MIN
            oid = _git_oid(hub.blobs[commit.files[f["path"]]]) if f["path"] in commit.files else None
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular",
                          "shouldIgnore": False, "oid": oid})
        self._json(200, {"files": files, "commitOid": commit.sha})

    def lfs_batch(self, hub: Hub, query, repo_id: str) -> None:
        req = json.loads(self._body() or b"{}")
        if repo_id not in hub.repos:
            return self._error(404, "RepoNotFound", repo_id)
        if req.get("operation") != "upload" or "basic" not in req.get("transfers", ["basic"]):
            return self._error(400, "BadRequest", "only basic uploads")
        objects = []
        for o in req.get("objects", []):
            entry = {"oid": o["oid"], "size": o["size"], "authenticated": True}
            if o["oid"] not in hub.blobs:
                entry["actions"] = {"upload": {"href": f"{hub.endpoint}/lfs-upload/{o['oid']}?sig={hub.sign(o['oid'])}",
                                               "header": {}}}
            objects.append(entry)
        self._json(200, {"transfer": "basic", "objects": objects})

    def lfs_upload(self, hub: Hub, query, oid: str) -> None:
        data = self._body()
        if (query.get("sig") or [""])[0] != hub.sign(oid):       # like a presigned S3 URL
            return self._error(403, "Forbidden", "bad upload signature")
        if hashlib.sha256(data).hexdigest() != oid:
            return self._error(400, "BadRequest", "content does not match its sha256")
        hub.blobs[oid] = data
        self._send(200)

    def commit(self, hub: Hub, query, repo_id: str, rev: str) -> None:
        lines = [json.loads(x) for x in self._body().splitlines() if x.strip()]
        if hub.deny_commits:
            return self._error(403, "Forbidden", "You don't have the rights to commit to this repo")
        repo, commit, err = hub._resolve(repo_id, rev)
        if err:
            return self._error(404, err, f"{repo_id}@{rev}: {err}")
        if rev not in repo.branches:
            return self._error(400, "BadRequest", f"{rev} is not a branch")
        files, lfs, message = dict(commit.files), set(commit.lfs), ""
        for item in lines:
            key, v = item["key"], item["value"]
            if key == "header":
                message = v["summary"]
                if v.get("parentCommit") and v["parentCommit"] != commit.sha:
                    return self._error(412, "PreconditionFailed", "parent commit moved")
            elif key == "file":
                data = base64.b64decode(v["content"])
                oid = hashlib.sha256(data).hexdigest()
                hub.blobs[oid] = data
                files[v["path"]] = oid
                lfs.discard(v["path"])
            elif key == "lfsFile":
                if v["oid"] not in hub.blobs:
                    return self._error(422, "LfsObjectMissing", f"{v['path']}: LFS object not uploaded")
                files[v["path"]] = v["oid"]
                lfs.add(v["path"])
            elif key == "deletedFile":
                if v["path"] not in files:
                    return self._error(404, "EntryNotFound", "A file with this name doesn't exist")
                files.pop(v["path"])
            else:
                return self._error(400, "BadRequest", f"operation {key} not implemented")
        sha = hub._commit(repo, rev, message, files, lfs)
        self._json(200, {"success": True, "commitOid": sha,
                         "commitUrl": f"{hub.endpoint}/{repo_id}/commit/{sha}"})


REPO = r"([^/]+/[^/]+)"
ROUTES = [
    ("GET", rf"/api/models/{REPO}", _Handler.repo_info),
    ("GET", rf"/api/models/{REPO}/revision/([^/]+)", _Handler.repo_info),
    ("GET", rf"/api/models/{REPO}/tree/([^/]+)(?:/(.*))?", _Handler.tree),
    ("POST", rf"/api/models/{REPO}/paths-info/([^/]+)", _Handler.paths_info),
    ("GET", rf"/{REPO}/resolve/([^/]+)/(.+)", _Handler.resolve),
    ("HEAD", rf"/{REPO}/resolve/([^/]+)/(.+)", _Handler.resolve),
    ("POST", r"/api/repos/create", _Handler.create_repo),
    ("POST", rf"/api/models/{REPO}/branch/([^/]+)", _Handler.create_branch),
    ("POST", r"/api/validate-yaml", _Handler.validate_yaml),
    ("POST", rf"/api/models/{REPO}/preupload/([^/]+)", _Handler.preupload),
    ("POST", rf"/{REPO}\.git/info/lfs/objects/batch", _Handler.lfs_batch),
    ("PUT", r"/lfs-upload/([0-9a-f]{64})", _Handler.lfs_upload),
    ("POST", rf"/api/models/{REPO}/commit/([^/]+)", _Handler.commit),
]
