"""`serve`: one process for several jobs, the keep-warm path (issue 4).

It imports torch and diffusers at once but touches no GPU until the first job, so a runner
started ahead of time holds no VRAM while it waits. Jobs arrive as JSON lines on stdin,
`{"command": "lego", "args": {...}}`, and produce the same events as `lego`, followed by
`{"event": "ready"}`. With a model loaded it waits at most --idle-timeout seconds for the next
job (0: exit after the first job, the seed's behaviour), then exits and frees the GPU.
`{"command": "exit"}` or end of input ends it at once.
"""
from __future__ import annotations

import json
import os
import select
import time
from dataclasses import fields
from pathlib import Path

from runner.device import import_torch_seconds
from runner.events import EXIT_BAD_INPUT, EXIT_OK, EventStream, RunnerError, bad_input
from runner.lego import EngineCache, LegoArgs, run_lego

PATH_FIELDS = {"source", "checkpoints", "out"}
LEGO_FIELDS = {f.name for f in fields(LegoArgs)}


def parse_job(line: str) -> LegoArgs | None:
    """A job line into LegoArgs; None for an exit command."""
    try:
        message = json.loads(line)
    except ValueError:
        raise bad_input("bad_job_line", "A job line must be one JSON object.") from None
    if not isinstance(message, dict) or message.get("command") not in ("lego", "exit"):
        raise bad_input("bad_job_line", 'A job line needs "command": "lego" or "exit".')
    if message["command"] == "exit":
        return None
    args = message.get("args") or {}
    unknown = set(args) - LEGO_FIELDS
    if unknown:
        raise bad_input("bad_job_line", f"Unknown job fields: {', '.join(sorted(unknown))}.")
    try:
        values = {k: (Path(v) if k in PATH_FIELDS else v) for k, v in args.items()}
        return LegoArgs(**values)
    except TypeError as exc:
        raise bad_input("bad_job_line", f"The job is incomplete: {exc}.") from None


class StdinLines:
    """Lines from file descriptor 0 with a timeout. Python's buffered sys.stdin would swallow
    several waiting lines in one read, after which select() sees an empty pipe and times out."""

    def __init__(self, fd: int = 0):
        self.fd = fd
        self.buffer = b""
        self.closed = False

    def next(self, timeout: float | None) -> str | None:
        """The next line, or None on timeout or end of input."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self.buffer and not self.closed:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self.fd], [], [], wait)
            if not ready:
                return None
            chunk = os.read(self.fd, 65536)
            self.closed = not chunk
            self.buffer += chunk
        if b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            return line.decode("utf-8", "replace")
        line, self.buffer = self.buffer, b""
        return line.decode("utf-8", "replace") or None


def serve(args, events: EventStream) -> int:
    events.emit("ready", loaded=False, import_s=import_torch_seconds())
    cache = EngineCache()
    idle = max(0.0, float(args.idle_timeout))
    jobs = 0
    lines = StdinLines()
    while True:
        timeout = idle if cache.current is not None else None
        if jobs and idle == 0:
            break
        line = lines.next(timeout)
        if line is None:
            break
        if not line.strip():
            continue
        try:
            job = parse_job(line)
            if job is None:
                break
            jobs += 1
            result = run_lego(job, events, cache)
            events.emit("result", **result)
        except RunnerError as err:
            events.error(err)
            if err.exit_status != EXIT_BAD_INPUT:
                cache.current = None  # a failed load or generation: start clean next time
        events.emit("ready", loaded=cache.current is not None)
    events.say(f"[runner] serve: exiting after {jobs} job(s)")
    return EXIT_OK
