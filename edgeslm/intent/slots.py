"""Slot resolution for free text: names, areas, numbers, percentages, colours.

Used by the encoder and chat layers, which know the intent but not the slots. Text
is normalized the way a speech recognizer writes it (lower case, no punctuation,
numbers as words), leading wake words are dropped ("hey olly ..."), then:

- numbers written as words become digits ("forty five percent" -> 45);
- device names, areas and floors are found by fuzzy matching word n-grams against
  the registry (difflib's ratio, at least `FUZZY_CUTOFF`, so "kitchin lights" and
  "bed room lamp" still find their devices);
- colours come from a fixed list of names;
- a domain word ("lights", "fan", "blinds") becomes the `domain` slot when no device
  is named, and intents that only one domain serves imply it.

Slot values follow Home Assistant: display names for `name`, `area` and `floor`,
numbers for `brightness`, `temperature`, `position`, `volume_level`.
Not yet: relative amounts ("a bit", "by 20%") as numbers; ordinal floors; colour
temperatures in words.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Any

from edgeslm.intent.registry import Device, Registry, names_of

WAKE_WORDS = (
    "hey google",
    "ok google",
    "okay google",
    "hey siri",
    "hey alexa",
    "alexa",
    "olly",
    "siri",
    "google",
    "computer",
    "jarvis",
    "cortana",
    "assistant",
    "hey",
)
_WAKE_WORDS_LONGEST_FIRST = sorted(
    (w.split() for w in WAKE_WORDS), key=len, reverse=True
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
    "switch": ("plug", "plugs", "socket", "sockets", "outlet", "outlets"),
    "media_player": ("tv", "television", "speaker", "speakers"),
    "vacuum": ("vacuum", "robot", "roomba", "hoover", "vacuum cleaner"),
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
    "HassSetVolumeRelative": ("volume",),
    "HassMediaPause": ("media",),
    "HassMediaUnpause": ("media",),
    "HassMediaNext": ("media",),
    "HassMediaPrevious": ("media",),
    "HassMediaSearchAndPlay": ("media",),
    "HassMediaPlayerMute": ("media",),
    "HassMediaPlayerUnmute": ("media",),
    "HassVacuumStart": ("vacuum",),
    "HassVacuumReturnToBase": ("vacuum",),
    "HassVacuumCleanArea": ("vacuum",),
    "HassFanSetSpeed": ("fan_speed",),
}
# Intents only one domain serves: the domain is implied when the text names none.
INTENT_DOMAIN = {
    "HassLightSet": "light",
    "HassLightSetRelative": "light",
    "HassVacuumStart": "vacuum",
    "HassVacuumReturnToBase": "vacuum",
    "HassVacuumCleanArea": "vacuum",
    "HassClimateSetTemperature": "climate",
    "HassClimateGetTemperature": "climate",
    "HassFanSetSpeed": "fan",
}
LIGHT_INTENTS = ("HassLightSet", "HassLightSetRelative")
# Intents whose area (or floor) is where to act, not where the device is: Home
# Assistant's HassVacuumCleanArea sends the named vacuum, or every vacuum of the
# home, to clean that area, wherever the vacuum stands.
PLACE_INTENTS = frozenset({"HassVacuumCleanArea"})
# Slots that pick devices; a state-changing answer needs at least one of them.
TARGET_SLOTS = ("name", "area", "floor", "domain")
_NUMBER = re.compile(r"\b(\d+(?:\.\d+)?)\s*(percent|per cent|degrees?)?\b")
# Direction of a relative change: "too bright" asks for less, "too dark" for more;
# otherwise a word that lowers wins over one that raises ("make it less bright").
_TOO_MUCH = re.compile(
    r"\btoo (bright|strong|harsh|glaring|loud|much)\b|\bblinding\b|\bglar\w*"
)
_TOO_LITTLE = re.compile(r"\btoo (dark|dim|weak|quiet|low)\b|\bcan't see\b|\bbarely\b")
_DOWN = re.compile(
    r"\b(dim\w*|dark\w*|lower|reduce|decrease|less|down|soft\w*|tone|quiet\w*)\b"
)
_UP = re.compile(
    r"\b(up|bright|brighter|brighten\w*|more|raise|increase|lighter|stronger"
    r"|higher|boost|louder)\b"
)


def normalize(text: str) -> str:
    """Lower case, punctuation dropped (but % kept), leading wake words removed."""
    return strip_wake_words(_spoken_form(text))


def _spoken_form(text: str) -> str:
    """Lower case, punctuation dropped (but % kept), spaces collapsed."""
    text = text.casefold().replace("%", " percent ")
    text = re.sub(r"[^\w\s'.-]", " ", text)
    text = re.sub(r"(?<!\d)[.-]|[.-](?!\d)", " ", text)
    return " ".join(text.split())


def strip_wake_words(text: str) -> str:
    """`text` (lower case, no punctuation) without its leading wake words.

    Wake words are dropped one after another, the longest first, as long as words
    follow them: "hey olly turn on the lights" -> "turn on the lights". A text of
    nothing but wake words keeps its last one ("hey hey" -> "hey"), so a text is
    never emptied here.
    """
    words = text.split()
    while True:
        n = _wake_word_length(words)
        if n == 0 or n >= len(words):
            return " ".join(words)
        words = words[n:]


def _wake_word_length(words: list[str]) -> int:
    """Number of words of the wake word that starts `words` (0 if none)."""
    for wake in _WAKE_WORDS_LONGEST_FIRST:
        if words[: len(wake)] == wake:
            return len(wake)
    return 0


def starts_with_wake_word(text: str) -> bool:
    """Whether `normalize` drops a wake word from `text` (the one definition)."""
    spoken = _spoken_form(text)
    return strip_wake_words(spoken) != spoken


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
    word, after = words[i], words[i + 1] if i + 1 < len(words) else ""
    if word in ("a", "one") and after == "hundred":
        return 100, 2
    if word in _TENS:
        if after in _UNITS and 0 < _UNITS[after] < 10:
            return _TENS[word] + _UNITS[after], 2
        return _TENS[word], 1
    if word in _UNITS:
        return _UNITS[word], 1
    return 0, 0


VALUE_SLOTS = ("brightness", "color", "temperature", "position", "volume_level")


@dataclass
class Resolved:
    """Slots found in a text, with the registry devices they point at.

    Attributes:
        slots: Home Assistant slot names -> values.
        devices: ids of the devices the slots select.
        grounded: the text itself names a target (device, area, floor, domain
            word) or a value, or the intent implies its domain; not only the
            request context or the encoder's domain guess.
    """

    slots: dict[str, Any] = field(default_factory=dict)
    devices: list[str] = field(default_factory=list)
    grounded: bool = False


class _Fuzzy:
    """One registry name, ready for fast fuzzy comparison with n-grams."""

    def __init__(self, key: str, value: str, item: Any) -> None:
        self.key, self.value, self.item = key, value, item
        self.n_words = len(key.split())
        self.matcher = difflib.SequenceMatcher(None, "", key)  # seq2 cached

    def score(self, gram: str) -> float:
        if gram == self.key:
            return 1.0
        if abs(len(gram) - len(self.key)) > 3:
            return 0.0
        m = self.matcher
        m.set_seq1(gram)
        if m.real_quick_ratio() < FUZZY_CUTOFF or m.quick_ratio() < FUZZY_CUTOFF:
            return 0.0
        return m.ratio()


class SlotResolver:
    """Finds registry names and values in free text.

    Args:
        registry: the site whose names are looked for.
    """

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._names = [
            _Fuzzy(n.casefold(), n, d) for d in registry.devices for n in names_of(d)
        ]
        self._areas = [
            _Fuzzy(n.casefold(), a.name, a) for a in registry.areas for n in names_of(a)
        ]
        self._floors = [
            _Fuzzy(n.casefold(), f.name, f)
            for f in registry.floors
            for n in names_of(f)
        ]

    def resolve(
        self,
        text: str,
        intent: str | None = None,
        context: dict[str, Any] | None = None,
        domain: str | None = None,
    ) -> Resolved:
        """Slots for `text`.

        Args:
            text: the request (normalized here).
            intent: the intent the slots are for; picks value slots and the
                devices that can be named.
            context: request context; its `area` is used when the text names
                neither a device nor an area.
            domain: a domain guessed from the meaning (the encoder's domain
                head), used when the text names no device and no domain word;
                it narrows an area to that kind of device.
        """
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
            if wanted is None or any(row.item.can(c) for c in wanted)
        ]
        device = self._best(words, names, taken)
        if device is not None:
            out.slots["name"] = device.value
            out.devices.append(device.item.id)
        area = self._best(words, self._areas, taken)
        if area is not None:
            out.slots["area"] = area.value
        floor = self._best(words, self._floors, taken)
        if floor is not None:
            out.slots["floor"] = floor.value
        out.grounded = bool({"name", "area", "floor"} & set(out.slots))
        # The satellite's area is where the speaker is, not a target they named.
        here = context.get("area") if context and not out.grounded else None

        # Domain from words like "lights" when no device is named.
        if "name" not in out.slots:
            free = " ".join(w for k, w in enumerate(words) if k not in taken)
            for name, cues in DOMAIN_WORDS.items():
                if any(re.search(rf"\b{re.escape(c)}\b", free) for c in cues):
                    out.slots["domain"] = name
                    out.grounded = True
                    break
            if intent in LIGHT_INTENTS and "domain" not in out.slots:
                out.slots["domain"] = "light"  # as Home Assistant's templates do
            elif "domain" not in out.slots and intent not in INTENT_DOMAIN:
                if domain is not None:
                    out.slots["domain"] = domain

        self._values(norm, intent, out)
        if intent in INTENT_DOMAIN or any(k in out.slots for k in VALUE_SLOTS):
            out.grounded = True
        if not out.devices:
            out.devices = self._able(intent, out.slots, wanted)
            # As in Home Assistant, the satellite's area only prefers its own
            # devices, when it has one able to do the intent: the kitchen light
            # for "lights on" there, but the home's one vacuum wherever it stands.
            near = (
                self._able(intent, {**out.slots, "area": here}, wanted) if here else []
            )
            if near:
                out.slots["area"], out.devices = here, near
        return out

    def _able(
        self, intent: str | None, slots: dict[str, Any], wanted: tuple[str, ...] | None
    ) -> list[str]:
        """Ids of the devices `slots` select that can do `intent` (`wanted`)."""
        return [
            d.id
            for d in self.targets(target_slots(intent, slots))
            if wanted is None or any(d.can(c) for c in wanted)
        ]

    def _values(self, norm: str, intent: str | None, out: Resolved) -> None:
        """Numbers, percentages and colours, named after the intent's slots."""
        number = _NUMBER.search(norm)
        if intent in ("HassLightSet", None):
            if number and number.group(2) not in ("degree", "degrees"):
                out.slots["brightness"] = _num(number.group(1))
            elif re.search(r"\b(full|max|maximum|highest)\b", norm):
                out.slots["brightness"] = 100
            elif re.search(r"\b(half|halfway)\b", norm):
                out.slots["brightness"] = 50
            for color in sorted(COLORS, key=len, reverse=True):
                if re.search(rf"\b{color}\b", norm):
                    out.slots["color"] = color
                    break
        elif intent == "HassClimateSetTemperature" and number:
            out.slots["temperature"] = _num(number.group(1))
        elif intent == "HassSetPosition":
            if number:
                out.slots["position"] = _num(number.group(1))
            elif re.search(r"\b(half|halfway)\b", norm):
                out.slots["position"] = 50
        elif intent == "HassSetVolume" and number:
            out.slots["volume_level"] = _num(number.group(1))
        if intent == "HassLightSetRelative":
            out.slots["brightness_step"] = _direction(norm)
        elif intent == "HassSetVolumeRelative":
            out.slots["volume_step"] = _direction(norm)

    def _best(self, words: list[str], table: list[_Fuzzy], taken: set[int]):
        """The table row whose name best matches a free n-gram of `words`."""
        best, best_score, best_span = None, 0.0, None
        for n in range(min(4, len(words)), 0, -1):
            for start in range(len(words) - n + 1):
                span = range(start, start + n)
                if taken.intersection(span):
                    continue
                gram = " ".join(words[start : start + n])
                for row in table:
                    score = row.score(gram)
                    if score < FUZZY_CUTOFF:
                        continue
                    score += 0.01 * n  # prefer longer names on ties
                    if score > best_score:
                        best, best_score, best_span = row, score, span
        if best_span is not None:
            taken.update(best_span)
        return best

    def targets(self, slots: dict[str, Any]) -> list[Device]:
        """Registry devices the slots select, as Home Assistant matches them.

        `name`, `area`, `floor`, `domain` (one or a list) and `device_class` all
        have to fit; a `name` of "all" selects nothing by name. No targeting slot
        at all selects nothing (Home Assistant never acts on everything at once).
        """
        name = slots.get("name")
        if name == "all":
            name = None
        if name is None and not any(slots.get(k) for k in TARGET_SLOTS[1:]):
            return []
        area = self.registry.area_by_name(slots["area"]) if "area" in slots else None
        floor_ids = {
            f.id for f in self.registry.floors if slots.get("floor") in names_of(f)
        }
        domains = slots.get("domain")
        domains = set(domains) if isinstance(domains, list) else {domains}
        device_class = slots.get("device_class")
        out = []
        for device in self.registry.devices:
            if name is not None and name.casefold() not in (
                n.casefold() for n in names_of(device)
            ):
                continue
            if "area" in slots and (area is None or device.area != area.id):
                continue
            if "floor" in slots:
                dev_area = self.registry.area(device.area)
                if dev_area is None or dev_area.floor not in floor_ids:
                    continue
            if slots.get("domain") and device.domain not in domains:
                continue
            if device_class and device.attributes.get("device_class") not in (
                device_class if isinstance(device_class, list) else [device_class]
            ):
                continue
            out.append(device)
        return out


def target_slots(intent: str | None, slots: dict[str, Any]) -> dict[str, Any]:
    """The slots of an `intent` answer that select its devices (for `targets`).

    The area and floor of a `PLACE_INTENTS` intent are where to act and select
    nothing; an intent only one domain serves implies that domain when nothing
    else is aimed at.
    """
    if intent in PLACE_INTENTS:
        slots = {k: v for k, v in slots.items() if k not in ("area", "floor")}
    if intent in INTENT_DOMAIN and not any(slots.get(k) for k in TARGET_SLOTS):
        slots = {**slots, "domain": INTENT_DOMAIN[intent]}
    return slots


def _direction(norm: str) -> str:
    """ "up" or "down" for a relative change, from the words of the request."""
    if _TOO_MUCH.search(norm):
        return "down"
    if _TOO_LITTLE.search(norm):
        return "up"
    if _DOWN.search(norm):
        return "down"
    return "up" if _UP.search(norm) else "down"


def _num(text: str) -> int | float:
    value = float(text)
    return int(value) if value.is_integer() else value
