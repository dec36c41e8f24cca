"""Settings an operator sets at deploy time, from ``ASYNCWORKER_*`` environment variables.

The environment only fills in what the code left out: an argument given to
``App(...)`` always wins over the variable.  The one documented exception is
the command line: ``asyncworker run`` treats ``--url`` / ``ASYNCWORKER_URL``
as an override of the App's URL.  Inside ``App`` itself, ``ASYNCWORKER_URL``
applies only when none of ``url``, ``host``, ``port``, ``user`` and
``password`` were given.

An invalid value raises ``ValueError`` naming the variable and what it
accepts.  See docs/operations.md for the table.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping

__all__ = [
    "ENV_GRACE_PERIOD",
    "ENV_HTTP",
    "ENV_LOG_FORMAT",
    "ENV_LOG_LEVEL",
    "ENV_PREFETCH",
    "ENV_URL",
    "grace_period",
    "http_address",
    "log_format",
    "log_level",
    "parse_http_address",
    "prefetch_count",
    "url",
]

ENV_URL = "ASYNCWORKER_URL"
ENV_PREFETCH = "ASYNCWORKER_PREFETCH"
ENV_GRACE_PERIOD = "ASYNCWORKER_GRACE_PERIOD"
ENV_HTTP = "ASYNCWORKER_HTTP"
ENV_LOG_LEVEL = "ASYNCWORKER_LOG_LEVEL"
ENV_LOG_FORMAT = "ASYNCWORKER_LOG_FORMAT"

DEFAULT_PREFETCH = 128
DEFAULT_GRACE_PERIOD = 30.0
LOG_FORMATS = ("text", "json")


def _get(name: str, environ: Mapping[str, str] | None) -> str | None:
    value = (os.environ if environ is None else environ).get(name)
    if value is None or not value.strip():
        return None
    return value.strip()


def url(environ: Mapping[str, str] | None = None) -> str | None:
    """``ASYNCWORKER_URL``, or None when unset."""
    return _get(ENV_URL, environ)


def prefetch_count(given: int | None, environ: Mapping[str, str] | None = None) -> int:
    """``given`` if not None, else ``ASYNCWORKER_PREFETCH``, else 128."""
    if given is not None:
        return given
    raw = _get(ENV_PREFETCH, environ)
    if raw is None:
        return DEFAULT_PREFETCH
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 1 <= value <= 65535:
        raise ValueError(
            f"{ENV_PREFETCH}={raw!r} is not valid: set it to an integer between 1 and 65535 "
            "(messages of one queue delivered and not yet settled), or unset it"
        )
    return value


def grace_period(given: float | None, environ: Mapping[str, str] | None = None) -> float:
    """``given`` if not None, else ``ASYNCWORKER_GRACE_PERIOD``, else 30 seconds."""
    if given is not None:
        return given
    raw = _get(ENV_GRACE_PERIOD, environ)
    if raw is None:
        return DEFAULT_GRACE_PERIOD
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0 or not math.isfinite(value):
        raise ValueError(
            f"{ENV_GRACE_PERIOD}={raw!r} is not valid: set it to a number of seconds >= 0 "
            "(how long in-flight handlers may finish on shutdown), or unset it"
        )
    return value


def parse_http_address(address: str, source: str = "http=") -> tuple[str, int]:
    """Split ``"host:port"`` (``"[::1]:8080"`` for IPv6) into host and port."""
    host, sep, port_text = address.rpartition(":")
    host = host.strip("[]")
    try:
        port = int(port_text)
    except ValueError:
        port = -1
    if not sep or not host or not 0 <= port <= 65535:
        raise ValueError(
            f"{source}{address!r} is not a valid HTTP address: use host:port, "
            "e.g. 127.0.0.1:8080 or 0.0.0.0:9100"
        )
    return host, port


def http_address(given: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """``given`` if not None, else ``ASYNCWORKER_HTTP``, else None (no HTTP server)."""
    if given is not None:
        parse_http_address(given)
        return given
    raw = _get(ENV_HTTP, environ)
    if raw is not None:
        parse_http_address(raw, f"{ENV_HTTP}=")
    return raw


def log_level(environ: Mapping[str, str] | None = None) -> int | None:
    """``ASYNCWORKER_LOG_LEVEL`` as a logging level, or None when unset."""
    raw = _get(ENV_LOG_LEVEL, environ)
    if raw is None:
        return None
    if raw.isdigit():
        return int(raw)
    level = logging.getLevelName(raw.upper())
    if not isinstance(level, int):
        raise ValueError(
            f"{ENV_LOG_LEVEL}={raw!r} is not valid: use DEBUG, INFO, WARNING, ERROR or "
            "CRITICAL (or a number), or unset it"
        )
    return level


def log_format(environ: Mapping[str, str] | None = None) -> str | None:
    """``ASYNCWORKER_LOG_FORMAT`` (``text`` or ``json``), or None when unset."""
    raw = _get(ENV_LOG_FORMAT, environ)
    if raw is None:
        return None
    if raw.lower() not in LOG_FORMATS:
        raise ValueError(
            f"{ENV_LOG_FORMAT}={raw!r} is not valid: use 'text' or 'json', or unset it"
        )
    return raw.lower()
