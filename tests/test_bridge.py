"""The MQTT bridge end to end against a real mosquitto: adapters, Hermes, CLI clients.

Each test starts its own broker on a free port, the simulated devices and a bridge
with the template recognizer, then drives it over MQTT like a user's tools would.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import time
import uuid
from collections import Counter

import jsonschema
import pytest
from bridge.harness import HOME_YAML, REPO, Observer, bridge_config, final_replies
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from rhasspyhermes.intent import Intent, Slot, SlotRange
from rhasspyhermes.nlu import NluIntent, NluIntentNotRecognized, NluQuery

from edgeslm.cli import _parser as _edgeslm_parser
from edgeslm.intent.registry import load_registry
from edgeslm.intent.result import IntentResult
from firmware_bridge.commands import (
    REQUEST_ID,
    CommandRejected,
    RateLimiter,
    plan_commands,
)
from firmware_bridge.config import BridgeConfigError, config_from_dict
from firmware_bridge.protocol import load_schema
from firmware_bridge.service import Bridge
from firmware_bridge.simulator import DeviceSimulator
from firmware_bridge.store import CommandStore

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
    _assert_protocol_messages_valid(observer)


def _assert_protocol_messages_valid(observer: Observer) -> None:
    """Every JSON-protocol command and ack seen on the broker matches its schema."""
    commands = jsonschema.Draft202012Validator(load_schema("command"))
    acks = jsonschema.Draft202012Validator(load_schema("ack"))
    for topic, payload, _ in list(observer.messages):
        if topic.startswith("home/") and topic.endswith("/command"):
            commands.validate(json.loads(payload))
        elif topic.endswith("/ack"):
            acks.validate(json.loads(payload))


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
    _assert_protocol_messages_valid(observer)

    # QoS 1 and never retained: a subscriber arriving later gets no old command
    late = Observer(observer.client._port, ["home/#", "zigbee2mqtt/#", "cmnd/#"])
    try:
        time.sleep(0.5)
        retained = [t for t, _, _ in late.messages if not t.endswith("/state")]
        assert not retained, retained
    finally:
        late.close()


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


def test_a_final_reply_the_broker_never_took_is_sent_after_a_restart(
    tmp_path, broker, registry, recognizer
):
    """Killed after closing requests but before their final replies reached the
    broker, the bridge answers them from its queue when it starts again, with the
    stored replies, and runs nothing twice. Replies the broker took are marked."""
    config = bridge_config(tmp_path, broker.port)
    sim = DeviceSimulator(registry, port=broker.port).start()
    observer = Observer(broker.port, [f"{BASE}/reply"])
    first = Bridge(config, registry, recognizer)

    def lose_final_replies(reply, topic, correlation):
        if reply["status"] == "accepted" or reply["id"] == "kept":
            return Bridge._publish_reply(first, reply, topic, correlation)
        return None  # as if the process died before paho wrote it

    first._publish_reply = lose_final_replies
    first.start()
    second = None
    try:
        assert first.connected.wait(10)
        time.sleep(0.2)
        for request_id, text in [
            ("kept", "turn off the kitchen light"),
            ("done", "turn on the kitchen light"),
            ("refused", "open the pod bay doors"),
        ]:
            observer.publish(f"{BASE}/command", {"id": request_id, "text": text})
        assert observer.wait_for(lambda: "kept" in final_replies(observer))
        assert observer.wait_for(lambda: sim.applied.get("done-0") == 1)
        time.sleep(0.5)  # the refusal is closed too
        assert set(final_replies(observer)) == {"kept"}
        first.kill()

        second = Bridge(config, registry, recognizer)
        second.start()
        assert observer.wait_for(
            lambda: {"done", "refused"} <= set(final_replies(observer))
        ), final_replies(observer)
        replies = final_replies(observer)
        assert replies["done"]["status"] == "done"
        assert replies["done"]["commands"][0]["state"] == {"state": "ON"}
        assert replies["refused"]["status"] == "not_recognized"
        assert replies["refused"]["error"]["code"] == "not_recognized"
        assert sim.applied["done-0"] == 1 and sim.applied["kept-0"] == 1
        assert observer.wait_for(lambda: second._store.unreplied() == [])
    finally:
        (second or first).stop()
        observer.close()
        sim.stop()
    store = CommandStore(config.queue)
    try:
        assert {
            i: store.request(i)["replied"] for i in ("kept", "done", "refused")
        } == {
            "kept": 1,
            "done": 1,
            "refused": 1,
        }
    finally:
        store.close()


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


def test_unanswered_command_is_resent_a_bounded_number_of_times(
    tmp_path, broker, registry, recognizer
):
    observer = Observer(broker.port, ["#"])
    config = bridge_config(
        tmp_path, broker.port, delivery={"ack_timeout": 0.2, "max_attempts": 3}
    )
    bridge = Bridge(config, registry, recognizer)
    bridge.start()
    try:  # no device answers
        assert bridge.connected.wait(10)
        time.sleep(0.2)
        observer.publish(f"{BASE}/command", {"id": "lost", "text": "turn on the fan"})
        assert observer.wait_for(lambda: "lost" in final_replies(observer))
        time.sleep(0.5)  # a fourth attempt would be here by now
    finally:
        bridge.stop()
        observer.close()
    reply = final_replies(observer)["lost"]
    assert reply["status"] == "failed"
    assert reply["commands"][0]["error"] == "no ack after 3 attempts"
    sent = [p for t, p, _ in observer.messages if t == "cmnd/tasmota_fan/POWER"]
    assert sent == [b"ON"] * 3


def test_acks_from_the_wrong_device_or_with_unknown_status_are_ignored(
    tmp_path, broker, registry, recognizer
):
    observer = Observer(broker.port, [f"{BASE}/#", "home/#"])
    config = bridge_config(tmp_path, broker.port, delivery={"ack_timeout": 30})
    bridge = Bridge(config, registry, recognizer)
    bridge.start()
    ack_topic = f"{BASE}/bridge/bridge/ack"
    try:  # no device: the test answers for it
        assert bridge.connected.wait(10)
        time.sleep(0.2)
        observer.publish(
            f"{BASE}/command", {"id": "k", "text": "turn on the kitchen light"}
        )
        assert observer.wait_for(
            lambda: any(
                t == "home/kitchen/light/command" for t, _, _ in observer.messages
            )
        )
        fake = {"id": "k-0", "device": "cover.blinds", "status": "ok", "state": {}}
        observer.publish(ack_topic, fake)
        observer.publish(
            ack_topic, {**fake, "device": "light.kitchen", "status": "yes"}
        )
        time.sleep(0.5)
        assert "k" not in final_replies(observer)
        good = {"id": "k-0", "device": "light.kitchen", "status": "ok"}
        observer.publish(ack_topic, {**good, "state": {"state": "ON"}})
        assert observer.wait_for(lambda: "k" in final_replies(observer))
        assert final_replies(observer)["k"]["status"] == "done"
    finally:
        bridge.stop()
        observer.close()


def test_mqtt_311_end_to_end(running):
    bridge, sim, observer = running(broker={"protocol": "3.1.1"})
    observer.publish(
        f"{BASE}/command", {"id": "old", "text": "turn on the kitchen light"}
    )
    assert observer.wait_for(lambda: "old" in final_replies(observer))
    assert final_replies(observer)["old"]["status"] == "done"
    topic, payload, props = next(
        m for m in observer.messages if m[0] == "home/kitchen/light/command"
    )
    assert not hasattr(props, "MessageExpiryInterval")  # no MQTT 5 properties...
    assert json.loads(payload)["reply_to"] == f"{BASE}/bridge/bridge/ack"  # ...so this


def test_layered_recognizer_reaches_devices_through_the_encoder(
    tmp_path, broker, registry
):
    """`recognizer: encoder` builds edgeslm.intent's recognizer (without its chat
    model); a request no template matches reaches the device through the encoder."""
    sim = DeviceSimulator(registry, port=broker.port).start()
    observer = Observer(broker.port, [f"{BASE}/reply"])
    bridge = Bridge(bridge_config(tmp_path, broker.port, recognizer="encoder"))
    bridge.start()
    try:
        assert bridge.connected.wait(10)
        time.sleep(0.2)
        # No template matches it; the encoder is well over its threshold (0.7).
        observer.publish(
            f"{BASE}/command", {"id": "e1", "text": "shut the kitchen light off now"}
        )
        observer.publish(f"{BASE}/command", {"id": "e2", "text": "turn on the fan"})
        assert observer.wait_for(lambda: {"e1", "e2"} <= set(final_replies(observer)))
    finally:
        bridge.stop()
        observer.close()
        sim.stop()
    replies = final_replies(observer)
    assert replies["e1"]["intent"]["layer"] == "encoder", replies["e1"]
    assert replies["e1"]["status"] == "done"
    assert [c["action"] for c in replies["e1"]["commands"]] == ["off"]
    assert replies["e2"]["intent"]["layer"] == "template"
    assert sim.states["switch.fan"]["state"] == "ON"


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


def _statuses(observer: Observer, request_id: str) -> list[str]:
    """The statuses of every reply to `request_id`, in order, `accepted` included."""
    return [
        r["status"] for r in observer.json_on(f"{BASE}/reply") if r["id"] == request_id
    ]


def test_rate_limited_request_is_carried_out_when_resent_with_its_id(running):
    bridge, sim, observer = running(rate_limit={"per_second": 0.5, "burst": 1})
    observer.publish(f"{BASE}/command", {"id": "w1", "text": "turn on the fan"})
    observer.publish(f"{BASE}/command", {"id": "w2", "text": "turn off the fan"})
    assert observer.wait_for(lambda: "rejected" in _statuses(observer, "w2"))
    error = final_replies(observer)["w2"]["error"]
    assert error["code"] == "rate_limited" and "'switch.fan'" in error["message"]

    # as the error invites: wait for a token, then send the same request again
    time.sleep(2.2)
    observer.publish(f"{BASE}/command", {"id": "w2", "text": "turn off the fan"})
    assert observer.wait_for(lambda: "done" in _statuses(observer, "w2"))
    assert _statuses(observer, "w2") == ["rejected", "accepted", "done"]
    assert sim.applied["switch.fan"] == 2
    assert sim.states["switch.fan"]["state"] == "OFF"


def test_rate_limit_refusal_takes_no_other_devices_tokens(running):
    bridge, sim, observer = running(rate_limit={"per_second": 0.001, "burst": 1})
    observer.publish(f"{BASE}/command", {"id": "t1", "text": "close the blinds"})
    assert observer.wait_for(lambda: "t1" in final_replies(observer))

    # the thermostat has its token, the blinds have none: refused, nothing taken
    both = {"id": "t2", "intent": "HassTurnOff", "slots": {"area": "living_room"}}
    observer.publish(f"{BASE}/command", both)
    assert observer.wait_for(lambda: "t2" in final_replies(observer))
    refused = final_replies(observer)["t2"]
    assert refused["error"]["code"] == "rate_limited", refused
    assert "'cover.blinds'" in refused["error"]["message"]

    # so the thermostat's token is still there
    observer.publish(f"{BASE}/command", {"id": "t3", "text": "turn off the thermostat"})
    assert observer.wait_for(lambda: "t3" in final_replies(observer))
    assert final_replies(observer)["t3"]["status"] == "done", final_replies(observer)
    assert sim.applied["t1-0"] == sim.applied["t3-0"] == 1  # JSON devices: by id
    assert sim.total_applied() == 2


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _assert_hermes_fields(cls: type, payload: dict) -> None:
    """`payload` uses only the fields of Rhasspy's class `cls`, has the required
    ones, and survives the class's own reading and writing unchanged."""
    fields = {_camel(f.name): f for f in dataclasses.fields(cls)}
    required = {
        k
        for k, f in fields.items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    assert set(payload) <= set(fields), set(payload) - set(fields)
    assert required <= set(payload), required - set(payload)
    again = _without_none(cls.from_dict(payload).to_dict())
    assert {k: again[k] for k in payload} == payload


def _without_none(value):
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_none(v) for v in value]
    return value


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

    # field by field, against the reference classes
    payload = observer.json_on(intent_topic)[0]
    _assert_hermes_fields(NluIntent, payload)
    _assert_hermes_fields(Intent, payload["intent"])
    for slot in payload["slots"]:
        _assert_hermes_fields(Slot, slot)
        if "range" in slot:
            _assert_hermes_fields(SlotRange, slot["range"])
    _assert_hermes_fields(
        NluIntentNotRecognized, observer.json_on(NluIntentNotRecognized.topic())[0]
    )
    assert observer.wait_for(lambda: sim.applied["switch.fan"] == 1)  # execute: true

    # queries without an id are each carried out (nothing to deduplicate them by)
    for _ in range(2):
        observer.publish(NluQuery.topic(), NluQuery(input="turn on the fan").to_json())
    assert observer.wait_for(lambda: sim.applied["switch.fan"] == 3)


def test_hermes_queries_of_one_session_without_id_each_act_once(running):
    """Rhasspy's dialogue manager sends NluQuery with a sessionId and no id."""
    bridge, sim, observer = running()
    session = str(uuid.uuid4())
    first = NluQuery(input="turn on the fan", session_id=session).to_json()
    second = NluQuery(input="turn off the fan", session_id=session).to_json()
    observer.publish(NluQuery.topic(), first)
    assert observer.wait_for(lambda: sim.applied["switch.fan"] == 1)
    observer.publish(NluQuery.topic(), second)  # continueSession: a new query
    observer.publish(NluQuery.topic(), first)  # a redelivery of the first one

    def finals() -> list[dict]:
        replies = observer.json_on(f"{BASE}/reply")
        return [r for r in replies if r["status"] != "accepted"]

    assert observer.wait_for(lambda: len(finals()) == 3), finals()
    ids = Counter(r["id"] for r in finals())  # the first twice, the second once
    assert sorted(ids.values()) == [1, 2], ids
    assert all(REQUEST_ID.fullmatch(i) for i in ids), ids
    assert sim.applied["switch.fan"] == 2
    assert sim.states["switch.fan"]["state"] == "OFF"  # the redelivery did not act


def test_hermes_input_over_1000_characters_is_refused_like_a_command(running):
    bridge, sim, observer = running()
    text = "turn on the fan" + " " * 1000  # its first 1000 characters would act
    query = NluQuery(input=text, id="long", session_id="s-long").to_json()
    observer.publish(NluQuery.topic(), query, properties=_correlated(b"query"))
    command = json.dumps({"id": "long", "text": text})
    observer.publish(f"{BASE}/command", command, properties=_correlated(b"command"))

    def errors() -> dict[bytes, dict]:
        return {
            props.CorrelationData: json.loads(payload)["error"]
            for topic, payload, props in list(observer.messages)
            if topic == f"{BASE}/error"
        }

    assert observer.wait_for(lambda: len(errors()) == 2), errors()
    assert errors()[b"query"]["code"] == errors()[b"command"]["code"] == "too_long"
    assert "1000 characters" in errors()[b"query"]["message"]
    missed = observer.json_on(NluIntentNotRecognized.topic())
    assert [(m["id"], m["sessionId"]) for m in missed] == [("long", "s-long")]
    time.sleep(0.3)
    assert sim.total_applied() == 0
    assert not [t for t, _, _ in observer.messages if t.startswith("hermes/intent/")]


def _correlated(data: bytes) -> Properties:
    """MQTT 5 PUBLISH properties carrying `data` as correlation data."""
    props = Properties(PacketTypes.PUBLISH)
    props.CorrelationData = data
    return props


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


def test_demo_starts_everything_and_shows_states_change():
    run = subprocess.run(
        [sys.executable, "-m", "edgeslm", "bridge", "--demo"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    out = run.stdout
    assert "mosquitto: started on 127.0.0.1:" in out
    assert "light.kitchen on -> done" in out and "switch.fan on -> done" in out
    # the thermostat cannot go to 40 degrees, and there is no sauna
    assert out.count("rejected") + out.count("not recognized") >= 2, out
    changed = [line for line in out.splitlines() if line.startswith("* ")]
    assert {line.split()[1] for line in changed} >= {"switch.fan", "light.desk_lamp"}


def test_systemd_unit_example_is_valid(tmp_path):
    unit = (
        REPO / "firmware_bridge" / "examples" / "edgeslm-bridge.service"
    ).read_text()
    command = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    argv = command.removeprefix("ExecStart=").split()
    assert argv[0].endswith("/edgeslm") and argv[1:3] == ["bridge", "--config"]
    args = _edgeslm_parser().parse_args(argv[1:])
    assert args.config == "/etc/edgeslm/bridge.yaml" and not args.demo

    # systemd's own checker, with the executable pointed at the installed one
    installed = shutil.which("edgeslm")
    assert installed, "the edgeslm command is not installed: pip install -e ."
    (tmp_path / "edgeslm-bridge.service").write_text(unit.replace(argv[0], installed))
    check = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "edgeslm-bridge.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "edgeslm-bridge.service" not in check.stdout + check.stderr


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
        (
            dataclasses.replace(
                _result("HassClimateSetTemperature", name="climate.living_room"),
                error="temperature 35 is outside 16..28",
            ),
            "intent_error",
        ),
    ],
)
def test_safety_gate_rejects(registry, result, code):
    with pytest.raises(CommandRejected) as info:
        plan_commands(registry, result, "r", ttl=10)
    assert info.value.code == code


def test_low_confidence_intents_are_not_carried_out(registry):
    guess = IntentResult(
        text="t",
        intent="HassTurnOn",
        slots={"name": "switch.fan"},
        confidence=0.3,
        layer="chat",
    )
    with pytest.raises(CommandRejected) as info:
        plan_commands(registry, guess, "r", ttl=10, min_confidence=0.5)
    assert info.value.code == "low_confidence" and "chat layer" in str(info.value)
    assert plan_commands(registry, guess, "r", ttl=10, min_confidence=0.3)


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


def test_rate_limiter_takes_all_tokens_or_none():
    limiter = RateLimiter(per_second=0.0, burst=2)
    assert limiter.take(Counter({"a": 1, "b": 2}), now=0.0) is None
    assert limiter.take(Counter({"a": 1, "b": 1}), now=0.0) == "b"
    assert limiter.allow("a", now=0.0)  # "a" kept the token of the refused request
    assert not limiter.allow("a", now=0.0)


def test_registry_topics_that_are_not_publish_topics_are_refused(tmp_path):
    text = HOME_YAML.read_text().replace(
        "topic: home/kitchen/light}", "topic: home/+/light}"
    )
    (tmp_path / "home.yaml").write_text(text)
    config = bridge_config(tmp_path, 1, registry=str(tmp_path / "home.yaml"))
    with pytest.raises(BridgeConfigError, match="light.kitchen.*wildcards"):
        Bridge(config, load_registry(tmp_path / "home.yaml"))


def test_config_rejects_unknown_keys_and_bad_values(tmp_path):
    with pytest.raises(BridgeConfigError, match="unknown keys \\['acktimeout'\\]"):
        config_from_dict({"registry": "r.yaml", "delivery": {"acktimeout": 1}})
    with pytest.raises(BridgeConfigError, match="site"):
        config_from_dict({"registry": "r.yaml", "site": "a/#"})
    with pytest.raises(BridgeConfigError, match="broker.tls.ca: no file at"):
        config_from_dict({"registry": "r.yaml", "broker": {"tls": {"ca": "no.crt"}}})
    with pytest.raises(BridgeConfigError, match="min_confidence must be in 0..1"):
        config_from_dict({"registry": "r.yaml", "min_confidence": 2})
    with pytest.raises(BridgeConfigError, match="share_group needs"):
        config_from_dict(
            {"registry": "r.yaml", "share_group": "g", "broker": {"protocol": "3.1.1"}}
        )
