"""Slot resolution for free text: names, areas, numbers, percentages, colours.

Used by the encoder and chat layers, which know the intent but not the slots. Text
is normalized the way a speech recognizer writes it (lower case, no punctuation,
numbers as words), a leading wake word is dropped, then:

- numbers written as words become digits ("forty five percent" -> 45);
- device names, areas and floors are found by fuzzy matching word n-grams against
  the registry (difflib ratio, so "kitchin lights" still finds the kitchen);
- colours come from a fixed list of names;
- a domain word ("lights", "fan", "blinds") becomes the `domain` slot when no device
  is named.

Not yet: relative amounts ("a bit", "by 20%") as numbers; ordinal floors.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Any

from edgeslm.intent.registry import Registry, names_of

WAKE_WORDS = (
    "alexa",
    "olly",
    "siri",
    "hey google",
    "ok google",
    "okay google",
    "google",
    "computer",
    "hey",
    "jarvis",
    "cortana",
    "assistant",
)
_UNITS = {
    "zero": 0,
    "one": 1,
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
    "ten": 10,
    "eleven": 11,
    "twelve": 12,
    "thirteen": 13,
    "fourteen": 14,
    "fifteen": 15,
    "sixteen": 16,
    "seventeen": 17,
    "eighteen": 18,
    "nineteen": 19,
}
_TENS = {
    "twenty": 20,
    "thirty": 30,
    "forty": 40,
    "fourty": 40,
    "fifty": 50,
    "sixty": 60,
    "seventy": 70,
    "eighty": 80,
    "ninety": 90,
}
COLORS = (
    "white",
    "warm white",
    "cool white",
    "black",
    "red",
    "orange",
    "yellow",
    "green",
    "blue",
    "purple",
    "violet",
    "pink",
    "brown",
    "cyan",
    "magenta",
    "turquoise",
    "teal",
    "gold",
    "lavender",
    "indigo",
    "lime",
    "amber",
)
DOMAIN_WORDS = {
    "light": ("light", "lights", "lamp", "lamps", "bulb", "bulbs", "lighting"),
    "fan": ("fan", "fans"),
    "cover": (
        "blind",
        "blinds",
        "curtain",
        "curtains",
        "shade",
        "shades",
        "shutter",
        "shutters",
        "garage door",
    ),
    "switch": ("plug", "plugs", "socket", "sockets", "outlet", "outlets", "switch"),
    "media_player": ("tv", "television", "speaker", "speakers"),
    "vacuum": ("vacuum", "robot", "roomba", "hoover"),
    "climate": ("thermostat", "heating", "heater", "ac", "air conditioning"),
    "lock": ("lock", "locks"),
}
FUZZY_CUTOFF = 0.84
# Which capabilities a device needs to be the target of an intent (None: any).
INTENT_CAPABILITIES: dict[str, tuple[str, ...]] = {
    "HassTurnOn": ("on_off", "open_close", "lock", "activate", "vacuum", "media"),
    "HassTurnOff": ("on_off", "open_close", "lock", "vacuum", "media"),
    "HassLightSet": ("brightness", "color", "color_temp"),
    "HassLightSetRelative": ("brightness",),
    "HassClimateSetTemperature": ("temperature",),
    "HassClimateGetTemperature": ("temperature",),
    "HassSetPosition": ("position",),
    "HassSetVolume": ("volume",),
    "HassMediaPause": ("media",),
    "HassMediaUnpause": ("media",),
    "HassMediaNext": ("media",),
    "HassMediaPrevious": ("media",),
    "HassMediaSearchAndPlay": ("media",),
    "HassVacuumStart": ("vacuum",),
    "HassVacuumReturnToBase": ("vacuum",),
}
LIGHT_INTENTS = ("HassLightSet", "HassLightSetRelative")


def normalize(text: str) -> str:
    """Lower case, punctuation dropped (but % kept), leading wake word removed."""
    text = text.casefold().replace("%", " percent ")
    text = re.sub(r"[^\w\s'.-]", " ", text)
    text = re.sub(r"(?<!\d)[.-]|[.-](?!\d)", " ", text)
    text = " ".join(text.split())
    for wake in WAKE_WORDS:
        if text == wake or text.startswith(wake + " "):
            text = text[len(wake) :].strip()
            break
    return text


def words_to_numbers(text: str) -> str:
    """Replace number words with digits: "twenty five" -> "25", "a hundred" -> "100"."""
    words = text.split()
    out: list[str] = []
    i = 0
    while i < len(words):
        value, used = _read_number(words, i)
        if used:
            out.append(str(value))
            i += used
        else:
            out.append(words[i])
            i += 1
    return " ".join(out)


def _read_number(words: list[str], i: int) -> tuple[int, int]:
    """(value, words used) of a number written as words starting at `i`."""
    word = words[i]
    if word in ("hundred", "a") and word == "a":
        if i + 1 < len(words) and words[i + 1] == "hundred":
            return 100, 2
        return 0, 0
    if word == "half" and (i == 0 or words[i - 1] not in ("a", "and")):
        return 50, 1
    value, used = 0, 0
    if word in _TENS:
        value, used = _TENS[word], 1
        if i + 1 < len(words) and words[i + 1] in _UNITS and _UNITS[words[i + 1]] < 10:
            value, used = value + _UNITS[words[i + 1]], 2
    elif word in _UNITS:
        value, used = _UNITS[word], 1
        if i + 1 < len(words) and words[i + 1] == "hundred":
            value, used = value * 100, 2
    return value, used


@dataclass
class Resolved:
    """Slots found in a text, with the registry devices they point at."""

    slots: dict[str, Any] = field(default_factory=dict)
    devices: list[str] = field(default_factory=list)


class SlotResolver:
    """Finds registry names and values in free text."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._names = [
            (n.casefold(), n, d) for d in registry.devices for n in names_of(d)
        ]
        self._areas = [
            (n.casefold(), a.name, a) for a in registry.areas for n in names_of(a)
        ]
        self._floors = [
            (n.casefold(), f.name, f) for f in registry.floors for n in names_of(f)
        ]

    def resolve(
        self,
        text: str,
        intent: str | None = None,
        context: dict[str, Any] | None = None,
    ) -> Resolved:
        """Slots for `text`; `context` may give the satellite's `area`."""
        norm = words_to_numbers(normalize(text))
        words = norm.split()
        out = Resolved()
        taken: set[int] = set()

        # Device names first (longest, best match), then areas and floors; only
        # devices able to do what the intent asks are candidates.
        wanted = INTENT_CAPABILITIES.get(intent or "")
        names = [
            row
            for row in self._names
            if wanted is None or any(row[2].can(c) for c in wanted)
        ]
        device = self._best(words, names, taken)
        if device is not None:
            out.slots["name"] = device[1]
            out.devices.append(device[2].id)
        area = self._best(words, self._areas, taken)
        if area is not None:
            out.slots["area"] = area[1]
        floor = self._best(words, self._floors, taken)
        if floor is not None:
            out.slots["floor"] = floor[1]
        if "name" not in out.slots and "area" not in out.slots and context:
            if context.get("area"):
                out.slots["area"] = context["area"]

        # Domain from words like "lights" when no device is named.
        if "name" not in out.slots:
            free = " ".join(w for k, w in enumerate(words) if k not in taken)
            for domain, cues in DOMAIN_WORDS.items():
                if any(re.search(rf"\b{re.escape(c)}\b", free) for c in cues):
                    out.slots["domain"] = domain
                    break
            if intent in LIGHT_INTENTS:
                out.slots["domain"] = "light"

        self._values(norm, intent, out)
        if not out.devices:
            out.devices = [
                d.id
                for d in self.targets(out.slots)
                if wanted is None or any(d.can(c) for c in wanted)
            ]
        return out

    def _values(self, norm: str, intent: str | None, out: Resolved) -> None:
        """Numbers, percentages and colours, named after the intent's slots."""
        number = re.search(r"\b(\d+(?:\.\d+)?)\s*(percent|per cent|degrees?)?\b", norm)
        if intent in ("HassLightSet", "HassLightSetRelative", None):
            if number and number.group(2) != "degrees":
                out.slots["brightness"] = _num(number.group(1))
            elif re.search(r"\b(full|max|maximum|highest)\b", norm):
                out.slots["brightness"] = 100
            for color in sorted(COLORS, key=len, reverse=True):
                if re.search(rf"\b{color}\b", norm):
                    out.slots["color"] = color
                    break
        elif intent == "HassClimateSetTemperature" and number:
            out.slots["temperature"] = _num(number.group(1))
        elif intent == "HassSetPosition" and number:
            out.slots["position"] = _num(number.group(1))
        elif intent == "HassSetVolume" and number:
            out.slots["volume_level"] = _num(number.group(1))
        if intent == "HassLightSetRelative":
            up = re.search(
                r"\b(up|bright\w*|more|raise|increase|lighter|stronger)\b", norm
            )
            out.slots["brightness_step"] = "up" if up else "down"
            out.slots.pop("color", None)

    def _best(self, words: list[str], table, taken: set[int]):
        """The table row whose name best matches a free n-gram of `words`."""
        best, best_score, best_span = None, 0.0, None
        for n in range(min(4, len(words)), 0, -1):
            for start in range(len(words) - n + 1):
                span = range(start, start + n)
                if taken.intersection(span):
                    continue
                gram = " ".join(words[start : start + n])
                for key, value, item in table:
                    if abs(len(key) - len(gram)) > 3:
                        continue
                    score = difflib.SequenceMatcher(None, gram, key).ratio()
                    score += 0.01 * n  # prefer longer names on ties
                    if score > best_score and score >= FUZZY_CUTOFF:
                        best, best_score, best_span = (key, value, item), score, span
        if best_span is not None:
            taken.update(best_span)
        return best

    def targets(self, slots: dict[str, Any]) -> list:
        """Registry devices the slots select (HA's matching: name, area, floor,
        domain)."""
        area = self.registry.area_by_name(slots["area"]) if "area" in slots else None
        floor_ids = {
            f.id for f in self.registry.floors if slots.get("floor") in names_of(f)
        }
        out = []
        for device in self.registry.devices:
            if "name" in slots and slots["name"] not in names_of(device):
                continue
            if "area" in slots and (area is None or device.area != area.id):
                continue
            if "floor" in slots:
                dev_area = self.registry.area(device.area)
                if dev_area is None or dev_area.floor not in floor_ids:
                    continue
            if "domain" in slots and device.domain != slots["domain"]:
                continue
            out.append(device)
        return out


def _num(text: str) -> int | float:
    value = float(text)
    return int(value) if value.is_integer() else value
