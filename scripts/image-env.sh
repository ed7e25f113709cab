#!/usr/bin/env bash
# `make image-env`: the Docker image's Python environment in a venv, for a machine without Docker.
# The same two lists as the Dockerfile: image/requirements.txt, then the web layer's requirements
# held to the versions it chose. The official ACE-Step checkout is not installed here: the checks
# put it on PYTHONPATH (ACESTEP_SRC), so nothing of it is copied into this repository or the venv.
#   IMAGE_ENV=/path  where the venv goes (default: .image-env, ignored by git)
#   PYTHON=python3   the interpreter (the image's is 3.12; ACE-Step accepts 3.11 and 3.12)
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE_ENV=${IMAGE_ENV:-.image-env}
PYTHON=${PYTHON:-python3}
stamp="$IMAGE_ENV/.image-requirements"
wanted=$(cat image/requirements.txt setup.cfg | sha256sum | cut -d' ' -f1)
if [[ -f "$stamp" && "$(cat "$stamp")" == "$wanted" ]]; then
    echo "[image-env] $IMAGE_ENV is up to date with image/requirements.txt"
    exit 0
fi
test -x "$IMAGE_ENV/bin/python" || "$PYTHON" -m venv "$IMAGE_ENV"
"$IMAGE_ENV/bin/python" -m pip install -q --upgrade pip
"$IMAGE_ENV/bin/python" -m pip install -q -r image/requirements.txt
"$IMAGE_ENV/bin/python" -m pip freeze > "$IMAGE_ENV/acestep-constraints.txt"
mapfile -t web < <("$IMAGE_ENV/bin/python" image/web_requirements.py setup.cfg)
"$IMAGE_ENV/bin/python" -m pip install -q -c "$IMAGE_ENV/acestep-constraints.txt" "${web[@]}"
echo "$wanted" > "$stamp"
echo "[image-env] $IMAGE_ENV: $("$IMAGE_ENV/bin/python" -c 'import sys, torch, transformers, diffusers; print("python", sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__, "diffusers", diffusers.__version__)')"
