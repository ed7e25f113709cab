"""The private checkpoint view ACE-Step's loader is given (runner/engines/acestep_view.py).

The official download check (acestep/model_downloader.py at 6d467e4, `check_main_model_exists`)
wants a weights file in every part of the main download; the fork's only wants the folders. Both
are run here: the fork's for real, the official one's rule through `acestep_view.has_weights`,
which `make official-check` confirms against the official function itself.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import acestep.model_downloader as fork_downloader

from runner.engines import acestep_view
from runner.engines.acestep_view import UNUSED_PARTS, build_checkpoint_view, has_weights

# The official main download (model_downloader.MAIN_MODEL_COMPONENTS at 6d467e4).
OFFICIAL_MAIN_COMPONENTS = ("acestep-v15-turbo", "vae", "Qwen3-Embedding-0.6B", "acestep-5Hz-lm-1.7B")


def official_check_main_model_exists(folder: Path) -> bool:
    return all(has_weights(folder / part) for part in OFFICIAL_MAIN_COMPONENTS)


def real_layout(root: Path) -> Path:
    """ACE-Step's layout as `python -m runner download` leaves it: configs, weights, model code."""
    files = {
        "acestep-v15-base": ("config.json", "model.safetensors", "silence_latent.pt", "modeling_acestep_v15_base.py"),
        "vae": ("config.json", "diffusion_pytorch_model.safetensors"),
        "Qwen3-Embedding-0.6B": ("config.json", "model.safetensors", "tokenizer.json"),
    }
    for part, names in files.items():
        (root / part).mkdir(parents=True)
        for name in names:
            (root / part / name).write_text(f"{part}/{name}\n")
    return root


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_empty_placeholder_folders_would_start_a_download_with_the_official_check(tmp_path):
    """What the engine did before: empty folders pass the fork's check but not the official one."""
    checkpoints = real_layout(tmp_path / "ckpt")
    old_view = tmp_path / "old"
    shutil.copytree(checkpoints, old_view)
    for part in UNUSED_PARTS:
        (old_view / part).mkdir()
    assert fork_downloader.check_main_model_exists(old_view)
    assert not official_check_main_model_exists(old_view)


def test_the_view_satisfies_both_download_checks_without_touching_the_folder(tmp_path):
    checkpoints = real_layout(tmp_path / "ckpt")
    before = snapshot(checkpoints)
    view = build_checkpoint_view(checkpoints, tmp_path / "view") / "checkpoints"
    assert official_check_main_model_exists(view)
    assert has_weights(view / "acestep-v15-base")  # official check_model_exists for the DiT
    assert fork_downloader.check_main_model_exists(view) and fork_downloader.check_model_exists("acestep-v15-base", view)
    assert snapshot(checkpoints) == before and not any((checkpoints / part).exists() for part in UNUSED_PARTS)
    index = json.loads((view / "acestep-v15-turbo" / acestep_view.PLACEHOLDER_INDEX).read_text())
    assert index["weight_map"] == {}  # nothing to load: a loader that tried would fail, not fetch


def test_files_are_linked_one_by_one_and_model_code_is_copied(tmp_path):
    checkpoints = real_layout(tmp_path / "ckpt")
    view = build_checkpoint_view(checkpoints, tmp_path / "view") / "checkpoints"
    for part in ("acestep-v15-base", "vae", "Qwen3-Embedding-0.6B"):
        assert (view / part).is_dir() and not (view / part).is_symlink()
    weights = view / "acestep-v15-base" / "model.safetensors"
    assert weights.is_symlink() and weights.resolve() == (checkpoints / "acestep-v15-base" / "model.safetensors").resolve()
    code = view / "acestep-v15-base" / "modeling_acestep_v15_base.py"
    assert code.is_file() and not code.is_symlink()


def test_acestep_rewriting_its_model_code_in_the_view_leaves_the_real_folder_alone(tmp_path):
    """The official loader copies its own model code over the checkpoint's when they differ
    (model_downloader._sync_model_code_files: shutil.copy2 into <checkpoints>/<dit>/)."""
    checkpoints = real_layout(tmp_path / "ckpt")
    before = snapshot(checkpoints)
    view = build_checkpoint_view(checkpoints, tmp_path / "view") / "checkpoints"
    newer = tmp_path / "modeling_acestep_v15_base.py"
    newer.write_text("# the installed acestep's newer model code\n")
    shutil.copy2(newer, view / "acestep-v15-base" / newer.name)
    assert (view / "acestep-v15-base" / newer.name).read_text() == newer.read_text()
    assert snapshot(checkpoints) == before


def test_a_full_download_keeps_its_own_parts(tmp_path):
    checkpoints = real_layout(tmp_path / "ckpt")
    (checkpoints / "acestep-v15-turbo").mkdir()
    (checkpoints / "acestep-v15-turbo" / "model.safetensors").write_text("turbo weights\n")
    view = build_checkpoint_view(checkpoints, tmp_path / "view") / "checkpoints"
    assert (view / "acestep-v15-turbo" / "model.safetensors").resolve() == (checkpoints / "acestep-v15-turbo" / "model.safetensors").resolve()
    assert not (view / "acestep-v15-turbo" / acestep_view.PLACEHOLDER_INDEX).exists()
