"""Layer (a): sentence templates, matched exactly with `hassil`.

Home Assistant's English templates (the `home-assistant-intents` package) are merged
with edgeslm's own (`data/en.yaml`: relative light changes, and intents an older
release lacks) and with the site's sentences from the registry. Slot lists come
from the registry the way Home Assistant builds them: `area` and `floor` from names
and aliases, `name` from every device name with its domain and attributes as
matching context.

A template match is exact, so this layer answers with confidence 1.0 or not at all.
Works with hassil 3.0 and later (the evaluation also runs the 2025.6.23 templates).
"""

from __future__ import annotations

import copy
import logging
import time
from importlib import resources
from typing import Any

from edgeslm.intent.registry import Registry, names_of
from edgeslm.intent.result import IntentResult

log = logging.getLogger(__name__)


def ha_intents(language: str = "en") -> dict[str, Any]:
    """Home Assistant's templates for `language` (from `home-assistant-intents`)."""
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
    """Home Assistant's intents + edgeslm's (where missing) + the site's sentences."""
    data = copy.deepcopy(base if base is not None else ha_intents())
    ours = own_intents()
    for name, intent in ours["intents"].items():
        data["intents"].setdefault(name, intent)
    for key in ("lists", "expansion_rules"):
        for name, values in ours.get(key, {}).items():
            data[key].setdefault(name, values)
    for name, sentences in registry.sentences.items():
        entry = {"sentences": list(sentences)}
        data["intents"].setdefault(name, {"data": []})["data"].append(entry)
    return data


def slot_lists(registry: Registry) -> dict[str, Any]:
    """`area`, `floor` and `name` slot lists built from the registry."""
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


class TemplateLayer:
    """Exact template matching against a registry.

    Args:
        registry: the site.
        base: Home Assistant's intents dict (default: the installed release).
    """

    name = "template"

    def __init__(self, registry: Registry, base: dict[str, Any] | None = None) -> None:
        from hassil import Intents

        self.registry = registry
        self.data = merged_intents(registry, base)
        self.intents = Intents.from_dict(self.data)
        self.slot_lists = slot_lists(registry)
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
        match = recognize_best(
            text,
            self.intents,
            slot_lists=self.slot_lists,
            intent_context=context or {},
            best_slot_name="name",
        )
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
