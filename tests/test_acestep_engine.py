"""The `acestep` engine against the real installed ace-step15-fork 20260212.

No ACE-Step-layout weights load in this environment (the model code comes with the weights and is
not here), so the DiT is a small double with the real one's shape: a `decoder` module called once
per step inside `generate_audio`. Everything else is the fork's real code wherever it can run
without weights: API detection, loading failures, the arguments `generate_music` receives, how the
answer is read back. The official code runs all of this for real in `make official-check`.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import json
import os
import signal
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch

import acestep.handler
import acestep.inference as inference
from acestep.handler import AceStepHandler
from acestep.inference import GenerationConfig, GenerationParams, GenerationResult

import patches
from runner import cancellation
from runner.engines import acestep_engine as engine_module
from runner.engines.acestep_engine import FORK, OFFICIAL, AcestepEngine, detect_api, init_kwargs
from runner.engines.base import LegoJob, LoadOptions
from runner.events import EXIT_CHECKPOINT, Cancelled, RunnerError

CPU = LoadOptions(device="cpu", dtype="float32", offload=False)
FRAMES = 48000 * 3 + 17


@pytest.fixture(autouse=True)
def originals_in_place(monkeypatch):
    for name in ("ACESTEP_INIT_LLM", "ACESTEP_CHECKPOINTS_DIR", "ACESTEP_PROJECT_ROOT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    patches.undo()
    yield
    patches.undo()
    cancellation.clear()


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


class DiTDouble(torch.nn.Module):
    """The loaded DiT's shape where the engine touches it: generate_audio runs the loop, calling
    `decoder` once per Euler step. `work` runs first, inside generate_audio (the condition encoder)."""

    def __init__(self):
        super().__init__()
        self.decoder = torch.nn.Linear(4, 4)
        self.steps_seen = []

    def generate_audio(self, infer_steps: int = 3, on_each=None, **_ignored):
        x = torch.zeros(1, 4)
        for index in range(infer_steps):
            x = self.decoder(x)
            if on_each:
                on_each(index)
        return {"target_latents": x}


def loaded_engine(model=None) -> AcestepEngine:
    """An engine holding a real AceStepHandler whose DiT is the double (weights cannot load here)."""
    engine = AcestepEngine()
    engine.handler = AceStepHandler()
    engine.handler.process_src_audio = soundfile_reader
    engine.handler.model = model if model is not None else DiTDouble()
    engine.device = "cpu"
    return engine


def generated(batch, frames=FRAMES + 5000, rate=48000):
    return GenerationResult(audios=[{"tensor": torch.full((2, frames), 0.25 * (i + 1)), "sample_rate": rate, "path": ""}
                                    for i in range(batch)], success=True)


def handler_answer(frames=FRAMES):
    return {"audios": [{"tensor": torch.zeros(2, frames), "sample_rate": 48000}], "success": True}


# --- which acestep is installed ------------------------------------------------------------------

def test_the_installed_fork_is_detected():
    assert detect_api(AceStepHandler.initialize_service) == FORK


def official_initialize_service(self, project_root, config_path, device="auto", use_flash_attention=False,
                                compile_model=False, offload_to_cpu=False, offload_dit_to_cpu=False, quantization=None,
                                prefer_source=None, use_mlx_dit=True, vae_checkpoint=None):
    """The official signature at 6d467e4 (acestep/core/generation/handler/init_service_orchestrator.py)."""


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
    assert engine.describe()["patches"]["lego_source_context"]["status"] == patches.APPLIED
    assert getattr(AceStepHandler.__dict__["prepare_padding_info"], "__wrapped__", None) is not None
    assert os.environ["ACESTEP_INIT_LLM"] == "false"
    assert Path(os.environ["ACESTEP_PROJECT_ROOT"]).name.startswith("acestep-checkpoints-")  # the view, not the cwd


def test_load_refuses_an_acestep_where_the_lego_fix_has_no_target(tmp_path, monkeypatch):
    missing = patches.Outcome("lego_source_context", patches.NOT_FOUND, "AceStepHandler has no prepare_padding_info")
    monkeypatch.setattr(patches, "apply", lambda: {"lego_source_context": missing})
    with pytest.raises(RunnerError) as caught:
        AcestepEngine().load(make_checkpoints(tmp_path / "ckpt"), CPU)
    assert caught.value.code == "acestep_unsupported"


def test_a_sigterm_inside_the_real_forks_load_cancels_it(tmp_path, monkeypatch):
    """The fork's initialize_service catches every Exception into a failed status: a cancel must not
    become `checkpoint_unloadable` (exit 3). SIGTERM arrives while its loader is inside the DiT load."""
    def dit_load_that_gets_sigterm(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("not reached: the handler raises Cancelled at once")

    monkeypatch.setattr("transformers.AutoModel.from_pretrained", dit_load_that_gets_sigterm)
    previous = signal.getsignal(signal.SIGTERM)
    cancellation.install()
    try:
        with pytest.raises(Cancelled):
            AcestepEngine().load(make_checkpoints(tmp_path / "ckpt"), CPU)
    finally:
        signal.signal(signal.SIGTERM, previous)


# --- what generate_music is given ----------------------------------------------------------------

def test_lego_fields_all_exist_on_the_real_dataclasses():
    params = {f.name for f in dataclasses.fields(GenerationParams)}
    config = {f.name for f in dataclasses.fields(GenerationConfig)}
    fields = set(engine_module.lego_fields(lego_job(), Path("s.wav"), "x"))
    assert fields - set(engine_module.FIELDS_NEWER_THAN_THE_FORK) <= params
    assert not set(engine_module.FIELDS_NEWER_THAN_THE_FORK) & params  # else the list is stale
    assert set(engine_module.config_fields(lego_job())) <= config


def test_generate_hands_generate_music_a_whole_clip_lego_job_without_language_model(monkeypatch):
    calls = []

    def recording_generate_music(dit_handler, llm_handler, params, config, save_dir=None, progress=None):
        source, rate = sf.read(params.src_audio, dtype="float32", always_2d=True)
        calls.append(dict(dit_handler=dit_handler, llm_handler=llm_handler, params=params, config=config,
                          save_dir=save_dir, source=source.T, rate=rate))
        return generated(config.batch_size)

    monkeypatch.setattr(inference, "generate_music", recording_generate_music)
    engine, job = loaded_engine(), lego_job()
    stems = engine.generate(job, lambda s: None, lambda k, n: None)

    (call,) = calls
    params, config = call["params"], call["config"]
    assert call["dit_handler"] is engine.handler and call["llm_handler"] is None
    assert isinstance(params, GenerationParams) and isinstance(config, GenerationConfig)
    assert params.task_type == "lego"
    assert params.instruction == "Generate the BACKING_VOCALS track based on the audio context:"
    assert (params.repainting_start, params.repainting_end) == (0.0, -1)  # always the whole clip
    assert engine_module.lego_fields(job, Path("s.wav"), "x")["repaint_mode"] == "aggressive"
    assert params.thinking is False and params.use_cot_metas is False
    assert params.use_cot_caption is False and params.use_cot_language is False
    assert (params.caption, params.bpm, params.keyscale, params.timesignature) == (job.caption, 96, "F# minor", "4")
    assert (params.inference_steps, params.guidance_scale, params.seed) == (50, 7.0, 1234)
    assert (config.batch_size, config.use_random_seed, config.seeds) == (2, False, [1234, 1235])
    assert call["rate"] == 48000 and np.array_equal(call["source"], job.source)  # float WAV: exact
    assert call["save_dir"] is None  # ACE-Step writes no file of its own
    assert [s.dtype for s in stems] == [np.float32, np.float32]
    assert [s.shape for s in stems] == [(2, FRAMES + 5000)] * 2
    assert stems[0][0, 0] == 0.25 and stems[1][0, 0] == 0.5


def test_the_real_generate_music_reaches_the_handler_with_whole_clip_lego_arguments():
    engine, seen = loaded_engine(), {}

    def handler_generate_music(**kwargs):
        seen.update(kwargs)
        return handler_answer()

    engine.handler.generate_music = handler_generate_music
    stems = engine.generate(lego_job(batch_size=1, seed=77), lambda s: None, lambda k, n: None)
    assert seen["task_type"] == "lego" and seen["repainting_end"] == -1 and seen["seed"] == "77"
    assert seen["use_random_seed"] is False and seen["instruction"].startswith("Generate the BACKING_VOCALS")
    assert stems[0].shape == (2, FRAMES)


# --- progress: real steps from the DiT's own loop -------------------------------------------------

def run_generation(engine, job, in_worker_thread: bool, log: list, each_step=None, encode=None):
    """The real inference.generate_music over a handler.generate_music that does what ACE-Step does:
    VAE-encode the source (`encode`, if given), then run the DiT (the official code in a daemon
    worker thread, joined with a timeout)."""
    def service(**kwargs):
        log.append(("vae encode", None, threading.current_thread().name))
        if encode is not None:
            encode()
        engine.handler.model.generate_audio(infer_steps=kwargs["inference_steps"], on_each=each_step)

    def handler_generate_music(**kwargs):
        if in_worker_thread:
            worker = threading.Thread(target=service, kwargs=kwargs, name="service-generate", daemon=True)
            worker.start()
            worker.join(timeout=600)
        else:
            service(**kwargs)
        return handler_answer()

    engine.handler.generate_music = handler_generate_music
    return engine.generate(job, lambda s: log.append(("stage", s, threading.current_thread().name)),
                           lambda k, n, *stage: log.append(("step", (k, n, *stage), threading.current_thread().name)))


@pytest.mark.parametrize("in_worker_thread", [False, True], ids=["fork: main thread", "official: worker thread"])
def test_progress_is_one_event_per_decoder_call_and_encoding_is_not_generation(in_worker_thread):
    engine, log = loaded_engine(), []
    run_generation(engine, lego_job(batch_size=1, steps=5), in_worker_thread, log)
    assert [(kind, value) for kind, value, _ in log] == [
        ("stage", "encoding"), ("vae encode", None), ("stage", "generating"),
        *[("step", (k, 5)) for k in range(1, 6)], ("stage", "decoding"),
    ]
    threads = {thread for kind, _, thread in log if kind == "step"}
    assert (threads == {"service-generate"}) if in_worker_thread else (threads == {"MainThread"})


class VaeDouble(torch.nn.Module):
    """The VAE where ACE-Step's tiled encode touches it: `encode` runs `encoder` (one 1920-sample hop)."""

    dtype = torch.float32

    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Conv1d(2, 2, 1920, stride=1920)

    def encode(self, audio):
        latents = self.encoder(audio)
        return SimpleNamespace(latent_dist=SimpleNamespace(sample=lambda: latents))


@pytest.mark.parametrize("seconds, pieces", [(40, 4), (12, 1)])
def test_encoding_progress_is_one_event_per_piece_of_the_libraries_tiled_encode(seconds, pieces):
    """The fork's own tiled_encode cuts the source (15 s pieces, 2 s overlap, without a GPU); the
    engine's plan of it (runner.sampling) gives the total, and each encoder call is one event."""
    engine, log = loaded_engine(), []
    engine.handler.vae, engine.handler.device = VaeDouble(), "cpu"
    job = lego_job(source=np.zeros((2, 48000 * seconds), np.float32), batch_size=1, steps=2)
    encode = lambda: engine.handler.tiled_encode(torch.zeros(1, 2, job.source.shape[-1]), offload_latent_to_cpu=True)  # noqa: E731
    run_generation(engine, job, True, log, encode=encode)
    assert [(kind, value) for kind, value, _ in log] == [
        ("stage", "encoding"), ("vae encode", None), *[("step", (k, pieces, "encoding")) for k in range(1, pieces + 1)],
        ("stage", "generating"), ("step", (1, 2)), ("step", (2, 2)), ("stage", "decoding"),
    ]
    assert not engine.handler.vae.encoder._forward_hooks  # removed with the others


def test_the_hooks_are_removed_after_the_generation_and_after_a_failure():
    engine, log = loaded_engine(), []
    run_generation(engine, lego_job(batch_size=1, steps=2), True, log)
    model = engine.handler.model
    assert "generate_audio" not in model.__dict__ and not model.decoder._forward_hooks

    def fails(step):
        raise RuntimeError("CUDA error: an illegal memory access")

    with pytest.raises(RunnerError) as caught:  # the fork's generate_music turns it into a failed result
        engine.handler.generate_music = lambda **kwargs: (model.generate_audio(infer_steps=3, on_each=fails), None)[1]
        engine.generate(lego_job(batch_size=1, steps=3), lambda s: None, lambda k, n: None)
    assert caught.value.code == "generation_failed"
    assert "generate_audio" not in model.__dict__ and not model.decoder._forward_hooks


# --- cancellation -----------------------------------------------------------------------------------

def test_sigterm_while_the_official_worker_thread_diffuses_cancels_the_main_thread(runner_sigterm):
    """The main thread waits in join() on ACE-Step's worker; SIGTERM interrupts that wait with
    Cancelled, which the real inference.generate_music's `except Exception` cannot swallow."""
    engine, log, release = loaded_engine(), [], threading.Event()

    def on_step(index):
        if index == 1:
            os.kill(os.getpid(), signal.SIGTERM)
            release.wait(10)  # the worker keeps "diffusing" until the test lets it go

    try:
        with pytest.raises(Cancelled):
            run_generation(engine, lego_job(batch_size=1, steps=50), True, log, each_step=on_step)
    finally:
        release.set()
    assert ("stage", "decoding") not in [(k, v) for k, v, _ in log]


def test_a_cancel_swallowed_by_library_code_is_raised_once_it_returns(runner_sigterm):
    """Even where a library catches BaseException, the recorded SIGTERM ends the job as cancelled."""
    engine = loaded_engine()

    def catches_everything(**kwargs):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        except BaseException:  # noqa: BLE001 - the worst library there could be
            pass
        return handler_answer()

    engine.handler.generate_music = catches_everything
    with pytest.raises(Cancelled):
        engine.generate(lego_job(batch_size=1), lambda s: None, lambda k, n: None)


def test_cancelled_is_not_an_exception():
    assert issubclass(Cancelled, BaseException) and not issubclass(Cancelled, Exception)


# --- reading the answer ---------------------------------------------------------------------------

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
