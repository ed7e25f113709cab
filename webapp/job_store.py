"""Job records: kept in memory for the answers, on disk so that a restart loses nothing acknowledged.

Each job's folder holds `job.json`, written atomically (webapp/durable.py) when the job is
accepted (inside the staging folder, before it is renamed into place) and at every change of
state. At start, `recover` reads them back:
- finished jobs stay fetchable until RESULT_TTL_S after they finished, then go with their files;
- queued and interrupted jobs resume, in the order they arrived, at most MAX_ATTEMPTS runs each;
- a job that cannot resume (its caller waited on a connection that is gone, its source is
  missing, or it keeps being interrupted) fails with `job_interrupted`, retryable, which the
  client reads like any other failure;
- staging folders (uploads never acknowledged) and unreadable leftovers are removed.
Only the holder of the data-folder lock (webapp/data_lock.py) calls `recover`.

Listeners (`add_listener`) see every transition; the log and the metrics are two of them.
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Callable

from webapp.durable import read_json, remove_stale_temporaries, write_json
from webapp.errors import CATALOGUE, ApiError
from webapp.job_state import FINISHED, Job, JobState
from webapp.lego_params import LegoParams
from webapp.logs import event
from webapp.uploads import TASK_ID_RE, JobFiles, jobs_root, tmp_root

log = logging.getLogger("acestep.webapp.jobs")

RECORD = "job.json"
RECORD_VERSION = 1
MAX_ATTEMPTS = 3
Listener = Callable[[str, Job, dict], None]


def to_record(job: Job) -> dict:
    err = job.error
    return {
        "version": RECORD_VERSION, "id": job.id, "params": dataclasses.asdict(job.params), "duration_s": job.duration_s,
        "sample_rate": job.sample_rate, "protocol": job.protocol, "client_waits": job.client_waits,
        "created_at": job.created_at, "state": job.state.value, "attempts": job.attempts, "finished_at": job.finished_at,
        "outputs": [p.name for p in job.outputs], "result": job.result, "cancel_reason": job.cancel_reason,
        "error": None if err is None else {"code": err.code, "message": err.message, "status": err.status,
                                           "retryable": err.retryable},
    }


def from_record(data: dict, data_dir: Path) -> Job | None:
    """The job a record describes, or None when the record is not one this version can read."""
    try:
        if data.get("version") != RECORD_VERSION or not TASK_ID_RE.match(str(data.get("id"))):
            return None
        files = JobFiles(data_dir, data["id"])
        err = data.get("error")
        error = None
        if isinstance(err, dict):
            code = err.get("code") if err.get("code") in CATALOGUE else "internal_error"
            error = ApiError(code, str(err.get("message") or "") or None, status=int(err.get("status") or 0) or None,
                             retryable=bool(err.get("retryable")))
        job = Job(id=data["id"], params=LegoParams(**data["params"]), files=files, duration_s=float(data["duration_s"]),
                  sample_rate=int(data["sample_rate"]), protocol=str(data["protocol"]),
                  client_waits=bool(data.get("client_waits")), created_at=float(data["created_at"]),
                  state=JobState(data["state"]), attempts=int(data.get("attempts") or 0),
                  finished_at=data.get("finished_at"), result=data.get("result") or {}, error=error,
                  cancel_reason=data.get("cancel_reason"))
        job.outputs = [files.out / str(name) for name in data.get("outputs") or []]
        return job
    except (KeyError, TypeError, ValueError):
        return None


class JobStore:
    def __init__(self, data_dir: Path, result_ttl_s: float):
        self.data_dir = data_dir
        self.result_ttl_s = result_ttl_s
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._listeners: list[Listener] = []

    # ---- listeners ------------------------------------------------------------------------------

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def notify(self, name: str, job: Job, **fields) -> None:
        for listener in self._listeners:
            try:
                listener(name, job, fields)
            except Exception:
                log.exception("job listener failed")

    # ---- records ----------------------------------------------------------------------------------

    def save(self, job: Job, folder: Path | None = None) -> None:
        """Write the record (raises OSError, e.g. on a full disk)."""
        write_json((folder or job.files.dir) / RECORD, to_record(job))

    def try_save(self, job: Job) -> bool:
        try:
            self.save(job)
            return True
        except OSError as exc:
            # The answer in memory stays right; only a restart would see the older state.
            event(log, "job_record_not_saved", level=logging.ERROR, job_id=job.id, state=job.state.value, error=str(exc))
            return False

    def register(self, job: Job) -> None:
        with self._lock:
            self._jobs[job.id] = job

    def get(self, task_id: str) -> Job | None:
        return self._jobs.get(task_id)

    def finished_count(self) -> int:
        return sum(1 for j in list(self._jobs.values()) if j.finished)

    # ---- changes of state ---------------------------------------------------------------------------

    def move(self, job: Job, state: JobState, **fields) -> bool:
        """An unfinished change of state (queued, waiting, running), saved and announced."""
        with job.lock:
            if job.finished:
                return False
            job.move_to(state)
        self.try_save(job)
        self.notify(state.value, job, **fields)
        return True

    def finish(self, job: Job, state: JobState, error: ApiError | None = None) -> bool:
        """The job's last change of state; False when it had already finished."""
        assert state in FINISHED
        with job.lock:
            if job.finished:
                return False
            job.move_to(state)
            job.error, job.finished_at = error, time.time()
            if state is JobState.COMPLETED:
                job.progress = 100
        job.timings["total_s"] = time.monotonic() - job.queued_mono
        # Nothing half-made stays: the source is not needed any more, a failed run's partial output goes.
        job.files.remove_source()
        shutil.rmtree(job.files.out_partial, ignore_errors=True)
        self.try_save(job)
        fields = {"timings": {k: round(v, 4) for k, v in job.timings.items()}}
        if state is JobState.COMPLETED:
            fields["runner_timings"] = job.result.get("timings")
        if error is not None:
            fields.update(error_code=error.code, retryable=error.retryable, reason=job.cancel_reason)
        self.notify(state.value, job, **fields)
        job.done.set()
        return True

    def requeue(self, job: Job, reason: str) -> bool:
        """A run interrupted by a shutdown: back in the queue, on disk, to resume after the restart."""
        with job.lock:
            if job.finished:
                return False
            job.move_to(JobState.QUEUED)
            job.stage, job.step, job.total_steps, job.progress = None, None, None, 0
        shutil.rmtree(job.files.out_partial, ignore_errors=True)
        try:
            job.files.out_partial.mkdir(exist_ok=True)
        except OSError:
            pass
        self.try_save(job)
        self.notify("interrupted", job, reason=reason, attempts=job.attempts)
        return True

    def forget(self, task_id: str) -> bool:
        """Delete a finished job's files and record now (DELETE on a finished job)."""
        with self._lock:
            job = self._jobs.get(task_id)
            if job is None or not job.finished:
                return False
            del self._jobs[task_id]
        job.files.discard()
        self.notify("deleted", job)
        return True

    def expire(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        with self._lock:
            old = [j for j in self._jobs.values() if j.finished and j.finished_at and now - j.finished_at >= self.result_ttl_s]
            for job in old:
                del self._jobs[job.id]
        for job in old:
            job.files.discard()
            self.notify("expired", job)
        return len(old)

    # ---- after a restart ------------------------------------------------------------------------------

    def recover(self) -> tuple[list[Job], dict]:
        """Read the jobs a previous process left; returns the ones to resume (oldest first) and counts."""
        counts = {"resumed": 0, "kept": 0, "failed": 0, "removed": 0}
        root = jobs_root(self.data_dir)
        resume: list[Job] = []
        for entry in sorted(root.iterdir()) if root.is_dir() else []:
            job = None
            if entry.is_dir() and not entry.is_symlink() and TASK_ID_RE.match(entry.name):
                data = read_json(entry / RECORD)
                job = from_record(data, self.data_dir) if data else None
            if job is None:  # a staging folder (never acknowledged), a torn or foreign leftover
                _remove(entry)
                counts["removed"] += 1
                continue
            remove_stale_temporaries(entry)
            if job.finished:
                expired = job.finished_at is None or time.time() - job.finished_at >= self.result_ttl_s
                lost = job.state is JobState.COMPLETED and not all(p.is_file() for p in job.outputs)
                if expired or lost:
                    _remove(entry)
                    counts["removed"] += 1
                else:
                    job.done.set()
                    self.register(job)
                    counts["kept"] += 1
                continue
            self.register(job)
            why = self._why_not_resumable(job)
            if why is not None:
                self.finish(job, JobState.FAILED, ApiError("job_interrupted", why))
                counts["failed"] += 1
                continue
            if job.state is not JobState.QUEUED:
                job.move_to(JobState.QUEUED)
            shutil.rmtree(job.files.out_partial, ignore_errors=True)
            job.files.out_partial.mkdir()
            self.try_save(job)
            resume.append(job)
            counts["resumed"] += 1
        tmp = tmp_root(self.data_dir)
        for entry in tmp.iterdir() if tmp.is_dir() else []:
            _remove(entry)
        resume.sort(key=lambda j: j.created_at)
        return resume, counts

    @staticmethod
    def _why_not_resumable(job: Job) -> str | None:
        if job.client_waits:
            return ("The service restarted while the job ran, and the connection that waited for it was lost; "
                    "send the request again.")
        if not job.files.source.is_file():
            return "The service restarted and the job's source file is gone; send the request again."
        if job.attempts >= MAX_ATTEMPTS:
            return (f"The job was interrupted by {job.attempts} restarts and is not resumed again; "
                    "send the request again.")
        return None


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)
