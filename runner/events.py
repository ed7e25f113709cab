"""The runner's event stream and its errors (the protocol itself is runner/contract.py).

stdout carries one JSON object per line and nothing else; people read stderr. Anything
else that writes to stdout (a library's print) would corrupt the stream, so `EventStream`
keeps a private handle on the real stdout and the CLI points `sys.stdout` at stderr. The exit
statuses and stages are the contract's; their old names stay importable from here.
"""
from __future__ import annotations

import json
import sys
import threading
from typing import IO, Any

from runner.contract import PROGRESS_STAGES, STAGES, EventType, ExitStatus, Stage

EXIT_OK = ExitStatus.OK.value
EXIT_BAD_INPUT = ExitStatus.BAD_INPUT.value
EXIT_CHECKPOINT = ExitStatus.CHECKPOINT.value
EXIT_GENERATION = ExitStatus.GENERATION.value
EXIT_CANCELLED = ExitStatus.CANCELLED.value


class RunnerError(Exception):
    """A failure with a stable code, a sentence for the user, an exit status and retryability."""

    def __init__(self, code: str, message: str, exit_status: int, retryable: bool = False):
        super().__init__(message)
        self.code = code
        self.message = message
        self.exit_status = exit_status
        self.retryable = retryable


def bad_input(code: str, message: str) -> RunnerError:
    """Something the caller sent is wrong: exit 2, never retryable."""
    return RunnerError(code, message, EXIT_BAD_INPUT, retryable=False)


def checkpoint_error(code: str, message: str) -> RunnerError:
    """The checkpoint folder is missing, incomplete or unloadable: exit 3."""
    return RunnerError(code, message, EXIT_CHECKPOINT, retryable=False)


def generation_error(code: str, message: str, retryable: bool) -> RunnerError:
    """Generation itself failed (out of memory, NaN output): exit 4."""
    return RunnerError(code, message, EXIT_GENERATION, retryable=retryable)


class Cancelled(BaseException):
    """Raised by the SIGTERM handler (runner/cancellation.py): the run stops, writes nothing, exits 5.

    A BaseException, like KeyboardInterrupt: library code's `except Exception` (ACE-Step wraps its
    loader and its generation in those) must not turn a cancel into a failure or a retry."""


HUMAN_SHOWN_EVENTS = frozenset({EventType.STAGE.value, EventType.PROGRESS.value})


class EventStream:
    """Writes events as JSON lines to the real stdout, and a readable line to stderr.

    `for_person` (stdout is a terminal, and no `--json`): stage and progress events, which stderr
    already shows as lines and a bar, are left off stdout, so a person sees one progress bar
    rather than a scroll of JSON; every other event is still written. A pipe (the service) gets all."""

    def __init__(self, out: IO[str] | None = None, err: IO[str] | None = None, for_person: bool = False):
        self._out = out if out is not None else sys.stdout
        self._err = err if err is not None else sys.stderr
        self.for_person = for_person
        # Progress may come from an engine's worker thread (ACE-Step diffuses in one): one line at a time.
        self._lock = threading.RLock()

    def out_is_terminal(self) -> bool:
        isatty = getattr(self._out, "isatty", None)
        return bool(isatty and isatty())

    def emit(self, event: str, **fields: Any) -> None:
        if self.for_person and event in HUMAN_SHOWN_EVENTS:
            return
        line = json.dumps({"event": event, **fields}, separators=(",", ":"), default=str)
        with self._lock:
            self._out.write(line + "\n")
            self._out.flush()

    def say(self, text: str) -> None:
        """A line for a human on stderr."""
        self._err.write(text + "\n")
        self._err.flush()

    def stage(self, name: str) -> None:
        assert name in STAGES, name
        self.emit(EventType.STAGE.value, stage=name)
        self.say(f"[runner] {name}")

    def progress(self, step: int, total: int, stage: str = Stage.GENERATING.value) -> None:
        """`step` of `total` done in `stage`: a denoising step, or a piece of the source encoded."""
        assert stage in PROGRESS_STAGES, stage
        with self._lock:
            self.emit(EventType.PROGRESS.value, step=step, total=total, stage=stage)
            width = 30
            done = int(width * step / max(total, 1))
            unit = "step" if stage == Stage.GENERATING.value else f"{stage} piece"
            self._err.write(f"\r[runner] {unit} {step}/{total} [{'#' * done}{'.' * (width - done)}]")
            if step >= total:
                self._err.write("\n")
            self._err.flush()

    def error(self, err: RunnerError) -> None:
        # exit_status: the status a one-shot run exits with; a keep-warm `serve` process stays up
        # after a job's error, so its client reads the job's status here.
        self.emit(EventType.ERROR.value, code=err.code, message=err.message, retryable=err.retryable, exit_status=err.exit_status)
        self.say(f"[runner] error {err.code}: {err.message}")
