"""Hugging Face hub ids in and out (`cosyvoice2.hub`), against a local hub (tests/hub_server.py).

No mocking of huggingface_hub: the real client talks HTTP to `tests.hub_server`, which
serves the tiny synthetic official dir as an official repo, the torch-free tiny MLX
dir as an MLX repo (with a second branch), a repo that is not CosyVoice2 and a gated
one. huggingface_hub reads its environment (`HF_ENDPOINT`, `HF_HOME`,
`HF_HUB_OFFLINE`) when imported, so every client call runs in a fresh subprocess
with its environment set (`client`). The official repo is converted once per
module (`official`), and the tests after it reuse that cache.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
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

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL = "FunAudioLLM/CosyVoice2-tiny"
MLX = "mlx-community/cosyvoice2-tiny-mlx"
OTHER = "someone/bert-tiny"
GATED = "someone/gated-cosyvoice2"


@pytest.fixture(scope="module")
def server(tiny_official_dir: Path, mlx_tiny_dir: Path) -> Iterator[Server]:
    hub = Hub()
    hub.add_folder(OFFICIAL, tiny_official_dir)
    official = dict(hub.files(OFFICIAL))
    # a file the converter does not read: never downloaded
    official["extra/notes.bin"] = b"\0" * 1000
    hub.commit(OFFICIAL, official)
    hub.add_folder(MLX, mlx_tiny_dir)
    mlx_v2 = {**hub.files(MLX), "NOTES.md": b"second revision\n"}
    hub.commit(MLX, mlx_v2, branch="v2")
    hub.commit(OTHER, {"config.json": b'{"model_type": "bert"}', "pytorch_model.bin": b"x"})
    hub.commit(GATED, hub.files(MLX))
    hub.repos[GATED].gated = True
    s = serve(hub)
    yield s
    s.close()


@pytest.fixture(scope="module")
def official(server: Server, hf_home: Path) -> dict:
    """The official repo resolved once (downloaded, converted); the server log before it."""
    return resolved_once(server, hf_home, OFFICIAL)


def test_official_repo_is_downloaded_and_converted_on_first_use(
    official: dict, server: Server, hf_home: Path, tiny_mlx_dir: Path
) -> None:
    rec = official["record"]
    commit = server.hub.repos[OFFICIAL].refs["main"]
    want = hf_home / "cosyvoice2-mlx" / "converted" / "FunAudioLLM--CosyVoice2-tiny" / commit
    assert rec["kind"] == "official" and rec["commit"] == commit and rec["revision"] == "main"
    assert Path(rec["path"]) == want and (want / "config.json").is_file()
    assert official["out"]["converted"]
    asked = {
        p.split("/resolve/", 1)[1].split("/", 1)[1] for _, p in official["log"] if "/resolve/" in p
    }
    assert "extra/notes.bin" not in asked and "llm.pt" in asked
    assert sum(p.startswith("/lfs/") for _, p in official["log"]) == 5  # .pt and .onnx
    leftovers = [n for n in os.listdir(want.parent) if ".staging-" in n or n.endswith(".backup")]
    assert leftovers == []
    for name in ("llm", "flow", "hift", "campplus", "speech_tokenizer"):
        f = f"{name}.safetensors"
        assert (want / f).read_bytes() == (tiny_mlx_dir / f).read_bytes(), f
    assert np.array_equal(synth(want), synth(tiny_mlx_dir))


def test_second_resolve_neither_downloads_nor_converts(
    official: dict, server: Server, hf_home: Path
) -> None:
    config = Path(official["record"]["path"]) / "config.json"
    stamp = config.stat().st_mtime_ns, config.stat().st_ino
    before = len(server.hub.log)
    out = resolve_all(hf_env(server, hf_home), OFFICIAL, (OFFICIAL, official["record"]["commit"]))
    log = server.hub.log[before:]
    assert [r["path"] for r in out["results"]] == [official["record"]["path"]] * 2
    assert not out["converted"]
    assert not [p for m, p in log if "/resolve/" in p or p.startswith("/lfs")], log
    assert (config.stat().st_mtime_ns, config.stat().st_ino) == stamp


def test_offline_serves_the_cache_and_fails_cleanly_without_it(
    official: dict, server: Server, hf_home: Path, tmp_path: Path
) -> None:
    before = len(server.hub.log)
    resolve_all(hf_env(server, hf_home), MLX)  # fill the cache with the MLX repo too
    online = len(server.hub.log)
    for extra in ({"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}):
        out = resolve_all(hf_env(server, hf_home, **extra), OFFICIAL, MLX)
        assert out["results"][0]["path"] == official["record"]["path"], out
        assert out["results"][1]["kind"] == "mlx" and Path(out["results"][1]["path"]).is_dir()
        assert not out["converted"]
    assert online > before and len(server.hub.log) == online  # offline: no request at all
    for extra in ({"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}):
        out = resolve_all(hf_env(server, tmp_path / "empty", **extra), OFFICIAL)
        err = out["results"][0]
        assert err["error"] == "HubError" and "\n" not in err["message"], err
        assert err["message"].startswith(f"{OFFICIAL}: not in the cache"), err
    assert (
        "HF_HUB_OFFLINE"
        in resolve_all(hf_env(server, tmp_path / "empty", HF_HUB_OFFLINE="1"), OFFICIAL)["results"][
            0
        ]["message"]
    )


def test_each_revision_has_its_own_cache_entry(server: Server, hf_home: Path) -> None:
    refs = server.hub.repos[MLX].refs
    out = resolve_all(hf_env(server, hf_home), MLX, (MLX, "v2"), (MLX, refs["v2"]))
    main, v2, pinned = out["results"]
    assert (main["commit"], v2["commit"]) == (refs["main"], refs["v2"])
    assert main["path"] != v2["path"] and v2["path"] == pinned["path"]
    assert (Path(v2["path"]) / "NOTES.md").is_file()
    assert not (Path(main["path"]) / "NOTES.md").exists()


def test_errors_are_one_line_and_name_the_id(server: Server, tmp_path: Path) -> None:
    out = resolve_all(
        hf_env(server, tmp_path),
        "nobody/nothing",
        OTHER,
        (MLX, "no-such-branch"),
        GATED,
        "not an id!",
        "a/b/c",
    )
    want = [
        ("nobody/nothing", "has no such repository"),
        (OTHER, "not a CosyVoice2 repo"),
        (MLX, "revision 'no-such-branch' not found"),
        (GATED, "gated"),
        ("no such model dir or hub id: not an id!", ""),
        ("no such model dir or hub id: a/b/c", ""),
    ]
    for got, (start, part) in zip(out["results"], want):
        assert got.get("error") == "HubError", got
        assert got["message"].startswith(start) and part in got["message"], got
        assert "\n" not in got["message"]
    assert not (tmp_path / "hub").exists() or not any((tmp_path / "hub").rglob("*.pt"))


def test_convert_uploads_with_a_model_card_and_the_upload_resolves(
    official: dict, server: Server, hf_home: Path, tmp_path: Path
) -> None:
    repo = "me/cosyvoice2-tiny-mlx"
    out_dir = tmp_path / "out"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "cosyvoice2",
            "convert",
            OFFICIAL,
            str(out_dir),
            "--upload-repo",
            repo,
            "--commit-message",
            "tiny",
        ],  # fmt: skip
        cwd=ROOT,
        env=hf_env(server, hf_home),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    files = server.hub.files(repo)
    local = {p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_file()}
    assert local <= set(files) and "README.md" in local and "llm.safetensors" in local
    for name in local:
        data = files[name]
        data = data if isinstance(data, bytes) else Path(data).read_bytes()
        assert data == (out_dir / name).read_bytes(), name
    card = files["README.md"].decode()
    front = card.split("---\n")[1]
    assert "library_name: cosyvoice2-mlx" in front and f"base_model: {OFFICIAL}" in front
    assert "- mlx\n" in front and "- text-to-speech\n" in front
    assert f'cosyvoice2.load("{repo}")' in card and f"cosyvoice2 serve --model {repo}" in card
    assert "| llm | fp32 |" in card and "| flow | fp32 |" in card
    rec = resolve_all(hf_env(server, tmp_path / "hf2"), repo)["results"][0]
    assert rec["kind"] == "mlx", rec
    import cosyvoice2

    assert cosyvoice2.load(rec["path"]).weights_label == "synthetic"


def test_a_refused_upload_is_a_one_line_error(
    official: dict, server: Server, tmp_path: Path
) -> None:
    code = """
import json, sys
from cosyvoice2.errors import CosyVoiceError
from cosyvoice2.hub import upload
try:
    upload(sys.argv[1], "readonly/cosyvoice2")
    print(json.dumps({"error": None}))
except CosyVoiceError as e:
    print(json.dumps({"error": type(e).__name__, "message": str(e)}))
"""
    out = client(code, hf_env(server, tmp_path), official["record"]["path"])
    assert out["error"] == "HubError", out
    assert out["message"].startswith("readonly/cosyvoice2: the hub refused the upload (403)")
    assert "readonly/cosyvoice2" not in server.hub.repos


def test_bench_and_eval_take_an_id(official: dict, server: Server, hf_home: Path) -> None:
    code = """
import json, sys
from bench.cli import _model_options
from bench.runner import RunOptions
from eval.cli import _model_dir
opts = RunOptions(target_options={"size": "tiny", **_model_options(sys.argv[1], None)})
print(json.dumps({"bench": opts.to_dict()["target_options"], "eval": str(_model_dir(sys.argv[1]))}))
"""
    out = client(code, hf_env(server, hf_home), OFFICIAL)
    rec = official["record"]
    assert out["bench"]["model"] == rec["path"] == out["eval"]
    hub_rec = out["bench"]["model_hub"]
    assert (hub_rec["repo_id"], hub_rec["revision"], hub_rec["commit"]) == (
        OFFICIAL,
        "main",
        rec["commit"],
    )


def test_a_local_dir_never_touches_huggingface_hub(
    mlx_tiny_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`resolve` of a local path (existing or not) imports nothing of huggingface_hub."""
    from cosyvoice2.hub import resolve

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # any import of it now fails
    assert resolve(mlx_tiny_dir) == mlx_tiny_dir
    assert resolve(str(mlx_tiny_dir)) == mlx_tiny_dir
    assert resolve(str(mlx_tiny_dir / "missing")) == mlx_tiny_dir / "missing"


def test_the_file_names_are_the_model_dirs_and_the_converters() -> None:
    """`hub` keeps its own copy of the config file's name (it imports `model_dir` only when
    it needs the model); the official file list is one (`config.OFFICIAL_FILES`)."""
    from cosyvoice2 import convert, hub, model_dir

    assert hub.CONFIG_FILE == model_dir.CONFIG_FILE
    assert hub.OFFICIAL_FILES is convert.OFFICIAL_FILES


def test_the_card_states_the_tests_tolerances() -> None:
    """Each bound the model card states is the value of the named test constant."""
    from cosyvoice2.hub import PARITY_TOLERANCES

    for _, bound, file, name in PARITY_TOLERANCES:
        tree = ast.parse((ROOT / file).read_text(encoding="utf-8"))
        values = [
            ast.literal_eval(node.value)
            for node in tree.body
            if isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == name for t in node.targets)
        ]
        assert values == [float(bound)], (file, name, values)
