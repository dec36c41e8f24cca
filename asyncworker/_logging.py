"""Log output: plain text or one JSON object per line.

asyncworker logs through the standard ``logging`` module, under the logger
``"asyncworker"``; it never configures logging when used as a library.
``JsonFormatter`` adds the ids of the OpenTelemetry span active when a record
was formatted, if OpenTelemetry is loaded at all (it never imports it).
``App.run()`` calls ``configure_logging()`` so that a worker started from the
command line logs something sensible: text by default, JSON with
``ASYNCWORKER_LOG_FORMAT=json``, at the level ``ASYNCWORKER_LOG_LEVEL`` says.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Any

from . import _settings

__all__ = ["JsonFormatter", "configure_logging"]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# The attributes every LogRecord has; anything else was passed as ``extra``.
_STANDARD = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys()
    | {"message", "asctime", "taskName"}
)


class JsonFormatter(logging.Formatter):
    """Format each record as one JSON object on one line.

    Keys: ``time`` (ISO 8601, UTC), ``level``, ``logger``, ``message``, then
    every ``extra`` field of the record (such as the ``queue``, ``outcome`` and
    ``duration_ms`` of the ``Logging`` middleware), ``trace_id`` and
    ``span_id`` (lowercase hex, as W3C ``traceparent`` writes them) when an
    OpenTelemetry span is active (a handler's, under the ``Tracing``
    middleware), and ``exception`` (the formatted traceback) when there is
    one.  Values JSON cannot encode are written as their ``str()``.

    The span is the one current in the thread that formats the record: a
    handler that passes records to another thread (``QueueHandler``) should
    format them before, or set the ids as ``extra`` fields itself.
    """

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                data[key] = value
        # Only if the application loaded OpenTelemetry: a lookup, never an import.
        otel_trace = sys.modules.get("opentelemetry.trace")
        if otel_trace is not None:
            span = otel_trace.get_current_span().get_span_context()
            if span.is_valid:
                data["trace_id"] = format(span.trace_id, "032x")
                data["span_id"] = format(span.span_id, "016x")
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            data["exception"] = record.exc_text
        if record.stack_info:
            data["stack"] = self.formatStack(record.stack_info)
        return json.dumps(data, default=str, ensure_ascii=False)


#: The handler configure_logging() installed, replaced on a second call.
_installed: logging.Handler | None = None


def configure_logging(level: int | str | None = None, format: str | None = None) -> None:
    """Send log records to stderr as text or JSON, at ``level``.

    ``level`` and ``format`` (``"text"`` or ``"json"``) default to
    ``ASYNCWORKER_LOG_LEVEL`` and ``ASYNCWORKER_LOG_FORMAT``, then to INFO and
    text.  If the root logger already has handlers that this function did not
    install (the application configured logging itself), they are kept: a
    requested format is set on them, and nothing else changes unless a level
    is requested.
    """
    global _installed
    env_level = _settings.log_level()
    env_format = _settings.log_format()
    if format is not None and format not in _settings.LOG_FORMATS:
        raise ValueError(f"log format must be 'text' or 'json', got {format!r}")
    root = logging.getLogger()
    foreign = [handler for handler in root.handlers if handler is not _installed]
    wanted_level = level if level is not None else env_level
    wanted_format = format if format is not None else env_format
    if foreign and wanted_level is None and wanted_format is None:
        return
    formatter = JsonFormatter() if wanted_format == "json" else logging.Formatter(TEXT_FORMAT)
    if foreign:
        if wanted_format is not None:
            # The application's handlers stay; they take the requested format.
            for handler in foreign:
                handler.setFormatter(formatter)
    else:
        installed = logging.StreamHandler(sys.stderr)
        installed.setFormatter(formatter)
        if _installed is not None:
            root.removeHandler(_installed)
        root.addHandler(installed)
        _installed = installed
    root.setLevel(wanted_level if wanted_level is not None else logging.INFO)
