"""One runner process (`python -m runner serve`): started ahead, given jobs on stdin, stopped for sure.

The runner's one protocol (DESIGN.md section 4, issue 4): a job is a JSON line on stdin, its events
come back as JSON lines on stdout, then `{"event": "ready"}`. The process imports torch and
diffusers as soon as it starts but touches no GPU until it gets a job, so one can be started
before the job's GPU tokens are granted and hold nothing meanwhile: the import time (most of a
cold request) is paid while the previous job runs or the service idles.

It runs in a new session (`start_new_session=True`) so a cancel or timeout can signal the whole
group: SIGTERM first (the runner stops at once and writes nothing), SIGKILL after a grace.
`run_job` returns when the job has answered or the process has been reaped; `close` returns only
after the process has been reaped, which is what lets the caller release GPU tokens strictly
after the runner exited. stderr is human text: it goes to the current job's log file, and what
the process printed before its first job is put at the head of that file.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from webapp.logs import event
from webapp.settings import BY_NAME

log = logging.getLogger("acestep.webapp.runner")

# The service's own variables stay out of the runner's environment: the runner gets explicit
# values with each job, so its environment cannot become a second source of settings (and
# API_KEY stays here). The seed's two ACE-Step variables pass through: ACE-Step's own code may
# read them, and the settings module has validated them (ACESTEP_INIT_LLM can only be false).
_HIDDEN_ENV = frozenset(BY_NAME) - {"ACESTEP_CONFIG_PATH", "ACESTEP_INIT_LLM"}
EARLY_STDERR_LINES = 200


@dataclass
class RunnerOutcome:
    """How one job ended on the runner's side."""

    pid: int
    started_at: float  # when the job was handed over
    finished_at: float
    exit_code: int | None = None  # the process's status, where it exited (negative: killed by that signal)
    result: dict | None = None
    error: dict | None = None
    timed_out: bool = False
    cancelled: bool = False
    first_event_s: float | None = None
    protocol_problems: list[str] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return self.finished_at - self.started_at

    @property
    def status(self) -> int | None:
        """The job's status in the runner's exit-status terms: 0 done, 2 bad input, 3 checkpoints,
        4 generation, 5 cancelled; the process's own status where it died without answering."""
        if self.result is not None:
            return 0
        if self.error is not None and isinstance(self.error.get("exit_status"), int):
            return self.error["exit_status"]
        return self.exit_code


class RunnerProcess:
    def __init__(self, argv: list[str], cwd: Path):
        self.argv = argv
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None
        self.spawned_at = 0.0
        self.loaded = False  # the last `ready` said a model is loaded
        self._ready = threading.Event()
        self._lock = threading.Lock()
        self._on_event: Callable[[dict], None] | None = None
        self._sink = None  # the current job's stderr file
        self._early_stderr: deque[bytes] = deque(maxlen=EARLY_STDERR_LINES)
        self._job_done = threading.Event()
        self._answer: dict | None = None
        self._job_result: dict | None = None
        self._job_error: dict | None = None
        self._first_event_s: float | None = None
        self._job_sent_mono = 0.0
        self._problems: list[str] = []
        self._threads: list[threading.Thread] = []

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> int:
        env = {k: v for k, v in os.environ.items() if k not in _HIDDEN_ENV}
        env["PYTHONUNBUFFERED"] = "1"
        self.spawned_at = time.time()
        self.proc = subprocess.Popen(
            self.argv, cwd=str(self.cwd), env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, start_new_session=True, close_fds=True,
        )
        for target, name in ((self._read_events, "events"), (self._pump_stderr, "stderr")):
            thread = threading.Thread(target=target, name=f"runner-{name}-{self.proc.pid}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self.proc.pid

    # ---- the two reader threads --------------------------------------------------------------

    def _read_events(self) -> None:
        assert self.proc and self.proc.stdout
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").strip()
            if not line:
                continue
            try:
                ev = json.loads(line)
                if not isinstance(ev, dict) or "event" not in ev:
                    raise ValueError("not an event object")
            except ValueError:
                if len(self._problems) < 5:
                    self._problems.append(f"non-event line on stdout: {line[:120]}")
                continue
            self._dispatch(ev)
        self.proc.stdout.close()
        self._ready.set()
        self._job_done.set()  # end of output: whatever job is waiting has its answer (none)

    def _dispatch(self, ev: dict) -> None:
        kind = ev["event"]
        if kind == "ready":
            self.loaded = bool(ev.get("loaded"))
            self._ready.set()
            if self._answer is not None:
                self._job_done.set()
            return
        if self._on_event is None:
            return  # nothing but `ready` is expected between jobs
        if self._first_event_s is None:
            self._first_event_s = time.monotonic() - self._job_sent_mono
        if kind == "result":
            self._job_result = self._answer = ev
        elif kind == "error":
            self._job_error = self._answer = ev
        try:
            self._on_event(ev)
        except Exception:  # a status update must never kill the reader
            log.exception("event handler failed")

    def _pump_stderr(self) -> None:
        assert self.proc and self.proc.stderr
        for raw in self.proc.stderr:
            with self._lock:
                if self._sink is not None:
                    self._sink.write(raw)
                    self._sink.flush()
                else:
                    self._early_stderr.append(raw)
        self.proc.stderr.close()

    # ---- jobs --------------------------------------------------------------------------------

    def run_job(self, args: dict, on_event: Callable[[dict], None], stderr_path: Path, deadline: float,
                cancel: threading.Event, grace_s: float) -> RunnerOutcome:
        """Hand one job over and wait for its answer, a cancel, the deadline or the process's end.
        Its stderr goes on into `stderr_path` until `end_job_log`."""
        assert self.proc is not None
        with self._lock:
            self._sink = open(stderr_path, "ab")
            while self._early_stderr:
                self._sink.write(self._early_stderr.popleft())
        self._answer = self._job_result = self._job_error = self._first_event_s = None
        self._problems = []
        self._job_done.clear()
        self._on_event = on_event
        started_at, self._job_sent_mono = time.time(), time.monotonic()
        timed_out = cancelled = False
        try:
            self.proc.stdin.write((json.dumps({"command": "lego", "args": args}) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            self._job_done.set()  # it died before the job: the outcome says so
        while not self._job_done.wait(0.1):
            if cancel.is_set():
                cancelled = True
                self.stop(grace_s)
                break
            if time.monotonic() > deadline:
                timed_out = True
                self.stop(grace_s)
                break
            if not self.alive():
                break
        if self._answer is None and not (cancelled or timed_out):
            # Its output ended without an answer: it is exiting (or wedged); its status tells why.
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.stop(grace_s)
        if not self.alive():
            self.reap()
        self._on_event = None
        return RunnerOutcome(pid=self.proc.pid, started_at=started_at, finished_at=time.time(),
                             exit_code=self.proc.returncode, result=self._job_result, error=self._job_error,
                             timed_out=timed_out, cancelled=cancelled, first_event_s=self._first_event_s,
                             protocol_problems=list(self._problems))

    def end_job_log(self) -> None:
        """Stop writing stderr to the job's file: after the process is gone (all its lines are in), or
        when it stays warm for the next job."""
        with self._lock:
            if self._sink is not None:
                self._sink.close()
                self._sink = None

    def close(self, grace_s: float) -> float:
        """Ask it to exit (stdin closed), stop it after the grace; returns once reaped, with the time."""
        if self.proc is None:
            return time.time()
        if self.alive():
            try:
                self.proc.stdin.close()  # end of input: the runner frees the GPU and exits
            except OSError:
                pass
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.stop(grace_s)
        return self.reap()

    def stop(self, grace_s: float) -> None:
        """SIGTERM the process group, SIGKILL it after grace_s; returns once the runner is reaped."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                event(log, "runner_sigkill", level=logging.WARNING, pid=self.proc.pid, grace_s=grace_s)
                self._signal_group(signal.SIGKILL)
        self.reap()

    def reap(self) -> float:
        """Wait for the process, end what it left in its group, drain its output; the time it was gone."""
        assert self.proc is not None
        self.proc.wait()
        exited_at = time.time()
        self._signal_group(signal.SIGKILL)  # children left behind would keep the GPU
        for thread in self._threads:
            thread.join(timeout=5)
        if self.proc.stdin and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        return exited_at

    def wait_ready(self, timeout: float) -> bool:
        return self._ready.wait(timeout)

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
