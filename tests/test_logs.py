"""The structured log formats both programs write: `extra=` fields after the message as
key=JSON pairs (text) or as keys of one JSON object per line (json)."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshtls import logs


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    switches = ("_srcfile", "logThreads", "logProcesses", "logMultiprocessing")
    saved = {name: getattr(logging, name) for name in switches}
    yield
    for name, value in saved.items():
        setattr(logging, name, value)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def _log_one(fmt: str) -> str:
    out = io.StringIO()
    logs.configure(fmt, "info", out)
    logging.getLogger("meshtls.audit").info(
        "audit %s %s",
        "certificate.issue",
        "ab12",
        extra={"node": "web-1", "not_after": 1.5, "path": Path("/var/lib/x")},
    )
    logging.getLogger("meshtls.audit").debug("below the level")
    return out.getvalue()


@pytest.mark.usefixtures("restore_logging")
def test_text_lines_carry_the_fields_as_json_values() -> None:
    (line,) = _log_one("text").splitlines()
    head, _, fields = line.partition(": audit certificate.issue ab12 ")
    assert head.endswith("INFO    meshtls.audit")
    assert fields == 'node="web-1" not_after=1.5 path="/var/lib/x"'


@pytest.mark.usefixtures("restore_logging")
def test_json_lines_are_one_object_each() -> None:
    (line,) = _log_one("json").splitlines()
    doc = json.loads(line)
    assert doc["level"] == "info"
    assert doc["logger"] == "meshtls.audit"
    assert doc["message"] == "audit certificate.issue ab12"
    assert (doc["node"], doc["not_after"], doc["path"]) == ("web-1", 1.5, "/var/lib/x")
    assert doc["time"].endswith("Z")
