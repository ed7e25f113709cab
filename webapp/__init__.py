"""The ACE-Step lego stem web service (Flask). It never imports torch: generation runs in `runner`.

`create_app(settings=None)` reads the environment through `webapp.settings` (the only place that
does), checks it, locks the data folder, reconciles what a previous process left (orphaned
runners, unreleased GPU leases, unfinished jobs), starts the job worker and returns the WSGI app;
`wsgi.py` holds the instance gunicorn serves. Nothing is changed on disk before the data-folder
lock is held: a second service on the same folder is refused and touches nothing.
With REDIS_URL the app is a web host of the RQ mode instead (webapp/queue_rq/web_app.py): no
lock, no tokens, no runners; jobs and their files live in Redis and GPU workers run them.
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
    from webapp.data_lock import DataLock
    from webapp.errors import register_error_handlers
    from webapp.logs import configure_logging, event
    from webapp.service import EXTENSION_KEY
    from webapp.uploads import UploadRequest, jobs_root, tmp_root

    settings = settings if settings is not None else Settings.from_env()
    configure_logging(settings.log_format, settings.log_level)
    rq_mode = bool(settings.redis_url)
    # The RQ mode's web tier owns nothing in DATA_DIR but its uploads in flight, and WEB_WORKERS
    # processes share it: no data-folder lock there (a GPU worker takes one: webapp/worker.py).
    data_lock = None if rq_mode else DataLock(settings.data_dir, settings.port).acquire(
        wait_for_sibling_s=SIBLING_WORKER_WAIT_S)
    try:
        app = Flask(__name__)
        app.request_class = UploadRequest
        app.config["MAX_CONTENT_LENGTH"] = settings.max_upload_bytes
        app.config["MAX_FORM_MEMORY_SIZE"] = settings.max_field_bytes  # text fields; files are spooled to disk
        app.config["ACESTEP_TMP_DIR"] = str(tmp_root(settings.data_dir))
        app.json.sort_keys = False
        jobs_root(settings.data_dir).mkdir(parents=True, exist_ok=True)
        tmp_root(settings.data_dir).mkdir(parents=True, exist_ok=True)
        if rq_mode:
            service = _rq_service(app, settings)
        else:
            service, resumed, found = _local_service(app, settings, data_lock)
        app.extensions[EXTENSION_KEY] = service
        register_error_handlers(app)
        install_api_key_check(app, settings.api_key)
        app.register_blueprint(routes_lego.bp)
        app.register_blueprint(routes_health.bp)
        app.register_blueprint(routes_analyze.bp)
    except BaseException:
        if data_lock is not None:
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

    atexit.register(service.close, 10.0)
    if rq_mode:
        event(log, "service_started", jobs="rq", web_workers=settings.web_workers, data_dir=str(settings.data_dir))
        return app
    service.jobs.start(resumed)
    service.keeper.start()
    ckpt = service.checkpoints
    event(log, "service_started", checkpoints=str(settings.acestep_checkpoints), engine=ckpt.engine,
          complete=ckpt.complete, model=ckpt.weights, gpu_tokens=service.tokens.backend,
          queue_url=settings.queue_url or None, data_dir=str(settings.data_dir), **found)
    if ckpt.demo:
        log.warning("demo: random weights: %s holds the tiny random demo checkpoint; its stems are noise, "
                    "not ACE-Step's model. Point ACESTEP_CHECKPOINTS at the real weights.", settings.acestep_checkpoints)
    if not ckpt.complete:
        log.warning("checkpoint folder %s looks incomplete (missing: %s); jobs will fail until it is fixed",
                    settings.acestep_checkpoints, ", ".join(ckpt.missing))
    return app


def _local_service(app: Flask, settings: Settings, data_lock):
    """One host: the in-process queue, this host's GPU tokens and runners, the lease journal."""
    from webapp.host_jobs import build
    from webapp.metrics import install_metrics

    service, resumed, found = build(settings, data_lock, resume=True)
    install_metrics(app, service.jobs)
    return service, resumed, found


def _rq_service(app: Flask, settings: Settings):
    """A web host of the RQ mode: jobs, uploads and results in Redis; GPU workers run them."""
    from webapp.metrics import install_metrics
    from webapp.queue_rq import web_app
    from webapp.service import Service
    from webapp.uploads import jobs_root, tmp_root

    web_app.clean_stale(jobs_root(settings.data_dir), tmp_root(settings.data_dir))
    jobs, checkpoints = web_app.install(app, settings)
    install_metrics(app, jobs, web_app.RQMetrics)
    return Service(settings=settings, jobs=jobs, tokens=None, checkpoints=checkpoints)
