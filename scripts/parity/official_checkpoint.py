"""Build a tiny ACE-Step-layout checkpoint from an official ACE-Step checkout's own classes, at run time.

Usage (in the image's environment): python scripts/parity/official_checkpoint.py ACESTEP_SRC DEST [--seed N]

The checkpoint is the official check's (checks/acestep_tiny.py: the checkout's own classes and model
code, in a folder outside this repository) with its DiT weights randomised. With --project-layout
DIR, also checks that the project's own ACE-Step layout (runner/random_checkpoint.py, written by
.venv) loads strictly into the official class: the key names and config fields CI cannot check.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def official_classes(acestep_src: Path):
    sys.path.insert(0, str(acestep_src))
    from acestep.models.base.configuration_acestep_v15 import AceStepConfig
    from acestep.models.base.modeling_acestep_v15_base import AceStepConditionGenerationModel

    return AceStepConfig, AceStepConditionGenerationModel


def randomise(state: dict, seed: int) -> dict:
    """Every weight random and clearly non-zero. The official initialisation (normal, std 0.02, zero
    biases) makes a DiT whose output barely moves the noise, so the engines' agreement would say
    little about the DiT: norms near 1, everything else normal noise with std 0.05."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, value in sorted(state.items()):
        noise = torch.randn(value.shape, generator=generator, dtype=torch.float32)
        out[name] = (1.0 + 0.1 * noise if "norm" in name and name.endswith("weight") else 0.05 * noise).to(value.dtype)
    return out


def build(acestep_src: Path, dest: Path, seed: int) -> None:
    """checks/acestep_tiny.py's checkpoint (the official check's), with randomised DiT weights."""
    from safetensors.torch import load_file, save_file

    from checks import acestep_tiny

    acestep_tiny.build(dest, acestep_src, seed)
    weights = dest / acestep_tiny.DIT / "model.safetensors"
    state = randomise(load_file(str(weights)), seed)
    save_file(state, str(weights), metadata={"format": "pt"})
    print(f"official-class checkpoint: {sum(v.numel() for v in state.values())} DiT weights, randomised, in {dest}")


def check_project_layout(acestep_src: Path, folder: Path) -> None:
    """The project's ACE-Step layout (its key names and config fields) against the official class, strictly."""
    from safetensors.torch import load_file

    from runner import convert

    config_class, model_class = official_classes(acestep_src)
    config = json.loads((folder / convert.DIT / "config.json").read_text())
    model = model_class(config_class(**config))
    state = load_file(str(folder / convert.DIT / "model.safetensors"))
    model.load_state_dict(state, strict=True)
    print(f"project layout: all {len(state)} DiT weights load strictly into the official AceStepConditionGenerationModel")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("acestep_src", type=Path)
    parser.add_argument("dest", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--project-layout", type=Path)
    args = parser.parse_args()
    if args.project_layout:
        check_project_layout(args.acestep_src.resolve(), args.project_layout)
    build(args.acestep_src.resolve(), args.dest, args.seed)
