"""A job and its states: an explicit state machine, and how runner events become progress.

    QUEUED ──> WAITING_FOR_GPU ──> RUNNING ──> COMPLETED
       │  └──────────────────────────┘│  └──> FAILED
       │        (a warm runner)       │  └──> CANCELLED
       └──> FAILED, CANCELLED         └──> QUEUED (interrupted by a restart: it resumes)

Every change of state goes through `Job.move_to`, which refuses an illegal one: a finished job
never changes again, so a late cancel or a second finish cannot rewrite what the client read.
The record is what `webapp/job_store.py` writes to disk, so a restarted service knows it.
"""
from __future__ import annotations

import enum
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from runner.contract import EventType, Stage
from webapp.errors import ApiError
from webapp.lego_params import LegoParams
from webapp.uploads import JobFiles


class JobState(str, enum.Enum):
    QUEUED = "queued"
    WAITING_FOR_GPU = "waiting_for_gpu"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in FINISHED


FINISHED = frozenset({JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED})
_ENDINGS = frozenset({JobState.FAILED, JobState.CANCELLED})
LEGAL: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.WAITING_FOR_GPU, JobState.RUNNING}) | _ENDINGS,
    JobState.WAITING_FOR_GPU: frozenset({JobState.RUNNING, JobState.QUEUED}) | _ENDINGS,
    JobState.RUNNING: frozenset({JobState.COMPLETED, JobState.QUEUED}) | _ENDINGS,
    JobState.COMPLETED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}

# Progress (0-100) the plugin sees: tokens granted, then the runner's stages; within a stage its
# progress events (runner.contract.PROGRESS_STAGES) fill its span: the source's pieces 10..15, the steps 15..90.
STAGE_PROGRESS = {"starting": 2, Stage.LOADING.value: 5, Stage.ENCODING.value: 10, Stage.GENERATING.value: 15,
                  Stage.DECODING.value: 92, Stage.WRITING.value: 96}
PROGRESS_SPANS = {Stage.ENCODING.value: (10, 15), Stage.GENERATING.value: (15, 90)}


class IllegalTransition(RuntimeError):
    """A bug: the job manager tried a change of state the machine does not allow."""


@dataclass
class Job:
    id: str
    params: LegoParams
    files: JobFiles
    duration_s: float
    sample_rate: int
    protocol: str  # "multipart" | "json"
    client_waits: bool = False  # a synchronous multipart call holds its connection for the answer
    created_at: float = field(default_factory=time.time)
    state: JobState = JobState.QUEUED
    attempts: int = 0  # runs started; a restart resumes a job at most MAX_ATTEMPTS times
    session_id: str | None = None  # the gpu-queue-service session of the current run (one per acquire)
    stage: str | None = None
    progress: int = 0
    step: int | None = None
    total_steps: int | None = None
    gpu_position: int | None = None
    gpu_message: str | None = None
    queued_mono: float = field(default_factory=time.monotonic)
    run_started_mono: float | None = None
    finished_at: float | None = None
    outputs: list[Path] = field(default_factory=list)
    result: dict = field(default_factory=dict)
    error: ApiError | None = None
    runner_pid: int | None = None
    runner_exit_code: int | None = None
    runner_started_at: float | None = None
    runner_exited_at: float | None = None
    tokens_released_at: float | None = None
    cancel_reason: str | None = None
    timings: dict = field(default_factory=dict)
    cancel: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    @property
    def gpu_wait(self) -> bool:
        return self.state is JobState.WAITING_FOR_GPU

    def move_to(self, new: JobState) -> JobState:
        """Change state if the machine allows it; returns the old state. Caller holds `lock`."""
        old = self.state
        if new not in LEGAL[old]:
            raise IllegalTransition(f"job {self.id}: {old.value} -> {new.value} is not a legal transition")
        self.state = new
        return old

    def raise_progress(self, value: float) -> None:
        with self.lock:
            self.progress = max(self.progress, min(100, int(value)))

    def on_runner_event(self, ev: dict) -> None:
        kind = ev.get("event")
        if kind == EventType.STAGE.value and ev.get("stage") in STAGE_PROGRESS:
            self.stage = ev["stage"]
            self.raise_progress(STAGE_PROGRESS[self.stage])
        elif kind == EventType.PROGRESS.value:
            step, total = ev.get("step"), ev.get("total")
            stage = ev.get("stage") or Stage.GENERATING.value  # a runner older than the stage field counts steps
            if isinstance(step, int) and isinstance(total, int) and total > 0 and stage in PROGRESS_SPANS:
                if stage == Stage.GENERATING.value:
                    self.step, self.total_steps = step, total
                low, high = PROGRESS_SPANS[stage]
                self.raise_progress(low + (high - low) * min(step, total) / total)
