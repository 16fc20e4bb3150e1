"""Text to intent, behind a narrow interface: a callable `text -> IntentResult`.

The bridge needs only that callable; it never looks inside the recognizer. Three kinds:

- `intent`: the layered recognizer of `edgeslm.intent`, every layer it has
  (templates, the MiniLM encoder classifier, the chat model); an error when it cannot
  be built.
- `encoder`: the same without the chat model (templates and encoder only): less
  memory and no multi-second answers on a small board.
- `templates`: a small template matcher here, on Home Assistant's English sentences
  through `hassil`, with slot lists built from the registry. It answers only exact
  template matches, so it is fast and never guesses.
- `auto` (the default): `intent` when it can be built, else `templates` with a
  warning that says what is missing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from edgeslm.errors import EdgeSLMError
from edgeslm.intent.registry import Registry, names_of
from edgeslm.intent.result import IntentResult, not_recognized

log = logging.getLogger(__name__)

Recognizer = Callable[[str], IntentResult]
KINDS = ("auto", "intent", "encoder", "templates")


def load_recognizer(kind: str, registry: Registry) -> Recognizer:
    """Build the recognizer the config names (one of `KINDS`).

    Raises:
        ValueError: an unknown kind.
        ImportError, EdgeSLMError, OSError: `intent` or `encoder` could not be built
            (the intent extra or the encoder is missing).
    """
    if kind not in KINDS:
        raise ValueError(f"recognizer must be one of {KINDS}, got {kind!r}")
    if kind in ("auto", "intent", "encoder"):
        try:
            from edgeslm.intent.recognizer import IntentRecognizer

            options = {"chat": False} if kind == "encoder" else {}
            return IntentRecognizer(registry, **options).recognize
        except (ImportError, EdgeSLMError, OSError) as exc:
            if kind != "auto":
                raise
            log.warning(
                "the layered recognizer is unavailable (%s); using templates only. "
                "Install it with: pip install 'edgeslm[bridge]'",
                exc,
            )
    return TemplateRecognizer(registry)


class TemplateRecognizer:
    """Home Assistant's English templates (hassil) with the registry's names.

    Slots come back as Home Assistant names them (`name` = a device id, `area` = an
    area id, `domain`, `brightness`, ...); `devices` lists the devices they point at.
    """

    def __init__(self, registry: Registry) -> None:
        from hassil import Intents
        from hassil.intents import TextSlotList
        from home_assistant_intents import get_intents

        self.registry = registry
        data = get_intents("en")
        if data is None:
            raise RuntimeError("home-assistant-intents has no English sentences")
        for intent, templates in registry.sentences.items():
            block = data["intents"].setdefault(intent, {"data": []})
            block["data"].append({"sentences": list(templates)})
        self._intents = Intents.from_dict(data)
        self._skip_words = data.get("skip_words") or []

        def slot_list(items: list[tuple[str, Any, dict[str, Any]]]) -> TextSlotList:
            return TextSlotList.from_tuples(items, allow_template=False)

        self._lists = {
            "name": slot_list(
                [
                    (n, d.id, {"domain": d.domain})
                    for d in registry.devices
                    for n in names_of(d)
                ]
            ),
            "area": slot_list(
                [(n, a.id, {}) for a in registry.areas for n in names_of(a)]
            ),
            "floor": slot_list(
                [(n, f.id, {}) for f in registry.floors for n in names_of(f)]
            ),
        }
        self("turn on the light")  # hassil compiles lazily; pay that once here

    def __call__(self, text: str) -> IntentResult:
        from hassil import recognize

        start = time.perf_counter()
        match = recognize(
            text, self._intents, slot_lists=self._lists, skip_words=self._skip_words
        )
        elapsed = (time.perf_counter() - start) * 1000
        if match is None:
            return not_recognized(text)
        slots = {name: entity.value for name, entity in match.entities.items()}
        return IntentResult(
            text=text,
            intent=match.intent.name,
            slots=slots,
            confidence=1.0,
            layer="template",
            devices=tuple(resolve_devices(self.registry, slots)),
            latency_ms=elapsed,
        )


def resolve_devices(registry: Registry, slots: dict[str, Any]) -> list[str]:
    """Device ids that `name`, `area`, `floor` and `domain` slots point at."""
    name, area = slots.get("name"), slots.get("area")
    domain, floor = slots.get("domain"), slots.get("floor")
    devices = list(registry.devices)
    if name is not None:
        devices = [d for d in devices if d.id == name]
    if area is not None:
        devices = [d for d in devices if d.area == area]
    if floor is not None:
        areas = {a.id for a in registry.areas if a.floor == floor}
        devices = [d for d in devices if d.area in areas]
    if domain is not None:
        wanted = set(domain) if isinstance(domain, list) else {domain}
        devices = [d for d in devices if d.domain in wanted]
    if name is None and area is None and floor is None:
        return []  # "turn everything off" is not something the bridge does on a guess
    return [d.id for d in devices]
