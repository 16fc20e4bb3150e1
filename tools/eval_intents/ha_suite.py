"""Home Assistant's English intent test suite, loaded and scored as HA scores it.

A case passes on the intent when the names match, and on intent+slots when, in
addition, every returned slot is expected and equal (a list in the test means "one
of") and no expected slot is missing. The test's `context` is the request context.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True)
class Case:
    text: str
    intent: str
    slots: dict[str, Any]
    context: dict[str, Any]
    file: str


def load_cases(folder: Path) -> list[Case]:
    """Every sentence of every test file (not `_fixtures.yaml`), in file order."""
    cases = []
    for path in sorted(folder.glob("*.yaml")):
        if path.name.startswith("_"):
            continue
        for test in yaml.safe_load(path.read_text())["tests"]:
            intent = test["intent"]
            for sentence in test.get("sentences") or []:
                cases.append(
                    Case(
                        text=sentence,
                        intent=intent["name"],
                        slots=intent.get("slots") or {},
                        context=intent.get("context") or {},
                        file=path.stem,
                    )
                )
    return cases


def slots_match(expected: dict[str, Any], got: dict[str, Any]) -> bool:
    """HA's rule: returned slots all expected and equal; none expected missing."""
    for name, value in got.items():
        want = expected.get(name)
        if want is None:
            return False
        if isinstance(want, list):
            if isinstance(value, list):
                if not set(want).issubset(value):
                    return False
            elif value not in set(want):
                return False
        elif isinstance(value, list):
            if want not in value:
                return False
        elif want != value:
            return False
    return all(name in got for name in expected)
