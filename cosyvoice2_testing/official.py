"""Build the official CosyVoice2 PyTorch modules from a `cosyvoice2.yaml`, with a seed.

The reference side of every parity test. The yaml is read as data by
`cosyvoice2.official_yaml` and the official classes it names are constructed
here explicitly (HyperPyYAML is not used, so the yaml's seeding side effects and
training-only entries are skipped). One deviation from the official loading,
stated because it matters: `Qwen2Encoder` calls `Qwen2ForCausalLM.from_pretrained`
on `CosyVoice-BlankEN`; here the model is built from that dir's `config.json`
with random initial weights instead, since `llm.pt` overwrites every weight anyway.

`official_frontend` builds the official `CosyVoiceFrontEnd` of a model dir and
`official_cosyvoice2` the official `CosyVoice2` around a frontend and a model (for
the per-mode frontend and pipeline parity tests); `official_model_inputs` records
what its modes hand to `CosyVoice2Model.tts`.
"""

from __future__ import annotations

import functools
import importlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cosyvoice2.official_yaml import Tagged, load_official_yaml
from cosyvoice2_testing.shims import install_shims

PARTS = ("llm", "flow", "hift")


def official_hparams(model_dir: str | Path) -> dict[str, Any]:
    """The hyperparameters of an official model dir, with `qwen_pretrain_path` pointed into it."""
    model_dir = Path(model_dir)
    return load_official_yaml(
        model_dir / "cosyvoice2.yaml",
        overrides={"qwen_pretrain_path": str(model_dir / "CosyVoice-BlankEN")},
    )


@contextmanager
def _qwen_from_config():
    """Make `Qwen2ForCausalLM.from_pretrained(path)` build from `path/config.json` without weights."""
    import transformers
    from transformers import Qwen2Config, Qwen2ForCausalLM

    original = Qwen2ForCausalLM.from_pretrained

    def from_config(path: str, *args: Any, **kwargs: Any) -> Qwen2ForCausalLM:
        config = Qwen2Config.from_pretrained(path)
        config._attn_implementation = "eager"
        return Qwen2ForCausalLM(config)

    Qwen2ForCausalLM.from_pretrained = from_config  # type: ignore[method-assign]
    try:
        yield transformers
    finally:
        Qwen2ForCausalLM.from_pretrained = original  # type: ignore[method-assign]


def _import(target: str) -> Any:
    module, _, name = target.rpartition(".")
    return getattr(importlib.import_module(module), name)


def instantiate(node: Any) -> Any:
    """Construct what a `Tagged` node describes (reference side only: imports the official code)."""
    if isinstance(node, dict):
        return {k: instantiate(v) for k, v in node.items()}
    if isinstance(node, list):
        return [instantiate(v) for v in node]
    if not isinstance(node, Tagged):
        return node
    if node.target == "omegaconf.DictConfig":
        from omegaconf import DictConfig

        return DictConfig(instantiate(node.kwargs()["content"]))
    fn = _import(node.target)
    if node.kind == "name":
        return functools.partial(fn, **instantiate(node.kwargs()))
    if node.kind == "new":
        return fn(**instantiate(node.kwargs()))
    raise ValueError(f"cannot instantiate !{node.kind}:{node.target}")


def build_official(part: str, hparams: dict[str, Any], seed: int = 0):
    """Construct the official `llm`, `flow` or `hift` module in eval mode, initialised from `seed`.

    Construction is deterministic per seed (torch's global generator is seeded
    first; note the official `CausalConditionalCFM.__init__` reseeds it to 0 itself).
    """
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    install_shims()
    import torch

    torch.manual_seed(seed)
    with _qwen_from_config():
        module = instantiate(hparams[part])
    return module.eval()


def load_official(part: str, model_dir: str | Path):
    """Build the official `part` for an official model dir and load its `.pt` file strictly."""
    import torch

    model_dir = Path(model_dir)
    module = build_official(part, official_hparams(model_dir))
    state = torch.load(model_dir / f"{part}.pt", map_location="cpu", weights_only=True)
    if part == "hift":  # the official loader strips a `generator.` prefix (hifigan checkpoints)
        state = {k.replace("generator.", ""): v for k, v in state.items()}
    module.load_state_dict(state, strict=True)
    return module.eval()


def official_frontend(model_dir: str | Path, text_normalizers: bool = True):
    """The official `CosyVoiceFrontEnd` of an official model dir, built as `CosyVoice2.__init__` builds it.

    The yaml's `get_tokenizer` and `feat_extractor`, `campplus.onnx` and
    `speech_tokenizer_v2.onnx` on onnxruntime's CPU provider, `spk2info.pt` when the
    dir has one. torchaudio's `Resample` and Kaldi `fbank` come from the shims
    (`cosyvoice2_testing.shims`).

    Text normalisation: the reference wheel comments out the creation of its
    normalisers in `__init__` but `text_normalize` still reads them (it fails with
    `AttributeError: use_ttsfrd`). With `text_normalizers` they are set as the
    upstream `__init__` sets them when `ttsfrd` is not installed, with `wetext`
    (the WeTextProcessing runtime, the FSTs upstream's `tn` package builds) in
    place of `tn`: `use_ttsfrd = False`, `zh_tn_model = Normalizer(remove_erhua=False)`,
    `en_tn_model = Normalizer()`, `inflect_parser = inflect.engine()`.
    """
    model_dir = Path(model_dir)
    install_shims()
    from cosyvoice.cli.frontend import CosyVoiceFrontEnd

    hparams = official_hparams(model_dir)
    frontend = CosyVoiceFrontEnd(
        instantiate(hparams["get_tokenizer"]),
        instantiate(hparams["feat_extractor"]),
        str(model_dir / "campplus.onnx"),
        str(model_dir / "speech_tokenizer_v2.onnx"),
        str(model_dir / "spk2info.pt"),
        hparams["allowed_special"],
    )
    if text_normalizers:
        import inflect
        from wetext import Normalizer

        frontend.use_ttsfrd = False
        frontend.zh_tn_model = Normalizer(remove_erhua=False)
        frontend.en_tn_model = Normalizer()
        frontend.inflect_parser = inflect.engine()
    return frontend


def official_cosyvoice2(frontend: Any, model: Any, sample_rate: int = 24000):
    """The official `CosyVoice2` (cli/cosyvoice.py) around `frontend` and `model`, without its `__init__`.

    Its `inference_*`, `add_zero_shot_spk` and `list_available_spks` then run as
    shipped: text normalisation and splitting, the `frontend_*` calls, and
    `model.tts(**model_input, stream=..., speed=...)` per text segment. `__init__`
    is skipped because it reads the yaml with HyperPyYAML and loads the weights
    itself (see the module docstring); `model` is a `CosyVoice2Model` (or None
    where only `official_model_inputs` drives it).
    """
    install_shims()
    from cosyvoice.cli.cosyvoice import CosyVoice2

    official = object.__new__(CosyVoice2)
    official.frontend, official.model, official.sample_rate = frontend, model, sample_rate
    official.instruct, official.fp16, official.model_dir = False, False, ""
    return official


def official_model_inputs(official: Any, method: str, *args: Any, **kwargs: Any) -> list[dict]:
    """The `model_input` of every text segment that the official `official.method(*args)` passes
    to `model.tts`, as numpy arrays (plus `speed`), without synthesising anything."""
    import torch
    from cosyvoice.cli.model import CosyVoice2Model

    records: list[dict] = []

    class Recorder(CosyVoice2Model):  # `inference_instruct2` asserts the model's class
        def tts(self, stream: bool = False, speed: float = 1.0, **model_input: Any):
            records.append({k: v.numpy() for k, v in model_input.items()} | {"speed": speed})
            yield {"tts_speech": torch.zeros(1, 1)}

    model, official.model = official.model, object.__new__(Recorder)
    try:
        for _ in getattr(official, method)(*args, **kwargs):
            pass
    finally:
        official.model = model
    return records
