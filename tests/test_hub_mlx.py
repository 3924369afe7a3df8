"""Hub ids of MLX repos (`cosyvoice2.hub`) without torch, against a local hub (tests/hub_server.py).

tests/test_hub.py needs the official synthetic dir (torch); this file needs only the
torch-free tiny MLX dir (`mlx_tiny_dir`), so it runs wherever the package does, with
whichever huggingface_hub is installed (0.x on requests, 1.x and later on httpx). As
there, nothing is mocked: the real client, in a fresh subprocess per call, talks HTTP
to `tests.hub_server` serving the tiny MLX dir as an MLX repo.
"""

from __future__ import annotations

import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.hub_server import (
    Hub,
    Server,
    client,
    hf_env,
    resolve_all,
    resolved_once,
    serve,
    synth,
)

MLX = "mlx-community/cosyvoice2-tiny-mlx"
UPLOADED = "me/cosyvoice2-tiny-mlx"


@pytest.fixture(scope="module")
def server(mlx_tiny_dir: Path) -> Iterator[Server]:
    hub = Hub()
    hub.add_folder(MLX, mlx_tiny_dir)
    s = serve(hub)
    yield s
    s.close()


@pytest.fixture(scope="module")
def first(server: Server, hf_home: Path) -> dict:
    """The MLX repo resolved once into `hf_home` (downloaded); the server log of it."""
    return resolved_once(server, hf_home, MLX)


def closed_port_url() -> str:
    """An endpoint nothing listens on: a port the OS just handed out, closed again."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def local_files(d: Path) -> dict[str, bytes]:
    return {
        p.relative_to(d).as_posix(): p.read_bytes()
        for p in sorted(d.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }


def assert_one_line_error(result: dict, start: str, part: str = "") -> None:
    assert result.get("error") == "HubError", result
    assert result["message"].startswith(start) and part in result["message"], result
    assert "\n" not in result["message"], result


def test_an_mlx_id_downloads_and_loads_like_the_local_dir(
    first: dict, server: Server, mlx_tiny_dir: Path
) -> None:
    rec = first["record"]
    assert rec.get("kind") == "mlx", rec
    assert rec["repo_id"] == MLX and rec["revision"] == "main"
    assert rec["commit"] == server.hub.repos[MLX].refs["main"]
    path = Path(rec["path"])
    assert local_files(path) == local_files(mlx_tiny_dir)
    assert not first["out"]["converted"]
    assert any(p.startswith("/lfs/") for _, p in first["log"])  # the weights came over HTTP
    assert np.array_equal(synth(path), synth(mlx_tiny_dir))


def test_a_second_resolve_downloads_nothing(first: dict, server: Server, hf_home: Path) -> None:
    before = len(server.hub.log)
    out = resolve_all(hf_env(server, hf_home), MLX, (MLX, first["record"]["commit"]))
    log = server.hub.log[before:]
    assert [r.get("path") for r in out["results"]] == [first["record"]["path"]] * 2, out
    # only metadata: no file asked for, no LFS object fetched
    assert log and all(m == "GET" and p.startswith(f"/api/models/{MLX}") for m, p in log), log


def test_offline_serves_the_cache_and_fails_cleanly_without_it(
    first: dict, server: Server, hf_home: Path, tmp_path: Path
) -> None:
    before = len(server.hub.log)
    out = resolve_all(hf_env(server, hf_home, HF_HUB_OFFLINE="1"), MLX)
    rec = out["results"][0]
    assert rec.get("kind") == "mlx" and rec["path"] == first["record"]["path"], rec
    assert rec["commit"] == first["record"]["commit"]
    assert len(server.hub.log) == before  # offline: no request at all
    out = resolve_all(hf_env(server, tmp_path / "empty", HF_HUB_OFFLINE="1"), MLX)
    assert_one_line_error(out["results"][0], f"{MLX}: not in the cache", "HF_HUB_OFFLINE")
    assert len(server.hub.log) == before


def test_an_unreachable_hub_serves_the_cache_or_fails_cleanly(
    first: dict, server: Server, hf_home: Path, tmp_path: Path
) -> None:
    url = closed_port_url()
    out = resolve_all(hf_env(server, hf_home, HF_ENDPOINT=url), MLX)
    rec = out["results"][0]
    assert rec.get("kind") == "mlx" and rec["path"] == first["record"]["path"], rec
    out = resolve_all(hf_env(server, tmp_path / "empty", HF_ENDPOINT=url), MLX)
    assert_one_line_error(out["results"][0], f"{MLX}: not in the cache", "cannot be reached")


def test_unknown_repo_and_bad_revision_are_one_line_errors(server: Server, tmp_path: Path) -> None:
    out = resolve_all(hf_env(server, tmp_path), "nobody/nothing", (MLX, "no-such-branch"))
    unknown, revision = out["results"]
    assert_one_line_error(unknown, "nobody/nothing: ", "has no such repository")
    assert_one_line_error(revision, f"{MLX}: ", "revision 'no-such-branch' not found")
    assert not (tmp_path / "hub").exists() or not any((tmp_path / "hub").rglob("*.safetensors"))


UPLOAD = """
import json, sys
from cosyvoice2.hub import upload, write_model_card
write_model_card(sys.argv[1], repo_id=sys.argv[2])
print(json.dumps({"url": upload(sys.argv[1], sys.argv[2], commit_message="tiny")}))
"""


def test_an_uploaded_dir_with_its_card_resolves_and_loads(
    server: Server, mlx_tiny_dir: Path, tmp_path: Path
) -> None:
    src = tmp_path / "tiny"
    shutil.copytree(mlx_tiny_dir, src)
    out = client(UPLOAD, hf_env(server, tmp_path / "hf-up"), str(src), UPLOADED)
    sha = server.hub.repos[UPLOADED].refs["main"]
    assert out["url"] == f"{server.url}/{UPLOADED}/commit/{sha}", out
    files = {k: v if isinstance(v, bytes) else Path(v).read_bytes()
             for k, v in server.hub.files(UPLOADED).items()}  # fmt: skip
    uploaded = local_files(src)
    assert "README.md" in uploaded and {k: files[k] for k in uploaded} == uploaded
    card = files["README.md"].decode()
    assert "library_name: cosyvoice2-mlx" in card.split("---\n")[1]
    assert f'cosyvoice2.load("{UPLOADED}")' in card
    rec = resolve_all(hf_env(server, tmp_path / "hf-down"), UPLOADED)["results"][0]
    assert rec.get("kind") == "mlx" and rec["commit"] == sha, rec
    assert local_files(Path(rec["path"])) == uploaded
    import cosyvoice2

    model = cosyvoice2.load(rec["path"])
    assert model.weights_label == cosyvoice2.load(mlx_tiny_dir).weights_label
