"""The layered recognizer: cheapest layer first, each answering only when sure.

    from edgeslm.intent import IntentRecognizer
    rec = IntentRecognizer.from_file("firmware_bridge/examples/home.yaml")
    rec.recognize("turn the kitchen light to 40%")
    # IntentResult(intent='HassLightSet', slots={'name': 'Kitchen light',
    #              'brightness': 40}, confidence=1.0, layer='template', ...)

Layers, in order:

(a) `TemplateLayer`: hassil, exact, confidence 1.0; tried on the text as given and
    again without a leading wake word.
(b) the encoder: `p`, the intent head's total probability for the intents this
    registry can serve, and the likeliest of them. `p >= threshold`: slots are
    resolved against the registry (`SlotResolver`) and that intent is the
    answer. Mostly NONE or classes the layer does not answer (timers, weather,
    ...): not recognized.
(c) the chat model, asked only when `chat_threshold <= p < threshold`: it picks
    one of the encoder's three best answerable Home Assistant intents (not the
    site's own, which it knows nothing about) or "none", and a device, as JSON
    constrained to those names, the registry's devices and its value ranges;
    slots come from the registry resolver, and an answer whose device the text
    does not select is dropped, so the model cannot act on a device of its own.
(d) not recognized.

Every answer is checked against the registry (`check`): an intent that changes
a device's state must select at least one device able to do it, and numbers must
lie in that device's range. A template match that fails the check is still the
intent: it is returned with the reason in `error` (the user asked for a fan the
kitchen does not have). A guess that fails it is dropped and the next layer is
asked. The thresholds are calibrated in docs/INTENTS.md.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from edgeslm.intent.registry import Registry, load_registry
from edgeslm.intent.result import IntentResult, not_recognized
from edgeslm.intent.slots import (
    INTENT_CAPABILITIES,
    PLACE_INTENTS,
    TARGET_SLOTS,
    SlotResolver,
    normalize,
    target_slots,
)

log = logging.getLogger(__name__)

# Calibrated on hand-written held-out requests (docs/INTENTS.md, "Thresholds";
# 2026-12-04 evening, 179 in-domain and 669 out-of-domain, on the total
# probability of the site's intents). Equal: no chat band added more right
# answers than wrong ones there, so by default the chat model is never asked.
DEFAULT_THRESHOLD = 0.7
DEFAULT_CHAT_THRESHOLD = 0.7
# Longer requests are refused unread: a command is a sentence, and matching cost
# grows with length (a hostile request must not stall the bridge).
MAX_REQUEST_CHARS = 500
# The domain head's guess narrows an area to one kind of device at this or above.
DOMAIN_THRESHOLD = 0.5
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
# Value slot -> the capability whose range bounds it.
RANGED_SLOTS = {
    "brightness": "brightness",
    "temperature": "temperature",
    "position": "position",
    "volume_level": "volume",
}
# The value slot the chat layer may fill, per intent.
VALUE_SLOT = {
    "HassLightSet": "brightness",
    "HassClimateSetTemperature": "temperature",
    "HassSetPosition": "position",
    "HassSetVolume": "volume_level",
}
# Naming "none" as an option with examples made SmolLM2-135M say it for most
# out-of-domain requests; without it the model picked a device intent for nearly
# everything (docs/INTENTS.md, "Layer (c)").
CHAT_SYSTEM = (
    "You sort requests to a smart home. Possible device actions:\n{intents}\n"
    "- none: anything else, such as questions, facts, music, weather, shopping "
    "or chat.\nAnswer with JSON naming the one that fits the request."
)
INTENT_HELP = {
    "HassTurnOn": "turn on, switch on, open or start a device",
    "HassTurnOff": "turn off, switch off, close or stop a device",
    "HassLightSet": "set a light's brightness or colour",
    "HassLightSetRelative": "make lights brighter or dimmer",
    "HassClimateSetTemperature": "set the thermostat temperature",
    "HassClimateGetTemperature": "ask the indoor temperature",
    "HassSetPosition": "set how far blinds or covers are open",
    "HassGetState": "ask whether a device is on, off, open or locked",
    "HassVacuumStart": "start the robot vacuum cleaning",
    "HassVacuumReturnToBase": "send the vacuum back to its dock",
    "HassVacuumCleanArea": "vacuum one room or area",
    "HassMediaPause": "pause playback",
    "HassMediaUnpause": "resume playback",
    "HassMediaNext": "skip to the next track",
    "HassMediaPrevious": "go back to the previous track",
    "HassSetVolume": "set the volume to a level",
    "HassSetVolumeRelative": "turn the volume up or down",
}


class IntentRecognizer:
    """Text in, validated `IntentResult` out.

    Args:
        registry: the site.
        encoder: an `edgeslm.encoder.Encoder`, None for the default MiniLM, or
            False to run without layers (b) and (c).
        chat: a loaded chat `Model` for layer (c), None to load the default
            model the first time layer (c) is needed, or False for no layer (c).
        threshold: the encoder layer answers at this probability or above.
        chat_threshold: below `threshold` and at this or above, the chat model
            is asked.
        cache_dir: where trained classifiers are kept (default: the edgeslm cache).
        base_intents: Home Assistant's intents dict (default: installed release).

    Raises:
        ValueError: a threshold is out of range.
    """

    def __init__(
        self,
        registry: Registry,
        *,
        encoder: Any = None,
        chat: Any = None,
        threshold: float | None = None,
        chat_threshold: float | None = None,
        cache_dir: str | os.PathLike | None = None,
        base_intents: dict[str, Any] | None = None,
    ) -> None:
        from edgeslm.intent.templates import TemplateLayer

        self.threshold = DEFAULT_THRESHOLD if threshold is None else threshold
        self.chat_threshold = (
            DEFAULT_CHAT_THRESHOLD if chat_threshold is None else chat_threshold
        )
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if not 0.0 < self.chat_threshold <= self.threshold:
            raise ValueError(
                f"chat_threshold must be in (0, threshold={self.threshold}], "
                f"got {self.chat_threshold}"
            )
        self.registry = registry
        self.templates = TemplateLayer(registry, base_intents)
        self.resolver = SlotResolver(registry)
        self.encoder = None
        self.classifier = None
        # Milliseconds each layer spent on the last request (for the evaluation).
        self.last_timings: dict[str, float] = {}
        self._chat = chat if encoder is not False else False
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
            self.registry, self.encoder, self.templates.intents, cache
        )

    # --- recognition -------------------------------------------------------------

    def recognize(
        self, text: str, context: dict[str, Any] | None = None
    ) -> IntentResult:
        """Recognize one request.

        Args:
            text: what the user said or typed.
            context: request context such as `{"area": "Kitchen"}` (the voice
                satellite's area); when the text names no device, area or floor,
                that area's devices are preferred if it has any able to do the
                intent.

        Raises:
            TypeError: `text` is not a string or `context` not a mapping.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a string, got {type(text).__name__}")
        if context is not None and not isinstance(context, dict):
            raise TypeError(f"context must be a dict, got {type(context).__name__}")
        started = time.perf_counter()
        timings = self.last_timings = {}
        context = context or {}
        if len(text) > MAX_REQUEST_CHARS:
            refused = replace(
                not_recognized(text),
                error=f"request longer than {MAX_REQUEST_CHARS} characters",
            )
            return _timed(refused, text, started)
        cleaned = normalize(text)
        if not cleaned:
            return _timed(not_recognized(text), text, started)

        # (a) templates: exact, on the text as given and without a wake word. A
        # match is the intent even when no device can carry it out: it is
        # returned with the reason, and no guessing layer is asked.
        for candidate in dict.fromkeys((text.strip(), cleaned)):
            result = self.templates.recognize(candidate, context)
            if result is not None:
                timings["template"] = _ms(started)
                return _timed(self.checked(result), text, started)
        timings["template"] = _ms(started)
        if self.classifier is None:
            return _timed(not_recognized(text), text, started)

        # (b) the encoder; (c) the chat model in the uncertain band.
        step = time.perf_counter()
        guess = self.classify(cleaned)
        result = self._encoder_answer(cleaned, context, guess)
        timings["encoder"] = _ms(step)
        if result is not None:
            return _timed(result, text, started)
        if self._chat is not False and self.chat_threshold <= guess.p < self.threshold:
            step = time.perf_counter()
            result = self.chat_layer(cleaned, context, guess)
            timings["chat"] = _ms(step)
            if result is not None:
                return _timed(result, text, started)
        return _timed(not_recognized(text, guess.p), text, started)

    def classify(self, text: str) -> Guess:
        """The encoder heads' view of `text` (already normalized)."""
        from edgeslm.intent.classifier import Features

        vector = Features(self.encoder.embed([text]), [text])
        intents = self.classifier.intent_head
        p = intents.predict_proba(vector)[0]
        order = np.argsort(-p)
        answerable = self.classifier.answerable
        domains = self.classifier.domain_head
        pd = domains.predict_proba(vector)[0]
        best_domain = int(np.argmax(pd))
        # Sure that it is a command for this site, split between close intents
        # ("raise the lights": on, or brighter?): the total counts, and the
        # likeliest intent is the answer (docs/INTENTS.md, "Layer (b)").
        in_site = [i for i, c in enumerate(intents.classes) if c in answerable]
        return Guess(
            ranked=[(intents.classes[i], float(p[i])) for i in order[:5]],
            answerable=answerable,
            domain=domains.classes[best_domain],
            domain_p=float(pd[best_domain]),
            p=float(p[in_site].sum()),
        )

    def encoder_layer(
        self, text: str, context: dict[str, Any] | None = None
    ) -> IntentResult:
        """Layer (b) alone (no validation fallback): for tests and calibration."""
        cleaned = normalize(text)
        guess = self.classify(cleaned)
        result = self._encoder_answer(cleaned, context or {}, guess)
        return result or not_recognized(text, guess.p)

    def _encoder_answer(
        self, text: str, context: dict[str, Any], guess: Guess
    ) -> IntentResult | None:
        if guess.intent is None or guess.p < self.threshold:
            return None
        result = self.checked(
            self._resolved(text, guess.intent, guess.p, "encoder", context, guess)
        )
        return result if result.error is None else None

    def _resolved(
        self,
        text: str,
        intent: str,
        p: float,
        layer: str,
        context: dict[str, Any],
        guess: Guess,
    ) -> IntentResult:
        domain = guess.domain if guess.domain_p >= DOMAIN_THRESHOLD else None
        resolved = self.resolver.resolve(text, intent, context, domain)
        # A guess must find its target in the text: the satellite's area alone
        # ("turn the page" said in the lounge) selects nothing.
        ungrounded = intent in STATE_CHANGING and not resolved.grounded
        return IntentResult(
            text=text,
            intent=intent,
            slots=resolved.slots,
            confidence=p,
            layer=layer,
            devices=() if ungrounded else tuple(resolved.devices),
            error="the request names no device, area or value" if ungrounded else None,
        )

    # --- layer (c) ---------------------------------------------------------------

    def chat_model(self) -> Any:
        """The chat model of layer (c), loaded on first use."""
        if self._chat is None:
            import edgeslm

            log.info("loading the default chat model for the intent layer")
            self._chat = edgeslm.load()
        return self._chat

    def chat_schema(self, intents: list[str]) -> dict[str, Any]:
        """The JSON schema the chat model answers in.

        `intent`: one of `intents` or "none"; `device`: the display name of a
        registry device able to do one of them, or "none"; `value` (when an
        intent takes one): an integer within the registry's range for it.
        """
        properties: dict[str, Any] = {"intent": {"enum": [*intents, "none"]}}
        caps = {c for i in intents for c in INTENT_CAPABILITIES.get(i, ())}
        names = [d.name for d in self.registry.devices if any(d.can(c) for c in caps)]
        properties["device"] = {"enum": [*dict.fromkeys(names), "none"]}
        slots = {VALUE_SLOT[i] for i in intents if i in VALUE_SLOT}
        lows, highs = [], []
        for slot in slots:
            for device in self.registry.devices:
                limits = device.capabilities.get(RANGED_SLOTS[slot])
                if limits and "min" in limits:
                    lows.append(limits["min"])
                    highs.append(limits["max"])
        if lows:
            properties["value"] = {
                "type": "integer",
                "minimum": int(min(lows)),
                "maximum": int(max(highs)),
            }
        return {
            "type": "object",
            "properties": properties,
            "required": ["intent", "device"],
            "additionalProperties": False,
        }

    def chat_layer(
        self, text: str, context: dict[str, Any], guess: Guess
    ) -> IntentResult | None:
        """Layer (c): the chat model picks among the encoder's best intents."""
        # Only intents the model can be told about: a site's own intents are
        # names without a description (they produced false activations).
        candidates = [
            i for i, _ in guess.ranked if i in guess.answerable and i in INTENT_HELP
        ][:3]
        if not candidates:
            return None
        listing = "\n".join(f"- {i}: {INTENT_HELP[i]}" for i in candidates)
        messages = [
            {"role": "system", "content": CHAT_SYSTEM.format(intents=listing)},
            {"role": "user", "content": text},
        ]
        try:
            reply = self.chat_model().chat(
                messages,
                json_schema=self.chat_schema(candidates),
                max_tokens=40,
                temperature=0.0,
            )
            answer = json.loads(reply.text)
        except Exception as exc:  # a broken layer (c) must not break (a) and (b)
            log.warning("chat layer failed (%s); answering not recognized", exc)
            return None
        intent = answer.get("intent") if isinstance(answer, dict) else None
        if intent not in candidates:
            return None
        p = dict(guess.ranked).get(intent, 0.0)
        result = self._resolved(text, intent, p, "chat", context, guess)
        # The model's device must be one the text selects: naming another one
        # means it is not sure what the request is about.
        named = answer.get("device")
        by_name = {d.name: d.id for d in self.registry.devices}
        if named not in (None, "none") and by_name.get(named) not in result.devices:
            log.debug("chat layer named %r, the text selects %s", named, result.devices)
            return None
        slot = VALUE_SLOT.get(intent)
        if slot and slot not in result.slots and isinstance(answer.get("value"), int):
            result.slots[slot] = answer["value"]
        result = self.checked(result)
        return result if result.error is None else None

    # --- validation --------------------------------------------------------------

    def checked(self, result: IntentResult) -> IntentResult:
        """`result` with the devices it selects and, if it cannot be carried
        out here, the reason in `error` (see `check`)."""
        if result.error is not None:
            return result
        devices, error = check(self.registry, self.resolver, result)
        return replace(result, devices=devices, error=error)


def check(
    registry: Registry, resolver: SlotResolver, result: IntentResult
) -> tuple[tuple[str, ...], str | None]:
    """The devices a result selects, and why it cannot be carried out (or None).

    An intent that changes a device's state must select at least one device able
    to do it (by name, area, floor, domain, device class, or the one domain the
    intent implies), and its numbers must lie in those devices' ranges. The area
    of HassVacuumCleanArea is the room to clean: it must exist, and selects no
    device. Other intents (questions, timers) pass as they are.
    """
    if result.intent not in STATE_CHANGING:
        return tuple(result.devices), None
    caps = INTENT_CAPABILITIES.get(result.intent or "")
    place = result.slots.get("area") if result.intent in PLACE_INTENTS else None
    if place is not None and registry.area_by_name(place) is None:
        return (), f"this site has no area {place}"  # as Home Assistant refuses it
    devices = list(result.devices)
    if not devices:
        devices = [
            d.id
            for d in resolver.targets(target_slots(result.intent, result.slots))
            if caps is None or any(d.can(c) for c in caps)
        ]
    if not devices:
        return (), f"no device of this site can do {result.intent} for {_aim(result)}"
    for slot, capability in RANGED_SLOTS.items():
        value = result.slots.get(slot)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        ranges = [
            d.capabilities[capability]
            for d in registry.devices
            if d.id in devices and capability in d.capabilities
        ]
        if ranges and not any(r["min"] <= value <= r["max"] for r in ranges):
            low = min(r["min"] for r in ranges)
            high = max(r["max"] for r in ranges)
            return tuple(devices), f"{slot} {value:g} is outside {low:g}..{high:g}"
    return tuple(devices), None


def _aim(result: IntentResult) -> str:
    aimed = {k: v for k, v in result.slots.items() if k in TARGET_SLOTS}
    return ", ".join(f"{k}={v}" for k, v in aimed.items()) or "no named target"


class Guess:
    """What the encoder's heads say about one request.

    Attributes:
        ranked: the five best (intent class, probability) pairs, best first.
        answerable: the intents the encoder layer may answer for this registry.
        domain: the domain head's best guess, and `domain_p` its probability.
        intent: the likeliest answerable intent (None if `ranked` has none).
        p: how sure the heads are that the request is one this layer answers:
            the total probability of the answerable intents (given by
            `classify`; else summed over `ranked`). The thresholds apply to it.
    """

    def __init__(
        self,
        ranked: list[tuple[str, float]],
        answerable: list[str],
        domain: str,
        domain_p: float,
        p: float | None = None,
    ) -> None:
        self.ranked = ranked
        self.answerable = answerable
        self.domain = domain
        self.domain_p = domain_p
        self.intent = next((i for i, _ in ranked if i in answerable), None)
        if p is None:
            p = sum(q for i, q in ranked if i in answerable)
        self.p = p


def load_recognizer(registry_path: str | os.PathLike, **kwargs: Any) -> Any:
    """A `text -> IntentResult` callable for the registry at `registry_path`.

    The MQTT bridge's `recognizer: auto` uses this.
    """
    recognizer = IntentRecognizer.from_file(registry_path, **kwargs)
    return recognizer.recognize


def _ms(since: float) -> float:
    return 1000 * (time.perf_counter() - since)


def _timed(result: IntentResult, text: str, started: float) -> IntentResult:
    return replace(result, text=text, latency_ms=_ms(started))
