"""Keep-warm (KEEP_WARM_S) and runners started ahead (RUNNER_PRESTART), on the fake runner and the
fake gpu-queue-service: the loaded runner serves the next job without new tokens, gives them back
only after it has exited, and a runner started ahead holds no tokens until a job reaches it."""
from __future__ import annotations

import json
import time

from conftest import pid_alive, read_records, wait_for
from test_web_gpu_tokens import json_job, queued_app, sync_job  # noqa: F401 - fixtures and helpers


def spawns(record):
    return [json.loads(line) for line in record.read_text().splitlines() if "spawn" in line] if record.exists() else []


def finished(client, task):
    body = client.get(f"/lego/status/{task}").get_json()
    return body if body["status"] in ("completed", "failed") else None


def test_keep_warm_serves_back_to_back_jobs_with_one_runner_and_one_lease(queued_app, fake_queue):
    app, record = queued_app("ok", KEEP_WARM_S="30")
    client = app.test_client()
    first = sync_job(client)
    second = sync_job(client)
    assert first.status_code == second.status_code == 200
    starts = [r for r in read_records(record) if "start" in r]
    assert len(starts) == 2 and starts[0]["pid"] == starts[1]["pid"]  # the second job reused the loaded runner
    assert len(fake_queue.acquires()) == 1 and fake_queue.releases() == []  # its tokens are kept while warm
    health = client.get("/health").get_json()
    assert health["runner"]["holding_gpu"] is True and health["jobs"]["warm"]["loaded"] is True
    assert health["jobs"]["tokens_held"] == 5000

    resp = client.post("/unload")
    assert resp.status_code == 200 and resp.get_json()["unloading"] is True
    wait_for(lambda: fake_queue.releases(), what="release after unload")
    session = fake_queue.sessions[fake_queue.releases()[0]["body"]["session_id"]]
    assert session["at_release"] == []  # the runner was gone before the tokens went back
    assert not pid_alive(starts[0]["pid"])
    exits = [r for r in read_records(record) if "exit" in r]
    assert exits and exits[0]["exit"] <= session["released"]
    assert len(fake_queue.releases()) == 1 and fake_queue.free == fake_queue.pool
    assert client.get("/health").get_json()["runner"]["holding_gpu"] is False


def test_keep_warm_ends_by_itself_when_the_time_runs_out(queued_app, fake_queue):
    app, record = queued_app("ok", KEEP_WARM_S="0.5")
    assert sync_job(app.test_client()).status_code == 200
    assert fake_queue.releases() == []
    started = time.monotonic()
    wait_for(lambda: fake_queue.releases(), timeout=10, what="release after the keep-warm time")
    assert time.monotonic() - started < 5
    (release,) = fake_queue.releases()
    assert fake_queue.sessions[release["body"]["session_id"]]["at_release"] == []


def test_without_keep_warm_every_job_gets_its_own_runner_and_lease(queued_app, fake_queue):
    app, record = queued_app("ok")
    client = app.test_client()
    assert sync_job(client).status_code == 200
    assert sync_job(client).status_code == 200
    starts = [r for r in read_records(record) if "start" in r]
    assert len({r["pid"] for r in starts}) == 2
    wait_for(lambda: len(fake_queue.releases()) == 2, what="the second release")
    assert len(fake_queue.acquires()) == 2


def test_a_failed_job_does_not_keep_the_runner_warm(queued_app, fake_queue):
    app, record = queued_app("fail", KEEP_WARM_S="30")
    client = app.test_client()
    task = json_job(client)
    body = wait_for(lambda: finished(client, task))
    assert body["error_code"] == "generation_failed" and body["retryable"] is True
    wait_for(lambda: fake_queue.releases(), what="release after a failed job")
    assert fake_queue.releases()[0]["body"]["status"] == "failed"


def test_prestarted_runner_holds_no_tokens_and_takes_the_first_job(queued_app, fake_queue):
    app, record = queued_app("ok")
    (spare,) = wait_for(lambda: spawns(record), what="a runner started ahead")
    assert spare["import_engine"] == "diffusers"  # the folder's engine, imported while it waits
    jobs = app.extensions["acestep"].jobs
    wait_for(lambda: jobs.warm_state()["spare_ready"], what="the spare to say it is ready")
    assert fake_queue.calls == []  # started ahead and ready, it asked for no tokens
    assert sync_job(app.test_client()).status_code == 200
    (start,) = [r for r in read_records(record) if "start" in r]
    assert start["pid"] == spare["pid"]  # the job went to the runner started ahead
    session = fake_queue.sessions[fake_queue.acquires()[0]["body"]["session_id"]]
    assert start["start"] >= session["granted"]  # ... only once the tokens were granted
    wait_for(lambda: len(spawns(record)) == 2, what="the next runner started ahead")


def test_prestart_off_starts_the_runner_after_the_tokens(queued_app, fake_queue):
    app, record = queued_app("ok", RUNNER_PRESTART="false")
    jobs = app.extensions["acestep"].jobs
    wait_for(lambda: jobs.idle_rounds >= 1, what="an idle round")  # its idle duty, where a spare would start, ran
    assert spawns(record) == []
    assert sync_job(app.test_client()).status_code == 200
    (spawn,) = spawns(record)
    session = fake_queue.sessions[fake_queue.acquires()[0]["body"]["session_id"]]
    assert spawn["spawn"] >= session["granted"]


def test_unload_with_nothing_loaded(queued_app):
    app, _ = queued_app("ok")
    body = app.test_client().post("/unload").get_json()
    assert body["success"] is True and body["unloading"] is False
