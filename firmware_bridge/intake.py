"""The bridge's intake: command and Hermes messages, through the recognizer thread.

This module owns `IntakeMixin`, the part of `Bridge` that turns a message on the
command topic or on `hermes/nlu/query` (or a `Bridge.submit`) into a recognized
request: it checks the payload and the response topic, answers a request id it
already knows instead of running it again, queues new requests for the recognizer
thread in arrival order and, back on the worker, answers Hermes and hands the result
to delivery. An MQTT message is acknowledged once its request is stored, not before.

It does not plan, store or send commands, nor publish by itself (`delivery`), and it
runs nothing on paho's thread (`service`). Not yet: recognition takes one request at
a time on one thread, so a slow layer delays every request behind it; a Hermes query
with neither `id` nor `sessionId` cannot be told from its redelivery, so it runs each
time it arrives.
"""

from __future__ import annotations

import json
import logging
import queue
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt

from edgeslm.intent.result import IntentResult
from firmware_bridge import hermes
from firmware_bridge.adapters import Outgoing
from firmware_bridge.config import BridgeConfig
from firmware_bridge.recognizer import Recognizer
from firmware_bridge.requests import MAX_TEXT, BadRequest, parse_request
from firmware_bridge.store import CommandStore

if TYPE_CHECKING:  # only for the annotations: service imports this module
    from firmware_bridge.service import Topics

# the bridge's log lines keep the one name they had before the split
log = logging.getLogger("firmware_bridge.service")


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


class IntakeMixin:
    """The intake part of `Bridge` (see the module docstring); not usable alone.

    It uses the `Bridge` state annotated below, `Bridge.is_reply_topic`, and from
    `DeliveryMixin` `_request`, `_on_ack`, `_on_state`, `_publish`, `_publish_reply`
    and `_error`.
    """

    config: BridgeConfig
    topics: Topics
    client: mqtt.Client
    events: queue.Queue[tuple[Any, ...]]
    recognize: Recognizer
    _state_topics: dict[str, str]  # a device's state topic -> the device's id
    _store: CommandStore | None
    _recognition: queue.Queue[_Pending | None]
    _recognizing: set[str]

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
                if known is not None and known["closed"]:
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


def _correlation(message: mqtt.MQTTMessage) -> bytes | None:
    """The MQTT 5 correlation data of a message, if it has any."""
    props = getattr(message, "properties", None)
    return getattr(props, "CorrelationData", None) if props else None
