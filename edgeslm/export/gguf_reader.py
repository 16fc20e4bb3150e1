"""GGUF reader: llama.cpp's file format into an edgeslm `Checkpoint`.

Tensors are dequantized to float32 with the `gguf` package, one at a time. llama.cpp's
converter permutes the rows of the query and key projections so that its RoPE can
rotate interleaved pairs; edgeslm's graph uses the Hugging Face (rotate-half) layout,
so the permutation is undone here. Q4_0 and Q4_1 tensors can also be read as their
4-bit blocks (`load_int4`), which int4 packages carry over unchanged.

Not yet: architectures other than `llama` (SmolLM2 and Llama-68M are both `llama`).
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path
from typing import Any

import numpy as np

from edgeslm.config import ModelConfig
from edgeslm.errors import ModelFormatError
from edgeslm.export.checkpoint import Checkpoint
from edgeslm.export.quantize import INT4_BLOCK_SIZE, Int4Blocks

log = logging.getLogger(__name__)

_GGUF_LAYER_NAMES = {
    "attn_norm": "attn_norm",
    "attn_q": "wq",
    "attn_k": "wk",
    "attn_v": "wv",
    "attn_output": "wo",
    "ffn_norm": "ffn_norm",
    "ffn_gate": "w_gate",
    "ffn_up": "w_up",
    "ffn_down": "w_down",
}
_GGUF_GLOBAL_NAMES = {"token_embd": "embed", "output_norm": "norm", "output": "lm_head"}

# What a truncated or garbled file makes the gguf package raise.
_READ_ERRORS = (ValueError, IndexError, KeyError, OSError, struct.error, TypeError)


def open_gguf(path: Path) -> Checkpoint:
    """Open a GGUF file of a `llama`-architecture model.

    Raises:
        ModelFormatError: the file is truncated, garbled or of another architecture.
    """
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except _READ_ERRORS as exc:
        raise ModelFormatError(
            f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc}); "
            "is it truncated?"
        ) from exc
    config = _gguf_config(reader, path)

    # Map canonical names to reader tensors.
    tensors: dict[str, Any] = {}
    for tensor in reader.tensors:
        canonical = _gguf_to_canonical(tensor.name)
        if canonical is not None:
            tensors[canonical] = tensor
    if "lm_head" not in tensors:
        config = _with_tied(config)

    def load(name: str) -> np.ndarray:
        return _dequantize(tensors[name], name, config, path)

    def load_int4(name: str) -> Int4Blocks | None:
        return _int4_blocks(tensors[name], name, config, path)

    return Checkpoint(
        config=config,
        names=sorted(tensors),
        load=load,
        load_int4=load_int4,
        write_tokenizer=lambda out: _write_tokenizer(reader, out),
        source={"kind": "gguf", "path": str(path.resolve())},
    )


def _field(reader: Any, key: str, path: Path, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise ModelFormatError(f"{path}: GGUF metadata key {key!r} is missing")
        return default
    try:
        return field.contents()
    except _READ_ERRORS as exc:
        raise ModelFormatError(f"{path}: GGUF key {key!r} is unreadable") from exc


def _gguf_config(reader: Any, path: Path) -> ModelConfig:
    arch = _field(reader, "general.architecture", path)
    if arch != "llama":
        raise ModelFormatError(
            f"{path}: GGUF architecture {arch!r} is not supported yet; supported: llama"
        )
    hidden = int(_field(reader, "llama.embedding_length", path))
    n_heads = int(_field(reader, "llama.attention.head_count", path))
    n_vocab = (
        len(reader.fields["tokenizer.ggml.tokens"].data)
        if ("tokenizer.ggml.tokens" in reader.fields)
        else None
    )
    vocab = int(_field(reader, "llama.vocab_size", path, default=n_vocab or 0))
    return ModelConfig(
        architecture="llama",
        vocab_size=vocab,
        hidden_size=hidden,
        n_layers=int(_field(reader, "llama.block_count", path)),
        n_heads=n_heads,
        n_kv_heads=int(_field(reader, "llama.attention.head_count_kv", path, n_heads)),
        head_dim=int(
            _field(reader, "llama.rope.dimension_count", path, hidden // n_heads)
        ),
        intermediate_size=int(_field(reader, "llama.feed_forward_length", path)),
        max_seq_len=int(_field(reader, "llama.context_length", path)),
        rope_theta=float(_field(reader, "llama.rope.freq_base", path, 10000.0)),
        norm_eps=float(
            _field(reader, "llama.attention.layer_norm_rms_epsilon", path, 1e-5)
        ),
    )


def _with_tied(config: ModelConfig) -> ModelConfig:
    import dataclasses

    return dataclasses.replace(config, tie_word_embeddings=True)


def _gguf_to_canonical(name: str) -> str | None:
    base, _, kind = name.rpartition(".")
    if kind != "weight":
        return None
    if base in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[base]
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _GGUF_LAYER_NAMES:
        return f"layers.{int(parts[1])}.{_GGUF_LAYER_NAMES[parts[2]]}"
    return None


def _dequantize(tensor: Any, name: str, config: ModelConfig, path: Path) -> np.ndarray:
    from gguf.quants import dequantize

    try:
        weights = dequantize(tensor.data, tensor.tensor_type)
    except (*_READ_ERRORS, NotImplementedError) as exc:
        raise ModelFormatError(
            f"{path}: tensor {tensor.name} ({tensor.tensor_type.name}) cannot be "
            f"dequantized: {exc}"
        ) from exc
    expected = tuple(int(d) for d in reversed(tensor.shape))
    weights = np.asarray(weights, dtype=np.float32).reshape(expected)

    # Undo llama.cpp's RoPE row permutation of the query and key projections.
    if name.endswith(".wq"):
        weights = unpermute_rope_rows(weights, config.n_heads)
    elif name.endswith(".wk"):
        weights = unpermute_rope_rows(weights, config.n_kv_heads)
    return weights


def _int4_blocks(
    tensor: Any, name: str, config: ModelConfig, path: Path
) -> Int4Blocks | None:
    """The 4-bit blocks of a Q4_0 or Q4_1 tensor as they are stored; None otherwise.

    Q4_1 block (20 bytes): fp16 scale d, fp16 minimum m, 16 bytes of nibbles, value
    j in the low nibble of byte j and value j + 16 in its high nibble; w = d*q + m.
    Q4_0 block (18 bytes): fp16 d and the nibbles; w = d*(q - 8).
    """
    import gguf

    kind = tensor.tensor_type
    if kind not in (gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1):
        return None
    n_out, k = (int(d) for d in reversed(tensor.shape))
    has_min = kind == gguf.GGMLQuantizationType.Q4_1
    block_bytes = 20 if has_min else 18
    try:
        raw = np.asarray(tensor.data, dtype=np.uint8).reshape(-1, block_bytes)
    except ValueError as exc:
        raise ModelFormatError(f"{path}: tensor {tensor.name} is truncated") from exc
    if raw.shape[0] * INT4_BLOCK_SIZE != n_out * k:
        raise ModelFormatError(
            f"{path}: tensor {tensor.name} holds {raw.shape[0]} blocks, "
            f"expected {n_out * k // INT4_BLOCK_SIZE}"
        )

    # Per block: scales (and minimums) from fp16, then the 32 nibbles in order.
    scales = raw[:, 0:2].copy().view(np.float16).astype(np.float32)[:, 0]
    if has_min:
        mins = raw[:, 2:4].copy().view(np.float16).astype(np.float32)[:, 0]
    else:
        mins = -8.0 * scales
    nibbles = raw[:, block_bytes - 16 :]
    q = np.concatenate([nibbles & 15, nibbles >> 4], axis=1)  # (n_blocks_total, 32)

    n_blocks = k // INT4_BLOCK_SIZE
    q = q.reshape(n_out, n_blocks, INT4_BLOCK_SIZE)
    scales = scales.reshape(n_out, n_blocks)
    mins = mins.reshape(n_out, n_blocks)
    # The same row permutation as `_dequantize` undoes, applied to whole rows.
    heads = {"wq": config.n_heads, "wk": config.n_kv_heads}.get(name.split(".")[-1])
    if heads is not None:
        q = unpermute_rope_rows(q.reshape(n_out, -1), heads).reshape(q.shape)
        scales = unpermute_rope_rows(scales, heads)
        mins = unpermute_rope_rows(mins, heads)
    return Int4Blocks(q=q, scales=scales, mins=mins, k=k)


def unpermute_rope_rows(weights: np.ndarray, n_heads: int) -> np.ndarray:
    """Invert llama.cpp's Q/K permutation: interleaved pairs back to two halves.

    Within each head llama.cpp stores row pairs (r, r + head_dim/2) next to each
    other; Hugging Face stores the first halves, then the second halves.

    Args:
        weights: `(n_heads * head_dim, in)` rows as in the GGUF file.
        n_heads: heads the rows split into (query heads or key/value heads).
    """
    rows, cols = weights.shape
    half = rows // n_heads // 2
    return (
        weights.reshape(n_heads, half, 2, cols)
        .swapaxes(1, 2)
        .reshape(rows, cols)
        .copy()
    )


def _write_tokenizer(source, out: Path):
    from edgeslm.export.tokenizer_build import tokenizer_from_gguf

    return tokenizer_from_gguf(source, out)
