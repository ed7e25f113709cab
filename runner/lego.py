"""The `lego` command: validate, read the source, load an engine, generate, check, write.

Kept apart from argument parsing so that one process can serve several jobs (keep-warm)
with the same code: `run_lego` takes a loaded-engine cache and reuses it when it fits.
"""
from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from runner import audio as audio_io
from runner import device as placement
from runner import quality
from runner import sampling
from runner import window as repaint_window
from runner.engines import create as create_engine
from runner.engines.base import LegoJob, LoadOptions
from runner.events import EventStream, bad_input, checkpoint_error, RunnerError
from runner.layout import inspect_folder
from runner.tracks import DEFAULT_CAPTIONS, TRACKS

from runner.contract import BPM_RANGE, DEFAULT_MAX_DURATION_S, MAX_CAPTION_CHARS, STEPS_RANGE, normalise_key  # noqa: E402 - the limits are the contract's


@dataclass
class LegoArgs:
    """Everything a lego job needs, as the command line or a keep-warm job line gives it."""

    source: Path
    track: str
    bpm: int
    key: Optional[str] = None
    caption: Optional[str] = None
    steps: int = 50
    batch_size: int = 1
    seed: Optional[int] = None
    repaint_start: float = 0.0
    repaint_end: float = -1.0
    guidance_scale: float = 7.0
    time_signature: Optional[str] = None
    checkpoints: Path = Path("checkpoints")
    out: Path = Path(".")
    format: str = "wav"
    device: str = "auto"
    dtype: str = "auto"
    offload: str = "auto"
    engine: Optional[str] = None
    max_duration_s: float = DEFAULT_MAX_DURATION_S


@dataclass
class LoadedEngine:
    """What the keep-warm loop holds between jobs."""

    engine: object
    checkpoints: Path
    device: str
    dtype: str
    offload: bool
    load_seconds: float = 0.0


@dataclass
class EngineCache:
    current: Optional[LoadedEngine] = None
    loads: int = 0
    timings: dict = field(default_factory=dict)


def validate(args: LegoArgs) -> None:
    """Reject bad input before anything expensive happens (exit 2)."""
    if args.track not in TRACKS:
        raise bad_input("bad_track", f"Unknown track {args.track!r}; choose one of {', '.join(TRACKS)}.")
    if not BPM_RANGE[0] <= args.bpm <= BPM_RANGE[1]:
        raise bad_input("bad_bpm", f"bpm {args.bpm} is outside {BPM_RANGE[0]}..{BPM_RANGE[1]}; send the tempo of the source in beats per minute.")
    if args.key is not None:
        key = normalise_key(args.key)
        if key is None:
            raise bad_input("bad_key", f"key {args.key[:30]!r} is not a key; give e.g. \"F# minor\", \"Bb major\", Am or F#m.")
        args.key = key  # the engines take one spelling: "A minor"
    if not STEPS_RANGE[0] <= args.steps <= STEPS_RANGE[1]:
        raise bad_input("bad_steps", f"steps {args.steps} is outside {STEPS_RANGE[0]}..{STEPS_RANGE[1]}; 50 is the base model's setting.")
    if args.batch_size not in (1, 2):
        raise bad_input("bad_batch_size", f"batch size {args.batch_size} is not supported; choose 1 or 2.")
    if args.caption is not None and len(args.caption) > MAX_CAPTION_CHARS:
        raise bad_input("caption_too_long", f"The caption has {len(args.caption)} characters; keep it under {MAX_CAPTION_CHARS}.")
    if not 1.0 <= args.guidance_scale <= 30.0:
        raise bad_input("bad_guidance_scale", f"guidance scale {args.guidance_scale} is outside 1..30; 7 is the base model's setting.")
    if args.repaint_start < 0:
        raise bad_input("bad_repaint_window", f"repaint start {args.repaint_start} s is before the clip; give a start of 0 or more.")
    if args.repaint_end >= 0 and args.repaint_end <= args.repaint_start:
        raise bad_input("bad_repaint_window", f"repaint end {args.repaint_end} s is not after its start {args.repaint_start} s; give a later end, or -1 for the end of the clip.")


def validate_window(args: LegoArgs, seconds: float) -> None:
    """The repaint window must lie inside the clip (checked once its length is known)."""
    if args.repaint_start >= seconds or args.repaint_end > seconds + 1e-6:
        raise bad_input(
            "bad_repaint_window",
            f"The repaint window {args.repaint_start}..{args.repaint_end} s lies outside the {seconds:.2f} s clip; keep it inside, or use 0 and -1 for the whole clip.",
        )


def _make_out_dir(out: Path) -> None:
    """The output folder, created when missing (as `--out stems/` is expected to work); a file there is refused."""
    if out.exists() and not out.is_dir():
        raise bad_input("bad_out_dir", f"The output path {out} is a file, not a folder; give a folder as --out.")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise bad_input("bad_out_dir", f"The output folder {out} cannot be created ({exc.strerror}); give another --out.") from None


def run_lego(args: LegoArgs, events: EventStream, cache: EngineCache) -> dict:
    """One job; returns the result event's fields. Raises RunnerError or Cancelled."""
    started = time.perf_counter()
    validate(args)
    layout = inspect_folder(args.checkpoints, args.engine)
    if not layout.complete:
        code = "checkpoint_missing" if not args.checkpoints.is_dir() else "checkpoint_incomplete"
        raise checkpoint_error(code, layout.describe_problem())
    source = audio_io.read_source(args.source, args.max_duration_s)
    validate_window(args, source.seconds)
    audio_io.check_format(args.format, source.sample_rate)
    _make_out_dir(args.out)
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    timings: dict = {}

    events.stage("loading")
    t = time.perf_counter()
    timings["import_s"] = placement.import_torch_seconds(layout.engine)
    chosen = placement.choose(args.device, args.dtype, args.offload)
    placement.reset_cuda_peak()
    loads_before = cache.loads
    loaded = _engine_for(cache, layout.engine, args.checkpoints, chosen.device, chosen.dtype, chosen.offload)
    reused = cache.loads == loads_before
    timings["load_s"] = round(time.perf_counter() - t, 3)
    job = LegoJob(
        source=sampling.model_source(audio_io.to_model_input(source)), track=args.track, bpm=args.bpm,
        caption=args.caption or DEFAULT_CAPTIONS[args.track], steps=args.steps, batch_size=args.batch_size,
        seed=seed, key=args.key, time_signature=args.time_signature, guidance_scale=args.guidance_scale,
    )
    window = repaint_window.Window.from_args(args.repaint_start, args.repaint_end)
    retried_in_float32 = False
    try:
        stems = _generate(loaded, job, events, timings)
        quality.check_stems(stems, job.source, loaded.dtype)
    except RunnerError as err:
        if not (err.code in ("output_nan", "output_silent") and chosen.dtype_auto and chosen.device == "cuda" and loaded.dtype != "float32"):
            raise
        events.say(f"[runner] {err.code} in {loaded.dtype}; retrying once in float32")
        loaded = _engine_for(cache, layout.engine, args.checkpoints, chosen.device, "float32", chosen.offload)
        retried_in_float32 = True
        stems = _generate(loaded, job, events, timings)
        quality.check_stems(stems, job.source, "float32")

    stems = [repaint_window.apply(stem, window, audio_io.MODEL_RATE) for stem in stems]
    settings = sampling.settings_for(seed, args.batch_size, args.time_signature, job.source.shape[-1], loaded.device,
                                     (chosen.gpu_total_bytes or 0) / 1024**3, (chosen.compute_capability or (0, 0)) >= (8, 0))
    events.stage("writing")
    t = time.perf_counter()
    outputs = _write(stems, args, source, seed)
    timings["writing_s"] = round(time.perf_counter() - t, 3)
    timings["total_s"] = round(time.perf_counter() - started, 3)
    return {
        "outputs": outputs,
        "seed": seed,
        "timings": timings,
        "peak_vram_bytes": loaded.engine.peak_vram_bytes(),
        "peak_vram_allocated_bytes": placement.cuda_peak_allocated(),
        "engine": layout.engine,
        "device": loaded.device,
        "dtype": loaded.dtype,
        "offload": loaded.offload,
        "demo": layout.demo,
        "retried_in_float32": retried_in_float32,
        "reused_loaded_model": reused,
        "window": window.describe(),
        "sampling": settings.event_fields(),
        **_engine_details(loaded.engine),
    }


def _engine_details(engine) -> dict:
    """What the engine says about itself (the acestep engine: its API and each patch's outcome)."""
    describe = getattr(engine, "describe", None)
    return describe() if callable(describe) else {}


def _engine_for(cache: EngineCache, engine_name: str, checkpoints: Path, device: str, dtype: str, offload: bool) -> LoadedEngine:
    """Reuse the loaded engine when it fits the job, else (re)load."""
    current = cache.current
    if current and (current.checkpoints, current.device, current.dtype, current.offload) == (checkpoints, device, dtype, offload):
        return current
    cache.current = None  # drop the old model before loading another
    engine = create_engine(engine_name)
    t = time.perf_counter()
    engine.load(checkpoints, LoadOptions(device=device, dtype=dtype, offload=offload))
    cache.current = LoadedEngine(engine, checkpoints, device, dtype, offload, time.perf_counter() - t)
    cache.loads += 1
    return cache.current


def _generate(loaded: LoadedEngine, job: LegoJob, events: EventStream, timings: dict) -> list:
    marks = {"start": time.perf_counter()}

    def on_stage(name: str) -> None:
        marks[name] = time.perf_counter()
        events.stage(name)

    stems = loaded.engine.generate(job, on_stage, events.progress)
    end = time.perf_counter()
    order = [name for name in ("encoding", "generating", "decoding") if name in marks] + ["end"]
    marks["end"] = end
    for name, nxt in zip(order, order[1:]):
        timings[f"{name}_s"] = round(marks[nxt] - marks[name], 3)
    return stems


def _write(stems: list, args: LegoArgs, source: audio_io.SourceAudio, seed: int) -> list[dict]:
    """Write every candidate, or none: a failure or cancel part-way removes what was written."""
    written: list[Path] = []
    outputs = []
    try:
        for index, stem in enumerate(stems):
            # Normalised after cropping and resampling: audio past the source's end must not set the gain.
            samples = quality.normalise(audio_io.to_source_terms(stem, source.sample_rate, source.frames))
            path = (args.out / f"{args.track}-{seed}-{index + 1}.{args.format}").resolve()
            audio_io.write_atomic(path, samples, source.sample_rate, args.format)
            written.append(path)
            outputs.append({"path": str(path), "sample_rate": source.sample_rate, "frames": int(samples.shape[0]), "channels": int(samples.shape[1])})
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return outputs


def env_default(name: str, fallback: str) -> str:
    return os.environ.get(name) or fallback
