"""How a lego job is sampled: the settings that decide the music, defined once for both engines.

Both engines take every value from here and pass it explicitly (the diffusers engine to
`AceStepPipeline.__call__`, the acestep engine to `GenerationParams`/`GenerationConfig`), and the
result event reports them, so `--engine` changes the implementation, not the music. No torch here.

The values are what the seed's production path runs: ACE-Step 1.5's own API server (`/release_task`)
for the lego task on the base model. Line numbers refer to the official `main` at 6d467e4 (2026-06-26):
- timestep shift 3.0: acestep/api/http/release_task_request_builder.py:83 (`shift` default 3.0),
  acestep/api/http/release_task_models.py:92-95, passed on at acestep/api/job_generation_setup.py:175.
  The Python API's own default is 1.0 (acestep/inference.py:140); the UI also uses 3.0 for base
  (acestep/ui/gradio/events/generation/model_config.py:138).
- DCW wavelet correction off. The API server passes no DCW field, so today it would run the
  sampler default, on (acestep/inference.py:148, since be74cd5 2026-04-23). Off is what the
  official UI sets for non-turbo models (model_config.py:140, since e56de7b 2026-05-18), what every
  ACE-Step before db3941f (2026-04-20, the hook's first commit) ran, the PyPI fork 20260212
  included, and the only value diffusers' AceStepPipeline can follow (it has no DCW).
- lyrics language "en": release_task_request_builder.py:55 (the Python API's default is "unknown",
  inference.py:117); lyrics "" (wordless stems, the lyric encoder sees "# Lyric\\n").
- guidance interval 0..1, APG without ADG, the ODE Euler sampler: release_task_request_builder.py:79-82.
  Only the full interval means the same on both: diffusers 0.42.1 tests it on 1 - t, ACE-Step on t.
- time signature as beats per bar ("4", not "4/4"): the official UI offers only "2", "3", "4", "6"
  (acestep/ui/gradio/interfaces/generation_tab_optional_controls.py:52-53).

Decided here, because the engines differ otherwise (issue 13 measured each). runner/lego.py hands
both engines the source through `model_source`:
- Source padding: the 48 kHz source, clamped to [-1, 1] as ACE-Step's reader does
  (core/generation/handler/io_audio.py:88), is padded with silence to a whole, even number of
  latent frames (the DiT patches two) and at least MIN_LATENT_FRAMES. The official pads its *latents*
  to 128 frames with the stored silence latent (conditioning_target.py:120-130); padding the audio
  instead lets both engines compute the same thing. So a source under 5.12 s is conditioned on the
  VAE's encoding of zeros where the official would put its silence latent.
- Duration line: "{int(seconds)} seconds" of the padded source (the official derives it from the
  audio it is given, batch_prep.py:98-106; diffusers from `audio_duration`).
- Source latents: the VAE posterior is *sampled* (as both implementations do), in the official's
  overlap-discard tiles (vae_encode.py:46-80, vae_encode_chunks.py): pieces of 30 s on a GPU with
  more than 8 GiB, 15 s otherwise, 2 s overlap, one sample per piece. The draws come from the job
  device's default torch generator, seeded with `source_sample_seed(seed)` right before the engine
  starts; nothing draws from it before the encode. A silent source (every |x| < 1e-6) is not
  encoded: the silence latent stands in (conditioning_target.py:89-91).
- Candidate noise: one torch.Generator per candidate on the job's device, seeded `seed + i`
  (the official prepare_noise, models/base/modeling_acestep_v15_base.py:1783-1818).
- The VAE's precision is ACE-Step's, whatever the job's (core/generation/handler/memory_utils.py:199-215):
  float32 on the CPU; on CUDA bfloat16 from compute capability 8.0, else float16 (a T4). The posterior
  noise is drawn in that precision, so this decides the source's sample, not only its rounding.
- Decoding: candidate by candidate, in pieces of `decode_tile_frames` latent frames overlapping by 64
  (core/generation/handler/vae_decode_chunks.py:13-57, memory_utils.py:81-116): 256 on the CPU; on CUDA
  512, 384, 256 or 128 as the free memory at that moment is 24, 16, 12 GiB or less. Both engines read
  their own free memory, so on a GPU the piece size can differ where they hold different amounts; the
  pieces overlap far beyond the decoder's reach, so that changes only float rounding. A candidate
  whose peak exceeds 1 is divided by its peak (generate_music_decode.py:199-203); normalising to
  -1 dBFS is the runner's, after cropping to the source (the official's own is turned off).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

SAMPLE_RATE = 48000
LATENT_SAMPLES = 1920  # one latent frame (25 per second)
LATENTS_PER_SECOND = SAMPLE_RATE / LATENT_SAMPLES
PATCH_FRAMES = 2
MIN_LATENT_FRAMES = 128  # 5.12 s, the official minimum sequence
SILENCE_THRESHOLD = 1e-6  # the official is_silence (core/generation/handler/memory_utils.py:52-54)

SHIFT = 3.0
DCW_ENABLED = False
VOCAL_LANGUAGE = "en"
LYRICS = ""
CFG_INTERVAL_START = 0.0
CFG_INTERVAL_END = 1.0
USE_ADG = False
INFER_METHOD = "ode"
SAMPLER_MODE = "euler"

# The official encoder's tiling (acestep/core/generation/handler/vae_encode.py:46-54).
TILE_SECONDS_SMALL_GPU = 15
TILE_SECONDS = 30
TILE_SMALL_GPU_GIB = 8.0
TILE_OVERLAP_SECONDS = 2
# The official decoder's pieces (core/generation/handler/memory_utils.py:79-116).
DECODE_MAX_FRAMES = 512
DECODE_OVERLAP_FRAMES = 64
DECODE_MIN_OVERLAP_FRAMES = 4
SOURCE_SEED_OFFSET = 2**32  # keeps the source's draws apart from every candidate's (seed + i, i < 2**32)


@dataclass(frozen=True)
class Sampling:
    """Every value that decides one job's music, beyond the job's own fields."""

    shift: float
    dcw_enabled: bool
    vocal_language: str
    lyrics: str
    cfg_interval_start: float
    cfg_interval_end: float
    use_adg: bool
    infer_method: str
    sampler_mode: str
    time_signature: str  # beats per bar, "" when not given
    latent_frames: int  # of the padded source
    duration_seconds: float  # of the padded source
    duration_line: str
    candidate_seeds: tuple[int, ...]
    source_sample_seed: int
    source_tile_seconds: int
    vae_dtype: str

    def event_fields(self) -> dict:
        """What the result event reports."""
        fields = asdict(self)
        fields["candidate_seeds"] = list(self.candidate_seeds)
        return fields


def latent_frames(samples: int) -> int:
    """Latent frames of a source of `samples` after padding (see the module docstring)."""
    frames = max(MIN_LATENT_FRAMES, -(-samples // LATENT_SAMPLES))
    frames += frames % PATCH_FRAMES
    # diffusers 0.42.1 sizes its noise as ceil((L / 25) * 25), which is L + 1 for some L; skip those.
    while math.ceil((frames / LATENTS_PER_SECOND) * LATENTS_PER_SECOND) != frames:
        frames += PATCH_FRAMES
    return frames


def model_source(audio: np.ndarray) -> np.ndarray:
    """The source as both engines receive it: float32 (2, samples), clamped, padded. Idempotent."""
    audio = np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0)
    target = latent_frames(audio.shape[-1]) * LATENT_SAMPLES
    return np.pad(audio, ((0, 0), (0, target - audio.shape[-1])))


def time_signature(value: str | None) -> str:
    """Beats per bar: "4/4" -> "4", "6/8" -> "6", None -> ""."""
    return (value or "").split("/")[0].strip()


def duration_line(seconds: float) -> str:
    return f"{int(seconds)} seconds"


def candidate_seeds(seed: int, batch_size: int) -> tuple[int, ...]:
    return tuple(seed + i for i in range(batch_size))


def source_sample_seed(seed: int) -> int:
    return seed + SOURCE_SEED_OFFSET


def source_tile_seconds(gpu_total_gib: float) -> int:
    """The official's piece length: 15 s without a GPU or with 8 GiB or less, else 30 s."""
    return TILE_SECONDS_SMALL_GPU if gpu_total_gib <= TILE_SMALL_GPU_GIB else TILE_SECONDS


def vae_dtype(device: str, cuda_supports_bfloat16: bool) -> str:
    if device != "cuda":
        return "float32"
    return "bfloat16" if cuda_supports_bfloat16 else "float16"


def decode_tile_frames(free_cuda_gib: float | None) -> int:
    """Latent frames per decoded piece: 256 on the CPU (None), else by the GPU's free memory."""
    if free_cuda_gib is None:
        return min(256, DECODE_MAX_FRAMES)
    for floor, frames in ((24.0, 512), (16.0, 384), (12.0, 256)):
        if free_cuda_gib >= floor:
            return min(frames, DECODE_MAX_FRAMES)
    return min(128, DECODE_MAX_FRAMES)


def decode_overlap_frames(tile_frames: int) -> int:
    """64, halved while it leaves no stride (vae_decode_chunks.py:31-38)."""
    overlap = DECODE_OVERLAP_FRAMES
    while tile_frames - 2 * overlap <= 0 and overlap > DECODE_MIN_OVERLAP_FRAMES:
        overlap //= 2
    return max(overlap, DECODE_MIN_OVERLAP_FRAMES)


@dataclass(frozen=True)
class Tile:
    """One VAE encode: audio [start, end) in samples; keep latent frames [keep_from, len - drop_tail)."""

    start: int
    end: int
    keep_from: int
    drop_tail: int


def source_tiles(samples: int, tile_seconds: int) -> list[Tile]:
    """The official overlap-discard plan (vae_encode.py:62-80, vae_encode_chunks.py:10-40)."""
    chunk, overlap = tile_seconds * SAMPLE_RATE, TILE_OVERLAP_SECONDS * SAMPLE_RATE
    if samples <= chunk:
        return [Tile(0, samples, 0, 0)]
    stride = chunk - 2 * overlap
    tiles = []
    for i in range(math.ceil(samples / stride)):
        core_start, core_end = i * stride, min(i * stride + stride, samples)
        start, end = max(0, core_start - overlap), min(samples, core_end + overlap)
        # The official rounds (added samples / samples-per-frame); on whole frames that is exact.
        tiles.append(Tile(start, end, round((core_start - start) / LATENT_SAMPLES), round((end - core_end) / LATENT_SAMPLES)))
    return tiles


def is_silent(audio: np.ndarray) -> bool:
    return bool(np.all(np.abs(audio) < SILENCE_THRESHOLD))


def settings_for(seed: int, batch_size: int, time_signature_value: str | None, source_samples: int,
                 device: str = "cpu", gpu_total_gib: float = 0.0, cuda_bfloat16: bool = False) -> Sampling:
    """The sampling of one job; `source_samples` may be before or after padding (the same frames follow).
    `device`, the GPU's total memory and its bfloat16 support decide the source's pieces and the VAE's precision."""
    frames = latent_frames(source_samples)
    seconds = frames * LATENT_SAMPLES / SAMPLE_RATE
    return Sampling(
        shift=SHIFT, dcw_enabled=DCW_ENABLED, vocal_language=VOCAL_LANGUAGE, lyrics=LYRICS,
        cfg_interval_start=CFG_INTERVAL_START, cfg_interval_end=CFG_INTERVAL_END, use_adg=USE_ADG,
        infer_method=INFER_METHOD, sampler_mode=SAMPLER_MODE, time_signature=time_signature(time_signature_value),
        latent_frames=frames, duration_seconds=seconds, duration_line=duration_line(seconds),
        candidate_seeds=candidate_seeds(seed, batch_size), source_sample_seed=source_sample_seed(seed),
        source_tile_seconds=source_tile_seconds(gpu_total_gib if device == "cuda" else 0.0),
        vae_dtype=vae_dtype(device, cuda_bfloat16),
    )
