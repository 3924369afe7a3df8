"""`cosyvoice2.transformer_lm.TransformerLM` (the first generation's speech LM) against the
official PyTorch `TransformerLM` of the installed wheel, on the same random weights.

The official module is built from the released `cosyvoice.yaml` structure
(`cosyvoice2_testing.synthetic_v1.llm_yaml_text`: tiny here, the released sizes behind the
`full` marker) with its own initialisation, and its state dict is loaded into ours.
Under that initialisation the encoders' residual branches are small beside the embedded
input (the linear input layer scales by sqrt(d)), and greedy decoding falls into a loop
decided by the last token alone, so that no bug in the backbone would change a token;
both sides therefore get the attention and feed-forward output projections of every
encoder layer scaled by `BACKBONE_SCALE` (4) after the module is built.

- logits: the official model's whole-sequence forward (its `llm.forward`, causal through
  `static_chunk_size: 1`, no cache) against ours fed step by step through the KV cache
  (prefill, then one position at a time): max abs difference <= `LOGIT_TOL` x the spread
  (standard deviation) of the reference logits, over the prompt and 110 decode positions.
- tokens: the official `inference` and ours with the same greedy rule (arg-max over the
  speech tokens, eos never drawn, so both run to the maximum length): identical over 120.

Power (`tests/power.py`): each comparison again with a small bug in our code: the text
encoder attending to every position (not causal), the speaker vector not normalised,
the relative positions off by one; the tokens with the first and the last.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from cosyvoice2 import transformer_lm
from cosyvoice2.config import transformer_lm_config_from_official
from cosyvoice2.official_yaml import load_official_yaml
from cosyvoice2.transformer_lm import TransformerLM
from cosyvoice2_testing.synthetic_v1 import llm_yaml_text
from tests.power import assert_power, patched, wrapped

torch = pytest.importorskip("torch")
pytest.importorskip("cosyvoice", reason="the official CosyVoice code is not installed")
pytestmark = pytest.mark.parity

LOGIT_TOL = 1e-4
STEPS = 120
BACKBONE = ("llm.encoders.", "text_encoder.encoders.")
SCALED = ("linear_out.weight", "w_2.weight")
BACKBONE_SCALE = 4.0


class Pair:
    """The official TransformerLM and ours with its weights, and one seeded input."""

    def __init__(self, size: str, seed: int = 0):
        from cosyvoice2_testing.official import instantiate
        from cosyvoice2_testing.shims import install_shims

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "cosyvoice.yaml"
            path.write_text(llm_yaml_text(size), encoding="utf-8")
            hp = load_official_yaml(path)
        install_shims()
        torch.manual_seed(seed)
        self.ref = instantiate(hp["llm"]).eval()
        with torch.no_grad():  # the backbone made to matter (see the module docstring)
            for name, p in self.ref.named_parameters():
                if name.startswith(BACKBONE) and name.endswith(SCALED):
                    p.mul_(BACKBONE_SCALE)
        self.config = transformer_lm_config_from_official(hp["llm"])
        self.ours = TransformerLM(self.config)
        state = {k: v.detach().numpy() for k, v in self.ref.state_dict().items()}
        self.ours.load_weights(list(TransformerLM.sanitize(state).items()), strict=True)
        mx.eval(self.ours.parameters())
        rng = np.random.default_rng(seed)
        c = self.config
        self.text = rng.integers(0, c.text_token_size, 8)
        self.prompt_text = rng.integers(0, c.text_token_size, 5)
        self.prompt_speech = rng.integers(0, c.speech_token_size, 12)
        self.embedding = rng.standard_normal(c.spk_embed_dim).astype(np.float32)

    # ------------------------------------------------------------- reference

    def ref_input(self):
        """The official `inference`'s steps 1-3 (its own modules), `(1, L, D)`."""
        m = self.ref
        t = lambda a: torch.tensor(np.asarray(a)[None], dtype=torch.int32)  # noqa: E731
        text = torch.concat([t(self.prompt_text), t(self.text)], dim=1)
        text, _ = m.encode(m.text_embedding(text), torch.tensor([text.shape[1]]))
        emb = torch.nn.functional.normalize(torch.tensor(self.embedding)[None], dim=1)
        emb = m.spk_embed_affine_layer(emb)[:, None]
        sos = m.llm_embedding.weight[m.sos_eos].reshape(1, 1, -1)
        task = m.llm_embedding.weight[m.task_id].reshape(1, 1, -1)
        speech = m.speech_embedding(t(self.prompt_speech))
        return torch.concat([sos, emb, text, task, speech], dim=1)

    @torch.inference_mode()
    def ref_logits(self, tokens: list[int]) -> np.ndarray:
        """Logits of every position of `[prompt input, tokens]`, whole sequence, no cache."""
        m = self.ref
        xs = torch.concat([self.ref_input(), m.speech_embedding(torch.tensor([tokens]))], dim=1)
        out, _ = m.llm(xs, torch.tensor([xs.shape[1]]))
        return m.llm_decoder(out)[0].numpy()

    @torch.inference_mode()
    def ref_tokens(self) -> list[int]:
        eos = self.config.speech_token_size
        self.ref.sampling = lambda scores, decoded, k: torch.tensor(int(scores[:eos].argmax()))
        t = lambda a: torch.tensor(np.asarray(a)[None], dtype=torch.int32)  # noqa: E731
        n = lambda a: torch.tensor([len(a)], dtype=torch.int32)  # noqa: E731
        gen = self.ref.inference(
            t(self.text), n(self.text), t(self.prompt_text), n(self.prompt_text),
            t(self.prompt_speech), n(self.prompt_speech), torch.tensor(self.embedding)[None],
            max_token_text_ratio=STEPS / len(self.text), min_token_text_ratio=2,
        )  # fmt: skip
        return [int(x) for x in gen]

    # ------------------------------------------------------------- ours

    def our_logits(self, tokens: list[int]) -> np.ndarray:
        """Ours through the KV cache: the prefill's logits (every prompt position), then one
        position at a time."""
        m = self.ours
        cache = m.make_cache()
        x = m.prompt_input(self.text, self.prompt_text, self.prompt_speech, self.embedding)
        rows = [m.llm_decoder(m.llm(x, cache))[0]]
        for tok in tokens:
            step = m.speech_embedding(mx.array([[tok]], dtype=mx.int32))
            rows.append(m.llm_decoder(m.llm(step, cache))[0])
        return np.array(mx.concatenate(rows, axis=0))

    def our_tokens(self) -> list[int]:
        return list(
            self.ours.inference(
                self.text, self.prompt_text, self.prompt_speech, self.embedding,
                sampling=MaskedGreedy(self.config.speech_token_size),
                max_token_text_ratio=STEPS / len(self.text), min_token_text_ratio=2,
            )
        )  # fmt: skip


class MaskedGreedy:
    """Arg-max over the speech tokens (eos never drawn), as the reference's rule."""

    window = 0

    def __init__(self, eos: int):
        self.eos = eos

    def __call__(self, logp: mx.array, recent: mx.array, key: mx.array) -> mx.array:
        return mx.argmax(logp[: self.eos]).astype(mx.int32)


@pytest.fixture(scope="module")
def tiny() -> Pair:
    return Pair("tiny")


def _logits_error(pair: Pair, tokens: list[int], ref: np.ndarray) -> float:
    ours = pair.our_logits(tokens)
    assert ours.shape == ref.shape
    return float(np.abs(ours - ref).max() / ref.std())


# the bugs: small, plausible mistakes in our code


def _non_causal_text_encoder(pair: Pair):
    return patched(pair.ours.text_encoder, "static_chunk_size", 0)


def _unnormalised_speaker(pair: Pair):
    def embed_speaker(embedding):
        e = mx.array(np.asarray(embedding, dtype=np.float32)).reshape(1, -1)
        return pair.ours.spk_embed_affine_layer(e)[:, None]

    return patched(pair.ours, "embed_speaker", embed_speaker)


def _positions_off_by_one():
    return wrapped(
        transformer_lm, "rel_position_table", lambda f: lambda size, d: f(size + 1, d)[:, :-2]
    )


def test_logits_equal_the_official_whole_sequence_forward(tiny: Pair) -> None:
    tokens = tiny.ref_tokens()[:110]
    ref = tiny.ref_logits(tokens)  # every prompt position and the decode steps
    measure = lambda: _logits_error(tiny, tokens, ref)  # noqa: E731
    for bug, name in (
        (_non_causal_text_encoder(tiny), "text encoder not causal"),
        (_unnormalised_speaker(tiny), "speaker vector not L2-normalised"),
        (_positions_off_by_one(), "relative positions off by one"),
    ):
        assert_power(
            "TransformerLM logits vs official (rel. to spread)", measure, LOGIT_TOL, bug, name
        )


def test_greedy_tokens_equal_the_official_inference(tiny: Pair) -> None:
    ref = tiny.ref_tokens()
    assert len(ref) == STEPS

    def mismatches() -> float:
        ours = tiny.our_tokens()
        assert len(ours) == STEPS
        return float(sum(a != b for a, b in zip(ours, ref, strict=True)))

    for bug, name in (
        (_non_causal_text_encoder(tiny), "text encoder not causal"),
        (_positions_off_by_one(), "relative positions off by one"),
    ):
        assert_power("TransformerLM greedy tokens vs official inference", mismatches, 0, bug, name)


def test_config_reads_the_released_layout() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cosyvoice.yaml"
        path.write_text(llm_yaml_text("full"), encoding="utf-8")
        c = transformer_lm_config_from_official(load_official_yaml(path)["llm"])
    assert (c.text_token_size, c.speech_token_size, c.llm_input_size) == (60515, 4096, 1024)
    assert (c.text_encoder.num_blocks, c.llm.num_blocks, c.llm.attention_heads) == (6, 14, 16)
    assert c.sampling.top_k == 25 and c.sampling.win_size == 10


@pytest.mark.full
def test_full_size_logits_and_tokens() -> None:
    pair = Pair("full")
    ref_tokens = pair.ref_tokens()
    assert pair.our_tokens() == ref_tokens
    ref = pair.ref_logits(ref_tokens[:20])
    assert _logits_error(pair, ref_tokens[:20], ref) <= LOGIT_TOL
