"""From a recognized intent to checked device commands: the bridge's safety gate.

Every command is checked against the registry before it can be queued: the device
exists and has an MQTT mapping, the action is one its capabilities allow, the value is
a finite number inside the capability's range. Command ids derive from the request id,
so a retried request maps onto the same commands. Rate limits are per device.

Not yet: colours, colour temperature, media and vacuum intents (refused with a clear
error, never guessed).
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from edgeslm.intent.registry import Device, Registry
from edgeslm.intent.result import IntentResult
from firmware_bridge.recognizer import resolve_devices

# Request ids travel in topics' payloads and in SQLite keys; keep them plain.
REQUEST_ID = re.compile(r"[A-Za-z0-9_-]{1,48}")  # use with fullmatch

# Action -> the capability a device needs for it.
ACTION_CAPABILITY = {
    "on": "on_off",
    "off": "on_off",
    "open": "open_close",
    "close": "open_close",
    "brightness": "brightness",
    "position": "position",
    "temperature": "temperature",
}
VALUE_ACTIONS = ("brightness", "position", "temperature")
_SLOT_OF = {"HassLightSet": "brightness", "HassSetPosition": "position"}
_SLOT_OF["HassClimateSetTemperature"] = "temperature"


class CommandRejected(Exception):
    """A request cannot become device commands; `code` is the reply's error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class DeviceCommand:
    """One action for one device, checked against the registry.

    Attributes:
        id: unique and stable: "<request id>-<n>".
        request_id: the request it came from.
        device: registry device id.
        action: one of `ACTION_CAPABILITY`.
        value: the number for value actions, else None.
        expires_at: Unix time after which the command must not run.
    """

    id: str
    request_id: str
    device: str
    action: str
    value: float | None
    expires_at: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "device": self.device,
            "action": self.action,
            "value": self.value,
            "expires": int(math.ceil(self.expires_at)),
        }


def plan_commands(
    registry: Registry,
    result: IntentResult,
    request_id: str,
    ttl: float,
    now: float | None = None,
    min_confidence: float = 0.0,
) -> list[DeviceCommand]:
    """Turn a recognized intent into checked commands, one per targeted device.

    Raises:
        CommandRejected: not recognized, recognized with an error, or below
            `min_confidence`, unsupported
            intent, no or unknown device, action not allowed, value missing or out
            of range.
    """
    if result.intent is None:
        raise CommandRejected(
            "not_recognized", f"no intent recognized in {result.text!r}"
        )
    if result.error is not None:
        # Recognized, but the intent layer found it cannot be carried out here
        # (a value outside the device's range, an intent no device serves).
        raise CommandRejected("intent_error", f"{result.intent}: {result.error}")
    if result.confidence < min_confidence:
        raise CommandRejected(
            "low_confidence",
            f"{result.intent} from the {result.layer} layer with confidence "
            f"{result.confidence:.2f}; the bridge acts at {min_confidence:.2f} or more",
        )
    targets = list(result.devices) or resolve_devices(registry, result.slots)
    if not targets:
        raise CommandRejected(
            "no_device", f"{result.intent}: the request names no device of the registry"
        )
    by_id = {d.id: d for d in registry.devices}
    expires_at = (time.time() if now is None else now) + ttl
    commands = []
    for n, device_id in enumerate(sorted(set(targets))):
        device = by_id.get(device_id)
        if device is None:
            raise CommandRejected(
                "unknown_device", f"device {device_id!r} is not in the registry"
            )
        action, value = _action_for(result.intent, device, result.slots)
        check_command(device, action, value)
        commands.append(
            DeviceCommand(
                f"{request_id}-{n}", request_id, device.id, action, value, expires_at
            )
        )
    return commands


def _action_for(intent: str, device: Device, slots: dict[str, Any]) -> tuple[str, Any]:
    opens = device.can("open_close") and not device.can("on_off")
    if intent == "HassTurnOn":
        return ("open" if opens else "on"), None
    if intent == "HassTurnOff":
        return ("close" if opens else "off"), None
    slot = _SLOT_OF.get(intent)
    if slot is None:
        raise CommandRejected(
            "unsupported_intent", f"the bridge does not carry out {intent} (yet)"
        )
    if slot not in slots:
        raise CommandRejected("missing_value", f"{intent} needs a '{slot}' value")
    return slot, slots[slot]


def check_command(device: Device, action: str, value: Any) -> float | None:
    """The safety rule for one command; returns the checked value.

    Raises:
        CommandRejected: the device has no MQTT mapping, cannot do the action, or the
            value is not a finite number inside the capability's range.
    """
    if device.mqtt is None:
        raise CommandRejected(
            "no_route", f"device {device.id!r} has no 'mqtt' mapping in the registry"
        )
    capability = ACTION_CAPABILITY.get(action)
    if capability is None or not device.can(capability):
        raise CommandRejected(
            "action_not_allowed",
            f"device {device.id!r} cannot {action} (capabilities: "
            f"{sorted(device.capabilities)})",
        )
    if action not in VALUE_ACTIONS:
        if value is not None:
            raise CommandRejected(
                "bad_value", f"{action} takes no value, got {value!r}"
            )
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CommandRejected("bad_value", f"{action} needs a number, got {value!r}")
    limits = device.capabilities[capability]
    low, high = float(limits.get("min", -math.inf)), float(limits.get("max", math.inf))
    if not math.isfinite(value) or not low <= value <= high:
        raise CommandRejected(
            "out_of_range",
            f"{action} of {device.id!r} must be in "
            f"{limits.get('min')}..{limits.get('max')}, got {value!r}",
        )
    return value


class RateLimiter:
    """Token bucket per device: `burst` at once, `per_second` sustained."""

    def __init__(self, per_second: float, burst: int) -> None:
        self.per_second = per_second
        self.burst = burst
        self._buckets: dict[str, tuple[float, float]] = {}  # device -> (tokens, time)

    def allow(self, device: str, now: float | None = None) -> bool:
        """Take one token from `device`'s bucket; False (nothing taken) when empty."""
        return self.take(Counter([device]), now) is None

    def take(self, wanted: Counter[str], now: float | None = None) -> str | None:
        """Take `wanted[device]` tokens from each bucket, all or none.

        Args:
            wanted: device -> how many commands of one request go to it.
            now: monotonic seconds; the current time when None.

        Returns:
            None when every bucket had enough and the tokens were taken, else the
            first device without enough (then no bucket was touched).
        """
        now = time.monotonic() if now is None else now

        # check every device first, so a refusal wastes no other device's tokens
        tokens = {device: self._tokens(device, now) for device in wanted}
        for device, n in wanted.items():
            if tokens[device] < n:
                return device

        for device, n in wanted.items():
            self._buckets[device] = (tokens[device] - n, now)
        return None

    def _tokens(self, device: str, now: float) -> float:
        """The tokens in `device`'s bucket at `now`, refilled since it was last used."""
        tokens, last = self._buckets.get(device, (float(self.burst), now))
        return min(float(self.burst), tokens + (now - last) * self.per_second)
