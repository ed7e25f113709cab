"""`make serve`'s check of an existing demo folder: built by an older version of the tiny random model?
Then one sentence saying so and how to rebuild it (exit 1). It is not rebuilt here: another service
of this checkout may be running on it."""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from runner.layout import DEMO_FORMAT, demo_format  # noqa: E402  (torch-free)


def main(argv: list[str]) -> int:
    folder = Path(argv[0])
    found = demo_format(folder)
    if found is None or found >= DEMO_FORMAT:
        return 0
    print(f"acestep-stem-service: the demo model in {folder} was built by an older version (format {found}, now "
          f"{DEMO_FORMAT}) and runs slower on a CPU; to rebuild it, stop the service, `rm -rf {folder}`, and run "
          f"`make serve` again.", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
