"""Reading the source, converting it for the model, and writing the stem back in the source's terms.

The stem must line up with the source sample for sample in a DAW, so it is returned at the
source's sample rate with exactly the source's frame count. Every file is written under a
temporary name and renamed, so a cancelled or failed run never leaves a partial file.
"""
from __future__ import annotations

import io
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from runner.events import bad_input
from runner.riff import wav_bytes_missing  # noqa: F401 - shared with the web service's upload check

MODEL_RATE = 48000
# 24-bit PCM: what DAWs exchange, and half the size of 32-bit float for the same stem.
FORMATS = {"wav": ("WAV", "PCM_24"), "flac": ("FLAC", "PCM_24"), "mp3": ("MP3", "MPEG_LAYER_III")}
MP3_MAX_RATE = 48000
FFMPEG_TIMEOUT_S = 120


@dataclass
class SourceAudio:
    """The decoded source: float32 samples (frames, channels) at its own rate."""

    samples: np.ndarray
    sample_rate: int

    @property
    def frames(self) -> int:
        return int(self.samples.shape[0])

    @property
    def seconds(self) -> float:
        return self.frames / self.sample_rate


def read_source(path: Path, max_seconds: float) -> SourceAudio:
    """Decode any file soundfile reads, else what ffmpeg decodes; reject what is not usable audio."""
    if not path.is_file():
        raise bad_input("source_not_found", f"The source file {path} does not exist; give the path of an audio file.")
    if path.stat().st_size == 0:
        raise bad_input("audio_empty", f"The source file {path} is empty; send a WAV, FLAC, OGG or MP3 file with sound in it.")
    try:
        audio = _read_with_soundfile(path)
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError):
        audio = _read_with_ffmpeg(path)
    if audio.frames == 0:
        raise bad_input("audio_empty", f"The source file {path} holds no audio frames; send a recording at least a fraction of a second long.")
    if audio.seconds > max_seconds:
        raise bad_input(
            "audio_too_long",
            f"The source is {audio.seconds:.1f} s long; the limit is {max_seconds:.0f} s (MAX_DURATION_S). Send a shorter excerpt.",
        )
    if not np.isfinite(audio.samples).all():
        raise bad_input("audio_unreadable", f"The source file {path} decodes to invalid samples (NaN or infinity); re-export it.")
    return audio


def _read_with_soundfile(path: Path) -> SourceAudio:
    samples, rate = sf.read(str(path), dtype="float32", always_2d=True)
    missing = wav_bytes_missing(path)
    if missing:
        # libsndfile quietly reads a cut-off WAV up to the cut; its header still declares the whole.
        raise bad_input(
            "audio_truncated",
            f"The source file {path} is cut off ({missing} bytes of audio data missing); upload the complete file.",
        )
    return SourceAudio(samples=samples, sample_rate=int(rate))


def _read_with_ffmpeg(path: Path) -> SourceAudio:
    """Formats libsndfile does not know (M4A/AAC...), decoded by ffmpeg to 32-bit float WAV."""
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise bad_input(
            "audio_unreadable",
            f"The source file {path} is not audio this runner can read (WAV, FLAC, OGG, MP3; install ffmpeg for M4A/AAC and more).",
        )
    cmd = [ffmpeg, "-nostdin", "-v", "error", "-i", str(path), "-map", "0:a:0", "-f", "wav", "-acodec", "pcm_f32le", "pipe:1"]
    try:
        done = subprocess.run(cmd, capture_output=True, timeout=FFMPEG_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise bad_input("audio_unreadable", f"Decoding {path} took longer than {FFMPEG_TIMEOUT_S} s; re-export it as WAV or FLAC.") from None
    if done.returncode != 0 or not done.stdout:
        raise bad_input("audio_unreadable", f"The source file {path} is not audio, or is damaged; send a WAV, FLAC, OGG, MP3 or M4A file.")
    samples, rate = sf.read(io.BytesIO(done.stdout), dtype="float32", always_2d=True)
    return SourceAudio(samples=samples, sample_rate=int(rate))


def to_model_input(audio: SourceAudio) -> np.ndarray:
    """Stereo float32 (2, frames) at 48 kHz: mono is doubled, extra channels beyond L/R dropped."""
    samples = audio.samples
    if samples.shape[1] == 1:
        samples = np.repeat(samples, 2, axis=1)
    elif samples.shape[1] > 2:
        samples = samples[:, :2]
    if audio.sample_rate != MODEL_RATE:
        samples = soxr.resample(samples, audio.sample_rate, MODEL_RATE, quality="HQ")
    return np.ascontiguousarray(samples.T, dtype=np.float32)


def to_source_terms(stem: np.ndarray, sample_rate: int, frames: int) -> np.ndarray:
    """The model's (2, n) 48 kHz stem as (frames, 2) at the source's rate, exactly `frames` long."""
    samples = np.ascontiguousarray(stem.T, dtype=np.float32)
    if sample_rate != MODEL_RATE:
        samples = soxr.resample(samples, MODEL_RATE, sample_rate, quality="HQ")
    if samples.shape[0] >= frames:
        samples = samples[:frames]
    else:
        samples = np.pad(samples, ((0, frames - samples.shape[0]), (0, 0)))
    return np.clip(samples, -1.0, 1.0)


def check_format(fmt: str, sample_rate: int) -> None:
    """MP3 (LAME) cannot carry rates above 48 kHz; refuse before spending GPU time."""
    if fmt not in FORMATS:
        raise bad_input("bad_format", f"Unknown output format {fmt!r}; choose wav, flac or mp3.")
    if fmt == "mp3" and sample_rate > MP3_MAX_RATE:
        raise bad_input(
            "format_rate_unsupported",
            f"MP3 cannot carry the source's {sample_rate} Hz; ask for wav or flac, which keep the source's rate.",
        )


def _umask() -> int:
    """The process's umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: Path, samples: np.ndarray, sample_rate: int, fmt: str) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see a partial file."""
    container, subtype = FORMATS[fmt]
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=str(path.parent))
    os.close(fd)
    try:
        sf.write(tmp, samples, sample_rate, format=container, subtype=subtype)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a stem is an ordinary file, as open() would make it
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
