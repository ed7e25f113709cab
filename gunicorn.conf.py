"""gunicorn settings for the stem service: `gunicorn -c gunicorn.conf.py wsgi:app`.

- ONE worker process: jobs, their queue and their state live in that process's memory, and a
  status poll must reach the process that holds the job. The GPU runs one generation at a time
  anyway; HTTP concurrency comes from threads (gthread), and each waiting synchronous call holds
  one thread.
- No preload: the worker builds the app itself, so its job threads are not lost in a fork.
- A generation may take 10 minutes: gthread workers heartbeat from their main loop, so a long
  request does not trip `timeout`; `graceful_timeout` is the time a shutdown gives the cancelled
  jobs to answer their waiting clients.
- Shutdown (SIGTERM, SIGINT, restart): the worker stops taking jobs, fails the waiting ones
  (`service_shutting_down`, retryable), stops the running runner's process group and releases
  its GPU tokens after the runner has exited; then gunicorn lets in-flight answers go out.
"""
import os
import signal
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from webapp.settings import Settings, SettingsError  # noqa: E402  (torch-free)

try:
    _settings = Settings.from_env()
except SettingsError as _exc:
    # One clear sentence, then no start (not a traceback at the first request).
    print(f"acestep-stem-service: configuration error: {_exc}", file=sys.stderr, flush=True)
    sys.exit(2)

bind = f"0.0.0.0:{_settings.port}"
worker_class = "gthread"
workers = 1
threads = _settings.web_threads
preload_app = False
timeout = 120
graceful_timeout = 30
keepalive = 5
accesslog = None  # the app logs one line per request itself
errorlog = "-"
loglevel = _settings.log_level.lower()
proc_name = "acestep-stem-service"


def _job_manager(worker):
    app = getattr(worker, "wsgi", None)
    ext = getattr(app, "extensions", {}) if app is not None else {}
    service = ext.get("acestep")
    return service.jobs if service is not None else None


def post_worker_init(worker):
    """On SIGTERM/SIGINT/SIGQUIT, start cancelling jobs at once (in a thread: signal handlers stay
    short), while gunicorn stops accepting and waits for in-flight requests."""
    jobs = _job_manager(worker)
    if jobs is None:
        return
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        previous = signal.getsignal(sig)

        def handler(signum, frame, previous=previous):
            threading.Thread(target=jobs.shutdown, args=(graceful_timeout - 5,), name="jobs-shutdown", daemon=True).start()
            if callable(previous):
                previous(signum, frame)

        signal.signal(sig, handler)


def worker_exit(server, worker):
    """Last chance in the worker: make sure no runner outlives it and every token is released."""
    if worker.pid != os.getpid():
        return  # called in the master for a worker that is already gone
    jobs = _job_manager(worker)
    if jobs is not None:
        jobs.shutdown(timeout_s=15)
