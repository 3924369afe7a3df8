"""The CosyVoice2 paper's Seed-TTS-eval figures for CosyVoice2 (0.5B), to compare real-weight runs.

Error rates are the mean per-utterance rate x100 (WER on test-en, CER on test-zh and
test-hard); SIM is the cosine of WavLM-large+ECAPA speaker embeddings. Runs with another
ASR or speaker encoder are shown beside these numbers but are not directly comparable.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PaperFigure:
    set_name: str
    metric: str
    error_rate_x100: float
    sim: float
    asr: str


PAPER: dict[str, PaperFigure] = {
    "test-en": PaperFigure("test-en", "WER", 2.57, 0.652, "Whisper-large-v3"),
    "test-zh": PaperFigure("test-zh", "CER", 1.45, 0.748, "Paraformer-zh"),
    "test-hard": PaperFigure("test-hard", "CER", 6.83, 0.724, "Paraformer-zh"),
}
PAPER_SIM_ENCODER = "wavlm-ecapa"
