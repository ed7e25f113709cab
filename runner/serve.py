"""`serve`: one process for several jobs, the keep-warm path (issue 4), and how the service runs the runner.

It imports torch and diffusers at once but touches no GPU until the first job, so a runner
started ahead of time holds no VRAM while it waits. Jobs arrive as JSON lines on stdin (the
contract's job lines, runner/contract.py) and produce the same events as `lego`, followed by
`{"event": "ready"}`. With a model loaded it waits at most --idle-timeout seconds for the next
job (0: exit after the first job, the seed's behaviour), then exits and frees the GPU.
`{"command": "exit"}` or end of input ends it at once.

It cannot outlive the service (runner/lifeline.py): the parent-death signal and a watch on
stdin, installed before the heavy imports, turn the service's end into SIGTERM, which cancels
the job (exit 5, nothing written).
"""
from __future__ import annotations

import os
import select
import time
from dataclasses import fields
from pathlib import Path

from runner import lifeline
from runner.contract import JOB_FIELDS, PATH_FIELDS, ContractError, EventType, JobCommand, decode_job_line
from runner.events import EXIT_BAD_INPUT, EXIT_OK, EventStream, RunnerError, bad_input


def parse_job(line: str):
    """A job line into LegoArgs; None for an exit command."""
    from runner.lego import LegoArgs

    try:
        command, args = decode_job_line(line)
    except ContractError as exc:
        raise bad_input("bad_job_line", str(exc)) from None
    if command is JobCommand.EXIT:
        return None
    assert {f.name for f in fields(LegoArgs)} == set(JOB_FIELDS), "runner/contract.py and LegoArgs disagree"
    try:
        values = {k: (Path(v) if k in PATH_FIELDS and v is not None else v) for k, v in args.items()}
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
    watch = lifeline.install()  # before the heavy imports: a service that dies meanwhile still ends us
    from runner.device import import_torch_seconds
    from runner.lego import EngineCache, run_lego

    events.emit(EventType.READY.value, loaded=False, import_s=import_torch_seconds(args.import_engine))
    cache = EngineCache()
    idle = max(0.0, float(args.idle_timeout))
    jobs = 0  # job lines taken (one refused for its values included: with --idle-timeout 0 it ends the runner too)
    ran = 0  # jobs that ran (a result, or a failure past the input checks)
    rejected = 0  # lines refused as bad input (bad_job_line, bad values)
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
            watch.job_started()
            try:
                result = run_lego(job, events, cache)
            finally:
                watch.job_ended()
            events.emit(EventType.RESULT.value, **result)
            ran += 1
        except RunnerError as err:
            events.error(err)
            rejected += err.exit_status == EXIT_BAD_INPUT
            ran += err.exit_status != EXIT_BAD_INPUT
            if err.exit_status != EXIT_BAD_INPUT:
                cache.current = None  # a failed load or generation: start clean next time
        events.emit(EventType.READY.value, loaded=cache.current is not None)
    events.say(f"[runner] serve: exiting after {ran} job(s), {rejected} line(s) rejected")
    return EXIT_OK
