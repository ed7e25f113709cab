"""`check`, engine selection, `download` (offline), keep-warm `serve`, and `--help`."""
from __future__ import annotations

import json
import subprocess


from conftest import PYTHON, REPO, run_runner, runner_env, write_tone
from runner.download import BASE_DIT_REPO, MAIN_REPO, PLAN
from runner.layout import inspect_folder


def make_acestep_layout(root, complete=True):
    """ACE-Step's own layout, with placeholder files: enough to tell the layout, not to load."""
    for part in ("acestep-v15-base", "vae", "Qwen3-Embedding-0.6B"):
        (root / part).mkdir(parents=True)
        (root / part / "config.json").write_text("{}")
        (root / part / "model.safetensors").write_bytes(b"placeholder")
    (root / "Qwen3-Embedding-0.6B" / "tokenizer.json").write_text("{}")
    if not complete:
        (root / "vae" / "model.safetensors").unlink()
    return root


def test_check_diffusers_layout(tiny_checkpoint):
    run = run_runner("check", tiny_checkpoint)
    assert run.returncode == 0, run.stderr
    (info,) = run.of("check")
    assert info["engine"] == "diffusers" and info["complete"] and info["demo"]
    assert (info["device"], info["dtype"], info["offload"]) == ("cpu", "float32", False)


def test_check_acestep_layout(tmp_path):
    run = run_runner("check", make_acestep_layout(tmp_path / "ok"))
    assert run.returncode == 0 and run.of("check")[0]["engine"] == "acestep"
    run = run_runner("check", make_acestep_layout(tmp_path / "partial", complete=False))
    assert run.returncode == 3
    assert run.of("check")[0]["missing"] == ["vae/ weights (*.safetensors)"]
    assert "incomplete" in run.stderr


def test_check_unknown_and_missing_folders(tmp_path):
    (tmp_path / "random").mkdir()
    assert run_runner("check", tmp_path / "random").returncode == 3
    assert run_runner("check", tmp_path / "absent").returncode == 3


def test_engine_override_is_honoured(tmp_path, tiny_checkpoint):
    layout = inspect_folder(tiny_checkpoint, "acestep")
    assert layout.engine == "acestep" and not layout.complete
    env = runner_env(ACESTEP_ENGINE="acestep")
    run = run_runner("check", tiny_checkpoint, env=env)
    assert run.returncode == 3 and run.of("check")[0]["engine"] == "acestep"


def test_download_plan_never_includes_the_language_model():
    repos = {f.repo_id: f for f in PLAN}
    assert set(repos) == {BASE_DIT_REPO, MAIN_REPO}
    assert repos[MAIN_REPO].allow_patterns == ("vae/*", "Qwen3-Embedding-0.6B/*")
    assert repos[BASE_DIT_REPO].subdir == "acestep-v15-base"
    assert not any("lm" in p.lower() for f in PLAN for p in (f.allow_patterns or ()))


def test_download_offline_fails_clearly(tmp_path):
    env = runner_env(HF_HUB_OFFLINE="0", HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_ETAG_TIMEOUT="2", HF_HUB_DOWNLOAD_TIMEOUT="2",
                     HF_HOME=str(tmp_path / "hf"))
    run = run_runner("download", tmp_path / "ckpt", env=env, timeout=120)
    assert run.returncode == 3
    assert run.error["code"] == "hub_unreachable" and run.error["retryable"] is True
    assert [e["repo_id"] for e in run.of("download")] == [BASE_DIT_REPO]
    assert "Traceback" not in run.stderr


def test_help_is_readable():
    done = subprocess.run([PYTHON, "-m", "runner", "lego", "--help"], capture_output=True, text=True, cwd=REPO, env=runner_env())
    assert done.returncode == 0
    assert "--repaint-start" in done.stderr + done.stdout


def test_make_tiny_checkpoint_refuses_to_overwrite(tiny_checkpoint):
    run = run_runner("make-tiny-checkpoint", tiny_checkpoint)
    assert run.returncode == 2 and run.error["code"] == "checkpoint_exists"


def test_make_tiny_checkpoint_is_deterministic(tmp_path, tiny_checkpoint):
    assert run_runner("make-tiny-checkpoint", tmp_path / "again", "--seed", "0").returncode == 0
    for part in ("transformer/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert (tmp_path / "again" / part).read_bytes() == (tiny_checkpoint / part).read_bytes()


def test_serve_reuses_the_loaded_model_and_exits_when_idle(tmp_path, tiny_checkpoint):
    src = write_tone(tmp_path / "s.wav", 1.0)
    job = {"command": "lego", "args": {"source": str(src), "track": "drums", "bpm": 90, "checkpoints": str(tiny_checkpoint),
                                       "out": str(tmp_path), "steps": 2}}
    lines = [json.dumps({**job, "args": {**job["args"], "seed": s}}) for s in (1, 2)] + ['{"command": "lego", "args": {"track": "x"}}',
                                                                                     json.dumps({**job, "args": {**job["args"], "bpm": 5}})]
    proc = subprocess.Popen([PYTHON, "-m", "runner", "serve", "--idle-timeout", "1"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=runner_env())
    proc.stdin.write("\n".join(lines) + "\n")
    proc.stdin.flush()
    # stdin stays open: the process must leave by its idle timeout, not by end of input
    events = []
    for line in proc.stdout:
        events.append(json.loads(line))
    assert proc.wait(timeout=30) == 0
    results = [e for e in events if e["event"] == "result"]
    assert [r["seed"] for r in results] == [1, 2]
    assert results[0]["reused_loaded_model"] is False and results[1]["reused_loaded_model"] is True
    assert [e["code"] for e in events if e["event"] == "error"] == ["bad_job_line", "bad_bpm"]
    assert [e["loaded"] for e in events if e["event"] == "ready"] == [False, True, True, True, True]
    assert "serve: exiting after 2 job(s), 2 line(s) rejected" in proc.stderr.read()  # issue 14: not "4 job(s)"


def test_serve_imports_the_engine_it_is_told_before_its_first_job(tmp_path, tiny_checkpoint):
    """The service names the engine its checkpoint folder implies (contract.serve_argv): the runner
    imports that stack while it waits, so the first job's own import costs nothing. Without the
    name (and no ACESTEP_ENGINE) the job imports it."""
    from runner.contract import serve_argv

    src = write_tone(tmp_path / "s.wav", 1.0)
    job = json.dumps({"command": "lego", "args": {"source": str(src), "track": "drums", "bpm": 90, "steps": 2,
                                                  "checkpoints": str(tiny_checkpoint), "out": str(tmp_path)}})
    first_job_import_s = {}
    for engine in ("diffusers", None):
        proc = subprocess.Popen([PYTHON, *serve_argv(["-m", "runner"], 0, engine)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=runner_env())
        proc.stdin.write(job + "\n")  # stdin stays open during the job: its end would cancel it (lifeline)
        proc.stdin.flush()
        events = [json.loads(line) for line in proc.stdout]
        assert proc.wait(timeout=60) == 0, proc.stderr.read()[-2000:]
        (result,) = [e for e in events if e["event"] == "result"]
        first_job_import_s[engine] = result["timings"]["import_s"]
    assert first_job_import_s["diffusers"] == 0.0 and first_job_import_s[None] > 0
