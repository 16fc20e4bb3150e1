"""The JSON command/ack protocol (docs/PROTOCOL.md): its constants, its schemas, and a
reference device written in Python.

`JsonDevice` is the device side as docs/PROTOCOL.md specifies it, check for check in
the same order as the C reference (`firmware_bridge/device/esl_device.c`); the tests
hold the two against each other and against the JSON schemas in `schemas/`. The
simulator (`firmware_bridge.simulator`) puts one `JsonDevice` per registry device on
MQTT.

Not here: MQTT itself (the simulator and the bridge), and any validation library at
run time (the schemas are checked with `jsonschema` in the tests only; the bridge and
this module check by hand).
"""

from __future__ import annotations

import json
import math
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

from edgeslm.intent.registry import Device

PROTOCOL_VERSION = 1
SCHEMAS = Path(__file__).with_name("schemas")

ACTIONS = ("on", "off", "open", "close", "brightness", "position", "temperature")
VALUE_ACTIONS = ("brightness", "position", "temperature")
PERCENT_ACTIONS = ("brightness", "position")
ACK_STATUSES = ("ok", "duplicate", "invalid", "expired", "unsupported", "error")

COMMAND_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # use with fullmatch
MAX_DEPTH = 8  # deepest nesting a device accepts (the top object counts as 1)
SEEN_IDS = 32  # command ids a device remembers, as ESL_DEV_SEEN in the C reference
_FIELDS = ("v", "id", "device", "action", "value", "expires", "reply_to")
_MAX_WHOLE = 2**53 - 1  # the largest integer JSON carries exactly

# What the device does with each action: capability and the state it sets.
_CAPABILITY = {
    "on": "on_off",
    "off": "on_off",
    "open": "open_close",
    "close": "open_close",
    "brightness": "brightness",
    "position": "position",
    "temperature": "temperature",
}


def load_schema(name: str) -> dict[str, Any]:
    """The JSON schema `name` ("command" or "ack") shipped in `schemas/`."""
    return json.loads((SCHEMAS / f"{name}.schema.json").read_text(encoding="utf-8"))


class _NotJson(ValueError):
    pass


class _Pairs(dict):
    """A decoded object that remembers which keys it saw twice."""

    repeated: frozenset[str] = frozenset()


def _pairs(items: list[tuple[str, Any]]) -> _Pairs:
    """Keep the first of repeated keys, as the C reference does, and note them."""
    out = _Pairs()
    repeated = set()
    for key, value in items:
        if key in out:
            repeated.add(key)
        else:
            out[key] = value
    out.repeated = frozenset(repeated)
    return out


def _number(text: str) -> float:
    """A JSON number as the C reference reads it: a double, NaN when not finite."""
    value = float(text)
    return value if math.isfinite(value) else math.nan


def _refuse_constant(name: str) -> None:
    raise _NotJson(f"{name} is not JSON")


def _check_tree(value: Any, depth: int) -> None:
    """Nesting within MAX_DEPTH, and every string encodable as UTF-8."""
    if isinstance(value, str):
        value.encode("utf-8")  # a lone surrogate raises UnicodeEncodeError
    elif isinstance(value, (dict, list)):
        if depth > MAX_DEPTH:
            raise _NotJson(f"nested deeper than {MAX_DEPTH}")
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            _check_tree(key, depth)
            _check_tree(item, depth + 1)


def decode_command(payload: bytes) -> dict[str, Any]:
    """Strictly decode a command payload the way the C reference does.

    Raises:
        ValueError: not one well-formed JSON object in UTF-8 (NaN and Infinity,
            lone surrogates and nesting deeper than MAX_DEPTH count as malformed).
    """
    try:
        data = json.loads(
            payload.decode("utf-8"),
            object_pairs_hook=_pairs,
            parse_float=_number,
            parse_int=_number,
            parse_constant=_refuse_constant,
        )
        if not isinstance(data, dict):
            raise _NotJson("not an object")
        _check_tree(data, 1)
    except (UnicodeError, json.JSONDecodeError, _NotJson, RecursionError) as exc:
        raise ValueError(f"not one well-formed JSON object: {exc}") from None
    return data


def _whole(value: Any) -> bool:
    """A JSON integer as the C reference reads it: a whole double, |x| <= 2^53 - 1."""
    if isinstance(value, bool) or not isinstance(value, float):
        return False
    return (
        math.isfinite(value) and value == math.floor(value) and abs(value) <= _MAX_WHOLE
    )


def _text(value: Any, max_bytes: int) -> bool:
    return (
        isinstance(value, str)
        and 0 < len(value.encode("utf-8")) <= max_bytes
        and "\0" not in value
    )


def check_command(data: dict[str, Any]) -> str:
    """The protocol's checks on a decoded command, before any device is involved.

    Returns:
        "ok", or the first failure in the order docs/PROTOCOL.md gives: "no_id",
        "field", "version", "action", "value".
    """
    command_id = data.get("id")
    if not isinstance(command_id, str) or not COMMAND_ID.fullmatch(command_id):
        return "no_id"
    repeated = set(getattr(data, "repeated", ())) & set(_FIELDS)
    reply_to = data.get("reply_to")
    value = data.get("value")
    if (
        repeated
        or not all(k in data for k in ("v", "device", "action", "expires"))
        or not _whole(data["v"])
        or not _whole(data["expires"])
        or data["expires"] < 0
        or not _text(data["device"], 64)
        or not isinstance(data["action"], str)
        or ("reply_to" in data and not _valid_reply_to(reply_to))
        or not (value is None or isinstance(value, float))
    ):
        return "field"
    if data["v"] != PROTOCOL_VERSION:
        return "version"
    if data["action"] not in ACTIONS:
        return "action"
    action = data["action"]
    if (action in VALUE_ACTIONS) != (value is not None):
        return "value"
    if value is not None and (
        math.isnan(value) or (action in PERCENT_ACTIONS and not 0 <= value <= 100)
    ):
        return "value"
    return "ok"


def _valid_reply_to(topic: Any) -> bool:
    return (
        _text(topic, 128)
        and not topic.startswith("$")
        and "+" not in topic
        and "#" not in topic
    )


class JsonDevice:
    """One device speaking the JSON protocol, without MQTT: bytes in, ack out.

    Args:
        device: the registry device; its capabilities and their ranges decide what
            it can do (anything else is answered "unsupported").
        seen_ids: how many carried-out command ids it remembers.
    """

    def __init__(self, device: Device, seen_ids: int = SEEN_IDS) -> None:
        self.device = device
        self.state: dict[str, Any] = {"state": "OFF"}
        self.seen_ids = seen_ids
        self._seen: OrderedDict[str, None] = OrderedDict()
        self.last_reply_to: str | None = None

    def handle(self, payload: bytes, now: float) -> tuple[str, dict[str, Any] | None]:
        """Handle one command payload at Unix time `now` (0: no clock).

        Returns:
            (outcome, ack): outcome is "ok", "duplicate", "json", "no_id", "field",
            "version", "device", "action", "value", "expired" or "unsupported"; ack is
            the message to publish, None for "json" and "no_id" (no id to answer).
            `last_reply_to` holds the command's reply topic, when it had a valid one.
        """
        self.last_reply_to = None
        try:
            data = decode_command(payload)
        except ValueError:
            return "json", None
        outcome = check_command(data)
        if outcome == "no_id":
            return outcome, None
        if _valid_reply_to(data.get("reply_to")):
            self.last_reply_to = data["reply_to"]
        if outcome == "ok" and data["device"] != self.device.id:
            outcome = "device"
        if outcome == "ok" and data["id"] in self._seen:
            outcome = "duplicate"
        expires = data.get("expires")
        if outcome == "ok" and int(now) > 0 and expires > 0 and int(now) > expires:
            outcome = "expired"
        if outcome == "ok":
            outcome = self._apply(data["action"], data.get("value"))
            if outcome == "ok":
                self._seen[data["id"]] = None
                while len(self._seen) > self.seen_ids:
                    self._seen.popitem(last=False)
        return outcome, self._ack(data["id"], outcome)

    def _apply(self, action: str, value: float | None) -> str:
        capability = _CAPABILITY[action]
        limits = self.device.capabilities.get(capability)
        if limits is None:
            return "unsupported"
        if value is not None and not (
            limits.get("min", -math.inf) <= value <= limits.get("max", math.inf)
        ):
            return "unsupported"
        state = dict(self.state)
        if action in ("on", "off"):
            state["state"] = action.upper()
        elif action in ("open", "close"):
            state["state"] = "OPEN" if action == "open" else "CLOSED"
        else:
            state[action] = int(value) if value == int(value) else value
            if action == "brightness":
                state["state"] = "ON" if value > 0 else "OFF"
        self.state = state
        return "ok"

    def _ack(self, command_id: str, outcome: str) -> dict[str, Any]:
        status = {"ok": "ok", "duplicate": "duplicate", "expired": "expired"}.get(
            outcome, "unsupported" if outcome == "unsupported" else "invalid"
        )
        ack: dict[str, Any] = {
            "id": command_id,
            "device": self.device.id,
            "status": status,
            "state": dict(self.state),
        }
        if status not in ("ok", "duplicate"):
            ack["error"] = _ERRORS[outcome]
        return ack


_ERRORS = {
    "field": "a field is missing, repeated or of the wrong type",
    "version": f"unsupported protocol version (this device speaks {PROTOCOL_VERSION})",
    "device": "command for another device",
    "action": "unknown action",
    "value": "value missing, unexpected or out of range",
    "expired": "command expired before it could run",
    "unsupported": "this device cannot do that",
}
