"""The bridge service: MQTT in, recognizer, safety gate, outbound queue, adapters, acks.

Threads: paho's network thread runs the callbacks, which only put events on a queue.
One worker thread does everything else (SQLite, publishing, acks, timeouts), so no
state is shared and a bad message can never raise into paho. Recognition runs on a
third thread, fed in arrival order, so a slow layer (the chat model) holds up only the
requests behind it, never acks, resends or other devices' commands.

Delivery: a request is stored with its commands (SQLite) before its MQTT message is
acknowledged (paho manual ack). Each device has at most one command in flight, sent
with QoS 1, never retained, with MQTT 5 message expiry, response topic and correlation
data; it is resent with the same id until an outcome arrives, `max_attempts` is spent
or it expires. Devices drop ids they have seen, so a resend never acts twice.

This module owns `Bridge` itself: its topics and publish allow-list, the paho client
and its callbacks, the life cycle (`start`, `stop`, `kill`, `submit`) and the worker
loop (events, connection, subscriptions, the tick that resends and expires). What the
worker does with a message is in two parts mixed into `Bridge`: `intake` (command and
Hermes messages, the recognizer thread) and `delivery` (the safety gate, commands on
the wire, acks, replies, the one way out).

Not yet: two bridges sharing the work do not coordinate commands to one device (each
keeps its own one-in-flight rule), so their commands to it may interleave.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgeslm.intent.registry import Registry, load_registry
from firmware_bridge import hermes
from firmware_bridge.adapters import Outgoing, adapter_for, discovery_messages
from firmware_bridge.commands import CommandRejected, DeviceCommand, RateLimiter
from firmware_bridge.config import BridgeConfig, BridgeConfigError
from firmware_bridge.delivery import DeliveryMixin, _Inflight
from firmware_bridge.intake import IntakeMixin, _correlation, _Pending
from firmware_bridge.recognizer import Recognizer, load_recognizer
from firmware_bridge.requests import topic_problem
from firmware_bridge.store import CommandStore
from firmware_bridge.transport import low_latency

log = logging.getLogger(__name__)

_HERMES_INTENT = re.compile(r"hermes/intent/[A-Za-z][A-Za-z0-9_]{0,63}")
_KEEP_REQUESTS = 7 * 24 * 3600  # seconds answered requests stay known (dedupe window)


@dataclass(frozen=True)
class Topics:
    command: str
    reply: str
    error: str
    ack: str
    availability: str
    last_command: str


class Bridge(IntakeMixin, DeliveryMixin):
    """One bridge instance. `start()`, then `stop()` (or `kill()` to simulate a crash).

    Args:
        config: the bridge configuration.
        registry: the device registry; read from `config.registry` when None.
        recognizer: `text -> IntentResult`; built from `config.recognizer` when None.
    """

    def __init__(
        self,
        config: BridgeConfig,
        registry: Registry | None = None,
        recognizer: Recognizer | None = None,
    ) -> None:
        self.config = config
        self.registry = registry or load_registry(config.registry)
        self.devices = {d.id: d for d in self.registry.devices}
        base, me = config.base, f"{config.base}/bridge/{config.instance}"
        self.topics = Topics(
            command=f"{base}/command",
            reply=f"{base}/reply",
            error=f"{base}/error",
            ack=f"{me}/ack",
            availability=f"{me}/availability",
            last_command=f"{me}/last_command",
        )
        self._routes, self._state_topics = self._device_routes()
        self._device_topics = {t for topics in self._routes.values() for t in topics}
        self.allowed = self._allow_list()
        self.limiter = RateLimiter(
            config.rate_limit.per_second, config.rate_limit.burst
        )
        self.events: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._store: CommandStore | None = None
        self._inflight: dict[str, _Inflight] = {}  # device -> its command on the wire
        self._waiting: dict[str, deque[DeviceCommand]] = {}  # device -> queued commands
        self._final_mids: dict[int, str] = {}  # final replies awaiting the broker's ack
        self._confirmed: list[str] = []  # ... and those acked, for the next tick
        self._worker: threading.Thread | None = None
        self._recognition: queue.Queue[_Pending | None] = queue.Queue()
        self._recognizing: set[str] = set()  # request ids on the recognizer thread
        self._recognizer: threading.Thread | None = None
        self._subscribing: dict[int, list[str]] = {}  # SUBSCRIBE mid -> its filters
        self.client = self._make_client()
        # last: the layered recognizer may take a while to build (its classifier)
        self.recognize = recognizer or load_recognizer(config.recognizer, self.registry)

    # --- topics and the allow-list ------------------------------------------------

    def _device_routes(self) -> tuple[dict[str, list[str]], dict[str, str]]:
        routes, state_topics = {}, {}
        own = self.config.base + "/"
        for device in self.registry.devices:
            try:
                adapter = adapter_for(device)
            except CommandRejected as exc:
                log.info("not reachable over MQTT: %s", exc)
                continue
            routes[device.id] = adapter.out_topics(device)
            for topic in routes[device.id] + adapter.state_topics(device):
                problem = topic_problem(topic)
                if problem is None and topic.startswith(own):
                    problem = f"it lies under the bridge's own {own}"
                if problem is not None:
                    raise BridgeConfigError(
                        f"{self.config.registry}: device {device.id!r} has MQTT topic "
                        f"{topic[:80]!r}, which the bridge cannot use: {problem}"
                    )
            for topic in adapter.state_topics(device):
                state_topics[topic] = device.id
        return routes, state_topics

    def _allow_list(self) -> frozenset[str]:
        t = self.topics
        topics = {t.reply, t.error, t.availability, t.last_command, t.ack}
        topics.add(hermes.NOT_RECOGNIZED_TOPIC)
        topics.update(m.topic for m in self._discovery())
        for device_topics in self._routes.values():
            topics.update(device_topics)
        return frozenset(topics)

    def is_allowed(self, topic: str) -> bool:
        """True for topics the bridge may publish to (the allow-list)."""
        if topic_problem(topic) is not None:
            return False
        if topic in self.allowed or _HERMES_INTENT.fullmatch(topic):
            return True
        return self.is_reply_topic(topic)

    def is_reply_topic(self, topic: str) -> bool:
        """True for a response topic a requester may ask for: the reply topic or one
        under it (`<prefix>/<site>/reply/...`, at most 16 levels)."""
        if topic_problem(topic) is not None or topic.count("/") >= 16:
            return False
        return topic == self.topics.reply or topic.startswith(self.topics.reply + "/")

    def _discovery(self) -> list[Outgoing]:
        if not self.config.discovery.enabled:
            return []
        return discovery_messages(
            self.config.discovery.prefix,
            self.config.base,
            self.config.instance,
            self.topics.availability,
            self.topics.last_command,
        )

    # --- paho: callbacks only queue work --------------------------------------------

    def _make_client(self) -> mqtt.Client:
        b = self.config.broker
        v5 = b.protocol == "5"
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"edgeslm-{self.config.prefix}-{self.config.site}-{self.config.instance}",
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else False,
            manual_ack=True,
        )
        client.enable_logger(logging.getLogger("firmware_bridge.paho"))
        low_latency(client)
        client.reconnect_delay_set(b.reconnect_min, b.reconnect_max)
        client.max_inflight_messages_set(100)
        client.will_set(self.topics.availability, "offline", qos=1, retain=True)
        if b.username is not None:
            client.username_pw_set(b.username, b.resolved_password())
        if b.tls is not None:
            client.tls_set(ca_certs=b.tls.ca, certfile=b.tls.cert, keyfile=b.tls.key)
            client.tls_insecure_set(b.tls.insecure)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        return client

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self.events.put(("connect", not reason_code.is_failure, str(reason_code)))

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.events.put(("disconnect", str(reason_code)))

    def _on_message(self, client, userdata, message) -> None:
        self.events.put(("message", message))

    def _on_subscribe(
        self, client, userdata, mid, reason_code_list, properties
    ) -> None:
        self.events.put(("subscribed", mid, reason_code_list))

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        self.events.put(("published", mid, reason_code))

    # --- life cycle -------------------------------------------------------------------

    def start(self) -> None:
        """Open the queue, connect (in the background, with back-off) and serve."""
        self._store = CommandStore(self.config.queue)
        self._store.prune(older_than=_KEEP_REQUESTS)
        for stored in self._store.open_commands():
            self._waiting.setdefault(stored.command.device, deque()).append(
                stored.command
            )
        pending = sum(len(q) for q in self._waiting.values())
        if pending:
            log.info("outbound queue: %d commands from before the restart", pending)
        b = self.config.broker
        properties = None
        if b.protocol == "5":
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = b.session_expiry
        self.client.connect_async(
            b.host, b.port, b.keepalive, clean_start=False, properties=properties
        )
        self.client.loop_start()
        self._worker = threading.Thread(
            target=self._run, name="bridge-worker", daemon=True
        )
        self._recognizer = threading.Thread(
            target=self._recognize_loop, name="bridge-recognizer", daemon=True
        )
        self._worker.start()
        self._recognizer.start()
        log.info(
            "bridge %s serving %s on %s:%d",
            self.config.instance,
            self.topics.command,
            b.host,
            b.port,
        )

    def stop(self, timeout: float = 5.0) -> None:
        """Clean shutdown: availability offline, disconnect, close the queue."""
        if self._worker is None:
            return
        # requests already taken are recognized and stored before the worker stops:
        # the worker ends the recognizer's queue once it has handed it all it took
        self.events.put(("drain",))
        if self._recognizer is not None:
            self._recognizer.join(timeout)
        self.events.put(("stop",))
        self._worker.join(timeout)
        if self.connected.is_set():
            info = self._publish(
                Outgoing(self.topics.availability, b"offline", retain=True)
            )
            if info is not None:
                info.wait_for_publish(timeout)
        self.client.disconnect()
        self.client.loop_stop()
        self._close()

    def kill(self) -> None:
        """Stop without a goodbye, like a crash (tests): the broker sends the will."""
        if self._worker is None:
            return
        self._stop.set()
        self._recognition.put(None)
        self._worker.join(5.0)
        self.client.loop_stop()
        sock = self.client.socket()
        if sock is not None:
            sock.close()
        self._close()

    def _close(self) -> None:
        # acks the worker did not get to (the broker took these replies)
        while True:
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                break
            if event[0] == "published":
                self._on_published(event[1], event[2])
        self._confirm_replies()
        if self._store is not None:
            self._store.close()
        self._store = None
        self._worker = None

    def submit(self, text: str, request_id: str | None = None) -> str:
        """Accept a command from Python (works while the broker is down); its id."""
        request_id = request_id or uuid.uuid4().hex[:16]
        self.events.put(("submit", _Pending(request_id, text, None, None, {})))
        return request_id

    # --- the worker ------------------------------------------------------------------

    def _run(self) -> None:
        next_tick = 0.0
        while not self._stop.is_set():
            try:
                event = self.events.get(timeout=0.05)
            except queue.Empty:
                event = None
            try:
                if event is not None and event[0] == "stop":
                    break
                if event is not None:
                    self._handle(event)
                if time.monotonic() >= next_tick:
                    self._tick()
                    next_tick = time.monotonic() + 0.1
            except Exception:  # the worker must outlive any one bad event
                log.exception(
                    "bridge worker: unexpected error handling %s", event and event[0]
                )

    def _handle(self, event: tuple[Any, ...]) -> None:
        kind = event[0]
        if kind == "message":
            message = event[1]
            deferred = False
            try:
                deferred = self._on_mqtt(message)
            except Exception:  # a bug must not leave a request unanswered
                log.exception(
                    "bridge: unexpected error on a message to %s", message.topic
                )
                if message.topic in (self.topics.command, hermes.QUERY_TOPIC):
                    self._error(
                        "internal_error",
                        "the bridge failed on this message; see its log",
                        None,
                        _correlation(message),
                    )
            finally:
                if not deferred and message.qos > 0:
                    self.client.ack(message.mid, message.qos)
        elif kind == "recognized":
            self._recognized(event[1], event[2])
        elif kind == "drain":
            self._recognition.put(None)
        elif kind == "connect":
            self._connected(event[1], event[2])
        elif kind == "disconnect":
            if self.connected.is_set():
                log.warning("broker connection lost (%s); reconnecting", event[1])
            self.connected.clear()
        elif kind == "submit":
            self._to_recognizer(event[1])
        elif kind == "subscribed":
            self._subscribed(event[1], event[2])
        elif kind == "published":
            self._on_published(event[1], event[2])

    def _connected(self, ok: bool, reason: str) -> None:
        if not ok:
            log.error(
                "broker refused the connection: %s; check broker credentials", reason
            )
            return
        self.connected.set()
        shared = f"$share/{self.config.share_group}/" if self.config.share_group else ""
        subscriptions = [(shared + self.topics.command, 1), (self.topics.ack, 1)]
        if self.config.hermes.enabled:
            subscriptions.append((shared + hermes.QUERY_TOPIC, 1))
        subscriptions += [(topic, 1) for topic in sorted(self._state_topics)]
        _, mid = self.client.subscribe(subscriptions)
        self._subscribing = {mid: [topic for topic, _ in subscriptions]}
        self._publish(Outgoing(self.topics.availability, b"online", retain=True))
        for message in self._discovery():
            self._publish(message)
        for inflight in self._inflight.values():
            inflight.deadline = 0.0  # resend what the broker may have lost
        for request_id in self._store.unreplied():
            if not self._awaiting_puback(request_id):
                self._maybe_reply(request_id)
        log.info("connected to the broker (%s)", reason)

    def _subscribed(self, mid: int, reason_codes: list[ReasonCode]) -> None:
        """Log every topic filter the broker refused (SUBACK): the bridge would be
        online but never hear what is published there."""
        filters = self._subscribing.pop(mid, [])
        for n, code in enumerate(reason_codes):
            if not code.is_failure:
                continue
            topic = filters[n] if n < len(filters) else f"filter {n} of SUBSCRIBE {mid}"
            log.error(
                "the broker refused the subscription to %s (%s), so the bridge will "
                "not hear it; check that the broker's ACL lets user %r subscribe to it "
                "(docs/BRIDGE.md, Security)",
                topic,
                code,
                self.config.broker.username,
            )

    def _tick(self) -> None:
        """Note acknowledged replies; expire, resend or fail commands in flight;
        start waiting ones."""
        self._confirm_replies()
        if not self.connected.is_set():
            return
        now = time.time()
        for device in list(self._inflight):
            inflight = self._inflight[device]
            cmd = inflight.command
            if now > cmd.expires_at:
                self._finish(
                    cmd, "expired", {"error": "no outcome before the command expired"}
                )
            elif now >= inflight.deadline:
                if inflight.attempts >= self.config.delivery.max_attempts:
                    error = f"no ack after {inflight.attempts} attempts"
                    self._finish(cmd, "failed", {"error": error})
                else:
                    self._send(inflight)
        for device in list(self._waiting):
            self._dispatch(device)
