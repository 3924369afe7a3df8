"""Real recorded speech from Debian packages, for checking the harness offline.

Asterisk's prompt packs are studio recordings of one professional speaker each, at
8 kHz (telephone band):

| voice folder        | Debian package                  | speaker                     |
|---------------------|---------------------------------|-----------------------------|
| `en_US_f_Allison`   | asterisk-core-sounds-en-wav     | Allison Smith, US English   |
| `fr_CA_f_June`      | asterisk-core-sounds-fr-wav     | June, Canadian French       |
| `it_IT_m_Carlo`     | asterisk-core-sounds-it-wav     | Carlo, Italian (male)       |
| `it_IT_f_Menardi`   | asterisk-prompt-it-menardi-wav  | Menardi, Italian (female)   |

(`asterisk-core-sounds-es-wav` is not a further speaker: its `es_MX_f_Allison` is the
same Allison.) The English transcripts are in `asterisk-core-sounds-en`'s
`core-sounds-en.txt` (`name: text` lines). The same prompt names exist in every pack
(translations), which lets a similarity check pair the same content across speakers.
"""

from __future__ import annotations

import gzip
import os
import re
from pathlib import Path

from eval.datasets import TestSet, Utterance
from eval.metrics import normalize

SOUNDS_ROOT = Path(os.environ.get("ASTERISK_SOUNDS", "/usr/share/asterisk/sounds"))
TRANSCRIPTS = Path("/usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz")
VOICES = {
    "en_US_f_Allison": "asterisk-core-sounds-en-wav",
    "fr_CA_f_June": "asterisk-core-sounds-fr-wav",
    "it_IT_m_Carlo": "asterisk-core-sounds-it-wav",
    "it_IT_f_Menardi": "asterisk-prompt-it-menardi-wav",
}


def voice_dir(voice: str) -> Path:
    """The folder of a voice's wavs (raises FileNotFoundError naming the package to install)."""
    d = SOUNDS_ROOT / voice
    if not d.is_dir() or not any(d.glob("*.wav")):
        pkg = VOICES.get(voice, "?")
        raise FileNotFoundError(f"{d}: no wavs; apt-get install {pkg}")
    return d


def english_transcripts(path: Path = TRANSCRIPTS) -> dict[str, str]:
    """Prompt name -> transcript, from `core-sounds-en.txt` (plain or gzipped)."""
    if not path.is_file() and path.suffix == ".gz" and path.with_suffix("").is_file():
        path = path.with_suffix("")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; apt-get install asterisk-core-sounds-en")
    opener = gzip.open if path.suffix == ".gz" else open
    out: dict[str, str] = {}
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith(";") or ":" not in line:
                continue
            name, text = line.split(":", 1)
            name, text = name.strip(), " ".join(text.split())
            if name and text:
                out[name] = text
    return out


def english_prompt_set(min_words: int = 5, limit: int | None = None) -> TestSet:
    """Allison's top-level English prompts with a plain transcript of `min_words`+ words.

    Left out: prompts in sub-folders, transcripts with a bracketed description
    ("[ascending tones]"), digits or symbols (a transcript that spells "#" or "1"
    differently from the ASR is not a recognition error), and transcripts whose
    recording the wav package does not ship (Debian's lists one such prompt). Sorted by name; each
    utterance's prompt and target are the same clip and text, so a copy synthesis
    of this set is a pure ASR check.
    """
    d = voice_dir("en_US_f_Allison")
    utts = []
    for name, text in sorted(english_transcripts().items()):
        if "/" in name or re.search(r"[\[\]\d#*@&%$/]", text):
            continue
        if len(normalize(text, "en").split()) < min_words:
            continue
        wav = d / f"{name}.wav"
        if not wav.is_file():
            continue
        utts.append(
            Utterance(id=name, prompt_wav=wav, prompt_text=text, target_text=text, lang="en")
        )
        if limit is not None and len(utts) >= limit:
            break
    return TestSet(name="asterisk-en", source=d, format="asterisk", utterances=tuple(utts))
