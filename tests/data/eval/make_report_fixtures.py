"""Regenerate the small fixed results files of `tests/test_reports.py` (deterministic).

    python tests/data/eval/make_report_fixtures.py

Writes `report/eval_<set>_<weights>_<precision>_n<steps>.json` (eval results format,
five utterances each, made-up but plausible numbers) and `report/bench.json` (a bench
results file, schema cosyvoice2-mlx-bench/1, with the cases the eval runs join on).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent / "report"
TEXTS = [
    "Please enter your password.",
    "The conference is now locked.",
    "All circuits are busy now.",
    "You have been kicked from this conference.",
    "Thank you for calling.",
]


def eval_doc(set_name: str, weights: str, precision: str, steps: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    base = {"fp32": 0.02, "8bit": 0.03, "4bit": 0.05}[precision] + 0.08 / steps
    if weights == "synthetic":
        base = 1.0
    rates = np.clip(rng.normal(base, base / 2, size=len(TEXTS)), 0.0, None).round(4)
    rows = []
    for i, (text, rate) in enumerate(zip(TEXTS, rates)):
        n = len(text.split())
        rows.append(
            {
                "id": f"utt{i}",
                "lang": "en",
                "metric": "WER",
                "target_text": text,
                "hypothesis": text.lower(),
                "error_rate": float(rate),
                "hits": n,
                "substitutions": 0,
                "deletions": 0,
                "insertions": 0,
                "ref_tokens": n,
                "sim": round(float(0.6 + 0.01 * steps - 0.01 * i), 4),
                "duration_s": 2.0 + i,
                "error": None,
                "sim_error": None,
            }
        )
    rows[-1].update(
        error_rate=None,
        hypothesis=None,
        error="asr: RuntimeError: fixture failure",
        hits=None,
        ref_tokens=None,
    )
    scored = [r["error_rate"] for r in rows if r["error_rate"] is not None]
    sims = [r["sim"] for r in rows]
    return {
        "format": "cosyvoice2-mlx eval results",
        "format_version": 1,
        "date": "2026-11-27T00:00:00+00:00",
        "git": {"commit": "0" * 40, "dirty": False},
        "versions": {"python": "3.11.7"},
        "machine": {"system": "Linux"},
        "test_set": {
            "name": set_name,
            "source": f"seedtts_testset/{set_name}/meta.lst",
            "format": "meta.lst",
            "n": 5,
            "languages": ["en"],
        },
        "weights": weights,
        "settings": {
            "tts": "cosyvoice2-mlx",
            "model_dir": "/models/cv2",
            "weights": weights,
            "precision": precision,
            "n_timesteps": steps,
            "seed": 0,
        },
        "models": {
            "asr": {"asr": "mlx-whisper", "model": "mlx-community/whisper-large-v3-mlx"},
            "sim": {"encoder": "resemblyzer"},
        },
        "summary": {
            "n_total": 5,
            "n_scored": 4,
            "n_failed": 1,
            "failed_ids": ["utt4"],
            "mean_error_rate": float(np.mean(scored)),
            "mean_error_rate_x100": float(100 * np.mean(scored)),
            "corpus_error_rate": float(np.mean(scored)),
            "sim_mean": float(np.mean(sims)),
            "n_sim": 5,
            "ref_tokens": 20,
            "errors": 1,
            "metric": "WER",
            "sim_failed_ids": [],
            "failures": {"utt4": "asr: RuntimeError: fixture failure"},
            "audio_s": 20.0,
            "sim_encoder": "resemblyzer",
        },
        "by_language": {},
        "utterances": rows,
    }


def bench_doc() -> dict:
    cases, plan = [], []
    for llm, rtf0 in (("fp32", 1.2), ("8bit", 1.8)):
        for steps in (1, 3, 10):
            case = {
                "target": "cosyvoice2",
                "llm": llm,
                "dtype": "fp32",
                "steps": steps,
                "text": "short",
                "stream": False,
            }
            cid = f"cosyvoice2/llm={llm}/dtype=fp32/steps={steps}/text=short/stream=off"
            plan.append({"id": cid, **case})
            rtf = round(rtf0 + 0.15 * steps, 3)

            def fig(v):
                return {"median": v, "min": v, "max": v, "n": 1, "values": [v]}

            cases.append(
                {
                    "id": cid,
                    "settings": case,
                    "work": {
                        "speech_tokens": 125,
                        "prompt_speech_tokens": 75,
                        "text_tokens": 28,
                        "fixed_length": False,
                    },
                    "status": "ok",
                    "weights": "real",
                    "figures": {
                        "rtf": fig(rtf),
                        "wall_s": fig(5 * rtf),
                        "audio_s": fig(5.0),
                        "speech_tokens": fig(125),
                        "load_s": fig(2.0),
                        "rss_peak_mb": fig(1500.0 if llm == "fp32" else 900.0),
                    },
                }
            )
    return {
        "schema": "cosyvoice2-mlx-bench/1",
        "run_id": "fixture",
        "status": "complete",
        "created": "2026-11-27T00:00:00+00:00",
        "updated": "2026-11-27T00:00:00+00:00",
        "command": "fixture",
        "machine": {
            "kind": "linux-x86_64",
            "os": "Linux",
            "arch": "x86_64",
            "cpu": "fixture CPU",
            "cores": 2,
            "memory_gb": 24.0,
        },
        "versions": {
            "python": "3.11.7",
            "mlx": "0.32.4",
            "mlx_lm": "0.32.2",
            "git_commit": "0" * 40,
        },
        "weights": {"label": "real"},
        "targets": {},
        "settings": {"repeats": 1, "warmup": 0},
        "plan": plan,
        "cases": cases,
    }


def main() -> None:
    HERE.mkdir(parents=True, exist_ok=True)
    seed = 0
    for precision in ("fp32", "8bit"):
        for steps in (1, 3, 10):
            doc = eval_doc("en", "real", precision, steps, seed)
            (HERE / f"eval_en_real_{precision}_n{steps}.json").write_text(
                json.dumps(doc, indent=1) + "\n"
            )
            seed += 1
    doc = eval_doc("en", "synthetic", "fp32", 10, 99)
    (HERE / "eval_en_synthetic_fp32_n10.json").write_text(json.dumps(doc, indent=1) + "\n")
    (HERE / "bench.json").write_text(json.dumps(bench_doc(), indent=1) + "\n")


if __name__ == "__main__":
    main()
