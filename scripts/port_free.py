"""`make serve`'s check before gunicorn starts: is the configured port free? If not, one sentence
naming the variable to change (gunicorn alone would retry, then end with "Can't connect")."""
from __future__ import annotations

import os
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from webapp.settings import Settings, SettingsError  # noqa: E402  (torch-free)


def main() -> int:
    try:
        port = Settings.from_env().port
    except SettingsError:
        return 0  # gunicorn.conf.py says what is wrong with the settings, in one sentence
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn binds: a port in TIME_WAIT is free
    try:
        probe.bind(("0.0.0.0", port))
    except OSError as exc:
        print(f"acestep-stem-service: port {port} is taken ({exc.strerror}): another program listens there; "
              f"set PORT to a free one, e.g. `PORT={port + 1} make serve`.", file=sys.stderr)
        return 2
    finally:
        probe.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
