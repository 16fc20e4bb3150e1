"""Evaluate the intent layer and hassil side by side.

    python tools/eval_intents/run.py                       # current templates
    python tools/eval_intents/run.py --templates pinned    # the suite's own release
    python tools/eval_intents/run.py --suite slurp --out results.json

Suites: Home Assistant's English test suite (scored as HA scores it, see
ha_suite.py) and SLURP's development split (slurp.py). Systems: `hassil` alone with
Home Assistant's templates (the peer), and edgeslm's layered recognizer, reported
per layer. `--templates pinned` runs everything in a separate virtual environment
with home-assistant-intents==2025.6.23 and hassil==3.0.1, the pair the HA suite was
written for (they conflict with the current pair, so they cannot share one
environment); the venv is created on first use under the edgeslm cache.
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

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(HERE), str(REPO)]

from ha_suite import load_cases, slots_match  # noqa: E402
from slurp import load_requests  # noqa: E402

from edgeslm.intent.recognizer import STATE_CHANGING, IntentRecognizer  # noqa: E402
from edgeslm.intent.registry import load_registry  # noqa: E402
from edgeslm.intent.templates import ha_intents, slot_lists  # noqa: E402

log = logging.getLogger("eval_intents")
DATA = REPO.parent / "shared" / "data"
PINNED = ("home-assistant-intents==2025.6.23", "hassil==3.0.1")
VENV_DEPS = ("numpy", "onnxruntime", "tokenizers", "pyyaml")
SATELLITE_AREA = {"area": "Living Room"}


# --- the systems -------------------------------------------------------------------


class HassilPeer:
    """hassil alone with Home Assistant's templates, as HA's tests call it."""

    def __init__(self, registry) -> None:
        from hassil import Intents

        self.intents = Intents.from_dict(ha_intents())
        self.lists = slot_lists(registry)

    def __call__(self, text: str, context: dict) -> tuple[str | None, dict, str]:
        from hassil import recognize

        match = recognize(
            text, self.intents, slot_lists=self.lists, intent_context=context
        )
        if match is None:
            return None, {}, "none"
        return (
            match.intent.name,
            {e.name: e.value for e in match.entities.values()},
            "hassil",
        )


class Ours:
    def __init__(self, registry, encoder) -> None:
        self.rec = IntentRecognizer(registry, encoder=encoder)

    def __call__(self, text: str, context: dict) -> tuple[str | None, dict, str]:
        result = self.rec.recognize(text, context)
        return result.intent, result.slots, result.layer


def timed(system, text: str, context: dict):
    started = time.perf_counter()
    out = system(text, context)
    return (*out, 1000 * (time.perf_counter() - started))


def latency(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {
        "p50_ms": round(float(np.percentile(values, 50)), 2),
        "p95_ms": round(float(np.percentile(values, 95)), 2),
    }


# --- suites ------------------------------------------------------------------------


def eval_ha(system) -> dict:
    folder = DATA / "ha-intents-tests-en"
    cases = load_cases(folder)
    ok_intent = ok_slots = 0
    by_layer: dict[str, list] = collections.defaultdict(list)
    confusion: collections.Counter = collections.Counter()
    for case in cases:
        intent, slots, layer, ms = timed(system, case.text, case.context)
        good = intent == case.intent
        both = good and slots_match(case.slots, slots)
        ok_intent += good
        ok_slots += both
        by_layer[layer].append((good, both, ms))
        if not good:
            confusion[(case.intent, intent or "none")] += 1
    n = len(cases)
    return {
        "n": n,
        "intent_acc": round(100 * ok_intent / n, 2),
        "intent_slots_acc": round(100 * ok_slots / n, 2),
        **latency([ms for rows in by_layer.values() for *_, ms in rows]),
        "layers": _layers(by_layer),
        "confusion": [f"{a} -> {b}: {c}" for (a, b), c in confusion.most_common(12)],
    }


def eval_slurp(system) -> dict:
    requests = load_requests(DATA / "slurp" / "devel.jsonl")
    iot = [r for r in requests if r.in_domain]
    ood = [r for r in requests if not r.in_domain]
    by_layer: dict[str, list] = collections.defaultdict(list)
    per_intent: dict[str, list[bool]] = collections.defaultdict(list)
    confusion: collections.Counter = collections.Counter()
    for req in iot:
        intent, _, layer, ms = timed(system, req.text, {})
        good = intent in req.accepted
        per_intent[req.slurp_intent].append(good)
        by_layer[layer].append((good, good, ms))
        if not good:
            confusion[(req.slurp_intent, intent or "none")] += 1
    out = {
        "iot_n": len(iot),
        "iot_intent_acc": round(
            100 * np.mean([g for v in per_intent.values() for g in v]), 2
        ),
        "per_slurp_intent": {
            k: f"{sum(v)}/{len(v)}" for k, v in sorted(per_intent.items())
        },
        "iot_layers": _layers(by_layer),
        "iot_confusion": [
            f"{a} -> {b}: {c}" for (a, b), c in confusion.most_common(10)
        ],
        "ood_n": len(ood),
    }
    changing = STATE_CHANGING | {"CustomMakeCoffee"}
    for label, context in (("no_context", {}), ("area_context", SATELLITE_AREA)):
        acted, any_intent, times, examples = 0, 0, [], collections.Counter()
        for req in ood:
            intent, _, _, ms = timed(system, req.text, context)
            times.append(ms)
            any_intent += intent is not None
            if intent in changing:
                acted += 1
                examples[intent] += 1
        out[f"ood_{label}"] = {
            "state_changing_pct": round(100 * acted / len(ood), 2),
            "any_intent_pct": round(100 * any_intent / len(ood), 2),
            "by_intent": dict(examples.most_common(6)),
            **latency(times),
        }
    return out


def _layers(by_layer: dict[str, list]) -> dict:
    total = sum(len(v) for v in by_layer.values())
    return {
        layer: {
            "answered_pct": round(100 * len(rows) / total, 2),
            "intent_acc": round(100 * np.mean([g for g, _, _ in rows]), 2),
            "intent_slots_acc": round(100 * np.mean([b for _, b, _ in rows]), 2),
            **latency([ms for *_, ms in rows]),
        }
        for layer, rows in sorted(by_layer.items())
    }


# --- pinned templates: a venv of their own -------------------------------------------


def pinned_python() -> Path:
    from edgeslm.hub import cache_dir

    venv = cache_dir() / "eval-venv-ha-2025.6.23"
    python = venv / "bin" / "python"
    if not python.is_file():
        log.warning("creating %s with %s (once)", venv, " ".join(PINNED))
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q", *PINNED, *VENV_DEPS]
        subprocess.run(pip, check=True)
    return python


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--suite", choices=("ha", "slurp", "all"), default="all")
    parser.add_argument("--templates", choices=("current", "pinned"), default="current")
    parser.add_argument("--systems", default="hassil,edgeslm")
    parser.add_argument("--encoder", help="encoder package (default: MiniLM int8)")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--in-venv", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("hassil").setLevel(logging.ERROR)

    if args.templates == "pinned" and not args.in_venv:
        from edgeslm.encoder import resolve_encoder

        encoder = args.encoder or str(resolve_encoder(None))
        argv = [a for a in sys.argv[1:] if not a.startswith("--encoder")]
        cmd = [str(pinned_python()), __file__, *argv, "--in-venv", "--encoder", encoder]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        return subprocess.run(cmd, env=env).returncode

    from importlib.metadata import version

    from edgeslm.encoder import Encoder, load_encoder

    encoder = Encoder(args.encoder) if args.encoder else load_encoder()
    versions = {p: version(p) for p in ("home-assistant-intents", "hassil")}
    results: dict = {"versions": versions, "threads": 1}
    systems = args.systems.split(",")
    if args.suite in ("ha", "all"):
        registry = load_registry(DATA / "ha-intents-tests-en" / "_fixtures.yaml")
        for name in systems:
            system = (
                HassilPeer(registry) if name == "hassil" else Ours(registry, encoder)
            )
            log.info("HA suite: %s", name)
            results[f"ha/{name}"] = eval_ha(system)
    if args.suite in ("slurp", "all"):
        registry = load_registry(HERE / "slurp_registry.yaml")
        for name in systems:
            system = (
                HassilPeer(registry) if name == "hassil" else Ours(registry, encoder)
            )
            log.info("SLURP: %s", name)
            results[f"slurp/{name}"] = eval_slurp(system)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
