"""The lego task through `diffusers.AceStepPipeline` (diffusers 0.42.1 and later).

The pipeline is asked for latents and the VAE decode is done here, tiled, so that the
decode (the run's memory peak) is bounded and each phase gets its own stage and timing.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np

from runner import speedups
from runner.engines.base import MODEL_SAMPLE_RATE, LegoJob, LoadOptions, StageCallback, StepCallback
from runner.events import checkpoint_error, generation_error
from runner.tracks import lego_instruction

# The VAE turns 1920 samples into one latent frame and drops a partial frame; the DiT patches
# two frames at a time. Padding the source to whole patches keeps the stem's tail.
LATENT_SAMPLES = 1920
LATENTS_PER_SECOND = 25.0

class DiffusersEngine:
    name = "diffusers"

    def __init__(self) -> None:
        self.pipe = None
        self.options: Optional[LoadOptions] = None
        self.speedups: Optional[speedups.Speedups] = None

    def load(self, checkpoints: Path, options: LoadOptions) -> None:
        import torch
        from diffusers import AceStepPipeline

        dtype = getattr(torch, options.dtype)
        try:
            # The audio tokenizer/detokenizer (0.42 GB) serve only audio-code covers, never lego.
            pipe = AceStepPipeline.from_pretrained(
                str(checkpoints), torch_dtype=dtype, audio_tokenizer=None, audio_token_detokenizer=None
            )
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise checkpoint_error("checkpoint_unloadable", f"The diffusers checkpoint in {checkpoints} could not be loaded: {exc}") from exc
        pipe.set_progress_bar_config(disable=True)
        pipe.vae.enable_tiling()
        if options.device == "cuda" and options.offload:
            pipe.enable_model_cpu_offload()
        else:
            pipe.to(options.device)
        self.speedups = speedups.apply(pipe, options.device)
        self.pipe, self.options = pipe, options

    def generate(self, job: LegoJob, on_stage: StageCallback, on_step: StepCallback) -> list[np.ndarray]:
        import torch

        pipe = self.pipe
        open_bar = pipe.progress_bar

        def progress_bar(*args, **kwargs):
            # The pipeline opens its progress bar right before the denoising loop.
            on_stage("generating")
            return open_bar(*args, **kwargs)

        def step_end(_pipe, step_idx, _timestep, callback_kwargs):
            on_step(step_idx + 1, job.steps)
            return callback_kwargs

        pipe.progress_bar = progress_bar
        self.speedups.reset()
        on_stage("encoding")
        # The pipeline samples the source's VAE posterior with the global RNG, not `generator`:
        # seed both, or the same seed would not give the same stem.
        torch.manual_seed(job.seed)
        generator = torch.Generator(device="cpu").manual_seed(job.seed)
        batch = job.batch_size
        source = _pad_to_patches(job.source)
        try:
            with torch.inference_mode():
                latents = pipe(
                    prompt=[job.caption] * batch,
                    lyrics=[""] * batch,  # a list: diffusers 0.42.1 fails on a plain string with batch > 1
                    audio_duration=source.shape[-1] / MODEL_SAMPLE_RATE,
                    num_inference_steps=job.steps,
                    guidance_scale=job.guidance_scale,
                    generator=generator,
                    output_type="latent",
                    callback_on_step_end=step_end,
                    instruction=lego_instruction(job.track),
                    bpm=job.bpm,
                    keyscale=job.key,
                    timesignature=job.time_signature,
                    task_type="lego",
                    track_name=job.track.upper(),
                    src_audio=torch.from_numpy(source),
                    repainting_start=0.0,  # the whole clip: a repaint window is the runner's (runner/window.py)
                    repainting_end=-1.0,
                ).audios
                on_stage("decoding")
                audio = pipe.vae.decode(latents.transpose(1, 2).to(pipe.vae.dtype)).sample.float()
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



def _pad_to_patches(source: np.ndarray) -> np.ndarray:
    """Pad with silence to an even number of latent frames L for which the pipeline's own float
    round trip, ceil((L / 25) * 25), gives back L: diffusers 0.42.1 sizes the noise that way and
    fails (e.g. L = 14 -> 15) where it does not."""
    frames = -(-source.shape[-1] // LATENT_SAMPLES)
    frames += frames % 2
    while math.ceil((frames / LATENTS_PER_SECOND) * LATENTS_PER_SECOND) != frames:
        frames += 2
    return np.pad(source, ((0, 0), (0, frames * LATENT_SAMPLES - source.shape[-1])))
