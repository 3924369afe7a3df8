"""mlx-audio-plus, another MLX port of CosyVoice2, as a peer bench target on the same work.

mlx-audio-plus 0.1.8 installs the package `mlx_audio` (it replaces mlx-audio) and pins
mlx-lm below 0.30, so it runs in its own virtualenv, made on first use under
`<cache root>/bench/venvs/mlx-audio-plus-0.1.8/` (`python -m venv`, then pip):
`mlx-audio-plus` itself with `--no-deps` (its declared dependencies pull in mlx-audio,
librosa, sounddevice and more), then only what its CosyVoice2 modules import: `mlx[cpu]`
(`mlx` on macOS) at the harness's MLX version, so both sides run the same MLX; mlx-lm in
its allowed range; numpy; transformers (mlx-lm imports it); torch, safetensors,
huggingface_hub, scipy, soundfile (its `cosyvoice2` package `__init__` imports its
converter, which imports these); einops (its `codec` package imports it). Case workers run
with that venv's python (`Prepared.options["python"]`) and the repository on
`PYTHONPATH` for `bench`; nothing of `cosyvoice2` is imported there but its BLAS choice
(`cosyvoice2.blas`, standard library only: it finds the library the harness preloads). Preparation runs in
the harness's interpreter (it needs `cosyvoice2_testing.synthetic` and torch).

Weights: the same synthetic official-format weights as the other targets
(`cached_official_dir(size, seed=0)`), generated with `weight_norm_style="parametrizations"`:
the same tensors (same generator and seed), but HiFT's weight norm under the
`parametrizations.weight.original0/1` keys, because mlx-audio-plus's converter folds
only those; with the older `weight_g`/`weight_v` keys (the default synthetic dir) it
copies them through unfolded and its loader rejects them. They are converted by
mlx-audio-plus's own converter (`python -m mlx_audio.tts.models.cosyvoice2.scripts.convert
--model-id DIR --dtype float32`, offline; its CAM++ download fails and is skipped, the
speaker encoder is not used here) and cached under `<cache root>/bench/`.

Two adaptations, for the non-0.5B shapes of the tiny synthetic model only (tests and
smoke runs; the full-size model needs neither and gets none): its converter writes no
module shapes into `config.json`, so the bench adds `llm`/`flow`/`hifigan` sections
(which its `CosyVoice2Config.from_pretrained` reads), and `load_cosyvoice2` hard-codes
Qwen2-0.5B's `ModelArgs`, so during the load `mlx_lm.models.qwen2.ModelArgs` takes the
dir's Qwen2 shapes. After every load the bench checks that each converted tensor reached
a parameter and that every parameter came from the file (MLX's `update` does not check
for missing ones), so no random weight or skipped module can make the peer look faster.

What is timed: one call of `CosyVoice2.synthesize` (zero-shot: prompt text and prompt
speech tokens in the LLM), given the work's seeded inputs as a saved speaker would give
them (no frontend), with `n_timesteps=case.steps`. Its stages are wrapped for the call:
`generate_tokens` (each token's arrival, so prefill and decode are separated as for the
other targets), `tokens_to_mel` (flow) and `mel_to_audio` (HiFT), results evaluated
inside the timed region. Fixed length as on our side: the LLM's sampling function is
wrapped so that ids >= `speech_token_size` score -inf (`FixedLengthSampler.mask`), the
min and max token/text ratios give exactly the target length, and `take_exact` reads it.

Not supported (`supports()` says why): streaming (its `synthesize_streaming` renders
each chunk of 50 tokens on its own, from the prompt and that chunk only, drops each
chunk's look-ahead frames and keeps no flow or HiFT caches: not the official schedule's
work), other precisions than fp32 (its converter writes one dtype for the whole model,
maps bfloat16 to float16 and quantises with the 0.5B shapes hard-coded), the speech
LM's kernels and saved-speaker caches (ours only).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.cases import Case, Work
from bench.interface import CallTimings, Prepared, official_dir_label
from bench.targets import bench_cache
from bench.timing import CallClock

NAME = "mlx-audio-plus"
VERSION = "0.1.8"
MLX_LM_RANGE = ">=0.18,<0.30"
"""mlx-audio-plus 0.1.8's own requirement on mlx-lm."""
TRANSFORMERS_RANGE = ">=4.49,<5"
"""mlx-audio-plus 0.1.8's own requirement on transformers (mlx-lm imports it)."""
EXTRA_REQUIREMENTS = ("numpy", "safetensors<0.8", "huggingface_hub", "scipy", "soundfile", "einops")
"""Imported by its CosyVoice2 package (the converter its `__init__` imports, the codec package).
safetensors below 0.8: 0.8.0's numpy writer saves a transposed (non-contiguous) array's memory
in its original order under the new shape, which scrambles every transposed convolution the
converter writes; 0.7 writes `tobytes()`, the array's logical order."""
CONVERTER = "mlx_audio.tts.models.cosyvoice2.scripts.convert"
VENV_READY = "bench-venv.json"
CONVERTED_READY = "bench-peer.json"
_BUFFERS = re.compile(r"(pos_enc\.pe|stft_window)$")
"""Arrays of the model computed at construction, not weights (positional tables, STFT window)."""
_UNLOADED_OK = re.compile(r"^(qwen2\.lm_head\.weight|campplus\..*)$")
"""File tensors the model does not use: Qwen2's output head (tied; the LLM uses its own
decoder) and the CAM++ speaker encoder (frontend)."""

STREAMING_REASON = (
    "mlx-audio-plus's streaming (synthesize_streaming) renders each 50-token chunk on its own"
    " (prompt + that chunk, look-ahead frames dropped, no flow or HiFT caches): not the"
    " official schedule's work"
)


# --------------------------------------------------------------------------- the venv


def venv_dir() -> Path:
    """Where the peer's virtualenv lives (one per mlx-audio-plus version)."""
    return bench_cache() / "venvs" / f"{NAME}-{VERSION}"


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")


def _harness_version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def requirements() -> list[str]:
    """What the venv gets besides mlx-audio-plus (installed with `--no-deps`).

    MLX and torch are pinned to the harness's versions where it has them: the same MLX
    on both sides, and torch from wherever the harness's came from (a CPU build)."""
    mlx = _harness_version("mlx")
    mlx_name = "mlx[cpu]" if sys.platform.startswith("linux") else "mlx"
    torch = _harness_version("torch")
    return [
        f"{mlx_name}=={mlx}" if mlx else mlx_name,
        f"mlx-lm{MLX_LM_RANGE}",
        f"transformers{TRANSFORMERS_RANGE}",
        f"torch=={torch}" if torch else "torch",
        *EXTRA_REQUIREMENTS,
    ]


def _run(cmd: list[str], what: str, env: dict[str, str] | None = None) -> str:
    """Run a setup command; on failure raise with the tail of its output."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(
            f"{what} failed (status {proc.returncode}): {' '.join(cmd)}\n{out[-3000:]}"
        )
    return out


def _installed_versions(python: Path) -> dict[str, str]:
    """Versions of what the peer runs, read in its venv."""
    code = (
        "import json\nfrom importlib import metadata\nout = {}\n"
        "for d in ('mlx-audio-plus', 'mlx', 'mlx-lm', 'numpy', 'transformers', 'torch'):\n"
        "    try:\n        out[d] = metadata.version(d)\n"
        "    except metadata.PackageNotFoundError:\n        pass\n"
        "print(json.dumps(out))"
    )
    return json.loads(_run([str(python), "-c", code], "reading the peer's versions").strip())


def ensure_venv(venv: Path | None = None) -> Path:
    """The peer venv's python, making the venv first if needed (locked; minutes, needs pip's index)."""
    venv = venv or venv_dir()
    python = venv_python(venv)
    spec = {"package": f"{NAME}=={VERSION}", "requirements": requirements()}
    ready = venv / VENV_READY
    if ready.exists() and json.loads(ready.read_text(encoding="utf-8")).get("spec") == spec:
        return python
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f".{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if ready.exists() and json.loads(ready.read_text(encoding="utf-8")).get("spec") == spec:
            return python
        if venv.exists():
            shutil.rmtree(venv)
        print(f"making the {NAME} venv at {venv}", file=sys.stderr, flush=True)
        _run([sys.executable, "-m", "venv", str(venv)], "python -m venv")
        pip = [str(python), "-m", "pip", "install", "--quiet"]
        _run([*pip, "--no-deps", spec["package"]], f"pip install {spec['package']}")
        _run([*pip, *spec["requirements"]], "pip install of the peer's requirements")
        versions = _installed_versions(python)
        ready.write_text(
            json.dumps({"spec": spec, "versions": versions}, indent=1), encoding="utf-8"
        )
    return python


# --------------------------------------------------------------------------- weights


def _shape_sections(cfg: Any) -> dict[str, Any]:
    """Our `ModelConfig`'s module shapes as mlx-audio-plus's `config.json` sections
    (`llm`, `flow` with nested `encoder`/`decoder`, `hifigan`; see its `CosyVoice2Config`)."""
    llm, flow, hift = cfg.llm, cfg.flow, cfg.hift
    enc, cfm = flow.encoder, flow.decoder
    est = cfm.estimator
    return {
        "llm": {
            "llm_input_size": llm.llm_input_size,
            "llm_output_size": llm.llm_output_size,
            "speech_token_size": llm.speech_token_size,
            "mix_ratio": list(llm.mix_ratio),
        },
        "flow": {
            "input_size": flow.input_size,
            "output_size": flow.output_size,
            "spk_embed_dim": flow.spk_embed_dim,
            "vocab_size": flow.vocab_size,
            "input_frame_rate": flow.input_frame_rate,
            "token_mel_ratio": flow.token_mel_ratio,
            "pre_lookahead_len": flow.pre_lookahead_len,
            "cfm_in_channels": cfm.in_channels,
            "cfm_inference_cfg_rate": cfm.inference_cfg_rate,
            "encoder": {
                "input_size": enc.input_size,
                "output_size": enc.output_size,
                "attention_heads": enc.attention_heads,
                "linear_units": enc.linear_units,
                "num_blocks": enc.num_blocks,
                "num_up_blocks": enc.num_up_blocks,
                "normalize_before": enc.normalize_before,
                "static_chunk_size": enc.static_chunk_size,
                "upsample_stride": enc.upsample_stride,
                "pos_enc_layer_type": enc.pos_enc_layer_type,
            },
            "decoder": {
                "in_channels": est.in_channels,
                "out_channels": est.out_channels,
                "channels": list(est.channels),
                "attention_head_dim": est.attention_head_dim,
                "n_blocks": est.n_blocks,
                "num_mid_blocks": est.num_mid_blocks,
                "num_heads": est.num_heads,
                "act_fn": est.act_fn,
                "static_chunk_size": est.static_chunk_size,
                "num_decoding_left_chunks": est.num_decoding_left_chunks,
            },
        },
        "hifigan": {
            "in_channels": hift.in_channels,
            "base_channels": hift.base_channels,
            "nb_harmonics": hift.nb_harmonics,
            "sampling_rate": hift.sampling_rate,
            "nsf_alpha": hift.nsf_alpha,
            "nsf_sigma": hift.nsf_sigma,
            "nsf_voiced_threshold": hift.nsf_voiced_threshold,
            "upsample_rates": list(hift.upsample_rates),
            "upsample_kernel_sizes": list(hift.upsample_kernel_sizes),
            "istft_n_fft": hift.istft_n_fft,
            "istft_hop_len": hift.istft_hop_len,
            "resblock_kernel_sizes": list(hift.resblock_kernel_sizes),
            "resblock_dilation_sizes": [list(d) for d in hift.resblock_dilation_sizes],
            "source_resblock_kernel_sizes": list(hift.source_resblock_kernel_sizes),
            "source_resblock_dilation_sizes": [
                list(d) for d in hift.source_resblock_dilation_sizes
            ],
        },
    }


def _qwen2_args(cfg: Any) -> dict[str, Any]:
    """The Qwen2 backbone's `mlx_lm` `ModelArgs` shape fields."""
    q = cfg.llm.qwen
    names = (
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "num_hidden_layers",
        "num_key_value_heads",
        "vocab_size",
        "rms_norm_eps",
        "rope_theta",
        "tie_word_embeddings",
    )
    return {n: getattr(q, n) for n in names}


def adaptation(official_dir: Path) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """What a dir of non-0.5B shapes needs for mlx-audio-plus to build its model:
    `config.json` sections and Qwen2 `ModelArgs`; `(None, None)` for the 0.5B shapes."""
    from cosyvoice2.config import ModelConfig, config_from_official_dir

    cfg, ref = config_from_official_dir(official_dir), ModelConfig()
    sections = _shape_sections(cfg)
    qwen2 = _qwen2_args(cfg)
    return (
        None if sections == _shape_sections(ref) else sections,
        None if qwen2 == _qwen2_args(ref) else qwen2,
    )


def safetensors_keys(path: Path) -> list[str]:
    """Tensor names in a safetensors file (its JSON header; nothing else is read)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return [k for k in header if k != "__metadata__"]


def convert(python: Path, official_dir: Path, dst: Path) -> Path:
    """`dst`: `official_dir` converted to fp32 by mlx-audio-plus's own converter (in its venv,
    offline), plus the shape sections a non-0.5B dir needs; cached, locked, atomic."""
    ready = dst / CONVERTED_READY
    if ready.exists():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(dst.parent / f".{dst.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if ready.exists():
            return dst
        sections, qwen2 = adaptation(official_dir)
        from cosyvoice2.files import staged_dir  # the harness's interpreter only

        with staged_dir(dst) as tmp:
            env = {**os.environ, "HF_HUB_OFFLINE": "1"}
            env.pop("LD_PRELOAD", None)  # torch.load in the converter; no MLX compute
            cmd = [str(python), "-m", CONVERTER, "--model-id", str(official_dir)]
            log = _run([*cmd, "--output-dir", str(tmp), "--dtype", "float32"], "conversion", env)
            (tmp / "convert.log").write_text(log, encoding="utf-8")
            if not (tmp / "model.safetensors").exists():
                raise RuntimeError(f"the converter wrote no model.safetensors:\n{log[-3000:]}")
            legacy = [
                k for k in safetensors_keys(tmp / "model.safetensors") if k.endswith("weight_g")
            ]
            if legacy:
                raise RuntimeError(
                    f"{official_dir}: hift.pt has weight norm under weight_g/weight_v keys"
                    f" ({legacy[0]}, ...): mlx-audio-plus's converter folds only"
                    " parametrizations.weight.original0/1 and copies these through, which"
                    " its loader rejects"
                )
            config = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
            if sections is not None:
                config.update(sections)
                (tmp / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
            record = {
                "source": str(official_dir),
                "sections_added": sections is not None,
                "qwen2": qwen2,
            }
            (tmp / CONVERTED_READY).write_text(json.dumps(record, indent=1), encoding="utf-8")
    return dst


# --------------------------------------------------------------------------- loading checks


@contextmanager
def _qwen2_shapes(args: dict[str, Any] | None) -> Iterator[None]:
    """While loading, `mlx_lm.models.qwen2.ModelArgs` takes `args` over the shapes that
    `load_cosyvoice2` hard-codes (Qwen2-0.5B); nothing changes when `args` is None."""
    if not args:
        yield
        return
    import mlx_lm.models.qwen2 as qwen2

    real = qwen2.ModelArgs

    def model_args(**kwargs: Any) -> Any:
        return real(**{**kwargs, **args})

    qwen2.ModelArgs = model_args
    try:
        yield
    finally:
        qwen2.ModelArgs = real


@contextmanager
def _captured_loads() -> Iterator[dict[str, Any]]:
    """Collect the arrays `mx.load` returns meanwhile (to check where the file's tensors went)."""
    import mlx.core as mx

    real = mx.load
    seen: dict[str, Any] = {}

    def load(*args: Any, **kwargs: Any) -> Any:
        out = real(*args, **kwargs)
        if isinstance(out, dict):
            seen.update(out)
        return out

    mx.load = load
    try:
        yield seen
    finally:
        mx.load = real


def check_weights(params: list[tuple[str, Any]], loaded: dict[str, Any]) -> None:
    """Raise unless every loaded tensor is a parameter and every parameter was loaded.

    `params` is `tree_flatten(model.parameters())`; identity (not equality) is checked,
    so a parameter left at its random initial value counts as missing. Construction-time
    tables (`_BUFFERS`) and tensors the model does not use (`_UNLOADED_OK`) are exempt."""
    in_model = {id(v) for _, v in params}
    from_file = {id(v) for v in loaded.values()}
    unused = sorted(
        k for k, v in loaded.items() if id(v) not in in_model and not _UNLOADED_OK.match(k)
    )
    unset = sorted(k for k, v in params if id(v) not in from_file and not _BUFFERS.search(k))
    if unused or unset:
        raise RuntimeError(
            f"mlx-audio-plus's model does not match its converted weights: {len(unused)} tensors"
            f" unused ({', '.join(unused[:5])}), {len(unset)} parameters not loaded"
            f" ({', '.join(unset[:5])})"
        )


# --------------------------------------------------------------------------- the target


class _MaskedSampling:
    """mlx-audio-plus's sampling function `(logp, decoded_tokens, top_k) -> int`, with ids >=
    `speech_token_size` at -inf first (fixed-length mode, `FixedLengthSampler.mask`)."""

    def __init__(self, inner: Any, speech_token_size: int):
        from bench.fixed_length import FixedLengthSampler

        self.inner = inner
        self.mask = FixedLengthSampler(inner, speech_token_size).mask

    def __call__(self, weighted_scores: Any, decoded_tokens: list[int], sampling: int) -> int:
        return self.inner(self.mask(weighted_scores), decoded_tokens, sampling)


@dataclass
class _Peer:
    model: Any  # mlx_audio.tts.models.cosyvoice2.CosyVoice2
    sample_rate: int


class PeerTarget:
    name = NAME
    backend = "mlx"

    def env(self) -> dict[str, str | None]:
        return {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

    def supports(self, case: Case) -> str | None:
        if case.stream or case.first_hop is not None or case.final != "full":
            return STREAMING_REASON
        if case.llm != "fp32" or case.dtype != "fp32":
            return (
                "the peer runs fp32 only (mlx-audio-plus's converter writes one dtype for the"
                " whole model, maps bfloat16 to float16 and quantises with the 0.5B shapes"
                " hard-coded)"
            )
        if case.kernels != "auto":
            return "mlx-audio-plus has no optional kernels"
        if case.saved:
            return "mlx-audio-plus has no saved-speaker caches"
        return None

    def prepare(self, cases: list[Case], options: dict[str, Any]) -> Prepared:
        path = options.get("official_model")
        model = options.get("model")
        if path is None and model is not None:
            if not (Path(model) / "llm.pt").exists():
                raise ValueError(
                    f"{model} is not an official model dir (no llm.pt): mlx-audio-plus converts"
                    " official dirs only (official_model)"
                )
            path = model
        if path is not None:
            official = Path(path).resolve()
            weights: dict[str, Any] = {"label": official_dir_label(official), "path": str(official)}
            tag = "dir-" + hashlib.sha256(str(official).encode()).hexdigest()[:12]
        else:
            from cosyvoice2_testing.synthetic import GENERATOR_VERSION, cached_official_dir

            size = options.get("size", "full")
            style = "parametrizations"  # the weight-norm keys its converter folds (see above)
            official = cached_official_dir(size, seed=0, weight_norm_style=style, onnx=False)
            weights = {
                "label": "synthetic",
                "size": size,
                "seed": 0,
                "weight_norm_style": style,
                "path": str(official),
            }
            tag = f"synthetic-{size}-seed0-g{GENERATOR_VERSION}"
        python = ensure_venv()
        spec = hashlib.sha256(json.dumps(requirements()).encode()).hexdigest()[:8]
        dst = convert(python, official, bench_cache() / f"{NAME}-{VERSION}-{tag}-fp32-{spec}")
        record = json.loads((dst / CONVERTED_READY).read_text(encoding="utf-8"))
        weights["converted"] = str(dst)
        weights["adapted"] = record["sections_added"] or record["qwen2"] is not None
        venv = json.loads((python.parent.parent / VENV_READY).read_text(encoding="utf-8"))
        return Prepared(
            weights=weights,
            options={"python": str(python), "dirs": {"fp32": str(dst)}, "qwen2": record["qwen2"]},
            versions=venv["versions"],
        )

    def load(self, case: Case, prepared: Prepared) -> _Peer:
        import mlx.core as mx
        from mlx.utils import tree_flatten

        # Importing its package also imports torch: its `__init__` imports its converter.
        from mlx_audio.tts.models.cosyvoice2 import load_cosyvoice2

        with _qwen2_shapes(prepared.options.get("qwen2")), _captured_loads() as loaded:
            model = load_cosyvoice2(prepared.options["dirs"][case.llm])
        params = tree_flatten(model.parameters())
        check_weights(params, loaded)
        loaded.clear()
        mx.eval([v for _, v in params])
        return _Peer(model, sample_rate=int(model.config.hifigan.sampling_rate))

    def unload(self, handle: Any) -> None:
        import mlx.core as mx

        mx.clear_cache()

    def run(self, h: _Peer, case: Case, work: Work) -> CallTimings:
        import mlx.core as mx

        from bench.fixed_length import take_exact

        model, llm = h.model, h.model.llm
        x = {k: mx.array(v) for k, v in work.inputs().items()}
        lens = {k: mx.array([v.shape[1]], dtype=mx.int32) for k, v in x.items() if k != "embedding"}
        mx.eval(x, lens)
        n = work.speech_tokens
        if work.fixed_length:
            # int(text_tokens * ratio) == n for both bounds (its min_len and max_len)
            ratio = (n + 0.5) / work.text_tokens
            lengths = {"max_token_text_ratio": ratio, "min_token_text_ratio": ratio}
        else:
            lengths = {"max_token_text_ratio": 20.0, "min_token_text_ratio": 2.0}
        mx.random.seed(work.seed)  # its sampling and the flow's noise draw from MLX's global key

        clock = CallClock()
        sampling, generate_tokens = llm.sampling, model.generate_tokens

        def tokens(**kwargs: Any) -> Iterator[int]:
            gen = generate_tokens(**kwargs)
            return clock.tokens(take_exact(gen, n) if work.fixed_length else gen)

        if work.fixed_length:
            llm.sampling = _MaskedSampling(sampling, llm.speech_token_size)
        model.generate_tokens = tokens
        model.tokens_to_mel = clock.timed("flow", model.tokens_to_mel, lambda out: mx.eval(out[0]))
        model.mel_to_audio = clock.timed("hift", model.mel_to_audio, mx.eval)
        try:
            clock.start()
            audio = model.synthesize(
                text=x["text"],
                text_len=lens["text"],
                prompt_text=x["prompt_text"],
                prompt_text_len=lens["prompt_text"],
                prompt_speech_token=x["prompt_speech_token"],
                prompt_speech_token_len=lens["prompt_speech_token"],
                prompt_mel=x["prompt_feat"],
                prompt_mel_len=lens["prompt_feat"],
                speaker_embedding=x["embedding"],
                n_timesteps=case.steps,
                **lengths,
            )
            mx.eval(audio)
            clock.chunk(audio.shape[-1] / h.sample_rate)
        finally:
            llm.sampling = sampling
            for name in ("generate_tokens", "tokens_to_mel", "mel_to_audio"):
                delattr(model, name)  # the instance wrappers; the class methods show again
        return clock.timings(False)
