"""What a checkpoint folder is and whether it is complete, read from files alone (no torch).

The engine follows the folder's layout (DESIGN.md section 3): a diffusers pipeline folder has
`model_index.json`; ACE-Step's own layout has the DiT, the VAE and the text encoder side by side.
A folder made by `make-tiny-checkpoint` carries DEMO_MARKER so nobody mistakes it for the model.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

DEMO_MARKER = "DEMO_RANDOM_WEIGHTS"
# The tiny random model's version, in its marker: raised when its architecture changes, so an older
# demo folder can be told apart (2: the VAE's strides longest first, 3-4x faster on a CPU).
DEMO_FORMAT = 2
ACESTEP_PARTS = {
    "acestep-v15-base": ("config.json",),
    "vae": ("config.json",),
    "Qwen3-Embedding-0.6B": ("config.json", "tokenizer.json"),
}
WEIGHT_SUFFIXES = (".safetensors", ".bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass
class Layout:
    path: Path
    engine: str | None  # "diffusers" | "acestep" | None when unrecognised
    missing: list[str] = field(default_factory=list)
    demo: bool = False

    @property
    def complete(self) -> bool:
        return self.engine is not None and not self.missing

    def describe_problem(self) -> str:
        if not self.path.is_dir():
            return f"The checkpoint folder {self.path} does not exist; run `python -m runner download {self.path}` or `python -m runner make-tiny-checkpoint {self.path}`."
        if self.engine is None:
            return (
                f"{self.path} is neither a diffusers pipeline folder (model_index.json) nor ACE-Step's layout "
                f"({', '.join(ACESTEP_PARTS)}); run `python -m runner download {self.path}`."
            )
        return f"The {self.engine} checkpoint in {self.path} is incomplete, missing: {', '.join(self.missing)}. Download it again (resumable)."


def demo_format(path: Path) -> int | None:
    """The format a demo folder's marker names (1 before formats were written); None: no marker."""
    try:
        marker = json.loads((Path(path) / DEMO_MARKER).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return 1
    return int(marker.get("format", 1)) if isinstance(marker, dict) else 1


def inspect_folder(path: Path, engine_override: str | None = None) -> Layout:
    path = Path(path)
    if not path.is_dir():
        return Layout(path, None, [str(path)])
    demo = (path / DEMO_MARKER).is_file()
    engine = engine_override or _guess_engine(path)
    if engine == "diffusers":
        return Layout(path, engine, _missing_diffusers(path), demo)
    if engine == "acestep":
        return Layout(path, engine, _missing_acestep(path), demo)
    return Layout(path, None, [], demo)


def _guess_engine(path: Path) -> str | None:
    if (path / "model_index.json").is_file():
        return "diffusers"
    if any((path / part).is_dir() for part in ACESTEP_PARTS):
        return "acestep"
    return None


def _has_weights(folder: Path) -> bool:
    return folder.is_dir() and any(p.suffix in WEIGHT_SUFFIXES or p.name.endswith(".safetensors.index.json") for p in folder.iterdir())


def _missing_diffusers(path: Path) -> list[str]:
    try:
        index = json.loads((path / "model_index.json").read_text())
    except (OSError, ValueError):
        return ["model_index.json (unreadable)"]
    missing = []
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        folder = path / name
        if name == "tokenizer":
            if not any((folder / f).is_file() for f in TOKENIZER_FILES):
                missing.append(f"{name}/tokenizer.json")
        elif name == "scheduler":
            if not (folder / "scheduler_config.json").is_file():
                missing.append(f"{name}/scheduler_config.json")
        else:
            if not (folder / "config.json").is_file():
                missing.append(f"{name}/config.json")
            if not _has_weights(folder):
                missing.append(f"{name}/ weights (*.safetensors)")
    return missing


def _missing_acestep(path: Path) -> list[str]:
    missing = []
    for part, files in ACESTEP_PARTS.items():
        folder = path / part
        missing += [f"{part}/{f}" for f in files if not (folder / f).is_file()]
        if not _has_weights(folder):
            missing.append(f"{part}/ weights (*.safetensors)")
    return missing
