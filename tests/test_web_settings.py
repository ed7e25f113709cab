"""The settings registry is the one source of configuration; README.md's tables match it; bad
settings stop the service at start with one clear sentence."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, free_port
from webapp.errors import CATALOGUE
from webapp.settings import BY_NAME, REGISTRY, Settings, SettingsError

README = ROOT / "README.md"
DESIGN_NAMES = ("PORT", "ACESTEP_CHECKPOINTS", "ACESTEP_ENGINE", "ACESTEP_DEVICE", "ACESTEP_DTYPE", "ACESTEP_OFFLOAD",
                "DATA_DIR", "QUEUE_URL", "QUEUE_LANE", "QUEUE_TOKENS", "QUEUE_WAIT_TIMEOUT_S", "API_KEY", "MAX_UPLOAD_MB",
                "MAX_DURATION_S", "JOB_TIMEOUT_S", "MAX_QUEUED_JOBS", "LEGO_STEPS", "KEEP_WARM_S", "REDIS_URL")


def readme_section(title: str) -> str:
    text = README.read_text()
    match = re.search(rf"^## {re.escape(title)}\s*$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"README.md has no '## {title}' section"
    return match.group(1)


def table_rows(section: str) -> list[list[str]]:
    rows = []
    for line in section.splitlines():
        line = line.strip()
        if not line.startswith("|") or re.fullmatch(r"\|[\s:|-]+\|", line):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows.append(cells)
    return rows[1:]  # minus the header


def test_registry_has_every_variable_design_names():
    missing = [n for n in DESIGN_NAMES if n not in BY_NAME]
    assert missing == []
    assert len(BY_NAME) == len(REGISTRY)  # no duplicates


def test_readme_configuration_table_matches_the_registry():
    rows = table_rows(readme_section("Configuration"))
    in_readme = {re.sub(r"`", "", r[0]): r for r in rows}
    assert sorted(in_readme) == sorted(BY_NAME), "README's configuration table and webapp/settings.py disagree"
    for name, setting in BY_NAME.items():
        shown = in_readme[name][1].strip("`")
        expected = setting.default if setting.default else "(unset)"
        assert shown == expected, f"{name}: README says default {shown!r}, settings.py {expected!r}"
        assert in_readme[name][2], f"{name} has no description in README"


def test_readme_error_code_table_matches_the_catalogue():
    rows = table_rows(readme_section("Error codes"))
    in_readme = {r[0].strip("`"): r for r in rows}
    assert sorted(in_readme) == sorted(CATALOGUE)
    for code, (status, retryable, _) in CATALOGUE.items():
        assert in_readme[code][1] == str(status), code
        assert in_readme[code][2] == ("yes" if retryable else "no"), code


def test_every_default_parses(tmp_path):
    env = {"ACESTEP_CHECKPOINTS": str(tmp_path), "DATA_DIR": str(tmp_path / "d"), "GPU_LOCK_FILE": str(tmp_path / "l")}
    s = Settings.from_env(env)
    assert s.port == 8002 and s.lego_steps == 50 and s.result_ttl_s == 3600 and s.queue_url == ""
    assert s.data_dir.is_absolute() and s.acestep_checkpoints == tmp_path
    assert s.as_dict()["API_KEY"] == ""
    assert Settings.from_env({**env, "API_KEY": "k"}).as_dict()["API_KEY"] == "(set)"  # never printed


@pytest.mark.parametrize("name,value,words", [
    ("JOB_TIMEOUT_S", "-5", "below the minimum"),
    ("QUEUE_WAIT_TIMEOUT_S", "soon", "not a number"),
    ("MAX_QUEUED_JOBS", "2.5", "not a whole number"),
    ("QUEUE_URL", "gpu-queue:8085", "not a valid URL"),
    ("QUEUE_URL", "ftp://gpu-queue:8085/", "not a valid URL"),
    ("QUEUE_URL", "http://gpu-queue:99999/", "invalid port"),
    ("REDIS_URL", "localhost:6379", "not a valid URL"),
    ("ACESTEP_DTYPE", "fp8", "not one of"),
    ("ACESTEP_INIT_LLM", "true", "not supported"),
    ("LEGO_STEPS", "500", "above the maximum 200"),
    ("LEGO_STEPS", "300", "above the maximum 200"),  # the runner refuses more than 200 steps (contract)
    ("LEGO_MAX_STEPS", "500", "above the maximum 200"),
    ("LEGO_MIN_STEPS", "60", "must lie between"),
    ("MAX_DECODED_MB", "50", "cannot hold MAX_DURATION_S=240 s"),
    ("QUEUE_LANE", "a b", "may hold only"),
    ("QUEUE_PROCEED_IF_UNREACHABLE", "maybe", "yes/no"),
    ("RUNNER_COMMAND", "python '-m runner", "quoting"),
    ("ACESTEP_SPEEDUPS", "turbo", "names turbo"),  # refused at start, not by every job's runner
    ("ACESTEP_SPEEDUPS", "attention", "add fused"),
])
def test_bad_values_are_one_clear_sentence(tmp_path, name, value, words):
    env = {"ACESTEP_CHECKPOINTS": str(tmp_path), "DATA_DIR": str(tmp_path / "d"), "GPU_LOCK_FILE": str(tmp_path / "l"),
           name: value}
    with pytest.raises(SettingsError) as err:
        Settings.from_env(env)
    message = str(err.value)
    assert words in message and name in message
    assert message.count(". ") == 0 and message.endswith(".")  # one sentence


def test_missing_checkpoint_folder(tmp_path):
    with pytest.raises(SettingsError, match="ACESTEP_CHECKPOINTS=.* is not a folder; download the weights"):
        Settings.from_env({"ACESTEP_CHECKPOINTS": str(tmp_path / "nowhere"), "DATA_DIR": str(tmp_path / "d")})


def test_unreadable_checkpoint_folder():
    """Root reads every folder, so under root (CI) the check runs in a child that became `nobody`."""
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="acestep-perm-", dir="/tmp"))
    try:
        base.chmod(0o777)  # nobody must be able to reach the folders, and create the data folder
        locked = base / "locked"
        locked.mkdir(mode=0)
        env = {"ACESTEP_CHECKPOINTS": str(locked), "DATA_DIR": str(base / "d"), "GPU_LOCK_FILE": str(base / "l")}
        if os.geteuid() != 0:
            with pytest.raises(SettingsError, match="not readable"):
                Settings.from_env(env)
            return
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: drop to nobody, run the check, report the message
            try:
                os.close(read)
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
                try:
                    Settings.from_env(env)
                    message = "no error"
                except SettingsError as exc:
                    message = str(exc)
                os.write(write, message.encode())
            finally:
                os._exit(0)
        os.close(write)
        with os.fdopen(read, "rb") as fh:
            message = fh.read().decode()
        os.waitpid(pid, 0)
        assert "is not readable by this user" in message and str(locked) in message, message
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_graceful_timeout_outlasts_a_runner_that_ignores_sigterm(tmp_path):
    """gunicorn's graceful_timeout is derived from the settings: even a long RUNNER_KILL_GRACE_S leaves
    the worker time to SIGKILL its runner and release the tokens before the master gives up on it."""
    env = {**os.environ, "ACESTEP_CHECKPOINTS": str(tmp_path), "DATA_DIR": str(tmp_path / "d"),
           "GPU_LOCK_FILE": str(tmp_path / "l"), "QUEUE_URL": "http://127.0.0.1:9/"}
    for grace in ("1", "5", "60", "120"):
        proc = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-c",
                               "import runpy, json; c = runpy.run_path('gunicorn.conf.py'); "
                               "print(json.dumps([c['graceful_timeout'], c['_settings'].shutdown_budget_s]))"],
                              cwd=ROOT, env={**env, "RUNNER_KILL_GRACE_S": grace}, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        graceful, budget = __import__("json").loads(proc.stdout)
        settings = Settings.from_env({**env, "RUNNER_KILL_GRACE_S": grace})
        assert budget == settings.shutdown_budget_s >= 2 * float(grace) + settings.release_budget_s
        assert graceful >= budget + 5 and graceful >= 30


def test_data_dir_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SettingsError, match="DATA_DIR=.* cannot be created"):
        Settings.from_env({"ACESTEP_CHECKPOINTS": str(tmp_path), "DATA_DIR": str(blocker / "sub")})


def test_gunicorn_refuses_to_start_with_one_sentence(tmp_path):
    """Started the README's way, a bad setting stops gunicorn at once, before any worker."""
    env = {**os.environ, "PORT": str(free_port()), "ACESTEP_CHECKPOINTS": str(tmp_path), "DATA_DIR": str(tmp_path / "d"),
           "JOB_TIMEOUT_S": "-1"}
    proc = subprocess.run([str(ROOT / ".venv" / "bin" / "gunicorn"), "-c", "gunicorn.conf.py", "wsgi:app"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "configuration error: JOB_TIMEOUT_S='-1' is below the minimum 1; set it to at least 1." in proc.stderr
    assert "Traceback" not in proc.stderr
