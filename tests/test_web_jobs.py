"""Jobs through the Flask test client on the contract-speaking fake runner: both protocols, status
shapes, progress, cancel, timeout, runner failures, the bounded queue, expiry, health, auth."""
from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import time

import pytest
import soundfile as sf

from conftest import ROOT, fake_runner_command, files_under, pid_alive, read_records, wait_for, wav_bytes


def post_multipart(client, audio=None, **fields):
    data = {"track_type": "drums", "bpm": "120", "audio_file": (io.BytesIO(audio or wav_bytes(3.0)), "guitar.wav"), **fields}
    return client.post("/lego", data=data, content_type="multipart/form-data")


def post_json(client, audio=None, **fields):
    body = {"audio_data": base64.b64encode(audio or wav_bytes(3.0)).decode(), "track_name": "vocals", "bpm": 100,
            "inference_steps": 8, "caption": "", "lyrics": "", "guidance_scale": 7.0, "seed": -1, "batch_size": 1,
            "audio_format": "wav", **fields}
    return client.post("/lego", json=body)


def poll_until_finished(client, task_id, timeout=30.0):
    seen = []

    def finished():
        body = client.get(f"/lego/status/{task_id}").get_json()
        seen.append(body)
        return body if body["status"] in ("completed", "failed") else None

    final = wait_for(finished, timeout, 0.02, f"task {task_id}")
    return final, seen


def job_of(app, task_id):
    return app.extensions["acestep"].jobs.get(task_id)


# ---- the seed's multipart call -------------------------------------------------------------------

def test_multipart_answers_mp3_by_default_and_wav_or_flac_on_request(make_app):
    client = make_app().test_client()
    resp = post_multipart(client)
    assert resp.status_code == 200, resp.get_json()
    assert resp.mimetype == "audio/mpeg"
    assert len(resp.headers["X-Task-Id"]) == 32 and resp.headers["X-Candidates"] == "1"
    assert resp.data[:3] == b"ID3" or resp.data[:2] in (b"\xff\xfb", b"\xff\xf3", b"\xff\xf2")

    resp = post_multipart(client, wav_bytes(2.5, rate=22050, channels=1), format="wav")
    assert resp.mimetype == "audio/wav"
    data, rate = sf.read(io.BytesIO(resp.data))
    assert rate == 22050 and data.shape[0] == int(2.5 * 22050)  # source's rate and exact frame count

    resp = client.post(
        "/lego", data={"track_type": "vocals", "bpm": "90", "audio_file": (io.BytesIO(wav_bytes(2.0)), "a.wav")},
        headers={"Accept": "audio/flac"}, content_type="multipart/form-data")
    assert resp.mimetype == "audio/flac" and sf.info(io.BytesIO(resp.data)).format == "FLAC"


def test_multipart_async_answers_a_task_id_then_audio(make_app):
    app = make_app()
    client = app.test_client()
    resp = post_multipart(client, **{"async": "1", "batch_size": "2", "format": "wav", "seed": "77"})
    assert resp.status_code == 202
    body = resp.get_json()
    assert body["success"] is True and body["status"] == "queued" and body["status_url"] == f"/lego/status/{body['task_id']}"
    final, _ = poll_until_finished(client, body["task_id"])
    assert final["status"] == "completed" and final["candidates"] == 2 and final["seed"] == 77
    for index in (0, 1):
        audio = client.get(f"/lego/{body['task_id']}/audio?index={index}")
        assert audio.status_code == 200 and audio.mimetype == "audio/wav"
        assert "attachment" in audio.headers["Content-Disposition"]
    bad = client.get(f"/lego/{body['task_id']}/audio?index=2")
    assert bad.status_code == 400 and bad.get_json()["error_code"] == "invalid_parameter"


# ---- the gary4juce plugin's JSON protocol ------------------------------------------------------------

def test_json_protocol_field_for_field(make_app, tmp_path):
    record = tmp_path / "runs.jsonl"
    app = make_app(RUNNER_COMMAND=fake_runner_command(record=record))
    client = app.test_client()
    source = wav_bytes(3.0, rate=48000)
    resp = post_json(client, source, lyrics="la la la", lora="my-style", lora_scale=0.8, key_scale="f# minor",
                     time_signature="4/4", seed=42, caption="breathy alto", language="en", unknown_field=1)
    assert resp.status_code == 200
    body = resp.get_json()
    assert body["success"] is True and body["status"] == "queued" and len(body["task_id"]) == 32
    assert any("lyrics" in w for w in body["warnings"]) and any("lora" in w for w in body["warnings"])
    final, _ = poll_until_finished(client, body["task_id"])
    assert final["success"] is True and final["generation_in_progress"] is False and final["progress"] == 100
    assert final["status"] == "completed" and final["bpm"] == 100 and final["seed"] == 42
    assert final["duration"] == pytest.approx(3.0) and final["audio_format"] == "wav"
    data, rate = sf.read(io.BytesIO(base64.b64decode(final["audio_data"])))
    assert rate == 48000 and data.shape[0] == 3 * 48000
    args = read_records(record)[0]["args"]
    assert args["key"] == "F# minor" and args["caption"] == "breathy alto"
    assert args["track"] == "vocals" and args["time_signature"] == "4"
    assert args["seed"] == 42 and args["steps"] == 8
    assert args["format"] == "wav" and args["bpm"] == 100 and "lyrics" not in args


def test_text_that_looks_like_options_stays_text(make_app, tmp_path):
    """A caption such as "--steps 999" must reach the runner as the caption, nothing else."""
    record = tmp_path / "runs.jsonl"
    client = make_app(RUNNER_COMMAND=fake_runner_command(record=record)).test_client()
    resp = post_multipart(client, caption="--steps 999 --out /etc")
    assert resp.status_code == 200, resp.get_json()
    args = read_records(record)[0]["args"]
    assert args["caption"] == "--steps 999 --out /etc" and args["steps"] == 8
    bad = post_multipart(client, caption="nul\x00byte")
    assert bad.status_code == 400 and bad.get_json()["error_code"] == "invalid_parameter"


def test_inference_steps_are_held_within_bounds(make_app, tmp_path):
    record = tmp_path / "runs.jsonl"
    client = make_app(RUNNER_COMMAND=fake_runner_command(record=record), LEGO_MAX_STEPS="30").test_client()
    body = post_json(client, inference_steps=500).get_json()
    assert any("above this service's maximum" in w for w in body["warnings"])
    poll_until_finished(client, body["task_id"])
    assert read_records(record)[0]["args"]["steps"] == 30


def test_status_shapes_queue_positions_and_progress_only_go_up(make_app):
    app = make_app(RUNNER_COMMAND=fake_runner_command(step_s=0.15, steps_shown=8))
    client = app.test_client()
    first = post_json(client).get_json()["task_id"]
    second = post_json(client).get_json()["task_id"]
    wait_for(lambda: job_of(app, first).state == "running", what="first job running")
    queued = client.get(f"/lego/status/{second}").get_json()
    assert queued == {
        "success": True, "task_id": second, "generation_in_progress": True, "transform_in_progress": False,
        "status": "queued", "progress": 0,
        "queue_status": {"status": "queued", "message": queued["queue_status"]["message"], "position": 1,
                         "estimated_seconds": queued["queue_status"]["estimated_seconds"]},
        "warnings": []}
    assert isinstance(queued["queue_status"]["estimated_seconds"], int)
    final, seen = poll_until_finished(client, second)
    assert final["status"] == "completed"
    progress = [s["progress"] for s in seen]
    assert progress == sorted(progress), progress
    statuses = [s["status"] for s in seen]
    assert statuses[0] == "queued" and "processing" in statuses
    assert all(s["queue_status"]["status"] == "queued" for s in seen if s["status"] == "queued")
    running = [s for s in seen if s["status"] == "processing"]
    assert all(s["queue_status"]["status"] == "ready" and 0 < s["progress"] < 100 for s in running)
    assert any("step" in s["queue_status"]["message"] for s in running)



def test_estimated_seconds_follow_each_sources_length_from_the_demo_models_figures(make_app, fake_checkpoints):
    """A queued job waits for the running job's rest plus each job ahead by its own length; before any
    job finished, the demo model's measured figures (webapp/job_estimate.py) stand."""
    from webapp.job_estimate import DEMO_S_PER_SOURCE_S, DEMO_START_S, JobSeconds

    (fake_checkpoints / "DEMO_RANDOM_WEIGHTS").write_text("{}")
    app = make_app(RUNNER_COMMAND=fake_runner_command(step_s=1.0, steps_shown=8))
    client = app.test_client()
    running = post_json(client, audio=wav_bytes(2.0)).get_json()["task_id"]
    wait_for(lambda: job_of(app, running).state == "running", what="first job running")
    short = post_json(client, audio=wav_bytes(3.0)).get_json()["task_id"]
    long = post_json(client, audio=wav_bytes(60.0)).get_json()["task_id"]
    wait_of = {task: client.get(f"/lego/status/{task}").get_json()["queue_status"]["estimated_seconds"] for task in (short, long)}
    # The long job waits for the short one, whose own run is the demo's start plus 3 s at its rate.
    assert abs(wait_of[long] - wait_of[short] - (DEMO_START_S + 3 * DEMO_S_PER_SOURCE_S)) <= 2, wait_of
    assert 1 <= wait_of[short] <= DEMO_START_S + 2 * DEMO_S_PER_SOURCE_S + 1
    for task in (long, short, running):
        assert client.delete(f"/lego/{task}").get_json()["status"] == "cancelled"
    # Once jobs finish, the rate is learned from them: a 60 s source is still twice a 30 s one, minus the start.
    figures = JobSeconds.for_model(demo=False)
    assert figures.of(30) == 60.0  # real weights, no job yet: the flat default
    figures.learn(took_s=20.0, source_s=10.0)
    assert figures.of(60) == 2 * figures.of(30) == 120.0
    # The RQ mode keeps them in a Redis hash (bytes back): the same figures after the round trip.
    stored = {k.encode(): v.encode() for k, v in figures.fields().items()}
    assert JobSeconds.from_fields(stored, demo=True).of(60) == pytest.approx(120.0, abs=0.01)
    assert JobSeconds.from_fields({}, demo=True).of(10) == DEMO_START_S + 10 * DEMO_S_PER_SOURCE_S  # none stored yet

# ---- cancel, timeout, failures ----------------------------------------------------------------------

def test_delete_cancels_the_running_job_kills_the_runner_and_frees_the_lock(make_app, tmp_path):
    record = tmp_path / "runs.jsonl"
    app = make_app(RUNNER_COMMAND=fake_runner_command("hang", record=record))
    client = app.test_client()
    task = post_json(client).get_json()["task_id"]
    wait_for(lambda: read_records(record), what="runner start")
    pid = read_records(record)[0]["pid"]
    assert client.get("/health").get_json()["runner"]["holding_gpu"] is True
    resp = client.delete(f"/lego/{task}")
    assert resp.get_json() == {"success": True, "task_id": task, "status": "cancelled"}
    assert not pid_alive(pid)
    assert read_records(record)[-1]["code"] == 5  # it stopped on SIGTERM, cleanly
    status = client.get(f"/lego/status/{task}").get_json()
    assert status["status"] == "failed" and status["error_code"] == "job_cancelled" and status["state"] == "cancelled"
    audio = client.get(f"/lego/{task}/audio")  # issue 14: says cancelled, not "not completed"
    assert audio.status_code == 409 and audio.get_json()["error_code"] == "job_cancelled", audio.get_json()
    assert audio.get_json()["retryable"] is False
    health = client.get("/health").get_json()
    assert health["gpu_tokens"]["gpu_held"] is False and health["runner"]["holding_gpu"] is False
    job_dir = app.extensions["acestep"].settings.data_dir / "jobs" / task
    assert files_under(job_dir) == ["job.json", "runner.stderr.log"]  # the record and the log stay, nothing else
    assert client.delete(f"/lego/{task}").get_json()["status"] == "deleted"
    assert not job_dir.exists()


def test_delete_of_a_queued_job_never_starts_it(make_app, tmp_path):
    record = tmp_path / "runs.jsonl"
    app = make_app(RUNNER_COMMAND=fake_runner_command("hang", record=record))
    client = app.test_client()
    first = post_json(client).get_json()["task_id"]
    second = post_json(client).get_json()["task_id"]
    wait_for(lambda: read_records(record), what="first runner")
    assert client.delete(f"/lego/{second}").get_json()["status"] == "cancelled"
    jobs = app.extensions["acestep"].jobs
    client.delete(f"/lego/{first}")
    assert job_of(app, first).finished
    rounds = jobs.idle_rounds
    # The worker has looked at its queue again since the first job ended: the second would have started.
    wait_for(lambda: jobs.idle_rounds > rounds, what="the worker to find its queue empty")
    assert len([r for r in read_records(record) if "start" in r]) == 1


@pytest.mark.parametrize("mode", ["hang", "stubborn"])
def test_job_timeout_kills_the_process_group(make_app, tmp_path, mode):
    record = tmp_path / "runs.jsonl"
    app = make_app(RUNNER_COMMAND=fake_runner_command(mode, record=record), JOB_TIMEOUT_S="1", RUNNER_KILL_GRACE_S="0.5")
    client = app.test_client()
    t0 = time.monotonic()
    resp = post_multipart(client)
    took = time.monotonic() - t0
    body = resp.get_json()
    assert resp.status_code == 504 and body["error_code"] == "job_timeout" and body["retryable"] is True
    assert "JOB_TIMEOUT_S" in body["error"]
    assert took < 6
    pid = read_records(record)[0]["pid"]
    assert not pid_alive(pid)
    job = job_of(app, resp.headers["X-Task-Id"])
    assert job.runner_exit_code == (-9 if mode == "stubborn" else 5)  # SIGKILL after the grace when SIGTERM is ignored
    assert job.tokens_released_at >= job.runner_exited_at


@pytest.mark.parametrize("mode,status,code,retryable", [
    ("fail", 500, "generation_failed", True),
    ("badinput", 422, "runner_rejected_input", False),
    ("nockpt", 503, "checkpoints_unavailable", False),
    ("crash", 500, "runner_crashed", True),
    ("noresult", 500, "runner_protocol_error", False),
])
def test_runner_failures_map_to_truthful_errors(make_app, mode, status, code, retryable, capfd):
    app = make_app(RUNNER_COMMAND=fake_runner_command(mode), LOG_LEVEL="INFO")
    client = app.test_client()
    resp = post_multipart(client)
    body = resp.get_json()
    assert resp.status_code == status and body["error_code"] == code and body["retryable"] is retryable, body
    task = resp.headers["X-Task-Id"]
    job_dir = app.extensions["acestep"].settings.data_dir / "jobs" / task
    assert files_under(job_dir) == ["job.json", "runner.stderr.log"]  # source and partial output gone, log kept
    assert f"[fake-runner] {mode}" in (job_dir / "runner.stderr.log").read_text()
    err = capfd.readouterr().err
    assert "runner_failed" in err and f"[fake-runner] {mode}" in err  # the stderr tail is in the log
    if mode == "fail":
        assert body["error"] == "CUDA ran out of memory while generating."  # the runner's sentence


def test_non_json_stdout_lines_are_ignored(make_app):
    resp = post_multipart(make_app(RUNNER_COMMAND=fake_runner_command("junk")).test_client())
    assert resp.status_code == 200


def test_unstartable_runner_is_a_clear_failure(make_app):
    resp = post_multipart(make_app(RUNNER_COMMAND="/nonexistent/python -m runner").test_client())
    body = resp.get_json()
    assert resp.status_code == 500 and body["error_code"] == "runner_crashed" and "RUNNER_COMMAND" in body["error"]


# ---- the bounded queue and expiry -------------------------------------------------------------------

def test_full_queue_answers_429_with_retry_after(make_app, tmp_path):
    app = make_app(RUNNER_COMMAND=fake_runner_command("hang"), MAX_QUEUED_JOBS="1")
    client = app.test_client()
    running = post_json(client).get_json()["task_id"]
    wait_for(lambda: job_of(app, running).state == "running", what="running")
    waiting = post_json(client).get_json()["task_id"]
    resp = post_json(client)
    assert resp.status_code == 429
    assert resp.get_json()["error_code"] == "queue_full" and resp.get_json()["retryable"] is True
    assert int(resp.headers["Retry-After"]) >= 1
    data_dir = app.extensions["acestep"].settings.data_dir
    assert sorted(p.name for p in (data_dir / "jobs").iterdir()) == sorted([running, waiting])
    for task in (waiting, running):
        client.delete(f"/lego/{task}")


def test_results_expire_with_their_files(make_app):
    app = make_app(RESULT_TTL_S="1")
    client = app.test_client()
    resp = post_multipart(client)
    task = resp.headers["X-Task-Id"]
    data_dir = app.extensions["acestep"].settings.data_dir
    assert (data_dir / "jobs" / task / "out").is_dir()
    wait_for(lambda: client.get(f"/lego/status/{task}").status_code == 404, timeout=5, what="expiry")
    # the record goes first, its files right after (the janitor deletes them outside the store's lock)
    wait_for(lambda: files_under(data_dir / "jobs") == [], timeout=5, what="the expired job's files to go")


def test_leftovers_of_a_previous_process_are_removed_at_start(make_app, web_env):
    from pathlib import Path

    stale = Path(web_env["DATA_DIR"]) / "jobs" / ("a" * 32)
    stale.mkdir(parents=True)
    (stale / "source.wav").write_bytes(b"x")
    make_app()
    assert not stale.exists()


# ---- health, demo mode, auth, no torch ----------------------------------------------------------------

def test_health_is_cheap_and_complete(make_app):
    client = make_app().test_client()
    body = client.get("/health").get_json()
    assert body["status"] == "ok" and body["model"] == "real"
    assert body["checkpoints"]["engine"] == "diffusers" and body["checkpoints"]["complete"] is True
    assert body["gpu_tokens"]["backend"] == "lock-file" and body["gpu_tokens"]["gpu_held"] is False
    assert body["jobs"]["queued"] == 0 and body["runner"]["holding_gpu"] is False
    index = client.get("/").get_json()
    assert "POST /lego" in index["endpoints"] and "GET /lego/status/<task_id>" in index["endpoints"]


def test_demo_checkpoint_says_so_everywhere(make_app, fake_checkpoints, capfd):
    (fake_checkpoints / "DEMO_RANDOM_WEIGHTS").write_text("random")
    client = make_app(LOG_LEVEL="INFO").test_client()
    assert "demo: random weights" in capfd.readouterr().err  # the startup log
    health = client.get("/health")
    assert health.get_json()["model"] == "demo: random weights"
    assert health.headers["X-ACEStep-Model"] == "demo-random-weights"
    resp = post_multipart(client)
    assert resp.status_code == 200 and resp.headers["X-ACEStep-Model"] == "demo-random-weights"


def test_incomplete_checkpoints_degrade_health(make_app, fake_checkpoints):
    import shutil

    shutil.rmtree(fake_checkpoints / "vae")
    body = make_app().test_client().get("/health").get_json()
    assert body["status"] == "degraded" and body["checkpoints"]["missing"] == ["vae"]
    assert body["model"] == "none" and body["checkpoints"]["weights"] == "none"  # issue 14: not "real"


def test_an_empty_checkpoint_folder_has_no_weights(make_app, tmp_path):
    empty = tmp_path / "empty-checkpoints"
    empty.mkdir()
    body = make_app(ACESTEP_CHECKPOINTS=str(empty)).test_client().get("/health").get_json()
    assert body["status"] == "degraded" and body["model"] == "none" and body["checkpoints"]["complete"] is False


def test_api_key(make_app):
    client = make_app(API_KEY="s3cret").test_client()
    assert client.get("/health").status_code == 200 and client.get("/").status_code == 200
    resp = post_multipart(client)
    assert resp.status_code == 401 and resp.get_json()["error_code"] == "unauthorized"
    assert "Bearer" in resp.headers["WWW-Authenticate"]
    assert client.get("/lego/status/" + "0" * 32, headers={"X-API-Key": "wrong"}).status_code == 401
    assert client.get("/lego/status/" + "0" * 32, headers={"Authorization": "Bearer s3cret"}).status_code == 404
    assert client.get("/lego/status/" + "0" * 32, headers={"X-API-Key": "s3cret"}).status_code == 404
    ok = client.post("/lego", data={"track_type": "drums", "bpm": "120", "audio_file": (io.BytesIO(wav_bytes(2)), "a.wav")},
                     headers={"Authorization": "Bearer s3cret"}, content_type="multipart/form-data")
    assert ok.status_code == 200


def test_runner_gets_flags_not_the_service_environment(make_app, tmp_path, monkeypatch):
    """The API key stays in the service, and no service variable can act as a second source of settings."""
    monkeypatch.setenv("API_KEY", "s3cret")
    monkeypatch.setenv("ACESTEP_ENGINE", "auto")
    monkeypatch.setenv("MAX_DURATION_S", "5")
    probe = tmp_path / "env.txt"
    script = tmp_path / "envdump.py"
    script.write_text("import os\n"
                      f"open({str(probe)!r}, 'w').write(repr(sorted(k for k in ('API_KEY', 'ACESTEP_ENGINE', 'MAX_DURATION_S') if k in os.environ)))\n"
                      f"exec(open({str(ROOT / 'tests/fakes/fake_runner.py')!r}).read())\n")
    client = make_app(API_KEY="s3cret", RUNNER_COMMAND=f"{sys.executable} {script}").test_client()
    client.post(
        "/lego", data={"track_type": "drums", "bpm": "120", "audio_file": (io.BytesIO(wav_bytes(2)), "a.wav")},
        headers={"X-API-Key": "s3cret"}, content_type="multipart/form-data")
    assert probe.read_text() == "[]"


def test_webapp_never_imports_torch(tmp_path):
    """Of the runner, the web service imports only its standard-library-only contract modules."""
    code = ("import sys, wsgi\n"
            "bad = [m for m in ('torch', 'diffusers', 'transformers', 'acestep', 'numpy.testing', 'soxr') if m in sys.modules]\n"
            "bad += [m for m in sys.modules if m.startswith('runner') and m not in ('runner', 'runner.contract', 'runner.riff')]\n"
            "assert not bad, bad\n")
    env = {**os.environ}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**env, "ACESTEP_CHECKPOINTS": str(ROOT), "DATA_DIR": str(tmp_path / "data"),
                               "GPU_LOCK_FILE": str(tmp_path / "gpu.lock")})
    assert proc.returncode == 0, proc.stderr[-2000:]
