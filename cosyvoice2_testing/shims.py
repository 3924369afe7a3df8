"""Import shims that let the official model modules load without their heavy extras.

The official code (installed from the `cosyvoice-minicpmo` wheel) imports three
things that cannot be installed here or that drag in unrelated frameworks:

- `torchaudio` (from `cosyvoice/utils/file_utils.py`, reached from `llm.py` and
  the encoder, and from `cosyvoice/cli/frontend.py`): no build pairs with torch
  2.13. The model modules only need the import to succeed; the official frontend
  calls three of its functions, which the shim provides, written here in torch
  from torchaudio's documented algorithms and independent of our own (numpy/MLX)
  frontend, so that a bug in ours cannot reach the reference:
  `load` (soundfile, float32 in [-1, 1], channels first), `transforms.Resample`
  (windowed-sinc interpolation, Hann window, 6 zero crossings, roll-off 0.99,
  kernel in float64 rounded to float32, applied by a strided `conv1d`) and
  `compliance.kaldi.fbank` (Kaldi fbank with torchaudio's defaults: snipped
  25 ms frames every 10 ms, DC removal, pre-emphasis 0.97, Povey window, zero
  padding to a power of two, power spectrum, Kaldi mel banks computed in
  float32, `log(max(x, float32 eps))`; only dither 0 and the default options).
  tests/test_frontend_parity.py checks both against outputs of the real
  torchaudio stored in `tests/data/frontend/torchaudio_reference.npz`.
- `matcha.utils` (its `__init__` pulls hydra, lightning, gdown, wget): the shim
  registers the package without running its `__init__`, so the real
  `matcha.utils.audio.mel_spectrogram` (the official mel) still imports
  unchanged from the wheel. `matcha.utils.pylogger` (imported by matcha's CFM
  base class) needs `lightning` only for a rank-zero logging decorator; the shim
  gives `get_pylogger = logging.getLogger`.
- `modelscope` (from `cosyvoice/cli/cosyvoice.py`, model download): a stub
  whose `snapshot_download` refuses, since nothing may be downloaded.

The wheel also installs a top-level `cosyvoice2.py` compatibility module that
would shadow our package; the nox session deletes it after installing the wheel,
and `install_shims` refuses to run if it is still importable in its place.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import math
import sys
import types
from typing import Any


def _stub_module(name: str) -> types.ModuleType:
    """A module object with a spec, so `importlib.util.find_spec` (used by transformers) accepts it."""
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)
    return mod


def sinc_resample_kernel(orig: int, new: int) -> tuple[Any, int]:
    """torchaudio's `Resample` kernel for rates already divided by their gcd: (new, 1, taps), width.

    Output phase `j` weights input offset `i` (in `-width .. width + orig - 1`) by
    `sinc(pi x) * cos(pi x / 12)^2 * b / orig` with `x = b * (i / orig - j / new)`
    clamped to +-6 and `b = 0.99 * min(orig, new)`; built in float64 (but `j / new` in
    float32, as torchaudio computes it), returned in float32.
    """
    import torch

    zeros = 6
    b = 0.99 * min(orig, new)
    width = math.ceil(zeros * orig / b)
    step = torch.arange(-width, width + orig, dtype=torch.float64) / orig
    # the phases j / new in float32, as torchaudio computes them
    phase = (-torch.arange(new)[:, None] / new).to(torch.float64)
    x = ((step[None, :] + phase) * b).clamp(-zeros, zeros)
    window = torch.cos(x * (math.pi / (2 * zeros))) ** 2
    arg = x * math.pi
    sinc = torch.where(arg == 0, torch.ones_like(arg), torch.sin(arg) / arg)
    return (sinc * window * (b / orig)).to(torch.float32)[:, None, :], width


def resample(x: Any, orig_freq: int, new_freq: int) -> Any:
    """`torchaudio.functional.resample` (Hann-windowed sinc) of a float32 tensor (..., time)."""
    import torch

    if orig_freq == new_freq:
        return x
    g = math.gcd(int(orig_freq), int(new_freq))
    orig, new = int(orig_freq) // g, int(new_freq) // g
    kernel, width = sinc_resample_kernel(orig, new)
    lead, length = x.shape[:-1], x.shape[-1]
    flat = torch.nn.functional.pad(x.reshape(-1, length), (width, width + orig))
    out = torch.nn.functional.conv1d(flat[:, None, :], kernel, stride=orig)  # (n, new, blocks)
    out = out.transpose(1, 2).reshape(flat.shape[0], -1)[:, : math.ceil(new * length / orig)]
    return out.reshape(*lead, -1)


def kaldi_fbank(
    waveform: Any,
    num_mel_bins: int = 23,
    dither: float = 0.0,
    sample_frequency: float = 16000.0,
    frame_length: float = 25.0,
    frame_shift: float = 10.0,
    preemphasis_coefficient: float = 0.97,
    low_freq: float = 20.0,
    high_freq: float = 0.0,
    **unsupported: Any,
) -> Any:
    """`torchaudio.compliance.kaldi.fbank` of (channels, time) with dither 0: (frames, num_mel_bins).

    Channel 0, snipped edges, DC removal per frame, pre-emphasis with the first
    sample repeated, Povey window (periodic=False Hann to the power 0.85), zero
    padding to the next power of two, `|rfft|^2`, Kaldi mel banks (`1127 ln(1 + f / 700)`,
    edges and bin mels in float32, the Nyquist bin unused), `log(max(x, eps))`.
    """
    import torch

    if dither != 0.0 or unsupported:
        raise NotImplementedError(
            f"test shim fbank: only dither=0 and default options, got dither={dither}, {unsupported}"
        )
    x = waveform[0].to(torch.float32).contiguous()
    shift = int(sample_frequency * frame_shift * 0.001)
    size = int(sample_frequency * frame_length * 0.001)
    padded = 1 << (size - 1).bit_length()
    n_frames = 1 + (x.shape[0] - size) // shift
    frames = x.as_strided((n_frames, size), (shift, 1))
    frames = frames - frames.mean(dim=1, keepdim=True)
    previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
    frames = frames - preemphasis_coefficient * previous
    povey = torch.hann_window(size, periodic=False, dtype=torch.float32).pow(0.85)
    frames = torch.nn.functional.pad(frames * povey, (0, padded - size))
    power = torch.fft.rfft(frames).abs().pow(2.0)
    # Kaldi's triangular mel banks
    nyquist = 0.5 * sample_frequency
    high = high_freq + nyquist if high_freq <= 0.0 else high_freq
    mel_low = 1127.0 * math.log(1.0 + low_freq / 700.0)
    mel_high = 1127.0 * math.log(1.0 + high / 700.0)
    delta = (mel_high - mel_low) / (num_mel_bins + 1)
    idx = torch.arange(num_mel_bins, dtype=torch.float32)[:, None]
    left, center, right = (mel_low + (idx + k) * delta for k in (0.0, 1.0, 2.0))
    hz = (sample_frequency / padded) * torch.arange(padded // 2, dtype=torch.float32)
    mel = 1127.0 * torch.log(1.0 + hz / 700.0)[None, :]
    banks = torch.clamp(
        torch.minimum((mel - left) / (center - left), (right - mel) / (right - center)), min=0.0
    )
    banks = torch.nn.functional.pad(banks, (0, 1))  # (bins, padded // 2 + 1)
    energies = power @ banks.T
    eps = torch.tensor(torch.finfo(torch.float32).eps)
    return torch.maximum(energies, eps).log()


def _torchaudio_stub() -> types.ModuleType:
    mod = _stub_module("torchaudio")
    mod.__doc__ = "Test shim: stand-in for torchaudio (see cosyvoice2_testing/shims.py)."

    def load(path, backend=None):  # noqa: ARG001 - official call signature
        import soundfile as sf
        import torch

        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
        return torch.from_numpy(data.T.copy()), sr

    class Resample:
        def __init__(self, orig_freq: int, new_freq: int):
            self.orig_freq, self.new_freq = int(orig_freq), int(new_freq)

        def __call__(self, x):
            return resample(x, self.orig_freq, self.new_freq)

    transforms = _stub_module("torchaudio.transforms")
    transforms.Resample = Resample
    compliance = _stub_module("torchaudio.compliance")
    kaldi = _stub_module("torchaudio.compliance.kaldi")
    kaldi.fbank = kaldi_fbank
    compliance.kaldi = kaldi
    mod.load = load
    mod.transforms = transforms
    mod.compliance = compliance
    sys.modules["torchaudio.transforms"] = transforms
    sys.modules["torchaudio.compliance"] = compliance
    sys.modules["torchaudio.compliance.kaldi"] = kaldi
    return mod


def _modelscope_stub() -> types.ModuleType:
    mod = _stub_module("modelscope")

    def snapshot_download(*args, **kwargs):
        raise RuntimeError("test shim: downloading models is not possible here")

    mod.snapshot_download = snapshot_download
    return mod


def _register_package_without_init(name: str) -> None:
    """Make `name` importable as a package whose `__init__` is never run."""
    if name in sys.modules:
        return
    parent, _, child = name.rpartition(".")
    spec = importlib.util.find_spec(parent)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"cannot find package {parent!r} for shim {name!r}")
    path = [f"{loc}/{child}" for loc in spec.submodule_search_locations]
    pkg = types.ModuleType(name)
    pkg.__path__ = path
    pkg.__package__ = name
    sys.modules[name] = pkg


def install_shims() -> None:
    """Install the shims (idempotent)."""
    if "torchaudio" not in sys.modules and importlib.util.find_spec("torchaudio") is None:
        sys.modules["torchaudio"] = _torchaudio_stub()
    if "modelscope" not in sys.modules and importlib.util.find_spec("modelscope") is None:
        sys.modules["modelscope"] = _modelscope_stub()
    _register_package_without_init("matcha.utils")
    if "matcha.utils.pylogger" not in sys.modules:
        import logging

        pylogger = _stub_module("matcha.utils.pylogger")
        pylogger.get_pylogger = lambda name=__name__: logging.getLogger(name)
        sys.modules["matcha.utils.pylogger"] = pylogger
    spec = importlib.util.find_spec("cosyvoice2")
    if spec is not None and spec.origin and spec.origin.endswith("site-packages/cosyvoice2.py"):
        raise ImportError(
            "the cosyvoice-minicpmo wheel's top-level cosyvoice2.py shadows this package; "
            f"delete {spec.origin}"
        )
