"""Calibrate the recognizer's two thresholds on held-out hand-written requests.

    python tools/eval_intents/calibrate.py                # encoder + chat band
    python tools/eval_intents/calibrate.py --no-chat      # encoder threshold only

Data: `calibration_en.yaml` (in-domain requests with their intents, and
out-of-domain requests), on the evaluation home `slurp_registry.yaml`; neither
the training examples nor any evaluation set. Every request is asked with no
context and with a voice satellite's area, so a false activation is counted both
ways.

Each request goes through the template layer once and the encoder once; the
sweep then replays the decision for every threshold, so it costs one pass. The
chat model is asked once for every request whose probability falls in the
widest band considered (`CHAT_FLOOR` up to the threshold).

Rule (docs/INTENTS.md): among the thresholds at which no out-of-domain request
changes a device's state, in either context, the encoder threshold is the one
with the best in-domain accuracy (the lowest of those on a tie; all thresholds
compete if none is safe); the chat floor is the lowest that adds no false
activation, at least one right answer, and at least as many right answers as
wrong ones (else the band is empty and the chat model is never asked).
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
    top, p = guess.ranked[0]
    answer = rec.checked(rec._resolved(cleaned, top, p, "encoder", context, guess))
    valid = top in guess.answerable and answer.error is None
    out = Probe(text, want, context, None, top, guess.p, valid)
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
    right = wrong = acted = n_in = n_out = 0
    for pr in probes:
        got = decide(pr, threshold, chat_floor)
        if pr.want is None:
            n_out += 1
            acted += got in CHANGING
        else:
            n_in += 1
            right += got in pr.want
            wrong += got is not None and got not in pr.want
    return {
        "threshold": threshold,
        "chat_floor": chat_floor,
        "in_domain_acc": round(100 * right / max(1, n_in), 1),
        "in_domain_wrong": wrong,
        "ood_state_changing": acted,
        "ood_n": n_out,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-chat", action="store_true")
    parser.add_argument("--out", help="write the sweep as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("hassil").setLevel(logging.ERROR)

    registry = load_registry(HERE / "slurp_registry.yaml")
    rec = IntentRecognizer(registry, chat=False if args.no_chat else None)
    rows = load_calibration(HERE / "calibration_en.yaml")
    probes = []
    for context in ({}, SATELLITE_AREA):
        for text, want in rows:
            # In-domain requests are scored without context only: a satellite's
            # area changes which device, not which intent.
            if want is not None and context:
                continue
            probes.append(probe(rec, text, want, context, not args.no_chat))

    sweep = [score(probes, t, None) for t in GRID]
    safe = [s for s in sweep if s["ood_state_changing"] == 0]
    best = max(safe or sweep, key=lambda s: (s["in_domain_acc"], -s["threshold"]))
    threshold = best["threshold"]
    chat_sweep = []
    if not args.no_chat:
        floors = [f for f in GRID if CHAT_FLOOR <= f < threshold]
        chat_sweep = [score(probes, threshold, f) for f in floors]
        n_in = sum(p.want is not None for p in probes)

        def gained(s: dict) -> tuple[float, int]:
            right = (s["in_domain_acc"] - best["in_domain_acc"]) * n_in / 100
            return right, s["in_domain_wrong"] - best["in_domain_wrong"]

        useful = [
            s
            for s in chat_sweep
            if s["ood_state_changing"] == 0
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
        "threshold": threshold,
        "chat_threshold": chat_floor,
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
