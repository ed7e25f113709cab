"""Synthesized music with known answers: click tracks and drum patterns at a given tempo, triad
progressions and scales in a given key. The tempo/key tests and benchmarks/analyze_accuracy.py
measure `webapp.analysis` on these; the browser test uploads one.

Everything is deterministic for a given seed; samples are float32 mono in -1..1.
"""
from __future__ import annotations

import io

import numpy as np
import soundfile as sf

RATE = 44100
NOTE_NAMES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
MAJOR_STEPS = (0, 2, 4, 5, 7, 9, 11)
NATURAL_MINOR_STEPS = (0, 2, 3, 5, 7, 8, 10)


def _silence(seconds: float, rate: int) -> np.ndarray:
    return np.zeros(int(round(seconds * rate)), dtype=np.float64)


def _place(out: np.ndarray, sound: np.ndarray, at_s: float, rate: int) -> None:
    start = int(round(at_s * rate))
    end = min(len(out), start + len(sound))
    if start < end:
        out[start:end] += sound[: end - start]


def _click(rate: int, accent: bool) -> np.ndarray:
    t = np.arange(int(0.03 * rate)) / rate
    freq = 1500.0 if accent else 1000.0
    return (0.9 if accent else 0.6) * np.sin(2 * np.pi * freq * t) * np.exp(-t / 0.006)


def _kick(rate: int) -> np.ndarray:
    t = np.arange(int(0.25 * rate)) / rate
    freq = 50 + 100 * np.exp(-t / 0.03)  # a falling pitch, as a drum head's
    phase = 2 * np.pi * np.cumsum(freq) / rate
    return 0.9 * np.sin(phase) * np.exp(-t / 0.09)


def _snare(rate: int, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(0.18 * rate)) / rate
    body = 0.4 * np.sin(2 * np.pi * 190 * t) * np.exp(-t / 0.04)
    rattle = 0.5 * rng.standard_normal(t.shape) * np.exp(-t / 0.05)
    return body + rattle


def _hat(rate: int, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(0.05 * rate)) / rate
    noise = rng.standard_normal(t.shape)
    noise = np.diff(noise, prepend=0.0)  # tilt towards the highs
    return 0.15 * noise * np.exp(-t / 0.012)


def click_track(bpm: float, seconds: float = 20.0, rate: int = RATE, beats_per_bar: int = 4) -> np.ndarray:
    """A metronome: a click on every beat, the first of each bar higher and louder."""
    out = _silence(seconds, rate)
    period = 60.0 / bpm
    for i in range(int(seconds / period) + 1):
        _place(out, _click(rate, i % beats_per_bar == 0), i * period, rate)
    return out.astype(np.float32)


def drum_pattern(bpm: float, seconds: float = 20.0, rate: int = RATE, seed: int = 0) -> np.ndarray:
    """A rock beat: kick on 1, 3 and the "and" of 3, snare on 2 and 4, closed hi-hat on every eighth."""
    rng = np.random.default_rng(seed)
    out = _silence(seconds, rate)
    beat = 60.0 / bpm
    bar = 4 * beat
    kick, snare = _kick(rate), _snare(rate, rng)
    for b in range(int(seconds / bar) + 1):
        t0 = b * bar
        for k in (0.0, 2.0, 2.5):
            _place(out, kick, t0 + k * beat, rate)
        for s in (1.0, 3.0):
            _place(out, snare, t0 + s * beat, rate)
        for e in range(8):
            _place(out, _hat(rate, rng), t0 + e * beat / 2, rate)
    return (0.7 * out / np.max(np.abs(out))).astype(np.float32)


def _tone(freq: float, seconds: float, rate: int, amp: float = 0.2) -> np.ndarray:
    """A plucked-string-like tone: six harmonics falling as 1/n, a short attack and a decay."""
    t = np.arange(int(round(seconds * rate))) / rate
    wave = sum(np.sin(2 * np.pi * freq * n * t) / n for n in range(1, 7))
    env = np.minimum(1.0, t / 0.01) * np.exp(-t / max(seconds, 0.3)) * np.minimum(1.0, (seconds - t) / 0.02 + 1e-9)
    return amp * wave * env


def _midi_hz(midi: float) -> float:
    return 440.0 * 2 ** ((midi - 69) / 12)


def _tonic_midi(tonic: int) -> int:
    return 48 + tonic  # C3..B3: the progressions and scales sit in the middle register


def triads(tonic: int, minor: bool, seconds_per_chord: float = 1.0, repeats: int = 3, rate: int = RATE) -> np.ndarray:
    """I-IV-V-I in major, i-iv-V-i in minor (the V major, as the harmonic minor has it), root position."""
    root = _tonic_midi(tonic)
    third = 3 if minor else 4
    chords = [(0, third, 7), (5, 5 + third, 12), (7, 11, 14), (0, third, 7)]
    out = []
    for _ in range(repeats):
        for chord in chords:
            out.append(sum(_tone(_midi_hz(root + n), seconds_per_chord, rate, 0.15) for n in chord))
    return np.concatenate(out).astype(np.float32)


def scale(tonic: int, minor: bool, seconds_per_note: float = 0.35, rate: int = RATE) -> np.ndarray:
    """The scale up and down from the tonic (natural minor in minor), the tonic held at both ends."""
    root = _tonic_midi(tonic)
    steps = NATURAL_MINOR_STEPS if minor else MAJOR_STEPS
    up = [root + s for s in steps] + [root + 12]
    notes = up + up[-2::-1]
    lengths = [seconds_per_note * (3 if i in (0, len(notes) - 1) else 1) for i in range(len(notes))]
    parts = [_tone(_midi_hz(n), d, rate) for n, d in zip(notes, lengths)]
    return np.concatenate(parts * 2).astype(np.float32)


def with_noise(signal: np.ndarray, snr_db: float, seed: int = 1) -> np.ndarray:
    """White noise added at the given signal-to-noise ratio (of the whole clip's RMS)."""
    rng = np.random.default_rng(seed)
    rms = float(np.sqrt(np.mean(signal.astype(np.float64) ** 2)))
    noise = rng.standard_normal(signal.shape) * rms / 10 ** (snr_db / 20)
    mixed = signal + noise
    return (mixed / max(1.0, float(np.max(np.abs(mixed))) / 0.95)).astype(np.float32)


def key_name(tonic: int, minor: bool) -> str:
    return f"{NOTE_NAMES[tonic]} {'minor' if minor else 'major'}"


def wav_bytes(signal: np.ndarray, rate: int = RATE, channels: int = 2, subtype: str = "PCM_16") -> bytes:
    data = np.stack([signal] * channels, axis=1) if channels > 1 else signal
    buf = io.BytesIO()
    sf.write(buf, data, rate, format="WAV", subtype=subtype)
    return buf.getvalue()
