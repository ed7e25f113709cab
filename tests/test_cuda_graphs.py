"""The `graphs` switch (runner/cuda_graphs.py) on a real CUDA card: one capture per job, every DiT call
a replay, and the same latents as the eager forwards. CI has no GPU; the lent-machine runs of
benchmarks/step_speed.py run this file first (docs/PERFORMANCE.md, "How to reproduce")."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need an NVIDIA GPU")


def lego_latents(pipe, steps: int):
    src = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 48 * 1920)).astype(np.float32) * 0.1)
    with torch.inference_mode():
        return pipe(prompt=["x"], lyrics=[""], src_audio=src, task_type="lego", track_name="VOCALS", num_inference_steps=steps,
                    guidance_scale=7.0, audio_duration=src.shape[-1] / 48000, output_type="latent",
                    generator=torch.Generator().manual_seed(1)).audios


def test_the_dit_runs_as_one_captured_graph_per_job_and_computes_the_same():
    from runner import speedups
    from runner.random_checkpoint import build_pipeline

    pipe = build_pipeline("tiny", seed=3).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    state = speedups.apply(pipe, "cuda", ("contiguous", "fused", "attention"))
    eager = lego_latents(pipe, 4)

    pipe = build_pipeline("tiny", seed=3).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    state = speedups.apply(pipe, "cuda", ("contiguous", "fused", "attention", "graphs"))
    graphed = lego_latents(pipe, 4)
    report = state.report()
    assert report["on"] == ["contiguous", "fused", "attention", "graphs"]
    assert report["dit_forwards"]["calls"] == 4 and report["dit_forwards"]["batch_sizes"] == {"2": 4}
    assert report["cuda_graphs"] == {"captures": 1, "replays": 4, "eager_calls": 0, "fallback": None}
    assert float((graphed - eager).norm() / eager.norm()) < 1e-5

    lego_latents(pipe, 3)  # a second job of the same length replays the same graph
    assert state.report()["cuda_graphs"]["captures"] == 1
    before = torch.cuda.memory_reserved()
    state.release()
    torch.cuda.empty_cache()
    assert torch.cuda.memory_reserved() < before, "the graph's memory pool was not given back"
