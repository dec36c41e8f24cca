"""Health checks and Prometheus metrics over HTTP, inside the App's trio process.

A tiny ASGI application (no framework) served by hypercorn, which runs on
trio natively.  Endpoints:

* ``GET /health/live``: 200 ``{"status": "ok"}`` whenever the event loop
  answers at all (liveness: restart the process if this fails);
* ``GET /health/ready`` and ``GET /health``: 200 when the App is serving,
  every vhost's connection is open and every queue's consumer is registered
  on the broker; otherwise 503 with ``{"status": "unavailable", "reasons":
  [...]}`` saying which connection or queue is down and why (readiness);
* ``GET /metrics``: the App's Prometheus metrics (text format 0.0.4).

Anything else answers 404.  Only GET and HEAD are accepted (405 otherwise).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from prometheus_client import CONTENT_TYPE_LATEST

from ._exceptions import StartupError
from ._settings import parse_http_address
from ._util import only_leaf

if TYPE_CHECKING:
    from ._metrics import AppMetrics
    from ._statistics import AppStatistics

__all__ = ["readiness", "serve_http", "start_http"]

logger = logging.getLogger("asyncworker")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

_JSON = b"application/json"


def readiness(stats: AppStatistics) -> list[str]:
    """Why the App is not ready, or an empty list when it is."""
    reasons: list[str] = []
    if not stats.serving:
        reasons.append("the App is not serving (starting or stopping)")
    for vhost, connected in sorted(stats.connected.items()):
        if not connected:
            reasons.append(f"connection to vhost {vhost!r} is down")
    for consumer in stats.consumers:
        if not consumer.consuming:
            why = consumer.problem or "not registered"
            reasons.append(f"queue {consumer.queue!r} in vhost {consumer.vhost!r}: {why}")
    return reasons


class _HealthApp:
    """The ASGI application."""

    def __init__(self, statistics: Callable[[], AppStatistics], metrics: AppMetrics) -> None:
        self.statistics = statistics
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                event = await receive()
                if event["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif event["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path = scope["path"].rstrip("/") or "/"
        if scope["method"] not in ("GET", "HEAD"):
            await _respond(send, 405, _JSON, b'{"error": "method not allowed"}', scope)
            return
        if path == "/health/live":
            await _respond(send, 200, _JSON, b'{"status": "ok"}', scope)
        elif path in ("/health", "/health/ready"):
            reasons = readiness(self.statistics())
            if reasons:
                body = json.dumps({"status": "unavailable", "reasons": reasons}).encode()
                await _respond(send, 503, _JSON, body, scope)
            else:
                await _respond(send, 200, _JSON, b'{"status": "ok"}', scope)
        elif path == "/metrics":
            await _respond(send, 200, CONTENT_TYPE_LATEST.encode(), self.metrics.render(), scope)
        else:
            await _respond(send, 404, _JSON, b'{"error": "not found"}', scope)


async def _respond(send: Send, status: int, content_type: bytes, body: bytes, scope: Scope) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})


async def start_http(
    nursery: trio.Nursery,
    statistics: Callable[[], AppStatistics],
    metrics: AppMetrics,
    address: str,
) -> str:
    """Start the health/metrics server in ``nursery``; the URL it listens on.

    Raises ``StartupError`` naming the address if it cannot be bound.
    """
    try:
        url: str = await nursery.start(serve_http, statistics, metrics, address)
    except (OSError, BaseExceptionGroup) as exc:
        # hypercorn's nurseries wrap the bind error in groups.
        leaf = only_leaf(exc)
        if not isinstance(leaf, OSError):
            raise
        raise StartupError(
            f"cannot serve health and metrics on {address}: {leaf.strerror or leaf}"
        ) from leaf
    return url


async def serve_http(
    statistics: Callable[[], AppStatistics],
    metrics: AppMetrics,
    address: str,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve health and metrics on ``address`` (``host:port``) until cancelled.

    Reports started with the URL it listens on (useful with port 0).  Raises
    ``OSError`` if the address cannot be bound.
    """
    host, port = parse_http_address(address)
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("asyncworker.http")
    config.graceful_timeout = 1.0

    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(_serve, _HealthApp(statistics, metrics), config)
        url = binds[0] if binds else f"http://{address}"
        logger.info("serving health and metrics on %s", url)
        task_status.started(url)


async def _serve(
    asgi: _HealthApp, config: Config, *, task_status: trio.TaskStatus[list[str]]
) -> None:
    await serve(asgi, config, task_status=task_status)  # type: ignore[arg-type]
