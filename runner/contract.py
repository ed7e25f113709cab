"""The runner's contract with the web service, defined once and imported by both sides.

Everything the two processes must agree on lives here and nowhere else: the command line that
starts a keep-warm runner, the job lines it reads on stdin, the events it writes on stdout, its
stages, its exit statuses and the limits it enforces. The module is standard library only (no
torch, no numpy), so the web service imports it without pulling in the runner; cog's
`eventtypes.py` is the model. A change here is a change of the protocol, seen by both sides at
once, and tests/test_runner_contract.py feeds the web side's job line to the runner's parser.
"""
from __future__ import annotations

import enum
import json
import math
import re
from typing import Any

# ---- the command line ---------------------------------------------------------------------------

SERVE_COMMAND = "serve"  # `python -m runner serve --idle-timeout S`: the only way the service runs it
IDLE_TIMEOUT_FLAG = "--idle-timeout"
IMPORT_ENGINE_FLAG = "--import-engine"  # the engine whose stack to import while waiting for a job
ENGINE_NAMES = ("diffusers", "acestep")


def serve_argv(prefix: list[str], idle_timeout_s: float, engine: str | None = None) -> list[str]:
    """The full command of a keep-warm runner: RUNNER_COMMAND (or `python -m runner`) + serve.
    `engine`: the one the checkpoint folder implies, imported while the runner waits (each job's
    own engine still decides; a wrong guess only costs that job the import)."""
    argv = [*prefix, SERVE_COMMAND, IDLE_TIMEOUT_FLAG, f"{max(0.0, idle_timeout_s):g}"]
    return argv + [IMPORT_ENGINE_FLAG, engine] if engine in ENGINE_NAMES else argv


# ---- job lines (stdin) ----------------------------------------------------------------------------

class JobCommand(str, enum.Enum):
    LEGO = "lego"
    EXIT = "exit"


# Every field a lego job line may carry; the runner's LegoArgs has exactly these (a test checks).
JOB_FIELDS = ("source", "track", "bpm", "key", "caption", "steps", "batch_size", "seed", "repaint_start",
              "repaint_end", "guidance_scale", "time_signature", "checkpoints", "out", "format", "device",
              "dtype", "offload", "engine", "max_duration_s")
REQUIRED_JOB_FIELDS = ("source", "track", "bpm")
PATH_FIELDS = frozenset({"source", "checkpoints", "out"})
MAX_JOB_LINE_BYTES = 64 * 1024


class ContractError(ValueError):
    """A line that breaks the protocol (either direction); the message says what is wrong."""


def encode_job(args: dict[str, Any]) -> bytes:
    """One lego job line, checked against the field list before it is sent."""
    unknown = set(args) - set(JOB_FIELDS)
    if unknown:
        raise ContractError(f"unknown job fields: {', '.join(sorted(unknown))}")
    missing = [name for name in REQUIRED_JOB_FIELDS if args.get(name) in (None, "")]
    if missing:
        raise ContractError(f"missing job fields: {', '.join(missing)}")
    line = json.dumps({"command": JobCommand.LEGO.value, "args": args}, separators=(",", ":"), allow_nan=False)
    data = (line + "\n").encode()
    if len(data) > MAX_JOB_LINE_BYTES:
        raise ContractError(f"a job line is limited to {MAX_JOB_LINE_BYTES} bytes")
    return data


def encode_exit() -> bytes:
    return (json.dumps({"command": JobCommand.EXIT.value}) + "\n").encode()


def decode_job_line(line: str) -> tuple[JobCommand, dict[str, Any]]:
    """(command, args) of one stdin line; ContractError for anything else."""
    try:
        message = json.loads(line)
    except ValueError:
        raise ContractError("A job line must be one JSON object.") from None
    if not isinstance(message, dict):
        raise ContractError("A job line must be one JSON object.")
    try:
        command = JobCommand(message.get("command"))
    except ValueError:
        raise ContractError('A job line needs "command": "lego" or "exit".') from None
    if command is JobCommand.EXIT:
        return command, {}
    args = message.get("args") or {}
    if not isinstance(args, dict):
        raise ContractError('A job line\'s "args" must be an object.')
    unknown = set(args) - set(JOB_FIELDS)
    if unknown:
        raise ContractError(f"Unknown job fields: {', '.join(sorted(unknown))}.")
    return command, args


# ---- events (stdout) ----------------------------------------------------------------------------

class EventType(str, enum.Enum):
    READY = "ready"            # at start ({"loaded": false}) and after each job ({"loaded": bool})
    STAGE = "stage"            # {"stage": one of Stage}
    PROGRESS = "progress"      # {"step": k, "total": n, "stage": one of PROGRESS_STAGES}
    RESULT = "result"          # {"outputs": [{"path", "sample_rate", "frames", ...}], "seed", "timings", ...}
    ERROR = "error"            # {"code", "message", "retryable", "exit_status"}
    CHECKPOINT = "checkpoint"  # make-tiny-checkpoint
    DOWNLOAD = "download"      # download: started
    DOWNLOADED = "downloaded"  # download: done
    CHECK = "check"            # check: what a checkpoint folder is


class Stage(str, enum.Enum):
    LOADING = "loading"
    ENCODING = "encoding"
    GENERATING = "generating"
    DECODING = "decoding"
    WRITING = "writing"


STAGES = tuple(s.value for s in Stage)
# The stages whose progress events count work done, "step" of "total": the source's pieces while
# encoding (a long source on a CPU spends minutes there), the denoising steps while generating.
PROGRESS_STAGES = (Stage.ENCODING.value, Stage.GENERATING.value)


def decode_event(line: str) -> dict[str, Any]:
    """One stdout line as an event object; ContractError when it is not one."""
    try:
        event = json.loads(line)
    except ValueError:
        raise ContractError("not JSON") from None
    if not isinstance(event, dict) or not isinstance(event.get("event"), str):
        raise ContractError("not an event object")
    return event


# ---- exit statuses ---------------------------------------------------------------------------------

class ExitStatus(enum.IntEnum):
    OK = 0
    BAD_INPUT = 2      # bad input or usage; never retryable
    CHECKPOINT = 3     # checkpoints missing or unloadable
    GENERATION = 4     # generation failed (out of memory, NaN...)
    CANCELLED = 5      # SIGTERM (or the service went away): stopped at once, nothing written


# ---- limits the runner enforces (the service checks its settings against them) ----------------------

TRACKS = ("vocals", "backing_vocals", "drums")
BPM_RANGE = (30, 300)
STEPS_RANGE = (1, 200)
BATCH_SIZES = (1, 2)
GUIDANCE_RANGE = (1.0, 30.0)
MAX_CAPTION_CHARS = 1000
OUTPUT_FORMATS = ("wav", "flac", "mp3")
# The DiT speed-up switches (runner/speedups.py, environment ACESTEP_SPEEDUPS): named here so the
# service can refuse a bad value at start instead of failing every job.
SPEEDUP_SWITCHES = ("contiguous", "fused", "attention", "compile", "graphs")


def speedup_names(value: str) -> tuple[str, ...] | None:
    """ACESTEP_SPEEDUPS parsed: None for the measured defaults ("" or "default"), () for "none", else
    the names in order. Raises ValueError on an unknown name or a switch without what it needs."""
    value = value.strip().lower()
    if value in ("", "default"):
        return None
    if value == "none":
        return ()
    names = tuple(dict.fromkeys(n.strip() for n in value.split(",") if n.strip()))
    unknown = [n for n in names if n not in SPEEDUP_SWITCHES]
    if unknown:
        raise ValueError(f"ACESTEP_SPEEDUPS={value!r} names {', '.join(unknown)}; give a comma list of "
                         f"{', '.join(SPEEDUP_SWITCHES)}, or none, or default.")
    if "attention" in names and not {"fused", "compile"} & set(names):
        raise ValueError(f"ACESTEP_SPEEDUPS={value!r}: `attention` works through the `fused` attention processor; add fused.")
    return names
MP3_MAX_SAMPLE_RATE = 48000
DEFAULT_MAX_DURATION_S = 240.0  # the longest source, runner and service alike (MAX_DURATION_S overrides)


def finite(value: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---- key and scale: the musicians' spellings, normalised once for both sides ------------------------

_KEY_RE = re.compile(
    r"^\s*([A-Ga-g])\s*(#|b|\u266f|\u266d|-?sharp|-?flat)?\s*"
    r"(m|M|maj|major|min|minor|-)?\s*$", re.IGNORECASE)
_ACCIDENTALS = {"#": "#", "b": "b", "\u266f": "#", "\u266d": "b", "sharp": "#", "flat": "b"}
MAX_KEY_CHARS = 20


def normalise_key(text: str) -> str | None:
    """A key as musicians write it ("Am", "F#m", "Bbmaj", "C#min", "Eb major", "F sharp minor",
    "A") in the one form the engines take ("A minor", "Bb major"); None when it is not a key.
    A bare note is major; a lone "m" (or "-") is minor, a capital "M" major."""
    if not isinstance(text, str) or len(text) > MAX_KEY_CHARS:
        return None
    match = _KEY_RE.match(text)
    if not match:
        return None
    note, accidental, scale = match.groups()
    accidental = _ACCIDENTALS[(accidental or "").lower().lstrip("-")] if accidental else ""
    if scale is None or scale == "M" or scale.lower() in ("maj", "major"):
        mode = "major"
    else:  # "m", "-", "min", "minor" (a lowercase "m" that is not "M")
        mode = "minor"
    return f"{note.upper()}{accidental} {mode}"
