"""The official PyTorch code as a bench target: the same weights, inputs and work as ours.

Runs in its own worker process, started without `LD_PRELOAD` (a preloaded OpenBLAS
distorts torch's timing) and with 2 torch threads. The official modules are loaded
from the synthetic official dir (or `--model`/`official_model`, an official dir)
with `cosyvoice2_testing.official.load_official`, strictly.

What is timed, and how it follows the installed official code (`cosyvoice/cli/model.py`,
`cosyvoice/llm/llm.py`):
- LLM: `Qwen2LM.inference` transcribed step for step (`official_lm_input`,
  `official_decode`): `embed_tokens` for prompt text and text, `llm_embedding` for sos
  and task id, `speech_embedding` for the prompt tokens, then `inference_wrapper`'s loop:
  `Qwen2Encoder.forward_one_step` (the full `Qwen2ForCausalLM` with its KV cache),
  `llm_decoder`, `log_softmax` and `sampling_ids` (ras sampling), min/max lengths 2x/20x
  the text. The transcription exists to time the LLM token by token; a test checks that
  it yields the tokens of the wheel's `CosyVoice2Model.llm_job` (`Qwen2LM.inference`).
  Fixed-length mode (the bench's default, not official) sets the scores of ids >=
  `speech_token_size` to -inf before sampling and sets min and max length to the
  target, as on our side.
- The Qwen2 backbone runs the attention implementation that the official
  `Qwen2ForCausalLM.from_pretrained` picks (sdpa with a torch that has it);
  `load_official` builds the backbone from its config with eager attention (what
  the parity tests compare against), so `load` switches it back
  (`from_pretrained_attention`).
- flow and HiFT: `CosyVoice2Model.token2wav` (`CausalMaskedDiffWithXvec.inference`, then
  `HiFTGenerator.inference`). The official flow hard-codes 10 Euler steps; other step
  counts are passed by wrapping the CFM's `forward` to set `n_timesteps`.
- streaming: `CosyVoice2Model.tts`'s schedule (`OfficialStream`): hop 25 tokens, the
  first hop padded so prompt + hop is a multiple of 25, 3 look-ahead tokens, each chunk
  `token2wav(stream=True, finalize=False)` on the tokens so far; the last call on every
  token with `finalize=True` and `stream` left at its default, False, so the flow runs
  it with full attention, as `tts` does. Without streaming: one `token2wav` call,
  `token_offset=0`, `finalize=True`. One deviation, for timing: `tts` decodes in a
  second thread and its generator polls for tokens every 0.1 s; here token2wav runs in
  the decoding thread as soon as a chunk's tokens exist, so no chunk waits for a poll
  and the first chunk does not share the cores with the LLM decoding ahead (the best
  first-chunk time the official code can give); the whole stream forgoes the overlap
  of decoding with the flow that `tts`'s thread allows.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.cases import Case, Work
from bench.interface import CallTimings, Prepared, official_dir_label
from bench.timing import CallClock

TORCH_THREADS = int(os.environ.get("BENCH_TORCH_THREADS", "2"))
"""Torch threads of the official worker: 2 (this machine's cores); `BENCH_TORCH_THREADS` overrides
(tests use 1: with 2 threads on a loaded shared machine torch's spinning threads slow it many-fold)."""

MIN_TOKEN_TEXT_RATIO = 2
MAX_TOKEN_TEXT_RATIO = 20
"""`Qwen2LM.inference`'s defaults: at least 2 and at most 20 speech tokens per text token."""


@dataclass
class _Official:
    llm: Any
    flow: Any
    hift: Any
    model: Any  # CosyVoice2Model (token2wav and its streaming caches)
    sample_rate: int


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for dist in ("torch", "cosyvoice-minicpmo", "transformers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


# ------------------------------------------------------------------ the official LLM, transcribed


def official_lm_input(llm: Any, text: Any, prompt_text: Any, prompt_speech_token: Any) -> Any:
    """`Qwen2LM.inference` up to its decode loop: the prefill embeddings (1, T, D).

    sos, the prompt text and the text (Qwen2's `embed_tokens`), the task id, the prompt
    speech tokens (`speech_embedding`; none: an empty block, as the official code).
    """
    import torch

    text = llm.llm.model.model.embed_tokens(torch.concat([prompt_text, text], dim=1))
    sos_eos_emb = llm.llm_embedding.weight[llm.sos_eos].reshape(1, 1, -1)
    task_id_emb = llm.llm_embedding.weight[llm.task_id].reshape(1, 1, -1)
    if prompt_speech_token.shape[1] != 0:
        prompt_speech_token_emb = llm.speech_embedding(prompt_speech_token)
    else:
        prompt_speech_token_emb = torch.zeros(1, 0, llm.llm_input_size, dtype=text.dtype)
    return torch.concat([sos_eos_emb, text, task_id_emb, prompt_speech_token_emb], dim=1)


def official_decode(
    llm: Any,
    lm_input: Any,
    min_len: int,
    max_len: int,
    sampling: int = 25,
    fixed_length: bool = False,
) -> Iterator[int]:
    """`Qwen2LM.inference_wrapper` (the path without vLLM), step for step.

    Each step runs the backbone on the new positions with the KV cache, samples with
    `sampling_ids` (eos refused before `min_len` tokens), stops at eos, skips the
    other ids >= `speech_token_size` without feeding them back (the next step re-runs
    the last input), and yields each speech token. `fixed_length` (the bench's, not
    official) scores ids >= `speech_token_size` -inf, so exactly `max_len` tokens come.
    """
    import torch

    out_tokens: list[int] = []
    cache = None
    for i in range(max_len):
        size = lm_input.shape[1]
        masks = torch.tril(torch.ones((1, size, size), device=lm_input.device)).to(torch.bool)
        y_pred, cache = llm.llm.forward_one_step(lm_input, masks=masks, cache=cache)
        logp = llm.llm_decoder(y_pred[:, -1]).log_softmax(dim=-1)
        if fixed_length:
            logp[:, llm.speech_token_size :] = -float("inf")
        top_ids = llm.sampling_ids(
            logp.squeeze(dim=0), out_tokens, sampling, ignore_eos=i < min_len
        ).item()
        if top_ids == llm.speech_token_size:
            break
        if top_ids > llm.speech_token_size:
            continue
        yield top_ids
        out_tokens.append(top_ids)
        lm_input = llm.speech_embedding.weight[top_ids].reshape(1, 1, -1)


def official_speech_tokens(
    llm: Any,
    text: Any,
    prompt_text: Any,
    prompt_speech_token: Any,
    fixed_length: int | None = None,
) -> Iterator[int]:
    """The speech tokens of `Qwen2LM.inference` (or exactly `fixed_length` of them)."""
    n_text = text.shape[1]
    if fixed_length is None:
        min_len = int(n_text * MIN_TOKEN_TEXT_RATIO)
        max_len = int(n_text * MAX_TOKEN_TEXT_RATIO)
    else:
        min_len = max_len = fixed_length
    lm_input = official_lm_input(llm, text, prompt_text, prompt_speech_token)
    yield from official_decode(
        llm, lm_input, min_len, max_len, fixed_length=fixed_length is not None
    )


def from_pretrained_attention(qwen: Any, pretrain_path: str | Path) -> str:
    """Give `qwen` (a `Qwen2ForCausalLM`) the attention implementation `from_pretrained` picks.

    `Qwen2Encoder` builds its backbone with `Qwen2ForCausalLM.from_pretrained(path)`,
    which picks the implementation from the config at `path` and what torch offers
    (`_autoset_attn_implementation`: sdpa where available, else eager). The choice is
    read at every forward from the config that all the backbone's modules share.
    """
    from transformers import Qwen2Config

    config = Qwen2Config.from_pretrained(str(pretrain_path))
    picked = (
        type(qwen)
        ._autoset_attn_implementation(config, torch_dtype=None, check_device_map=False)
        ._attn_implementation
    )
    qwen.config._attn_implementation = picked
    return picked


# ------------------------------------------------------------- the official token2wav schedule


class OfficialStream:
    """`CosyVoice2Model.tts`'s token2wav calls, driven by tokens as they arrive.

    `push` each token (it returns the chunks that token completes), then `finish`
    (the last call on every token). Streaming: a chunk as soon as the tokens after the
    offset reach the hop (the first padded so prompt + hop is a multiple of
    `token_hop_len`) plus `pre_lookahead_len`, with `stream=True, finalize=False`; the
    last call with `finalize=True` and `stream` at `token2wav`'s default (False: full
    attention). Not streaming: `push` returns nothing and `finish` makes the one call.
    """

    def __init__(
        self,
        model: Any,
        prompt_token: Any,
        prompt_feat: Any,
        embedding: Any,
        stream: bool,
        uuid: str = "bench",
    ) -> None:
        import numpy as np

        self.model, self.stream, self.uuid = model, stream, uuid
        self.prompt_token, self.prompt_feat, self.embedding = prompt_token, prompt_feat, embedding
        self.tokens: list[int] = []
        self.token_offset = 0
        hop = model.token_hop_len
        self.prompt_token_pad = int(
            np.ceil(prompt_token.shape[1] / hop) * hop - prompt_token.shape[1]
        )
        model.hift_cache_dict[uuid] = None

    def _hop(self) -> int:
        pad = self.prompt_token_pad if self.token_offset == 0 else 0
        return self.model.token_hop_len + pad

    def _token2wav(self, tokens: list[int], finalize: bool) -> Any:
        import torch

        kwargs: dict[str, Any] = {"stream": True} if not finalize else {}
        return self.model.token2wav(
            token=torch.tensor(tokens).unsqueeze(dim=0),
            prompt_token=self.prompt_token,
            prompt_feat=self.prompt_feat,
            embedding=self.embedding,
            token_offset=self.token_offset if self.stream else 0,
            uuid=self.uuid,
            finalize=finalize,
            **kwargs,
        )

    def push(self, token: int) -> list[Any]:
        self.tokens.append(token)
        chunks = []
        look = self.model.flow.pre_lookahead_len
        while self.stream and len(self.tokens) - self.token_offset >= self._hop() + look:
            hop = self._hop()
            chunks.append(self._token2wav(self.tokens[: self.token_offset + hop + look], False))
            self.token_offset += hop
        return chunks

    def finish(self) -> Any:
        try:
            return self._token2wav(self.tokens, True)
        finally:
            self.model.hift_cache_dict.pop(self.uuid, None)


# ----------------------------------------------------------------------------------- target


class OfficialTarget:
    name = "official"
    backend = "torch"

    def env(self) -> dict[str, str | None]:
        return {
            "LD_PRELOAD": None,
            "OMP_NUM_THREADS": str(TORCH_THREADS),
            "MKL_NUM_THREADS": str(TORCH_THREADS),
        }

    def supports(self, case: Case) -> str | None:
        if case.llm != "fp32" or case.dtype != "fp32":
            return "the official CPU code runs fp32 only"
        if case.first_hop is not None:
            return "the official code has one streaming schedule (first hop 25, padded)"
        if case.kernels != "auto":
            return "the official code has no optional kernels"
        if case.saved or case.final != "full":
            return "the official code has no saved-speaker caches and one final chunk"
        return None

    def prepare(self, cases: list[Case], options: dict[str, Any]) -> Prepared:
        path = options.get("official_model")
        model = options.get("model")
        if path is None and model is not None and (Path(model) / "llm.pt").exists():
            path = model
        if path is not None:
            path = Path(path)
            weights: dict[str, Any] = {"label": official_dir_label(path), "path": str(path)}
        elif model is not None:
            raise ValueError(
                f"{model} is not an official model dir (no llm.pt): the official reference"
                " needs one (official_model)"
            )
        else:
            from cosyvoice2_testing.synthetic import cached_official_dir

            size = options.get("size", "full")
            # the same dir our target converts (its ONNX files are not used here)
            path = cached_official_dir(size, seed=0, onnx=True)
            weights = {"label": "synthetic", "size": size, "seed": 0, "path": str(path)}
        return Prepared(
            weights=weights,
            options={"official_dir": str(path)},
            versions=_versions(),
        )

    def load(self, case: Case, prepared: Prepared) -> _Official:
        import torch

        torch.set_num_threads(TORCH_THREADS)
        from cosyvoice2_testing.official import load_official
        from cosyvoice2_testing.shims import install_shims

        install_shims()
        from cosyvoice.cli.model import CosyVoice2Model

        d = Path(prepared.options["official_dir"])
        llm, flow, hift = (load_official(p, d) for p in ("llm", "flow", "hift"))
        from_pretrained_attention(llm.llm.model, d / "CosyVoice-BlankEN")
        model = CosyVoice2Model(llm, flow, hift, fp16=False)
        # this wheel's CosyVoice2Model.__init__ leaves `llm` unset (its llm_job reads it)
        model.llm = llm
        _set_steps(flow, case.steps)
        return _Official(llm, flow, hift, model, sample_rate=24000)

    def unload(self, handle: Any) -> None:
        pass

    def run(self, h: _Official, case: Case, work: Work) -> CallTimings:
        import torch

        x = {k: torch.from_numpy(v) for k, v in work.inputs().items()}
        clock = CallClock()
        flow_inference, hift_inference = h.flow.inference, h.hift.inference
        h.flow.inference = clock.timed("flow", flow_inference)
        h.hift.inference = clock.timed("hift", hift_inference)
        try:
            with torch.inference_mode():
                self._call(h, case, work, x, clock)
        finally:
            h.flow.inference, h.hift.inference = flow_inference, hift_inference
        return clock.timings(case.stream, {"torch_threads": float(torch.get_num_threads())})

    def _call(self, h: _Official, case: Case, work: Work, x: dict, clock: CallClock) -> None:
        clock.start()
        stream = OfficialStream(
            h.model, x["prompt_speech_token"], x["prompt_feat"], x["embedding"], case.stream
        )
        tokens = official_speech_tokens(
            h.llm,
            x["text"],
            x["prompt_text"],
            x["prompt_speech_token"],
            fixed_length=work.speech_tokens if work.fixed_length else None,
        )
        for token in clock.tokens(tokens):
            for wav in stream.push(token):
                clock.chunk(wav.shape[-1] / h.sample_rate)
        wav = stream.finish()
        clock.chunk(wav.shape[-1] / h.sample_rate)


def _set_steps(flow: Any, steps: int) -> None:
    """Make the official flow's CFM use `steps` Euler steps (its `inference` passes 10)."""
    decoder = flow.decoder
    forward = type(decoder).forward

    def forward_with_steps(*args: Any, **kwargs: Any) -> Any:
        kwargs["n_timesteps"] = steps
        return forward(decoder, *args, **kwargs)

    decoder.forward = forward_with_steps
