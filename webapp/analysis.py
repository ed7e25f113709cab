"""The tempo and key of a source, found on the CPU in the web tier (librosa and numpy, never torch).

The page prefills `bpm` and `key_scale` from this; the musician can always overrule it.

Tempo. librosa's onset-strength envelope (spectral flux, 128-sample hop at 22,050 Hz: 5.8 ms
frames) is autocorrelated once over the whole clip. A tempo candidate's salience is the
harmonic mean of that autocorrelation at 1, 2, 3 and 4 beat periods (a comb whose teeth must
all stand: a faster tempo whose half-beats are empty scores low). Scanning candidates 30..300
BPM on a 0.02 BPM grid, with the 4th tooth 4 periods out, gives the period to a small fraction
of a frame, so the estimate is within a fraction of a BPM on steady material. Which octave
(80 or 160?) is a guess no signal can settle; like librosa's own `tempo`, a log-normal prior
around 120 BPM (one octave wide) picks the likelier one, and when the other octave scores at
least half as well after the prior, the answer says so (`bpm_ambiguous`, `bpm_alternative`).

Key. librosa's constant-Q chroma, averaged over the clip, is correlated with the 24 rotations
of the Krumhansl-Kessler major and minor key profiles (the Krumhansl-Schmuckler algorithm); the
best correlation names the key and is its confidence, the runner-up is reported beside it.

docs/ANALYZE.md has the accuracy on synthesized material (benchmarks/analyze_accuracy.py).
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import librosa  # lazy: its submodules (numba included) load at first use, not with the web app
import numpy as np
import soundfile as sf

ANALYSIS_RATE = 22050
ONSET_HOP = 128
CHROMA_HOP = 512
BPM_MIN, BPM_MAX, BPM_STEP = 30.0, 300.0, 0.02
PRIOR_CENTER_BPM = 120.0  # librosa.feature.tempo's start_bpm
PRIOR_OCTAVES = 1.0  # its std_bpm
COMB_TEETH = 4
AMBIGUOUS_RATIO = 0.5  # the other octave's score over the chosen one's, prior included
SILENCE_RMS = 1e-4  # about -80 dBFS: nothing to analyse
# The middle 90 s at most: plenty for a steady tempo and a key, and it bounds the web tier's
# CPU time and memory whatever MAX_DURATION_S allows (docs/ANALYZE.md has the figures).
MAX_ANALYSED_S = 90.0

# Krumhansl & Kessler (1982) probe-tone ratings, tonic first.
MAJOR_PROFILE = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
MINOR_PROFILE = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])
# Key names as musicians usually spell them (and as /lego's key_scale accepts them).
MAJOR_NAMES = ("C", "Db", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
MINOR_NAMES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "G#", "A", "Bb", "B")


@dataclass
class Analysis:
    """What `POST /analyze` answers (beside `success`). None where the audio holds nothing to measure."""

    bpm: int | None
    bpm_confidence: float
    key_scale: str | None
    key_confidence: float
    duration: float
    bpm_precise: float | None = None
    bpm_ambiguous: bool = False
    bpm_alternative: int | None = None
    key_alternative: str | None = None
    analysed_seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class TempoEstimate:
    bpm: float
    confidence: float
    alternative: float | None
    alternative_ratio: float

    @property
    def ambiguous(self) -> bool:
        return self.alternative is not None and self.alternative_ratio >= AMBIGUOUS_RATIO


@dataclass
class KeyEstimate:
    tonic: int  # pitch class, C = 0
    minor: bool
    confidence: float
    runner_up: str

    @property
    def name(self) -> str:
        return key_name(self.tonic, self.minor)


def key_name(tonic: int, minor: bool) -> str:
    return f"{(MINOR_NAMES if minor else MAJOR_NAMES)[tonic % 12]} {'minor' if minor else 'major'}"


def to_mono(samples: np.ndarray) -> np.ndarray:
    """(frames,) or (frames, channels) -> (frames,) float32."""
    samples = np.asarray(samples, dtype=np.float32)
    return samples.mean(axis=1) if samples.ndim == 2 else samples


def middle_excerpt(mono: np.ndarray, rate: int, max_seconds: float) -> np.ndarray:
    keep = int(max_seconds * rate)
    if len(mono) <= keep:
        return mono
    start = (len(mono) - keep) // 2
    return mono[start:start + keep]


def resample_for_analysis(mono: np.ndarray, rate: int) -> np.ndarray:
    if rate == ANALYSIS_RATE:
        return mono
    return librosa.resample(mono, orig_sr=rate, target_sr=ANALYSIS_RATE, res_type="soxr_hq")


def analyze(samples: np.ndarray, rate: int, duration: float | None = None) -> Analysis:
    """Tempo and key of `samples` (any channel layout) at `rate` Hz."""
    mono = to_mono(samples)
    duration = len(mono) / rate if duration is None else duration
    mono = middle_excerpt(mono, rate, MAX_ANALYSED_S)
    seconds = len(mono) / rate
    if len(mono) == 0 or float(np.sqrt(np.mean(mono.astype(np.float64) ** 2))) < SILENCE_RMS:
        return Analysis(None, 0.0, None, 0.0, round(duration, 6), analysed_seconds=round(seconds, 3))
    with warnings.catch_warnings():  # a clip of a few seconds is short for the CQT's lowest octave; it still works
        warnings.filterwarnings("ignore", message=r"n_fft=\d+ is too large", category=UserWarning)
        y = resample_for_analysis(mono, rate)
        tempo = estimate_tempo(y)
        key = estimate_key(y)
    return Analysis(
        bpm=int(round(tempo.bpm)) if tempo else None,
        bpm_confidence=round(tempo.confidence, 3) if tempo else 0.0,
        key_scale=key.name if key else None,
        key_confidence=round(key.confidence, 3) if key else 0.0,
        duration=round(duration, 6),
        bpm_precise=round(tempo.bpm, 2) if tempo else None,
        bpm_ambiguous=bool(tempo and tempo.ambiguous),
        bpm_alternative=int(round(tempo.alternative)) if tempo and tempo.ambiguous else None,
        key_alternative=key.runner_up if key else None,
        analysed_seconds=round(seconds, 3),
    )


def onset_envelope(y: np.ndarray) -> np.ndarray:
    return librosa.onset.onset_strength(y=y, sr=ANALYSIS_RATE, hop_length=ONSET_HOP)


def _autocorrelation(env: np.ndarray) -> np.ndarray:
    """Normalised, unbiased autocorrelation of the mean-removed envelope (lag 0 = 1)."""
    x = env.astype(np.float64) - float(np.mean(env))
    n = len(x)
    spectrum = np.fft.rfft(x, 2 * n)
    ac = np.fft.irfft(np.abs(spectrum) ** 2)[:n]
    if ac[0] <= 0:
        return np.zeros(n)
    return (ac / ac[0]) * (n / (n - np.arange(n)))


def tempo_salience(env: np.ndarray, bpms: np.ndarray) -> np.ndarray:
    """Harmonic mean of the autocorrelation at 1..COMB_TEETH beat periods, per candidate tempo."""
    ac = _autocorrelation(env)
    n = len(ac)
    fps = ANALYSIS_RATE / ONSET_HOP
    period = 60.0 * fps / bpms
    inverse_sum = np.zeros_like(bpms)
    teeth = np.zeros_like(bpms)
    frames = np.arange(n)
    for k in range(1, COMB_TEETH + 1):
        lag = k * period
        usable = lag < n / 2  # farther lags rest on too little overlap
        value = np.interp(lag[usable], frames, ac)
        inverse_sum[usable] += 1.0 / np.clip(value, 0.02, None)
        teeth[usable] += 1
    salience = np.where(teeth > 0, teeth / np.maximum(inverse_sum, 1e-9), 0.0)
    return np.clip(salience, 0.0, 1.0)


def tempo_prior(bpms: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * (np.log2(bpms / PRIOR_CENTER_BPM) / PRIOR_OCTAVES) ** 2)


def estimate_tempo(y: np.ndarray) -> TempoEstimate | None:
    """The tempo of 22,050 Hz mono audio; None when it has no onsets to speak of."""
    env = onset_envelope(y)
    if len(env) < 8 or float(np.max(env)) <= 0:
        return None
    bpms = np.arange(BPM_MIN, BPM_MAX + BPM_STEP / 2, BPM_STEP)
    salience = tempo_salience(env, bpms)
    score = salience * tempo_prior(bpms)
    best = int(np.argmax(score))
    if score[best] <= 0:
        return None
    bpm = float(bpms[best])
    alternative, ratio = None, 0.0
    for factor in (2.0, 0.5):
        target = bpm * factor
        if not BPM_MIN <= target <= BPM_MAX:
            continue
        near = np.flatnonzero(np.abs(bpms - target) <= 0.03 * target)
        j = int(near[np.argmax(score[near])])
        if score[j] / score[best] > ratio:
            alternative, ratio = float(bpms[j]), float(score[j] / score[best])
    return TempoEstimate(bpm, float(salience[best]), alternative, ratio)


def mean_chroma(y: np.ndarray) -> np.ndarray:
    return librosa.feature.chroma_cqt(y=y, sr=ANALYSIS_RATE, hop_length=CHROMA_HOP).mean(axis=1)


def key_correlations(chroma: np.ndarray) -> np.ndarray:
    """Pearson correlation with each key profile: shape (2, 12), row 0 major, row 1 minor, by tonic."""
    out = np.zeros((2, 12))
    for row, profile in enumerate((MAJOR_PROFILE, MINOR_PROFILE)):
        for tonic in range(12):
            out[row, tonic] = np.corrcoef(chroma, np.roll(profile, tonic))[0, 1]
    return out


def estimate_key(y: np.ndarray) -> KeyEstimate | None:
    """The key of 22,050 Hz mono audio; None when its chroma is flat (no pitched content)."""
    chroma = mean_chroma(y)
    if not np.all(np.isfinite(chroma)) or float(np.std(chroma)) < 1e-6:
        return None
    corr = key_correlations(chroma)
    order = np.argsort(corr, axis=None)[::-1]
    (mode, tonic), (mode2, tonic2) = (np.unravel_index(i, corr.shape) for i in order[:2])
    return KeyEstimate(int(tonic), bool(mode), float(max(corr[mode, tonic], 0.0)), key_name(int(tonic2), bool(mode2)))


def analyze_file(path, frames: int, rate: int) -> Analysis:
    """Analyse a decoded WAV of `frames` frames, reading only the part that is analysed."""
    keep = min(frames, int(MAX_ANALYSED_S * rate))
    start = (frames - keep) // 2
    samples, _ = sf.read(str(path), start=start, stop=start + keep, dtype="float32", always_2d=True)
    return analyze(samples, rate, duration=frames / rate)
