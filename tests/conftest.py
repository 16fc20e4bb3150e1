"""Shared fixtures: where the reference data lives and small helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edgeslm import _kernel

# Fixtures of the bridge tests (a mosquitto per test, the example registry).
pytest_plugins = ("bridge.fixtures",)

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def lib():
    """The loaded C kernel (`pip install -e .` builds it); a missing library fails."""
    return _kernel.require()


@pytest.fixture
def levels(lib):
    """Every matmul SIMD level this CPU supports; restores the best one after."""
    best = lib.esl_qmm_set_level(99)
    yield list(range(best + 1))
    lib.esl_qmm_set_level(best)


def shared_data_dir() -> Path:
    """The read-only reference data set (tokenizer vectors, intent suites).

    It lies in `../shared/data` beside the checkout; `EDGESLM_SHARED_DATA` overrides.
    A missing folder is an error, not a skip: CI always has it.
    """
    env = os.environ.get("EDGESLM_SHARED_DATA")
    path = Path(env) if env else REPO_ROOT.parent / "shared" / "data"
    if not path.is_dir():
        raise RuntimeError(
            f"reference data not found at {path}; set EDGESLM_SHARED_DATA to the "
            "shared/data folder"
        )
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return shared_data_dir()


# --- figures that tests measure and the run reports -------------------------------

_REPORT: list[str] = []


@pytest.fixture
def report():
    """Call `report("name: value")` to list a measured figure after the run."""
    return _REPORT.append


def pytest_terminal_summary(terminalreporter):
    if _REPORT:
        terminalreporter.section("edgeslm figures")
        for line in _REPORT:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory, shared_data) -> Path:
    """A tiny random-weight Llama HF folder with the Llama SentencePiece vocabulary."""
    from checkpoints import TINY_LLAMA, make_llama_folder

    return make_llama_folder(
        tmp_path_factory.mktemp("tiny-hf"), shared_data, **TINY_LLAMA
    )


@pytest.fixture(scope="session")
def tiny_package(tmp_path_factory, tiny_folder) -> Path:
    """The tiny model exported to an int8 package."""
    from edgeslm.export import export_model

    return export_model(tiny_folder, tmp_path_factory.mktemp("tiny-pkg") / "int8")
