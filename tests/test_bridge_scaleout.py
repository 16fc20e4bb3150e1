"""Scale-out: bridges on several boards share the command topics (MQTT 5 `$share`).

Two bridges in one share group on one mosquitto: every command and every Hermes query
is handled by exactly one of them (one reply, one side effect at the devices), and both
take part. When one dies, its share moves to the other once the broker drops its
session (`broker.session_expiry`); until then the broker queues that share for it.
"""

from __future__ import annotations

import json
import time
from collections import Counter

from bridge.harness import Observer, bridge_config, final_replies
from rhasspyhermes.nlu import NluQuery

from firmware_bridge.service import Bridge
from firmware_bridge.simulator import DeviceSimulator

BASE = "edgeslm/default"
# JSON-protocol devices only: their command ids let the test count side effects
# exactly (Zigbee2MQTT and Tasmota devices have no ids; see docs/BRIDGE.md).
TEXTS = (
    "turn on the kitchen light",
    "turn off the kitchen light",
    "set the thermostat to 20 degrees",
    "open the blinds",
    "set the kitchen light to 30%",
    "close the blinds",
)


def _two_bridges(tmp_path, port, registry, recognizer, **overrides) -> list[Bridge]:
    bridges = []
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        config = bridge_config(
            folder, port, share_group="bridges", instance=name, **overrides
        )
        bridge = Bridge(config, registry, recognizer)
        bridge.start()
        bridges.append(bridge)
    for bridge in bridges:
        assert bridge.connected.wait(10)
    time.sleep(0.3)  # subscriptions settle
    return bridges


def _sent_by(observer: Observer) -> Counter:
    """Device commands per bridge instance, from the ack topic each one names."""
    out: Counter = Counter()
    for topic, _, props in observer.messages:
        if topic.endswith("/command") and topic.startswith("home/"):
            out[props.ResponseTopic.split("/")[-2]] += 1
    return out


def test_two_bridges_share_the_work_and_handle_each_command_once(
    tmp_path, broker, registry, recognizer
):
    sim = DeviceSimulator(registry, port=broker.port).start()
    observer = Observer(broker.port, ["#"])
    bridges = _two_bridges(tmp_path, broker.port, registry, recognizer)
    ids = [f"s{i}" for i in range(60)]
    try:
        for i, request_id in enumerate(ids):
            text = TEXTS[i % len(TEXTS)]
            observer.publish(f"{BASE}/command", {"id": request_id, "text": text})
        for i in range(10):
            text = "turn off the kitchen light"
            query = NluQuery(input=text, id=f"q{i}", site_id="kitchen")
            observer.publish(NluQuery.topic(), query.to_json())
        assert observer.wait_for(
            lambda: (
                set(ids) <= set(final_replies(observer))
                and sum(sim.applied[f"hermes-q{i}-0"] for i in range(10)) == 10
            ),
            timeout=30,
        )
        time.sleep(1.0)  # late duplicates, if any, would arrive now
    finally:
        for bridge in bridges:
            bridge.stop()
        observer.close()
        sim.stop()

    replies = observer.json_on(f"{BASE}/reply")
    hermes_replies = [r for r in replies if r["id"].startswith("hermes-")]
    assert sorted(r["id"] for r in hermes_replies if r["status"] == "done") == sorted(
        f"hermes-q{i}" for i in range(10)
    )
    replies = [r for r in replies if not r["id"].startswith("hermes-")]
    accepted = Counter(r["id"] for r in replies if r["status"] == "accepted")
    final = Counter(r["id"] for r in replies if r["status"] != "accepted")
    assert accepted == Counter(ids) and final == Counter(ids)
    assert {r["status"] for r in replies if r["status"] != "accepted"} == {"done"}

    # one side effect per command at the devices, Hermes queries included
    command_ids = [f"{i}-0" for i in ids] + [f"hermes-q{i}-0" for i in range(10)]
    assert sorted(sim.applied) == sorted(command_ids)
    assert set(sim.applied.values()) == {1}

    # every Hermes query answered once, and both bridges worked
    hermes = [
        json.loads(p) for t, p, _ in observer.messages if t.startswith("hermes/i")
    ]
    assert sorted(h["id"] for h in hermes) == sorted(f"q{i}" for i in range(10))
    sent = _sent_by(observer)
    assert set(sent) == {"a", "b"} and min(sent.values()) >= 5, sent


def test_a_dead_bridges_share_moves_on_when_its_session_expires(
    tmp_path, broker, registry, recognizer
):
    sim = DeviceSimulator(registry, port=broker.port).start()
    observer = Observer(broker.port, ["#"])
    bridges = _two_bridges(
        tmp_path, broker.port, registry, recognizer, broker={"session_expiry": 1}
    )
    ids = [f"f{i}" for i in range(20)]
    try:
        bridges[0].kill()  # a board lost: no DISCONNECT, the broker notices the socket
        time.sleep(2.5)  # its session (expiry 1 s) is gone
        for n, request_id in enumerate(ids):
            text = TEXTS[n % len(TEXTS)]
            observer.publish(f"{BASE}/command", {"id": request_id, "text": text})
        assert observer.wait_for(
            lambda: set(ids) <= set(final_replies(observer)), timeout=20
        ), f"{len(set(ids) - set(final_replies(observer)))} requests stuck"
    finally:
        bridges[1].stop()
        observer.close()
        sim.stop()
    assert sorted(sim.applied) == sorted(f"{i}-0" for i in ids)
    assert set(sim.applied.values()) == {1}
