"""The runner used by hand (issue 14 item 7): --help says the defaults and what each folder is,
a terminal gets a progress bar rather than a scroll of JSON (a pipe, the service's way, still gets
every event), and stems are ordinary files that follow the umask."""
from __future__ import annotations

import json
import os
import pty
import subprocess

from conftest import PYTHON, REPO, run_runner, runner_env


def helped(*args) -> str:
    done = subprocess.run([PYTHON, "-m", "runner", *args, "--help"], capture_output=True, text=True, cwd=REPO,
                          env=runner_env(), timeout=120)
    assert done.returncode == 0, done.stderr[-1000:]
    return " ".join((done.stdout + done.stderr).split())


def test_help_says_the_defaults_and_the_folders():
    lego = helped("lego")
    assert "(default wav)" in lego and "1..30 (default 7)" in lego and "created if missing" in lego
    assert "the new checkpoint folder" in helped("make-tiny-checkpoint")
    assert "the checkpoint folder to inspect" in helped("check")
    download = helped("download")
    for words in ("about 6 GB", "Resumable", "HF_TOKEN", "HF_ENDPOINT", "never the language model", "the checkpoint folder to fill"):
        assert words in download, words


def lego_args(tone, tiny_checkpoint, out):
    return ["lego", "--source", str(tone(seconds=1.0)), "--track", "drums", "--bpm", "96", "--steps", "3",
            "--checkpoints", str(tiny_checkpoint), "--out", str(out), "--device", "cpu", "--seed", "7"]


def run_on_a_terminal(argv: list[str], umask: int) -> tuple[int, str, str]:
    """The runner with its stdout on a pseudo-terminal, as a person's shell gives it."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen([PYTHON, "-m", "runner", *argv], stdout=follower, stderr=subprocess.PIPE, cwd=REPO,
                            env=runner_env(), preexec_fn=lambda: os.umask(umask))
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the terminal's other side closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    stderr = proc.stderr.read().decode(errors="replace")
    return proc.wait(timeout=300), b"".join(chunks).decode(errors="replace"), stderr


def test_a_terminal_gets_a_progress_bar_and_the_result(tone, tiny_checkpoint, tmp_path):
    code, stdout, stderr = run_on_a_terminal(lego_args(tone, tiny_checkpoint, tmp_path / "tty"), umask=0o027)
    assert code == 0, stderr[-2000:]
    events = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    kinds = [e["event"] for e in events]
    assert "progress" not in kinds and "stage" not in kinds and kinds[-1] == "result", kinds
    assert "step 3/3 [" in stderr and "[runner] generating" in stderr and "encoding piece 1/1 [" in stderr
    stem = events[-1]["outputs"][0]["path"]
    assert os.stat(stem).st_mode & 0o777 == 0o640  # 0666 under umask 027, not mkstemp's 0600


def test_json_on_a_terminal_when_asked(tone, tiny_checkpoint, tmp_path):
    code, stdout, stderr = run_on_a_terminal(["--json", *lego_args(tone, tiny_checkpoint, tmp_path / "json")], umask=0o022)
    assert code == 0, stderr[-2000:]
    events = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    kinds = [e["event"] for e in events]
    progress = [e["stage"] for e in events if e["event"] == "progress"]
    assert progress == ["encoding"] + ["generating"] * 3 and "stage" in kinds and kinds[-1] == "result", kinds


def test_a_pipe_gets_every_event_and_the_stem_follows_the_umask(tone, tiny_checkpoint, tmp_path):
    old = os.umask(0o022)
    try:
        run = run_runner(*lego_args(tone, tiny_checkpoint, tmp_path / "pipe"))
    finally:
        os.umask(old)
    assert run.returncode == 0, run.stderr[-2000:]
    assert [e["stage"] for e in run.of("progress")] == ["encoding"] + ["generating"] * 3
    assert [e["stage"] for e in run.of("stage")][:2] == ["loading", "encoding"]
    assert os.stat(run.of("result")[0]["outputs"][0]["path"]).st_mode & 0o777 == 0o644
