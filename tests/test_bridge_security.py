"""Security: a TLS listener, a password file and an ACL on a real mosquitto.

Anonymous clients, wrong passwords and clients that do not trust the broker's
certificate are refused, on the TLS listener and on the plain one; the ACL keeps a
device from publishing to another device's topics; the bridge, with its own
credentials (password from a file, CA from the config), carries a command end to end;
and a subscription the ACL refuses is logged as an error rather than left unnoticed.
"""

from __future__ import annotations

import ssl
import subprocess
import threading
import time

import paho.mqtt.client as mqtt
import pytest
from bridge.broker import Mosquitto
from bridge.harness import Observer, bridge_config, final_replies
from paho.mqtt.enums import CallbackAPIVersion

from firmware_bridge.service import Bridge
from firmware_bridge.simulator import DeviceSimulator

BASE = "edgeslm/default"


@pytest.fixture
def secure_broker(tmp_path):
    server = Mosquitto(tmp_path / "secure", secure=True).start()
    yield server
    server.stop()


def _connect(
    port: int, username=None, password=None, ca=None, timeout: float = 5.0
) -> str:
    """Try one MQTT 5 connection; "ok", the broker's reason, or the TLS error."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    if username is not None:
        client.username_pw_set(username, password)
    if ca == "system":
        client.tls_set()  # the system's CAs, which do not know the test CA
    elif ca is not None:
        client.tls_set(ca_certs=ca)
    outcome: dict[str, str] = {}
    done = threading.Event()

    def on_connect(c, userdata, flags, reason_code, properties):
        outcome["result"] = "ok" if not reason_code.is_failure else str(reason_code)
        done.set()

    client.on_connect = on_connect
    try:
        client.connect("127.0.0.1", port, keepalive=5)
    except (ssl.SSLError, OSError) as exc:
        return f"tls: {type(exc).__name__}"
    client.loop_start()
    done.wait(timeout)
    client.disconnect()
    client.loop_stop()
    return outcome.get("result", "no answer")


def test_anonymous_and_wrong_credentials_are_refused(secure_broker):
    b, ca = secure_broker, secure_broker.pki["ca"]
    refused = {
        "Not authorized",
        "Bad user name or password",
    }  # mosquitto 2.0: the first
    assert _connect(b.tls_port, ca=ca) in refused
    assert _connect(b.tls_port, "bridge", "wrong", ca=ca) in refused
    assert _connect(b.tls_port, "nobody", "x", ca=ca) in refused
    assert _connect(b.port) in refused  # the plain listener too
    assert _connect(b.port, "bridge", "wrong") in refused
    untrusted = _connect(b.tls_port, "bridge", "bridge-secret", ca="system")
    assert untrusted == "tls: SSLCertVerificationError"
    assert _connect(b.tls_port, "bridge", "bridge-secret", timeout=1) == "no answer"
    assert _connect(b.tls_port, "bridge", "bridge-secret", ca=ca) == "ok"

    # the command-line clients are refused the same way
    sub = subprocess.run(
        ["mosquitto_sub", "-p", str(b.tls_port), "--cafile", ca, "-t", "#", "-C", "1"]
        + ["-W", "5"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert sub.returncode != 0 and "not authori" in (sub.stdout + sub.stderr).lower()


def test_bridge_works_with_its_own_credentials_and_the_acl_holds(
    tmp_path, secure_broker, registry, recognizer
):
    b, ca = secure_broker, secure_broker.pki["ca"]
    password_file = tmp_path / "bridge-password"
    password_file.write_text("bridge-secret\n")
    config = bridge_config(
        tmp_path,
        b.tls_port,
        broker={
            "username": "bridge",
            "password_file": str(password_file),
            "tls": {"ca": ca},
        },
    )
    sim = DeviceSimulator(
        registry,
        host="127.0.0.1",
        port=b.tls_port,
        username="device",
        password="device-secret",
        tls_ca=ca,
    ).start()
    observer = Observer(b.tls_port, ["#"], "observer", "observer-secret", ca)
    requester = Observer(b.tls_port, [f"{BASE}/reply"], "device", "device-secret", ca)
    bridge = Bridge(config, registry, recognizer)
    bridge.start()
    try:
        assert bridge.connected.wait(10), "the bridge could not log in"
        time.sleep(0.3)
        requester.publish(
            f"{BASE}/command", {"id": "s1", "text": "turn on the kitchen light"}
        )
        assert requester.wait_for(lambda: "s1" in final_replies(requester))
        assert final_replies(requester)["s1"]["status"] == "done"
        assert sim.states["light.kitchen"]["state"] == "ON"

        # the ACL: a device cannot command another device or fake a Tasmota answer
        requester.publish("cmnd/tasmota_fan/POWER", "ON")
        requester.publish("zigbee2mqtt/desk_lamp/set", '{"state": "ON"}')
        time.sleep(0.5)
        seen = {topic for topic, _, _ in observer.messages}
        assert "home/kitchen/light/command" in seen  # the observer does see traffic
        assert not seen & {"cmnd/tasmota_fan/POWER", "zigbee2mqtt/desk_lamp/set"}
        assert sim.applied["switch.fan"] == 0
    finally:
        bridge.stop()
        requester.close()
        observer.close()
        sim.stop()


def test_bridge_with_a_wrong_password_never_connects(
    tmp_path, secure_broker, registry, recognizer, caplog
):
    b = secure_broker
    config = bridge_config(
        tmp_path,
        b.tls_port,
        broker={
            "username": "bridge",
            "password": "wrong",
            "tls": {"ca": b.pki["ca"]},
        },
    )
    bridge = Bridge(config, registry, recognizer)
    with caplog.at_level("ERROR", logger="firmware_bridge"):
        bridge.start()
        try:
            assert not bridge.connected.wait(2)
        finally:
            bridge.stop()
    assert "check broker credentials" in caplog.text


def test_a_subscription_the_acl_refuses_is_logged_as_an_error(
    tmp_path, registry, recognizer, caplog
):
    """An ACL file only filters deliveries (mosquitto 2.0 grants every SUBSCRIBE);
    the dynamic security plugin refuses a SUBSCRIBE in the SUBACK, as a stricter
    broker would. Here the bridge may answer Hermes but not read its queries."""
    send, pattern = "publishClientSend", "subscribePattern"
    acls = {
        "bridge": [(send, "edgeslm/#"), (send, "hermes/#"), (send, "home/#")]
        + [(send, "homeassistant/#"), (send, "zigbee2mqtt/#"), (send, "cmnd/#")]
        + [(pattern, t) for t in ("edgeslm/#", "home/#", "zigbee2mqtt/#", "stat/#")],
        "device": [(send, "edgeslm/+/command"), (pattern, "edgeslm/+/reply")],
    }
    b = Mosquitto(tmp_path / "deaf", dynsec=acls).start()
    config = bridge_config(
        tmp_path,
        b.tls_port,
        broker={
            "username": "bridge",
            "password": "bridge-secret",
            "tls": {"ca": b.pki["ca"]},
        },
    )
    requester = Observer(
        b.tls_port, [f"{BASE}/reply"], "device", "device-secret", b.pki["ca"]
    )
    bridge = Bridge(config, registry, recognizer)
    refused = []
    with caplog.at_level("ERROR", logger="firmware_bridge"):
        bridge.start()
        try:
            assert bridge.connected.wait(10), "the bridge could not log in"
            deadline = time.monotonic() + 10
            while not refused and time.monotonic() < deadline:
                time.sleep(0.05)
                refused = [
                    r.getMessage()
                    for r in caplog.records
                    if r.levelname == "ERROR" and "refused the subscription" in r.msg
                ]

            # the other subscriptions hold: a command is still taken (no device here)
            requester.publish(
                f"{BASE}/command", {"id": "d1", "text": "turn on the kitchen light"}
            )
            assert requester.wait_for(
                lambda: any(r["id"] == "d1" for r in requester.json_on(f"{BASE}/reply"))
            )
        finally:
            bridge.stop()
            requester.close()
            b.stop()
    assert len(refused) == 1, caplog.text
    assert "hermes/nlu/query" in refused[0] and "ACL" in refused[0], refused
    assert "'bridge'" in refused[0], refused
