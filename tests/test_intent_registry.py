"""The device registry (both formats) and slot resolution on free text."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeslm.intent.registry import (
    RegistryError,
    load_registry,
    names_of,
    registry_from_dict,
)
from edgeslm.intent.slots import (
    SlotResolver,
    normalize,
    starts_with_wake_word,
    words_to_numbers,
)

REPO = Path(__file__).resolve().parent.parent
HOME = REPO / "firmware_bridge" / "examples" / "home.yaml"


def test_edgeslm_format_loads_with_capabilities_and_ranges():
    registry = load_registry(HOME)
    thermostat = next(d for d in registry.devices if d.id == "climate.thermostat")
    assert thermostat.domain == "climate" and thermostat.area == "living_room"
    assert thermostat.capabilities["temperature"] == {"min": 16, "max": 28}
    assert thermostat.can("on_off") and not thermostat.can("brightness")
    lamp = next(d for d in registry.devices if d.id == "light.desk_lamp")
    assert lamp.mqtt == {"adapter": "zigbee2mqtt", "topic": "zigbee2mqtt/desk_lamp"}
    assert registry.area("office").floor == "first"
    assert registry.area_by_name("living room").id == "living_room"
    assert registry.digest() == load_registry(HOME).digest()


def test_domain_defaults_when_capabilities_are_not_given():
    registry = registry_from_dict(
        {"devices": [{"id": "light.a", "name": "A"}, {"id": "cover.b", "name": "B"}]}
    )
    light, cover = registry.devices
    assert set(light.capabilities) == {"on_off", "brightness", "color", "color_temp"}
    assert cover.capabilities["position"] == {"min": 0, "max": 100}


def test_home_assistant_fixtures_load(shared_data):
    import yaml

    path = shared_data / "ha-intents-tests-en" / "_fixtures.yaml"
    raw = yaml.safe_load(path.read_text())
    registry = load_registry(path)
    assert len(registry.floors) == len(raw["floors"]) == 5
    assert len(registry.areas) == len(raw["areas"])
    assert len(registry.devices) == len(raw["entities"])
    by_id = {d.id: d for d in registry.devices}
    assert by_id["light.bedroom_lamp"].area == "bedroom_id"
    assert by_id["cover.curtain_left"].attributes["device_class"] == "curtain"
    # A state given as {in: human name, out: HA state} keeps the HA state.
    assert by_id["binary_sensor.phone_battery"].state == "off"
    assert registry.area("kitchen_id").floor == "first_floor_id"


def test_names_expand_templates_and_aliases():
    registry = registry_from_dict(
        {
            "areas": [{"id": "k", "name": "Kitchen", "aliases": ["cook room"]}],
            "devices": [{"id": "todo.tj", "name": "Trader Joe[']s", "aliases": ["TJ"]}],
        }
    )
    assert names_of(registry.devices[0]) == ["Trader Joe's", "Trader Joes", "TJ"]
    assert names_of(registry.areas[0]) == ["Kitchen", "cook room"]


@pytest.mark.parametrize(
    "data,message",
    [
        ([1, 2], "expected a mapping"),
        ({"devices": {"a": 1}}, "'devices' must be a list"),
        ({"rooms": []}, "unknown keys ['rooms']"),
        ({"devices": [{"name": "lamp"}]}, "needs a 'id'"),
        ({"devices": [{"id": "lamp", "name": "lamp"}]}, "needs a 'domain'"),
        (
            {"devices": [{"id": "light.a", "name": "A", "capabilities": ["laser"]}]},
            "unknown capability 'laser'",
        ),
        (
            {
                "devices": [
                    {
                        "id": "climate.a",
                        "name": "A",
                        "capabilities": [{"temperature": {"min": 30, "max": 10}}],
                    }
                ]
            },
            "min <= max",
        ),
        (
            {"devices": [{"id": "light.a", "name": "A", "area": "attic"}]},
            "area 'attic', which is not defined",
        ),
        (
            {"areas": [{"id": "a", "name": "A", "floor": "f9"}]},
            "floor 'f9', which is not defined",
        ),
        (
            {
                "devices": [
                    {"id": "light.a", "name": "A"},
                    {"id": "light.a", "name": "B"},
                ]
            },
            "appears twice",
        ),
        (
            {"devices": [{"id": "light.a", "name": "A", "mqtt": {"adapter": "x"}}]},
            "needs at least a 'topic'",
        ),
        (
            {
                "devices": [
                    {
                        "id": "light.a",
                        "name": "A",
                        "mqtt": {"topic": "t", "adapter": "x"},
                    }
                ]
            },
            "adapter of 'light.a' must be one of",
        ),
        ({"sentences": {"MyIntent": [1]}}, "must be a list of text"),
    ],
)
def test_bad_registries_are_refused_with_the_reason(data, message):
    with pytest.raises(RegistryError) as error:
        registry_from_dict(data, where="site.yaml")
    assert message in str(error.value) and "site.yaml" in str(error.value)


def test_bad_files_are_refused_with_the_reason(tmp_path):
    with pytest.raises(RegistryError, match="no registry file"):
        load_registry(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("devices: [unclosed")
    with pytest.raises(RegistryError, match="not valid YAML"):
        load_registry(bad)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(RegistryError, match="bad.yaml|binary.yaml"):
        load_registry(binary)


# --- free-text slots ----------------------------------------------------------------


def test_normalize_drops_wake_words_and_punctuation():
    assert normalize("Alexa, turn ON the lights!") == "turn on the lights"
    assert normalize("olly dim it to 40%") == "dim it to 40 percent"
    assert normalize("hey google what's 2.5 times 3") == "what's 2.5 times 3"
    assert normalize("alexandra is here") == "alexandra is here"


@pytest.mark.parametrize(
    "text,want",
    [
        ("hey olly turn on the lights", "turn on the lights"),
        ("Hey, Olly: turn on the lights", "turn on the lights"),
        ("ok google turn off the fan", "turn off the fan"),
        ("OK Google, hey siri, dim it", "dim it"),
        ("alexa turn on the lights", "turn on the lights"),
        ("hey hey", "hey"),  # nothing but wake words: the last one stays
        ("alexa", "alexa"),
        ("hey olly", "olly"),
    ],
)
def test_normalize_drops_every_leading_wake_word(text, want):
    assert normalize(text) == want
    assert starts_with_wake_word(text) is (want != " ".join(text.lower().split()))


@pytest.mark.parametrize(
    "text,want",
    [
        ("forty five percent", "45 percent"),
        ("a hundred percent", "100 percent"),
        ("set it to twenty", "set it to 20"),
        ("one two three", "1 2 3"),
        ("nineteen ninety", "19 90"),
        ("no numbers here", "no numbers here"),
    ],
)
def test_words_to_numbers(text, want):
    assert words_to_numbers(text) == want


@pytest.fixture(scope="module")
def resolver():
    return SlotResolver(load_registry(HOME))


def test_names_survive_speech_recognition_errors(resolver):
    got = resolver.resolve("switch of the kitchen lite", "HassTurnOff")
    assert got.slots["name"] == "Kitchen light" and got.devices == ["light.kitchen"]
    got = resolver.resolve("turn on the desk lamb", "HassTurnOn")
    assert got.slots["name"] == "Desk lamp"
    got = resolver.resolve("dim the lights in the living rum", "HassLightSetRelative")
    assert got.slots["area"] == "Living Room"
    assert got.slots["brightness_step"] == "down"


def test_values_numbers_words_percent_colours(resolver):
    got = resolver.resolve("kitchen light to forty five percent", "HassLightSet")
    assert got.slots == {"name": "Kitchen light", "brightness": 45}
    got = resolver.resolve("make the desk lamp deep blue", "HassLightSet")
    assert got.slots["color"] == "blue"
    got = resolver.resolve(
        "thermostat to twenty one degrees", "HassClimateSetTemperature"
    )
    assert got.slots["temperature"] == 21
    got = resolver.resolve("blinds halfway", "HassSetPosition")
    assert got.slots["position"] == 50 and got.devices == ["cover.blinds"]


def test_only_capable_devices_are_named(resolver):
    # The fan is a switch without brightness: a brightness request cannot name it.
    got = resolver.resolve("set the fan to 30 percent", "HassLightSet")
    assert "name" not in got.slots and got.devices == []


def test_context_area_is_used_when_the_text_names_none(resolver):
    got = resolver.resolve("lights off", "HassTurnOff", {"area": "Kitchen"})
    assert got.slots == {"area": "Kitchen", "domain": "light"}
    assert got.devices == ["light.kitchen"] and got.grounded
    got = resolver.resolve("turn the page", "HassTurnOn", {"area": "Kitchen"})
    assert not got.grounded


def test_context_area_prefers_its_own_devices(resolver):
    # Lights in three rooms: "turn on the light" said in the kitchen is its light.
    got = resolver.resolve("turn on the light", "HassTurnOn", {"area": "Kitchen"})
    assert got.slots == {"area": "Kitchen", "domain": "light"}
    assert got.devices == ["light.kitchen"]


def test_context_area_never_rejects_the_devices_of_the_home(resolver):
    # The one thermostat is in the living room; asked in the kitchen it is meant.
    got = resolver.resolve(
        "make it twenty one degrees", "HassClimateSetTemperature", {"area": "Kitchen"}
    )
    assert got.devices == ["climate.thermostat"] and "area" not in got.slots
    # The bedroom has no light: "lights on" there means what it means anywhere.
    bedroom = resolver.resolve("lights on", "HassTurnOn", {"area": "Bedroom"})
    assert bedroom == resolver.resolve("lights on", "HassTurnOn")
    assert len(bedroom.devices) == 3


TWO_VACUUMS = {
    "areas": [
        {"id": "kitchen", "name": "Kitchen"},
        {"id": "hallway", "name": "Hallway"},
        {"id": "office", "name": "Office"},
    ],
    "devices": [
        {"id": "vacuum.kitchen", "name": "Kitchen Robot", "area": "kitchen"},
        {"id": "vacuum.hallway", "name": "Hallway Robot", "area": "hallway"},
    ],
}


@pytest.mark.parametrize("intent", ["HassVacuumStart", "HassVacuumReturnToBase"])
@pytest.mark.parametrize(
    "area,devices",
    [
        (None, ["vacuum.kitchen", "vacuum.hallway"]),
        ("Kitchen", ["vacuum.kitchen"]),  # a choice: the satellite's area decides
        ("Office", ["vacuum.kitchen", "vacuum.hallway"]),  # none there: no filter
    ],
)
def test_context_area_chooses_among_vacuums(intent, area, devices):
    resolver = SlotResolver(registry_from_dict(TWO_VACUUMS))
    context = {"area": area} if area else {}
    got = resolver.resolve("the floors are filthy", intent, context)
    assert got.devices == devices and got.grounded
    assert got.slots.get("area") == (area if area == "Kitchen" else None)


def test_targets_follow_home_assistant_matching(resolver):
    assert resolver.targets({}) == []
    first = {d.id for d in resolver.targets({"floor": "First Floor"})}
    assert first == {"light.desk_lamp", "switch.fan"}
    lights = {d.id for d in resolver.targets({"domain": "light", "name": "all"})}
    assert lights == {"light.kitchen", "light.desk_lamp", "light.hallway"}


@pytest.mark.parametrize(
    "text,step",
    [
        ("it's way too bright in the office", "down"),
        ("the kitchen light is too dim", "up"),
        ("make it less bright", "down"),
        ("turn the brightness down", "down"),
        ("increase the brightness of the desk lamp", "up"),
        ("brighten up the kitchen", "up"),
        ("i can barely read in here", "up"),
    ],
)
def test_direction_of_a_relative_change(resolver, text, step):
    got = resolver.resolve(text, "HassLightSetRelative")
    assert got.slots["brightness_step"] == step
