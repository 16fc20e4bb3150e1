"""The intent layer: turn commands into validated intents, cheapest model first.

    from edgeslm.intent import IntentRecognizer
    rec = IntentRecognizer.from_file("firmware_bridge/examples/home.yaml")
    result = rec.recognize("turn the kitchen light to 40%")

Modules: `registry` (the site's devices), `templates` (layer a, hassil),
`classifier` + `slots` (layer b, the MiniLM encoder), `recognizer` (the layers in
order, layer c, validation), `result` (`IntentResult`), `cli` (`edgeslm intent`).
Needs the `intent` extra: `pip install 'edgeslm[intent]'`. See docs/INTENTS.md.
Not yet: languages other than English.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgeslm.intent.recognizer import IntentRecognizer, load_recognizer
    from edgeslm.intent.registry import Registry, RegistryError, load_registry
    from edgeslm.intent.result import IntentResult

__all__ = [
    "IntentRecognizer",
    "IntentResult",
    "Registry",
    "RegistryError",
    "load_recognizer",
    "load_registry",
]


def __getattr__(name: str) -> Any:
    # Lazy, so `edgeslm.intent.registry` can be used without hassil or numpy.
    if name in ("IntentRecognizer", "load_recognizer"):
        from edgeslm.intent import recognizer

        return getattr(recognizer, name)
    if name == "IntentResult":
        from edgeslm.intent.result import IntentResult

        return IntentResult
    if name in ("Registry", "RegistryError", "load_registry"):
        from edgeslm.intent import registry

        return getattr(registry, name)
    raise AttributeError(f"module 'edgeslm.intent' has no attribute {name!r}")
