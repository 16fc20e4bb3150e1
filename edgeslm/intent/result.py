"""What every layer of the recognizer returns: `IntentResult`."""

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
            `floor`, `domain`, `brightness`, `color`, `temperature`, ...).
        confidence: 0..1; templates answer with 1.0.
        layer: which layer answered: "template", "encoder", "chat" or "none".
        devices: ids of the registry devices the slots point at.
        latency_ms: time spent in the recognizer for this request.
    """

    text: str
    intent: str | None
    slots: dict[str, Any] = field(default_factory=dict)
    confidence: float = 0.0
    layer: str = "none"
    devices: tuple[str, ...] = ()
    latency_ms: float = 0.0

    @property
    def recognized(self) -> bool:
        return self.intent is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "intent": self.intent,
            "slots": self.slots,
            "confidence": round(self.confidence, 4),
            "layer": self.layer,
            "devices": list(self.devices),
            "latency_ms": round(self.latency_ms, 3),
        }


def not_recognized(text: str, confidence: float = 0.0) -> IntentResult:
    return IntentResult(text=text, intent=None, confidence=confidence, layer="none")
