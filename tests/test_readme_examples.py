"""README's examples, run as pasted (issue 14 item 3), so the docs cannot drift from the code again.

The runner example runs in a real subprocess, the curl calls are the real curl against a real
service (gunicorn, the README's way) on the tiny checkpoint, and the figures README gives in
more than one place (the longest source, the job line's keys) are read back from the code.
"""
from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import soundfile as sf

from conftest import PYTHON, ROOT, run_runner, runner_env, write_tone
from harness import Gunicorn
from runner import contract
from webapp.settings import REGISTRY

README = (ROOT / "README.md").read_text()


def bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README, re.S)


def commands(block: str) -> list[list[str]]:
    """Each command of a bash block as an argument list (continuations joined, comments dropped)."""
    joined = block.replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in joined.splitlines() if shlex.split(line, comments=True)]


def test_the_runner_example_runs_as_pasted(tmp_path):
    block = next(b for b in bash_blocks() if "runner make-tiny-checkpoint" in b)
    write_tone(tmp_path / "guitar.flac", seconds=1.5, rate=44100)
    ran = []
    for argv in commands(block.replace("/tmp/", f"{tmp_path}/")):
        assert argv[0] == ".venv/bin/python", argv
        proc = subprocess.run([PYTHON, *argv[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                              env=runner_env(ACESTEP_DEVICE="cpu"))
        assert proc.returncode == 0, f"{shlex.join(argv)} failed:\n{proc.stdout[-1500:]}\n{proc.stderr[-2500:]}"
        ran.append(argv[1:4])
    assert [a[2] for a in ran] == ["make-tiny-checkpoint", "check", "lego"]
    stems = list((tmp_path / "stems").glob("drums-*-1.wav"))  # README: "creates /tmp/stems, writes drums-<seed>-1.wav"
    assert len(stems) == 1, list((tmp_path / "stems").iterdir())
    assert sf.info(str(stems[0])).frames == int(1.5 * 44100)


def test_the_out_folder_is_created_but_a_file_is_refused(tone, tiny_checkpoint, tmp_path):
    not_a_folder = tmp_path / "taken"
    not_a_folder.write_text("a file")
    run = run_runner("lego", "--source", tone(), "--track", "drums", "--bpm", "96", "--checkpoints", tiny_checkpoint,
                     "--steps", "2", "--out", not_a_folder, env=runner_env(ACESTEP_DEVICE="cpu"))
    assert run.returncode == 2 and run.error["code"] == "bad_out_dir" and "is a file" in run.error["message"]
    assert not_a_folder.read_text() == "a file"


def test_the_curl_examples_answer_a_real_service(tmp_path, tiny_checkpoint):
    curls = [argv for block in bash_blocks() for argv in commands(block) if argv[0] == "curl"]
    assert len(curls) >= 4, curls
    server = Gunicorn({"ACESTEP_CHECKPOINTS": str(tiny_checkpoint), "DATA_DIR": str(tmp_path / "data"),
                       "GPU_LOCK_FILE": str(tmp_path / "gpu.lock"), "LEGO_STEPS": "2", "LEGO_MIN_STEPS": "1",
                       "ACESTEP_DEVICE": "cpu", "LOG_LEVEL": "INFO"}, tmp_path / "gunicorn.log")
    try:
        write_tone(tmp_path / "guitar.wav", seconds=2.0, rate=44100)
        host = server.url.removeprefix("http://")
        for argv in curls:
            argv = ["curl", "--silent", "--show-error", "--fail-with-body",
                    *[arg.replace("localhost:8002", host) for arg in argv[1:]]]
            proc = subprocess.run(argv, cwd=tmp_path, capture_output=True, timeout=600)
            assert proc.returncode == 0, f"{shlex.join(argv)}: {proc.stderr[-500:]!r} {proc.stdout[-1000:]!r}"
            if "-o" in argv:
                out = tmp_path / argv[argv.index("-o") + 1]
                assert sf.info(str(out)).samplerate == 44100
                assert abs(sf.info(str(out)).frames - 2 * 44100) < 4096  # MP3 pads a few ms by its nature
                out.unlink()
            else:
                assert json.loads(proc.stdout)["status"] in ("ok", "degraded")
    finally:
        server.stop()


def test_the_longest_source_is_one_figure_everywhere():
    default = f"{contract.DEFAULT_MAX_DURATION_S:g}"
    setting = next(s for s in REGISTRY if s.name == "MAX_DURATION_S")
    assert setting.default == default
    assert f"| `MAX_DURATION_S` | `{default}` |" in README
    assert f"`audio_too_long` (`MAX_DURATION_S`, default {default})" in README
    helped = subprocess.run([PYTHON, "-m", "runner", "lego", "--help"], cwd=ROOT, capture_output=True, text=True,
                            env=runner_env(), timeout=120)
    assert f"(default MAX_DURATION_S or {default})" in " ".join((helped.stdout + helped.stderr).split())


def test_readme_documents_exactly_the_job_lines_keys():
    bullet = README[README.index("- **Keep-warm**"):README.index("Exit statuses:")]
    listed = re.search(r"underscores.*?:\s*(.*?)\(runner/contract.py's `JOB_FIELDS`", bullet, re.S).group(1)
    assert re.findall(r"`(\w+)`", listed) == list(contract.JOB_FIELDS)
