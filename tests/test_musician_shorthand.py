"""Issue 14 item 4: a musician's key and tempo as a DAW writes them (`Am`, `F#m`, `Bbmaj`, `120.5`).

One normaliser (runner/contract.py) serves both sides: the service echoes what it read in
`warnings`, the runner's `--key` (and a job line's `key`) takes the same spellings.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import fake_runner_command, read_records, run_runner, wav_bytes
from runner.contract import normalise_key
from test_web_jobs import poll_until_finished, post_json, post_multipart


@pytest.mark.parametrize("text,key", [
    ("Am", "A minor"), ("F#m", "F# minor"), ("Bbmaj", "Bb major"), ("C#min", "C# minor"), ("Eb major", "Eb major"),
    ("A minor", "A minor"), ("f# minor", "F# minor"), ("E♭m", "Eb minor"), ("F sharp minor", "F# minor"),
    ("D", "D major"), ("AM", "A major"), ("g min", "G minor"), ("Bb", "Bb major"),
])
def test_the_common_spellings_normalise(text, key):
    assert normalise_key(text) == key


@pytest.mark.parametrize("text", ["H dorian", "A major minor", "Ab-flat", "", "C lydian", "A" * 40, "m", "#m"])
def test_what_is_not_a_key_is_refused(text):
    assert normalise_key(text) is None


def test_the_service_reads_shorthand_and_says_so(make_app, tmp_path):
    record = tmp_path / "runs.jsonl"
    client = make_app(RUNNER_COMMAND=fake_runner_command(record=record)).test_client()
    resp = post_multipart(client, key_scale="Bbmaj", bpm="120.5")
    assert resp.status_code == 200, resp.data[:300]
    assert resp.headers["X-Warnings"].count("|") == 1
    assert "'Bbmaj' was read as 'Bb major'" in resp.headers["X-Warnings"]
    assert "bpm 120.5 was rounded to 120" in resp.headers["X-Warnings"]
    args = read_records(record)[0]["args"]
    assert args["key"] == "Bb major" and args["bpm"] == 120


def test_the_plugins_json_echoes_the_key_and_the_rounded_tempo(make_app, tmp_path):
    record = tmp_path / "runs.jsonl"
    client = make_app(RUNNER_COMMAND=fake_runner_command(record=record)).test_client()
    resp = post_json(client, key_scale="F#m", bpm=99.6)
    body = resp.get_json()
    assert resp.status_code == 200 and body["status"] == "queued", body
    assert any("'F#m' was read as 'F# minor'" in w for w in body["warnings"]), body["warnings"]
    assert any("bpm 99.6 was rounded to 100" in w for w in body["warnings"]), body["warnings"]
    final, _ = poll_until_finished(client, body["task_id"])
    assert final["status"] == "completed" and final["bpm"] == 100
    assert any("F# minor" in w for w in final["warnings"])
    assert read_records(record)[0]["args"]["key"] == "F# minor"


def test_the_runners_own_spelling_draws_no_warning(make_app):
    client = make_app().test_client()
    body = post_json(client, key_scale="a  minor", bpm=120.0).get_json()
    assert body["warnings"] == [], body


def test_the_runner_normalises_the_key_before_the_engine_sees_it():
    from runner.lego import LegoArgs, validate

    args = LegoArgs(source=Path("x.wav"), track="drums", bpm=96, key="C#min")
    validate(args)
    assert args.key == "C# minor"


def test_the_runner_refuses_what_is_not_a_key(tone, tiny_checkpoint):
    run = run_runner("lego", "--source", tone(), "--track", "drums", "--bpm", "96", "--key", "H dorian",
                     "--checkpoints", tiny_checkpoint, "--steps", "2")
    assert run.returncode == 2 and run.error["code"] == "bad_key", run.stderr[-1500:]
    assert "F#m" in run.error["message"]


def test_the_runner_takes_shorthand_end_to_end(tone, tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    run = run_runner("lego", "--source", tone(seconds=1.0), "--track", "drums", "--bpm", "96", "--key", "Am",
                     "--checkpoints", tiny_checkpoint, "--steps", "2", "--out", out, "--device", "cpu")
    assert run.returncode == 0, run.stderr[-2000:]
    assert Path(run.of("result")[0]["outputs"][0]["path"]).is_file()
