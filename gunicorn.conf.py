"""gunicorn settings for the stem service: `gunicorn -c gunicorn.conf.py wsgi:app`.

- ONE worker process: the answers to status polls live in that process's memory (and its job
  records on disk, so a restart loses nothing), and a poll must reach the process that holds the
  job. The GPU runs one generation at a time anyway; HTTP concurrency comes from threads
  (gthread), and each waiting synchronous call holds one thread. With REDIS_URL (the RQ mode,
  docs/SCALE_OUT.md) jobs live in Redis and WEB_WORKERS processes answer alike.
- A data folder belongs to one service: when another holds DATA_DIR, this one stops before it
  binds, with a sentence naming the holder (the worker takes the lock itself: webapp/data_lock.py).
- No preload: the worker builds the app itself, so its job threads are not lost in a fork.
- A generation may take 10 minutes: gthread workers heartbeat from their main loop, so a long
  request does not trip `timeout`. `graceful_timeout` is derived from the settings
  (`Settings.shutdown_budget_s`: a runner that ignores SIGTERM gets RUNNER_KILL_GRACE_S, then
  SIGKILL, then the release), so no setting can make the master give up before its runner is gone.
- Shutdown (SIGTERM, SIGINT, restart): the worker stops taking jobs, stops the running runner's
  process group and releases its GPU tokens after the runner has exited. Jobs whose client waits
  on the connection fail `service_shutting_down` (retryable); the others stay queued on disk and
  resume at the next start. Then gunicorn lets in-flight answers go out.
- A worker killed outright (SIGKILL, the OOM killer) is replaced by the master; its runner ends
  by itself (parent-death signal) and the new worker reconciles the lease journal before its
  first job: orphans are killed, leases released, interrupted jobs resumed.
"""
import math
import os
import signal
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from webapp.data_lock import check_free  # noqa: E402  (torch-free)
from webapp.settings import Settings, SettingsError  # noqa: E402  (torch-free)

try:
    _settings = Settings.from_env()
except SettingsError as _exc:
    # One clear sentence, then no start (not a traceback at the first request).
    print(f"acestep-stem-service: configuration error: {_exc}", file=sys.stderr, flush=True)
    sys.exit(2)
_busy = None if _settings.redis_url else check_free(_settings.data_dir)  # the RQ web tier locks no folder
if _busy:
    print(f"acestep-stem-service: {_busy}", file=sys.stderr, flush=True)
    sys.exit(2)

bind = f"0.0.0.0:{_settings.port}"
worker_class = "gthread"
workers = _settings.web_workers  # 1 unless REDIS_URL is set (the settings check refuses more without it)
threads = _settings.web_threads
preload_app = False
timeout = 120
graceful_timeout = max(30, math.ceil(_settings.shutdown_budget_s) + 5)
keepalive = 5
accesslog = None  # the app logs one line per request itself
errorlog = "-"
loglevel = _settings.log_level.lower()
proc_name = "acestep-stem-service"


def _service(worker):
    app = getattr(worker, "wsgi", None)
    ext = getattr(app, "extensions", {}) if app is not None else {}
    return ext.get("acestep")


def post_worker_init(worker):
    """On SIGTERM/SIGINT/SIGQUIT, start the shutdown at once (in a thread: signal handlers stay
    short), while gunicorn stops accepting and waits for in-flight requests."""
    service = _service(worker)
    if service is None:
        return
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        previous = signal.getsignal(sig)

        def handler(signum, frame, previous=previous):
            threading.Thread(target=service.close, args=(_settings.shutdown_budget_s,), name="service-shutdown",
                             daemon=True).start()
            if callable(previous):
                previous(signum, frame)

        signal.signal(sig, handler)


def worker_exit(server, worker):
    """Last chance in the worker: make sure no runner outlives it and every token is released."""
    if worker.pid != os.getpid():
        return  # called in the master for a worker that is already gone
    service = _service(worker)
    if service is not None:
        service.close(_settings.shutdown_budget_s)
