"""The GPT-2 family (DialoGPT): Hugging Face names in, an ONNX decoder graph out.

GPT-2 differs from Llama in four ways this module handles: learned absolute position
embeddings (a table added to the token embeddings), LayerNorm with a bias instead of
RMS norm, GELU, and `Conv1D` layers whose weights are stored `(in, out)`, the
transpose of `nn.Linear`, with the query, key and value projections fused into one.

Canonical tensor names (all float32, weights `(out, in)`):

    embed                        (vocab_size, hidden_size), also the tied output
    pos_embed                    (max_seq_len, hidden_size)
    layers.{i}.attn_norm[_bias]  (hidden_size,)
    layers.{i}.wqkv              (3 * hidden_size, hidden_size), rows q, k, v
    layers.{i}.wqkv_bias         (3 * hidden_size,)
    layers.{i}.wo[_bias]         (hidden_size, hidden_size)
    layers.{i}.ffn_norm[_bias]   (hidden_size,)
    layers.{i}.w_up[_bias]       (intermediate_size, hidden_size)
    layers.{i}.w_down[_bias]     (hidden_size, intermediate_size)
    norm[_bias]                  (hidden_size,)

The graph keeps edgeslm's decoder contract (see `llama.py`): the same inputs, the
last position's logits, and the cached attention bound to the runtime's cache, here
without rotary embedding and with as many key/value heads as query heads. Positions
are computed inside the graph from `total_sequence_length`, so the runtime feeds GPT-2
exactly as it feeds Llama. Learned positions cannot be re-rotated, so a full context
is recomputed over the kept tokens (`context_shift = "reprefill"` in the manifest).

Not yet: GPT-2 from GGUF files, and the variants with per-layer attention scaling
(`scale_attn_by_inverse_layer_idx`, `reorder_and_upcast_attn`), which are refused.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgeslm.config import ModelConfig
from edgeslm.errors import ModelFormatError
from edgeslm.export.checkpoint import Checkpoint
from edgeslm.export.llama import _declare_io, _embedding, _lm_head
from edgeslm.export.onnx_graph import INT64, MS_DOMAIN, GraphBuilder

Progress = Callable[[int, int, str], None]

# GELU flavours: the tanh approximation (GPT-2's "gelu_new") or the exact erf form.
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
_ERF_GELU = ("gelu",)

# Hugging Face GPT-2 per-layer names -> (canonical suffix, stored as Conv1D (in, out)).
_HF_LAYER_NAMES = {
    "ln_1.weight": ("attn_norm", False),
    "ln_1.bias": ("attn_norm_bias", False),
    "attn.c_attn.weight": ("wqkv", True),
    "attn.c_attn.bias": ("wqkv_bias", False),
    "attn.c_proj.weight": ("wo", True),
    "attn.c_proj.bias": ("wo_bias", False),
    "ln_2.weight": ("ffn_norm", False),
    "ln_2.bias": ("ffn_norm_bias", False),
    "mlp.c_fc.weight": ("w_up", True),
    "mlp.c_fc.bias": ("w_up_bias", False),
    "mlp.c_proj.weight": ("w_down", True),
    "mlp.c_proj.bias": ("w_down_bias", False),
}
_HF_GLOBAL_NAMES = {
    "wte.weight": "embed",
    "wpe.weight": "pos_embed",
    "ln_f.weight": "norm",
    "ln_f.bias": "norm_bias",
}


# --- reading Hugging Face checkpoints ---------------------------------------------


def gpt2_config_from_hf(cfg: dict[str, Any], where: Path) -> ModelConfig:
    """Translate a GPT-2 `config.json` into a `ModelConfig`.

    Raises:
        ModelFormatError: a required key is missing or a variant is unsupported.
    """

    def need(key: str) -> int:
        if key not in cfg:
            raise ModelFormatError(f"{where}: missing required key {key!r}")
        return int(cfg[key])

    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if cfg.get(flag):
            # TODO: per-layer attention scaling; no supported GPT-2 model uses it.
            raise ModelFormatError(f"{where}: {flag}=true is not supported yet")
    if cfg.get("scale_attn_weights") is False:
        raise ModelFormatError(f"{where}: scale_attn_weights=false is not supported")
    act = cfg.get("activation_function", "gelu_new")
    if act not in (*_TANH_GELU, *_ERF_GELU):
        raise ModelFormatError(
            f"{where}: activation_function {act!r} is not supported; supported: "
            f"{', '.join((*_TANH_GELU, *_ERF_GELU))}"
        )
    hidden = need("n_embd")
    n_heads = need("n_head")
    if hidden % n_heads:
        raise ModelFormatError(
            f"{where}: n_embd ({hidden}) must be a multiple of n_head ({n_heads})"
        )
    return ModelConfig(
        architecture="gpt2",
        vocab_size=need("vocab_size"),
        hidden_size=hidden,
        n_layers=need("n_layer"),
        n_heads=n_heads,
        n_kv_heads=n_heads,
        head_dim=hidden // n_heads,
        intermediate_size=int(cfg.get("n_inner") or 4 * hidden),
        max_seq_len=need("n_positions"),
        norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        position_embedding="learned",
        hidden_act=act,
    )


def gpt2_canonical_name(key: str, config: ModelConfig) -> tuple[str, bool] | None:
    """(canonical name, transpose?) of a Hugging Face GPT-2 tensor, or None to skip.

    Accepts keys with or without the `transformer.` prefix (old `.bin` files have
    none). A tied `lm_head.weight` is skipped: the output reuses the embedding.
    """
    if key == "lm_head.weight":
        return None if config.tie_word_embeddings else ("lm_head", False)
    key = key.removeprefix("transformer.")
    if key in _HF_GLOBAL_NAMES:
        return _HF_GLOBAL_NAMES[key], False
    parts = key.split(".", 2)
    if len(parts) == 3 and parts[0] == "h" and parts[1].isdigit():
        found = _HF_LAYER_NAMES.get(parts[2])
        if found is not None:
            return f"layers.{int(parts[1])}.{found[0]}", found[1]
    return None  # attn.bias / attn.masked_bias are causal-mask buffers, not weights


# --- the graph ---------------------------------------------------------------------


def build_gpt2(
    ckpt: Checkpoint,
    dtype: str,
    progress: Progress | None = None,
    *,
    block_size: int,
    head_block_size: int | None = None,
):
    """Write the decoder graph of a GPT-2-family checkpoint.

    Args:
        ckpt: an opened `Checkpoint` with GPT-2 canonical names.
        dtype: "int8" (block-wise int8 weights) or "fp32".
        progress: called as `progress(done, total, what)` after each block.
        block_size: int8 block length along the input dimension.
        head_block_size: block length of the embedding table and the tied output
            projection (default: `block_size`).

    Returns:
        The `onnx.ModelProto`.
    """
    cfg = ckpt.config
    b = GraphBuilder(dtype, block_size)
    _declare_io(b, cfg)
    head_block = head_block_size or block_size
    tokens, embed_q = _embedding(b, ckpt, head_block)
    x = b.op("Add", tokens, _positions(b, ckpt))

    # Each block returns its output before the bias of its last projection and
    # the residual add; the next LayerNorm fuses both (SkipLayerNormalization).
    residual = bias = None
    for layer in range(cfg.n_layers):
        x, bias, residual = _block(b, ckpt, layer, x, bias, residual)
        if progress:
            progress(layer + 1, cfg.n_layers, f"layer {layer + 1}/{cfg.n_layers}")

    # Last position only: gather it before the final norm and the output projection.
    last_idx = b.const("last_index", np.array(-1, np.int64))
    last_x = b.op("Gather", x, last_idx, axis=1)
    last_residual = b.op("Gather", residual, last_idx, axis=1)
    last = b.op("Add", b.op("Add", last_x, bias), last_residual)
    normed = _layer_norm(b, ckpt, last, "norm")
    _lm_head(b, ckpt, normed, embed_q, head_block)
    return b.model("edgeslm-gpt2")


def _positions(b: GraphBuilder, ckpt: Checkpoint) -> str:
    """Position embeddings of the new tokens: rows past_len .. total - 1 of the table.

    past_len = total_sequence_length - n_new, so no extra graph input is needed.
    """
    table = b.const("pos_embed.weight", ckpt.load("pos_embed"))
    total = b.op("Cast", "total_sequence_length", to=INT64)
    n_new = b.op(
        "Gather",
        b.op("Shape", "input_ids"),
        b.const("ids_seq_axis", np.array(1, np.int64)),
        axis=0,
    )
    start = b.op("Sub", total, n_new)
    positions = b.op("Range", start, total, b.const("one", np.array(1, np.int64)))
    return b.op("Gather", table, positions, axis=0)  # (n_new, hidden_size)


def _layer_norm(b: GraphBuilder, ckpt: Checkpoint, x: str, name: str) -> str:
    gamma = b.const(f"{name}.weight", ckpt.load(name))
    beta = b.const(f"{name}.bias", ckpt.load(f"{name}_bias"))
    eps = ckpt.config.norm_eps
    return b.op("LayerNormalization", x, gamma, beta, axis=-1, epsilon=eps)


def _skip_layer_norm(
    b: GraphBuilder, ckpt: Checkpoint, x: str, bias: str, residual: str, name: str
) -> tuple[str, str]:
    """LayerNorm(x + bias + residual): returns (normed, the new residual)."""
    gamma = b.const(f"{name}.weight", ckpt.load(name))
    beta = b.const(f"{name}.bias", ckpt.load(f"{name}_bias"))
    outs = b.node(
        "SkipLayerNormalization",
        [x, residual, gamma, beta, bias],
        4,
        name=name,
        domain=MS_DOMAIN,
        epsilon=ckpt.config.norm_eps,
    )
    return outs[0], outs[3]


def _block(
    b: GraphBuilder,
    ckpt: Checkpoint,
    layer: int,
    x: str,
    bias: str | None,
    residual: str | None,
) -> tuple[str, str, str]:
    cfg = ckpt.config
    p = f"layers.{layer}"

    # Attention input: the first block normalizes the embeddings; later ones fuse
    # the previous block's output bias and residual add into the norm.
    if residual is None:
        residual = x
        h = _layer_norm(b, ckpt, x, f"{p}.attn_norm")
    else:
        h, residual = _skip_layer_norm(b, ckpt, x, bias, residual, f"{p}.attn_norm")

    # Fused QKV projection (the Conv1D already packs q, k, v), then attention over
    # the cache. Scores are scaled by 1/sqrt(head_dim) inside the op, as GPT-2 does.
    qkv = b.op(
        "Add",
        b.linear(h, ckpt.load(f"{p}.wqkv"), f"{p}.qkv"),
        b.const(f"{p}.qkv.bias", ckpt.load(f"{p}.wqkv_bias")),
    )
    attn = b.attention(qkv, layer, cfg.n_heads, cfg.n_kv_heads, None)
    o = b.linear(attn, ckpt.load(f"{p}.wo"), f"{p}.wo")
    o_bias = b.const(f"{p}.wo.bias", ckpt.load(f"{p}.wo_bias"))

    # Feed-forward: LayerNorm(o + bias + residual), up projection with GELU (bias
    # fused into the activation op), down projection.
    h, residual = _skip_layer_norm(b, ckpt, o, o_bias, residual, f"{p}.ffn_norm")
    up = b.linear(h, ckpt.load(f"{p}.w_up"), f"{p}.w_up")
    up_bias = b.const(f"{p}.w_up.bias", ckpt.load(f"{p}.w_up_bias"))
    gelu = "FastGelu" if cfg.hidden_act in _TANH_GELU else "BiasGelu"
    act = b.op(gelu, up, up_bias, domain=MS_DOMAIN, name=f"{p}.gelu")
    down = b.linear(act, ckpt.load(f"{p}.w_down"), f"{p}.w_down")
    down_bias = b.const(f"{p}.w_down.bias", ckpt.load(f"{p}.w_down_bias"))
    return down, down_bias, residual
