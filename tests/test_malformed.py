"""Bad input gives a clear error naming the problem: never a crash or a hang."""

from __future__ import annotations

import json
import shutil

import pytest
from checkpoints import smollm2_gguf

import edgeslm
from edgeslm.errors import ModelFormatError, ModelNotFoundError, PackageIntegrityError
from edgeslm.export import export_model


@pytest.mark.parametrize("keep", [16, 4096, 2_000_000, 60_000_000])
def test_truncated_gguf_is_a_format_error(tmp_path, keep):
    src = smollm2_gguf()
    cut = tmp_path / "cut.gguf"
    with open(src, "rb") as f:
        cut.write_bytes(f.read(keep))
    with pytest.raises(ModelFormatError, match="cut.gguf"):
        export_model(cut, tmp_path / "pkg")
    assert not (tmp_path / "pkg").exists()


def test_not_a_gguf_file_is_a_format_error(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"NOPE" + bytes(1000))
    with pytest.raises(ModelFormatError):
        export_model(junk, tmp_path / "pkg")


@pytest.mark.parametrize(
    "key", ["hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size"]
)
def test_config_missing_a_key_names_it(tmp_path, tiny_folder, key):
    folder = tmp_path / "model"
    shutil.copytree(tiny_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    del config[key]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFormatError, match=key):
        export_model(folder, tmp_path / "pkg")


def test_config_that_is_not_json(tmp_path, tiny_folder):
    folder = tmp_path / "model"
    shutil.copytree(tiny_folder, folder)
    (folder / "config.json").write_text("{ not json")
    with pytest.raises(ModelFormatError, match="config.json"):
        export_model(folder, tmp_path / "pkg")


def test_unsupported_architecture_says_so(tmp_path, tiny_folder):
    folder = tmp_path / "model"
    shutil.copytree(tiny_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "mamba"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFormatError, match="mamba"):
        export_model(folder, tmp_path / "pkg")


@pytest.mark.parametrize(
    "garbage", [b"", b"\xff" * 8, b"\x10\x00\x00\x00\x00\x00\x00\x00{"]
)
def test_garbled_safetensors_is_a_format_error(tmp_path, tiny_folder, garbage):
    folder = tmp_path / "model"
    shutil.copytree(tiny_folder, folder)
    (folder / "model.safetensors").write_bytes(garbage)
    with pytest.raises(ModelFormatError, match="safetensors"):
        export_model(folder, tmp_path / "pkg")


def test_corrupted_package_file_fails_its_sha256(tmp_path, tiny_package):
    package = tmp_path / "pkg"
    shutil.copytree(tiny_package, package)
    data = bytearray((package / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (package / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(PackageIntegrityError, match="model.onnx.*sha256"):
        edgeslm.load(package)


def test_missing_package_file_is_named(tmp_path, tiny_package):
    package = tmp_path / "pkg"
    shutil.copytree(tiny_package, package)
    (package / "tokenizer.json").unlink()
    with pytest.raises(PackageIntegrityError, match="tokenizer.json"):
        edgeslm.load(package)


def test_garbled_manifest_is_a_format_error(tmp_path, tiny_package):
    package = tmp_path / "pkg"
    shutil.copytree(tiny_package, package)
    (package / "edgeslm.json").write_text('{"format_version": 1}')
    with pytest.raises(ModelFormatError, match="manifest"):
        edgeslm.load(package)


def test_unknown_model_name_says_what_to_give(tmp_path):
    with pytest.raises(ModelNotFoundError, match="hub id"):
        edgeslm.load(str(tmp_path / "nothing-here"))


def test_unreachable_hub_fails_clearly(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("EDGESLM_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelNotFoundError, match="could not download"):
        edgeslm.load("Felladrin/Llama-68M-Chat-v1")
