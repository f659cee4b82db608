"""Logs on stdout: one JSON object per line (production, for collectors) or one readable
line (development), both with the current trace id, and never a URL's password
(app.telemetry.redact)."""

from __future__ import annotations

import json
import logging
import logging.config
import time
from datetime import datetime
from typing import Any

from opentelemetry import trace

from app.telemetry.redact import redact

# Attributes every LogRecord has; anything else came in through `extra=` and is kept, except
# uvicorn's `color_message` (the message again, with ANSI escapes).
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "color_message",
}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {
        key: value
        for key, value in record.__dict__.items()
        if key not in _STANDARD and key[0] != "_"
    }


# One encoder for every line (json.dumps with options builds a new one per call).
_encode = json.JSONEncoder(default=str, ensure_ascii=False).encode
_last_second: tuple[int, str] = (0, "1970-01-01T00:00:00")


def _timestamp(created: float) -> str:
    """RFC 3339 UTC with milliseconds; the text up to the second is reused within it."""
    global _last_second  # noqa: PLW0603 - a one-entry cache, replaced whole (thread-safe)
    second = int(created)
    cached = _last_second
    if cached[0] != second:
        cached = _last_second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    return f"{cached[1]}.{int((created - second) * 1000):03d}+00:00"


def _trace_ids() -> tuple[str, str] | None:
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return format(context.trace_id, "032x"), format(context.span_id, "016x")


# gunicorn and uvicorn log their server's life under `*.error`; it is not an error channel.
_SHOWN_AS = {"gunicorn.error": "gunicorn", "uvicorn.error": "uvicorn"}


def shown_name(logger: str) -> str:
    return _SHOWN_AS.get(logger, logger)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": shown_name(record.name),
            "msg": record.getMessage(),
            "pid": record.process,
        }
        ids = _trace_ids()
        if ids is not None:
            entry["trace_id"], entry["span_id"] = ids
        entry.update(_extras(record))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return redact(_encode(entry))


class ConsoleFormatter(logging.Formatter):
    """`12:00:01.234 INFO  app.db.engine  message  key=value ... trace=<id>`"""

    def format(self, record: logging.LogRecord) -> str:
        moment = datetime.fromtimestamp(record.created).strftime("%H:%M:%S.%f")[:-3]
        name = shown_name(record.name)
        parts = [f"{moment} {record.levelname:<7} {name:<20} {record.getMessage()}"]
        # Each field once: a group of fields (the access line's `http`) is spread out, less
        # the values its message states already (method, route, status).
        stated = record.args if isinstance(record.args, tuple) else ()
        for key, value in _extras(record).items():
            if isinstance(value, dict):
                parts += [f"{k}={v}" for k, v in value.items() if v not in stated]
            else:
                parts.append(f"{key}={value}")
        ids = _trace_ids()
        if ids is not None:
            parts.append(f"trace={ids[0]}")
        line = "  ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return redact(line)


class _DropNoise(logging.Filter):
    """Lines that say nothing to an operator: gunicorn's "Error while closing socket [Errno 9]"
    at every shutdown (the uvicorn worker closed the socket already), and Alembic's setup
    chatter, repeated for every connection it configures."""

    NOISE = ("Error while closing socket [Errno 9]", "Context impl ", "Will assume ")

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.NOISE)


def logging_config(level: str, log_format: str = "json") -> dict[str, Any]:
    """dictConfig for the CLI, gunicorn (`logconfig_dict`) and uvicorn alike."""
    formatter = JsonFormatter if log_format == "json" else ConsoleFormatter
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"main": {"()": formatter}},
        "filters": {"noise": {"()": _DropNoise}},
        "handlers": {
            "stdout": {
                "class": "logging.StreamHandler",
                "formatter": "main",
                # A name, not the object: uvicorn's reloader pickles the configuration.
                "stream": "ext://sys.stdout",
                "filters": ["noise"],
            }
        },
        "root": {"level": level, "handlers": ["stdout"]},
        "loggers": {
            # Our own access log replaces these (it knows the route template and trace id).
            "gunicorn.access": {"level": "WARNING", "handlers": [], "propagate": False},
            "uvicorn.access": {"level": "WARNING", "handlers": [], "propagate": False},
            "gunicorn.error": {"level": level, "handlers": ["stdout"], "propagate": False},
            "uvicorn.error": {"level": level, "handlers": ["stdout"], "propagate": False},
            # Alembic's step-by-step INFO lines are useful in the migration Job; its plugin
            # registrations at import are not.
            "alembic": {"level": "INFO"},
            "alembic.runtime.plugins": {"level": "WARNING"},
        },
    }


def configure_logging(level: str, log_format: str = "json") -> None:
    logging.config.dictConfig(logging_config(level, log_format))
