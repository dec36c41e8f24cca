"""The memory broker's checks of queue and exchange arguments, with RabbitMQ 3.10's texts.

``queue_settings`` validates the arguments of a new queue (what RabbitMQ
refuses with 406 PRECONDITION_FAILED: a negative TTL, a classic queue with
``x-delivery-limit``, a quorum queue with ``x-max-priority``, ...) and
returns what the model needs; ``check_queue_equivalent`` and
``check_exchange_equivalent`` compare a redeclaration with what exists.  A
refusal is a ``Refusal`` carrying RabbitMQ's reply code and text, which the
channel (``channel.MemoryChannel``) turns into a channel close, as the broker
would.  The texts are RabbitMQ's own, so an error seen in a test reads as it
would in production (``TopologyError`` parses them the same way).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import pamqp.exceptions

__all__ = [
    "EXCHANGE_TYPES",
    "Refusal",
    "check_exchange_equivalent",
    "check_queue_equivalent",
    "queue_settings",
]

PRECONDITION_FAILED: Final[int] = pamqp.exceptions.AMQPPreconditionFailed.value

#: The exchange types the memory broker models (RabbitMQ's built-in ones).
EXCHANGE_TYPES: Final = frozenset({"direct", "fanout", "topic", "headers"})
_OVERFLOW_MODES: Final = frozenset({"drop-head", "reject-publish", "reject-publish-dlx"})
# Queue arguments RabbitMQ compares when a queue is redeclared (others are ignored).
_EQUIVALENCE_ARGS: Final = (
    "x-message-ttl",
    "x-expires",
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-max-length",
    "x-max-length-bytes",
    "x-overflow",
    "x-max-priority",
    "x-queue-mode",
    "x-delivery-limit",
    "x-single-active-consumer",
)
# Arguments a queue type refuses outright (406 "invalid arg ... of queue type ...").
_REFUSED_BY_TYPE: Final = {
    "classic": ("x-delivery-limit",),
    "quorum": ("x-max-priority", "x-queue-mode"),
}
_TYPE_MODULE: Final = {"classic": "rabbit_classic_queue", "quorum": "rabbit_quorum_queue"}


class Refusal(Exception):
    """RabbitMQ would close the channel with ``reply_code`` and ``reply_text``."""

    def __init__(self, reply_text: str, reply_code: int = PRECONDITION_FAILED) -> None:
        super().__init__(reply_text)
        self.reply_code = reply_code
        self.reply_text = reply_text


def _amqp_type(value: Any) -> str:
    """The AMQP field type our codec sends ``value`` as, named as RabbitMQ names it."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "signedint" if -(2**31) <= value < 2**31 else "long"
    if isinstance(value, float):
        return "double"
    if isinstance(value, str):
        return "longstr"
    if isinstance(value, Mapping):
        return "table"
    if isinstance(value, list | tuple):
        return "array"
    return "void" if value is None else type(value).__name__


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _value(value: Any) -> str:
    return "none" if value is None else f"the value '{_shown(value)}' of type '{_amqp_type(value)}'"


def _invalid(name: str, vhost: str, arg: str, why: str, of_type: str | None = None) -> Refusal:
    where = f"for queue '{name}' in vhost '{vhost}'"
    if of_type is not None:
        return Refusal(
            f"PRECONDITION_FAILED - invalid arg '{arg}' {where} of queue type "
            f"{_TYPE_MODULE[of_type]}"
        )
    return Refusal(f"PRECONDITION_FAILED - invalid arg '{arg}' {where}: {why}")


def _integer(
    name: str, vhost: str, args: Mapping[str, Any], arg: str, maximum: int | None = None
) -> int | None:
    value = args.get(arg)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid(name, vhost, arg, f'"expected integer, got {_amqp_type(value)}"')
    if value < 0:
        raise _invalid(name, vhost, arg, f"{{value_negative,{value}}}")
    if maximum is not None and value > maximum:
        raise _invalid(name, vhost, arg, f"{{max_value_exceeded,{value}}}")
    return value


def queue_settings(name: str, vhost: str, args: Mapping[str, Any]) -> dict[str, Any]:
    """The model's settings of a new queue (``model.Queue``'s keywords), or a ``Refusal``."""

    def bad(arg: str, why: str, *, of_type: str | None = None) -> Refusal:
        return _invalid(name, vhost, arg, why, of_type)

    queue_type = args.get("x-queue-type", "classic")
    if queue_type not in ("classic", "quorum"):
        raise bad(
            "x-queue-type",
            f"\"unsupported queue type '{queue_type}'\" (the memory broker models classic and "
            "quorum queues)",
        )
    for arg in _REFUSED_BY_TYPE[queue_type]:
        if arg in args:
            raise bad(arg, "", of_type=queue_type)
    dlx = args.get("x-dead-letter-exchange")
    dlrk = args.get("x-dead-letter-routing-key")
    for arg, value in (("x-dead-letter-exchange", dlx), ("x-dead-letter-routing-key", dlrk)):
        if value is not None and not isinstance(value, str):
            raise bad(arg, f"{{unacceptable_type,{_amqp_type(value)}}}")
    if dlrk is not None and dlx is None:
        raise bad("x-dead-letter-routing-key", "routing_key_but_no_dlx_defined")
    overflow = args.get("x-overflow", "drop-head")
    if overflow not in _OVERFLOW_MODES:
        raise bad("x-overflow", f"{overflow!r} is not one of {sorted(_OVERFLOW_MODES)}")
    single_active = args.get("x-single-active-consumer", False)
    if not isinstance(single_active, bool):
        raise bad("x-single-active-consumer", f"{{unacceptable_type,{_amqp_type(single_active)}}}")
    return {
        "ttl": _integer(name, vhost, args, "x-message-ttl"),
        "dlx": dlx,
        "dlrk": dlrk,
        "max_length": _integer(name, vhost, args, "x-max-length"),
        "overflow": overflow,
        "quorum": queue_type == "quorum",
        "delivery_limit": _integer(name, vhost, args, "x-delivery-limit"),
        "max_priority": _integer(name, vhost, args, "x-max-priority", 255),
        "single_active": single_active,
    }


def check_queue_equivalent(
    name: str,
    vhost: str,
    *,
    durable: bool,
    auto_delete: bool,
    args: Mapping[str, Any],
    current_durable: bool,
    current_auto_delete: bool,
    current_args: Mapping[str, Any],
) -> None:
    """Raise RabbitMQ's 406 ``Refusal`` if a redeclaration differs from the queue that exists."""

    def inequivalent(arg: str, received: str, current: str) -> Refusal:
        return Refusal(
            f"PRECONDITION_FAILED - inequivalent arg '{arg}' for queue '{name}' in vhost "
            f"'{vhost}': received {received} but current is {current}"
        )

    if durable != current_durable:
        raise inequivalent("durable", f"'{_shown(durable)}'", f"'{_shown(current_durable)}'")
    if auto_delete != current_auto_delete:
        raise inequivalent(
            "auto_delete", f"'{_shown(auto_delete)}'", f"'{_shown(current_auto_delete)}'"
        )
    # The queue type is compared as a type (an absent one is "classic").
    received_type = args.get("x-queue-type")
    current_type = current_args.get("x-queue-type")
    if (received_type or "classic") != (current_type or "classic"):
        if received_type is None or current_type is None:
            raise inequivalent("x-queue-type", _value(received_type), _value(current_type))
        raise inequivalent("x-queue-type", f"'{received_type}'", f"'{current_type}'")
    for key in _EQUIVALENCE_ARGS:
        received, current = args.get(key), current_args.get(key)
        if received != current or _amqp_type(received) != _amqp_type(current):
            if (
                received is not None
                and current is not None
                and _amqp_type(received) == _amqp_type(current)
            ):
                raise inequivalent(key, f"'{_shown(received)}'", f"'{_shown(current)}'")
            raise inequivalent(key, _value(received), _value(current))


def check_exchange_equivalent(
    name: str,
    vhost: str,
    received: tuple[str, bool, bool, Mapping[str, Any]],
    current: tuple[str, bool, bool, Mapping[str, Any]],
) -> None:
    """Raise RabbitMQ's 406 ``Refusal`` if an exchange redeclaration differs.

    ``received`` and ``current`` are ``(type, durable, auto_delete,
    arguments)``; of the arguments RabbitMQ compares ``alternate-exchange`` only.
    """
    for arg, new, old in zip(("type", "durable", "auto_delete"), received, current, strict=False):
        if new != old:
            raise Refusal(
                f"PRECONDITION_FAILED - inequivalent arg '{arg}' for exchange '{name}' in vhost "
                f"'{vhost}': received '{_shown(new)}' but current is '{_shown(old)}'"
            )
    new_ae, old_ae = received[3].get("alternate-exchange"), current[3].get("alternate-exchange")
    if new_ae != old_ae:
        raise Refusal(
            f"PRECONDITION_FAILED - inequivalent arg 'alternate-exchange' for exchange '{name}' "
            f"in vhost '{vhost}': received {_value(new_ae)} but current is {_value(old_ae)}"
        )
