"""`download DIR`: the real ACE-Step 1.5 base-model weights through huggingface_hub; `convert`.

Only what the lego task needs: the base DiT, the VAE and the text encoder. Never the
language model (the T4 service runs without one). snapshot_download resumes partial
downloads and skips finished files, so running it again after a failure continues.

The weights come in ACE-Step's own layout, which the acestep engine (the Docker image) reads
directly: `--engine acestep` downloads into DIR. For the diffusers engine (the default, what
`.venv` runs) the download lands in DIR-acestep and is then converted into DIR (`runner.convert`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from runner.events import EXIT_OK, EventStream, RunnerError, EXIT_CHECKPOINT, bad_input, checkpoint_error
from runner.layout import inspect_folder

MAIN_REPO = "ACE-Step/Ace-Step1.5"  # holds vae/ and Qwen3-Embedding-0.6B/ (and the LM, skipped)
BASE_DIT_REPO = "ACE-Step/acestep-v15-base"


@dataclass(frozen=True)
class Fetch:
    repo_id: str
    subdir: str  # where it lands inside DIR ("" = DIR itself)
    allow_patterns: tuple[str, ...] | None


PLAN = (
    Fetch(BASE_DIT_REPO, "acestep-v15-base", None),
    Fetch(MAIN_REPO, "", ("vae/*", "Qwen3-Embedding-0.6B/*")),
)


def acestep_folder(dest: Path, engine: str) -> Path:
    """Where ACE-Step's layout is downloaded to: DIR itself for the acestep engine, else DIR-acestep."""
    return dest if engine == "acestep" else dest.with_name(dest.name + "-acestep")


def _hub_download(repo_id: str, local_dir: str, allow_patterns: list[str] | None) -> None:
    from huggingface_hub import snapshot_download

    snapshot_download(repo_id=repo_id, local_dir=local_dir, allow_patterns=allow_patterns)


def download(dest: Path, events: EventStream, plan=PLAN, engine: str = "diffusers", fetch=_hub_download) -> int:
    """Fetch the plan in ACE-Step's layout, then (diffusers) convert it into `dest`."""
    root = acestep_folder(dest, engine)
    root.mkdir(parents=True, exist_ok=True)
    for item in plan:
        target = root / item.subdir if item.subdir else root
        events.say(f"[runner] downloading {item.repo_id} {list(item.allow_patterns or ['*'])} into {target}")
        events.emit("download", repo_id=item.repo_id, target=str(target), allow_patterns=list(item.allow_patterns or []))
        try:
            fetch(item.repo_id, str(target), list(item.allow_patterns) if item.allow_patterns else None)
        except Exception as exc:  # huggingface_hub raises many kinds when offline; all mean the same here
            raise RunnerError(
                "hub_unreachable",
                f"Could not download {item.repo_id} ({type(exc).__name__}: {exc}). Check the network or HF_ENDPOINT, then run the same command again: finished files are kept.",
                EXIT_CHECKPOINT,
                retryable=True,
            ) from exc
    events.emit("downloaded", path=str(root.resolve()), layout="acestep")
    if engine == "acestep":
        return EXIT_OK
    if inspect_folder(dest, "diffusers").complete:
        events.say(f"[runner] {dest} already holds the converted pipeline; remove it to convert again")
        return EXIT_OK
    return convert_checkpoint(root, dest, events)


def convert_checkpoint(src: Path, dst: Path, events: EventStream) -> int:
    """`convert SRC DST` with the runner's errors: exit 2 when DST is taken, 3 when SRC cannot be converted."""
    from runner.convert import ConversionError, convert

    events.say(f"[runner] converting {src} (ACE-Step layout) into {dst} (diffusers pipeline)")
    try:
        converted = convert(src, dst)
    except FileExistsError as exc:
        raise bad_input("checkpoint_exists", str(exc)) from None
    except ConversionError as exc:
        raise checkpoint_error("checkpoint_unconvertible", f"{src} cannot be converted: {exc}.") from None
    events.emit("converted", path=str(converted.path.resolve()), transformer_keys=converted.transformer_keys,
                condition_encoder_keys=converted.condition_encoder_keys, dropped_keys=converted.dropped_keys)
    events.say(f"[runner] wrote the diffusers pipeline to {converted.path}")
    return EXIT_OK
