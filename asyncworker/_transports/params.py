"""Connection parameters, and the one place where broker URLs are parsed.

``ConnectionParams`` says where and how to connect; both transports take it,
and ``connect()`` (in ``asyncworker._transports``) picks the transport from
its ``scheme``.  Every broker URL the App, the CLI or a test hands over goes
through ``parse_url`` (``ConnectionParams.from_url`` calls it), and every URL
or address that reaches a log line or an error goes through ``redact_url``
or ``display``: keep it so when URL parsing grows (several cluster nodes:
split the list, then parse each URL here), so that a password can never leak
through a second parser.

The grammar is RabbitMQ's URI spec (``amqp://user:pass@host:port/vhost?query``)
read strictly, because a lenient reading of a typo connects somewhere else:

* the scheme is ``amqp``, ``amqps`` or ``memory``, followed by ``://``;
  ``amqp:/host`` (one slash), ``amqp//host`` (no colon), ``//host`` and
  ``host`` (no scheme) are refused, never read as a default host;
* the user info ends at the *last* ``@`` (``redact_url`` uses the same rule,
  so whatever the parser takes for a password is what is masked); a ``/``,
  ``?`` or ``#`` in it must be percent-encoded, else the URL is refused;
* the vhost is the one path segment (``%2F`` for a ``/`` in its name); an
  empty path means ``/``;
* IPv6 addresses are written in brackets (``amqp://[::1]:5672/``) and shown so;
* the query options of the RabbitMQ URI spec that this client implements are
  honoured (``QUERY_OPTIONS``); any other is refused, never ignored.

Every error is a ``ValueError`` whose message shows the URL with its password
masked.

Imports only the standard library and ``asyncworker._util``.
"""

from __future__ import annotations

import re
import ssl as _ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from .._util import did_you_mean

__all__ = [
    "DEFAULT_CHANNEL_MAX",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_FRAME_MAX",
    "DEFAULT_HEARTBEAT",
    "QUERY_OPTIONS",
    "ConnectionParams",
    "format_host",
    "parse_url",
    "redact_url",
]

SCHEMES = ("amqp", "amqps", "memory")
DEFAULT_HEARTBEAT = 60
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_FRAME_MAX = 131072
DEFAULT_CHANNEL_MAX = 2047
#: The smallest frame_max AMQP 0-9-1 allows (frame-min-size).
MIN_FRAME_MAX = 4096

#: The query options honoured, with what they set (RabbitMQ's "URI query
#: parameters" page).  Left out on purpose: ``auth_mechanism`` other than
#: ``plain`` (this client speaks PLAIN only), the TLS options ``password``
#: (a secret in a URL), ``depth`` and ``fail_if_no_peer_cert`` (server side),
#: and ``server_name_indication`` (pass ``App(ssl=context)`` for that).
QUERY_OPTIONS: Mapping[str, str] = {
    "heartbeat": "heartbeat interval in seconds (0 disables heartbeats)",
    "connection_timeout": "milliseconds to open a connection",
    "channel_max": "the most channels per connection (1..65535)",
    "frame_max": f"the largest frame in bytes ({MIN_FRAME_MAX}..4294967295)",
    "auth_mechanism": "plain (the only mechanism this client speaks)",
    "cacertfile": "amqps:// only: CA certificates to verify the broker with (PEM file)",
    "certfile": "amqps:// only: a client certificate (PEM file)",
    "keyfile": "amqps:// only: the client certificate's key (PEM file)",
    "verify": "amqps:// only: verify_peer (the default) or verify_none",
}
_TLS_OPTIONS = ("cacertfile", "certfile", "keyfile", "verify")


@dataclass(frozen=True, slots=True)
class ConnectionParams:
    """Where and how to connect.  ``repr`` never shows the password."""

    scheme: str = "amqp"  # "amqp", "amqps" or "memory"
    host: str = "127.0.0.1"
    port: int = 5672
    user: str = "guest"
    password: str = field(default="guest", repr=False)
    vhost: str = "/"
    heartbeat: int = DEFAULT_HEARTBEAT
    ssl: _ssl.SSLContext | None = None
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    frame_max: int = DEFAULT_FRAME_MAX
    client_name: str = "asyncworker"
    channel_max: int = DEFAULT_CHANNEL_MAX

    @classmethod
    def from_url(
        cls, url: str, *, defaults: Mapping[str, Any] | None = None, **overrides: Any
    ) -> ConnectionParams:
        """Parse ``amqp://user:pass@host:port/vhost?options``, ``amqps://...`` or ``memory://name``.

        An empty path means vhost ``/``; ``%2F`` encodes a ``/`` in a vhost
        name.  ``defaults`` fill in what the URL leaves out; ``overrides``
        win over what it says.  An ``amqps://`` URL without TLS options (and
        no ``ssl`` from either) verifies the broker with the system's CA
        certificates (``ssl.create_default_context()``).  Raises
        ``ValueError`` (the password masked) for a URL that cannot be read
        unambiguously.  See ``parse_url`` for the rules.
        """
        values = {**(defaults or {}), **parse_url(url), **overrides}
        if values["scheme"] == "amqps" and values.get("ssl") is None:
            values["ssl"] = _ssl.create_default_context()
        return cls(**values)

    @property
    def display(self) -> str:
        """``user@host:port/vhost`` for logs and errors, without the password."""
        if self.scheme == "memory":
            return f"memory://{self.host} vhost {self.vhost!r}"
        return (
            f"{self.scheme}://{self.user}@{format_host(self.host)}:{self.port} vhost {self.vhost!r}"
        )

    @property
    def address(self) -> str:
        """``scheme://user:***@host:port``: the broker, without a vhost or a password."""
        if self.scheme == "memory":
            return f"memory://{self.host}"
        return (
            f"{self.scheme}://{quote(self.user, safe='')}:***@{format_host(self.host)}:{self.port}"
        )

    def url(self) -> str:
        """The URL of these parameters, with the password replaced by ``***``."""
        if self.scheme == "memory" and self.vhost == "/":
            return self.address
        return f"{self.address}/{quote(self.vhost, safe='')}"


def format_host(host: str) -> str:
    """``host`` as written in a URL: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host else host


# -- parsing -------------------------------------------------------------------

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_SCHEME_TYPO = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)(?P<sep>:/?(?!/)|//)")
_CONTROL = re.compile(r"[\x00-\x20\x7f]")


def parse_url(url: str) -> dict[str, Any]:
    """The ``ConnectionParams`` fields that ``url`` gives, as a dict.

    Only what the URL says is in the dict (the scheme, host and port always
    are; the user, password and vhost when written; one key per query
    option), so that a caller can tell what the URL set from what it left
    to the defaults.  Raises ``ValueError`` with the password masked.
    """
    if not isinstance(url, str):
        raise TypeError(f"a broker URL must be a str, got {type(url).__name__}")
    url = url.strip()
    shown = redact_url(url)
    if _CONTROL.search(url):
        raise ValueError(
            f"cannot read {shown!r}: it contains spaces or control characters "
            "(percent-encode them, e.g. %20 for a space)"
        )
    match = _SCHEME.match(url)
    if match is None:
        raise ValueError(_scheme_error(url, shown))
    scheme = match.group(1).lower()
    if scheme not in SCHEMES:
        raise ValueError(
            f"unsupported URL scheme {match.group(1)!r} in {shown!r}: use amqp://, amqps:// "
            "or memory://"
        )
    rest = url[match.end() :]
    if scheme == "memory":
        return _parse_memory(rest, shown)
    userinfo, at, hostpart = rest.rpartition("@")
    if at and any(char in userinfo for char in "/?#"):
        # urlsplit would cut the user info there, take the password for a
        # host or a path, and connect elsewhere.
        raise ValueError(
            f"cannot read {shown!r}: percent-encode '/', '?' and '#' in the user name and "
            "password (as %2F, %3F and %23), and an '@' in the vhost or an option (as %40)"
        )
    try:
        parts = urlsplit("//" + hostpart)
    except ValueError:  # "Invalid IPv6 URL": an unbalanced bracket
        raise ValueError(
            f"cannot read the host of {shown!r}: write an IPv6 address in brackets, "
            "e.g. amqp://[::1]:5672/"
        ) from None
    if parts.fragment or hostpart.endswith("#"):
        raise ValueError(f"cannot read {shown!r}: a broker URL has no #fragment")
    values: dict[str, Any] = {"scheme": scheme, "host": _host(parts.netloc, shown)}
    values["port"] = _port(parts.netloc, scheme, shown)
    if at:
        user, colon, password = userinfo.partition(":")
        values["user"] = unquote(user)
        if colon:
            values["password"] = unquote(password)
    if parts.path not in ("", "/"):
        values["vhost"] = _vhost(parts.path, shown)
    values.update(_query(parts.query, scheme, shown))
    return values


def _scheme_error(url: str, shown: str) -> str:
    typo = _SCHEME_TYPO.match(url)
    if typo is not None and typo.group("scheme").lower() in SCHEMES:
        scheme = typo.group("scheme").lower()
        if typo.group("sep") == "//":
            what = f"a ':' is missing after {typo.group('scheme')!r}"
        else:
            what = f"{typo.group('scheme')}{typo.group('sep')} needs two slashes"
        return f"cannot read {shown!r}: {what}; write {scheme}://user:password@host:port/vhost"
    return (
        f"cannot read {shown!r}: no scheme; start the URL with amqp:// (or amqps:// for "
        "TLS), e.g. amqp://user:password@host:5672/vhost"
    )


def _parse_memory(rest: str, shown: str) -> dict[str, Any]:
    if "@" in rest:
        raise ValueError(f"cannot read {shown!r}: a memory:// URL takes no user or password")
    name, slash, path = rest.partition("/")
    path, question, _query_text = path.partition("?")
    if "?" in name or question:
        raise ValueError(
            f"cannot read {shown!r}: a memory:// URL takes no query options "
            "(the in-memory broker has no heartbeats, timeouts or TLS)"
        )
    values: dict[str, Any] = {"scheme": "memory", "host": unquote(name) or "default", "port": 0}
    if slash and path:
        values["vhost"] = _vhost("/" + path, shown)
    return values


def _host(netloc: str, shown: str) -> str:
    hostport = netloc.rpartition("@")[2]
    if hostport.startswith("["):
        host, bracket, tail = hostport[1:].partition("]")
        if not bracket or (tail and not tail.startswith(":")) or ":" not in host:
            raise ValueError(
                f"cannot read the host of {shown!r}: write an IPv6 address in brackets, "
                "e.g. amqp://[::1]:5672/"
            )
        return host
    if hostport.count(":") > 1:
        raise ValueError(
            f"cannot read the host of {shown!r}: write an IPv6 address in brackets, "
            "e.g. amqp://[::1]:5672/"
        )
    host = unquote(hostport.partition(":")[0])
    if not host:
        # RabbitMQ's URI spec: an empty host is the default host.
        return "127.0.0.1"
    if not re.fullmatch(r"[A-Za-z0-9._-]+", host):
        raise ValueError(
            f"cannot read the host of {shown!r}: a host name has letters, digits, '.', '-' "
            "and '_' only"
        )
    return host


def _port(netloc: str, scheme: str, shown: str) -> int:
    hostport = netloc.rpartition("@")[2]
    if hostport.startswith("["):
        hostport = hostport.partition("]")[2]
    _host_text, colon, text = hostport.rpartition(":")
    if not colon or text == "":
        return 5671 if scheme == "amqps" else 5672
    # The port is not echoed: after a forgotten '@' it is the password.
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(
            f"invalid port in {shown!r}: expected a number between 1 and 65535 "
            "(amqp://user:password@host:5672/vhost)"
        )
    return int(text)


def _vhost(path: str, shown: str) -> str:
    segment = path[1:]
    if "/" in segment:
        raise ValueError(
            f"cannot read the vhost of {shown!r}: the vhost is one path segment; write a '/' "
            "in its name as %2F (amqp://host/a%2Fb for vhost 'a/b'), and no trailing '/'"
        )
    return unquote(segment)


def _query(query: str, scheme: str, shown: str) -> dict[str, Any]:
    """The ``ConnectionParams`` fields the query options set (see ``QUERY_OPTIONS``)."""
    if not query:
        return {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise ValueError(
            f"cannot read the query of {shown!r}: write options as ?name=value&name=value"
        ) from None
    options: dict[str, str] = {}
    for name, value in pairs:
        if name not in QUERY_OPTIONS:
            raise ValueError(
                f"unknown URL option {name!r} in {shown!r}{did_you_mean(name, QUERY_OPTIONS)}; "
                f"the options are {', '.join(QUERY_OPTIONS)}"
            )
        if name in options:
            raise ValueError(f"URL option {name!r} is given twice in {shown!r}")
        options[name] = value
    values: dict[str, Any] = {}
    if "heartbeat" in options:
        values["heartbeat"] = _int_option(options, "heartbeat", 0, 65535, shown)
    if "connection_timeout" in options:
        milliseconds = _int_option(options, "connection_timeout", 1, 2**31 - 1, shown)
        values["connect_timeout"] = milliseconds / 1000
    if "channel_max" in options:
        values["channel_max"] = _int_option(options, "channel_max", 1, 65535, shown)
    if "frame_max" in options:
        values["frame_max"] = _int_option(options, "frame_max", MIN_FRAME_MAX, 2**32 - 1, shown)
    if "auth_mechanism" in options and options["auth_mechanism"].lower() != "plain":
        raise ValueError(
            f"URL option auth_mechanism={options['auth_mechanism']!r} in {shown!r} is not "
            "supported: this client authenticates with PLAIN only (auth_mechanism=plain)"
        )
    tls = {name: options[name] for name in _TLS_OPTIONS if name in options}
    if tls:
        if scheme != "amqps":
            raise ValueError(
                f"URL options {', '.join(tls)} in {shown!r} set up TLS: use an amqps:// URL"
            )
        values["ssl"] = _tls_context(tls, shown)
    return values


def _int_option(options: Mapping[str, str], name: str, low: int, high: int, shown: str) -> int:
    text = options[name]
    if not text.isdigit() or not low <= int(text) <= high:
        raise ValueError(
            f"URL option {name}={text!r} in {shown!r} is not valid: expected a whole number "
            f"between {low} and {high}: {QUERY_OPTIONS[name]}"
        )
    return int(text)


def _tls_context(tls: Mapping[str, str], shown: str) -> _ssl.SSLContext:
    """The ``SSLContext`` the TLS query options describe (verifying by default)."""
    verify = tls.get("verify", "verify_peer")
    if verify not in ("verify_peer", "verify_none"):
        raise ValueError(
            f"URL option verify={verify!r} in {shown!r} is not valid: use verify_peer (check "
            "the broker's certificate, the default) or verify_none"
        )
    if "keyfile" in tls and "certfile" not in tls:
        raise ValueError(f"URL option keyfile in {shown!r} needs certfile (the certificate)")
    try:
        context = _ssl.create_default_context(cafile=tls.get("cacertfile") or None)
        if "certfile" in tls:
            context.load_cert_chain(tls["certfile"], tls.get("keyfile") or None)
    except (OSError, _ssl.SSLError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ValueError(f"cannot load the TLS files of {shown!r}: {reason}") from None
    if verify == "verify_none":
        context.check_hostname = False
        context.verify_mode = _ssl.CERT_NONE
    return context


# -- redaction -----------------------------------------------------------------

#: Where the user info can start: after "scheme:" and its slashes (one, two, or
#: a typo's count), or at the very start when the scheme is missing or mistyped.
_PREFIX = re.compile(r"^(?:[A-Za-z][A-Za-z0-9+.-]*:(?=/))?/*")


def redact_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***``.

    Textual, and with the parser's own rule: the user info ends at the last
    ``@``, and the password is what follows its first ``:``.  So it also
    hides a password holding characters that should have been
    percent-encoded, a password after a typo in the scheme (``amqps//``,
    ``amqp:/``, no scheme at all), and, with no ``@`` at all, whatever
    follows a ``:`` that cannot be a port (``amqp://user:secret``).
    """
    prefix = _PREFIX.match(url)
    start = prefix.end() if prefix is not None else 0
    lead, rest = url[:start], url[start:]
    head, at, tail = rest.rpartition("@")
    if at:
        user, colon, _password = head.partition(":")
        return f"{lead}{user}:***@{tail}" if colon else url
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    after = authority.partition("]")[2] if authority.startswith("[") else authority
    port = after.partition(":")[2]
    if port and not port.isdigit():
        keep = authority[: len(authority) - len(port)]
        return f"{lead}{keep}***{rest[len(authority) :]}"
    return url
