"""A Hugging Face hub cache laid out by hand, so hub ids resolve with no network.

The hub is unreachable where the tests run. `huggingface_hub` in offline mode
(`HF_HUB_OFFLINE=1`) answers `snapshot_download(repo_id)` from its cache folder, so
a test that copies a checkpoint into that layout exercises the real client and
edgeslm's whole hub-id path: name, download, export or ONNX detection, load.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

COMMIT = "0123456789abcdef0123456789abcdef01234567"  # any 40 hex digits


def add_snapshot(hub_cache: Path, hub_id: str, folder: Path) -> Path:
    """Copy `folder` into `hub_cache` as the `main` snapshot of `hub_id`.

    Returns:
        The snapshot folder (`models--owner--name/snapshots/COMMIT`).
    """
    repo = hub_cache / ("models--" + hub_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def offline_hub(monkeypatch: pytest.MonkeyPatch, root: Path) -> Path:
    """Point huggingface_hub and edgeslm's cache under `root`; the hub is offline.

    Returns:
        The hub cache folder to add snapshots to.
    """
    hub_cache = root / "hf-hub"
    hub_cache.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setenv("EDGESLM_CACHE", str(root / "edgeslm-cache"))
    return hub_cache
