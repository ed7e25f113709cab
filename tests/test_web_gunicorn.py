"""The service started the README's way (`gunicorn -c gunicorn.conf.py wsgi:app`) behind real HTTP:
both protocols end to end with the real runner on the tiny checkpoint, a client that hangs up
mid-generation, one that only half-closes, and a graceful shutdown during a job. GPU tokens come
from the fake gpu-queue-service, which checks at each release that no runner of the job is alive
(the job's runner pids come from the service's own log, so the check looks at the real processes)."""
from __future__ import annotations

import base64
import io
import json
import signal
import socket
import threading
import time
import uuid

import pytest
import requests
import soundfile as sf

from conftest import fake_runner_command, live_processes_with, pid_alive, read_records, wait_for, wav_bytes
from harness import Gunicorn, assert_released_after_exit, runner_alive_check

pytestmark = pytest.mark.slow


@pytest.fixture
def start_gunicorn(tmp_path, fake_queue):
    servers: list[Gunicorn] = []
    data_dir = tmp_path / f"data-{uuid.uuid4().hex[:6]}"
    fake_queue.on_release = runner_alive_check(servers)

    def start(data=None, **env):
        base = {"DATA_DIR": str(data or data_dir), "QUEUE_URL": fake_queue.url, "QUEUE_POLL_INTERVAL_S": "0.1",
                "GPU_LOCK_FILE": str(tmp_path / "gpu.lock"), "LEGO_STEPS": "3", "LEGO_MIN_STEPS": "1",
                "ACESTEP_DEVICE": "cpu", "RUNNER_KILL_GRACE_S": "2", "LOG_LEVEL": "INFO"}
        server = Gunicorn({**base, **env}, tmp_path / f"gunicorn-{len(servers)}.log", wait=False)
        servers.append(server)  # before it answers: a job it resumes may end, and release, before then
        server.wait_healthy()
        return server, data or data_dir

    start.servers = servers
    yield start
    for server in servers:
        server.stop()


def assert_token_log_invariants(server: Gunicorn, fake_queue, task_ids: list[str]):
    # A completed job is answered once its stem is written; its runner's exit and the release follow.
    wait_for(lambda: all(fake_queue.sids_of(t) and all(fake_queue.sessions[s]["released"] for s in fake_queue.sids_of(t))
                         for t in task_ids), timeout=20, what="every release")
    # The runner's exit time is taken before the release but logged after it: wait for the log line.
    wait_for(lambda: {e["job_id"] for e in server.events("job_runner_started")}
             <= {e["job_id"] for e in server.events("job_runner_exited")}, timeout=20, what="every runner_exited line")
    starts = {e["job_id"]: e for e in server.events("job_runner_started")}
    exits = {e["job_id"]: e for e in server.events("job_runner_exited")}
    assert len(fake_queue.acquires()) == len(fake_queue.releases()) == len(task_ids)
    assert_released_after_exit(fake_queue, task_ids, [server])
    for task in task_ids:
        session = fake_queue.session_of(task)
        if task in starts:
            assert starts[task]["started_at"] >= session["granted"], "runner started before the tokens were granted"
            assert exits[task]["exited_at"] <= session["released"], "tokens released before the runner exited"


def test_both_protocols_end_to_end_with_the_real_runner(start_gunicorn, fake_queue, tiny_checkpoint):
    server, data_dir = start_gunicorn(ACESTEP_CHECKPOINTS=str(tiny_checkpoint))
    health = requests.get(server.url + "/health", timeout=5)
    assert health.json()["model"] == "demo: random weights" and health.json()["checkpoints"]["complete"] is True
    assert health.headers["X-ACEStep-Model"] == "demo-random-weights"
    assert health.json()["gpu_tokens"]["reachable"] is True
    assert any("demo: random weights" in line for line in server.log_path.read_text().splitlines())

    # 1. the seed's multipart call, synchronous, WAV requested
    source = wav_bytes(2.0, rate=44100, channels=2)
    resp = requests.post(server.url + "/lego", files={"audio_file": ("guitar.wav", source, "audio/wav")},
                         data={"track_type": "drums", "bpm": "120", "key_scale": "A minor", "format": "wav"}, timeout=300)
    assert resp.status_code == 200, resp.text[:2000]
    assert resp.headers["Content-Type"].startswith("audio/wav")
    assert resp.headers["X-ACEStep-Model"] == "demo-random-weights"
    stem, rate = sf.read(io.BytesIO(resp.content))
    assert rate == 44100 and stem.shape[0] == 2 * 44100
    sync_task = resp.headers["X-Task-Id"]

    # 2. the plugin's JSON protocol, polled like the plugin does
    body = {"audio_data": base64.b64encode(wav_bytes(1.5, rate=48000)).decode(), "track_name": "vocals", "bpm": 90,
            "inference_steps": 3, "caption": "", "lyrics": "", "guidance_scale": 7.0, "seed": 5, "batch_size": 1,
            "audio_format": "wav"}
    accepted = requests.post(server.url + "/lego", json=body, timeout=30).json()
    assert accepted["success"] is True and accepted["status"] == "queued"
    task = accepted["task_id"]
    seen = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        status = requests.get(f"{server.url}/lego/status/{task}", timeout=10).json()
        seen.append(status)
        if status["status"] in ("completed", "failed"):
            break
        time.sleep(0.5)
    assert status["status"] == "completed", status
    assert status["seed"] == 5 and status["bpm"] == 90 and status["duration"] == pytest.approx(1.5)
    stem, rate = sf.read(io.BytesIO(base64.b64decode(status["audio_data"])))
    assert rate == 48000 and stem.shape[0] == int(1.5 * 48000)
    progress = [s["progress"] for s in seen]
    assert progress == sorted(progress)
    download = requests.get(f"{server.url}/lego/{task}/audio", timeout=10)
    assert download.status_code == 200 and download.content == base64.b64decode(status["audio_data"])

    assert_token_log_invariants(server, fake_queue, [sync_task, task])
    assert all(s["release_status"] == "completed" for s in fake_queue.sessions.values())
    assert server.stop() == 0


def _raw_multipart_request(port: int, audio: bytes, fields=(("track_type", "drums"), ("bpm", "120"))) -> socket.socket:
    boundary = "----acestep" + uuid.uuid4().hex
    parts = []
    for name, value in fields:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="audio_file"; filename="a.wav"\r\n'
                 f"Content-Type: audio/wav\r\n\r\n".encode() + audio + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    payload = b"".join(parts)
    head = (f"POST /lego HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n").encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(head + payload)
    return sock


def test_client_disconnect_cancels_the_job_and_frees_the_gpu(start_gunicorn, fake_queue, fake_checkpoints, tmp_path):
    record = tmp_path / "runs.jsonl"
    server, _ = start_gunicorn(ACESTEP_CHECKPOINTS=str(fake_checkpoints), RUNNER_COMMAND=fake_runner_command("hang", record=record))
    sock = _raw_multipart_request(server.port, wav_bytes(2.0))
    wait_for(lambda: read_records(record), timeout=30, what="the runner to start")
    runner_pid = read_records(record)[0]["pid"]
    task = server.events("job_runner_started")[0]["job_id"]
    sock.close()  # the client hangs up while waiting
    wait_for(lambda: fake_queue.releases(), timeout=10, what="the tokens to be released")
    assert [r["code"] for r in read_records(record) if "exit" in r] == [5]  # SIGTERMed, exited cleanly
    # The tokens go back before the job's record says cancelled (the runner must be gone first): wait for both.
    wait_for(lambda: requests.get(f"{server.url}/lego/status/{task}", timeout=5).json().get("status") == "failed",
             timeout=10, what="the job to end")
    status = requests.get(f"{server.url}/lego/status/{task}", timeout=5).json()
    assert status["error_code"] == "job_cancelled" and "client disconnected" in status["error"]
    assert server.events("client_disconnected")[0]["probes"] == 1  # one interim 100 answered by a reset
    assert_token_log_invariants(server, fake_queue, [task])
    assert fake_queue.session_of(task)["release_status"] == "failed"
    assert not pid_alive(runner_pid)


def test_graceful_shutdown_cancels_the_running_job_and_releases(start_gunicorn, fake_queue, fake_checkpoints, tmp_path):
    record = tmp_path / "runs.jsonl"
    server, data_dir = start_gunicorn(ACESTEP_CHECKPOINTS=str(fake_checkpoints),
                                      RUNNER_COMMAND=fake_runner_command("hang", record=record))
    answers = []

    def call():
        files = {"audio_file": ("a.wav", wav_bytes(2.0), "audio/wav")}
        answers.append(requests.post(server.url + "/lego", files=files, data={"track_type": "drums", "bpm": "100"}, timeout=60))

    waiting_client = threading.Thread(target=call)
    waiting_client.start()
    wait_for(lambda: read_records(record), timeout=30, what="the runner to start")
    queued = requests.post(server.url + "/lego", json={"audio_data": base64.b64encode(wav_bytes(2.0)).decode(),
                                                       "track_name": "drums", "bpm": 100}, timeout=10).json()
    assert queued["status"] == "queued"
    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    waiting_client.join(40)
    assert answers and answers[0].status_code == 503, answers and answers[0].text
    assert answers[0].json()["error_code"] == "service_shutting_down" and answers[0].json()["retryable"] is True
    assert server.proc.wait(40) == 0
    assert time.monotonic() - t0 < 30
    assert [r["code"] for r in read_records(record) if "exit" in r] == [5]
    running = server.events("job_runner_started")[0]["job_id"]
    assert_token_log_invariants(server, fake_queue, [running])  # the queued job never took tokens
    assert fake_queue.sids_of(queued["task_id"]) == []
    assert live_processes_with(str(record)) == []  # every fake runner (the spare too) is gone
    record_on_disk = json.loads((data_dir / "jobs" / queued["task_id"] / "job.json").read_text())
    assert record_on_disk["state"] == "queued"  # kept for the next start (tests/test_web_faults.py resumes it)


def test_a_half_closed_client_still_gets_its_answer(start_gunicorn, fake_queue, fake_checkpoints, tmp_path):
    """A client that shuts down its sending side after the request (and keeps reading) is not gone."""
    record = tmp_path / "runs.jsonl"
    server, _ = start_gunicorn(ACESTEP_CHECKPOINTS=str(fake_checkpoints),
                               RUNNER_COMMAND=fake_runner_command(step_s=0.6, steps_shown=5, record=record))
    sock = _raw_multipart_request(server.port, wav_bytes(2.0))
    sock.shutdown(socket.SHUT_WR)
    sock.settimeout(60)
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    sock.close()
    interim = b"HTTP/1.1 100 Continue\r\n\r\n"
    probes = 0
    while answer.startswith(interim):  # one probe every 2 s while the job runs
        answer, probes = answer[len(interim):], probes + 1
    assert probes >= 1 and answer.startswith(b"HTTP/1.1 200 OK"), answer[:200]
    assert b"audio/mpeg" in answer[:2000] and server.events("client_disconnected") == []
    assert [r["code"] for r in read_records(record) if "exit" in r] == [0]
