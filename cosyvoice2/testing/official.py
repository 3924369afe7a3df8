"""Build the official CosyVoice2 PyTorch modules from a `cosyvoice2.yaml`, with a seed.

The reference side of every parity test. The yaml is read as data by
`cosyvoice2.official_yaml` and the official classes it names are constructed
here explicitly (HyperPyYAML is not used, so the yaml's seeding side effects and
training-only entries are skipped). One deviation from the official loading,
stated because it matters: `Qwen2Encoder` calls `Qwen2ForCausalLM.from_pretrained`
on `CosyVoice-BlankEN`; here the model is built from that dir's `config.json`
with random initial weights instead, since `llm.pt` overwrites every weight anyway.
"""

from __future__ import annotations

import functools
import importlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cosyvoice2.official_yaml import Tagged, load_official_yaml
from cosyvoice2.testing.shims import install_shims

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
