"""Speaker similarity separates real speakers (Resemblyzer, offline).

Real recordings of four professional speakers from Debian's Asterisk prompt packs
(`eval.realspeech`): Allison (US English), June (Canadian French), Carlo (Italian,
male) and Menardi (Italian, female): two speakers share a language, so the check is
not only a language detector. Each speaker says the same four prompts (translations),
at least 3 s long.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from eval.similarity import cosine, make_encoder

SPEAKERS = ("en_US_f_Allison", "fr_CA_f_June", "it_IT_m_Carlo", "it_IT_f_Menardi")
PROMPTS = ("agent-alreadyon", "agent-incorrect", "auth-incorrect", "conf-adminmenu")


def test_cosine() -> None:
    assert cosine(np.array([1.0, 0.0]), np.array([2.0, 0.0])) == pytest.approx(1.0)
    assert cosine(np.array([1.0, 0.0]), np.array([0.0, 3.0])) == pytest.approx(0.0)
    assert cosine(np.array([1.0, 1.0]), np.array([-1.0, -1.0])) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="zero embedding"):
        cosine(np.zeros(3), np.ones(3))


def test_wavlm_ecapa_is_reported_unavailable(tmp_path) -> None:
    from eval.similarity import EncoderUnavailable

    with pytest.raises(EncoderUnavailable, match="checkpoint not found"):
        make_encoder("wavlm-ecapa", tmp_path / "wavlm_large_finetune.pth")
    with pytest.raises(EncoderUnavailable, match="needs --sim-checkpoint"):
        make_encoder("wavlm-ecapa")
    # a checkpoint without UniSpeech's code: explained, not silently replaced
    ckpt = tmp_path / "wavlm_large_finetune.pth"
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(EncoderUnavailable, match="WavLM-large\\+ECAPA is not available"):
        make_encoder("wavlm-ecapa", ckpt, unispeech_dir=tmp_path)


def test_similarity_separates_real_speakers() -> None:
    pytest.importorskip("resemblyzer")
    pytest.importorskip("webrtcvad")
    from eval.audio import load_audio
    from eval.realspeech import voice_dir

    try:
        dirs = {s: voice_dir(s) for s in SPEAKERS}
    except FileNotFoundError as e:
        pytest.skip(str(e))
    encoder = make_encoder("auto")  # no WavLM checkpoint here: Resemblyzer, and it says so
    info = encoder.describe()
    assert info["encoder"] == "resemblyzer" and info["comparable_to_paper"] is False
    assert info["wavlm_ecapa_unavailable"] == "no WavLM-ECAPA checkpoint given"

    emb = {}
    for s, d in dirs.items():
        for p in PROMPTS:
            wav, sr = load_audio(d / f"{p}.wav")
            assert len(wav) >= 3 * sr
            emb[s, p] = encoder.embed(wav, sr)
    same, diff = [], []
    per_pair: dict[tuple[str, str], list[float]] = {}
    for a, b in itertools.combinations(emb, 2):
        c = cosine(emb[a], emb[b])
        (same if a[0] == b[0] else diff).append(c)
        per_pair.setdefault(tuple(sorted((a[0], b[0]))), []).append(c)
    margin = float(np.mean(same) - np.mean(diff))
    report = {k: round(float(np.mean(v)), 3) for k, v in per_pair.items()}
    assert margin >= 0.15, f"same {np.mean(same):.3f} vs different {np.mean(diff):.3f}: {report}"
    # and each speaker is closer to itself than to any other speaker, on average
    for s in SPEAKERS:
        own = np.mean(per_pair[(s, s)])
        for t in SPEAKERS:
            if t != s:
                assert own > np.mean(per_pair[tuple(sorted((s, t)))]), report
