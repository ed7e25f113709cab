"""A job's record in Redis: the one truth every web host and GPU worker reads and writes.

RQ carries the job (its id is the task id, its queue is the order, its worker registry says who
runs it); this hash carries what the plugin's protocol needs: state, progress, the GPU queue's
position, the result's description, the error. Several processes write it at once (a GPU worker
its progress, a web host a cancel), so each write is one field set, never a read-modify-write of
the whole (which is why RQ's `job.meta`, saved whole, is not used for these).

States change only through `transition`, one Lua script: it checks the move against TRANSITIONS
(the same table the Python side reads), moves the job between the per-state indexes (sorted
sets, the figures /health and /metrics count) and counts its end per host, atomically. Two
racers (a web host cancelling a queued job, a GPU worker taking it) cannot both win.
"""
from __future__ import annotations

import enum
import json
import time
from dataclasses import dataclass, field
from typing import Any

import redis

PREFIX = "acestep:"
QUEUE_NAME = "acestep-lego"
LIVE_TTL_S = 24 * 3600  # a job nobody started within a day is dropped, with its source


class RecordState(str, enum.Enum):
    QUEUED = "queued"        # in the RQ queue; no GPU worker has it (again, after a GPU worker's shutdown)
    TAKEN = "taken"          # a GPU worker has it: waiting for GPU tokens, or about to start the runner
    RUNNING = "running"      # the runner has it
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in FINISHED


FINISHED = frozenset({RecordState.COMPLETED, RecordState.FAILED, RecordState.CANCELLED})
LIVE = frozenset({RecordState.QUEUED, RecordState.TAKEN, RecordState.RUNNING})
TRANSITIONS: dict[RecordState, frozenset[RecordState]] = {
    RecordState.QUEUED: frozenset({RecordState.TAKEN, RecordState.CANCELLED, RecordState.FAILED}),
    RecordState.TAKEN: frozenset({RecordState.RUNNING, RecordState.COMPLETED, RecordState.FAILED, RecordState.CANCELLED,
                                  RecordState.QUEUED}),
    RecordState.RUNNING: frozenset({RecordState.COMPLETED, RecordState.FAILED, RecordState.CANCELLED, RecordState.QUEUED}),
    RecordState.COMPLETED: frozenset(),
    RecordState.FAILED: frozenset(),
    RecordState.CANCELLED: frozenset(),
}
STATES = tuple(RecordState)


def record_key(task_id: str) -> str:
    return f"{PREFIX}job:{task_id}"


def index_key(state: RecordState) -> str:
    return f"{PREFIX}state:{state.value}"


def source_key(task_id: str) -> str:
    return f"{PREFIX}blob:{task_id}:source"


def output_key(task_id: str, index: int) -> str:
    return f"{PREFIX}blob:{task_id}:out:{index}"


STATS_KEY = f"{PREFIX}stats:finished"  # field "host|state|error_code" -> jobs ended so
AVERAGE_KEY = f"{PREFIX}stats:average_job_s"
JOB_SECONDS_KEY = f"{PREFIX}stats:job_seconds"  # webapp/job_estimate.py JobSeconds.fields()

# KEYS: record, one index per state (STATES order), stats. ARGV: id, allowed from-states (csv),
# new state, now, ttl (>0 expire, 0 persist, <0 leave), stats field ("" none), n, field/value pairs.
_TRANSITION_LUA = """
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur then return {0, ''} end
local allowed = false
for s in string.gmatch(ARGV[2], '[^,]+') do if s == cur then allowed = true end end
if not allowed then return {0, cur} end
local states = {%s}
for i, s in ipairs(states) do
  if s == cur then redis.call('ZREM', KEYS[1 + i], ARGV[1]) end
  if s == ARGV[3] then redis.call('ZADD', KEYS[1 + i], ARGV[4], ARGV[1]) end
end
local args = {'state', ARGV[3]}
for i = 1, 2 * tonumber(ARGV[7]) do args[#args + 1] = ARGV[7 + i] end
redis.call('HSET', KEYS[1], unpack(args))
local ttl = tonumber(ARGV[5])
if ttl > 0 then redis.call('EXPIRE', KEYS[1], ttl) elseif ttl == 0 then redis.call('PERSIST', KEYS[1]) end
if ARGV[6] ~= '' then redis.call('HINCRBY', KEYS[#KEYS], ARGV[6], 1) end
return {1, cur}
""" % ", ".join(f"'{s.value}'" for s in STATES)

# Set fields only while the job is in one of the given states (a late progress write must not
# bring back a deleted record, or touch a finished one). KEYS: record. ARGV: states csv, n, pairs.
_UPDATE_LUA = """
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur then return 0 end
for s in string.gmatch(ARGV[1], '[^,]+') do
  if s == cur then
    local args = {}
    for i = 1, 2 * tonumber(ARGV[2]) do args[#args + 1] = ARGV[2 + i] end
    redis.call('HSET', KEYS[1], unpack(args))
    return 1
  end
end
return 0
"""


class IllegalTransition(Exception):
    def __init__(self, task_id: str, current: str, wanted: RecordState):
        super().__init__(f"job {task_id}: {current or 'missing'} -> {wanted.value} is not allowed")
        self.current = RecordState(current) if current else None


def _pairs(fields: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for name, value in fields.items():
        out += [name, encode(value)]
    return out


def encode(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    if isinstance(value, bool):
        return "1" if value else "0"
    return "" if value is None else str(value)


class Records:
    """The scripts, registered once per connection."""

    def __init__(self, conn: redis.Redis):
        self.conn = conn
        self._transition = conn.register_script(_TRANSITION_LUA)
        self._update = conn.register_script(_UPDATE_LUA)

    def transition(self, task_id: str, to: RecordState, fields: dict[str, Any] | None = None, *,
                   only_from: frozenset[RecordState] | None = None, ttl_s: int | None = None,
                   stats_field: str = "") -> RecordState:
        """Move the job to `to` (the previous state is returned) or raise IllegalTransition. `only_from`
        narrows the legal sources (a web host cancels only a job no GPU worker has taken)."""
        allowed = ",".join(s.value for s, targets in TRANSITIONS.items()
                           if to in targets and (only_from is None or s in only_from))
        keys = [record_key(task_id), *(index_key(s) for s in STATES), STATS_KEY]
        pairs = _pairs(fields or {})
        ttl = -1 if ttl_s is None else int(ttl_s)
        ok, previous = self._transition(keys=keys, args=[task_id, allowed, to.value, f"{time.time():.6f}", ttl,
                                                          stats_field, len(pairs) // 2, *pairs])
        previous = previous.decode() if isinstance(previous, bytes) else previous
        if not ok:
            raise IllegalTransition(task_id, previous, to)
        return RecordState(previous)

    def update(self, task_id: str, fields: dict[str, Any], states=LIVE) -> bool:
        """Set fields while the job is in one of `states`; False when it is not (or is gone)."""
        pairs = _pairs(fields)
        return bool(self._update(keys=[record_key(task_id)],
                                 args=[",".join(s.value for s in states), len(pairs) // 2, *pairs]))

    def get(self, task_id: str) -> "JobRecord | None":
        raw = self.conn.hgetall(record_key(task_id))
        return JobRecord.parse(task_id, raw) if raw else None


@dataclass
class JobRecord:
    """One job as read from Redis (all of its fields at one instant)."""

    id: str
    state: RecordState
    created_at: float
    protocol: str
    params: dict
    duration_s: float
    sample_rate: int
    source_bytes: int
    progress: int = 0
    stage: str | None = None
    step: int | None = None
    total_steps: int | None = None
    gpu_wait: bool = False
    gpu_position: int | None = None
    gpu_message: str | None = None
    run_started_at: float | None = None
    finished_at: float | None = None
    worker: str | None = None
    host: str | None = None
    error: dict | None = None
    result: dict = field(default_factory=dict)
    output_sizes: list[int] = field(default_factory=list)
    cancel_requested: str | None = None
    timings: dict = field(default_factory=dict)
    attempts: int = 0  # runs started (a GPU worker's shutdown puts a job back, at most MAX_ATTEMPTS times)

    @classmethod
    def parse(cls, task_id: str, raw: dict) -> "JobRecord":
        f = {k.decode(): v.decode() for k, v in raw.items()}

        def num(name, kind=float):
            return kind(f[name]) if f.get(name) not in (None, "") else None

        return cls(
            id=task_id, state=RecordState(f["state"]), created_at=float(f.get("created_at") or 0), protocol=f.get("protocol", ""),
            params=json.loads(f.get("params") or "{}"), duration_s=float(f.get("duration_s") or 0),
            sample_rate=int(f.get("sample_rate") or 0), source_bytes=int(f.get("source_bytes") or 0),
            progress=int(f.get("progress") or 0), stage=f.get("stage") or None, step=num("step", int),
            total_steps=num("total_steps", int), gpu_wait=f.get("gpu_wait") == "1", gpu_position=num("gpu_position", int),
            gpu_message=f.get("gpu_message") or None, run_started_at=num("run_started_at"), finished_at=num("finished_at"),
            worker=f.get("worker") or None, host=f.get("host") or None,
            error=json.loads(f["error"]) if f.get("error") else None, result=json.loads(f.get("result") or "{}"),
            output_sizes=json.loads(f.get("output_sizes") or "[]"), cancel_requested=f.get("cancel_requested") or None,
            timings=json.loads(f.get("timings") or "{}"), attempts=int(f.get("attempts") or 0))
