"""A web host of the RQ mode: what `create_app` installs when REDIS_URL is set.

The web tier validates, stores the upload in Redis, enqueues, answers status and serves results;
it holds no GPU tokens, starts no runner and needs no weights. What differs from the one-host
service is gathered here:
- the job queue is `RedisJobs` (webapp/queue_rq/web_queue.py);
- Redis unreachable (down, restarting, loading its AOF) answers 503 `queue_unavailable`, retryable;
- the model a client is served (`X-ACEStep-Model`) is what the live GPU workers report;
- stems are streamed from Redis, the JSON status with its base64 `audio_data` included, with a
  Content-Length, so no worker holds a whole stem and a cut-off answer is visible as one;
- /health describes the queue across hosts.
Several gunicorn workers share DATA_DIR (only uploads in flight), so no worker clears it at start
beyond what is older than STALE_UPLOAD_S (a staging folder a killed worker left).
"""
from __future__ import annotations

import base64
import json
import time
from pathlib import Path

from flask import Flask, Response

from webapp.errors import ApiError
from webapp.queue_rq.blobs import iter_chunks
from webapp.queue_rq.connection import UNAVAILABLE_ERRORS, connect, persistence
from webapp.queue_rq.metrics_rq import RQMetrics  # noqa: F401 - create_app installs it in the RQ mode
from webapp.queue_rq.remote_job import RemoteOutput
from webapp.queue_rq.web_queue import RedisJobs
from webapp.uploads import remove_entries

STALE_UPLOAD_S = 3600.0
UNKNOWN_MODEL = {"model": "unknown (no GPU worker alive)", "weights": "unknown", "engine": None, "complete": False,
                 "demo": False, "missing": []}


class ClusterCheckpoints:
    """The checkpoints as the live GPU workers report them (all of them should carry the same)."""

    def __init__(self, jobs: RedisJobs):
        self.jobs = jobs

    def _reported(self) -> dict:
        try:
            workers = [w for w in self.jobs.figures()["workers"] if w["alive"]]
        except UNAVAILABLE_ERRORS:
            return UNKNOWN_MODEL
        reports = [w["status"].get("checkpoints") for w in workers if w["status"].get("checkpoints")]
        if not reports:
            return UNKNOWN_MODEL
        if any(r != reports[0] for r in reports):
            return {**reports[0], "model": "mixed (the GPU workers report different checkpoints)"}
        return reports[0]

    @property
    def model_header(self) -> str:
        return self._reported()["model"]

    @property
    def weights(self) -> str:
        return self._reported()["weights"]

    @property
    def demo(self) -> bool:
        return bool(self._reported().get("demo"))

    def as_dict(self) -> dict:
        return {k: v for k, v in self._reported().items() if k != "model"}


def checkpoint_report(ckpt) -> dict:
    """What a GPU worker publishes about its checkpoints (no paths: /health is open)."""
    return {"model": ckpt.model_header, "weights": ckpt.weights, "engine": ckpt.engine, "complete": ckpt.complete,
            "demo": ckpt.demo, "missing": ckpt.missing}


def install(app: Flask, settings) -> tuple[RedisJobs, ClusterCheckpoints]:
    jobs = RedisJobs(settings, connect(settings.redis_url))

    def _unavailable(_exc):
        return ApiError("queue_unavailable").response()

    for error in UNAVAILABLE_ERRORS:
        app.register_error_handler(error, _unavailable)
    return jobs, ClusterCheckpoints(jobs)


def clean_stale(*folders: Path, older_than_s: float = STALE_UPLOAD_S) -> int:
    return remove_entries(*folders, before=time.time() - older_than_s)


def output_response(jobs: RedisJobs, output: RemoteOutput, mimetype: str, as_attachment: bool, download_name: str) -> Response:
    """A stem streamed from Redis (read a few MB at a time)."""
    first = _first_batch(jobs, output)
    resp = Response(_stream(jobs, output, first), mimetype=mimetype)
    resp.headers["Content-Length"] = str(output.size)
    kind = "attachment" if as_attachment else "inline"
    resp.headers["Content-Disposition"] = f'{kind}; filename="{download_name}"'
    resp.headers["Cache-Control"] = "no-cache"
    return resp


def json_with_audio(jobs: RedisJobs, body: dict, output: RemoteOutput) -> Response:
    """The completed status with `audio_data` (base64 of the stem) spliced in, streamed: each chunk
    is a multiple of 3 bytes long, so it encodes to base64 on its own."""
    head = json.dumps(body, separators=(",", ":"))[:-1].encode() + b',"audio_data":"'
    tail = b'"}'
    first = _first_batch(jobs, output)

    def generate():
        yield head
        for chunk in _stream(jobs, output, first):
            yield base64.b64encode(chunk)
        yield tail

    resp = Response(generate(), mimetype="application/json")
    resp.headers["Content-Length"] = str(len(head) + 4 * -(-output.size // 3) + len(tail))
    return resp


def _first_batch(jobs: RedisJobs, output: RemoteOutput):
    """Read the start before answering, so a stem that expired meanwhile is a clean 404, not a cut-off 200."""
    chunks = iter_chunks(jobs.conn, output.key, output.size)
    try:
        return chunks, next(chunks)
    except Exception:
        raise ApiError("task_not_found", "The result expired or was deleted while it was being fetched.") from None


def _stream(jobs: RedisJobs, output: RemoteOutput, first):
    chunks, head = first
    yield head
    yield from chunks


def health_body(jobs: RedisJobs, checkpoints: ClusterCheckpoints) -> tuple[list[str], dict]:
    """(problems, fields) of /health on a web host of the RQ mode."""
    problems = []
    try:
        jobs.conn.ping()
        snap = jobs.snapshot()
        queue = {"reachable": True, "persistence": persistence(jobs.conn)}
    except UNAVAILABLE_ERRORS as exc:
        return ["job queue (Redis) unreachable"], {"queue": {"reachable": False, "error": type(exc).__name__}}
    cluster = snap.pop("cluster")
    if cluster["workers_alive"] == 0:
        problems.append("no GPU worker alive: jobs wait in the queue")
    ckpt = checkpoints.as_dict()
    if cluster["workers_alive"] and not ckpt.get("complete"):
        problems.append("checkpoints incomplete on the GPU workers")
    # /health is open: per host and per worker figures, but no task ids (they are what fetches a
    # stem), no worker names, no process ids.
    workers = [{"host": w["host"], "state": w["state"], "alive": w["alive"], "heartbeat_age_s": w["heartbeat_age_s"],
                "busy": bool(w["current_job"]), "jobs_ok": w["jobs_ok"], "jobs_failed": w["jobs_failed"],
                "tokens_held": w["status"].get("tokens_held", 0), "warm": w["status"].get("warm", False)}
               for w in cluster["workers"]]
    return problems, {"queue": {**queue, "workers_alive": cluster["workers_alive"], "queue_length": cluster["queue_length"],
                                "jobs_by_state": cluster["jobs"], "hosts": cluster["hosts"], "workers": workers},
                      "jobs": snap, "checkpoints": ckpt, "model": checkpoints.weights}
