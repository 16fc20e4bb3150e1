"""Benchmark of the MQTT bridge: commands per second and command-to-ack latency.

    python tools/bench/bench_bridge.py --rounds 3 --json /tmp/bench_bridge.json

One mosquitto on a free port, the simulated devices in their own process, and for
each system its own process:

- `template`: the bridge with the template recognizer (`recognizer: templates`),
  requests phrased as Home Assistant's templates;
- `encoder`: the bridge with edgeslm.intent's recognizer without its chat model
  (`recognizer: encoder`), requests phrased so that no template matches and the
  encoder layer answers;
- `mqtt only` (the peer): no bridge. The load generator publishes the same JSON
  command the bridge would straight to the device topic and waits for the device's
  ack: what the broker and the device cost by themselves.

Latency: one request at a time, from publishing it (on the command topic, or the
device topic for the peer) to the device's ack arriving on the ack topic; p50 and
p99 over `--requests`. Throughput: `--burst` requests published at once over three
devices, until the last final reply (the last ack for the peer). Systems alternate
within each round so that drift in machine load hits all of them.

Prints a markdown table with medians over rounds and the ratios bridge / peer.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402
from paho.mqtt.packettypes import PacketTypes  # noqa: E402
from paho.mqtt.properties import Properties  # noqa: E402

from firmware_bridge.transport import low_latency  # noqa: E402

HOME = REPO / "firmware_bridge" / "examples" / "home.yaml"
BASE = "edgeslm/default"
ACK = f"{BASE}/bridge/bench/ack"

# (device, action, value) and how each layer's requests phrase it
WORK = [
    ("light.kitchen", "on", None),
    ("light.kitchen", "off", None),
    ("cover.blinds", "open", None),
    ("cover.blinds", "close", None),
    ("climate.thermostat", "on", None),
    ("climate.thermostat", "off", None),
]
TEXTS = {
    "template": [
        "turn on the kitchen light",
        "turn off the kitchen light",
        "open the blinds",
        "close the blinds",
        "turn on the thermostat",
        "turn off the thermostat",
    ],
    "encoder": [
        "kitchen light on now",
        "kitchen light off now",
        "blinds open now please",
        "blinds shut now please",
        "thermostat on now",
        "thermostat off now",
    ],
}
TOPICS = {
    "light.kitchen": "home/kitchen/light",
    "cover.blinds": "home/living_room/blinds",
    "climate.thermostat": "home/living_room/thermostat",
}


# --- the processes ------------------------------------------------------------


def _devices_main(port: int) -> None:
    """Child process: the simulated devices until SIGTERM."""
    from edgeslm.intent.registry import load_registry
    from firmware_bridge.simulator import DeviceSimulator

    sim = DeviceSimulator(load_registry(HOME), host="127.0.0.1", port=port).start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    print("ready", flush=True)
    done.wait()
    sim.stop()


def _spawn(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _bridge_config(folder: Path, port: int, recognizer: str) -> Path:
    import yaml

    path = folder / f"bridge-{recognizer}.yaml"
    data = {
        "registry": str(HOME),
        "queue": str(folder / f"queue-{recognizer}-{time.monotonic_ns()}.sqlite3"),
        "instance": "bench",
        "recognizer": recognizer,
        "broker": {"host": "127.0.0.1", "port": port},
        "rate_limit": {"per_second": 100000, "burst": 100000},
        "discovery": {"enabled": False},
        "hermes": {"enabled": False},
    }
    path.write_text(yaml.safe_dump(data))
    return path


class Client:
    """The load generator's MQTT client: records acks and final replies by id."""

    def __init__(self, port: int) -> None:
        self.acks: dict[str, float] = {}
        self.replies: dict[str, tuple[float, dict]] = {}
        self.cond = threading.Condition()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        low_latency(self.client)
        self.client.max_inflight_messages_set(1000)  # the burst is not throttled here
        self.client.on_message = self._on_message
        ready = threading.Event()

        def on_connect(c, userdata, flags, reason_code, properties):
            c.subscribe([(ACK, 1), (f"{BASE}/reply", 1), ("bench/ack", 1)])

        self.client.on_connect = on_connect
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        if not ready.wait(10):
            raise RuntimeError("the load generator could not subscribe")

    def _on_message(self, client, userdata, message) -> None:
        now = time.perf_counter()
        body = json.loads(message.payload)
        with self.cond:
            if message.topic == f"{BASE}/reply":
                if body.get("status") != "accepted":
                    self.replies[body["id"]] = (now, body)
            else:
                self.acks.setdefault(body["id"], now)
            self.cond.notify_all()

    def wait(self, predicate, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(min(left, 0.5))
        return True

    def publish(self, topic: str, payload: str, properties=None) -> None:
        self.client.publish(topic, payload, qos=1, properties=properties)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _wait_online(client: Client, port: int, proc: subprocess.Popen) -> None:
    """Wait for the bridge's retained availability 'online'."""
    seen = threading.Event()
    probe = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    probe.on_connect = lambda c, *a: c.subscribe(f"{BASE}/bridge/bench/availability")
    probe.on_message = lambda c, u, m: m.payload == b"online" and seen.set()
    probe.connect("127.0.0.1", port)
    probe.loop_start()
    deadline = time.monotonic() + 120
    while not seen.wait(0.2):
        if proc.poll() is not None or time.monotonic() > deadline:
            probe.loop_stop()
            raise RuntimeError(
                f"the bridge did not come up: {proc.stderr.read()[-2000:]}"
            )
    probe.loop_stop()
    probe.disconnect()


# --- one measurement ----------------------------------------------------------


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _device_command(n: int, tag: str) -> tuple[str, str, Properties]:
    """The JSON command the bridge would send for WORK[n], for the peer."""
    device, action, value = WORK[n % len(WORK)]
    body = {
        "v": 1,
        "id": f"{tag}-0",
        "device": device,
        "action": action,
        "expires": int(time.time()) + 60,
        "reply_to": "bench/ack",
    }
    if value is not None:
        body["value"] = value
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = "bench/ack"
    props.CorrelationData = body["id"].encode()
    props.MessageExpiryInterval = 60
    return f"{TOPICS[device]}/command", json.dumps(body, separators=(",", ":")), props


def _measure(client: Client, system: str, rnd: int, args) -> dict[str, Any]:
    tag = f"{system[:3]}{rnd}"
    peer = system == "mqtt only"

    def send(n: int, request_id: str) -> None:
        if peer:
            topic, payload, props = _device_command(n, request_id)
            client.publish(topic, payload, props)
        else:
            text = TEXTS[system][n % len(WORK)]
            client.publish(
                f"{BASE}/command", json.dumps({"id": request_id, "text": text})
            )

    # latency: one request at a time
    latencies, layers, statuses, recognition = [], [], [], []
    for n in range(args.requests):
        request_id = f"{tag}l{n}"
        start = time.perf_counter()
        send(n, request_id)
        ok = client.wait(lambda r=request_id: f"{r}-0" in client.acks)
        if not ok:
            statuses.append("no ack")
            continue
        latencies.append((client.acks[f"{request_id}-0"] - start) * 1000)
        if not peer:
            client.wait(lambda r=request_id: r in client.replies)
            reply = client.replies.get(request_id, (0, {}))[1]
            statuses.append(reply.get("status"))
            layers.append((reply.get("intent") or {}).get("layer"))
            recognition.append((reply.get("intent") or {}).get("latency_ms", 0.0))

    # throughput: a burst over three devices, until the last outcome
    ids = [f"{tag}b{n}" for n in range(args.burst)]
    start = time.perf_counter()
    for n, request_id in enumerate(ids):
        send(n, request_id)
    if peer:
        done = client.wait(lambda: all(f"{i}-0" in client.acks for i in ids), 120)
        end = max(client.acks.get(f"{i}-0", 0) for i in ids)
    else:
        done = client.wait(lambda: all(i in client.replies for i in ids), 120)
        end = max(client.replies.get(i, (0, {}))[0] for i in ids)
        statuses += [client.replies.get(i, (0, {}))[1].get("status") for i in ids]
    return {
        "system": system,
        "round": rnd,
        "p50_ms": statistics.median(latencies) if latencies else None,
        "p99_ms": _percentile(latencies, 0.99) if latencies else None,
        "commands_per_s": args.burst / (end - start) if done else None,
        "done_share": (
            sum(s == "done" for s in statuses) / len(statuses) if statuses else 1.0
        ),
        "recognition_ms": statistics.median(recognition) if recognition else None,
        "layer_share": (
            sum(layer == system for layer in layers) / len(layers) if layers else None
        ),
    }


# --- the run ------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=200, help="for latency")
    parser.add_argument("--burst", type=int, default=300, help="for throughput")
    parser.add_argument(
        "--systems", default="template,encoder,mqtt only", help="comma-separated"
    )
    parser.add_argument("--json", help="write every measurement here")
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "devices":
        _devices_main(args.port)
        return 0

    from firmware_bridge.demo import start_mosquitto

    systems = [s.strip() for s in args.systems.split(",")]
    load_start = os.getloadavg()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-bridge-") as tmp:
        commit = _commit_ms(Path(tmp))
        broker, port = start_mosquitto(Path(tmp))
        devices = _spawn([__file__, "--role", "devices", "--port", str(port)])
        client = None
        try:
            assert devices.stdout.readline().strip() == "ready", devices.stderr.read()
            client = Client(port)
            for rnd in range(args.rounds):
                for system in systems:
                    results.append(_run_one(client, system, rnd, port, Path(tmp), args))
                    print(json.dumps(results[-1]), flush=True)
        finally:
            if client is not None:
                client.close()
            devices.terminate()
            devices.wait(10)
            broker.terminate()
            broker.wait(10)
    load_end = os.getloadavg()
    print(_table(results, systems, args, load_start, load_end, commit))
    if args.json:
        report = {"results": results, "load": [load_start, load_end]}
        report["sqlite_commit_ms"] = commit
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def _commit_ms(folder: Path, n: int = 200) -> float:
    """Median ms of one SQLite commit of the bridge's queue on this disk (WAL, FULL)."""
    from firmware_bridge.commands import DeviceCommand
    from firmware_bridge.store import CommandStore

    store = CommandStore(str(folder / "commit-probe.sqlite3"))
    times = []
    for i in range(n):
        cmd = DeviceCommand(f"p{i}-0", f"p{i}", "light.kitchen", "on", None, 0.0)
        start = time.perf_counter()
        store.add(f"p{i}", "probe", None, None, [cmd])
        times.append((time.perf_counter() - start) * 1000)
    store.close()
    return statistics.median(times)


def _run_one(client: Client, system: str, rnd: int, port: int, tmp: Path, args):
    if system == "mqtt only":
        return _measure(client, system, rnd, args)
    recognizer = {"template": "templates", "encoder": "encoder"}[system]
    config = _bridge_config(tmp, port, recognizer)
    bridge = _spawn(["-m", "firmware_bridge", "--config", str(config)])
    try:
        _wait_online(client, port, bridge)
        warm = f"warm{system[:3]}{rnd}"  # one untimed request: caches, first fsync
        client.publish(
            f"{BASE}/command", json.dumps({"id": warm, "text": TEXTS[system][0]})
        )
        client.wait(lambda: warm in client.replies, 60)
        return _measure(client, system, rnd, args)
    finally:
        bridge.send_signal(signal.SIGTERM)
        bridge.wait(20)


def _table(results, systems, args, load_start, load_end, commit) -> str:
    def median(system: str, key: str) -> float | None:
        values = [r[key] for r in results if r["system"] == system and r[key]]
        return statistics.median(values) if values else None

    rows = [
        "| system | p50 command→ack (ms) | p99 command→ack (ms) | commands/s "
        "(burst) | done | answered by its layer | recognition, p50 (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for system in systems:
        share = median(system, "layer_share")
        p50, p99 = median(system, "p50_ms"), median(system, "p99_ms")
        rate, done = median(system, "commands_per_s"), median(system, "done_share")
        layer = "–" if share is None else f"{share:.0%}"
        recognition = median(system, "recognition_ms")
        own = "–" if recognition is None else f"{recognition:.1f}"
        rows.append(
            f"| {system} | {p50:.1f} | {p99:.1f} | {rate:.0f} | {done:.0%} | {layer} "
            f"| {own} |"
        )
    if "mqtt only" in systems:
        rows += [
            "",
            "| system / mqtt only | p50 | p99 | commands/s |",
            "|---|---:|---:|---:|",
        ]
        for system in systems:
            if system == "mqtt only":
                continue
            ratios = [
                median(system, k) / median("mqtt only", k)
                for k in ("p50_ms", "p99_ms", "commands_per_s")
            ]
            rows.append(
                f"| {system} | " + " | ".join(f"{r:.2f}" for r in ratios) + " |"
            )
    rows.append(
        f"\n{args.rounds} rounds, {args.requests} sequential requests and a burst of "
        f"{args.burst} per system and round; one SQLite commit of the queue takes "
        f"{commit:.1f} ms on this disk; load average "
        f"{load_start[0]:.1f} at the start, {load_end[0]:.1f} at the end."
    )
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
