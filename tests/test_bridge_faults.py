"""Faults: a broker killed mid-stream, a bridge killed mid-stream, a broker down.

Exactly-once is counted at the simulated devices: every command id must be applied
once, none lost and none twice. Requests carry ids, so a requester may safely resend
one it got no answer for; the bridge answers a known id from its queue.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

from bridge.harness import REPO, Observer, bridge_config, final_replies, write_config

from firmware_bridge.service import Bridge
from firmware_bridge.simulator import DeviceSimulator

BASE = "edgeslm/default"
N_COMMANDS = int(os.environ.get("N_BRIDGE", 500))


def _texts(n: int) -> list[tuple[str, str]]:
    """(id, text) for a stream over the two JSON devices, so every effect has an id."""
    out = []
    for i in range(n):
        if i % 3 == 2:
            text = f"set the thermostat to {16 + i % 12} degrees"
        else:
            text = f"turn {'on' if i % 2 else 'off'} the kitchen light"
        out.append((f"c{i}", text))
    return out


def _stream(observer: Observer, commands, fault_at: int, fault, pause: float) -> None:
    """Publish the commands at a steady pace; call `fault()` after `fault_at`."""
    for n, (request_id, text) in enumerate(commands):
        if n == fault_at:
            fault()
        observer.client.publish(
            f"{BASE}/command", f'{{"id": "{request_id}", "text": "{text}"}}', qos=1
        )
        time.sleep(pause)


def _settle(observer: Observer, commands, deadline: float, resend: bool) -> dict:
    """Wait for every final reply; with `resend`, repeat unanswered requests by id."""
    wanted = {request_id for request_id, _ in commands}
    texts = dict(commands)
    while time.monotonic() < deadline:
        if observer.wait_for(lambda: wanted <= set(final_replies(observer)), timeout=3):
            break
        if resend:
            for request_id in sorted(wanted - set(final_replies(observer))):
                payload = f'{{"id": "{request_id}", "text": "{texts[request_id]}"}}'
                observer.client.publish(f"{BASE}/command", payload, qos=1)
    return final_replies(observer)


def _assert_exactly_once(sim: DeviceSimulator, replies: dict, commands) -> None:
    ids = [request_id for request_id, _ in commands]
    missing = [i for i in ids if i not in replies]
    assert not missing, f"{len(missing)} requests never answered, e.g. {missing[:5]}"
    bad = {i: replies[i]["status"] for i in ids if replies[i]["status"] != "done"}
    assert not bad, f"not done: {[replies[i] for i in list(bad)[:3]]}"
    applied = dict(sim.applied)
    assert sorted(applied) == sorted(f"{i}-0" for i in ids), "a command ran nowhere"
    twice = {k: v for k, v in applied.items() if v != 1}
    assert not twice, f"applied more than once: {list(twice.items())[:5]}"


def test_broker_killed_mid_stream_loses_and_duplicates_nothing(
    tmp_path,
    broker,
    registry,
    recognizer,
):
    sim = DeviceSimulator(registry, port=broker.port).start()
    observer = Observer(broker.port, [f"{BASE}/reply"])
    bridge = Bridge(bridge_config(tmp_path, broker.port), registry, recognizer)
    bridge.start()
    assert bridge.connected.wait(10)
    time.sleep(0.2)
    commands = _texts(N_COMMANDS)

    def kill_and_restart() -> None:
        broker.kill()  # SIGKILL: whatever the broker held and had not saved is gone
        threading.Timer(0.5, broker.start).start()

    try:
        _stream(observer, commands, N_COMMANDS // 2, kill_and_restart, pause=0.004)
        replies = _settle(observer, commands, time.monotonic() + 45, resend=True)
        _assert_exactly_once(sim, replies, commands)
        assert bridge.connected.is_set()
    finally:
        bridge.stop()
        observer.close()
        sim.stop()


def test_bridge_killed_mid_stream_resumes_from_its_queue(tmp_path, broker, registry):
    """SIGKILL the bridge process; the broker keeps its session, SQLite its queue.

    No requester resends here: everything comes back from the bridge's own state.
    The first process is `python -m firmware_bridge`, the second `edgeslm bridge`;
    SIGTERM then stops it cleanly (exit 0, availability "offline" at once).
    """
    config = write_config(tmp_path, broker.port)
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def bridge_process(module: str = "firmware_bridge") -> subprocess.Popen:
        command = ["bridge"] if module == "edgeslm" else []
        return subprocess.Popen(
            [sys.executable, "-m", module, *command, "--config", str(config)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    sim = DeviceSimulator(registry, port=broker.port).start()
    observer = Observer(broker.port, [f"{BASE}/reply", f"{BASE}/bridge/+/availability"])
    proc = bridge_process()
    commands = _texts(N_COMMANDS)
    online = f"{BASE}/bridge/bridge/availability"
    try:
        assert observer.wait_for(
            lambda: (
                [p for t, p, _ in observer.messages if t == online][-1:] == [b"online"]
            ),
            timeout=30,
        ), "bridge did not come online"
        state = {}

        def kill_and_restart() -> None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            state["proc"] = bridge_process("edgeslm")

        _stream(observer, commands, N_COMMANDS // 2, kill_and_restart, pause=0.004)
        replies = _settle(observer, commands, time.monotonic() + 45, resend=False)
        _assert_exactly_once(sim, replies, commands)

        # SIGTERM: a goodbye within a second, long before the will (keepalive 5 s)
        state["proc"].terminate()
        state["proc"].wait(10)
        assert observer.wait_for(
            lambda: (
                [p for t, p, _ in observer.messages if t == online][-1] == b"offline"
            ),
            timeout=1.5,
        )
    finally:
        for p in (proc, state.get("proc")):
            if p is not None and p.poll() is None:
                p.terminate()
                p.wait(10)
        observer.close()
        sim.stop()
    assert state["proc"].returncode == 0, state["proc"].stderr.read().decode()[-2000:]


def test_commands_taken_while_broker_down_survive_a_bridge_restart(
    tmp_path,
    broker,
    registry,
    recognizer,
):
    broker.stop()
    config = bridge_config(tmp_path, broker.port)
    first = Bridge(config, registry, recognizer)
    first.start()
    ids = [
        first.submit(f"turn {'on' if i % 2 else 'off'} the kitchen light", f"k{i}")
        for i in range(5)
    ]
    assert not first.connected.is_set()  # the broker is down
    first.stop()  # stores what it took before it stops

    broker.start()
    sim = DeviceSimulator(registry, port=broker.port).start()
    observer = Observer(broker.port, [f"{BASE}/reply"])
    second = Bridge(config, registry, recognizer)
    second.start()
    try:
        assert observer.wait_for(lambda: set(ids) <= set(final_replies(observer)))
        assert {final_replies(observer)[i]["status"] for i in ids} == {"done"}
        assert sorted(sim.applied) == sorted(f"{i}-0" for i in ids)
        assert set(sim.applied.values()) == {1}
        assert sim.states["light.kitchen"]["state"] == "OFF"  # k4, the last, is "off"
    finally:
        second.stop()
        observer.close()
        sim.stop()
