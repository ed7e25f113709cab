"""What RQ calls: the job function a GPU worker runs, and the failure callback for lost workers.

`run(task_id)` is the enqueued function (its only argument is the task id: everything else is in
the job's record). It runs only inside `python -m webapp.worker`, which installs the GPU host's
runtime (webapp/queue_rq/gpu_runtime.py) before it takes jobs. A job that ends failed or
cancelled raises `JobEnded`, so RQ's own registries and worker counts say what happened too; one
interrupted by its worker's shutdown returns RQ's `Retry`, which puts it back first in line.

`on_failure` is registered with every job (RQ `Callback`). RQ calls it when a job's worker
stopped sending heartbeats (its abandoned-job cleanup, run by any GPU worker's maintenance or by
a web host answering a poll): the job then fails `gpu_worker_lost`, retryable, instead of hanging
as "running" for good.
"""
from __future__ import annotations

import logging
import time

from rq.exceptions import AbandonedJobError
from rq.job import Retry
from rq.timeouts import JobTimeoutException

from webapp.errors import ApiError
from webapp.job_store import MAX_ATTEMPTS
from webapp.logs import event
from webapp.queue_rq.gpu_runtime import REQUEUED
from webapp.queue_rq.records import LIVE, IllegalTransition, RecordState, Records, source_key
from webapp.queue_rq.remote_job import error_fields

log = logging.getLogger("acestep.webapp.rq")

_runtime = None


class JobEnded(Exception):
    """The job ended failed or cancelled; its record says how (RQ records this as its failure)."""

    def __init__(self, task_id: str, state: str, code: str):
        super().__init__(f"job {task_id} {state}: {code}")
        self.state, self.code = state, code


def install(runtime) -> None:
    global _runtime
    _runtime = runtime


def run(task_id: str):
    if _runtime is None:
        raise RuntimeError("webapp.queue_rq.gpu_job.run runs only inside `python -m webapp.worker`")
    summary = _runtime.run(task_id)
    if summary["state"] == REQUEUED:  # its GPU worker is shutting down: RQ puts it back, first in line
        return Retry(max=MAX_ATTEMPTS, enqueue_at_front=True)
    if summary["state"] in (RecordState.FAILED.value, RecordState.CANCELLED.value):
        raise JobEnded(task_id, summary["state"], summary.get("error_code") or "unknown")
    return summary


def mark_lost(records: Records, task_id: str, result_ttl_s: int, why: str) -> bool:
    """Fail a live job whose GPU worker is gone; False when it had already ended (idempotent)."""
    return fail_live(records, task_id, result_ttl_s, ApiError("gpu_worker_lost"), why)


def fail_live(records: Records, task_id: str, result_ttl_s: int, error: ApiError, why: str) -> bool:
    rec = records.get(task_id)
    if rec is None or rec.state.finished:
        return False
    try:
        records.transition(task_id, RecordState.FAILED, {"error": error_fields(error), "finished_at": f"{time.time():.6f}"},
                           only_from=LIVE, ttl_s=result_ttl_s, stats_field=f"{rec.host or '-'}|failed|{error.code}")
    except IllegalTransition:
        return False
    records.conn.delete(source_key(task_id))
    event(log, "job_failed", level=logging.WARNING, job_id=task_id, error_code=error.code, retryable=error.retryable,
          worker=rec.worker, host=rec.host, reason=why)
    return True


def on_failure(job, connection, exc_type, exc_value, traceback) -> None:
    """RQ's failure callback. A job that ended failed or cancelled (JobEnded) was recorded by its
    worker. An abandoned one (its worker died) fails `gpu_worker_lost`; one whose function raised
    anything else (RQ's backstop timeout, Redis lost at a bad moment) fails too, never hangs."""
    if exc_type is JobEnded:
        return
    ttl = int(job.failure_ttl or 3600)
    records = Records(connection)
    if exc_type is AbandonedJobError:
        mark_lost(records, job.id, ttl, "heartbeats stopped")
    elif exc_type is JobTimeoutException:
        fail_live(records, job.id, ttl, ApiError("job_timeout"), "RQ's backstop timeout")
    else:
        fail_live(records, job.id, ttl, ApiError("internal_error", "The GPU worker failed while handling the job; retry.",
                                                 retryable=True), exc_type.__name__ if exc_type else "unknown")
