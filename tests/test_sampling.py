"""The sampling contract (runner/sampling.py): both engines are handed the same values for the same job.

The acestep engine runs on the real ace-step15-fork 20260212 (`inference.generate_music` included);
what reaches its handler's `generate_music` is recorded there, since no ACE-Step model code can run
in CI. The diffusers engine runs the real AceStepPipeline on the tiny checkpoint; what reaches
`AceStepPipeline.__call__`, the VAE encoder and the noise generators is recorded on the way.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import soundfile as sf
import torch

import patches
from runner import sampling
from runner.engines.base import LegoJob, LoadOptions

CPU = LoadOptions(device="cpu", dtype="float32", offload=False)
SEED = 77


@pytest.fixture(autouse=True)
def originals_in_place(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    patches.undo()
    yield
    patches.undo()


def job(seconds: float = 6.7, batch: int = 2) -> LegoJob:
    rng = np.random.default_rng(5)
    source = sampling.model_source(rng.uniform(-1.2, 1.2, (2, int(48000 * seconds))).astype(np.float32))
    return LegoJob(source=source, track="drums", bpm=101, caption="live acoustic drum kit", steps=2, batch_size=batch,
                   seed=SEED, key="F# minor", time_signature="6/8", guidance_scale=6.5)


def what_acestep_receives(the_job: LegoJob) -> dict:
    """The kwargs that reach the fork handler's generate_music through the real inference.generate_music."""
    from acestep.handler import AceStepHandler

    from runner.engines.acestep_engine import AcestepEngine

    seen = {}

    def handler_generate_music(**kwargs):
        seen.update(kwargs, source_sample_seed=torch.initial_seed())
        seen["source"] = sf.read(kwargs["src_audio"], dtype="float32", always_2d=True)[0].T
        silent = torch.zeros(2, the_job.source.shape[-1])
        return {"audios": [{"tensor": silent, "sample_rate": 48000}] * the_job.batch_size, "success": True}

    engine = AcestepEngine()
    engine.handler = AceStepHandler()
    engine.handler.process_src_audio = lambda path: torch.from_numpy(sf.read(path, dtype="float32", always_2d=True)[0].T.copy())
    engine.handler.generate_music = handler_generate_music
    engine.device = "cpu"
    torch.manual_seed(0)
    engine.generate(the_job, lambda stage: None, lambda *progress: None)
    return seen


def what_diffusers_receives(the_job: LegoJob, checkpoint) -> dict:
    """The kwargs of AceStepPipeline.__call__, the generators' seeds and the default seed at the VAE encode."""
    from diffusers import AceStepPipeline

    from runner.engines.diffusers_engine import DiffusersEngine

    engine = DiffusersEngine()
    engine.load(checkpoint, CPU)
    seen = {}
    call, encode = AceStepPipeline.__call__, engine.pipe.vae.encode

    def recording_call(self, **kwargs):
        seen.update(kwargs, generator_seeds=[g.initial_seed() for g in kwargs["generator"]])
        return call(self, **kwargs)

    def recording_encode(audio, *args, **kwargs):
        seen.setdefault("source_sample_seed", torch.initial_seed())
        seen.setdefault("encoded", []).append(audio.shape[-1])
        return encode(audio, *args, **kwargs)

    engine.pipe.vae.encode = recording_encode
    AceStepPipeline.__call__ = recording_call
    try:
        torch.manual_seed(0)
        seen["stems"] = engine.generate(the_job, lambda stage: None, lambda *progress: None)
    finally:
        AceStepPipeline.__call__ = call
    return seen


def test_both_engines_receive_the_same_sampling_for_the_same_job(tiny_checkpoint, tmp_path):
    the_job = job()
    settings = sampling.settings_for(SEED, 2, "6/8", the_job.source.shape[-1])
    ace = what_acestep_receives(the_job)
    dif = what_diffusers_receives(the_job, tiny_checkpoint)

    pairs = {  # acestep handler argument -> diffusers pipeline argument
        "shift": dif["shift"], "vocal_language": dif["vocal_language"], "lyrics": dif["lyrics"][0],
        "time_signature": dif["timesignature"], "captions": dif["prompt"][0], "inference_steps": dif["num_inference_steps"],
        "guidance_scale": dif["guidance_scale"], "cfg_interval_start": dif["cfg_interval_start"],
        "cfg_interval_end": dif["cfg_interval_end"], "bpm": dif["bpm"], "key_scale": dif["keyscale"],
        "instruction": dif["instruction"], "task_type": dif["task_type"], "repainting_start": dif["repainting_start"],
        "repainting_end": dif["repainting_end"],
    }
    for name, value in pairs.items():
        assert ace[name] == value, name
    assert (ace["shift"], ace["vocal_language"], ace["lyrics"], ace["time_signature"]) == (3.0, "en", "", "6")
    assert ace["use_adg"] is False and ace["infer_method"] == "ode" and (ace["cfg_interval_start"], ace["cfg_interval_end"]) == (0.0, 1.0)
    # One noise generator per candidate, seed + i, on both.
    assert ace["seed"] == "77,78" and ace["use_random_seed"] is False and ace["batch_size"] == 2
    assert dif["generator_seeds"] == [77, 78] == list(settings.candidate_seeds)
    # The source's posterior sample: the default generator, seeded the same, right before each library runs.
    assert ace["source_sample_seed"] == dif["source_sample_seed"] == SEED + 2**32 == settings.source_sample_seed
    # The same source: clamped and padded; the official derives the duration line from the file it reads.
    assert np.array_equal(ace["source"], the_job.source) and torch.equal(dif["src_audio"], torch.from_numpy(the_job.source))
    assert the_job.source.shape[-1] == settings.latent_frames * 1920 and settings.latent_frames % 2 == 0
    assert np.abs(the_job.source).max() == 1.0  # clamped as ACE-Step's reader clamps
    assert int(dif["audio_duration"]) == int(ace["source"].shape[-1] / 48000) == 6 and settings.duration_line == "6 seconds"
    # No DCW on either: diffusers has none; the fork has no such field (the official gets dcw_enabled=False).
    assert "dcw_enabled" not in ace
    assert dif["encoded"] == [the_job.source.shape[-1]]  # one piece: under the 15 s a CPU-only machine uses
    assert len(dif["stems"]) == 2 and not np.array_equal(dif["stems"][0], dif["stems"][1])


# --- the rules themselves --------------------------------------------------------------------------

def test_every_length_up_to_600_s_pads_to_frames_both_engines_can_run():
    for samples in list(range(1, 48000 * 6, 997)) + [48000 * 600, 48000 * 600 - 1, 1920 * 14, 1920 * 128 + 1]:
        frames = sampling.latent_frames(samples)
        assert frames >= 128 and frames % 2 == 0 and frames * 1920 >= samples
        assert frames * 1920 - samples < 1920 * 6 or samples < 128 * 1920  # a few frames at most, past 5.12 s
        assert math.ceil((frames / 25.0) * 25.0) == frames  # diffusers 0.42.1's noise length round trip


def test_model_source_clamps_pads_and_is_idempotent():
    audio = np.full((2, 48000 * 7 + 5), 1.5, dtype=np.float32)
    once = sampling.model_source(audio)
    assert once.dtype == np.float32 and once.shape == (2, sampling.latent_frames(audio.shape[-1]) * 1920)
    assert once.max() == 1.0 and not once[:, audio.shape[-1]:].any()
    assert np.array_equal(sampling.model_source(once), once)


def test_time_signature_and_duration_line():
    assert [sampling.time_signature(v) for v in ("4/4", "6/8", "3", None, "")] == ["4", "6", "3", "", ""]
    assert sampling.duration_line(5.99) == "5 seconds"


def test_source_pieces_follow_the_official_overlap_discard_plan():
    assert sampling.source_tile_seconds(0.0) == 15 and sampling.source_tile_seconds(8.0) == 15
    assert sampling.source_tile_seconds(15.6) == 30  # a T4
    assert sampling.source_tiles(48000 * 15, 15) == [sampling.Tile(0, 48000 * 15, 0, 0)]
    for seconds, tile in ((17, 15), (47.36, 15), (600, 30), (61.44, 30)):
        samples = sampling.latent_frames(int(48000 * seconds)) * 1920
        tiles = sampling.source_tiles(samples, tile)
        kept = sum((t.end - t.start) // 1920 - t.keep_from - t.drop_tail for t in tiles)
        assert kept == samples // 1920  # the cores tile the source exactly, once
        assert all(t.end - t.start <= tile * 48000 and t.start % 1920 == 0 for t in tiles)
        assert tiles[0].keep_from == 0 and tiles[-1].drop_tail == 0 and tiles[-1].end == samples
        assert all(t.keep_from == 50 for t in tiles[1:])  # 2 s of overlap = 50 frames discarded


def test_decode_pieces_follow_the_official_memory_rule():
    assert sampling.decode_tile_frames(None) == 256
    assert [sampling.decode_tile_frames(g) for g in (30, 24, 20, 16, 13, 12, 11.9, 2)] == [512, 512, 384, 384, 256, 256, 128, 128]
    assert [sampling.decode_overlap_frames(f) for f in (512, 256, 128)] == [64, 64, 32]


def test_the_source_is_encoded_one_posterior_sample_per_piece(tiny_checkpoint, monkeypatch):
    """Past one piece, encode_source draws once per piece from the seeded default generator and keeps the cores."""
    from diffusers import AutoencoderOobleck
    from diffusers.models.autoencoders.autoencoder_oobleck import OobleckDiagonalGaussianDistribution as Posterior

    from runner.engines.diffusers_engine import encode_source

    vae = AutoencoderOobleck.from_pretrained(str(tiny_checkpoint / "vae"))
    rng = np.random.default_rng(1)
    audio = torch.from_numpy(rng.uniform(-0.5, 0.5, (1, 2, 1920 * 160)).astype(np.float32))
    tiles = [sampling.Tile(0, 1920 * 90, 0, 10), sampling.Tile(1920 * 60, 1920 * 160, 20, 0)]  # cores 0..80, 80..160
    draws, sample = [], Posterior.sample

    def counting_sample(self, *args, **kwargs):
        draws.append(self.mean.shape[-1])
        return sample(self, *args, **kwargs)

    monkeypatch.setattr(Posterior, "sample", counting_sample)
    with torch.no_grad():
        torch.manual_seed(3)
        first = encode_source(vae, audio, None, tiles)
        torch.manual_seed(3)
        again = encode_source(vae, audio, None, tiles)
        torch.manual_seed(4)
        other = encode_source(vae, audio, None, tiles)
    assert first.shape == (1, 64, 160) and draws == [90, 100] * 3
    assert torch.equal(first, again) and not torch.equal(first, other)
    silence = torch.full((1, 15000, 64), 0.25)
    assert torch.equal(encode_source(vae, torch.zeros(1, 2, 1920 * 130), silence, tiles), silence[:, :130].transpose(1, 2))


def test_the_result_event_reports_the_sampling(tmp_path, tone, tiny_checkpoint):
    from conftest import run_runner

    run = run_runner("lego", "--source", tone(seconds=1.2), "--track", "drums", "--bpm", "90", "--checkpoints",
                     tiny_checkpoint, "--out", tmp_path, "--steps", "2", "--seed", "9", "--time-signature", "3/4")
    assert run.returncode == 0, run.stderr
    (result,) = run.of("result")
    assert result["sampling"] == sampling.settings_for(9, 1, "3", int(1.2 * 48000)).event_fields()
    assert result["sampling"]["latent_frames"] == 128 and result["sampling"]["dcw_enabled"] is False
