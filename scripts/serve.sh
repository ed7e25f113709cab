#!/usr/bin/env bash
# `make serve`: start gunicorn on the configured checkpoints, or on a demo checkpoint of random
# weights when none are configured, so a new user gets a running service in one command.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
if [ -z "${ACESTEP_CHECKPOINTS:-}" ] && [ ! -e ./checkpoints ]; then
  demo=./data/demo-checkpoint
  if [ ! -d "$demo" ]; then
    echo "No checkpoints configured: building a tiny demo model of RANDOM WEIGHTS in $demo" >&2
    "$PY" -m runner make-tiny-checkpoint "$demo" >/dev/null
  fi
  export ACESTEP_CHECKPOINTS="$demo"
  echo "demo: random weights (ACESTEP_CHECKPOINTS=$demo). Run 'python -m runner download ./checkpoints' for the real model." >&2
fi
exec .venv/bin/gunicorn -c gunicorn.conf.py wsgi:app
