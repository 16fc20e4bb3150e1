"""Simulated devices for tests and the demo: one MQTT client playing many devices.

- JSON protocol devices (docs/PROTOCOL.md): `firmware_bridge.protocol.JsonDevice`
  validates, drops duplicate ids, applies and acks; this module puts it on MQTT.
- Zigbee2MQTT-style devices: `<topic>/set` JSON in, state JSON out on `<topic>`.
- Tasmota-style devices: `cmnd/<topic>/POWER|Dimmer|ShutterPosition` in,
  `stat/<topic>/RESULT` out.

Every applied command is counted (`applied`, per command id for JSON devices) so tests
can check exactly-once at the device. `drop_acks` loses every n-th ack on purpose.
Handling runs in paho's thread: a simulator has no other work to protect.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgeslm.intent.registry import Registry
from firmware_bridge.protocol import JsonDevice
from firmware_bridge.transport import low_latency

log = logging.getLogger(__name__)


class DeviceSimulator:
    """The registry's MQTT devices, simulated on one connection.

    Args:
        registry: devices with an `mqtt` mapping are simulated.
        host, port: the broker.
        drop_acks: lose every n-th JSON ack (0: never), to exercise resends.
        username, password, tls_ca: broker credentials, if the broker wants them.
    """

    def __init__(
        self,
        registry: Registry,
        host: str = "localhost",
        port: int = 1883,
        drop_acks: int = 0,
        username: str | None = None,
        password: str | None = None,
        tls_ca: str | None = None,
    ) -> None:
        self.states: dict[str, dict[str, Any]] = {}
        self.applied: Counter[str] = Counter()  # command id (or device) -> times
        self.duplicates = 0
        self.drop_acks = drop_acks
        self._acks = 0
        self.json_devices: dict[str, JsonDevice] = {}
        self._lock = threading.Lock()
        self._routes: dict[str, tuple[str, Any]] = {}
        for device in registry.devices:
            if device.mqtt is None:
                continue
            topic, adapter = device.mqtt["topic"], device.mqtt.get("adapter", "json")
            self.states[device.id] = {"state": "OFF"}
            if adapter == "json":
                self.json_devices[device.id] = JsonDevice(device)
                self.states[device.id] = self.json_devices[device.id].state
                self._routes[f"{topic}/command"] = (device.id, self._json)
            elif adapter == "zigbee2mqtt":
                self._routes[f"{topic}/set"] = (device.id, self._z2m)
            elif adapter == "tasmota":
                for command in ("POWER", "Dimmer", "ShutterPosition"):
                    self._routes[f"cmnd/{topic}/{command}"] = (device.id, self._tasmota)
        self._topics = {d.id: d.mqtt["topic"] for d in registry.devices if d.mqtt}
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        low_latency(self.client)
        if username is not None:
            self.client.username_pw_set(username, password)
        if tls_ca is not None:
            self.client.tls_set(ca_certs=tls_ca)
            self.client.tls_insecure_set(True)
        self.client.reconnect_delay_set(0.2, 1)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.connected = threading.Event()
        self._host, self._port = host, port

    def start(self, timeout: float = 10.0) -> DeviceSimulator:
        self.client.connect_async(self._host, self._port, keepalive=10)
        self.client.loop_start()
        if not self.connected.wait(timeout):
            raise TimeoutError(f"simulator could not reach the broker at {self._port}")
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def total_applied(self) -> int:
        with self._lock:
            return sum(self.applied.values())

    # --- paho ----------------------------------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            return
        client.subscribe([(topic, 1) for topic in self._routes])
        self.connected.set()

    def _on_message(self, client, userdata, message) -> None:
        route = self._routes.get(message.topic)
        if route is None:
            return
        device, handler = route
        try:
            with self._lock:
                handler(device, message)
        except Exception:  # a simulated device must survive any payload
            log.exception("simulator: %s failed on a message", device)

    # --- JSON protocol ----------------------------------------------------------------

    def _json(self, device: str, message: mqtt.MQTTMessage) -> None:
        props = getattr(message, "properties", None)
        reply_to = getattr(props, "ResponseTopic", None) if props else None
        correlation = getattr(props, "CorrelationData", None) if props else None
        json_device = self.json_devices[device]
        outcome, ack = json_device.handle(message.payload, time.time())
        if outcome == "duplicate":
            self.duplicates += 1
        if ack is None:
            return  # no trusted id: nothing to acknowledge
        if outcome == "ok":
            self.applied[ack["id"]] += 1
            self.states[device] = json_device.state
            self._publish_state(device)
        reply_to = reply_to or json_device.last_reply_to
        self._acks += 1
        if self.drop_acks and self._acks % self.drop_acks == 0:
            return  # lost on purpose: the bridge must resend, we must not act twice
        if reply_to:
            properties = Properties(PacketTypes.PUBLISH)
            if correlation is not None:
                properties.CorrelationData = correlation
            self.client.publish(reply_to, json.dumps(ack), qos=1, properties=properties)

    def _publish_state(self, device: str) -> None:
        topic = f"{self._topics[device]}/state"
        self.client.publish(topic, json.dumps(self.states[device]), qos=1, retain=True)

    # --- Zigbee2MQTT and Tasmota ------------------------------------------------------

    def _z2m(self, device: str, message: mqtt.MQTTMessage) -> None:
        try:
            wanted = json.loads(message.payload)
        except ValueError:
            return
        if not isinstance(wanted, dict):
            return
        state = self.states[device]
        for key in ("state", "brightness", "position", "current_heating_setpoint"):
            if key in wanted:
                state[key] = wanted[key]
        self.applied[device] += 1
        self.client.publish(self._topics[device], json.dumps(state), qos=1)

    def _tasmota(self, device: str, message: mqtt.MQTTMessage) -> None:
        command = message.topic.rsplit("/", 1)[1]
        value = message.payload.decode("utf-8", "replace").strip()
        state = self.states[device]
        if command == "POWER" and value.upper() in ("ON", "OFF"):
            state["state"] = value.upper()
            result: dict[str, Any] = {"POWER": state["state"]}
        elif command == "Dimmer" and value.isdigit() and 0 <= int(value) <= 100:
            state["brightness"], state["state"] = int(value), "ON"
            result = {"POWER": "ON", "Dimmer": int(value)}
        elif command == "ShutterPosition" and value.isdigit():
            state["position"] = int(value)
            result = {"Shutter1": {"Position": int(value), "Direction": 0}}
        else:
            result = {"Command": "Error"}
        if "Command" not in result:
            self.applied[device] += 1
        topic = self._topics[device]
        self.client.publish(f"stat/{topic}/RESULT", json.dumps(result), qos=1)
