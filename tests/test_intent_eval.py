"""tools/eval_intents: HA's scoring rule, data hygiene, and a small slice of the
evaluation run end to end (the full run is the tool, not a test)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
TOOL = REPO / "tools" / "eval_intents"
sys.path.insert(0, str(TOOL))

from ha_suite import load_cases, slots_match  # noqa: E402
from slurp import MAPPING, load_requests  # noqa: E402

from edgeslm.intent.slots import normalize  # noqa: E402


@pytest.mark.parametrize(
    "expected,got,ok",
    [
        ({"name": "Lamp"}, {"name": "Lamp"}, True),
        ({"name": "Lamp"}, {}, False),  # an expected slot is missing
        ({}, {"name": "Lamp"}, False),  # a returned slot was not expected
        ({"name": "Lamp"}, {"name": "Lamp", "area": "Kitchen"}, False),
        ({"brightness": 50}, {"brightness": 50.0}, True),
        ({"domain": ["light", "switch"]}, {"domain": "switch"}, True),  # one of
        ({"domain": ["light", "switch"]}, {"domain": "fan"}, False),
        ({"domain": ["light", "switch"]}, {"domain": ["light", "switch", "fan"]}, True),
        ({"domain": "light"}, {"domain": ["light", "switch"]}, True),
        ({"domain": "light"}, {"domain": ["fan"]}, False),
    ],
)
def test_slots_are_scored_as_home_assistant_scores_them(expected, got, ok):
    assert slots_match(expected, got) is ok


def test_suites_load(shared_data):
    cases = load_cases(shared_data / "ha-intents-tests-en")
    assert len(cases) == 1024
    assert {c.intent for c in cases} >= {"HassTurnOn", "HassLightSet", "HassGetState"}
    requests = load_requests(shared_data / "slurp" / "devel.jsonl")
    iot = [r for r in requests if r.in_domain]
    assert len(requests) == 2033 and len(iot) == 118
    assert all(r.accepted for r in iot) and set(MAPPING) >= {
        r.slurp_intent for r in iot
    }


def _held_out(name: str) -> set[str]:
    """The requests of a held-out file of tools/eval_intents, normalized."""
    data = yaml.safe_load((TOOL / name).read_text())
    held_out = {normalize(t) for ts in data["in_domain"].values() for t in ts}
    return held_out | {normalize(t) for t in data["out_of_domain"]}


def _examples_and_calibration() -> tuple[set[str], set[str]]:
    """The training examples, and the calibration and probe requests."""
    examples = yaml.safe_load(
        (REPO / "edgeslm" / "intent" / "data" / "examples_en.yaml").read_text()
    )
    train = {normalize(t) for sentences in examples.values() for t in sentences}
    return train, _held_out("calibration_en.yaml") | _held_out("probe_en.yaml")


def test_probe_and_calibration_are_apart():
    calibration, probe = _held_out("calibration_en.yaml"), _held_out("probe_en.yaml")
    assert len(probe) > 500 and not (calibration & probe), sorted(calibration & probe)


def _generated_training_set() -> set[str]:
    """The sentences the recognizer trains on for the SLURP evaluation home."""
    from edgeslm.intent.classifier import training_set
    from edgeslm.intent.registry import load_registry
    from edgeslm.intent.templates import TemplateLayer

    registry = load_registry(TOOL / "slurp_registry.yaml")
    return set(training_set(registry, TemplateLayer(registry).intents).texts)


def _american(text: str) -> str:
    """`text` with the British spellings the examples use made American."""
    for british, american in (("colour", "color"), ("favourite", "favorite")):
        text = text.replace(british, american)
    return text


def test_no_evaluation_sentence_is_training_or_calibration_data(shared_data):
    train, held_out = _examples_and_calibration()
    evaluation = {
        normalize(c.text) for c in load_cases(shared_data / "ha-intents-tests-en")
    }
    evaluation |= {
        normalize(r.text) for r in load_requests(shared_data / "slurp" / "devel.jsonl")
    }
    assert not (train & evaluation), sorted(train & evaluation)[:10]
    assert not (held_out & evaluation), sorted(held_out & evaluation)[:10]
    assert not (train & held_out), sorted(train & held_out)[:10]
    # A copy in the other spelling is still a copy ("colour" / SLURP's "color").
    loose_eval = {_american(t) for t in evaluation}
    for written in (train, held_out):
        copies = {t for t in written if _american(t) in loose_eval}
        assert not copies, sorted(copies)[:10]
    # The generated set (template samples + filled examples) may hold sentences
    # Home Assistant's templates also give its suite; never a calibration one.
    generated = _generated_training_set()
    assert len(generated) > 1000
    assert not (generated & held_out), sorted(generated & held_out)[:10]


def test_wake_word_share_uses_the_recognizers_rule(shared_data):
    import run

    from edgeslm.intent import slots

    assert run.starts_with_wake_word is slots.starts_with_wake_word
    iot = [
        r.text
        for r in load_requests(shared_data / "slurp" / "devel.jsonl")
        if r.in_domain
    ]
    assert sum(map(slots.starts_with_wake_word, iot)) == 12  # of 118: 10.2%
    # "no" is no wake word: normalize("no " + text)[3:] is `text` with nothing dropped.
    for text in iot:
        assert slots.starts_with_wake_word(text) == (
            normalize(text) != normalize(f"no {text}")[3:]
        )


def test_evaluation_slice_end_to_end(tmp_path, report):
    import run

    out = tmp_path / "results.json"
    assert run.main(["--limit", "40", "--no-chat", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    ha_peer, ha_ours = results["ha/hassil"], results["ha/edgeslm"]
    slurp_peer, slurp_ours = results["slurp/hassil"], results["slurp/edgeslm"]
    assert ha_ours["n"] == ha_peer["n"] == 40
    assert set(ha_ours["layers"]) <= {"template", "encoder", "none"}
    assert ha_ours["intent_acc"] >= ha_peer["intent_acc"]
    assert slurp_ours["iot"]["intent_acc"] >= slurp_peer["iot"]["intent_acc"] + 30
    for context in ("ood_no_context", "ood_area_context"):
        assert slurp_ours[context]["state_changing_pct"] <= 5.0
    assert slurp_ours["iot"]["layer_own_latency"]["encoder"]["p50_ms"] > 0
    ours, peer = slurp_ours["iot"]["intent_acc"], slurp_peer["iot"]["intent_acc"]
    report(
        f"eval slice (40 each): HA intent {ha_ours['intent_acc']}% "
        f"(hassil {ha_peer['intent_acc']}%), SLURP iot {ours}% (hassil {peer}%)"
    )
