"""The intent layer: turn commands into validated intents, cheapest model first.

    from edgeslm.intent import IntentRecognizer
    rec = IntentRecognizer.from_file("docs/examples/home.yaml")
    result = rec.recognize("turn the kitchen lights to 40%")

Modules: `registry` (the site's devices), `templates` (layer a, hassil),
`classifier` + `slots` (layer b, the MiniLM encoder), `recognizer` (the layers in
order), `result` (`IntentResult`). Needs the `intent` extra:
`pip install 'edgeslm[intent]'`. See docs/INTENTS.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgeslm.intent.recognizer import IntentRecognizer
    from edgeslm.intent.registry import Registry, RegistryError
    from edgeslm.intent.result import IntentResult

__all__ = [
    "IntentRecognizer",
    "IntentResult",
    "Registry",
    "RegistryError",
    "load_registry",
]


def __getattr__(name: str) -> Any:
    # Lazy, so `edgeslm.intent.registry` can be used without hassil or numpy.
    if name == "IntentRecognizer":
        from edgeslm.intent.recognizer import IntentRecognizer

        return IntentRecognizer
    if name == "IntentResult":
        from edgeslm.intent.result import IntentResult

        return IntentResult
    if name in ("Registry", "RegistryError", "load_registry"):
        from edgeslm.intent import registry

        return getattr(registry, name)
    raise AttributeError(f"module 'edgeslm.intent' has no attribute {name!r}")
