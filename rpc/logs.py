"""Structured (JSON) logs; every line written while serving a request carries its request_id."""

from __future__ import annotations

import contextvars
import json
import logging
import time

from contract.rules import ID_PATTERN

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")



def loggable_id(value: str) -> str:
    """An id as it may appear in a log line: valid ids as they are, anything else replaced by a
    short marker (a rejected 4 MB id must not become 4 MB of log)."""
    if not value or ID_PATTERN.fullmatch(value):
        return value
    return f"<invalid id, {len(value)} chars>"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if rid := request_id_var.get():
            entry["request_id"] = rid
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str = "INFO", json_lines: bool = True) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
