"""A local stand-in for the Hugging Face hub's HTTP API, for tests/test_hub.py and
tests/test_hub_mlx.py, and the helpers both use to run the real client against it.

It speaks the subset of the hub's API that huggingface_hub's `snapshot_download`,
`hf_hub_download`, `model_info`/`repo_info`, `list_repo_files`, `create_repo` and
`upload_folder` use (plain LFS, no Xet: clients run with `HF_HUB_DISABLE_XET=1`):

    GET  /api/models/OWNER/NAME[/revision/REV]       repo info: sha, siblings
    GET  /api/models/OWNER/NAME/tree/REV[/PATH]      file listing (one page)
    HEAD|GET /OWNER/NAME/resolve/REV/PATH            a file: X-Repo-Commit, ETag, size;
                                                     LFS files answer 302 to CDN/lfs/OID with
                                                     X-Linked-Etag and X-Linked-Size
    GET  CDN/lfs/OID                                 LFS content
    POST /api/repos/create                           a new repo (409 if it exists)
    POST /api/validate-yaml                          a README's front matter
    POST /api/models/OWNER/NAME/preupload/REV        regular or LFS, per file
    POST /OWNER/NAME.git/info/lfs/objects/batch      LFS upload actions
    PUT  /lfs-upload/OID                             LFS content (checked against OID)
    POST /api/models/OWNER/NAME/commit/REV           an NDJSON commit

LFS content is served by a second server on another port (`CDN`), another origin as the
hub's CDN is: huggingface_hub 1.x and later follow a redirect to the hub's own origin
when they ask for a file's metadata (and then miss `X-Repo-Commit`), not one to another.

Creating a repo under `readonly/` is refused (403), as for a namespace without write
rights. Errors carry the hub's `X-Error-Code` (RepoNotFound, RevisionNotFound, EntryNotFound,
GatedRepo), which huggingface_hub turns into its typed errors. Every request is
logged (`Hub.log`) so tests can count downloads. Repos are held in memory as
commits of `{path: bytes | Path}` (a `Path` is read when served), with branches and
tags as refs; commit ids are made up (40 hex digits).

huggingface_hub reads its environment (`HF_ENDPOINT`, `HF_HOME`, `HF_HUB_OFFLINE`) when
imported, so the tests run every client call in a fresh subprocess (`client`) with the
environment `hf_env` makes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

ROOT = Path(__file__).resolve().parents[1]
LFS_SUFFIXES = (".safetensors", ".pt", ".onnx", ".bin", ".npz")


def _bytes(src: bytes | Path) -> bytes:
    return src if isinstance(src, bytes) else Path(src).read_bytes()


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes | Path]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    gated: bool = False
    private: bool = False


class Hub:
    """The repos, the LFS store and the request log of one server."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes | Path] = {}
        self.log: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self._n = 0
        self._hashes: dict[tuple[str, str], tuple[str, str, int]] = {}

    # ------------------------------------------------------------- content

    def _commit_id(self, repo_id: str) -> str:
        self._n += 1
        return hashlib.sha1(f"{repo_id}:{self._n}".encode()).hexdigest()

    def commit(self, repo_id: str, files: dict[str, bytes | Path], branch: str = "main") -> str:
        """A new commit of exactly `files` on `branch` (the repo is created if new)."""
        repo = self.repos.setdefault(repo_id, Repo())
        sha = self._commit_id(repo_id)
        repo.commits[sha] = dict(files)
        repo.refs[branch] = sha
        return sha

    def add_folder(self, repo_id: str, folder: Path, branch: str = "main") -> str:
        """A commit of every file under `folder` (read when served)."""
        files = {
            p.relative_to(folder).as_posix(): p
            for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.startswith(".")
        }
        return self.commit(repo_id, files, branch)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes | Path]:
        repo = self.repos[repo_id]
        return repo.commits[repo.refs.get(revision, revision)]

    def _hashes_of(self, sha: str, path: str, src: bytes | Path) -> tuple[str, str, int]:
        """(git blob sha1, sha256, size) of a file, computed once."""
        key = (sha, path)
        if key not in self._hashes:
            data = _bytes(src)
            blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            self._hashes[key] = (blob, hashlib.sha256(data).hexdigest(), len(data))
        return self._hashes[key]

    def count(self, method: str | None = None, contains: str = "") -> int:
        """How many logged requests match."""
        return sum((method is None or m == method) and contains in p for m, p in list(self.log))


class _Error(Exception):
    def __init__(self, status: int, code: str | None = None, message: str = "") -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _is_lfs(path: str) -> bool:
    return path.endswith(LFS_SUFFIXES)


class Handler(BaseHTTPRequestHandler):
    hub: Hub  # set on the subclass that `serve` makes
    cdn: str = ""  # the LFS server's URL, likewise (empty: this server's own)

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    # ------------------------------------------------------------- plumbing

    @property
    def base(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def _reply(
        self,
        status: int,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._reply(status, json.dumps(obj).encode(), headers)

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _dispatch(self) -> None:
        path = urlsplit(self.path).path
        with self.hub.lock:
            self.hub.log.append((self.command, path))
        try:
            self._route(path)
        except _Error as e:
            headers = {"X-Error-Message": e.message or e.code or "error"}
            if e.code:
                headers["X-Error-Code"] = e.code
            self._json(e.status, {"error": e.message or e.code}, headers)

    do_GET = do_HEAD = do_POST = do_PUT = _dispatch

    def _repo(self, repo_id: str) -> Repo:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            raise _Error(404, "RepoNotFound", "Repository not found")
        return repo

    def _commit(self, repo: Repo, revision: str) -> str:
        revision = unquote(revision)
        sha = repo.refs.get(revision, revision)
        if sha not in repo.commits:
            raise _Error(404, "RevisionNotFound", "Invalid rev id: " + revision)
        return sha

    # ------------------------------------------------------------- routes

    def _route(self, path: str) -> None:
        parts = [unquote(p) for p in path.strip("/").split("/")]
        m = self.command
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo_id, rest = "/".join(parts[2:4]), parts[4:]
            if m == "GET" and not rest:
                return self._info(repo_id, "main")
            if m == "GET" and rest[0] == "revision" and len(rest) == 2:
                return self._info(repo_id, rest[1])
            if m == "GET" and rest[0] == "tree" and len(rest) >= 2:
                return self._tree(repo_id, rest[1], "/".join(rest[2:]))
            if m == "POST" and rest[0] == "preupload" and len(rest) == 2:
                return self._preupload(repo_id, rest[1])
            if m == "POST" and rest[0] == "commit" and len(rest) == 2:
                return self._commit_ndjson(repo_id, rest[1])
        if parts == ["api", "repos", "create"] and m == "POST":
            return self._create()
        if parts == ["api", "validate-yaml"] and m == "POST":
            return self._validate_yaml()
        if len(parts) == 2 and parts[0] == "lfs" and m in ("GET", "HEAD"):
            return self._lfs_get(parts[1])
        if len(parts) == 2 and parts[0] == "lfs-upload" and m == "PUT":
            return self._lfs_put(parts[1])
        if (
            len(parts) == 6
            and parts[1].endswith(".git")
            and parts[2:]
            == [
                "info",
                "lfs",
                "objects",
                "batch",
            ]
        ):
            return self._lfs_batch(f"{parts[0]}/{parts[1][:-4]}")
        if len(parts) >= 5 and parts[2] == "resolve" and m in ("GET", "HEAD"):
            return self._resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]))
        raise _Error(404, None, f"no route {m} {path}")

    def _info(self, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_id)
        sha = self._commit(repo, revision)
        files = repo.commits[sha]
        self._json(
            200,
            {
                "id": repo_id,
                "modelId": repo_id,
                "sha": sha,
                "private": repo.private,
                "gated": "auto" if repo.gated else False,
                "disabled": False,
                "tags": [],
                "siblings": [{"rfilename": p} for p in sorted(files)],
            },
        )

    def _tree(self, repo_id: str, revision: str, prefix: str) -> None:
        repo = self._repo(repo_id)
        sha = self._commit(repo, revision)
        out = []
        for p, src in sorted(repo.commits[sha].items()):
            if prefix and not p.startswith(prefix.rstrip("/") + "/"):
                continue
            blob, sha256, size = self.hub._hashes_of(sha, p, src)
            item: dict[str, Any] = {"type": "file", "oid": blob, "size": size, "path": p}
            if _is_lfs(p):
                item["lfs"] = {"oid": sha256, "size": size, "pointerSize": 134}
            out.append(item)
        self._json(200, out)

    def _resolve(self, repo_id: str, revision: str, path: str) -> None:
        repo = self._repo(repo_id)
        if repo.gated:
            raise _Error(403, "GatedRepo", "Access to model is restricted")
        sha = self._commit(repo, revision)
        src = repo.commits[sha].get(path)
        if src is None:
            raise _Error(404, "EntryNotFound", "Entry not found")
        blob, sha256, size = self.hub._hashes_of(sha, path, src)
        if _is_lfs(path):
            with self.hub.lock:
                self.hub.lfs.setdefault(sha256, src)
            headers = {
                "X-Repo-Commit": sha,
                "X-Linked-Etag": f'"{sha256}"',
                "X-Linked-Size": str(size),
                "ETag": f'"{blob}"',
                "Location": f"{self.cdn or self.base}/lfs/{sha256}",
            }
            return self._reply(302, b"", headers)
        headers = {"X-Repo-Commit": sha, "ETag": f'"{blob}"', "Content-Length": str(size)}
        body = _bytes(src) if self.command == "GET" else b""
        self._reply(200, body, headers, "application/octet-stream")

    def _lfs_get(self, oid: str) -> None:
        src = self.hub.lfs.get(oid)
        if src is None:
            raise _Error(404, None, "no such LFS object")
        data = _bytes(src)
        self._reply(
            200,
            data,
            {"Content-Length": str(len(data)), "ETag": f'"{oid}"'},
            "application/octet-stream",
        )

    # ------------------------------------------------------------- upload

    def _create(self) -> None:
        req = json.loads(self._body() or b"{}")
        name, org = req.get("name"), req.get("organization")
        repo_id = f"{org}/{name}" if org else f"user/{name}"
        url = f"{self.base}/{repo_id}"
        if org == "readonly":  # a namespace this client may not write to
            raise _Error(
                403, None, "You don't have the rights to create a model under this namespace"
            )
        with self.hub.lock:
            if repo_id in self.hub.repos:
                return self._json(409, {"error": "You already created this model repo", "url": url})
            self.hub.commit(repo_id, {".gitattributes": b"*.safetensors filter=lfs\n"})
            self.hub.repos[repo_id].private = bool(req.get("private"))
        self._json(200, {"url": url, "name": repo_id})

    def _validate_yaml(self) -> None:
        import yaml

        content = json.loads(self._body())["content"]
        errors = []
        if content.startswith("---\n"):
            front = content[4:].split("\n---", 1)[0]
            try:
                meta = yaml.safe_load(front)
            except yaml.YAMLError as e:
                meta, errors = None, [{"message": f"invalid YAML: {e}"}]
            if not errors and not isinstance(meta, dict):
                errors = [{"message": "metadata must be a mapping"}]
        status = 400 if errors else 200
        self._json(status, {"errors": errors, "warnings": []})

    def _preupload(self, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_id)
        sha = self._commit(repo, revision)
        req = json.loads(self._body())
        files = []
        for f in req["files"]:
            mode = "lfs" if _is_lfs(f["path"]) and f["size"] > 0 else "regular"
            files.append({"path": f["path"], "uploadMode": mode, "shouldIgnore": False})
        self._json(200, {"files": files, "commitOid": sha})

    def _lfs_batch(self, repo_id: str) -> None:
        self._repo(repo_id)
        req = json.loads(self._body())
        objects = []
        for o in req["objects"]:
            item: dict[str, Any] = {"oid": o["oid"], "size": o["size"]}
            if o["oid"] not in self.hub.lfs:
                href = f"{self.base}/lfs-upload/{o['oid']}"
                item["actions"] = {"upload": {"href": href, "header": {}}}
            objects.append(item)
        body = json.dumps({"transfer": "basic", "objects": objects}).encode()
        self._reply(200, body, content_type="application/vnd.git-lfs+json")

    def _lfs_put(self, oid: str) -> None:
        data = self._body()
        if hashlib.sha256(data).hexdigest() != oid:
            raise _Error(400, None, "content does not match its oid")
        with self.hub.lock:
            self.hub.lfs[oid] = data
        self._reply(200, b"{}")

    def _commit_ndjson(self, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_id)
        branch = unquote(revision)
        parent = self._commit(repo, branch)
        files = dict(repo.commits[parent])
        for line in self._body().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                if value["oid"] not in self.hub.lfs:
                    raise _Error(400, None, f"LFS object {value['oid']} was not uploaded")
                files[value["path"]] = self.hub.lfs[value["oid"]]
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key != "header":
                raise _Error(400, None, f"unsupported commit item {key}")
        with self.hub.lock:
            sha = self.hub.commit(repo_id, files, branch)
        url = f"{self.base}/{repo_id}/commit/{sha}"
        self._json(200, {"commitUrl": url, "commitOid": sha, "pullRequestUrl": None})


@dataclass
class Server:
    hub: Hub
    httpd: ThreadingHTTPServer
    thread: threading.Thread
    cdn: ThreadingHTTPServer | None = None
    cdn_thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def close(self) -> None:
        for httpd, thread in ((self.httpd, self.thread), (self.cdn, self.cdn_thread)):
            if httpd is not None and thread is not None:
                httpd.shutdown()
                httpd.server_close()
                thread.join(timeout=10)


def _start(handler: type[Handler]) -> tuple[ThreadingHTTPServer, threading.Thread]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    return httpd, thread


def serve(hub: Hub | None = None) -> Server:
    """Start a server for `hub` on 127.0.0.1 (a free port), and its LFS server (another
    free port), each in a daemon thread."""
    hub = hub or Hub()
    cdn, cdn_thread = _start(type("CdnHandler", (Handler,), {"hub": hub}))
    host, port = cdn.server_address[:2]
    handler = type("BoundHandler", (Handler,), {"hub": hub, "cdn": f"http://{host}:{port}"})
    httpd, thread = _start(handler)
    return Server(hub, httpd, thread, cdn, cdn_thread)


# ------------------------------------------------------------------ the client side


def hf_env(server: Server, hf_home: Path, **extra: str) -> dict[str, str]:
    """The environment of a client of `server` with its cache in `hf_home` (no token, no
    Xet, no telemetry), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(
        HF_ENDPOINT=server.url,
        HF_HOME=str(hf_home),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_ETAG_TIMEOUT="5",
        HF_HUB_DOWNLOAD_TIMEOUT="10",
        PYTHONPATH=str(ROOT),
    )
    env.update(extra)
    env.pop("HF_TOKEN", None)
    return env


# Resolves each (id, revision) of argv[1] (JSON) and prints one JSON line per id: the
# record, or the error's class and message; whether the converter ran is also printed.
RESOLVE = """
import json, sys
from cosyvoice2.errors import CosyVoiceError
from cosyvoice2.hub import locate
out = []
for model, revision in json.loads(sys.argv[1]):
    try:
        out.append(locate(model, revision).record())
    except CosyVoiceError as e:
        out.append({"error": type(e).__name__, "message": str(e)})
print(json.dumps({"results": out, "converted": "cosyvoice2.convert" in sys.modules}))
"""


def client(code: str, env: dict[str, str], *args: str) -> dict:
    """Run `code` in a fresh interpreter (this one's) with `env`; its last stdout line as JSON."""
    run = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def resolve_all(env: dict[str, str], *models: str | tuple[str, str | None]) -> dict:
    """`RESOLVE` of each model (an id, or an (id, revision) pair) in one client."""
    pairs = [(m, None) if isinstance(m, str) else m for m in models]
    return client(RESOLVE, env, json.dumps(pairs))


def synth(path: Path | str) -> Any:
    """A short cross-lingual utterance of the model at `path` (fixed seed), as a numpy array."""
    import numpy as np

    import cosyvoice2

    model = cosyvoice2.load(path)
    prompt = (0.1 * np.sin(np.arange(32000) * 0.08)).astype(np.float32)
    out = list(model.inference_cross_lingual("Hello.", (prompt, 16000), n_timesteps=2, seed=1))
    return np.concatenate([np.array(o["tts_speech"]) for o in out], axis=1)


def resolved_once(server: Server, hf_home: Path, repo: str) -> dict:
    """`repo` resolved once into `hf_home`: its record, the server's log of it, the output."""
    before = len(server.hub.log)
    out = resolve_all(hf_env(server, hf_home), repo)
    return {"record": out["results"][0], "log": server.hub.log[before:], "out": out}
