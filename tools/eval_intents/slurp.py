"""SLURP's development split, mapped onto Home Assistant style intents.

`iot` requests are mapped (docs/INTENTS.md has the table and the reasons); every
other scenario is out of domain and must come back not recognized, or at least as
nothing that changes a device's state. Which requests start with a wake word is the
recognizer's rule (`edgeslm.intent.slots.starts_with_wake_word`), not defined here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# SLURP intent -> the intents that count as correct. A few devel rows carry the
# scenario-less name (`hue_lightoff`); they mean the same.
MAPPING: dict[str, tuple[str, ...]] = {
    "iot_hue_lighton": ("HassTurnOn",),
    "hue_lighton": ("HassTurnOn",),
    "iot_hue_lightoff": ("HassTurnOff",),
    "hue_lightoff": ("HassTurnOff",),
    "iot_wemo_on": ("HassTurnOn",),
    "iot_wemo_off": ("HassTurnOff",),
    "iot_hue_lightchange": ("HassLightSet",),
    "iot_hue_lightdim": ("HassLightSetRelative",),
    "iot_hue_lightup": ("HassLightSetRelative",),
    "hue_lightup": ("HassLightSetRelative",),
    "hue_lightdim": ("HassLightSetRelative",),
    # Home Assistant's newer releases send "vacuum the kitchen" to
    # HassVacuumCleanArea; both start the vacuum.
    "iot_cleaning": ("HassVacuumStart", "HassVacuumCleanArea"),
    "cleaning": ("HassVacuumStart", "HassVacuumCleanArea"),
    "iot_coffee": ("CustomMakeCoffee",),
}
# A dim/brighten request that names an amount ("dim the lights to 20%") is also
# served correctly by setting the brightness.
RELATIVE = ("iot_hue_lightdim", "iot_hue_lightup", "hue_lightup", "hue_lightdim")


@dataclass(frozen=True)
class Request:
    text: str
    slurp_intent: str
    in_domain: bool
    accepted: tuple[str, ...]


def load_requests(path: Path) -> list[Request]:
    """Every row of a SLURP split; raises KeyError for an unmapped iot intent."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        intent = row["intent"]
        if row["scenario"] == "iot":
            accepted = MAPPING[intent]
            if intent in RELATIVE and any(
                e["type"] == "change_amount" for e in row.get("entities", [])
            ):
                accepted = (*accepted, "HassLightSet")
            out.append(Request(row["sentence"], intent, True, accepted))
        else:
            out.append(Request(row["sentence"], intent, False, ()))
    return out
