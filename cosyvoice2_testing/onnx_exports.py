"""Synthetic `campplus.onnx` and `speech_tokenizer_v2.onnx`, exported the way the real files were.

The released files are legacy TorchScript `torch.onnx.export` outputs (eval
mode, default constant folding), which gives them their naming scheme:
parameters that went through a folded op get generated names (`onnx::Conv_4423`,
`onnx::MatMul_2536`) and are found through the consuming node's scope
(`/head/conv1/Conv`). Exporting random weights the same way reproduces that
scheme, so a converter tested on these files handles the real ones.

- `campplus.onnx`: 3D-Speaker's PyTorch `CAMPPlus` (from the `speakerlab`
  package, `speakerlab.models.campplus.DTDNN`) with CosyVoice2's sizes
  (80-bin fbank, 192-d embedding). Input `input` (B, T, 80), output `output`
  (B, 192). Its batch norms are folded into the convolutions as in the real file.
- `speech_tokenizer_v2.onnx`: the `s3tokenizer` package's `S3TokenizerV2`
  (the PyTorch twin of the released tokenizer), exported from a thin wrapper
  whose modules sit at the root as in the real file (`conv1`, `conv2`,
  `blocks.N`, `quantizer.project_in`). Inputs `feats` (B, 128, T) float32 and
  `feats_length` (B,) int32, output `indices` (B, T/4) int32.

Sizes: CAM++ has one size (6.8 M parameters, about 28 MB, the real shapes);
the tokenizer is `full` (1280 wide, 20 heads, 6 blocks: the real shapes, about
0.5 GB) or `tiny` (128 wide, 2 heads, 2 blocks). Weights are random but
deterministic per seed; CAM++'s batch-norm statistics are calibrated on the
fbank of speech-like signals so that, on real prompts, activations keep a
trained network's scale (embeddings of order 1-3). Needs torch, onnx, `s3tokenizer`
and `speakerlab` (install `speakerlab` with `--no-deps`: its CAM++ code imports
only torch).
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any

from cosyvoice2 import settings
from cosyvoice2.files import staged_dir

EXPORT_VERSION = 5
SIZES = ("tiny", "full")
OPSET = 17  # LayerNormalization needs 17; the real tokenizer file uses that op

CAMPPLUS_FILE = "campplus.onnx"
TOKENIZER_FILE = "speech_tokenizer_v2.onnx"

# (n_state, n_head, n_layer) of the tokenizer per size; the head size is fixed at 64 by its rotary table.
_TOKENIZER_DIMS = {"full": (1280, 20, 6), "tiny": (128, 2, 2)}


def _torch():
    import torch

    return torch


# ---------------------------------------------------------------------------
# CAM++


def campplus_torch_model(seed: int = 0):
    """The PyTorch CAM++ that `campplus.onnx` is exported from, with random weights for `seed` (eval mode)."""
    torch = _torch()
    from speakerlab.models.campplus.DTDNN import CAMPPlus

    gen = torch.Generator().manual_seed(seed)
    with _rng_isolated(torch):
        torch.manual_seed(seed)
        # memory_efficient only changes training (gradient checkpointing); off so calibration runs plainly
        model = CAMPPlus(feat_dim=80, embedding_size=192, memory_efficient=False)
    with torch.no_grad(), _quiet():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            elif p.ndim == 1:  # batch-norm scales
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
        # Batch-norm statistics: cumulative averages over the fbank of speech-like signals.
        bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
        model.train()
        model(torch.from_numpy(_calibration_fbank(seed)))
        for m in bns:
            m.momentum = 0.1
    return model.eval()


def _speechlike(rng: Any, sr: int, seconds: float) -> Any:
    """A voiced signal: gliding pitch, syllable-like envelope, pauses, sometimes digital silence at the ends."""
    import numpy as np

    t = np.arange(int(sr * seconds)) / sr
    f0 = rng.uniform(90, 220) * (1 + 0.2 * np.sin(2 * np.pi * rng.uniform(0.5, 2) * t))
    phase = 2 * np.pi * np.cumsum(f0) / sr
    tilt = rng.uniform(0.8, 1.6)
    x = sum(np.sin(k * phase + rng.uniform(0, 6.3)) / k**tilt for k in range(1, 40))
    envelope = np.clip(np.sin(2 * np.pi * rng.uniform(1.5, 4) * t + rng.uniform(0, 6.3)), 0, None)
    noise = rng.choice([0.0, 1e-4, 1e-3, 1e-2])
    x = x * envelope / np.abs(x).max() + noise * rng.standard_normal(t.shape)
    if rng.uniform() < 0.5:  # recorded prompts often start and end in digital silence
        edge = int(sr * rng.uniform(0.1, 0.4))
        x[:edge] = 0.0
        x[-edge:] = 0.0
    return (rng.uniform(0.05, 0.9) * x / np.abs(x).max()).astype(np.float32)


def _calibration_fbank(seed: int):
    """(16, 200, 80) mean-normalised fbank of speech-like signals, to calibrate the batch-norm statistics.

    Half are band-limited to 4 kHz (telephone prompts upsampled to 16 kHz leave the upper bins at
    the fbank floor). With statistics from white noise instead, real prompts drive the random
    network to activations in the thousands, where two float32 runtimes part ways.
    """
    import numpy as np

    from cosyvoice2.frontend.audio import resample
    from cosyvoice2.frontend.features import campplus_features

    rng = np.random.default_rng(seed)
    feats = []
    for i in range(16):
        x = (
            _speechlike(rng, 16000, 2.02)
            if i % 2
            else resample(_speechlike(rng, 8000, 2.02), 8000, 16000)
        )
        feats.append(np.array(campplus_features(x)))
    return np.stack(feats)


def export_campplus(path: str | Path, seed: int = 0, model: Any = None) -> Path:
    """Write a synthetic `campplus.onnx` (real shapes, random weights for `seed`, or `model`'s)."""
    torch = _torch()
    model = campplus_torch_model(seed) if model is None else model.eval()
    example = torch.randn(1, 200, 80, generator=torch.Generator().manual_seed(seed))
    path = Path(path)
    with _quiet(), torch.no_grad():
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "B", 1: "T"}, "output": {0: "B"}},
        )
    return path


# ---------------------------------------------------------------------------
# S3 tokenizer v2


def speech_tokenizer_torch_model(size: str = "tiny", seed: int = 0):
    """The `s3tokenizer.S3TokenizerV2` that `speech_tokenizer_v2.onnx` is exported from (eval mode)."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    torch = _torch()
    from cosyvoice2_testing.shims import install_shims

    install_shims()  # s3tokenizer imports torchaudio at import time
    from s3tokenizer.model_v2 import ModelConfig, S3TokenizerV2

    n_state, n_head, n_layer = _TOKENIZER_DIMS[size]
    config = ModelConfig(
        n_mels=128, n_audio_state=n_state, n_audio_head=n_head, n_audio_layer=n_layer
    )
    with _rng_isolated(torch):
        torch.manual_seed(seed)
        model = S3TokenizerV2("speech_tokenizer_v2_25hz", config)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_ln.weight"):
                p.copy_(0.8 + 0.4 * torch.rand(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval()


def _tokenizer_export_module(tokenizer: Any):
    """Wrap an `S3TokenizerV2` so that its modules sit at the root, as in the released ONNX file."""
    torch = _torch()
    from s3tokenizer.model_v2 import FSQCodebook
    from s3tokenizer.utils import make_non_pad_mask, mask_to_bias

    class Quantizer(torch.nn.Module):
        def __init__(self, codebook: FSQCodebook):
            super().__init__()
            self.project_in = codebook.project_down
            self.level = codebook.level

        def forward(self, x):  # FSQCodebook.encode without its inference_mode / reshapes
            h = self.project_in(x).float().tanh() * 0.9990000128746033
            h = h.round() + 1
            powers = torch.pow(
                self.level, torch.arange(2**self.level, device=x.device, dtype=h.dtype)
            )
            return torch.sum(h * powers, dim=-1).int()

    class Tokenizer(torch.nn.Module):
        def __init__(self, tok):
            super().__init__()
            enc = tok.encoder
            self.conv1, self.conv2, self.blocks = enc.conv1, enc.conv2, enc.blocks
            self.stride = enc.stride
            rope = torch.view_as_real(enc.freqs_cis)  # (L, 64, 2): complex tensors do not export
            self.register_buffer("rope", rope, persistent=False)
            self.quantizer = Quantizer(tok.quantizer._codebook)

        def forward(self, feats, feats_length):  # AudioEncoderV2.forward, then the quantizer
            t = feats.shape[-1]
            mask = make_non_pad_mask(feats_length, t).unsqueeze(1)
            x = torch.nn.functional.gelu(self.conv1(feats * mask))
            x_len = (feats_length + 2 - 1 * (3 - 1) - 1) // self.stride + 1
            x_slen = (t + 2 - 1 * (3 - 1) - 1) // self.stride + 1
            mask = make_non_pad_mask(x_len, x_slen).unsqueeze(1)
            x = torch.nn.functional.gelu(self.conv2(x * mask))
            x_len = (x_len + 2 - 1 * (3 - 1) - 1) // 2 + 1
            x_slen = (x_slen + 2 - 1 * (3 - 1) - 1) // self.stride + 1
            mask = make_non_pad_mask(x_len, x_slen).unsqueeze(1)
            x = x.permute(0, 2, 1)
            mask_pad = mask.transpose(1, 2)
            mask = mask_to_bias(mask, x.dtype)
            rope = self.rope[: x.size(1)]
            for block in self.blocks:
                x = block(x, mask.unsqueeze(1), mask_pad, rope)
            return self.quantizer(x)

    return Tokenizer(tokenizer).eval()


@contextlib.contextmanager
def _real_rotary():
    """Let `s3tokenizer`'s attention take its rotary table as a real (L, 64, 2) tensor during export.

    Same arithmetic as `s3tokenizer.model_v2.apply_rotary_emb`, minus `view_as_real`.
    """
    import s3tokenizer.model_v2 as v2

    cat = _torch().cat
    original = v2.apply_rotary_emb

    def apply_rotary_emb(xq, xk, freqs_cis):
        cos = freqs_cis[..., 0].unsqueeze(0).unsqueeze(2).to(xq.dtype)
        sin = freqs_cis[..., 1].unsqueeze(0).unsqueeze(2).to(xq.dtype)
        d = xq.shape[-1]
        xq_r = cat((-xq[:, :, :, d // 2 :], xq[:, :, :, : d // 2]), dim=-1)
        d = xk.shape[-1]
        xk_r = cat((-xk[:, :, :, d // 2 :], xk[:, :, :, : d // 2]), dim=-1)
        return xq * cos + xq_r * sin, xk * cos + xk_r * sin

    v2.apply_rotary_emb = apply_rotary_emb
    try:
        yield
    finally:
        v2.apply_rotary_emb = original


def export_speech_tokenizer(
    path: str | Path, size: str = "tiny", seed: int = 0, model: Any = None
) -> Path:
    """Write a synthetic `speech_tokenizer_v2.onnx` of `size` with random weights for `seed` (or `model`'s)."""
    torch = _torch()
    if model is None:
        model = speech_tokenizer_torch_model(size, seed)
    module = _tokenizer_export_module(model.eval())
    feats = torch.randn(1, 128, 200, generator=torch.Generator().manual_seed(seed))
    lengths = torch.tensor([200], dtype=torch.int32)
    path = Path(path)
    with _quiet(), _real_rotary(), torch.no_grad():
        torch.onnx.export(
            module,
            (feats, lengths),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=["feats", "feats_length"],
            output_names=["indices"],
            dynamic_axes={
                "feats": {0: "B", 2: "T"},
                "feats_length": {0: "B"},
                "indices": {0: "B", 1: "T"},
            },
        )
    return path


# ---------------------------------------------------------------------------
# Both files, cached


def write_onnx_files(
    out_dir: str | Path, size: str = "tiny", seed: int = 0, state_dir: str | Path | None = None
) -> dict[str, Path]:
    """Write `campplus.onnx` and `speech_tokenizer_v2.onnx` for (`size`, `seed`) into `out_dir`.

    With `state_dir`, the exported PyTorch modules' state dicts are saved there too
    (`campplus_state.npz`, `speech_tokenizer_state.npz`) for tests that need the reference modules.
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    import numpy as np

    torch = _torch()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        campplus = campplus_torch_model(seed)
        tokenizer = speech_tokenizer_torch_model(size, seed)
        paths = {
            "campplus": export_campplus(out_dir / CAMPPLUS_FILE, seed=seed, model=campplus),
            "speech_tokenizer": export_speech_tokenizer(
                out_dir / TOKENIZER_FILE, size=size, seed=seed, model=tokenizer
            ),
        }
        if state_dir is not None:
            for name, module in (("campplus", campplus), ("speech_tokenizer", tokenizer)):
                state = {k: v.detach().numpy() for k, v in module.state_dict().items()}
                np.savez(Path(state_dir) / f"{name}_state.npz", **state)
        return paths
    finally:
        torch.set_num_threads(threads)


def cache_dir() -> Path:
    """`$COSYVOICE2_CACHE/onnx` (default `~/.cache/cosyvoice2-mlx/onnx`)."""
    root = settings.path("COSYVOICE2_CACHE")
    return root / "onnx"


def cached_onnx_files(size: str = "tiny", seed: int = 0) -> Path:
    """A dir holding both synthetic ONNX files for (`size`, `seed`), exported on first use."""
    import fcntl

    name = f"{size}-seed{seed}-v{EXPORT_VERSION}"
    path = cache_dir() / name
    done = path / "done"
    if done.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be exporting the same files
        if not done.exists():
            with staged_dir(path) as tmp:
                write_onnx_files(tmp, size=size, seed=seed, state_dir=tmp)
                (tmp / "done").write_text(
                    "synthetic ONNX exports (random weights)\n", encoding="utf-8"
                )
    return path


# ---------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet():
    """The legacy exporter and tracer warn about things that are expected here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def _rng_isolated(torch: Any):
    """Seed torch's global generator for a construction without disturbing the caller's stream."""
    state = torch.random.get_rng_state()
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


def cached_torch_state(part: str, size: str = "tiny", seed: int = 0) -> dict[str, Any]:
    """The PyTorch state dict (numpy arrays) of the module exported as `part` (`campplus` or `speech_tokenizer`)."""
    import numpy as np

    if part not in ("campplus", "speech_tokenizer"):
        raise ValueError(f"part must be campplus or speech_tokenizer, got {part!r}")
    with np.load(cached_onnx_files(size, seed) / f"{part}_state.npz") as f:
        return {k: f[k] for k in f.files}
