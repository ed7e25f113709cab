"""Leases, the journal and the data folder, in-process: a full disk where the runner's log goes, a
log that cannot be closed, records a dead worker left behind, a second service on the same folder,
and a restart in the same process. The fake gpu-queue-service checks every release."""
from __future__ import annotations

import base64
import errno
import json
import subprocess
import time
from pathlib import Path

import pytest

from conftest import alive_runners_in, fake_runner_command, read_records, wait_for, wav_bytes
from webapp.data_lock import DataFolderInUse
from webapp.durable import write_json
from webapp.procinfo import ProcessId, identity, me


def vst(**fields) -> dict:
    return {"audio_data": base64.b64encode(wav_bytes(2.0)).decode(), "track_name": "drums", "bpm": 100, **fields}


def finished(client, task) -> dict | None:
    body = client.get(f"/lego/status/{task}").get_json()
    return body if body["status"] in ("completed", "failed") else None


@pytest.fixture
def queued(make_app, fake_queue, tmp_path):
    record = tmp_path / "runs.jsonl"

    fake_queue.on_release = alive_runners_in(record)

    def make(mode="ok", **settings):
        return make_app(QUEUE_URL=fake_queue.url, QUEUE_POLL_INTERVAL_S="0.05",
                        RUNNER_COMMAND=fake_runner_command(mode, record=record, **settings.pop("runner", {})), **settings)

    make.record = record
    return make


def dead_process() -> ProcessId:
    proc = subprocess.Popen(["true"])
    ident = identity(proc.pid)
    proc.wait()
    return ident or ProcessId(proc.pid, 1)


def test_a_full_disk_under_the_runners_log_stops_neither_the_job_nor_the_release(queued, fake_queue, monkeypatch):
    """Every write to the job's log fails with ENOSPC (/dev/full): the stderr pump drops the log and
    keeps draining (a runner blocked on a full pipe would hang), the job completes, the lease goes."""
    from webapp.uploads import JobFiles

    monkeypatch.setattr(JobFiles, "stderr_log", property(lambda self: Path("/dev/full")))
    app = queued("chatty", runner={"chatty_kb": 512})
    client = app.test_client()
    task = client.post("/lego", json=vst()).get_json()["task_id"]
    assert wait_for(lambda: finished(client, task), timeout=30)["status"] == "completed"
    wait_for(lambda: fake_queue.releases(), what="the release")
    assert fake_queue.problems() == []
    runner = app.extensions["acestep"].jobs.get(task)
    # the job records the exit (taken before the release) once the release call has returned
    wait_for(lambda: runner.tokens_released_at is not None, what="the job's record of the release")
    assert runner.runner_exited_at is not None and runner.tokens_released_at >= runner.runner_exited_at


def test_a_log_that_cannot_be_closed_does_not_skip_the_release(queued, fake_queue, monkeypatch):
    """end_job_log raising ENOSPC (the finding): the lease's exit still ends the runner, then releases."""
    from webapp.runner_process import RunnerProcess

    def fail(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(RunnerProcess, "end_job_log", fail)
    app = queued("ok")
    client = app.test_client()
    task = client.post("/lego", json=vst()).get_json()["task_id"]
    assert wait_for(lambda: finished(client, task), timeout=30)["status"] == "completed"
    wait_for(lambda: fake_queue.releases(), what="the release")
    assert fake_queue.problems() == []
    health = client.get("/health").get_json()
    assert health["jobs"]["tokens_held"] == 0 and health["jobs"]["releases_pending"] == 0


def test_the_journal_holds_the_lease_and_its_runner_while_a_job_runs(queued, fake_queue):
    app = queued("hang")
    client = app.test_client()
    task = client.post("/lego", json=vst()).get_json()["task_id"]
    data = app.extensions["acestep"].settings.data_dir
    wait_for(lambda: read_records(queued.record), what="the runner")
    run = [r for r in read_records(queued.record) if "start" in r][0]
    (lease,) = [json.loads(p.read_text()) for p in (data / "state" / "leases").glob("*.json")]
    assert lease["state"] == "held" and lease["job_id"] == task and lease["holder"] == me().as_dict()
    assert lease["runner"]["pid"] == run["pid"] and lease["backend"] == "gpu-queue-service"
    runners = {json.loads(p.read_text())["runner"]["pid"] for p in (data / "state" / "runners").glob("*.json")}
    assert run["pid"] in runners  # the spare started ahead is on record too
    client.delete(f"/lego/{task}")
    wait_for(lambda: not list((data / "state" / "leases").glob("*.json")), what="the lease record to go")
    assert fake_queue.problems() == []


def test_records_of_a_dead_worker_are_reconciled_at_start(make_app, fake_queue, tmp_path):
    """A worker died holding a lease, with its runner still running: the next service kills the
    runner's process group first, then releases the lease, before it takes any job."""
    data = tmp_path / "data"
    holder = dead_process()
    orphan = subprocess.Popen(["sleep", "300"], start_new_session=True)
    orphan_id = identity(orphan.pid)
    fake_queue.occupy("acestep-lego-" + "a" * 32 + "-dead", 6000)  # what the dead worker had been granted
    sid = "acestep-lego-" + "a" * 32 + "-dead"
    fake_queue.on_release = lambda _sid: [orphan.pid] if orphan.poll() is None else []
    (data / "state" / "leases").mkdir(parents=True)
    (data / "state" / "runners").mkdir(parents=True)
    write_json(data / "state" / "leases" / f"{sid}.json",
               {"session_id": sid, "job_id": "a" * 32, "state": "held", "backend": "gpu-queue-service",
                "base_url": fake_queue.url, "holder": holder.as_dict(), "runner": orphan_id.as_dict(), "status": "failed"})
    write_json(data / "state" / "runners" / f"{orphan_id.pid}-{orphan_id.start}.json",
               {"runner": orphan_id.as_dict(), "holder": holder.as_dict(), "argv0": "sleep"})
    t0 = time.monotonic()
    make_app(DATA_DIR=str(data), QUEUE_URL=fake_queue.url, RUNNER_KILL_GRACE_S="0.5")
    assert orphan.wait(1) == -15  # SIGTERM, before create_app returned
    assert time.monotonic() - t0 < 10
    session = fake_queue.sessions[sid]
    assert session["effective_releases"] == 1 and session["release_status"] == "failed" and session["at_release"] == []
    assert not list((data / "state" / "leases").glob("*.json")) and not list((data / "state" / "runners").glob("*.json"))


def test_a_lease_whose_acquire_never_registered_is_dropped_truthfully(make_app, fake_queue, tmp_path):
    from webapp import leases

    data = tmp_path / "data"
    (data / "state" / "leases").mkdir(parents=True)
    sid = "acestep-lego-" + "b" * 32 + "-lost"
    write_json(data / "state" / "leases" / f"{sid}.json",
               {"session_id": sid, "job_id": "b" * 32, "state": "acquiring", "backend": "gpu-queue-service",
                "base_url": fake_queue.url, "holder": dead_process().as_dict(), "runner": None, "status": "failed"})
    old = leases.UNCERTAIN_WINDOW_S
    leases.UNCERTAIN_WINDOW_S = 1.0
    try:
        app = make_app(DATA_DIR=str(data), QUEUE_URL=fake_queue.url, LOG_LEVEL="INFO")
        wait_for(lambda: not app.extensions["acestep"].leases.pending(), timeout=10, what="the uncertain lease to settle")
    finally:
        leases.UNCERTAIN_WINDOW_S = old
    assert sid not in fake_queue.sessions and len([c for c in fake_queue.release_attempts() if c["body"]["session_id"] == sid]) >= 2
    assert not list((data / "state" / "leases").glob("*.json"))


def test_one_service_per_data_folder(make_app, web_env):
    first = make_app()
    client = first.test_client()
    task = client.post("/lego", json=vst()).get_json()["task_id"]
    wait_for(lambda: finished(client, task), what="the first service's job")
    with pytest.raises(DataFolderInUse) as err:
        make_app()
    assert "is in use by another instance of this service" in str(err.value) and "stop that one first" in str(err.value)
    assert client.get(f"/lego/{task}/audio").status_code == 200  # untouched by the refused one


def test_restart_in_process_resumes_async_jobs_and_fails_interrupted_waiting_ones(make_app, tmp_path, web_env):
    data = Path(web_env["DATA_DIR"])
    once = tmp_path / "once"
    cmd = fake_runner_command("hang", once=once)
    first = make_app(RUNNER_COMMAND=cmd)
    client = first.test_client()
    running = client.post("/lego", json=vst()).get_json()["task_id"]
    queued_task = client.post("/lego", json=vst()).get_json()["task_id"]
    wait_for(lambda: client.get(f"/lego/status/{running}").get_json()["status"] == "processing", what="a running job")
    first.extensions["acestep"].close(10)
    # A synchronous caller's job that a crash interrupted (its connection is gone): forged from a record.
    record = json.loads((data / "jobs" / queued_task / "job.json").read_text())
    sync_task = "c" * 32
    (data / "jobs" / sync_task / "out.partial").mkdir(parents=True)
    (data / "jobs" / sync_task / "source.wav").write_bytes(wav_bytes(2.0))
    write_json(data / "jobs" / sync_task / "job.json", {**record, "id": sync_task, "state": "running", "client_waits": True,
                                                         "attempts": 1})
    (data / "jobs" / ("d" * 32 + ".staging")).mkdir()  # an upload never acknowledged
    second = make_app(RUNNER_COMMAND=cmd)
    c2 = second.test_client()
    for task in (running, queued_task):
        assert wait_for(lambda t=task: finished(c2, t), timeout=30)["status"] == "completed"
    interrupted = c2.get(f"/lego/status/{sync_task}").get_json()
    assert interrupted["error_code"] == "job_interrupted" and interrupted["retryable"] is True
    assert not (data / "jobs" / ("d" * 32 + ".staging")).exists()
    assert second.extensions["acestep"].jobs.get(running).attempts == 2
