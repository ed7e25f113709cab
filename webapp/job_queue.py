"""The embedded job queue: bounded, in this process, one generation at a time.

One worker thread takes jobs in order and hands each to `JobRunner.run` (webapp/job_runner.py);
between jobs it lets the runner keep a spare ready. The queue answers what the HTTP side asks:
room left, positions, estimates, cancel, and `Retry-After` when full. A janitor deletes
finished jobs after RESULT_TTL_S. Job records live in `JobStore` (memory and disk), which is
why a restart loses no accepted job; their answers live in this process, which is why the
service runs one gunicorn worker.

Shutdown stops taking jobs and cancels the running one (its tokens are released after its
runner exits). Jobs whose client waits on the connection fail `service_shutting_down`; the
others stay queued on disk and resume when the service is back.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque

from webapp.errors import ApiError
from webapp.job_estimate import DEFAULT_JOB_SECONDS
from webapp.job_runner import JobRunner
from webapp.job_state import Job, JobState
from webapp.job_store import JobStore
from webapp.logs import event

log = logging.getLogger("acestep.webapp.jobs")


class JobManager:
    def __init__(self, settings, store: JobStore, runner: JobRunner):
        self.settings = settings
        self.store = store
        self.runner = runner
        self._queue: deque[Job] = deque()
        self._running: Job | None = None
        self._cond = threading.Condition()
        self._closing = False
        self._stop_janitor = threading.Event()
        self.idle_rounds = 0  # times the worker found the queue empty (tests wait on it, not on sleeps)
        self._worker = threading.Thread(target=self._work_loop, name="lego-jobs", daemon=True)
        self._janitor = threading.Thread(target=self._janitor_loop, name="lego-janitor", daemon=True)

    # ---- lifecycle ---------------------------------------------------------------------------------

    def start(self, resumed: list[Job] = ()) -> None:
        with self._cond:
            for job in resumed:
                job.queued_mono = time.monotonic()
                self._queue.append(job)
        for job in resumed:
            self.store.notify("resumed", job, attempts=job.attempts, position=self.position(job))
        self._worker.start()
        self._janitor.start()

    def add_listener(self, listener) -> None:
        self.store.add_listener(listener)

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop taking jobs, cancel the running one and wait for the worker to end. Idempotent."""
        with self._cond:
            already = self._closing
            self._closing = True
            waiting = list(self._queue)
            self._queue.clear()
            running = self._running
            self._cond.notify_all()
        self.runner.closing = True
        if not already:
            event(log, "jobs_shutdown", waiting=len(waiting), running=running.id if running else None,
                  kept_for_restart=sum(1 for j in waiting if not j.client_waits))
        for job in waiting:
            if job.client_waits:  # its caller waits on this connection: tell it now
                job.cancel_reason = "shutdown"
                job.cancel.set()
                self.store.finish(job, JobState.FAILED, ApiError("service_shutting_down"))
        if running is not None and not running.finished:
            running.cancel_reason = "shutdown"
            running.cancel.set()
        if self._worker.is_alive() and threading.current_thread() is not self._worker:
            self._worker.join(timeout_s)
        self._stop_janitor.set()

    @property
    def accepting(self) -> bool:
        return not self._closing

    @property
    def worker_alive(self) -> bool:
        return self._worker.is_alive()

    # ---- the public operations -------------------------------------------------------------------------

    def has_room(self) -> bool:
        """One job may run and MAX_QUEUED_JOBS may wait; checked before an upload is probed."""
        with self._cond:
            return not self._closing and self._busy() < self.settings.max_queued_jobs + 1

    def _busy(self) -> int:
        return len(self._queue) + (1 if self._running is not None else 0)

    def raise_queue_full(self) -> None:
        if self._closing:
            raise ApiError("service_shutting_down")
        retry = self.retry_after_s()
        raise ApiError("queue_full", f"{len(self._queue)} jobs are already waiting; retry in about {retry} s.",
                       headers={"Retry-After": str(retry)})

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closing or self._busy() >= self.settings.max_queued_jobs + 1:
                self.raise_queue_full()
            self.store.register(job)
            self._queue.append(job)
            job.queued_mono = time.monotonic()
            self._cond.notify_all()
        self.store.notify("queued", job, track=job.params.track, duration_s=round(job.duration_s, 3),
                          protocol=job.protocol, position=self.position(job))

    def get(self, task_id: str) -> Job | None:
        return self.store.get(task_id)

    def cancel(self, task_id: str, reason: str) -> Job | None:
        """Cancel a waiting or running job; a running one is stopped by the worker."""
        with self._cond:
            job = self.store.get(task_id)
            if job is None or job.finished:
                return job
            job.cancel_reason = reason
            job.cancel.set()
            was_queued = job in self._queue
            if was_queued:
                self._queue.remove(job)
        if was_queued:
            self.store.finish(job, JobState.CANCELLED,
                              ApiError("job_cancelled", f"The job was cancelled ({reason}) before it started."))
        return job

    def forget(self, task_id: str) -> bool:
        return self.store.forget(task_id)

    def position(self, job: Job) -> int:
        """1 = next to run. A job dequeued but waiting for GPU tokens reports the GPU queue's position."""
        with self._cond:
            try:
                return self._queue.index(job) + 1
            except ValueError:
                return (job.gpu_position or 1) if job.gpu_wait else 0

    def _avg(self) -> float:
        return self.runner.avg_job_s or DEFAULT_JOB_SECONDS

    def _job_s(self, job: Job) -> float:
        """Its whole run, from its source's length (webapp/job_estimate.py)."""
        return self.runner.job_seconds.of(job.duration_s)

    def _left_s(self, job: Job) -> float:
        if job.run_started_mono is None:
            return self._job_s(job)
        return max(1.0, self._job_s(job) - (time.monotonic() - job.run_started_mono))

    def _running_left_s(self, exclude: Job | None = None) -> float:
        running = self._running
        if running is None or running is exclude:
            return 0.0
        return self._left_s(running)

    def estimated_wait_s(self, job: Job) -> int:
        """The running job's rest, and each queued job ahead by its own source's length. A job waiting
        for GPU tokens counts the GPU queue's jobs ahead (other services': lengths unknown) as its own."""
        with self._cond:
            queue = list(self._queue)
        index = next((i for i, other in enumerate(queue) if other is job), None)
        if index is not None:
            ahead = sum(self._job_s(other) for other in queue[:index])
        else:
            ahead = max(self.position(job) - 1, 0) * self._job_s(job)
        return int(math.ceil(self._running_left_s(exclude=job) + ahead))

    def estimated_remaining_s(self, job: Job) -> int:
        return int(self._left_s(job))

    def retry_after_s(self) -> int:
        """When a full queue next has room: when the running job should end (one place frees)."""
        left = self._running_left_s() or self._avg()
        return int(min(3600, max(1, math.ceil(left))))

    def tokens_held(self) -> int:
        """GPU tokens this service holds right now (0 while idle)."""
        return self.runner.leases.held() * self.settings.queue_tokens

    def request_unload(self) -> bool:
        """POST /unload: the warm model goes now if idle, else right after the running job."""
        with self._cond:
            warm = self.runner.request_unload()
            self._cond.notify_all()
        return warm

    def warm_state(self) -> dict:
        return self.runner.warm_state()

    def snapshot(self) -> dict:
        with self._cond:
            return {
                "queued": len(self._queue),
                "running": 1 if self._running is not None else 0,
                "max_queued": self.settings.max_queued_jobs,
                "kept": self.store.finished_count(),
                "accepting": not self._closing,
                "average_job_s": round(self._avg(), 1),
                "warm": self.warm_state(),
                "tokens_held": self.tokens_held(),
                "releases_pending": len(self.runner.leases.pending()),
            }

    # ---- the worker -------------------------------------------------------------------------------------

    def _work_loop(self) -> None:
        """The one thread that starts runners and holds GPU tokens."""
        try:
            while True:
                self.runner.idle_duty()
                with self._cond:
                    if not self._queue and not self._closing:
                        self.idle_rounds += 1
                        self._cond.wait(self.runner.idle_wait_s())
                    if not self._queue:
                        if self._closing:
                            return
                        continue
                    job = self._queue.popleft()
                    self._running = job
                try:
                    self.runner.run(job)
                except Exception:  # a bug here must not stop the queue
                    log.exception("job %s failed inside the job runner", job.id)
                    if not job.finished:
                        self.store.finish(job, JobState.FAILED, ApiError("internal_error"))
                finally:
                    with self._cond:
                        self._running = None
        finally:
            self.runner.close()

    # ---- expiry -------------------------------------------------------------------------------------------

    def _janitor_loop(self) -> None:
        interval = max(0.2, min(30.0, self.settings.result_ttl_s / 4))
        while not self._stop_janitor.wait(interval):
            self.store.expire()

    def expire(self, now: float | None = None) -> int:
        return self.store.expire(now)


def log_listener(name: str, job: Job, fields: dict) -> None:
    """One log line per job transition, with the job id."""
    level = logging.WARNING if name == JobState.FAILED.value else logging.INFO
    event(log, f"job_{name}", level=level, job_id=job.id, **fields)
