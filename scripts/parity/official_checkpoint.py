"""Build a tiny ACE-Step-layout checkpoint from an official ACE-Step checkout's own classes, at run time.

Usage (in the image's environment): python scripts/parity/official_checkpoint.py ACESTEP_SRC DEST [--seed N]

The DiT is the official AceStepConditionGenerationModel at the tiny sizes of runner/random_checkpoint.py,
saved with save_pretrained; the official model code is copied beside it, as ACE-Step's own loader
does (acestep/model_downloader.py _sync_model_code_files), because it loads the DiT with
trust_remote_code. Nothing from the checkout is written into this repository. Also checks that the
project's own ACE-Step layout (runner/random_checkpoint.py, written by .venv) loads strictly into the
official class, when given --project-layout DIR.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def official_classes(acestep_src: Path):
    sys.path.insert(0, str(acestep_src))
    from acestep.models.base.configuration_acestep_v15 import AceStepConfig
    from acestep.models.base.modeling_acestep_v15_base import AceStepConditionGenerationModel

    return AceStepConfig, AceStepConditionGenerationModel


def randomise(model, seed: int) -> None:
    """Every weight random and non-degenerate (some official initialisations are zero, which would make
    both engines output the same nothing): norms near 1, everything else small normal noise."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float32)
            value = 1.0 + 0.1 * noise if "norm" in name and name.endswith("weight") else 0.05 * noise
            parameter.copy_(value.to(parameter.dtype))


def build(acestep_src: Path, dest: Path, seed: int) -> None:
    import torch
    from diffusers import AutoencoderOobleck
    from transformers import Qwen3Config, Qwen3Model

    from runner import convert
    from runner.random_checkpoint import LATENT_CHANNELS, SIZES, VAE_RATIOS, build_tokenizer, silence_latent_of, dit_config

    config_class, model_class = official_classes(acestep_src)
    torch.manual_seed(seed)
    dest.mkdir(parents=True)
    config = config_class(**dit_config("tiny"))
    config.auto_map = {"AutoConfig": "configuration_acestep_v15.AceStepConfig",
                       "AutoModel": "modeling_acestep_v15_base.AceStepConditionGenerationModel"}
    model = model_class(config)
    randomise(model, seed)
    dit_dir = dest / convert.DIT
    model.save_pretrained(str(dit_dir), safe_serialization=True)
    for code in (acestep_src / "acestep" / "models" / "base").glob("*.py"):
        if code.name != "__init__.py":
            shutil.copy2(code, dit_dir / code.name)

    spec = SIZES["tiny"]
    vae = AutoencoderOobleck(downsampling_ratios=VAE_RATIOS, decoder_input_channels=LATENT_CHANNELS, audio_channels=2,
                             sampling_rate=48000, **spec["vae"])
    vae.save_pretrained(str(dest / convert.VAE), safe_serialization=True)
    torch.save(silence_latent_of(vae, torch.float32), str(dit_dir / "silence_latent.pt"))
    tokenizer = build_tokenizer()
    text_encoder = Qwen3Model(Qwen3Config(vocab_size=len(tokenizer), max_position_embeddings=32768, rope_theta=1000000.0,
                                          rms_norm_eps=1e-6, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                                          **spec["text"]))
    text_encoder.save_pretrained(str(dest / convert.TEXT_ENCODER), safe_serialization=True)
    tokenizer.save_pretrained(str(dest / convert.TEXT_ENCODER))
    print(f"official-class checkpoint: {sum(p.numel() for p in model.parameters())} DiT parameters in {dest}")


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
