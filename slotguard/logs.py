"""One log format for every slotguard process (issue 17): the API (its uvicorn loggers
included), the worker (arq's too) and ``slotguard up``.

``SLOTGUARD_LOG_FORMAT=plain`` (the default) writes
``2026-11-29 14:40:00,123 INFO slotguard.api [<request id>] message``; ``json`` writes one
JSON object per line: ``{"at", "level", "logger", "requestId", "message"}`` (plus
``"exc"`` with the traceback when there is one). ``requestId`` is ``-`` outside a request.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

PLAIN = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
# Loggers the processes use; each gets our handler and stops propagating, so nothing is
# written twice and no library keeps a format of its own.
LOGGERS = ("slotguard", "uvicorn", "uvicorn.error", "uvicorn.access", "arq")


class PlainFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(PLAIN)

    def format(self, record: logging.LogRecord) -> str:
        if not hasattr(record, "request_id"):
            record.request_id = "-"
        return super().format(record)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "at": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "requestId": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def formatter(log_format: str) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else PlainFormatter()


def configure(log_format: str = "plain", level: str | int = "INFO") -> logging.Handler:
    """Route the root logger and :data:`LOGGERS` to one stderr handler in ``log_format``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(log_format))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level if isinstance(level, int) else level.upper())
    for name in LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.propagate = False
    return handler


def uvicorn_config(log_format: str, level: str) -> dict[str, Any]:
    """A ``log_config`` for uvicorn that uses :func:`formatter` for every logger."""
    handler = {"class": "logging.StreamHandler", "formatter": "slotguard",
               "stream": "ext://sys.stderr"}
    factory = "slotguard.logs.JsonFormatter" if log_format == "json" else \
        "slotguard.logs.PlainFormatter"
    loggers = {name: {"handlers": ["slotguard"], "level": level.upper(), "propagate": False}
               for name in LOGGERS}
    return {"version": 1, "disable_existing_loggers": False,
            "formatters": {"slotguard": {"()": factory}},
            "handlers": {"slotguard": handler}, "loggers": loggers}
