"""Catching broken output before it becomes a file: NaN (fp16 on Turing cards) and silence."""
from __future__ import annotations

import numpy as np

from runner.events import generation_error

TARGET_PEAK = 10.0 ** (-1.0 / 20.0)  # -1 dBFS, what AceStepPipeline itself normalises to
SILENT_RMS = 1e-5
AUDIBLE_RMS = 1e-4


def rms(samples: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(samples, dtype=np.float64)))) if samples.size else 0.0


def check_stems(stems: list[np.ndarray], source: np.ndarray, dtype: str) -> None:
    """Raise `output_nan` / `output_silent` (exit 4) when a stem is unusable; checked before normalising."""
    for index, stem in enumerate(stems):
        if not np.isfinite(stem).all():
            raise generation_error(
                "output_nan",
                f"Candidate {index + 1} came out as NaN in {dtype}; this happens with float16 on older GPUs. Use ACESTEP_DTYPE=float32 (or auto, which retries in float32).",
                retryable=False,
            )
        if rms(stem) < SILENT_RMS and rms(source) >= AUDIBLE_RMS:
            raise generation_error(
                "output_silent",
                f"Candidate {index + 1} is silent although the source is not (computed in {dtype}); try another seed or ACESTEP_DTYPE=float32.",
                retryable=False,
            )


def normalise(stem: np.ndarray) -> np.ndarray:
    """Peak-normalise to -1 dBFS, as the pipeline's own decoded output is."""
    peak = float(np.max(np.abs(stem))) if stem.size else 0.0
    if peak > 1e-9:
        stem = stem * (TARGET_PEAK / peak)
    return stem.astype(np.float32)
