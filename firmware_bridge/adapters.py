"""Adapters: how a checked command reaches a device and how its outcome comes back.

One adapter per firmware family, chosen per device by the registry's `mqtt.adapter`:

- `json`: the bridge's own command/ack protocol (docs/PROTOCOL.md). Commands go to
  `<topic>/command`; the device acks on the response topic with the command id.
- `zigbee2mqtt`: `<topic>/set` with Zigbee2MQTT's JSON; the outcome is read back from
  the device's state on `<topic>`.
- `tasmota`: `cmnd/<topic>/POWER`, `Dimmer`, `ShutterPosition`; the outcome is read
  from `stat/<topic>/RESULT`.

Every topic an adapter can publish to is fixed by the registry alone (`out_topics`),
which is what the bridge's allow-list is built from. Device topics never come from
request text.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from edgeslm.intent.registry import Device
from firmware_bridge.commands import CommandRejected, DeviceCommand
from firmware_bridge.protocol import PROTOCOL_VERSION


@dataclass(frozen=True)
class Outgoing:
    """One message to publish (QoS 1, never retained for commands)."""

    topic: str
    payload: bytes
    expiry: int | None = None  # MQTT 5 message expiry interval, seconds
    response_topic: str | None = None
    correlation: bytes | None = None
    retain: bool = False
    properties: dict[str, str] = field(default_factory=dict)


def _expiry(cmd: DeviceCommand, now: float) -> int:
    return max(1, int(math.ceil(cmd.expires_at - now)))


class JsonAdapter:
    """The generic JSON command/ack protocol."""

    name = "json"
    actions = ("on", "off", "open", "close", "brightness", "position", "temperature")

    def out_topics(self, device: Device) -> list[str]:
        return [f"{device.mqtt['topic']}/command"]

    def state_topics(self, device: Device) -> list[str]:
        return []  # outcomes arrive as acks on the bridge's ack topic

    def messages(
        self, cmd: DeviceCommand, device: Device, ack_topic: str, now: float
    ) -> list[Outgoing]:
        body = {"v": PROTOCOL_VERSION, **cmd.to_dict(), "reply_to": ack_topic}
        if cmd.value is None:
            del body["value"]
        return [
            Outgoing(
                f"{device.mqtt['topic']}/command",
                json.dumps(body, separators=(",", ":")).encode(),
                expiry=_expiry(cmd, now),
                response_topic=ack_topic,
                correlation=cmd.id.encode(),
            )
        ]

    def outcome(self, cmd: DeviceCommand, topic: str, payload: Any) -> dict | None:
        return None


class Zigbee2MqttAdapter:
    """Zigbee2MQTT: `<base>/<friendly name>/set`; state read from `<base>/<name>`."""

    name = "zigbee2mqtt"
    actions = ("on", "off", "open", "close", "brightness", "position", "temperature")

    def out_topics(self, device: Device) -> list[str]:
        return [f"{device.mqtt['topic']}/set"]

    def state_topics(self, device: Device) -> list[str]:
        return [device.mqtt["topic"]]

    def _wanted(self, cmd: DeviceCommand) -> dict[str, Any]:
        if cmd.action in ("on", "off", "open", "close"):
            return {
                "state": {"open": "OPEN", "close": "CLOSE"}.get(
                    cmd.action, cmd.action.upper()
                )
            }
        if cmd.action == "brightness":  # Zigbee2MQTT counts 0..254
            level = round(float(cmd.value) * 254 / 100)
            return {"state": "ON" if level else "OFF", "brightness": level}
        if cmd.action == "position":
            return {"position": round(float(cmd.value))}
        return {"current_heating_setpoint": float(cmd.value)}

    def messages(
        self, cmd: DeviceCommand, device: Device, ack_topic: str, now: float
    ) -> list[Outgoing]:
        payload = json.dumps(self._wanted(cmd), separators=(",", ":")).encode()
        return [
            Outgoing(f"{device.mqtt['topic']}/set", payload, expiry=_expiry(cmd, now))
        ]

    def outcome(self, cmd: DeviceCommand, topic: str, payload: Any) -> dict | None:
        """The device's new state (bridge vocabulary) if `payload` confirms `cmd`."""
        if not isinstance(payload, dict):
            return None
        for key, want in self._wanted(cmd).items():
            if not _same(payload.get(key), want):
                return None
        state = {"state": payload.get("state")}
        if isinstance(payload.get("brightness"), (int, float)):
            state["brightness"] = round(payload["brightness"] * 100 / 254)
        if "position" in payload:
            state["position"] = payload["position"]
        if "current_heating_setpoint" in payload:
            state["temperature"] = payload["current_heating_setpoint"]
        return state


class TasmotaAdapter:
    """Tasmota: `cmnd/<topic>/<Command>`, outcome from `stat/<topic>/RESULT`."""

    name = "tasmota"
    actions = ("on", "off", "brightness", "position")
    _COMMAND = {"on": "POWER", "off": "POWER", "brightness": "Dimmer"}
    _COMMAND["position"] = "ShutterPosition"

    def out_topics(self, device: Device) -> list[str]:
        base = device.mqtt["topic"]
        return [f"cmnd/{base}/{c}" for c in ("POWER", "Dimmer", "ShutterPosition")]

    def state_topics(self, device: Device) -> list[str]:
        return [f"stat/{device.mqtt['topic']}/RESULT"]

    def messages(
        self, cmd: DeviceCommand, device: Device, ack_topic: str, now: float
    ) -> list[Outgoing]:
        if cmd.action not in self._COMMAND:
            raise CommandRejected("action_not_allowed", f"Tasmota cannot {cmd.action}")
        value = (
            cmd.action.upper() if cmd.value is None else str(round(float(cmd.value)))
        )
        topic = f"cmnd/{device.mqtt['topic']}/{self._COMMAND[cmd.action]}"
        return [Outgoing(topic, value.encode(), expiry=_expiry(cmd, now))]

    def outcome(self, cmd: DeviceCommand, topic: str, payload: Any) -> dict | None:
        """The device's new state (bridge vocabulary) if `payload` confirms `cmd`."""
        if not isinstance(payload, dict):
            return None
        if cmd.action in ("on", "off"):
            ok = payload.get("POWER") == cmd.action.upper()
        elif cmd.action == "brightness":
            ok = _same(payload.get("Dimmer"), round(float(cmd.value)))
        else:
            shutter = payload.get("Shutter1")
            ok = isinstance(shutter, dict) and _same(
                shutter.get("Position"), round(float(cmd.value))
            )
        if not ok:
            return None
        state = {"state": payload.get("POWER")}
        if "Dimmer" in payload:
            state["brightness"] = payload["Dimmer"]
        if isinstance(payload.get("Shutter1"), dict):
            state["position"] = payload["Shutter1"].get("Position")
        return state


def _same(got: Any, want: Any) -> bool:
    if isinstance(want, str) or isinstance(got, bool):
        return got == want
    try:
        return abs(float(got) - float(want)) <= 0.5
    except (TypeError, ValueError):
        return False


ADAPTERS: dict[str, Any] = {
    a.name: a for a in (JsonAdapter(), Zigbee2MqttAdapter(), TasmotaAdapter())
}


def adapter_for(device: Device) -> Any:
    """The adapter a device's `mqtt` mapping names.

    Raises:
        CommandRejected: no mapping, or an adapter the bridge cannot drive.
    """
    if device.mqtt is None:
        raise CommandRejected("no_route", f"device {device.id!r} has no 'mqtt' mapping")
    adapter = ADAPTERS.get(device.mqtt.get("adapter", "json"))
    if adapter is None:
        raise CommandRejected(
            "no_route",
            f"device {device.id!r} uses adapter {device.mqtt.get('adapter')!r}, "
            f"which the bridge cannot drive; use one of {sorted(ADAPTERS)}",
        )
    return adapter


def discovery_messages(
    discovery_prefix: str, base: str, instance: str, availability: str, last: str
) -> list[Outgoing]:
    """Home Assistant MQTT discovery for the bridge's own entities (retained)."""
    node = f"edgeslm_{instance}".replace("-", "_")
    device = {"identifiers": [node], "name": f"edgeslm bridge {instance}"}
    device["manufacturer"] = "edgeslm"
    entities = {
        f"{discovery_prefix}/binary_sensor/{node}/availability/config": {
            "name": "Availability",
            "unique_id": f"{node}_availability",
            "device_class": "connectivity",
            "state_topic": availability,
            "payload_on": "online",
            "payload_off": "offline",
            "device": device,
        },
        f"{discovery_prefix}/sensor/{node}/last_command/config": {
            "name": "Last command",
            "unique_id": f"{node}_last_command",
            "state_topic": last,
            "value_template": "{{ value_json.text }}",
            "json_attributes_topic": last,
            "availability_topic": availability,
            "device": device,
        },
    }
    return [
        Outgoing(topic, json.dumps(body).encode(), retain=True)
        for topic, body in entities.items()
    ]
