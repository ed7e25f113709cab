"""What a runner's answer means for the job: the result published, or the error the client reads.

The runner answers in the contract's terms (runner/contract.py: a result event, or an error event
with its exit status); this module turns that into the job's outputs, or into one of the
service's stable error codes with a truthful `retryable`.
"""
from __future__ import annotations

import os
from pathlib import Path

from runner.contract import ExitStatus
from webapp.errors import ApiError
from webapp.job_state import Job
from webapp.runner_process import RunnerOutcome

RESULT_KEYS = ("seed", "timings", "peak_vram_bytes", "engine", "dtype")


def error_for(outcome: RunnerOutcome, job_timeout_s: float) -> ApiError:
    """The error a failed (not cancelled) run answers."""
    if outcome.timed_out:
        return ApiError("job_timeout", f"The generation ran longer than {job_timeout_s:g} s (JOB_TIMEOUT_S) and was "
                                       "stopped; retry, perhaps with a shorter source.")
    err = outcome.error or {}
    message = str(err.get("message") or "")[:500] or None
    code = outcome.status
    if code == ExitStatus.OK:
        return ApiError("runner_protocol_error")
    if code == ExitStatus.BAD_INPUT:
        return ApiError("runner_rejected_input", message)
    if code == ExitStatus.CHECKPOINT:
        return ApiError("checkpoints_unavailable", message)
    if code == ExitStatus.GENERATION:
        if err.get("code") == "disk_full" or "No space left on device" in (message or ""):
            return ApiError("storage_full", message)
        return ApiError("generation_failed", message, retryable=bool(err.get("retryable", True)))
    return ApiError("runner_crashed", f"The generator process stopped unexpectedly (exit status {code}); retry.")


def publish_outputs(job: Job, result: dict, runner_cwd: Path) -> str | None:
    """Check the result's files lie in the job's output folder, then publish the folder atomically.
    Returns what is wrong with the result, or None once the outputs are in place."""
    partial = job.files.out_partial.resolve()
    names = []
    for item in result.get("outputs") or []:
        path = Path(str(item.get("path", ""))) if isinstance(item, dict) else None
        if path is None:
            return "an output entry is not an object"
        if not path.is_absolute():
            path = runner_cwd / path
        path = path.resolve()
        if path.parent != partial or not path.is_file() or path.stat().st_size == 0:
            return f"output {path.name} is missing, empty or outside the job's folder"
        names.append(path.name)
    if not names:
        return "the result lists no outputs"
    os.replace(job.files.out_partial, job.files.out)
    job.outputs = [job.files.out / n for n in names]
    job.result = {k: result.get(k) for k in RESULT_KEYS}
    job.result["outputs"] = [{k: v for k, v in item.items() if k != "path"} for item in result["outputs"]]
    return None
