"""Calibrate the recognizer's two thresholds on held-out hand-written requests.

    python tools/eval_intents/calibrate.py                # encoder + chat band
    python tools/eval_intents/calibrate.py --no-chat      # encoder threshold only
    python tools/eval_intents/calibrate.py --no-chat --data probe_en.yaml  # a probe

Data: `calibration_en.yaml` (in-domain requests with their intents, and
out-of-domain requests), on the evaluation home `slurp_registry.yaml`; neither
the training examples nor any evaluation set. Every request is asked with no
context and with a voice satellite's area, so a false activation is counted both
ways.

`--data` sweeps another file of the same form instead, such as the independent
probe `probe_en.yaml`; its rows show how a change generalizes, and the threshold
it would choose is no calibration (the defaults come from `calibration_en.yaml`).

Each request goes through the template layer once and the encoder once; the
sweep then replays the decision for every threshold, so it costs one pass. The
chat model is asked once for every request whose probability falls in the
widest band considered (`CHAT_FLOOR` up to the threshold).

Rule (docs/INTENTS.md): among the thresholds at which at most
`MAX_FALSE_ACTIVATION` of the out-of-domain requests change a device's state in
each context separately (no context; a satellite's area), the encoder threshold
is the one with the best in-domain accuracy (the lowest of those on a tie; if no
threshold meets the target, those with the fewest false activations in their
worse context compete); the chat floor is the lowest that adds no false
activation in either context, at least one right answer, and at least as many
right answers as wrong ones (else the band is empty and the chat model is never
asked).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(HERE), str(REPO)]

from run import CHANGING, SATELLITE_AREA  # noqa: E402

from edgeslm.intent.recognizer import IntentRecognizer  # noqa: E402
from edgeslm.intent.registry import load_registry  # noqa: E402
from edgeslm.intent.slots import normalize  # noqa: E402

log = logging.getLogger("calibrate")
GRID = [round(0.05 * i, 2) for i in range(4, 20)]  # 0.20 .. 0.95
CHAT_FLOOR = 0.2
# The project's false-activation target: at most 1% of out-of-domain requests may
# change a device's state, with and without a satellite's area (each on its own).
MAX_FALSE_ACTIVATION = 0.01
CONTEXTS = {"no_context": {}, "area_context": SATELLITE_AREA}


@dataclass
class Probe:
    """One request's fixed facts; the thresholds decide the rest."""

    text: str
    want: tuple[str, ...] | None  # the right intents, None out of domain
    context: dict[str, Any]
    template: str | None  # the template layer's valid answer
    top: str | None  # the encoder's answer when it is over any threshold
    p: float
    valid: bool  # the encoder's answer passes validation
    chat: str | None = None  # the chat layer's valid answer, when asked


def load_calibration(path: Path) -> list[tuple[str, tuple[str, ...] | None]]:
    """(text, the intents that are right, None out of domain) rows.

    A key "A or B" accepts either intent.
    """
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    rows = [
        (text, tuple(key.split(" or ")))
        for key, texts in data["in_domain"].items()
        for text in texts
    ]
    return rows + [(text, None) for text in data["out_of_domain"]]


def probe(rec: IntentRecognizer, text: str, want, context, chat: bool) -> Probe:
    cleaned = normalize(text)
    for candidate in dict.fromkeys((text, cleaned)):
        result = rec.templates.recognize(candidate, context)
        if result is not None:
            return Probe(text, want, context, result.intent, None, 0.0, False)
    guess = rec.classify(cleaned)
    top, p = guess.intent, guess.p
    valid = top is not None
    if valid:
        answer = rec._resolved(cleaned, top, p, "encoder", context, guess)
        valid = rec.checked(answer).error is None
    out = Probe(text, want, context, None, top, p, valid)
    if chat and CHAT_FLOOR <= guess.p < max(GRID):
        result = rec.chat_layer(cleaned, context, guess)
        out.chat = result.intent if result is not None else None
    return out


def decide(pr: Probe, threshold: float, chat_floor: float | None) -> str | None:
    if pr.template is not None:
        return pr.template
    if pr.p >= threshold and pr.valid:
        return pr.top
    if chat_floor is not None and chat_floor <= pr.p < threshold:
        return pr.chat
    return None


def score(probes: list[Probe], threshold: float, chat_floor: float | None) -> dict:
    right = wrong = n_in = 0
    acted = dict.fromkeys(CONTEXTS, 0)
    n_out = dict.fromkeys(CONTEXTS, 0)
    for pr in probes:
        got = decide(pr, threshold, chat_floor)
        if pr.want is None:
            label = next(k for k, c in CONTEXTS.items() if c == pr.context)
            n_out[label] += 1
            acted[label] += got in CHANGING
        else:
            n_in += 1
            right += got in pr.want
            wrong += got is not None and got not in pr.want
    return {
        "threshold": threshold,
        "chat_floor": chat_floor,
        "in_domain_acc": round(100 * right / max(1, n_in), 1),
        "in_domain_right": right,
        "in_domain_wrong": wrong,
        "ood_state_changing": acted,
        "ood_n": n_out,
        "ood_state_changing_pct": {
            k: round(100 * acted[k] / max(1, n_out[k]), 2) for k in CONTEXTS
        },
    }


def worst_rate(s: dict) -> float:
    """The out-of-domain state-change rate of the worse context of a sweep row."""
    return max(s["ood_state_changing"][k] / max(1, s["ood_n"][k]) for k in CONTEXTS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-chat", action="store_true")
    parser.add_argument("--out", help="write the sweep as JSON here")
    parser.add_argument(
        "--data",
        default="calibration_en.yaml",
        help="the requests to sweep, a file in this folder or a path "
        "(default: calibration_en.yaml)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("hassil").setLevel(logging.ERROR)

    registry = load_registry(HERE / "slurp_registry.yaml")
    rec = IntentRecognizer(registry, chat=False if args.no_chat else None)
    rows = load_calibration(HERE / args.data)
    probes = []
    for context in CONTEXTS.values():
        for text, want in rows:
            # In-domain requests are scored without context only: a satellite's
            # area changes which device, not which intent.
            if want is not None and context:
                continue
            probes.append(probe(rec, text, want, context, not args.no_chat))

    sweep = [score(probes, t, None) for t in GRID]
    safe = [s for s in sweep if worst_rate(s) <= MAX_FALSE_ACTIVATION]
    if not safe:  # nothing meets the target: the fewest false activations compete
        safe = [s for s in sweep if worst_rate(s) == min(map(worst_rate, sweep))]
    best = max(safe, key=lambda s: (s["in_domain_right"], -s["threshold"]))
    threshold = best["threshold"]
    chat_sweep = []
    if not args.no_chat:
        floors = [f for f in GRID if CHAT_FLOOR <= f < threshold]
        chat_sweep = [score(probes, threshold, f) for f in floors]

        def gained(s: dict) -> tuple[int, int]:
            """Right and wrong in-domain answers the chat band adds (counts)."""
            return (
                s["in_domain_right"] - best["in_domain_right"],
                s["in_domain_wrong"] - best["in_domain_wrong"],
            )

        def adds_activations(s: dict) -> bool:
            acted, alone = s["ood_state_changing"], best["ood_state_changing"]
            return any(acted[k] > alone[k] for k in CONTEXTS)

        useful = [
            s
            for s in chat_sweep
            if not adds_activations(s)
            and gained(s)[0] > 0
            and gained(s)[0] >= gained(s)[1]
        ]
        chat_floor = (
            min(useful, key=lambda s: s["chat_floor"])["chat_floor"]
            if useful
            else threshold
        )
    else:
        chat_floor = threshold
    result = {
        "data": args.data,
        "threshold": threshold,
        "chat_threshold": chat_floor,
        "max_false_activation": MAX_FALSE_ACTIVATION,
        "n_in_domain": sum(p.want is not None for p in probes),
        "n_out_of_domain_asked": sum(p.want is None for p in probes),
        "sweep": sweep,
        "chat_sweep": chat_sweep,
        "chat_answers": [
            f"{p.text!r}: want {p.want}, chat {p.chat} (p={p.p:.2f})"
            for p in probes
            if p.chat is not None or (CHAT_FLOOR <= p.p < threshold and not p.template)
        ],
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
