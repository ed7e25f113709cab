"""The embedded job system: a bounded in-process queue, one generation at a time.

One worker thread takes jobs in order. For each: wait for GPU tokens (showing the position),
start the runner, turn its events into monotonic progress, stop it on cancel or JOB_TIMEOUT_S,
and release the tokens only after the runner process has been reaped, on every path. Finished
jobs keep their result for RESULT_TTL_S, then a janitor deletes them with their files.

Job state lives in this process's memory, which is why the service runs one gunicorn worker.
Listeners (`add_listener`) see every transition; the log is one of them, metrics may be another.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from webapp.errors import ApiError
from webapp.gpu_tokens import Cancelled as TokenWaitCancelled
from webapp.gpu_tokens import Lease
from webapp.lego_params import LegoParams
from webapp.logs import event
from webapp.runner_process import RunnerOutcome, RunnerProcess
from webapp.uploads import JobFiles

log = logging.getLogger("acestep.webapp.jobs")

QUEUED, RUNNING, COMPLETED, FAILED, CANCELLED = "queued", "running", "completed", "failed", "cancelled"
FINISHED = (COMPLETED, FAILED, CANCELLED)

# Progress (0-100) the plugin sees: tokens granted, then the runner's stages; steps fill 15..90.
STAGE_PROGRESS = {"starting": 2, "loading": 5, "encoding": 10, "generating": 15, "decoding": 92, "writing": 96}
STEPS_FROM, STEPS_TO = 15, 90
DEFAULT_JOB_SECONDS = 60.0
TAIL_BYTES = 4000

Listener = Callable[[str, "Job", dict], None]


@dataclass
class Job:
    id: str
    params: LegoParams
    files: JobFiles
    duration_s: float
    sample_rate: int
    protocol: str  # "multipart" | "json"
    created_at: float = field(default_factory=time.time)
    state: str = QUEUED
    stage: str | None = None
    progress: int = 0
    step: int | None = None
    total_steps: int | None = None
    gpu_wait: bool = False
    gpu_position: int | None = None
    gpu_message: str | None = None
    queued_mono: float = field(default_factory=time.monotonic)
    run_started_mono: float | None = None
    finished_at: float | None = None
    outputs: list[Path] = field(default_factory=list)
    result: dict = field(default_factory=dict)
    error: ApiError | None = None
    runner_pid: int | None = None
    runner_exit_code: int | None = None
    runner_started_at: float | None = None
    runner_exited_at: float | None = None
    tokens_released_at: float | None = None
    cancel_reason: str | None = None
    timings: dict = field(default_factory=dict)
    cancel: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def session_id(self) -> str:
        """The gpu-queue-service session: one per job, so one acquire and one release per job."""
        return f"acestep-lego-{self.id}"

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    def raise_progress(self, value: float) -> None:
        with self.lock:
            self.progress = max(self.progress, min(100, int(value)))

    def on_runner_event(self, ev: dict) -> None:
        kind = ev.get("event")
        if kind == "stage" and ev.get("stage") in STAGE_PROGRESS:
            self.stage = ev["stage"]
            self.raise_progress(STAGE_PROGRESS[self.stage])
        elif kind == "progress":
            step, total = ev.get("step"), ev.get("total")
            if isinstance(step, int) and isinstance(total, int) and total > 0:
                self.step, self.total_steps = step, total
                self.raise_progress(STEPS_FROM + (STEPS_TO - STEPS_FROM) * min(step, total) / total)


class JobManager:
    def __init__(self, settings, tokens, runner_argv: list[str], runner_cwd: Path):
        self.settings = settings
        self.tokens = tokens
        self.runner_argv = runner_argv  # the command up to (not including) "serve"
        self.runner_cwd = runner_cwd
        self._jobs: dict[str, Job] = {}
        self._queue: deque[Job] = deque()
        self._running: Job | None = None
        self._runner: RunnerProcess | None = None
        self._cond = threading.Condition()
        self._closing = False
        self._listeners: list[Listener] = []
        self._avg_job_s = DEFAULT_JOB_SECONDS
        self._stop_janitor = threading.Event()
        self._tokens_held = 0
        self._spare: RunnerProcess | None = None  # started ahead: imports done, no GPU, no tokens
        self._warm: tuple[RunnerProcess, Lease, Job] | None = None  # a loaded model kept for KEEP_WARM_S, with its tokens
        self._warm_since = 0.0
        self._unload_requested = False
        self._worker = threading.Thread(target=self._work_loop, name="lego-jobs", daemon=True)
        self._janitor = threading.Thread(target=self._janitor_loop, name="lego-janitor", daemon=True)

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._worker.start()
        self._janitor.start()
        with self._cond:
            self._cond.notify_all()  # the worker starts the first spare runner

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop taking jobs, fail the waiting ones, cancel the running one; its tokens are released
        by the worker after the runner exits. Idempotent."""
        with self._cond:
            already = self._closing
            self._closing = True
            waiting = list(self._queue)
            self._queue.clear()
            running = self._running
            self._cond.notify_all()
        if not already:
            event(log, "jobs_shutdown", waiting=len(waiting), running=running.id if running else None)
        for job in waiting:
            job.cancel_reason = "shutdown"
            job.cancel.set()
            self._finish(job, FAILED, ApiError("service_shutting_down"))
        if running is not None and not running.finished:
            running.cancel_reason = "shutdown"
            running.cancel.set()
        if self._worker.is_alive() and threading.current_thread() is not self._worker:
            self._worker.join(timeout_s)
        self._stop_janitor.set()

    # ---- the public operations ---------------------------------------------------------------

    def has_room(self) -> bool:
        """One job may run and MAX_QUEUED_JOBS may wait; checked before an upload is probed."""
        with self._cond:
            busy = len(self._queue) + (1 if self._running is not None else 0)
            return not self._closing and busy < self.settings.max_queued_jobs + 1

    def raise_queue_full(self) -> None:
        if self._closing:
            raise ApiError("service_shutting_down")
        retry = self.retry_after_s()
        raise ApiError("queue_full", f"{len(self._queue)} jobs are already waiting; retry in about {retry} s.",
                       headers={"Retry-After": str(retry)})

    def submit(self, job: Job) -> None:
        with self._cond:
            busy = len(self._queue) + (1 if self._running is not None else 0)
            if self._closing or busy >= self.settings.max_queued_jobs + 1:
                self.raise_queue_full()
            self._jobs[job.id] = job
            self._queue.append(job)
            job.queued_mono = time.monotonic()
            self._cond.notify_all()
        self._notify("queued", job, track=job.params.track, duration_s=round(job.duration_s, 3),
                     protocol=job.protocol, position=self.position(job))

    def get(self, task_id: str) -> Job | None:
        return self._jobs.get(task_id)

    def cancel(self, task_id: str, reason: str) -> Job | None:
        """Cancel a waiting or running job; a running one is stopped by the worker."""
        with self._cond:
            job = self._jobs.get(task_id)
            if job is None or job.finished:
                return job
            job.cancel_reason = reason
            job.cancel.set()
            was_queued = job in self._queue
            if was_queued:
                self._queue.remove(job)
        if was_queued:
            self._finish(job, CANCELLED, ApiError("job_cancelled", f"The job was cancelled ({reason}) before it started."))
        return job

    def forget(self, task_id: str) -> bool:
        """Delete a finished job's files and record now (DELETE on a finished job)."""
        with self._cond:
            job = self._jobs.get(task_id)
            if job is None or not job.finished:
                return False
            del self._jobs[task_id]
        job.files.discard()
        self._notify("deleted", job)
        return True

    def position(self, job: Job) -> int:
        """1 = next to run. A job dequeued but waiting for GPU tokens reports the GPU queue's position."""
        with self._cond:
            try:
                return self._queue.index(job) + 1
            except ValueError:
                return (job.gpu_position or 1) if job.gpu_wait else 0

    def estimated_wait_s(self, job: Job) -> int:
        pos = self.position(job)
        running = self._running
        remaining = 0.0
        if running is not None and running is not job and running.run_started_mono is not None:
            remaining = max(5.0, self._avg_job_s - (time.monotonic() - running.run_started_mono))
        elif running is not None and running is not job:
            remaining = self._avg_job_s
        ahead = max(pos - 1, 0)
        return int(math.ceil(remaining + ahead * self._avg_job_s))

    def estimated_remaining_s(self, job: Job) -> int:
        if job.run_started_mono is None:
            return int(self._avg_job_s)
        return int(max(1.0, self._avg_job_s - (time.monotonic() - job.run_started_mono)))

    def retry_after_s(self) -> int:
        return int(min(3600, max(1, math.ceil(self._avg_job_s * (len(self._queue) + 1)))))

    def tokens_held(self) -> int:
        """GPU tokens this service holds right now (0 while idle)."""
        return self._tokens_held

    def snapshot(self) -> dict:
        with self._cond:
            running = self._running
            return {
                "queued": len(self._queue),
                "running": 1 if running is not None else 0,
                "max_queued": self.settings.max_queued_jobs,
                "kept": sum(1 for j in self._jobs.values() if j.finished),
                "accepting": not self._closing,
                "runner_pid": self._runner.pid if self._runner is not None and self._runner.proc and self._runner.proc.poll() is None else None,
                "average_job_s": round(self._avg_job_s, 1),
                "warm": self.warm_state(),
                "tokens_held": self._tokens_held,
            }

    # ---- the worker --------------------------------------------------------------------------

    def _work_loop(self) -> None:
        """The one thread that owns runner processes and GPU tokens."""
        try:
            while True:
                with self._cond:
                    while not self._queue and not self._closing:
                        if self._idle_duty():
                            continue
                        self._cond.wait(self._idle_wait_s())
                    if not self._queue:
                        return
                    job = self._queue.popleft()
                    self._running = job
                try:
                    self._run(job)
                except Exception:  # a bug here must not stop the queue
                    log.exception("job %s failed inside the job manager", job.id)
                    if not job.finished:
                        self._finish(job, FAILED, ApiError("internal_error"))
                finally:
                    with self._cond:
                        self._running = None
        finally:
            self._unload("shutdown")
            if self._spare is not None:
                self._spare.close(self.settings.runner_kill_grace_s)
                self._spare = None

    def _idle_wait_s(self) -> float | None:
        """How long the idle worker may sleep: until the warm model's time is up, else until woken."""
        if self._warm is None:
            return None if self._spare is not None or not self.settings.runner_prestart else 1.0
        return max(0.05, min(1.0, self._warm_since + self.settings.keep_warm_s - time.monotonic()))

    def _idle_duty(self) -> bool:
        """Between jobs (called with the lock held): end an expired or unwanted warm runner, keep a
        spare ready. Returns True when it let the lock go, so the caller looks at the queue again."""
        if self._warm is not None:
            runner = self._warm[0]
            expired = time.monotonic() - self._warm_since >= self.settings.keep_warm_s
            if expired or self._unload_requested or not runner.alive():
                reason = "request" if self._unload_requested else ("idle" if runner.alive() else "exited")
                self._cond.release()
                try:
                    self._unload(reason)
                finally:
                    self._cond.acquire()
                return True
        self._unload_requested = False
        if self.settings.runner_prestart and self._warm is None and (self._spare is None or not self._spare.alive()):
            if self._spare is not None:
                event(log, "spare_runner_died", level=logging.WARNING, pid=self._spare.pid, exit_code=self._spare.proc.returncode)
                self._spare.reap()
            self._cond.release()
            try:
                self._spare = self._start_runner()
            finally:
                self._cond.acquire()
            return True  # the lock was let go: look at the queue and the closing flag again
        return False

    def _start_runner(self) -> RunnerProcess | None:
        runner = RunnerProcess([*self.runner_argv, "serve", "--idle-timeout", f"{self._runner_idle_s():g}"], self.runner_cwd)
        try:
            runner.start()
        except OSError as exc:
            event(log, "runner_start_failed", level=logging.ERROR, error=str(exc))
            return None
        event(log, "runner_spawned", pid=runner.pid)
        return runner

    def _runner_idle_s(self) -> float:
        """The runner's own idle limit: 0 (exit after one job) unless keep-warm is on. With it on, the
        service ends the warm runner itself; the runner's limit is only a backstop."""
        return 0.0 if self.settings.keep_warm_s <= 0 else self.settings.keep_warm_s + 30.0

    def _unload(self, reason: str) -> bool:
        """End the warm runner, wait until it is gone, then release its tokens. Worker thread only."""
        warm, self._warm = self._warm, None
        if warm is None:
            return False
        runner, lease, last_job = warm
        exited_at = runner.close(self.settings.runner_kill_grace_s)
        self._notify("runner_exited", last_job, pid=runner.pid, exit_code=runner.proc.returncode, exited_at=exited_at)
        lease.release("completed")
        self._notify("tokens_released", last_job, tokens=self._tokens_held, session_id=lease.session_id, reason=reason)
        self._tokens_held = 0
        event(log, "runner_unloaded", pid=runner.pid, reason=reason, exit_code=runner.proc.returncode,
              exited_at=exited_at, kept_s=round(time.monotonic() - self._warm_since, 3))
        return True

    def request_unload(self) -> bool:
        """POST /unload: the warm model goes now if idle, else right after the running job."""
        with self._cond:
            warm = self._warm is not None
            self._unload_requested = True
            self._cond.notify_all()
        return warm

    def warm_state(self) -> dict:
        warm = self._warm
        if warm is None:
            spare = self._spare
            return {"loaded": False, "spare_runner": spare is not None and spare.alive(),
                    "spare_ready": spare is not None and spare.alive() and spare.wait_ready(0)}
        left = self._warm_since + self.settings.keep_warm_s - time.monotonic()
        return {"loaded": True, "pid": warm[0].pid, "unloads_in_s": round(max(0.0, left), 1)}

    def _run(self, job: Job) -> None:
        job.timings["queue_wait_s"] = time.monotonic() - job.queued_mono
        if job.cancel.is_set():
            return self._finish_cancelled(job)
        warm, self._warm = self._warm, None
        if warm is not None and not warm[0].alive():
            self._warm = warm
            self._unload("exited")
            warm = None
        if warm is not None:
            runner, lease, _ = warm  # the loaded model and its tokens, kept from the last job
            job.timings["token_wait_s"] = 0.0
            self._notify("tokens_reused", job, session_id=lease.session_id)
        else:
            lease = self._acquire(job)
            if lease is None:
                return
            runner, self._spare = self._spare, None
            if runner is None or not runner.alive():
                if runner is not None:
                    runner.reap()
                runner = self._start_runner()
        outcome: RunnerOutcome | None = None
        keep = False
        try:
            if runner is not None and not job.cancel.is_set():
                with job.lock:
                    job.state, job.stage = RUNNING, "starting"
                job.raise_progress(STAGE_PROGRESS["starting"])
                job.run_started_mono = time.monotonic()
                job.runner_pid = runner.pid
                job.runner_started_at = time.time()
                self._runner = runner
                self._notify("runner_started", job, pid=runner.pid, started_at=job.runner_started_at,
                             reused=warm is not None, spawned_s_ago=round(time.time() - runner.spawned_at, 3))
                outcome = runner.run_job(self._job_args(job), job.on_runner_event, job.files.stderr_log,
                                         time.monotonic() + self.settings.job_timeout_s, job.cancel,
                                         self.settings.runner_kill_grace_s)
            ok = outcome is not None and outcome.status == 0 and outcome.result is not None
            keep = (ok and self.settings.keep_warm_s > 0 and runner.alive() and not self._closing
                    and not self._unload_requested)
            if ok:
                # The stem is complete on disk: answer now. Ending the runner (a second or more with a
                # model on the GPU) and releasing the tokens after it still happen before the next job.
                self._finish_from_outcome(job, outcome)
        finally:
            self._runner = None
            if keep:
                runner.end_job_log()
                self._warm, self._warm_since = (runner, lease, job), time.monotonic()
            else:
                if runner is not None:
                    job.runner_exited_at = runner.close(self.settings.runner_kill_grace_s)  # never release while it runs
                    runner.end_job_log()
                    job.runner_exit_code = runner.proc.returncode
                    self._notify("runner_exited", job, pid=runner.pid, exit_code=runner.proc.returncode,
                                 exited_at=job.runner_exited_at)
                lease.release("completed" if outcome is not None and outcome.status == 0 else "failed")
                job.tokens_released_at = lease.released_at
                self._notify("tokens_released", job, tokens=self._tokens_held)
                self._tokens_held = 0
                self._unload_requested = False
        if outcome is None:
            if runner is None:
                return self._finish(job, FAILED, ApiError("runner_crashed", "The generator process could not be started; "
                                                                            "operators: check RUNNER_COMMAND."))
            return self._finish_cancelled(job)
        if not job.finished:
            self._finish_from_outcome(job, outcome)

    def _acquire(self, job: Job) -> Lease | None:
        """Wait for GPU tokens, showing the position; None when the job ended while waiting."""
        job.gpu_wait = True
        t0 = time.monotonic()

        def on_wait(position, message):
            job.gpu_position, job.gpu_message = position, message

        try:
            lease = self.tokens.acquire(job.session_id, job.cancel, on_wait)
        except TokenWaitCancelled:
            self._finish_cancelled(job)
            return None
        except ApiError as err:
            self._finish(job, FAILED, err)
            return None
        finally:
            job.gpu_wait = False
        job.timings["token_wait_s"] = time.monotonic() - t0
        self._tokens_held = self.settings.queue_tokens
        self._notify("tokens_acquired", job, tokens=self._tokens_held, wait_s=round(job.timings["token_wait_s"], 4))
        return lease

    def _job_args(self, job: Job) -> dict:
        """The job line's `args` for `python -m runner serve` (the runner's LegoArgs fields)."""
        s = self.settings
        args = {"source": str(job.files.source), "out": str(job.files.out_partial), "checkpoints": str(s.acestep_checkpoints),
                "device": s.acestep_device, "dtype": s.acestep_dtype, "offload": s.acestep_offload,
                "max_duration_s": s.max_duration_s, **job.params.runner_args()}
        if s.acestep_engine != "auto":
            args["engine"] = s.acestep_engine
        return args

    def _finish_from_outcome(self, job: Job, outcome: RunnerOutcome) -> None:
        job.timings["runner_s"] = outcome.seconds
        if outcome.first_event_s is not None:
            job.timings["job_to_first_event_s"] = outcome.first_event_s
        if outcome.cancelled:
            return self._finish_cancelled(job)
        if outcome.timed_out:
            return self._finish(job, FAILED, ApiError("job_timeout", f"The generation ran longer than {self.settings.job_timeout_s:g} s "
                                                                     "(JOB_TIMEOUT_S) and was stopped; retry, perhaps with a shorter source."))
        err = outcome.error or {}
        message = str(err.get("message") or "")[:500] or None
        code = outcome.status
        if code == 0 and outcome.result is not None:
            problem = self._collect_outputs(job, outcome.result)
            if problem is None:
                self._avg_job_s = 0.7 * self._avg_job_s + 0.3 * (time.monotonic() - (job.run_started_mono or time.monotonic()))
                return self._finish(job, COMPLETED)
            outcome.protocol_problems.append(problem)
        if code == 0:
            api = ApiError("runner_protocol_error")
        elif code == 2:
            api = ApiError("runner_rejected_input", message)
        elif code == 3:
            api = ApiError("checkpoints_unavailable", message)
        elif code == 4:
            api = ApiError("generation_failed", message, retryable=bool(err.get("retryable", True)))
        else:
            api = ApiError("runner_crashed", f"The generator process stopped unexpectedly (exit status {code}); retry.")
        event(log, "runner_failed", level=logging.WARNING, job_id=job.id, status=code, exit_code=outcome.exit_code,
              runner_code=err.get("code"),
              problems="; ".join(outcome.protocol_problems), stderr_tail=self._stderr_tail(job))
        self._finish(job, FAILED, api)

    def _collect_outputs(self, job: Job, result: dict) -> str | None:
        """Check the result's files lie in the job's output folder, then publish the folder atomically."""
        partial = job.files.out_partial.resolve()
        names = []
        for item in result.get("outputs") or []:
            path = Path(str(item.get("path", ""))) if isinstance(item, dict) else None
            if path is None:
                return "an output entry is not an object"
            if not path.is_absolute():
                path = (self.runner_cwd / path)
            path = path.resolve()
            if path.parent != partial or not path.is_file() or path.stat().st_size == 0:
                return f"output {path.name} is missing, empty or outside the job's folder"
            names.append(path.name)
        if not names:
            return "the result lists no outputs"
        os.replace(job.files.out_partial, job.files.out)
        job.outputs = [job.files.out / n for n in names]
        job.result = {k: result.get(k) for k in ("seed", "timings", "peak_vram_bytes", "engine", "dtype")}
        job.result["outputs"] = [{k: v for k, v in item.items() if k != "path"} for item in result["outputs"]]
        return None

    def _finish_cancelled(self, job: Job) -> None:
        if job.cancel_reason == "shutdown":
            return self._finish(job, FAILED, ApiError("service_shutting_down"))
        self._finish(job, CANCELLED, ApiError("job_cancelled", f"The job was cancelled ({job.cancel_reason or 'by request'})."))

    def _finish(self, job: Job, state: str, error: ApiError | None = None) -> None:
        with job.lock:
            if job.finished:
                return
            job.state, job.error, job.finished_at = state, error, time.time()
            if state == COMPLETED:
                job.progress = 100
        job.timings["total_s"] = time.monotonic() - job.queued_mono
        # Nothing half-made stays: the source is not needed any more, a failed run's partial output goes.
        job.files.remove_source()
        shutil.rmtree(job.files.out_partial, ignore_errors=True)
        fields = {"timings": {k: round(v, 4) for k, v in job.timings.items()}}
        if state == COMPLETED:
            fields["runner_timings"] = job.result.get("timings")
        if error is not None:
            fields.update(error_code=error.code, retryable=error.retryable, reason=job.cancel_reason)
        self._notify(state, job, **fields)
        job.done.set()

    def _stderr_tail(self, job: Job) -> str:
        try:
            with open(job.files.stderr_log, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - TAIL_BYTES))
                return fh.read().decode("utf-8", "replace")
        except OSError:
            return ""

    # ---- expiry ------------------------------------------------------------------------------

    def _janitor_loop(self) -> None:
        interval = max(0.2, min(30.0, self.settings.result_ttl_s / 4))
        while not self._stop_janitor.wait(interval):
            self.expire()

    def expire(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        ttl = self.settings.result_ttl_s
        with self._cond:
            old = [j for j in self._jobs.values() if j.finished and j.finished_at and now - j.finished_at >= ttl]
            for job in old:
                del self._jobs[job.id]
        for job in old:
            job.files.discard()
            self._notify("expired", job)
        return len(old)

    def _notify(self, name: str, job: Job, **fields) -> None:
        for listener in self._listeners:
            try:
                listener(name, job, fields)
            except Exception:
                log.exception("job listener failed")


def log_listener(name: str, job: Job, fields: dict) -> None:
    """One log line per job transition, with the job id."""
    level = logging.WARNING if name == FAILED else logging.INFO
    event(log, f"job_{name}", level=level, job_id=job.id, **fields)
