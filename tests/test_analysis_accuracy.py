"""Tempo and key detection (webapp.analysis, what POST /analyze answers) on synthesized material with
known answers: the cases of benchmarks/analyze_accuracy.py, thinned to keep the suite quick (that
script runs them all and writes docs/ANALYZE.md's table)."""
from __future__ import annotations

import librosa
import numpy as np
import pytest

from benchmarks.analyze_accuracy import Case, judge_key, judge_tempo
from music_synth import RATE, click_track, drum_pattern
from webapp.analysis import ANALYSIS_RATE, analyze, estimate_tempo

TEMPI = tuple(range(70, 181, 15)) + (97, 177)


@pytest.mark.parametrize("kind", ["click", "drums"])
@pytest.mark.parametrize("noise_db", [None, 0.0], ids=["clean", "noise0dB"])
def test_tempo_within_1_bpm_or_flagged_half_double(kind, noise_db):
    verdicts = {}
    for bpm in TEMPI:
        case = Case(kind, noise_db, bpm=bpm)
        result = analyze(case.audio(), RATE)
        verdicts[bpm] = (judge_tempo(case, result), result.bpm_precise, result.bpm_alternative)
    assert all(v[0] in ("exact", "octave, flagged") for v in verdicts.values()), verdicts
    assert sum(v[0] == "exact" for v in verdicts.values()) >= len(TEMPI) // 2, verdicts  # not merely "flagged"


@pytest.mark.parametrize("kind", ["triads", "scale"])
@pytest.mark.parametrize("minor", [False, True], ids=["major", "minor"])
def test_key_right_on_clean_material(kind, minor):
    wrong = {}
    for tonic in range(12):
        case = Case(kind, None, tonic=tonic, minor=minor)
        result = analyze(case.audio(), RATE)
        if judge_key(case, result) != "right":
            wrong[tonic] = result.key_scale
        assert 0.5 < result.key_confidence <= 1.0
    assert wrong == {}


def test_silence_and_noise_say_they_found_nothing_sure():
    silent = analyze(np.zeros(RATE * 5, dtype=np.float32), RATE)
    assert (silent.bpm, silent.key_scale, silent.bpm_confidence, silent.key_confidence) == (None, None, 0.0, 0.0)
    noise = analyze(np.random.default_rng(0).standard_normal(RATE * 10).astype(np.float32) * 0.1, RATE)
    assert noise.bpm_confidence < 0.3 and noise.key_confidence < 0.6, noise


def test_the_estimate_is_finer_than_the_onset_frames():
    # 177 BPM is 29.2 onset frames per beat: a whole-frame lag would answer 178.2 or 172.3.
    tempo = estimate_tempo(librosa.resample(click_track(177, 20.0), orig_sr=RATE, target_sr=ANALYSIS_RATE))
    assert tempo is not None and abs(tempo.bpm * (2 if tempo.bpm < 120 else 1) - 177) < 0.3, tempo


def test_long_sources_are_analysed_on_their_middle_90_seconds():
    result = analyze(drum_pattern(100, 150.0, rate=8000), 8000)
    assert result.duration == 150.0 and result.analysed_seconds == 90.0 and result.bpm == 100
