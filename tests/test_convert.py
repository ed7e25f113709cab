"""`python -m runner convert` and `download`'s conversion, on a tiny checkpoint in ACE-Step's own layout.

The ACE-Step layout is written by runner/random_checkpoint.py with the official key names and config
fields (checked strictly against the official model class by `make parity-check`, which CI cannot run:
the official code is not on PyPI). Here: the conversion is exact, atomic, refuses what it cannot
convert, and its result loads and runs in the diffusers engine.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import run_runner
from runner import convert as conversion
from runner.download import PLAN, download
from runner.engines.base import LegoJob, LoadOptions
from runner.events import EventStream
from runner.layout import inspect_folder
from runner.random_checkpoint import write_acestep_layout


@pytest.fixture(scope="module")
def acestep_layout(tmp_path_factory) -> Path:
    return write_acestep_layout(tmp_path_factory.mktemp("acestep") / "checkpoint", "tiny", seed=4)


def test_the_acestep_layout_is_what_the_acestep_engine_expects(acestep_layout):
    layout = inspect_folder(acestep_layout)
    assert layout.engine == "acestep" and layout.complete and layout.demo
    keys = load_file(str(acestep_layout / "acestep-v15-base" / "model.safetensors")).keys()
    assert {k.split(".")[0] for k in keys} == {"decoder", "encoder", "tokenizer", "detokenizer", "null_condition_emb"}
    assert "decoder.proj_in.1.weight" in keys and "encoder.lyric_encoder.layers.0.self_attn.q_proj.weight" in keys
    assert torch.load(str(acestep_layout / "acestep-v15-base" / "silence_latent.pt")).shape == (1, 64, 15000)


def test_convert_is_exact_and_loads_in_the_diffusers_engine(acestep_layout, tmp_path):
    dst = tmp_path / "pipe"
    run = run_runner("convert", acestep_layout, dst)
    assert run.returncode == 0, run.stderr
    (event,) = run.of("converted")
    assert event["path"] == str(dst.resolve()) and event["dropped_keys"] > 0  # the audio-code tokenizer stays behind
    assert sorted(p.name for p in dst.iterdir()) == sorted(
        ["DEMO_RANDOM_WEIGHTS", "condition_encoder", "model_index.json", "scheduler", "text_encoder", "tokenizer", "transformer", "vae"])
    assert not list(tmp_path.glob(".pipe.*"))  # no temporary folder left behind

    ours = load_file(str(acestep_layout / "acestep-v15-base" / "model.safetensors"))
    transformer = load_file(str(dst / "transformer" / "diffusion_pytorch_model.safetensors"))
    condition = load_file(str(dst / "condition_encoder" / "diffusion_pytorch_model.safetensors"))
    assert torch.equal(transformer["proj_in_conv.weight"], ours["decoder.proj_in.1.weight"])
    assert torch.equal(transformer["layers.1.cross_attn.to_out.0.weight"], ours["decoder.layers.1.cross_attn.o_proj.weight"])
    assert torch.equal(condition["lyric_encoder.layers.0.self_attn.norm_q.weight"], ours["encoder.lyric_encoder.layers.0.self_attn.q_norm.weight"])
    assert torch.equal(condition["null_condition_emb"], ours["null_condition_emb"])
    silence = torch.load(str(acestep_layout / "acestep-v15-base" / "silence_latent.pt"))
    assert torch.equal(condition["silence_latent"], silence.transpose(1, 2))
    assert len(transformer) + len(condition) - 1 + event["dropped_keys"] == len(ours)  # every weight accounted for

    from runner.engines.diffusers_engine import DiffusersEngine

    engine = DiffusersEngine()
    engine.load(dst, LoadOptions(device="cpu", dtype="float32", offload=False))
    assert engine.pipe.scheduler.config.num_train_timesteps == 1 and engine.pipe.scheduler.config.shift == 1.0
    assert torch.equal(engine.pipe.transformer.state_dict()["proj_in_conv.weight"], ours["decoder.proj_in.1.weight"])
    source = np.random.default_rng(0).uniform(-0.3, 0.3, (2, 128 * 1920)).astype(np.float32)
    stems = engine.generate(LegoJob(source=source, track="drums", bpm=100, caption="drums", steps=2, seed=1),
                            lambda stage: None, lambda *progress: None)
    assert stems[0].shape == (2, 128 * 1920) and np.isfinite(stems[0]).all() and np.abs(stems[0]).max() > 0


def test_convert_refuses_a_taken_destination(acestep_layout, tmp_path):
    dst = tmp_path / "taken"
    dst.mkdir()
    (dst / "mine.txt").write_text("keep me")
    run = run_runner("convert", acestep_layout, dst)
    assert run.returncode == 2 and run.error["code"] == "checkpoint_exists"
    assert [p.name for p in dst.iterdir()] == ["mine.txt"]


def test_a_silence_latent_diffusers_cannot_hold_is_refused_and_nothing_is_written(acestep_layout, tmp_path):
    src = tmp_path / "short-silence"
    shutil.copytree(acestep_layout, src)
    torch.save(torch.zeros(1, 64, 3000), str(src / "acestep-v15-base" / "silence_latent.pt"))
    run = run_runner("convert", src, tmp_path / "pipe")
    assert run.returncode == 3 and run.error["code"] == "checkpoint_unconvertible"
    assert "15000" in run.error["message"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["short-silence"]


def test_convert_refuses_a_folder_that_is_not_acestep(tmp_path):
    run = run_runner("convert", tmp_path, tmp_path / "pipe")
    assert run.returncode == 3 and run.error["code"] == "checkpoint_unconvertible"
    assert "acestep-v15-base" in run.error["message"]


def test_a_base_config_saying_turbo_is_not_made_turbo():
    """ACE-Step decides guidance by is_turbo; diffusers would also take model_version "turbo" for turbo."""
    from runner.random_checkpoint import dit_config

    config = dit_config("tiny")
    assert conversion.transformer_config(dict(config, model_version="turbo"))["model_version"] is None
    assert conversion.transformer_config(dict(config, model_version="turbo", is_turbo=True))["model_version"] == "turbo"


def fake_hub(acestep_layout: Path, calls: list):
    """snapshot_download's contract on a local copy: the repo's files matching allow_patterns land in local_dir."""
    repos = {"ACE-Step/acestep-v15-base": acestep_layout / "acestep-v15-base", "ACE-Step/Ace-Step1.5": acestep_layout}

    def fetch(repo_id, local_dir, allow_patterns):
        calls.append(repo_id)
        root, target = repos[repo_id], Path(local_dir)
        for path in root.rglob("*"):
            relative = path.relative_to(root).as_posix()
            if path.is_file() and (allow_patterns is None or any(Path(relative).match(p) for p in allow_patterns)):
                (target / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target / relative)

    return fetch


def test_download_converts_for_the_diffusers_engine_and_keeps_the_acestep_layout(acestep_layout, tmp_path):
    calls, events = [], []
    stream = EventStream(out=_Lines(events), err=_Lines([]))
    dest = tmp_path / "checkpoints"
    assert download(dest, stream, PLAN, engine="diffusers", fetch=fake_hub(acestep_layout, calls)) == 0
    assert inspect_folder(dest).engine == "diffusers" and inspect_folder(dest).complete
    assert inspect_folder(tmp_path / "checkpoints-acestep").engine == "acestep" and inspect_folder(tmp_path / "checkpoints-acestep").complete
    assert [e["event"] for e in events] == ["download", "download", "downloaded", "converted"]
    # Again: the hub is asked again (it resumes), the finished conversion is kept.
    events.clear()
    assert download(dest, stream, PLAN, engine="diffusers", fetch=fake_hub(acestep_layout, calls)) == 0
    assert [e["event"] for e in events] == ["download", "download", "downloaded"]


def test_download_for_the_acestep_engine_keeps_its_layout_in_place(acestep_layout, tmp_path):
    events = []
    dest = tmp_path / "checkpoints"
    assert download(dest, EventStream(out=_Lines(events), err=_Lines([])), PLAN, engine="acestep",
                    fetch=fake_hub(acestep_layout, [])) == 0
    assert inspect_folder(dest).engine == "acestep" and inspect_folder(dest).complete
    assert not (tmp_path / "checkpoints-acestep").exists() and events[-1]["event"] == "downloaded"


class _Lines:
    """A text stream that keeps each JSON line (or text) written to it."""

    def __init__(self, sink: list):
        self.sink = sink

    def write(self, text: str) -> None:
        for line in text.splitlines():
            if line.startswith("{"):
                self.sink.append(json.loads(line))

    def flush(self) -> None:
        pass
