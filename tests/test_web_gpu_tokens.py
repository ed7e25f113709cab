"""GPU-token invariants against a real HTTP double of the gpu-queue-service (tests/fakes/gpu_queue.py):
exactly one release per acquire; the release only after the runner process exited; no runner
without tokens; on success, runner failure, timeout, cancel and a timed-out GPU wait; queue
positions reach the client; an unreachable service is a clear retryable error."""
from __future__ import annotations

import base64
import io
import threading

import pytest

from conftest import alive_runners_in, fake_runner_command, free_port, read_records, wait_for, wav_bytes


def json_job(client, **fields):
    body = {"audio_data": base64.b64encode(wav_bytes(2.0)).decode(), "track_name": "drums", "bpm": 120, **fields}
    resp = client.post("/lego", json=body)
    assert resp.status_code == 200, resp.get_json()
    return resp.get_json()["task_id"]


def sync_job(client):
    data = {"track_type": "drums", "bpm": "120", "audio_file": (io.BytesIO(wav_bytes(2.0)), "a.wav")}
    return client.post("/lego", data=data, content_type="multipart/form-data")


def assert_invariants(fake, records, expect_status: dict[str, str]):
    """expect_status: task_id -> the release status expected ("completed"/"failed"). A completed job is
    answered as soon as its stem is written; its runner's exit and the release follow, so wait for them."""
    wait_for(lambda: len(fake.releases()) >= len(expect_status), what="every release")
    acquires = fake.acquires()
    releases = fake.releases()
    assert len(acquires) == len(releases) == len(expect_status), (acquires, releases)
    assert fake.problems() == []
    starts = {r["pid"]: r for r in records if "start" in r}
    for task_id, status in expect_status.items():
        sid = fake.sid_of(task_id)
        session = fake.sessions[sid]
        assert [c["body"]["session_id"] for c in releases].count(sid) == 1  # exactly one release
        assert session["release_status"] == status
        assert session["at_release"] == [], f"runner still alive at release: {session['at_release']}"
        for rec in starts.values():
            if task_id in " ".join(rec["argv"]):
                assert session["granted"] is not None and rec["start"] >= session["granted"], "runner started without tokens"
                ends = [r for r in records if r["pid"] == rec["pid"] and "exit" in r]
                if ends:
                    assert ends[0]["exit"] <= session["released"]


@pytest.fixture
def queued_app(make_app, fake_queue, tmp_path):
    """make(mode, **settings) -> (app, record file); the fake queue checks runner liveness at each release."""
    record = tmp_path / "runs.jsonl"

    fake_queue.on_release = alive_runners_in(record)

    def make(mode="ok", **settings):
        app = make_app(QUEUE_URL=fake_queue.url, QUEUE_POLL_INTERVAL_S="0.05", QUEUE_TOKENS="5000",
                       RUNNER_COMMAND=fake_runner_command(mode, record=record), **settings)
        return app, record

    return make


def test_success_acquires_then_runs_then_releases(queued_app, fake_queue):
    app, record = queued_app("ok")
    resp = sync_job(app.test_client())
    assert resp.status_code == 200
    task = resp.headers["X-Task-Id"]
    body = fake_queue.acquires()[0]["body"]
    sid = fake_queue.sid_of(task)
    assert body == {"session_id": sid, "tokens": 5000, "task_type": "lego"}
    assert fake_queue.acquires()[0]["path"] == "/tasks"  # the seed's token-mode path: no lane by default
    wait_for(lambda: fake_queue.releases(), what="the release after the runner exited")
    assert fake_queue.releases()[0]["body"] == {"session_id": sid, "status": "completed"}
    assert fake_queue.releases()[0]["path"] == "/task/status"
    assert_invariants(fake_queue, read_records(record), {task: "completed"})
    assert fake_queue.free == fake_queue.pool


@pytest.mark.parametrize("mode", ["fail", "crash", "badinput"])
def test_runner_failure_releases_failed(queued_app, fake_queue, mode):
    app, record = queued_app(mode)
    resp = sync_job(app.test_client())
    assert resp.status_code >= 400
    assert_invariants(fake_queue, read_records(record), {resp.headers["X-Task-Id"]: "failed"})


def test_timeout_releases_after_the_kill(queued_app, fake_queue):
    app, record = queued_app("stubborn", JOB_TIMEOUT_S="1", RUNNER_KILL_GRACE_S="0.5")
    resp = sync_job(app.test_client())
    assert resp.get_json()["error_code"] == "job_timeout"
    assert_invariants(fake_queue, read_records(record), {resp.headers["X-Task-Id"]: "failed"})


def test_cancel_while_running_releases_after_exit(queued_app, fake_queue):
    app, record = queued_app("hang")
    client = app.test_client()
    task = json_job(client)
    wait_for(lambda: read_records(record), what="runner start")
    assert fake_queue.releases() == []  # held while it runs
    client.delete(f"/lego/{task}")
    assert_invariants(fake_queue, read_records(record), {task: "failed"})


def test_waiting_in_the_gpu_queue_shows_position_and_cancel_releases_without_a_runner(queued_app, fake_queue):
    app, record = queued_app("ok")
    client = app.test_client()
    fake_queue.occupy("another-model", 10000)  # 3000 left: our 5000 must wait
    task = json_job(client)
    wait_for(lambda: fake_queue.calls_to(f"/tasks/{fake_queue.sid_of(task)}", "GET"), what="polling the queue")
    status = client.get(f"/lego/status/{task}").get_json()
    assert status["status"] == "queued" and status["generation_in_progress"] is True
    assert status["queue_status"]["status"] == "queued" and status["queue_status"]["position"] == 1
    assert "GPU queue" in status["queue_status"]["message"]
    client.delete(f"/lego/{task}")
    assert read_records(record) == []  # no runner ever started without tokens
    assert_invariants(fake_queue, [], {task: "failed"})
    fake_queue.vacate("another-model")


def test_queued_job_runs_once_tokens_free_up(queued_app, fake_queue):
    app, record = queued_app("ok")
    client = app.test_client()
    fake_queue.occupy("another-model", 10000)
    task = json_job(client)
    wait_for(lambda: len(fake_queue.calls_to(f"/tasks/{fake_queue.sid_of(task)}", "GET")) >= 3, what="polls")
    assert read_records(record) == []
    fake_queue.vacate("another-model")
    wait_for(lambda: client.get(f"/lego/status/{task}").get_json()["status"] == "completed", what="completion")
    assert_invariants(fake_queue, read_records(record), {task: "completed"})


def test_gpu_wait_timeout_is_retryable_and_releases(queued_app, fake_queue):
    app, record = queued_app("ok", QUEUE_WAIT_TIMEOUT_S="1")
    fake_queue.occupy("another-model", 13000)
    resp = sync_job(app.test_client())
    body = resp.get_json()
    assert resp.status_code == 503 and body["error_code"] == "gpu_busy" and body["retryable"] is True
    assert read_records(record) == []
    assert_invariants(fake_queue, [], {resp.headers["X-Task-Id"]: "failed"})


def test_two_jobs_never_overlap_and_each_releases_once(queued_app, fake_queue):
    app, record = queued_app("ok")
    client = app.test_client()
    tasks = [json_job(client) for _ in range(3)]
    for task in tasks:
        wait_for(lambda t=task: client.get(f"/lego/status/{t}").get_json()["status"] == "completed", what=task)
    assert_invariants(fake_queue, read_records(record), {t: "completed" for t in tasks})
    spans = sorted((fake_queue.session_of(t)["granted"], fake_queue.session_of(t)["released"]) for t in tasks)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # one at a time


def test_unreachable_service_is_a_clear_retryable_error(make_app, tmp_path):
    record = tmp_path / "runs.jsonl"
    app = make_app(QUEUE_URL=f"http://127.0.0.1:{free_port()}/", RUNNER_COMMAND=fake_runner_command(record=record))
    client = app.test_client()
    resp = sync_job(client)
    body = resp.get_json()
    assert resp.status_code == 503 and body["error_code"] == "gpu_queue_unreachable" and body["retryable"] is True
    task = json_job(client)
    wait_for(lambda: client.get(f"/lego/status/{task}").get_json()["status"] == "failed", what="failure")
    status = client.get(f"/lego/status/{task}").get_json()
    assert status["error_code"] == "gpu_queue_unreachable" and status["retryable"] is True and status["success"] is False
    assert read_records(record) == []  # no runner without tokens
    health = client.get("/health").get_json()
    assert health["gpu_tokens"]["reachable"] is False and health["status"] == "degraded"


def test_unreachable_service_may_fall_back_to_the_lock_file(make_app, tmp_path):
    app = make_app(QUEUE_URL=f"http://127.0.0.1:{free_port()}/", QUEUE_PROCEED_IF_UNREACHABLE="true")
    resp = sync_job(app.test_client())
    assert resp.status_code == 200


def test_lock_file_serialises_two_services_on_one_host(make_app, tmp_path):
    """Two service instances (two gunicorns on one host) share GPU_LOCK_FILE: their runners never overlap."""
    record = tmp_path / "runs.jsonl"
    cmd = fake_runner_command(step_s=0.1, record=record)
    a = make_app(RUNNER_COMMAND=cmd, DATA_DIR=str(tmp_path / "a"))
    b = make_app(RUNNER_COMMAND=cmd, DATA_DIR=str(tmp_path / "b"))
    results = []
    threads = [threading.Thread(target=lambda app=app: results.append(sync_job(app.test_client()).status_code)) for app in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)  # generous: a loaded 2-core CI machine starts four interpreters here
    assert not any(t.is_alive() for t in threads), "a synchronous job did not answer within 120 s"
    assert results == [200, 200]
    runs = read_records(record)
    spans = sorted((r["start"], next(e["exit"] for e in runs if e["pid"] == r["pid"] and "exit" in e)) for r in runs if "start" in r)
    assert len(spans) == 2 and spans[0][1] <= spans[1][0], f"the two runners overlapped: {spans}"


def test_lock_file_wait_shows_queued_and_times_out_retryable(make_app, tmp_path):
    import fcntl
    import os

    lock = tmp_path / "gpu.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another service holds the GPU
    try:
        app = make_app(QUEUE_WAIT_TIMEOUT_S="1.5")
        client = app.test_client()
        task = json_job(client)
        wait_for(lambda: app.extensions["acestep"].jobs.get(task).gpu_message, what="waiting")
        status = client.get(f"/lego/status/{task}").get_json()
        assert status["status"] == "queued" and status["queue_status"]["status"] == "queued"
        assert "another generation" in status["queue_status"]["message"]
        wait_for(lambda: client.get(f"/lego/status/{task}").get_json()["status"] == "failed", what="timeout")
        status = client.get(f"/lego/status/{task}").get_json()
        assert status["error_code"] == "gpu_busy" and status["retryable"] is True
    finally:
        os.close(fd)
