"""A private, throw-away view of the checkpoint folder for ACE-Step's loader.

Before loading, ACE-Step checks for the parts of its main download and fetches them from the
hub when absent: the turbo DiT and the 1.7B language model, which lego never reads. The official
check (acestep/model_downloader.py `check_main_model_exists`, since 2026-03-13) wants a weights
file in each part, so an empty folder is not enough: it would start a download of several GB into
the view. Each unused part therefore gets a weights index that lists no weights: the check is
satisfied, and anything that did try to load that part would fail at once instead of quietly
fetching it.

The view holds links to the real files, never to the real folders, and copies of the model's
Python files: ACE-Step overwrites a checkpoint's model code with its own when they differ
(`_sync_model_code_files`), and through a linked folder or file it would write into the real
checkpoint. Nothing ACE-Step writes can reach the real folder through this view.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

# Parts ACE-Step's downloader requires before loading anything, which lego never reads.
UNUSED_PARTS = ("acestep-v15-turbo", "acestep-5Hz-lm-1.7B")
# What the official check accepts as "weights present" (model_downloader._contains_model_weights).
WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
    "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.bin", "diffusion_pytorch_model.bin.index.json",
)
PLACEHOLDER_INDEX = "model.safetensors.index.json"
PLACEHOLDER_NOTE = "placeholder made by the stem service's runner: lego never loads this part; it holds no weights"
COPIED_SUFFIXES = (".py",)  # files ACE-Step may rewrite in place: copied, never linked


def build_checkpoint_view(checkpoints: Path, view: Path) -> Path:
    """`<view>/checkpoints/`: the real parts mirrored file by file, placeholders for UNUSED_PARTS.

    Returns the project root (`view`) that the official API wants."""
    folder = Path(view) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    for part in sorted(Path(checkpoints).iterdir()):
        _mirror(part.resolve(), folder / part.name)
    for part in UNUSED_PARTS:
        target = folder / part
        if target.exists() and has_weights(target):
            continue  # the real folder has it (a full download): leave it as it is
        target.mkdir(exist_ok=True)
        index = {"metadata": {"note": PLACEHOLDER_NOTE, "total_size": 0}, "weight_map": {}}
        (target / PLACEHOLDER_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return Path(view)


def _mirror(source: Path, target: Path) -> None:
    if source.is_dir():
        target.mkdir(exist_ok=True)
        for child in sorted(source.iterdir()):
            _mirror(child.resolve(), target / child.name)
    elif source.suffix in COPIED_SUFFIXES:
        shutil.copy2(source, target)
    else:
        target.symlink_to(source)


def has_weights(folder: Path) -> bool:
    """The official check's test for one part."""
    return folder.is_dir() and any((folder / name).exists() for name in WEIGHT_FILES)
