"""The lego task through `diffusers.AceStepPipeline` (diffusers 0.42.1 and later).

Every sampling setting comes from `runner.sampling` and is passed explicitly, so this engine and
the acestep engine compute the same music. Two things the pipeline would do its own way are done
here the official way: the source's VAE encoding (in the official's overlap-discard pieces, one
posterior sample per piece, from the seeded default generator; a silent source becomes the silence
latent) and the candidates' noise (one generator per candidate, `seed + i`, on the job's device).
The pipeline is asked for latents and the VAE decode is done here, also the official way (candidate by
candidate, in its overlapping pieces), so that each phase gets its own stage and timing.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import numpy as np

from runner import sampling, speedups
from runner.contract import Stage
from runner.device import gpu_total_gib
from runner.engines.base import LegoJob, LoadOptions, StageCallback, StepCallback, seed_source_sample
from runner.events import checkpoint_error, generation_error
from runner.tracks import lego_instruction


def _cuda_supports_bfloat16(device: str) -> bool:
    import torch

    return device == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(0)[0] >= 8


def free_cuda_gib(device: str) -> float | None:
    """The official's "effective free VRAM" (acestep/gpu_config.py get_effective_free_vram_gb): free on the
    device plus what torch's cache holds unused; None on the CPU."""
    import torch

    if device != "cuda" or not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info(0)
    return (free + torch.cuda.memory_reserved(0) - torch.cuda.memory_allocated(0)) / 1024**3


def decode(vae, latents, device: str):
    """[batch, 2, samples] float32 audio from [batch, frames, 64] latents, the official way (runner.sampling):
    candidate by candidate, in overlapping pieces, anti-clipped."""
    import torch

    vae.tile_latent_min_length = sampling.decode_tile_frames(free_cuda_gib(device))
    vae.tile_latent_overlap = sampling.decode_overlap_frames(vae.tile_latent_min_length)
    z = latents.transpose(1, 2).to(vae.dtype)
    audio = torch.cat([vae.decode(z[i : i + 1]).sample.float().cpu() for i in range(z.shape[0])])
    return anti_clip(audio)


def encode_source(vae, audio, silence_latent, tiles: list, on_tile=None) -> "torch.Tensor":
    """[1, 64, frames] latents of `audio` ([1, 2, samples], on the VAE's device and dtype): one posterior
    sample per tile, cores kept, as the official encoder does; the silence latent for a silent source.
    `on_tile(done, total)` after each tile: on a CPU a long source takes minutes here."""
    import torch

    if sampling.is_silent(audio.float().cpu().numpy()):
        frames = audio.shape[-1] // sampling.LATENT_SAMPLES
        return silence_latent[:, :frames, :].transpose(1, 2)
    pieces = []
    for done, tile in enumerate(tiles, start=1):
        latent = vae.encode(audio[:, :, tile.start:tile.end]).latent_dist.sample()
        pieces.append(latent[:, :, tile.keep_from:latent.shape[-1] - tile.drop_tail])
        if on_tile is not None:
            on_tile(done, len(tiles))
    return torch.cat(pieces, dim=-1)


@contextlib.contextmanager
def official_source_encoding(pipe, settings: sampling.Sampling, on_tile=None):
    """Route the pipeline's source encoding (prepare_src_latents with src_audio) through encode_source."""
    own = pipe.prepare_src_latents

    def prepare_src_latents(device, dtype, batch_size=1, src_audio=None, audio_codes=None, latent_length=None, task_type="text2music"):
        if src_audio is None or audio_codes is not None or task_type == "cover":
            return own(device=device, dtype=dtype, batch_size=batch_size, src_audio=src_audio, audio_codes=audio_codes,
                       latent_length=latent_length, task_type=task_type)
        audio = (src_audio.unsqueeze(0) if src_audio.dim() == 2 else src_audio).to(device=device, dtype=pipe.vae.dtype)
        silence = pipe.condition_encoder.silence_latent.to(device=device, dtype=pipe.vae.dtype)
        tiles = sampling.source_tiles(audio.shape[-1], settings.source_tile_seconds)
        latents = encode_source(pipe.vae, audio, silence, tiles, on_tile).to(device=device, dtype=dtype).transpose(1, 2)
        return latents.expand(batch_size, -1, -1), latents.shape[1]

    pipe.prepare_src_latents = prepare_src_latents
    try:
        yield
    finally:
        del pipe.prepare_src_latents


def anti_clip(audio):
    """What the official decode does before returning (generate_music_decode.py:199-203): a candidate
    whose peak exceeds 1 is divided by its peak. (Normalising to -1 dBFS is the runner's, after cropping.)"""
    peak = audio.abs().amax(dim=[1, 2], keepdim=True)
    return audio / peak.clamp(min=1.0) if bool((peak > 1.0).any()) else audio


def pipeline_arguments(job: LegoJob, settings: sampling.Sampling, source, generators, callback) -> dict:
    """Everything AceStepPipeline.__call__ is given for one lego job (tests read this back)."""
    batch = job.batch_size
    return dict(
        prompt=[job.caption] * batch,
        lyrics=[settings.lyrics] * batch,  # a list: diffusers 0.42.1 fails on a plain string with batch > 1
        vocal_language=settings.vocal_language,
        audio_duration=settings.duration_seconds,
        num_inference_steps=job.steps,
        guidance_scale=job.guidance_scale,
        shift=settings.shift,
        cfg_interval_start=settings.cfg_interval_start,
        cfg_interval_end=settings.cfg_interval_end,
        generator=generators,
        output_type="latent",
        callback_on_step_end=callback,
        instruction=lego_instruction(job.track),
        bpm=job.bpm,
        keyscale=job.key or "",
        timesignature=settings.time_signature,
        task_type="lego",
        track_name=job.track.upper(),
        src_audio=source,
        repainting_start=0.0,  # the whole clip: a repaint window is the runner's (runner/window.py)
        repainting_end=-1.0,
    )


class DiffusersEngine:
    name = "diffusers"

    def __init__(self) -> None:
        self.pipe = None
        self.options: Optional[LoadOptions] = None
        self.speedups: Optional[speedups.Speedups] = None

    def load(self, checkpoints: Path, options: LoadOptions) -> None:
        import torch
        from diffusers import AceStepPipeline

        # The VAE in ACE-Step's precision, whatever the job's (runner.sampling): it decides the source's
        # sample. Loaded so, not cast afterwards, which would round its weights through the job's dtype.
        vae_dtype = getattr(torch, sampling.vae_dtype(options.device, _cuda_supports_bfloat16(options.device)))
        dtypes = {"default": getattr(torch, options.dtype), "vae": vae_dtype}
        # The compiled blocks (if `compile` is on) load in a thread while the weights load and the source encodes.
        prefetched = speedups.prefetch(checkpoints / "transformer", options.device, dtypes["default"])
        try:
            # The audio tokenizer/detokenizer serve only audio-code covers, never lego.
            pipe = AceStepPipeline.from_pretrained(
                str(checkpoints), dtype=dtypes, audio_tokenizer=None, audio_token_detokenizer=None
            )
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise checkpoint_error("checkpoint_unloadable", f"The diffusers checkpoint in {checkpoints} could not be loaded: {exc}") from exc
        pipe.set_progress_bar_config(disable=True)
        pipe.vae.enable_tiling()
        if options.device == "cuda" and options.offload:
            pipe.enable_model_cpu_offload()
        else:
            pipe.to(options.device)
        self.speedups = speedups.apply(pipe, options.device, offload=options.device == "cuda" and options.offload,
                                       prefetched=prefetched)
        self.pipe, self.options = pipe, options

    def sampling_for(self, job: LegoJob) -> sampling.Sampling:
        device = self.options.device
        return sampling.settings_for(job.seed, job.batch_size, job.time_signature, job.source.shape[-1], device,
                                     gpu_total_gib(device), _cuda_supports_bfloat16(device))

    def generate(self, job: LegoJob, on_stage: StageCallback, on_step: StepCallback) -> list[np.ndarray]:
        import torch

        pipe = self.pipe
        settings = self.sampling_for(job)
        open_bar = pipe.progress_bar

        def progress_bar(*args, **kwargs):
            # The pipeline opens its progress bar right before the denoising loop.
            on_stage("generating")
            return open_bar(*args, **kwargs)

        def tile_done(done, total):
            on_step(done, total, Stage.ENCODING.value)

        def step_end(_pipe, step_idx, _timestep, callback_kwargs):
            on_step(step_idx + 1, job.steps)
            return callback_kwargs

        pipe.progress_bar = progress_bar
        self.speedups.reset()
        on_stage("encoding")
        source = torch.from_numpy(sampling.model_source(job.source))
        generators = [torch.Generator(device=pipe._execution_device).manual_seed(s) for s in settings.candidate_seeds]
        seed_source_sample(job.seed)
        try:
            with torch.inference_mode(), official_source_encoding(pipe, settings, tile_done):
                latents = pipe(**pipeline_arguments(job, settings, source, generators, step_end)).audios
                self.speedups.release()
                on_stage("decoding")
                audio = decode(pipe.vae, latents, self.options.device)
                pipe.maybe_free_model_hooks()
        except torch.OutOfMemoryError as exc:
            raise generation_error("out_of_memory", f"The GPU ran out of memory ({exc}); try a shorter source, batch 1, or ACESTEP_OFFLOAD=on.", retryable=True) from exc
        finally:
            del pipe.progress_bar
        return list(audio.cpu().numpy())

    def describe(self) -> dict:
        """For the result event: the speed-up switches that were on, and the last job's DiT
        forwards (count, batch sizes, first and last timestep)."""
        return {"speedups": self.speedups.report() if self.speedups else None}

    def peak_vram_bytes(self) -> Optional[int]:
        import torch

        if self.options is None or self.options.device != "cuda":
            return None
        return int(torch.cuda.max_memory_reserved())
