"""One runner process (`python -m runner serve`): started ahead, given jobs on stdin, ended for sure.

The protocol is runner/contract.py: a job is a JSON line on stdin, its events come back as JSON
lines on stdout, then `{"event": "ready"}`. The process imports torch and diffusers as soon as it
starts but touches no GPU until it gets a job, so one can be started before the job's GPU tokens
are granted and hold nothing meanwhile.

Its life is an explicit state machine (`RunnerState`): STARTING -> IDLE <-> BUSY -> ENDING ->
EXITED. It runs in a new session so its whole process group can be signalled: end of stdin
first (the runner exits by itself), SIGTERM (it stops at once, writes nothing), SIGKILL after the
grace. `end` returns only once the process is reaped, which is what lets a lease release GPU
tokens strictly after the runner exited; it never raises. The runner cannot outlive this process
either: it watches for its parent's death itself (runner/lifeline.py), and every runner is in the
journal from spawn to reap so that the next worker kills one that escaped. Runners must be
started from the one long-lived worker thread: the parent-death signal fires when the thread
that forked them exits.

stderr is human text: it goes to the current job's log file, and what the process printed before
its first job is put at the head of that file. A full disk does not stop the draining: lines that
cannot be written are dropped (a runner blocked on a full stderr pipe would hang its job).
"""
from __future__ import annotations

import enum
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

from runner.contract import ContractError, EventType, ExitStatus, decode_event, encode_job
from webapp.logs import event
from webapp.procinfo import ProcessId, identity
from webapp.runner_registry import RunnerRegistry
from webapp.settings import BY_NAME

log = logging.getLogger("acestep.webapp.runner")

# The service's own variables stay out of the runner's environment: the runner gets explicit
# values with each job, so its environment cannot become a second source of settings (and
# API_KEY stays here). The seed's two ACE-Step variables pass through: ACE-Step's own code may
# read them, and the settings module has validated them (ACESTEP_INIT_LLM can only be false).
_HIDDEN_ENV = frozenset(BY_NAME) - {"ACESTEP_CONFIG_PATH", "ACESTEP_INIT_LLM", "ACESTEP_SPEEDUPS"}
EARLY_STDERR_LINES = 200
KILL_WAIT_S = 10.0


class RunnerState(str, enum.Enum):
    STARTING = "starting"  # spawned, importing: holds no GPU
    IDLE = "idle"          # waiting for a job (a spare, or a warm runner with its model loaded)
    BUSY = "busy"          # a job was handed over
    ENDING = "ending"      # asked to exit, or being stopped
    EXITED = "exited"      # reaped


_NEXT = {RunnerState.STARTING: {RunnerState.IDLE, RunnerState.BUSY, RunnerState.ENDING, RunnerState.EXITED},
         RunnerState.IDLE: {RunnerState.BUSY, RunnerState.ENDING, RunnerState.EXITED},
         RunnerState.BUSY: {RunnerState.IDLE, RunnerState.ENDING, RunnerState.EXITED},
         RunnerState.ENDING: {RunnerState.EXITED}, RunnerState.EXITED: set()}


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
        """The job's status in the runner's exit-status terms (contract.ExitStatus); the process's own
        status where it died without answering."""
        if self.result is not None:
            return ExitStatus.OK
        if self.error is not None and isinstance(self.error.get("exit_status"), int):
            return self.error["exit_status"]
        return self.exit_code


class RunnerProcess:
    def __init__(self, argv: list[str], cwd: Path, registry: RunnerRegistry | None = None):
        self.argv = argv
        self.cwd = cwd
        self.registry = registry
        self.proc: subprocess.Popen | None = None
        self.ident: ProcessId | None = None
        self.state = RunnerState.STARTING
        self.spawned_at = 0.0
        self.exited_at: float | None = None
        self.loaded = False  # the last `ready` said a model is loaded
        self._ready = threading.Event()
        self._lock = threading.Lock()
        self._state_lock = threading.Lock()
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
        self.log_write_failed: str | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _move(self, new: RunnerState) -> None:
        with self._state_lock:
            if self.state is new:
                return
            if new not in _NEXT[self.state]:
                raise RuntimeError(f"runner {self.pid}: {self.state.value} -> {new.value} is not a legal transition")
            self.state = new

    def start(self) -> int:
        env = {k: v for k, v in os.environ.items() if k not in _HIDDEN_ENV}
        env["PYTHONUNBUFFERED"] = "1"
        self.spawned_at = time.time()
        self.proc = subprocess.Popen(
            self.argv, cwd=str(self.cwd), env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, start_new_session=True, close_fds=True,
        )
        self.ident = identity(self.proc.pid) or ProcessId(self.proc.pid, 0)
        for target, name in ((self._read_events, "events"), (self._pump_stderr, "stderr")):
            thread = threading.Thread(target=target, name=f"runner-{name}-{self.proc.pid}", daemon=True)
            thread.start()
            self._threads.append(thread)
        if self.registry is not None:
            try:
                self.registry.spawned(self)
            except OSError:
                self.end(0.5)  # a runner the journal cannot name could outlive a crash unnoticed
                raise
        return self.proc.pid

    # ---- the two reader threads --------------------------------------------------------------

    def _read_events(self) -> None:
        assert self.proc and self.proc.stdout
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").strip()
            if not line:
                continue
            try:
                ev = decode_event(line)
            except ContractError:
                if len(self._problems) < 5:
                    self._problems.append(f"non-event line on stdout: {line[:120]}")
                continue
            self._dispatch(ev)
        self.proc.stdout.close()
        self._ready.set()
        self._job_done.set()  # end of output: whatever job is waiting has its answer (none)

    def _dispatch(self, ev: dict) -> None:
        kind = ev["event"]
        if kind == EventType.READY.value:
            self.loaded = bool(ev.get("loaded"))
            self._ready.set()
            if self._answer is not None:
                self._job_done.set()
            return
        if self._on_event is None:
            return  # nothing but `ready` is expected between jobs
        if self._first_event_s is None:
            self._first_event_s = time.monotonic() - self._job_sent_mono
        if kind == EventType.RESULT.value:
            self._job_result = self._answer = ev
        elif kind == EventType.ERROR.value:
            self._job_error = self._answer = ev
        try:
            self._on_event(ev)
        except Exception:  # a status update must never kill the reader
            log.exception("event handler failed")

    def _pump_stderr(self) -> None:
        assert self.proc and self.proc.stderr
        for raw in self.proc.stderr:
            with self._lock:
                if self._sink is None:
                    self._early_stderr.append(raw)
                    continue
                try:
                    self._sink.write(raw)
                    self._sink.flush()
                except (OSError, ValueError) as exc:
                    self._drop_sink(exc)
        self.proc.stderr.close()

    def _drop_sink(self, exc: BaseException) -> None:
        """The job's log cannot be written (a full disk): stop writing it, keep draining. Lock held."""
        if self.log_write_failed is None:
            self.log_write_failed = str(exc)
            event(log, "runner_log_not_written", level=logging.ERROR, pid=self.pid, error=str(exc))
        sink, self._sink = self._sink, None
        try:
            sink.close()
        except (OSError, ValueError):
            pass
        self._sink = _Discard()

    # ---- jobs --------------------------------------------------------------------------------

    def run_job(self, args: dict, on_event: Callable[[dict], None], stderr_path: Path, deadline: float,
                cancel: threading.Event, grace_s: float) -> RunnerOutcome:
        """Hand one job over and wait for its answer, a cancel, the deadline or the process's end.
        Its stderr goes on into `stderr_path` until `end_job_log`."""
        assert self.proc is not None
        line = encode_job(args)  # ContractError here is a bug in the service, before anything is sent
        self._move(RunnerState.BUSY)
        with self._lock:
            try:
                self._sink = open(stderr_path, "ab")
                while self._early_stderr:
                    self._sink.write(self._early_stderr.popleft())
            except OSError as exc:
                if self._sink is None:
                    self._sink = _Discard()
                else:
                    self._drop_sink(exc)
        self._answer = self._job_result = self._job_error = self._first_event_s = None
        self._problems = []
        self._job_done.clear()
        self._on_event = on_event
        started_at, self._job_sent_mono = time.time(), time.monotonic()
        timed_out = cancelled = False
        try:
            self.proc.stdin.write(line)
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
        elif self.state is RunnerState.BUSY:
            self._move(RunnerState.IDLE)
        self._on_event = None
        return RunnerOutcome(pid=self.proc.pid, started_at=started_at, finished_at=time.time(),
                             exit_code=self.proc.returncode, result=self._job_result, error=self._job_error,
                             timed_out=timed_out, cancelled=cancelled, first_event_s=self._first_event_s,
                             protocol_problems=list(self._problems))

    def end_job_log(self) -> None:
        """Stop writing stderr to the job's file: after the process is gone (all its lines are in), or
        when it stays warm for the next job. A failure to close (a full disk) is logged, not raised."""
        with self._lock:
            sink, self._sink = self._sink, None
            if sink is not None:
                try:
                    sink.close()
                except OSError as exc:
                    self.log_write_failed = self.log_write_failed or str(exc)
                    event(log, "runner_log_not_written", level=logging.ERROR, pid=self.pid, error=str(exc))

    # ---- ending it -------------------------------------------------------------------------------

    def end(self, grace_s: float) -> bool:
        """Make sure it is gone: end of input, SIGTERM after the grace, SIGKILL after another. Returns
        True once reaped (False only for a process the kernel cannot kill). Never raises."""
        try:
            self.close(grace_s)
        except BaseException:  # noqa: BLE001 - whatever happened, the process must still go
            log.exception("ending runner %s", self.pid)
            self._signal_group(signal.SIGKILL)
            try:
                self.proc.wait(timeout=KILL_WAIT_S)
                self.reap()
            except BaseException:  # noqa: BLE001
                log.exception("reaping runner %s", self.pid)
        return self.proc is None or self.proc.returncode is not None

    def close(self, grace_s: float) -> float:
        """Ask it to exit (stdin closed), stop it after the grace; returns once reaped, with the time."""
        if self.proc is None:
            return time.time()
        if self.alive():
            self._move(RunnerState.ENDING)
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
            self._move(RunnerState.ENDING)
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                event(log, "runner_sigkill", level=logging.WARNING, pid=self.proc.pid, grace_s=grace_s)
                self._signal_group(signal.SIGKILL)
                self.proc.wait(timeout=KILL_WAIT_S)
        self.reap()

    def reap(self) -> float:
        """Wait for the process, end what it left in its group, drain its output; the time it was gone."""
        assert self.proc is not None
        if self.exited_at is not None:
            return self.exited_at
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
        self.end_job_log()  # every line it wrote is in: the log can close
        self._move(RunnerState.EXITED)
        self.exited_at = exited_at
        if self.registry is not None:
            self.registry.reaped(self)
        return exited_at

    def wait_ready(self, timeout: float) -> bool:
        return self._ready.wait(timeout)

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


class _Discard:
    """Where a job's stderr goes once its file cannot be written."""

    def write(self, _data: bytes) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass
