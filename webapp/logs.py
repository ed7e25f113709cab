"""Logging: one line per request and per job transition, as text for people or JSON for machines.

`event(logger, name, **fields)` is the one way the service logs something a machine may want to
read: in `LOG_FORMAT=json` each line is one object with `ts` (Unix time, seconds), `level`,
`event` and the fields; in text it reads `event key=value ...`.
"""
from __future__ import annotations

import json
import logging
import sys
import time

_HANDLER_FLAG = "_acestep_handler"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload = {"ts": round(record.created, 6), "level": record.levelname, "logger": record.name, "pid": record.process}
        fields = getattr(record, "fields", None)
        if fields:
            payload.update(fields)
        else:
            payload["message"] = record.getMessage()
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")


def configure_logging(fmt: str, level: str) -> None:
    """Install one stderr handler on the `acestep` loggers (idempotent: app factories may run twice)."""
    root = logging.getLogger("acestep")
    root.setLevel(level)
    root.propagate = False
    for handler in list(root.handlers):
        if getattr(handler, _HANDLER_FLAG, False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    setattr(handler, _HANDLER_FLAG, True)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root.addHandler(handler)


def event(logger: logging.Logger, name: str, level: int = logging.INFO, **fields) -> None:
    """Log a named event with fields; `ts` in the JSON form is taken here, precise to the microsecond."""
    if not logger.isEnabledFor(level):
        return
    text = name + "".join(f" {k}={_short(v)}" for k, v in fields.items())
    logger.log(level, text, extra={"fields": {"event": name, "event_ts": time.time(), **fields}})


def _short(value) -> str:
    text = str(value)
    if " " in text or not text:
        text = json.dumps(text)
    return text
