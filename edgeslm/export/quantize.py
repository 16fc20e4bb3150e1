"""Weight quantization for export: block-wise int8 and 4-bit blocks.

int8: a weight `(N, K)` is split along K into blocks of `block_size` values; each
block keeps one scale (`max|w| / 127`, stored as float16) and its values as
`round(w / scale) + 128` in uint8 (zero point 128, symmetric), as llama.cpp's Q8_0
does. `pack_q8` lays the blocks out for edgeslm's `MatMulQ8` operator: rows
interleaved in groups of 16, four inputs at a time (kernels/qmatmul.c), so the
kernel reads 16 rows' inputs with one load. The same bytes serve the embedding
gather and a tied output projection.

4-bit blocks (`Int4Blocks`) follow GGUF's Q4_1: 32 values, a float scale and a float
minimum per block, so a Q4_1 (or Q4_0) tensor of a GGUF file carries over exactly.

`reference_matmul_q8` is the numpy statement of what `MatMulQ8` computes, which the
kernel is tested against.
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
        scales: `(N, n_blocks)` float16.
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
        full = values * self.scales.astype(np.float32)[:, :, None]
        return full.reshape(self.data.shape[0], -1)[:, : self.k]


def quantize_int8_blocks(weight: np.ndarray, block_size: int = 32) -> BlockQuantized:
    """Quantize `(N, K)` float weights to symmetric int8 blocks of `block_size`.

    K is zero-padded to a multiple of `block_size`; padded values quantize to 0.
    Each block's scale is rounded to float16 first and the values are rounded
    against that stored scale, so dequantizing uses exactly what was rounded to.

    Raises:
        ValueError: not 2-D, or a block too large for a float16 scale.
    """
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D (N, K), got shape {weight.shape}")
    n, k = weight.shape
    n_blocks = -(-k // block_size)
    padded = np.zeros((n, n_blocks * block_size), dtype=np.float32)
    padded[:, :k] = weight
    blocks = padded.reshape(n, n_blocks, block_size)

    # One scale per block; an all-zero block keeps scale 1 so nothing divides by 0.
    amax = np.abs(blocks).max(axis=2)
    if not np.isfinite(amax).all() or amax.max(initial=0) / 127 > HALF_MAX:
        raise ValueError(
            f"weights up to {amax.max():g} cannot be int8 blocks with float16 scales "
            f"(at most {HALF_MAX * 127:g}); the checkpoint is probably corrupt"
        )
    scales = (amax / 127.0).astype(np.float16)
    scales[scales == 0] = 1.0
    q = np.rint(blocks / scales.astype(np.float32)[:, :, None]).clip(-127, 127)
    data = (q + INT8_ZERO_POINT).astype(np.uint8)
    return BlockQuantized(data=data, scales=scales, k=k)


# --- the MatMulQ8 layout -------------------------------------------------------------

# Rows per interleaved group, and the activation chunk of the kernel
# (kernels/qmatmul.h: ESL_QMM_GROUP, ESL_QMM_CHUNK).
Q8_GROUP = 16
Q8_CHUNK = 32
HALF_MAX = 65504.0
# GGUF's Q4_0 and Q4_1 blocks hold 32 values; int4 packages use the same length so
# that such blocks carry over unchanged.
INT4_BLOCK_SIZE = 32


@dataclass(frozen=True)
class PackedQ8:
    """int8 blocks in `MatMulQ8`'s layout (rows past `n` are zero).

    Attributes:
        data: `(n_groups, kp / 4, 16, 4)` uint8: row 16g + r, inputs 4j..4j+3.
        scales: `(n_groups, n_blocks, 16)` float16.
        n: the real number of rows.
        k: the unpadded input dimension.
        block_size: the weight block length.
    """

    data: np.ndarray
    scales: np.ndarray
    n: int
    k: int
    block_size: int

    @property
    def kp(self) -> int:
        return int(self.data.shape[1] * 4)


def pack_q8(q: BlockQuantized) -> PackedQ8:
    """Interleave block-quantized rows in groups of 16 for `MatMulQ8`."""
    n, n_blocks, block = q.data.shape
    kp = n_blocks * block
    groups = -(-n // Q8_GROUP)
    rows = np.full((groups * Q8_GROUP, kp), INT8_ZERO_POINT, dtype=np.uint8)
    rows[:n] = q.data.reshape(n, kp)
    scales = np.zeros((groups * Q8_GROUP, n_blocks), dtype=np.float16)
    scales[:n] = q.scales
    data = rows.reshape(groups, Q8_GROUP, kp // 4, 4).transpose(0, 2, 1, 3)
    return PackedQ8(
        data=np.ascontiguousarray(data),
        scales=np.ascontiguousarray(
            scales.reshape(groups, Q8_GROUP, n_blocks).transpose(0, 2, 1)
        ),
        n=n,
        k=q.k,
        block_size=block,
    )


def unpack_q8(p: PackedQ8) -> BlockQuantized:
    """The row-major blocks of a packed weight (`pack_q8` undone)."""
    groups = p.data.shape[0]
    rows = p.data.transpose(0, 2, 1, 3).reshape(groups * Q8_GROUP, p.kp)[: p.n]
    scales = p.scales.transpose(0, 2, 1).reshape(groups * Q8_GROUP, -1)[: p.n]
    return BlockQuantized(
        data=np.ascontiguousarray(rows.reshape(p.n, -1, p.block_size)),
        scales=np.ascontiguousarray(scales),
        k=p.k,
    )


@dataclass(frozen=True)
class PackedQ4:
    """4-bit blocks of 32 in `MatMulQ4`'s layout (kernels/qmatmul4.c; rows past `n`
    are zero).

    Attributes:
        data: `(n_groups, kp / 32, 4, 16, 4)` uint8: for block c, unit v and row
            16g + r, input t: low nibble q[32c + 4v + t], high q[32c + 4(v + 4) + t].
        scales, mins: `(n_groups, kp / 32, 16)` float16; w = scale * q + min.
        n: the real number of rows.
        k: the unpadded input dimension.
    """

    data: np.ndarray
    scales: np.ndarray
    mins: np.ndarray
    n: int
    k: int

    @property
    def kp(self) -> int:
        return int(self.data.shape[1] * INT4_BLOCK_SIZE)


def pack_q4(w: Int4Blocks) -> PackedQ4:
    """Interleave 4-bit blocks in groups of 16 rows for `MatMulQ4`.

    Raises:
        ValueError: a scale or minimum is not a float16 value (GGUF's always are;
            `quantize_int4_blocks` makes them so).
    """
    n, n_blocks, _ = w.q.shape
    groups = -(-n // Q8_GROUP)
    scales, mins = w.scales.astype(np.float16), w.mins.astype(np.float16)
    if not (
        np.array_equal(scales.astype(np.float32), w.scales)
        and np.array_equal(mins.astype(np.float32), w.mins)
    ):
        raise ValueError("4-bit block scales and minimums must be float16 values")
    q = np.zeros((groups * Q8_GROUP, n_blocks, INT4_BLOCK_SIZE), dtype=np.uint8)
    q[:n] = w.q
    units = q.reshape(groups, Q8_GROUP, n_blocks, 8, 4)  # (g, r, c, unit, t)
    pairs = units[:, :, :, :4] | (units[:, :, :, 4:] << 4)  # units v and v + 4
    data = pairs.transpose(0, 2, 3, 1, 4)  # (g, c, v, r, t)

    def per_group(values: np.ndarray) -> np.ndarray:
        full = np.zeros((groups * Q8_GROUP, n_blocks), dtype=np.float16)
        full[:n] = values
        return np.ascontiguousarray(
            full.reshape(groups, Q8_GROUP, n_blocks).transpose(0, 2, 1)
        )

    return PackedQ4(
        data=np.ascontiguousarray(data),
        scales=per_group(scales),
        mins=per_group(mins),
        n=n,
        k=w.k,
    )


def _quantized_rows(x: np.ndarray, kp: int) -> tuple[np.ndarray, np.ndarray]:
    """The kernel's activations: int8 chunks of 32 `(M, kp / 32, 32)` and their
    float32 scales `(M, kp / 32)`."""
    m = x.shape[0]
    padded = np.zeros((m, kp), dtype=np.float32)
    padded[:, : x.shape[1]] = x
    chunks = padded.reshape(m, -1, Q8_CHUNK)
    sx = (np.abs(chunks).max(axis=2) / np.float32(127)).astype(np.float32)
    inv = np.divide(np.float32(1), sx, out=np.zeros_like(sx), where=sx != 0)
    qx = np.clip(np.rint(chunks * inv[:, :, None]), -127, 127).astype(np.int64)
    return qx, sx


def unpack_q4(p: PackedQ4) -> Int4Blocks:
    """The row-major 4-bit blocks of a packed weight (`pack_q4` undone)."""
    groups, n_blocks = p.data.shape[:2]
    pairs = p.data.transpose(0, 3, 1, 2, 4)  # (g, r, c, v, t)
    units = np.concatenate([pairs & 15, pairs >> 4], axis=3)  # (g, r, c, unit, t)
    q = units.reshape(groups * Q8_GROUP, n_blocks, INT4_BLOCK_SIZE)[: p.n]

    def rows(values: np.ndarray) -> np.ndarray:
        flat = values.transpose(0, 2, 1).reshape(-1, n_blocks)[: p.n]
        return np.ascontiguousarray(flat.astype(np.float32))

    return Int4Blocks(
        q=np.ascontiguousarray(q), scales=rows(p.scales), mins=rows(p.mins), k=p.k
    )


def reference_matmul_q4(x: np.ndarray, p: PackedQ4) -> np.ndarray:
    """What `MatMulQ4` computes for `x` `(M, K)`, in numpy (sums in float64): with q
    centred on 8, per block `sx * scale * dot(q - 8, qx) + (min + 8 scale) * sum(x)`,
    the second term from the activations themselves."""
    qx, sx = _quantized_rows(x, p.kp)
    blocks = unpack_q4(p)
    centred = blocks.q.astype(np.int64) - 8
    dots = np.einsum("mcj,ncj->mnc", qx, centred).astype(np.float64)
    padded = np.zeros((x.shape[0], p.kp), dtype=np.float32)
    padded[:, : x.shape[1]] = x
    xsum = (
        padded.reshape(x.shape[0], -1, INT4_BLOCK_SIZE).sum(axis=2).astype(np.float64)
    )
    scale = (blocks.scales[None] * sx[:, None, :]).astype(np.float64)
    offset = (blocks.mins + 8 * blocks.scales).astype(np.float64)
    return (dots * scale + offset[None] * xsum[:, None, :]).sum(axis=2)


def reference_matmul_q8(x: np.ndarray, p: PackedQ8) -> np.ndarray:
    """What `MatMulQ8` computes for `x` `(M, K)`, in numpy (sums in float64).

    Activations are quantized per row in chunks of 32: scale `max|x| / 127` (float32),
    values `rint(x / scale)`; each chunk's exact integer dot product with the weight
    rows is scaled by the two scales and summed.
    """
    qx, sx = _quantized_rows(x, p.kp)
    blocks = unpack_q8(p)
    qw = blocks.data.astype(np.int64).reshape(p.n, -1, Q8_CHUNK) - INT8_ZERO_POINT
    dots = np.einsum("mcj,ncj->mnc", qx, qw).astype(np.float64)
    per_chunk = p.block_size // Q8_CHUNK
    sw = np.repeat(blocks.scales.astype(np.float32), per_chunk, axis=1)
    scale = (sx[:, None, :] * sw[None, :, :]).astype(np.float64)
    return (dots * scale).sum(axis=2)


# --- 4-bit blocks -----------------------------------------------------------------


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

    Each block keeps its minimum and `(max - min) / 15`, both rounded to float16 (as
    GGUF stores them), and the values are rounded against those; K must be a
    multiple of 32.
    """
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D (N, K), got shape {weight.shape}")
    n, k = weight.shape
    if k % INT4_BLOCK_SIZE:
        # TODO: pad K for 4-bit blocks; every supported model has K % 32 == 0.
        raise NotImplementedError(f"int4 needs K % 32 == 0, got K = {k}")
    blocks = weight.astype(np.float32).reshape(n, -1, INT4_BLOCK_SIZE)
    mins = blocks.min(axis=2).astype(np.float16).astype(np.float32)
    scales = ((blocks.max(axis=2) - mins) / 15.0).astype(np.float16).astype(np.float32)
    scales[scales == 0] = 1.0  # a constant block: q = 0 gives the minimum exactly
    q = np.rint((blocks - mins[:, :, None]) / scales[:, :, None]).clip(0, 15)
    return Int4Blocks(q=q.astype(np.uint8), scales=scales, mins=mins, k=k)


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
