"""`cosyvoice2.llm.Qwen2LM` against the official PyTorch `Qwen2LM` on the same synthetic weights.

References:
- the installed official code (mid-2025, the `cosyvoice-minicpmo` wheel): always;
  our `behaviour="legacy"` must match it token for token;
- the latest upstream `cosyvoice/llm/llm.py`, read from a git checkout
  (`$COSYVOICE_UPSTREAM_REPO`, default the local mirror): our default
  `behaviour="upstream"` must match it; skipped where no checkout is present.

Greedy decoding on both sides uses the same rule on the log-probabilities;
tokens 6562/6563 (and, where stated, eos) are masked on both sides, since with
random weights the official code would otherwise raise or loop (NOTES.md).
Tolerances: logits max abs difference <= 1e-4 (fp32); tokens identical.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from cosyvoice2.config import config_from_official_dir
from cosyvoice2.llm import Qwen2LM

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.parity

S = 6561  # speech_token_size: eos 6561, 6562, fill 6563
FILL = S + 2
LOGIT_TOL = 1e-4
UPSTREAM_REPO = os.environ.get(
    "COSYVOICE_UPSTREAM_REPO", "/work/.mirror/FunAudioLLM+CosyVoice/repo"
)


# --------------------------------------------------------------------------- models


class Pair:
    """The official module and ours, loaded from the same official model dir."""

    def __init__(self, model_dir: Path):
        from cosyvoice2.testing.official import load_official

        torch.set_num_threads(1)
        self.dir = model_dir
        self.ref = load_official("llm", model_dir)
        state = torch.load(model_dir / "llm.pt", map_location="cpu", weights_only=True)
        self.config = config_from_official_dir(model_dir).llm
        self.ours = Qwen2LM.from_weights(
            self.config, Qwen2LM.sanitize({k: v.numpy() for k, v in state.items()})
        )
        del state
        self._upstream = None

    def upstream(self):
        """The latest upstream `Qwen2LM` sharing this pair's official backbone and weights."""
        if self._upstream is None:
            self._upstream = load_upstream_qwen2lm(self.ref)
        return self._upstream

    @contextmanager
    def bias(self, deltas: dict[int, float]):
        """Add `deltas` to `llm_decoder.bias` on both sides (and upstream) for the block."""
        idx = list(deltas)
        vals = list(deltas.values())
        saved_ours = self.ours.llm_decoder.bias
        saved_ref = self.ref.llm_decoder.bias.detach().clone()
        with torch.no_grad():
            self.ref.llm_decoder.bias[idx] += torch.tensor(vals)
            if self._upstream is not None:
                self._upstream.llm_decoder.bias.copy_(self.ref.llm_decoder.bias)
        delta = np.zeros(saved_ours.shape[0], dtype=np.float32)
        delta[idx] = vals
        self.ours.llm_decoder.bias = saved_ours + mx.array(delta)
        try:
            yield
        finally:
            self.ours.llm_decoder.bias = saved_ours
            with torch.no_grad():
                self.ref.llm_decoder.bias.copy_(saved_ref)
                if self._upstream is not None:
                    self._upstream.llm_decoder.bias.copy_(saved_ref)


def load_upstream_qwen2lm(ref):
    """Execute the latest upstream `llm.py` from git and build its `Qwen2LM` around `ref`'s backbone."""
    try:
        src = subprocess.run(
            ["git", "-C", UPSTREAM_REPO, "show", "HEAD:cosyvoice/llm/llm.py"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        head = subprocess.run(
            ["git", "-C", UPSTREAM_REPO, "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"no upstream CosyVoice checkout at {UPSTREAM_REPO}")
    # The upstream module imports an ONNX helper that the reference wheel lacks;
    # only its `online_feature` flag is read by Qwen2LM (False: no extractor).
    stub = types.ModuleType("cosyvoice.utils.onnx")
    stub.online_feature = False
    stub.onnx_path = ""
    stub.SpeechTokenExtractor = None
    saved = sys.modules.get("cosyvoice.utils.onnx")
    sys.modules["cosyvoice.utils.onnx"] = stub
    try:
        module = types.ModuleType("cosyvoice_upstream_llm")
        exec(compile(src, f"upstream@{head[:12]}:cosyvoice/llm/llm.py", "exec"), module.__dict__)
    finally:
        if saved is None:
            sys.modules.pop("cosyvoice.utils.onnx", None)
        else:
            sys.modules["cosyvoice.utils.onnx"] = saved
    up = module.Qwen2LM(
        ref.llm_input_size,
        ref.llm_output_size,
        ref.speech_token_size,
        ref.llm,
        None,
        mix_ratio=[5, 15],
    )
    up.load_state_dict(ref.state_dict(), strict=True)
    return up.eval()


@pytest.fixture(scope="module")
def tiny(tiny_pt_dir: Path) -> Pair:
    return Pair(tiny_pt_dir)


# ------------------------------------------------------------------ greedy rules


def masked_argmax_torch(scores) -> int:
    """Arg-max over the speech tokens and eos (6562/6563 masked)."""
    return int(scores[: S + 1].argmax())


class MaskedGreedy:
    """Ours: arg-max over the speech tokens and eos (6562/6563 masked)."""

    window = 0

    def __call__(self, logp: mx.array, recent: mx.array, key: mx.array) -> mx.array:
        return mx.argmax(logp[: S + 1]).astype(mx.int32)


def official_greedy(scores, decoded_tokens, sampling):
    return torch.tensor(masked_argmax_torch(scores))


class Rule6562:
    """Ours: arg-max over speech tokens, but 6562 when floor(100 * max log-prob) is a multiple of 3.

    The rule depends on the exact log-probability, so re-fed inputs give new decisions.
    """

    window = 0

    def __call__(self, logp: mx.array, recent: mx.array, key: mx.array) -> mx.array:
        a = mx.argmax(logp[:S]).astype(mx.int32)
        skip = mx.floor(logp[a] * 100).astype(mx.int32) % 3 == 0
        return mx.where(skip, S + 1, a)


def official_rule6562(scores, decoded_tokens, sampling):
    a = int(scores[:S].argmax())
    skip = int(np.floor(float(scores[a]) * 100)) % 3 == 0
    return torch.tensor(S + 1 if skip else a)


class HashFill:
    """Ours: the arg-max over speech tokens (and eos if `with_eos`), or a fill token when
    floor(10 * its log-probability) is a multiple of `every` (never when `every` is 0).

    A pure function of the scores, so look-ahead draws that are discarded do not matter.
    """

    window = 0

    def __init__(self, every: int, with_eos: bool = False):
        self.every, self.top = every, S + 1 if with_eos else S

    def __call__(self, logp: mx.array, recent: mx.array, key: mx.array) -> mx.array:
        a = mx.argmax(logp[: self.top]).astype(mx.int32)
        if not self.every:
            return a
        fill = mx.floor(logp[a] * 10).astype(mx.int32) % self.every == 0
        return mx.where(fill, FILL, a)


def official_hash_fill(every: int, with_eos: bool = False) -> Callable:
    top = S + 1 if with_eos else S

    def sample(scores, decoded_tokens, sampling):
        a = int(scores[:top].argmax())
        if every and int(np.floor(float(scores[a]) * 10)) % every == 0:
            return torch.tensor(FILL)
        return torch.tensor(a)

    return sample


# -------------------------------------------------------------------- helpers


def t2(x) -> torch.Tensor:
    return torch.tensor(np.asarray(x), dtype=torch.int32).reshape(1, -1)


def random_inputs(seed: int, n_text: int = 12, n_prompt_text: int = 7, n_prompt_speech: int = 30):
    rng = np.random.default_rng(seed)
    return (
        rng.integers(0, 151000, n_text),
        rng.integers(0, 151000, n_prompt_text),
        rng.integers(0, S, n_prompt_speech),
    )


def official_inference(
    module, text, prompt_text, prompt_speech, sampling: Callable, **kw
) -> list[int]:
    module.sampling = sampling
    with torch.inference_mode():
        gen = module.inference(
            t2(text),
            torch.tensor([len(text)], dtype=torch.int32),
            t2(prompt_text),
            torch.tensor([len(prompt_text)], dtype=torch.int32),
            t2(prompt_speech),
            torch.tensor([len(prompt_speech)], dtype=torch.int32),
            torch.zeros(1, 192),
            **kw,
        )
        return [int(t) for t in gen]


def collect(gen: Iterator, limit: int) -> tuple[list[int], str | None]:
    """Up to `limit` tokens from a generator, and the name of the exception that ended it, if any."""
    out = []
    try:
        for t in itertools.islice(gen, limit):
            out.append(int(t))
    except (ValueError, RuntimeError) as e:
        return out, type(e).__name__
    return out, None


def official_bistream(module, chunks, prompt_text, prompt_speech, sampling, limit: int):
    module.sampling = sampling
    with torch.inference_mode():
        gen = module.inference_bistream(
            (t2(c) for c in chunks),
            t2(prompt_text),
            torch.tensor([len(prompt_text)], dtype=torch.int32),
            t2(prompt_speech),
            torch.tensor([len(prompt_speech)], dtype=torch.int32),
            torch.zeros(1, 192),
        )
        return collect(gen, limit)


def logits_parity(pair: Pair, seed: int, n_steps: int) -> tuple[float, float]:
    """Teacher-forced prefill + `n_steps` cached decode steps; max abs logit difference (prefill, steps)."""
    text, prompt_text, prompt_speech = random_inputs(seed)
    steps = np.random.default_rng(seed + 100).integers(0, S + 3, n_steps)
    ref, ours = pair.ref, pair.ours
    with torch.inference_mode():
        emb = ref.llm.model.model.embed_tokens(torch.cat([t2(prompt_text), t2(text)], 1).long())
        x = torch.cat(
            [
                ref.llm_embedding.weight[0].reshape(1, 1, -1),
                emb,
                ref.llm_embedding.weight[1].reshape(1, 1, -1),
                ref.speech_embedding(t2(prompt_speech).long()),
            ],
            1,
        )
        ref_logits, cache = [], None
        for i in range(n_steps + 1):
            seq = x.shape[1] + (0 if cache is None else cache[0][0].shape[2])
            masks = torch.tril(torch.ones((1, seq, seq))).to(torch.bool)
            y, cache = ref.llm.forward_one_step(x, masks=masks, cache=cache)
            ref_logits.append(ref.llm_decoder(y[:, -1])[0].numpy())
            if i < n_steps:
                x = ref.speech_embedding.weight[int(steps[i])].reshape(1, 1, -1)
    c = ours.make_cache()
    x = ours.prompt_input(text, prompt_text, prompt_speech)
    errs = []
    for i in range(n_steps + 1):
        logits = ours.forward_one_step(x, c)[0]
        errs.append(float(np.abs(np.array(logits) - ref_logits[i]).max()))
        if i < n_steps:
            x = ours.speech_embedding(mx.array([[int(steps[i])]]))
    return errs[0], max(errs[1:])


# ----------------------------------------------------------------- tiny: logits


def test_logits_prefill_and_100_cached_steps(tiny: Pair) -> None:
    prefill, steps = logits_parity(tiny, seed=0, n_steps=110)
    assert prefill <= LOGIT_TOL, f"prefill logits max abs diff {prefill:.2e}"
    assert steps <= LOGIT_TOL, f"decode logits max abs diff {steps:.2e} over 110 cached steps"


def test_sanitized_keys_cover_the_official_state(tiny: Pair) -> None:
    from mlx.utils import tree_flatten

    official = set(tiny.ref.state_dict())
    ours = {k for k, _ in tree_flatten(tiny.ours.parameters())}
    mapped = set(Qwen2LM.sanitize({k: np.zeros(1) for k in official}))
    assert mapped == ours
    assert official - {"llm.model.lm_head.weight"} == {
        k.replace("llm.", "llm.model.model.", 1) if k.startswith("llm.") else k for k in ours
    }


# ----------------------------------------------------------------- tiny: greedy


@pytest.mark.parametrize("seed,n_prompt_speech", [(0, 30), (1, 0)])
def test_greedy_tokens_equal_installed_official(
    tiny: Pair, seed: int, n_prompt_speech: int
) -> None:
    """No eos or 6562/6563 is chosen here, so both behaviours equal the installed code."""
    text, prompt_text, prompt_speech = random_inputs(
        seed, n_text=6, n_prompt_speech=n_prompt_speech
    )
    ref = official_inference(tiny.ref, text, prompt_text, prompt_speech, official_greedy)
    assert len(ref) == 120  # max_len = 6 * 20: no eos
    for behaviour in ("legacy", "upstream"):
        ours = list(
            tiny.ours.inference(
                text, prompt_text, prompt_speech, sampling=MaskedGreedy(), behaviour=behaviour
            )
        )
        first = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), None)
        assert ours == ref, f"{behaviour}: first difference at {first}"


def test_legacy_skips_6562_and_refeeds_like_installed_official(tiny: Pair) -> None:
    """Legacy: 6562 is not yielded and the previous input is fed again (the installed code's `continue`).

    (At the very first step the installed code cannot re-feed the prompt: its
    mask has the wrong size and torch raises. Inputs are chosen to avoid that.)
    """
    for seed in range(3, 30):
        text, prompt_text, prompt_speech = random_inputs(seed, n_text=5)
        upstream = list(tiny.ours.inference(text, prompt_text, prompt_speech, sampling=Rule6562()))
        if upstream:
            break
    ref = official_inference(tiny.ref, text, prompt_text, prompt_speech, official_rule6562)
    ours = list(
        tiny.ours.inference(
            text, prompt_text, prompt_speech, sampling=Rule6562(), behaviour="legacy"
        )
    )
    assert ours == ref
    assert 0 < len(ref) < 100, "the rule should have skipped some steps"
    assert upstream == ref[: len(upstream)] and len(upstream) < len(ref), "upstream stops at 6562"


def test_eos_below_minimum_length(tiny: Pair) -> None:
    """eos made the arg-max everywhere: upstream masks it below min_len; legacy re-draws and gives up."""
    text, prompt_text, prompt_speech = random_inputs(4, n_text=9)
    with tiny.bias({S: 50.0}):
        upstream = list(
            tiny.ours.inference(text, prompt_text, prompt_speech, sampling=MaskedGreedy())
        )
        assert len(upstream) == 18  # min_len = 9 * 2, then eos
        with pytest.raises(RuntimeError):
            official_inference(tiny.ref, text, prompt_text, prompt_speech, official_greedy)
        with pytest.raises(RuntimeError):
            list(
                tiny.ours.inference(
                    text, prompt_text, prompt_speech, sampling=MaskedGreedy(), behaviour="legacy"
                )
            )
    # the tokens before eos are the greedy tokens among the rest
    free = list(tiny.ours.inference(text, prompt_text, prompt_speech, sampling=MaskedGreedy()))
    assert upstream == free[:18]


# ------------------------------------------------------------ tiny: bistream


BISTREAM_CASES = {
    # name: (prompt text length, prompt speech length, chunk sizes, `every` of the fill rule)
    "handover": (7, 20, [3, 4, 6, 2, 5, 0, 9, 1, 7, 8, 5, 6, 4, 9], 11),
    "long_prompt": (12, 47, [2, 8, 5, 5, 3], 0),
    "no_prompt_speech": (4, 0, [5, 5, 5, 2, 6, 6, 6, 7], 9),
    "text_too_short": (3, 40, [2, 1], 0),  # prompt speech never fully consumed
    "to_the_end": (5, 15, [4, 6, 5, 3], 13),  # hand-overs, then the final phase
}
LIMIT = 80


def bistream_inputs(seed: int, n_prompt_text: int, n_prompt_speech: int, sizes: list[int]):
    rng = np.random.default_rng(seed)
    chunks = [rng.integers(0, 151000, n) for n in sizes]
    return chunks, rng.integers(0, 151000, n_prompt_text), rng.integers(0, S, n_prompt_speech)


@pytest.mark.parametrize("case", list(BISTREAM_CASES))
def test_bistream_equals_installed_official(tiny: Pair, case: str) -> None:
    """Legacy bistream (fill tokens only when the model emits them) against the installed code.

    The official stream is capped at `limit` tokens (it has no cap of its own).
    """
    n_pt, n_ps, sizes, every = BISTREAM_CASES[case]
    chunks, prompt_text, prompt_speech = bistream_inputs(5, n_pt, n_ps, sizes)
    limit = LIMIT
    with tiny.bias({S: -50.0, S + 1: -50.0}):
        ref = official_bistream(
            tiny.ref, chunks, prompt_text, prompt_speech, official_hash_fill(every), limit
        )
        ours = collect(
            tiny.ours.inference_bistream(
                iter(chunks),
                prompt_text,
                prompt_speech,
                sampling=HashFill(every),
                max_tokens=limit,
                max_token_text_ratio=1000,  # the official stream has no bound: compare uncapped
                behaviour="legacy",
            ),
            limit + 10,
        )
    assert ours == ref
    assert len(ref[0]) == limit or ref[1] == "ValueError"


def test_bistream_cap_from_text_length(tiny: Pair) -> None:
    chunks, prompt_text, prompt_speech = bistream_inputs(6, 7, 20, [4, 4, 4])
    with tiny.bias({S: -50.0, S + 1: -50.0}):
        ours = list(
            tiny.ours.inference_bistream(
                iter(chunks),
                prompt_text,
                prompt_speech,
                sampling=MaskedGreedy(),
                max_token_text_ratio=3,
            )
        )
    # 10 tokens until the scheduled fill, 13 more until the bound (8 text tokens * 3) forces a
    # fill, then after the text ends up to the bound for all 12 text tokens: 36
    assert len(ours) == 36


# ------------------------------------------------------ tiny: latest upstream


def test_upstream_greedy_and_stops_equal_latest_upstream(tiny: Pair) -> None:
    up = tiny.upstream()
    text, prompt_text, prompt_speech = random_inputs(7, n_text=6)
    ref = official_inference(up, text, prompt_text, prompt_speech, official_greedy)
    assert (
        list(tiny.ours.inference(text, prompt_text, prompt_speech, sampling=MaskedGreedy())) == ref
    )
    assert len(ref) == 120
    ref = official_inference(up, text, prompt_text, prompt_speech, official_rule6562)
    ours = list(tiny.ours.inference(text, prompt_text, prompt_speech, sampling=Rule6562()))
    assert ours == ref and len(ref) < 120
    text9, _, _ = random_inputs(8, n_text=9)
    with tiny.bias({S: 50.0}):
        ref = official_inference(up, text9, prompt_text, prompt_speech, official_greedy)
        ours = list(tiny.ours.inference(text9, prompt_text, prompt_speech, sampling=MaskedGreedy()))
    assert ours == ref and len(ref) == 18


@pytest.mark.parametrize("case", list(BISTREAM_CASES))
def test_bistream_equals_latest_upstream(tiny: Pair, case: str) -> None:
    """Upstream bistream: fill tokens forced on the official schedule (plus any the sampler emits)."""
    up = tiny.upstream()
    n_pt, n_ps, sizes, every = BISTREAM_CASES[case]
    chunks, prompt_text, prompt_speech = bistream_inputs(8, n_pt, n_ps, sizes)
    limit = LIMIT
    with tiny.bias({S: -50.0, S + 1: -50.0}):
        ref = official_bistream(
            up, chunks, prompt_text, prompt_speech, official_hash_fill(every), limit
        )
        ours = collect(
            tiny.ours.inference_bistream(
                iter(chunks),
                prompt_text,
                prompt_speech,
                sampling=HashFill(every),
                max_tokens=limit,
                max_token_text_ratio=1000,  # the official stream has no bound: compare uncapped
            ),
            limit + 10,
        )
    assert ours == ref
    assert len(ref[0]) == limit or ref[1] == "ValueError"


EOS_BIAS = 2.0


def test_bistream_upstream_reaches_eos_like_latest_upstream(tiny: Pair) -> None:
    """Final phase: eos allowed once the text has ended (made likely by a bias), on both sides."""
    up = tiny.upstream()
    chunks, prompt_text, prompt_speech = bistream_inputs(9, 6, 16, [5, 5, 5, 5, 3])
    with tiny.bias({S: EOS_BIAS, S + 1: -50.0}):
        sampling = official_hash_fill(0, with_eos=True)
        ref = official_bistream(up, chunks, prompt_text, prompt_speech, sampling, 500)
        # the inner loop masks eos (sampling_ids), the final phase lets it through
        ours = collect(
            tiny.ours.inference_bistream(
                iter(chunks),
                prompt_text,
                prompt_speech,
                sampling=HashFill(0, with_eos=True),
                max_tokens=500,
            ),
            510,
        )
    assert ours == ref
    assert ref[1] is None and len(ref[0]) < 500, "the stream should end with eos"


# ------------------------------------------------------------------ full size


@pytest.fixture(scope="module")
def full() -> Pair:
    pytest.importorskip("cosyvoice", reason="the official CosyVoice code is not installed")
    from cosyvoice2.testing.synthetic import cached_official_dir

    return Pair(cached_official_dir("full", onnx=False))


@pytest.mark.full
def test_full_logits_prefill_and_100_cached_steps(full: Pair) -> None:
    prefill, steps = logits_parity(full, seed=0, n_steps=100)
    print(f"\n[llm full] logits max abs diff: prefill {prefill:.2e}, 100 cached steps {steps:.2e}")
    assert prefill <= LOGIT_TOL, f"prefill logits max abs diff {prefill:.2e}"
    assert steps <= LOGIT_TOL, f"decode logits max abs diff {steps:.2e} over 100 cached steps"


@pytest.mark.full
def test_full_greedy_tokens_equal_installed_official(full: Pair) -> None:
    text, prompt_text, prompt_speech = random_inputs(0, n_text=6, n_prompt_speech=75)
    ref = official_inference(full.ref, text, prompt_text, prompt_speech, official_greedy)
    ours = list(full.ours.inference(text, prompt_text, prompt_speech, sampling=MaskedGreedy()))
    assert len(ref) == 120
    first = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), None)
    assert ours == ref, f"first difference at {first}"
