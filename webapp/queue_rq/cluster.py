"""The queue across hosts, for /health and /metrics: GPU workers alive, jobs per state, per host.

Read from Redis at the moment of asking, so every web worker on every host answers the same:
- workers: RQ's worker registry (`Worker.all`: name, host, state, heartbeat, jobs done), joined
  with the status each GPU worker publishes beside it (its current job, GPU tokens held, model);
  a worker whose last heartbeat is older than WORKER_LOST_AFTER_S is counted as not alive;
- jobs per state: the per-state indexes the record transitions keep (webapp/queue_rq/records.py);
- per host: the jobs each GPU host ended, by state and error code.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

import redis
from rq import Queue, Worker
from rq.serializers import JSONSerializer

from webapp.queue_rq.records import FINISHED, PREFIX, QUEUE_NAME, STATS_KEY, RecordState, index_key


def worker_status_key(name: str) -> str:
    return f"{PREFIX}worker:{name}"


def rq_queue(conn: redis.Redis) -> Queue:
    return Queue(QUEUE_NAME, connection=conn, serializer=JSONSerializer)


@dataclass
class WorkerInfo:
    name: str
    host: str
    pid: int | None
    state: str
    alive: bool
    heartbeat_age_s: float | None
    current_job: str | None
    jobs_ok: int
    jobs_failed: int
    status: dict = field(default_factory=dict)  # what the GPU worker publishes: tokens, model, warm runner

    def as_dict(self) -> dict:
        return asdict(self)


def workers(conn: redis.Redis, lost_after_s: float) -> list[WorkerInfo]:
    found = Worker.all(queue=rq_queue(conn), serializer=JSONSerializer)
    if not found:
        return []
    with conn.pipeline(transaction=False) as pipe:
        for w in found:
            pipe.hgetall(worker_status_key(w.name))
        published = pipe.execute()
    now = time.time()
    out = []
    for w, raw in zip(found, published):
        status = {k.decode(): json.loads(v) for k, v in raw.items()} if raw else {}
        age = now - w.last_heartbeat.timestamp() if w.last_heartbeat else None
        out.append(WorkerInfo(name=w.name, host=w.hostname or "?", pid=w.pid, state=w.get_state(),
                              alive=age is not None and age <= lost_after_s, heartbeat_age_s=None if age is None else round(age, 1),
                              current_job=status.pop("job", None), jobs_ok=w.successful_job_count,
                              jobs_failed=w.failed_job_count, status=status))
    return sorted(out, key=lambda w: (w.host, w.name))


def jobs_by_state(conn: redis.Redis, result_ttl_s: float) -> dict[str, int]:
    """Jobs now, per record state; finished ones count while their results are kept."""
    cutoff = time.time() - result_ttl_s
    with conn.pipeline(transaction=False) as pipe:
        for state in FINISHED:
            pipe.zremrangebyscore(index_key(state), "-inf", cutoff)
        for state in RecordState:
            pipe.zcard(index_key(state))
        counts = pipe.execute()[len(FINISHED):]
    return {state.value: int(n) for state, n in zip(RecordState, counts)}


def finished_by_host(conn: redis.Redis) -> list[tuple[str, str, str, int]]:
    """(host, state, error_code, jobs) for every job that ended, since the counts began."""
    rows = []
    for raw_field, raw_count in conn.hgetall(STATS_KEY).items():
        parts = raw_field.decode().split("|")
        if len(parts) == 3:
            rows.append((parts[0], parts[1], parts[2], int(raw_count)))
    return sorted(rows)


def snapshot(conn: redis.Redis, lost_after_s: float, result_ttl_s: float) -> dict:
    found = workers(conn, lost_after_s)
    hosts: dict[str, dict] = {}
    for w in found:
        host = hosts.setdefault(w.host, {"workers_alive": 0, "workers_busy": 0, "tokens_held": 0})
        if w.alive:
            host["workers_alive"] += 1
            host["workers_busy"] += 1 if w.current_job else 0
            host["tokens_held"] += int(w.status.get("tokens_held") or 0)
    for host, state, _code, count in finished_by_host(conn):
        if host in hosts:
            ended = hosts[host].setdefault("jobs_ended", {})
            ended[state] = ended.get(state, 0) + count
    return {"workers_alive": sum(1 for w in found if w.alive), "queue_length": rq_queue(conn).count,
            "jobs": jobs_by_state(conn, result_ttl_s), "hosts": hosts, "workers": [w.as_dict() for w in found]}
