"""Weight quantization for export: block-wise int8, stored as `MatMulNBits` wants it.

A weight `(N, K)` is split along K into blocks of `block_size` values; each block keeps
one float32 scale (`max|w| / 127`) and its values as `round(w / scale) + 128` in uint8
(zero point 128, symmetric). This is the layout of llama.cpp's Q8_0 and of
onnxruntime's 8-bit `MatMulNBits`, so the same bytes serve the embedding gather and a
tied output projection.

Not yet: 4-bit blocks (GGUF Q4_1 carried over exactly) and activation-aware scaling.
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
