"""Evaluate the intent layer and hassil side by side.

    python tools/eval_intents/run.py                         # both suites, current
    python tools/eval_intents/run.py --templates pinned      # the HA suite's release
    python tools/eval_intents/run.py --suite slurp --no-chat --out slurp.json
    python tools/eval_intents/run.py --suite ha --limit 50   # a quick slice

Suites: Home Assistant's English test suite (scored as HA scores it, see
ha_suite.py) and SLURP's development split (slurp.py; `iot` mapped onto intents,
every other scenario out of domain, asked with no area context and with a voice
satellite's area). Systems: `hassil` alone with Home Assistant's templates (the
peer, called the way HA's own tests call it) and edgeslm's layered recognizer,
reported per layer (accuracy, share answered, latency), with a confusion list.

`--templates pinned` runs everything in a virtual environment that sees this
environment's packages but has home-assistant-intents==2025.6.23 and
hassil==3.0.1 of its own, the pair the HA suite was written for (they conflict
with the current pair); it is created on first use under the edgeslm cache.
Latencies are wall-clock milliseconds per request on one onnxruntime thread.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(HERE), str(REPO)]

from ha_suite import Case, load_cases, slots_match  # noqa: E402
from slurp import Request, load_requests  # noqa: E402

from edgeslm.intent.recognizer import STATE_CHANGING, IntentRecognizer  # noqa: E402
from edgeslm.intent.registry import Registry, load_registry  # noqa: E402
from edgeslm.intent.slots import starts_with_wake_word  # noqa: E402
from edgeslm.intent.templates import NameFilter, ha_intents, slot_lists  # noqa: E402

log = logging.getLogger("eval_intents")
DATA = Path(os.environ.get("EDGESLM_SHARED_DATA", REPO.parent / "shared" / "data"))
PINNED = ("home-assistant-intents==2025.6.23", "hassil==3.0.1")
SATELLITE_AREA = {"area": "Living Room"}
# What a false activation is on SLURP: an intent that changes a device's state.
CHANGING = STATE_CHANGING | {"CustomMakeCoffee"}


# --- the systems -------------------------------------------------------------------


class HassilPeer:
    """hassil alone with Home Assistant's templates, as HA's own tests call it:
    `recognize_best` with the `name` list cut to the names in the sentence."""

    name = "hassil"

    def __init__(self, registry: Registry) -> None:
        from hassil import Intents

        self.intents = Intents.from_dict(ha_intents())
        self.lists = slot_lists(registry)
        self.names = NameFilter(self.lists["name"])
        self.timings: dict[str, float] = {}

    def __call__(self, text: str, context: dict) -> tuple[str | None, dict, str]:
        from hassil import recognize_best

        match = recognize_best(
            text,
            self.intents,
            slot_lists={**self.lists, "name": self.names(text)},
            intent_context=context,
            best_slot_name="name",
        )
        if match is None:
            return None, {}, "none"
        slots = {e.name: e.value for e in match.entities.values()}
        return match.intent.name, slots, "template"


class Ours:
    """edgeslm's layered recognizer."""

    name = "edgeslm"

    def __init__(self, registry: Registry, encoder: Any, chat: Any) -> None:
        self.rec = IntentRecognizer(registry, encoder=encoder, chat=chat)
        self.timings: dict[str, float] = {}

    def __call__(self, text: str, context: dict) -> tuple[str | None, dict, str]:
        result = self.rec.recognize(text, context)
        self.timings = dict(self.rec.last_timings)
        return result.intent, result.slots, result.layer


def timed(system, text: str, context: dict) -> tuple[str | None, dict, str, float]:
    started = time.perf_counter()
    intent, slots, layer = system(text, context)
    return intent, slots, layer, 1000 * (time.perf_counter() - started)


def latency(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {
        "p50_ms": round(float(np.percentile(values, 50)), 2),
        "p95_ms": round(float(np.percentile(values, 95)), 2),
    }


class Tally:
    """Per-layer counts, latencies and confusion for one suite and system."""

    def __init__(self) -> None:
        self.rows: dict[str, list[tuple[bool, bool, float]]] = collections.defaultdict(
            list
        )
        self.own_ms: dict[str, list[float]] = collections.defaultdict(list)
        self.confusion: collections.Counter = collections.Counter()

    def add(self, system, layer: str, good: bool, both: bool, ms: float) -> None:
        self.rows[layer].append((good, both, ms))
        for name, spent in system.timings.items():
            self.own_ms[name].append(spent)

    def summary(self) -> dict[str, Any]:
        rows = [r for v in self.rows.values() for r in v]
        n = len(rows) or 1
        return {
            "n": len(rows),
            "intent_acc": round(100 * sum(g for g, _, _ in rows) / n, 2),
            "intent_slots_acc": round(100 * sum(b for _, b, _ in rows) / n, 2),
            **latency([ms for *_, ms in rows]),
            "layers": {
                layer: {
                    "answered_pct": round(100 * len(v) / n, 2),
                    "intent_acc": round(100 * float(np.mean([g for g, _, _ in v])), 2),
                    "intent_slots_acc": round(
                        100 * float(np.mean([b for _, b, _ in v])), 2
                    ),
                    **latency([ms for *_, ms in v]),
                }
                for layer, v in sorted(self.rows.items())
            },
            "layer_own_latency": {
                k: latency(v) for k, v in sorted(self.own_ms.items())
            },
            "confusion": [
                f"{a} -> {b}: {c}" for (a, b), c in self.confusion.most_common(15)
            ],
        }


# --- suites ------------------------------------------------------------------------


def eval_ha(system, cases: list[Case]) -> dict[str, Any]:
    tally = Tally()
    misses = []
    for case in cases:
        intent, slots, layer, ms = timed(system, case.text, case.context)
        good = intent == case.intent
        both = good and slots_match(case.slots, slots)
        tally.add(system, layer, good, both, ms)
        if not good:
            tally.confusion[(case.intent, intent or "none")] += 1
        if not both and len(misses) < 40:
            misses.append(f"{case.text!r}: want {case.slots}, got {intent} {slots}")
    return {**tally.summary(), "misses": misses}


def eval_slurp(system, requests: list[Request]) -> dict[str, Any]:
    iot = [r for r in requests if r.in_domain]
    ood = [r for r in requests if not r.in_domain]
    tally = Tally()
    per_intent: dict[str, list[bool]] = collections.defaultdict(list)
    for req in iot:
        intent, _, layer, ms = timed(system, req.text, {})
        good = intent in req.accepted
        per_intent[req.slurp_intent].append(good)
        tally.add(system, layer, good, good, ms)
        if not good:
            tally.confusion[(req.slurp_intent, intent or "none")] += 1
    out: dict[str, Any] = {
        "iot": tally.summary(),
        # Requests whose wake word the recognizer drops (its own rule).
        "iot_wake_word_pct": round(
            100 * sum(starts_with_wake_word(r.text) for r in iot) / max(1, len(iot)), 1
        ),
        "per_slurp_intent": {
            k: f"{sum(v)}/{len(v)}" for k, v in sorted(per_intent.items())
        },
        "ood_n": len(ood),
    }
    for label, context in (("no_context", {}), ("area_context", SATELLITE_AREA)):
        acted, any_intent, times = 0, 0, []
        layers: collections.Counter = collections.Counter()
        by_intent: collections.Counter = collections.Counter()
        examples = []
        for req in ood:
            intent, _, layer, ms = timed(system, req.text, context)
            times.append(ms)
            any_intent += intent is not None
            if intent in CHANGING:
                acted += 1
                by_intent[intent] += 1
                layers[layer] += 1
                if len(examples) < 15:
                    examples.append(f"{req.text!r} -> {intent} ({layer})")
        out[f"ood_{label}"] = {
            "state_changing_pct": round(100 * acted / max(1, len(ood)), 2),
            "state_changing_n": acted,
            "any_intent_pct": round(100 * any_intent / max(1, len(ood)), 2),
            "by_intent": dict(by_intent.most_common(8)),
            "by_layer": dict(layers),
            "examples": examples,
            **latency(times),
        }
    return out


# --- pinned templates: a venv of their own -------------------------------------------


def pinned_python() -> Path:
    """The venv's interpreter with the pinned pair, created once."""
    from edgeslm.hub import cache_dir

    venv = cache_dir() / "eval-venv-ha-2025.6.23"
    python = venv / "bin" / "python"
    if not python.is_file():
        log.warning("creating %s with %s (once)", venv, " ".join(PINNED))
        subprocess.run(
            [sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
            check=True,
        )
        pip = [str(python), "-m", "pip", "install", "-q", *PINNED]
        subprocess.run(pip, check=True)
    return python


def systems_for(names: list[str], registry: Registry, encoder: Any, chat: Any):
    for name in names:
        if name == "hassil":
            yield HassilPeer(registry)
        elif name == "edgeslm":
            yield Ours(registry, encoder, chat)
        else:
            raise SystemExit(f"unknown system {name!r}; use hassil and/or edgeslm")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--suite", choices=("ha", "slurp", "all"), default="all")
    parser.add_argument("--templates", choices=("current", "pinned"), default="current")
    parser.add_argument("--systems", default="hassil,edgeslm")
    parser.add_argument("--encoder", help="encoder package (default: MiniLM int8)")
    parser.add_argument(
        "--no-chat", action="store_true", help="leave layer (c), the chat model, out"
    )
    parser.add_argument(
        "--limit",
        type=int,
        help="about N cases spread over each set (HA, SLURP iot, SLURP other)",
    )
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--in-venv", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def thin(items: list, limit: int | None) -> list:
    """About `limit` items spread over the whole list (all when None)."""
    if not limit or limit >= len(items):
        return items
    step = len(items) / limit
    return [items[int(i * step)] for i in range(limit)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("hassil").setLevel(logging.ERROR)

    if args.templates == "pinned" and not args.in_venv:
        from edgeslm.encoder import resolve_encoder

        encoder = args.encoder or str(resolve_encoder(None))
        rest = [a for a in (argv if argv is not None else sys.argv[1:])]
        cmd = [str(pinned_python()), __file__, *rest, "--in-venv", "--encoder", encoder]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        return subprocess.run(cmd, env=env).returncode

    from importlib.metadata import version

    from edgeslm.encoder import Encoder, load_encoder

    encoder = Encoder(args.encoder) if args.encoder else load_encoder()
    chat: Any = False if args.no_chat else None
    if chat is None and "edgeslm" in args.systems:
        import edgeslm

        chat = edgeslm.load()
    results: dict[str, Any] = {
        "versions": {p: version(p) for p in ("home-assistant-intents", "hassil")},
        "threads": 1,
        "chat_layer": not args.no_chat,
        "load_avg_start": os.getloadavg()[0],
    }
    systems = args.systems.split(",")
    if args.suite in ("ha", "all"):
        folder = DATA / "ha-intents-tests-en"
        registry = load_registry(folder / "_fixtures.yaml")
        cases = thin(load_cases(folder), args.limit)
        for system in systems_for(systems, registry, encoder, chat):
            log.info("HA suite, %d sentences: %s", len(cases), system.name)
            results[f"ha/{system.name}"] = eval_ha(system, cases)
    if args.suite in ("slurp", "all"):
        registry = load_registry(HERE / "slurp_registry.yaml")
        requests = load_requests(DATA / "slurp" / "devel.jsonl")
        requests = thin([r for r in requests if r.in_domain], args.limit) + thin(
            [r for r in requests if not r.in_domain], args.limit
        )
        for system in systems_for(systems, registry, encoder, chat):
            log.info("SLURP devel, %d requests: %s", len(requests), system.name)
            results[f"slurp/{system.name}"] = eval_slurp(system, requests)
    results["load_avg_end"] = os.getloadavg()[0]
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
