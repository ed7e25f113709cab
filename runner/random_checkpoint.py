"""Randomly initialised ACE-Step 1.5 pipelines of the real architecture, in the diffusers layout.

`tiny` is a few MB and builds in seconds on 2 cores: tests and the demo mode run the real
diffusers code on it. `full` has the real base model's sizes (DiT hidden 2048 x 24 layers, a
Qwen3-Embedding-0.6B-sized text encoder, ACE-Step's Oobleck VAE): on a GPU it gives true
memory and time without the real weights. Both are deterministic for a seed and carry
DEMO_MARKER so that nobody mistakes random weights for the model.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from runner.layout import DEMO_MARKER

# ACE-Step 1.5's VAE: 48 kHz stereo, 1920 samples per latent frame (25 fps), 64 latent channels.
VAE_RATIOS = [2, 4, 4, 6, 10]

SIZES = {
    "tiny": {
        # encoder_hidden_size is twice the 64 latent channels (mean and scale), so it stays 128.
        "vae": dict(encoder_hidden_size=128, channel_multiples=[1, 1, 1, 1, 1], decoder_channels=4),
        "text": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                     head_dim=16, intermediate_size=64),
        "dit": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=1, head_dim=16),
        "cond": dict(hidden_size=32, intermediate_size=64, num_lyric_encoder_hidden_layers=1,
                     num_timbre_encoder_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16),
        "vocab": None,  # the tokenizer's own small vocabulary
    },
    "full": {
        "vae": dict(encoder_hidden_size=128, channel_multiples=[1, 2, 4, 8, 16], decoder_channels=128),
        "text": dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                     head_dim=128, intermediate_size=3072),
        "dit": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=24, num_attention_heads=16,
                    num_key_value_heads=8, head_dim=128),
        "cond": dict(hidden_size=2048, intermediate_size=6144, num_lyric_encoder_hidden_layers=8,
                     num_timbre_encoder_hidden_layers=4, num_attention_heads=16, num_key_value_heads=8, head_dim=128),
        "vocab": 151669,  # Qwen3-Embedding-0.6B's embedding rows
    },
}

_TOKENIZER_CORPUS = [
    "# Instruction", "# Caption", "# Metas", "# Languages", "# Lyric",
    "Generate the VOCALS track based on the audio context:",
    "Generate the BACKING_VOCALS track based on the audio context:",
    "Generate the DRUMS track based on the audio context:",
    "soulful indie vocalist, warm, wordless melody, expressive",
    "background vocals, close harmony, wordless, warm",
    "live acoustic drum kit, tight kick and snare, brushed hi-hats",
    "- bpm: 120 - timesignature: 4 - keyscale: F# minor - duration: 30 seconds",
    "[Instrumental] en zh ja 0123456789",
]


def build_tokenizer():
    """A small byte-level BPE tokenizer, trained here on the pipeline's own prompt vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(_TOKENIZER_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   model_max_length=4096)


def build_pipeline(size: str = "tiny", seed: int = 0, device: str = "cpu", dtype=None):
    """Construct the pipeline with random weights; `device`/`dtype` let a GPU build the full one fast."""
    import torch
    from diffusers import AceStepPipeline, AutoencoderOobleck, FlowMatchEulerDiscreteScheduler
    from diffusers.models.transformers.ace_step_transformer import AceStepTransformer1DModel
    from diffusers.pipelines.ace_step.modeling_ace_step import AceStepConditionEncoder
    from transformers import Qwen3Config, Qwen3Model

    spec = SIZES[size]
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    vocab = spec["vocab"] or len(tokenizer)
    with torch.device(device):
        vae = AutoencoderOobleck(downsampling_ratios=VAE_RATIOS, decoder_input_channels=64, audio_channels=2,
                                 sampling_rate=48000, **spec["vae"])
        text_encoder = Qwen3Model(Qwen3Config(vocab_size=vocab, max_position_embeddings=32768,
                                              pad_token_id=tokenizer.pad_token_id, **spec["text"]))
        transformer = AceStepTransformer1DModel(in_channels=192, audio_acoustic_hidden_dim=64, **spec["dit"])
        condition_encoder = AceStepConditionEncoder(text_hidden_dim=spec["text"]["hidden_size"],
                                                    timbre_hidden_dim=64, **spec["cond"])
    # What diffusers 0.42.1's AceStepPipeline expects of a converted checkpoint: timesteps in
    # [0, 1] fed verbatim (the pipeline shifts its own sigma schedule), so the guidance interval
    # test `0 <= 1 - t <= 1` holds on every step and each DiT call runs the (cond, null) pair.
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1, shift=1.0)
    pipe = AceStepPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
                           condition_encoder=condition_encoder, scheduler=scheduler)
    if dtype is not None:
        pipe.to(dtype=dtype)
    return pipe


def _name_tokenizer_portably(index_path: Path) -> None:
    """transformers 5 records its tokenizer as `TokenizersBackend`, which 4.x cannot load; both know
    `PreTrainedTokenizerFast`, which is what this tokenizer is (DESIGN.md section 3)."""
    index = json.loads(index_path.read_text())
    index["tokenizer"] = ["transformers", "PreTrainedTokenizerFast"]
    index_path.write_text(json.dumps(index, indent=2) + "\n")


def write_checkpoint(dest: Path, size: str = "tiny", seed: int = 0, device: str = "cpu", dtype=None) -> Path:
    """Build and save into a temporary sibling folder, then rename: never a half-written checkpoint."""
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise FileExistsError(f"{dest} exists and is not empty; choose a new folder or remove it first.")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=str(dest.parent)))
    try:
        pipe = build_pipeline(size, seed, device, dtype)
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        _name_tokenizer_portably(tmp / "model_index.json")
        (tmp / DEMO_MARKER).write_text(json.dumps({"size": size, "seed": seed, "note": "random weights, not ACE-Step"}) + "\n")
        if dest.exists():
            dest.rmdir()
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
