"""The `acestep` engine: ACE-Step 1.5's own package running the lego task, with no language model.

Two installed APIs are supported, told apart by `inspect.signature(initialize_service)`:
- the official repository (split handler): `initialize_service(project_root=..., config_path=...)`,
  checkpoints under `<project_root>/checkpoints`;
- ace-step15-fork 20260212 from PyPI (single-file handler): `initialize_service(checkpoint_dir=...)`.
Anything else is refused with `acestep_unsupported` (exit 3).

ACE-Step's loader downloads the parts of its main model it finds missing, lego needs only some of
them, and it rewrites a checkpoint's model code in place: it gets a private view of the folder
(acestep_view.py), so it never downloads and never writes into the real folder.

The engine always asks for the whole clip (no repaint end, ACE-Step's "aggressive" repaint mode:
no source latents injected, no source waveform spliced back); the runner applies a repaint
window itself (runner/window.py), the same way for both engines. Progress comes from ACE-Step's
own diffusion loop (acestep_progress.py). SIGTERM raises `Cancelled`, a BaseException that
ACE-Step's `except Exception` blocks (its DiT loader's retry, initialize_service,
generate_music) cannot swallow; the engine also checks for a cancel once each ACE-Step call
returns. Verified on the official code by `make official-check`, and here on the fork's code.
"""
from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import soundfile as sf

import patches
from runner import cancellation, sampling
from runner.device import gpu_total_gib
from runner.engines.acestep_progress import DiffusionProgress
from runner.engines.acestep_view import build_checkpoint_view
from runner.engines.base import MODEL_SAMPLE_RATE, LegoJob, LoadOptions, StageCallback, StepCallback, seed_source_sample
from runner.events import RunnerError, checkpoint_error, generation_error
from runner.tracks import lego_instruction

LOG = logging.getLogger("runner.acestep")

OFFICIAL = "official"
FORK = "fork"
DIT_CONFIG = "acestep-v15-base"
# GenerationParams fields without which this engine cannot express a lego job.
REQUIRED_PARAMS = (
    "task_type", "instruction", "src_audio", "caption", "bpm", "inference_steps", "guidance_scale",
    "repainting_start", "repainting_end", "thinking", "use_cot_metas", "use_cot_caption", "use_cot_language",
)
REQUIRED_CONFIG = ("batch_size", "use_random_seed", "seeds")


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


# lego_fields' fields that the official ACE-Step has and the PyPI fork 20260212 does not (added upstream
# after February 2026); `_instantiate` drops them for the fork, whose sampler has none of these knobs.
FIELDS_NEWER_THAN_THE_FORK = ("dcw_enabled", "sampler_mode", "latent_shift", "latent_rescale", "enable_normalization",
                              "repaint_mode")


def lego_fields(job: LegoJob, source_path: Path, instruction: str) -> dict:
    """GenerationParams fields for one lego job: no language model, no chain of thought, the whole
    clip (a repaint window is the runner's, runner/window.py: ACE-Step's own repaint machinery
    would paste the source into the stem), and every sampling setting of `runner.sampling` passed
    explicitly (fields this acestep lacks are dropped by `_instantiate`: the PyPI fork has no DCW,
    which is the same as off)."""
    settings = sampling.settings_for(job.seed, job.batch_size, job.time_signature, job.source.shape[-1])
    return {
        "task_type": "lego",
        "instruction": instruction,
        "src_audio": str(source_path),
        "audio_codes": "",
        "caption": job.caption,
        "lyrics": settings.lyrics,
        "vocal_language": settings.vocal_language,
        "bpm": job.bpm,
        "keyscale": job.key or "",
        "timesignature": settings.time_signature,
        "duration": -1.0,  # the source decides (the duration line is that of the padded source)
        "inference_steps": job.steps,
        "guidance_scale": job.guidance_scale,
        "seed": job.seed,
        "shift": settings.shift,
        "dcw_enabled": settings.dcw_enabled,
        "cfg_interval_start": settings.cfg_interval_start,
        "cfg_interval_end": settings.cfg_interval_end,
        "use_adg": settings.use_adg,
        "infer_method": settings.infer_method,
        "sampler_mode": settings.sampler_mode,
        "timesteps": None,
        "latent_shift": 0.0,
        "latent_rescale": 1.0,
        # The runner normalises each stem itself, after cropping it to the source (runner/lego.py).
        "enable_normalization": False,
        "repainting_start": 0.0,
        "repainting_end": -1,
        "repaint_mode": "aggressive",  # official: no source latents injected, no source waveform spliced
        "thinking": False,
        "use_cot_metas": False,
        "use_cot_caption": False,
        "use_cot_language": False,
        "use_cot_lyrics": False,
    }


def config_fields(job: LegoJob) -> dict:
    """GenerationConfig fields: fixed seeds, one per candidate (`runner.sampling`), so a seed reproduces its stems."""
    return {
        "batch_size": job.batch_size,
        "use_random_seed": False,
        "seeds": list(sampling.candidate_seeds(job.seed, job.batch_size)),
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
        cancellation.raise_if_requested()
        lego = self.patch_outcomes.get(patches.lego_source_context.NAME)
        if lego is None or lego.status == patches.NOT_FOUND:
            raise unsupported(f"The lego source-context fix cannot be applied ({lego}); lego would ignore the source.")
        if not Path(checkpoints).is_dir():
            raise checkpoint_error("checkpoint_missing", f"The checkpoint folder {checkpoints} does not exist.")
        handler_class, _ = _import_acestep()
        self.api = detect_api(handler_class.initialize_service)
        self._view = tempfile.TemporaryDirectory(prefix="acestep-checkpoints-")
        project_root = build_checkpoint_view(Path(checkpoints), Path(self._view.name))
        # ACE-Step resolves its folders (and writes its progress-time cache) from these: the view.
        os.environ["ACESTEP_CHECKPOINTS_DIR"] = str(project_root / "checkpoints")
        os.environ["ACESTEP_PROJECT_ROOT"] = str(project_root)
        handler = handler_class()
        accepted = inspect.signature(handler.initialize_service).parameters
        status, ok = handler.initialize_service(**init_kwargs(self.api, project_root, options, accepted))
        cancellation.raise_if_requested()  # in case ACE-Step caught the Cancelled raised inside it
        if not ok:
            first_line = next((line for line in str(status).splitlines() if line.strip()), "no reason given")
            first_line = first_line.replace(str(project_root / "checkpoints"), str(checkpoints))
            raise checkpoint_error("checkpoint_unloadable", f"ACE-Step could not load {checkpoints}: {first_line}")
        match_precision(handler, options.dtype)
        self.handler, self.device = handler, options.device

    def describe(self) -> dict:
        """For the result event: what this engine ran, and what each patch did."""
        return {
            "acestep_api": self.api,
            "patches": {name: {"status": o.status, "detail": o.detail} for name, o in self.patch_outcomes.items()},
        }

    def generate(self, job: LegoJob, on_stage: StageCallback, on_step: StepCallback) -> list[np.ndarray]:
        if self.handler is None:
            raise RuntimeError("AcestepEngine.generate() before load()")
        _, inference = _import_acestep()
        on_stage("encoding")  # until the diffusion starts: reading the source, VAE and text encoding
        with tempfile.TemporaryDirectory(prefix="acestep-lego-") as work:
            source_path = Path(work) / "source.wav"
            sf.write(source_path, job.source.T, MODEL_SAMPLE_RATE, subtype="FLOAT")
            self._check_source_readable(source_path, job.source.shape[-1])
            params = build_params(inference.GenerationParams, job, source_path, instruction_for(self.handler, job.track))
            config = build_config(inference.GenerationConfig, job)
            seed_source_sample(job.seed)  # the source's posterior sample (runner/sampling.py)
            with DiffusionProgress(self.handler.model, job.steps, on_stage, on_step,
                                   vae=getattr(self.handler, "vae", None), pieces=self._source_pieces(job)):
                # save_dir None: ACE-Step keeps the audio in memory and writes no file of its own.
                result = inference.generate_music(self.handler, None, params, config, None, progress=None)
            cancellation.raise_if_requested()  # ACE-Step turns any exception into a failed result
        return read_stems(result, job.batch_size)

    def _source_pieces(self, job: LegoJob) -> int:
        """How many pieces ACE-Step's tiled encode cuts the source into (runner.sampling's plan of it)."""
        tile_seconds = sampling.source_tile_seconds(gpu_total_gib(self.device))
        return len(sampling.source_tiles(job.source.shape[-1], tile_seconds))

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
