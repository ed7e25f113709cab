"""The web tier of the RQ mode through the Flask test client on a real redis-server, without GPU
workers: admission across hosts, cancel of a waiting job, answers while Redis is down, the GPU
worker's command line, settings that only make sense together."""
from __future__ import annotations

import base64
import os
import subprocess
import sys

import pytest

from conftest import ROOT, wav_bytes
from webapp.queue_rq.records import RecordState, Records, index_key
from webapp.settings import Settings, SettingsError


@pytest.fixture
def rq_app(redis_server, tmp_path):
    """rq_app(name, **env) -> a web app of the RQ mode; several share one Redis, as web hosts do."""
    from webapp import create_app

    def _make(name: str = "web", **overrides):
        env = {"REDIS_URL": redis_server.url, "DATA_DIR": str(tmp_path / name), "LEGO_STEPS": "8", "LEGO_MIN_STEPS": "2",
               "LOG_LEVEL": "WARNING", **{k: str(v) for k, v in overrides.items()}}
        app = create_app(Settings.from_env(env))
        app.config["TESTING"] = True
        return app

    return _make


def post_json(client, **fields):
    body = {"audio_data": base64.b64encode(wav_bytes(1.5)).decode(), "track_name": "drums", "bpm": 100, **fields}
    return client.post("/lego", json=body)


def test_the_queue_limit_holds_across_web_hosts(rq_app, redis_server, tmp_path):
    host_a, host_b = rq_app("a", MAX_QUEUED_JOBS=1).test_client(), rq_app("b", MAX_QUEUED_JOBS=1).test_client()
    # No GPU worker is alive: one may "run" (be taken by the first worker that comes) and one wait.
    first, second = post_json(host_a), post_json(host_b)
    assert first.status_code == 200 and second.status_code == 200
    assert second.get_json()["position"] == 2
    refused = post_json(host_a)
    assert refused.status_code == 429 and refused.get_json()["error_code"] == "queue_full"
    assert int(refused.headers["Retry-After"]) >= 1
    # Nothing of the refused job stayed: not in Redis, not on the web host's disk.
    conn = redis_server.client()
    assert conn.zcard(index_key(RecordState.QUEUED)) == 2 and conn.llen("rq:queue:acestep-lego") == 2
    assert conn.keys("acestep:blob:*") and len(conn.keys("acestep:blob:*")) == 2
    for name in ("a", "b"):
        assert list((tmp_path / name / "jobs").iterdir()) == []
    # The other host sees the first host's job, with the same answer.
    task = first.get_json()["task_id"]
    status = host_b.get(f"/lego/status/{task}").get_json()
    assert status["status"] == "queued" and status["queue_status"]["position"] == 1
    assert "no GPU worker" in host_b.get("/health").get_json()["problems"][0]


def test_a_waiting_job_is_cancelled_where_it_waits(rq_app, redis_server):
    client = rq_app().test_client()
    task = post_json(client).get_json()["task_id"]
    answer = rq_app("other").test_client().delete(f"/lego/{task}").get_json()
    assert answer["status"] == "cancelled"
    status = client.get(f"/lego/status/{task}").get_json()
    assert status["state"] == "cancelled" and status["error_code"] == "job_cancelled"
    conn = redis_server.client()
    assert conn.llen("rq:queue:acestep-lego") == 0 and not conn.exists(f"acestep:blob:{task}:source")
    assert 0 < conn.ttl(f"acestep:job:{task}") <= 3600  # kept RESULT_TTL_S, then gone
    assert client.get(f"/lego/{task}/audio").status_code == 409
    assert client.delete(f"/lego/{task}").get_json()["status"] == "deleted"
    assert client.get(f"/lego/status/{task}").status_code == 404
    assert Records(conn).get(task) is None


def test_redis_down_is_a_clear_503_everywhere_but_health_and_metrics(rq_app, redis_server):
    client = rq_app().test_client()
    task = post_json(client).get_json()["task_id"]
    redis_server.kill()
    for resp in (post_json(client), client.get(f"/lego/status/{task}"), client.delete(f"/lego/{task}")):
        assert resp.status_code == 503, resp.get_json()
        body = resp.get_json()
        assert body["error_code"] == "queue_unavailable" and body["retryable"] is True and "REDIS_URL" in body["error"]
    health = client.get("/health")
    assert health.status_code == 200 and health.get_json()["problems"] == ["job queue (Redis) unreachable"]
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and "acestep_queue_up 0.0" in metrics.get_data(as_text=True)
    redis_server.start()
    assert client.get(f"/lego/status/{task}").get_json()["status"] == "queued"  # nothing was lost


def test_settings_that_belong_together(tmp_path):
    env = {"ACESTEP_CHECKPOINTS": str(tmp_path), "DATA_DIR": str(tmp_path / "d")}
    with pytest.raises(SettingsError, match="WEB_WORKERS=3 needs REDIS_URL"):
        Settings.from_env({**env, "WEB_WORKERS": "3"})
    # A web host of the RQ mode needs no weights; without REDIS_URL the folder must exist.
    nowhere = {"ACESTEP_CHECKPOINTS": str(tmp_path / "nowhere"), "DATA_DIR": str(tmp_path / "d")}
    assert Settings.from_env({**nowhere, "REDIS_URL": "redis://127.0.0.1:1/0", "WEB_WORKERS": "3"}).web_workers == 3
    with pytest.raises(SettingsError, match="is not a folder"):
        Settings.from_env(nowhere)


def run_worker(env: dict, *args) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATA_DIR", "ACESTEP_CHECKPOINTS")}
    return subprocess.run([sys.executable, "-m", "webapp.worker", *args], cwd=ROOT, env={**clean, **env},
                          capture_output=True, text=True, timeout=60)


def test_the_gpu_worker_refuses_to_start_without_what_it_needs(tmp_path, redis_server, fake_checkpoints):
    proc = run_worker({"DATA_DIR": str(tmp_path / "d"), "ACESTEP_CHECKPOINTS": str(fake_checkpoints)})
    assert proc.returncode == 2 and "configuration error: REDIS_URL is not set" in proc.stderr
    proc = run_worker({"REDIS_URL": redis_server.url, "DATA_DIR": str(tmp_path / "d"),
                       "ACESTEP_CHECKPOINTS": str(tmp_path / "nowhere")})
    assert proc.returncode == 2 and "ACESTEP_CHECKPOINTS=" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_worker({"REDIS_URL": redis_server.url, "DATA_DIR": str(tmp_path / "d")}, "--check")
    assert proc.returncode == 1 and "no GPU worker has started on this DATA_DIR" in proc.stderr
