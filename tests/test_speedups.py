"""The speed-up switches (runner/speedups.py): chosen from ACESTEP_SPEEDUPS, each computing the
same function as the stock diffusers code on the tiny checkpoint, compiled too, and reported
with the DiT's call count in the runner's result event."""
from __future__ import annotations

import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf

from conftest import run_runner, runner_env
from runner import compiled_blocks, speedups
from runner.events import RunnerError


def test_switches_from_the_environment_value():
    assert speedups.chosen("cpu", "") == speedups.DEFAULTS["cpu"]
    assert speedups.chosen("cuda", "default") == speedups.DEFAULTS["cuda"]
    assert speedups.chosen("cuda", "none") == ()
    assert speedups.chosen("cuda", " fused , contiguous,fused") == ("fused", "contiguous")
    for bad in ("fast", "contiguous,turbo", "attention"):
        with pytest.raises(RunnerError) as caught:
            speedups.chosen("cuda", bad)
        assert caught.value.code == "bad_speedups" and caught.value.exit_status == 2


@pytest.fixture(scope="module")
def dit_inputs():
    """The tiny pipeline and the DiT's keyword arguments at the first step of a lego job."""
    import torch

    from runner.random_checkpoint import build_pipeline

    pipe = build_pipeline("tiny", seed=3)
    pipe.set_progress_bar_config(disable=True)
    captured = {}

    def grab(_module, _args, kwargs):
        captured.setdefault("k", dict(kwargs))

    hook = pipe.transformer.register_forward_pre_hook(grab, with_kwargs=True)
    src = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 24 * 1920)).astype(np.float32) * 0.1)
    with torch.inference_mode():
        pipe(prompt=["x"], lyrics=[""], src_audio=src, task_type="lego", track_name="VOCALS", num_inference_steps=1,
             audio_duration=src.shape[-1] / 48000, output_type="latent")
    hook.remove()
    return pipe, captured["k"]


def fresh_transformer(pipe):
    import copy

    return copy.deepcopy(pipe.transformer)


def forward(transformer, kwargs):
    import torch

    with torch.inference_mode():
        return transformer(**kwargs)[0]


def rel_err(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("names", [("contiguous",), ("contiguous", "fused"), ("fused", "attention")])
def test_each_switch_computes_what_diffusers_computes(dit_inputs, names):
    pipe, kwargs = dit_inputs
    assert kwargs["hidden_states"].shape[0] == 2  # guidance: the (cond, null) pair in one call
    reference = forward(pipe.transformer, kwargs)
    transformer = fresh_transformer(pipe)
    state = speedups.apply(SimpleNamespace(transformer=transformer), "cpu", names)
    seen = []
    transformer.layers[0].register_forward_pre_hook(lambda m, a, k: seen.append(k["hidden_states"].is_contiguous()), with_kwargs=True)
    out = forward(transformer, kwargs)
    assert rel_err(out, reference) < 1e-5
    assert seen == [("contiguous" in names)]  # the residual stream is dense exactly when the switch is on
    assert state.report()["dit_forwards"]["calls"] == 1 and state.report()["on"] == [n for n in speedups.SWITCHES if n in names]


@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("g++")), reason="Inductor's CPU backend needs a C++ compiler")
def test_compiled_blocks_match_eager_and_a_fresh_runner_loads_them_without_compiling(dit_inputs, tmp_path, monkeypatch,
                                                                                     tone, tiny_checkpoint):
    import torch

    pipe, kwargs = dit_inputs
    cache = tmp_path / "cache"
    monkeypatch.setenv(speedups.CACHE_ENV, str(cache))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))  # apply() sets it; restored after
    reference = forward(pipe.transformer, kwargs)
    transformer = fresh_transformer(pipe)
    names = ("contiguous", "fused", "compile")
    state = speedups.apply(SimpleNamespace(transformer=transformer), "cpu", names)
    assert state.on == names and state.compile_cache == str(cache)
    try:
        out = forward(transformer, kwargs)
        longer = {k: torch.cat([v, v], dim=1) if k in ("hidden_states", "context_latents") else v for k, v in kwargs.items()}
        forward(transformer, longer)  # another length reuses the dynamic graphs
    finally:
        torch._dynamo.reset()
    assert rel_err(out, reference) < 1e-4
    report = state.report()["compiled_blocks"]
    # The tiny DiT alternates sliding-window (masked) and full-attention blocks: one artifact each, at batch 2.
    assert report["compiled"] == ["mask-bn", "nomask-bn"] and report["loaded"] == [] and report["eager_calls"] == 0
    assert sorted(p.name for p in cache.glob("dit-*" + compiled_blocks.SUFFIX)) == sorted(
        state.compiled.path(kind).name for kind in ("mask-bn", "nomask-bn"))
    assert not list(cache.glob(".*.part*")), "a half-written artifact was left behind"

    # The next process (the runner: one per job) loads both artifacts instead of compiling, in its
    # prefetch thread (its key from the checkpoint's config equals the loaded transformer's), and the
    # guards built for the runner's inference mode pass every call.
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    run = run_runner("lego", "--source", tone(seconds=1.0), "--track", "drums", "--bpm", "120", "--checkpoints", tiny_checkpoint,
                     "--out", out_dir, "--steps", "2", "--seed", "7", "--device", "cpu",
                     env=runner_env(ACESTEP_SPEEDUPS=",".join(names), ACESTEP_COMPILE_CACHE=str(cache)))
    assert run.returncode == 0, run.stderr
    fresh = run.of("result")[0]["speedups"]["compiled_blocks"]
    assert fresh["loaded"] == ["mask-bn", "nomask-bn"] and fresh["compiled"] == [] and fresh["eager_calls"] == 0
    assert fresh["prefetched"] == ["mask-bn", "nomask-bn"] and fresh["prefetch_seconds"] > 0


def test_a_prefetch_is_used_only_for_its_own_key(dit_inputs, tmp_path, tiny_checkpoint):
    """The prefetch key comes from the checkpoint's config before the weights; a transformer whose key
    differs (other switches, dtype or card) ignores it, and a kind it never found answers None at once."""
    import torch
    from diffusers import AceStepTransformer1DModel

    pipe, _ = dit_inputs
    flags = {"expand_kv": True, "flash": False}
    key = compiled_blocks.checkpoint_key(tiny_checkpoint / "transformer", torch.float32, False, flags)
    loaded = AceStepTransformer1DModel.from_pretrained(str(tiny_checkpoint / "transformer"), torch_dtype=torch.float32)
    assert key == compiled_blocks.transformer_key(loaded, False, flags)
    assert key != compiled_blocks.transformer_key(loaded, False, {**flags, "flash": True})
    assert key != compiled_blocks.checkpoint_key(tiny_checkpoint / "transformer", torch.bfloat16, False, flags)
    prefetch = compiled_blocks.Prefetch(tmp_path, key)
    assert prefetch.take("mask-bn") is None  # nothing on disk under that key
    other = compiled_blocks.CompiledBlocks(tmp_path, "another-key", prefetch).install(fresh_transformer(pipe))
    assert other.prefetch is None


def test_graphs_are_left_off_where_they_cannot_run(dit_inputs):
    pipe, _ = dit_inputs
    for device, offload in (("cpu", False), ("cuda", True)):
        state = speedups.apply(SimpleNamespace(transformer=fresh_transformer(pipe)), device, ("contiguous", "graphs"),
                               flash=False, offload=offload)
        assert state.on == ("contiguous",) and state.report()["cuda_graphs"] is None


def test_runner_reports_switches_and_the_same_stem_without_them(tmp_path, tone, tiny_checkpoint):
    source = tone(seconds=1.0)
    stems = {}
    for setting, on in (("none", []), ("default", list(speedups.DEFAULTS["cpu"]))):
        out = tmp_path / setting
        out.mkdir()
        run = run_runner("lego", "--source", source, "--track", "drums", "--bpm", "120", "--checkpoints", tiny_checkpoint,
                         "--out", out, "--steps", "4", "--seed", "7", "--device", "cpu", env=runner_env(ACESTEP_SPEEDUPS=setting))
        assert run.returncode == 0, run.stderr
        report = run.of("result")[0]["speedups"]
        assert report["on"] == on
        assert report["dit_forwards"] == {"calls": 4, "batch_sizes": {"2": 4}, "first_t": 1.0, "last_t": report["dit_forwards"]["last_t"]}
        assert 0 < report["dit_forwards"]["last_t"] < 1
        stems[setting], _ = sf.read(run.of("result")[0]["outputs"][0]["path"])
    assert np.linalg.norm(stems["default"] - stems["none"]) / np.linalg.norm(stems["none"]) < 1e-3


def test_runner_refuses_an_unknown_switch(tmp_path, tone, tiny_checkpoint):
    run = run_runner("lego", "--source", tone(), "--track", "drums", "--bpm", "120", "--checkpoints", tiny_checkpoint,
                     "--out", tmp_path, "--steps", "2", "--device", "cpu", env=runner_env(ACESTEP_SPEEDUPS="warp"))
    assert run.returncode == 2 and run.error["code"] == "bad_speedups"
