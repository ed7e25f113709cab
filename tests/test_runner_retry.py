"""The float32 retry of `--dtype auto` on CUDA, with an engine double: CI has no GPU, and the retry
is the runner's logic, not the engine's. The double returns NaN in float16 like a Turing card can."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import write_tone
from runner import device as placement
from runner import lego
from runner.events import EventStream, RunnerError


class NanInHalfEngine:
    """Loads record their dtype; generation gives NaN in float16 and a real signal in float32."""

    name = "double"
    loads: list = []

    def load(self, checkpoints, options):
        self.options = options
        NanInHalfEngine.loads.append(options.dtype)

    def generate(self, job, on_stage, on_step):
        for stage in ("encoding", "generating"):
            on_stage(stage)
        on_step(job.steps, job.steps)
        on_stage("decoding")
        n = job.source.shape[-1]
        if self.options.dtype == "float16":
            return [np.full((2, n), np.nan, dtype=np.float32)]
        return [0.5 * np.sin(np.linspace(0, 200, n, dtype=np.float32))[None].repeat(2, 0)]

    def peak_vram_bytes(self):
        return 123


@pytest.fixture
def on_fake_cuda(monkeypatch):
    NanInHalfEngine.loads = []
    monkeypatch.setattr(lego, "create_engine", lambda name: NanInHalfEngine())
    monkeypatch.setattr(placement, "reset_cuda_peak", lambda: None)
    monkeypatch.setattr(placement, "cuda_peak_allocated", lambda: None)
    monkeypatch.setattr(placement, "import_torch_seconds", lambda engine=None: 0.0)

    def choose(device="auto", dtype="auto", offload="auto"):
        return placement.Placement("cuda", "float16" if dtype == "auto" else dtype, False, dtype == "auto")

    monkeypatch.setattr(placement, "choose", choose)


def args(tmp_path, checkpoint, dtype):
    return lego.LegoArgs(source=write_tone(tmp_path / "s.wav", 1.0), track="vocals", bpm=100, steps=2, seed=3,
                         checkpoints=checkpoint, out=tmp_path, dtype=dtype)


def test_auto_retries_once_in_float32_and_says_so(tmp_path, tiny_checkpoint, on_fake_cuda):
    result = lego.run_lego(args(tmp_path, tiny_checkpoint, "auto"), EventStream(), lego.EngineCache())
    assert NanInHalfEngine.loads == ["float16", "float32"]
    assert result["retried_in_float32"] is True and result["dtype"] == "float32"
    assert len(result["outputs"]) == 1


def test_an_explicit_float16_is_not_retried(tmp_path, tiny_checkpoint, on_fake_cuda):
    with pytest.raises(RunnerError) as caught:
        lego.run_lego(args(tmp_path, tiny_checkpoint, "float16"), EventStream(), lego.EngineCache())
    assert caught.value.code == "output_nan" and caught.value.exit_status == 4
    assert NanInHalfEngine.loads == ["float16"]
    assert not list(tmp_path.glob("vocals-*"))
