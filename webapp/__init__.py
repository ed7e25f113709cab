"""The ACE-Step lego stem web service (Flask). It never imports torch: generation runs in `runner`.

`create_app(settings=None)` reads the environment through `webapp.settings` (the only place that
does), checks it, locks the data folder, reconciles what a previous process left (orphaned
runners, unreleased GPU leases, unfinished jobs), starts the job worker and returns the WSGI app;
`wsgi.py` holds the instance gunicorn serves. Nothing is changed on disk before the data-folder
lock is held: a second service on the same folder is refused and touches nothing.
"""
from __future__ import annotations

__version__ = "0.1.0"

import atexit
import logging
import time

from flask import Flask, g, request

from webapp.settings import Settings, SettingsError  # noqa: F401 - re-exported for callers

log = logging.getLogger("acestep.webapp")
SIBLING_WORKER_WAIT_S = 60.0  # a reload's new worker waits this long for the old one to let go


def create_app(settings: Settings | None = None) -> Flask:
    from webapp import routes_analyze, routes_health, routes_lego
    from webapp.auth import install_api_key_check
    from webapp.checkpoints import inspect_checkpoints
    from webapp.data_lock import DataLock
    from webapp.errors import register_error_handlers
    from webapp.gpu_tokens import make_tokens
    from webapp.job_queue import JobManager, log_listener
    from webapp.job_runner import JobRunner
    from webapp.job_store import JobStore
    from webapp.journal import Journal
    from webapp.lease_keeper import LeaseKeeper
    from webapp.leases import Leases
    from webapp.logs import configure_logging, event
    from webapp.metrics import install_metrics
    from webapp.runner_process import RunnerRegistry
    from webapp.service import EXTENSION_KEY, PROJECT_ROOT, Service, runner_command
    from webapp.uploads import UploadRequest, jobs_root, tmp_root

    settings = settings if settings is not None else Settings.from_env()
    configure_logging(settings.log_format, settings.log_level)
    data_lock = DataLock(settings.data_dir, settings.port).acquire(wait_for_sibling_s=SIBLING_WORKER_WAIT_S)
    try:
        app = Flask(__name__)
        app.request_class = UploadRequest
        app.config["MAX_CONTENT_LENGTH"] = settings.max_upload_bytes
        app.config["MAX_FORM_MEMORY_SIZE"] = settings.max_field_bytes  # text fields; files are spooled to disk
        app.config["ACESTEP_TMP_DIR"] = str(tmp_root(settings.data_dir))
        app.json.sort_keys = False
        jobs_root(settings.data_dir).mkdir(parents=True, exist_ok=True)
        tmp_root(settings.data_dir).mkdir(parents=True, exist_ok=True)

        ckpt = inspect_checkpoints(settings.acestep_checkpoints, settings.acestep_engine, settings.acestep_config_path)
        tokens = make_tokens(settings)
        journal = Journal(settings.data_dir)
        registry = RunnerRegistry(journal)
        leases = Leases(tokens, journal, settings.runner_kill_grace_s, settings)
        keeper = LeaseKeeper(leases, journal, registry, settings.runner_kill_grace_s)
        reconciled = keeper.reconcile()  # orphans ended, dead holders' leases released: before any job runs
        store = JobStore(settings.data_dir, settings.result_ttl_s)
        store.add_listener(log_listener)
        resumed, recovered = store.recover()
        runner = JobRunner(settings, store, leases, registry, runner_command(settings), PROJECT_ROOT)
        jobs = JobManager(settings, store, runner)
        install_metrics(app, jobs)
        service = Service(settings=settings, jobs=jobs, tokens=tokens, checkpoints=ckpt, leases=leases, keeper=keeper,
                          data_lock=data_lock)
        app.extensions[EXTENSION_KEY] = service

        register_error_handlers(app)
        install_api_key_check(app, settings.api_key)
        app.register_blueprint(routes_lego.bp)
        app.register_blueprint(routes_health.bp)
        app.register_blueprint(routes_analyze.bp)
    except BaseException:
        data_lock.release()
        raise

    @app.before_request
    def _start_timer():
        g.t0 = time.perf_counter()

    @app.after_request
    def _headers_and_log(resp):
        resp.headers["X-ACEStep-Model"] = service.checkpoints.model_header
        took = time.perf_counter() - g.get("t0", time.perf_counter())
        event(logging.getLogger("acestep.webapp.http"), "request", method=request.method, path=request.path,
              status=resp.status_code, ms=round(took * 1000, 1), task_id=g.get("task_id"))
        return resp

    jobs.start(resumed)
    keeper.start()
    atexit.register(service.close, 10.0)

    event(log, "service_started", checkpoints=str(settings.acestep_checkpoints), engine=ckpt.engine,
          complete=ckpt.complete, model=ckpt.weights, gpu_tokens=tokens.backend,
          queue_url=settings.queue_url or None, data_dir=str(settings.data_dir), **recovered, **reconciled)
    if ckpt.demo:
        log.warning("demo: random weights: %s holds the tiny random demo checkpoint; its stems are noise, "
                    "not ACE-Step's model. Point ACESTEP_CHECKPOINTS at the real weights.", settings.acestep_checkpoints)
    if settings.redis_url:
        log.warning("REDIS_URL is set, but the RQ job queue is not built yet: jobs use the in-process queue")
    if not ckpt.complete:
        log.warning("checkpoint folder %s looks incomplete (missing: %s); jobs will fail until it is fixed",
                    settings.acestep_checkpoints, ", ".join(ckpt.missing))
    return app
