"""Fidelity metrics (`bench.fidelity`) on constructed signals and token lists with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench.fidelity import (
    click_score,
    f0_error,
    f0_track,
    length_difference,
    log_mel,
    log_mel_distance,
    mrstft_distance,
    token_agreement,
)
from cosyvoice2.errors import InputError

SR = 24000
T = np.arange(SR) / SR  # one second


def _voice(f0: float, weights=(1.0, 0.5, 0.33, 0.25, 0.2), seed: int = 0) -> np.ndarray:
    """A harmonic 'voice' at f0 over a faint noise floor (real recordings have one)."""
    rng = np.random.default_rng(seed)
    tone = sum(w * np.sin(2 * np.pi * f0 * (k + 1) * T) for k, w in enumerate(weights))
    return 0.3 * tone + 1e-3 * rng.standard_normal(SR)


REF = _voice(200.0)
OTHER_SPEAKER = _voice(120.0, weights=(1.0, 0.9, 0.8, 0.6, 0.5, 0.4), seed=1)


def _noisy(level: float) -> np.ndarray:
    return REF + level * np.random.default_rng(7).standard_normal(SR)


# ---------------------------------------------------------------------------
# tokens


@pytest.mark.parametrize(
    ("ref", "got", "agreement", "first"),
    [
        ([5, 6, 7, 8], [5, 6, 7, 8], 1.0, None),
        ([5, 6, 7, 8], [5, 6, 9, 8], 0.75, 2),
        ([5, 6, 7, 8], [5, 6], 0.5, 2),  # missing positions disagree
        ([5, 6], [5, 6, 7, 8], 0.5, 2),  # extra positions disagree
        ([1, 2, 3], [9, 2, 3], 2 / 3, 0),
        ([], [], 1.0, None),
        ([], [4], 0.0, 0),
        (np.array([3, 4]), (3, 4), 1.0, None),
    ],
)
def test_token_agreement(ref, got, agreement, first):
    out = token_agreement(ref, got)
    assert out["agreement"] == pytest.approx(agreement)
    assert out["first_divergence"] == first
    assert (out["ref_len"], out["got_len"]) == (len(ref), len(got))


@pytest.mark.parametrize("bad", ["abc", [1, 2.5], [True], 7])
def test_token_agreement_rejects_non_tokens(bad):
    with pytest.raises(InputError):
        token_agreement([1, 2], bad)


# ---------------------------------------------------------------------------
# spectral distances


def test_log_mel_is_the_flow_mel():
    from cosyvoice2.frontend.features import mel_spectrogram

    x = (0.1 * np.random.default_rng(3).standard_normal(SR)).astype(np.float32)
    ours = log_mel(x)
    model = np.asarray(mel_spectrogram(x))[0]
    assert ours.shape == model.shape == (80, 50)
    np.testing.assert_allclose(ours, model, atol=1e-4)


@pytest.mark.parametrize("distance", [log_mel_distance, mrstft_distance])
def test_spectral_distance_orders_perturbations(distance):
    assert distance(REF, REF.copy()) == 0.0
    shifted = distance(REF, np.roll(REF, 37))
    low = distance(REF, _noisy(5e-4))
    high = distance(REF, _noisy(5e-3))
    speaker = distance(REF, OTHER_SPEAKER)
    assert 0.0 < shifted < low, (shifted, low)
    assert 0.0 < low < high / 2, (low, high)
    assert speaker > 2 * low, (speaker, low)


def test_log_mel_distance_compares_common_prefix():
    longer = np.concatenate([REF, OTHER_SPEAKER[:6000]])
    # only the last two common frames (reflect-padded differently) can differ
    mel_a, mel_b = log_mel(REF), log_mel(longer)
    n = mel_a.shape[1]
    assert mel_b.shape[1] > n and np.array_equal(mel_a[:, : n - 2], mel_b[:, : n - 2])
    expected = float(np.mean(np.abs(mel_a - mel_b[:, :n])))
    assert log_mel_distance(REF, longer) == log_mel_distance(longer, REF) == expected
    assert 0.0 < expected < log_mel_distance(REF, _noisy(5e-4)) / 3
    assert mrstft_distance(REF, longer) == 0.0
    assert length_difference(REF, longer) == {"samples": 6000, "seconds": 0.25}


@pytest.mark.parametrize(
    "bad",
    [np.zeros((2, SR)), np.array([]), np.full(SR, np.nan), np.zeros(500), "noise"],
)
def test_spectral_distances_reject_bad_waveforms(bad):
    with pytest.raises(InputError):
        log_mel_distance(REF, bad)
    with pytest.raises(InputError):
        mrstft_distance(bad, REF)


# ---------------------------------------------------------------------------
# pitch


def test_f0_track_finds_known_pitch():
    f0, voiced = f0_track(REF, SR)
    assert voiced.all()
    # within 1 cent of 200 Hz on every frame
    assert np.max(np.abs(1200 * np.log2(f0 / 200.0))) < 1.0


def test_f0_error_known_interval():
    same = f0_error(REF, REF)
    assert same["rmse_cents"] == 0.0 and same["voicing_disagreement"] == 0.0
    out = f0_error(REF, _voice(220.0))
    # 1200 log2(220 / 200) = 165.0 cents
    assert out["rmse_cents"] == pytest.approx(1200 * math.log2(1.1), abs=2.0)
    assert out["voicing_disagreement"] == 0.0
    assert out["frames_both_voiced"] == out["frames"] > 50


def test_f0_error_voicing_disagreement():
    half_silent = REF.copy()
    half_silent[SR // 2 :] = 0.0
    out = f0_error(REF, half_silent)
    assert out["voicing_disagreement"] == pytest.approx(0.5, abs=0.08)
    assert out["rmse_cents"] < 1.0  # where both are voiced the pitch agrees
    silent = f0_error(REF, np.zeros(SR))
    assert silent["rmse_cents"] is None and silent["voicing_disagreement"] == 1.0


def test_f0_error_different_speaker_is_far():
    out = f0_error(REF, OTHER_SPEAKER)
    assert out["rmse_cents"] > 800  # 120 Hz vs 200 Hz is 884 cents


# ---------------------------------------------------------------------------
# clicks

SINE = 0.5 * np.sin(2 * np.pi * 200.0 * T)
JOIN = 12030  # a crest of the 200 Hz sine


def test_click_score_smooth_signal_is_low():
    out = click_score(SINE, SR, joins=[JOIN])
    assert out["points"] == [0, JOIN, SR]
    assert out["max"] < 2.0, out


def test_click_score_discontinuity_at_join():
    jumped = SINE.copy()
    jumped[JOIN:] = 0.5 * np.sin(2 * np.pi * 200.0 * T[JOIN:] + np.pi)  # a phase flip
    smooth = click_score(SINE, SR, joins=[JOIN])["scores"][1]
    out = click_score(jumped, SR, joins=[JOIN])
    assert out["scores"][1] > 10 * smooth
    assert out["scores"][0] < 2.0 and out["scores"][2] < 2.0  # the ends stay clean
    assert out["max"] == out["scores"][1]


def test_click_score_abrupt_start_and_end():
    out = click_score(0.5 * np.cos(2 * np.pi * 200.0 * T), SR)  # starts and ends at 0.5
    assert out["scores"][0] > 10 and out["scores"][-1] > 10
    assert click_score(np.zeros(SR), SR)["max"] == 0.0  # silence has nothing to click


@pytest.mark.parametrize("joins", [[-1], [SR + 1], [1.5], [True]])
def test_click_score_rejects_bad_joins(joins):
    with pytest.raises(InputError):
        click_score(SINE, SR, joins=joins)


def test_rejects_bad_sample_rate():
    with pytest.raises(InputError):
        click_score(SINE, 0)
    with pytest.raises(InputError):
        f0_error(REF, REF, sr=24000.5)
