"""The one small interface both engines implement (DESIGN.md section 3)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Protocol

import numpy as np

MODEL_SAMPLE_RATE = 48000


@dataclass
class LegoJob:
    """One lego generation, already validated. Audio is float32, shape (2, frames), 48 kHz."""

    source: np.ndarray
    track: str
    bpm: int
    caption: str
    steps: int = 50
    batch_size: int = 1
    seed: int = 0
    key: Optional[str] = None
    time_signature: Optional[str] = None
    guidance_scale: float = 7.0
    # No repaint window: an engine always generates the whole clip; the runner gates it (runner/window.py).

    @property
    def seconds(self) -> float:
        return self.source.shape[-1] / MODEL_SAMPLE_RATE


# (step, total) of the denoising loop, or (piece, pieces, "encoding") of the source's encoding.
StepCallback = Callable[..., None]
StageCallback = Callable[[str], None]  # "encoding" | "generating" | "decoding"


@dataclass
class LoadOptions:
    device: str  # "cuda" | "cpu"
    dtype: str  # "bfloat16" | "float16" | "float32"
    offload: bool


def seed_source_sample(seed: int) -> None:
    """Seed the default generators (CPU and every CUDA device) that the source's VAE posterior sample
    draws from; each engine calls it right before its library starts (runner/sampling.py)."""
    import torch

    from runner.sampling import source_sample_seed

    torch.manual_seed(source_sample_seed(seed))


class Engine(Protocol):
    name: str

    def load(self, checkpoints: Path, options: LoadOptions) -> None:
        """Load weights onto the device; raise RunnerError (exit 3) if unloadable."""

    def generate(self, job: LegoJob, on_stage: StageCallback, on_step: StepCallback) -> list[np.ndarray]:
        """Return `job.batch_size` whole-clip stems, float32 (2, frames) at 48 kHz, at least the source's
        length. on_stage: "encoding" before the source is encoded, "generating" when the diffusion
        loop starts, "decoding" when it ends; on_step: once per diffusion step actually run, and
        (optionally) once per piece of the source encoded, with the stage "encoding"."""

    def peak_vram_bytes(self) -> Optional[int]:
        """torch's peak reserved memory on CUDA, else None."""
