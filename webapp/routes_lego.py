"""`POST /lego` (multipart and JSON), `GET /lego/status/<id>`, `GET /lego/<id>/audio`, `DELETE /lego/<id>`.

Both protocols build the same job: check the fields, stage the upload, prove it is audio, write
the job's record, then queue. The JSON body is streamed (webapp/json_body.py): its base64 audio
reaches the disk without being held in memory. The multipart call waits for the result unless
`async=1`; while it waits it watches the client's socket and cancels the job when the client is
gone (webapp/client_watch.py; a half-closed client that still reads gets its answer).
"""
from __future__ import annotations

import base64
import json
import logging
import re
import secrets
import time
from pathlib import Path
from typing import Callable

from flask import Blueprint, Response, g, jsonify, request, send_file

from webapp import lego_params
from webapp.audio_probe import check_claimed_duration, probe_and_decode
from webapp.client_watch import ClientWatch
from webapp.durable import is_storage_full
from webapp.errors import ApiError
from webapp.job_state import Job, JobState
from webapp.json_body import read_json_body
from webapp.logs import event
from webapp.service import current_service
from webapp.uploads import TASK_ID_RE, JobFiles, save_stream

log = logging.getLogger("acestep.webapp.lego")
bp = Blueprint("lego", __name__)

DISCONNECT_POLL_S = 0.5
_TRUE = ("1", "true", "yes", "on")
_INDEX_RE = re.compile(r"^[0-9]{1,3}$")


@bp.post("/lego")
def submit_lego():
    mimetype = request.mimetype
    if mimetype == "multipart/form-data":
        return _submit_multipart()
    if mimetype == "application/json" or mimetype.endswith("+json"):
        return _submit_json()
    raise ApiError("unsupported_content_type",
                   f"Content type {mimetype[:60] or '(none)'!r} is not accepted: send multipart/form-data "
                   "(field audio_file) or application/json (field audio_data).")


def _submit_multipart():
    service = current_service()
    t0 = time.perf_counter()
    upload = request.files.get("audio_file")  # parses the body (size limit enforced here)
    parse_s = time.perf_counter() - t0
    if upload is None:
        raise ApiError("missing_audio", "No file was sent: attach the source audio as the multipart field `audio_file`.")
    params = lego_params.from_form(request.form, service.settings, request.headers.get("Accept", ""))
    want_async = (request.form.get("async") or request.args.get("async") or "").strip().lower() in _TRUE
    limit = service.settings.max_upload_bytes
    files = _new_files()
    job = _create_job(files, lambda dest: save_stream(upload.stream, dest, limit), lambda: params, "multipart", parse_s,
                      client_waits=not want_async)
    if want_async:
        return _accepted(job, status=202)
    return _wait_and_answer(job)


def _submit_json():
    service = current_service()
    settings = service.settings
    files = _new_files()
    body = None
    t0 = time.perf_counter()

    def write_upload(dest):
        nonlocal body
        body = read_json_body(request.stream, dest, settings.max_upload_bytes, settings.max_field_bytes)
        if not body.audio_streamed:
            audio = body.fields.get("audio_data")
            if audio is None or audio == "":
                raise ApiError("missing_audio", "No audio was sent: put the source file base64-encoded in `audio_data`.")
            raise ApiError("invalid_base64", "`audio_data` must be a base64 string.")
        if body.audio_bytes == 0:
            raise ApiError("missing_audio", "No audio was sent: put the source file base64-encoded in `audio_data`.")

    job = _create_job(files, write_upload, lambda: lego_params.from_json(body.fields, settings), "json",
                      None, parse_started=t0)
    return _accepted(job, status=200)


def _new_files() -> JobFiles:
    """A fresh job folder (staging), once the queue has room: nothing is read before that."""
    service = current_service()
    if not service.jobs.has_room():
        service.jobs.raise_queue_full()
    return JobFiles(service.settings.data_dir, secrets.token_hex(16))


def _create_job(files: JobFiles, write_upload: Callable, make_params: Callable, protocol: str, parse_s: float | None,
                client_waits: bool = False, parse_started: float | None = None) -> Job:
    """Stage the upload, prove it is audio, record the job, queue it; on any failure nothing stays on disk."""
    service = current_service()
    settings = service.settings
    staging = files.begin()
    try:
        t0 = time.perf_counter()
        raw = staging / "upload.bin"
        try:
            write_upload(raw)
            t1 = time.perf_counter()
            if parse_s is None:
                parse_s = t1 - (parse_started or t0)
            params = make_params()
            probed = probe_and_decode(raw, staging / "source.wav", timeout_s=settings.probe_timeout_s,
                                      min_s=settings.min_duration_s, max_s=settings.max_duration_s,
                                      max_bytes=settings.max_decoded_bytes)
            raw.unlink()
            check_claimed_duration(params.claimed_duration_s, probed)
            params.check_against_duration(probed.duration_s)
            (staging / "out.partial").mkdir()
            job = Job(id=files.task_id, params=params, files=files, duration_s=probed.duration_s,
                      sample_rate=probed.sample_rate, protocol=protocol, client_waits=client_waits)
            job.timings.update(parse_s=parse_s, stage_upload_s=t1 - t0, probe_s=time.perf_counter() - t1, **probed.timings)
            service.jobs.store.save(job, folder=staging)  # the record is in the folder before it exists
            files.commit()
        except OSError as exc:
            if is_storage_full(exc):
                raise ApiError("storage_full") from None
            raise
        job = service.jobs.submit(job) or job  # the RQ mode answers with its view of the job in Redis
    except BaseException as exc:
        files.discard()
        if isinstance(exc, ApiError):
            event(log, "upload_rejected", error_code=exc.code, protocol=protocol)
        raise
    g.task_id = files.task_id
    return job


def _accepted(job: Job, status: int):
    jobs = current_service().jobs
    body = {"success": True, "task_id": job.id, "status": "queued", "status_url": f"/lego/status/{job.id}",
            "position": jobs.position(job), "estimated_seconds": jobs.estimated_wait_s(job), "seed": job.params.seed,
            "warnings": job.params.warnings}
    resp = jsonify(body)
    resp.status_code = status
    return resp


def _wait_and_answer(job: Job):
    service = current_service()
    client = ClientWatch(request.environ)
    while not job.done.wait(DISCONNECT_POLL_S):
        if client.gone():
            event(log, "client_disconnected", job_id=job.id, probes=client.probes)
            service.jobs.cancel(job.id, "client disconnected")
            job.done.wait(service.settings.runner_kill_grace_s + 10)
            resp = ApiError("job_cancelled", "The job was cancelled: the client disconnected.", status=499).response()
            resp.status = "499 Client Closed Request"  # nobody reads it; the log shows it
            return resp
    if job.state is JobState.COMPLETED:
        return _send_output(job, 0, as_attachment=False)
    resp = job.error.response() if job.error else ApiError("internal_error").response()
    resp.headers["X-Task-Id"] = job.id
    return resp


def _send_output(job: Job, index: int, as_attachment: bool):
    fmt = job.params.output_format
    output = job.outputs[index]
    name = f"lego-{job.params.track}-{job.id[:8]}-{index}.{fmt}"
    if isinstance(output, Path):
        resp = send_file(output, mimetype=lego_params.MIME_TYPES[fmt], as_attachment=as_attachment,
                         download_name=name, max_age=0)
    else:  # a stem in Redis (the RQ mode)
        from webapp.queue_rq.web_app import output_response

        resp = output_response(current_service().jobs, output, lego_params.MIME_TYPES[fmt], as_attachment, name)
    resp.headers["X-Task-Id"] = job.id
    resp.headers["X-Candidates"] = str(len(job.outputs))
    if job.result.get("seed") is not None:
        resp.headers["X-Seed"] = str(job.result["seed"])
    if job.params.warnings:
        resp.headers["X-Warnings"] = " | ".join(job.params.warnings)
    return resp


def _job_or_error(task_id: str) -> Job:
    if not TASK_ID_RE.match(task_id):
        raise ApiError("invalid_task_id")
    job = current_service().jobs.get(task_id)
    if job is None:
        raise ApiError("task_not_found", "No such task: it never existed or its result expired "
                                         f"(results are kept {current_service().settings.result_ttl_s:g} s).")
    g.task_id = task_id
    return job


@bp.get("/lego/status/<task_id>")
def lego_status(task_id: str):
    job = _job_or_error(task_id)
    body = status_body(job)
    if job.state is JobState.COMPLETED:
        if not isinstance(job.outputs[0], Path):  # a stem in Redis (the RQ mode)
            from webapp.queue_rq.web_app import json_with_audio

            return json_with_audio(current_service().jobs, body, job.outputs[0])
        return _json_with_audio(body, job.outputs[0])
    return jsonify(body)


def _json_with_audio(body: dict, audio_path) -> Response:
    """The completed status with `audio_data` spliced in: base64 needs no JSON escaping, and
    serialising a 60 MB string through the JSON encoder costs a quarter of a second."""
    head = json.dumps(body, separators=(",", ":"))
    encoded = base64.b64encode(audio_path.read_bytes())
    payload = b"".join((head[:-1].encode(), b',"audio_data":"', encoded, b'"}'))
    return Response(payload, mimetype="application/json")


def status_body(job: Job) -> dict:
    """The shapes the gary4juce plugin reads (DESIGN.md section 5)."""
    jobs = current_service().jobs
    state = job.state
    if state in (JobState.QUEUED, JobState.WAITING_FOR_GPU):
        position = jobs.position(job)
        message = job.gpu_message if job.gpu_wait and job.gpu_message else (
            f"queued: {position - 1} job(s) ahead" if position > 1 else "queued: next in line")
        return {"success": True, "task_id": job.id, "generation_in_progress": True, "transform_in_progress": False,
                "status": "queued", "progress": job.progress,
                "queue_status": {"status": "queued", "message": message, "position": max(position, 1),
                                 "estimated_seconds": jobs.estimated_wait_s(job)},
                "warnings": job.params.warnings}
    if state is JobState.COMPLETED:
        # `audio_data` (base64 of the first candidate) is added by `_json_with_audio`.
        return {"success": True, "task_id": job.id, "generation_in_progress": False, "transform_in_progress": False,
                "status": "completed", "progress": 100,
                "audio_format": job.params.output_format, "sample_rate": job.sample_rate,
                "seed": job.result.get("seed"), "bpm": job.params.bpm, "duration": round(job.duration_s, 6),
                "track_type": job.params.track, "candidates": len(job.outputs),
                "audio_urls": [f"/lego/{job.id}/audio?index={i}" for i in range(len(job.outputs))],
                "warnings": job.params.warnings}
    if state in (JobState.FAILED, JobState.CANCELLED):
        err = job.error or ApiError("internal_error")
        return {**err.body(), "task_id": job.id, "status": "failed", "state": state.value,
                "generation_in_progress": False, "transform_in_progress": False}
    # running
    stage = job.stage or "starting"
    if job.step is not None and job.total_steps:
        message = f"generating: step {job.step}/{job.total_steps}"
    else:
        message = f"{stage}"
    return {"success": True, "task_id": job.id, "generation_in_progress": True, "transform_in_progress": False,
            "status": "processing", "progress": job.progress, "stage": stage,
            "queue_status": {"status": "ready", "message": message, "position": 0,
                             "estimated_seconds": jobs.estimated_remaining_s(job)},
            "warnings": job.params.warnings}


@bp.get("/lego/<task_id>/audio")
def lego_audio(task_id: str):
    job = _job_or_error(task_id)
    if job.state is not JobState.COMPLETED:
        if job.state is JobState.CANCELLED:
            raise ApiError("job_cancelled", f"The job was cancelled ({job.cancel_reason or 'by request'}) and has no audio; send it again.")
        if job.finished:
            raise ApiError("task_not_completed", f"The task has no result: it {job.state.value}"
                                                 f" ({job.error.code if job.error else 'unknown'}).", retryable=False)
        raise ApiError("task_not_completed")
    raw_index = request.args.get("index", "0")
    if not _INDEX_RE.match(raw_index) or int(raw_index) >= len(job.outputs):
        raise ApiError("invalid_parameter", f"index must be between 0 and {len(job.outputs) - 1}.")
    return _send_output(job, int(raw_index), as_attachment=True)


@bp.delete("/lego/<task_id>")
def lego_delete(task_id: str):
    job = _job_or_error(task_id)
    service = current_service()
    if job.finished:
        service.jobs.forget(job.id)
        return jsonify({"success": True, "task_id": job.id, "status": "deleted"})
    service.jobs.cancel(job.id, "cancelled by DELETE")
    # Answer once the runner is gone and the tokens are back, so "cancelled" means the GPU is free.
    job.done.wait(service.settings.runner_kill_grace_s + 10)
    return jsonify({"success": True, "task_id": job.id, "status": "cancelled" if job.finished else "cancelling"})


@bp.post("/unload")
def unload():
    """End a keep-warm runner now (after the running job, if one runs); its GPU tokens go with it."""
    jobs = current_service().jobs
    had_model = jobs.request_unload()
    return jsonify({"success": True, "unloading": had_model,
                    "message": "The loaded model is being unloaded." if had_model else "No model was loaded; nothing holds the GPU."})
