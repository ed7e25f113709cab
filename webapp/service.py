"""The objects one running service shares between requests: settings, jobs, GPU tokens, checkpoints."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from flask import current_app

from webapp.checkpoints import CheckpointInfo, inspect_checkpoints

PROJECT_ROOT = Path(__file__).resolve().parent.parent
EXTENSION_KEY = "acestep"


def runner_command(settings) -> list[str]:
    """RUNNER_COMMAND, or this interpreter's `-m runner` run from the project root."""
    return list(settings.runner_command) or [sys.executable, "-m", "runner"]


@dataclass
class Service:
    settings: object
    jobs: object  # webapp.jobs.JobManager
    tokens: object  # webapp.gpu_tokens.LockFileTokens | QueueServiceTokens
    checkpoints: CheckpointInfo
    started_at: float = field(default_factory=time.time)

    def refresh_checkpoints(self) -> CheckpointInfo:
        s = self.settings
        self.checkpoints = inspect_checkpoints(s.acestep_checkpoints, s.acestep_engine, s.acestep_config_path)
        return self.checkpoints


def current_service() -> Service:
    return current_app.extensions[EXTENSION_KEY]
