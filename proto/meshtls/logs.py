"""Structured logging for both programs: `extra={...}` fields become JSON keys (with
`--log-format json`, one object per line) or `key=value` pairs after the message (text)."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

# Attributes every LogRecord has; anything else came from `extra=`.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
# One encoder for every value (json.dumps with `default=` builds a new one per call).
_encode = json.JSONEncoder(default=str).encode


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    converter = staticmethod(time.gmtime)

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        doc.update(record_fields(record))
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return _encode(doc)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = record_fields(record)
        if fields:
            line += " " + " ".join(f"{k}={_encode(v)}" for k, v in fields.items())
        return line


def configure(fmt: str = "text", level: str = "info", stream: TextIO | None = None) -> None:
    """Send every log record to `stream` (stderr) in the chosen format.

    Neither format shows the calling file, line, thread or process, so records do not
    collect them (logging's documented switches): the CA writes an audit line for every
    certificate it issues, and finding the caller alone cost a fifth of each line."""
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(stream or sys.stderr)
    formatter: logging.Formatter = JsonFormatter() if fmt == "json" else TextFormatter()
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
