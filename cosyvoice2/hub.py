"""Models from the Hugging Face hub: an id where a model dir is taken, and uploads.

`resolve(model, revision)` turns what a user gives as a model into an MLX model dir:

- an existing local path is used as is (a `Path` is always taken as a local path);
- a string shaped like a hub repo id (`owner/name`, checked with huggingface_hub's
  own validator) is looked up on the hub (`HF_ENDPOINT`, `HF_HOME`, `HF_TOKEN` and
  `HF_HUB_OFFLINE` are honoured, as huggingface_hub reads them), at `revision`
  (a branch, tag or commit; default `main`):
  - a repo holding an MLX model dir (a `config.json` and `*.safetensors`, none of
    the official files) is downloaded into the hub cache and used as is;
  - a repo in the official CosyVoice2 layout (`OFFICIAL_FILES`: the release and
    fine-tunes saved like it) has only the files the converter reads downloaded,
    is converted once, and the converted dir is kept under
    `<HF_HOME>/cosyvoice2-mlx/converted/<owner>--<name>/<commit>/` (written
    atomically with `cosyvoice2.files.staged_dir`: a killed conversion leaves
    nothing half-written), reused by every later call, also offline;
- a missing path that can only be a path (absolute, or starting with `.` or `~`) is
  left to `load`, which says "model dir not found"; any other string is a one-line
  `HubError` ("no such model dir or hub id"), as is every failure on the hub's side.

Offline (`HF_HUB_OFFLINE=1`, or the hub unreachable) a repo is served from the
cache: the converted dir, or the downloaded snapshot. Which commit a branch or tag
named last time is kept beside the converted dirs (`refs/`), so an official repo
converted once needs neither the network nor its downloaded files again.

This module imports huggingface_hub (and the model code) only when it needs them:
resolving a local path never touches huggingface_hub.

`write_model_card` and `upload` are the way out: `cosyvoice2 convert ... --upload-repo
ID` writes a model card (`README.md`) into the converted dir and uploads the dir.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cosyvoice2.config import OFFICIAL_FILES
from cosyvoice2.errors import CosyVoiceError
from cosyvoice2.files import backup_path

try:
    import fcntl
except ImportError:  # not POSIX: conversions of one repo are not serialised
    fcntl = None  # type: ignore[assignment]

# The official layout (what `cosyvoice2.convert` reads: `OFFICIAL_FILES` plus the optional
# files it looks at): the only files downloaded from an official repo.
OFFICIAL_OPTIONAL = ("CosyVoice-BlankEN/tokenizer_config.json", "spk2info.pt", "synthetic.json")
OFFICIAL_MARKERS = ("cosyvoice2.yaml", "llm.pt", "flow.pt", "hift.pt")
CONFIG_FILE = "config.json"  # `cosyvoice2.model_dir.CONFIG_FILE`, without importing the model
CACHE_DIR = "cosyvoice2-mlx"  # under HF_HOME
DEFAULT_REVISION = "main"
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_MAX_REF_BYTES = 64

# The parity the tests hold this port to against the official PyTorch code, as the model
# card states it: (what, bound, where the tests keep it). tests/test_hub.py checks each
# number against the named constant.
PARITY_TOLERANCES = (
    ("waveform, every mode end to end (max abs)", "1e-3", "tests/test_pipeline_parity.py", "TOL"),
    ("speech LM logits (max abs, x their spread)", "1e-4", "tests/test_llm_parity.py", "LOGIT_TOL"),
    ("flow mel, velocity, encoder (max abs)", "1e-3", "tests/test_flow_parity.py", "TOL"),
    ("HiFT waveform (max abs)", "1e-3", "tests/test_hift.py", "WAV_TOL"),
    ("prompt features (max abs)", "1e-4", "tests/test_frontend_parity.py", "FEAT_TOL"),
    ("speaker x-vector (max abs)", "1e-4", "tests/test_frontend_parity.py", "XVEC_TOL"),
)


class HubError(CosyVoiceError):
    """A model id that cannot be resolved or uploaded: not a local dir nor a hub id, a
    repository or revision the hub does not have, a repository that is not CosyVoice2,
    a gated one, the network down with nothing cached, or an upload the hub refused."""


@dataclasses.dataclass(frozen=True)
class Resolved:
    """Where a model came from. `path` is the MLX model dir to load; for a hub id,
    `repo_id`, the `revision` asked for, the `commit` it named, `kind` (`mlx` or
    `official`) and, for an official repo, `source`: its downloaded snapshot (absent
    when the converted dir was found offline without it)."""

    path: Path
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None
    kind: str = "local"
    source: Path | None = None

    def record(self) -> dict[str, Any]:
        """A JSON-able record (for results files)."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        return {k: str(v) if isinstance(v, Path) else v for k, v in out.items()}


def resolve(model: str | Path, revision: str | None = None) -> Path:
    """The MLX model dir for `model`: a local path as is, or a hub id downloaded (and
    converted once, for an official repo); see the module docstring."""
    return locate(model, revision).path


def locate(model: str | Path, revision: str | None = None) -> Resolved:
    """`resolve`, with where the model came from (the id, revision and commit)."""
    text = str(model)
    if hub_id(model) is None:
        if _local(model):
            if revision is not None:
                raise HubError(
                    f"{text}: a local path has no revision ({revision!r} is for hub ids)"
                )
            return Resolved(Path(model))  # a missing path: `load` says "model dir not found"
        raise HubError(f"no such model dir or hub id: {text}")
    if revision is not None and (not isinstance(revision, str) or not revision.strip()):
        raise HubError(f"{text}: revision must be a branch, tag or commit, got {revision!r}")
    return _from_hub(text, revision or DEFAULT_REVISION)


def _local(model: str | Path) -> bool:
    """Taken as a local path: a `Path`, a path that exists (or that a killed `convert` left
    mid-swap, see `cosyvoice2.files`), or a string that can only be a path (absolute, or
    starting with `.` or `~`)."""
    text = str(model)
    if isinstance(model, Path) or os.path.lexists(text) or os.path.lexists(backup_path(text)):
        return True
    return os.path.isabs(text) or text.startswith((".", "~")) or "\\" in text


def hub_id(model: str | Path) -> str | None:
    """`model` as a hub id, or None when it is taken as a local path or is not an id."""
    if _local(model) or not isinstance(model, str) or not is_repo_id(model):
        return None
    return model


def is_repo_id(text: str) -> bool:
    """`owner/name`, valid for huggingface_hub (imports it)."""
    if text.count("/") != 1:
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def cache_root() -> Path:
    """`<HF_HOME>/cosyvoice2-mlx`: where converted official repos are kept."""
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / CACHE_DIR


def converted_dir(repo_id: str, commit: str) -> Path:
    """Where the converted dir of an official repo at `commit` is kept."""
    return cache_root() / "converted" / repo_id.replace("/", "--") / commit


def _ref_file(repo_id: str, revision: str) -> Path:
    from urllib.parse import quote

    return (
        cache_root() / "converted" / repo_id.replace("/", "--") / "refs" / quote(revision, safe="")
    )


def _read_ref(repo_id: str, revision: str) -> str | None:
    if _COMMIT.match(revision):
        return revision
    try:
        with open(_ref_file(repo_id, revision), "rb") as f:
            text = f.read(_MAX_REF_BYTES).decode("ascii", "replace").strip()
    except OSError:
        return None
    return text if _COMMIT.match(text) else None


def _write_ref(repo_id: str, revision: str, commit: str) -> None:
    if revision == commit:
        return
    path = _ref_file(repo_id, revision)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError:
        return  # best effort: without it, offline use needs the downloaded snapshot
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(commit)
        os.replace(tmp, path)
    except OSError:
        Path(tmp).unlink(missing_ok=True)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive lock on the file `path` (two processes never convert one commit twice)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# ------------------------------------------------------------------------- hub in


def _kind(repo_id: str, files: list[str]) -> str:
    """`official` or `mlx` from a repo's file list; a HubError for anything else."""
    have = set(files)
    if all(f in have for f in OFFICIAL_FILES):
        return "official"
    official = [f for f in OFFICIAL_MARKERS if f in have]
    if official:
        missing = [f for f in OFFICIAL_FILES if f not in have]
        raise HubError(
            f"{repo_id}: an incomplete official CosyVoice2 repo (has {', '.join(official)};"
            f" missing {', '.join(missing)})"
        )
    if CONFIG_FILE in have and any("/" not in f and f.endswith(".safetensors") for f in have):
        return "mlx"
    raise HubError(
        f"{repo_id}: not a CosyVoice2 repo (neither the official layout, cosyvoice2.yaml with"
        " llm.pt, flow.pt, hift.pt, nor an MLX model dir, config.json with *.safetensors)"
    )


def _hub_error(repo_id: str, revision: str, e: BaseException) -> HubError:
    """A one-line HubError naming the id and the problem of a huggingface_hub error."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(e, GatedRepoError):
        why = "a gated repository: accept its terms on the hub, then log in (HF_TOKEN)"
    elif isinstance(e, RepositoryNotFoundError):
        why = (
            f"not a local dir, and the hub ({constants.ENDPOINT}) has no such repository"
            " (or it is private: log in with HF_TOKEN)"
        )
    elif isinstance(e, RevisionNotFoundError):
        why = f"revision {revision!r} not found on the hub"
    elif isinstance(e, LocalEntryNotFoundError):
        why = f"a download failed ({_first_line(e)})"
    elif isinstance(e, HfHubHTTPError):
        status = e.response.status_code if e.response is not None else "?"
        why = f"the hub ({constants.ENDPOINT}) answered {status} ({_first_line(e)})"
    else:
        why = f"{type(e).__name__}: {_first_line(e)}"
    return HubError(f"{repo_id}: {why}")


def _first_line(e: BaseException) -> str:
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    return lines[0][:200] if lines else type(e).__name__


def _network_errors() -> tuple[type[BaseException], ...]:
    """The exceptions of an unreachable hub, whichever HTTP library huggingface_hub uses:
    requests' (huggingface_hub 0.x; OSErrors), httpx's transport errors (1.x) or httpx2's
    (2.x)."""
    import importlib

    from huggingface_hub.errors import OfflineModeIsEnabled

    errors: list[type[BaseException]] = [OSError, OfflineModeIsEnabled]
    for name in ("httpx", "httpx2"):
        try:
            errors.append(importlib.import_module(name).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _from_hub(repo_id: str, revision: str) -> Resolved:
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    if constants.HF_HUB_OFFLINE:
        return _from_cache(repo_id, revision, "HF_HUB_OFFLINE is set")
    try:
        info = HfApi().model_info(repo_id, revision=revision)
    except HfHubHTTPError as e:  # an answer from the hub (first: under 0.x it is an OSError)
        raise _hub_error(repo_id, revision, e) from None
    except _network_errors() as e:
        why = f"the hub ({constants.ENDPOINT}) cannot be reached: {type(e).__name__}"
        return _from_cache(repo_id, revision, why)
    commit = info.sha
    if not isinstance(commit, str) or not _COMMIT.match(commit):
        raise HubError(f"{repo_id}: the hub named no commit for revision {revision!r}")
    kind = _kind(repo_id, [s.rfilename for s in info.siblings or []])
    if kind == "mlx":
        snapshot = _download(repo_id, revision, None)
        return Resolved(snapshot, repo_id, revision, snapshot.name, "mlx")
    _write_ref(repo_id, revision, commit)
    dst = converted_dir(repo_id, commit)
    if (dst / CONFIG_FILE).is_file():
        return Resolved(dst, repo_id, revision, commit, "official")
    src = _download(repo_id, commit, [*OFFICIAL_FILES, *OFFICIAL_OPTIONAL])
    dst = _convert_into_cache(repo_id, src, dst)
    return Resolved(dst, repo_id, revision, commit, "official", src)


def _download(repo_id: str, revision: str, allow: list[str] | None, offline: bool = False) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(
            snapshot_download(
                repo_id, revision=revision, allow_patterns=allow, local_files_only=offline
            )
        )
    except (HfHubHTTPError, LocalEntryNotFoundError) as e:
        raise _hub_error(repo_id, revision, e) from None
    except _network_errors() as e:  # a connection lost mid-download; a full disk
        raise HubError(f"{repo_id}: download failed ({type(e).__name__}: {e})") from None


def _convert_once(repo_id: str, src: Path, dst: Path) -> Path:
    """Convert the official snapshot `src` into `dst`, unless another process did first."""
    from cosyvoice2.convert import convert

    with _lock(dst.parent / f".{dst.name}.lock"):
        if (dst / CONFIG_FILE).is_file():
            return dst
        try:
            convert(src, dst, overwrite=True)
        except CosyVoiceError as e:
            raise HubError(f"{repo_id}@{dst.name}: cannot convert ({e})") from None
    return dst


def _convert_into_cache(repo_id: str, src: Path, dst: Path) -> Path:
    try:
        return _convert_once(repo_id, src, dst)
    except OSError as e:  # an unwritable or full HF_HOME
        raise HubError(f"{repo_id}: cannot write {dst} ({type(e).__name__}: {e})") from None


def _from_cache(repo_id: str, revision: str, why: str) -> Resolved:
    """Resolve without the network: the converted dir, else the cached snapshot."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    commit = _read_ref(repo_id, revision)
    if commit is not None and (converted_dir(repo_id, commit) / CONFIG_FILE).is_file():
        return Resolved(converted_dir(repo_id, commit), repo_id, revision, commit, "official")
    from huggingface_hub import snapshot_download

    try:
        snapshot = Path(
            snapshot_download(repo_id, revision=commit or revision, local_files_only=True)
        )
    except (LocalEntryNotFoundError, OSError):
        raise HubError(
            f"{repo_id}: not in the cache (revision {revision!r}) and {why};"
            " run once online to download it"
        ) from None
    files = [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()]
    try:
        kind = _kind(repo_id, files)
    except HubError as e:
        raise HubError(f"{e} (in the cache; {why})") from None
    if kind == "mlx":
        return Resolved(snapshot, repo_id, revision, snapshot.name, "mlx")
    dst = _convert_into_cache(repo_id, snapshot, converted_dir(repo_id, snapshot.name))
    return Resolved(dst, repo_id, revision, snapshot.name, "official", snapshot)


def download_official(repo_id: str, revision: str | None = None) -> Resolved:
    """Download (only the converter's files of) an official repo; `path` is its snapshot.
    For `cosyvoice2 convert ID OUT`."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    revision = revision or DEFAULT_REVISION
    allow = [*OFFICIAL_FILES, *OFFICIAL_OPTIONAL]
    if constants.HF_HUB_OFFLINE:
        snapshot = _download(repo_id, revision, allow, offline=True)
    else:
        try:
            info = HfApi().model_info(repo_id, revision=revision)
        except HfHubHTTPError as e:
            raise _hub_error(repo_id, revision, e) from None
        except _network_errors() as e:
            raise HubError(f"{repo_id}: the hub cannot be reached ({type(e).__name__})") from None
        if _kind(repo_id, [s.rfilename for s in info.siblings or []]) != "official":
            raise HubError(f"{repo_id}: an MLX model dir already, not an official repo to convert")
        snapshot = _download(repo_id, info.sha or revision, allow)
    missing = [f for f in OFFICIAL_FILES if not (snapshot / f).is_file()]
    if missing:
        raise HubError(f"{repo_id}: not an official CosyVoice2 repo, missing {', '.join(missing)}")
    return Resolved(snapshot, repo_id, revision, snapshot.name, "official", snapshot)


# ------------------------------------------------------------------------ hub out


def _dtypes(file: Path) -> list[str]:
    """The tensor dtypes a safetensors header declares (after `check_safetensors`)."""
    from cosyvoice2.model_dir import MAX_SAFETENSORS_HEADER_BYTES, check_safetensors

    check_safetensors(file)
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(min(n, MAX_SAFETENSORS_HEADER_BYTES)).decode("utf-8"))
    return sorted({v["dtype"] for k, v in header.items() if k != "__metadata__"})


_DTYPE_NAMES = {"F32": "fp32", "F16": "fp16", "BF16": "bf16"}  # as `llm_precision_name`


def precisions(mlx_dir: Path) -> dict[str, str]:
    """Each component's precision: the speech LM's from `config.json` (`llm_precision`),
    the others' from the dtypes their weights files declare."""
    from cosyvoice2.model_dir import ModelDirError, llm_precision_name, read_config, weights_file

    meta, _ = read_config(mlx_dir)
    record = meta.get("llm_precision", {"dtype": "float32"})
    llm = llm_precision_name(record)
    q = record.get("quantization")
    if q:
        llm = f"{llm}, group size {q.get('group_size')} (the rest {record.get('dtype', 'float32')})"
    out = {"llm": llm}
    for name in ("flow", "hift", "campplus", "speech_tokenizer"):
        try:
            kinds = _dtypes(mlx_dir / weights_file(name))
        except (OSError, ValueError) as e:
            raise ModelDirError(f"{mlx_dir / weights_file(name)}: cannot read ({e})") from None
        out[name] = ", ".join(_DTYPE_NAMES.get(d, d) for d in kinds)
    return out


def model_card(
    mlx_dir: str | Path, base_model: str | None = None, repo_id: str | None = None
) -> str:
    """The model card (`README.md`) of a converted dir: front matter for the hub, then
    the source, each component's precision, the converter, the parity the tests hold
    and how to use it. `base_model`: the source's hub id (None for a local source);
    `repo_id`: the id it is uploaded as (its usage lines name it)."""
    from importlib import metadata

    from cosyvoice2.model_dir import read_config

    mlx_dir = Path(mlx_dir)
    meta, _ = read_config(mlx_dir)
    try:
        version = metadata.version("cosyvoice2-mlx")
    except metadata.PackageNotFoundError:
        version = "unknown"
    front = ["---", "library_name: cosyvoice2-mlx", "pipeline_tag: text-to-speech"]
    front += ["tags:", "- mlx", "- text-to-speech", "- cosyvoice2"]
    if base_model and is_repo_id(base_model):
        front.append(f"base_model: {base_model}")
    front.append("---")
    source = base_model or "a local official CosyVoice2 model dir"
    label = meta.get("weights", "unknown")
    rows = "\n".join(f"| {k} | {v} |" for k, v in precisions(mlx_dir).items())
    parity = "\n".join(
        f"| {what} | {bound} | `{file}` (`{name}`) |"
        for what, bound, file, name in PARITY_TOLERANCES
    )
    speakers = meta.get("speakers") or []
    speaker_line = f"\nSaved speakers: {', '.join(map(str, speakers))}.\n" if speakers else ""
    card_id = repo_id or "OWNER/NAME"
    body = f"""
# CosyVoice2-0.5B in MLX

An [MLX](https://github.com/ml-explore/mlx) model dir of CosyVoice2-0.5B for the
`cosyvoice2-mlx` package, converted from `{source}` (weights recorded as: {label}).

## Precision

| component | precision |
|---|---|
{rows}
{speaker_line}
Converter: cosyvoice2-mlx {version} (`cosyvoice2 convert`).

## Parity with the official PyTorch code

The package's tests hold its code to these bounds against the official code, both
sides run on the same synthetic weights (see `tests/` in the cosyvoice2-mlx
repository for how each is measured):

| what | bound | test |
|---|---|---|
{parity}

## Use

```sh
pip install cosyvoice2-mlx
```

```python
import cosyvoice2

model = cosyvoice2.load("{card_id}")
audio = model.generate("Hello there.", ref_audio="prompt.wav", ref_text="The prompt's words.")
```

```sh
cosyvoice2 synth --model {card_id} --text "Hello there." --prompt-wav prompt.wav \\
    --prompt-text "The prompt's words." --out hello.wav
cosyvoice2 serve --model {card_id}
```
"""
    return "\n".join(front) + "\n" + body


def write_model_card(
    mlx_dir: str | Path, base_model: str | None = None, repo_id: str | None = None
) -> Path:
    """Write `model_card` as `README.md` in `mlx_dir` (atomically)."""
    mlx_dir = Path(mlx_dir)
    text = model_card(mlx_dir, base_model, repo_id)
    path = mlx_dir / "README.md"
    fd, tmp = tempfile.mkstemp(prefix=".README.md.", dir=mlx_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def upload(
    mlx_dir: str | Path,
    repo_id: str,
    private: bool = False,
    commit_message: str | None = None,
) -> str:
    """Upload the MLX model dir `mlx_dir` to the hub repo `repo_id` (created if missing;
    the token from `HF_TOKEN` or `huggingface-cli login`). Returns the commit's URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from cosyvoice2.model_dir import read_config

    if not is_repo_id(repo_id):
        raise HubError(f"upload repo must be a hub id OWNER/NAME, got {repo_id!r}")
    read_config(Path(mlx_dir))  # a complete model dir, or a ModelDirError
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(mlx_dir),
            commit_message=commit_message or "Upload CosyVoice2 MLX model dir",
            ignore_patterns=[".*", "**/.*"],
        )
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status in (401, 403):
            raise HubError(
                f"{repo_id}: the hub refused the upload ({status}): log in with a write token"
                " (HF_TOKEN or `huggingface-cli login`)"
            ) from None
        raise _hub_error(repo_id, DEFAULT_REVISION, e) from None
    except (OSError, ValueError) as e:  # connection errors, a refused README front matter
        raise HubError(f"{repo_id}: upload failed ({type(e).__name__}: {_first_line(e)})") from None
    return str(info.commit_url)
