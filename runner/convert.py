"""`convert SRC DST`: ACE-Step 1.5's own checkpoint layout to a diffusers `AceStepPipeline` folder.

The facts follow diffusers' own converter (scripts/convert_ace_step_to_diffusers.py) and what
diffusers 0.42.1's classes load:
- the DiT's single state dict splits by prefix: `decoder.*` is the transformer (its nn.Sequential
  `proj_in.1`/`proj_out.1` become `proj_in_conv`/`proj_out_conv`), `encoder.*` the condition
  encoder, `null_condition_emb` (the learned unconditional embedding of CFG) joins the condition
  encoder; attention weights are renamed q_proj/k_proj/v_proj/o_proj/q_norm/k_norm ->
  to_q/to_k/to_v/to_out.0/norm_q/norm_k;
- `silence_latent.pt` ([1, 64, T]) is stored transposed ([1, T, 64]) as the condition encoder's
  `silence_latent` buffer, which diffusers fixes at 15000 frames (600 s) and loads strictly;
- the scheduler is FlowMatchEulerDiscreteScheduler(num_train_timesteps=1, shift=1.0): the pipeline
  computes ACE-Step's shifted sigmas in [0, 1] itself and hands them over verbatim;
- the VAE folder is already diffusers' AutoencoderOobleck; the text encoder and its tokenizer are a
  transformers Qwen3 folder.
Left out, unlike diffusers' converter: `tokenizer.*`/`detokenizer.*` (the audio-code tokenizer of
cover tasks; lego never reads it and the engine loads without it). Tensors keep their stored dtype.

The folder is written beside DST under a temporary name and renamed: never half a checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from runner.layout import DEMO_MARKER

DIT = "acestep-v15-base"
VAE = "vae"
TEXT_ENCODER = "Qwen3-Embedding-0.6B"
SILENCE_FRAMES = 15000  # AceStepConditionEncoder.silence_latent in diffusers 0.42.1: 600 s at 25 fps
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json", "chat_template.jinja")
ATTENTION_RENAMES = ((".q_proj.", ".to_q."), (".k_proj.", ".to_k."), (".v_proj.", ".to_v."),
                     (".o_proj.", ".to_out.0."), (".q_norm.", ".norm_q."), (".k_norm.", ".norm_k."))
DIT_RENAMES = (("proj_in.1.", "proj_in_conv."), ("proj_out.1.", "proj_out_conv.")) + ATTENTION_RENAMES
UNUSED_PREFIXES = ("tokenizer.", "detokenizer.")
SCHEDULER_CONFIG = {"num_train_timesteps": 1, "shift": 1.0}


class ConversionError(Exception):
    """SRC is not a complete ACE-Step base checkpoint this converter understands."""


def _rename(key: str, renames) -> str:
    for old, new in renames:
        key = key.replace(old, new)
    return key


def _unrename(key: str, renames) -> str:
    for old, new in renames:
        key = key.replace(new, old)
    return key


def to_diffusers_keys(state: dict) -> tuple[dict, dict, list[str]]:
    """ACE-Step's DiT state dict -> (transformer, condition_encoder, dropped keys)."""
    transformer, condition, dropped = {}, {}, []
    for key, value in state.items():
        if key.startswith("decoder."):
            transformer[_rename(key[len("decoder."):], DIT_RENAMES)] = value
        elif key.startswith("encoder."):
            condition[_rename(key[len("encoder."):], ATTENTION_RENAMES)] = value
        elif key == "null_condition_emb":
            condition[key] = value
        elif key.startswith(UNUSED_PREFIXES):
            dropped.append(key)
        else:
            raise ConversionError(f"unexpected weight {key!r} in the DiT: not an ACE-Step 1.5 base checkpoint")
    return transformer, condition, dropped


def to_acestep_keys(transformer: dict, condition: dict) -> dict:
    """The inverse of to_diffusers_keys (the silence latent aside): how ACE-Step's own model names them."""
    state = {"decoder." + _unrename(k, DIT_RENAMES): v for k, v in transformer.items()}
    for key, value in condition.items():
        if key == "null_condition_emb":
            state[key] = value
        elif key != "silence_latent":
            state["encoder." + _unrename(key, ATTENTION_RENAMES)] = value
    return state


def transformer_config(dit: dict) -> dict:
    """AceStepTransformer1DModel's config from ACE-Step's DiT config.json (diffusers' converter's fields)."""
    names = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "head_dim", "in_channels", "audio_acoustic_hidden_dim", "patch_size", "rope_theta", "attention_bias",
             "attention_dropout", "rms_norm_eps", "sliding_window", "layer_types")
    config = {name: dit[name] for name in names}
    config["encoder_hidden_size"] = dit.get("encoder_hidden_size", dit["hidden_size"])
    config["is_turbo"] = bool(dit.get("is_turbo", False))
    # ACE-Step decides guidance by `is_turbo` alone (core/generation/handler/init_service_catalog.py:79);
    # diffusers also reads model_version == "turbo" as turbo, so a base model must not say so.
    version = dit.get("model_version")
    config["model_version"] = None if version == "turbo" and not config["is_turbo"] else version
    return config


def condition_encoder_config(dit: dict) -> dict:
    names = ("text_hidden_dim", "timbre_hidden_dim", "num_lyric_encoder_hidden_layers", "num_timbre_encoder_hidden_layers",
             "head_dim", "rope_theta", "attention_bias", "attention_dropout", "rms_norm_eps", "sliding_window")
    config = {name: dit[name] for name in names}
    config.update(
        hidden_size=dit.get("encoder_hidden_size", dit["hidden_size"]),
        intermediate_size=dit.get("encoder_intermediate_size", dit["intermediate_size"]),
        num_attention_heads=dit.get("encoder_num_attention_heads", dit["num_attention_heads"]),
        num_key_value_heads=dit.get("encoder_num_key_value_heads", dit["num_key_value_heads"]),
    )
    return config


def _alternating(layers: int) -> list[str]:
    return ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)]


@dataclass
class Converted:
    path: Path
    transformer_keys: int
    condition_encoder_keys: int
    dropped_keys: int


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConversionError(f"{path} is missing or unreadable ({exc})") from exc


def _load_dit_state(folder: Path) -> dict:
    from safetensors.torch import load_file

    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        state = {}
        for shard in sorted(set(_read_json(index)["weight_map"].values())):
            state.update(load_file(str(folder / shard)))
        return state
    raise ConversionError(f"no DiT weights in {folder} (model.safetensors or model.safetensors.index.json)")


def _silence_latent(folder: Path):
    import torch

    path = folder / "silence_latent.pt"
    if not path.is_file():
        raise ConversionError(f"{path} is missing: ACE-Step's DiT folder carries the silence latent")
    raw = torch.load(str(path), map_location="cpu", weights_only=True)
    if raw.ndim != 3 or raw.shape[0] != 1 or raw.shape[2] != SILENCE_FRAMES:
        raise ConversionError(f"{path} is shaped {tuple(raw.shape)}; diffusers needs [1, channels, {SILENCE_FRAMES}] (600 s)")
    return raw.transpose(1, 2).contiguous()


def _tokenizer_class(folder: Path) -> str:
    """The transformers class that loads this tokenizer; `TokenizersBackend` (transformers 5's name
    for a bare tokenizer.json) is written as `PreTrainedTokenizerFast`, which 4.x also knows."""
    from transformers import AutoTokenizer

    name = type(AutoTokenizer.from_pretrained(str(folder))).__name__
    return "PreTrainedTokenizerFast" if name == "TokenizersBackend" else name


def _write_component(folder: Path, class_name: str, config: dict, state: dict, version: str) -> None:
    from safetensors.torch import save_file

    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": class_name, "_diffusers_version": version, **config}, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "diffusion_pytorch_model.safetensors"))


def check_source(src: Path) -> None:
    for part in (DIT, VAE, TEXT_ENCODER):
        if not (src / part / "config.json").is_file():
            raise ConversionError(f"{src / part / 'config.json'} is missing: SRC must hold ACE-Step's {DIT}/, {VAE}/ and {TEXT_ENCODER}/")


def convert(src: Path, dst: Path) -> Converted:
    """Write the diffusers pipeline folder for the ACE-Step checkpoint in `src` at `dst` (new or empty)."""
    import diffusers

    src, dst = Path(src), Path(dst)
    check_source(src)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"{dst} exists and is not empty; choose a new folder or remove it first.")
    dit_config = _read_json(src / DIT / "config.json")
    text_config = _read_json(src / TEXT_ENCODER / "config.json")
    if text_config.get("model_type") != "qwen3":
        raise ConversionError(f"{src / TEXT_ENCODER} holds a {text_config.get('model_type')!r} model; ACE-Step 1.5 uses Qwen3")
    for key in ("layer_types",):
        if dit_config.get(key) not in (None, _alternating(dit_config["num_hidden_layers"])):
            raise ConversionError(f"{src / DIT}/config.json has layer_types {dit_config[key]}; diffusers' condition encoder assumes alternating sliding/full attention")
    dit_config.setdefault("layer_types", _alternating(dit_config["num_hidden_layers"]))
    transformer, condition, dropped = to_diffusers_keys(_load_dit_state(src / DIT))
    condition["silence_latent"] = _silence_latent(src / DIT).to(condition["null_condition_emb"].dtype)
    version = diffusers.__version__

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=str(dst.parent)))
    try:
        _write_component(tmp / "transformer", "AceStepTransformer1DModel", transformer_config(dit_config), transformer, version)
        _write_component(tmp / "condition_encoder", "AceStepConditionEncoder", condition_encoder_config(dit_config), condition, version)
        shutil.copytree(src / VAE, tmp / "vae")
        shutil.copytree(src / TEXT_ENCODER, tmp / "text_encoder", ignore=shutil.ignore_patterns(*TOKENIZER_FILES))
        (tmp / "tokenizer").mkdir()
        for name in TOKENIZER_FILES:
            if (src / TEXT_ENCODER / name).is_file():
                shutil.copy2(src / TEXT_ENCODER / name, tmp / "tokenizer" / name)
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(
            {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": version, **SCHEDULER_CONFIG}, indent=2) + "\n")
        index = {
            "_class_name": "AceStepPipeline", "_diffusers_version": version,
            "audio_token_detokenizer": [None, None], "audio_tokenizer": [None, None],
            "condition_encoder": ["diffusers", "AceStepConditionEncoder"],
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "Qwen3Model"],
            "tokenizer": ["transformers", _tokenizer_class(src / TEXT_ENCODER)],
            "transformer": ["diffusers", "AceStepTransformer1DModel"],
            "vae": ["diffusers", "AutoencoderOobleck"],
        }
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        if (src / DEMO_MARKER).is_file():  # random weights stay labelled as such
            shutil.copy2(src / DEMO_MARKER, tmp / DEMO_MARKER)
        if dst.exists():
            dst.rmdir()
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Converted(dst, len(transformer), len(condition), len(dropped))
