"""What every layer of the recognizer returns: `IntentResult`.

Not yet: several intents in one request ("lights off and lock the door").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

LAYERS = ("template", "encoder", "chat", "none")


@dataclass(frozen=True)
class IntentResult:
    """One recognized (or rejected) request.

    Attributes:
        text: the request as given.
        intent: Home Assistant style intent name (`HassTurnOn`, ...), None when not
            recognized.
        slots: slot name -> value, as Home Assistant names them (`name`, `area`,
            `floor`, `domain`, `brightness`, `color`, `temperature`, ...); names,
            areas and floors by their display names.
        confidence: 0..1; templates answer with 1.0.
        layer: which layer answered: "template", "encoder", "chat" or "none".
        devices: ids of the registry devices the request selects.
        latency_ms: time spent in the recognizer for this request.
        error: why a recognized request cannot be carried out on this site (no
            device selected, a value out of range), None when it can. Only the
            template layer, which is never wrong about the intent, answers with
            an error; the guessing layers pass such answers on instead.
    """

    text: str
    intent: str | None
    slots: dict[str, Any] = field(default_factory=dict)
    confidence: float = 0.0
    layer: str = "none"
    devices: tuple[str, ...] = ()
    latency_ms: float = 0.0
    error: str | None = None

    @property
    def recognized(self) -> bool:
        """An intent was found (it may still carry an `error`)."""
        return self.intent is not None

    @property
    def actionable(self) -> bool:
        """Recognized, with no error: the bridge may carry it out."""
        return self.intent is not None and self.error is None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return {
            "text": self.text,
            "intent": self.intent,
            "slots": self.slots,
            "confidence": round(self.confidence, 4),
            "layer": self.layer,
            "devices": list(self.devices),
            "latency_ms": round(self.latency_ms, 3),
            "error": self.error,
        }


def not_recognized(text: str, confidence: float = 0.0) -> IntentResult:
    """The answer of layer (d): no intent; `confidence` is the best guess's."""
    return IntentResult(text=text, intent=None, confidence=confidence, layer="none")
