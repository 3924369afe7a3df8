"""Import shims that let the official model modules load without their heavy extras.

The official code (installed from the `cosyvoice-minicpmo` wheel) imports three
things that cannot be installed here or that drag in unrelated frameworks:

- `torchaudio` (from `cosyvoice/utils/file_utils.py`, reached from `llm.py` and
  the encoder): no build pairs with torch 2.13. The model modules only need the
  import to succeed; `load_wav` is the one function that uses it, and the shim
  implements it with soundfile and our numpy port of torchaudio's resampler
  (`cosyvoice2.frontend.audio.resample`, within 6e-8 of torchaudio) for tests
  that want it. No model numerics pass through this shim.
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
import sys
import types


def _stub_module(name: str) -> types.ModuleType:
    """A module object with a spec, so `importlib.util.find_spec` (used by transformers) accepts it."""
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)
    return mod


def _torchaudio_stub() -> types.ModuleType:
    mod = _stub_module("torchaudio")
    mod.__doc__ = (
        "Test shim: import-only stand-in for torchaudio (see cosyvoice2/testing/shims.py)."
    )

    def load(path, backend=None):  # noqa: ARG001 - official call signature
        import soundfile as sf
        import torch

        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
        return torch.from_numpy(data.T.copy()), sr

    class _Resample:
        def __init__(self, orig_freq: int, new_freq: int):
            self.orig_freq, self.new_freq = int(orig_freq), int(new_freq)

        def __call__(self, x):
            import torch

            from cosyvoice2.frontend.audio import resample

            return torch.from_numpy(resample(x.numpy(), self.orig_freq, self.new_freq))

    transforms = _stub_module("torchaudio.transforms")
    transforms.Resample = _Resample
    mod.load = load
    mod.transforms = transforms
    sys.modules["torchaudio.transforms"] = transforms
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
