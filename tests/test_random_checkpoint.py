"""The tiny random checkpoint runs what a converted real checkpoint runs: its scheduler hands the DiT
ACE-Step's timesteps in [0, 1] (from 1 towards 0), so guidance doubles the batch on every step."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from runner import sampling
from runner.engines.base import LegoJob, LoadOptions
from runner.engines.diffusers_engine import DiffusersEngine


def test_the_tiny_checkpoint_carries_the_converted_checkpoints_configuration(tiny_checkpoint):
    scheduler = json.loads((tiny_checkpoint / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    assert (scheduler["num_train_timesteps"], scheduler["shift"]) == (1, 1.0)
    transformer = json.loads((tiny_checkpoint / "transformer" / "config.json").read_text())
    assert transformer["is_turbo"] is False and transformer["model_version"] == "base"
    index = json.loads((tiny_checkpoint / "model_index.json").read_text())
    assert index["audio_tokenizer"] == [None, None] and index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert (tiny_checkpoint / "DEMO_RANDOM_WEIGHTS").is_file()


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    loaded = DiffusersEngine()
    loaded.load(tiny_checkpoint, LoadOptions(device="cpu", dtype="float32", offload=False))
    assert loaded.pipe.condition_encoder.silence_latent.shape == (1, 15000, 64)  # 600 s, as the real one
    return loaded


def transformer_calls(engine, batch: int, guidance: float, steps: int = 5) -> list[tuple[int, list[float]]]:
    calls = []

    def record(_module, _args, kwargs):
        calls.append((kwargs["hidden_states"].shape[0], kwargs["timestep"].tolist()))

    source = sampling.model_source(np.random.default_rng(0).uniform(-0.3, 0.3, (2, 48000)).astype(np.float32))
    job = LegoJob(source=source, track="vocals", bpm=120, caption="wordless", steps=steps, batch_size=batch, seed=3,
                  guidance_scale=guidance)
    hook = engine.pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        engine.generate(job, lambda stage: None, lambda *progress: None)
    finally:
        hook.remove()
    return calls


@pytest.mark.parametrize("batch", [1, 2])
def test_guidance_doubles_the_batch_on_every_step_and_time_runs_from_1_towards_0(engine, batch):
    calls = transformer_calls(engine, batch, guidance=7.0)
    assert len(calls) == 5
    assert [size for size, _ in calls] == [2 * batch] * 5  # the (conditional, unconditional) pair, every step
    times = [timestep[0] for _, timestep in calls]
    assert all(len(set(timestep)) == 1 for _, timestep in calls)
    assert times[0] == 1.0 and all(a > b for a, b in zip(times, times[1:])) and 0 < times[-1] < 0.5
    s = np.linspace(1.0, 0.0, 6)[:-1]
    np.testing.assert_allclose(times, 3.0 * s / (1 + 2.0 * s), rtol=1e-6)  # ACE-Step's shift 3, applied once


def test_without_guidance_the_batch_is_not_doubled(engine):
    """The check above can fail: guidance 1 runs the DiT on the batch alone."""
    calls = transformer_calls(engine, 1, guidance=1.0, steps=2)
    assert [size for size, _ in calls] == [1, 1]
    assert torch.tensor(calls[0][1]).item() == 1.0


def test_the_tiny_vae_is_acesteps_oobleck_with_its_strides_reordered(tiny_checkpoint):
    """The tiny VAE is diffusers' AutoencoderOobleck as the converter writes it: ACE-Step's five strides
    (1920 samples per latent frame), 64 latent channels from 128 encoder outputs (mean and scale).
    Only the order of the strides differs from the real one, so that one block, not two, runs at 48 kHz."""
    from diffusers import AutoencoderOobleck

    from runner import random_checkpoint

    vae = AutoencoderOobleck.from_pretrained(str(tiny_checkpoint / "vae"))
    config = vae.config
    assert sorted(config.downsampling_ratios) == sorted(random_checkpoint.VAE_RATIOS)
    assert config.downsampling_ratios[0] == max(config.downsampling_ratios)  # the longest stride first
    assert vae.hop_length == sampling.LATENT_SAMPLES == 1920
    assert config.encoder_hidden_size == 128 and config.decoder_input_channels == 64 and config.audio_channels == 2
    with torch.inference_mode():
        latent = vae.encode(torch.zeros(1, 2, 2 * 48000)).latent_dist
        assert latent.mean.shape == (1, 64, 50)  # 25 frames a second
        assert vae.decode(latent.mean).sample.shape == (1, 2, 2 * 48000)


def test_the_source_is_encoded_piece_by_piece_with_progress(engine):
    """encode_source reports each piece as it is done (a long source on a CPU takes minutes there)."""
    from runner.engines.diffusers_engine import encode_source

    vae = engine.pipe.vae
    frames = 50  # 2 s, in two pieces of 1 s
    audio = torch.from_numpy(np.random.default_rng(1).uniform(-0.3, 0.3, (1, 2, frames * sampling.LATENT_SAMPLES)).astype(np.float32))
    half = frames // 2 * sampling.LATENT_SAMPLES
    tiles = [sampling.Tile(0, half, 0, 0), sampling.Tile(half, audio.shape[-1], 0, 0)]
    reported = []
    with torch.inference_mode():
        latents = encode_source(vae, audio, None, tiles, lambda done, total: reported.append((done, total)))
    assert reported == [(1, 2), (2, 2)]
    assert latents.shape == (1, 64, frames)
