"""A synthetic CosyVoice-300M official dir (`cosyvoice2_testing.synthetic_v1.make_official_v1_dir`)
read the converter's way: every `.pt` through the torch-free allow-list unpickler
(`cosyvoice2.checkpoint`), each part's config from `cosyvoice.yaml` read as data, weights
sanitized and loaded strictly into our first-generation modules; each part then computes
what the official module loaded by torch from the same file computes (the LM's text
encoding, the flow's `mu`, HiFT's F0 and its decoder, whose convolutions the file holds in
weight-norm form), and `spk2info.pt`'s x-vectors read back equal.
(The parts' full parity, with power checks, is in `test_transformer_lm.py`,
`test_flow_v1.py` and `test_hift.py`.)
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from cosyvoice2.checkpoint import load_torch_checkpoint
from cosyvoice2.config import (
    hift_config_from_official,
    masked_diff_config_from_official,
    transformer_lm_config_from_official,
)
from cosyvoice2.flow.flow import MaskedDiffWithXvec
from cosyvoice2.hift import HiFTGenerator
from cosyvoice2.official_yaml import load_official_yaml
from cosyvoice2.transformer_lm import TransformerLM

torch = pytest.importorskip("torch")
pytest.importorskip("cosyvoice", reason="the official CosyVoice code is not installed")
pytestmark = pytest.mark.parity

TOL = 1e-4


@pytest.fixture(scope="module")
def v1_dir(tmp_path_factory) -> Path:
    from cosyvoice2_testing.synthetic_v1 import make_official_v1_dir

    return make_official_v1_dir(tmp_path_factory.mktemp("v1") / "CosyVoice-300M-SFT", "tiny")


def _official(v1_dir: Path, part: str):
    from cosyvoice2_testing.official import instantiate

    module = instantiate(load_official_yaml(v1_dir / "cosyvoice.yaml")[part]).eval()
    state = torch.load(v1_dir / f"{part}.pt", map_location="cpu", weights_only=True)
    module.load_state_dict(state, strict=True)
    return module


def _ours(v1_dir: Path, part: str):
    hp = load_official_yaml(v1_dir / "cosyvoice.yaml")
    weights = load_torch_checkpoint(v1_dir / f"{part}.pt")
    if part == "llm":
        model = TransformerLM(transformer_lm_config_from_official(hp["llm"]))
        weights = model.sanitize(weights)
    elif part == "flow":
        model = MaskedDiffWithXvec(masked_diff_config_from_official(hp["flow"]))
        weights = model.sanitize(weights)
    else:
        model = HiFTGenerator(hift_config_from_official(hp["hift"]))
        weights = HiFTGenerator.sanitize(weights)
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    return model


def _rel(ours, ref: np.ndarray) -> float:
    return float(np.abs(np.array(ours) - ref).max() / ref.std())


def test_the_dir_has_the_released_layout(v1_dir: Path) -> None:
    names = {p.name for p in v1_dir.iterdir()}
    assert {"cosyvoice.yaml", "llm.pt", "flow.pt", "hift.pt", "spk2info.pt"} <= names
    hift = load_torch_checkpoint(v1_dir / "hift.pt")
    assert any(k.endswith("weight_g") for k in hift), "the release's legacy weight-norm keys"


@torch.inference_mode()
def test_each_part_read_torch_free_computes_what_torch_loads(v1_dir: Path) -> None:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 300, 9)
    ref = _official(v1_dir, "llm")
    t = torch.tensor(ids[None])
    want, _ = ref.encode(ref.text_embedding(t), torch.tensor([len(ids)]))
    assert _rel(_ours(v1_dir, "llm").encode(ids)[0], want[0].numpy()) <= TOL

    ref = _official(v1_dir, "flow")
    tokens = rng.integers(0, 4096, (1, 30))
    h, _ = ref.encoder(ref.input_embedding(torch.tensor(tokens)), torch.tensor([30]))
    mu, _ = ref.length_regulator.inference(
        ref.encoder_proj(h)[:, :10], ref.encoder_proj(h)[:, 10:], 34, 34, 50
    )
    ours = _ours(v1_dir, "flow").encode(mx.array(tokens[:, 10:]), mx.array(tokens[:, :10]), 34)
    assert _rel(ours[0], mu[0].numpy()) <= TOL

    ref = _official(v1_dir, "hift")
    mel = rng.standard_normal((1, 80, 20)).astype(np.float32)
    want = ref.f0_predictor(torch.from_numpy(mel)).numpy()
    hift = _ours(v1_dir, "hift")
    assert _rel(hift.f0(mx.array(mel)), want) <= TOL
    source = (0.1 * rng.standard_normal((1, 1, 20 * 256))).astype(np.float32)
    want = ref.decode(x=torch.from_numpy(mel), s=torch.from_numpy(source)).numpy()
    assert _rel(hift.decode(mx.array(mel), mx.array(source)), want) <= 1e-3  # weight-normed convs


def test_spk2info_reads_back(v1_dir: Path) -> None:
    from cosyvoice2_testing.synthetic_v1 import SPEAKERS

    ours = load_torch_checkpoint(v1_dir / "spk2info.pt", mmap=False)
    ref = torch.load(v1_dir / "spk2info.pt", map_location="cpu", weights_only=True)
    assert list(ours) == list(SPEAKERS)
    for name in SPEAKERS:
        assert np.array_equal(np.asarray(ours[name]["embedding"]), ref[name]["embedding"].numpy())
