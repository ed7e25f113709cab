"""How long a job will take, for `estimated_seconds`: a start plus seconds per second of source.

A job's time grows with its source (the VAE encodes it piece by piece, the DiT runs on its latent
frames, the decoder rebuilds it), so one flat average per job told a 10 s source and a 3-minute one
the same. The rate is learned from the jobs that finished here (an exponential average, as the flat
one was); before the first, the demo model starts from its figures measured on 2 CPU cores by
benchmarks/demo_speed.py (docs/PERFORMANCE.md, "The demo model on a CPU"), and real weights, whose
speed depends on the card, from the flat DEFAULT_JOB_SECONDS. In the RQ mode the figures live in
Redis (`fields`, `from_fields`), learned from every GPU host's jobs and read by every web worker.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

DEFAULT_JOB_SECONDS = 60.0  # real weights, before any job has completed here
# The demo model (the tiny random checkpoint), 2 cores, 50 steps, from six demo_speed.py runs on the
# shared development machine (load 1.3-3.4): a runner's start (import, load, writing: 5.7-8.6 s,
# median 6.2) and its seconds per second of source (encoding, diffusion, decoding: 0.71-2.18, median 0.95).
DEMO_START_S = 6.0
DEMO_S_PER_SOURCE_S = 1.0
SMOOTHING = 0.3  # the weight of the newest job


@dataclass
class JobSeconds:
    """The estimate of one job's run time from its source's length."""

    start_s: float = 0.0
    per_source_s: float | None = None  # None: no figure yet, the flat default stands

    @classmethod
    def for_model(cls, demo: bool) -> "JobSeconds":
        return cls(DEMO_START_S, DEMO_S_PER_SOURCE_S) if demo else cls()

    @classmethod
    def from_fields(cls, fields: Mapping, demo: bool) -> "JobSeconds":
        """From a stored `fields()` mapping (str or bytes values); the model's starting figures if empty."""
        values = {(k.decode() if isinstance(k, bytes) else k): float(v) for k, v in fields.items()}
        if "per_source_s" not in values:
            return cls.for_model(demo)
        return cls(values.get("start_s", 0.0), values["per_source_s"])

    def fields(self) -> dict[str, str]:
        """What `from_fields` reads back; nothing until there is a rate."""
        if self.per_source_s is None:
            return {}
        return {"start_s": f"{self.start_s:.3f}", "per_source_s": f"{self.per_source_s:.4f}"}

    def of(self, source_s: float) -> float:
        if self.per_source_s is None:
            return DEFAULT_JOB_SECONDS
        return self.start_s + self.per_source_s * max(source_s, 0.0)

    def learn(self, took_s: float, source_s: float) -> None:
        """A finished job's run time: the part beyond the start, per second of its source."""
        rate = max(took_s - self.start_s, 0.0) / max(source_s, 1.0)
        self.per_source_s = rate if self.per_source_s is None else (1 - SMOOTHING) * self.per_source_s + SMOOTHING * rate
