"""Weight quantization for export: block-wise int8, stored as `MatMulNBits` wants it.

A weight `(N, K)` is split along K into blocks of `block_size` values; each block keeps
one float32 scale (`max|w| / 127`) and its values as `round(w / scale) + 128` in uint8
(zero point 128, symmetric). This is the layout of llama.cpp's Q8_0 and of
onnxruntime's 8-bit `MatMulNBits`, so the same bytes serve the embedding gather and a
tied output projection.

4-bit blocks (`Int4Blocks`) follow GGUF's Q4_1: 32 values, a float scale and a float
minimum per block, so a Q4_1 (or Q4_0) tensor of a GGUF file carries over exactly.

Not yet: activation-aware scaling.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

INT8_ZERO_POINT = 128


@dataclass(frozen=True)
class BlockQuantized:
    """A weight quantized in blocks along its input dimension.

    Attributes:
        data: `(N, n_blocks, block_size)` uint8, value + 128.
        scales: `(N, n_blocks)` float32.
        k: the unpadded input dimension.
    """

    data: np.ndarray
    scales: np.ndarray
    k: int

    @property
    def block_size(self) -> int:
        return int(self.data.shape[2])

    def dequantize(self) -> np.ndarray:
        """Back to float32 `(N, K)`, for fidelity checks."""
        values = self.data.astype(np.float32) - INT8_ZERO_POINT
        full = values * self.scales[:, :, None]
        return full.reshape(self.data.shape[0], -1)[:, : self.k]


def quantize_int8_blocks(weight: np.ndarray, block_size: int = 32) -> BlockQuantized:
    """Quantize `(N, K)` float weights to symmetric int8 blocks of `block_size`.

    K is zero-padded to a multiple of `block_size`; padded values quantize to 0.
    """
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D (N, K), got shape {weight.shape}")
    n, k = weight.shape
    n_blocks = -(-k // block_size)
    padded = np.zeros((n, n_blocks * block_size), dtype=np.float32)
    padded[:, :k] = weight
    blocks = padded.reshape(n, n_blocks, block_size)

    # One scale per block; an all-zero block keeps scale 1 so nothing divides by 0.
    scales = np.abs(blocks).max(axis=2) / 127.0
    scales[scales == 0] = 1.0
    q = np.rint(blocks / scales[:, :, None]).clip(-127, 127)
    data = (q + INT8_ZERO_POINT).astype(np.uint8)
    return BlockQuantized(data=data, scales=scales.astype(np.float32), k=k)


# --- 4-bit blocks -----------------------------------------------------------------

# GGUF's Q4_0 and Q4_1 blocks hold 32 values; int4 packages use the same length so
# that such blocks carry over unchanged.
INT4_BLOCK_SIZE = 32


@dataclass(frozen=True)
class Int4Blocks:
    """A weight in 4-bit blocks along its input dimension: `w = scale * q + min`.

    This is GGUF's Q4_1 (Q4_0 is the case `min = -8 * scale`). In the graph the
    `scale * q` part runs as a 4-bit `MatMulNBits` with zero points 0, and the
    `min` part as a small matmul of the input's block sums (see onnx_graph.py).

    Attributes:
        q: `(N, n_blocks, 32)` uint8, values 0..15.
        scales: `(N, n_blocks)` float32.
        mins: `(N, n_blocks)` float32.
        k: the unpadded input dimension.
    """

    q: np.ndarray
    scales: np.ndarray
    mins: np.ndarray
    k: int

    @property
    def n_blocks(self) -> int:
        return int(self.q.shape[1])

    def packed(self) -> np.ndarray:
        """`(N, n_blocks, 16)` uint8: element 2i in the low nibble, 2i+1 high."""
        pairs = self.q.reshape(self.q.shape[0], self.n_blocks, -1, 2)
        return (pairs[..., 0] | (pairs[..., 1] << 4)).astype(np.uint8)

    def dequantize(self) -> np.ndarray:
        """Back to float32 `(N, K)`, for fidelity checks."""
        full = self.q * self.scales[:, :, None] + self.mins[:, :, None]
        return full.reshape(self.q.shape[0], -1)[:, : self.k].astype(np.float32)


def quantize_int4_blocks(weight: np.ndarray) -> Int4Blocks:
    """Quantize `(N, K)` float weights to 4-bit min/max blocks of 32 (as Q4_1).

    Each block keeps its minimum and `(max - min) / 15`; K must be a multiple of 32.
    """
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D (N, K), got shape {weight.shape}")
    n, k = weight.shape
    if k % INT4_BLOCK_SIZE:
        # TODO: pad K for 4-bit blocks; every supported model has K % 32 == 0.
        raise NotImplementedError(f"int4 needs K % 32 == 0, got K = {k}")
    blocks = weight.astype(np.float32).reshape(n, -1, INT4_BLOCK_SIZE)
    mins = blocks.min(axis=2)
    scales = (blocks.max(axis=2) - mins) / 15.0
    scales[scales == 0] = 1.0  # a constant block: q = 0 gives the minimum exactly
    q = np.rint((blocks - mins[:, :, None]) / scales[:, :, None]).clip(0, 15)
    return Int4Blocks(
        q=q.astype(np.uint8),
        scales=scales.astype(np.float32),
        mins=mins.astype(np.float32),
        k=k,
    )


def concat_int4(parts: list[Int4Blocks]) -> Int4Blocks:
    """Stack several weights with the same K along N (packed QKV, gate + up)."""
    if len({p.k for p in parts}) != 1:
        raise ValueError(f"cannot stack int4 weights of K {[p.k for p in parts]}")
    return Int4Blocks(
        q=np.concatenate([p.q for p in parts]),
        scales=np.concatenate([p.scales for p in parts]),
        mins=np.concatenate([p.mins for p in parts]),
        k=parts[0].k,
    )
