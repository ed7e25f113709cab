"""`POST /analyze`: the tempo and key of an uploaded source, for the page to prefill `bpm` and `key_scale`.

The upload goes through exactly what `POST /lego` does with one (the body limit, ffprobe and a
full ffmpeg decode into a float32 WAV, the duration limits) inside a temporary folder under
DATA_DIR/tmp that is removed on every path; then `webapp.analysis` measures the decoded audio.
It runs on the CPU in the web worker, so at most ANALYSIS_SLOTS run at once; a request that finds
no free slot within ANALYSIS_WAIT_S answers `analysis_busy` (429, retryable).
"""
from __future__ import annotations

import logging
import tempfile
import threading
import time
from pathlib import Path

from flask import Blueprint, current_app, jsonify, request

from webapp.analysis import analyze_file
from webapp.audio_probe import probe_and_decode
from webapp.errors import ApiError
from webapp.logs import event
from webapp.service import current_service
from webapp.uploads import save_stream, tmp_root

log = logging.getLogger("acestep.webapp.analyze")
bp = Blueprint("analyze", __name__)

ANALYSIS_SLOTS = 1  # the web worker's CPU is shared with the runner's process; one at a time
ANALYSIS_WAIT_S = 20.0
RETRY_AFTER_S = 5
_SLOTS_KEY = "acestep.analysis_slots"


@bp.record_once
def _make_slots(state) -> None:
    state.app.extensions[_SLOTS_KEY] = threading.BoundedSemaphore(ANALYSIS_SLOTS)


@bp.post("/analyze")
def analyze_upload():
    settings = current_service().settings
    if request.mimetype != "multipart/form-data":
        raise ApiError("unsupported_content_type", "Send the source as multipart/form-data in the field `audio_file`.")
    t0 = time.perf_counter()
    upload = request.files.get("audio_file")  # parses the body (size limit enforced here)
    if upload is None:
        raise ApiError("missing_audio", "No file was sent: attach the source audio as the multipart field `audio_file`.")
    slots = current_app.extensions[_SLOTS_KEY]
    if not slots.acquire(timeout=ANALYSIS_WAIT_S):
        raise ApiError("analysis_busy", headers={"Retry-After": str(RETRY_AFTER_S)})
    try:
        with tempfile.TemporaryDirectory(prefix="analyze-", dir=tmp_root(settings.data_dir)) as folder:
            raw = Path(folder) / "upload.bin"
            save_stream(upload.stream, raw, settings.max_upload_bytes)
            t1 = time.perf_counter()
            probed = probe_and_decode(raw, Path(folder) / "source.wav", timeout_s=settings.probe_timeout_s,
                                      min_s=settings.min_duration_s, max_s=settings.max_duration_s,
                                      max_bytes=settings.max_decoded_bytes)
            raw.unlink()
            t2 = time.perf_counter()
            result = analyze_file(probed.path, probed.frames, probed.sample_rate)
    except ApiError as exc:
        event(log, "analyze_rejected", error_code=exc.code)
        raise
    finally:
        slots.release()
    t3 = time.perf_counter()
    event(log, "analyzed", bpm=result.bpm, bpm_ambiguous=result.bpm_ambiguous, key=result.key_scale,
          duration_s=round(probed.duration_s, 3), upload_s=round(t1 - t0, 3), decode_s=round(t2 - t1, 3),
          analyse_s=round(t3 - t2, 3))
    return jsonify({"success": True, **result.as_dict(), "sample_rate": probed.sample_rate,
                    "channels": probed.channels, "source_format": probed.source_format})
