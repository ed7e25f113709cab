"""The web tier's side of the RQ job queue: admit, store, enqueue, read, cancel, forget.

It answers the questions the HTTP code asks of the in-process queue (room left, position,
estimated wait, cancel, the job's state) from Redis, so every gunicorn worker on every web host
answers the same for every job. A web host keeps nothing: the decoded upload goes to Redis
(webapp/queue_rq/blobs.py) and the job folder on this host is removed before the answer.

Acknowledging a job is one MULTI/EXEC transaction (its record, its index entry and RQ's enqueue),
watched against the queued-jobs index so the limit MAX_QUEUED_JOBS holds across all hosts: the
client hears "queued" only once Redis has all of the job, and nothing of a refused one stays.
Cancel of a job no GPU worker has taken is a checked transition here; a taken one is stopped by
its GPU worker, told through RQ's `send_stop_job_command` (and a `cancel_requested` field it also
polls, in case the pub/sub message is lost); the caller then waits for the record to end.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import socket
import threading
import time

import redis
from rq.callbacks import Callback
from rq.command import send_command, send_stop_job_command
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job as RQJob
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.timeouts import BaseDeathPenalty

from webapp.errors import ApiError
from webapp.job_estimate import JobSeconds
from webapp.logs import event
from webapp.queue_rq import blobs, cluster
from webapp.queue_rq.connection import heartbeats_trustworthy
from webapp.queue_rq.records import (AVERAGE_KEY, JOB_SECONDS_KEY, LIVE, LIVE_TTL_S, QUEUE_NAME, IllegalTransition, RecordState, Records,
                                     index_key, output_key, record_key, source_key)
from webapp.queue_rq.remote_job import RemoteJob, error_fields

log = logging.getLogger("acestep.webapp.rq")

JOB_FUNCTION = "webapp.queue_rq.gpu_job.run"
FAILURE_CALLBACK = "webapp.queue_rq.gpu_job.on_failure"
DEFAULT_JOB_SECONDS = 60.0
FIGURES_CACHE_S = 1.0
ADMIT_ATTEMPTS = 50
UNLOAD_COMMAND = "unload"  # a command of our own on RQ's worker channel (webapp/queue_rq/gpu_worker.py)
NO_HOST = "-"  # the host of a job that ended before any GPU worker took it


class NoDeathPenalty(BaseDeathPenalty):
    """RQ's abandoned-job cleanup runs our failure callback under a "death penalty"; its default is
    SIGALRM, which only the main thread may use, and a web request runs in a gthread thread. The
    callback is two short Redis calls with their own socket timeouts, so no alarm is needed."""

    def setup_death_penalty(self):
        pass

    def cancel_death_penalty(self):
        pass


class _NoLocalRecord:
    """The routes write a job's record into its folder before queueing it (the one-host store); a
    web host of the RQ mode keeps no record on disk: `submit` writes it to Redis."""

    def save(self, job, folder=None) -> None:
        pass


class RedisJobs:
    def __init__(self, settings, conn: redis.Redis):
        self.settings = settings
        self.conn = conn
        self.records = Records(conn)
        self.queue = cluster.rq_queue(conn)
        self.started = StartedJobRegistry(QUEUE_NAME, connection=conn, serializer=JSONSerializer,
                                          death_penalty_class=NoDeathPenalty)
        self.host = socket.gethostname()
        self._figures: tuple[float, dict] | None = None
        self._figures_lock = threading.Lock()
        self._last_reap = 0.0
        self.store = _NoLocalRecord()

    # ---- lifecycle (the in-process queue's interface; a web host owns no worker) ------------------

    worker_alive = False
    accepting = True

    def start(self, resumed=()) -> None:
        pass

    def shutdown(self, timeout_s: float = 30.0) -> None:
        pass

    def add_listener(self, listener) -> None:
        pass  # transitions happen on the GPU workers; /metrics reads their counts from Redis

    # ---- admission ---------------------------------------------------------------------------------

    def _capacity(self) -> int:
        """Jobs that may be live at once: one running per GPU worker alive, MAX_QUEUED_JOBS waiting."""
        return self.settings.max_queued_jobs + max(1, self.figures()["workers_alive"])

    def _live_count(self, pipe) -> int:
        return sum(int(pipe.zcard(index_key(s))) for s in LIVE)

    def has_room(self) -> bool:
        """Checked before an upload is probed; `submit` checks again, atomically."""
        with self.conn.pipeline(transaction=False) as pipe:
            for s in LIVE:
                pipe.zcard(index_key(s))
            return sum(int(n) for n in pipe.execute()) < self._capacity()

    def raise_queue_full(self) -> None:
        retry = self.retry_after_s()
        raise ApiError("queue_full", f"{self.queue.count} jobs are already waiting; retry in about {retry} s.",
                       headers={"Retry-After": str(retry)})

    def submit(self, job) -> RemoteJob:
        """Move an accepted upload (a job with its files on this host) into Redis and enqueue it.
        The local job folder is removed whatever happens."""
        try:
            t0 = time.perf_counter()
            size = blobs.put_file(self.conn, source_key(job.id), job.files.source, ttl_s=LIVE_TTL_S)
            job.timings["store_source_s"] = time.perf_counter() - t0
            try:
                self._enqueue(job, size)
            except BaseException:
                self.conn.delete(source_key(job.id))
                raise
        finally:
            job.files.discard()
        event(log, "job_queued", job_id=job.id, track=job.params.track, duration_s=round(job.duration_s, 3),
              protocol=job.protocol, source_bytes=size, web_host=self.host)
        return self.get(job.id)

    def _enqueue(self, job, source_bytes: int) -> None:
        s = self.settings
        now = time.time()
        record = {"state": RecordState.QUEUED.value, "created_at": f"{now:.6f}", "protocol": job.protocol,
                  "params": _json(dataclasses.asdict(job.params)), "duration_s": repr(job.duration_s),
                  "sample_rate": str(job.sample_rate), "source_bytes": str(source_bytes),
                  "timings": _json({k: round(v, 4) for k, v in job.timings.items()})}
        capacity = self._capacity()
        for _ in range(ADMIT_ATTEMPTS):
            with self.conn.pipeline() as pipe:
                try:
                    pipe.watch(index_key(RecordState.QUEUED))
                    if self._live_count(pipe) >= capacity:
                        pipe.unwatch()
                        self.raise_queue_full()
                    pipe.multi()
                    pipe.hset(record_key(job.id), mapping=record)
                    pipe.expire(record_key(job.id), LIVE_TTL_S)
                    pipe.zadd(index_key(RecordState.QUEUED), {job.id: now})
                    self.queue.enqueue_call(
                        JOB_FUNCTION, args=(job.id,), job_id=job.id, description=f"lego {job.params.track} {job.id}",
                        timeout=int(s.queue_wait_timeout_s + s.job_timeout_s + 300), ttl=LIVE_TTL_S,
                        result_ttl=int(s.result_ttl_s), failure_ttl=int(s.result_ttl_s),
                        on_failure=Callback(FAILURE_CALLBACK), meta={"web_host": self.host}, pipeline=pipe)
                    pipe.execute()
                    return
                except redis.WatchError:
                    continue  # another host admitted or a worker took a job meanwhile: count again
        raise ApiError("queue_unavailable", "The job queue is too busy to admit the job right now; retry in a few seconds.")

    # ---- reading -----------------------------------------------------------------------------------

    def get(self, task_id: str) -> RemoteJob | None:
        rec = self.records.get(task_id)
        if rec is None:
            return None
        if rec.state in (RecordState.TAKEN, RecordState.RUNNING) and self._reap_lost():
            rec = self.records.get(task_id) or rec
        return RemoteJob(self, rec)

    def _reap_lost(self) -> bool:
        """Fail jobs whose GPU worker stopped sending heartbeats (RQ's abandoned-job cleanup runs our
        failure callback). Cheap (one sorted-set range) and at most once a second per process."""
        now = time.monotonic()
        if now - self._last_reap < 1.0:
            return False
        self._last_reap = now
        if not self.started.get_expired_job_ids():
            return False
        if not heartbeats_trustworthy(self.conn, self.settings.worker_lost_after_s):
            return False  # Redis has just restarted: the workers have not beaten since
        self.started.cleanup()
        return True

    def position(self, job: RemoteJob) -> int:
        """1 = next to be taken by a GPU worker; a job a worker holds shows the GPU queue's position."""
        if job.record.state is RecordState.QUEUED:
            pos = self.queue.get_job_position(job.id)
            return 1 if pos is None else pos + 1
        if job.gpu_wait:
            return job.gpu_position or 1
        return 0

    def estimated_wait_s(self, job: RemoteJob) -> int:
        figures = self.figures()
        workers = max(1, figures["workers_alive"])
        busy = figures["jobs"].get(RecordState.TAKEN.value, 0) + figures["jobs"].get(RecordState.RUNNING.value, 0)
        ahead = max(self.position(job) - 1, 0) if job.record.state is RecordState.QUEUED else 0
        rounds = (ahead + busy) // workers
        return int(math.ceil(rounds * self.job_s(job)))  # the jobs ahead as long as this one

    def estimated_remaining_s(self, job: RemoteJob) -> int:
        started = job.record.run_started_at
        if started is None:
            return int(self.job_s(job))
        return int(max(1.0, self.job_s(job) - (time.time() - started)))

    def job_s(self, job: RemoteJob) -> float:
        """Its whole run, from its source's length: the figures every GPU host's jobs taught (in Redis),
        or the live workers' model's own until one finished (webapp/job_estimate.py)."""
        workers = [w for w in self.figures()["workers"] if w["alive"]]
        demo = any((w["status"].get("checkpoints") or {}).get("demo") for w in workers)
        return JobSeconds.from_fields(self.conn.hgetall(JOB_SECONDS_KEY), demo).of(job.duration_s)

    def retry_after_s(self) -> int:
        workers = max(1, self.figures()["workers_alive"])
        return int(min(3600, max(1, math.ceil(self.average_job_s() * (self.queue.count + 1) / workers))))

    def average_job_s(self) -> float:
        raw = self.conn.get(AVERAGE_KEY)
        try:
            return float(raw) if raw else DEFAULT_JOB_SECONDS
        except ValueError:
            return DEFAULT_JOB_SECONDS

    def figures(self) -> dict:
        """The cluster's snapshot, cached a second per process (several per request read it)."""
        with self._figures_lock:
            if self._figures and time.monotonic() - self._figures[0] < FIGURES_CACHE_S:
                return self._figures[1]
        snap = cluster.snapshot(self.conn, self.settings.worker_lost_after_s, self.settings.result_ttl_s)
        with self._figures_lock:
            self._figures = (time.monotonic(), snap)
        return snap

    def snapshot(self) -> dict:
        snap = self.figures()
        jobs = snap["jobs"]
        return {"backend": "rq", "queued": jobs[RecordState.QUEUED.value] + jobs[RecordState.TAKEN.value],
                "running": jobs[RecordState.RUNNING.value],
                "kept": sum(jobs[s.value] for s in (RecordState.COMPLETED, RecordState.FAILED, RecordState.CANCELLED)),
                "max_queued": self.settings.max_queued_jobs, "accepting": True,
                "average_job_s": round(self.average_job_s(), 1), "tokens_held": self.tokens_held(),
                "runner_pid": None, "warm": {"loaded": any(w["status"].get("warm") for w in snap["workers"] if w["alive"])},
                "cluster": snap}

    def tokens_held(self) -> int:
        return sum(h["tokens_held"] for h in self.figures()["hosts"].values())

    # ---- cancel and delete ---------------------------------------------------------------------------

    def cancel(self, task_id: str, reason: str) -> RemoteJob | None:
        """Cancel a job wherever it is; a running one is stopped by its GPU worker (wait on `done`)."""
        rec = self.records.get(task_id)
        if rec is None or rec.state.finished:
            return RemoteJob(self, rec) if rec else None
        error = ApiError("job_cancelled", f"The job was cancelled ({reason}) before it started.")
        try:
            self.records.transition(task_id, RecordState.CANCELLED,
                                    {"error": error_fields(error), "finished_at": f"{time.time():.6f}",
                                     "cancel_requested": reason},
                                    only_from=frozenset({RecordState.QUEUED}), ttl_s=int(self.settings.result_ttl_s),
                                    stats_field=f"{NO_HOST}|cancelled|job_cancelled")
        except IllegalTransition as exc:
            if exc.current in (RecordState.TAKEN, RecordState.RUNNING):
                self.records.update(task_id, {"cancel_requested": reason}, states={RecordState.TAKEN, RecordState.RUNNING})
                try:
                    send_stop_job_command(self.conn, task_id, serializer=JSONSerializer)
                except (InvalidJobOperation, NoSuchJobError):
                    pass  # not started in RQ's eyes yet: the worker reads `cancel_requested` when it takes it
                event(log, "job_cancel_sent", job_id=task_id, reason=reason, worker=rec.worker)
        else:
            self._drop_from_rq(task_id)
            self.conn.delete(source_key(task_id))
            event(log, "job_cancelled", job_id=task_id, reason=reason, state="queued")
        return self.get(task_id)

    def _drop_from_rq(self, task_id: str) -> None:
        try:
            RQJob.fetch(task_id, connection=self.conn, serializer=JSONSerializer).cancel()
        except (NoSuchJobError, InvalidJobOperation):
            pass

    def forget(self, task_id: str) -> bool:
        """Delete a finished job's record and stems now (DELETE on a finished job)."""
        rec = self.records.get(task_id)
        if rec is None or not rec.state.finished:
            return False
        with self.conn.pipeline() as pipe:
            pipe.delete(record_key(task_id), source_key(task_id),
                        *(output_key(task_id, i) for i in range(len(rec.output_sizes))))
            pipe.zrem(index_key(rec.state), task_id)
            pipe.execute()
        event(log, "job_deleted", job_id=task_id)
        return True

    def request_unload(self) -> bool:
        """POST /unload: every GPU worker with a warm model ends it (RQ's worker command channel)."""
        alive = [w for w in self.figures()["workers"] if w["alive"]]
        for w in alive:
            send_command(self.conn, w["name"], UNLOAD_COMMAND)
        return any(w["status"].get("warm") for w in alive)


def _json(value) -> str:
    return json.dumps(value, separators=(",", ":"))
