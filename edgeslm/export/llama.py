"""ONNX graph builder for the Llama family (Llama-68M, SmolLM2).

The graph follows edgeslm's decoder contract (docs/ARCHITECTURE.md):

    inputs   input_ids              (1, n_new) int64
             seqlens_k              (1,) int32   cache length after this step - 1
             total_sequence_length  () int32     cache length after this step
             past_key_values.{l}.key / .value
                                    (1, n_kv_heads, max_seq_len, head_dim) float16 in
                                    a quantized graph, float32 in an fp32 one
    outputs  logits                 (1, vocab_size) f32, last position only
             present.{l}.key / .value  the same buffers as the past ones

Attention is edgeslm's `CachedAttention` (GroupQueryAttention's inputs and outputs,
kernels/attention.c) with RoPE applied inside it; the runtime binds each past and
present to one preallocated buffer, so a decode step writes only the new positions
and never copies the cache.

In a quantized graph a block is five nodes: the RMS norms and residual adds are
done by the products around them (`MatMulQ8`'s gamma and R inputs,
kernels/ort_op.c), so the residual stream is the output of each block's output and
down projections. fp32 graphs keep onnxruntime's norm ops.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from edgeslm.config import ModelConfig
from edgeslm.export.checkpoint import Checkpoint
from edgeslm.export.onnx_graph import (
    DEFAULT_BLOCK_SIZE,
    FLOAT,
    FLOAT16,
    INT32,
    INT64,
    MS_DOMAIN,
    GraphBuilder,
)
from edgeslm.export.quantize import (
    Int4Blocks,
    concat_int4,
    pack_q8,
    quantize_int8_blocks,
)

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]


def build_llama(
    ckpt: Checkpoint,
    dtype: str,
    progress: Progress | None = None,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    head_block_size: int | None = None,
):
    """Write the decoder graph of a Llama-family checkpoint.

    Args:
        ckpt: an opened checkpoint (config + lazy tensors).
        dtype: "int8" (block-wise int8 weights), "int4" (4-bit blocks of 32, a GGUF
            source's Q4_0/Q4_1 blocks carried over; int8 embedding and head) or
            "fp32".
        progress: called as `progress(done, total, what)` after each block.
        block_size: int8 block length along the input dimension.
        head_block_size: block length of the embedding table and the output
            projection (default: `block_size`).

    Returns:
        The `onnx.ModelProto`.
    """
    cfg = ckpt.config
    b = GraphBuilder(dtype, block_size)
    _declare_io(b, cfg)
    head_block = head_block_size or block_size
    hidden, embed_q = _embedding(b, ckpt, head_block)

    residual = None
    mlp_out = hidden
    for layer in range(cfg.n_layers):
        if b.quantized:
            mlp_out = _block_fused(b, ckpt, layer, mlp_out)
        else:
            mlp_out, residual = _block(b, ckpt, layer, mlp_out, residual)
        if progress:
            progress(layer + 1, cfg.n_layers, f"layer {layer + 1}/{cfg.n_layers}")

    # Last position only: gather it before the final norm and the output projection.
    last_idx = b.const("last_index", np.array(-1, dtype=np.int64))
    if residual is None:
        total = mlp_out
    else:
        total = b.op("Add", mlp_out, residual)
    last = b.op("Gather", total, last_idx, axis=1)
    if b.quantized:
        _lm_head(b, ckpt, last, embed_q, head_block, norm=_norm(b, ckpt, "norm"))
    else:
        normed = _rms_norm(b, last, ckpt.load("norm"), "final_norm", cfg.norm_eps)
        _lm_head(b, ckpt, normed, embed_q, head_block)
    return b.model("edgeslm-llama")


def _declare_io(b: GraphBuilder, cfg: ModelConfig) -> None:
    """The decoder contract's inputs and outputs. An int8 graph keeps its cache in
    float16 (half the memory and the bytes a step reads; its weights' rounding is
    far coarser). An int4 graph, whose weights are a GGUF's Q4_1 blocks carried over
    exactly, keeps float32: the cache's rounding would be its largest departure
    from the source (it cost 73 of 516 greedy tokens against fp32, for no decode
    speed that the measurements could tell apart). An fp32 graph keeps float32, the
    precision of its parity tests."""
    b.input("input_ids", INT64, [1, "n_new"])
    b.input("seqlens_k", INT32, [1])
    b.input("total_sequence_length", INT32, [])
    kv_shape = [1, cfg.n_kv_heads, "max_seq_len", cfg.head_dim]
    kv_type = FLOAT16 if b.dtype == "int8" else FLOAT
    for layer in range(cfg.n_layers):
        for kind in ("key", "value"):
            b.input(f"past_key_values.{layer}.{kind}", kv_type, kv_shape)
    b.output("logits", FLOAT, [1, cfg.vocab_size])
    for layer in range(cfg.n_layers):
        for kind in ("key", "value"):
            b.output(f"present.{layer}.{kind}", kv_type, kv_shape)


def _embedding(b: GraphBuilder, ckpt: Checkpoint, block_size: int):
    """Token embedding `(1, n_new, hidden)`; returns it and, for int8 with a tied
    head, the packed table that the head reuses (else None).

    A tied table is stored once, in `MatMulQ8`'s layout, and gathered from there;
    an untied one stays row-major, which gathers with fewer ops.
    """
    weight = ckpt.load("embed")
    if b.dtype == "fp32":
        table = b.const("embed.weight", weight)
        return b.op("Gather", table, "input_ids", axis=0), None
    if weight.shape[1] % block_size:  # export_model checks first
        raise ValueError(
            f"hidden_size {weight.shape[1]} is not a multiple of the int8 block "
            f"length {block_size}"
        )
    q = quantize_int8_blocks(weight, block_size)
    if _tied(ckpt):
        packed = pack_q8(q)
        return b.embedding_packed("input_ids", packed, "embed"), packed
    return b.embedding_rows("input_ids", q, "embed"), None


def _tied(ckpt: Checkpoint) -> bool:
    return ckpt.config.tie_word_embeddings and "lm_head" not in ckpt.names


def _rms_norm(b: GraphBuilder, x: str, gamma: np.ndarray, name: str, eps: float) -> str:
    g = b.const(f"{name}.weight", gamma.astype(np.float32))
    return b.node(
        "SimplifiedLayerNormalization", [x, g], 1, name=name, axis=-1, epsilon=eps
    )[0]


def _skip_rms_norm(
    b: GraphBuilder, x: str, skip: str, gamma: np.ndarray, name: str, eps: float
) -> tuple[str, str]:
    """Residual add fused with the RMS norm: returns (normed, new residual)."""
    g = b.const(f"{name}.weight", gamma.astype(np.float32))
    outs = b.node(
        "SkipSimplifiedLayerNormalization",
        [x, skip, g],
        4,
        name=name,
        domain=MS_DOMAIN,
        epsilon=eps,
    )
    return outs[0], outs[3]


def _block(b: GraphBuilder, ckpt: Checkpoint, layer: int, x: str, residual: str | None):
    cfg = ckpt.config
    p = f"layers.{layer}"

    # Attention input: the first block normalizes the embedding; later ones fuse
    # the previous block's residual add into the norm.
    if residual is None:
        residual = x
        h = _rms_norm(b, x, ckpt.load(f"{p}.attn_norm"), f"{p}.attn_norm", cfg.norm_eps)
    else:
        h, residual = _skip_rms_norm(
            b, x, residual, ckpt.load(f"{p}.attn_norm"), f"{p}.attn_norm", cfg.norm_eps
        )

    # One packed QKV projection feeds GroupQueryAttention (RoPE inside).
    wqkv = _weights(b, ckpt, f"{p}.wq", f"{p}.wk", f"{p}.wv")
    qkv = b.linear(h, wqkv, f"{p}.qkv")
    attn = b.attention(qkv, layer, cfg.n_heads, cfg.n_kv_heads, _rope_tables(b, cfg))
    o = b.linear(attn, _weights(b, ckpt, f"{p}.wo"), f"{p}.wo")

    # Feed-forward: packed gate+up projection with SiLU(gate) * up, down projection.
    h, residual = _skip_rms_norm(
        b, o, residual, ckpt.load(f"{p}.ffn_norm"), f"{p}.ffn_norm", cfg.norm_eps
    )
    wgu = _weights(b, ckpt, f"{p}.w_gate", f"{p}.w_up")
    act = b.swiglu(h, wgu, f"{p}.gate_up")
    down = b.linear(act, _weights(b, ckpt, f"{p}.w_down"), f"{p}.w_down")
    return down, residual


def _block_fused(b: GraphBuilder, ckpt: Checkpoint, layer: int, stream: str) -> str:
    """One block of a quantized graph on the residual stream `(1, n_new, hidden)`;
    returns the stream after it. The norms and adds live in the products."""
    p = f"layers.{layer}"

    # Attention: norm inside the packed QKV product, add inside the output one.
    wqkv = _weights(b, ckpt, f"{p}.wq", f"{p}.wk", f"{p}.wv")
    qkv = b.linear(stream, wqkv, f"{p}.qkv", norm=_norm(b, ckpt, f"{p}.attn_norm"))
    cfg = ckpt.config
    attn = b.attention(qkv, layer, cfg.n_heads, cfg.n_kv_heads, _rope_tables(b, cfg))
    stream = b.linear(attn, _weights(b, ckpt, f"{p}.wo"), f"{p}.wo", residual=stream)

    # Feed-forward: norm inside the gate + up product (SwiGLU too), add in down's.
    wgu = _weights(b, ckpt, f"{p}.w_gate", f"{p}.w_up")
    act = b.swiglu(stream, wgu, f"{p}.gate_up", norm=_norm(b, ckpt, f"{p}.ffn_norm"))
    wdown = _weights(b, ckpt, f"{p}.w_down")
    return b.linear(act, wdown, f"{p}.w_down", residual=stream)


def _norm(b: GraphBuilder, ckpt: Checkpoint, name: str) -> tuple[str, float]:
    """An RMS norm's weight as an initializer, with the model's epsilon."""
    gamma = b.const(f"{name}.weight", ckpt.load(name).astype(np.float32))
    return gamma, ckpt.config.norm_eps


def _weights(b: GraphBuilder, ckpt: Checkpoint, *names: str) -> np.ndarray | Int4Blocks:
    """The named `(N, K)` weights stacked along N (packed QKV, gate + up).

    For int4, the source's own 4-bit blocks when it has them for every name, so
    they carry over exactly; otherwise float weights, quantized by `b.linear`.
    """
    if b.dtype == "int4":
        blocks = [ckpt.load_int4(name) for name in names]
        if all(block is not None for block in blocks):
            return concat_int4(blocks) if len(blocks) > 1 else blocks[0]
    weights = [ckpt.load(name) for name in names]
    return np.concatenate(weights, axis=0) if len(weights) > 1 else weights[0]


def _rope_tables(b: GraphBuilder, cfg: ModelConfig) -> tuple[str, str]:
    """cos/sin caches `(max_seq_len, head_dim / 2)`, shared by every layer."""
    if any(i.name == "rope.cos" for i in b.initializers):
        return "rope.cos", "rope.sin"
    half = cfg.head_dim // 2
    inv_freq = 1.0 / cfg.rope_theta ** (
        np.arange(half, dtype=np.float64) * 2 / cfg.head_dim
    )
    angles = np.outer(np.arange(cfg.max_seq_len, dtype=np.float64), inv_freq)
    b.const("rope.cos", np.cos(angles).astype(np.float32))
    b.const("rope.sin", np.sin(angles).astype(np.float32))
    return "rope.cos", "rope.sin"


def _lm_head(
    b: GraphBuilder,
    ckpt: Checkpoint,
    x: str,
    embed_q,
    block_size: int,
    norm: tuple[str, float] | None = None,
) -> None:
    """The output projection to `logits`; `norm` (quantized only): the final norm,
    done by the product."""
    tied = _tied(ckpt)
    if b.quantized and tied:
        b.linear_q(x, embed_q, "lm_head", prefix="embed", output="logits", norm=norm)
    elif b.dtype == "fp32" and tied:
        b.node(
            "Gemm", [x, "embed.weight"], outputs=["logits"], name="lm_head", transB=1
        )
    elif b.quantized:
        q = quantize_int8_blocks(ckpt.load("lm_head"), block_size)
        b.linear_q(x, q, "lm_head", output="logits", norm=norm)
    else:
        out = b.linear(x, ckpt.load("lm_head"), "lm_head")
        b.node("Identity", [out], outputs=["logits"], name="logits")
