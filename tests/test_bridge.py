"""The MQTT bridge end to end against a real mosquitto: adapters, Hermes, CLI clients.

Each test starts its own broker on a free port, the simulated devices and a bridge
with the template recognizer, then drives it over MQTT like a user's tools would.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from bridge.harness import Observer, bridge_config, final_replies
from rhasspyhermes.nlu import NluIntent, NluIntentNotRecognized, NluQuery

from edgeslm.intent.result import IntentResult
from firmware_bridge.commands import CommandRejected, RateLimiter, plan_commands
from firmware_bridge.config import BridgeConfigError, config_from_dict
from firmware_bridge.service import Bridge
from firmware_bridge.simulator import DeviceSimulator

BASE = "edgeslm/default"


@pytest.fixture
def running(tmp_path, broker, registry, recognizer):
    """(bridge, simulator, observer) on a fresh broker; everything stopped after."""
    started = []

    def start(sim_kwargs=None, **overrides):
        config = bridge_config(tmp_path, broker.port, **overrides)
        sim = DeviceSimulator(registry, port=broker.port, **(sim_kwargs or {})).start()
        observer = Observer(broker.port, ["#"])
        bridge = Bridge(config, registry, recognizer)
        bridge.start()
        assert bridge.connected.wait(10), "bridge did not connect"
        started.extend([bridge, sim, observer])
        time.sleep(0.2)  # subscriptions settle
        return bridge, sim, observer

    yield start
    for item in started:
        item.stop() if not isinstance(item, Observer) else item.close()


@pytest.mark.parametrize(
    "text, device, ack_topic, state, reported",
    [
        (
            "turn on the kitchen light",
            "light.kitchen",
            f"{BASE}/bridge/bridge/ack",
            {"state": "ON"},
            {"state": "ON"},
        ),
        (
            "set the desk lamp to 40%",
            "light.desk_lamp",
            "zigbee2mqtt/desk_lamp",
            {"state": "ON", "brightness": 102},
            {"state": "ON", "brightness": 40},
        ),
        (
            "turn on the fan",
            "switch.fan",
            "stat/tasmota_fan/RESULT",
            {"state": "ON"},
            {"state": "ON"},
        ),
    ],
    ids=["json", "zigbee2mqtt", "tasmota"],
)
def test_text_to_device_to_ack_to_reply(
    running, text, device, ack_topic, state, reported
):
    bridge, sim, observer = running()
    observer.publish(f"{BASE}/command", {"id": "r1", "text": text})
    assert observer.wait_for(lambda: "r1" in final_replies(observer)), observer.messages

    reply = final_replies(observer)["r1"]
    assert reply["status"] == "done", reply
    assert reply["intent"]["layer"] == "template"
    assert [c["device"] for c in reply["commands"]] == [device]
    for key, value in state.items():
        assert sim.states[device][key] == value  # the device's own units
    assert reply["commands"][0]["state"] == reported  # the bridge's units (percent)
    assert observer.json_on(ack_topic), f"no outcome message on {ack_topic}"
    accepted = [
        r for r in observer.json_on(f"{BASE}/reply") if r["status"] == "accepted"
    ]
    assert [r["id"] for r in accepted] == ["r1"]
    assert sim.total_applied() == 1


def test_json_command_carries_mqtt5_delivery_properties(running):
    bridge, sim, observer = running()
    observer.publish(f"{BASE}/command", "set the kitchen light to 30 percent")
    assert observer.wait_for(lambda: final_replies(observer))
    topic, payload, props = next(
        m for m in observer.messages if m[0] == "home/kitchen/light/command"
    )
    command = json.loads(payload)
    assert command["action"] == "brightness" and command["value"] == 30
    assert 1 <= props.MessageExpiryInterval <= 60
    assert props.ResponseTopic == f"{BASE}/bridge/bridge/ack"
    assert props.CorrelationData == command["id"].encode()
    assert sim.states["light.kitchen"]["brightness"] == 30


def test_lost_acks_are_resent_and_never_applied_twice(running):
    bridge, sim, observer = running(sim_kwargs={"drop_acks": 2})
    ids = [f"a{i}" for i in range(10)]
    for i, request_id in enumerate(ids):
        verb = "on" if i % 2 else "off"
        observer.publish(
            f"{BASE}/command",
            {"id": request_id, "text": f"turn {verb} the kitchen light"},
        )
    assert observer.wait_for(lambda: len(final_replies(observer)) == 10, timeout=30)
    assert {r["status"] for r in final_replies(observer).values()} == {"done"}
    assert sim.duplicates >= 4  # every second ack lost: the resends were seen again
    assert sorted(sim.applied) == sorted(f"{i}-0" for i in ids)
    assert set(sim.applied.values()) == {1}
    assert sim.states["light.kitchen"]["state"] == "ON"  # order kept: last was "on"


def test_repeated_request_id_answers_without_acting_again(running):
    bridge, sim, observer = running()
    for _ in range(3):
        observer.publish(f"{BASE}/command", {"id": "same", "text": "turn on the fan"})
        time.sleep(0.3)
    assert observer.wait_for(
        lambda: (
            len([r for r in observer.json_on(f"{BASE}/reply") if r["status"] == "done"])
            >= 2
        )
    )
    assert sim.applied["switch.fan"] == 1


def test_stale_command_expires_and_is_reported(tmp_path, broker, registry, recognizer):
    observer = Observer(broker.port, [f"{BASE}/#"])
    config = bridge_config(tmp_path, broker.port, delivery={"command_ttl": 1.0})
    bridge = Bridge(config, registry, recognizer)
    bridge.start()
    assert bridge.connected.wait(10)
    time.sleep(0.2)
    try:  # no device answers
        observer.publish(
            f"{BASE}/command", {"id": "old", "text": "turn on the kitchen light"}
        )
        assert observer.wait_for(lambda: "old" in final_replies(observer), timeout=10)
        reply = final_replies(observer)["old"]
        assert reply["status"] == "failed"
        assert reply["commands"][0]["status"] == "expired"
        assert observer.wait_for(
            lambda: any(e["id"] == "old" for e in observer.json_on(f"{BASE}/error"))
        )
    finally:
        bridge.stop()
        observer.close()


def test_dry_run_publishes_nothing_to_devices(running):
    bridge, sim, observer = running(dry_run=True)
    observer.publish(f"{BASE}/command", {"id": "d1", "text": "turn on the fan"})
    assert observer.wait_for(lambda: "d1" in final_replies(observer))
    assert final_replies(observer)["d1"]["status"] == "dry_run"
    time.sleep(0.3)
    assert not [m for m in observer.messages if m[0].startswith("cmnd/")]
    assert sim.total_applied() == 0


def test_rate_limit_per_device(running):
    bridge, sim, observer = running(rate_limit={"per_second": 0.01, "burst": 2})
    for i in range(3):
        observer.publish(f"{BASE}/command", {"id": f"x{i}", "text": "turn on the fan"})
    assert observer.wait_for(lambda: len(final_replies(observer)) == 3)
    replies = final_replies(observer)
    assert replies["x2"]["status"] == "rejected"
    assert replies["x2"]["error"]["code"] == "rate_limited"
    assert sim.applied["switch.fan"] == 2


def test_hermes_query_answers_with_schema_valid_messages(running):
    bridge, sim, observer = running()
    query = NluQuery(
        input="turn off the fan", site_id="bedroom", id="q1", session_id="s1"
    )
    observer.publish(NluQuery.topic(), query.to_json())
    observer.publish(
        NluQuery.topic(), NluQuery(input="sing me a song", id="q2").to_json()
    )
    intent_topic = NluIntent.topic(intent_name="HassTurnOff")
    assert observer.wait_for(
        lambda: (
            observer.json_on(intent_topic)
            and observer.json_on(NluIntentNotRecognized.topic())
        )
    )
    intent = NluIntent.from_dict(observer.json_on(intent_topic)[0])
    assert intent.intent.intent_name == "HassTurnOff"
    assert (
        intent.site_id == "bedroom" and intent.id == "q1" and intent.session_id == "s1"
    )
    assert {s.slot_name: s.value["value"] for s in intent.slots} == {
        "name": "switch.fan"
    }
    missed = NluIntentNotRecognized.from_dict(
        observer.json_on(NluIntentNotRecognized.topic())[0]
    )
    assert missed.input == "sing me a song" and missed.id == "q2"
    assert observer.wait_for(lambda: sim.applied["switch.fan"] == 1)  # execute: true


def test_home_assistant_discovery_and_last_will(running):
    bridge, sim, observer = running(broker={"keepalive": 2})
    configs = [m for m in observer.messages if m[0].startswith("homeassistant/")]
    assert {json.loads(p)["unique_id"] for _, p, _ in configs} == {
        "edgeslm_bridge_availability",
        "edgeslm_bridge_last_command",
    }
    availability = f"{BASE}/bridge/bridge/availability"
    assert [p for t, p, _ in observer.messages if t == availability] == [b"online"]
    bridge.kill()  # no DISCONNECT: the broker publishes the will after keepalive
    assert observer.wait_for(
        lambda: (
            [p for t, p, _ in observer.messages if t == availability][-1] == b"offline"
        ),
        timeout=15,
    )


def test_mosquitto_command_line_clients_drive_the_bridge(running):
    bridge, sim, observer = running()
    port = str(observer.client._port)
    sub = subprocess.Popen(
        ["mosquitto_sub", "-p", port, "-t", f"{BASE}/reply", "-C", "2", "-W", "20"],
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.3)
    subprocess.run(
        [
            "mosquitto_pub",
            "-p",
            port,
            "-q",
            "1",
            "-t",
            f"{BASE}/command",
            "-m",
            "turn on the fan",
        ],
        check=True,
        timeout=20,
    )
    out, _ = sub.communicate(timeout=25)
    statuses = [json.loads(line)["status"] for line in out.splitlines()]
    assert statuses == ["accepted", "done"]
    assert sim.states["switch.fan"]["state"] == "ON"


# --- the safety gate without a broker ---------------------------------------------


def _result(intent, **slots):
    return IntentResult(text="t", intent=intent, slots=slots, confidence=1.0)


@pytest.mark.parametrize(
    "result, code",
    [
        (_result("HassLightSet", name="light.kitchen", brightness=140), "out_of_range"),
        (
            _result("HassLightSet", name="light.kitchen", brightness=float("nan")),
            "out_of_range",
        ),
        (_result("HassLightSet", name="light.kitchen", brightness="40"), "bad_value"),
        (
            _result(
                "HassClimateSetTemperature", name="climate.thermostat", temperature=40
            ),
            "out_of_range",
        ),
        (
            _result("HassSetPosition", name="switch.fan", position=10),
            "action_not_allowed",
        ),
        (_result("HassTurnOn", name="light.hallway"), "no_route"),
        (_result("HassTurnOn", name="light.garage"), "no_device"),
        (_result("HassTurnOn"), "no_device"),
        (_result("HassGetWeather", name="switch.fan"), "unsupported_intent"),
        (_result(None), "not_recognized"),
    ],
)
def test_safety_gate_rejects(registry, result, code):
    with pytest.raises(CommandRejected) as info:
        plan_commands(registry, result, "r", ttl=10)
    assert info.value.code == code


def test_plan_targets_an_area_and_ids_are_stable(registry):
    result = _result("HassTurnOff", area="living_room")
    first = plan_commands(registry, result, "req", ttl=10, now=0.0)
    again = plan_commands(registry, result, "req", ttl=10, now=5.0)
    assert [(c.id, c.device, c.action) for c in first] == [
        ("req-0", "climate.thermostat", "off"),
        ("req-1", "cover.blinds", "close"),
    ]
    assert [c.id for c in again] == [c.id for c in first]


def test_rate_limiter_refills():
    limiter = RateLimiter(per_second=1.0, burst=2)
    assert [limiter.allow("d", now=0.0) for _ in range(3)] == [True, True, False]
    assert limiter.allow("d", now=1.01) and not limiter.allow("d", now=1.02)


def test_config_rejects_unknown_keys_and_bad_values(tmp_path):
    with pytest.raises(BridgeConfigError, match="unknown keys \\['acktimeout'\\]"):
        config_from_dict({"registry": "r.yaml", "delivery": {"acktimeout": 1}})
    with pytest.raises(BridgeConfigError, match="site"):
        config_from_dict({"registry": "r.yaml", "site": "a/#"})
    with pytest.raises(BridgeConfigError, match="share_group needs"):
        config_from_dict(
            {"registry": "r.yaml", "share_group": "g", "broker": {"protocol": "3.1.1"}}
        )
