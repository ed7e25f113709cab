"""The `acestep` engine against the real installed ace-step15-fork 20260212.

No ACE-Step-layout weights exist on this machine, so nothing here generates audio: the tests
cover API detection, the checkpoint view, how loading fails, and exactly what the engine hands
to `acestep.inference.generate_music` (recorded by a stand-in set on that module), plus how it
reads the answer back. Real acestep code runs wherever it can without weights.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import acestep.handler
import acestep.inference as inference
import acestep.model_downloader as downloader
from acestep.handler import AceStepHandler
from acestep.inference import GenerationConfig, GenerationParams, GenerationResult

import patches
from runner.engines import acestep_engine as engine_module
from runner.engines.acestep_engine import FORK, OFFICIAL, AcestepEngine, detect_api, init_kwargs
from runner.engines.base import LegoJob, LoadOptions
from runner.events import EXIT_CHECKPOINT, Cancelled, RunnerError

CPU = LoadOptions(device="cpu", dtype="float32", offload=False)
FRAMES = 48000 * 3 + 17


@pytest.fixture(autouse=True)
def originals_in_place(monkeypatch):
    for name in ("ACESTEP_INIT_LLM", "ACESTEP_CHECKPOINTS_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    patches.undo()
    yield
    patches.undo()


def lego_job(**changes) -> LegoJob:
    rng = np.random.default_rng(3)
    fields = dict(source=rng.uniform(-0.5, 0.5, (2, FRAMES)).astype(np.float32), track="backing_vocals", bpm=96,
                  caption="background vocals, close harmony, wordless, warm", steps=50, batch_size=2, seed=1234,
                  key="F# minor", time_signature="4/4", guidance_scale=7.0)
    fields.update(changes)
    return LegoJob(**fields)


def soundfile_reader(path):
    """What ACE-Step's process_src_audio returns (stereo 48 kHz tensor), without torchaudio's torchcodec."""
    data, rate = sf.read(path, dtype="float32", always_2d=True)
    assert rate == 48000
    return torch.from_numpy(data.T.copy())


def loaded_engine() -> AcestepEngine:
    """An engine holding a real, unloaded AceStepHandler; loading needs weights this machine lacks."""
    engine = AcestepEngine()
    engine.handler = AceStepHandler()
    engine.handler.process_src_audio = soundfile_reader
    engine.device = "cpu"
    return engine


def generated(batch, frames=FRAMES + 5000, rate=48000):
    return GenerationResult(audios=[{"tensor": torch.full((2, frames), 0.25 * (i + 1)), "sample_rate": rate, "path": ""}
                                    for i in range(batch)], success=True)


# --- which acestep is installed ------------------------------------------------------------------

def test_the_installed_fork_is_detected():
    assert detect_api(AceStepHandler.initialize_service) == FORK


def official_initialize_service(self, project_root, config_path, device="auto", component_device_map=None,
                                use_flash_attention=False, compile_model=False, offload_to_cpu=False,
                                offload_dit_to_cpu=False, quantization=None, prefer_source=None, use_mlx_dit=True,
                                vae_checkpoint=None):
    """The official repository's signature (acestep/core/generation/handler/init_service_orchestrator.py)."""


def test_the_official_api_is_detected_and_given_a_project_root(tmp_path):
    assert detect_api(official_initialize_service) == OFFICIAL
    options = LoadOptions(device="cuda", dtype="float16", offload=True)
    accepted = inspect.signature(official_initialize_service).parameters
    kwargs = init_kwargs(OFFICIAL, tmp_path, options, accepted)
    assert kwargs == {"project_root": str(tmp_path), "config_path": "acestep-v15-base", "device": "cuda",
                      "offload_to_cpu": True, "offload_dit_to_cpu": False, "compile_model": False,
                      "use_flash_attention": False, "use_mlx_dit": False}


def test_the_fork_is_given_a_checkpoint_dir_its_real_signature_accepts(tmp_path):
    signature = inspect.signature(AceStepHandler.initialize_service)
    kwargs = init_kwargs(FORK, tmp_path, CPU, signature.parameters)
    assert kwargs["checkpoint_dir"] == str(tmp_path / "checkpoints")
    assert kwargs["config_path"] == "acestep-v15-base" and kwargs["device"] == "cpu"
    assert "project_root" not in kwargs and "use_mlx_dit" not in kwargs
    signature.bind(AceStepHandler(), **kwargs)  # raises TypeError on an unknown or missing argument


def test_an_unknown_acestep_is_refused_with_acestep_unsupported():
    def initialize_service(self, model_dir, device="auto"):
        pass

    with pytest.raises(RunnerError) as caught:
        detect_api(initialize_service)
    assert caught.value.code == "acestep_unsupported" and caught.value.exit_status == EXIT_CHECKPOINT
    assert "project_root" in caught.value.message and "checkpoint_dir" in caught.value.message


# --- loading -------------------------------------------------------------------------------------

def make_checkpoints(root: Path) -> Path:
    for part in ("acestep-v15-base", "vae", "Qwen3-Embedding-0.6B"):
        (root / part).mkdir(parents=True)
        (root / part / "config.json").write_text(json.dumps({}))
    return root


def test_checkpoint_view_satisfies_the_forks_download_check_without_touching_the_folder(tmp_path):
    checkpoints = make_checkpoints(tmp_path / "ckpt")
    assert not downloader.check_main_model_exists(checkpoints)  # the fork would download turbo + the 1.7B LM
    root = engine_module.build_checkpoint_view(checkpoints, tmp_path / "view")
    view = root / "checkpoints"
    assert downloader.check_main_model_exists(view) and downloader.check_model_exists("acestep-v15-base", view)
    assert (view / "vae").resolve() == (checkpoints / "vae").resolve()
    assert sorted(p.name for p in checkpoints.iterdir()) == ["Qwen3-Embedding-0.6B", "acestep-v15-base", "vae"]


def test_load_on_the_real_fork_fails_cleanly_on_unusable_weights_and_never_downloads(tmp_path, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("download attempted")

    monkeypatch.setattr(acestep.handler, "ensure_main_model", no_download)
    monkeypatch.setattr(acestep.handler, "ensure_dit_model", no_download)
    engine = AcestepEngine()
    with pytest.raises(RunnerError) as caught:
        engine.load(make_checkpoints(tmp_path / "ckpt"), CPU)
    assert caught.value.code == "checkpoint_unloadable" and caught.value.exit_status == EXIT_CHECKPOINT
    assert "download attempted" not in caught.value.message
    assert engine.patch_outcomes["lego_source_context"].status == patches.APPLIED
    assert getattr(AceStepHandler.__dict__["prepare_padding_info"], "__wrapped__", None) is not None
    assert os.environ["ACESTEP_INIT_LLM"] == "false"


def test_load_refuses_an_acestep_where_the_lego_fix_has_no_target(tmp_path, monkeypatch):
    missing = patches.Outcome("lego_source_context", patches.NOT_FOUND, "AceStepHandler has no prepare_padding_info")
    monkeypatch.setattr(patches, "apply", lambda: {"lego_source_context": missing})
    with pytest.raises(RunnerError) as caught:
        AcestepEngine().load(make_checkpoints(tmp_path / "ckpt"), CPU)
    assert caught.value.code == "acestep_unsupported"


# --- what generate_music is given ----------------------------------------------------------------

def test_lego_fields_all_exist_on_the_real_dataclasses():
    params = {f.name for f in dataclasses.fields(GenerationParams)}
    config = {f.name for f in dataclasses.fields(GenerationConfig)}
    assert set(engine_module.lego_fields(lego_job(), Path("s.wav"), "x")) <= params
    assert set(engine_module.config_fields(lego_job())) <= config


def test_generate_hands_generate_music_a_lego_job_without_language_model(monkeypatch):
    calls = []

    def recording_generate_music(dit_handler, llm_handler, params, config, save_dir=None, progress=None):
        source, rate = sf.read(params.src_audio, dtype="float32", always_2d=True)
        calls.append(dict(dit_handler=dit_handler, llm_handler=llm_handler, params=params, config=config,
                          save_dir=save_dir, source=source.T, rate=rate))
        for fraction in (0.51, 0.52, 0.8, 0.99):
            progress(fraction, desc="...")
        return generated(config.batch_size)

    monkeypatch.setattr(inference, "generate_music", recording_generate_music)
    engine, job = loaded_engine(), lego_job()
    stages, steps = [], []
    stems = engine.generate(job, stages.append, lambda k, n: steps.append((k, n)))

    (call,) = calls
    params, config = call["params"], call["config"]
    assert call["dit_handler"] is engine.handler and call["llm_handler"] is None
    assert isinstance(params, GenerationParams) and isinstance(config, GenerationConfig)
    assert params.task_type == "lego"
    assert params.instruction == "Generate the BACKING_VOCALS track based on the audio context:"
    assert (params.repainting_start, params.repainting_end) == (0.0, -1.0)
    assert params.thinking is False and params.use_cot_metas is False
    assert params.use_cot_caption is False and params.use_cot_language is False
    assert (params.caption, params.bpm, params.keyscale, params.timesignature) == (job.caption, 96, "F# minor", "4")
    assert (params.inference_steps, params.guidance_scale, params.seed) == (50, 7.0, 1234)
    assert (config.batch_size, config.use_random_seed, config.seeds) == (2, False, [1234, 1235])
    assert call["rate"] == 48000 and np.array_equal(call["source"], job.source)  # float WAV: exact
    assert isinstance(call["save_dir"], str)
    assert stages == ["encoding", "generating", "decoding"]
    assert steps == [(50, 50)]  # the fork reports no steps in between: only the honest end
    assert [s.dtype for s in stems] == [np.float32, np.float32]
    assert [s.shape for s in stems] == [(2, FRAMES + 5000)] * 2
    assert stems[0][0, 0] == 0.25 and stems[1][0, 0] == 0.5


def test_a_repaint_window_is_passed_through(monkeypatch):
    seen = {}

    def recording_generate_music(dit_handler, llm_handler, params, config, save_dir=None, progress=None):
        seen.update(start=params.repainting_start, end=params.repainting_end)
        return generated(config.batch_size)

    monkeypatch.setattr(inference, "generate_music", recording_generate_music)
    loaded_engine().generate(lego_job(batch_size=1, repaint_start=1.0, repaint_end=2.5), lambda s: None, lambda k, n: None)
    assert seen == {"start": 1.0, "end": 2.5}


def test_official_progress_fractions_become_monotonic_steps(monkeypatch):
    def official_style(dit_handler, llm_handler, params, config, save_dir=None, progress=None):
        for fraction in (0.52, 0.6, 0.6, 0.7, 0.55, 0.79, 0.8):
            progress(fraction, desc="Generating music (batch size: 1)...")
        return generated(config.batch_size)

    monkeypatch.setattr(inference, "generate_music", official_style)
    steps = []
    loaded_engine().generate(lego_job(batch_size=1, steps=27), lambda s: None, lambda k, n: steps.append(k))
    assert steps == sorted(set(steps)) and steps[-1] == 27 and len(steps) >= 3


def test_cancel_inside_the_real_generate_music_still_cancels():
    """The real inference.generate_music turns any exception raised under it into a failed result;
    a Cancelled raised by on_step must still come out as Cancelled, not as a generation failure."""
    engine, reached_decoding = loaded_engine(), []

    def handler_generate_music(**kwargs):
        kwargs["progress"](0.52, desc="Generating music...")
        kwargs["progress"](0.7, desc="Generating music...")
        reached_decoding.append(True)
        return {"audios": [{"tensor": torch.zeros(2, FRAMES), "sample_rate": 48000}], "success": True}

    engine.handler.generate_music = handler_generate_music

    def on_step(step, total):
        raise Cancelled()

    with pytest.raises(Cancelled):
        engine.generate(lego_job(batch_size=1), lambda s: None, on_step)
    assert reached_decoding == []


def test_the_real_generate_music_reaches_the_handler_with_lego_arguments(monkeypatch):
    engine, seen = loaded_engine(), {}

    def handler_generate_music(**kwargs):
        seen.update(kwargs)
        return {"audios": [{"tensor": torch.zeros(2, FRAMES), "sample_rate": 48000}], "success": True}

    engine.handler.generate_music = handler_generate_music
    stems = engine.generate(lego_job(batch_size=1, seed=77), lambda s: None, lambda k, n: None)
    assert seen["task_type"] == "lego" and seen["repainting_end"] == -1 and seen["seed"] == "77"
    assert seen["use_random_seed"] is False and seen["instruction"].startswith("Generate the BACKING_VOCALS")
    assert stems[0].shape == (2, FRAMES)


@pytest.mark.parametrize("result, code, retryable", [
    (GenerationResult(success=False, error="CUDA out of memory. Tried to allocate 2.0 GiB"), "out_of_memory", True),
    (GenerationResult(success=False, error="Model not fully initialized"), "generation_failed", False),
    (generated(1, rate=44100), "unexpected_sample_rate", False),
    (generated(1), "wrong_candidate_count", False),
])
def test_bad_answers_become_runner_errors(monkeypatch, result, code, retryable):
    monkeypatch.setattr(inference, "generate_music", lambda *args, **kwargs: result)
    with pytest.raises(RunnerError) as caught:
        loaded_engine().generate(lego_job(batch_size=2 if code == "wrong_candidate_count" else 1),
                                 lambda s: None, lambda k, n: None)
    assert (caught.value.code, caught.value.retryable) == (code, retryable)


def test_a_candidate_without_tensor_is_read_from_its_file(tmp_path):
    path = tmp_path / "stem.wav"
    sf.write(path, np.full((FRAMES, 2), 0.5, dtype=np.float32), 48000, subtype="FLOAT")
    stem = engine_module.read_stem({"tensor": None, "path": str(path), "sample_rate": 48000})
    assert stem.shape == (2, FRAMES) and stem.dtype == np.float32 and float(stem.min()) == 0.5


@pytest.mark.skipif(importlib.util.find_spec("torchcodec") is not None, reason="torchcodec is installed here")
def test_a_source_acestep_cannot_read_is_refused_not_silently_dropped(monkeypatch):
    """Here torchaudio 2.11 has no torchcodec, so the fork's real process_src_audio returns None."""
    monkeypatch.setattr(inference, "generate_music", lambda *args, **kwargs: pytest.fail("must not generate"))
    engine = loaded_engine()
    del engine.handler.process_src_audio  # back to the real method
    with pytest.raises(RunnerError) as caught:
        engine.generate(lego_job(batch_size=1), lambda s: None, lambda k, n: None)
    assert caught.value.code == "acestep_cannot_read_source"


def test_precision_follows_the_requested_dtype():
    class Handler:
        dtype = torch.bfloat16
        model = torch.nn.Linear(2, 2).to(torch.bfloat16)
        text_encoder = torch.nn.Linear(2, 2).to(torch.bfloat16)
        silence_latent = torch.zeros(1, 4, 2, dtype=torch.bfloat16)

    handler = Handler()
    engine_module.match_precision(handler, "float16")
    assert handler.dtype == torch.float16 and handler.model.weight.dtype == torch.float16
    assert handler.text_encoder.weight.dtype == torch.float16 and handler.silence_latent.dtype == torch.float16


def test_sigterm_during_the_real_generate_music_cancels(monkeypatch):
    """The runner's SIGTERM handler raises Cancelled anywhere; the real inference.generate_music
    swallows it into a failed result, and the engine must still end in Cancelled."""
    def runner_sigterm_handler(signum, frame):  # what runner/cli.py installs
        raise Cancelled()

    previous = signal.signal(signal.SIGTERM, runner_sigterm_handler)
    try:
        engine = loaded_engine()

        def handler_generate_music(**kwargs):
            os.kill(os.getpid(), signal.SIGTERM)
            return {"audios": [{"tensor": torch.zeros(2, FRAMES), "sample_rate": 48000}], "success": True}

        engine.handler.generate_music = handler_generate_music
        with pytest.raises(Cancelled):
            engine.generate(lego_job(batch_size=1), lambda s: None, lambda k, n: None)
        assert signal.getsignal(signal.SIGTERM) is runner_sigterm_handler
    finally:
        signal.signal(signal.SIGTERM, previous)
