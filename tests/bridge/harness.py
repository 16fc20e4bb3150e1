"""Helpers for the bridge tests: an observing MQTT client, configs, waiting."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from firmware_bridge.config import BridgeConfig, config_from_dict

REPO = Path(__file__).resolve().parents[2]
HOME_YAML = REPO / "firmware_bridge" / "examples" / "home.yaml"


def bridge_config(tmp: Path, port: int, **overrides: Any) -> BridgeConfig:
    """A fast-retrying config on the example registry, queue in `tmp`."""
    data: dict[str, Any] = {
        "registry": str(HOME_YAML),
        "queue": str(tmp / "queue.sqlite3"),
        "broker": {
            "port": port,
            "host": "127.0.0.1",
            "reconnect_min": 0.1,
            "reconnect_max": 0.5,
            "keepalive": 5,
        },
        "delivery": {"ack_timeout": 0.5, "max_attempts": 20, "command_ttl": 60},
        "rate_limit": {"per_second": 1000, "burst": 1000},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return config_from_dict(data)


class Observer:
    """An MQTT client that records every message on `topics` (thread-safe)."""

    def __init__(
        self,
        port: int,
        topics: list[str],
        username: str | None = None,
        password: str | None = None,
        ca: str | None = None,
    ) -> None:
        self.messages: list[tuple[str, bytes, Any]] = []
        self._cond = threading.Condition()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        if username is not None:
            self.client.username_pw_set(username, password)
        if ca is not None:
            self.client.tls_set(ca_certs=ca)
        self._topics = topics
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        self.client.reconnect_delay_set(0.1, 0.5)
        self.ready = threading.Event()
        self.client.connect_async("127.0.0.1", port, keepalive=5)
        self.client.loop_start()
        if not self.ready.wait(10):
            raise TimeoutError("observer could not connect")

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        client.subscribe([(t, 1) for t in self._topics])
        self.ready.set()

    def _on_message(self, client, userdata, message) -> None:
        with self._cond:
            self.messages.append((message.topic, message.payload, message.properties))
            self._cond.notify_all()

    def json_on(self, topic: str) -> list[dict]:
        with self._cond:
            found = [p for t, p, _ in self.messages if t == topic]
        return [json.loads(p) for p in found]

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.2))
        return True

    def publish(self, topic: str, payload: Any, **kwargs: Any) -> None:
        if isinstance(payload, dict):
            payload = json.dumps(payload)
        self.client.publish(topic, payload, qos=1, **kwargs).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def final_replies(observer: Observer, topic: str = "edgeslm/default/reply") -> dict:
    """request id -> last final reply (anything but 'accepted')."""
    out = {}
    for reply in observer.json_on(topic):
        if reply.get("status") != "accepted":
            out[reply["id"]] = reply
    return out


def write_config(tmp: Path, port: int, **overrides: Any) -> Path:
    """The same config as `bridge_config`, written as YAML for a bridge process."""
    import yaml

    data: dict[str, Any] = {
        "registry": str(HOME_YAML),
        "queue": str(tmp / "queue.sqlite3"),
        "recognizer": "templates",
        "broker": {
            "port": port,
            "host": "127.0.0.1",
            "reconnect_min": 0.1,
            "reconnect_max": 0.5,
            "keepalive": 5,
        },
        "delivery": {"ack_timeout": 0.5, "max_attempts": 20, "command_ttl": 60},
        "rate_limit": {"per_second": 1000, "burst": 1000},
    }
    data.update(overrides)
    path = tmp / "bridge.yaml"
    path.write_text(yaml.safe_dump(data))
    return path
