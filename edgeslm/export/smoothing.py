"""Activation smoothing for int8 export: move activation outliers into the weights.

With `accuracy_level=4`, onnxruntime's `MatMulNBits` quantizes each linear layer's
input to int8 in blocks along the input dimension, one scale per block. A few input
channels of a Llama block carry values tens of times larger than the rest (after the
RMS norms above all), so one outlier sets the scale of its whole block and the other
values in that block round to a handful of levels. That costs more fidelity than the
int8 weights do.

Smoothing (as in SmoothQuant) divides input channel `j` of a linear layer by `s_j`
and multiplies column `j` of its weight by `s_j`; the product is unchanged in exact
arithmetic. The division is folded into whatever writes the channel, so the graph
gains no node:

- attention and feed-forward inputs: into the RMS norm's weight (`attn_norm`,
  `ffn_norm`), which feeds only the QKV or the gate/up projection;
- the output projection's input: into the rows of `wv` (attention is linear in the
  values; a value head shared by several query heads shares its scales);
- the down projection's input: into the rows of `w_up` (`silu(gate) * up` is linear
  in `up`).

`s_j = max|x_j| ** alpha / max|w_j| ** (1 - alpha)`, with `max|x_j|` measured by a
float64-free numpy forward pass over a short built-in calibration text, and
`max|w_j|` over the weight's column.

Not done: the final norm before a tied output projection (the embedding table and
the head share their int8 bytes, so its columns cannot be rescaled for one of them).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np

from edgeslm.config import ModelConfig
from edgeslm.export.checkpoint import Checkpoint

log = logging.getLogger(__name__)

# Migration strength: 0 leaves activations alone, 1 moves all their range into the
# weights. 0.5 is SmoothQuant's default and measured best here (docs/BENCHMARKS.md).
DEFAULT_ALPHA = 0.5

# The four places a block's linear inputs come from, and the weights each one feeds.
SITES = ("qkv", "o", "gate_up", "down")

# Conversational text the calibration pass runs over (written for edgeslm; kept
# apart from the texts the tests measure fidelity on).
CALIBRATION_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant in a smart home."},
    {"role": "user", "content": "Good morning! What should I cook for dinner?"},
    {
        "role": "assistant",
        "content": "How about a vegetable risotto? Fry an onion in butter, add "
        "200 g of rice, then pour in hot stock one ladle at a time while "
        "stirring. After about 18 minutes, stir in peas, parmesan and pepper.",
    },
    {"role": "user", "content": "Dim the bedroom lights to 30% and close the blinds."},
    {
        "role": "assistant",
        "content": "The bedroom lights are at 30 percent and the blinds are "
        "closing. Anything else?",
    },
    {"role": "user", "content": "Why do leaves change colour in autumn?"},
    {
        "role": "assistant",
        "content": "In autumn trees stop making chlorophyll, the green pigment. "
        "As it breaks down, yellow and orange pigments that were there all "
        "along become visible, and some trees also make red anthocyanins.",
    },
    {"role": "user", "content": "List three prime numbers above 100, and 7 * 8?"},
    {"role": "assistant", "content": "101, 103 and 107. And 7 * 8 = 56."},
]


def activation_ranges(
    ckpt: Checkpoint, ids: Sequence[int]
) -> list[dict[str, np.ndarray]]:
    """Per-channel `max|x|` at the input of every linear layer, one dict per layer.

    Runs the float32 model over `ids` (one sequence, causal attention, no cache),
    one layer at a time, so memory stays near one layer's weights.

    Returns:
        For each layer, `{"qkv": (hidden,), "o": (n_heads * head_dim,),
        "gate_up": (hidden,), "down": (intermediate,)}` float32.
    """
    if len(ids) == 0:
        raise ValueError("calibration needs at least one token id, got none")
    cfg = ckpt.config
    x = ckpt.load("embed")[np.asarray(ids)]  # (T, hidden)
    cos, sin = _rope(cfg, len(ids))
    ranges = []
    for layer in range(cfg.n_layers):
        p = f"layers.{layer}"
        stats: dict[str, np.ndarray] = {}

        # Attention: (T, hidden) -> per-head q, k, v -> causal softmax -> (T, hidden)
        h = _rms(x, ckpt.load(f"{p}.attn_norm"), cfg.norm_eps)
        stats["qkv"] = np.abs(h).max(axis=0)
        attn = _attention(cfg, h, ckpt, p, cos, sin)
        stats["o"] = np.abs(attn).max(axis=0)
        x = x + attn @ ckpt.load(f"{p}.wo").T

        # Feed-forward: SwiGLU.
        h = _rms(x, ckpt.load(f"{p}.ffn_norm"), cfg.norm_eps)
        stats["gate_up"] = np.abs(h).max(axis=0)
        gate = h @ ckpt.load(f"{p}.w_gate").T
        act = gate / (1.0 + np.exp(-gate)) * (h @ ckpt.load(f"{p}.w_up").T)
        stats["down"] = np.abs(act).max(axis=0)
        x = x + act @ ckpt.load(f"{p}.w_down").T
        ranges.append({k: v.astype(np.float32) for k, v in stats.items()})
    return ranges


def smooth_checkpoint(
    ckpt: Checkpoint,
    ranges: list[dict[str, np.ndarray]],
    alpha: float = DEFAULT_ALPHA,
    sites: Sequence[str] = SITES,
) -> Checkpoint:
    """A checkpoint whose tensors are the smoothed ones; the fp32 function is kept.

    Args:
        ckpt: the source checkpoint.
        ranges: `activation_ranges(ckpt, ...)`.
        alpha: migration strength in [0, 1].
        sites: which of `SITES` to smooth.

    Returns:
        A `Checkpoint` with the same config whose `load` returns rescaled norms and
        weights for the smoothed sites (computed on demand, one tensor at a time).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    unknown = set(sites) - set(SITES)
    if unknown:
        raise ValueError(f"unknown smoothing sites {sorted(unknown)}; use {SITES}")
    if len(ranges) != ckpt.config.n_layers:
        raise ValueError(
            f"ranges cover {len(ranges)} layers, the model has {ckpt.config.n_layers}"
        )

    scales = [
        _layer_scales(ckpt, layer, r, alpha, sites) for layer, r in enumerate(ranges)
    ]
    original = ckpt.load
    cfg = ckpt.config

    def load(name: str) -> np.ndarray:
        tensor = original(name)
        parts = name.split(".")
        if parts[0] != "layers" or len(parts) != 3:
            return tensor
        s = scales[int(parts[1])]
        return _apply(cfg, parts[2], tensor, s)

    # Source 4-bit blocks hold the unsmoothed weights: int4 must requantize.
    return dataclasses.replace(ckpt, load=load, load_int4=lambda name: None)


def _layer_scales(
    ckpt: Checkpoint,
    layer: int,
    ranges: dict[str, np.ndarray],
    alpha: float,
    sites: Sequence[str],
) -> dict[str, np.ndarray]:
    """Smoothing factors `s` for one layer's sites: divide inputs, scale columns."""
    cfg = ckpt.config
    p = f"layers.{layer}"
    feeds = {
        "qkv": (f"{p}.wq", f"{p}.wk", f"{p}.wv"),
        "o": (f"{p}.wo",),
        "gate_up": (f"{p}.w_gate", f"{p}.w_up"),
        "down": (f"{p}.w_down",),
    }
    out = {}
    for site in sites:
        w_max = np.max([np.abs(ckpt.load(n)).max(axis=0) for n in feeds[site]], axis=0)
        x_max = ranges[site]
        if site == "o":
            # Query heads sharing a value head must share its scales: take the
            # maximum over each group, then repeat it for every query head.
            x_max = _kv_group_max(cfg, x_max)
            w_max = _kv_group_max(cfg, w_max)
        s = np.power(np.maximum(x_max, 1e-5), alpha) / np.power(
            np.maximum(w_max, 1e-5), 1.0 - alpha
        )
        if site == "o":
            s = _kv_group_max(cfg, s)  # already uniform per group: picks the shared one
        out[site] = np.clip(s, 1e-2, 1e2).astype(np.float32)
    return out


def _kv_group_max(cfg: ModelConfig, v: np.ndarray) -> np.ndarray:
    """`(n_heads * head_dim,)` -> max over the query heads of each value head,
    repeated."""
    group = cfg.n_heads // cfg.n_kv_heads
    per_kv = v.reshape(cfg.n_kv_heads, group, cfg.head_dim).max(axis=1)
    return np.repeat(per_kv[:, None, :], group, axis=1).reshape(-1)


def _apply(cfg: ModelConfig, kind: str, tensor: np.ndarray, s: dict) -> np.ndarray:
    """Rescale one tensor of a layer by its site's factors (if that site is on)."""
    if kind == "attn_norm" and "qkv" in s:
        return tensor / s["qkv"]
    if kind in ("wq", "wk", "wv") and "qkv" in s:
        tensor = tensor * s["qkv"][None, :]
    if kind == "wv" and "o" in s:
        # Value rows (n_kv_heads * head_dim) take the per-value-head factors.
        group = cfg.n_heads // cfg.n_kv_heads
        per_kv = s["o"].reshape(cfg.n_kv_heads, group, cfg.head_dim)[:, 0, :]
        return tensor / per_kv.reshape(-1)[:, None]
    if kind == "wo" and "o" in s:
        return tensor * s["o"][None, :]
    if kind == "ffn_norm" and "gate_up" in s:
        return tensor / s["gate_up"]
    if kind in ("w_gate", "w_up") and "gate_up" in s:
        tensor = tensor * s["gate_up"][None, :]
    if kind == "w_up" and "down" in s:
        return tensor / s["down"][:, None]
    if kind == "w_down" and "down" in s:
        return tensor * s["down"][None, :]
    return tensor


# --- the float32 reference forward pass used for calibration -----------------------


def _rms(x: np.ndarray, gamma: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * gamma


def _rope(cfg: ModelConfig, n: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin `(T, head_dim)` in Hugging Face's rotate-half layout."""
    half = cfg.head_dim // 2
    inv_freq = 1.0 / cfg.rope_theta ** (np.arange(half) * 2 / cfg.head_dim)
    angles = np.outer(np.arange(n), inv_freq)
    angles = np.concatenate([angles, angles], axis=1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def _rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """RoPE on `(heads, T, head_dim)`."""
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def _attention(
    cfg: ModelConfig,
    h: np.ndarray,
    ckpt: Checkpoint,
    p: str,
    cos: np.ndarray,
    sin: np.ndarray,
) -> np.ndarray:
    """Causal grouped-query attention over `(T, hidden)` -> `(T, n_heads * hd)`."""
    n, hd = h.shape[0], cfg.head_dim

    def heads(w: str, count: int) -> np.ndarray:  # (count, T, head_dim)
        return (h @ ckpt.load(w).T).reshape(n, count, hd).transpose(1, 0, 2)

    q = _rotate(heads(f"{p}.wq", cfg.n_heads), cos, sin)
    k = _rotate(heads(f"{p}.wk", cfg.n_kv_heads), cos, sin)
    v = heads(f"{p}.wv", cfg.n_kv_heads)
    group = cfg.n_heads // cfg.n_kv_heads
    k = np.repeat(k, group, axis=0)
    v = np.repeat(v, group, axis=0)

    scores = q @ k.transpose(0, 2, 1) / np.sqrt(hd)  # (n_heads, T, T)
    scores += np.triu(np.full((n, n), -np.inf, dtype=np.float32), 1)
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs = scores / scores.sum(axis=-1, keepdims=True)
    return (probs @ v).transpose(1, 0, 2).reshape(n, cfg.n_heads * hd)
