"""docker-compose.example.yml's multi-host profile, read with PyYAML: a web role and a GPU-worker
role of the same image that share nothing but Redis, and a Redis that keeps what it acknowledged."""
from __future__ import annotations

import pytest

from test_dockerfile import COMPOSE, default_of, environment


@pytest.fixture(scope="module")
def services():
    import yaml

    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))["services"]


def _volume_targets(service: dict) -> dict[str, str]:
    out = {}
    for volume in service.get("volumes") or []:
        source, target = volume.split(":")[:2]
        out[target] = source
    return out


def test_the_two_roles_share_only_redis(services):
    web, worker = services["acestep-web"], services["acestep-gpu-worker"]
    assert web["profiles"] == worker["profiles"] == ["scale-out"]
    web_env, worker_env = environment(web), environment(worker)
    assert web_env["REDIS_URL"] == worker_env["REDIS_URL"] and web_env["REDIS_URL"].startswith("redis://redis:")
    # No shared folder: each role has its own data volume, and only the worker reads the weights.
    web_vols, worker_vols = _volume_targets(web), _volume_targets(worker)
    assert web_vols["/app/data"] != worker_vols["/app/data"]
    assert "/app/checkpoints" not in web_vols and "/app/checkpoints" in worker_vols
    declared = set(__import__("yaml").safe_load(COMPOSE.read_text())["volumes"])
    assert set(web_vols.values()) | set(worker_vols.values()) <= declared


def test_the_web_role_has_several_workers_and_no_gpu(services):
    web = services["acestep-web"]
    env = environment(web)
    assert int(default_of(env["WEB_WORKERS"])) > 1
    assert "QUEUE_URL" not in env and "deploy" not in web
    assert "command" not in web  # the image's gunicorn


def test_the_gpu_worker_role_runs_the_worker_with_the_gpu_and_its_tokens(services):
    worker = services["acestep-gpu-worker"]
    assert worker["command"] == ["python", "-m", "webapp.worker"]
    assert worker["healthcheck"]["test"] == ["CMD", "python", "-m", "webapp.worker", "--check"]
    assert worker.get("init") is True and "ports" not in worker
    env = environment(worker)
    assert env["QUEUE_URL"].startswith("http://gpu-queue-service:") and env["ACESTEP_INIT_LLM"] == "false"
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)


def test_redis_syncs_each_write_before_answering(services):
    command = services["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--appendfsync") + 1] == "always"
