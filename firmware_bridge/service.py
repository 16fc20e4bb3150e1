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

Not yet: two bridges sharing the work do not coordinate commands to one device (each
keeps its own one-in-flight rule), so their commands to it may interleave.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import threading
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgeslm.intent.registry import Registry, load_registry
from edgeslm.intent.result import IntentResult
from firmware_bridge import hermes
from firmware_bridge.adapters import Outgoing, adapter_for, discovery_messages
from firmware_bridge.commands import (
    CommandRejected,
    DeviceCommand,
    RateLimiter,
    plan_commands,
)
from firmware_bridge.config import BridgeConfig, BridgeConfigError
from firmware_bridge.protocol import ACK_STATUSES
from firmware_bridge.recognizer import Recognizer, load_recognizer
from firmware_bridge.requests import MAX_TEXT, BadRequest, parse_request, topic_problem
from firmware_bridge.store import CommandStore
from firmware_bridge.transport import low_latency

log = logging.getLogger(__name__)

_HERMES_INTENT = re.compile(r"hermes/intent/[A-Za-z][A-Za-z0-9_]{0,63}")
_ACK_STATUS = {"ok": "done", "duplicate": "done", "expired": "expired"}
_KEEP_REQUESTS = 7 * 24 * 3600  # seconds answered requests stay known (dedupe window)


@dataclass(frozen=True)
class Topics:
    command: str
    reply: str
    error: str
    ack: str
    availability: str
    last_command: str


@dataclass
class _Pending:
    """A request on its way through the recognizer thread.

    `message` stays unacknowledged until the request is stored: a crash before that
    leaves it with the broker, which delivers it again.
    """

    request_id: str
    text: str
    reply_topic: str | None
    correlation: bytes | None
    request: dict[str, Any]
    message: mqtt.MQTTMessage | None = None
    hermes_query: dict[str, Any] | None = None


@dataclass
class _Inflight:
    command: DeviceCommand
    attempts: int
    deadline: float


class Bridge:
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
        """Expire, resend or fail commands in flight; start waiting ones."""
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

    # --- inputs -----------------------------------------------------------------------

    def _on_mqtt(self, message: mqtt.MQTTMessage) -> bool:
        """Handle one message; True when it went on to the recognizer thread (then
        it is acknowledged once its request is stored)."""
        topic = message.topic
        if topic == self.topics.ack:
            self._on_ack(message)
        elif topic in self._state_topics:
            self._on_state(topic, message.payload)
        elif topic == hermes.QUERY_TOPIC:
            return self._on_hermes(message)
        elif topic == self.topics.command:
            return self._on_command(message)
        else:
            log.debug("ignored a message on %s", topic)
        return False

    def _on_command(self, message: mqtt.MQTTMessage) -> bool:
        props = getattr(message, "properties", None)
        correlation = _correlation(message)
        reply_topic = getattr(props, "ResponseTopic", None) if props else None
        try:
            request = parse_request(message.payload, self.config.max_payload)
            if reply_topic is not None and not self.is_reply_topic(reply_topic):
                raise BadRequest(
                    "bad_reply_topic",
                    f"response topic must lie under {self.topics.reply}/, got a "
                    f"{len(reply_topic)}-character topic elsewhere",
                )
        except BadRequest as exc:
            self._error(exc.code, str(exc), None, correlation)
            return False
        request_id = request.get("id") or uuid.uuid4().hex[:16]
        pending = _Pending(
            request_id, request.get("text", ""), reply_topic, correlation, request
        )
        pending.message = message
        return self._to_recognizer(pending)

    def _on_hermes(self, message: mqtt.MQTTMessage) -> bool:
        payload = message.payload
        try:
            limit = self.config.max_payload
            if len(payload) > limit:
                raise hermes.HermesError(
                    f"a query may be {limit} bytes, got {len(payload)}"
                )
            query = hermes.parse_query(json.loads(payload.decode("utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError, hermes.HermesError) as exc:
            self._error(
                "bad_hermes_query",
                f"hermes/nlu/query: {exc}",
                None,
                _correlation(message),
            )
            return False
        if len(query["input"]) > MAX_TEXT:
            self._hermes_too_long(query, _correlation(message))
            return False

        # a redelivered query runs once; one with neither id nor sessionId every time
        request_id = hermes.request_id(query) or f"hermes-{uuid.uuid4().hex[:16]}"
        pending = _Pending(request_id, query["input"], None, None, {})
        pending.message, pending.hermes_query = message, query
        return self._to_recognizer(pending)

    def _hermes_too_long(
        self, query: dict[str, Any], correlation: bytes | None
    ) -> None:
        """Refuse an over-long query as the command topic does (`too_long`), and
        answer it as not recognized so that a dialogue manager is not left waiting."""
        topic, answer = hermes.answer(query, IntentResult(text="", intent=None))
        self._publish(Outgoing(topic, json.dumps(answer).encode()))
        self._error(
            "too_long",
            f"hermes/nlu/query: 'input' may be {MAX_TEXT} characters, "
            f"got {len(query['input'])}",
            None,
            correlation,
        )

    # --- recognition: on its own thread, in arrival order ----------------------------

    def _to_recognizer(self, pending: _Pending) -> bool:
        """Queue a request for recognition unless it is known; True when queued."""
        if pending.hermes_query is None:
            known = self._store.request(pending.request_id)
            if known is not None or pending.request_id in self._recognizing:
                # a retry or a redelivery: answer what is known, never run it again
                if known is not None and known["replied"]:
                    self._publish_reply(
                        known["reply"], pending.reply_topic, pending.correlation
                    )
                return False
        self._recognizing.add(pending.request_id)
        self._recognition.put(pending)
        return True

    def _recognize_loop(self) -> None:
        """The recognizer thread: a slow layer (the chat model) delays only the
        requests behind it, never acks, resends or the MQTT connection."""
        while True:
            pending = self._recognition.get()
            if pending is None:
                return
            request = pending.request
            if "intent" in request:
                result = IntentResult(
                    text=pending.text,
                    intent=request["intent"],
                    slots=request.get("slots") or {},
                    confidence=1.0,
                    layer="request",
                )
            else:
                result = self._recognize(pending.text)
            self.events.put(("recognized", pending, result))

    def _recognized(self, pending: _Pending, result: IntentResult) -> None:
        """Back on the worker: answer Hermes, plan, store, then ack the message."""
        message = pending.message
        try:
            if pending.hermes_query is not None:
                topic, answer = hermes.answer(pending.hermes_query, result)
                self._publish(Outgoing(topic, json.dumps(answer).encode()))
                if (
                    topic == hermes.NOT_RECOGNIZED_TOPIC
                    or not self.config.hermes.execute
                ):
                    return
            self._request(
                pending.request_id,
                pending.text,
                pending.reply_topic,
                pending.correlation,
                result,
            )
        except Exception:  # a bug must not leave a request unanswered
            log.exception("bridge: unexpected error on request %s", pending.request_id)
            self._error(
                "internal_error",
                "the bridge failed on this request; see its log",
                pending.request_id,
                pending.correlation,
            )
        finally:
            self._recognizing.discard(pending.request_id)
            if message is not None and message.qos > 0:
                self.client.ack(message.mid, message.qos)

    def _recognize(self, text: str) -> IntentResult:
        try:
            return self.recognize(text)
        except Exception:  # a recognizer bug must not take the bridge down
            log.exception("recognizer failed on a %d-character request", len(text))
            return IntentResult(text=text, intent=None)

    # --- requests ---------------------------------------------------------------------

    def _request(
        self,
        request_id: str,
        text: str,
        reply_topic: str | None,
        correlation: bytes | None,
        result: IntentResult,
    ) -> None:
        """Check a recognized request against the registry, store it, send it."""
        known = self._store.request(request_id)
        if known is not None:  # a retry or a redelivery: answer, never execute again
            log.debug("request %s seen before (%s)", request_id, known["status"])
            if known["replied"]:
                self._publish_reply(known["reply"], reply_topic, correlation)
            return
        reply = {"id": request_id, "text": text, "intent": result.to_dict()}
        try:
            commands = self._plan(request_id, result)
        except CommandRejected as exc:
            self._refuse(exc, reply, reply_topic, correlation)
            return
        reply["commands"] = [c.to_dict() for c in commands]
        if self.config.dry_run:
            return self._dry_run(reply, commands, reply_topic, correlation)
        self._store.add(
            request_id, text, reply_topic, correlation, commands, "accepted", reply
        )
        self._publish_reply({**reply, "status": "accepted"}, reply_topic, correlation)
        for cmd in commands:
            self._waiting.setdefault(cmd.device, deque()).append(cmd)
            self._dispatch(cmd.device)

    def _plan(self, request_id: str, result: IntentResult) -> list[DeviceCommand]:
        """A recognized request's commands, checked against the registry, the
        adapters and the rate limits.

        Raises:
            CommandRejected: the code and message say why; a `rate_limited` refusal
                has taken no device's tokens.
        """
        commands = plan_commands(
            self.registry,
            result,
            request_id,
            self.config.delivery.command_ttl,
            min_confidence=self.config.min_confidence,
        )
        for cmd in commands:
            adapter = adapter_for(self.devices[cmd.device])
            if cmd.action not in adapter.actions:
                raise CommandRejected(
                    "action_not_allowed",
                    f"the {adapter.name} adapter of {cmd.device!r} cannot {cmd.action}",
                )

        # all devices or none: a refusal must not use up the others' tokens
        refused = self.limiter.take(Counter(cmd.device for cmd in commands))
        if refused is not None:
            limit = self.config.rate_limit
            raise CommandRejected(
                "rate_limited",
                f"too many commands for {refused!r} (at most {limit.burst} at once, "
                f"{limit.per_second:g} a second); wait, then send the request again "
                "(the same id is fine: this refusal is not remembered)",
            )
        return commands

    def _refuse(
        self,
        exc: CommandRejected,
        reply: dict[str, Any],
        reply_topic: str | None,
        correlation: bytes | None,
    ) -> None:
        """Answer a request the safety gate refused.

        The refusal is stored as the request's final outcome, so a resend gets the
        same answer, except `rate_limited`: that passes, so a resend with the same id
        after a wait is carried out.
        """
        request_id, text = reply["id"], reply["text"]
        status = "not_recognized" if exc.code == "not_recognized" else "rejected"
        reply.update(status=status, error={"code": exc.code, "message": str(exc)})
        if exc.code != "rate_limited":
            self._store.add(
                request_id, text, reply_topic, correlation, [], status, reply
            )
            self._store.close_request(request_id, status, reply)
        self._publish_reply(reply, reply_topic, correlation)
        self._error(exc.code, str(exc), request_id, correlation)

    def _dry_run(self, reply, commands, reply_topic, correlation) -> None:
        now = time.time()
        for cmd in commands:
            device = self.devices[cmd.device]
            for out in adapter_for(device).messages(cmd, device, self.topics.ack, now):
                log.info(
                    "dry run: would publish %s %s", out.topic, out.payload.decode()
                )
        reply["status"] = "dry_run"
        self._publish_reply(reply, reply_topic, correlation)

    # --- commands on the wire ---------------------------------------------------------

    def _dispatch(self, device: str) -> None:
        waiting = self._waiting.get(device)
        if device in self._inflight or not waiting or not self.connected.is_set():
            return
        cmd = waiting.popleft()
        if not waiting:
            del self._waiting[device]
        inflight = _Inflight(cmd, 0, 0.0)
        self._inflight[device] = inflight
        self._send(inflight)

    def _send(self, inflight: _Inflight) -> None:
        cmd = inflight.command
        now = time.time()
        if now > cmd.expires_at:
            self._finish(cmd, "expired", {"error": "expired before it could be sent"})
            return
        device = self.devices[cmd.device]
        inflight.attempts += 1
        inflight.deadline = now + self.config.delivery.ack_timeout
        for out in adapter_for(device).messages(cmd, device, self.topics.ack, now):
            self._publish(out)
        log.debug(
            "sent %s (%s %s), attempt %d",
            cmd.id,
            cmd.device,
            cmd.action,
            inflight.attempts,
        )

    def _on_ack(self, message: mqtt.MQTTMessage) -> None:
        try:
            ack = json.loads(message.payload.decode("utf-8"))
            if not isinstance(ack, dict) or not isinstance(ack.get("id"), str):
                raise ValueError("an ack is an object with an 'id'")
        except (UnicodeDecodeError, ValueError) as exc:
            log.warning("dropped a malformed ack: %s", exc)
            return
        inflight = next(
            (i for i in self._inflight.values() if i.command.id == ack["id"]), None
        )
        if inflight is None:
            log.debug("ack for %s, which is not in flight (late duplicate)", ack["id"])
            return
        if ack.get("device") != inflight.command.device:
            log.warning(
                "dropped an ack for %s from %r: the command went to %s",
                ack["id"],
                str(ack.get("device"))[:64],
                inflight.command.device,
            )
            return
        if ack.get("status") not in ACK_STATUSES:
            log.warning("dropped an ack for %s: unknown status", ack["id"])
            return
        status = _ACK_STATUS.get(ack["status"], "failed")
        if status == "done":
            result = {"state": ack.get("state")}
        else:
            error = f"device answered {ack.get('status')!r}: {ack.get('error', '')}"
            result = {"error": error[:200]}
        self._finish(inflight.command, status, result)

    def _on_state(self, topic: str, payload: bytes) -> None:
        device_id = self._state_topics[topic]
        inflight = self._inflight.get(device_id)
        if inflight is None:
            return
        try:
            state = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return
        adapter = adapter_for(self.devices[device_id])
        new_state = adapter.outcome(inflight.command, topic, state)
        if new_state is not None:
            self._finish(inflight.command, "done", {"state": new_state})

    def _finish(self, cmd: DeviceCommand, status: str, result: dict[str, Any]) -> None:
        if self._inflight.get(cmd.device) is not None:
            if self._inflight[cmd.device].command.id == cmd.id:
                del self._inflight[cmd.device]
        with self._store.transaction():  # one disk flush for the command and its reply
            if not self._store.finish(cmd.id, status, result):
                return
            self._maybe_reply(cmd.request_id)
        if status != "done":
            log.warning(
                "command %s to %s %s: %s",
                cmd.id,
                cmd.device,
                status,
                result.get("error"),
            )
        self._dispatch(cmd.device)

    # --- replies ----------------------------------------------------------------------

    def _maybe_reply(self, request_id: str) -> None:
        outcome = self._store.outcome(request_id)
        if outcome is None or not self.connected.is_set():
            return  # still running, or sent once the broker is back
        known = self._store.request(request_id)
        statuses = {c["status"] for c in outcome}
        status = (
            "done"
            if statuses == {"done"}
            else ("failed" if "done" not in statuses else "partial")
        )
        reply = {**(known["reply"] or {}), "status": status, "commands": outcome}
        self._store.close_request(request_id, status, reply)
        self._publish_reply(reply, known["reply_topic"], known["correlation"])
        last = {"id": request_id, "text": known["text"], "status": status}
        self._publish(
            Outgoing(self.topics.last_command, json.dumps(last).encode(), retain=True)
        )
        if status != "done":
            self._error(
                f"command_{status}",
                f"request {request_id} {status}",
                request_id,
                known["correlation"],
            )

    def _publish_reply(
        self, reply: dict[str, Any], topic: str | None, correlation: bytes | None
    ) -> None:
        self._publish(
            Outgoing(
                topic or self.topics.reply,
                json.dumps(reply).encode(),
                correlation=correlation,
            )
        )

    def _error(
        self, code: str, message: str, request_id: str | None, correlation: bytes | None
    ) -> None:
        body = {"id": request_id, "error": {"code": code, "message": message[:500]}}
        log.info("error %s: %s", code, message[:200])
        self._publish(
            Outgoing(
                self.topics.error, json.dumps(body).encode(), correlation=correlation
            )
        )

    def _publish(self, out: Outgoing) -> mqtt.MQTTMessageInfo | None:
        """The only way out: allow-list checked, QoS 1, MQTT 5 properties."""
        if not self.is_allowed(out.topic):
            log.error("refused to publish to %r: not on the allow-list", out.topic[:80])
            return None
        properties = None
        if self.config.broker.protocol == "5":
            properties = Properties(PacketTypes.PUBLISH)
            properties.ContentType = "application/json"
            if out.expiry is not None:
                properties.MessageExpiryInterval = out.expiry
            if out.response_topic is not None:
                properties.ResponseTopic = out.response_topic
            if out.correlation is not None:
                properties.CorrelationData = out.correlation
        if self.config.dry_run and out.topic in self._device_topics:
            log.info("dry run: would publish to %s", out.topic)
            return None
        return self.client.publish(
            out.topic, out.payload, qos=1, retain=out.retain, properties=properties
        )


def _correlation(message: mqtt.MQTTMessage) -> bytes | None:
    """The MQTT 5 correlation data of a message, if it has any."""
    props = getattr(message, "properties", None)
    return getattr(props, "CorrelationData", None) if props else None
