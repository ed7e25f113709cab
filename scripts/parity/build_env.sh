#!/usr/bin/env bash
# Builds a venv with the Docker image's Python packages (read from the Dockerfile), for running
# the acestep engine beside .venv's diffusers engine. Used by `make parity-check` when no image
# environment (`make image-env`) exists. Usage: scripts/parity/build_env.sh DIR
set -euo pipefail
cd "$(dirname "$0")/../.."
env_dir=${1:?usage: build_env.sh DIR}
stamp="$env_dir/.parity-installed"
wanted=$(python3 scripts/parity/image_requirements.py Dockerfile)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ]; then
  exit 0
fi
python3 -m venv "$env_dir"
"$env_dir/bin/python" -m pip install -q --upgrade pip
# The image's packages, plus what the runner itself imports (numpy, soundfile, soxr, huggingface_hub).
# shellcheck disable=SC2086
"$env_dir/bin/python" -m pip install -q $wanted numpy "soxr>=0.5" huggingface_hub
echo "$wanted" > "$stamp"
