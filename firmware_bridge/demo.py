"""The bridge demo: a broker, simulated devices, a bridge and spoken-style commands.

    edgeslm bridge --demo            (or: python -m firmware_bridge --demo)

Starts mosquitto on a free local port in a temporary folder (or uses `--broker
HOST:PORT`), the simulated devices of `examples/home.yaml`, and a bridge with the
default recognizer; sends each command to the bridge's command topic the way a voice
satellite would, and prints what the bridge recognized, what it told the device, and
the device's state before and after. Everything it started is stopped at the end.

Not a benchmark and not a test: it prints for a person (the one module of the package
that writes to stdout, through the `out` stream it is given).
"""

from __future__ import annotations

import json
import logging
import queue
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

log = logging.getLogger(__name__)

EXAMPLES = Path(__file__).with_name("examples")
COMMANDS = (
    "turn on the kitchen light",
    "set the desk lamp to 40%",
    "turn on the fan",
    "set the thermostat to 21 degrees",
    "close the blinds",
    "kitchen light off now",  # not a template: the encoder layer's job
    "set the thermostat to 40 degrees",  # out of the thermostat's range
    "turn on the sauna",  # no such device: refused, whichever layer answers
)
INSTALL_HINT = (
    "mosquitto is not installed. Install it (Debian, Raspberry Pi OS: "
    "sudo apt-get install mosquitto mosquitto-clients) or point the demo at a "
    "broker you run: --broker HOST:PORT"
)


def find_mosquitto() -> str | None:
    """The mosquitto executable, or None."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for path in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if Path(path).is_file():
            return path
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mosquitto(
    folder: Path, timeout: float = 10.0
) -> tuple[subprocess.Popen, int]:
    """A throw-away mosquitto on 127.0.0.1 (anonymous, no persistence); (process, port).

    Raises:
        RuntimeError: mosquitto is missing or did not open its port.
    """
    exe = find_mosquitto()
    if exe is None:
        raise RuntimeError(INSTALL_HINT)
    port = _free_port()
    conf = folder / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        "set_tcp_nodelay true\n"  # no Nagle delay on small messages (docs/BRIDGE.md)
        f"log_dest file {folder / 'mosquitto.log'}\n"
    )
    proc = subprocess.Popen(
        [exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.05)
    proc.kill()
    proc.wait(5)
    raise RuntimeError(f"mosquitto did not start; see {folder / 'mosquitto.log'}")


class _Replies:
    """Collects the bridge's final replies by request id."""

    def __init__(self, host: str, port: int, topic: str) -> None:
        self.final: queue.Queue[dict[str, Any]] = queue.Queue()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_message = self._on_message
        self.client.connect(host, port, keepalive=10)
        self.client.loop_start()

    def _on_message(self, client, userdata, message) -> None:
        try:
            reply = json.loads(message.payload)
        except ValueError:
            return
        if isinstance(reply, dict) and reply.get("status") != "accepted":
            self.final.put(reply)

    def send(self, topic: str, request: dict[str, Any]) -> None:
        info = self.client.publish(topic, json.dumps(request), qos=1)
        info.wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _describe(reply: dict[str, Any]) -> str:
    intent = reply.get("intent") or {}
    head = "not recognized"
    if intent.get("intent"):
        head = (
            f"{intent['intent']} ({intent.get('layer', '?')} layer, "
            f"confidence {intent.get('confidence', 0):.2f})"
        )
    if reply.get("error"):
        return f"{head}: {reply['status']}: {reply['error']['message']}"
    parts = []
    for cmd in reply.get("commands", []):
        value = "" if cmd.get("value") is None else f" {cmd['value']:g}"
        parts.append(
            f"{cmd['device']} {cmd['action']}{value} -> {cmd['status']}"
            f" {json.dumps(cmd.get('state', {}))}"
        )
    return f"{head}: " + "; ".join(parts)


def run_demo(
    out: TextIO = sys.stdout,
    broker: str | None = None,
    recognizer: str = "auto",
    commands: tuple[str, ...] = COMMANDS,
) -> int:
    """Run the demo, writing to `out`; an exit code (0 when every reply came)."""
    from edgeslm.intent.registry import load_registry
    from firmware_bridge.config import config_from_dict
    from firmware_bridge.service import Bridge
    from firmware_bridge.simulator import DeviceSimulator

    registry_path = EXAMPLES / "home.yaml"
    registry = load_registry(registry_path)
    quiet = logging.getLogger("firmware_bridge")
    if quiet.getEffectiveLevel() >= logging.INFO:  # the replies say it all
        quiet.setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="edgeslm-demo-") as tmp:
        proc = None
        if broker is None:
            try:
                proc, port = start_mosquitto(Path(tmp))
            except RuntimeError as exc:
                out.write(f"{exc}\n")
                return 2
            host = "127.0.0.1"
            out.write(f"mosquitto: started on {host}:{port}\n")
        else:
            host, _, port_text = broker.rpartition(":")
            host, port = host or "127.0.0.1", int(port_text or 1883)
            out.write(f"broker: {host}:{port}\n")

        config = config_from_dict(
            {
                "registry": str(registry_path),
                "queue": str(Path(tmp) / "queue.sqlite3"),
                "broker": {"host": host, "port": port},
                "recognizer": recognizer,
                "instance": "demo",
                "discovery": {"enabled": False},
            }
        )
        out.write(
            "loading the recognizer (the first run exports the encoder and trains "
            "its classifier: about half a minute)...\n"
        )
        out.flush()
        sim = replies = bridge = None
        try:
            sim = DeviceSimulator(registry, host=host, port=port).start()
            bridge = Bridge(config, registry)
            replies = _Replies(host, port, bridge.topics.reply)
            bridge.start()
            if not bridge.connected.wait(10):
                out.write("the bridge could not connect to the broker\n")
                return 1
            time.sleep(0.3)  # subscriptions settle
            return _send_all(out, bridge, sim, replies, commands)
        finally:
            for thing in (bridge, replies, sim):
                if thing is not None:
                    thing.stop() if hasattr(thing, "stop") else thing.close()
            if proc is not None:
                proc.terminate()
                proc.wait(10)


def _send_all(out: TextIO, bridge, sim, replies: _Replies, commands) -> int:
    before = {k: dict(v) for k, v in sim.states.items()}
    missing = 0
    for n, text in enumerate(commands):
        out.write(f"\n> {text}\n")
        replies.send(bridge.topics.command, {"id": f"demo-{n}", "text": text})
        try:
            reply = replies.final.get(timeout=15)
        except queue.Empty:
            out.write("  (no reply within 15 s)\n")
            missing += 1
            continue
        out.write(f"  {_describe(reply)}\n")
    out.write("\ndevice states (in each device's own units), before -> after:\n")
    for device, state in sorted(sim.states.items()):
        mark = "  " if state == before[device] else "* "
        out.write(
            f"{mark}{device:20} {json.dumps(before[device])} -> {json.dumps(state)}\n"
        )
    return 1 if missing else 0
