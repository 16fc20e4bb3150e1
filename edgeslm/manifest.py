"""The package manifest (`edgeslm.json`): what a model package is and how to check it.

A model package is a folder holding `model.onnx`, `tokenizer.json` and this manifest.
The manifest makes the package self-describing (architecture, dimensions, special
tokens, chat template, quantization, source) and verifiable: it records the sha256 of
every file, and `Manifest.verify` checks them at load.

Hashing a 150 MB package takes longer than loading it, so a load may reuse an earlier
check: after a file has been hashed and found good, its size, modification time and
inode are recorded in the user cache (`verified/` beside the exported packages), and
a later load with `reuse_checks=True` hashes only files whose record differs. Any
rewrite changes the modification time, so it is rehashed; only a change that keeps
all three (an in-place edit whose timestamp was set back, or bit rot) waits for a
full check: `edgeslm info`, or `Manifest.verify` with `reuse_checks=False`.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgeslm.config import ModelConfig
from edgeslm.errors import ModelFormatError, PackageIntegrityError

log = logging.getLogger(__name__)

MANIFEST_NAME = "edgeslm.json"
FORMAT_VERSION = 1
# What the exporter of this edgeslm writes; a package cached by an older exporter
# is exported again (edgeslm.hub) so it gets the current graph. 2: int8 linear
# layers as edgeslm's MatMulQ8 operator, with a portable graph beside it; 3: int4
# layers as MatMulQ4 and attention as edgeslm's CachedAttention; 4: SwiGLU fused
# into the gate + up projection (the operators' activation=1); 5: the RMS norms and
# residual adds of Llama blocks done by the products (their gamma and R inputs);
# 6: quantized graphs keep their KV cache in float16; 7: int4 graphs keep theirs in
# float32 again (their weights are the source's exactly).
EXPORT_VERSION = 7


@dataclass(frozen=True)
class TokenSpec:
    """Special tokens the runtime needs.

    Attributes:
        bos_token_id: prepended when `add_bos_token` is set.
        eos_token_ids: any of these ends a generation.
        add_bos_token: whether plain prompts start with BOS.
        pad_token_id: padding, when the model has one.
    """

    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    add_bos_token: bool = False
    pad_token_id: int | None = None


CONTEXT_SHIFTS = ("rotate", "reprefill")
CHAT_FORMATS = ("template", "dialogpt")


@dataclass(frozen=True)
class Manifest:
    """Everything `edgeslm.json` says about a package.

    Attributes:
        context_shift: what the runtime does when the context is full. "rotate":
            drop the oldest tokens after a kept prefix and re-rotate the cached
            RoPE keys in place. "reprefill": learned absolute positions cannot be
            moved, so the kept tokens are computed again at their new positions.
        chat_format: "template": render `chat_template` (Jinja) and let the cache
            shift when full. "dialogpt": turns joined by the end-of-text token
            (`chat_template` holds that format) and the oldest turns dropped so the
            conversation fits the context.
        custom_ops: operator domains `model.onnx` needs besides onnxruntime's
            (`ai.edgeslm`: the C kernel's operators; see edgeslm/session.py).
        portable_model: a graph of the same model for a stock onnxruntime, run
            when the C kernel is not available (None: model.onnx needs nothing).
        export_version: the exporter generation that wrote the package.
    """

    config: ModelConfig
    tokens: TokenSpec
    quantization: str
    graph: str
    chat_template: str | None = None
    context_shift: str = "rotate"
    chat_format: str = "template"
    source: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    custom_ops: tuple[str, ...] = ()
    portable_model: str | None = None
    export_version: int = 1
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.context_shift not in CONTEXT_SHIFTS:
            raise ModelFormatError(
                f"context_shift must be one of {CONTEXT_SHIFTS}, "
                f"got {self.context_shift!r}; re-export the model"
            )
        if self.chat_format not in CHAT_FORMATS:
            raise ModelFormatError(
                f"chat_format must be one of {CHAT_FORMATS}, "
                f"got {self.chat_format!r}; re-export the model"
            )

    # --- reading and writing ------------------------------------------------------

    def to_json(self) -> str:
        data: dict[str, Any] = {
            "format_version": self.format_version,
            "graph": self.graph,
            "quantization": self.quantization,
            "config": self.config.to_dict(),
            "tokens": asdict(self.tokens),
            "chat_template": self.chat_template,
            "chat_format": self.chat_format,
            "context_shift": self.context_shift,
            "source": self.source,
            "files": self.files,
            "custom_ops": list(self.custom_ops),
            "portable_model": self.portable_model,
            "export_version": self.export_version,
        }
        return json.dumps(data, indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def read(cls, package: Path) -> Manifest:
        """Read `package/edgeslm.json`.

        Raises:
            ModelFormatError: missing, not JSON, or missing keys.
        """
        path = Path(package) / MANIFEST_NAME
        if not path.is_file():
            raise ModelFormatError(
                f"{package}: no {MANIFEST_NAME}; is this an edgeslm package? "
                "Create one with `edgeslm export SRC -o DIR`."
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            version = int(data["format_version"])
            if version != FORMAT_VERSION:
                raise ModelFormatError(
                    f"{path}: format_version {version} is not supported "
                    f"(this edgeslm reads {FORMAT_VERSION}); re-export the model"
                )
            tokens = data["tokens"]
            return cls(
                config=ModelConfig.from_dict(data["config"]),
                tokens=TokenSpec(
                    bos_token_id=tokens.get("bos_token_id"),
                    eos_token_ids=tuple(tokens.get("eos_token_ids", ())),
                    add_bos_token=bool(tokens.get("add_bos_token", False)),
                    pad_token_id=tokens.get("pad_token_id"),
                ),
                quantization=data["quantization"],
                graph=data["graph"],
                chat_template=data.get("chat_template"),
                context_shift=data.get("context_shift", "rotate"),
                chat_format=data.get("chat_format", "template"),
                source=dict(data.get("source", {})),
                files=dict(data["files"]),
                custom_ops=tuple(data.get("custom_ops", ())),
                portable_model=data.get("portable_model"),
                export_version=int(data.get("export_version", 1)),
            )
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelFormatError(f"{path}: not valid JSON ({exc})") from exc
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, ModelFormatError):
                raise
            raise ModelFormatError(f"{path}: malformed manifest ({exc!r})") from exc

    def write(self, package: Path) -> None:
        (Path(package) / MANIFEST_NAME).write_text(self.to_json(), encoding="utf-8")

    # --- integrity ------------------------------------------------------------------

    def verify(self, package: Path, *, reuse_checks: bool = False) -> None:
        """Check every listed file exists and matches its sha256.

        Args:
            package: the package folder.
            reuse_checks: skip hashing a file whose size, modification time and
                inode are those recorded when it last passed (see the module
                docstring); a full check records them.

        Raises:
            PackageIntegrityError: naming the first file that is missing or differs.
        """
        stamps = _read_stamps(package) if reuse_checks else {}
        fresh: dict[str, list[int | str]] = {}
        for name, expected in self.files.items():
            path = Path(package) / name
            if not path.is_file():
                raise PackageIntegrityError(
                    f"{package}: file {name} listed in the manifest is missing; "
                    "re-export the package"
                )
            stamp = [*_stat_key(path), expected]
            if stamps.get(name) == stamp:
                fresh[name] = stamp
                continue
            actual = sha256_file(path)
            if actual != expected:
                raise PackageIntegrityError(
                    f"{path}: sha256 mismatch (manifest {expected[:12]}…, file "
                    f"{actual[:12]}…); the file is corrupted or was changed; re-export "
                    "the package"
                )
            fresh[name] = stamp
        if fresh != stamps:
            _write_stamps(package, fresh)


def _stat_key(path: Path) -> list[int]:
    """What identifies a file's content without reading it: size, mtime, inode."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _stamp_file(package: Path) -> Path:
    from edgeslm.hub import cache_dir  # hub imports this module

    # two zlib checksums, not hashlib: a load that finds its stamps reads no file
    # and so need not load OpenSSL (3.5 MB RSS); a collision only costs a rehash
    path = str(Path(package).resolve()).encode()
    key = f"{zlib.crc32(path):08x}{zlib.adler32(path):08x}"
    return cache_dir() / "verified" / f"{key}.json"


def _read_stamps(package: Path) -> dict[str, list[int | str]]:
    try:
        data = json.loads(_stamp_file(package).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_stamps(package: Path, stamps: dict[str, list[int | str]]) -> None:
    """Record passed files; a cache that cannot be written only costs a rehash."""
    target = _stamp_file(package)
    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(stamps))
        tmp.replace(target)
    except OSError as exc:
        log.debug("could not record the verified files of %s: %s", package, exc)
        tmp.unlink(missing_ok=True)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    import hashlib  # here: a load whose files' stamps hold hashes nothing

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
