"""What the patch tests share (test_patches.py, test_lego_patch.py): the real installed handler,
prepare_padding_info's arguments as generate_music passes them, and the fixture that puts the
original functions back around every test, so order does not matter."""
from __future__ import annotations

import pytest
import torch

import patches

LEGO_INSTRUCTION = "Generate the DRUMS track based on the audio context:"


@pytest.fixture(autouse=True)
def originals_in_place():
    patches.undo()
    yield
    patches.undo()


def handler_class():
    """The installed acestep's AceStepHandler, imported here so that the CUDA test runs without acestep."""
    from acestep.handler import AceStepHandler

    return AceStepHandler


def new_handler():
    """A real, unloaded handler: enough for every method these tests call."""
    return handler_class()()


def padding_arguments(**changes):
    """prepare_padding_info's arguments as the real generate_music passes them for lego over 2 s."""
    arguments = dict(
        actual_batch_size=1,
        processed_src_audio=torch.full((2, 2 * 48000), 0.1),
        audio_duration=None,
        repainting_start=0.0,
        repainting_end=None,  # generate_music has already turned -1 into None
        is_repaint_task=False,
        is_lego_task=True,
        is_cover_task=False,
        can_use_repainting=True,
    )
    arguments.update(changes)
    return arguments
