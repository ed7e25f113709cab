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
  else
    "$PY" scripts/demo_current.py "$demo" || true  # an older demo still serves; the line says how to rebuild it
  fi
  export ACESTEP_CHECKPOINTS="$demo"
  echo "demo: random weights (ACESTEP_CHECKPOINTS=$demo). Run '.venv/bin/python -m runner download ./checkpoints' for the real model." >&2
fi
# A taken port: one sentence naming PORT, rather than gunicorn's retries and "Can't connect".
"$PY" scripts/port_free.py
# Once /health answers: the URL, the page and a request to paste (in the background; it ends with us).
"$PY" scripts/ready_hint.py $$ &
exec .venv/bin/gunicorn -c gunicorn.conf.py wsgi:app
