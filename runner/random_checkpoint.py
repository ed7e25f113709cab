"""Randomly initialised ACE-Step 1.5 checkpoints of the real architecture, in either layout.

`write_acestep_layout` writes ACE-Step's own layout (acestep-v15-base/, vae/, Qwen3-Embedding-0.6B/)
with the official key names and config fields; `write_checkpoint` converts that with `runner.convert`,
so a random diffusers folder is, by construction, what the converter makes of the real weights
(scheduler, configs, the 600 s silence latent). `tiny` is a few MB and builds in seconds on 2 cores:
tests and the demo mode run the real diffusers code on it. `full` has the real base model's sizes
(DiT hidden 2048 x 24 layers, a Qwen3-Embedding-0.6B-sized text encoder, ACE-Step's Oobleck VAE):
on a GPU it gives true memory and time without the real weights. Both are deterministic for a seed
and carry DEMO_MARKER so that nobody mistakes random weights for the model.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from runner import convert as conversion
from runner.layout import DEMO_FORMAT, DEMO_MARKER

# ACE-Step 1.5's VAE: 48 kHz stereo, 1920 samples per latent frame (25 fps), 64 latent channels.
VAE_RATIOS = [2, 4, 4, 6, 10]
LATENT_CHANNELS = 64
# The tiny VAE's strides: the same five, longest first. Its encoder runs every block at 128 channels
# (encoder_hidden_size is twice the 64 latent channels: mean and scale; diffusers prepends multiple 1),
# and each block's three residual units run at its input rate: in the real order the first two blocks
# run at 48 and 24 kHz, in this one only the first at 48 kHz and the next at 4.8 kHz. That takes about
# a third off a demo job's CPU time (docs/PERFORMANCE.md, "The demo model on a CPU"); the hop is still 1920.
TINY_VAE_RATIOS = sorted(VAE_RATIOS, reverse=True)

SIZES = {
    "tiny": {
        # encoder_hidden_size is twice the 64 latent channels (mean and scale), so it stays 128.
        "vae": dict(encoder_hidden_size=128, channel_multiples=[1, 1, 1, 1, 1], decoder_channels=4,
                    downsampling_ratios=TINY_VAE_RATIOS),
        "text": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                     head_dim=16, intermediate_size=64),
        "dit": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=1, head_dim=16, num_lyric_encoder_hidden_layers=1,
                    num_timbre_encoder_hidden_layers=1, num_attention_pooler_hidden_layers=1, fsq_dim=32),
        "vocab": None,  # the tokenizer's own small vocabulary
    },
    "full": {
        "vae": dict(encoder_hidden_size=128, channel_multiples=[1, 2, 4, 8, 16], decoder_channels=128,
                    downsampling_ratios=VAE_RATIOS),
        "text": dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                     head_dim=128, intermediate_size=3072),
        "dit": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=24, num_attention_heads=16,
                    num_key_value_heads=8, head_dim=128, num_lyric_encoder_hidden_layers=8,
                    num_timbre_encoder_hidden_layers=4, num_attention_pooler_hidden_layers=2, fsq_dim=2048),
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


def dit_config(size: str) -> dict:
    """ACE-Step's DiT config.json: the official AceStepConfig's fields (models/common/configuration_acestep_v15.py)."""
    spec = SIZES[size]["dit"]
    layers = spec["num_hidden_layers"]
    return {
        "architectures": ["AceStepConditionGenerationModel"], "model_type": "acestep", "model_version": "base",
        "is_turbo": False, "vocab_size": 64003, "fsq_dim": spec["fsq_dim"], "fsq_input_levels": [8, 8, 8, 5, 5, 5],
        "fsq_input_num_quantizers": 1, "hidden_size": spec["hidden_size"], "intermediate_size": spec["intermediate_size"],
        "num_hidden_layers": layers, "num_attention_heads": spec["num_attention_heads"],
        "num_key_value_heads": spec["num_key_value_heads"], "head_dim": spec["head_dim"], "hidden_act": "silu",
        "max_position_embeddings": 32768, "initializer_range": 0.02, "rms_norm_eps": 1e-6, "use_cache": True,
        "tie_word_embeddings": True, "rope_theta": 1000000, "rope_scaling": None, "attention_bias": False,
        "use_sliding_window": True, "sliding_window": 128,
        "layer_types": ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)],
        "attention_dropout": 0.0, "num_lyric_encoder_hidden_layers": spec["num_lyric_encoder_hidden_layers"],
        "audio_acoustic_hidden_dim": LATENT_CHANNELS, "pool_window_size": 5,
        "text_hidden_dim": SIZES[size]["text"]["hidden_size"], "in_channels": 3 * LATENT_CHANNELS,
        "data_proportion": 0.5, "timestep_mu": -0.4, "timestep_sigma": 1.0, "timbre_hidden_dim": LATENT_CHANNELS,
        "num_timbre_encoder_hidden_layers": spec["num_timbre_encoder_hidden_layers"], "timbre_fix_frame": 750,
        "patch_size": 2, "num_attention_pooler_hidden_layers": spec["num_attention_pooler_hidden_layers"],
        "num_audio_decoder_hidden_layers": layers,
    }


def _audio_token_configs(dit: dict) -> tuple[dict, dict]:
    """The audio-code tokenizer/detokenizer's diffusers configs (diffusers' converter's mapping)."""
    shared = {name: dit[name] for name in ("hidden_size", "intermediate_size", "audio_acoustic_hidden_dim", "pool_window_size",
                                           "num_attention_pooler_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                           "head_dim", "rope_theta", "attention_bias", "attention_dropout", "rms_norm_eps",
                                           "sliding_window")}
    shared["layer_types"] = dit["layer_types"][: dit["num_attention_pooler_hidden_layers"]]
    tokenizer = dict(shared, fsq_dim=dit["fsq_dim"], fsq_input_levels=dit["fsq_input_levels"],
                     fsq_input_num_quantizers=dit["fsq_input_num_quantizers"])
    return tokenizer, shared


def silence_latent_of(vae, dtype):
    """[1, 64, 15000]: the VAE's latent of silence (its posterior mean mid-way through 2 s of zeros), for 600 s."""
    import torch

    with torch.no_grad():
        zeros = torch.zeros(1, 2, 2 * 48000, dtype=next(vae.parameters()).dtype, device=next(vae.parameters()).device)
        mean = vae.encode(zeros).latent_dist.mean
    frame = mean[:, :, mean.shape[-1] // 2 : mean.shape[-1] // 2 + 1]
    return frame.repeat(1, 1, conversion.SILENCE_FRAMES).to(device="cpu", dtype=dtype).contiguous()


def build_acestep_parts(size: str = "tiny", seed: int = 0, device: str = "cpu", dtype=None) -> dict:
    """Random-weight modules of every part, built with diffusers/transformers classes on `device`."""
    import torch
    from diffusers import AceStepTransformer1DModel, AutoencoderOobleck
    from diffusers.pipelines.ace_step import AceStepAudioTokenDetokenizer, AceStepAudioTokenizer, AceStepConditionEncoder
    from transformers import Qwen3Config, Qwen3Model

    spec = SIZES[size]
    dit = dit_config(size)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    vocab = spec["vocab"] or len(tokenizer)
    tokenizer_config, detokenizer_config = _audio_token_configs(dit)
    with torch.device(device):
        vae = AutoencoderOobleck(decoder_input_channels=LATENT_CHANNELS, audio_channels=2,
                                 sampling_rate=48000, **spec["vae"])
        text_encoder = Qwen3Model(Qwen3Config(vocab_size=vocab, max_position_embeddings=32768, rope_theta=1000000.0,
                                              rms_norm_eps=1e-6, tie_word_embeddings=True,
                                              pad_token_id=tokenizer.pad_token_id, **spec["text"]))
        transformer = AceStepTransformer1DModel(**conversion.transformer_config(dit))
        condition_encoder = AceStepConditionEncoder(**conversion.condition_encoder_config(dit))
        audio_tokenizer = AceStepAudioTokenizer(**tokenizer_config)
        audio_detokenizer = AceStepAudioTokenDetokenizer(**detokenizer_config)
    parts = dict(vae=vae, text_encoder=text_encoder, transformer=transformer, condition_encoder=condition_encoder,
                 audio_tokenizer=audio_tokenizer, audio_detokenizer=audio_detokenizer)
    if dtype is not None:
        for module in parts.values():
            module.to(dtype=dtype)
    parts.update(tokenizer=tokenizer, dit_config=dit)
    return parts


def _dit_state(parts: dict) -> dict:
    """The DiT's model.safetensors as ACE-Step's AceStepConditionGenerationModel names it."""
    state = conversion.to_acestep_keys(parts["transformer"].state_dict(), parts["condition_encoder"].state_dict())
    for prefix, module in (("tokenizer.", parts["audio_tokenizer"]), ("detokenizer.", parts["audio_detokenizer"])):
        for key, value in module.state_dict().items():
            state[prefix + conversion._unrename(key, conversion.ATTENTION_RENAMES)] = value
    return {key: value.detach().to("cpu").contiguous() for key, value in state.items()}


def _in_new_folder(dest: Path, write) -> Path:
    """Run `write(tmp)` into a temporary sibling folder, then rename it to `dest`: never half a checkpoint."""
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise FileExistsError(f"{dest} exists and is not empty; choose a new folder or remove it first.")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=str(dest.parent)))
    try:
        write(tmp)
        if dest.exists():
            dest.rmdir()
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _write_marker(folder: Path, size: str, seed: int) -> None:
    marker = {"size": size, "seed": seed, "format": DEMO_FORMAT, "note": "random weights, not ACE-Step"}
    (folder / DEMO_MARKER).write_text(json.dumps(marker) + "\n")


def write_acestep_layout(dest: Path, size: str = "tiny", seed: int = 0, device: str = "cpu", dtype=None) -> Path:
    """ACE-Step's own layout with random weights (no model code: the acestep package brings its own)."""
    import torch
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        parts = build_acestep_parts(size, seed, device, dtype)
        dit_dir = tmp / conversion.DIT
        dit_dir.mkdir()
        weights = _dit_state(parts)
        config = dict(parts["dit_config"], torch_dtype=str(next(iter(weights.values())).dtype).replace("torch.", ""))
        (dit_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(weights, str(dit_dir / "model.safetensors"), metadata={"format": "pt"})
        torch.save(silence_latent_of(parts["vae"], next(iter(weights.values())).dtype), str(dit_dir / "silence_latent.pt"))
        parts["vae"].save_pretrained(str(tmp / conversion.VAE), safe_serialization=True)
        parts["text_encoder"].save_pretrained(str(tmp / conversion.TEXT_ENCODER), safe_serialization=True)
        parts["tokenizer"].save_pretrained(str(tmp / conversion.TEXT_ENCODER))
        _write_marker(tmp, size, seed)

    return _in_new_folder(dest, write)


def write_checkpoint(dest: Path, size: str = "tiny", seed: int = 0, device: str = "cpu", dtype=None,
                     layout: str = "diffusers") -> Path:
    """A random checkpoint in `layout` ("diffusers": ACE-Step's layout through `runner convert`)."""
    if layout == "acestep":
        return write_acestep_layout(dest, size, seed, device, dtype)
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise FileExistsError(f"{dest} exists and is not empty; choose a new folder or remove it first.")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{dest.name}.acestep.", dir=str(dest.parent)) as work:
        source = write_acestep_layout(Path(work) / "acestep", size, seed, device, dtype)
        conversion.convert(source, dest)
    return dest



def build_pipeline(size: str = "tiny", seed: int = 0, device: str = "cpu", dtype=None):
    """The random pipeline in memory, loaded from a converted folder: what the diffusers engine loads."""
    from diffusers import AceStepPipeline

    with tempfile.TemporaryDirectory(prefix="acestep-random-") as work:
        folder = write_checkpoint(Path(work) / "pipe", size, seed, device, dtype)
        pipe = AceStepPipeline.from_pretrained(str(folder), audio_tokenizer=None, audio_token_detokenizer=None,
                                               **({"dtype": dtype} if dtype is not None else {}))
    return pipe.to(device)
