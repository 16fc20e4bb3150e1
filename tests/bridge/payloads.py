"""Generated payloads for the fuzz tests: commands for devices, requests for the bridge.

Everything is drawn from a seeded `random.Random`, so a failure names a seed and a
payload index that reproduce it.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from typing import Any

DEVICE = "light.kitchen"
_ABSENT = object()

_IDS = ["", "a/b", "x" * 64, "x" * 65, 7, None, "a\n", "a b", "\u00e9", "a\u0000"]
_ACTIONS = [
    "on",
    "off",
    "open",
    "close",
    "brightness",
    "position",
    "temperature",
    "toggle",
    "ON",
    "",
    5,
    None,
    "brightness\u0000",
]
_VALUES = [_ABSENT, None, 0, 100, 100.5, -1, 30.25, 1e308, -0.0, "30", True, [], {}]
_VERSIONS = [1, 1, 1, 1.0, 2, 0, "1", True, None, _ABSENT, 1e30]
_DEVICES = [DEVICE] * 6 + ["light.desk", "", 5, "x" * 65, "light kitchen", "\u00e9"]
_EXPIRES = [2_000_000_000] * 6 + [0, 999, 1001, -1, 1.5, "1", _ABSENT, 1e19, True]
_REPLY_TO = [_ABSENT] * 3 + ["edgeslm/x/ack", "a/#", "a/+/b", "$SYS/x", "", "\u00e9/t"]
_REPLY_TO += [5, "x" * 129, "x" * 128, "a\u0000b"]
_EXTRAS: list[dict[str, Any]] = [
    {},
    {},
    {"extra": {"nested": [1, {"a": None}], "s": "\u00e9"}},
    {"deep": [[[[[[1]]]]]]},  # 8 levels with the command object: accepted
    {"deeper": [[[[[[[1]]]]]]]},  # 9 levels: refused as malformed
    {"v2_field": True, "": "empty key"},
]


def _pick(rng: random.Random, options: list[Any], usual: Any, p_usual: float) -> Any:
    return usual if rng.random() < p_usual else rng.choice(options)


def structured_command(rng: random.Random, recent_ids: list[str]) -> bytes:
    """A JSON object near the command shape: most fields right, some wrong."""
    if recent_ids and rng.random() < 0.15:
        command_id: Any = rng.choice(recent_ids)  # a resend
    elif rng.random() < 0.85:
        command_id = f"r{rng.randrange(10**6)}-{rng.randrange(3)}"
    else:
        command_id = rng.choice(_IDS)
    action = _pick(rng, _ACTIONS, rng.choice(["on", "off", "brightness"]), 0.7)
    value: Any = _ABSENT
    if action in ("brightness", "position", "temperature"):
        value = round(rng.uniform(0, 100), rng.choice([0, 2]))
    value = _pick(rng, _VALUES, value, 0.8)
    fields = {
        "v": _pick(rng, _VERSIONS, 1, 0.9),
        "id": command_id,
        "device": _pick(rng, _DEVICES, DEVICE, 0.9),
        "action": action,
        "value": value,
        "expires": _pick(rng, _EXPIRES, 2_000_000_000, 0.85),
        "reply_to": _pick(rng, _REPLY_TO, "edgeslm/default/bridge/b/ack", 0.7),
        **rng.choice(_EXTRAS),
    }
    for name in ("v", "id", "device", "action", "expires"):
        if rng.random() < 0.03:
            fields[name] = _ABSENT
    items = [(k, v) for k, v in fields.items() if v is not _ABSENT]
    rng.shuffle(items)
    text = json.dumps(dict(items), ensure_ascii=rng.random() < 0.5)
    if rng.random() < 0.03:  # a known key twice
        key = rng.choice(["id", "action", "v", "device"])
        again = fields.get(key, 1)
        again = 1 if again is _ABSENT else again
        text = text[:-1] + f', "{key}": {json.dumps(again)}' + "}"
    return text.encode("utf-8")


def mutated(rng: random.Random, payload: bytes) -> bytes:
    """`payload` with a few bytes flipped, dropped, inserted or cut off."""
    data = bytearray(payload)
    for _ in range(rng.randint(1, 4)):
        if not data:
            break
        where = rng.randrange(len(data))
        kind = rng.randrange(4)
        if kind == 0:
            data[where] = rng.randrange(256)
        elif kind == 1:
            del data[where]
        elif kind == 2:
            data.insert(where, rng.choice(b'{}[]",:\\ 0e-.\x00\xff\xc3'))
        else:
            del data[where:]
    return bytes(data)


def hostile(rng: random.Random) -> bytes:
    """Bytes no device should ever see from the bridge."""
    kind = rng.randrange(8)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
    if kind == 1:
        return b"[" * rng.choice([9, 100, 10000]) + b"]" * rng.choice([0, 9, 100])
    if kind == 2:
        return b'{"id": "a", "pad": "' + b"x" * rng.choice([1000, 100_000]) + b'"}'
    if kind == 3:
        return b'{"v":1,"id":"a","device":"light.kitchen","action":"brightness",'
    if kind == 4:
        return b'{"id": "\\ud800", "v": 1}'
    if kind == 5:
        digits = "1" * rng.choice([40, 63, 64, 400])
        return (
            '{"v":1,"id":"n","device":"light.kitchen","action":"brightness",'
            f'"expires":0,"value":0.{digits}}}'
        ).encode()
    if kind == 6:
        return rng.choice([b"", b"null", b"[]", b'"text"', b"{}", b"\xef\xbb\xbf{}"])
    return rng.choice(["\u00e9", "\ud83d\ude00", "caf\u00e9"]).encode(
        "utf-8", "replace"
    )


def command_stream(seed: int, n: int) -> Iterator[bytes]:
    """`n` payloads: mostly structured commands, some mutated, some hostile."""
    rng = random.Random(seed)
    recent: list[str] = []
    for _ in range(n):
        draw = rng.random()
        payload = structured_command(rng, recent)
        if draw < 0.15:
            payload = mutated(rng, payload)
        elif draw < 0.22:
            payload = hostile(rng)
        try:
            command_id = json.loads(payload).get("id")
        except (ValueError, AttributeError, RecursionError):
            command_id = None
        if isinstance(command_id, str) and command_id.isascii():
            recent = (recent + [command_id])[-40:]
        yield payload
