"""What a repaint window means for a lego stem, on both engines.

The engines always generate the stem over the whole source, conditioned on all of it; the window
then says where the stem plays: inside it, the generated stem; outside it, silence, reached through
short raised-cosine fades that lie inside the window, so that nothing outside it is ever the
source or anything else. The same seed gives, inside the window, the whole-clip stem's samples
(times the fades). Kept out of the engines on purpose: ACE-Step's own repaint machinery (source
latents injected outside the window, the source waveform spliced back) would put the source into
the stem, and the diffusers port has its own; one function here gives both engines one meaning.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FADE_S = 0.02  # 20 ms: no click at the edges, short enough to keep the window's first beat
MAX_FADE_SHARE = 0.25  # a fade never takes more than a quarter of a short window


@dataclass(frozen=True)
class Window:
    """A validated window in seconds; `end` None means the end of the clip."""

    start: float = 0.0
    end: float | None = None

    @classmethod
    def from_args(cls, start: float, end: float) -> "Window":
        return cls(float(start), None if end is None or end < 0 else float(end))

    def is_whole(self) -> bool:
        return self.start <= 0.0 and self.end is None

    def frames(self, total: int, rate: int) -> tuple[int, int]:
        """(first, last + 1) sample of the window in a clip of `total` samples at `rate`."""
        first = min(total, max(0, int(round(self.start * rate))))
        last = total if self.end is None else min(total, max(first, int(round(self.end * rate))))
        return first, last

    def describe(self) -> dict:
        return {"start_s": self.start, "end_s": self.end, "fade_s": FADE_S}


def gain(window: Window, total: int, rate: int) -> np.ndarray:
    """The per-sample gain (total,) float32: 1 inside the window, 0 outside, fades inside its edges."""
    first, last = window.frames(total, rate)
    curve = np.zeros(total, dtype=np.float32)
    curve[first:last] = 1.0
    fade = min(int(round(FADE_S * rate)), int((last - first) * MAX_FADE_SHARE))
    if fade > 0:
        ramp = (0.5 - 0.5 * np.cos(np.pi * (np.arange(fade) + 0.5) / fade)).astype(np.float32)
        if first > 0:
            curve[first:first + fade] = ramp
        if last < total:
            curve[last - fade:last] = ramp[::-1]
    return curve


def apply(stem: np.ndarray, window: Window, rate: int) -> np.ndarray:
    """`stem` (channels, frames) gated to `window`; the whole clip is returned untouched."""
    if window.is_whole():
        return stem
    return (stem * gain(window, stem.shape[-1], rate)[None, :]).astype(np.float32)
