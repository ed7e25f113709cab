"""Runs one job on this host's GPU: tokens, a runner, the outcome, the release. The job code itself.

`JobRunner.run(job)` takes a job from queued to finished: it waits for GPU tokens (showing the
position), hands the job to a runner started ahead (or to the warm one of the previous job),
turns its events into progress, stops it on cancel or JOB_TIMEOUT_S, and answers the client as
soon as the stem is on disk. The lease's exit (webapp/leases.py) then ends the runner and
releases the tokens after it, whatever happened in between. Between jobs, `idle_duty` keeps a
spare runner ready and ends a warm one whose time is up.

It knows nothing of where jobs come from: the in-process queue (webapp/job_queue.py) calls it
from its one worker thread, and a queue worker on another host would call the same `run` with
the same store, leases and runners. Runners must be started from that one long-lived thread
(the parent-death signal fires when the thread that forked a runner exits).
"""
from __future__ import annotations

import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from runner.contract import ExitStatus, serve_argv
from webapp.checkpoints import inspect_checkpoints
from webapp.durable import is_storage_full
from webapp.errors import ApiError
from webapp.gpu_tokens import AcquireFailed, WaitCancelled
from webapp.job_outcome import error_for, publish_outputs
from webapp.job_estimate import JobSeconds
from webapp.job_state import STAGE_PROGRESS, Job, JobState
from webapp.job_store import JobStore
from webapp.leases import Lease, Leases
from webapp.logs import event
from webapp.runner_process import RunnerOutcome, RunnerProcess
from webapp.runner_registry import RunnerRegistry

log = logging.getLogger("acestep.webapp.jobs")
TAIL_BYTES = 4000


@dataclass
class WarmRunner:
    """A runner that kept its model loaded after a job, with the lease of its tokens."""

    lease: Lease
    runner: RunnerProcess
    last_job: Job
    since: float  # monotonic


class JobRunner:
    def __init__(self, settings, store: JobStore, leases: Leases, registry: RunnerRegistry, runner_prefix: list[str],
                 runner_cwd: Path, demo: bool = False):
        self.settings = settings
        self.store = store
        self.leases = leases
        self.registry = registry
        self.runner_prefix = runner_prefix  # RUNNER_COMMAND, or `python -m runner`
        self.runner_cwd = runner_cwd
        self.avg_job_s: float | None = None  # seconds a job has been taking, once one completed
        self.demo = demo
        self.job_seconds = JobSeconds.for_model(demo)  # a job's time from its source's length
        self.closing = False
        self.unload_requested = False
        self.current: RunnerProcess | None = None
        self._spare: RunnerProcess | None = None  # started ahead: imports done, no GPU, no tokens
        self._warm: WarmRunner | None = None
        self._start_error: OSError | None = None

    # ---- one job ---------------------------------------------------------------------------------------

    def run(self, job: Job) -> None:
        job.timings["queue_wait_s"] = time.monotonic() - job.queued_mono
        if job.cancel.is_set():
            return self._finish_cancelled(job)
        warm, self._warm = self._warm, None
        if warm is not None and not warm.runner.alive():
            self._end_warm(warm, "exited")
            warm = None
        if warm is not None:
            lease, runner = warm.lease, warm.runner
            job.timings["token_wait_s"] = 0.0
            self.store.notify("tokens_reused", job, session_id=lease.session_id)
        else:
            lease = self._acquire(job)
            if lease is None:
                return
            runner = self._take_spare()
        outcome: RunnerOutcome | None = None
        keep = False
        with lease:  # the exit ends the runner, waits until it is reaped, then releases the tokens
            if runner is not None:
                lease.bind(runner)
                outcome, keep = self._execute(job, lease, runner, reused=warm is not None)
            if keep:
                self._warm = WarmRunner(lease.keep(), runner, job, time.monotonic())
        if not keep:
            self._after_release(job, lease, runner)
        self._conclude(job, runner, outcome)

    def _acquire(self, job: Job) -> Lease | None:
        """Wait for GPU tokens, showing the position; None when the job ended while waiting."""
        job.session_id = f"acestep-lego-{job.id}-{secrets.token_hex(3)}"
        if not self.store.move(job, JobState.WAITING_FOR_GPU, session_id=job.session_id):
            return None
        t0 = time.monotonic()

        def on_wait(position, message):
            job.gpu_position, job.gpu_message = position, message

        try:
            lease = self.leases.acquire(job.session_id, job.id, job.cancel, on_wait)
        except WaitCancelled:
            self._finish_cancelled(job)
            return None
        except AcquireFailed as failed:
            self.store.finish(job, JobState.FAILED, failed.error)
            return None
        job.timings["token_wait_s"] = time.monotonic() - t0
        self.store.notify("tokens_acquired", job, tokens=self.settings.queue_tokens, session_id=job.session_id,
                          wait_s=round(job.timings["token_wait_s"], 4))
        return lease

    def _execute(self, job: Job, lease: Lease, runner: RunnerProcess, reused: bool) -> tuple[RunnerOutcome | None, bool]:
        if job.cancel.is_set():
            return None, False
        with job.lock:
            job.stage = "starting"
            job.attempts += 1
            job.progress = max(job.progress, STAGE_PROGRESS["starting"])  # never "processing" at 0
        if not self.store.move(job, JobState.RUNNING, attempt=job.attempts):
            return None, False
        job.run_started_mono = time.monotonic()
        job.runner_pid, job.runner_started_at = runner.pid, time.time()
        self.current = runner
        self.store.notify("runner_started", job, pid=runner.pid, started_at=job.runner_started_at, reused=reused,
                          spawned_s_ago=round(time.time() - runner.spawned_at, 3))
        try:
            outcome = runner.run_job(self._job_args(job), job.on_runner_event, job.files.stderr_log,
                                     time.monotonic() + self.settings.job_timeout_s, job.cancel,
                                     self.settings.runner_kill_grace_s)
        finally:
            self.current = None
        lease.status = "completed" if outcome.status == ExitStatus.OK else "failed"
        ok = outcome.status == ExitStatus.OK and outcome.result is not None and not (outcome.cancelled or outcome.timed_out)
        if ok:
            problem = publish_outputs(job, outcome.result, self.runner_cwd)
            if problem is not None:
                outcome.protocol_problems.append(problem)
                ok = False
        if ok:
            # The stem is complete on disk: answer now. Ending the runner (a second or more with a
            # model on the GPU) and releasing the tokens after it still happen before the next job.
            self._observe(job, outcome)
            self.store.finish(job, JobState.COMPLETED)
        keep = (ok and self.settings.keep_warm_s > 0 and runner.alive() and not self.closing
                and not self.unload_requested)
        if keep:
            runner.end_job_log()
        return outcome, keep

    def _after_release(self, job: Job, lease: Lease, runner: RunnerProcess | None) -> None:
        if runner is not None:
            job.runner_exited_at = runner.exited_at
            job.runner_exit_code = runner.proc.returncode if runner.proc else None
            self.store.notify("runner_exited", job, pid=runner.pid, exit_code=job.runner_exit_code,
                              exited_at=job.runner_exited_at)
        job.tokens_released_at = lease.released_at
        self.store.notify("tokens_released", job, session_id=lease.session_id, status=lease.status,
                          confirmed=lease.released_at is not None)
        self.unload_requested = False

    def _conclude(self, job: Job, runner: RunnerProcess | None, outcome: RunnerOutcome | None) -> None:
        if job.finished or (job.state is JobState.QUEUED and job.cancel_reason == "shutdown"):
            return
        if runner is None:
            if self._start_error is not None and is_storage_full(self._start_error):
                return self.store.finish(job, JobState.FAILED, ApiError("storage_full"))
            return self.store.finish(job, JobState.FAILED, ApiError(
                "runner_crashed", "The generator process could not be started; operators: check RUNNER_COMMAND."))
        if outcome is None or outcome.cancelled:
            return self._finish_cancelled(job)
        error = error_for(outcome, self.settings.job_timeout_s)
        event(log, "runner_failed", level=logging.WARNING, job_id=job.id, status=outcome.status,
              exit_code=outcome.exit_code, runner_code=(outcome.error or {}).get("code"),
              problems="; ".join(outcome.protocol_problems), stderr_tail=self._stderr_tail(job))
        self.store.finish(job, JobState.FAILED, error)

    def _finish_cancelled(self, job: Job) -> None:
        if job.cancel_reason == "shutdown":
            if job.client_waits:
                self.store.finish(job, JobState.FAILED, ApiError("service_shutting_down"))
            else:
                self.store.requeue(job, "shutdown")  # it resumes when the service is back
            return
        self.store.finish(job, JobState.CANCELLED,
                          ApiError("job_cancelled", f"The job was cancelled ({job.cancel_reason or 'by request'})."))

    def _observe(self, job: Job, outcome: RunnerOutcome) -> None:
        job.timings["runner_s"] = outcome.seconds
        if outcome.first_event_s is not None:
            job.timings["job_to_first_event_s"] = outcome.first_event_s
        took = time.monotonic() - (job.run_started_mono or time.monotonic())
        self.avg_job_s = took if self.avg_job_s is None else 0.7 * self.avg_job_s + 0.3 * took
        self.job_seconds.learn(took, job.duration_s)

    def _job_args(self, job: Job) -> dict:
        """The job line's `args` (the contract's JOB_FIELDS)."""
        s = self.settings
        args = {"source": str(job.files.source), "out": str(job.files.out_partial), "checkpoints": str(s.acestep_checkpoints),
                "device": s.acestep_device, "dtype": s.acestep_dtype, "offload": s.acestep_offload,
                "max_duration_s": s.max_duration_s, **job.params.runner_args()}
        if s.acestep_engine != "auto":
            args["engine"] = s.acestep_engine
        return args

    def _stderr_tail(self, job: Job) -> str:
        try:
            with open(job.files.stderr_log, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - TAIL_BYTES))
                return fh.read().decode("utf-8", "replace")
        except OSError:
            return ""

    # ---- runners between jobs ------------------------------------------------------------------------

    def _start_runner(self) -> RunnerProcess | None:
        runner = RunnerProcess(serve_argv(self.runner_prefix, self._runner_idle_s(), self._folder_engine()),
                               self.runner_cwd, self.registry)
        try:
            runner.start()
        except OSError as exc:
            self._start_error = exc
            event(log, "runner_start_failed", level=logging.ERROR, error=str(exc))
            return None
        self._start_error = None
        event(log, "runner_spawned", pid=runner.pid)
        return runner

    def _folder_engine(self) -> str | None:
        """The engine the checkpoint folder implies now, for the runner to import while it waits
        (read at each start: the weights may arrive after the service started)."""
        s = self.settings
        return inspect_checkpoints(s.acestep_checkpoints, s.acestep_engine, s.acestep_config_path).engine

    def _take_spare(self) -> RunnerProcess | None:
        runner, self._spare = self._spare, None
        if runner is not None and runner.alive():
            return runner
        if runner is not None:
            runner.end(self.settings.runner_kill_grace_s)
        return self._start_runner()

    def _runner_idle_s(self) -> float:
        """The runner's own idle limit: 0 (exit after one job) unless keep-warm is on. With it on, the
        service ends the warm runner itself; the runner's limit is only a backstop."""
        return 0.0 if self.settings.keep_warm_s <= 0 else self.settings.keep_warm_s + 30.0

    def idle_wait_s(self) -> float | None:
        """How long the idle worker may sleep: until the warm model's time is up, else until woken."""
        if self._warm is None:
            return None if self._spare is not None or not self.settings.runner_prestart else 1.0
        return max(0.05, min(1.0, self._warm.since + self.settings.keep_warm_s - time.monotonic()))

    def idle_duty(self) -> None:
        """End an expired or unwanted warm runner; keep a spare ready (RUNNER_PRESTART)."""
        warm = self._warm
        if warm is not None:
            expired = time.monotonic() - warm.since >= self.settings.keep_warm_s
            if expired or self.unload_requested or self.closing or not warm.runner.alive():
                self._warm = None
                reason = "request" if self.unload_requested else ("idle" if warm.runner.alive() else "exited")
                self._end_warm(warm, "shutdown" if self.closing else reason)
        self.unload_requested = False if self._warm is None else self.unload_requested
        if self.closing or not self.settings.runner_prestart or self._warm is not None:
            return
        if self._spare is not None and not self._spare.alive():
            event(log, "spare_runner_died", level=logging.WARNING, pid=self._spare.pid, exit_code=self._spare.proc.returncode)
            self._spare.end(self.settings.runner_kill_grace_s)
            self._spare = None
        if self._spare is None:
            self._spare = self._start_runner()

    def _end_warm(self, warm: WarmRunner, reason: str) -> None:
        """End the warm runner, wait until it is gone, then release its tokens (the lease's close)."""
        warm.lease.close("completed")
        self.store.notify("runner_exited", warm.last_job, pid=warm.runner.pid, exit_code=warm.runner.proc.returncode,
                          exited_at=warm.runner.exited_at)
        self.store.notify("tokens_released", warm.last_job, session_id=warm.lease.session_id, reason=reason,
                          confirmed=warm.lease.released_at is not None)
        event(log, "runner_unloaded", pid=warm.runner.pid, reason=reason, exit_code=warm.runner.proc.returncode,
              exited_at=warm.runner.exited_at, kept_s=round(time.monotonic() - warm.since, 3))

    def request_unload(self) -> bool:
        self.unload_requested = True
        return self._warm is not None

    def warm_state(self) -> dict:
        warm, spare = self._warm, self._spare
        if warm is None:
            return {"loaded": False, "spare_runner": spare is not None and spare.alive(),
                    "spare_ready": spare is not None and spare.alive() and spare.wait_ready(0)}
        left = warm.since + self.settings.keep_warm_s - time.monotonic()
        return {"loaded": True, "unloads_in_s": round(max(0.0, left), 1)}

    def holding_gpu(self) -> bool:
        return self.current is not None or self._warm is not None

    def close(self) -> None:
        """At shutdown, in the worker thread: the warm runner and the spare go (their leases with them)."""
        self.closing = True
        warm, self._warm = self._warm, None
        if warm is not None:
            self._end_warm(warm, "shutdown")
        spare, self._spare = self._spare, None
        if spare is not None:
            spare.end(self.settings.runner_kill_grace_s)  # end of input: an idle runner exits at once
