"""The `acestep` engine: ACE-Step 1.5's own package running the lego task, with no language model.

Two installed APIs are supported, told apart by `inspect.signature(initialize_service)`:
- the official repository (split handler): `initialize_service(project_root=..., config_path=...)`,
  checkpoints under `<project_root>/checkpoints`;
- ace-step15-fork 20260212 from PyPI (single-file handler): `initialize_service(checkpoint_dir=...)`.
Anything else is refused with `acestep_unsupported` (exit 3).

ACE-Step's loader checks for, and downloads when absent, parts lego never reads (the turbo DiT and
the 1.7B language model). The engine therefore hands it a private view of the checkpoint folder:
links to the real parts, and empty placeholders for the unused ones, so it never downloads.

`generate_music` reports only coarse progress fractions (the fork: 0.52 before diffusion, 0.8
before decoding; the official repository also 0.52..0.79 while diffusing); they are mapped onto
stages and steps, and the last step is reported when the audio is back. ACE-Step turns every
exception inside `generate_music` into a failed result, so a `Cancelled` (from `on_step`, or from
the runner's SIGTERM handler) is remembered and raised once `generate_music` returns: exit 5, not a
generation failure.

What was verified here: API detection, the checkpoint view, loading failures and the arguments
built for `generate_music`, all against the real ace-step15-fork classes. No ACE-Step-layout
weights exist on this machine, so this engine has NOT generated audio here.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import math
import os
import signal
import tempfile
import threading
from pathlib import Path
from typing import Optional

import numpy as np
import soundfile as sf

import patches
from runner.engines.base import MODEL_SAMPLE_RATE, LegoJob, LoadOptions, StageCallback, StepCallback
from runner.events import Cancelled, RunnerError, checkpoint_error, generation_error
from runner.tracks import lego_instruction

LOG = logging.getLogger("runner.acestep")

OFFICIAL = "official"
FORK = "fork"
DIT_CONFIG = "acestep-v15-base"
# Parts ACE-Step's downloader requires before loading anything, which lego never reads.
UNUSED_PARTS = ("acestep-v15-turbo", "acestep-5Hz-lm-1.7B")
# GenerationParams fields without which this engine cannot express a lego job.
REQUIRED_PARAMS = (
    "task_type", "instruction", "src_audio", "caption", "bpm", "inference_steps", "guidance_scale",
    "repainting_start", "repainting_end", "thinking", "use_cot_metas", "use_cot_caption", "use_cot_language",
)
REQUIRED_CONFIG = ("batch_size", "use_random_seed", "seeds")
# generate_music's progress fractions (acestep/handler.py; official runtime_progress_relay: 0.52..0.79).
GENERATING_FROM, GENERATING_TO, DECODING_FROM = 0.52, 0.79, 0.8


def unsupported(message: str) -> RunnerError:
    return checkpoint_error("acestep_unsupported", message)


def detect_api(initialize_service) -> str:
    """OFFICIAL or FORK from initialize_service's parameters; RunnerError acestep_unsupported otherwise."""
    parameters = inspect.signature(initialize_service).parameters
    if "config_path" in parameters and "project_root" in parameters:
        return OFFICIAL
    if "config_path" in parameters and "checkpoint_dir" in parameters:
        return FORK
    raise unsupported(
        f"The installed acestep has initialize_service{inspect.signature(initialize_service)}, which is neither "
        "the official ACE-Step 1.5 API (project_root=) nor ace-step15-fork 20260212's (checkpoint_dir=); "
        "install one of those two."
    )


def build_checkpoint_view(checkpoints: Path, view: Path) -> Path:
    """`<view>/checkpoints/`: links to every part of `checkpoints`, empty folders for UNUSED_PARTS.

    Returns the project root (`view`) that the official API wants."""
    folder = view / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    for part in sorted(Path(checkpoints).iterdir()):
        (folder / part.name).symlink_to(part.resolve(), target_is_directory=part.is_dir())
    for part in UNUSED_PARTS:
        (folder / part).mkdir(exist_ok=True)
    return view


def init_kwargs(api: str, project_root: Path, options: LoadOptions, accepted) -> dict:
    """initialize_service's keyword arguments for `api`, limited to the parameters it `accepted`."""
    wanted = {
        "config_path": DIT_CONFIG,
        "device": options.device,
        "offload_to_cpu": options.offload,
        "offload_dit_to_cpu": False,  # the DiT runs every step; only the text encoder and VAE are parked
        "compile_model": False,
        "use_flash_attention": False,
        "use_mlx_dit": False,
    }
    if api == OFFICIAL:
        wanted["project_root"] = str(project_root)
    else:
        wanted["checkpoint_dir"] = str(project_root / "checkpoints")
    return {name: value for name, value in wanted.items() if name in accepted}


def instruction_for(handler, track: str) -> str:
    make = getattr(handler, "generate_instruction", None)
    return make("lego", track) if callable(make) else lego_instruction(track)


def _time_signature(value: Optional[str]) -> str:
    """ACE-Step wants the beats per bar ("4" for 4/4, "6" for 6/8)."""
    return (value or "").split("/")[0].strip()


def lego_fields(job: LegoJob, source_path: Path, instruction: str) -> dict:
    """GenerationParams fields for one lego job: no language model, no chain of thought."""
    return {
        "task_type": "lego",
        "instruction": instruction,
        "src_audio": str(source_path),
        "audio_codes": "",
        "caption": job.caption,
        "lyrics": "",
        "vocal_language": "unknown",
        "bpm": job.bpm,
        "keyscale": job.key or "",
        "timesignature": _time_signature(job.time_signature),
        "duration": -1.0,  # the source decides
        "inference_steps": job.steps,
        "guidance_scale": job.guidance_scale,
        "seed": job.seed,
        "repainting_start": job.repaint_start,
        "repainting_end": job.repaint_end,
        "thinking": False,
        "use_cot_metas": False,
        "use_cot_caption": False,
        "use_cot_language": False,
        "use_cot_lyrics": False,
    }


def config_fields(job: LegoJob) -> dict:
    """GenerationConfig fields: fixed seeds, one per candidate, so a seed reproduces its stems."""
    return {
        "batch_size": job.batch_size,
        "use_random_seed": False,
        "seeds": [job.seed + i for i in range(job.batch_size)],
        "allow_lm_batch": False,
        "audio_format": "wav",
    }


def _instantiate(dataclass_type, wanted: dict, required: tuple):
    """`dataclass_type(**wanted)` limited to the fields this acestep has; refuse if a required one is absent."""
    names = {f.name for f in dataclasses.fields(dataclass_type)}
    missing = [n for n in required if n not in names]
    if missing:
        raise unsupported(
            f"acestep's {dataclass_type.__name__} has no {', '.join(missing)}; this engine cannot describe a lego job to it."
        )
    return dataclass_type(**{k: v for k, v in wanted.items() if k in names})


def build_params(params_class, job: LegoJob, source_path: Path, instruction: str):
    return _instantiate(params_class, lego_fields(job, source_path, instruction), REQUIRED_PARAMS)


def build_config(config_class, job: LegoJob):
    return _instantiate(config_class, config_fields(job), REQUIRED_CONFIG)


class ProgressRelay:
    """generate_music's `progress(fraction, desc=...)` turned into on_stage / on_step, monotonic."""

    def __init__(self, total: int, on_stage: StageCallback, on_step: StepCallback):
        self.total, self.on_stage, self.on_step = total, on_stage, on_step
        self.stages: list[str] = []
        self.step = 0
        self.cancelled: Optional[Cancelled] = None

    def __call__(self, fraction, desc=None, **_ignored):
        if self.cancelled is not None:
            return
        try:
            fraction = float(fraction)
            if fraction >= DECODING_FROM:
                self._stage("generating")
                self._step(self.total)
                self._stage("decoding")
            elif fraction >= GENERATING_FROM:
                self._stage("generating")
                share = (fraction - GENERATING_FROM) / (GENERATING_TO - GENERATING_FROM)
                self._step(min(self.total - 1, math.floor(share * self.total)))
        except Cancelled as cancelled:
            self.cancelled = cancelled
            raise

    def finish(self) -> None:
        """The audio is back: every step is done, whatever was reported on the way."""
        self.raise_if_cancelled()
        self._stage("generating")
        self._step(self.total)

    def raise_if_cancelled(self) -> None:
        if self.cancelled is not None:
            raise self.cancelled

    def _stage(self, name: str) -> None:
        if name not in self.stages:
            self.stages.append(name)
            self.on_stage(name)

    def _step(self, step: int) -> None:
        if step > self.step:
            self.step = step
            self.on_step(step, self.total)


@contextlib.contextmanager
def sigterm_remembered(relay: ProgressRelay):
    """ACE-Step turns every exception inside generate_music into a failed result, the runner's SIGTERM
    `Cancelled` included. While generate_music runs, a SIGTERM is also noted on `relay` (and the
    runner's own handler still runs, stopping the work), so the engine raises Cancelled afterwards."""
    previous = signal.getsignal(signal.SIGTERM)
    if not callable(previous) or threading.current_thread() is not threading.main_thread():
        yield
        return

    def note_then_delegate(signum, frame):
        relay.cancelled = relay.cancelled or Cancelled()
        previous(signum, frame)

    signal.signal(signal.SIGTERM, note_then_delegate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def failure(result) -> RunnerError:
    text = str(getattr(result, "error", None) or getattr(result, "status_message", "") or "unknown error")
    if "out of memory" in text.lower():
        return generation_error("out_of_memory", f"ACE-Step ran out of GPU memory: {text}", retryable=True)
    return generation_error("generation_failed", f"ACE-Step generation failed: {text}", retryable=False)


def read_stem(audio: dict) -> np.ndarray:
    """One generated candidate as float32 (2, frames) at 48 kHz: the in-memory tensor, else its file."""
    rate = int(audio.get("sample_rate") or MODEL_SAMPLE_RATE)
    tensor = audio.get("tensor")
    if tensor is not None:
        data = tensor.detach().float().cpu().numpy()
    elif audio.get("path"):
        data, rate = sf.read(audio["path"], dtype="float32", always_2d=True)
        data = data.T
    else:
        raise generation_error("no_audio", "ACE-Step reported success but returned no audio.", retryable=False)
    if rate != MODEL_SAMPLE_RATE:
        raise generation_error("unexpected_sample_rate", f"ACE-Step returned {rate} Hz audio; 48000 Hz was expected.", retryable=False)
    if data.ndim != 2 or data.shape[0] != 2:
        raise generation_error("unexpected_channels", f"ACE-Step returned audio shaped {data.shape}; (2, frames) was expected.", retryable=False)
    return np.ascontiguousarray(data, dtype=np.float32)


def read_stems(result, batch_size: int) -> list[np.ndarray]:
    if not getattr(result, "success", False):
        raise failure(result)
    audios = list(getattr(result, "audios", []) or [])
    if len(audios) != batch_size:
        raise generation_error("wrong_candidate_count", f"ACE-Step returned {len(audios)} candidates; {batch_size} were asked for.", retryable=False)
    return [read_stem(audio) for audio in audios]


def match_precision(handler, dtype_name: str) -> None:
    """Cast the DiT, the text encoder and the silence latent to `dtype_name` where acestep chose otherwise
    (the fork always picks bfloat16 on CUDA). The VAE keeps acestep's own choice."""
    import torch

    wanted = getattr(torch, dtype_name)
    if getattr(handler, "dtype", None) == wanted:
        return
    LOG.info("acestep chose %s; casting the DiT and text encoder to %s", getattr(handler, "dtype", None), wanted)
    for attribute in ("model", "text_encoder", "silence_latent"):
        value = getattr(handler, attribute, None)
        if value is not None:
            setattr(handler, attribute, value.to(wanted))
    handler.dtype = wanted


def _import_acestep():
    try:
        from acestep.handler import AceStepHandler
        import acestep.inference as inference
    except Exception as exc:
        raise unsupported(f"The acestep package does not import ({type(exc).__name__}: {exc}); install ACE-Step 1.5.") from exc
    for name in ("generate_music", "GenerationParams", "GenerationConfig"):
        if not hasattr(inference, name):
            raise unsupported(f"acestep.inference has no {name}; this is not an ACE-Step 1.5 this engine supports.")
    return AceStepHandler, inference


class AcestepEngine:
    name = "acestep"

    def __init__(self):
        self.handler = None
        self.api: Optional[str] = None
        self.device: Optional[str] = None
        self.patch_outcomes: dict = {}
        self._view: Optional[tempfile.TemporaryDirectory] = None

    def load(self, checkpoints: Path, options: LoadOptions) -> None:
        os.environ["ACESTEP_INIT_LLM"] = "false"
        self.patch_outcomes = patches.apply()
        lego = self.patch_outcomes.get(patches.lego_source_context.NAME)
        if lego is None or lego.status == patches.NOT_FOUND:
            raise unsupported(f"The lego source-context fix cannot be applied ({lego}); lego would ignore the source.")
        if not Path(checkpoints).is_dir():
            raise checkpoint_error("checkpoint_missing", f"The checkpoint folder {checkpoints} does not exist.")
        handler_class, _ = _import_acestep()
        self.api = detect_api(handler_class.initialize_service)
        handler = handler_class()
        self._view = tempfile.TemporaryDirectory(prefix="acestep-checkpoints-")
        project_root = build_checkpoint_view(Path(checkpoints), Path(self._view.name))
        os.environ["ACESTEP_CHECKPOINTS_DIR"] = str(project_root / "checkpoints")
        accepted = inspect.signature(handler.initialize_service).parameters
        status, ok = handler.initialize_service(**init_kwargs(self.api, project_root, options, accepted))
        if not ok:
            first_line = next((line for line in str(status).splitlines() if line.strip()), "no reason given")
            first_line = first_line.replace(str(project_root / "checkpoints"), str(checkpoints))
            raise checkpoint_error("checkpoint_unloadable", f"ACE-Step could not load {checkpoints}: {first_line}")
        match_precision(handler, options.dtype)
        self.handler, self.device = handler, options.device

    def generate(self, job: LegoJob, on_stage: StageCallback, on_step: StepCallback) -> list[np.ndarray]:
        if self.handler is None:
            raise RuntimeError("AcestepEngine.generate() before load()")
        _, inference = _import_acestep()
        with tempfile.TemporaryDirectory(prefix="acestep-lego-") as work:
            source_path = Path(work) / "source.wav"
            sf.write(source_path, job.source.T, MODEL_SAMPLE_RATE, subtype="FLOAT")
            self._check_source_readable(source_path, job.source.shape[-1])
            params = build_params(inference.GenerationParams, job, source_path, instruction_for(self.handler, job.track))
            config = build_config(inference.GenerationConfig, job)
            relay = ProgressRelay(job.steps, on_stage, on_step)
            on_stage("encoding")
            with sigterm_remembered(relay):
                result = inference.generate_music(self.handler, None, params, config, str(Path(work) / "out"), progress=relay)
            relay.raise_if_cancelled()
            stems = read_stems(result, job.batch_size)
        relay.finish()
        return stems

    def _check_source_readable(self, path: Path, frames: int) -> None:
        """ACE-Step returns None for a source it cannot read and then runs lego on nothing; refuse instead."""
        read = getattr(self.handler, "process_src_audio", None)
        if read is None:
            return
        audio = read(str(path))
        if audio is None or audio.shape[-1] < frames:
            raise generation_error(
                "acestep_cannot_read_source",
                "ACE-Step could not read the source audio it was given (torchaudio 2.9 and later need torchcodec "
                "to load files); install torchcodec next to acestep.",
                retryable=False,
            )

    def peak_vram_bytes(self) -> Optional[int]:
        if self.device != "cuda":
            return None
        import torch

        return int(torch.cuda.max_memory_reserved()) if torch.cuda.is_available() else None
