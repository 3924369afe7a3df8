"""The official PyTorch code as a bench target: the same weights, inputs and work as ours.

Runs in its own worker process, started without `LD_PRELOAD` (a preloaded OpenBLAS
distorts torch's timing) and with 2 torch threads. The official modules are loaded
from the synthetic official dir (or `--model`/`official_model`, an official dir)
with `cosyvoice2.testing.official.load_official`, strictly.

What is timed, and how it follows the official code:
- LLM: the official `Qwen2LM.inference` decode loop, step for step: `embed_tokens` for
  the text, `llm_embedding` for sos and task id, `speech_embedding` for the prompt
  tokens, `Qwen2Encoder.forward_one_step` (the full `Qwen2ForCausalLM`, as the official
  code runs it), `llm_decoder`, `log_softmax`, and its `sampling_ids` (ras sampling).
  Fixed-length mode sets the scores of ids >= `speech_token_size` to -inf before
  sampling and stops at the target length, as on our side.
- flow and HiFT: `CosyVoice2Model.token2wav` (`CausalMaskedDiffWithXvec.inference`, then
  `HiFTGenerator.inference`), with `finalize=True` and no caches when not streaming.
  The official flow hard-codes 10 Euler steps; other step counts are passed by
  wrapping the CFM's `forward` to set `n_timesteps`.
- streaming: the official `CosyVoice2Model.token2wav` with its schedule (hop 25 tokens,
  the first padded so prompt + hop is a multiple of 25, 3 look-ahead tokens,
  `finalize=True` for the rest), driven in one thread as tokens arrive (the official
  `tts` runs the LLM in a second thread and polls every 0.1 s; driving it in one
  thread gives the official code its best first-chunk figure, ../shared/NOTES.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.cases import Case, Work
from bench.interface import CallTimings, Prepared
from bench.timing import CallClock

TORCH_THREADS = int(os.environ.get("BENCH_TORCH_THREADS", "2"))
"""Torch threads of the official worker: 2 (this machine's cores); `BENCH_TORCH_THREADS` overrides
(tests use 1: with 2 threads on a loaded shared machine torch's spinning threads slow it many-fold)."""


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
            label = "synthetic" if (path / "synthetic.json").exists() else "real"
            weights: dict[str, Any] = {"label": label, "path": str(path)}
        elif model is not None:
            raise ValueError(
                f"{model} is not an official model dir (no llm.pt): the official reference"
                " needs one (official_model)"
            )
        else:
            from cosyvoice2.testing.synthetic import cached_official_dir

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
        from cosyvoice2.testing.official import load_official
        from cosyvoice2.testing.shims import install_shims

        install_shims()
        from cosyvoice.cli.model import CosyVoice2Model

        d = prepared.options["official_dir"]
        llm, flow, hift = (load_official(p, d) for p in ("llm", "flow", "hift"))
        model = CosyVoice2Model(llm, flow, hift, fp16=False)
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
        import numpy as np
        import torch

        llm, model = h.llm, h.model
        n = work.speech_tokens
        clock.start()
        text = torch.concat([x["prompt_text"], x["text"]], dim=1)
        text_emb = llm.llm.model.model.embed_tokens(text)
        sos = llm.llm_embedding.weight[llm.sos_eos].reshape(1, 1, -1)
        task = llm.llm_embedding.weight[llm.task_id].reshape(1, 1, -1)
        prompt_emb = llm.speech_embedding(x["prompt_speech_token"])
        lm_input = torch.concat([sos, text_emb, task, prompt_emb], dim=1)
        # The official max/min lengths (ratios of the new text's length); fixed length overrides.
        max_len = n if work.fixed_length else int(work.text_tokens * 20)
        min_len = n if work.fixed_length else int(work.text_tokens * 2)

        tokens: list[int] = []
        uid = "bench"
        hop, look = model.token_hop_len, h.flow.pre_lookahead_len
        prompt_tok = x["prompt_speech_token"]
        pad = int(np.ceil(prompt_tok.shape[1] / hop) * hop - prompt_tok.shape[1])
        offset = 0
        model.hift_cache_dict[uid] = None

        def emit(finalize: bool) -> None:
            """The official token2wav on the tokens so far (streaming) or all of them."""
            nonlocal offset
            this_hop = hop + pad if offset == 0 else hop
            toks = tokens if finalize else tokens[: offset + this_hop + look]
            wav = model.token2wav(
                token=torch.tensor(toks).unsqueeze(0),
                prompt_token=prompt_tok,
                prompt_feat=x["prompt_feat"],
                embedding=x["embedding"],
                token_offset=offset if case.stream else 0,
                uuid=uid,
                stream=case.stream,
                finalize=finalize,
            )
            clock.chunk(wav.shape[-1] / h.sample_rate)
            offset += this_hop

        def decode():
            """The official decode loop (`inference_wrapper`), fixed length when asked."""
            nonlocal lm_input
            cache = None
            for i in range(max_len):
                size = lm_input.shape[1]
                mask = torch.tril(torch.ones((1, size, size))).to(torch.bool)
                y_pred, cache = llm.llm.forward_one_step(lm_input, masks=mask, cache=cache)
                logp = llm.llm_decoder(y_pred[:, -1]).log_softmax(dim=-1)
                if work.fixed_length:
                    logp[:, llm.speech_token_size :] = -float("inf")
                top = llm.sampling_ids(logp.squeeze(0), tokens, 25, ignore_eos=i < min_len)
                top = int(top.item()) if hasattr(top, "item") else int(top)
                if top == llm.speech_token_size:
                    return
                if top > llm.speech_token_size:
                    continue
                yield top
                lm_input = llm.speech_embedding.weight[top].reshape(1, 1, -1)

        for tok in clock.tokens(decode()):
            tokens.append(tok)
            if case.stream:
                this_hop = hop + pad if offset == 0 else hop
                if len(tokens) - offset >= this_hop + look:
                    emit(finalize=False)
        emit(finalize=True)
        model.hift_cache_dict.pop(uid, None)


def _set_steps(flow: Any, steps: int) -> None:
    """Make the official flow's CFM use `steps` Euler steps (its `inference` passes 10)."""
    decoder = flow.decoder
    forward = type(decoder).forward

    def forward_with_steps(*args: Any, **kwargs: Any) -> Any:
        kwargs["n_timesteps"] = steps
        return forward(decoder, *args, **kwargs)

    decoder.forward = forward_with_steps
