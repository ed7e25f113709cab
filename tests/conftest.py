"""Shared fixtures: audio files, checkpoint folders, web apps on the fake runner, the fake GPU queue.

Other suites may add fixtures here; the web service's ones are grouped below.
"""
from __future__ import annotations

import io
import json
import os
import shlex
import signal
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

ROOT = Path(__file__).resolve().parent.parent
FAKE_RUNNER = ROOT / "tests" / "fakes" / "fake_runner.py"
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
if str(ROOT) not in sys.path:  # `tests.fakes`, `webapp` and `runner` import from the checkout under any pytest entry point
    sys.path.insert(0, str(ROOT))


# ---- the runner's helpers (tests/test_runner_*.py) ------------------------------------------------
# NOTE: reconstructed by the web-service session after it overwrote this file by mistake; the
# runner's author should check these against the originals.

PYTHON = str(VENV_PYTHON if VENV_PYTHON.exists() else Path(sys.executable))
REPO = ROOT


def runner_env(**extra) -> dict:
    """A clean environment for `python -m runner`: offline hub, no service settings leaking in."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("ACESTEP_") and k not in ("MAX_DURATION_S", "KEEP_WARM_S", "ACESTEP_ENGINE")}
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env.update({k: str(v) for k, v in extra.items()})
    return env


@dataclass
class RunnerRun:
    """One finished runner process: exit status, both streams and the parsed stdout events."""

    returncode: int
    stdout: str
    stderr: str
    events: list

    def of(self, kind: str) -> list:
        return [e for e in self.events if e.get("event") == kind]

    @property
    def error(self):
        errors = self.of("error")
        return errors[-1] if errors else None


def run_runner(*args, env: dict | None = None, timeout: float = 300) -> RunnerRun:
    """Run `python -m runner ARGS`; every stdout line must be one JSON event (the contract)."""
    cmd = [PYTHON, "-m", "runner", *(str(a) for a in args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env or runner_env(), timeout=timeout)
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    return RunnerRun(proc.returncode, proc.stdout, proc.stderr, events)


_TONE_FORMATS = {".wav": ("WAV", "PCM_16"), ".flac": ("FLAC", "PCM_16"), ".mp3": ("MP3", "MPEG_LAYER_III"),
                 ".ogg": ("OGG", "VORBIS")}


def write_tone(path: Path, seconds: float = 1.0, rate: int = 44100, channels: int = 2) -> Path:
    """A test tone (a 220 Hz sine with a little noise) in the format the suffix names."""
    path = Path(path)
    t = np.arange(int(round(seconds * rate))) / rate
    rng = np.random.default_rng(0)
    mono = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.01 * rng.standard_normal(t.shape)
    data = np.stack([mono] * channels, axis=1).astype(np.float32)
    container, subtype = _TONE_FORMATS[path.suffix.lower()]
    sf.write(str(path), data, rate, format=container, subtype=subtype)
    return path


@pytest.fixture
def tone(tmp_path):
    """tone(name="tone.wav", seconds=1.0, rate=44100, channels=2) -> the path of a fresh test tone."""

    def _tone(name: str = "tone.wav", seconds: float = 1.0, rate: int = 44100, channels: int = 2) -> Path:
        return write_tone(tmp_path / name, seconds, rate, channels)

    return _tone


# ---- audio ---------------------------------------------------------------------------------------

def wav_bytes(seconds: float = 3.0, rate: int = 44100, channels: int = 2, subtype: str = "PCM_16") -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    tone = 0.3 * np.sin(2 * np.pi * 220 * t)
    data = np.stack([tone] * channels, axis=1).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, data, rate, format="WAV", subtype=subtype)
    return buf.getvalue()


def mp3_bytes(seconds: float = 3.0, rate: int = 44100) -> bytes:
    buf = io.BytesIO()
    t = np.arange(int(seconds * rate)) / rate
    data = np.stack([0.3 * np.sin(2 * np.pi * 330 * t)] * 2, axis=1).astype(np.float32)
    sf.write(buf, data, rate, format="MP3", subtype="MPEG_LAYER_III")
    return buf.getvalue()


def lame_mp3_bytes(tmp_path: Path, seconds: float) -> bytes:
    """An MP3 with a Xing/Info header (declares its length), as ffmpeg/LAME writes it."""
    src = tmp_path / "lame-src.wav"
    src.write_bytes(wav_bytes(seconds, 48000))
    out = tmp_path / "lame.mp3"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(src), "-b:a", "192k", str(out)], check=True)
    return out.read_bytes()


def files_under(folder: Path) -> list[str]:
    """Every file (not folder) below `folder`, as relative paths."""
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir())


# ---- checkpoints ---------------------------------------------------------------------------------

@pytest.fixture
def fake_checkpoints(tmp_path) -> Path:
    """A folder laid out like a diffusers pipeline (the files' names, placeholder contents); the fake
    runner never reads it."""
    ck = tmp_path / "checkpoints"
    for part in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler", "condition_encoder"):
        (ck / part).mkdir(parents=True)
        if part == "tokenizer":
            (ck / part / "tokenizer.json").write_text("{}")
        elif part == "scheduler":
            (ck / part / "scheduler_config.json").write_text("{}")
        else:
            (ck / part / "config.json").write_text("{}")
            (ck / part / "model.safetensors").write_bytes(b"placeholder")
    (ck / "model_index.json").write_text(json.dumps({
        "_class_name": "AceStepPipeline", **{p: ["diffusers", "X"] for p in ("transformer", "vae", "text_encoder",
                                                                             "tokenizer", "scheduler", "condition_encoder")}}))
    return ck


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """The real runner's tiny random checkpoint (built once per test session)."""
    if not (ROOT / "runner" / "cli.py").is_file():
        pytest.fail("runner/ is missing: the end-to-end tests need the real runner")
    ck = tmp_path_factory.mktemp("tiny") / "checkpoint"
    proc = subprocess.run([str(VENV_PYTHON), "-m", "runner", "make-tiny-checkpoint", str(ck)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return ck


# ---- web apps on the fake runner -------------------------------------------------------------------

def fake_runner_command(mode: str = "ok", step_s: float = 0.01, record: Path | None = None, steps_shown: int = 5,
                        once: Path | None = None, chatty_kb: int | None = None) -> str:
    parts = [sys.executable, str(FAKE_RUNNER), "--mode", mode, "--step-s", str(step_s), "--steps-shown", str(steps_shown)]
    if record is not None:
        parts += ["--record", str(record)]
    if once is not None:
        parts += ["--once", str(once)]
    if chatty_kb is not None:
        parts += ["--chatty-kb", str(chatty_kb)]
    return shlex.join(parts)


def read_records(path: Path) -> list[dict]:
    """The fake runner's job starts and process exits (its `spawn` lines left out: a runner started
    ahead holds no tokens and no GPU until a job reaches it, which is what "start" records)."""
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if "spawn" not in r and "noticed" not in r]


def alive_runners_in(record: Path):
    """For FakeGpuQueue.on_release, in-process services: the live fake runners of the session's job
    (the session id is `acestep-lego-<task>-<n>`), from the fake runner's record."""

    def alive(session_id: str) -> list[int]:
        task = session_id.split("-")[2]
        return [r["pid"] for r in read_records(record) if "start" in r and task in " ".join(r["argv"]) and pid_alive(r["pid"])]

    return alive


@pytest.fixture
def web_env(tmp_path, fake_checkpoints) -> dict:
    """The environment of a test service: its own data folder, lock file and the fake runner."""
    return {
        "ACESTEP_CHECKPOINTS": str(fake_checkpoints),
        "DATA_DIR": str(tmp_path / "data"),
        "GPU_LOCK_FILE": str(tmp_path / "gpu.lock"),
        "RUNNER_COMMAND": fake_runner_command(),
        "LEGO_STEPS": "8",
        "LEGO_MIN_STEPS": "2",
        "LEGO_MAX_STEPS": "50",
        "RUNNER_KILL_GRACE_S": "1",
        "LOG_LEVEL": "WARNING",
    }


@pytest.fixture
def make_app(web_env):
    """make_app(**overrides) -> a Flask app; every app made is shut down after the test."""
    from webapp import create_app
    from webapp.settings import Settings

    apps = []

    def _make(**overrides):
        env = {**web_env, **{k: str(v) for k, v in overrides.items()}}
        app = create_app(Settings.from_env(env))
        app.config["TESTING"] = True
        apps.append(app)
        return app

    yield _make
    for app in apps:
        app.extensions["acestep"].close(10)


@pytest.fixture
def runner_sigterm():
    """The runner's SIGTERM handler (runner/cancellation.py) in this process, for the test's length."""
    from runner import cancellation

    previous = signal.getsignal(signal.SIGTERM)
    cancellation.install()
    yield
    signal.signal(signal.SIGTERM, previous)
    cancellation.clear()


@pytest.fixture
def client(app):
    """The test client of the module's `app` fixture (each module sets its own limits)."""
    return app.test_client()


@pytest.fixture
def data_dir(app):
    return app.extensions["acestep"].settings.data_dir


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# ---- the fake gpu-queue-service --------------------------------------------------------------------

@pytest.fixture
def fake_queue():
    from tests.fakes.gpu_queue import FakeGpuQueue

    fake = FakeGpuQueue(pool=13000).start()
    yield fake
    fake.stop()


def pid_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (an exited, unreaped process is dead here)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def live_processes_with(text: str) -> list[int]:
    """Pids of running (non-zombie) processes whose command line contains `text`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        if text in cmdline and pid_alive(int(entry.name)):
            pids.append(int(entry.name))
    return pids


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def which_ffmpeg():
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg is not installed")


# ---- Redis (the RQ job queue) ----------------------------------------------------------------------

@pytest.fixture
def redis_server(tmp_path):
    """A real redis-server on a free port with its own data folder (tests/redis_server.py)."""
    from tests.redis_server import RedisServer

    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.kill()
