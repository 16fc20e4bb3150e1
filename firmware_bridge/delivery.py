"""The bridge's delivery: a recognized request to commands, outcomes and replies.

This module owns `DeliveryMixin`, the part of `Bridge` that checks a recognized
request against the registry, the adapters and the rate limits (all devices or
none), stores it with its commands, keeps at most one command per device in flight
(sent again with the same id until an ack or a matching device state arrives), turns
outcomes into the request's reply, `last_command` and error messages, and publishes:
`_publish` is the bridge's only way out, checked against the allow-list. A final
reply counts as sent once the broker acknowledges it (`_on_published`), not when it
is handed to paho: a bridge killed in between answers again after its restart.

It does not read command or Hermes messages (`intake`) and does not decide when a
command is resent or expires (the worker's tick, `service`). Not yet: two bridges
sharing the work do not coordinate commands to one device (each keeps its own
one-in-flight rule), so their commands to it may interleave.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgeslm.intent.registry import Device, Registry
from edgeslm.intent.result import IntentResult
from firmware_bridge.adapters import Outgoing, adapter_for
from firmware_bridge.commands import (
    CommandRejected,
    DeviceCommand,
    RateLimiter,
    plan_commands,
)
from firmware_bridge.config import BridgeConfig
from firmware_bridge.protocol import ACK_STATUSES
from firmware_bridge.store import CommandStore

if TYPE_CHECKING:  # only for the annotations: service imports this module
    from firmware_bridge.service import Topics

# the bridge's log lines keep the one name they had before the split
log = logging.getLogger("firmware_bridge.service")

_ACK_STATUS = {"ok": "done", "duplicate": "done", "expired": "expired"}


@dataclass
class _Inflight:
    command: DeviceCommand
    attempts: int
    deadline: float


class DeliveryMixin:
    """The delivery part of `Bridge` (see the module docstring); not usable alone.

    It uses the `Bridge` state annotated below and `Bridge.is_allowed`.
    """

    config: BridgeConfig
    registry: Registry
    devices: dict[str, Device]
    topics: Topics
    limiter: RateLimiter
    client: mqtt.Client
    connected: threading.Event
    _state_topics: dict[str, str]  # a device's state topic -> the device's id
    _device_topics: set[str]
    _store: CommandStore | None
    _inflight: dict[str, _Inflight]  # device -> its command on the wire
    _waiting: dict[str, deque[DeviceCommand]]  # device -> queued commands
    _final_mids: dict[int, str]  # MQTT message id -> request, final replies unacked
    _confirmed: list[str]  # requests whose final reply the broker acknowledged

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
            if known["closed"]:
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
        if exc.code == "rate_limited":
            self._publish_reply(reply, reply_topic, correlation)
        else:
            self._store.add(
                request_id, text, reply_topic, correlation, [], status, reply
            )
            self._publish_final(request_id, reply, reply_topic, correlation)
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
        """Close a request whose commands all closed and send its final reply; a
        request closed before (its reply unacknowledged) gets the stored reply."""
        outcome = self._store.outcome(request_id)
        if outcome is None or not self.connected.is_set():
            return  # still running, or sent once the broker is back
        known = self._store.request(request_id)
        if known["closed"]:
            self._publish_final(
                request_id, known["reply"], known["reply_topic"], known["correlation"]
            )
            return
        statuses = {c["status"] for c in outcome}
        status = (
            "done"
            if statuses == {"done"}
            else ("failed" if "done" not in statuses else "partial")
        )
        reply = {**(known["reply"] or {}), "status": status, "commands": outcome}
        self._store.close_request(request_id, status, reply)
        self._publish_final(
            request_id, reply, known["reply_topic"], known["correlation"]
        )
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
    ) -> mqtt.MQTTMessageInfo | None:
        return self._publish(
            Outgoing(
                topic or self.topics.reply,
                json.dumps(reply).encode(),
                correlation=correlation,
            )
        )

    def _publish_final(
        self,
        request_id: str,
        reply: dict[str, Any],
        topic: str | None,
        correlation: bytes | None,
    ) -> None:
        """Send a closed request's final reply; it counts as replied once the broker
        acknowledges it."""
        info = self._publish_reply(reply, topic, correlation)
        if info is not None:
            self._final_mids[info.mid] = request_id

    def _awaiting_puback(self, request_id: str) -> bool:
        """True while paho holds this request's final reply (it resends it itself
        after a reconnect)."""
        return request_id in self._final_mids.values()

    def _on_published(self, mid: int, reason_code: Any) -> None:
        """The broker acknowledged a message (PUBACK); final replies are noted and
        marked in the store at the next tick, many in one commit."""
        request_id = self._final_mids.pop(mid, None)
        if request_id is None:
            return
        if getattr(reason_code, "is_failure", False):
            log.warning(
                "the broker refused the reply to %s (%s); it is sent again at the "
                "next connection",
                request_id,
                reason_code,
            )
            return
        self._confirmed.append(request_id)

    def _confirm_replies(self) -> None:
        if self._confirmed and self._store is not None:
            confirmed, self._confirmed = self._confirmed, []
            self._store.confirm_replies(confirmed)

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
