"""Print the Docker image's pinned Python packages, one per line, read from the Dockerfile itself.

The parity check needs the image's environment (official ACE-Step needs transformers<4.58) beside
.venv's (diffusers 0.42.1 needs transformers 5). Reading the pins from the Dockerfile keeps that
environment the image's, with no second list to drift. ARG defaults are substituted.
"""
from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path


def image_requirements(dockerfile: Path) -> list[str]:
    text = dockerfile.read_text().replace("\\\n", " ")
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, flags=re.M))
    wanted: list[str] = []
    for line in text.splitlines():
        command = line.strip()
        if not command.startswith("RUN pip install") or "--no-deps" in command:
            continue
        for word in shlex.split(command.split("&&")[0])[3:]:
            if word.startswith("-"):
                continue
            word = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], word)
            if word not in wanted:
                wanted.append(word)
    return wanted


if __name__ == "__main__":
    print("\n".join(image_requirements(Path(sys.argv[1] if len(sys.argv) > 1 else "Dockerfile"))))
