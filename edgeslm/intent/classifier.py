"""Layer (b): an intent classifier on sentence embeddings, trained per registry.

Training data, built for the registry at hand:
- sentences sampled from the templates (Home Assistant's, edgeslm's and the site's)
  of the intents this layer covers, with the registry's names and areas filled in;
- hand-written examples (`data/examples_en.yaml`), placeholders filled the same way,
  including a `NONE` class of requests a home controller must not act on.

The classifier is multinomial logistic regression on the encoder's embeddings
(numpy, a few hundred full-batch gradient steps: about a second). It answers only
when the top class is not `NONE` and its probability reaches the threshold, which
was calibrated on held-out hand-written examples (docs/INTENTS.md). The trained
weights are cached on disk, keyed by the registry digest, the encoder's weights
hash and the training data version, so a restart does not retrain.

Not yet: a per-slot tagger (slots come from `slots.SlotResolver`).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import random
import re
import time
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from edgeslm.intent.registry import Registry, names_of
from edgeslm.intent.slots import COLORS, INTENT_CAPABILITIES

log = logging.getLogger(__name__)

NONE = "NONE"
TRAINING_VERSION = "1"
# Threshold on the top probability; see docs/INTENTS.md for its calibration.
DEFAULT_THRESHOLD = 0.6
# Intents the encoder layer may answer (when the registry can serve them).
ENCODER_INTENTS = (
    "HassTurnOn",
    "HassTurnOff",
    "HassLightSet",
    "HassLightSetRelative",
    "HassClimateSetTemperature",
    "HassClimateGetTemperature",
    "HassSetPosition",
    "HassGetState",
    "HassVacuumStart",
    "HassVacuumReturnToBase",
    "HassMediaPause",
    "HassMediaUnpause",
    "HassMediaNext",
    "HassSetVolume",
)
SAMPLES_PER_TEMPLATE = 2
FILLS_PER_EXAMPLE = 3


def examples() -> dict[str, list[str]]:
    """The hand-written examples, intent -> sentences with placeholders."""
    import yaml

    text = resources.files("edgeslm.intent").joinpath("data/examples_en.yaml")
    return yaml.safe_load(text.read_text())


def covered_intents(registry: Registry) -> list[str]:
    """Encoder intents some registry device can serve, plus the site's own."""
    out = []
    for intent in ENCODER_INTENTS:
        caps = INTENT_CAPABILITIES.get(intent)
        if caps is None or any(d.can(c) for d in registry.devices for c in caps):
            out.append(intent)
    return out + sorted(i for i in registry.sentences if i not in out)


def fill(sentence: str, intent: str, registry: Registry, rng: random.Random) -> str:
    """Replace {name}, {area}, {number}, {color} with values from the registry.

    {name} is a device able to serve `intent`.
    """
    caps = INTENT_CAPABILITIES.get(intent)
    devices = [
        n
        for d in registry.devices
        if caps is None or any(d.can(c) for c in caps)
        for n in names_of(d)
    ] or ["light"]
    areas = [n for a in registry.areas for n in names_of(a)] or ["house"]
    values = {
        "name": lambda: rng.choice(devices),
        "area": lambda: rng.choice(areas),
        "number": lambda: str(rng.choice([5, 10, 20, 25, 30, 40, 50, 60, 75, 80, 100])),
        "color": lambda: rng.choice(COLORS),
    }
    return re.sub(
        r"\{(\w+)\}", lambda m: values.get(m.group(1), lambda: "")(), sentence
    )


def training_set(
    registry: Registry, template_intents, slot_lists: dict[str, Any], seed: int = 0
) -> tuple[list[str], list[str]]:
    """(texts, labels) for a registry; `template_intents` is a hassil `Intents`."""
    from hassil import sample_expression

    rng = random.Random(seed)
    labels = covered_intents(registry)
    lists = {**template_intents.slot_lists, **slot_lists}
    texts: list[str] = []
    out_labels: list[str] = []

    # Template samples: a few per template sentence, names filled from the registry.
    for intent in labels:
        if intent not in template_intents.intents:
            continue
        for data in template_intents.intents[intent].data:
            for sentence in data.sentences:
                try:
                    samples = sample_expression(
                        sentence.expression,
                        lists,
                        template_intents.expansion_rules,
                        language="en",
                    )
                    pool = list(itertools.islice(samples, 16))
                except Exception as exc:  # hassil raises bare errors on wildcards
                    log.debug("skipping template %s: %s", sentence.text, exc)
                    continue
                for text in rng.sample(pool, min(SAMPLES_PER_TEMPLATE, len(pool))):
                    texts.append(text)
                    out_labels.append(intent)

    # Hand-written examples, each filled a few times.
    for intent, sentences in examples().items():
        if intent != NONE and intent not in labels:
            continue
        for sentence in sentences:
            fills = FILLS_PER_EXAMPLE if "{" in sentence else 1
            for _ in range(fills):
                texts.append(fill(sentence, intent, registry, rng))
                out_labels.append(intent)
    return texts, out_labels


class SoftmaxClassifier:
    """Multinomial logistic regression with class-balanced weights."""

    def __init__(self, classes: list[str], weight: np.ndarray, bias: np.ndarray):
        self.classes = classes
        self.weight = weight  # (dim, n_classes) float32
        self.bias = bias  # (n_classes,) float32

    @classmethod
    def fit(
        cls,
        x: np.ndarray,
        labels: list[str],
        *,
        steps: int = 400,
        lr: float = 0.5,
        l2: float = 1e-4,
    ) -> SoftmaxClassifier:
        """Full-batch gradient descent on the cross-entropy; x is `(n, dim)`."""
        classes = sorted(set(labels))
        index = {c: i for i, c in enumerate(classes)}
        y = np.array([index[c] for c in labels])
        counts = np.bincount(y, minlength=len(classes)).astype(np.float32)
        sample_w = (len(y) / (len(classes) * counts))[y]
        onehot = np.eye(len(classes), dtype=np.float32)[y]
        w = np.zeros((x.shape[1], len(classes)), dtype=np.float32)
        b = np.zeros(len(classes), dtype=np.float32)
        scale = 1.0 / sample_w.sum()
        for _ in range(steps):
            p = _softmax(x @ w + b)
            grad = (p - onehot) * sample_w[:, None] * scale
            w -= lr * (x.T @ grad * 20.0 + l2 * w)
            b -= lr * grad.sum(0) * 20.0
        return cls(classes, w, b)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return _softmax(x @ self.weight + self.bias)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(
            tmp, weight=self.weight, bias=self.bias, classes=np.array(self.classes)
        )
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> SoftmaxClassifier:
        with np.load(path) as data:
            return cls([str(c) for c in data["classes"]], data["weight"], data["bias"])


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def cache_key(registry: Registry, encoder, template_intents) -> str:
    """Registry digest + encoder weights hash + templates + training data version."""
    weights = encoder.manifest.files.get("model.onnx.data", "")
    templates = sorted(
        (name, [s.text for d in intent.data for s in d.sentences])
        for name, intent in template_intents.intents.items()
    )
    key = f"{registry.digest()}|{weights}|{TRAINING_VERSION}|{examples()}|{templates}"
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def train_or_load(
    registry: Registry, encoder, template_intents, slot_lists, cache: Path | None
) -> SoftmaxClassifier:
    """The classifier for this registry and encoder, from the cache when there."""
    path = None
    if cache is not None:
        key = cache_key(registry, encoder, template_intents)
        path = cache / f"intent-classifier-{key}.npz"
        if path.is_file():
            try:
                return SoftmaxClassifier.load(path)
            except (OSError, ValueError, KeyError) as exc:
                log.warning(
                    "%s: unreadable cached classifier (%s); retraining", path, exc
                )

    started = time.perf_counter()
    texts, labels = training_set(registry, template_intents, slot_lists)
    log.info("training the intent classifier on %d sentences", len(texts))
    x = encoder.embed(texts, batch_size=64)
    model = SoftmaxClassifier.fit(x, labels)
    log.info(
        "intent classifier: %d classes, trained in %.1f s",
        len(model.classes),
        time.perf_counter() - started,
    )
    if path is not None:
        model.save(path)
    return model
