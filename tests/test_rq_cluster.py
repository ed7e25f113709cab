"""The multi-host mode end to end: a real redis-server, two GPU workers that share nothing but it
(separate data folders, gpu-queue-service doubles and runner logs), gunicorn with two workers.

One cluster serves the whole module (starting it is most of the cost); each test leaves it
whole. Every test ends by checking the token invariant on both GPU hosts: every acquire released
exactly once, none while the job's runner was alive.
"""
from __future__ import annotations

import base64
import io
import signal
import threading
import time

import pytest
import requests
import soundfile as sf
from prometheus_client.parser import text_string_to_metric_families

from conftest import pid_alive, wait_for, wav_bytes
from rq_cluster import Cluster, poll
from test_web_gunicorn import _raw_multipart_request
from tests.redis_server import RedisServer
from webapp.queue_rq.cluster import rq_queue

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    base = tmp_path_factory.mktemp("rq-cluster")
    checkpoints = base / "checkpoints"
    checkpoints.mkdir()
    (checkpoints / "model_index.json").write_text("{}")  # the fake runner never reads it
    redis_server = RedisServer(base / "redis").start()
    c = Cluster(base, redis_server, checkpoints).start()
    yield c
    c.stop()
    redis_server.kill()


def submit_json(url: str, seconds: float = 1.5, rate: int = 44100, **fields) -> str:
    body = {"audio_data": base64.b64encode(wav_bytes(seconds, rate=rate)).decode(), "track_name": "vocals", "bpm": 100,
            "inference_steps": 8, "caption": "", "lyrics": "", "guidance_scale": 7.0, "seed": -1, "batch_size": 1,
            "audio_format": "wav", **fields}
    resp = requests.post(url + "/lego", json=body, timeout=30, headers={"Connection": "close"})
    assert resp.status_code == 200, resp.text
    answer = resp.json()
    assert answer["success"] is True and answer["status"] == "queued" and answer["position"] >= 1
    assert isinstance(answer["estimated_seconds"], int)
    return answer["task_id"]


def poll_all(url: str, task_ids: list[str], timeout: float = 90) -> dict[str, list[dict]]:
    """Poll every job round-robin, each poll on a new connection, until all have ended."""
    seen: dict[str, list[dict]] = {t: [] for t in task_ids}
    deadline = time.monotonic() + timeout
    open_ids = list(task_ids)
    while open_ids:
        assert time.monotonic() < deadline, {t: seen[t][-1:] for t in open_ids}
        for task in list(open_ids):
            body = requests.get(f"{url}/lego/status/{task}", timeout=10, headers={"Connection": "close"}).json()
            seen[task].append(body)
            if body.get("status") in ("completed", "failed"):
                open_ids.remove(task)
        time.sleep(0.1)
    return seen


def scrape(url: str) -> dict:
    resp = requests.get(url + "/metrics", timeout=10)
    assert resp.status_code == 200
    out = {}
    for family in text_string_to_metric_families(resp.text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def test_the_plugin_protocol_over_two_web_workers_and_two_gpu_hosts(cluster):
    url = cluster.web.url
    jobs = {}
    for i in range(6):
        seconds, rate = 1.0 + 0.25 * i, (48000, 44100)[i % 2]
        jobs[submit_json(url, seconds, rate, seed=100 + i)] = (seconds, rate, 100 + i)
    sync_answer = {}

    def sync_call():
        files = {"audio_file": ("guitar.wav", wav_bytes(2.0, rate=22050, channels=1), "audio/wav")}
        sync_answer["resp"] = requests.post(url + "/lego", files=files, timeout=120,
                                            data={"track_type": "drums", "bpm": "120", "format": "wav"})

    caller = threading.Thread(target=sync_call)
    caller.start()
    seen = poll_all(url, list(jobs))
    caller.join(120)

    for task, (seconds, rate, seed) in jobs.items():
        final = seen[task][-1]
        assert final["status"] == "completed", final
        assert final["seed"] == seed and final["sample_rate"] == rate and final["duration"] == pytest.approx(seconds)
        assert final["candidates"] == 1 and final["audio_urls"] == [f"/lego/{task}/audio?index=0"]
        stem, stem_rate = sf.read(io.BytesIO(base64.b64decode(final["audio_data"])))
        assert stem_rate == rate and stem.shape[0] == int(seconds * rate)
        progress = [s["progress"] for s in seen[task]]
        assert progress == sorted(progress) and progress[-1] == 100
        for body in seen[task][:-1]:
            assert body["generation_in_progress"] is True
            qs = body["queue_status"]
            assert qs["status"] in ("queued", "ready") and isinstance(qs["estimated_seconds"], int)
            assert (qs["position"] >= 1) if body["status"] == "queued" else (qs["position"] == 0)
        download = requests.get(f"{url}/lego/{task}/audio", timeout=10)
        assert download.status_code == 200 and download.content == base64.b64decode(final["audio_data"])
    resp = sync_answer["resp"]
    assert resp.status_code == 200, resp.text[:500]
    stem, stem_rate = sf.read(io.BytesIO(resp.content))
    assert stem_rate == 22050 and stem.shape[0] == 2 * 22050

    # Polls were answered by both web workers; jobs ran on both GPU hosts, each job exactly once.
    status_pids = {e["pid"] for e in cluster.web.events("request") if e["path"].startswith("/lego/status/")}
    assert len(status_pids) == 2, status_pids
    ran = [h.jobs_started() for h in cluster.hosts]
    assert all(ran), ran
    everything = set(jobs) | {resp.headers["X-Task-Id"]}
    assert sorted(ran[0] + ran[1]) == sorted(everything)
    # Hosts keep nothing once a job has ended: no job folder on the GPU hosts or the web host.
    for folder in [h.data_dir / "jobs" for h in cluster.hosts] + [cluster.base / "web-data" / "jobs"]:
        wait_for(lambda folder=folder: not any(folder.iterdir()), timeout=10, what=f"{folder} to be empty")

    # Both hosts' jobs taught the cluster's estimate (seconds per second of source, in Redis), which
    # the web workers read for estimated_seconds.
    figures = cluster.redis.client().hgetall("acestep:stats:job_seconds")
    assert float(figures[b"per_source_s"]) > 0 and float(figures[b"start_s"]) >= 0, figures
    health = requests.get(url + "/health", timeout=5).json()
    assert health["status"] == "ok" and health["queue"]["workers_alive"] == 2
    assert health["queue"]["jobs_by_state"]["completed"] >= 7 and health["queue"]["persistence"]["appendonly"] == "yes"
    metrics = scrape(url)
    assert metrics[("acestep_queue_up", frozenset())] == 1
    assert metrics[("acestep_jobs_finished_total", frozenset({("state", "completed"), ("error_code", "none")}))] >= 7
    workers = sum(v for (name, _), v in metrics.items() if name == "acestep_gpu_workers")
    assert workers == 2
    assert cluster.check_tokens() == 7
    # POST /unload reaches every GPU worker (RQ's command channel); none keeps a model warm here.
    answer = requests.post(url + "/unload", timeout=10).json()
    assert answer["success"] is True and answer["unloading"] is False
    wait_for(lambda: all(h.events("unload_requested") for h in cluster.hosts), timeout=10,
             what="both GPU workers to get the unload command")


def test_cancel_across_hosts_stops_the_runner_before_it_answers(cluster):
    url = cluster.web.url
    before = cluster.check_tokens()
    hung = [submit_json(url, caption="fake-mode:hang") for _ in range(2)]
    wait_for(lambda: all(requests.get(f"{url}/lego/status/{t}", timeout=5).json()["status"] == "processing" for t in hung),
             timeout=30, what="both GPU workers to run a job")
    waiting = submit_json(url)
    assert requests.get(f"{url}/lego/status/{waiting}", timeout=5).json()["queue_status"]["position"] == 1

    # A job no GPU worker has taken is cancelled where it waits, and never runs.
    answer = requests.delete(f"{url}/lego/{waiting}", timeout=30).json()
    assert answer["status"] == "cancelled"
    final = requests.get(f"{url}/lego/status/{waiting}", timeout=5).json()
    assert final["state"] == "cancelled" and final["error_code"] == "job_cancelled"

    # A running job: the answer comes once its runner has exited and its tokens are back.
    for task in hung:
        host = next(h for h in cluster.hosts if task in h.jobs_started())
        watch = cluster.watches[cluster.hosts.index(host)]
        pids = watch.runner_pids(task)
        assert pids and all(pid_alive(p) for p in pids)
        answer = requests.delete(f"{url}/lego/{task}", timeout=30).json()
        answered_at = time.time()
        assert answer["status"] == "cancelled", answer
        assert not any(pid_alive(p) for p in pids), "DELETE answered while the runner was alive"
        session = next(s for sid, s in host.queue.sessions.items() if task in sid)
        assert session["released"] is not None and session["released"] <= answered_at
        final = requests.get(f"{url}/lego/status/{task}", timeout=5).json()
        assert final["state"] == "cancelled" and final["error_code"] == "job_cancelled"
    for host in cluster.hosts:
        assert waiting not in host.jobs_started()

    # A synchronous multipart caller that hangs up: its job is stopped on the GPU host that runs it.
    known = {t for h in cluster.hosts for t in h.jobs_started()}
    sock = _raw_multipart_request(cluster.web.port, wav_bytes(1.5),
                                  fields=(("track_type", "drums"), ("bpm", "120"), ("caption", "fake-mode:hang")))
    task = wait_for(lambda: next((t for h in cluster.hosts for t in h.jobs_started() if t not in known), None),
                    timeout=30, what="the synchronous job to start")
    index = next(i for i, h in enumerate(cluster.hosts) if task in h.jobs_started())
    pids = cluster.watches[index].runner_pids(task)
    sock.close()
    final, _ = poll(url, task, timeout=30)
    assert final["state"] == "cancelled" and "client disconnected" in final["error"]
    assert not any(pid_alive(p) for p in pids)
    assert cluster.check_tokens() == before + 3


def test_a_web_restart_mid_queue_loses_nothing(cluster):
    url = cluster.web.url
    before = cluster.check_tokens()
    tasks = [submit_json(url, seconds=1.0) for _ in range(5)]
    assert cluster.web.stop() == 0  # SIGTERM: the web tier holds no job; the GPU workers go on
    cluster.web.start()  # the same port, a new master and new workers
    seen = poll_all(url, tasks)
    assert all(seen[t][-1]["status"] == "completed" for t in tasks), {t: seen[t][-1] for t in tasks}
    assert cluster.check_tokens() == before + 5


def test_redis_down_answers_503_and_loses_no_acknowledged_job(cluster):
    url = cluster.web.url
    before = cluster.check_tokens()
    tasks = [submit_json(url, seconds=1.0) for _ in range(3)]
    wait_for(lambda: requests.get(f"{url}/lego/status/{tasks[0]}", timeout=5).json()["status"] != "queued",
             timeout=30, what="the first job to start")
    cluster.redis.kill(signal.SIGKILL)
    try:
        refused = requests.post(url + "/lego", json={"audio_data": base64.b64encode(wav_bytes(1.0)).decode(),
                                                     "track_name": "drums", "bpm": 90}, timeout=30)
        assert refused.status_code == 503
        assert refused.json()["error_code"] == "queue_unavailable" and refused.json()["retryable"] is True
        status = requests.get(f"{url}/lego/status/{tasks[1]}", timeout=30)
        assert status.status_code == 503 and status.json()["error_code"] == "queue_unavailable"
        health = requests.get(url + "/health", timeout=30)
        assert health.status_code == 200 and health.json()["status"] == "degraded"
        assert "job queue (Redis) unreachable" in health.json()["problems"]
        assert scrape(url)[("acestep_queue_up", frozenset())] == 0
    finally:
        cluster.redis.start()  # the same port and folder: the append-only file brings everything back
    seen = poll_all(url, tasks, timeout=120)
    assert all(seen[t][-1]["status"] == "completed" for t in tasks), {t: seen[t][-1] for t in tasks}
    cluster.wait_workers(2)
    assert cluster.check_tokens() == before + 3


def _run_hung_job(cluster) -> tuple[str, int, object]:
    """A job whose runner hangs past its last step (it writes nothing more until it is stopped, so
    no broken pipe would end it); returns (task id, host index, host)."""
    url = cluster.web.url
    task = submit_json(url, caption="fake-mode:hang")
    wait_for(lambda: requests.get(f"{url}/lego/status/{task}", timeout=5).json().get("progress", 0) >= 90,
             timeout=30, what="the job to reach its last step")
    index, host = next((i, h) for i, h in enumerate(cluster.hosts) if task in h.jobs_started())
    return task, index, host


def _hold_off_heartbeat_expiry(cluster) -> list[str]:
    """Move every running job's heartbeat expiry (its score in RQ's started-job registry) an hour
    ahead, as if its worker had just beaten: neither a web host's poll nor a GPU worker's
    maintenance will fail those jobs for lost heartbeats. Returns their ids."""
    registry = rq_queue(cluster.redis.client()).started_job_registry
    members = registry.connection.zrange(registry.key, 0, -1)
    registry.connection.zadd(registry.key, {m: time.time() + 3600 for m in members}, xx=True)
    return [registry.parse_job_id(m) for m in members]


def test_sigterm_of_a_gpu_worker_puts_its_job_back_for_the_other(cluster):
    url = cluster.web.url
    task, index, host = _run_hung_job(cluster)
    other = cluster.hosts[1 - index]
    runner_pids = cluster.watches[index].runner_pids(task)
    assert host.stop(signal.SIGTERM) == 0  # a deploy: the worker ends its job's runner and leaves
    assert not any(pid_alive(p) for p in runner_pids)
    session = next(s for sid, s in host.queue.sessions.items() if task in sid)
    assert session["released"] is not None, "the stopped worker's tokens were not released"
    # The job went back to the front of the queue, and the other GPU host runs it now.
    wait_for(lambda: task in other.jobs_started(), timeout=30, what="the other GPU worker to take the job")
    status = requests.get(f"{url}/lego/status/{task}", timeout=5).json()
    assert status["status"] in ("queued", "processing"), status
    answer = requests.delete(f"{url}/lego/{task}", timeout=30).json()
    assert answer["status"] == "cancelled"
    host.start()
    cluster.wait_workers(2)
    cluster.check_tokens()


def test_sigkill_of_a_gpu_worker_mid_job(cluster):
    url = cluster.web.url
    # 1. No replacement comes: the job fails, retryable, once the worker's heartbeats have stopped.
    task, index, host = _run_hung_job(cluster)
    runner_pids = cluster.watches[index].runner_pids(task)
    host.stop(signal.SIGKILL)
    final, _ = poll(url, task, timeout=30)
    assert final["state"] == "failed" and final["error_code"] == "gpu_worker_lost" and final["retryable"] is True
    # Its replacement (same data folder) leaves no runner and no tokens held behind.
    host.start()
    cluster.wait_workers(2)
    wait_for(lambda: not any(pid_alive(p) for p in runner_pids), timeout=20, what="the orphaned runner to be ended")
    wait_for(lambda: not host.queue.holders, timeout=20, what="the lost job's tokens to be released")
    cluster.check_tokens()

    # 2. The replacement starts at once: it fails its predecessor's job itself, and reclaims the
    #    runner and the tokens before its first job. So that nothing else can fail the job however
    #    long the successor takes to start, the dead worker's job is made to look freshly beaten.
    task, index, host = _run_hung_job(cluster)
    runner_pids = cluster.watches[index].runner_pids(task)
    host.stop(signal.SIGKILL)
    assert _hold_off_heartbeat_expiry(cluster) == [task]
    host.start()
    final, _ = poll(url, task, timeout=30)
    assert final["error_code"] == "gpu_worker_lost", (final, host.events()[-5:])
    recovered = [e for e in host.events("worker_predecessor_recovered") if task in e["jobs_failed"]]
    assert recovered, ("the successor should have failed its predecessor's job", host.events()[-5:])
    assert not rq_queue(cluster.redis.client()).started_job_registry.get_job_ids(cleanup=False)
    cluster.wait_workers(2)
    wait_for(lambda: not any(pid_alive(p) for p in runner_pids), timeout=20, what="the orphaned runner to be ended")
    wait_for(lambda: not host.queue.holders, timeout=20, what="the lost job's tokens to be released")
    cluster.check_tokens()

    # And the cluster works on: a new job completes.
    final, _ = poll(url, submit_json(url), timeout=60)
    assert final["status"] == "completed"
