"""SIGTERM ends a runner with exit 5 and no file: during the load, through library code's
`except Exception`, and while foreign threads the interpreter cannot stop are still running."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from conftest import PYTHON, REPO, runner_env, write_tone
from runner import cancellation
from runner.events import Cancelled

# The real CLI, with an engine whose generation runs the way ACE-Step's official code runs it: in
# worker threads doing native (torch) work while the main thread waits. One worker is a daemon
# inside torch; one is not a daemon, so an interpreter that exits normally waits for it forever.
# (The main thread waits on an Event: a join() interrupted by a signal marks its thread as stopped,
# a CPython quirk, bpo-45274, that would hide the problem from this test.)
FOREIGN_THREADS_RUNNER = r'''
import sys, threading, time
import torch
import runner.engines as engines

class ForeignThreadsEngine:
    name = "foreign-threads"
    def load(self, checkpoints, options):
        pass
    def generate(self, job, on_stage, on_step):
        on_stage("encoding")
        on_stage("generating")
        def diffuse():
            x, step = torch.randn(128, 128), 0
            while True:  # never ends by itself
                x = torch.tanh(x @ x)
                step += 1
                if step <= job.steps:
                    on_step(step, job.steps)
                time.sleep(0.02)
        threading.Thread(target=diffuse, name="daemon-diffusion", daemon=True).start()
        threading.Thread(target=diffuse, name="service-generate", daemon=False).start()
        threading.Event().wait()  # for a result that never comes
    def peak_vram_bytes(self):
        return None

engines.create = lambda name: ForeignThreadsEngine()
from runner.cli import main
sys.exit(main(sys.argv[1:]))
'''


def start(args: list, script: str | None = None) -> subprocess.Popen:
    command = [PYTHON, "-c", script, *map(str, args)] if script else [PYTHON, "-m", "runner", *map(str, args)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=runner_env(), cwd=REPO)


def until(proc: subprocess.Popen, predicate) -> list:
    events = []
    for line in proc.stdout:
        events.append(json.loads(line))
        if predicate(events[-1]):
            return events
    raise AssertionError(f"the runner ended before the moment to cancel: {events}\n{proc.stderr.read()[-2000:]}")


def cancel(proc: subprocess.Popen, events: list) -> tuple[int, float, list, str]:
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError("the runner did not exit within 20 s of SIGTERM")
    events += [json.loads(line) for line in proc.stdout]
    return code, time.monotonic() - sent, events, proc.stderr.read()


def test_exit_5_and_no_file_while_foreign_threads_still_run(tmp_path, tiny_checkpoint):
    src = write_tone(tmp_path / "s.wav", 1.0)
    out = tmp_path / "out"
    out.mkdir()
    proc = start(["lego", "--source", src, "--track", "drums", "--bpm", "96", "--checkpoints", tiny_checkpoint,
                  "--out", out, "--steps", "200"], script=FOREIGN_THREADS_RUNNER)
    events = until(proc, lambda e: e["event"] == "progress" and e["stage"] == "generating" and e["step"] >= 3)
    code, took, events, stderr = cancel(proc, events)
    assert code == 5, stderr[-2000:]
    assert took < 10
    assert events[-1]["event"] == "error" and events[-1]["code"] == "cancelled" and events[-1]["exit_status"] == 5
    assert list(out.iterdir()) == []
    assert "terminate called" not in stderr and "Traceback" not in stderr


def test_sigterm_during_the_load_exits_5(tmp_path, tiny_checkpoint):
    src = write_tone(tmp_path / "s.wav", 1.0)
    out = tmp_path / "out"
    out.mkdir()
    proc = start(["lego", "--source", src, "--track", "drums", "--bpm", "96", "--checkpoints", tiny_checkpoint,
                  "--out", out, "--steps", "50"])
    events = until(proc, lambda e: e.get("stage") == "loading")
    code, _, events, stderr = cancel(proc, events)
    assert code == 5, stderr[-2000:]
    assert events[-1]["code"] == "cancelled" and not any(e["event"] == "result" for e in events)
    assert list(out.iterdir()) == []


def official_style_load(attempts: list) -> tuple[str, bool]:
    """The official loader's shape in small (init_service_orchestrator.initialize_service around
    init_service_loader._load_main_model_from_checkpoint): an attention-backend retry loop that
    catches Exception, inside an initialize_service that turns any Exception into a failed status."""
    try:
        for backend in ("sdpa", "eager"):
            try:
                attempts.append(backend)
                if backend == "sdpa":
                    os.kill(os.getpid(), signal.SIGTERM)  # the job is cancelled while this backend loads
                return f"loaded with {backend}", True
            except Exception as exc:  # noqa: BLE001 - the official loader's retry
                attempts.append(f"failed: {exc!r}")
        return "no backend", False
    except Exception as exc:  # noqa: BLE001 - the official initialize_service
        return f"Error initializing model: {exc}", False


def test_a_cancel_during_the_load_is_not_swallowed_by_except_exception_retries(runner_sigterm):
    attempts = []
    with pytest.raises(Cancelled):
        official_style_load(attempts)
    assert attempts == ["sdpa"]  # not retried with another backend, not turned into a failed status
    assert cancellation.requested()
