"""Layer (b)'s model: an intent classifier on sentence embeddings, trained per site.

Training data, built for the registry at hand and never from evaluation sets:
- sentences sampled at random from the templates (Home Assistant's, edgeslm's and
  the site's), with the registry's names and areas filled in;
- hand-written examples (`data/examples_en.yaml`), placeholders filled the same
  way, including a `NONE` class of requests a home controller must not act on.

Every template intent becomes a class, also those the encoder layer does not
answer (timers, weather, lists, media search): a request that resembles them is
then not pushed into a device intent. Two heads share the features (the
embedding, and hashed word unigrams and bigrams, which tell "on" from "off"):

    intent head   multinomial logistic regression over the intent classes + NONE
    domain head   the same over device domains (light, switch, vacuum, ...), for
                  requests that name no device ("and the darkness has fallen")

Both are fitted with numpy (full-batch gradient descent, class-balanced: a few
seconds);
embedding the training sentences dominates the first training for a site. The
trained heads are cached on disk, keyed by the registry digest, the encoder's
weights, the templates and the examples, so a restart does not retrain.

Not yet: a slot tagger (slots come from `slots.SlotResolver`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from edgeslm.intent.registry import Registry, names_of
from edgeslm.intent.slots import COLORS, INTENT_CAPABILITIES, normalize

log = logging.getLogger(__name__)

NONE = "NONE"
# Bumped whenever the training recipe changes, so cached heads are not reused.
TRAINING_VERSION = "6"
# Intents the encoder layer may answer (when some registry device can serve them).
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
    "HassVacuumCleanArea",
    "HassMediaPause",
    "HassMediaUnpause",
    "HassMediaNext",
    "HassMediaPrevious",
    "HassSetVolume",
    "HassSetVolumeRelative",
)
SAMPLES_PER_TEMPLATE = 3
FILLS_PER_EXAMPLE = 3
# Template samples kept per class (hand-written examples are always kept): enough
# to cover each intent's phrasings, few enough to train in seconds.
MAX_TEMPLATE_SAMPLES = 160
MAX_TEMPLATE_SAMPLES_OTHER = 60
NUMBERS = (5, 10, 15, 20, 25, 30, 40, 50, 60, 70, 75, 80, 90, 100)
# Free text for wildcard slots (`{search_query}`, `{timer_name}`, ...).
WILDCARD_FILL = (
    "jazz",
    "the news",
    "pizza",
    "milk",
    "eggs",
    "pasta",
    "my timer",
    "the beatles",
    "call mom",
    "dinner is ready",
)


def examples() -> dict[str, list[str]]:
    """The hand-written examples: class -> sentences with placeholders.

    A class is an intent name, optionally with a domain after a slash
    (`HassTurnOn/light`), which labels the domain head.
    """
    import yaml

    text = resources.files("edgeslm.intent").joinpath("data/examples_en.yaml")
    return yaml.safe_load(text.read_text())


def answerable_intents(registry: Registry) -> list[str]:
    """Intents the encoder layer may answer for this registry.

    Encoder intents some registry device can serve, plus the site's own intents.
    """
    out = []
    for intent in ENCODER_INTENTS:
        caps = INTENT_CAPABILITIES.get(intent)
        if caps is None or any(d.can(c) for d in registry.devices for c in caps):
            out.append(intent)
    return out + sorted(i for i in registry.sentences if i not in out)


# --- training sentences ------------------------------------------------------------


class Filler:
    """Values for template lists and example placeholders, drawn from the registry."""

    def __init__(self, registry: Registry, rng: random.Random) -> None:
        self.registry = registry
        self.rng = rng
        self.areas = [n for a in registry.areas for n in names_of(a)] or ["house"]
        self.floors = [n for f in registry.floors for n in names_of(f)] or ["upstairs"]

    def device(self, intent: str | None, domain: Any = None) -> tuple[str, str]:
        """(a name, its domain) of a device able to serve `intent`."""
        caps = INTENT_CAPABILITIES.get(intent or "")
        domains = [domain] if isinstance(domain, str) else domain
        rows = [
            (n, d.domain)
            for d in self.registry.devices
            if (caps is None or any(d.can(c) for c in caps))
            and (not domains or d.domain in domains)
            for n in names_of(d)
        ]
        return self.rng.choice(rows) if rows else ("light", "light")

    def placeholder(self, key: str, intent: str, state: dict[str, Any]) -> str:
        if key == "name":
            name, state["domain"] = self.device(intent, state.get("want_domain"))
            return name
        if key == "area":
            return self.rng.choice(self.areas)
        if key == "floor":
            return self.rng.choice(self.floors)
        if key == "number":
            return str(self.rng.choice(NUMBERS))
        if key == "color":
            return self.rng.choice(COLORS)
        return self.rng.choice(WILDCARD_FILL)


def sample_template(expression: Any, intents: Any, fill: Callable, rng) -> str:
    """One random sentence from a hassil template expression.

    Alternatives and optionals are chosen at random; `{list}` references call
    `fill(list_name)` for `name`/`area`/`floor`, else draw from the template's
    own lists (text values, numbers in range, free text for wildcards).
    """
    from hassil.expression import (
        Alternative,
        Group,
        ListReference,
        Permutation,
        RuleReference,
        TextChunk,
    )
    from hassil.intents import RangeSlotList, TextSlotList

    def walk(expr: Any, depth: int) -> str:
        if depth > 30:
            return ""
        if hasattr(expr, "expression") and not isinstance(expr, Group):
            return walk(expr.expression, depth + 1)
        if isinstance(expr, TextChunk):
            return expr.text
        if isinstance(expr, Alternative):
            return walk(rng.choice(expr.items), depth + 1) if expr.items else ""
        if isinstance(expr, Permutation):
            items = list(expr.items)
            rng.shuffle(items)
            return " ".join(walk(i, depth + 1) for i in items)
        if isinstance(expr, Group):
            return "".join(walk(i, depth + 1) for i in expr.items)
        if isinstance(expr, RuleReference):
            rule = intents.expansion_rules.get(expr.rule_name)
            return walk(rule, depth + 1) if rule is not None else ""
        if isinstance(expr, ListReference):
            if expr.list_name in ("name", "area", "floor"):
                return fill(expr.list_name)
            slot_list = intents.slot_lists.get(expr.list_name)
            if isinstance(slot_list, TextSlotList) and slot_list.values:
                return walk(rng.choice(slot_list.values).text_in, depth + 1)
            if isinstance(slot_list, RangeSlotList):
                value = rng.randrange(slot_list.start, slot_list.stop + 1)
                suffix = " percent" if "percentage" in str(slot_list.type) else ""
                return f"{value}{suffix if rng.random() < 0.5 else ''}"
            return fill("wildcard")
        return ""

    return " ".join(walk(expression, 0).split())


@dataclass
class TrainingSet:
    texts: list[str]
    intents: list[str]
    domains: list[str | None]


def training_set(registry: Registry, intents: Any, seed: int = 0) -> TrainingSet:
    """Training sentences for a registry; `intents` is the merged hassil `Intents`.

    Sentences are normalized as requests are (`slots.normalize`) and de-duplicated.
    """
    rng = random.Random(seed)
    filler = Filler(registry, rng)
    seen: set[tuple[str, str]] = set()
    out = TrainingSet([], [], [])

    def add(text: str, intent: str, domain: str | None) -> None:
        text = normalize(text)
        if text and (text, intent) not in seen:
            seen.add((text, intent))
            out.texts.append(text)
            out.intents.append(intent)
            out.domains.append(domain)

    # Template samples: a few random walks per template sentence, then at most
    # MAX_TEMPLATE_SAMPLES per class, drawn at random.
    answerable = set(answerable_intents(registry))
    for intent_name, intent in sorted(intents.intents.items()):
        pool: list[tuple[str, str | None]] = []
        for data in intent.data:
            want = (data.requires_context or {}).get("domain")
            fixed = (data.slots or {}).get("domain")
            for sentence in data.sentences:
                for _ in range(SAMPLES_PER_TEMPLATE):
                    state: dict[str, Any] = {"want_domain": want or fixed}

                    def fill(key: str, state=state, intent_name=intent_name) -> str:
                        return filler.placeholder(key, intent_name, state)

                    text = sample_template(sentence, intents, fill, rng)
                    domain = state.get("domain") or fixed or _one(want)
                    pool.append((text, domain if isinstance(domain, str) else None))
        limit = (
            MAX_TEMPLATE_SAMPLES
            if intent_name in answerable
            else MAX_TEMPLATE_SAMPLES_OTHER
        )
        unique = list(dict(pool).items())
        for text, domain in rng.sample(unique, min(limit, len(unique))):
            add(text, intent_name, domain)

    # Hand-written examples, each filled a few times. NONE examples that name a
    # device or area of this registry are left out: here they would be commands.
    site_words = _site_words(registry)
    for label, sentences in examples().items():
        intent, _, domain = label.partition("/")
        for sentence in sentences:
            if intent == NONE and site_words.search(sentence):
                continue
            fills = FILLS_PER_EXAMPLE if "{" in sentence else 1
            # TODO: seed each example's fills by the example itself, so that an added
            # example does not refill the others; not yet: the new fills change the
            # training set, which takes a recalibration and an evaluation of its own.
            for _ in range(fills):
                state = {"want_domain": domain or None}
                text = re.sub(
                    r"\{(\w+)\}",
                    lambda m, s=state, i=intent: filler.placeholder(m.group(1), i, s),
                    sentence,
                )
                add(text, intent, domain or state.get("domain"))
    return out


def _one(value: Any) -> str | None:
    if isinstance(value, list) and len(value) == 1:
        return value[0]
    return value if isinstance(value, str) else None


def _site_words(registry: Registry) -> re.Pattern:
    names = {
        n.casefold()
        for item in (*registry.devices, *registry.areas)
        for n in names_of(item)
    }
    if not names:
        return re.compile(r"(?!x)x")
    alternatives = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    return re.compile(rf"\b({alternatives})\b", re.IGNORECASE)


# --- the model ---------------------------------------------------------------------


# Word n-gram features beside the embedding: the encoder hears "switch the plug
# on" and "switch the plug off" as almost the same sentence; the words tell them
# apart. Unigrams and bigrams are hashed into N_BUCKETS (crc32, stable across
# runs), each sentence's bag scaled to length NGRAM_WEIGHT.
N_BUCKETS = 1 << 13
NGRAM_WEIGHT = 1.0


def ngram_ids(text: str) -> np.ndarray:
    """Hashed unigram and bigram ids of a normalized text, with a bias id 0."""
    words = text.split()
    grams = words + [f"{a} {b}" for a, b in zip(words, words[1:], strict=False)]
    ids = {1 + zlib.crc32(g.encode()) % (N_BUCKETS - 1) for g in grams}
    return np.array(sorted({0, *ids}), dtype=np.int64)


class Features:
    """Inputs of the heads: `(n, dim)` embeddings and each text's n-gram ids."""

    def __init__(self, dense: np.ndarray, texts: Sequence[str]) -> None:
        self.dense = dense.astype(np.float32)
        ids = [ngram_ids(t) for t in texts]
        lens = np.array([len(i) for i in ids])
        self.rows = np.repeat(np.arange(len(ids)), lens)  # (nnz,)
        self.cols = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        self.row_vals = (NGRAM_WEIGHT / np.sqrt(lens)).astype(np.float32)[:, None]
        self.vals = np.repeat(self.row_vals[:, 0], lens)  # (nnz,)
        self.row_starts = np.concatenate([[0], np.cumsum(lens)[:-1]])

    def __len__(self) -> int:
        return len(self.dense)

    def subset(self, rows: Sequence[int], texts: Sequence[str]) -> Features:
        return Features(self.dense[list(rows)], [texts[i] for i in rows])

    def sparse_dot(self, w: np.ndarray) -> np.ndarray:
        """The n-gram part of the logits: `(n, n_classes)`."""
        return np.add.reduceat(w[self.cols], self.row_starts) * self.row_vals


class SoftmaxHead:
    """Multinomial logistic regression on embeddings + hashed n-grams.

    Attributes:
        classes: class names, in column order.
        weight: `(dim, n_classes)` float32, on the embedding.
        ngram_weight: `(N_BUCKETS, n_classes)` float32, on the n-grams.
        bias: `(n_classes,)` float32.
    """

    def __init__(
        self,
        classes: list[str],
        weight: np.ndarray,
        ngram_weight: np.ndarray,
        bias: np.ndarray,
    ) -> None:
        self.classes = classes
        self.weight = weight
        self.ngram_weight = ngram_weight
        self.bias = bias

    @classmethod
    def fit(
        cls,
        x: Features,
        labels: Sequence[str],
        *,
        steps: int = 200,
        lr: float = 3.75,
        ngram_lr: float = 225.0,
        scale: float = 10.0,
    ) -> SoftmaxHead:
        """Plain full-batch gradient descent on the class-balanced cross-entropy.

        Deliberately not run to convergence and not with an adaptive optimizer:
        on held-out paraphrases (tools/eval_intents/calibration_en.yaml) the
        softer probabilities of this early stop generalize better and reject
        more out-of-domain requests than a sharper fit.

        Args:
            x: the training features.
            labels: one class name per row.
            steps, lr: gradient steps and their size on the embedding weights.
            ngram_lr: step size on the n-gram weights (each is seen by few
                sentences, so it needs a larger step).
            scale: embeddings are multiplied by this (unit vectors have small
                entries; a larger scale lets the softmax become confident).
        """
        classes = sorted(set(labels))
        index = {c: i for i, c in enumerate(classes)}
        y = np.array([index[c] for c in labels])
        counts = np.bincount(y, minlength=len(classes)).astype(np.float32)
        sample_w = (len(y) / (len(classes) * counts))[y]
        sample_w = (sample_w / sample_w.sum()).astype(np.float32)
        onehot = np.eye(len(classes), dtype=np.float32)[y]
        xs = x.dense * scale
        w = np.zeros((xs.shape[1], len(classes)), np.float32)
        wn = np.zeros((N_BUCKETS, len(classes)), np.float32)
        b = np.zeros(len(classes), np.float32)

        # The n-gram gradient is a scatter-add over each n-gram's rows: sort the
        # (row, n-gram) pairs by n-gram once, then sum runs with reduceat.
        order = np.argsort(x.cols, kind="stable")
        uniq, starts = np.unique(x.cols[order], return_index=True)
        rows = x.rows[order]
        for _ in range(steps):
            p = _softmax(xs @ w + x.sparse_dot(wn) + b)
            grad = (p - onehot) * sample_w[:, None]
            w -= lr * (xs.T @ grad)
            b -= lr * grad.sum(0)
            scaled = grad * x.row_vals
            wn[uniq] -= ngram_lr * np.add.reduceat(scaled[rows], starts)
        return cls(classes, w * scale, wn, b)

    def predict_proba(self, x: Features) -> np.ndarray:
        """Class probabilities, `(n, n_classes)`."""
        logits = x.dense @ self.weight + x.sparse_dot(self.ngram_weight) + self.bias
        return _softmax(logits)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


@dataclass
class IntentClassifier:
    """The two heads, with the intents the encoder layer may answer."""

    intent_head: SoftmaxHead
    domain_head: SoftmaxHead
    answerable: list[str]

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(
                f,
                intent_weight=self.intent_head.weight,
                intent_ngrams=self.intent_head.ngram_weight,
                intent_bias=self.intent_head.bias,
                domain_weight=self.domain_head.weight,
                domain_ngrams=self.domain_head.ngram_weight,
                domain_bias=self.domain_head.bias,
                meta=np.array(
                    json.dumps(
                        {
                            "intents": self.intent_head.classes,
                            "domains": self.domain_head.classes,
                            "answerable": self.answerable,
                        }
                    )
                ),
            )
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> IntentClassifier:
        with np.load(path) as data:
            meta = json.loads(str(data["meta"]))
            return cls(
                SoftmaxHead(
                    meta["intents"],
                    data["intent_weight"],
                    data["intent_ngrams"],
                    data["intent_bias"],
                ),
                SoftmaxHead(
                    meta["domains"],
                    data["domain_weight"],
                    data["domain_ngrams"],
                    data["domain_bias"],
                ),
                list(meta["answerable"]),
            )


def cache_key(registry: Registry, encoder: Any, intents: Any) -> str:
    """Registry digest + encoder weights + templates + examples + recipe version."""
    weights = encoder.manifest.files.get("model.onnx.data", "")
    templates = sorted(
        (name, [s.text for d in intent.data for s in d.sentences])
        for name, intent in intents.intents.items()
    )
    key = json.dumps(
        [registry.digest(), weights, TRAINING_VERSION, examples(), templates],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def embed_cached(encoder: Any, texts: list[str], cache: Path | None) -> np.ndarray:
    """Embeddings of `texts`, reusing those of earlier trainings with this encoder.

    The cache file holds every training sentence embedded so far (a few MB), so
    retraining after a registry edit embeds only the sentences that changed.
    """
    if cache is None:
        return encoder.embed(texts, batch_size=32)
    weights = encoder.manifest.files.get("model.onnx.data", "none")[:16]
    path = cache / f"embeddings-{weights}.npz"
    known: dict[str, np.ndarray] = {}
    if path.is_file():
        try:
            with np.load(path) as data:
                known = dict(
                    zip((str(t) for t in data["texts"]), data["vectors"], strict=True)
                )
        except (OSError, ValueError, KeyError) as exc:
            log.warning("%s: unreadable embedding cache (%s); starting anew", path, exc)
    missing = sorted({t for t in texts if t not in known})
    if missing:
        log.info("intent classifier: embedding %d new sentences", len(missing))
        vectors = encoder.embed(missing, batch_size=32)
        for text, vector in zip(missing, vectors, strict=True):
            known[text] = vector
        try:
            cache.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            with open(tmp, "wb") as f:
                np.savez(
                    f,
                    texts=np.array(list(known)),
                    vectors=np.stack(list(known.values())),
                )
            tmp.replace(path)
        except OSError as exc:
            log.warning("cannot write the embedding cache %s (%s)", path, exc)
    return np.stack([known[t] for t in texts])


def train(
    registry: Registry, encoder: Any, intents: Any, cache: Path | None = None
) -> IntentClassifier:
    """Build the training set, embed it (see `embed_cached`) and fit both heads."""
    started = time.perf_counter()
    data = training_set(registry, intents)
    x = Features(embed_cached(encoder, data.texts, cache), data.texts)
    intent_head = SoftmaxHead.fit(x, data.intents)
    with_domain = [i for i, d in enumerate(data.domains) if d]
    domain_head = SoftmaxHead.fit(
        x.subset(with_domain, data.texts), [data.domains[i] for i in with_domain]
    )
    answerable = answerable_intents(registry)
    log.info(
        "intent classifier: %d sentences, %d intents, %d domains, trained in %.1f s",
        len(data.texts),
        len(intent_head.classes),
        len(domain_head.classes),
        time.perf_counter() - started,
    )
    return IntentClassifier(intent_head, domain_head, answerable)


def train_or_load(
    registry: Registry, encoder: Any, intents: Any, cache: Path | None
) -> IntentClassifier:
    """The classifier for this registry and encoder, from the cache when there."""
    path = None
    if cache is not None:
        path = cache / f"intent-classifier-{cache_key(registry, encoder, intents)}.npz"
        if path.is_file():
            try:
                return IntentClassifier.load(path)
            except (OSError, ValueError, KeyError) as exc:
                log.warning(
                    "%s: unreadable cached classifier (%s); retraining", path, exc
                )
    model = train(registry, encoder, intents, cache)
    if path is not None:
        try:
            model.save(path)
        except OSError as exc:
            log.warning("cannot cache the classifier at %s (%s)", path, exc)
    return model
