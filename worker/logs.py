"""Log lines of the worker and beat: one line per event, structured, never a secret.

Code logs with ``extra={...}`` (``request_id``, ``payment_link_id``, ``state``,
``outcome``...); the formatters here render those fields. On a terminal they read as
text (``... cancel succeeded: cancelled request_id=... payment_link_id=...``); anywhere
else (a file, journald, a container's log driver) each line is one JSON object, so a
log pipeline can filter by ``request_id`` without parsing prose.

Every line passes through :class:`worker.redaction.Redactor` last: a token, the client
secret, a password in a URL, an e-mail address or a phone number never reaches a log,
whichever code wrote it.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, TextIO

from plural_cancel.worker.links import format_timestamp
from plural_cancel.worker.redaction import Redactor

# Attributes every LogRecord has; anything else on a record came from ``extra``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def extras(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a log call passed with ``extra={...}``, in the order given."""
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``message``, the extras, ``exc``."""

    def __init__(self, redactor: Redactor):
        super().__init__()
        self.redactor = redactor

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {"ts": format_timestamp(record.created), "level": record.levelname.lower(),
                                "logger": record.name, "message": record.getMessage()}
        for key, value in extras(record).items():
            line.setdefault(key, value)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        # Every value made a plain string or number (an exception, a datetime...) before
        # the redactor looks at it, so nothing reaches the line unredacted.
        return json.dumps(self.redactor.walk(_plain(line)), separators=(",", ":"), ensure_ascii=False)


def _plain(value: Any) -> Any:
    """``value`` as JSON would hold it: dicts, lists, strings, numbers, booleans, None; anything
    else becomes its ``str`` (as ``json.dumps(default=str)`` would make it)."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


class TextFormatter(logging.Formatter):
    """The usual text line, then the extras as ``key=value``; for people at a terminal."""

    def __init__(self, redactor: Redactor):
        super().__init__(TEXT_FORMAT)
        self.redactor = redactor

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = " ".join(f"{k}={json.dumps(v, default=str) if not isinstance(v, str) else v}"
                          for k, v in extras(record).items() if v is not None)
        if fields:
            head, sep, tail = text.partition("\n")  # keep a traceback below the fields
            text = f"{head} {fields}{sep}{tail}"
        return self.redactor.text(text)


QUIET_CELERY_LOGGERS = ("celery.app.trace", "celery.worker.strategy")
"""Celery loggers that log every task at INFO."""


def configure(redactor: Redactor, level: int | str = logging.INFO, logfile: str | None = None,
              stream: TextIO | None = None) -> logging.Handler:
    """Send every log record of this process to ``logfile`` (or stderr) through one handler.

    JSON unless the stream is a terminal. Replaces the root logger's handlers; returns
    the new handler.
    """
    if logfile:
        handler: logging.Handler = logging.FileHandler(logfile, encoding="utf-8")
        tty = False
    else:
        stream = stream or sys.stderr
        handler = logging.StreamHandler(stream)
        tty = hasattr(stream, "isatty") and stream.isatty()
    handler.setFormatter(TextFormatter(redactor) if tty else JsonFormatter(redactor))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level or logging.INFO)
    # Celery's own "Task ... received" and "... succeeded" lines repeat, without the ids,
    # what our state-change lines say; at INFO they cost as much CPU as the cancel's
    # Redis work (bench/README.md). Their warnings and errors still come through.
    for name in QUIET_CELERY_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))
    return handler
