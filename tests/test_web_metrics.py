"""`GET /metrics` counts what really happened: real requests through the Flask test client on the
fake runner, the exposition parsed with prometheus_client's own parser (values, not substrings)."""
from __future__ import annotations

import base64
import io
import sys

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from conftest import FAKE_RUNNER, fake_runner_command, read_records, wait_for, wav_bytes
from test_web_gunicorn import start_gunicorn  # noqa: F401 - a fixture, reused: gunicorn on the fake runner

PHASE_TIMINGS = {"import_s": 0.05, "load_s": 3.0, "encoding_s": 0.3, "generating_s": 1.5, "decoding_s": 0.7,
                 "writing_s": 0.2, "total_s": 5.8, "mystery_s": 1.0}


def scrape(client, **headers) -> dict:
    """{(sample name, frozenset of labels): value} of one scrape."""
    resp = client.get("/metrics", headers=headers)
    assert resp.status_code == 200, resp.data[:500]
    assert resp.content_type.startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(resp.get_data(as_text=True)):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples: dict, name: str, **labels) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def post_multipart(client, seconds=2.0, **fields):
    data = {"track_type": "drums", "bpm": "120", "audio_file": (io.BytesIO(wav_bytes(seconds)), "guitar.wav"), **fields}
    return client.post("/lego", data=data, content_type="multipart/form-data")


def phase_runner(tmp_path) -> str:
    """The fake runner, with its result's timings replaced by every phase the real runner reports."""
    script = tmp_path / "phase_runner.py"
    script.write_text(
        "import json, subprocess, sys\n"
        f"child = subprocess.Popen([sys.executable, {str(FAKE_RUNNER)!r}, *sys.argv[1:]], stdout=subprocess.PIPE, text=True)\n"
        "for line in child.stdout:\n"
        "    event = json.loads(line)\n"
        "    if event.get('event') == 'result':\n"
        f"        event['timings'] = {PHASE_TIMINGS!r}\n"
        "    print(json.dumps(event), flush=True)\n"
        "sys.exit(child.wait())\n")
    return f"{sys.executable} {script}"


def test_an_idle_service_exposes_every_family_at_zero(make_app):
    client = make_app().test_client()
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").get_data(as_text=True))}
    for name, kind in (("acestep_jobs", "gauge"), ("acestep_jobs_finished", "counter"),
                       ("acestep_queue_wait_seconds", "histogram"), ("acestep_gpu_token_wait_seconds", "histogram"),
                       ("acestep_generation_phase_seconds", "histogram"), ("acestep_runner_exits", "counter"),
                       ("acestep_gpu_tokens_held", "gauge"), ("acestep_requests_rejected", "counter")):
        assert families[name].type == kind and families[name].documentation, name
    samples = scrape(client)
    assert [value(samples, "acestep_jobs", state=s) for s in ("queued", "running", "finished")] == [0, 0, 0]
    assert value(samples, "acestep_gpu_tokens_held") == 0
    assert value(samples, "acestep_queue_wait_seconds_count") == 0


def test_refused_requests_are_counted_by_error_code_and_status(make_app):
    client = make_app(MAX_UPLOAD_MB="0.05").test_client()
    assert post_multipart(client, 0.1, bpm="fast").status_code == 400
    assert post_multipart(client, 0.1, bpm="fast").status_code == 400
    no_bpm = {"track_type": "drums", "audio_file": (io.BytesIO(wav_bytes(0.1)), "a.wav")}
    assert client.post("/lego", data=no_bpm, content_type="multipart/form-data").get_json()["error_code"] == "missing_bpm"
    assert client.post("/lego", data=b"hello", content_type="text/plain").status_code == 415
    assert client.post("/lego", json={"audio_data": "!!not base64!!", "track_name": "drums", "bpm": 100}).status_code == 400
    assert post_multipart(client).status_code == 413  # 2 s of WAV is over 0.05 MB
    assert client.get("/nowhere").status_code == 404
    assert client.get("/lego/status/" + "0" * 32).status_code == 404
    samples = scrape(client)
    expected = {("invalid_bpm", "400"): 2, ("missing_bpm", "400"): 1, ("unsupported_content_type", "415"): 1,
                ("invalid_base64", "400"): 1, ("upload_too_large", "413"): 1, ("not_found", "404"): 1,
                ("task_not_found", "404"): 1}
    counted = {(dict(labels)["error_code"], dict(labels)["status"]): v for (name, labels), v in samples.items()
               if name == "acestep_requests_rejected_total"}
    assert counted == expected
    assert value(samples, "acestep_jobs_finished_total", state="completed", error_code="none") is None  # no job ran


def test_a_completed_job_observes_phases_waits_and_exit_status_0(make_app, tmp_path):
    app = make_app(RUNNER_COMMAND=phase_runner(tmp_path))
    client = app.test_client()
    resp = post_multipart(client)
    assert resp.status_code == 200
    jobs = app.extensions["acestep"].jobs
    wait_for(lambda: jobs.snapshot()["running"] == 0, what="the worker to let go of the job")
    samples = scrape(client)

    assert value(samples, "acestep_jobs_finished_total", state="completed", error_code="none") == 1
    assert value(samples, "acestep_runner_exits_total", exit_code="0") == 1
    for key, seconds in PHASE_TIMINGS.items():
        phase = key[:-2]
        if phase == "mystery":  # a key the runner contract does not name makes no new series
            assert value(samples, "acestep_generation_phase_seconds_count", phase=phase) is None
            continue
        assert value(samples, "acestep_generation_phase_seconds_count", phase=phase) == 1, phase
        assert value(samples, "acestep_generation_phase_seconds_sum", phase=phase) == pytest.approx(seconds)
    # 1.5 s of generating lands in the 2.5 s bucket and above, not in the 1 s one
    assert value(samples, "acestep_generation_phase_seconds_bucket", phase="generating", le="1.0") == 0
    assert value(samples, "acestep_generation_phase_seconds_bucket", phase="generating", le="2.5") == 1
    job = jobs.get(resp.headers["X-Task-Id"])
    for name, key in (("acestep_queue_wait_seconds", "queue_wait_s"), ("acestep_gpu_token_wait_seconds", "token_wait_s")):
        assert value(samples, name + "_count") == 1
        assert value(samples, name + "_sum") == pytest.approx(job.timings[key])
    assert [value(samples, "acestep_jobs", state=s) for s in ("queued", "running", "finished")] == [0, 0, 1]
    assert value(samples, "acestep_gpu_tokens_held") == 0
    assert not [k for k in samples if k[0] == "acestep_requests_rejected_total"]  # 2xx answers are not refusals


def runner_exits(samples: dict) -> dict:
    return {dict(labels)["exit_code"]: v for (name, labels), v in samples.items() if name == "acestep_runner_exits_total"}


@pytest.mark.parametrize("mode,error_code", [
    ("fail", "generation_failed"),
    ("nockpt", "checkpoints_unavailable"),
    ("crash", "runner_crashed"),
])
def test_a_failed_runner_is_counted_with_its_error_code(make_app, mode, error_code):
    app = make_app(RUNNER_COMMAND=fake_runner_command(mode))
    client = app.test_client()
    resp = post_multipart(client)
    assert resp.get_json()["error_code"] == error_code
    samples = scrape(client)
    assert value(samples, "acestep_jobs_finished_total", state="failed", error_code=error_code) == 1
    assert value(samples, "acestep_jobs_finished_total", state="completed", error_code="none") is None
    # the runner process's own end: it answers a failed job and exits normally, or dies of SIGKILL
    exit_code = app.extensions["acestep"].jobs.get(resp.headers["X-Task-Id"]).runner_exit_code
    assert runner_exits(samples) == {str(exit_code): 1}
    if mode == "crash":
        assert exit_code == -9
    assert value(samples, "acestep_generation_phase_seconds_count", phase="total") is None  # only completed jobs
    # the synchronous call's 5xx answer is a failure of the job, not a refused request
    assert not [k for k in samples if k[0] == "acestep_requests_rejected_total"]


def test_gauges_are_read_at_scrape_time_and_cancels_are_counted(make_app, tmp_path):
    record = tmp_path / "runs.jsonl"
    app = make_app(RUNNER_COMMAND=fake_runner_command("hang", record=record), QUEUE_TOKENS="4321")
    client = app.test_client()
    body = {"audio_data": base64.b64encode(wav_bytes(2.0)).decode(), "track_name": "drums", "bpm": 100}
    running = client.post("/lego", json=body).get_json()["task_id"]
    wait_for(lambda: read_records(record), what="the runner to start")
    waiting = client.post("/lego", json=body).get_json()["task_id"]
    samples = scrape(client)
    assert [value(samples, "acestep_jobs", state=s) for s in ("queued", "running", "finished")] == [1, 1, 0]
    assert value(samples, "acestep_gpu_tokens_held") == 4321
    assert value(samples, "acestep_runner_exits_total", exit_code="5") is None  # still running

    assert client.delete(f"/lego/{waiting}").get_json()["status"] == "cancelled"
    assert client.delete(f"/lego/{running}").get_json()["status"] == "cancelled"  # answers after the runner exited
    jobs = app.extensions["acestep"].jobs
    wait_for(lambda: jobs.snapshot()["running"] == 0, what="the worker to let go of the job")
    samples = scrape(client)
    assert [value(samples, "acestep_jobs", state=s) for s in ("queued", "running", "finished")] == [0, 0, 2]
    assert value(samples, "acestep_gpu_tokens_held") == 0
    assert value(samples, "acestep_jobs_finished_total", state="cancelled", error_code="job_cancelled") == 2
    assert runner_exits(samples) == {"5": 1}  # SIGTERMed; the waiting job never reached a runner
    assert value(samples, "acestep_queue_wait_seconds_count") == 1  # only the job the worker took waited to the end
    assert value(samples, "acestep_gpu_token_wait_seconds_count") == 1


def test_metrics_need_the_api_key_when_one_is_set(make_app):
    client = make_app(API_KEY="s3cret").test_client()
    refused = client.get("/metrics")
    assert refused.status_code == 401 and refused.get_json()["error_code"] == "unauthorized"
    samples = scrape(client, Authorization="Bearer s3cret")
    assert value(samples, "acestep_requests_rejected_total", error_code="unauthorized", status="401") == 1


def test_a_warm_runner_keeps_its_tokens_and_reused_tokens_wait_zero(make_app):
    app = make_app(KEEP_WARM_S="30", QUEUE_TOKENS="777")
    client = app.test_client()
    jobs = app.extensions["acestep"].jobs
    tasks = []
    for _ in range(2):
        resp = post_multipart(client)
        assert resp.status_code == 200
        tasks.append(resp.headers["X-Task-Id"])
        wait_for(lambda: jobs.snapshot()["running"] == 0, what="the worker to let go of the job")
    samples = scrape(client)
    assert value(samples, "acestep_jobs_finished_total", state="completed", error_code="none") == 2
    assert value(samples, "acestep_gpu_tokens_held") == 777  # the warm runner still holds them
    assert value(samples, "acestep_queue_wait_seconds_count") == 2
    assert value(samples, "acestep_gpu_token_wait_seconds_count") == 2
    waited = [jobs.get(task).timings["token_wait_s"] for task in tasks]
    assert waited[1] == 0 and value(samples, "acestep_gpu_token_wait_seconds_sum") == pytest.approx(sum(waited))
    assert runner_exits(samples) == {}  # the runner is still up


@pytest.mark.slow
def test_metrics_under_gunicorn_count_across_requests(start_gunicorn, fake_checkpoints, tmp_path):
    """Served the README's way: one gthread worker, so every request and the job worker share one registry."""
    server, _ = start_gunicorn(ACESTEP_CHECKPOINTS=str(fake_checkpoints), RUNNER_COMMAND=phase_runner(tmp_path))
    bad = requests.post(server.url + "/lego", files={"audio_file": ("a.wav", wav_bytes(0.5), "audio/wav")},
                        data={"track_type": "kazoo", "bpm": "120"}, timeout=30)
    assert bad.status_code == 400
    ok = requests.post(server.url + "/lego", files={"audio_file": ("a.wav", wav_bytes(2.0), "audio/wav")},
                       data={"track_type": "drums", "bpm": "120"}, timeout=60)
    assert ok.status_code == 200, ok.text[:500]
    resp = requests.get(server.url + "/metrics", timeout=10)
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = {(s.name, frozenset(s.labels.items())): s.value
               for f in text_string_to_metric_families(resp.text) for s in f.samples}
    assert value(samples, "acestep_requests_rejected_total", error_code="invalid_track_type", status="400") == 1
    assert value(samples, "acestep_jobs_finished_total", state="completed", error_code="none") == 1
    assert value(samples, "acestep_generation_phase_seconds_sum", phase="generating") == pytest.approx(1.5)
    assert value(samples, "process_resident_memory_bytes") > 0
