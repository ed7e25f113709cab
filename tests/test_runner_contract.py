"""One contract between the web service and the runner (runner/contract.py), held by both sides:
the web side's real job line goes through the runner's real parser; the runner's limits are the
ones the service checks its settings against; the state machines refuse illegal moves."""
from __future__ import annotations

import base64
import dataclasses
import json

import pytest

from conftest import wait_for, wav_bytes
from runner import contract
from runner.serve import parse_job
from webapp.job_state import IllegalTransition, JobState
from webapp.journal import LeaseState


def test_the_web_sides_job_line_is_what_the_runners_parser_reads(make_app, tiny_checkpoint):
    from runner.lego import LegoArgs

    app = make_app(ACESTEP_CHECKPOINTS=str(tiny_checkpoint), ACESTEP_DEVICE="cpu", ACESTEP_ENGINE="diffusers")
    service = app.extensions["acestep"]
    body = {"audio_data": base64.b64encode(wav_bytes(2.0)).decode(), "track_name": "backing_vocals", "bpm": 97,
            "key_scale": "f# minor", "caption": "airy", "seed": 11, "guidance_scale": 6.5, "time_signature": "3/4",
            "repaint_start": 0.5, "repaint_end": 1.5, "batch_size": 2, "audio_format": "flac", "inference_steps": 9}
    client = app.test_client()
    task = client.post("/lego", json=body).get_json()["task_id"]
    job = service.jobs.get(task)
    args = service.jobs.runner._job_args(job)
    line = contract.encode_job(args)
    parsed = parse_job(line.decode())
    assert isinstance(parsed, LegoArgs)
    assert {f.name for f in dataclasses.fields(LegoArgs)} == set(contract.JOB_FIELDS)
    assert (parsed.track, parsed.bpm, parsed.key, parsed.caption, parsed.seed, parsed.guidance_scale) == \
        ("backing_vocals", 97, "F# minor", "airy", 11, 6.5)
    assert (parsed.time_signature, parsed.repaint_start, parsed.repaint_end, parsed.batch_size, parsed.format,
            parsed.steps) == ("3", 0.5, 1.5, 2, "flac", 9)
    assert parsed.source == job.files.source and parsed.out == job.files.out_partial
    assert parsed.checkpoints == tiny_checkpoint and parsed.engine == "diffusers" and parsed.device == "cpu"
    from runner.lego import validate

    validate(parsed)  # the runner's own checks accept what the service sends
    wait_for(lambda: service.jobs.get(task).finished, timeout=60, what="the job")


def test_exit_and_garbage_lines():
    assert parse_job(contract.encode_exit().decode()) is None
    for bad in ("not json", "[1]", '{"command": "dance"}', '{"command": "lego", "args": {"source": "a", "colour": 1}}'):
        with pytest.raises(Exception) as err:
            parse_job(bad)
        assert getattr(err.value, "code", None) == "bad_job_line"
    with pytest.raises(contract.ContractError):
        contract.encode_job({"source": "a", "track": "drums", "bpm": 90, "colour": "red"})
    with pytest.raises(contract.ContractError):
        contract.encode_job({"track": "drums", "bpm": 90})


def test_events_and_statuses_are_the_contracts():
    from runner import events

    assert events.STAGES == contract.STAGES == tuple(s.value for s in contract.Stage)
    assert (events.EXIT_OK, events.EXIT_BAD_INPUT, events.EXIT_CHECKPOINT, events.EXIT_GENERATION, events.EXIT_CANCELLED) == \
        tuple(int(s) for s in contract.ExitStatus)
    assert contract.decode_event('{"event": "ready", "loaded": false}') == {"event": "ready", "loaded": False}
    for bad in ("{}", "[]", "text", '{"event": 5}'):
        with pytest.raises(contract.ContractError):
            contract.decode_event(bad)


def test_the_runner_and_the_service_share_the_limits():
    from runner import lego
    from webapp import lego_params
    from webapp.settings import BY_NAME

    assert lego.STEPS_RANGE is contract.STEPS_RANGE and lego.BPM_RANGE is contract.BPM_RANGE
    assert lego_params.BPM_RANGE == contract.BPM_RANGE and lego_params.TRACKS == contract.TRACKS
    for name in ("LEGO_STEPS", "LEGO_MIN_STEPS", "LEGO_MAX_STEPS"):
        assert (BY_NAME[name].minimum, BY_NAME[name].maximum) == contract.STEPS_RANGE


def test_the_service_starts_the_runner_with_the_contracts_command_line():
    assert contract.serve_argv(["python", "-m", "runner"], 0) == ["python", "-m", "runner", "serve", "--idle-timeout", "0"]
    from runner.cli import build_parser

    args = build_parser().parse_args(contract.serve_argv([], 12.5))
    assert args.command == contract.SERVE_COMMAND and args.idle_timeout == 12.5 and args.import_engine is None
    for engine in contract.ENGINE_NAMES:
        assert build_parser().parse_args(contract.serve_argv([], 0, engine)).import_engine == engine
    assert contract.serve_argv([], 0, None) == contract.serve_argv([], 0, "not-an-engine") == ["serve", "--idle-timeout", "0"]


def test_job_states_refuse_illegal_moves(make_app):
    app = make_app()
    client = app.test_client()
    task = client.post("/lego", json={"audio_data": base64.b64encode(wav_bytes(2.0)).decode(), "track_name": "drums",
                                      "bpm": 100}).get_json()["task_id"]
    job = app.extensions["acestep"].jobs.get(task)
    wait_for(lambda: job.done.is_set(), what="the job")  # set once the finished record is saved
    assert job.state is JobState.COMPLETED
    for state in JobState:
        with pytest.raises(IllegalTransition):
            job.move_to(state)  # a finished job never changes again
    assert not app.extensions["acestep"].jobs.store.finish(job, JobState.FAILED)  # a late failure is ignored
    assert json.loads((job.files.dir / "job.json").read_text())["state"] == "completed"
    assert not LeaseState.RELEASING.may_become(LeaseState.HELD) and LeaseState.ACQUIRING.may_become(LeaseState.RELEASING)


def test_progress_events_fill_their_stages_span_on_the_web_side():
    """The runner's progress events (runner.contract.PROGRESS_STAGES) move the job's progress within
    their stage: the source's pieces 10..15, the denoising steps 15..90; only steps count as steps."""
    from webapp.job_state import STAGE_PROGRESS, Job

    assert set(contract.PROGRESS_STAGES) <= set(contract.STAGES)
    job = Job(id="a" * 32, params=None, files=None, duration_s=180.0, sample_rate=48000, protocol="json")
    seen = []
    for event in ({"event": "stage", "stage": "encoding"},
                  *({"event": "progress", "stage": "encoding", "step": k, "total": 17} for k in range(1, 18)),
                  {"event": "stage", "stage": "generating"},
                  {"event": "progress", "stage": "generating", "step": 25, "total": 50},
                  {"event": "progress", "step": 50, "total": 50}):  # no stage: a runner of before the field
        job.on_runner_event(event)
        seen.append(job.progress)
    encoding = seen[:18]
    assert encoding[0] == STAGE_PROGRESS["encoding"] == 10 and encoding[-1] == 15
    assert len(set(encoding)) == 6 and encoding == sorted(encoding)  # it moves, never back
    assert job.step == 50 and job.total_steps == 50 and seen[-3:] == [15, 52, 90]
    job.on_runner_event({"event": "progress", "stage": "writing", "step": 1, "total": 1})  # not a progress stage
    assert job.progress == 90
