"""`GET /metrics`: the service's state and history in Prometheus's text format (`prometheus_client`).

Why an ordinary in-process registry is right: gunicorn runs ONE gthread worker (jobs live in its
memory), so every scrape reaches the process that saw every job; no multiprocess directory is
needed. The registry is per app, not the library's global one, so each `create_app()` (tests make
many) counts alone and nothing collides.

Where the numbers come from:
- job transitions arrive through `JobManager.add_listener` (the worker thread calls it);
- jobs by state and tokens held are read at scrape time, so they can never drift from the truth;
- refused requests are counted from the one JSON error shape in an `after_request` hook.

`/metrics` is not in `auth.OPEN_PATHS`: with `API_KEY` set, the scraper must send the key too
(job counts and error rates are the operator's business, not the public's).
"""
from __future__ import annotations

from flask import Flask, Response
from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector,
                               disable_created_metrics, generate_latest)
from prometheus_client.core import GaugeMetricFamily

# Seconds, from "instant" to the 15-minute wait the plugin tolerates; covers waits and phases alike.
SECONDS_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 180, 300, 600, 900)
# The runner's result timings (DESIGN.md section 4) that become `phase` labels. A fixed list keeps
# a subprocess's JSON from minting new time series.
PHASES = ("import", "load", "encoding", "generating", "decoding", "writing", "total")
FINISHED = ("completed", "failed", "cancelled")
# The classic text format every Prometheus reads (recent prometheus_client labels its output 1.0.0,
# which only matters for UTF-8 metric names; these names are all plain).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# `_created` series double the output and nothing here reads them (a process-wide switch, harmless).
disable_created_metrics()


class _JobsByState:
    """`acestep_jobs{state}` from `JobManager.snapshot()` at scrape time (a gauge nobody has to keep right)."""

    def __init__(self, jobs):
        self.jobs = jobs

    def describe(self):
        return [self._family()]

    def collect(self):
        snap = self.jobs.snapshot()
        family = self._family()
        for state, key in (("queued", "queued"), ("running", "running"), ("finished", "kept")):
            family.add_metric([state], snap[key])
        return [family]

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "acestep_jobs", "Jobs now: queued (waiting in this service's queue), running (waiting for GPU tokens or "
                            "generating), finished (results kept until RESULT_TTL_S).", labels=["state"])


class Metrics:
    """The service's metrics, on their own registry; `on_job` is the job manager's listener."""

    def __init__(self, jobs):
        self.registry = CollectorRegistry()
        r = self.registry
        r.register(_JobsByState(jobs))
        ProcessCollector(registry=r)  # the worker's memory, CPU and open files
        self.finished = Counter(
            "acestep_jobs_finished", "Jobs finished, by final state and error_code (`none` when completed).",
            ["state", "error_code"], registry=r)
        self.queue_wait = Histogram(
            "acestep_queue_wait_seconds", "Seconds a job waited in this service's queue before the worker took it "
            "(observed when the job ends).", buckets=SECONDS_BUCKETS, registry=r)
        self.token_wait = Histogram(
            "acestep_gpu_token_wait_seconds", "Seconds a job waited for its GPU tokens (0 when a warm runner's "
            "were reused; observed when the job ends).", buckets=SECONDS_BUCKETS, registry=r)
        self.phase = Histogram(
            "acestep_generation_phase_seconds", "Seconds of each runner phase of a completed job (the runner's "
            "result timings; total = the whole job inside the runner).", ["phase"], buckets=SECONDS_BUCKETS, registry=r)
        self.exits = Counter(
            "acestep_runner_exits", "Runner processes that ended after a job, by process exit status (0 normal, "
            "5 cancelled by SIGTERM, negative: killed by that signal); a job's outcome is acestep_jobs_finished_total.",
            ["exit_code"], registry=r)
        Gauge("acestep_gpu_tokens_held", "GPU tokens this service holds now: from the grant until the runner has "
              "exited (a warm runner keeps them); 0 while idle.", registry=r).set_function(jobs.tokens_held)
        self.rejected = Counter(
            "acestep_requests_rejected", "Requests refused with a 4xx answer, by error_code and HTTP status "
            "(bad uploads, auth, full queue...).", ["error_code", "status"], registry=r)

    def on_job(self, name: str, job, fields: dict) -> None:
        if name == "runner_exited":
            code = fields.get("exit_code")
            self.exits.labels(exit_code="unknown" if code is None else str(code)).inc()
        elif name in FINISHED:
            # Waits are read from job.timings once, when the job ends: every job ends exactly once,
            # whichever way it got its tokens (granted, reused from a warm runner, or never).
            for histogram, key in ((self.queue_wait, "queue_wait_s"), (self.token_wait, "token_wait_s")):
                if key in job.timings:
                    histogram.observe(job.timings[key])
            self.finished.labels(state=name, error_code=fields.get("error_code") or "none").inc()
            if name == "completed":
                for phase, seconds in ((job.result or {}).get("timings") or {}).items():
                    label = phase[:-2] if phase.endswith("_s") else phase
                    if label in PHASES and isinstance(seconds, (int, float)) and seconds >= 0:
                        self.phase.labels(phase=label).observe(seconds)

    def count_rejection(self, response) -> None:
        if 400 <= response.status_code < 500:
            body = response.get_json(silent=True) if response.is_json else None
            code = body.get("error_code") if isinstance(body, dict) else None
            self.rejected.labels(error_code=str(code or "unknown"), status=str(response.status_code)).inc()

    def exposition(self) -> Response:
        return Response(generate_latest(self.registry), content_type=CONTENT_TYPE)


def install_metrics(app: Flask, jobs, metrics_class=None) -> Metrics:
    """Listen to `jobs`, count refused requests and serve `GET /metrics` on `app` (the RQ mode
    passes its own class, webapp/queue_rq/metrics_rq.py: its counts live in Redis)."""
    metrics = (metrics_class or Metrics)(jobs)
    jobs.add_listener(metrics.on_job)

    @app.after_request
    def _count_rejections(response):
        metrics.count_rejection(response)
        return response

    app.add_url_rule("/metrics", "metrics", metrics.exposition, methods=["GET"])
    app.extensions["acestep_metrics"] = metrics
    return metrics
