"""Our MLX pipeline as a bench target: the one file that knows the pipeline's API.

What it calls (keep in step with `cosyvoice2/`):

- weights: `cosyvoice2_testing.synthetic.cached_official_dir(size, seed=0, onnx=True)` (the
  synthetic official dir; the converter needs its ONNX files) and
  `cosyvoice2.convert.convert(src, dst, llm_dtype=..., llm_bits=...)`, once per LLM
  precision, cached under `<cache root>/bench/` (keyed by the synthetic generator's
  and the converter's format versions);
- loading: `cosyvoice2.load(mlx_dir, llm_kernels=case.kernels)` (the dir of the case's
  precision), or with `llm_dtype=`/`llm_bits=` for a `--model` MLX dir of another precision;
  flow/HiFT dtypes other than fp32 by `set_dtype` on `model.flow` and `model.hift`;
- a call: `cosyvoice2.model.Prompt(embedding, prompt_text, llm_speech_token,
  flow_speech_token, speech_feat)` built from the work's seeded inputs (as a saved
  speaker would give it: no frontend time), `model.speech_token_stream(text, prompt,
  seed=, sampling=, max_token_text_ratio=, min_token_text_ratio=)` for the tokens,
  and the pipeline's own tokens-to-audio generator `model.token2wav_stream(tokens,
  prompt, stream, speed, seed=, n_timesteps=, schedule=, timings=)` for the audio, whole
  or in chunks (`cosyvoice2.streaming.StreamSchedule(first_hop_len=case.first_hop)` when
  the case sets a first hop; the official schedule otherwise);
- per-stage times: the call's `bench.timing.CallClock` is its timing hook (`timings=`):
  the engine evaluates its flow and HiFT work inside the clock's `flow` and `hift`
  stages; nothing is patched;
- fixed length: `cosyvoice2.llm.default_sampler(config.llm)` wrapped in
  `bench.fixed_length.FixedLengthSampler` (ids >= `config.llm.speech_token_size`
  masked), with min and max token/text ratios that give exactly the target length,
  and `take_exact` on the token generator.
"""

from __future__ import annotations

import fcntl
import hashlib
import inspect
import json
from pathlib import Path
from typing import Any

from bench.cases import Case, Work
from bench.fixed_length import FixedLengthSampler, take_exact
from bench.interface import WEIGHTS_LABELS, CallTimings, Prepared, official_dir_label
from bench.timing import CallClock

# LLM precision names of the bench -> `cosyvoice2.convert.convert` / `cosyvoice2.load` arguments.
PRECISIONS: dict[str, dict[str, Any]] = {
    "fp32": {"llm_dtype": "float32"},
    "bf16": {"llm_dtype": "bfloat16"},
    "fp16": {"llm_dtype": "float16"},
    "8bit": {"llm_bits": 8},
    "4bit": {"llm_bits": 4},
}
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
SYNTHETIC_PROFILE = "sensitive"
"""The synthetic weights' profile (`cosyvoice2_testing.synthetic.PROFILES`): `sensitive`, so
that the LLM's precision drift shows in the fidelity figures (`bench.drift`)."""


def bench_cache() -> Path:
    from cosyvoice2_testing.synthetic import cache_root

    return cache_root() / "bench"


def converted_dir(official_dir: Path, precision: str, tag: str) -> Path:
    """The MLX dir of `official_dir` at an LLM precision, converted once and cached (locked)."""
    from cosyvoice2.convert import convert
    from cosyvoice2.model_dir import FORMAT_VERSION

    dst = bench_cache() / f"mlx-{tag}-{precision}-f{FORMAT_VERSION}"
    if (dst / "config.json").exists():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(dst.parent / f".{dst.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (dst / "config.json").exists():
            convert(official_dir, dst, **PRECISIONS[precision], overwrite=True)
    return dst


def _weights_label(mlx_dir: Path) -> str:
    """The `weights` an MLX dir's config records (see `cosyvoice2.convert`), else `unknown`."""
    meta = json.loads((mlx_dir / "config.json").read_text(encoding="utf-8"))
    label = meta.get("weights") if isinstance(meta, dict) else None
    return label if label in WEIGHTS_LABELS else "unknown"


def _dir_precision(mlx_dir: Path) -> str:
    from cosyvoice2.model_dir import llm_precision_name

    meta = json.loads((mlx_dir / "config.json").read_text(encoding="utf-8"))
    return llm_precision_name(meta.get("llm_precision", {"dtype": "float32"}))


class CosyVoice2Target:
    name = "cosyvoice2"
    backend = "mlx"

    def env(self) -> dict[str, str | None]:
        return {}

    def supports(self, case: Case) -> str | None:
        if case.flow_bits == 16 and case.dtype != "fp32":
            # what `cosyvoice2.load` refuses: recorded as such, not loaded to fail
            return (
                f"flow_bits 16 (bf16 products in a float32 flow) needs dtype fp32, not {case.dtype}"
            )
        return None

    def prepare(self, cases: list[Case], options: dict[str, Any]) -> Prepared:
        precisions = sorted({c.llm for c in cases if c.target == self.name})
        model = options.get("model")
        if model is not None:
            model = Path(model).resolve()
            if (model / "config.json").exists() and not (model / "llm.pt").exists():
                # A converted MLX dir: other precisions are made at load time from it.
                own = _dir_precision(model)
                dirs = {p: str(model) for p in precisions}
                overrides = {p: PRECISIONS[p] for p in precisions if p != own}
                weights = {"label": _weights_label(model), "path": str(model), "precision": own}
                return Prepared(weights, {"dirs": dirs, "load_overrides": overrides})
            if not (model / "llm.pt").exists():
                raise ValueError(f"{model}: neither an MLX model dir nor an official model dir")
            official = model
            tag = "dir-" + hashlib.sha256(str(model).encode()).hexdigest()[:12]
            weights = {"label": official_dir_label(model), "path": str(model)}
        else:
            from cosyvoice2_testing.synthetic import GENERATOR_VERSION, cached_official_dir

            size = options.get("size", "full")
            profile = options.get("profile", SYNTHETIC_PROFILE)
            official = cached_official_dir(size, seed=0, onnx=True, profile=profile)
            prof = "" if profile == "default" else f"-{profile}"
            tag = f"synthetic-{size}-seed0{prof}-g{GENERATOR_VERSION}"
            weights = {
                "label": "synthetic",
                "size": size,
                "seed": 0,
                "profile": profile,
                "path": str(official),
            }
        dirs = {p: str(converted_dir(official, p, tag)) for p in precisions}
        return Prepared(weights, {"dirs": dirs, "load_overrides": {}})

    def load(self, case: Case, prepared: Prepared) -> Any:
        import mlx.core as mx

        import cosyvoice2
        import cosyvoice2.model

        d = prepared.options["dirs"][case.llm]
        kwargs = dict(prepared.options["load_overrides"].get(case.llm, {}))
        accepts = inspect.signature(cosyvoice2.model.CosyVoice2.load).parameters
        if "llm_kernels" in accepts:
            kwargs["llm_kernels"] = case.kernels
        elif case.kernels != "auto":
            raise RuntimeError("this cosyvoice2 has no llm_kernels option")
        if case.flow_bits is not None or case.cfg is not None:
            if "flow_bits" not in accepts:
                raise RuntimeError("this cosyvoice2 has no flow_bits or inference_cfg_rate option")
        if case.cfg is not None:
            kwargs["inference_cfg_rate"] = case.cfg
        loads_dtype = "flow_dtype" in accepts
        if case.dtype != "fp32" and loads_dtype:  # cast as read, quantised after, as load does
            kwargs["flow_dtype"] = DTYPES[case.dtype]
        if (case.dtype == "fp32" or loads_dtype) and case.flow_bits is not None:
            kwargs["flow_bits"] = case.flow_bits
        model = cosyvoice2.load(d, **kwargs)
        if case.dtype != "fp32" and not loads_dtype:  # older commits: cast after load
            dtype = getattr(mx, DTYPES[case.dtype])
            model.flow.set_dtype(dtype)
            model.hift.set_dtype(dtype)
            if case.flow_bits is not None:  # quantised after the cast, as load would
                from cosyvoice2.flow.quantize import quantize_flow

                quantize_flow(model.flow, case.flow_bits, 64)
        # (load evaluated the flow and HiFT; some of their weights are now lazy views of the
        # packed forms the calls read, which evaluating them here would copy)
        mx.eval(model.llm.parameters())
        self.last_output = None
        return model

    def unload(self, handle: Any) -> None:
        import mlx.core as mx

        mx.clear_cache()

    def run(self, model: Any, case: Case, work: Work) -> CallTimings:
        import mlx.core as mx

        from cosyvoice2.llm import default_sampler
        from cosyvoice2.model import Prompt
        from cosyvoice2.streaming import StreamSchedule

        x = {k: mx.array(v) for k, v in work.inputs().items()}
        feat_dtype = getattr(mx, DTYPES[case.dtype])
        prompt = Prompt(
            embedding=x["embedding"],
            prompt_text=x["prompt_text"],
            llm_speech_token=x["prompt_speech_token"],
            flow_speech_token=x["prompt_speech_token"],
            speech_feat=x["prompt_feat"].astype(feat_dtype),
        )
        n = work.speech_tokens
        sampler = default_sampler(model.config.llm)
        lengths: dict[str, float] = {}
        if work.fixed_length:
            sampler = FixedLengthSampler(sampler, model.config.llm.speech_token_size)
            # int(text_tokens * ratio) == n (float32 product n + 0.5, truncated)
            ratio = (n + 0.5) / work.text_tokens
            lengths = {"max_token_text_ratio": ratio, "min_token_text_ratio": ratio}
        mx.eval(prompt.embedding, prompt.prompt_text, prompt.llm_speech_token, prompt.speech_feat)

        clock = CallClock()
        options: dict[str, Any] = {}
        if case.first_hop is not None or case.final != "full":
            options["schedule"] = StreamSchedule(
                first_hop_len=case.first_hop, final_full_attention=case.final == "full"
            )
        llm_options: dict[str, Any] = {}
        if case.saved:  # computed on the first (cold) call, reused by the warm ones
            llm_options["prefix_id"] = options["spk_id"] = "bench-speaker"
        got: list[int] = []
        chunks: list[Any] = []

        def kept(tokens: Any) -> Any:
            for t in tokens:
                got.append(int(t))
                yield t

        clock.start()
        tokens = model.speech_token_stream(
            x["text"], prompt, seed=work.seed, sampling=sampler, **lengths, **llm_options
        )
        if work.fixed_length:
            tokens = take_exact(tokens, n)
        for out in model.token2wav_stream(
            clock.tokens(kept(tokens)),
            prompt,
            case.stream,
            1.0,
            seed=work.seed,
            n_timesteps=case.steps,
            timings=clock,
            **options,
        ):
            speech = out["tts_speech"]
            mx.eval(speech)
            clock.chunk(speech.shape[-1] / model.sample_rate)
            chunks.append(speech)
        timings = clock.timings(case.stream)
        self.last_output = (got, chunks, model.sample_rate)
        return timings

    # ------------------------------------------------------------ fidelity (bench.drift)

    def _output(self) -> Any:
        import mlx.core as mx
        import numpy as np

        from bench.drift import Output

        tokens, chunks, sr = self.last_output
        parts = [np.array(c.astype(mx.float32)).reshape(-1) for c in chunks]
        return Output(tokens, np.concatenate(parts), [p.size for p in parts], sr)

    def fidelity(self, model: Any, case: Case, work: Work, reference: Path) -> dict[str, Any]:
        """The last call's distance from the reference output (`bench.drift`); the reference
        case writes that output first when it is missing."""
        import mlx.core as mx

        from bench import drift

        out = self._output()
        x = {k: mx.array(v) for k, v in work.inputs().items()}
        if not reference.exists():
            if not drift.is_reference(case):
                raise RuntimeError(f"no reference output at {reference}")
            drift.write_reference(reference, out, drift.teacher_forced_greedy(model, x, out.tokens))
        ref, ref_greedy = drift.read_reference(reference)
        greedy = drift.teacher_forced_greedy(model, x, ref.tokens)
        return drift.compare(ref, ref_greedy, out, greedy)

    def process_prompt(self, model: Any, work: Work) -> float | None:
        """Seconds to turn a new prompt wav of the work's length into the prompt side
        (`CosyVoice2.prompt_from_wav`: speech tokens, mel, speaker embedding), evaluated;
        None for a model dir without a speech tokenizer or CAM++ (mlx-audio-plus layouts
        serve saved speakers only)."""
        import time

        import mlx.core as mx

        from cosyvoice2.mlx_audio_plus import Missing

        wav = work.prompt_wav()
        t0 = (
            time.perf_counter()
        )  # a deferred prompt side is read here: part of a new speaker's cost
        if isinstance(model.speech_tokenizer, Missing) or isinstance(model.campplus, Missing):
            return None
        p = model.prompt_from_wav((wav, 24000))
        mx.eval(p.embedding, p.llm_speech_token, p.speech_feat)
        return time.perf_counter() - t0
