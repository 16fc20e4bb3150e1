"""Requests on the command topic: what the bridge accepts, and the error codes.

A request is plain UTF-8 text ("turn on the kitchen light") or a JSON object with
`text`, or with `intent` and `slots` (an already recognized request), and optionally
an `id` (the idempotency key: a request seen before is answered, never run again).
Anything else is refused with a `BadRequest` whose code goes to the error topic.
Topics never come from a request: a key such as `topic` is refused by name.

Not here: recognition, the registry checks (commands.py), Hermes (hermes.py).
"""

from __future__ import annotations

import json
from typing import Any

from firmware_bridge.commands import REQUEST_ID

REQUEST_KEYS = {"id", "text", "intent", "slots"}
MAX_TEXT = 1000  # characters of one spoken or typed command


class BadRequest(ValueError):
    """An input message the bridge cannot take; `code` goes into the error reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def parse_request(payload: bytes, max_payload: int) -> dict[str, Any]:
    """Read one message of the command topic: plain text, or a JSON request.

    Returns:
        The request with `text` stripped, or with `intent` (and `slots`).

    Raises:
        BadRequest: the code and message say what is wrong with it.
    """
    if len(payload) > max_payload:
        raise BadRequest(
            "too_large",
            f"a command may be {max_payload} bytes, got {len(payload)}",
        )
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest("bad_encoding", f"commands are UTF-8 text ({exc})") from None
    if not text.lstrip().startswith("{"):
        return _checked_text({"text": text})
    try:
        request = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadRequest("bad_json", f"not valid JSON: {exc}") from None
    except RecursionError:
        raise BadRequest("bad_json", "JSON nested too deeply") from None
    if not isinstance(request, dict):
        raise BadRequest("bad_request", "a JSON command is an object")
    unknown = sorted(set(request) - REQUEST_KEYS)
    if unknown:
        raise BadRequest(
            "unknown_keys",
            f"unknown keys {unknown[:5]}; a command has {sorted(REQUEST_KEYS)} "
            "(topics come from the device registry, never from a request)",
        )
    if "id" in request and not (
        isinstance(request["id"], str) and REQUEST_ID.fullmatch(request["id"])
    ):
        raise BadRequest("bad_id", "'id' must be 1-48 letters, digits, '_' or '-'")
    if "intent" in request:
        if not isinstance(request["intent"], str) or len(request["intent"]) > 64:
            raise BadRequest("bad_request", "'intent' is an intent name (text)")
        _checked_slots(request.get("slots", {}))
        if "text" in request:
            return _checked_text(request)
        return request
    if "slots" in request:
        raise BadRequest("bad_request", "'slots' go with an 'intent'")
    return _checked_text(request)


def topic_problem(topic: str) -> str | None:
    """Why `topic` is not one the bridge may publish to, or None when it is fine."""
    if not topic or len(topic.encode("utf-8", "replace")) > 256:
        return "topics are 1-256 bytes"
    if any(c in topic for c in "+#\0"):
        return "wildcards (+, #) and NUL are not publish topics"
    if topic.startswith("$"):
        return "topics starting with $ belong to the broker"
    return None


def _checked_slots(slots: Any) -> dict[str, Any]:
    """Slots of a JSON request: names to text, numbers or lists of text."""
    if not isinstance(slots, dict) or len(slots) > 16:
        raise BadRequest("bad_request", "'slots' is an object of at most 16 slots")
    for name, value in slots.items():
        text_list = isinstance(value, list) and all(isinstance(v, str) for v in value)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (isinstance(value, str) or number or text_list):
            raise BadRequest(
                "bad_request",
                f"slot {name[:40]!r} must be text, a number or a list of text",
            )
    return slots


def _checked_text(request: dict[str, Any]) -> dict[str, Any]:
    text = request.get("text")
    if not isinstance(text, str) or not text.strip():
        raise BadRequest("bad_request", "a command needs 'text' (non-empty text)")
    if len(text) > MAX_TEXT:
        raise BadRequest(
            "too_long", f"a command may be {MAX_TEXT} characters, got {len(text)}"
        )
    if any(ord(c) < 32 and c not in "\t\n\r" for c in text):
        raise BadRequest("bad_request", "command text contains control characters")
    return {**request, "text": text.strip()}
