"""The GPU host's RQ worker: RQ's own worker, adapted to a job that owns a GPU and a subprocess.

Why `SimpleWorker` (the job runs in the worker process) and not RQ's forking worker: the runner
started ahead, the warm model and the GPU tokens belong to the long-lived worker process, not to
a child forked per job; and RQ stops a forked job with SIGKILL to its process group, which would
orphan the runner (it leads its own session) and leak its tokens. What RQ's commands mean here:

- `stop-job` (`send_stop_job_command`, a web host's DELETE): cancel the job through the job
  manager: the runner's process group gets SIGTERM, then SIGKILL after RUNNER_KILL_GRACE_S, and
  the tokens go back once it has exited; the job then ends `cancelled`;
- warm shutdown (SIGTERM, SIGINT): the job manager shuts down as the one-host service does at a
  restart: the running job's runner is ended, its tokens released, and the job goes back to the
  front of the shared queue for the next GPU worker; then this one exits;
- `unload` (ours, on the same channel; POST /unload): end a keep-warm runner now.

Liveness: a heartbeat thread refreshes RQ's worker key, the running job's execution (its score
in the started-job registry, which expires WORKER_LOST_AFTER_S after the last beat) and the
status this worker publishes for /health. A worker killed with SIGKILL stops beating, so RQ's
abandoned-job cleanup fails its job `gpu_worker_lost`; its successor on the same data folder
(the same worker name) does so at once when it starts.
"""
from __future__ import annotations

import json
import logging
import threading

from rq.job import Job as RQJob
from rq.worker import SimpleWorker

from webapp.logs import event
from webapp.queue_rq import gpu_job
from webapp.queue_rq.cluster import worker_status_key
from webapp.queue_rq.connection import heartbeats_trustworthy
from webapp.queue_rq.records import Records
from webapp.queue_rq.web_queue import UNLOAD_COMMAND

log = logging.getLogger("acestep.webapp.rq")


class GpuWorker(SimpleWorker):
    def __init__(self, *args, runtime, lost_after_s: float, result_ttl_s: float, describe=None, **kwargs):
        beat = max(0.5, lost_after_s / 4)
        # RQ's idle loop beats once per dequeue wait (worker_ttl - 15 s): make that a quarter of the limit.
        kwargs.setdefault("worker_ttl", int(15 + max(1, beat)))
        kwargs.setdefault("maintenance_interval", max(2, int(lost_after_s)))
        super().__init__(*args, **kwargs)
        self.runtime = runtime
        self.lost_after_s = lost_after_s
        self.result_ttl_s = result_ttl_s
        self.beat_s = beat
        self.describe = describe or (lambda: {})
        self._stop_beating = threading.Event()
        self._beat_now = threading.Event()
        self._beater: threading.Thread | None = None
        self.stopping = False  # a stop signal arrived (not an error ending RQ's loop)
        runtime.on_cancelled = self._mark_stopped
        runtime.on_change = self._beat_now.set  # a job taken or ended: publish it at once

    # ---- liveness ----------------------------------------------------------------------------------

    def get_heartbeat_ttl(self, job, working_time: float = 0.0) -> int:
        """The started-job registry entry of a running job expires this long after the last beat."""
        return max(2, int(round(self.lost_after_s)))

    def clean_registries(self):
        """RQ's maintenance, which also fails jobs whose worker stopped beating; not in the first
        moments after a Redis restart, when every heartbeat it restored is old."""
        if heartbeats_trustworthy(self.connection, self.lost_after_s):
            super().clean_registries()

    def bootstrap(self, *args, **kwargs):
        self.recover_predecessor()
        super().bootstrap(*args, **kwargs)
        self._beater = threading.Thread(target=self._beat_loop, name="rq-heartbeat", daemon=True)
        self._beater.start()

    def teardown(self):
        self._stop_beating.set()
        self._beat_now.set()
        if self._beater is not None:
            self._beater.join(5)
        try:
            self.connection.delete(worker_status_key(self.name))
        finally:
            super().teardown()

    def _beat_loop(self) -> None:
        while not self._stop_beating.is_set():
            self._beat_now.wait(self.beat_s)
            self._beat_now.clear()
            if self._stop_beating.is_set():
                return
            try:
                self.beat()
            except Exception as exc:  # Redis restarting: the next beat tries again
                event(log, "heartbeat_failed", level=logging.WARNING, worker=self.name, error=type(exc).__name__)

    def beat(self) -> None:
        execution = self.execution
        job = self.get_current_job() if execution else None
        if job is not None:
            self.maintain_heartbeats(job, execution)
        else:
            self.heartbeat()
        status = {"job": self.runtime.current, **self.describe()}
        key = worker_status_key(self.name)
        with self.connection.pipeline() as pipe:
            pipe.delete(key)
            pipe.hset(key, mapping={k: json.dumps(v) for k, v in status.items()})
            pipe.expire(key, max(2, int(self.lost_after_s * 2)))
            pipe.execute()

    # ---- a SIGKILLed predecessor -------------------------------------------------------------------

    def recover_predecessor(self) -> list[str]:
        """Before registering: end what a previous process of this worker (same name, so same data
        folder, which only one live process may hold) left running. Its runner and tokens are the
        job runtime's to reclaim; its jobs fail `gpu_worker_lost`, in the record and in RQ."""
        records = Records(self.connection)
        lost = []
        marker = self.connection.get(self.runtime.marker_key)
        if marker:
            task_id = marker.decode()
            if gpu_job.mark_lost(records, task_id, int(self.result_ttl_s), "its worker was restarted"):
                lost.append(task_id)
        previous = SimpleWorker.find_by_key(self.key, connection=self.connection, serializer=self.serializer)
        if previous is not None and previous.death_date is None:
            for execution in previous.get_current_executions(refresh=True):
                if gpu_job.mark_lost(records, execution.job_id, int(self.result_ttl_s), "its worker was restarted"):
                    lost.append(execution.job_id)
                try:
                    job = RQJob.fetch(execution.job_id, connection=self.connection, serializer=self.serializer)
                except Exception:
                    continue
                queue = self.queue_class(job.origin, connection=self.connection, serializer=self.serializer)
                self.handle_job_failure(job, queue, exc_string="GPU worker lost: its successor found the job running",
                                        execution=execution)
            previous.register_death()
        self.connection.delete(self.runtime.marker_key)
        if lost or previous is not None:
            event(log, "worker_predecessor_recovered", level=logging.WARNING, worker=self.name, jobs_failed=lost)
        return lost

    # ---- commands ------------------------------------------------------------------------------------

    def kill_horse(self, sig=None):
        """RQ's stop-job: there is no horse; cancel the job (runner stopped, then tokens released),
        for the reason the web host wrote in the record before it sent the command."""
        self.runtime.cancel_current(None)

    def request_stop(self, signum, frame):
        self.stopping = True
        super().request_stop(signum, frame)

    def handle_warm_shutdown_request(self):
        super().handle_warm_shutdown_request()
        self.runtime.shut_down(self.runtime.settings.shutdown_budget_s)

    def handle_payload(self, message):
        payload = json.loads(message["data"].decode())
        if payload.get("command") == UNLOAD_COMMAND:
            event(log, "unload_requested", worker=self.name)
            self.runtime.jobs.request_unload()
            return
        super().handle_payload(message)

    def _mark_stopped(self, task_id: str) -> None:
        if self.get_current_job_id() == task_id:
            self._stopped_job_id = task_id  # RQ records the job STOPPED, not FAILED

    def handle_exception(self, job, *exc_info):
        if exc_info and exc_info[0] is gpu_job.JobEnded:
            return  # an ordinary end (failed or cancelled), already logged with the job's id
        super().handle_exception(job, *exc_info)
