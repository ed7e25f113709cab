"""`/metrics` in the RQ mode: the whole queue's figures, the same from every web worker and host.

Jobs end on the GPU workers, not in the web process a scrape reaches, so the counts come from
Redis at scrape time: the per-host end counts the record transitions keep, the per-state indexes,
RQ's worker registry, and the refused requests every web worker counts into one Redis hash.
If Redis cannot be reached the scrape still answers, with `acestep_queue_up 0`.
"""
from __future__ import annotations

import logging

import redis
from flask import Response
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from webapp.metrics import CONTENT_TYPE
from webapp.queue_rq import cluster
from webapp.queue_rq.connection import UNAVAILABLE_ERRORS
from webapp.queue_rq.records import PREFIX

log = logging.getLogger("acestep.webapp.rq")
REJECTED_KEY = f"{PREFIX}stats:rejected"  # field "error_code|status" -> requests refused so far


def count_rejection(conn: redis.Redis, error_code: str, status: int) -> None:
    """One refused request, counted for every web worker at once (best effort: never fails a request)."""
    try:
        conn.hincrby(REJECTED_KEY, f"{error_code}|{status}", 1)
    except redis.exceptions.RedisError:
        pass


class ClusterCollector:
    def __init__(self, jobs):
        self.jobs = jobs

    def describe(self):
        return []  # nothing is read from Redis when the collector is registered

    def collect(self):
        up = GaugeMetricFamily("acestep_queue_up", "1 when the job queue's Redis answered this scrape, else 0.")
        try:
            snap = self.jobs.figures()
            ended = cluster.finished_by_host(self.jobs.conn)
            rejected = self.jobs.conn.hgetall(REJECTED_KEY)
        except UNAVAILABLE_ERRORS as exc:
            log.warning("metrics: Redis unreachable (%s)", type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up

        jobs = GaugeMetricFamily("acestep_jobs", "Jobs now, on all hosts: queued (in the queue, or taken by a GPU worker "
                                                 "that waits for GPU tokens), running, finished (results kept until "
                                                 "RESULT_TTL_S).", labels=["state"])
        counts = snap["jobs"]
        jobs.add_metric(["queued"], counts["queued"] + counts["taken"])
        jobs.add_metric(["running"], counts["running"])
        jobs.add_metric(["finished"], counts["completed"] + counts["failed"] + counts["cancelled"])
        yield jobs

        tokens = GaugeMetricFamily("acestep_gpu_tokens_held", "GPU tokens the GPU workers hold now, by host (0 while idle).",
                                   labels=["host"])
        for host, figures in sorted(snap["hosts"].items()):
            tokens.add_metric([host], figures["tokens_held"])
        yield tokens

        workers = GaugeMetricFamily("acestep_gpu_workers", "GPU workers registered in the queue, by host and state: idle or "
                                                           "busy (alive), lost (no heartbeat within WORKER_LOST_AFTER_S).",
                                    labels=["host", "state"])
        counts: dict[tuple[str, str], int] = {}
        for w in snap["workers"]:
            state = "lost" if not w["alive"] else ("busy" if w["current_job"] else "idle")
            counts[(w["host"], state)] = counts.get((w["host"], state), 0) + 1
        for (host, state), n in sorted(counts.items()):
            workers.add_metric([host, state], n)
        yield workers

        queue = GaugeMetricFamily("acestep_queue_length", "Jobs in the RQ queue that no GPU worker has taken yet.")
        queue.add_metric([], snap["queue_length"])
        yield queue

        finished = CounterMetricFamily("acestep_jobs_finished", "Jobs ended on any GPU host, by final state and error_code "
                                                                "(`none` when completed).", labels=["state", "error_code"])
        per_host = CounterMetricFamily("acestep_jobs_ended_by_host", "Jobs ended, by GPU host (`-`: ended before any GPU "
                                                                     "worker took it), state and error_code.",
                                       labels=["host", "state", "error_code"])
        totals: dict[tuple[str, str], int] = {}
        for host, state, code, n in ended:
            per_host.add_metric([host, state, code], n)
            totals[(state, code)] = totals.get((state, code), 0) + n
        for (state, code), n in sorted(totals.items()):
            finished.add_metric([state, code], n)
        yield finished
        yield per_host

        refused = CounterMetricFamily("acestep_requests_rejected", "Requests refused with a 4xx answer by any web worker, by "
                                                                   "error_code and HTTP status.", labels=["error_code", "status"])
        for raw_field, raw_count in sorted(rejected.items()):
            code, _, status = raw_field.decode().partition("|")
            refused.add_metric([code, status], int(raw_count))
        yield refused


class RQMetrics:
    """The metrics of a web host in the RQ mode (the interface of webapp.metrics.Metrics)."""

    def __init__(self, jobs):
        self.jobs = jobs
        self.registry = CollectorRegistry()
        self.registry.register(ClusterCollector(jobs))
        ProcessCollector(registry=self.registry)  # this web worker's memory, CPU and open files

    def on_job(self, name: str, job, fields: dict) -> None:
        pass  # jobs end on the GPU workers; their counts are read from Redis

    def count_rejection(self, response) -> None:
        if 400 <= response.status_code < 500:
            body = response.get_json(silent=True) if response.is_json else None
            code = body.get("error_code") if isinstance(body, dict) else None
            count_rejection(self.jobs.conn, str(code or "unknown"), response.status_code)

    def exposition(self) -> Response:
        return Response(generate_latest(self.registry), content_type=CONTENT_TYPE)
