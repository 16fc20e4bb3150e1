"""The layered recognizer: cheapest layer first, each answering only when sure.

    from edgeslm.intent import IntentRecognizer
    rec = IntentRecognizer.from_file("docs/examples/home.yaml")
    rec.recognize("turn the kitchen lights to 40%")
    # IntentResult(intent='HassLightSet', slots={'area': 'Kitchen', 'domain': 'light',
    #              'brightness': 40}, confidence=1.0, layer='template', ...)

Layers: (a) `TemplateLayer` (hassil, exact); (b) the encoder classifier with slots
resolved against the registry; (c) the chat model (not wired yet); (d) not
recognized. Every answer is validated against the registry: an intent that would
act on devices must resolve to at least one device able to do it, and numbers must
be in the device's range; otherwise the next layer is asked.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from edgeslm.intent.registry import Registry, load_registry
from edgeslm.intent.result import IntentResult, not_recognized
from edgeslm.intent.slots import INTENT_CAPABILITIES, SlotResolver, normalize

log = logging.getLogger(__name__)

# Intents that change a device's state (what a false activation would do).
STATE_CHANGING = frozenset(
    {
        "HassTurnOn",
        "HassTurnOff",
        "HassLightSet",
        "HassLightSetRelative",
        "HassClimateSetTemperature",
        "HassSetPosition",
        "HassSetVolume",
        "HassSetVolumeRelative",
        "HassMediaPause",
        "HassMediaUnpause",
        "HassMediaNext",
        "HassMediaPrevious",
        "HassMediaSearchAndPlay",
        "HassMediaPlayerMute",
        "HassMediaPlayerUnmute",
        "HassVacuumStart",
        "HassVacuumReturnToBase",
        "HassVacuumCleanArea",
        "HassFanSetSpeed",
        "HassClimateSetFanMode",
        "HassLawnMowerStartMowing",
        "HassLawnMowerDock",
    }
)
RANGED_SLOTS = {
    "brightness": "brightness",
    "temperature": "temperature",
    "position": "position",
    "volume_level": "volume",
}


class IntentRecognizer:
    """Text in, validated `IntentResult` out.

    Args:
        registry: the site.
        encoder: an `edgeslm.encoder.Encoder`, None for the default MiniLM, or
            False to run the template layer only.
        threshold: the encoder layer answers at this probability or above.
        cache_dir: where trained classifiers are kept (default: the edgeslm cache).
        base_intents: Home Assistant's intents dict (default: installed release).
    """

    def __init__(
        self,
        registry: Registry,
        *,
        encoder: Any = None,
        threshold: float | None = None,
        cache_dir: str | os.PathLike | None = None,
        base_intents: dict[str, Any] | None = None,
    ) -> None:
        from edgeslm.intent.classifier import DEFAULT_THRESHOLD
        from edgeslm.intent.templates import TemplateLayer

        if threshold is not None and not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        self.registry = registry
        self.templates = TemplateLayer(registry, base_intents)
        self.resolver = SlotResolver(registry)
        self.threshold = DEFAULT_THRESHOLD if threshold is None else threshold
        self.encoder = None
        self.classifier = None
        if encoder is not False:
            self._init_encoder(encoder, cache_dir)

    @classmethod
    def from_file(cls, path: str | os.PathLike, **kwargs: Any) -> IntentRecognizer:
        """A recognizer for the registry YAML at `path` (see `__init__` kwargs)."""
        return cls(load_registry(path), **kwargs)

    def _init_encoder(self, encoder: Any, cache_dir: str | os.PathLike | None) -> None:
        from edgeslm.encoder import load_encoder
        from edgeslm.hub import cache_dir as default_cache
        from edgeslm.intent.classifier import train_or_load

        self.encoder = encoder if encoder is not None else load_encoder()
        cache = Path(cache_dir) if cache_dir else default_cache() / "intent"
        self.classifier = train_or_load(
            self.registry,
            self.encoder,
            self.templates.intents,
            self.templates.slot_lists,
            cache,
        )

    # --- recognition -------------------------------------------------------------

    def recognize(
        self, text: str, context: dict[str, Any] | None = None
    ) -> IntentResult:
        """Recognize one request.

        Args:
            text: what the user said or typed.
            context: request context such as `{"area": "Kitchen"}` (the voice
                satellite's area), used when the text names no area or device.

        Raises:
            TypeError: `text` is not a string.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a string, got {type(text).__name__}")
        started = time.perf_counter()
        context = context or {}
        cleaned = normalize(text)
        if not cleaned:
            return not_recognized(text)

        # (a) templates: exact, on the raw text and on the wake-word-free text.
        for candidate in dict.fromkeys((text, cleaned)):
            result = self.templates.recognize(candidate, context)
            if result is not None and self._valid(result):
                return _timed(result, text, started)

        # (b) encoder classifier, slots resolved against the registry.
        if self.classifier is not None:
            result = self.encoder_layer(cleaned, context)
            if result.recognized and self._valid(result):
                return _timed(result, text, started)
            confidence = result.confidence
        else:
            confidence = 0.0

        # TODO: layer (c), the chat model with JSON constrained to the registry;
        # edgeslm/constraints.py (model.extract) had not landed when this was built.
        return _timed(not_recognized(text, confidence), text, started)

    def encoder_layer(self, text: str, context: dict[str, Any]) -> IntentResult:
        """Layer (b) alone: classify `text`, then resolve its slots."""
        import numpy as np

        from edgeslm.intent.classifier import NONE

        vector = self.encoder.embed([text])
        proba = self.classifier.predict_proba(vector)[0]
        best = int(np.argmax(proba))
        intent, confidence = self.classifier.classes[best], float(proba[best])
        if intent == NONE or confidence < self.threshold:
            return not_recognized(text, confidence if intent != NONE else 0.0)
        resolved = self.resolver.resolve(text, intent, context)
        return IntentResult(
            text=text,
            intent=intent,
            slots=resolved.slots,
            confidence=confidence,
            layer="encoder",
            devices=tuple(resolved.devices),
        )

    def _valid(self, result: IntentResult) -> bool:
        """A state-changing intent must reach a capable device, values in range."""
        if result.intent not in STATE_CHANGING:
            return True
        devices = list(result.devices)
        if not devices:
            caps = INTENT_CAPABILITIES.get(result.intent)
            targets = self.resolver.targets(result.slots)
            devices = [
                d.id for d in targets if caps is None or any(d.can(c) for c in caps)
            ]
        if not devices:
            log.debug("%s: no device can serve %s", result.text, result.intent)
            return False
        object.__setattr__(result, "devices", tuple(devices))
        for slot, capability in RANGED_SLOTS.items():
            value = result.slots.get(slot)
            if not isinstance(value, (int, float)):
                continue
            ranges = [
                d.capabilities[capability]
                for d in self.registry.devices
                if d.id in devices and capability in d.capabilities
            ]
            if ranges and not any(r["min"] <= value <= r["max"] for r in ranges):
                log.debug("%s: %s=%s out of range", result.text, slot, value)
                return False
        return True


def _timed(result: IntentResult, text: str, started: float) -> IntentResult:
    from dataclasses import replace

    return replace(result, text=text, latency_ms=1000 * (time.perf_counter() - started))
