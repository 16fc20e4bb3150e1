"""Export of BERT-family sentence encoders (all-MiniLM-L6-v2) into encoder packages.

A Hugging Face BERT folder (config.json, model.safetensors, tokenizer.json) becomes
a package folder that `edgeslm.encoder.load_encoder` reads:

    model.onnx (+ model.onnx.data)   the graph below
    tokenizer.json                   copied from the source
    edgeslm.json                     `EncoderManifest`: dims, pooling, sha256s

The graph, written node by node like the decoder builders:

    inputs   input_ids       (batch, seq) int64
             attention_mask  (batch, seq) int64, 1 for real tokens, 0 for padding
    outputs  last_hidden_state  (batch, seq, hidden_size) float32
             embeddings         (batch, hidden_size) float32: the mean of the
                                real tokens' states, L2-normalized

Token type ids are always 0 for single sentences, so type row 0 is folded into the
position table and the input is dropped. Linear layers are `MatMulQ8` int8 blocks
(or `MatMul` for fp32); the word embedding table is int8 blocks too. Attention is
onnxruntime's `MultiHeadAttention` with a key padding mask.

Not yet: cross-encoders, token-type inputs (sentence pairs), CLS pooling.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgeslm.errors import ModelFormatError, ModelNotFoundError
from edgeslm.export.onnx_graph import (
    DEFAULT_BLOCK_SIZE,
    FLOAT,
    INT64,
    MS_DOMAIN,
    GraphBuilder,
)
from edgeslm.export.quantize import quantize_int8_blocks

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
WEIGHTS_FILE = "model.onnx.data"
TOKENIZER_FILE = "tokenizer.json"
GRAPH_KIND = "bert-encoder-v1"


def _read_config(folder: Path) -> dict[str, Any]:
    """The BERT `config.json` in edgeslm's names."""
    path = folder / "config.json"
    if not path.is_file():
        raise ModelFormatError(f"{folder}: no config.json; is this a model folder?")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFormatError(f"{path}: not valid JSON ({exc})") from exc
    if raw.get("model_type") != "bert":
        raise ModelFormatError(
            f"{path}: model_type {raw.get('model_type')!r} is not a BERT encoder"
        )
    if raw.get("hidden_act", "gelu") != "gelu":
        raise ModelFormatError(f"{path}: hidden_act {raw['hidden_act']!r} unsupported")
    try:
        return {
            "architecture": "bert",
            "vocab_size": int(raw["vocab_size"]),
            "hidden_size": int(raw["hidden_size"]),
            "n_layers": int(raw["num_hidden_layers"]),
            "n_heads": int(raw["num_attention_heads"]),
            "intermediate_size": int(raw["intermediate_size"]),
            "max_seq_len": int(raw["max_position_embeddings"]),
            "norm_eps": float(raw.get("layer_norm_eps", 1e-12)),
        }
    except KeyError as exc:
        raise ModelFormatError(f"{path}: missing required key {exc}") from exc


def _open_weights(folder: Path) -> Callable[[str], np.ndarray]:
    """A loader of float32 tensors by their name without the optional `bert.`."""
    from safetensors import SafetensorError, safe_open

    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise ModelFormatError(f"{folder}: no *.safetensors weights found")
    where: dict[str, Any] = {}
    for shard in shards:
        try:
            handle = safe_open(str(shard), framework="numpy")
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelFormatError(f"{shard}: unreadable safetensors ({exc})") from exc
        for key in handle.keys():
            where[key.removeprefix("bert.")] = (handle, key)

    def load(name: str) -> np.ndarray:
        if name not in where:
            raise ModelFormatError(f"{folder}: tensor {name!r} missing")
        handle, key = where[name]
        return np.asarray(handle.get_tensor(key), dtype=np.float32)

    return load


def build_bert(
    load: Callable[[str], np.ndarray],
    cfg: dict[str, Any],
    dtype: str,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
):
    """Write the encoder graph; returns the `onnx.ModelProto`."""
    b = GraphBuilder(dtype, block_size)
    b.input("input_ids", INT64, ["batch", "seq"])
    b.input("attention_mask", INT64, ["batch", "seq"])
    hidden = _embeddings(b, load, cfg)
    mask_i32 = b.op("Cast", "attention_mask", to=6)  # int32 key padding mask
    for i in range(cfg["n_layers"]):
        hidden = _layer(b, load, cfg, i, hidden, mask_i32)
    b.node("Identity", [hidden], outputs=["last_hidden_state"], name="out_hidden")
    _pooling(b, "last_hidden_state")
    b.output("last_hidden_state", FLOAT, ["batch", "seq", cfg["hidden_size"]])
    b.output("embeddings", FLOAT, ["batch", cfg["hidden_size"]])
    return b.model("bert_encoder")


def _embeddings(b: GraphBuilder, load, cfg: dict[str, Any]) -> str:
    # Word rows: int8 blocks gathered and dequantized, or a float table.
    word = load("embeddings.word_embeddings.weight")
    if b.dtype == "fp32":
        rows = b.op("Gather", b.const("embed.weight", word), "input_ids", axis=0)
    else:
        q = quantize_int8_blocks(word, b.block_size)
        rows = b.embedding_rows("input_ids", q, "embed")

    # Positions 0..seq-1 with token type 0 folded in: one float table.
    positions = load("embeddings.position_embeddings.weight")
    positions = positions + load("embeddings.token_type_embeddings.weight")[0]
    table = b.const("pos_type.weight", positions)
    seq = b.op("Gather", b.op("Shape", "input_ids"), b.const("one", _i64(1)), axis=0)
    pos_rows = b.op(
        "Slice",
        table,
        b.const("zero1", _i64([0])),
        b.op("Unsqueeze", seq, b.const("ax0", _i64([0]))),
        b.const("ax0b", _i64([0])),
    )
    summed = b.op("Add", rows, pos_rows)
    return _layer_norm(b, load, summed, "embeddings.LayerNorm", cfg)


def _layer_norm(b: GraphBuilder, load, x: str, prefix: str, cfg) -> str:
    gamma = b.const(f"{prefix}.weight", load(f"{prefix}.weight"))
    beta = b.const(f"{prefix}.bias", load(f"{prefix}.bias"))
    return b.op("LayerNormalization", x, gamma, beta, axis=-1, epsilon=cfg["norm_eps"])


def _dense(b: GraphBuilder, load, x: str, prefix: str) -> str:
    """`x @ W.T + bias` for the HF linear named `prefix`."""
    y = b.linear(x, load(f"{prefix}.weight"), name=prefix)
    return b.op("Add", y, b.const(f"{prefix}.bias", load(f"{prefix}.bias")))


def _layer(b: GraphBuilder, load, cfg, i: int, x: str, mask: str) -> str:
    p = f"encoder.layer.{i}"

    # Self-attention: Q, K, V projections, then onnxruntime's fused attention.
    q = _dense(b, load, x, f"{p}.attention.self.query")
    k = _dense(b, load, x, f"{p}.attention.self.key")
    v = _dense(b, load, x, f"{p}.attention.self.value")
    attn = b.node(
        "MultiHeadAttention",
        [q, k, v, "", mask],
        domain=MS_DOMAIN,
        name=f"{p}.attention.mha",
        num_heads=cfg["n_heads"],
    )[0]
    attn = _dense(b, load, attn, f"{p}.attention.output.dense")

    # Residual + LayerNorm, feed-forward with exact (erf) GELU, residual + LayerNorm.
    x = _layer_norm(
        b, load, b.op("Add", attn, x), f"{p}.attention.output.LayerNorm", cfg
    )
    ff = b.op("Gelu", _dense(b, load, x, f"{p}.intermediate.dense"))
    ff = _dense(b, load, ff, f"{p}.output.dense")
    return _layer_norm(b, load, b.op("Add", ff, x), f"{p}.output.LayerNorm", cfg)


def _pooling(b: GraphBuilder, hidden: str) -> None:
    """Mean over real tokens, then L2 normalization, into output `embeddings`."""
    mask = b.op("Cast", "attention_mask", to=FLOAT)
    mask3 = b.op("Unsqueeze", mask, b.const("ax_last", _i64([-1])))  # (batch, seq, 1)
    total = b.op(
        "ReduceSum", b.op("Mul", hidden, mask3), b.const("ax1", _i64([1])), keepdims=0
    )
    count = b.op("ReduceSum", mask3, b.const("ax1b", _i64([1])), keepdims=0)
    count = b.op("Max", count, b.const("tiny", np.array(1e-9, np.float32)))
    mean = b.op("Div", total, count)  # (batch, hidden)
    norm = b.op("ReduceL2", mean, b.const("ax_m1b", _i64([-1])), keepdims=1)
    norm = b.op("Max", norm, b.const("tiny2", np.array(1e-12, np.float32)))
    b.node("Div", [mean, norm], outputs=["embeddings"], name="l2_normalize")


def _i64(value) -> np.ndarray:
    return np.array(value, dtype=np.int64)


def export_bert(
    src: str | Path,
    out_dir: str | Path,
    *,
    dtype: str = "int8",
    overwrite: bool = False,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> Path:
    """Export a Hugging Face BERT sentence-encoder folder to an encoder package.

    Args:
        src: the model folder (config.json, *.safetensors, tokenizer.json).
        out_dir: the package folder to create.
        dtype: "int8" (block-wise int8 weights, the default) or "fp32".
        overwrite: replace an existing package at `out_dir`.
        block_size: int8 block length along the input dimension.

    Returns:
        The package folder.

    Raises:
        ModelNotFoundError: `src` does not exist.
        ModelFormatError: `src` is not a BERT folder with safetensors weights.
        FileExistsError: `out_dir` exists and `overwrite` is false.
    """
    from edgeslm.encoder import EncoderManifest
    from edgeslm.export import save_graphs, staged_package
    from edgeslm.manifest import EXPORT_VERSION, sha256_file

    src, out = Path(src), Path(out_dir)
    if not src.is_dir():
        raise ModelNotFoundError(f"no model folder at {src}")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True")
    if not (src / TOKENIZER_FILE).is_file():
        raise ModelFormatError(f"{src}: no {TOKENIZER_FILE}")
    cfg = _read_config(src)
    load = _open_weights(src)
    started = time.perf_counter()
    log.info("exporting BERT encoder %s (%d layers) as %s", src, cfg["n_layers"], dtype)

    with staged_package(out) as tmp:
        model = build_bert(load, cfg, dtype, block_size=block_size)
        graphs = save_graphs(model, tmp)
        shutil.copyfile(src / TOKENIZER_FILE, tmp / TOKENIZER_FILE)
        files = (*graphs["files"], TOKENIZER_FILE)
        EncoderManifest(
            config=cfg,
            graph=GRAPH_KIND,
            quantization=f"int8-block{block_size}" if dtype == "int8" else "fp32",
            max_tokens=_max_tokens(src, cfg),
            source={"kind": "hf-folder", "path": str(src.resolve())},
            files={name: sha256_file(tmp / name) for name in files},
            custom_ops=graphs["custom_ops"],
            portable_model=graphs["portable_model"],
            export_version=EXPORT_VERSION,
        ).write(tmp)
    log.info(
        "encoder package written to %s in %.1f s", out, time.perf_counter() - started
    )
    return out


def _max_tokens(src: Path, cfg: dict[str, Any]) -> int:
    """sentence-transformers' `max_seq_length` when given, else the position count."""
    st = src / "sentence_bert_config.json"
    if st.is_file():
        try:
            return int(json.loads(st.read_text())["max_seq_length"])
        except (KeyError, ValueError, json.JSONDecodeError):
            log.warning(
                "%s: unreadable max_seq_length; using %d", st, cfg["max_seq_len"]
            )
    return int(cfg["max_seq_len"])
