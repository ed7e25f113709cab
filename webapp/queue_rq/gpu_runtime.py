"""One GPU host's job runtime: the service's own job code, driven one RQ job at a time.

The GPU worker runs exactly what a single-host service runs (webapp/host_jobs.py): the job
manager with this host's GPU tokens, the runner started ahead, keep-warm as configured, and
leases that release the tokens only after the runner has exited. This module is the seam
between it and Redis:

1. take the job (a checked transition: a job a web host has just cancelled is not taken);
2. fetch its source from Redis into a job folder on this host, built as the routes of one host
   build it, and hand the job to the job manager;
3. mirror the job's state, progress and GPU-queue position into its record while it runs, and
   watch the record for a cancel request (a web host's DELETE, or a client that went away);
4. when it ends: stems to Redis with the results' TTL, then the final state; the job folder on
   this host is removed (the GPU host keeps nothing a web host would need).

A shutdown of this worker (SIGTERM) interrupts the job as the one-host service does at a restart:
its runner is ended, its tokens released, and the job goes back to the front of the shared queue
(its source with it), where the next GPU worker takes it; after MAX_ATTEMPTS interruptions it
fails `job_interrupted`. Final writes outlast a Redis restart: retried for FINAL_WRITE_PATIENCE_S.
"""
from __future__ import annotations

import logging
import shutil
import socket
import threading
import time
from pathlib import Path

from webapp.errors import ApiError
from webapp.job_estimate import JobSeconds
from webapp.job_state import Job, JobState
from webapp.job_store import MAX_ATTEMPTS
from webapp.lego_params import LegoParams
from webapp.logs import event
from webapp.queue_rq import blobs
from webapp.queue_rq.connection import UNAVAILABLE_ERRORS
from webapp.queue_rq.records import (AVERAGE_KEY, JOB_SECONDS_KEY, LIVE_TTL_S, IllegalTransition, RecordState, Records, output_key,
                                     record_key, source_key)
from webapp.queue_rq.remote_job import error_fields
from webapp.uploads import JobFiles

log = logging.getLogger("acestep.webapp.rq")

MIRROR_S = 0.2
FINAL_WRITE_PATIENCE_S = 300.0
ENDINGS = {JobState.COMPLETED: RecordState.COMPLETED, JobState.FAILED: RecordState.FAILED,
           JobState.CANCELLED: RecordState.CANCELLED}
REQUEUED = "requeued"  # the summary state of a job put back in the queue


class GpuRuntime:
    def __init__(self, settings, conn, worker_name: str, jobs):
        """`jobs` is this host's job manager (webapp/host_jobs.py), started by the caller."""
        self.settings = settings
        self.conn = conn
        self.records = Records(conn)
        self.worker_name = worker_name
        self.host = socket.gethostname()
        self.jobs = jobs
        self.current: str | None = None
        self._lock = threading.Lock()
        self._interrupted = threading.Event()  # the current job was put back by the job manager's shutdown
        self.on_cancelled = None  # set by the RQ worker: marks the job stopped in RQ's terms
        self.on_change = lambda: None  # set by the RQ worker: publish this worker's status now
        jobs.add_listener(self._on_local_event)

    # ---- what the RQ worker calls -------------------------------------------------------------------

    def cancel_current(self, reason: str | None) -> bool:
        """Cancel the job in hand; without a reason, the one its record asks for."""
        with self._lock:
            task_id = self.current
        if task_id is None:
            return False
        if reason is None:
            try:
                raw = self.conn.hget(record_key(task_id), "cancel_requested")
            except UNAVAILABLE_ERRORS:
                raw = None
            reason = raw.decode() if raw else "cancelled by request"
        self.jobs.cancel(task_id, reason)
        return True

    def shut_down(self, timeout_s: float) -> None:
        """SIGTERM: stop the job manager (in a thread: this runs in a signal handler). Its running
        job's runner is ended and the job put back (`interrupted`); `run` then requeues it in RQ."""
        threading.Thread(target=self.jobs.shutdown, args=(timeout_s,), name="jobs-shutdown", daemon=True).start()

    def run(self, task_id: str) -> dict:
        try:
            self.records.transition(task_id, RecordState.TAKEN, {"worker": self.worker_name, "host": self.host,
                                                                 "gpu_wait": True}, only_from=frozenset({RecordState.QUEUED}),
                                    ttl_s=LIVE_TTL_S)
        except IllegalTransition as exc:  # cancelled (or expired) before a GPU worker got to it
            event(log, "job_skipped", job_id=task_id, state=exc.current.value if exc.current else "missing")
            return {"task_id": task_id, "state": "skipped"}
        self._persist(lambda: self.conn.set(self.marker_key, task_id))
        with self._lock:
            self.current = task_id
            self._interrupted.clear()
        self.on_change()
        try:
            return self._run_taken(task_id)
        finally:
            with self._lock:
                self.current = None
            self._persist(lambda: self.conn.delete(self.marker_key))
            self.on_change()

    @property
    def marker_key(self) -> str:
        """This worker's job in progress, kept without TTL: its successor finds it after a SIGKILL."""
        return f"acestep:worker:{self.worker_name}:job"

    # ---- one job ------------------------------------------------------------------------------------

    def _run_taken(self, task_id: str) -> dict:
        rec = self.records.get(task_id)
        timings = {**rec.timings, "rq_wait_s": max(0.0, time.time() - rec.created_at)}
        files = JobFiles(self.settings.data_dir, task_id)
        job = Job(id=task_id, params=LegoParams(**rec.params), files=files, duration_s=rec.duration_s,
                  sample_rate=rec.sample_rate, protocol=rec.protocol)
        t0 = time.perf_counter()
        try:  # the job's folder as the routes of one host build it: source, empty output folder, record
            staging = files.begin()
            blobs.get_file(self.conn, source_key(task_id), rec.source_bytes, staging / "source.wav")
            (staging / "out.partial").mkdir()
            self.jobs.store.save(job, folder=staging)
            files.commit()
        except (blobs.BlobMissing, OSError) as exc:
            files.discard()
            message = ("The job's upload is no longer in the queue; send it again." if isinstance(exc, blobs.BlobMissing)
                       else "The job's upload could not be brought to the GPU host; send it again.")
            return self._end(task_id, RecordState.FAILED, ApiError("internal_error", message, retryable=True), timings)
        timings["fetch_source_s"] = time.perf_counter() - t0
        self._persist(lambda: self.conn.delete(source_key(task_id)))  # on this host now: free Redis's memory
        job.timings.update(timings)
        self._persist(lambda: self.conn.hincrby(record_key(task_id), "attempts", 1))
        try:
            self.jobs.submit(job)
            self._mirror_until_done(job)
        except ApiError:  # the job manager is shutting down: the job never started here
            self._interrupted.set()
        except BaseException:  # RQ's backstop timeout, or a bug: never leave the runner behind
            self.jobs.cancel(task_id, "worker error")
            job.done.wait()
            self._forget(job)
            raise
        try:
            if not job.finished:
                return self._requeue(job, rec.attempts + 1)
            return self._finish(job, ENDINGS[job.state])
        finally:
            self._forget(job)

    def _on_local_event(self, name: str, job: Job, fields: dict) -> None:
        if name == "interrupted" and job.id == self.current:
            self._interrupted.set()

    def _forget(self, job: Job) -> None:
        """The job folder on this host goes once the job has ended (its stems are in Redis)."""
        self.jobs.forget(job.id)
        shutil.rmtree(job.files.dir, ignore_errors=True)

    def _stopped_here(self, job: Job) -> bool:
        """The job ended, or was put back by the shutdown after its runner exited (or never started)."""
        return job.finished or self._interrupted.is_set() or (not self.jobs.accepting and not self.jobs.worker_alive)

    def _mirror_until_done(self, job: Job) -> None:
        last: dict = {}
        running = False
        while not self._stopped_here(job):
            job.done.wait(MIRROR_S)
            if self._stopped_here(job):
                return
            fields = {"progress": job.progress, "stage": job.stage or "", "step": job.step, "total_steps": job.total_steps,
                      "gpu_wait": job.gpu_wait, "gpu_position": job.gpu_position, "gpu_message": job.gpu_message or "",
                      "runner_pid": job.runner_pid}
            try:
                if not running and job.state is JobState.RUNNING:
                    self.records.transition(job.id, RecordState.RUNNING, {**fields, "run_started_at": f"{time.time():.6f}"},
                                            only_from=frozenset({RecordState.TAKEN}))
                    running, last = True, fields
                elif fields != last:
                    if not self.records.update(job.id, {k: v for k, v in fields.items() if last.get(k) != v}):
                        raise IllegalTransition(job.id, "", RecordState.RUNNING)
                    last = fields
                reason = self.conn.hget(record_key(job.id), "cancel_requested")
            except IllegalTransition:
                # The record ended without us (a web host declared this worker lost, or it expired).
                self.jobs.cancel(job.id, "the job's record ended elsewhere")
                continue
            except UNAVAILABLE_ERRORS:
                continue  # Redis restarting: the job goes on; the record catches up when it is back
            if reason and not job.cancel.is_set():
                self.jobs.cancel(job.id, reason.decode())

    def _requeue(self, job: Job, attempts: int) -> dict:
        """Put an interrupted job back at the front of the shared queue (RQ re-enqueues it)."""
        if attempts >= MAX_ATTEMPTS or not job.files.source.is_file():
            return self._end(job.id, RecordState.FAILED, ApiError(
                "job_interrupted", f"GPU workers stopped {attempts} times while the job ran; send the request again."),
                job.timings)
        self._persist(lambda: blobs.put_file(self.conn, source_key(job.id), job.files.source, ttl_s=LIVE_TTL_S))
        fields = {"worker": "", "host": "", "progress": 0, "stage": "", "step": "", "total_steps": "", "gpu_wait": False,
                  "gpu_position": "", "gpu_message": "", "runner_pid": "", "run_started_at": ""}

        def write():
            try:
                self.records.transition(job.id, RecordState.QUEUED, fields, ttl_s=LIVE_TTL_S)
            except IllegalTransition:
                pass  # cancelled or declared lost meanwhile: that answer stands
        self._persist(write)
        event(log, "rq_job_requeued", job_id=job.id, worker=self.worker_name, attempts=attempts)
        return {"task_id": job.id, "state": REQUEUED}

    def _finish(self, job: Job, state: RecordState) -> dict:
        timings = job.timings
        if state is RecordState.COMPLETED:
            sizes = []
            t0 = time.perf_counter()
            try:
                for i, path in enumerate(job.outputs):
                    sizes.append(self._persist(lambda i=i, path=path: blobs.put_file(
                        self.conn, output_key(job.id, i), Path(path), ttl_s=int(self.settings.result_ttl_s))))
            except (OSError, ValueError) as exc:
                event(log, "output_upload_failed", level=logging.ERROR, job_id=job.id, error=str(exc)[:200])
                return self._end(job.id, RecordState.FAILED, ApiError("internal_error"), timings)
            timings["store_outputs_s"] = time.perf_counter() - t0
            self._update_average(job)
            return self._end(job.id, RecordState.COMPLETED, None, timings, result=job.result, output_sizes=sizes,
                             progress=100)
        if state is RecordState.CANCELLED and self.on_cancelled is not None:
            self.on_cancelled(job.id)
        return self._end(job.id, state, job.error or ApiError("internal_error"), timings)

    def _end(self, task_id: str, state: RecordState, error: ApiError | None, timings: dict, **fields) -> dict:
        code = error.code if error else "none"
        values = {**fields, "finished_at": f"{time.time():.6f}",
                  "timings": {k: round(v, 4) for k, v in timings.items() if isinstance(v, (int, float))}}
        if error is not None:
            values["error"] = error_fields(error)

        def write():
            try:
                self.records.transition(task_id, state, values, ttl_s=int(self.settings.result_ttl_s),
                                        stats_field=f"{self.host}|{state.value}|{code}")
            except IllegalTransition:
                pass  # it ended elsewhere first (declared lost): that answer stands
            self.conn.delete(source_key(task_id))

        self._persist(write)
        event(log, "rq_job_ended", job_id=task_id, state=state.value, error_code=code, worker=self.worker_name,
              timings=values["timings"])
        return {"task_id": task_id, "state": state.value, "error_code": None if error is None else code}

    def _update_average(self, job: Job) -> None:
        """The cluster's figures for estimates: the average job, and seconds per second of source."""
        seconds = job.timings.get("runner_s")
        if not seconds:
            return
        raw = self.conn.get(AVERAGE_KEY)
        previous = float(raw) if raw else float(seconds)
        self.conn.set(AVERAGE_KEY, f"{0.7 * previous + 0.3 * float(seconds):.3f}")

        def learn(pipe) -> None:  # read, learn, write back; redone if another host wrote meanwhile
            figures = JobSeconds.from_fields(pipe.hgetall(JOB_SECONDS_KEY), self.demo)
            figures.learn(float(seconds), job.duration_s)
            pipe.multi()
            pipe.hset(JOB_SECONDS_KEY, mapping=figures.fields())

        self.conn.transaction(learn, JOB_SECONDS_KEY)

    @property
    def demo(self) -> bool:
        return self.jobs.runner.demo

    def _persist(self, write):
        """Run a write, retrying while Redis is unreachable (a restart), for FINAL_WRITE_PATIENCE_S."""
        deadline = time.monotonic() + FINAL_WRITE_PATIENCE_S
        delay = 0.2
        while True:
            try:
                return write()
            except UNAVAILABLE_ERRORS as exc:
                if time.monotonic() > deadline:
                    event(log, "redis_write_gave_up", level=logging.ERROR, error=str(exc)[:200])
                    raise
                time.sleep(delay)
                delay = min(5.0, delay * 2)
