"""A job as a web host sees it in the RQ mode: a view of its Redis record.

It offers what the HTTP code reads of an in-process job (state, progress, the GPU queue's
message, params, result, error, outputs, `done.wait`), so both modes answer through the same
routes. `refresh` reads the record again; `done.wait(t)` polls Redis until the job has ended
(whichever GPU worker ran it) or t seconds have passed.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from webapp.errors import ApiError
from webapp.job_state import JobState
from webapp.lego_params import LegoParams
from webapp.queue_rq.records import JobRecord, RecordState, output_key

POLL_S = 0.1

# The job's state in the one-host terms the HTTP code reads: a job a GPU worker holds but has not
# started its runner for is waiting for GPU tokens, as in the in-process queue.
CLIENT_STATE = {RecordState.QUEUED: JobState.QUEUED, RecordState.TAKEN: JobState.WAITING_FOR_GPU,
                RecordState.RUNNING: JobState.RUNNING, RecordState.COMPLETED: JobState.COMPLETED,
                RecordState.FAILED: JobState.FAILED, RecordState.CANCELLED: JobState.CANCELLED}


@dataclass(frozen=True)
class RemoteOutput:
    """One stem in Redis: its blob's key and size."""

    key: str
    size: int


class _Done:
    def __init__(self, job: "RemoteJob"):
        self._job = job

    def wait(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._job.finished or not self._job.refresh() or self._job.finished:
                return True
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            time.sleep(POLL_S if left is None else min(POLL_S, left))

    def is_set(self) -> bool:
        return self._job.finished


class RemoteJob:
    def __init__(self, jobs, record: JobRecord):
        self._jobs = jobs
        self.id = record.id
        self.done = _Done(self)
        self.gone = False  # deleted or expired while this view was held
        self._apply(record)

    def _apply(self, rec: JobRecord) -> None:
        self.record = rec
        self.protocol = rec.protocol
        self.duration_s = rec.duration_s
        self.sample_rate = rec.sample_rate
        self.params = LegoParams(**rec.params)
        self.state = CLIENT_STATE[rec.state]
        self.gpu_wait = rec.state is RecordState.TAKEN
        self.gpu_position = rec.gpu_position
        self.gpu_message = rec.gpu_message
        self.stage, self.step, self.total_steps = rec.stage, rec.step, rec.total_steps
        self.progress = 100 if rec.state is RecordState.COMPLETED else rec.progress
        self.result = rec.result
        self.timings = rec.timings
        self.cancel_reason = rec.cancel_requested
        self.error = _api_error(rec.error) if rec.error else None
        self.outputs = ([RemoteOutput(output_key(rec.id, i), size) for i, size in enumerate(rec.output_sizes)]
                        if rec.state is RecordState.COMPLETED else [])

    @property
    def finished(self) -> bool:
        return self.gone or self.record.state.finished

    def refresh(self) -> bool:
        """Read the record again; False once it is gone (deleted, or its TTL ran out)."""
        rec = self._jobs.records.get(self.id)
        if rec is None:
            self.gone = True
            return False
        self._apply(rec)
        return True


def _api_error(err: dict) -> ApiError:
    code = err.get("code") or "internal_error"
    try:
        return ApiError(code, err.get("message") or None, status=err.get("status"), retryable=err.get("retryable"))
    except ValueError:  # a code this version does not know (a newer GPU worker): say so truthfully
        return ApiError("internal_error", err.get("message") or None, retryable=bool(err.get("retryable")))


def error_fields(error: ApiError) -> dict:
    """How an ApiError is kept in a record."""
    return {"code": error.code, "message": error.message, "status": error.status, "retryable": error.retryable}
