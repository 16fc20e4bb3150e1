"""pytest fixtures shared by the bridge tests (a plugin of tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bridge.broker import Mosquitto
from bridge.harness import HOME_YAML
from edgeslm.intent.registry import Registry, load_registry
from firmware_bridge.recognizer import TemplateRecognizer


@pytest.fixture(scope="session")
def registry() -> Registry:
    return load_registry(HOME_YAML)


@pytest.fixture(scope="session")
def recognizer(registry) -> TemplateRecognizer:
    """The template layer on the example registry (built once: about a second)."""
    return TemplateRecognizer(registry)


@pytest.fixture
def broker(tmp_path) -> Iterator[Mosquitto]:
    """A fresh mosquitto on a free port, stopped after the test."""
    server = Mosquitto(tmp_path / "broker").start()
    yield server
    server.stop()
