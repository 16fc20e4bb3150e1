"""Bridge configuration: a YAML file read into frozen dataclasses.

Unknown keys are errors (a typo must not silently disable a safety setting). Paths in
the file are relative to the file itself. See docs/BRIDGE.md for every key.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from edgeslm.errors import EdgeSLMError


class BridgeConfigError(EdgeSLMError, ValueError):
    """The bridge configuration file is missing, malformed or inconsistent."""


# A topic level the configuration may use (prefix, site, instance, group).
_LEVEL = re.compile(r"[A-Za-z0-9_-]{1,64}")  # use with fullmatch


@dataclass(frozen=True)
class TLSConfig:
    """TLS towards the broker. `ca` alone verifies the broker; cert+key add a client
    certificate."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    insecure: bool = False  # skip the host name check (self-signed test brokers only)


@dataclass(frozen=True)
class BrokerConfig:
    host: str = "localhost"
    port: int = 1883
    protocol: str = "5"  # "5" or "3.1.1"
    username: str | None = None
    password: str | None = None
    password_file: str | None = None
    tls: TLSConfig | None = None
    keepalive: int = 30
    reconnect_min: float = 1.0  # seconds, doubled on each failure up to reconnect_max
    reconnect_max: float = 30.0
    # MQTT 5: how long the broker keeps the bridge's session (subscriptions, queued
    # messages) while it is away. Shorter moves a dead bridge's share of a shared
    # subscription to the others sooner, but drops what was queued for it.
    session_expiry: int = 7 * 24 * 3600

    def resolved_password(self) -> str | None:
        if self.password_file:
            return Path(self.password_file).read_text(encoding="utf-8").strip()
        return self.password


@dataclass(frozen=True)
class DeliveryConfig:
    ack_timeout: float = 3.0  # seconds to wait for a device's ack before resending
    max_attempts: int = 5  # publishes per command before it is reported failed
    command_ttl: float = 60.0  # seconds a command may wait before it is stale


@dataclass(frozen=True)
class RateLimitConfig:
    per_second: float = 2.0  # sustained commands per second and device
    burst: int = 5  # commands a device may take at once


@dataclass(frozen=True)
class HermesConfig:
    enabled: bool = True
    execute: bool = True  # also carry out recognized intents, not only publish them


@dataclass(frozen=True)
class DiscoveryConfig:
    enabled: bool = True
    prefix: str = "homeassistant"


@dataclass(frozen=True)
class BridgeConfig:
    """Everything the bridge needs; `load_config` builds it from YAML."""

    registry: str
    site: str = "default"
    prefix: str = "edgeslm"
    instance: str = "bridge"
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    share_group: str | None = None
    queue: str = "bridge-queue.sqlite3"
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    rate_limit: RateLimitConfig = field(default_factory=RateLimitConfig)
    dry_run: bool = False
    hermes: HermesConfig = field(default_factory=HermesConfig)
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    recognizer: str = "auto"  # "auto", "intent", "encoder" or "templates"
    max_payload: int = 65536  # bytes; larger requests are refused
    min_confidence: float = 0.5  # recognized intents below this are not carried out

    @property
    def base(self) -> str:
        """`<prefix>/<site>`: the root of the bridge's own topics."""
        return f"{self.prefix}/{self.site}"


_SECTIONS = {
    "broker": BrokerConfig,
    "delivery": DeliveryConfig,
    "rate_limit": RateLimitConfig,
    "hermes": HermesConfig,
    "discovery": DiscoveryConfig,
}


def load_config(path: str | os.PathLike, **overrides: Any) -> BridgeConfig:
    """Read a bridge YAML file; keyword overrides replace top-level keys.

    Raises:
        BridgeConfigError: missing file, bad YAML, unknown key or bad value.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise BridgeConfigError(
            f"no bridge config at {path}; "
            "start from firmware_bridge/examples/bridge.yaml"
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise BridgeConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise BridgeConfigError(f"{path}: expected a mapping at the top level")
    data.update(overrides)
    return config_from_dict(data, base_dir=path.parent, where=str(path))


def config_from_dict(
    data: dict[str, Any], *, base_dir: Path = Path("."), where: str = "<config>"
) -> BridgeConfig:
    """Build a `BridgeConfig` from parsed YAML, resolving paths against `base_dir`."""
    data = dict(data)
    if "registry" not in data:
        raise BridgeConfigError(
            f"{where}: 'registry' (the device registry YAML) is required"
        )
    for key, cls in _SECTIONS.items():
        if key in data:
            data[key] = _section(cls, data[key], f"{where}: {key}")
    config = _section(BridgeConfig, data, where)
    config = _resolved(_checked(config, where), base_dir)
    _files_exist(config, where)
    return config


def _files_exist(config: BridgeConfig, where: str) -> None:
    """The TLS and password files the config names must be there (say which not)."""
    tls = config.broker.tls
    files = {"broker.password_file": config.broker.password_file}
    if tls is not None:
        files.update({"broker.tls.ca": tls.ca, "broker.tls.cert": tls.cert})
        files["broker.tls.key"] = tls.key
    for key, path in files.items():
        if path is not None and not Path(path).is_file():
            raise BridgeConfigError(f"{where}: {key}: no file at {path}")


def _section(cls: type, value: Any, where: str) -> Any:
    if value is None:
        return cls()
    if not isinstance(value, dict):
        raise BridgeConfigError(
            f"{where}: expected a mapping, got {type(value).__name__}"
        )
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise BridgeConfigError(
            f"{where}: unknown keys {unknown}; allowed: {sorted(known)}"
        )
    value = dict(value)
    if cls is BrokerConfig and isinstance(value.get("tls"), dict):
        value["tls"] = _section(TLSConfig, value["tls"], f"{where}.tls")
    if "protocol" in value:
        value["protocol"] = str(value["protocol"])
    try:
        return cls(**value)
    except TypeError as exc:
        raise BridgeConfigError(f"{where}: {exc}") from exc


def _checked(config: BridgeConfig, where: str) -> BridgeConfig:
    for name in ("site", "prefix", "instance"):
        if not _LEVEL.fullmatch(str(getattr(config, name))):
            raise BridgeConfigError(
                f"{where}: '{name}' must be 1-64 letters, digits, '_' or '-', "
                f"got {getattr(config, name)!r}"
            )
    if config.share_group is not None and not _LEVEL.fullmatch(str(config.share_group)):
        raise BridgeConfigError(
            f"{where}: 'share_group' must be 1-64 letters, digits, '_' or '-', "
            f"got {config.share_group!r}"
        )
    if config.broker.protocol not in ("5", "3.1.1"):
        raise BridgeConfigError(
            f"{where}: broker.protocol must be 5 or 3.1.1, "
            f"got {config.broker.protocol!r}"
        )
    if config.share_group and config.broker.protocol != "5":
        raise BridgeConfigError(f"{where}: share_group needs broker.protocol 5")
    if not 0 <= config.broker.session_expiry <= 0xFFFFFFFF:
        raise BridgeConfigError(
            f"{where}: broker.session_expiry must be 0..4294967295 seconds, "
            f"got {config.broker.session_expiry}"
        )
    d = config.delivery
    if d.ack_timeout <= 0 or d.max_attempts < 1 or d.command_ttl <= 0:
        raise BridgeConfigError(
            f"{where}: delivery needs ack_timeout > 0, max_attempts >= 1 and "
            f"command_ttl > 0, got {d}"
        )
    if config.rate_limit.per_second <= 0 or config.rate_limit.burst < 1:
        raise BridgeConfigError(
            f"{where}: rate_limit needs per_second > 0 and burst >= 1, "
            f"got {config.rate_limit}"
        )
    if config.recognizer not in ("auto", "intent", "encoder", "templates"):
        raise BridgeConfigError(
            f"{where}: recognizer must be 'auto', 'intent', 'encoder' or "
            f"'templates', got {config.recognizer!r}"
        )
    if not 0.0 <= config.min_confidence <= 1.0:
        raise BridgeConfigError(
            f"{where}: min_confidence must be in 0..1, got {config.min_confidence}"
        )
    if not 256 <= config.max_payload <= 1 << 20:
        raise BridgeConfigError(
            f"{where}: max_payload must be 256..1048576 bytes, got {config.max_payload}"
        )
    return config


def _resolved(config: BridgeConfig, base_dir: Path) -> BridgeConfig:
    """Relative paths in the file are relative to the file."""
    from dataclasses import replace

    def path(p: str | None) -> str | None:
        return None if p is None else str((base_dir / p).resolve())

    broker = config.broker
    tls = broker.tls
    if tls is not None:
        tls = replace(tls, ca=path(tls.ca), cert=path(tls.cert), key=path(tls.key))
    broker = replace(broker, tls=tls, password_file=path(broker.password_file))
    return replace(
        config, registry=path(config.registry), queue=path(config.queue), broker=broker
    )
