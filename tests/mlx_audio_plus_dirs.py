"""Model dirs written by mlx-audio-plus 0.1.8's own converter, for the layout tests.

The converter (`mlx_audio.tts.models.cosyvoice2.scripts.convert.convert_from_source`)
runs in bench.peer's virtualenv (`bench.peer.ensure_venv`), offline, on the tiny
synthetic official dir with HiFT's weight norm under `parametrizations` keys (the same
tensors as the default tiny dir, the only weight-norm keys it folds). Three things are
set around it, none of which changes what it computes:

- its quantisation builds Qwen2 with the 0.5B shapes hard-coded; `mlx_lm`'s `ModelArgs`
  takes the tiny shapes while it runs (as `bench.peer` does for loading);
- the tiny shapes go into config.json as the `llm`, `flow` and `hifigan` sections of its
  `CosyVoice2Config` (`bench.peer.adaptation`), the Qwen2 shapes as its `llm` section's
  Qwen2 fields; the 0.5B dirs it writes have none and need none;
- its `save_file` gets C-contiguous arrays: the venv resolves safetensors 0.8, whose
  numpy writer stores a transposed view's memory in the original order under the new
  shape (every transposed convolution scrambled), where the safetensors of its time
  (0.7 and before: `tobytes()`) wrote the transposed values. Without this the dir
  would hold neither its nor our weights.

Its CAM++ comes from a download (Chatterbox's s3gen), which fails offline: these dirs
have no `campplus.*` tensors. Dirs are cached under bench.peer's cache, one per variant.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
from pathlib import Path

RUNNER = r"""
import json, sys
import numpy as np
import mlx_lm.models.qwen2 as qwen2
from mlx_audio.tts.models.cosyvoice2.scripts import convert

src, out, dtype, bits, shapes = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), json.loads(sys.argv[5])
real_args = qwen2.ModelArgs
qwen2.ModelArgs = lambda **kw: real_args(**{**kw, **shapes})
real_save = convert.save_file
convert.save_file = lambda tensors, *a, **k: real_save(
    {n: np.ascontiguousarray(v) for n, v in tensors.items()}, *a, **k
)
convert.convert_from_source(
    model_id=src, output_dir=out, quantize=bits > 0, q_bits=bits or 4, dtype=dtype
)
"""

VARIANTS = {
    "fp32": ("float32", 0),
    "fp16": ("float16", 0),
    "bf16": ("bfloat16", 0),
    "8bit": ("float16", 8),  # its default dtype, as mlx-community's -8bit/-4bit
    "4bit": ("float16", 4),
}


def official_dir() -> Path:
    from cosyvoice2_testing.synthetic import cached_official_dir

    return cached_official_dir("tiny", seed=0, weight_norm_style="parametrizations", onnx=False)


def converted_dir(variant: str) -> Path:
    """The tiny synthetic official dir converted by mlx-audio-plus's converter (cached)."""
    from bench.peer import VERSION, _qwen2_args, adaptation, ensure_venv
    from bench.targets import bench_cache
    from cosyvoice2.config import config_from_official_dir
    from cosyvoice2.files import staged_dir

    dtype, bits = VARIANTS[variant]
    src = official_dir()
    dst = bench_cache() / f"mlx-audio-plus-{VERSION}-layout-tiny-{variant}-v1"
    ready = dst / "layout-test.json"
    if ready.exists():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(dst.parent / f".{dst.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if ready.exists():
            return dst
        python = ensure_venv()
        sections, _ = adaptation(src)
        qwen = _qwen2_args(config_from_official_dir(src))
        with staged_dir(dst) as tmp:
            env = {**os.environ, "HF_HUB_OFFLINE": "1"}
            env.pop("LD_PRELOAD", None)
            cmd = [
                str(python),
                "-c",
                RUNNER,
                str(src),
                str(tmp),
                dtype,
                str(bits),
                json.dumps(qwen),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise RuntimeError(f"mlx-audio-plus's converter failed:\n{proc.stderr[-3000:]}")
            (tmp / "convert.log").write_text(proc.stdout + proc.stderr, encoding="utf-8")
            config = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
            llm_fields = (
                "hidden_size",
                "num_hidden_layers",
                "intermediate_size",
                "num_attention_heads",
                "num_key_value_heads",
                "rms_norm_eps",
                "vocab_size",
            )
            sections["llm"].update({k: qwen[k] for k in llm_fields})
            config.update(sections)
            (tmp / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
            (tmp / "layout-test.json").write_text(
                json.dumps({"source": str(src)}), encoding="utf-8"
            )
    return dst
