"""Broker URLs: the one strict parser, its query options, TLS, and no password ever shown."""

from __future__ import annotations

import ssl
import subprocess
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest
import trio

from asyncworker import App, ChannelClosed
from asyncworker._transports import Connection, ConnectionParams, connect, redact_url
from asyncworker._transports.amqp.connection import AMQPConnection
from asyncworker._transports.params import parse_url

from .conftest import BROKER_HOST, BROKER_PORT

SECRET = "s3cr3tpw"


# -- typos are refused, and the password is never echoed -------------------------------


@pytest.mark.parametrize(
    ("url", "says"),
    [
        (f"user:{SECRET}@rabbit/", "no scheme"),
        (f"//user:{SECRET}@rabbit/", "no scheme"),
        (f"amqps//user:{SECRET}@rabbit/", "a ':' is missing after 'amqps'"),
        (f"amqp:/user:{SECRET}@rabbit/", "amqp:/ needs two slashes"),
        (f"amqp:user:{SECRET}@rabbit/", "needs two slashes"),
        (f"amqp://us/er:{SECRET}@rabbit/", "percent-encode '/'"),
        (f"amqp://user:{SECRET}", "invalid port"),  # '@host' forgotten
        (f"amqp://user:pa/{SECRET}@rabbit/", "percent-encode '/'"),
        (f"amqp://user:pa#{SECRET}@rabbit/", "percent-encode"),
        (f"amqp://user:{SECRET}@rabbit:56x2/", "invalid port"),
        (f"amqp://user:{SECRET}@rabbit:0/", "invalid port"),
        (f"amqp://user:{SECRET}@rabbit/a/b", "one path segment"),
        (f"amqp://user:{SECRET}@::1/", "IPv6 address in brackets"),
        (f"amqp://user:{SECRET}@[::1/", "IPv6 address in brackets"),
        (f"amqp://user:{SECRET}@rab bit/", "spaces or control characters"),
        (f"amqp://user:{SECRET}@rabbit/?heartbeet=5", "did you mean 'heartbeat'"),
        (f"http://user:{SECRET}@rabbit/", "use amqp://, amqps:// or memory://"),
    ],
)
def test_a_url_typo_is_refused_and_the_password_masked(url: str, says: str) -> None:
    with pytest.raises(ValueError) as info:
        ConnectionParams.from_url(url)
    message = str(info.value)
    assert says in message
    assert SECRET not in message
    assert SECRET not in redact_url(url)
    # The same through App(url=...) and App.reconfigured(url=...) (--url, ASYNCWORKER_URL).
    with pytest.raises(ValueError) as info:
        App(url=url)
    assert SECRET not in str(info.value)
    with pytest.raises(ValueError) as info, App().reconfigured(url=url):
        pass
    assert SECRET not in str(info.value)


def test_one_slash_is_not_read_as_the_default_host() -> None:
    # It used to connect to 127.0.0.1 as guest, with "user:pw@host" as the vhost.
    with pytest.raises(ValueError, match="needs two slashes"):
        App(url=f"amqp:/worker:{SECRET}@rabbit.example/")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("amqp://", {"scheme": "amqp", "host": "127.0.0.1", "port": 5672}),
        ("amqps://h", {"scheme": "amqps", "host": "h", "port": 5671}),
        ("AMQP://h:1/", {"scheme": "amqp", "host": "h", "port": 1}),
        (
            "amqp://u%2F1:p%40w@h:5673/v%2Fx",
            {"scheme": "amqp", "host": "h", "port": 5673, "user": "u/1", "password": "p@w"},
        ),
        ("amqp://u:p@ss@h/", {"scheme": "amqp", "host": "h", "port": 5672, "password": "p@ss"}),
        ("amqp://[::1]:5673/", {"scheme": "amqp", "host": "::1", "port": 5673}),
        ("amqp://h/%2F", {"scheme": "amqp", "host": "h", "vhost": "/"}),
        ("amqp://h/prod", {"vhost": "prod"}),
        ("memory://", {"scheme": "memory", "host": "default", "port": 0}),
        ("memory://b/v%2F1", {"scheme": "memory", "host": "b", "vhost": "v/1"}),
    ],
)
def test_well_formed_urls(url: str, expected: dict[str, object]) -> None:
    given = parse_url(url)
    assert {key: given.get(key) for key in expected} == expected


def test_an_ipv6_host_is_shown_in_brackets() -> None:
    params = ConnectionParams.from_url("amqp://u:pw@[fe80::1]:5673/v")
    assert params.display == "amqp://u@[fe80::1]:5673 vhost 'v'"
    assert params.url() == "amqp://u:***@[fe80::1]:5673/v"
    assert App(url="amqp://u:pw@[::1]/").url == "amqp://u:***@[::1]:5672/%2F"


# -- query options ---------------------------------------------------------------------


def test_query_options_are_honoured() -> None:
    params = ConnectionParams.from_url(
        "amqp://h/?heartbeat=5&connection_timeout=2500&channel_max=16&frame_max=8192"
        "&auth_mechanism=PLAIN"
    )
    assert (params.heartbeat, params.connect_timeout) == (5, 2.5)
    assert (params.channel_max, params.frame_max) == (16, 8192)
    # Without options, the defaults.
    default = ConnectionParams.from_url("amqp://h/")
    assert (default.heartbeat, default.connect_timeout) == (60, 10.0)
    assert (default.channel_max, default.frame_max) == (2047, 131072)


@pytest.mark.parametrize(
    ("query", "says"),
    [
        ("heartbeat=5&heartbeat=6", "given twice"),
        ("heartbeat=-1", "heartbeat='-1' in"),
        ("heartbeat=", "expected a whole number between 0 and 65535"),
        ("frame_max=100", "between 4096 and"),
        ("channel_max=0", "between 1 and 65535"),
        ("connection_timeout=1.5", "whole number"),
        ("auth_mechanism=external", "PLAIN only"),
        ("verify=verify_none", "use an amqps:// URL"),
        ("heartbeat", "name=value"),
        ("server_name_indication=h", "unknown URL option 'server_name_indication'"),
        ("timeout=5", "the options are heartbeat, connection_timeout"),
    ],
)
def test_a_bad_or_unknown_query_option_is_refused(query: str, says: str) -> None:
    with pytest.raises(ValueError) as info:
        ConnectionParams.from_url(f"amqp://user:{SECRET}@h/?{query}")
    assert says in str(info.value)
    assert SECRET not in str(info.value)


def test_memory_urls_take_no_query_options() -> None:
    with pytest.raises(ValueError, match="takes no query options"):
        ConnectionParams.from_url("memory://x?heartbeat=5")


def test_the_url_and_the_arguments_must_agree() -> None:
    app = App(url="amqp://h/?heartbeat=5", heartbeat=5)
    assert "heartbeat=5" not in app.url  # the URL shown is where, not how
    with pytest.raises(ValueError, match=r"heartbeat=10 and the URL's \?heartbeat=5 disagree"):
        App(url="amqp://h/?heartbeat=5", heartbeat=10)
    with pytest.raises(ValueError, match=r"connection_timeout=2000 disagree"):
        App(url="amqp://h/?connection_timeout=2000", connect_timeout=3)


class Recorded(Exception):
    """What the recording connector raises instead of connecting."""


def params_used(app: App, url: str | None = None) -> ConnectionParams:
    """The parameters ``app`` connects with (on ``url``, as ``--url`` gives it), unconnected."""
    seen: list[ConnectionParams] = []

    def record(params: ConnectionParams) -> AbstractAsyncContextManager[Connection]:
        seen.append(params)
        raise Recorded

    with app.reconfigured(url=url, connector=record), pytest.raises(BaseException) as info:
        trio.run(app.declare_queue, "q")
    assert (
        info.group_contains(Recorded)
        if isinstance(info.value, BaseExceptionGroup)
        else (isinstance(info.value, Recorded))
    ), info.value
    return seen[-1]


def test_an_override_url_keeps_the_apps_settings_unless_its_options_say_otherwise() -> None:
    app = App(url="amqp://h/", heartbeat=7, connect_timeout=3, name="billing")
    used = [params_used(app, url) for url in ("amqp://other/", "amqp://other/?heartbeat=2")]
    assert [(p.host, p.heartbeat, p.connect_timeout, p.client_name) for p in used] == [
        ("other", 7, 3, "billing"),
        ("other", 2, 3, "billing"),
    ]


@pytest.mark.rabbitmq
async def test_query_options_reach_the_broker() -> None:
    url = (
        f"amqp://guest:guest@{BROKER_HOST}:{BROKER_PORT}/"
        "?heartbeat=7&frame_max=8192&channel_max=3&connection_timeout=5000"
    )
    params = ConnectionParams.from_url(url)
    async with connect(params) as connection:
        # What the connection negotiated with RabbitMQ (tune-ok).
        assert isinstance(connection, AMQPConnection)
        assert connection.heartbeat == 7
        assert connection.frame_max == 8192
        channels = [await connection.channel() for _ in range(3)]
        with pytest.raises(ChannelClosed, match="channel_max is 3"):
            await connection.channel()
        for channel in channels:
            await channel.close()


# -- TLS -----------------------------------------------------------------------------------


def test_ssl_with_a_plain_url_is_refused() -> None:
    with pytest.raises(ValueError, match="plain amqp://: write amqps://"):
        App(url="amqp://h/", ssl=True)
    context = ssl.create_default_context()
    with pytest.raises(ValueError, match="either as ssl= or as options"):
        App(url="amqps://h/?verify=verify_none", ssl=context)


def test_tls_query_options_build_the_context(tmp_path: Path) -> None:
    params = ConnectionParams.from_url("amqps://h/?verify=verify_none")
    assert params.ssl is not None and params.ssl.verify_mode == ssl.CERT_NONE
    assert not params.ssl.check_hostname
    default = ConnectionParams.from_url("amqps://h/")
    assert default.ssl is not None and default.ssl.verify_mode == ssl.CERT_REQUIRED
    assert default.ssl.check_hostname
    with pytest.raises(ValueError, match="cannot load the TLS files"):
        ConnectionParams.from_url(f"amqps://h/?cacertfile={tmp_path}/missing.pem")
    with pytest.raises(ValueError, match=r"keyfile .* needs certfile"):
        ConnectionParams.from_url(f"amqps://h/?keyfile={tmp_path}/key.pem")


def test_an_override_url_and_tls() -> None:
    context = ssl.create_default_context()
    context.minimum_version = ssl.TLSVersion.TLSv1_3  # tell it apart from a default one
    app = App(host="rabbit", ssl=context)
    # amqps:// keeps the App's context.
    assert params_used(app, "amqps://other/").ssl is context
    # amqp:// is refused: the credentials would go in clear.
    refused = "is plain amqp://, and this App connects with TLS"
    with pytest.raises(ValueError, match=refused), app.reconfigured(url=f"amqp://u:{SECRET}@o/"):
        pass
    # An App without TLS given an amqps:// URL verifies with the default context.
    used = params_used(App(host="rabbit"), "amqps://other/")
    assert used.ssl is not None and used.ssl.verify_mode == ssl.CERT_REQUIRED
    assert used.ssl.check_hostname


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key (with the openssl command)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key
