"""Prove an upload is audio before it is queued, and hand the runner one format it surely reads.

ffprobe reads what the file declares (container duration, codec, rate, channels); a file that
would decode to more than MAX_DECODED_MB (rate x channels x duration: a 54 KB FLAC at 384 kHz
declares 700 MB) is refused before decoding, and so is one the disk has no room for. ffmpeg then
decodes the whole audio stream (bounded by the duration limit and by the size limit, whatever the
header says) into a float32 WAV at the source's own sample rate.
Decoding is the proof: bytes named `.wav` that are not audio fail here, a file whose decoded
length falls well short of its declared length is truncated (a cut-off WAV, which every decoder
reads quietly up to the cut, is caught by its header: runner/riff.py). The decoded WAV is what the runner
gets, so the stem's frame count is measured against exactly this file. Without ffmpeg on the
host, soundfile (libsndfile) does the same for the formats it knows.

Every external call is an argument list with a timeout; no request value reaches it except the
server-chosen temporary path.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

from runner.riff import wav_bytes_missing
from webapp.errors import ApiError

log = logging.getLogger("acestep.webapp.audio")

# A decode shorter than the declared duration by more than this is a truncated file.
TRUNCATION_TOLERANCE_S = 1.0
TRUNCATION_TOLERANCE_RATIO = 0.05
# Channels beyond stereo are folded down; the model is stereo.
MAX_CHANNELS = 2
BYTES_PER_SAMPLE = 4  # the decoded WAV is 32-bit float
DISK_MARGIN_BYTES = 4 * 1024 * 1024  # room kept for records, logs and the stem


@dataclass
class ProbedAudio:
    """The decoded source as the runner will see it."""

    path: Path
    sample_rate: int
    channels: int
    frames: int
    source_format: str
    declared_duration_s: float | None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def duration_s(self) -> float:
        return self.frames / self.sample_rate


def tools_available() -> bool:
    return shutil.which("ffprobe") is not None and shutil.which("ffmpeg") is not None


def probe_and_decode(raw: Path, wav_out: Path, *, timeout_s: float, min_s: float, max_s: float,
                     max_bytes: int) -> ProbedAudio:
    """Check `raw` and write its audio to `wav_out` (float32 WAV); raise ApiError for bad audio."""
    if raw.stat().st_size == 0:
        raise ApiError("empty_audio")
    missing = wav_bytes_missing(raw)
    if missing:
        raise ApiError("truncated_audio", f"The WAV file's header declares {missing} more bytes of audio than the file "
                                          "holds: it is cut off; send the complete file.")
    if tools_available():
        probed = _with_ffmpeg(raw, wav_out, timeout_s, max_s, max_bytes)
    else:
        probed = _with_soundfile(raw, wav_out, max_s, max_bytes)
    _check_lengths(probed, min_s, max_s)
    _check_size(probed.sample_rate, probed.channels, probed.duration_s, max_bytes)
    return probed


def decoded_bytes(rate: int, channels: int, seconds: float) -> int:
    return int(rate * min(max(channels, 1), MAX_CHANNELS) * BYTES_PER_SAMPLE * seconds)


def _check_size(rate: int, channels: int, seconds: float, max_bytes: int) -> None:
    size = decoded_bytes(rate, channels, seconds)
    if size > max_bytes:
        raise ApiError("audio_too_large", f"The audio decodes to {size / 1048576:.0f} MB ({rate} Hz x "
                                          f"{min(channels, MAX_CHANNELS)} channels x {seconds:.1f} s as 32-bit float); "
                                          f"this service accepts at most {max_bytes / 1048576:g} MB (MAX_DECODED_MB). "
                                          "Send it at 48 kHz, or a shorter excerpt.")


def _check_room(folder: Path, need: int) -> None:
    """Refuse (retryable) before decoding what the disk cannot hold."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return
    if st.f_bavail * st.f_frsize < need + DISK_MARGIN_BYTES:
        raise ApiError("storage_full")


def _with_ffmpeg(raw: Path, wav_out: Path, timeout_s: float, max_s: float, max_bytes: int) -> ProbedAudio:
    t0 = time.perf_counter()
    info = _ffprobe(raw, timeout_s)
    t1 = time.perf_counter()
    streams = [s for s in info.get("streams", []) if s.get("codec_type") == "audio"]
    if not streams:
        raise ApiError("not_audio")
    stream = streams[0]
    declared = _float_or_none(stream.get("duration")) or _float_or_none(info.get("format", {}).get("duration"))
    if declared is not None and declared > max_s + TRUNCATION_TOLERANCE_S and declared < 24 * 3600:
        # Refuse before spending time decoding a long file (a lying header is caught after decoding).
        raise ApiError("audio_too_long", _too_long_message(declared, max_s))
    channels = int(stream.get("channels") or 0)
    rate = int(_float_or_none(stream.get("sample_rate")) or 0)
    if declared is not None and rate > 0:
        _check_size(rate, channels, min(declared, max_s + 2 * TRUNCATION_TOLERANCE_S), max_bytes)
        _check_room(wav_out.parent, decoded_bytes(rate, channels, min(declared, max_s + 2 * TRUNCATION_TOLERANCE_S)))
    # -fs bounds the decoded file whatever the header claims; a cut there fails the size check below.
    cmd = ["ffmpeg", "-nostdin", "-hide_banner", "-v", "error", "-i", str(raw), "-map", "0:a:0", "-vn", "-sn", "-dn",
           "-t", f"{max_s + 2 * TRUNCATION_TOLERANCE_S:.3f}", "-fs", str(max_bytes + 4096), "-c:a", "pcm_f32le"]
    if channels > MAX_CHANNELS:
        cmd += ["-ac", str(MAX_CHANNELS)]
    cmd += ["-f", "wav", "-y", str(wav_out)]
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        wav_out.unlink(missing_ok=True)
        raise ApiError("not_audio", f"The upload could not be decoded within {timeout_s:g} s; send a plain WAV, MP3 or FLAC file.") from None
    t2 = time.perf_counter()
    if proc.returncode != 0 or not wav_out.is_file():
        log.info("ffmpeg refused an upload: %s", _last_line(proc.stderr))
        wav_out.unlink(missing_ok=True)
        if b"No space left on device" in (proc.stderr or b"") or b"Disk quota exceeded" in (proc.stderr or b""):
            raise ApiError("storage_full")
        raise ApiError("not_audio")
    if wav_out.stat().st_size > max_bytes:
        raise ApiError("audio_too_large", f"The audio decodes to more than {max_bytes / 1048576:g} MB (MAX_DECODED_MB); "
                                          "send it at 48 kHz, or a shorter excerpt.")
    decoded = _wav_info(wav_out)
    fmt = str(info.get("format", {}).get("format_name", "unknown")).split(",")[0]
    return ProbedAudio(wav_out, decoded.samplerate, decoded.channels, decoded.frames, fmt, declared,
                       {"ffprobe_s": t1 - t0, "decode_s": t2 - t1})


def _ffprobe(raw: Path, timeout_s: float) -> dict:
    cmd = ["ffprobe", "-v", "error", "-hide_banner", "-show_entries",
           "format=format_name,duration:stream=codec_type,codec_name,sample_rate,channels,duration", "-of", "json", str(raw)]
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise ApiError("not_audio", f"The upload could not be read within {timeout_s:g} s; send a plain WAV, MP3 or FLAC file.") from None
    if proc.returncode != 0:
        log.info("ffprobe refused an upload: %s", _last_line(proc.stderr))
        raise ApiError("not_audio")
    try:
        info = json.loads(proc.stdout or b"{}")
    except ValueError:
        raise ApiError("not_audio") from None
    return info if isinstance(info, dict) else {}


def _with_soundfile(raw: Path, wav_out: Path, max_s: float, max_bytes: int) -> ProbedAudio:
    t0 = time.perf_counter()
    try:
        info = sf.info(str(raw))
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError):
        raise ApiError("not_audio") from None
    if info.samplerate <= 0:
        raise ApiError("not_audio")
    declared = info.frames / info.samplerate if info.frames > 0 else None
    if declared is not None and declared > max_s + TRUNCATION_TOLERANCE_S:
        raise ApiError("audio_too_long", _too_long_message(declared, max_s))
    limit = int((max_s + 2 * TRUNCATION_TOLERANCE_S) * info.samplerate)
    channels = min(info.channels, MAX_CHANNELS)
    if declared is not None:
        _check_size(info.samplerate, channels, min(declared, max_s + 2 * TRUNCATION_TOLERANCE_S), max_bytes)
        _check_room(wav_out.parent, decoded_bytes(info.samplerate, channels, min(declared, max_s)))
    written = 0
    try:
        with sf.SoundFile(str(raw)) as src, sf.SoundFile(str(wav_out), "w", samplerate=info.samplerate,
                                                        channels=channels, format="WAV", subtype="FLOAT") as dst:
            for block in src.blocks(blocksize=65536, dtype="float32", always_2d=True):
                if block.shape[1] > MAX_CHANNELS:
                    block = np.stack([block[:, 0::2].mean(axis=1), block[:, 1::2].mean(axis=1)], axis=1)
                dst.write(block)
                written += block.shape[0]
                if written >= limit:
                    break
    except (sf.LibsndfileError, RuntimeError, ValueError):
        wav_out.unlink(missing_ok=True)
        raise ApiError("not_audio") from None
    return ProbedAudio(wav_out, info.samplerate, channels, written, str(info.format).lower(), declared,
                       {"decode_s": time.perf_counter() - t0})


def _check_lengths(probed: ProbedAudio, min_s: float, max_s: float) -> None:
    if probed.frames <= 0:
        raise ApiError("not_audio", "The upload holds no audio samples; send a recording with sound in it.")
    got = probed.duration_s
    declared = probed.declared_duration_s
    if declared is not None and got < declared - max(TRUNCATION_TOLERANCE_S, TRUNCATION_TOLERANCE_RATIO * declared):
        raise ApiError("truncated_audio", f"The file declares {declared:.1f} s of audio but only {got:.1f} s could be "
                                          "decoded: it is truncated or damaged; send the complete file.")
    if got > max_s:
        raise ApiError("audio_too_long", _too_long_message(got, max_s))
    if got < min_s:
        raise ApiError("audio_too_short", f"The audio is {got:.2f} s long; send at least {min_s:g} s.")


def check_claimed_duration(claimed: float | None, probed: ProbedAudio) -> None:
    """`audio_duration` is the length in seconds the client believes its file has.

    The stem always has the source's exact length, so the value changes nothing; it is a
    consistency check that catches a client sending the wrong file. It must be within 0.5 s
    or 2 % (whichever is larger) of the decoded length.
    """
    if claimed is None:
        return
    got = probed.duration_s
    if abs(claimed - got) > max(0.5, 0.02 * got):
        raise ApiError("audio_duration_mismatch", f"audio_duration says {claimed:g} s but the file is {got:.2f} s long; "
                                                  "omit audio_duration or send the right file.")


def _too_long_message(seconds: float, max_s: float) -> str:
    return f"The audio is {seconds:.1f} s long; this service accepts at most {max_s:g} s (MAX_DURATION_S). Send a shorter excerpt."


def _wav_info(path: Path):
    try:
        return sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError) as exc:
        raise ApiError("not_audio") from exc


def _float_or_none(value) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if out > 0 and out == out else None


def _last_line(stderr: bytes) -> str:
    lines = [ln for ln in (stderr or b"").decode("utf-8", "replace").splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""
