"""A small Hugging Face Hub-compatible HTTP server for the test suite (standard library only).

Why: no Hub is reachable here, and mocks of `HfApi` would not test the real clients. This server speaks the
subset of the Hub's HTTP API that `huggingface_hub` (create_repo, upload_folder/create_commit with regular and
LFS files, repo info, tree, paths-info, resolve, refs, branches, tags), `transformers` (`from_pretrained`) and
`datasets` (`load_dataset` through `HfFileSystem`) call, so tests run the real client code paths end to end.

Model of the Hub kept here:
- repos of type model/dataset/space, keyed by (repo_type, "namespace/name"), created with an initial commit
  holding the Hub's default `.gitattributes` (so `*.safetensors`, `*.parquet`, ... go through LFS);
- commits are immutable snapshots (path -> file entry) with sha1 hex ids; branches and tags point at commits;
- a commit with `create_pr` opens pull request N: a ref `refs/pr/N` (a loadable revision) started at the base;
- regular files are content-addressed by their git blob sha1, LFS files by their sha256 (uploaded with the LFS
  batch API + a basic PUT transfer, then referenced by an `lfsFile` line of the ndjson commit);
- `resolve` answers regular files directly (ETag = git sha1) and redirects LFS files (302, X-Linked-Etag =
  sha256, X-Linked-Size) to a second "CDN" port, as the real Hub does with its storage;
- Xet is never advertised (clients must run with HF_HUB_DISABLE_XET=1).

`HubServer` is the programmatic handle; the pytest fixture `hub` in `tests/conftest.py` points the in-process
clients at it. Everything lives in memory and is dropped by `reset()`.
"""

from __future__ import annotations

import base64
import datetime as _dt
import fnmatch
import hashlib
import importlib
import inspect
import itertools
import json
import os
import re
import socket
import sys
import threading
import traceback
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit

TEST_USER = "test-user"
TEST_TOKEN = "hf_testhubtokenAAAAAAAAAAAAAAAAAAAAAAAA"

LFS_THRESHOLD = 10 * 1024 * 1024  # the Hub stores files >= 10 MB with LFS regardless of .gitattributes
REPO_TYPES = ("model", "dataset", "space")
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}

# The Hub's default .gitattributes (abridged): these patterns are stored with LFS.
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z *.arrow *.bin *.bz2 *.ckpt *.ftz *.gz *.h5 *.joblib *.lfs.* *.mlmodel *.model *.msgpack *.npy "
        "*.npz *.onnx *.ot *.parquet *.pb *.pickle *.pkl *.pt *.pth *.rar *.safetensors saved_model/**/* "
        "*.tar.* *.tar *.tflite *.tgz *.wasm *.xz *.zip *.zst *tfevents* *.png *.jpg *.jpeg *.webp *.wav "
        "*.mp3 *.ogg *.flac"
    ).split()
)


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob, which the Hub reports as `oid`/`blobId` of regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass(frozen=True)
class FileEntry:
    """One file of a snapshot; `blob_key` addresses the stored bytes (repointed to corrupt a file)."""

    oid: str  # git blob sha1 of the content (regular) or of the LFS pointer (LFS)
    size: int
    blob_key: str
    last_commit: str
    sha256: str | None = None  # set for LFS files

    @property
    def is_lfs(self) -> bool:
        return self.sha256 is not None


@dataclass
class Commit:
    id: str
    parents: list[str]
    title: str
    message: str
    date: str
    files: dict[str, FileEntry]


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        """Branch, tag, full commit sha or a unique sha prefix (>= 7 chars) -> commit."""
        revision = revision.removeprefix("refs/heads/").removeprefix("refs/tags/")
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        if revision in self.tags:
            return self.commits[self.tags[revision]]
        if revision in self.commits:
            return self.commits[revision]
        if len(revision) >= 7 and re.fullmatch(r"[0-9a-f]+", revision):
            matches = [c for c in self.commits if c.startswith(revision)]
            if len(matches) == 1:
                return self.commits[matches[0]]
        return None


class HubError(Exception):
    """Raised inside handlers; sent as an HTTP error with the Hub's X-Error-Code/X-Error-Message headers."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


class HubState:
    """All repos and blobs. Every mutation happens under `lock`."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.repos: dict[tuple[str, str], Repo] = {}
            self.blobs: dict[str, bytes] = {}  # blob_key -> bytes
            self._counter = itertools.count()

    # -- repos and commits -----------------------------------------------------------------------------------
    def get_repo(self, repo_type: str, repo_id: str) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, f"Repository {repo_type}s/{repo_id} not found", "RepoNotFound")
        return repo

    def create_repo(self, repo_type: str, repo_id: str, private: bool) -> tuple[Repo, bool]:
        with self.lock:
            if (repo_type, repo_id) in self.repos:
                return self.repos[(repo_type, repo_id)], False
            repo = Repo(repo_type=repo_type, repo_id=repo_id, private=private, created_at=_now())
            self.repos[(repo_type, repo_id)] = repo
            data = DEFAULT_GITATTRIBUTES.encode()
            self.commit(repo, "main", [("file", ".gitattributes", data)], "initial commit", "")
            return repo, True

    def store_regular(self, data: bytes) -> tuple[str, str]:
        oid = git_blob_sha1(data)
        self.blobs.setdefault("git-" + oid, data)
        return oid, "git-" + oid

    def commit(
        self,
        repo: Repo,
        branch: str,
        operations: list[tuple],
        title: str,
        message: str,
        parent_commit: str | None = None,
    ) -> Commit:
        """Apply operations on top of `branch` and move it. Operations: ("file", path, bytes),
        ("lfsFile", path, sha256), ("deletedFile", path, None), ("deletedFolder", path, None)."""
        with self.lock:
            head_id = repo.branches.get(branch)
            if parent_commit is not None and head_id is not None and parent_commit != head_id:
                raise HubError(412, f"Parent commit {parent_commit} is not the head of {branch} ({head_id})")
            files = dict(repo.commits[head_id].files) if head_id else {}
            commit_id = hashlib.sha1(
                f"{repo.repo_id}\n{head_id}\n{title}\n{next(self._counter)}\n{uuid.uuid4()}".encode()
            ).hexdigest()
            for kind, path, payload in operations:
                path = path.strip("/")
                if not path or ".." in path.split("/"):
                    raise HubError(400, f"Invalid path {path!r}")
                if kind == "file":
                    oid, key = self.store_regular(payload)
                    files[path] = FileEntry(oid=oid, size=len(payload), blob_key=key, last_commit=commit_id)
                elif kind == "lfsFile":
                    data = self.blobs.get("lfs-" + payload)
                    if data is None:
                        raise HubError(422, f"LFS object {payload} for {path} was never uploaded")
                    pointer = lfs_pointer(payload, len(data))
                    files[path] = FileEntry(
                        oid=git_blob_sha1(pointer),
                        size=len(data),
                        blob_key="lfs-" + payload,
                        last_commit=commit_id,
                        sha256=payload,
                    )
                elif kind == "deletedFile":
                    if path not in files:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                    del files[path]
                elif kind == "deletedFolder":
                    removed = [p for p in files if p.startswith(path + "/")]
                    if not removed:
                        raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                    for p in removed:
                        del files[p]
                else:
                    raise HubError(400, f"Unknown commit operation {kind!r}")
            commit = Commit(
                id=commit_id,
                parents=[head_id] if head_id else [],
                title=title,
                message=message,
                date=_now(),
                files=files,
            )
            repo.commits[commit_id] = commit
            repo.branches[branch] = commit_id
            return commit

    def lfs_patterns(self, commit: Commit) -> list[str]:
        entry = commit.files.get(".gitattributes")
        if entry is None:
            return []
        text = self.blobs.get(entry.blob_key, b"").decode(errors="replace")
        return [line.split()[0] for line in text.splitlines() if "filter=lfs" in line and line.split()]


def _matches_gitattributes(path: str, patterns: list[str]) -> bool:
    name = path.rsplit("/", 1)[-1]
    for pattern in patterns:
        if "/" in pattern:
            if fnmatch.fnmatch(path, pattern.replace("**/", "*")):
                return True
        elif fnmatch.fnmatch(name, pattern):
            return True
    return False


# ------------------------------------------------------------------------------------------------------------
# HTTP layer
# ------------------------------------------------------------------------------------------------------------

_API_REPO = re.compile(r"^/api/(models|datasets|spaces)/([^/]+)/([^/]+)(?:/(.*))?$")
_LFS_BATCH = re.compile(r"^/(?:(datasets|spaces)/)?([^/]+)/([^/]+)\.git/info/lfs/objects/batch$")
_RESOLVE = re.compile(r"^/(?:(datasets|spaces)/)?([^/]+)/([^/]+)/resolve/([^/]+)/(.+)$")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    # quiet: the request log is kept on the HubServer instead of stderr
    def log_message(self, format, *args):  # noqa: A002 - signature of the base class
        pass

    # -- plumbing --------------------------------------------------------------------------------------------
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

    def _dispatch(self, method: str) -> None:
        hub = self.server.hub
        split = urlsplit(self.path)
        self.raw_path, self.query = split.path, parse_qs(split.query)
        hub.requests.append(f"{method} {self.raw_path}")
        self._body: bytes | None = None
        if hub._should_crash(f"{method} {self.raw_path}"):
            hub._shutdown(background=True)  # first: `running` is False once the client sees the cut
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        try:
            if self.server.is_cdn:
                self._cdn(method)
            else:
                self._route(method)
        except HubError as err:
            headers = {"X-Error-Message": err.message, **err.headers}
            if err.code:
                headers["X-Error-Code"] = err.code
            self._json({"error": err.message}, status=err.status, headers=headers)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except (
            Exception
        ) as err:  # a bug or gap in this server: answer 500 and keep the traceback for the test
            hub.errors.append(traceback.format_exc())
            self._json({"error": f"test Hub internal error: {err!r}"}, status=500)

    def body(self) -> bytes:
        if self._body is None:
            length = int(self.headers.get("Content-Length") or 0)
            self._body = self.rfile.read(length) if length else b""
        return self._body

    def json_body(self) -> dict:
        raw = self.body()
        try:
            return json.loads(raw) if raw else {}
        except json.JSONDecodeError as err:
            raise HubError(400, f"Invalid JSON body: {err}") from err

    def _send(
        self, status: int, data: bytes, headers: dict | None = None, content_type: str = "application/json"
    ):
        self.body()  # drain the request so the keep-alive connection stays in sync
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for key, value in (headers or {}).items():
            # one latin-1 line per header value (error messages may quote paths or multi-line YAML errors)
            value = " ".join(str(value).split()).encode("ascii", "backslashreplace").decode()
            self.send_header(key, value)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _json(self, payload, status: int = 200, headers: dict | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers)

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return auth[7:].strip() if auth.lower().startswith("bearer ") else None

    def _authenticated(self) -> bool:
        return self._token() == self.server.hub.token

    def _require_auth(self) -> None:
        if self._token() is None:
            raise HubError(401, "You must be authenticated to do this (no token sent)")
        if not self._authenticated():
            raise HubError(401, "Invalid credentials in Authorization header")

    def _repo(self, repo_type: str, repo_id: str, write: bool = False) -> Repo:
        if write:
            self._require_auth()
        repo = self.server.hub.state.get_repo(repo_type, repo_id)
        if repo.private and not self._authenticated():
            raise HubError(401, f"Repository {repo_type}s/{repo_id} not found", "RepoNotFound")
        return repo

    def _commit(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def _url(self, path: str) -> str:
        return self.server.hub.endpoint + path

    # -- routing ---------------------------------------------------------------------------------------------
    def _route(self, method: str) -> None:
        path = self.raw_path
        if path == "/api/whoami-v2" and method == "GET":
            return self._whoami()
        if path == "/api/validate-yaml" and method == "POST":
            return self._validate_yaml()
        if path == "/api/repos/create" and method == "POST":
            return self._create_repo()
        if path == "/api/repos/delete" and method == "DELETE":
            return self._delete_repo()
        if path.startswith("/lfs-upload/") and method == "PUT":
            return self._lfs_put(path.rsplit("/", 1)[-1])
        if path.startswith("/lfs-verify/") and method == "POST":
            return self._lfs_verify(path.rsplit("/", 1)[-1])
        if m := _LFS_BATCH.match(path):
            if method == "POST":
                return self._lfs_batch(_repo_type(m.group(1)), f"{m.group(2)}/{m.group(3)}")
        if m := _RESOLVE.match(path):
            if method in ("GET", "HEAD"):
                repo_id = f"{unquote(m.group(2))}/{unquote(m.group(3))}"
                return self._resolve(
                    _repo_type(m.group(1)), repo_id, unquote(m.group(4)), unquote(m.group(5))
                )
        if m := _API_REPO.match(path):
            repo_type = m.group(1)[:-1]
            repo_id = f"{unquote(m.group(2))}/{unquote(m.group(3))}"
            rest = m.group(4) or ""
            action, _, tail = rest.partition("/")
            if method == "GET" and action == "":
                return self._info(repo_type, repo_id, None)
            if method == "GET" and action == "revision":
                return self._info(repo_type, repo_id, unquote(tail))
            if method == "GET" and action == "tree":
                revision, _, subpath = tail.partition("/")
                return self._tree(repo_type, repo_id, unquote(revision), unquote(subpath))
            if method == "POST" and action == "paths-info":
                return self._paths_info(repo_type, repo_id, unquote(tail))
            if method == "POST" and action == "preupload":
                return self._preupload(repo_type, repo_id, unquote(tail))
            if method == "POST" and action == "commit":
                return self._create_commit(repo_type, repo_id, unquote(tail))
            if method == "GET" and action == "refs":
                return self._refs(repo_type, repo_id)
            if method == "GET" and action == "commits":
                return self._list_commits(repo_type, repo_id, unquote(tail))
            if action == "branch" and method in ("POST", "DELETE"):
                return self._branch(method, repo_type, repo_id, unquote(tail))
            if action == "tag" and method in ("POST", "DELETE"):
                return self._tag(method, repo_type, repo_id, unquote(tail))
            if action == "settings" and method == "PUT":
                return self._settings(repo_type, repo_id)
        raise HubError(404, f"Not implemented by the test Hub: {method} {path}")

    # -- account ---------------------------------------------------------------------------------------------
    def _whoami(self) -> None:
        self._require_auth()
        self._json(
            {
                "type": "user",
                "id": "0" * 24,
                "name": TEST_USER,
                "fullname": "Test User",
                "email": "test-user@example.com",
                "emailVerified": True,
                "isPro": False,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}},
            }
        )

    def _validate_yaml(self) -> None:
        content = self.json_body().get("content", "")
        errors = []
        if content.startswith("---"):
            match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.DOTALL)
            if match is None:
                errors.append("Metadata block is not closed by '---'")
            else:
                try:
                    import yaml  # a project dependency; the rest of the server is stdlib only

                    metadata = yaml.safe_load(match.group(1))
                    if metadata is not None and not isinstance(metadata, dict):
                        errors.append("Metadata must be a YAML mapping")
                except ImportError:
                    pass
                except Exception as err:  # yaml.YAMLError
                    errors.append(f"Invalid YAML in metadata: {err}")
        if errors:
            raise HubError(400, "; ".join(errors))
        self._json({"errors": [], "warnings": []})

    # -- repos -----------------------------------------------------------------------------------------------
    def _create_repo(self) -> None:
        self._require_auth()
        body = self.json_body()
        repo_type = body.get("type") or "model"
        if repo_type not in REPO_TYPES:
            raise HubError(400, f"Invalid repo type {repo_type!r}")
        name, namespace = body.get("name"), body.get("organization") or TEST_USER
        if not name or not re.fullmatch(r"[\w.\-]+", name) or not re.fullmatch(r"[\w.\-]+", namespace):
            raise HubError(400, f"Invalid repo name {namespace}/{name}")
        private = body.get("visibility", "public") == "private" or bool(body.get("private"))
        repo_id = f"{namespace}/{name}"
        _, created = self.server.hub.state.create_repo(repo_type, repo_id, private)
        url = self._url("/" + URL_PREFIXES[repo_type] + repo_id)
        if not created:
            return self._json({"error": "You already created this repo", "url": url}, status=409)
        self._json({"url": url, "name": repo_id, "id": uuid.uuid4().hex[:24]})

    def _delete_repo(self) -> None:
        self._require_auth()
        body = self.json_body()
        repo_type = body.get("type") or "model"
        repo_id = f"{body.get('organization') or TEST_USER}/{body.get('name')}"
        with self.server.hub.state.lock:
            self._repo(repo_type, repo_id)
            del self.server.hub.state.repos[(repo_type, repo_id)]
        self._json({})

    def _settings(self, repo_type: str, repo_id: str) -> None:
        repo = self._repo(repo_type, repo_id, write=True)
        body = self.json_body()
        if "private" in body:
            repo.private = bool(body["private"])
        if "visibility" in body:
            repo.private = body["visibility"] == "private"
        self._json({})

    def _info(self, repo_type: str, repo_id: str, revision: str | None) -> None:
        repo = self._repo(repo_type, repo_id)
        commit = self._commit(repo, revision or "main")
        blobs = "blobs" in self.query and self.query["blobs"][0].lower() in ("1", "true")
        siblings = []
        for path, entry in sorted(commit.files.items()):
            sibling: dict = {"rfilename": path}
            if blobs:
                sibling.update(size=entry.size, blobId=entry.oid)
                if entry.is_lfs:
                    sibling["lfs"] = {
                        "size": entry.size,
                        "sha256": entry.sha256,
                        "pointerSize": len(lfs_pointer(entry.sha256, entry.size)),
                    }
            siblings.append(sibling)
        payload = {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "author": repo_id.split("/")[0],
            "sha": commit.id,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(e.size for e in commit.files.values()),
        }
        card = self.server.hub._card_data(commit)
        if card is not None:
            payload["cardData"] = card
            payload["tags"] = list(card.get("tags") or []) if isinstance(card.get("tags"), list) else []
            if repo_type == "model" and card.get("library_name"):
                payload["library_name"] = card["library_name"]
        if repo_type == "model":
            payload["spaces"] = []
        self._json(payload)

    def _refs(self, repo_type: str, repo_id: str) -> None:
        repo = self._repo(repo_type, repo_id)
        payload = {
            "branches": [
                {"name": n, "ref": f"refs/heads/{n}", "targetCommit": c}
                for n, c in sorted(repo.branches.items())
                if not n.startswith("refs/pr/")
            ],
            "tags": [
                {"name": n, "ref": f"refs/tags/{n}", "targetCommit": c} for n, c in sorted(repo.tags.items())
            ],
            "converts": [],
        }
        if "include_prs" in self.query:
            payload["pullRequests"] = []
        self._json(payload)

    def _list_commits(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_type, repo_id)
        commit, items = self._commit(repo, revision), []
        while commit is not None:
            items.append(
                {
                    "id": commit.id,
                    "title": commit.title,
                    "message": commit.message,
                    "authors": [{"user": TEST_USER}],
                    "date": commit.date,
                }
            )
            commit = repo.commits[commit.parents[0]] if commit.parents else None
        self._json(items)

    def _branch(self, method: str, repo_type: str, repo_id: str, branch: str) -> None:
        repo = self._repo(repo_type, repo_id, write=True)
        with self.server.hub.state.lock:
            if method == "DELETE":
                if branch not in repo.branches:
                    raise HubError(404, f"Branch {branch} not found", "RevisionNotFound")
                if branch == "main":
                    raise HubError(403, "Cannot delete the main branch")
                del repo.branches[branch]
                return self._json({})
            if branch in repo.branches:
                raise HubError(409, f"Branch {branch} already exists")
            start = self._commit(repo, self.json_body().get("startingPoint") or "main")
            repo.branches[branch] = start.id
        self._json({})

    def _tag(self, method: str, repo_type: str, repo_id: str, target: str) -> None:
        repo = self._repo(repo_type, repo_id, write=True)
        with self.server.hub.state.lock:
            if method == "DELETE":
                if target not in repo.tags:
                    raise HubError(404, f"Tag {target} not found", "RevisionNotFound")
                del repo.tags[target]
                return self._json({})
            tag = self.json_body().get("tag")
            if not tag:
                raise HubError(400, "Missing 'tag'")
            if tag in repo.tags:
                raise HubError(409, f"Tag {tag} already exists")
            repo.tags[tag] = self._commit(repo, target).id
        self._json({})

    # -- listing ---------------------------------------------------------------------------------------------
    def _entry_json(self, commit: Commit, path: str, expand: bool, repo: Repo) -> dict | None:
        entry = commit.files.get(path)
        if entry is not None:
            item: dict = {"type": "file", "oid": entry.oid, "size": entry.size, "path": path}
            if entry.is_lfs:
                pointer_size = len(lfs_pointer(entry.sha256, entry.size))
                item["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": pointer_size}
            if expand:
                item["lastCommit"] = self._last_commit_json(repo, entry.last_commit)
            return item
        children = {p: e for p, e in commit.files.items() if p.startswith(path + "/")}
        if not children:
            return None
        tree_oid = hashlib.sha1(
            "".join(f"{p}:{e.oid}\n" for p, e in sorted(children.items())).encode()
        ).hexdigest()
        item = {"type": "directory", "oid": tree_oid, "size": 0, "path": path}
        if expand:
            latest = max(children.values(), key=lambda e: repo.commits[e.last_commit].date)
            item["lastCommit"] = self._last_commit_json(repo, latest.last_commit)
        return item

    @staticmethod
    def _last_commit_json(repo: Repo, commit_id: str) -> dict:
        commit = repo.commits[commit_id]
        return {"id": commit.id, "title": commit.title, "date": commit.date}

    def _tree(self, repo_type: str, repo_id: str, revision: str, subpath: str) -> None:
        repo = self._repo(repo_type, repo_id)
        commit = self._commit(repo, revision)
        subpath = subpath.strip("/")
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        expand = self.query.get("expand", ["false"])[0].lower() in ("1", "true")
        prefix = subpath + "/" if subpath else ""
        if subpath and not any(p.startswith(prefix) for p in commit.files):
            raise HubError(
                404, f"Entry not found: {subpath} is not a directory of {revision}", "EntryNotFound"
            )
        paths: set[str] = set()
        for path in commit.files:
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            depth = len(parts) if recursive else 1
            for i in range(1, min(depth, len(parts)) + 1):
                paths.add(prefix + "/".join(parts[:i]))
        items = [self._entry_json(commit, p, expand, repo) for p in sorted(paths)]
        # directories first, like the Hub
        items.sort(key=lambda item: (item["type"] != "directory", item["path"]))
        self._json(items)

    def _paths_info(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_type, repo_id)
        commit = self._commit(repo, revision)
        content_type = self.headers.get("Content-Type", "")
        if "json" in content_type:
            body = self.json_body()
            paths, expand = body.get("paths") or [], bool(body.get("expand"))
        else:
            form = parse_qs(self.body().decode())
            paths = form.get("paths", [])
            expand = form.get("expand", ["False"])[0].lower() in ("1", "true")
        items = [self._entry_json(commit, p.strip("/"), expand, repo) for p in paths]
        self._json([item for item in items if item is not None])

    # -- resolve ---------------------------------------------------------------------------------------------
    def _resolve(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        repo = self._repo(repo_type, repo_id)
        commit = self._commit(repo, revision)
        entry = commit.files.get(path)
        if entry is None:
            raise HubError(
                404,
                f"Entry not found: {path} does not exist at {revision}",
                "EntryNotFound",
                headers={"X-Repo-Commit": commit.id},
            )
        headers = {"X-Repo-Commit": commit.id, "Accept-Ranges": "bytes"}
        if entry.is_lfs:
            pointer = lfs_pointer(entry.sha256, entry.size)
            headers.update(
                {
                    "ETag": f'"{entry.oid}"',
                    "X-Linked-Etag": f'"{entry.sha256}"',
                    "X-Linked-Size": entry.size,
                    # like the Hub's signed storage URLs: the object key, plus the file name to report
                    "Location": f"{self.server.hub.cdn_endpoint}/{entry.blob_key}?filename={quote(path)}",
                }
            )
            return self._send(302, pointer, headers, content_type="text/plain; charset=utf-8")
        headers["ETag"] = f'"{entry.oid}"'
        self._serve_bytes(self.server.hub.state.blobs[entry.blob_key], headers)

    def _serve_bytes(self, data: bytes, headers: dict) -> None:
        range_header = self.headers.get("Range")
        if range_header:
            match = re.fullmatch(r"bytes=(\d*)-(\d*)", range_header.strip())
            if match is None or match.groups() == ("", ""):
                raise HubError(416, f"Unsupported Range header {range_header!r}")
            start_s, end_s = match.groups()
            if start_s == "":
                start, end = max(len(data) - int(end_s), 0), len(data) - 1
            else:
                start, end = int(start_s), min(int(end_s) if end_s else len(data) - 1, len(data) - 1)
            if start >= len(data) or start > end:
                raise HubError(
                    416, "Range Not Satisfiable", headers={"Content-Range": f"bytes */{len(data)}"}
                )
            headers = {**headers, "Content-Range": f"bytes {start}-{end}/{len(data)}"}
            return self._send(206, data[start : end + 1], headers, content_type="application/octet-stream")
        self._send(200, data, headers, content_type="application/octet-stream")

    def _cdn(self, method: str) -> None:
        """The storage side: serves stored bytes by blob key, no auth (like a signed URL)."""
        if method not in ("GET", "HEAD"):
            raise HubError(405, "Method not allowed on the storage endpoint")
        key = unquote(self.raw_path.lstrip("/"))
        data = self.server.hub.state.blobs.get(key)
        if data is None:
            raise HubError(404, f"No such object {key}")
        headers = {"ETag": f'"{key.split("-", 1)[-1]}"', "Accept-Ranges": "bytes"}
        if "filename" in self.query:  # huggingface_hub names the file from this in its size-mismatch error
            headers["Content-Disposition"] = f'attachment; filename="{self.query["filename"][0]}";'
        self._serve_bytes(data, headers)

    # -- upload ----------------------------------------------------------------------------------------------
    def _preupload(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_type, repo_id, write=True)
        commit = repo.resolve(revision)
        if commit is None and "create_pr" not in self.query:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        commit = commit or self._commit(repo, "main")
        patterns = self.server.hub.state.lfs_patterns(commit)
        files = []
        for item in self.json_body().get("files", []):
            path, size = item["path"], int(item.get("size", 0))
            sample = base64.b64decode(item.get("sample", ""))
            lfs = size >= LFS_THRESHOLD or _matches_gitattributes(path, patterns) or b"\x00" in sample
            existing = commit.files.get(path)
            oid = None
            if existing is not None:
                oid = existing.sha256 if existing.is_lfs else existing.oid
            files.append(
                {"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid}
            )
        self._json({"files": files, "commitOid": commit.id})

    def _lfs_batch(self, repo_type: str, repo_id: str) -> None:
        self._repo(repo_type, repo_id, write=True)
        body = self.json_body()
        if body.get("operation") != "upload":
            raise HubError(400, "The test Hub only supports the LFS 'upload' operation")
        objects = []
        for obj in body.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            item: dict = {"oid": oid, "size": size, "authenticated": True}
            if "lfs-" + oid not in self.server.hub.state.blobs:
                item["actions"] = {
                    "upload": {"href": self._url(f"/lfs-upload/{oid}?size={size}"), "header": {}},
                    "verify": {"href": self._url(f"/lfs-verify/{oid}"), "header": {}},
                }
            objects.append(item)
        self._send(
            200,
            json.dumps({"transfer": "basic", "objects": objects}).encode(),
            content_type="application/vnd.git-lfs+json",
        )

    def _lfs_put(self, oid: str) -> None:
        data = self.body()
        expected_size = self.query.get("size", [None])[0]
        if expected_size is not None and int(expected_size) != len(data):
            raise HubError(400, f"LFS upload of {oid}: expected {expected_size} bytes, got {len(data)}")
        if hashlib.sha256(data).hexdigest() != oid:
            raise HubError(400, f"LFS upload of {oid}: sha256 of the body does not match")
        with self.server.hub.state.lock:
            self.server.hub.state.blobs["lfs-" + oid] = data
        self._send(200, b"", content_type="text/plain")

    def _lfs_verify(self, oid: str) -> None:
        data = self.server.hub.state.blobs.get("lfs-" + oid)
        size = self.json_body().get("size")
        if data is None or (size is not None and int(size) != len(data)):
            raise HubError(404, f"LFS object {oid} not found or of the wrong size")
        self._json({"success": True})

    def _create_commit(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_type, repo_id, write=True)
        header: dict = {}
        operations = []
        for line in self.body().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item.get("key"), item.get("value", {})
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise HubError(400, "Only base64-encoded files are supported")
                operations.append(("file", value["path"], base64.b64decode(value["content"])))
            elif key == "lfsFile":
                operations.append(("lfsFile", value["path"], value["oid"]))
            elif key in ("deletedFile", "deletedFolder"):
                operations.append((key, value["path"], None))
            else:
                raise HubError(400, f"Unknown commit line key {key!r}")
        state = self.server.hub.state
        with state.lock:
            if revision not in repo.branches:
                if repo.resolve(revision) is not None:
                    raise HubError(400, f"Cannot commit to {revision}: not a branch")
                raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            pr_url, branch = None, revision
            if "create_pr" in self.query:  # a pull request is a ref `refs/pr/N` started at the base branch
                number = 1 + sum(b.startswith("refs/pr/") for b in repo.branches)
                branch = f"refs/pr/{number}"
                repo.branches[branch] = repo.branches[revision]
                pr_url = self._url(f"/{URL_PREFIXES[repo_type]}{repo_id}/discussions/{number}")
            commit = state.commit(
                repo,
                branch,
                operations,
                header.get("summary") or "Upload files",
                header.get("description") or "",
                parent_commit=header.get("parentCommit"),
            )
        prefix = "/" + URL_PREFIXES[repo_type] + repo_id
        self._json(
            {
                "success": True,
                "commitOid": commit.id,
                "commitUrl": self._url(f"{prefix}/commit/{commit.id}"),
                "pullRequestUrl": pr_url,
            }
        )


def _repo_type(url_prefix: str | None) -> str:
    return {"datasets": "dataset", "spaces": "space"}.get(url_prefix or "", "model")


class _Server(ThreadingHTTPServer):
    """Tracks open connections so that `stop()` cuts keep-alive clients off (a stopped Hub must fail)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, hub: HubServer, is_cdn: bool):
        self.hub, self.is_cdn = hub, is_cdn
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def get_request(self):
        conn, addr = super().get_request()
        with self.connections_lock:
            self.connections.add(conn)
        return conn, addr

    def shutdown_request(self, request):
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def close_all(self) -> None:
        with self.connections_lock:
            connections, self.connections = list(self.connections), set()
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()


class HubServer:
    """A running test Hub: an API port (`endpoint`) and a storage port (`cdn_endpoint`) for LFS downloads.

    `stop()` and `start()` keep the stored repos and the ports, so tests can simulate an outage midway.
    """

    def __init__(self, host: str = "127.0.0.1", token: str = TEST_TOKEN):
        self.host, self.token = host, token
        self.state = HubState()
        self.requests: list[str] = []  # "METHOD /path" of every request, for debugging and assertions
        self.errors: list[str] = []  # tracebacks of internal server errors (HTTP 500)
        self._ports: tuple[int, int] = (0, 0)
        self._servers: list[_Server] = []
        self._crash_patterns: list[re.Pattern] = []
        self._lock = threading.Lock()
        self._pending_shutdown: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return bool(self._servers)

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self._ports[0]}"

    @property
    def cdn_endpoint(self) -> str:
        return f"http://{self.host}:{self._ports[1]}"

    def start(self) -> HubServer:
        """Serve (again) on the same ports, with the stored repos kept."""
        with self._lock:
            if self._pending_shutdown is not None:
                self._pending_shutdown.join()
                self._pending_shutdown = None
            if self._servers:
                return self
            api = _Server((self.host, self._ports[0]), self, is_cdn=False)
            cdn = _Server((self.host, self._ports[1]), self, is_cdn=True)
            self._ports = (api.server_address[1], cdn.server_address[1])
            self._servers = [api, cdn]
            for server in self._servers:
                thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
                thread.daemon = True
                thread.start()
        return self

    def stop(self) -> None:
        """Stop serving (both ports) and cut open connections; in-process clients drop pooled connections."""
        self._shutdown(background=False)
        if "huggingface_hub" in sys.modules:
            from huggingface_hub import close_session

            close_session()

    def _shutdown(self, background: bool) -> None:
        with self._lock:
            servers, self._servers = self._servers, []

            def close() -> None:
                for server in servers:
                    server.shutdown()
                    server.server_close()
                    server.close_all()

            if background:  # called from a request handler: serve_forever must not wait on itself
                self._pending_shutdown = threading.Thread(target=close, daemon=True)
                self._pending_shutdown.start()
            else:
                close()

    def reset(self) -> None:
        """Forget all repos, blobs, logged requests and crash triggers."""
        self.state.reset()
        self.requests.clear()
        self.errors.clear()
        self._crash_patterns.clear()

    def crash_on(self, pattern: str) -> None:
        """Stop the server abruptly (connection cut, no response) on the first request matching the regex
        `pattern`, searched in "METHOD /path" (e.g. r"POST /api/models/.*/commit/"): an outage midway."""
        self._crash_patterns.append(re.compile(pattern))

    def _should_crash(self, request_line: str) -> bool:
        for pattern in list(self._crash_patterns):
            if pattern.search(request_line):
                self._crash_patterns.remove(pattern)
                return True
        return False

    # -- test helpers ----------------------------------------------------------------------------------------
    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        return self.state.get_repo(repo_type, repo_id)

    def read_file(self, repo_id: str, path: str, repo_type: str = "model", revision: str = "main") -> bytes:
        """The bytes the Hub would serve for `path` (raises KeyError if the file is absent)."""
        entry = self._entry(repo_id, path, repo_type, revision)
        return self.state.blobs[entry.blob_key]

    def corrupt_file(
        self,
        repo_id: str,
        path: str,
        data: bytes | None = None,
        repo_type: str = "model",
        revision: str = "main",
    ) -> None:
        """Make the Hub serve other bytes for `path` in every commit of the repo, while its metadata (size,
        etag, sha256) still describe the original: a damaged object in storage. Default `data`: first half."""
        with self.state.lock:
            entry = self._entry(repo_id, path, repo_type, revision)
            original = self.state.blobs[entry.blob_key]
            key = f"corrupt-{uuid.uuid4().hex}"
            self.state.blobs[key] = original[: len(original) // 2] if data is None else data
            for commit in self.repo(repo_id, repo_type).commits.values():
                current = commit.files.get(path)
                if current is not None and current.blob_key == entry.blob_key:
                    commit.files[path] = FileEntry(
                        oid=current.oid,
                        size=current.size,
                        blob_key=key,
                        last_commit=current.last_commit,
                        sha256=current.sha256,
                    )

    def delete_file(self, repo_id: str, path: str, repo_type: str = "model", branch: str = "main") -> str:
        """Delete `path` (a file, or a folder with a trailing '/') server-side in a new commit on `branch`;
        returns the new commit id."""
        repo = self.repo(repo_id, repo_type)
        kind = "deletedFolder" if path.endswith("/") else "deletedFile"
        return self.state.commit(repo, branch, [(kind, path, None)], f"Delete {path}", "").id

    def _entry(self, repo_id: str, path: str, repo_type: str, revision: str) -> FileEntry:
        commit = self.repo(repo_id, repo_type).resolve(revision)
        if commit is None:
            raise KeyError(f"revision {revision} not found in {repo_type}s/{repo_id}")
        if path not in commit.files:
            raise KeyError(f"{path} not found in {repo_type}s/{repo_id}@{revision}")
        return commit.files[path]

    def _card_data(self, commit: Commit) -> dict | None:
        entry = commit.files.get("README.md")
        if entry is None:
            return None
        text = self.state.blobs.get(entry.blob_key, b"").decode(errors="replace")
        match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.DOTALL)
        if match is None:
            return None
        try:
            import yaml

            data = yaml.safe_load(match.group(1))
        except Exception:
            return None
        return data if isinstance(data, dict) else None

    def url(self, repo_id: str, path: str = "", repo_type: str = "model", revision: str = "main") -> str:
        """The resolve URL of a file (or the repo page when `path` is empty)."""
        base = f"{self.endpoint}/{URL_PREFIXES[repo_type]}{repo_id}"
        return f"{base}/resolve/{quote(revision, safe='')}/{quote(path)}" if path else base


# ----------------------------------------------------------------------------------------------------------
# Client wiring (used by the `hub` fixture in tests/conftest.py)
# ----------------------------------------------------------------------------------------------------------


def connect_clients(server: HubServer, hf_home: str, monkeypatch) -> None:
    """Point the in-process huggingface_hub, datasets and transformers clients (and, through the environment,
    subprocesses) at `server`, with caches under `hf_home`. `monkeypatch` (a `pytest.MonkeyPatch`) undoes it.

    Why so many places: these libraries copy HF_ENDPOINT, HF_HUB_OFFLINE, HF_HUB_DISABLE_XET and the cache
    paths into module globals at import time, and `make test` runs with HF_HUB_OFFLINE=1.
    """
    endpoint = server.endpoint
    hub_cache = os.path.join(hf_home, "hub")
    datasets_cache = os.path.join(hf_home, "datasets")

    # Environment: read at call time by some code paths and inherited by subprocesses.
    env = {
        "HF_ENDPOINT": endpoint,
        "HF_TOKEN": server.token,
        "HF_HOME": hf_home,
        "HF_HUB_CACHE": hub_cache,
        "HF_DATASETS_CACHE": datasets_cache,
        "HF_HUB_OFFLINE": "0",
        "TRANSFORMERS_OFFLINE": "0",
        "HF_DATASETS_OFFLINE": "0",
        "HF_HUB_DISABLE_XET": "1",  # the test Hub speaks LFS only
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_ETAG_TIMEOUT": "5",  # a local server answers in ms; never wait 10 s on a dead one
        "HF_HUB_DOWNLOAD_TIMEOUT": "5",
        "HF_UPDATE_DOWNLOAD_COUNTS": "0",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)

    # huggingface_hub: module-level copies made at import time.
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    for name, value in {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": constants.HF_URL_HOSTS | {"127.0.0.1"},
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HOME": hf_home,
        "HF_HUB_CACHE": hub_cache,
        "HUGGINGFACE_HUB_CACHE": hub_cache,
        "HF_ASSETS_CACHE": os.path.join(hf_home, "assets"),
        "HUGGINGFACE_ASSETS_CACHE": os.path.join(hf_home, "assets"),
        "HF_XET_CACHE": os.path.join(hf_home, "xet"),
        "HF_TOKEN_PATH": os.path.join(hf_home, "token"),  # never read the developer's stored token
        "HF_STORED_TOKENS_PATH": os.path.join(hf_home, "stored_tokens"),
        "HF_HUB_ETAG_TIMEOUT": 5,
        "HF_HUB_DOWNLOAD_TIMEOUT": 5,
    }.items():
        monkeypatch.setattr(constants, name, value)
    monkeypatch.setattr(_http, "_HUB_ORIGINS", _http._HUB_ORIGINS | {_http._url_origin(endpoint)})
    # The module-level `HfApi()` behind `huggingface_hub.create_repo`, `upload_folder`, ... froze its
    # endpoint.
    from huggingface_hub import hf_api

    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)
    # Retries back off 1, 2, 4, 8, 8 s: keep the retries (they are real client behaviour) but not the waiting,
    # so a stopped server fails in well under a second instead of ~25 s.
    for fn in (_http.http_backoff, _http.http_stream_backoff):
        fn = inspect.unwrap(fn)  # http_stream_backoff is a @contextmanager
        monkeypatch.setitem(fn.__kwdefaults__, "base_wait_time", 0.01)
        monkeypatch.setitem(fn.__kwdefaults__, "max_wait_time", 0.02)

    # datasets: its own frozen copies of the endpoint, offline flag and cache paths.
    datasets_config = importlib.import_module("datasets.config")
    for name, value in {
        "HF_ENDPOINT": endpoint,
        "HUB_DATASETS_URL": endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}",
        "HF_HUB_OFFLINE": False,
        "HF_DATASETS_OFFLINE": False,
        "HF_CACHE_HOME": hf_home,
        "HF_DATASETS_CACHE": _as_path(datasets_cache),
        "HF_MODULES_CACHE": _as_path(os.path.join(hf_home, "modules")),
        "DOWNLOADED_DATASETS_PATH": _as_path(os.path.join(datasets_cache, "downloads")),
        "EXTRACTED_DATASETS_PATH": _as_path(os.path.join(datasets_cache, "downloads", "extracted")),
        "USE_PARQUET_EXPORT": False,  # would ask the dataset viewer service on the internet
        "HF_UPDATE_DOWNLOAD_COUNTS": False,
    }.items():
        monkeypatch.setattr(datasets_config, name, value)

    # transformers reads the endpoint and offline flag from huggingface_hub at call time; only the remote-code
    # module cache is frozen.
    transformers_hub = importlib.import_module("transformers.utils.hub")
    monkeypatch.setattr(transformers_hub, "HF_MODULES_CACHE", os.path.join(hf_home, "modules"))
    # transformers' shared `HfApi` (push_to_hub's create_repo/commit) is made on first use and keeps the
    # endpoint of that moment: any earlier Hub lookup (e.g. of a missing repo, offline) would freeze hf.co.
    monkeypatch.setattr(transformers_hub, "_hf_api", None)

    drop_client_state()


def _as_path(path: str):
    from pathlib import Path

    return Path(path)


def drop_client_state() -> None:
    """Pooled connections and cached filesystems (with their listing caches) must not leak between tests."""
    from huggingface_hub import HfFileSystem, close_session

    close_session()
    HfFileSystem.clear_instance_cache()
