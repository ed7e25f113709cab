"""A tiny random-weight checkpoint in ACE-Step 1.5's own layout, built from a checkout's own classes.

The layout is what the official loader reads (acestep/core/generation/handler/init_service_*):
- `acestep-v15-base/`: config.json (AceStepConfig, with the `auto_map` that `AutoModel
  .from_pretrained(trust_remote_code=True)` follows), model.safetensors, the model's Python files
  from the checkout's `acestep/models/base/`, and `silence_latent.pt` ([1, 64, frames], 600 s as
  in the real checkpoint: the tiny VAE's own encoding of silence);
- `vae/`: diffusers' AutoencoderOobleck with the real 1920-sample hop, tiny channels;
- `Qwen3-Embedding-0.6B/`: a tiny Qwen3Model and a small byte-level BPE tokenizer.
Random weights make noise, not music: this proves plumbing, shapes and semantics, never quality.
Built in a temporary folder by the check; never committed (it contains the checkout's code).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

DIT = "acestep-v15-base"
SILENCE_SECONDS = 600
LATENT_RATE = 25  # 48 kHz / 1920
HIDDEN = 32


def build(dest: Path, acestep_src: Path, seed: int = 0) -> Path:
    """Write the checkpoint into `dest` (created; must not exist) and return it."""
    import torch
    from diffusers import AutoencoderOobleck
    from transformers import Qwen3Config, Qwen3Model

    from acestep.models.base.configuration_acestep_v15 import AceStepConfig
    from acestep.models.base.modeling_acestep_v15_base import AceStepConditionGenerationModel
    from runner.random_checkpoint import LATENT_CHANNELS, SIZES, build_tokenizer

    dest = Path(dest)
    dest.mkdir(parents=True)
    torch.manual_seed(seed)

    tokenizer = build_tokenizer()
    text_dir = dest / "Qwen3-Embedding-0.6B"
    text = Qwen3Model(Qwen3Config(vocab_size=len(tokenizer), hidden_size=HIDDEN, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=16, intermediate_size=64,
                                  max_position_embeddings=32768, pad_token_id=tokenizer.pad_token_id))
    text.save_pretrained(text_dir, safe_serialization=True)
    tokenizer.save_pretrained(text_dir)

    # The project's tiny VAE (runner/random_checkpoint.py): the real class and 1920-sample hop, tiny channels.
    vae = AutoencoderOobleck(decoder_input_channels=LATENT_CHANNELS, audio_channels=2, sampling_rate=48000,
                             **SIZES["tiny"]["vae"])
    vae.save_pretrained(dest / "vae", safe_serialization=True)

    config = AceStepConfig(
        hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        head_dim=16, text_hidden_dim=HIDDEN, num_lyric_encoder_hidden_layers=1, num_timbre_encoder_hidden_layers=1,
        num_attention_pooler_hidden_layers=1, num_audio_decoder_hidden_layers=1, fsq_dim=HIDDEN, model_version="base", is_turbo=False,
    )
    config.architectures = ["AceStepConditionGenerationModel"]
    config.auto_map = {"AutoConfig": "configuration_acestep_v15.AceStepConfig",
                       "AutoModel": "modeling_acestep_v15_base.AceStepConditionGenerationModel"}
    model = AceStepConditionGenerationModel(config).eval()
    dit_dir = dest / DIT
    model.save_pretrained(dit_dir, safe_serialization=True)
    for source in sorted((Path(acestep_src) / "acestep" / "models" / "base").glob("*.py")):
        if source.name != "__init__.py":
            shutil.copy2(source, dit_dir / source.name)
    torch.save(_silence_latent(vae), dit_dir / "silence_latent.pt")
    (dest / "TINY_ACESTEP_LAYOUT").write_text(json.dumps({"seed": seed, "note": "random weights, not ACE-Step"}) + "\n")
    return dest


def _silence_latent(vae):
    """The VAE's own encoding of silence (its posterior mean), 600 s long, stored [1, 64, frames]."""
    import torch

    with torch.no_grad():
        one_second = vae.encode(torch.zeros(1, 2, 48000)).latent_dist.mean  # [1, 64, 25]
    frame = one_second[:, :, LATENT_RATE // 2:LATENT_RATE // 2 + 1]
    return frame.repeat(1, 1, SILENCE_SECONDS * LATENT_RATE).contiguous()
