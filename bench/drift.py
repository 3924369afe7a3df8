"""Each case's distance from the reference setting: the fidelity figures of a run.

The reference setting is the model at full precision and the official defaults:
fp32 LLM, fp32 flow and HiFT, 10 diffusion steps, the model's own CFG strength,
and for a non-streaming case no streaming, for a streaming case the official
streaming schedule (its first hop, the full-attention last chunk, no saved
speaker), on the same work (text length, prompt, inputs) and the same seed.
Its output is written once per run, work and mode (`reference_path`), by the reference
case itself when the sweep has it (it runs first) or by a reference job; every
other case of our pipeline is compared with it in its own worker, with its own
model still loaded:

- `token_agreement_greedy`: the case's LLM is run teacher-forced on the
  reference's speech tokens, and its top-1 choice at each position is compared
  with the reference LLM's top-1 choice on the same prefix: a drift of the LLM
  alone, which autoregressive sampling would otherwise amplify;
- `token_agreement_sampled` (and the first divergence): the tokens the case's
  call actually sampled, with the same key, against the reference's;
- `log_mel_distance`, `mrstft_distance`, `f0_rmse_cents`, `voicing_disagreement`:
  the case's audio against the reference audio (`bench.fidelity`);
- `click_max`: the largest click score at the start, each chunk join and the end
  of the case's own audio.

On synthetic weights these figures are numerical drift from the reference, not
perceived quality; the bench uses the synthetic generator's `sensitive` profile
so that the LLM's drift is not hidden by near-uniform logits. Every record says
which (`NOTES`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from bench import fidelity
from bench.cases import HEADLINE, Case, Work

NOTES = {
    "synthetic": (
        "numerical drift from the reference setting on synthetic weights, not perceived quality"
    ),
    "real": "distance from the reference setting's output on real weights",
    "unknown": "distance from the reference setting's output (weights of unknown origin)",
}
REFERENCE_SETTINGS = {k: v for k, v in HEADLINE.items() if k not in ("text", "stream")}
"""The reference setting: the headline settings (fp32, 10 steps, the official defaults); the
text length (the work) and streaming are the case's own."""
FORMAT = 1


def reference_case(case: Case) -> Case:
    """The reference setting on `case`'s work, run by our pipeline."""
    return dataclasses.replace(case, target="cosyvoice2", **REFERENCE_SETTINGS)


def is_reference(case: Case) -> bool:
    return case == reference_case(case)


def reference_path(outputs: Path, case: Case, work: Work) -> Path:
    """Where the reference output of `case`'s reference setting on `work` is kept in a run's
    outputs folder."""
    ref = reference_case(case).id
    key = json.dumps({"format": FORMAT, "reference": ref, **work.to_dict()}, sort_keys=True)
    return outputs / f"reference-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"


@dataclasses.dataclass
class Output:
    """What one call produced: its speech tokens, its audio and where its chunks join."""

    tokens: list[int]
    audio: np.ndarray
    """1-D float32 waveform at `sample_rate`."""
    chunk_samples: list[int]
    sample_rate: int

    @property
    def joins(self) -> list[int]:
        """Sample index of the first sample of every chunk after the first."""
        return [int(x) for x in np.cumsum(self.chunk_samples)[:-1]]


def write_reference(path: Path, out: Output, greedy: np.ndarray) -> None:
    """Write the reference output and its teacher-forced top-1 choices (atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.savez(
            f,
            tokens=np.asarray(out.tokens, dtype=np.int64),
            audio=np.asarray(out.audio, dtype=np.float32),
            greedy=np.asarray(greedy, dtype=np.int64),
            sample_rate=np.asarray(out.sample_rate, dtype=np.int64),
        )
    tmp.replace(path)


def read_reference(path: Path) -> tuple[Output, np.ndarray]:
    """The reference output and its greedy choices (a file this package wrote: no pickles)."""
    with np.load(path, allow_pickle=False) as z:
        tokens = [int(t) for t in z["tokens"]]
        audio = z["audio"].astype(np.float32)
        out = Output(tokens, audio, [audio.size], int(z["sample_rate"]))
        return out, z["greedy"].astype(np.int64)


def compare(ref: Output, ref_greedy: np.ndarray, got: Output, greedy: np.ndarray) -> dict[str, Any]:
    """Fidelity figures (name -> value) and details of `got` against the reference."""
    sr = got.sample_rate
    tok = fidelity.token_agreement(ref.tokens, got.tokens)
    n = min(ref_greedy.size, greedy.size)
    figures: dict[str, float] = {
        "token_agreement_greedy": float(np.mean(ref_greedy[:n] == greedy[:n])) if n else 1.0,
        "token_agreement_sampled": float(tok["agreement"]),
        "log_mel_distance": fidelity.log_mel_distance(ref.audio, got.audio, sr),
        "mrstft_distance": fidelity.mrstft_distance(ref.audio, got.audio),
    }
    f0 = fidelity.f0_error(ref.audio, got.audio, sr)
    if f0["rmse_cents"] is not None:
        figures["f0_rmse_cents"] = f0["rmse_cents"]
    figures["voicing_disagreement"] = f0["voicing_disagreement"]
    clicks = fidelity.click_score(got.audio, sr, joins=got.joins)
    figures["click_max"] = clicks["max"]
    details = {
        "first_divergence": tok["first_divergence"],
        "length_difference_s": fidelity.length_difference(ref.audio, got.audio, sr)["seconds"],
        "f0_frames_both_voiced": f0["frames_both_voiced"],
        "clicks": {"points": clicks["points"], "scores": clicks["scores"]},
    }
    return {"figures": figures, "details": details}


def teacher_forced_greedy(model: Any, inputs: dict[str, Any], tokens: list[int]) -> np.ndarray:
    """Our LLM's top-1 speech token at each position of `tokens`, given the tokens before it.

    One forward pass over the official input layout `[sos, prompt_text + text, task_id,
    prompt_speech]` followed by `tokens[:-1]`: position i's logits predict token i.
    Only speech tokens (ids below `speech_token_size`) are candidates, as in fixed-length
    decoding.
    """
    import mlx.core as mx

    llm = model.llm
    speech = mx.array([tokens[:-1]], dtype=mx.int32) if len(tokens) > 1 else None
    xs = llm.prompt_input(inputs["text"], inputs["prompt_text"], inputs["prompt_speech_token"])
    start = xs.shape[1] - 1
    if speech is not None:
        xs = mx.concatenate([xs, llm.embed_speech(speech)], axis=1)
    hidden = llm.llm(None, cache=None, input_embeddings=xs)
    logits = llm.llm_decoder(hidden[:, start:])[0].astype(mx.float32)
    size = model.config.llm.speech_token_size
    choice = mx.argmax(logits[:, :size], axis=-1)
    mx.eval(choice)
    return np.array(choice, dtype=np.int64)
