"""Bad input: every hostile request is answered on the error topic, nothing else moves.

Against a real mosquitto: random bytes, invalid UTF-8, wrong JSON types, 1 MB
messages, unknown devices, out-of-range values and requests that try to name a topic
(in the payload, in the text, in an MQTT 5 response topic) go to the command topic
and to `hermes/nlu/query`, each with its own correlation data. Each must come back on
`<prefix>/<site>/error` with that correlation data and an error code; the bridge must
keep running, publish only to topics the registry and its configuration fix, and no
device may act. Then hypothesis drives the request parser alone, many times over.
"""

from __future__ import annotations

import json
import random
import time

import hypothesis.strategies as st
from bridge.harness import Observer, bridge_config, final_replies
from hypothesis import given, settings
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from firmware_bridge import hermes
from firmware_bridge.requests import BadRequest, parse_request
from firmware_bridge.service import Bridge
from firmware_bridge.simulator import DeviceSimulator

BASE = "edgeslm/default"
_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True)
    | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def _allowed_topics(bridge: Bridge, registry) -> set[str]:
    """Every topic the bridge may publish to, from the registry and config alone."""
    t = bridge.topics
    topics = {t.reply, t.error, t.availability, t.last_command}
    topics |= {"hermes/nlu/intentNotRecognized"}
    topics |= {
        f"homeassistant/{kind}/edgeslm_bridge/{name}/config"
        for kind, name in (
            ("binary_sensor", "availability"),
            ("sensor", "last_command"),
        )
    }
    for device in registry.devices:
        if device.mqtt is None:
            continue
        topic, adapter = device.mqtt["topic"], device.mqtt["adapter"]
        if adapter == "json":
            topics.add(f"{topic}/command")
        elif adapter == "zigbee2mqtt":
            topics.add(f"{topic}/set")
        else:
            topics |= {
                f"cmnd/{topic}/{c}" for c in ("POWER", "Dimmer", "ShutterPosition")
            }
    return topics


def _hostile_requests(rng: random.Random) -> list[tuple[bytes, str | None]]:
    """(payload, MQTT 5 response topic) pairs that the bridge must refuse."""
    texts: list[object] = [
        # wrong JSON types and shapes
        [],
        5,
        "just a string",
        None,
        {"text": 5},
        {"text": []},
        {"text": ""},
        {"text": "   "},
        {"id": 5, "text": "turn on the fan"},
        {"id": "a/b", "text": "turn on the fan"},
        {"id": "x" * 49, "text": "turn on the fan"},
        {"id": "ok\n", "text": "turn on the fan"},
        {"intent": 5},
        {"intent": "HassTurnOn", "slots": []},
        {"intent": "HassTurnOn", "slots": {"name": {"nested": 1}}},
        {"intent": "HassTurnOn", "slots": {"domain": {"light": 1}}},
        {"intent": "HassTurnOn", "slots": {"name": None}},
        {"slots": {"name": "switch.fan"}},
        {"text": "turn on the fan", "extra": True},
        # unknown devices
        {"intent": "HassTurnOn", "slots": {"name": "light.garage"}},
        {"intent": "HassTurnOn", "slots": {"area": "garage"}},
        {"text": "turn on the garage light"},
        {"intent": "HassTurnOn", "slots": {"name": "light.hallway"}},  # no mqtt
        # values out of range or of the wrong kind
        {
            "intent": "HassLightSet",
            "slots": {"name": "light.kitchen", "brightness": 150},
        },
        {
            "intent": "HassLightSet",
            "slots": {"name": "light.kitchen", "brightness": -1},
        },
        {
            "intent": "HassLightSet",
            "slots": {"name": "light.kitchen", "brightness": "9"},
        },
        {
            "intent": "HassLightSet",
            "slots": {"name": "light.kitchen", "brightness": 1e308},
        },
        {
            "intent": "HassClimateSetTemperature",
            "slots": {"name": "climate.thermostat", "temperature": 99},
        },
        {"intent": "HassSetPosition", "slots": {"name": "switch.fan", "position": 5}},
        {"intent": "HassGetWeather", "slots": {"name": "switch.fan"}},
        # requests that try to name a topic
        {"text": "turn on the fan", "topic": "cmnd/tasmota_fan/POWER"},
        {"text": "turn on the fan", "reply_to": "home/kitchen/light/command"},
        {"intent": "HassTurnOn", "slots": {"name": "home/kitchen/light"}},
        {"intent": "HassTurnOn", "slots": {"name": "cmnd/tasmota_fan/POWER"}},
        {"text": "publish ON to cmnd/tasmota_fan/POWER"},
        {"text": "turn on home/kitchen/light/command"},
        {"text": "turn on the # light"},
        # text: too long, control characters, nothing a template knows
        {"text": "turn on the fan " * 100},
        {"text": "turn on\x00 the fan"},
        {"text": "sing me a song"},
    ]
    out: list[tuple[bytes, str | None]] = []
    for item in texts:
        out.append((json.dumps(item).encode(), None))
    out += [(b"NaN", None), (b'{"text": NaN}', None), (b'{"text": "a"', None)]
    out += [(b"x" * 1_000_000, None)]
    out += [(json.dumps({"text": "on " * 350_000}).encode(), None)]
    out += [(b"\xff\xfe" + bytes(rng.randrange(256) for _ in range(40)), None)]
    out += [("turn on the fan".encode("utf-16"), None)]
    out += [(b"turn on the \xc3\x28 fan", None)]
    for _ in range(30):
        out.append(
            (bytes(rng.randrange(256) for _ in range(rng.randrange(1, 80))), None)
        )
    for _ in range(20):  # printable noise: valid UTF-8 text nothing recognizes
        noise = "".join(rng.choice("abcdefghij /#+$\u00e9{}") for _ in range(30))
        out.append((noise.encode(), None))

    # valid requests with a response topic off the allow-list
    good = json.dumps({"text": "turn on the fan"}).encode()
    for topic in (
        "cmnd/tasmota_fan/POWER",
        "home/kitchen/light/command",
        f"{BASE}/reply/#",
        f"{BASE}/replyX",
        "$SYS/broker",
        "hermes/intent/HassTurnOn",
        f"{BASE}/reply/" + "/".join("a" * 20),
    ):
        out.append((good, topic))
    return out


def _hostile_queries(rng: random.Random) -> list[bytes]:
    queries: list[object] = [
        [],
        {"input": 5},
        {"text": "turn on the fan"},
        {"input": "turn on the fan", "siteId": 5},
        {"input": "turn on the fan", "intentFilter": "HassTurnOn"},
        {"input": "turn on the fan", "intentFilter": [1, 2]},
    ]
    out = [json.dumps(q).encode() for q in queries]
    out += [b"\xff\x00garbage", b"{", b"x" * 1_000_000]
    out += [bytes(rng.randrange(256) for _ in range(20)) for _ in range(5)]
    return out


def _send(observer: Observer, topic: str, payload: bytes, tag: str, reply_to=None):
    properties = Properties(PacketTypes.PUBLISH)
    properties.CorrelationData = tag.encode()
    if reply_to is not None:
        properties.ResponseTopic = reply_to
    observer.client.publish(topic, payload, qos=1, properties=properties)


def test_fuzzed_requests_are_each_answered_on_the_error_topic(
    tmp_path, broker, registry, recognizer
):
    rng = random.Random(7)
    sim = DeviceSimulator(registry, port=broker.port).start()
    observer = Observer(broker.port, ["#"])
    bridge = Bridge(bridge_config(tmp_path, broker.port), registry, recognizer)
    published: list[str] = []
    real_publish = bridge.client.publish

    def spy(topic, *args, **kwargs):
        published.append(topic)
        return real_publish(topic, *args, **kwargs)

    bridge.client.publish = spy
    bridge.start()
    try:
        assert bridge.connected.wait(10)
        time.sleep(0.3)
        requests = _hostile_requests(rng)
        queries = _hostile_queries(rng)
        tags = {}
        for n, (payload, reply_to) in enumerate(requests):
            tags[f"cmd-{n}"] = payload
            _send(observer, f"{BASE}/command", payload, f"cmd-{n}", reply_to)
        for n, payload in enumerate(queries):
            tags[f"nlu-{n}"] = payload
            _send(observer, hermes.QUERY_TOPIC, payload, f"nlu-{n}")
        for payload in [b"\xff", b"[]", b'{"id": 5}', b'{"id": "x", "status": "ok"}']:
            observer.publish(f"{BASE}/bridge/bridge/ack", payload)  # dropped, logged
            observer.publish("zigbee2mqtt/desk_lamp", payload)  # ignored
            observer.publish("stat/tasmota_fan/RESULT", payload)

        def answered() -> dict[str, dict]:
            out = {}
            for topic, payload, props in list(observer.messages):
                correlation = getattr(props, "CorrelationData", None)
                if topic == f"{BASE}/error" and correlation:
                    out[correlation.decode()] = json.loads(payload)
            return out

        observer.wait_for(lambda: set(tags) <= set(answered()), timeout=60)
        errors = answered()
        missing = {t: tags[t][:80] for t in tags if t not in errors}
        assert not missing, f"{len(missing)} requests got no error: {missing}"
        codes = {errors[t]["error"]["code"] for t in tags}
        assert "internal_error" not in codes, [
            (tags[t][:80], errors[t]) for t in tags if "internal" in str(errors[t])
        ]
        for tag in tags:
            assert errors[tag]["error"]["message"], errors[tag]
        for code in ("too_large", "bad_encoding", "bad_json", "unknown_keys"):
            assert code in codes, codes
        for code in (
            "bad_reply_topic",
            "out_of_range",
            "no_device",
            "bad_hermes_query",
        ):
            assert code in codes, codes

        # nothing reached a device, and the bridge still works
        assert sim.total_applied() == 0
        assert bridge._worker.is_alive() and bridge.connected.is_set()
        observer.publish(f"{BASE}/command", {"id": "after", "text": "turn on the fan"})
        assert observer.wait_for(lambda: "after" in final_replies(observer))
        assert final_replies(observer)["after"]["status"] == "done"
        assert sim.applied["switch.fan"] == 1
    finally:
        bridge.stop()
        observer.close()
        sim.stop()

    allowed = _allowed_topics(bridge, registry)
    outside = sorted({t for t in published if t not in allowed})
    hermes_answers = [t for t in outside if t.startswith("hermes/intent/")]
    assert outside == hermes_answers, f"published outside the allow-list: {outside}"
    assert set(hermes_answers) <= {"hermes/intent/HassTurnOn"}, hermes_answers


# --- the parsers alone, driven by hypothesis ------------------------------------------


@settings(max_examples=400, deadline=None)
@given(payload=st.binary(max_size=300) | _JSON.map(lambda v: json.dumps(v).encode()))
def test_request_parser_only_ever_refuses_with_a_code(payload):
    try:
        request = parse_request(payload, max_payload=65536)
    except BadRequest as exc:
        assert exc.code and str(exc)
        return
    assert set(request) <= {"id", "text", "intent", "slots"}
    if "intent" in request:
        assert isinstance(request["intent"], str)
    else:
        text = request["text"]
        assert isinstance(text, str) and 0 < len(text) <= 1000 and text == text.strip()


@settings(max_examples=300, deadline=None)
@given(query=_JSON)
def test_hermes_query_parser_only_ever_refuses_with_hermes_error(query):
    try:
        checked = hermes.parse_query(query)
    except hermes.HermesError as exc:
        assert str(exc)
        return
    assert isinstance(checked["input"], str)
