"""`python -m webapp.worker`: the GPU worker of the multi-host mode, one per GPU host.

It takes lego jobs from the RQ queue in REDIS_URL and runs them with this host's checkpoints,
GPU tokens (QUEUE_URL or GPU_LOCK_FILE) and runner, exactly as the single-host service does
(webapp/queue_rq/gpu_runtime.py), publishing progress and results back through Redis. It reads
the same settings as the web service; the web hosts need the same REDIS_URL (and RESULT_TTL_S,
MAX_QUEUED_JOBS) and nothing else in common with it.

Its DATA_DIR holds the job in progress, the lease journal and its name in the queue
(`gpu-worker.json`, kept across restarts so a successor can end what a killed predecessor left);
one worker per DATA_DIR (the data-folder lock). Stop it with SIGTERM: the running job's runner is
ended and its tokens released, the job goes back to the front of the queue for the next GPU
worker, and this one leaves the queue.

`python -m webapp.worker --check` (the container's health check) exits 0 when this DATA_DIR's
worker has sent a heartbeat to Redis within WORKER_LOST_AFTER_S, else 1 with a sentence.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import sys
from pathlib import Path

from webapp.settings import Settings, SettingsError

NAME_FILE = "gpu-worker.json"


def worker_name(data_dir: Path) -> str:
    """This data folder's worker name: made once (host name + random), then kept."""
    path = data_dir / NAME_FILE
    try:
        name = json.loads(path.read_text())["name"]
        if isinstance(name, str) and name:
            return name
    except (OSError, ValueError, KeyError, TypeError):
        pass
    name = f"{socket.gethostname()}.{secrets.token_hex(4)}"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"name": name}))
    os.replace(tmp, path)
    return name


def check(settings: Settings) -> int:
    from webapp.queue_rq.cluster import workers
    from webapp.queue_rq.connection import UNAVAILABLE_ERRORS, connect

    try:
        name = json.loads((settings.data_dir / NAME_FILE).read_text())["name"]
    except (OSError, ValueError, KeyError):
        print("no GPU worker has started on this DATA_DIR yet", file=sys.stderr)
        return 1
    try:
        found = {w.name: w for w in workers(connect(settings.redis_url), settings.worker_lost_after_s)}
    except UNAVAILABLE_ERRORS as exc:
        print(f"Redis at REDIS_URL cannot be reached ({type(exc).__name__})", file=sys.stderr)
        return 1
    me = found.get(name)
    if me is None or not me.alive:
        print(f"GPU worker {name} has sent no heartbeat within {settings.worker_lost_after_s:g} s", file=sys.stderr)
        return 1
    print(f"GPU worker {name}: {me.state}, last heartbeat {me.heartbeat_age_s} s ago")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv not in ([], ["--check"]):
        print("usage: python -m webapp.worker [--check]", file=sys.stderr)
        return 2
    try:
        settings = Settings.from_env()
        if not settings.redis_url:
            raise SettingsError("REDIS_URL is not set; the GPU worker takes its jobs from the RQ queue in that Redis.")
        if argv == ["--check"]:
            return check(settings)
        settings.check_checkpoint_folder()
        # The job manager here holds the job RQ gave it and at most one more (the next may arrive
        # while the previous job's runner is still being ended).
        embedded = Settings.from_env({**os.environ, "MAX_QUEUED_JOBS": "1"})
        from webapp.data_lock import DataLock

        data_lock = DataLock(settings.data_dir).acquire()
    except SettingsError as exc:  # DataFolderInUse is one: another GPU worker has this DATA_DIR
        print(f"acestep GPU worker: configuration error: {exc}", file=sys.stderr, flush=True)
        return 2
    try:
        return _serve(settings, embedded, data_lock)
    finally:
        data_lock.release()


def _serve(settings: Settings, embedded: Settings, data_lock) -> int:
    from rq.serializers import JSONSerializer

    from webapp.host_jobs import build
    from webapp.logs import configure_logging, event
    from webapp.queue_rq import gpu_job
    from webapp.queue_rq.cluster import rq_queue
    from webapp.queue_rq.connection import connect
    from webapp.queue_rq.gpu_runtime import GpuRuntime
    from webapp.queue_rq.gpu_worker import GpuWorker
    from webapp.queue_rq.web_app import checkpoint_report
    from webapp.uploads import jobs_root, tmp_root

    configure_logging(settings.log_format, settings.log_level)
    log = logging.getLogger("acestep.webapp.worker")
    # What a killed predecessor left on this host goes first: its runner is ended and its lease
    # released (the journal), its job folders removed; its jobs in the queue are failed below.
    service, _, found = build(embedded, data_lock, resume=False)
    jobs_root(settings.data_dir).mkdir(parents=True, exist_ok=True)
    tmp_root(settings.data_dir).mkdir(parents=True, exist_ok=True)
    name = worker_name(settings.data_dir)
    conn = connect(settings.redis_url, socket_timeout_s=None)
    jobs, ckpt = service.jobs, service.checkpoints
    runtime = GpuRuntime(settings, conn, name, jobs)
    gpu_job.install(runtime)

    def describe() -> dict:
        return {"host": socket.gethostname(), "tokens_held": jobs.tokens_held(), "warm": jobs.warm_state()["loaded"],
                "checkpoints": checkpoint_report(ckpt), "token_backend": service.tokens.backend}

    event(log, "gpu_worker_started", worker=name, model=ckpt.weights, gpu_tokens=service.tokens.backend,
          data_dir=str(settings.data_dir), **found)
    jobs.start()
    service.keeper.start()
    try:
        while True:
            worker = GpuWorker([rq_queue(conn)], name=name, connection=conn, serializer=JSONSerializer, runtime=runtime,
                               lost_after_s=settings.worker_lost_after_s, result_ttl_s=settings.result_ttl_s,
                               describe=describe, default_result_ttl=int(settings.result_ttl_s), log_job_description=False)
            worker.work(logging_level=settings.log_level)
            if worker.stopping:
                break
            # RQ's loop ends on an error it does not retry (Redis lost at a bad moment, between jobs):
            # wait for Redis, then register again under the same name.
            event(log, "gpu_worker_rejoining", level=logging.WARNING, worker=name)
            if not wait_for_redis(conn, worker):
                break
    finally:
        service.close(settings.shutdown_budget_s)
    return 0


def wait_for_redis(conn, worker) -> bool:
    """Ping Redis with a growing pause until it answers (True) or a stop signal arrives (False)."""
    import time

    from rq.exceptions import StopRequested

    from webapp.queue_rq.connection import UNAVAILABLE_ERRORS

    delay = 0.5
    while not worker.stopping:
        try:
            conn.ping()
            return True
        except UNAVAILABLE_ERRORS:
            pass
        try:
            time.sleep(delay)
        except StopRequested:
            return False
        delay = min(10.0, delay * 2)
    return False


if __name__ == "__main__":
    sys.exit(main())
