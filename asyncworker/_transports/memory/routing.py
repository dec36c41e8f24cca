"""How the memory broker's exchanges match a message against a binding, as RabbitMQ 3.10 does.

Pure functions, used by ``model.Exchange``: topic patterns (``*`` one word,
``#`` zero or more) and headers bindings (``x-match`` ``all``/``any`` and
RabbitMQ's ``all-with-x``/``any-with-x``), plus the check RabbitMQ runs on a
headers binding's ``x-match`` when it is bound.  Nothing here knows a queue,
an exchange or a channel.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

__all__ = ["X_MATCH_MODES", "check_x_match", "headers_match", "topic_matches", "words"]

#: The values RabbitMQ accepts for a headers binding's ``x-match`` (default ``all``).
X_MATCH_MODES: Final = ("all", "any", "all-with-x", "any-with-x")


def words(key: str) -> list[str]:
    """A routing key's words. RabbitMQ reads the empty key as zero words,
    so ``*`` does not match it but ``#`` does."""
    return key.split(".") if key else []


def topic_matches(pattern: tuple[str, ...], key_words: list[str], i: int = 0, j: int = 0) -> bool:
    """Whether the words of a routing key match a topic binding pattern."""
    np_, nw = len(pattern), len(key_words)
    while i < np_:
        token = pattern[i]
        if token == "#":
            while i + 1 < np_ and pattern[i + 1] == "#":
                i += 1
            if i + 1 == np_:
                return True
            return any(topic_matches(pattern, key_words, i + 1, k) for k in range(j, nw + 1))
        if j == nw or (token != "*" and token != key_words[j]):
            return False
        i += 1
        j += 1
    return j == nw


def check_x_match(arguments: Mapping[str, Any]) -> str | None:
    """RabbitMQ's 406 text for a headers binding with an invalid ``x-match``, or None."""
    mode = arguments.get("x-match")
    if mode is None or (isinstance(mode, str) and mode in X_MATCH_MODES):
        return None
    shown = mode if isinstance(mode, str) else repr(mode)
    return (
        f'PRECONDITION_FAILED - Invalid x-match field value <<"{shown}">>; expected all, '
        "any, all-with-x, or any-with-x"
    )


def headers_match(binding: Mapping[str, Any], headers: Mapping[str, Any] | None) -> bool:
    """Whether a message's headers match a headers-exchange binding's arguments.

    As RabbitMQ's ``rabbit_exchange_type_headers``: ``x-match`` ``all``
    (the default) needs every binding argument present in the headers with
    an equal value, ``any`` at least one; an argument without a value (AMQP
    void, None here) only needs the header to be present.  Binding arguments
    whose name starts with ``x-`` are left out of the comparison, except in
    the ``all-with-x`` and ``any-with-x`` modes (``x-match`` itself always
    is).  A binding with nothing to compare matches every message under
    ``all`` and none under ``any``.
    """
    mode = binding.get("x-match", "all")
    if not isinstance(mode, str) or mode not in X_MATCH_MODES:
        mode = "all"  # as RabbitMQ reads a value it did not validate (bound before 3.x)
    every = mode.startswith("all")
    with_x = mode.endswith("-with-x")
    data = headers or {}
    matched = False
    for key, expected in binding.items():
        if key == "x-match" or (key.startswith("x-") and not with_x):
            continue
        if key not in data:
            if every:
                return False
            continue
        if expected is None or _same(expected, data[key]):
            if not every:
                return True
            matched = True
        elif every:
            return False
    return True if every else matched


def _same(a: Any, b: Any) -> bool:
    # Erlang's ==: numbers compare by value (1 == 1.0), but a boolean is an
    # atom and never equals a number (Python's True == 1 would).
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a is b
    return bool(a == b)
