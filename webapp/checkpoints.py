"""What the checkpoint folder is, read from its file layout alone (no torch, no runner import).

`/health` and the startup log need to say which engine the folder implies, whether it looks
complete and whether it holds the demo's random weights; loading a model to find out would hold
GPU memory, so this reads only names and `model_index.json`. It asks what the runner's own
`runner/layout.py` asks (a config and a weights file in each model part), so /health never calls
ready a folder the runner refuses; tests/test_checkpoint_views_agree.py holds the two together.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

DEMO_MARKER = "DEMO_RANDOM_WEIGHTS"
ACESTEP_SUBFOLDERS = ("vae", "Qwen3-Embedding-0.6B")  # plus ACESTEP_CONFIG_PATH (the DiT)
DEMO_MODEL_HEADER = "demo-random-weights"
WEIGHT_SUFFIXES = (".safetensors", ".bin")


@dataclass
class CheckpointInfo:
    path: str
    engine: str | None  # "diffusers" | "acestep" | None (not recognised)
    complete: bool
    demo: bool
    missing: list[str] = field(default_factory=list)

    @property
    def weights(self) -> str:
        """What answers: "none" until the folder is complete (an empty or half-downloaded folder holds no model)."""
        if not self.complete:
            return "none"
        return "demo: random weights" if self.demo else "real"

    @property
    def model_header(self) -> str:
        """Value of the X-ACEStep-Model response header."""
        if self.demo:
            return DEMO_MODEL_HEADER
        return f"ace-step-1.5-base ({self.engine or 'unknown'})"

    def as_dict(self) -> dict:
        return {"path": self.path, "engine": self.engine, "complete": self.complete, "weights": self.weights,
                "demo": self.demo, "missing": self.missing}


def inspect_checkpoints(folder: Path, engine_override: str = "auto", config_path: str = "acestep-v15-base") -> CheckpointInfo:
    folder = Path(folder)
    if not folder.is_dir():
        return CheckpointInfo(str(folder), None, False, False, ["the checkpoint folder itself"])
    demo = (folder / DEMO_MARKER).is_file()
    engine = engine_override if engine_override != "auto" else _guess_engine(folder, config_path)
    if engine == "diffusers":
        missing = _missing_diffusers(folder)
    elif engine == "acestep":
        missing = [name for name in (config_path, *ACESTEP_SUBFOLDERS) if not _has_model(folder / name)]
        if not missing and not (folder / "Qwen3-Embedding-0.6B" / "tokenizer.json").is_file():
            missing.append("Qwen3-Embedding-0.6B/tokenizer.json")
    else:
        missing = ["model_index.json or " + ", ".join((config_path, *ACESTEP_SUBFOLDERS))]
    return CheckpointInfo(str(folder), engine, engine is not None and not missing, demo, missing)


def _guess_engine(folder: Path, config_path: str) -> str | None:
    if (folder / "model_index.json").is_file():
        return "diffusers"
    if any((folder / name).is_dir() for name in (config_path, *ACESTEP_SUBFOLDERS)):
        return "acestep"
    return None


def _has_model(path: Path) -> bool:
    """A model part: its config.json and at least one weights file."""
    try:
        return (path / "config.json").is_file() and any(p.suffix in WEIGHT_SUFFIXES for p in path.iterdir())
    except OSError:
        return False


def _has_part(folder: Path, name: str) -> bool:
    """A diffusers pipeline part: tokenizer and scheduler are files of settings, the rest models."""
    if name == "tokenizer":
        return any((folder / name / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    if name == "scheduler":
        return (folder / name / "scheduler_config.json").is_file()
    return _has_model(folder / name)


def _missing_diffusers(folder: Path) -> list[str]:
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        return ["model_index.json (unreadable)"]
    if not isinstance(index, dict):
        return ["model_index.json (not an object)"]
    missing = []
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or not spec or spec[0] is None:
            continue
        if not _has_part(folder, name):
            missing.append(name)
    return missing
