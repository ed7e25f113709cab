"""The fault suite: the service started the README's way (gunicorn) and put through an operator's bad
day. Every case checks the same invariant:

    every acquired GPU lease is released exactly once, after its runner exited, and
    every accepted job ends in a state the client can read.

The first half is checked by the gpu-queue-service double (tests/fakes/gpu_queue.py), which logs
every acquire and release and, at the moment a release takes effect, looks whether any runner of
that job is alive (the job's runner pids come from the service's own log). The second half is
checked through the HTTP API, as the plugin polls it.
"""
from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
import requests

from conftest import ROOT, fake_runner_command, pid_alive, read_records, wait_for, wav_bytes
from harness import Gunicorn, assert_released_after_exit, runner_alive_check

pytestmark = pytest.mark.slow


@pytest.fixture
def service(tmp_path, fake_queue, fake_checkpoints):
    """service(data=None, **env) -> a started Gunicorn on the fake queue; all are stopped at the end."""
    servers: list[Gunicorn] = []
    default_data = tmp_path / f"data-{uuid.uuid4().hex[:6]}"
    fake_queue.on_release = runner_alive_check(servers)

    def start(data=None, wait=True, **env):
        base = {"DATA_DIR": str(data or default_data), "QUEUE_URL": fake_queue.url, "QUEUE_POLL_INTERVAL_S": "0.1",
                "QUEUE_HTTP_TIMEOUT_S": "1", "ACESTEP_CHECKPOINTS": str(fake_checkpoints),
                "GPU_LOCK_FILE": str(tmp_path / "gpu.lock"), "LEGO_STEPS": "5", "LEGO_MIN_STEPS": "1",
                "RUNNER_KILL_GRACE_S": "2", "LOG_LEVEL": "INFO"}
        server = Gunicorn({**base, **env}, tmp_path / f"gunicorn-{len(servers)}.log", wait=False)
        servers.append(server)  # before it answers: a job it resumes may end, and release, before then
        if wait:
            server.wait_healthy()
        return server

    start.servers = servers
    start.data = default_data
    yield start
    for server in servers:
        server.stop()


def submit(server, seconds=2.0, **fields) -> str:
    body = {"audio_data": base64.b64encode(wav_bytes(seconds)).decode(), "track_name": "drums", "bpm": 100, **fields}
    resp = requests.post(server.url + "/lego", json=body, timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.json()["task_id"]


def status(server, task) -> dict | None:
    try:
        return requests.get(f"{server.url}/lego/status/{task}", timeout=5).json()
    except (requests.RequestException, ValueError):
        return None  # between two workers, or between two services


def final_status(server, task, timeout=60) -> dict:
    return wait_for(lambda: (s := status(server, task)) and s["status"] in ("completed", "failed") and s,
                    timeout=timeout, interval=0.1, what=f"job {task} to finish")


def runs(record):
    return [r for r in read_records(record) if "start" in r]


def settled(fake_queue, server):
    """No lease of ours held, queued or waiting for a release to be confirmed."""
    health = requests.get(server.url + "/health", timeout=5).json()
    return fake_queue.problems() == [] and health["jobs"]["tokens_held"] == 0 and health["jobs"]["releases_pending"] == 0


# ---- the web worker dies ----------------------------------------------------------------------------------

def test_sigkill_of_the_worker_mid_job(service, fake_queue, tmp_path):
    """The OOM killer takes the gunicorn worker mid-job: its runner ends by itself (parent-death
    signal), the master's new worker releases the dead one's lease and resumes the job."""
    record = tmp_path / "runs.jsonl"
    server = service(RUNNER_COMMAND=fake_runner_command("hang", record=record, once=tmp_path / "once"))
    task = submit(server)
    (first,) = wait_for(lambda: runs(record), what="the runner to start")
    os.kill(server.worker(), signal.SIGKILL)
    wait_for(lambda: not pid_alive(first["pid"]), timeout=15, what="the orphaned runner to end itself")
    final = final_status(server, task)
    assert final["status"] == "completed" and final["success"] is True
    exits = [r for r in read_records(record) if r["pid"] == first["pid"] and "exit" in r]
    assert exits and exits[0]["code"] == 5  # it stopped as a cancelled runner does: at once, writing nothing
    sids = fake_queue.sids_of(task)
    assert len(sids) == 2 and [fake_queue.sessions[s]["release_status"] for s in sids].count("failed") == 1
    wait_for(lambda: settled(fake_queue, server), what="every lease settled")
    assert_released_after_exit(fake_queue, [task], service.servers)
    assert [e["session_id"] for e in server.events("lease_adopted")] == [s for s in sids if
                                                                        fake_queue.sessions[s]["release_status"] == "failed"]
    assert requests.get(f"{server.url}/lego/{task}/audio", timeout=5).status_code == 200


def test_killed_service_and_a_runner_that_ignores_its_end(service, fake_queue, tmp_path):
    """Master and worker SIGKILLed, and a runner stuck where SIGTERM does not reach: the next service
    on the data folder kills the orphan before anything else, then releases its lease and resumes."""
    record = tmp_path / "runs.jsonl"
    cmd = fake_runner_command("stubborn", record=record, once=tmp_path / "once")
    first_server = service(RUNNER_COMMAND=cmd)
    task = submit(first_server)
    (first,) = wait_for(lambda: runs(record), what="the runner to start")
    worker = first_server.worker()
    first_server.proc.kill()
    os.kill(worker, signal.SIGKILL)
    first_server.proc.wait(10)
    wait_for(lambda: not pid_alive(worker), what="the worker to die")
    noticed = wait_for(lambda: [json.loads(line) for line in record.read_text().splitlines() if "noticed" in line],
                       what="the runner to notice its service is gone")
    assert "the service" in noticed[0]["noticed"]  # its stdin hung up, or its parent changed
    assert pid_alive(first["pid"]), "the stubborn runner should have outlived its service"
    sid = fake_queue.sid_of(task)
    assert fake_queue.sessions[sid]["released"] is None  # its tokens are still held
    second = service(RUNNER_COMMAND=cmd)
    assert not pid_alive(first["pid"])  # reconciled before the new service answered /health
    assert second.events("orphan_runner_ending") and second.events("lease_adopted")
    final = final_status(second, task)
    assert final["status"] == "completed"
    wait_for(lambda: settled(fake_queue, second), what="every lease settled")
    assert_released_after_exit(fake_queue, [task], service.servers)
    assert fake_queue.sessions[sid]["at_release"]["checked"] == [first["pid"]]


# ---- the disk fills up ------------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "small-disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_full_disk_mid_job(service, fake_queue, tmp_path, small_disk):
    """DATA_DIR on a 24 MB filesystem; the runner's log fills it mid-job. The job fails readably, the
    lease is released after the runner, new uploads get a retryable 507, and the service recovers
    once space is freed."""
    record = tmp_path / "runs.jsonl"
    server = service(data=small_disk / "data", RUNNER_COMMAND=fake_runner_command(
        "chatty", record=record, once=tmp_path / "once", chatty_kb=8192, step_s=0.05))
    task = submit(server, seconds=1.0)
    final = final_status(server, task)
    assert final["status"] == "failed" and final["retryable"] is True, final
    wait_for(lambda: settled(fake_queue, server), what="the lease released")
    assert_released_after_exit(fake_queue, [task], [server])
    assert server.events("runner_log_not_written")  # the log hit the full disk; the pump kept draining
    full = requests.post(server.url + "/lego", json={"audio_data": base64.b64encode(wav_bytes(1.0)).decode(),
                                                     "track_name": "drums", "bpm": 100}, timeout=30)
    assert full.status_code == 507 and full.json()["error_code"] == "storage_full" and full.json()["retryable"] is True
    assert requests.delete(f"{server.url}/lego/{task}", timeout=10).json()["status"] == "deleted"  # frees the space
    again = submit(server, seconds=1.0)
    assert final_status(server, again)["status"] == "completed"
    wait_for(lambda: settled(fake_queue, server), what="every lease settled")


# ---- the gpu-queue-service misbehaves --------------------------------------------------------------------

def test_queue_service_killed_mid_job(service, fake_queue, tmp_path):
    record = tmp_path / "runs.jsonl"
    server = service(RUNNER_COMMAND=fake_runner_command(step_s=0.4, record=record))
    task = submit(server)
    wait_for(lambda: runs(record), what="the runner to start")
    fake_queue.stop()
    assert final_status(server, task)["status"] == "completed"  # the stem was made; only the release waits
    wait_for(lambda: server.events("token_release_pending"), timeout=20, what="the release to be pending")
    health = requests.get(server.url + "/health", timeout=5).json()
    assert health["status"] == "degraded" and health["jobs"]["releases_pending"] == 1
    assert not [e for e in server.events("tokens_released") if e.get("job_id") == task]  # never claimed early
    fake_queue.start()  # the service is back, its state intact (it keeps it in Redis)
    wait_for(lambda: settled(fake_queue, server), timeout=30, what="the release to be confirmed")
    (released,) = [e for e in server.events("tokens_released") if e.get("job_id") == task]
    assert released["answer"] == "confirmed" and released["attempts"] >= 2
    assert_released_after_exit(fake_queue, [task], [server])


def test_queue_service_answers_garbage(service, fake_queue, tmp_path):
    record = tmp_path / "runs.jsonl"
    server = service(RUNNER_COMMAND=fake_runner_command(record=record), QUEUE_WAIT_TIMEOUT_S="20")
    # 1. an HTML page for the acquire: not a grant, no runner
    fake_queue.inject("acquire", "garbage")
    task = submit(server)
    final = final_status(server, task)
    assert final["error_code"] == "gpu_queue_error" and final["retryable"] is True
    # 2. a JSON answer with an unknown status: not a grant either
    fake_queue.inject("acquire", 'json:{"status": "granted-maybe"}')
    task2 = submit(server)
    assert final_status(server, task2)["error_code"] == "gpu_queue_error"
    assert runs(record) == []
    # 3. queued, then the polls answer garbage: the registered session is released once
    fake_queue.occupy("another-model", 13000)
    fake_queue.inject("poll", "garbage", times=3)
    task3 = submit(server)
    assert final_status(server, task3)["error_code"] == "gpu_queue_error"
    fake_queue.vacate("another-model")
    assert runs(record) == []
    assert fake_queue.sessions[fake_queue.sid_of(task3)]["effective_releases"] == 1
    assert fake_queue.sids_of(task) == fake_queue.sids_of(task2) == []  # never registered: nothing to release
    wait_for(lambda: fake_queue.problems() == [], what="every lease settled")
    # 4. the service works again
    assert final_status(server, submit(server))["status"] == "completed"


def test_queue_service_answers_too_slowly(service, fake_queue, tmp_path):
    """The acquire times out on our side but registers later: the release must come after it
    registered (a release sent before would be lost and the session stay granted)."""
    record = tmp_path / "runs.jsonl"
    server = service(RUNNER_COMMAND=fake_runner_command(record=record), QUEUE_HTTP_TIMEOUT_S="0.5")
    fake_queue.inject("acquire", "slow:2.5")
    task = submit(server)
    final = final_status(server, task)
    assert final["error_code"] == "gpu_queue_unreachable" and final["retryable"] is True
    wait_for(lambda: fake_queue.sid_of(task) is not None, what="the late registration")
    wait_for(lambda: fake_queue.problems() == [], timeout=30, what="the late session to be released")
    session = fake_queue.session_of(task)
    assert session["granted"] is not None and session["released"] >= session["granted"]
    assert runs(record) == []  # no runner ran on tokens the job never knew it had
    wait_for(lambda: settled(fake_queue, server), what="nothing pending")


def test_queue_service_refuses_the_release_for_a_while(service, fake_queue, tmp_path):
    record = tmp_path / "runs.jsonl"
    server = service(RUNNER_COMMAND=fake_runner_command(record=record))
    fake_queue.inject("release", "error:503", times=8)
    task = submit(server)
    assert final_status(server, task)["status"] == "completed"
    wait_for(lambda: settled(fake_queue, server), timeout=40, what="the release to be confirmed")
    sid = fake_queue.sid_of(task)
    assert fake_queue.sessions[sid]["release_attempts"] == 1  # the 8 refusals never reached its state
    assert len([c for c in fake_queue.release_attempts() if c["body"]["session_id"] == sid]) == 9
    pending = [e for e in server.events("token_release_pending") if e["session_id"] == sid]
    assert pending and pending[0]["answer"] == "retry"
    (released,) = [e for e in server.events("tokens_released") if e["session_id"] == sid]
    assert released["answer"] == "confirmed"
    assert_released_after_exit(fake_queue, [task], [server])


# ---- shutdown and restart ------------------------------------------------------------------------------------

def test_sigterm_with_a_runner_that_ignores_sigterm(service, fake_queue, tmp_path):
    record = tmp_path / "runs.jsonl"
    server = service(RUNNER_COMMAND=fake_runner_command("stubborn", record=record), RUNNER_KILL_GRACE_S="3")
    task = submit(server)
    (run,) = wait_for(lambda: runs(record), what="the runner to start")
    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(60) == 0
    assert time.monotonic() - t0 < 30
    assert not pid_alive(run["pid"])
    assert [e["pid"] for e in server.events("runner_sigkill")].count(run["pid"]) == 1
    assert fake_queue.problems() == []
    assert_released_after_exit(fake_queue, [task], [server])
    stored = json.loads((service.data / "jobs" / task / "job.json").read_text())
    assert stored["state"] == "queued" and stored["attempts"] == 1  # interrupted: it resumes at the next start


def test_restart_with_jobs_queued_running_and_finished(service, fake_queue, tmp_path):
    record = tmp_path / "runs.jsonl"
    slow = fake_runner_command(step_s=0.5, steps_shown=8, record=record)
    server = service(RUNNER_COMMAND=slow)
    finished = submit(server)
    assert final_status(server, finished)["status"] == "completed"
    stem = requests.get(f"{server.url}/lego/{finished}/audio", timeout=5).content
    running = submit(server)
    queued = submit(server)
    wait_for(lambda: status(server, running)["status"] == "processing", what="the second job to run")
    server.stop()
    server2 = service(RUNNER_COMMAND=fake_runner_command(record=record))
    assert requests.get(f"{server2.url}/lego/{finished}/audio", timeout=5).content == stem  # still fetchable
    done = final_status(server2, finished)
    assert done["status"] == "completed" and base64.b64decode(done["audio_data"]) == stem
    for task in (running, queued):
        assert final_status(server2, task)["status"] == "completed", task
    resumed = {e["job_id"] for e in server2.events("job_resumed")}
    assert resumed == {running, queued}
    wait_for(lambda: settled(fake_queue, server2), what="every lease settled")
    assert_released_after_exit(fake_queue, [finished, running, queued], service.servers)
    assert len(fake_queue.sids_of(running)) == 2 and len(fake_queue.sids_of(queued)) == 1


def test_a_second_service_on_the_same_data_folder_is_refused(service, fake_queue, tmp_path):
    record = tmp_path / "runs.jsonl"
    first = service(RUNNER_COMMAND=fake_runner_command(step_s=0.3, steps_shown=6, record=record))
    task = submit(first)
    wait_for(lambda: runs(record), what="the first service's job to run")
    second = service(wait=False)
    assert second.proc.wait(30) != 0
    log = second.log_path.read_text()
    assert f"is in use by another instance of this service (pid {first.worker()}, port {first.port}" in log
    assert "stop that one first, or give this one its own DATA_DIR" in log
    shell = subprocess.run([sys.executable, "-c", "import wsgi"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                           env={**os.environ, "DATA_DIR": str(service.data), "ACESTEP_CHECKPOINTS": str(tmp_path / "checkpoints")})
    assert shell.returncode != 0 and "DataFolderInUse" in shell.stderr  # a shell on the host wipes nothing
    assert final_status(first, task)["status"] == "completed"
    assert requests.get(f"{first.url}/lego/{task}/audio", timeout=5).status_code == 200
    wait_for(lambda: settled(fake_queue, first), what="every lease settled")
