"""Speech-LM decode and prefill speed with and without the CPU kernels (full size, synthetic weights).

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 \\
        python kernels/bench_decode.py [--precisions fp32,bf16,8bit,4bit] [--kernels off,on]
            [--tokens 40] [--repeats 3] [--rounds 1]

Builds the speech LM at the real Qwen2-0.5B shapes from the synthetic official
dir (`cached_official_dir("full", onnx=False)`, random weights), then for each
precision and kernel setting: prefill of 120 positions (sos, 10 prompt-text, 8
text tokens, task id, 100 prompt speech tokens) and greedy decoding through
`Qwen2LM.inference` (its look-ahead loop: one evaluation per token). Reports the
time to the first token (prefill plus one step), the median wall time per decoded
token over all repeats and the process CPU time per token (all threads, spinning
included), with the load average, as one JSON line per case.
Timings on a shared machine are noisy: compare cases of one run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time

import mlx.core as mx
import numpy as np

from cosyvoice2 import backend, kernel_layers
from cosyvoice2.checkpoint import load_torch_checkpoint
from cosyvoice2.config import config_from_official_dir
from cosyvoice2.llm import Qwen2LM, cast, quantize


class SpeechGreedy:
    """Arg-max over the speech tokens (no stop token): fixed-length decoding."""

    window = 0

    def __init__(self, n: int):
        self.n = n

    def __call__(self, logp: mx.array, recent: mx.array, key: mx.array) -> mx.array:
        return mx.argmax(logp[: self.n]).astype(mx.int32)


def build(config, weights, precision: str, kernels: bool) -> tuple[Qwen2LM, int]:
    """The speech LM at `precision`, with kernel modules swapped in if asked (and how many)."""
    model = Qwen2LM.from_weights(config, weights)
    if precision == "bf16":
        cast(model, "bfloat16")
    elif precision.endswith("bit"):
        quantize(model, bits=int(precision[:-3]), group_size=64)
    swapped = kernel_layers.use_kernels(model) if kernels else 0
    mx.eval(model.parameters())
    return model, swapped


def run_case(model: Qwen2LM, n_tokens: int, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    text = rng.integers(0, 151000, 8)
    prompt_text = rng.integers(0, 151000, 10)
    prompt_speech = rng.integers(0, 6561, 100)
    sampler = SpeechGreedy(model.speech_token_size)
    first, steps, cpu, tokens = [], [], [], None
    for r in range(repeats + 1):  # the first repeat warms up
        gen = model.inference(text, prompt_text, prompt_speech, sampling=sampler, key=0)
        t0 = time.perf_counter()
        out = [next(gen)]
        t1 = time.perf_counter()
        c1 = time.process_time()
        times = []
        for _ in range(n_tokens):
            out.append(next(gen))
            t2 = time.perf_counter()
            times.append(t2 - t1)
            t1 = t2
        c2 = time.process_time()
        gen.close()
        if r > 0:
            first.append(t1 - t0 - sum(times))
            steps.extend(times)
            cpu.append((c2 - c1) / n_tokens)
        tokens = out
    return {
        "first_token_s": float(np.median(first)),
        "decode_ms_per_token": float(np.median(steps) * 1e3),
        "decode_ms_mean": float(np.mean(steps) * 1e3),
        "decode_ms_p10": float(np.percentile(steps, 10) * 1e3),
        "decode_cpu_ms_per_token": float(np.median(cpu) * 1e3),
        "tokens_head": tokens[:8],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--precisions", default="fp32,bf16,8bit,4bit")
    ap.add_argument("--kernels", default="off,on")
    ap.add_argument("--tokens", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="alternate the kernel settings of a precision this many times (paired timings)",
    )
    args = ap.parse_args()

    from cosyvoice2_testing.synthetic import cached_official_dir

    official = cached_official_dir("full", onnx=False)
    config = config_from_official_dir(official).llm
    weights = Qwen2LM.sanitize(load_torch_checkpoint(official / "llm.pt"))
    for precision in args.precisions.split(","):
        models = {}
        for setting in args.kernels.split(","):
            on = setting == "on"
            if on and backend.load_extension() is None:
                print(json.dumps({"precision": precision, "kernels": "unavailable"}))
                continue
            models[setting] = build(config, weights, precision, on)
        for r in range(args.rounds):
            for model, swapped in models.values():
                load = os.getloadavg()[0]
                result = run_case(model, args.tokens, args.repeats)
                record = {
                    "precision": precision,
                    "kernels": backend.choose().describe() if swapped else "off",
                    "round": r,
                    **result,
                    "load_before": round(load, 2),
                    "load_after": round(os.getloadavg()[0], 2),
                }
                print(json.dumps(record), flush=True)
        del models
        gc.collect()
        mx.clear_cache()


if __name__ == "__main__":
    main()
