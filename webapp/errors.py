"""One JSON error shape for every failure, and the catalogue of stable error codes.

Every failure answers `{"success": false, "error": <sentence>, "error_code": <token>,
"retryable": bool}`. The catalogue below is the list README.md's "Error codes" table is
checked against; a code outside it cannot be raised (`ApiError` refuses it), so the table and
the service cannot drift apart.
"""
from __future__ import annotations

import logging

from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException

log = logging.getLogger("acestep.webapp")


# code: (HTTP status, retryable, default sentence). The sentence says what to do.
CATALOGUE: dict[str, tuple[int, bool, str]] = {
    # requests
    "unauthorized": (401, False, "This endpoint needs the API key: send `Authorization: Bearer KEY` or `X-API-Key: KEY`."),
    "not_found": (404, False, "There is no such endpoint; `GET /` lists them."),
    "method_not_allowed": (405, False, "This endpoint does not accept that HTTP method; `GET /` lists the methods."),
    "upload_too_large": (413, False, "The request is larger than the upload limit; send a shorter or compressed file (MP3/FLAC)."),
    "unsupported_content_type": (415, False, "Send `multipart/form-data` (field `audio_file`) or `application/json` (field `audio_data`)."),
    "malformed_json": (400, False, "The request body is not a valid JSON object; send one JSON object."),
    "missing_audio": (400, False, "No audio was sent: attach the source as `audio_file` (multipart) or base64 `audio_data` (JSON)."),
    "invalid_base64": (400, False, "`audio_data` is not valid base64; send the file's bytes base64-encoded."),
    "empty_audio": (400, False, "The uploaded file is empty; send the source audio file."),
    "not_audio": (400, False, "The upload could not be decoded as audio; send a WAV, MP3, FLAC, OGG or M4A file."),
    "truncated_audio": (400, False, "The audio file ends early (it is truncated); send the complete file."),
    "audio_too_long": (400, False, "The audio is longer than this service accepts; send a shorter excerpt."),
    "audio_too_large": (400, False, "The audio decodes to more samples than this service accepts (sample rate x channels x duration); send it at 48 kHz, or a shorter excerpt."),
    "audio_too_short": (400, False, "The audio is too short to build a stem on; send a longer excerpt."),
    "audio_duration_mismatch": (400, False, "`audio_duration` does not match the file's duration; omit it or send the file's real length."),
    "invalid_track_type": (400, False, "The track type must be one of vocals, backing_vocals, drums."),
    "missing_bpm": (400, False, "`bpm` is required: send the source's tempo as a whole number."),
    "invalid_bpm": (400, False, "`bpm` must be a number between 30 and 300 (a decimal tempo is rounded)."),
    "invalid_batch_size": (400, False, "`batch_size` must be 1 or 2."),
    "caption_too_long": (400, False, "The caption is too long; shorten it."),
    "invalid_key_scale": (400, False, "`key_scale` must be a key such as `C major`, `F# minor`, `Am` or `Bbmaj`."),
    "invalid_audio_format": (400, False, "The output format must be one of mp3, wav, flac."),
    "invalid_parameter": (400, False, "A parameter has an invalid value; see the message."),
    "invalid_task_id": (400, False, "The task id is malformed; use the `task_id` returned by `POST /lego`."),
    "task_not_found": (404, False, "No such task: it never existed or its result expired and was deleted."),
    "task_not_completed": (409, True, "The task has no result yet (or it failed: then `retryable` is false); poll `GET /lego/status/<task_id>`."),
    "job_cancelled": (409, False, "The job was cancelled before it finished."),
    "analysis_busy": (429, True, "Another tempo and key analysis is running; retry after the number of seconds in `Retry-After`."),
    # capacity and the GPU
    "queue_full": (429, True, "Too many jobs are waiting; retry after the number of seconds in `Retry-After`."),
    "gpu_queue_unreachable": (503, True, "The GPU token service cannot be reached; retry in a minute (operators: check QUEUE_URL)."),
    "gpu_queue_error": (503, True, "The GPU token service answered unexpectedly; retry in a minute."),
    "gpu_busy": (503, True, "The GPU stayed busy longer than the wait limit; retry later."),
    "service_shutting_down": (503, True, "The service is restarting; retry in a minute."),
    "job_interrupted": (503, True, "The service restarted while the job was running and could not resume it; send the request again."),
    "storage_full": (507, True, "The service's disk is full; retry later (operators: free space in DATA_DIR)."),
    "queue_unavailable": (503, True, "The job queue (Redis) cannot be reached; retry in a minute (operators: check REDIS_URL)."),
    "gpu_worker_lost": (503, True, "The GPU worker running the job stopped (killed, or its host went down); retry."),
    # the runner
    "job_timeout": (504, True, "The generation took longer than the job time limit and was stopped; retry, perhaps with a shorter source."),
    "runner_rejected_input": (422, False, "The generator refused this input; see the message."),
    "checkpoints_unavailable": (503, False, "The model checkpoints are missing or cannot be loaded; operators: check ACESTEP_CHECKPOINTS."),
    "generation_failed": (500, True, "The generation failed (out of memory, NaN output...); the message says why and `retryable` whether a retry can help."),
    "runner_crashed": (500, True, "The generator process stopped unexpectedly; retry."),
    "runner_protocol_error": (500, False, "The generator did not report a usable result; operators: see the job's runner log."),
    "internal_error": (500, False, "An unexpected error occurred in the service; operators: see the log."),
}


class ApiError(Exception):
    """A failure with a stable code, a sentence for the caller and a fitting HTTP status."""

    def __init__(self, code: str, message: str | None = None, *, status: int | None = None,
                 retryable: bool | None = None, headers: dict[str, str] | None = None):
        if code not in CATALOGUE:
            raise ValueError(f"unknown error code {code!r}; add it to webapp.errors.CATALOGUE and README.md")
        default_status, default_retryable, default_message = CATALOGUE[code]
        self.code = code
        self.message = message or default_message
        self.status = status or default_status
        self.retryable = default_retryable if retryable is None else retryable
        self.headers = headers or {}
        super().__init__(self.message)

    def body(self) -> dict:
        return {"success": False, "error": self.message, "error_code": self.code, "retryable": self.retryable}

    def response(self):
        resp = jsonify(self.body())
        resp.status_code = self.status
        for key, value in self.headers.items():
            resp.headers[key] = value
        if self.status == 413:
            resp.headers["Connection"] = "close"  # the rest of the body is not read: do not wait for it
        return resp


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "upload_too_large", 415: "unsupported_content_type"}


def register_error_handlers(app: Flask) -> None:
    """Turn every failure, Flask's own included, into the one JSON shape."""

    @app.errorhandler(ApiError)
    def _api_error(err: ApiError):
        return err.response()

    @app.errorhandler(HTTPException)
    def _http_error(err: HTTPException):
        code = _HTTP_CODES.get(err.code or 500)
        if code is None:
            if err.code and 400 <= err.code < 500:
                api = ApiError("invalid_parameter", f"The request was refused: {err.description}", status=err.code)
            else:
                api = ApiError("internal_error", status=err.code or 500)
        elif code == "upload_too_large":
            api = too_large(app)
        else:
            api = ApiError(code)
        resp = api.response()
        if err.code == 405 and getattr(err, "valid_methods", None):
            resp.headers["Allow"] = ", ".join(err.valid_methods)
        return resp

    @app.errorhandler(Exception)
    def _unexpected(err: Exception):
        log.exception("unhandled error: %s", err)
        return ApiError("internal_error").response()


def too_large(app: Flask) -> ApiError:
    """413 that names the limit the request broke: the whole body's, or one text field's."""
    from flask import request

    limit = app.config.get("MAX_CONTENT_LENGTH") or 0
    field_limit = app.config.get("MAX_FORM_MEMORY_SIZE") or 0
    length = request.content_length
    if length is not None and length <= limit and field_limit:
        return ApiError("upload_too_large", f"A text field is larger than {field_limit // 1024} KB, the limit of one "
                                            "field; shorten it (only the audio may be large).")
    return ApiError("upload_too_large", f"The request is larger than the {limit / 1048576:g} MB upload limit "
                                        "(MAX_UPLOAD_MB); send a shorter or compressed file (MP3/FLAC).")


def markdown_error_table() -> str:
    """README.md's error-code table, generated from the catalogue."""
    lines = ["| error_code | HTTP | retryable | meaning / what to do |", "|---|---|---|---|"]
    for code, (status, retryable, text) in CATALOGUE.items():
        lines.append(f"| `{code}` | {status} | {'yes' if retryable else 'no'} | {text} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_error_table())
