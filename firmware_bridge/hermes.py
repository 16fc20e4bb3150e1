"""The Hermes NLU protocol (Rhasspy): `hermes/nlu/query` in, intents out.

Field names follow Rhasspy's Hermes messages (camelCase JSON): a query carries
`input`, `siteId`, `id`, `sessionId`, `intentFilter`, `customData`, ...; an answer goes
to `hermes/intent/<intentName>` (`input`, `intent {intentName, confidenceScore}`,
`slots [...]`, `siteId`, `id`, `sessionId`, `customData`, `rawInput`) or to
`hermes/nlu/intentNotRecognized` (`input`, `siteId`, `id`, `sessionId`, `customData`).

Intent names become topics only when they are plain names (letters, digits, `_`);
anything else is answered as not recognized.

Idempotency: a query is keyed by its `id`; Rhasspy's dialogue manager sends none, so
without one the key is its `sessionId` plus a digest of its `input`. A redelivered
query is then carried out once, and a new query in the same session (continueSession)
is carried out too; the same words twice in one session without `id` act once.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from edgeslm.intent.result import IntentResult
from firmware_bridge.commands import REQUEST_ID

QUERY_TOPIC = "hermes/nlu/query"
NOT_RECOGNIZED_TOPIC = "hermes/nlu/intentNotRecognized"
INTENT_TOPIC = "hermes/intent/{}"
_INTENT_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")  # use with fullmatch

# Echoed from the query to the answer when present; intentNotRecognized has fewer
# fields than an intent message (Rhasspy's NluIntentNotRecognized).
_ECHO = ("siteId", "id", "sessionId", "customData", "wakewordId", "lang")
_ECHO_NOT_RECOGNIZED = ("siteId", "id", "sessionId", "customData")


class HermesError(ValueError):
    """A `hermes/nlu/query` payload that does not follow the protocol."""


def parse_query(data: Any) -> dict[str, Any]:
    """Check a decoded query: `input` is text, the optional fields have their types.

    Raises:
        HermesError: the message names the field and the expected type.
    """
    if not isinstance(data, dict):
        raise HermesError(f"an NLU query is a JSON object, got {type(data).__name__}")
    if not isinstance(data.get("input"), str):
        raise HermesError("an NLU query needs 'input' (text)")
    for key in ("siteId", "id", "sessionId", "customData", "wakewordId", "lang"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise HermesError(f"'{key}' must be text or null, got {data[key]!r}")
    intent_filter = data.get("intentFilter")
    if intent_filter is not None and not (
        isinstance(intent_filter, list)
        and all(isinstance(i, str) for i in intent_filter)
    ):
        raise HermesError("'intentFilter' must be a list of intent names or null")
    return data


def request_id(query: dict[str, Any]) -> str | None:
    """The bridge's request id for a checked query: its idempotency key.

    Args:
        query: a query from `parse_query`.

    Returns:
        `hermes-<id>` when the query has an `id`; else, with a `sessionId`, an id
        derived from the session and a digest of `input`, so that a redelivery maps
        onto the same request and a new query in the session onto a new one. A key
        that is not a plain request id (too long, other characters) is hashed. None
        when the query has neither (then nothing can deduplicate it).
    """
    if query.get("id"):
        key = query["id"]
    elif query.get("sessionId"):
        text = hashlib.sha256(query["input"].encode("utf-8")).hexdigest()[:16]
        key = f"{query['sessionId']}-{text}"
    else:
        return None
    plain = f"hermes-{key}"
    if REQUEST_ID.fullmatch(plain):
        return plain
    # too long for a request id (a UUID session and a digest) or not plain: hash it
    return "hermes-" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]


def answer(query: dict[str, Any], result: IntentResult) -> tuple[str, dict[str, Any]]:
    """The topic and payload answering `query` with `result`."""
    echo = {key: query.get(key) for key in _ECHO if query.get(key) is not None}
    echo.setdefault("siteId", "default")
    wanted = query.get("intentFilter")
    name = result.intent
    if (
        name is None
        or not _INTENT_NAME.fullmatch(name)
        or (wanted and name not in wanted)
    ):
        missed = {k: v for k, v in echo.items() if k in _ECHO_NOT_RECOGNIZED}
        return NOT_RECOGNIZED_TOPIC, {"input": query["input"], **missed}
    payload = {
        "input": query["input"],
        "intent": {"intentName": name, "confidenceScore": float(result.confidence)},
        "slots": [_slot(k, v, query["input"]) for k, v in result.slots.items()],
        "rawInput": query["input"],
        **echo,
    }
    return INTENT_TOPIC.format(name), payload


def _slot(name: str, value: Any, text: str) -> dict[str, Any]:
    raw = str(value)
    start = text.casefold().find(raw.casefold())
    slot = {
        "entity": name,
        "slotName": name,
        "value": {"kind": "Number" if _is_number(value) else "Unknown", "value": value},
        "rawValue": raw,
        "confidence": 1.0,
    }
    if start >= 0:
        slot["range"] = {"start": start, "end": start + len(raw)}
    return slot


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
