"""App configuration errors: caught at construction or registration, with a fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

import asyncworker
from asyncworker import App, ConnectError, Message
from asyncworker._transports import Connection, ConnectionParams
from asyncworker._transports.memory import MemoryBroker
from asyncworker._util import install_hint
from asyncworker.middlewares import AckRequeue, Action


async def handler(message: Message) -> None:
    pass


def test_unknown_keyword_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="'prefech_count'; did you mean 'prefetch_count'"):
        App(host="h", user="u", password="p", prefech_count=10)  # type: ignore[call-arg]


@pytest.mark.parametrize("value", [0, -1, 70000])
def test_prefetch_out_of_range_is_a_value_error(value: int) -> None:
    with pytest.raises(ValueError, match="prefetch_count must be between 1 and 65535"):
        App(prefetch_count=value)


def test_prefetch_must_be_an_int() -> None:
    with pytest.raises(TypeError, match="prefetch_count must be an int"):
        App(prefetch_count="10")  # type: ignore[arg-type]


def test_empty_queue_list_is_a_value_error() -> None:
    app = App()
    with pytest.raises(ValueError, match="at least one queue"):
        app.route([])


def test_sync_handler_is_a_type_error() -> None:
    app = App()

    def sync_handler(message: Message) -> None:
        pass

    with pytest.raises(TypeError, match="must be an async function"):
        app.route(["q"])(sync_handler)  # type: ignore[type-var]


def test_a_queue_has_one_route_per_vhost() -> None:
    app = App()
    app.route(["q"])(handler)
    with pytest.raises(ValueError, match="already has a handler"):
        app.route(["q"])(handler)
    app.route(["q"], vhost="other")(handler)  # another vhost is another queue


def test_url_and_host_are_exclusive_and_password_is_never_shown() -> None:
    with pytest.raises(ValueError) as info:
        App(url="amqp://u:topsecret@h/", host="h")
    assert "topsecret" not in str(info.value)
    app = App(url="amqp://u:topsecret@h:1234/v%2Fx")
    assert "topsecret" not in repr(app) and "topsecret" not in app.url
    assert app.url == "amqp://u:***@h:1234/v%2Fx"


def test_unsupported_url_scheme() -> None:
    with pytest.raises(ValueError, match="use amqp://, amqps:// or memory://"):
        App(url="http://h/")


def test_settlement_policy_is_not_a_middleware() -> None:
    with pytest.raises(ValueError, match="settlement=AckRequeue"):
        App(middlewares=[AckRequeue()])


def test_middleware_class_instead_of_instance() -> None:
    class Mw:
        async def __call__(self, message: Message, call_next: object) -> None:
            pass

    with pytest.raises(TypeError, match="pass an instance"):
        App(middlewares=[Mw])  # type: ignore[list-item]


def test_sync_middleware_is_a_type_error() -> None:
    def mw(message: Message, call_next: object) -> None:
        pass

    with pytest.raises(TypeError, match="async callable"):
        App(middlewares=[mw])  # type: ignore[list-item]


def test_a_declared_step_or_publish_hook_of_the_wrong_kind_is_a_type_error() -> None:
    # A middleware may declare steps of its own around the settlement policy or
    # the handler, and a publish hook (Tracing does): they are checked at once.
    class Declares:
        def __init__(self, **declared: object) -> None:
            for name, value in declared.items():
                setattr(self, name, value)

        async def __call__(self, message: Message, call_next: Any) -> None:
            await call_next(message)

    def sync_step(message: Message, call_next: Any) -> None:
        pass

    for name in ("around_settlement", "around_handler"):
        with pytest.raises(TypeError, match=rf"Declares\.{name} must be an async callable"):
            App(url="memory://", middlewares=[Declares(**{name: sync_step})])
    with pytest.raises(TypeError, match=r"Declares\.publish_hook must be a function"):
        App(url="memory://", middlewares=[Declares(publish_hook="not a hook")])


def test_ack_requeue_actions_are_validated() -> None:
    with pytest.raises(TypeError, match="Action"):
        AckRequeue(on_exception="reject")  # type: ignore[arg-type]
    assert AckRequeue(on_exception=Action.REJECT).on_exception is Action.REJECT


async def test_routes_after_serving_started_are_refused() -> None:
    app = App()

    @app.route(["q"])
    async def handler(message: Message) -> None:
        pass

    async with app.test_client():
        with pytest.raises(RuntimeError, match="before serve"):
            app.route(["q2"])


@pytest.mark.parametrize("password", ["se#cret", "se?cret", "se/cret", "a@b"])
def test_a_password_with_special_characters_is_never_shown(password: str) -> None:
    url = f"amqp://user:{password}@broker.example:5672/"
    try:
        app = App(url=url)
    except ValueError as exc:
        assert password not in str(exc)
        assert "percent-encode" in str(exc)
    else:  # '@' is unambiguous: the last one ends the password
        assert password not in repr(app) and password not in app.url
        # The connection is opened with the password as given.
        seen: list[ConnectionParams] = []

        class Refuse:
            """A connector that records its parameters and refuses to connect."""

            def __init__(self, params: ConnectionParams) -> None:
                seen.append(params)

            async def __aenter__(self) -> Connection:
                raise ConnectError("refused by the test")

            async def __aexit__(self, *exc_info: object) -> None:
                return None

        @app.route(["q"])
        async def handler(message: Message) -> None:
            pass

        with app.reconfigured(connector=Refuse), pytest.raises(ConnectError, match="the test"):
            trio.run(app.serve)
        assert [params.password for params in seen] == [password]


def test_http_without_the_http_extra_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.util

    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: object, **kwargs: object) -> object:
        return None if name == "hypercorn" else real_find_spec(name)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(RuntimeError, match="install the 'http' extra") as info:
        App(http="127.0.0.1:8080")
    assert f"({install_hint('http')})" in str(info.value)


def test_the_install_hint_fits_how_asyncworker_was_installed() -> None:
    # From a checkout, "pip install 'asyncworker[http]'" would ask an index
    # for a package of that name: the hint names the checkout instead.
    tree = Path(asyncworker.__file__).resolve().parent.parent
    if (tree / "pyproject.toml").is_file():
        assert install_hint("http") == f"pip install -e '{tree}[http]'"
    else:  # the installed wheel (CI's second run)
        assert install_hint("http") == "pip install 'asyncworker[http]'"


async def test_an_http_address_in_use_is_a_startup_error(mem: MemoryBroker) -> None:
    import socket

    from asyncworker import StartupError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        app = App(url=mem.url, http=f"127.0.0.1:{port}")

        @app.route(["q"], declare=True)
        async def handler(message: Message) -> None:
            pass

        with pytest.raises(StartupError, match=f"127.0.0.1:{port}"):
            await app.serve()


# -- settlement= takes a settlement policy instance, nothing else -------------------------


def test_a_middleware_as_settlement_is_refused() -> None:
    from asyncworker.middlewares import Logging, Retry

    for where in ("App", "route()"):
        for middleware in (Retry(3), Logging()):
            name = type(middleware).__name__
            with pytest.raises(TypeError) as info:
                if where == "App":
                    App(settlement=middleware)
                else:
                    App().route(["q"], settlement=middleware)
            assert f"{name} is a middleware, not a settlement policy: pass it in middlewares=" in (
                str(info.value)
            )


def test_the_settlement_class_is_refused_with_the_instance_to_pass() -> None:
    with pytest.raises(TypeError, match=r"settlement=AckRequeue is the class; pass an instance "):
        App(settlement=AckRequeue)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"pass an instance AckRequeue\(\)"):
        App().route(["q"], settlement=AckRequeue)  # type: ignore[arg-type]


def test_anything_else_as_settlement_is_refused() -> None:
    async def settle(message: Message, call_next: object) -> None:
        pass

    with pytest.raises(TypeError, match="settlement policy"):
        App(settlement=settle)
    with pytest.raises(TypeError, match=r"takes a settlement policy such as AckRequeue\(\)"):
        App(settlement="requeue")  # type: ignore[arg-type]


def test_a_policy_of_ones_own_declares_itself() -> None:
    class Policy:
        is_settlement_policy = True

        async def __call__(self, message: Message, call_next: object) -> None:
            pass

    policy = Policy()
    App(settlement=policy)
    App().route(["q"], settlement=policy)(handler)


# -- "did you mean" -----------------------------------------------------------------------


#: App, for calls with the wrong keywords on purpose (a type checker refuses them).
AnyApp: Any = App


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (lambda: AnyApp(hostname="h"), "'hostname'; did you mean 'host'?"),
        (lambda: AnyApp(username="u"), "'username'; did you mean 'user'?"),
        (lambda: AnyApp(prefetch=3), "'prefetch'; did you mean 'prefetch_count'?"),
        (lambda: AnyApp(vhost="v"), "write the vhost in the URL"),
        (lambda: AnyApp().route(["q"], vhots="v"), "'vhots'; did you mean 'vhost'?"),
        (lambda: AnyApp().route(["q"], bulk_sise=5), "'bulk_sise'; did you mean 'bulk_size'?"),
        (lambda: AnyApp().run_every(5, run_at_startup=True), "did you mean 'run_at_start'?"),
    ],
)
def test_misspelled_keywords_get_a_suggestion(call: object, expected: str) -> None:
    with pytest.raises(TypeError) as info:
        call()  # type: ignore[operator]
    assert expected in str(info.value)


def test_misspelled_middleware_keywords_get_a_suggestion() -> None:
    from asyncworker.middlewares import Logging, Retry, Timeout

    with pytest.raises(TypeError, match="'max_attempt'; did you mean 'max_attempts'"):
        Retry(max_attempt=3)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="'max_retries'; did you mean 'max_attempts'"):
        Retry(max_retries=3)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="'second'; did you mean 'seconds'"):
        Timeout(second=3)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="'log_bodies'; did you mean 'log_body'"):
        Logging(log_bodies=True)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="'on_exeption'; did you mean 'on_exception'"):
        AckRequeue(on_exeption=Action.REJECT)  # type: ignore[call-arg]
    # Right keywords, positional arguments and subclasses with keywords of their own work.

    class Patient(Retry):
        def __init__(self, max_attempts: int = 5, *, patience: float = 1.0) -> None:
            super().__init__(max_attempts)
            self.patience = patience

    assert Retry(max_attempts=2).max_attempts == Retry(2).max_attempts == 2
    assert Patient(3, patience=2.0).patience == 2.0
    assert Timeout(seconds=1.5).seconds == 1.5


def test_logging_takes_standard_level_names() -> None:
    import logging

    from asyncworker.middlewares import Logging

    assert Logging(level="INFO").level == logging.INFO
    assert Logging(level="debug").level == logging.DEBUG
    assert Logging(level="WARN").level == logging.WARNING
    assert Logging(level=logging.ERROR).level == logging.ERROR
    with pytest.raises(ValueError, match="unknown level name; use DEBUG, INFO"):
        Logging(level="LOUD")
