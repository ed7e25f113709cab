"""`download DIR`: the real ACE-Step 1.5 base-model weights through huggingface_hub.

Only what the lego task needs: the base DiT, the VAE and the text encoder. Never the
language model (the T4 service runs without one). snapshot_download resumes partial
downloads and skips finished files, so running it again after a failure continues.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from runner.events import EXIT_OK, EventStream, RunnerError, EXIT_CHECKPOINT

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


def download(dest: Path, events: EventStream, plan=PLAN) -> int:
    from huggingface_hub import snapshot_download

    dest.mkdir(parents=True, exist_ok=True)
    for fetch in plan:
        target = dest / fetch.subdir if fetch.subdir else dest
        events.say(f"[runner] downloading {fetch.repo_id} {list(fetch.allow_patterns or ['*'])} into {target}")
        events.emit("download", repo_id=fetch.repo_id, target=str(target), allow_patterns=list(fetch.allow_patterns or []))
        try:
            snapshot_download(repo_id=fetch.repo_id, local_dir=str(target), allow_patterns=list(fetch.allow_patterns) if fetch.allow_patterns else None)
        except Exception as exc:  # huggingface_hub raises many kinds when offline; all mean the same here
            raise RunnerError(
                "hub_unreachable",
                f"Could not download {fetch.repo_id} ({type(exc).__name__}: {exc}). Check the network or HF_ENDPOINT, then run the same command again: finished files are kept.",
                EXIT_CHECKPOINT,
                retryable=True,
            ) from exc
    events.emit("downloaded", path=str(dest.resolve()))
    return EXIT_OK
