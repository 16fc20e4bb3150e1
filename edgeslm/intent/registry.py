"""The device registry: which floors, areas and devices a site has, and what they do.

A registry is a YAML file (docs/INTENTS.md; an example:
firmware_bridge/examples/home.yaml):

    floors:  - {id: ground, name: Ground Floor, aliases: [downstairs]}
    areas:   - {id: kitchen, name: Kitchen, floor: ground}
    devices:
      - id: light.kitchen_ceiling          # "<domain>.<object>"; domain from the id
        name: Kitchen ceiling
        aliases: [ceiling light]
        area: kitchen
        capabilities: [on_off, brightness, color]   # or the domain's defaults
        mqtt: {adapter: zigbee2mqtt, topic: zigbee2mqtt/kitchen_ceiling}
    sentences:                             # the site's own templates (hassil syntax)
      HassTurnOn: ["wake up the house"]

Home Assistant's intent test fixtures (`_fixtures.yaml`: `areas`, `floors`,
`entities`) load too: entities become devices with their domain's capabilities.

Names may be hassil templates (`"Trader Joe[']s"`); `names_of` expands them.
Not yet: device groups and per-device custom intents.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeslm.errors import EdgeSLMError


class RegistryError(EdgeSLMError, ValueError):
    """A registry file is missing, not YAML, or describes an impossible site."""


# Capabilities: name -> default parameters. Ranges are inclusive.
CAPABILITIES: dict[str, dict[str, Any]] = {
    "on_off": {},
    "brightness": {"min": 0, "max": 100},
    "color": {},
    "color_temp": {"min": 2000, "max": 6500},
    "position": {"min": 0, "max": 100},
    "open_close": {},
    "temperature": {"min": 5, "max": 35},
    "lock": {},
    "volume": {"min": 0, "max": 100},
    "media": {},
    "vacuum": {},
    "activate": {},
    "fan_speed": {"min": 0, "max": 100},
    "read": {},
}

DOMAIN_CAPABILITIES: dict[str, tuple[str, ...]] = {
    "light": ("on_off", "brightness", "color", "color_temp"),
    "switch": ("on_off",),
    "fan": ("on_off", "fan_speed"),
    "cover": ("open_close", "position"),
    "valve": ("open_close", "position"),
    "climate": ("on_off", "temperature", "read"),
    "lock": ("lock",),
    "media_player": ("on_off", "volume", "media"),
    "vacuum": ("vacuum",),
    "scene": ("activate",),
    "script": ("activate",),
    "sensor": ("read",),
    "binary_sensor": ("read",),
    "person": ("read",),
    "weather": ("read",),
    "todo": ("read",),
    "input_boolean": ("on_off",),
    "lawn_mower": ("vacuum",),
}

MQTT_ADAPTERS = ("json", "zigbee2mqtt", "tasmota", "homeassistant")


@dataclass(frozen=True)
class Floor:
    """A floor of the site: `id`, display `name`, other names (`aliases`)."""

    id: str
    name: str
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class Area:
    """A room or zone: `id`, display `name`, the `floor` id it is on, `aliases`."""

    id: str
    name: str
    floor: str | None = None
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class Device:
    """One controllable or readable thing.

    Attributes:
        id: "<domain>.<object>", unique in the registry.
        name: display name (a hassil template allowed).
        domain: Home Assistant domain (light, switch, cover, climate, ...).
        area: area id, or None.
        aliases: other names people use.
        capabilities: capability name -> parameters (ranges), see `CAPABILITIES`.
        attributes: free attributes (device_class, unit_of_measurement, ...).
        mqtt: how the bridge reaches it: `adapter` and `topic`, or None.
        state: last known state, when the source gives one.
    """

    id: str
    name: str
    domain: str
    area: str | None = None
    aliases: tuple[str, ...] = ()
    capabilities: dict[str, dict[str, Any]] = field(default_factory=dict)
    attributes: dict[str, Any] = field(default_factory=dict)
    mqtt: dict[str, Any] | None = None
    state: str | None = None

    def can(self, capability: str) -> bool:
        """True when the device has `capability` (see `CAPABILITIES`)."""
        return capability in self.capabilities


@dataclass(frozen=True)
class Registry:
    """A site: floors, areas, devices and the site's own sentence templates."""

    floors: tuple[Floor, ...] = ()
    areas: tuple[Area, ...] = ()
    devices: tuple[Device, ...] = ()
    sentences: dict[str, tuple[str, ...]] = field(default_factory=dict)
    source: str = ""

    def area(self, area_id: str | None) -> Area | None:
        """The area with this id, or None."""
        return next((a for a in self.areas if a.id == area_id), None)

    def area_by_name(self, name: str) -> Area | None:
        """The area with this display name or alias (any case), or None."""
        key = name.strip().casefold()
        for area in self.areas:
            if key in (n.casefold() for n in names_of(area)):
                return area
        return None

    def devices_in(self, area_id: str) -> list[Device]:
        """The devices of one area."""
        return [d for d in self.devices if d.area == area_id]

    def digest(self) -> str:
        """A sha256 of the registry's content, for caches keyed by the registry."""
        payload = json.dumps(
            {
                "floors": [vars(f) for f in self.floors],
                "areas": [vars(a) for a in self.areas],
                "devices": [vars(d) for d in self.devices],
                "sentences": self.sentences,
            },
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(payload.encode()).hexdigest()


def names_of(item: Floor | Area | Device) -> list[str]:
    """The display name and aliases, hassil templates expanded, first the name."""
    out: list[str] = []
    for name in (item.name, *item.aliases):
        for expanded in _expand(name):
            if expanded and expanded not in out:
                out.append(expanded)
    return out


def _expand(name: str) -> list[str]:
    from hassil import is_template, parse_sentence, sample_expression

    if not is_template(name):
        return [name.strip()]
    return [s.strip() for s in sample_expression(parse_sentence(name).expression)]


# --- loading -----------------------------------------------------------------------


def load_registry(path: str | os.PathLike) -> Registry:
    """Read a registry YAML file (edgeslm format or HA `_fixtures.yaml`).

    Raises:
        RegistryError: the file is missing, not YAML, or inconsistent; the message
            names the file and the entry.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise RegistryError(
            f"no registry file at {path}; write one (see docs/INTENTS.md and "
            "firmware_bridge/examples/home.yaml)"
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise RegistryError(f"{path}: not valid YAML ({exc})") from exc
    return registry_from_dict(data, where=str(path))


def registry_from_dict(data: Any, *, where: str = "<registry>") -> Registry:
    """Build a `Registry` from parsed YAML (either format)."""
    if not isinstance(data, dict):
        raise RegistryError(
            f"{where}: expected a mapping with floors/areas/devices at the top, "
            f"got {type(data).__name__}"
        )
    if "entities" in data and "devices" not in data:
        return _from_ha_fixtures(data, where)
    known = {"floors", "areas", "devices", "sentences", "language"}
    _reject_unknown(data, known, where)
    floors = tuple(_floor(f, where) for f in _list(data, "floors", where))
    areas = tuple(_area(a, where) for a in _list(data, "areas", where))
    devices = tuple(_device(d, where) for d in _list(data, "devices", where))
    sentences = _sentences(data.get("sentences") or {}, where)
    return _checked(Registry(floors, areas, devices, sentences, where), where)


def _from_ha_fixtures(data: dict[str, Any], where: str) -> Registry:
    floors = tuple(_floor(f, where) for f in _list(data, "floors", where))
    areas = tuple(_area(a, where) for a in _list(data, "areas", where))
    devices = []
    for entry in _list(data, "entities", where):
        state = entry.get("state") if isinstance(entry, dict) else None
        if isinstance(state, dict):  # {in: human name, out: HA state}
            state = state.get("out")
        entry = _entry(entry, "entity", where)
        device = {k: entry.get(k) for k in ("id", "name", "area", "aliases")}
        device["attributes"] = entry.get("attributes") or {}
        device["state"] = None if state is None else str(state)
        devices.append(
            _device({k: v for k, v in device.items() if v is not None}, where)
        )
    return _checked(Registry(floors, areas, tuple(devices), {}, where), where)


def _list(data: dict[str, Any], key: str, where: str) -> list[Any]:
    value = data.get(key) or []
    if not isinstance(value, list):
        raise RegistryError(
            f"{where}: '{key}' must be a list, got {type(value).__name__}"
        )
    return value


def _reject_unknown(entry: dict[str, Any], known: Iterable[str], where: str) -> None:
    unknown = sorted(set(entry) - set(known))
    if unknown:
        raise RegistryError(
            f"{where}: unknown keys {unknown} in {_label(entry)}; "
            f"allowed: {sorted(known)}"
        )


def _label(entry: Any) -> str:
    if isinstance(entry, dict):
        return f"entry {entry.get('id') or entry.get('name') or '?'!r}"
    return "the top level"


def _text(entry: dict[str, Any], key: str, where: str, required: bool = True) -> Any:
    value = entry.get(key)
    if value is None:
        if required:
            raise RegistryError(f"{where}: {_label(entry)} needs a '{key}'")
        return None
    if not isinstance(value, (str, int, float)) or not str(value).strip():
        raise RegistryError(f"{where}: '{key}' of {_label(entry)} must be text")
    return str(value).strip()


def _aliases(entry: dict[str, Any], where: str) -> tuple[str, ...]:
    value = entry.get("aliases") or []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RegistryError(
            f"{where}: aliases of {_label(entry)} must be a list of text"
        )
    return tuple(v.strip() for v in value if v.strip())


def _entry(entry: Any, kind: str, where: str) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise RegistryError(f"{where}: each {kind} must be a mapping, got {entry!r}")
    return entry


def _floor(entry: Any, where: str) -> Floor:
    entry = _entry(entry, "floor", where)
    _reject_unknown(entry, {"id", "name", "aliases", "level"}, where)
    name = _text(entry, "name", where)
    return Floor(
        _text(entry, "id", where, False) or _slug(name), name, _aliases(entry, where)
    )


def _area(entry: Any, where: str) -> Area:
    entry = _entry(entry, "area", where)
    _reject_unknown(entry, {"id", "name", "aliases", "floor"}, where)
    name = _text(entry, "name", where)
    return Area(
        id=_text(entry, "id", where, False) or _slug(name),
        name=name,
        floor=_text(entry, "floor", where, False),
        aliases=_aliases(entry, where),
    )


def _device(entry: Any, where: str) -> Device:
    entry = _entry(entry, "device", where)
    known = {"id", "name", "aliases", "area", "domain", "capabilities", "attributes"}
    _reject_unknown(entry, known | {"mqtt", "state"}, where)
    device_id = _text(entry, "id", where)
    domain = _text(entry, "domain", where, False) or device_id.split(".", 1)[0]
    if "." not in device_id and "domain" not in entry:
        raise RegistryError(
            f"{where}: device {device_id!r} needs a 'domain' (light, switch, ...) "
            "or an id of the form '<domain>.<name>'"
        )
    attributes = entry.get("attributes") or {}
    if not isinstance(attributes, dict):
        raise RegistryError(f"{where}: attributes of {device_id!r} must be a mapping")
    return Device(
        id=device_id,
        name=_text(entry, "name", where),
        domain=domain,
        area=_text(entry, "area", where, False),
        aliases=_aliases(entry, where),
        capabilities=_capabilities(entry.get("capabilities"), domain, device_id, where),
        attributes=dict(attributes),
        mqtt=_mqtt(entry.get("mqtt"), device_id, where),
        state=None if entry.get("state") is None else str(entry["state"]),
    )


def _capabilities(value: Any, domain: str, device_id: str, where: str) -> dict:
    """`[on_off, {temperature: {min: 16, max: 28}}]` -> name -> parameters."""
    if value is None:
        return {
            name: dict(CAPABILITIES[name])
            for name in DOMAIN_CAPABILITIES.get(domain, ())
        }
    if isinstance(value, dict):
        value = [{k: v} for k, v in value.items()]
    if not isinstance(value, list):
        raise RegistryError(f"{where}: capabilities of {device_id!r} must be a list")
    out: dict[str, dict[str, Any]] = {}
    for item in value:
        name, params = (
            (item, {}) if isinstance(item, str) else _one_pair(item, device_id, where)
        )
        if name not in CAPABILITIES:
            raise RegistryError(
                f"{where}: device {device_id!r} has unknown capability {name!r}; "
                f"known: {sorted(CAPABILITIES)}"
            )
        merged = {**CAPABILITIES[name], **(params or {})}
        if "min" in merged and not _number(merged["min"]) <= _number(merged["max"]):
            raise RegistryError(
                f"{where}: {name} range of {device_id!r} must have min <= max, "
                f"got {merged['min']}..{merged['max']}"
            )
        out[name] = merged
    return out


def _one_pair(item: Any, device_id: str, where: str) -> tuple[str, dict[str, Any]]:
    if not isinstance(item, dict) or len(item) != 1:
        raise RegistryError(
            f"{where}: each capability of {device_id!r} is a name or "
            f"{{name: {{min: .., max: ..}}}}, got {item!r}"
        )
    ((name, params),) = item.items()
    if params is not None and not isinstance(params, dict):
        raise RegistryError(
            f"{where}: parameters of {name} on {device_id!r} must be a mapping"
        )
    return str(name), params or {}


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise RegistryError(f"range bound {value!r} is not a number") from exc


def _mqtt(value: Any, device_id: str, where: str) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("topic"), str):
        raise RegistryError(
            f"{where}: mqtt of {device_id!r} needs at least a 'topic' (text)"
        )
    adapter = value.get("adapter", "json")
    if adapter not in MQTT_ADAPTERS:
        raise RegistryError(
            f"{where}: mqtt adapter of {device_id!r} must be one of {MQTT_ADAPTERS}, "
            f"got {adapter!r}"
        )
    return {**value, "adapter": adapter}


def _sentences(value: Any, where: str) -> dict[str, tuple[str, ...]]:
    if not isinstance(value, dict):
        raise RegistryError(f"{where}: 'sentences' maps intent names to template lists")
    out = {}
    for intent, templates in value.items():
        if isinstance(templates, str):
            templates = [templates]
        if not isinstance(templates, list) or not all(
            isinstance(t, str) for t in templates
        ):
            raise RegistryError(
                f"{where}: sentences of {intent!r} must be a list of text"
            )
        out[str(intent)] = tuple(templates)
    return out


def _checked(registry: Registry, where: str) -> Registry:
    """Ids unique; every area's floor and every device's area exists."""
    for kind, items in (
        ("floor", registry.floors),
        ("area", registry.areas),
        ("device", registry.devices),
    ):
        seen: set[str] = set()
        for item in items:
            if item.id in seen:
                raise RegistryError(f"{where}: {kind} id {item.id!r} appears twice")
            seen.add(item.id)
    floor_ids = {f.id for f in registry.floors}
    area_ids = {a.id for a in registry.areas}
    for area in registry.areas:
        if area.floor is not None and area.floor not in floor_ids:
            raise RegistryError(
                f"{where}: area {area.id!r} is on floor {area.floor!r}, which is not "
                f"defined; defined floors: {sorted(floor_ids)}"
            )
    for device in registry.devices:
        if device.area is not None and device.area not in area_ids:
            raise RegistryError(
                f"{where}: device {device.id!r} is in area {device.area!r}, which is "
                f"not defined; defined areas: {sorted(area_ids)}"
            )
    return registry


def _slug(name: str) -> str:
    return "_".join(name.casefold().split())
