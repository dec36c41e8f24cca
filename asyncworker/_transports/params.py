"""Connection parameters, and the one place where broker URLs are parsed.

``ConnectionParams`` says where and how to connect; both transports take it,
and ``connect()`` (in ``asyncworker._transports``) picks the transport from
its ``scheme``.  Every broker URL the App, the CLI or a test hands over goes
through ``ConnectionParams.from_url``, and every URL or address that reaches
a log line or an error goes through ``redact_url`` or ``display``: keep it so
when URL parsing grows (several cluster nodes, stricter refusals), so that a
password can never leak through a second parser.

A leaf: it imports only the standard library.
"""

from __future__ import annotations

import re
import ssl as _ssl
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote, urlsplit

__all__ = ["ConnectionParams", "redact_url"]


@dataclass(frozen=True, slots=True)
class ConnectionParams:
    """Where and how to connect.  ``repr`` never shows the password."""

    scheme: str = "amqp"  # "amqp", "amqps" or "memory"
    host: str = "127.0.0.1"
    port: int = 5672
    user: str = "guest"
    password: str = field(default="guest", repr=False)
    vhost: str = "/"
    heartbeat: int = 60
    ssl: _ssl.SSLContext | None = None
    connect_timeout: float = 10.0
    frame_max: int = 131072
    client_name: str = "asyncworker"

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> ConnectionParams:
        """Parse ``amqp://user:pass@host:port/vhost``, ``amqps://...`` or ``memory://name``.

        An empty path means vhost ``/``; ``%2F`` encodes a ``/`` in a vhost name.
        """
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("amqp", "amqps", "memory"):
            raise ValueError(
                f"unsupported URL scheme {parts.scheme!r} in {redact_url(url)!r}: "
                "use amqp://, amqps:// or memory://"
            )
        if scheme == "memory":
            return cls(scheme="memory", host=parts.netloc or "default", port=0, **overrides)
        userinfo = url.partition("://")[2].rpartition("@")[0]
        if any(char in userinfo for char in "/?#"):
            # urlsplit would cut the password there and connect elsewhere.
            raise ValueError(
                f"cannot parse {redact_url(url)!r}: percent-encode '/', '?' and '#' in the "
                "user name and password (as %2F, %3F and %23)"
            )
        try:
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"invalid port in {redact_url(url)!r}") from exc
        values: dict[str, Any] = {
            "scheme": scheme,
            "host": parts.hostname or "127.0.0.1",
            "port": port or (5671 if scheme == "amqps" else 5672),
            "vhost": unquote(parts.path[1:]) if len(parts.path) > 1 else "/",
        }
        if parts.username is not None:
            values["user"] = unquote(parts.username)
        if parts.password is not None:
            values["password"] = unquote(parts.password)
        if scheme == "amqps" and "ssl" not in overrides:
            values["ssl"] = _ssl.create_default_context()
        values.update(overrides)
        return cls(**values)

    @property
    def display(self) -> str:
        """``user@host:port/vhost`` for logs and errors, without the password."""
        if self.scheme == "memory":
            return f"memory://{self.host} vhost {self.vhost!r}"
        return f"{self.scheme}://{self.user}@{self.host}:{self.port} vhost {self.vhost!r}"

    def url(self) -> str:
        """The URL of these parameters, with the password replaced by ``***``."""
        if self.scheme == "memory":
            return f"memory://{self.host}"
        return (
            f"{self.scheme}://{quote(self.user, safe='')}:***@{self.host}:{self.port}/"
            f"{quote(self.vhost, safe='')}"
        )


_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://[^:/@]*):.*@")


def redact_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***``.

    Textual, up to the last ``@``: it also hides a password holding
    characters that should have been percent-encoded (``/``, ``#``, ``?``),
    which a URL parser would split elsewhere.
    """
    return _USERINFO.sub(r"\1:***@", url, count=1)
