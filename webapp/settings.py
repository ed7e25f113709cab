"""Every environment variable of the web service, in one declarative registry.

This module is the single source of the service's configuration (DESIGN.md section 8): each
variable has a type, a default and a one-line description, and README.md's configuration table
is checked against this registry by a test (`python -m webapp.settings --markdown` prints it).
Bad values stop the service at start with one clear sentence (`SettingsError`), never at the
first request. The runner subprocess gets explicit flags built from these values, so its own
environment is not a second source of truth.
"""
from __future__ import annotations

import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlparse

from runner.contract import DEFAULT_MAX_DURATION_S, STEPS_RANGE, speedup_names

FIELD_LIMIT_BYTES = 256 * 1024  # one text field (multipart) or one JSON value other than the audio
FLOAT32_STEREO_48K_BYTES_PER_S = 48000 * 2 * 4


class SettingsError(ValueError):
    """A setting is invalid; the message is one sentence that says which and what to do."""


@dataclass(frozen=True)
class Setting:
    name: str
    kind: str  # "int" | "float" | "bool" | "str" | "choice" | "url" | "path" | "secret" | "command"
    default: str  # as written in the environment and in README.md ("" = unset)
    description: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()

    def parse(self, raw: str) -> Any:
        raw = raw.strip()
        where = f"{self.name}={raw!r}"
        if self.kind == "int":
            try:
                value: Any = int(raw)
            except ValueError:
                raise SettingsError(f"{where} is not a whole number; set it to an integer such as {self.default or 0}.") from None
            self._check_range(value, where)
            return value
        if self.kind == "float":
            try:
                value = float(raw)
            except ValueError:
                raise SettingsError(f"{where} is not a number; set it to a number such as {self.default or 0}.") from None
            if value != value:  # NaN
                raise SettingsError(f"{where} is not a number; set it to a number such as {self.default or 0}.")
            self._check_range(value, where)
            return value
        if self.kind == "bool":
            lowered = raw.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off", ""):
                return False
            raise SettingsError(f"{where} is not a yes/no value; use true or false.")
        if self.kind == "choice":
            if raw not in self.choices:
                raise SettingsError(f"{where} is not one of {', '.join(self.choices)}; pick one of those.")
            return raw
        if self.kind == "url":
            if not raw:
                return ""
            parsed = urlparse(raw)
            if parsed.scheme not in self.choices or not parsed.hostname or parsed.query or parsed.fragment:
                schemes = " or ".join(f"{s}://" for s in self.choices)
                raise SettingsError(f"{where} is not a valid URL; write it as {schemes}HOST:PORT/PATH.")
            try:
                parsed.port  # noqa: B018 - raises ValueError on a bad port
            except ValueError:
                raise SettingsError(f"{where} has an invalid port; write it as http://HOST:PORT/.") from None
            return raw
        if self.kind == "path":
            # Absolute from here on: the runner runs in another working directory.
            return Path(raw).expanduser().absolute() if raw else None
        if self.kind == "command":
            try:
                return shlex.split(raw)
            except ValueError as exc:
                raise SettingsError(f"{where} cannot be split into arguments ({exc}); fix its quoting.") from None
        return raw  # str, secret

    def _check_range(self, value: float, where: str) -> None:
        if self.minimum is not None and value < self.minimum:
            raise SettingsError(f"{where} is below the minimum {_num(self.minimum)}; set it to at least {_num(self.minimum)}.")
        if self.maximum is not None and value > self.maximum:
            raise SettingsError(f"{where} is above the maximum {_num(self.maximum)}; set it to at most {_num(self.maximum)}.")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


# The registry. Order = README order. Defaults are strings exactly as README.md shows them.
REGISTRY: tuple[Setting, ...] = (
    Setting("PORT", "int", "8002", "TCP port gunicorn listens on (all interfaces).", 1, 65535),
    Setting("ACESTEP_CHECKPOINTS", "path", "./checkpoints",
            "Checkpoint folder: a diffusers pipeline (`model_index.json`) or ACE-Step's layout; must exist and be readable at start."),
    Setting("ACESTEP_ENGINE", "choice", "auto", "Engine override; `auto` picks it from the checkpoint folder's layout.",
            choices=("auto", "acestep", "diffusers")),
    Setting("ACESTEP_DEVICE", "choice", "auto", "Device passed to the runner (`--device`).", choices=("auto", "cuda", "cpu")),
    Setting("ACESTEP_DTYPE", "choice", "auto", "Weights dtype passed to the runner (`--dtype`); `auto` = the runner's choice for the card.",
            choices=("auto", "bfloat16", "float16", "float32")),
    Setting("ACESTEP_OFFLOAD", "choice", "auto", "Model CPU offload passed to the runner (`--offload`).", choices=("auto", "on", "off")),
    Setting("ACESTEP_SPEEDUPS", "str", "default",
            "The diffusers engine's DiT speed-ups (docs/PERFORMANCE.md): `default` (contiguous, fused, attention), `none`, or a comma list of contiguous, fused, attention, compile, graphs."),
    Setting("ACESTEP_CONFIG_PATH", "str", "acestep-v15-base",
            "The DiT's sub-folder in ACE-Step's checkpoint layout (the seed's setting; only the base model has the lego task)."),
    Setting("ACESTEP_INIT_LLM", "bool", "false",
            "The seed's switch for ACE-Step's language model; must stay `false` (no LM fits beside the others on the shared T4)."),
    Setting("DATA_DIR", "path", "./data", "Job files (uploads, results, runner logs); created at start, must be writable."),
    Setting("QUEUE_URL", "url", "",
            "gpu-queue-service base URL, e.g. `http://gpu-queue:8085/`; unset = the host-wide lock file `GPU_LOCK_FILE`.",
            choices=("http", "https")),
    Setting("QUEUE_LANE", "str", "",
            "Lane prefix in the gpu-queue-service's paths for a lane-mode deployment (`{QUEUE_URL}{lane}/tasks`); unset = the token-mode paths every caller uses (`{QUEUE_URL}tasks`)."),
    Setting("QUEUE_TOKENS", "int", "6000", "GPU tokens one generation takes from the shared pool (13,000 = the whole T4).", 1, 1_000_000),
    Setting("QUEUE_WAIT_TIMEOUT_S", "float", "600",
            "Longest wait for GPU tokens (or the lock file) before a job fails with `gpu_busy` (retryable).", 1),
    Setting("QUEUE_POLL_INTERVAL_S", "float", "1.0", "How often a queued job asks the gpu-queue-service for its position.", 0.05, 60),
    Setting("QUEUE_HTTP_TIMEOUT_S", "float", "5", "Timeout of one HTTP call to the gpu-queue-service.", 0.1, 120),
    Setting("QUEUE_PROCEED_IF_UNREACHABLE", "bool", "false",
            "When the gpu-queue-service cannot be reached: `true` falls back to the lock file, `false` fails the job with `gpu_queue_unreachable`."),
    Setting("GPU_LOCK_FILE", "path", "/tmp/acestep-gpu.lock",
            "Host-wide lock file (flock) that serialises GPU use when `QUEUE_URL` is unset; every service on the host must name the same file."),
    Setting("API_KEY", "secret", "", "When set, every endpoint but `/health` and `/` needs `Authorization: Bearer KEY` or `X-API-Key: KEY`."),
    Setting("MAX_UPLOAD_MB", "float", "100", "Largest request body in MB (base64 JSON included), refused before it is read.", 0.01, 4096),
    Setting("MAX_DURATION_S", "float", f"{DEFAULT_MAX_DURATION_S:g}", "Longest source audio accepted, in seconds.", 1, 3600),
    Setting("MIN_DURATION_S", "float", "1", "Shortest source audio accepted, in seconds.", 0.01, 3600),
    Setting("MAX_DECODED_MB", "float", "200",
            "Largest decoded source in MB (sample rate x channels x duration as 32-bit float), refused before decoding; must hold `MAX_DURATION_S` of 48 kHz stereo.", 1, 16384),
    Setting("JOB_TIMEOUT_S", "float", "600",
            "Longest a runner may run (from its start, GPU wait excluded); then its process group is killed and the job fails `job_timeout`.", 1),
    Setting("MAX_QUEUED_JOBS", "int", "8", "Jobs that may wait behind the running one; more answer 429 with `Retry-After`.", 0, 10_000),
    Setting("LEGO_STEPS", "int", "50", "Inference steps when the client sends none.", *STEPS_RANGE),
    Setting("LEGO_MIN_STEPS", "int", "20", "Smallest `inference_steps` honoured; smaller requests are raised to it (with a warning).", *STEPS_RANGE),
    Setting("LEGO_MAX_STEPS", "int", "100", "Largest `inference_steps` honoured; larger requests are lowered to it (with a warning); at most the runner's limit.", *STEPS_RANGE),
    Setting("RESULT_TTL_S", "float", "3600", "How long finished jobs and their files are kept before they are deleted.", 1),
    Setting("RUNNER_COMMAND", "command", "",
            "Command that starts the runner (arguments split like a shell, no shell run); unset = this Python's `-m runner`."),
    Setting("RUNNER_KILL_GRACE_S", "float", "5", "Seconds between SIGTERM and SIGKILL when a runner is cancelled or timed out.", 0.1, 120),
    Setting("PROBE_TIMEOUT_S", "float", "20", "Timeout of each ffprobe/ffmpeg call that checks an upload.", 1, 600),
    Setting("KEEP_WARM_S", "float", "0",
            "Seconds a loaded model may stay warm after a job for the next one, keeping its GPU tokens; 0 = every runner exits after its job (zero idle VRAM).", 0),
    Setting("RUNNER_PRESTART", "bool", "true",
            "Start the next runner ahead of time: it imports torch and diffusers but touches no GPU (no VRAM, no tokens) until a job is handed to it."),
    Setting("REDIS_URL", "url", "",
            "Redis of the multi-host job queue (RQ): set, the web tier only checks uploads, enqueues, answers status and serves "
            "results, and `python -m webapp.worker` on each GPU host runs the jobs; unset = the in-process queue of one host.",
            choices=("redis", "rediss", "unix")),
    Setting("WORKER_LOST_AFTER_S", "float", "30",
            "With `REDIS_URL`: a GPU worker silent this long is gone; its running job fails `gpu_worker_lost` (retryable).", 2, 3600),
    Setting("WEB_WORKERS", "int", "1",
            "gunicorn worker processes; more than 1 only with `REDIS_URL` (without it, jobs live in the one worker's memory).", 1, 64),
    Setting("WEB_THREADS", "int", "16", "gunicorn threads of each worker process (each waiting synchronous call holds one).", 2, 256),
    Setting("LOG_FORMAT", "choice", "text", "`text` for people, `json` for one JSON object per line.", choices=("text", "json")),
    Setting("LOG_LEVEL", "choice", "INFO", "Python log level.", choices=("DEBUG", "INFO", "WARNING", "ERROR")),
)

BY_NAME: dict[str, Setting] = {s.name: s for s in REGISTRY}
_LANE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-/]{0,63}$")


class Settings:
    """Parsed, validated values; attribute names are the lower-cased variable names."""

    def __init__(self, values: dict[str, Any], raw: dict[str, str]):
        self._values = values
        self._raw = raw

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["_values"][name.upper()]
        except KeyError:
            raise AttributeError(name) from None

    def raw(self, name: str) -> str:
        return self._raw[name]

    def as_dict(self, include_secrets: bool = False) -> dict[str, Any]:
        out = {}
        for s in REGISTRY:
            value = self._values[s.name]
            if s.kind == "secret" and not include_secrets:
                value = "(set)" if value else ""
            out[s.name] = str(value) if isinstance(value, Path) else value
        return out

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def max_decoded_bytes(self) -> int:
        return int(self.max_decoded_mb * 1024 * 1024)

    @property
    def max_field_bytes(self) -> int:
        return FIELD_LIMIT_BYTES

    @property
    def queue_base_url(self) -> str:
        """The prefix of every token call: QUEUE_URL, plus `lane/` where a lane is set."""
        base = self.queue_url if self.queue_url.endswith("/") else self.queue_url + "/"
        lane = self.queue_lane.strip("/")
        return f"{base}{lane}/" if lane else base

    @property
    def release_budget_s(self) -> float:
        """The longest one inline release may take (its retries, webapp/gpu_tokens.py, included)."""
        return 3 * self.queue_http_timeout_s + 4.0 if self.queue_url else 1.0

    @property
    def shutdown_budget_s(self) -> float:
        """What a shutdown needs at worst: a runner that ignores SIGTERM (grace, then SIGKILL), the
        spare's stop beside it, one release. gunicorn's graceful_timeout is derived from it, so
        no RUNNER_KILL_GRACE_S can outlast the shutdown and orphan its runner."""
        return 2 * self.runner_kill_grace_s + self.release_budget_s + 5.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, check_filesystem: bool = True) -> "Settings":
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        raw: dict[str, str] = {}
        for s in REGISTRY:
            text = environ.get(s.name)
            text = s.default if text is None or text.strip() == "" else text
            raw[s.name] = text
            values[s.name] = s.parse(text)
        settings = cls(values, raw)
        settings._validate(check_filesystem)
        return settings

    def _validate(self, check_filesystem: bool) -> None:
        if self.acestep_init_llm:
            raise SettingsError("ACESTEP_INIT_LLM=true is not supported: the lego task runs without the language model on the shared T4; unset it or set it to false.")
        try:
            speedup_names(self.acestep_speedups)
        except ValueError as exc:
            raise SettingsError(str(exc)) from None
        if not (self.lego_min_steps <= self.lego_steps <= self.lego_max_steps):
            raise SettingsError(
                f"LEGO_STEPS={self.lego_steps} must lie between LEGO_MIN_STEPS={self.lego_min_steps} and "
                f"LEGO_MAX_STEPS={self.lego_max_steps}; change one of the three.")
        if self.min_duration_s > self.max_duration_s:
            raise SettingsError(f"MIN_DURATION_S={self.min_duration_s} is above MAX_DURATION_S={self.max_duration_s}; lower it.")
        needed = self.max_duration_s * FLOAT32_STEREO_48K_BYTES_PER_S / (1024 * 1024)
        if self.max_decoded_mb < needed:
            raise SettingsError(
                f"MAX_DECODED_MB={self.max_decoded_mb:g} cannot hold MAX_DURATION_S={self.max_duration_s:g} s of 48 kHz stereo "
                f"({needed:.0f} MB decoded); raise it to at least {int(needed) + 1} or lower MAX_DURATION_S.")
        if self.queue_lane and not _LANE_RE.match(self.queue_lane):
            raise SettingsError(f"QUEUE_LANE={self.queue_lane!r} may hold only letters, digits, '_', '-', '.' and '/'; fix it.")
        if not re.fullmatch(r"[A-Za-z0-9_.\-]{1,128}", self.acestep_config_path):
            raise SettingsError(f"ACESTEP_CONFIG_PATH={self.acestep_config_path!r} must be a plain folder name such as acestep-v15-base.")
        if self.web_workers > 1 and not self.redis_url:
            raise SettingsError(f"WEB_WORKERS={self.web_workers} needs REDIS_URL: without it jobs live in one worker's memory; "
                                "set REDIS_URL or WEB_WORKERS=1.")
        if check_filesystem:
            self._validate_filesystem()

    def check_checkpoint_folder(self) -> None:
        """Where generation runs (the one host, or a GPU worker): the weights must be a readable folder."""
        ckpt: Path = self.acestep_checkpoints
        if not ckpt.is_dir():
            raise SettingsError(
                f"ACESTEP_CHECKPOINTS={ckpt} is not a folder; download the weights (`.venv/bin/python -m runner download {ckpt}`) "
                f"or build the demo checkpoint (`python -m runner make-tiny-checkpoint {ckpt}`), or point the variable at them.")
        if not os.access(ckpt, os.R_OK | os.X_OK):
            raise SettingsError(f"ACESTEP_CHECKPOINTS={ckpt} is not readable by this user; fix its permissions.")

    def _validate_filesystem(self) -> None:
        if not self.redis_url:  # with REDIS_URL the web tier never reads the weights; the GPU worker checks them
            self.check_checkpoint_folder()
        data: Path = self.data_dir
        try:
            data.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SettingsError(f"DATA_DIR={data} cannot be created ({exc.strerror}); point it at a writable folder.") from None
        if not os.access(data, os.W_OK | os.X_OK):
            raise SettingsError(f"DATA_DIR={data} is not writable by this user; fix its permissions or choose another folder.")
        if not self.queue_url:
            lock_dir = self.gpu_lock_file.parent
            if not lock_dir.is_dir() or not os.access(lock_dir, os.W_OK | os.X_OK):
                raise SettingsError(f"GPU_LOCK_FILE={self.gpu_lock_file} cannot be created: {lock_dir} is not a writable folder.")


def markdown_table() -> str:
    """README.md's configuration table, generated from the registry."""
    lines = ["| Variable | Default | Description |", "|---|---|---|"]
    for s in REGISTRY:
        default = f"`{s.default}`" if s.default else "(unset)"
        lines.append(f"| `{s.name}` | {default} | {s.description} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m webapp.settings [--markdown]`: check the environment, or print the README table."""
    argv = sys.argv[1:] if argv is None else argv
    if "--markdown" in argv:
        print(markdown_table())
        return 0
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    for name, value in settings.as_dict().items():
        print(f"{name}={value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
