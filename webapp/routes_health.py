"""`GET /health` and `GET /`: what the service is and whether it can work, cheaply (no model, no torch).

`GET /` is the page for a browser (webapp/routes_page.py) and this JSON for everyone else; the
JSON also carries what the page needs: track captions, limits, the auth mode and the model.

Both are open (no API key), so they say what a load balancer or a person needs and nothing of
the host's insides: no paths, no interpreter, no internal URLs, no process ids.
"""
from __future__ import annotations

import time

from flask import Blueprint, jsonify

from webapp import __version__
from webapp.audio_probe import tools_available
from webapp.captions import DEFAULT_CAPTIONS
from webapp.lego_params import BPM_RANGE, OUTPUT_FORMATS, TRACKS
from webapp.routes_page import page_response, wants_html
from webapp.service import current_service

bp = Blueprint("health", __name__)


@bp.get("/health")
def health():
    service = current_service()
    if service.settings.redis_url:
        return _health_rq(service)
    ckpt = service.refresh_checkpoints()
    tokens = service.tokens.describe()
    jobs = service.jobs.snapshot()
    problems = []
    if not ckpt.complete:
        problems.append(f"checkpoints incomplete: missing {', '.join(ckpt.missing)}")
    if not tokens.get("reachable", False) and not tokens.get("fallback"):
        problems.append("GPU token service unreachable")
    if not jobs["accepting"]:
        problems.append("shutting down")
    if jobs["releases_pending"]:
        problems.append(f"{jobs['releases_pending']} GPU token release(s) not yet confirmed by the token service")
    checkpoints = {k: v for k, v in ckpt.as_dict().items() if k != "path"}
    body = {
        "success": True,
        "status": "ok" if not problems else "degraded",
        "problems": problems,
        "service": {"name": "acestep-stem-service", "version": __version__,
                    "uptime_s": round(time.time() - service.started_at, 1)},
        "model": ckpt.weights,
        "checkpoints": checkpoints,
        "gpu_tokens": tokens,
        "jobs": jobs,
        "runner": {"holding_gpu": service.jobs.runner.holding_gpu(),
                   "keep_warm_s": service.settings.keep_warm_s, "prestart": service.settings.runner_prestart},
        "audio_tools": "ffmpeg" if tools_available() else "soundfile",
    }
    return jsonify(body)


def _health_rq(service):
    """A web host of the RQ mode: the queue across hosts instead of this host's GPU and runner."""
    from webapp.queue_rq.web_app import health_body

    problems, fields = health_body(service.jobs, service.checkpoints)
    return jsonify({"success": True, "status": "ok" if not problems else "degraded", "problems": problems,
                    "service": {"name": "acestep-stem-service", "version": __version__, "role": "web (RQ)",
                                "uptime_s": round(time.time() - service.started_at, 1)},
                    **fields, "audio_tools": "ffmpeg" if tools_available() else "soundfile"})


@bp.get("/")
def index():
    if wants_html():
        return page_response()
    service = current_service()
    settings = service.settings
    resp = jsonify({
        "success": True,
        "service": "acestep-stem-service",
        "version": __version__,
        "model": service.checkpoints.weights,
        "auth": "API key required (Bearer or X-API-Key)" if service.settings.api_key else "open",
        "endpoints": {
            "POST /lego": "multipart (audio_file, track_type, bpm, ...; waits, answers audio; async=1 for a task id) "
                          "or JSON (audio_data base64, track_name, bpm, ...; answers a task id)",
            "GET /lego/status/<task_id>": "job status; the result as base64 audio_data when completed",
            "GET /lego/<task_id>/audio?index=0": "the result as a file (index 1 for the second of batch_size 2)",
            "DELETE /lego/<task_id>": "cancel a job (stops the runner, frees the GPU) or delete its result",
            "POST /analyze": "multipart (audio_file): the source's tempo and key, found on the CPU "
                             "({bpm, bpm_confidence, key_scale, key_confidence, duration, ...})",
            "GET /health": "service, checkpoints, GPU tokens, jobs",
            "POST /unload": "end a keep-warm runner now and free the GPU (KEEP_WARM_S)",
            "GET /metrics": "Prometheus metrics",
        },
        "track_types": list(TRACKS),
        "track_captions": {track: DEFAULT_CAPTIONS[track] for track in TRACKS},
        "output_formats": list(OUTPUT_FORMATS),
        "limits": {"max_upload_mb": settings.max_upload_mb, "min_duration_s": settings.min_duration_s,
                   "max_duration_s": settings.max_duration_s, "bpm": list(BPM_RANGE), "batch_size": [1, 2],
                   "steps": {"default": settings.lego_steps, "min": settings.lego_min_steps, "max": settings.lego_max_steps}},
    })
    resp.headers["Vary"] = "Accept"
    return resp
