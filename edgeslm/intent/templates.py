"""Layer (a): sentence templates, matched exactly with `hassil`.

Home Assistant's English templates (the `home-assistant-intents` package) are merged
with edgeslm's own (`data/en.yaml`: relative light changes, and intents an older
release lacks) and with the site's sentences from the registry. Slot lists come
from the registry the way Home Assistant's own tests build them from their
fixtures: `area` and `floor` from names and aliases, `name` from every device name
with its domain and attributes as matching context. Before each match the `name`
list is cut down to the names that occur in the text (a trie), and the best match
is chosen the way Home Assistant chooses it (`recognize_best`, preferring matches
that fill `name` from the list).

A template match is exact, so this layer answers with confidence 1.0 or not at all.
Works with hassil 3.0 and later (the evaluation also runs the 2025.6.23 templates).
Not yet: languages other than English for edgeslm's own templates.
"""

from __future__ import annotations

import copy
import logging
import time
from importlib import resources
from typing import Any

from edgeslm.intent.registry import Registry, names_of
from edgeslm.intent.result import IntentResult
from edgeslm.intent.slots import INTENT_CAPABILITIES

log = logging.getLogger(__name__)


def ha_intents(language: str = "en") -> dict[str, Any]:
    """Home Assistant's templates for `language` (from `home-assistant-intents`).

    Raises:
        ImportError: the `intent` extra is not installed.
        ValueError: the package has no such language.
    """
    try:
        from home_assistant_intents import get_intents
    except ImportError as exc:
        raise ImportError(
            "the template layer needs home-assistant-intents and hassil: "
            "pip install 'edgeslm[intent]'"
        ) from exc
    data = get_intents(language)
    if data is None:
        raise ValueError(f"home-assistant-intents has no language {language!r}")
    return data


def own_intents() -> dict[str, Any]:
    """edgeslm's own templates (`edgeslm/intent/data/en.yaml`)."""
    import yaml

    text = resources.files("edgeslm.intent").joinpath("data/en.yaml").read_text()
    return yaml.safe_load(text)


def merged_intents(registry: Registry, base: dict[str, Any] | None = None) -> dict:
    """Home Assistant's intents + edgeslm's (where missing) + the site's sentences.

    Args:
        registry: the site; its `sentences` are added to their intents (a new
            intent name makes a new intent).
        base: Home Assistant's intents dict (default: the installed release).
    """
    data = copy.deepcopy(base if base is not None else ha_intents())
    ours = own_intents()
    for name, intent in ours["intents"].items():
        data["intents"].setdefault(name, intent)
    for key in ("lists", "expansion_rules"):
        data.setdefault(key, {})
        for name, values in ours.get(key, {}).items():
            data[key].setdefault(name, values)
    for name, sentences in registry.sentences.items():
        entry = {"sentences": list(sentences)}
        data["intents"].setdefault(name, {"data": []})["data"].append(entry)
    return data


def slot_lists(registry: Registry) -> dict[str, Any]:
    """`area`, `floor` and `name` slot lists built from the registry.

    Values are display names, as Home Assistant's tests build them: a device's
    `name` entry carries its domain and attributes as matching context, so a
    template that requires `domain: light` only matches light names.
    """
    from hassil import TextSlotList

    floors = [n for f in registry.floors for n in names_of(f)]
    areas = [n for a in registry.areas for n in names_of(a)]
    entities = []
    for device in registry.devices:
        context = {"domain": device.domain, **device.attributes}
        entities.extend((name, name, context) for name in names_of(device))
    return {
        "area": TextSlotList.from_strings(areas),
        "floor": TextSlotList.from_strings(floors),
        "name": TextSlotList.from_tuples(entities),
    }


class NameFilter:
    """Cuts the `name` slot list down to the names that occur in a text."""

    def __init__(self, name_list: Any) -> None:
        from hassil import Trie

        self.trie = Trie()
        for value in name_list.values:
            self.trie.insert(value.text_in.text.strip().casefold(), value)

    def __call__(self, text: str) -> Any:
        from hassil import TextSlotList

        found = [item[2] for item in self.trie.find(text.casefold())]
        return TextSlotList(name="name", values=found)


class TemplateLayer:
    """Exact template matching against a registry.

    Args:
        registry: the site.
        base: Home Assistant's intents dict (default: the installed release).
        skip_words: words a match may skip ("please", "can you"); default Home
            Assistant's for the language.
    """

    name = "template"

    def __init__(
        self,
        registry: Registry,
        base: dict[str, Any] | None = None,
        *,
        skip_words: list[str] | None = None,
    ) -> None:
        from hassil import Intents

        self.registry = registry
        self.data = merged_intents(registry, base)
        # Intents no device of the site can serve are left out: "play jazz" in a
        # home without a media player is not a command for this home.
        for name in list(self.data["intents"]):
            caps = INTENT_CAPABILITIES.get(name)
            if caps and not any(d.can(c) for d in registry.devices for c in caps):
                del self.data["intents"][name]
        self.intents = Intents.from_dict(self.data)
        self.slot_lists = slot_lists(registry)
        self.names = NameFilter(self.slot_lists["name"])
        self.skip_words = (
            list(self.data.get("skip_words") or [])
            if skip_words is None
            else skip_words
        )
        self.intent_names = sorted(self.data["intents"])

    def recognize(
        self, text: str, context: dict[str, Any] | None = None
    ) -> IntentResult | None:
        """The intent and slots if a template matches `text` exactly, else None.

        Args:
            text: the request.
            context: request context, e.g. `{"area": "Kitchen"}` for a voice
                satellite in the kitchen.
        """
        from hassil import recognize_best

        started = time.perf_counter()
        lists = {**self.slot_lists, "name": self.names(text)}
        try:
            match = recognize_best(
                text,
                self.intents,
                slot_lists=lists,
                skip_words=self.skip_words,
                intent_context=context or {},
                best_slot_name="name",
            )
        except Exception as exc:  # hassil raises bare errors on odd input
            log.debug("hassil failed on a %d-character text: %s", len(text), exc)
            return None
        if match is None:
            return None
        slots = {e.name: e.value for e in match.entities.values()}
        return IntentResult(
            text=text,
            intent=match.intent.name,
            slots=slots,
            confidence=1.0,
            layer=self.name,
            latency_ms=1000 * (time.perf_counter() - started),
        )
