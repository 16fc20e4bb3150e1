"""The layered recognizer on a real site: templates, the MiniLM encoder, the chat
model (SmolLM2), validation against the registry, the CLI and the Python API."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from edgeslm.intent.recognizer import (
    STATE_CHANGING,
    Guess,
    IntentRecognizer,
    check,
    load_recognizer,
)
from edgeslm.intent.registry import load_registry, registry_from_dict
from edgeslm.intent.result import IntentResult

REPO = Path(__file__).resolve().parent.parent
HOME = REPO / "firmware_bridge" / "examples" / "home.yaml"


@pytest.fixture(scope="module")
def templates_only():
    return IntentRecognizer.from_file(HOME, encoder=False)


@pytest.fixture(scope="module")
def encoder():
    from edgeslm.encoder import load_encoder

    return load_encoder()


@pytest.fixture(scope="module")
def rec(encoder):
    # The user's cache (as `edgeslm intent` uses it): trained once per machine.
    return IntentRecognizer.from_file(HOME, encoder=encoder, chat=False)


def test_template_answers_with_slots_and_devices(templates_only):
    result = templates_only.recognize("turn the kitchen light to 40%")
    assert result.intent == "HassLightSet" and result.layer == "template"
    assert result.slots == {"name": "Kitchen light", "brightness": 40}
    assert result.devices == ("light.kitchen",) and result.confidence == 1.0
    assert result.actionable and result.latency_ms > 0


@pytest.mark.parametrize(
    "text",
    [
        "Alexa, turn off the desk lamp",
        "hey olly turn off the desk lamp",
        "OK Google, turn off the desk lamp",
    ],
)
def test_template_is_tried_without_the_wake_words(templates_only, text):
    result = templates_only.recognize(text)
    assert result.intent == "HassTurnOff" and result.devices == ("light.desk_lamp",)
    assert result.layer == "template"


def test_context_area_of_a_voice_satellite(templates_only):
    result = templates_only.recognize("turn on the lights", {"area": "Kitchen"})
    assert result.intent == "HassTurnOn"
    assert result.slots == {"area": "Kitchen", "domain": "light"}
    assert result.devices == ("light.kitchen",)


def test_out_of_range_value_is_recognized_but_not_actionable(templates_only):
    result = templates_only.recognize("set the thermostat to 35 degrees")
    assert result.intent == "HassClimateSetTemperature"
    assert result.error == "temperature 35 is outside 16..28"
    assert not result.actionable


def test_request_for_a_missing_device_says_so(templates_only):
    result = templates_only.recognize("turn on the fans in the kitchen")
    assert result.layer == "template" and not result.actionable
    assert result.error.startswith("no device of this site")


def test_intents_the_site_cannot_serve_are_not_matched(templates_only):
    # No media player in this home: "play ..." is not a command for it.
    assert "HassMediaSearchAndPlay" not in templates_only.templates.intent_names
    result = templates_only.recognize("play some jazz", {"area": "Kitchen"})
    assert result.intent != "HassMediaSearchAndPlay"


def test_bad_input_is_refused_or_rejected(templates_only):
    with pytest.raises(TypeError, match="string"):
        templates_only.recognize(None)
    with pytest.raises(TypeError, match="dict"):
        templates_only.recognize("lights on", ["Kitchen"])
    assert not templates_only.recognize("   ").recognized
    assert not templates_only.recognize("!!! ???").recognized
    started = time.perf_counter()
    result = templates_only.recognize("turn on the light " * 2000)
    assert time.perf_counter() - started < 1
    assert not result.recognized and "longer than 500" in result.error
    assert templates_only.recognize("turn on the desk lamp " * 20).recognized is False
    with pytest.raises(ValueError, match="threshold"):
        IntentRecognizer(templates_only.registry, encoder=False, threshold=1.5)


# --- layer (b) ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,intent,devices,threshold",
    [
        (
            "it's way too bright in the office",
            "HassLightSetRelative",
            {"light.desk_lamp"},
            None,
        ),
        (
            "the kitchen light is too dim",
            "HassLightSetRelative",
            {"light.kitchen"},
            None,
        ),
        # Pinned to 0.75 so that it does not move with the calibrated default
        # (docs/INTENTS.md, "Thresholds"): the default was 0.9, which refused it,
        # until the near-miss examples of 2026-12-04 brought it to 0.7.
        (
            "could you kill the light in the kitchen",
            "HassTurnOff",
            {"light.kitchen"},
            0.75,
        ),
        ("kichen light to fourty percent", "HassLightSet", {"light.kitchen"}, None),
    ],
)
def test_encoder_layer_answers_paraphrases(
    rec, monkeypatch, text, intent, devices, threshold
):
    if threshold is not None:
        monkeypatch.setattr(rec, "threshold", threshold)
        monkeypatch.setattr(rec, "chat_threshold", threshold)
    result = rec.recognize(text)
    assert result.intent == intent, result
    assert set(result.devices) == devices and result.actionable
    if result.layer == "encoder":
        assert rec.threshold <= result.confidence <= 1.0


def test_words_and_typos_become_values(rec):
    result = rec.recognize("kichen light to fourty percent")
    assert result.slots.get("brightness") == 40
    result = rec.recognize("it's way too bright in the office")
    assert result.slots.get("brightness_step") == "down"


OUT_OF_DOMAIN = [
    "what's the weather in paris",
    "tell me a joke about penguins",
    "how far away is the moon",
    "book a table for two at eight",
    "what's your favourite colour",
    "remind me to call the plumber",
    "turn the page",
]


@pytest.mark.parametrize("context", [{}, {"area": "Office"}])
def test_out_of_domain_requests_change_nothing(rec, context):
    acted = []
    for text in OUT_OF_DOMAIN:
        result = rec.recognize(text, context)
        if result.intent in STATE_CHANGING and result.actionable:
            acted.append((text, result.intent, result.layer))
    assert acted == []


def test_training_is_cached(rec, encoder, tmp_path, monkeypatch):
    import shutil

    from edgeslm.hub import cache_dir
    from edgeslm.intent import classifier

    # Start from this machine's sentence embeddings, without a trained head.
    for path in (cache_dir() / "intent").glob("embeddings-*.npz"):
        shutil.copy(path, tmp_path / path.name)
    trainings = []
    real_train = classifier.train

    def counting_train(*args, **kwargs):
        trainings.append(time.perf_counter())
        return real_train(*args, **kwargs)

    monkeypatch.setattr(classifier, "train", counting_train)
    first = IntentRecognizer.from_file(
        HOME, encoder=encoder, chat=False, cache_dir=tmp_path
    )
    assert len(trainings) == 1 and list(tmp_path.glob("intent-classifier-*.npz"))
    again = IntentRecognizer.from_file(
        HOME, encoder=encoder, chat=False, cache_dir=tmp_path
    )
    assert len(trainings) == 1  # loaded, not trained again
    assert again.classifier.answerable == first.classifier.answerable
    assert again.classifier.intent_head.classes == rec.classifier.intent_head.classes

    # A corrupt cached head is trained again, not a crash.
    for path in tmp_path.glob("intent-classifier-*.npz"):
        path.write_bytes(b"not an npz file")
    third = IntentRecognizer.from_file(
        HOME, encoder=encoder, chat=False, cache_dir=tmp_path
    )
    assert len(trainings) == 2
    assert third.recognize("kill the light in the kitchen").intent == "HassTurnOff"


def test_embedding_cache_embeds_only_new_sentences(tmp_path):
    import numpy as np

    from edgeslm.intent.classifier import embed_cached

    class Fake:
        manifest = type("M", (), {"files": {"model.onnx.data": "ab" * 32}})()
        seen: list[str] = []

        def embed(self, texts, **kwargs):
            self.seen.extend(texts)
            return np.array([[len(t), 1.0] for t in texts], np.float32)

    fake = Fake()
    first = embed_cached(fake, ["a", "bb", "a"], tmp_path)
    assert sorted(fake.seen) == ["a", "bb"] and first.shape == (3, 2)
    second = embed_cached(fake, ["bb", "ccc"], tmp_path)
    assert fake.seen[2:] == ["ccc"] and second[1, 0] == 3
    (cache,) = tmp_path.glob("embeddings-*.npz")
    cache.write_bytes(b"\x00broken")
    assert embed_cached(fake, ["a"], tmp_path).shape == (1, 2)  # re-embedded


# --- layer (c) ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_rec(rec):
    import edgeslm

    chat = IntentRecognizer(
        rec.registry, encoder=rec.encoder, chat=edgeslm.load(), cache_dir=None
    )
    return chat


def test_chat_schema_is_the_registry_s_intents_and_ranges(rec):
    schema = rec.chat_schema(["HassClimateSetTemperature", "HassTurnOff"])
    assert schema["properties"]["intent"]["enum"] == [
        "HassClimateSetTemperature",
        "HassTurnOff",
        "none",
    ]
    assert schema["properties"]["value"] == {
        "type": "integer",
        "minimum": 16,
        "maximum": 28,
    }
    assert "Thermostat" in schema["properties"]["device"]["enum"]
    assert schema["required"] == ["intent", "device"]
    only = rec.chat_schema(["HassClimateSetTemperature"])["properties"]["device"]
    assert only == {"enum": ["Thermostat", "none"]}
    assert "value" not in rec.chat_schema(["HassTurnOff"])["properties"]


class _ScriptedChat:
    """A chat model answering with a fixed JSON text; it records what it is asked."""

    def __init__(self, answer: dict) -> None:
        self.answer = answer
        self.asked: list[dict] = []

    def chat(self, messages, **options):
        self.asked.append({"messages": messages, **options})
        return types.SimpleNamespace(text=json.dumps(self.answer))


def _scripted(rec, answer: dict) -> tuple[IntentRecognizer, _ScriptedChat]:
    model = _ScriptedChat(answer)
    return IntentRecognizer(rec.registry, encoder=rec.encoder, chat=model), model


OFF_OR_ON = Guess(
    ranked=[("HassTurnOff", 0.45), ("HassTurnOn", 0.4), ("NONE", 0.15)],
    answerable=["HassTurnOff", "HassTurnOn", "HassLightSet"],
    domain="light",
    domain_p=0.9,
)


def test_chat_layer_takes_the_model_s_pick_among_the_candidates(rec):
    # What the layer does with the model's answer, with a model that answers as told.
    text = "switch off the kitchen light"
    chat, model = _scripted(rec, {"intent": "HassTurnOff", "device": "Kitchen light"})
    result = chat.chat_layer(text, {}, OFF_OR_ON)
    assert result is not None and result.intent == "HassTurnOff"
    assert result.layer == "chat" and result.devices == ("light.kitchen",)
    assert result.confidence == 0.45  # the encoder's probability of that intent
    # The model was offered only the encoder's candidates (and "none"), greedily.
    (call,) = model.asked
    enum = call["json_schema"]["properties"]["intent"]["enum"]
    assert enum == ["HassTurnOff", "HassTurnOn", "none"]
    assert call["temperature"] == 0.0 and text == call["messages"][-1]["content"]

    # A value the text does not give comes from the model, within the device's range.
    light_set = Guess([("HassLightSet", 0.5)], OFF_OR_ON.answerable, "light", 0.9)
    chat, _ = _scripted(
        rec, {"intent": "HassLightSet", "device": "Kitchen light", "value": 30}
    )
    result = chat.chat_layer("make the kitchen light dimmer", {}, light_set)
    assert result is not None and result.slots["brightness"] == 30


@pytest.mark.parametrize(
    "answer",
    [
        {"intent": "none", "device": "none"},  # the model declines
        {"intent": "HassLightSet", "device": "Kitchen light"},  # not a candidate
        {"intent": "HassTurnOff", "device": "Desk lamp"},  # not what the text names
        ["HassTurnOff"],  # not an object
    ],
)
def test_chat_layer_refuses_answers_it_cannot_stand_behind(rec, answer):
    chat, model = _scripted(rec, answer)
    assert chat.chat_layer("switch off the kitchen light", {}, OFF_OR_ON) is None
    assert len(model.asked) == 1


def test_chat_layer_with_the_real_model_stays_within_the_candidates(chat_rec):
    # SmolLM2-135M mostly declines here (docs/INTENTS.md, "Layer (c)"): what must
    # hold with the real model is that it runs and never leaves the candidates.
    result = chat_rec.chat_layer("switch off the kitchen light", {}, OFF_OR_ON)
    assert result is None or result.intent in ("HassTurnOff", "HassTurnOn")
    # Only "none" to choose from: the layer does not ask the model at all.
    nothing = Guess([("NONE", 0.9)], chat_rec.classifier.answerable, "light", 0.9)
    assert chat_rec.chat_layer("switch off the kitchen light", {}, nothing) is None


def test_chat_layer_failure_falls_back_to_not_recognized(rec):
    class Broken:
        def chat(self, *args, **kwargs):
            raise RuntimeError("model crashed")

    broken = IntentRecognizer(rec.registry, encoder=rec.encoder, chat=Broken())
    guess = Guess([("HassTurnOff", 0.45)], rec.classifier.answerable, "light", 0.9)
    assert broken.chat_layer("switch off the kitchen light", {}, guess) is None


# --- HassVacuumCleanArea: the area is the room to clean ----------------------------

VACUUM_HOME = {
    "areas": [
        {"id": "hallway", "name": "Hallway"},
        {"id": "bedroom", "name": "Bedroom"},
    ],
    "devices": [
        {"id": "vacuum.robot", "name": "Robot Vacuum", "area": "hallway"},
        {"id": "light.bedroom", "name": "Bedroom Lamp", "area": "bedroom"},
    ],
}


class VacuumChat:
    """A chat model that always sends the robot vacuum to do `intent`."""

    def __init__(self, intent: str = "HassVacuumCleanArea") -> None:
        self.intent = intent

    def chat(self, *args, **kwargs):
        reply = {"intent": self.intent, "device": "Robot Vacuum"}
        return type("Reply", (), {"text": json.dumps(reply)})()


def vacuum_home(ranked: list[tuple[str, float]]) -> IntentRecognizer:
    """Layers (b) and (c) without the models: the encoder's guess is `ranked`.

    The thresholds are fixed here (0.8 and 0.4), so a test picks its layer by `p`
    whatever the calibrated defaults are.
    """
    rec = IntentRecognizer(
        registry_from_dict(VACUUM_HOME),
        encoder=False,
        threshold=0.8,
        chat_threshold=0.4,
    )
    guess = Guess(ranked, [i for i, _ in ranked if i != "NONE"], "vacuum", 0.9)
    chat = VacuumChat(ranked[0][0])
    rec.classifier, rec.classify, rec._chat = object(), lambda _: guess, chat
    return rec


@pytest.mark.parametrize(
    "text,p,layer",
    [
        ("vacuum the bedroom", 0.0, "template"),
        ("clean the carpet in the bedroom", 0.98, "encoder"),
        ("clean the carpet in the bedroom", 0.5, "chat"),
    ],
)
def test_clean_area_sends_the_vacuum_wherever_it_stands(text, p, layer):
    # As Home Assistant's handler does it: the area is where to clean, not where
    # the vacuum is (here the hallway); the vacuum is the home's.
    rec = vacuum_home([("HassVacuumCleanArea", p), ("NONE", 1 - p)])
    result = rec.recognize(text, {"area": "Hallway"})
    assert (result.intent, result.layer) == ("HassVacuumCleanArea", layer), result
    assert result.slots == {"area": "Bedroom"} and result.actionable
    assert result.devices == ("vacuum.robot",)


@pytest.mark.parametrize("intent", ["HassVacuumStart", "HassVacuumReturnToBase"])
@pytest.mark.parametrize("p,layer", [(0.98, "encoder"), (0.5, "chat")])
@pytest.mark.parametrize("context", [{}, {"area": "Bedroom"}])
def test_satellite_area_does_not_reject_the_vacuum_of_the_home(
    intent, p, layer, context
):
    # Home Assistant targets these by the sentence's name and area; the satellite's
    # area (the bedroom, no vacuum there) only prefers vacuums that stand in it.
    rec = vacuum_home([(intent, p), ("NONE", 1 - p)])
    result = rec.recognize("the floors are filthy", context)
    assert (result.intent, result.layer) == (intent, layer), result
    assert result.actionable and result.devices == ("vacuum.robot",)
    assert "area" not in result.slots


def test_the_threshold_is_on_the_sites_intents_together():
    # Split between two of the site's intents, the heads are still sure it is a
    # command for the site: the likelier intent answers, with their total.
    rec = vacuum_home(
        [("HassVacuumStart", 0.5), ("HassVacuumCleanArea", 0.4), ("NONE", 0.1)]
    )
    result = rec.recognize("the floors are filthy")
    assert (result.intent, result.layer) == ("HassVacuumStart", "encoder")
    assert result.confidence == pytest.approx(0.9)
    # Mostly NONE: below the threshold (0.8), whatever the runner-up.
    rec = vacuum_home([("NONE", 0.75), ("HassVacuumStart", 0.25)])
    assert rec.recognize("the floors are filthy").layer != "encoder"


def test_clean_area_needs_an_area_of_the_site():
    rec = IntentRecognizer(registry_from_dict(VACUUM_HOME), encoder=False)
    attic = IntentResult("vacuum the attic", "HassVacuumCleanArea", {"area": "Attic"})
    assert check(rec.registry, rec.resolver, attic) == (
        (),
        "this site has no area Attic",
    )


# --- the Python API for the bridge, and the command line ------------------------------


def test_load_recognizer_is_a_callable_for_the_bridge():
    recognize = load_recognizer(str(HOME), encoder=False)
    result = recognize("close the blinds")
    assert result.intent == "HassTurnOff" and result.devices == ("cover.blinds",)


def edgeslm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edgeslm", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_prints_the_intent():
    done = edgeslm(
        "intent", "turn the kitchen light to 40%", "--registry", str(HOME),
        "--templates-only", "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["intent"] == "HassLightSet" and answer["devices"] == ["light.kitchen"]
    assert answer["slots"] == {"name": "Kitchen light", "brightness": 40}

    done = edgeslm(
        "intent", "what is love", "--registry", str(HOME), "--templates-only"
    )
    assert done.returncode == 1 and done.stdout.startswith("not recognized")


def test_cli_bad_registry_is_a_clear_error(tmp_path):
    bad = tmp_path / "site.yaml"
    bad.write_text("devices:\n  - {id: light.a}\n")
    done = edgeslm("intent", "lights on", "--registry", str(bad), "--templates-only")
    assert done.returncode == 1
    assert "site.yaml" in done.stderr and "needs a 'name'" in done.stderr
    assert "Traceback" not in done.stderr


def test_registry_of_the_bridge_still_loads():
    registry = load_registry(HOME)
    assert {d.id for d in registry.devices} >= {"light.kitchen", "cover.blinds"}
