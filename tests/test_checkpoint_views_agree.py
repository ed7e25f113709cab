"""The web layer reads checkpoint folders itself (it never imports the runner's stack, DESIGN.md
section 2), so its view and the runner's are two implementations: they must agree on the folders
the service meets, or /health would call a folder ready that the runner refuses, or the reverse."""
from __future__ import annotations

import shutil

import pytest

from runner import layout as runner_layout
from test_runner_tools import make_acestep_layout
from webapp import checkpoints as web_layout


def both(folder):
    ours = runner_layout.inspect_folder(folder)
    theirs = web_layout.inspect_checkpoints(folder)
    return (ours.engine, ours.complete, ours.demo), (theirs.engine, theirs.complete, theirs.demo)


def test_same_demo_marker():
    assert web_layout.DEMO_MARKER == runner_layout.DEMO_MARKER


@pytest.mark.parametrize("case", ["tiny", "tiny_missing_weights", "acestep", "acestep_partial", "empty", "absent"])
def test_runner_and_web_layer_see_the_same_folder(tmp_path, tiny_checkpoint, case):
    folder = tmp_path / case
    if case.startswith("tiny"):
        shutil.copytree(tiny_checkpoint, folder)
        if case == "tiny_missing_weights":
            (folder / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    elif case.startswith("acestep"):
        make_acestep_layout(folder, complete=case == "acestep")
    elif case == "empty":
        folder.mkdir()
    ours, theirs = both(folder)
    assert ours[:2] == theirs[:2], (ours, theirs)
    assert ours[2] == theirs[2]
