"""A small helper for writing ONNX graphs node by node with the `onnx` helpers.

Graph builders (one per architecture family) call `GraphBuilder` methods that each
add one node or one initializer and return the output name, so a builder reads like
the model's forward pass. Linear layers choose their kernel by the export dtype:
`MatMul` for fp32, onnxruntime's `MatMulNBits` with 8-bit blocks for int8, and for
int4 a 4-bit `MatMulNBits` plus the block-minimum term (see `linear_int4`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeslm.export.quantize import (
    INT4_BLOCK_SIZE,
    BlockQuantized,
    Int4Blocks,
    quantize_int4_blocks,
    quantize_int8_blocks,
)

MS_DOMAIN = "com.microsoft"
OPSET = 21

# MatMulNBits compute type: 4 quantizes activations to int8 blocks and runs int8
# dot products. Level 1 (fp32 compute) is ~40x slower for 8-bit weights in
# onnxruntime 1.32, so int8 packages always use 4.
ACCURACY_LEVEL = 4
# Weights and activations share the block size: smaller blocks round activations
# more finely. The graph default; decoder exports choose theirs in export/__init__.
DEFAULT_BLOCK_SIZE = 16
# int4 computes in float32 (level 1): onnxruntime dequantizes 4-bit blocks on the
# fly at about the speed of the int8 kernel, and the activations stay exact. With
# level 4 (int8 activations in blocks of 32) SmolLM2's next-token agreement with
# fp32 fell from 99% to 92% on a chat transcript.
INT4_ACCURACY_LEVEL = 4
DTYPES = ("int8", "int4", "fp32")


class GraphBuilder:
    """Collects nodes, initializers, inputs and outputs of one ONNX graph."""

    def __init__(self, dtype: str, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        if block_size not in (16, 32, 64, 128):
            raise ValueError(f"block_size must be 16, 32, 64 or 128, got {block_size}")
        self.dtype = dtype
        self.block_size = block_size
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._count = 0
        self._shared: set[str] = set()

    @property
    def quantized(self) -> bool:
        """Whether weights are stored in blocks (int8 or int4) rather than fp32.

        Embedding tables and tied output projections are int8 in both cases.
        """
        return self.dtype != "fp32"

    # --- names, inputs, constants ------------------------------------------------

    def fresh(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}_{self._count}"

    def input(self, name: str, elem: int, shape: Sequence[int | str | None]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem, list(shape)))
        return name

    def output(self, name: str, elem: int, shape: Sequence[int | str | None]) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, elem, list(shape)))

    def const(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(
            numpy_helper.from_array(np.require(array, requirements="C"), name)
        )
        return name

    def shared_const(self, name: str, array: np.ndarray) -> str:
        """`const`, added once: later calls with the same name reuse it."""
        if name not in self._shared:
            self._shared.add(self.const(name, array))
        return name

    def node(
        self,
        op: str,
        inputs: Sequence[str],
        n_outputs: int = 1,
        *,
        name: str | None = None,
        outputs: Sequence[str] | None = None,
        domain: str = "",
        **attrs: object,
    ) -> list[str]:
        """Add one node; returns its output names."""
        base = name or self.fresh(op)
        outs = (
            list(outputs) if outputs else [f"{base}/out{i}" for i in range(n_outputs)]
        )
        self.nodes.append(
            helper.make_node(op, list(inputs), outs, name=base, domain=domain, **attrs)
        )
        return outs

    def op(self, op: str, *inputs: str, domain: str = "", **attrs: object) -> str:
        """Add a single-output node and return its output name."""
        return self.node(op, inputs, domain=domain, **attrs)[0]

    # --- layers --------------------------------------------------------------------

    def linear(self, x: str, weight: np.ndarray | Int4Blocks, name: str) -> str:
        """`x @ weight.T` for a `(N, K)` weight, with the kernel of the dtype.

        `weight` is float, or for int4 already in 4-bit blocks (a source's own).
        """
        if isinstance(weight, Int4Blocks):
            if self.dtype != "int4":
                weight = weight.dequantize()
            else:
                return self.linear_int4(x, weight, name)
        if self.dtype == "fp32":
            w = self.const(f"{name}.weight", weight.T.astype(np.float32))
            return self.op("MatMul", x, w, name=name)
        if self.dtype == "int4":
            return self.linear_int4(x, quantize_int4_blocks(weight), name)
        return self.linear_q(x, quantize_int8_blocks(weight, self.block_size), name)

    def linear_int4(self, x: str, w: Int4Blocks, name: str) -> str:
        """`x @ (scale * q + min).T` as two exact products.

        Each block gets the integer zero point `zp = round(-min / scale)` (clipped
        to 0..15), which leaves a residual minimum `r = min + zp * scale` of at most
        half a step. `MatMulNBits` (4 bits, those zero points) computes
        `x @ (scale * (q - zp)).T`, and the residual adds `block_sums(x) @ r.T`,
        where `block_sums` sums each block of 32 inputs: `(..., n_blocks)`, a
        matmul 1/32 the size of the weight. Centring q on its zero point keeps the
        two products small, so that int8 rounding of the activations (level 4) is
        not amplified by a large product that the minimum term then cancels.
        """
        n, n_blocks = w.scales.shape
        zp = np.clip(np.rint(-w.mins / w.scales), 0, 15)
        residual = (w.mins + zp * w.scales).astype(np.float32)

        # Zero points: two per byte along each row, even block in the low nibble.
        zp = zp.astype(np.uint8)
        if n_blocks % 2:
            zp = np.concatenate([zp, np.zeros((n, 1), np.uint8)], axis=1)
        packed_zp = (zp[:, 0::2] | (zp[:, 1::2] << 4)).reshape(-1)

        product = self.op(
            "MatMulNBits",
            x,
            self.const(f"{name}.qweight4", w.packed()),
            self.const(f"{name}.scales", w.scales.reshape(-1)),
            self.const(f"{name}.zero_points", packed_zp),
            domain=MS_DOMAIN,
            name=name,
            K=w.k,
            N=n,
            bits=4,
            block_size=INT4_BLOCK_SIZE,
            accuracy_level=INT4_ACCURACY_LEVEL,
        )

        # (1, T, K) -> (1, T, n_blocks, 32) -> sums (1, T, n_blocks) -> (1, T, N)
        shape = np.array([0, 0, n_blocks, INT4_BLOCK_SIZE], dtype=np.int64)
        shape_name = self.shared_const(f"int4.block_shape.{n_blocks}", shape)
        blocks = self.op("Reshape", x, shape_name)
        axes = self.shared_const("int4.block_axis", np.array([-1], dtype=np.int64))
        sums = self.op("ReduceSum", blocks, axes, keepdims=0)
        rest = self.const(f"{name}.residual_mins", np.ascontiguousarray(residual.T))
        return self.op("Add", product, self.op("MatMul", sums, rest))

    def linear_q(self, x: str, q: BlockQuantized, name: str, prefix: str = "") -> str:
        """MatMulNBits over quantized weights (`prefix`: reuse stored ones)."""
        n = q.data.shape[0]
        stem = prefix or name
        data = f"{stem}.qweight"
        scales = f"{stem}.scales"
        if not prefix:
            self.const(data, q.data)
            self.const(scales, q.scales)
        return self.op(
            "MatMulNBits",
            x,
            data,
            scales,
            domain=MS_DOMAIN,
            name=name,
            K=q.k,
            N=n,
            bits=8,
            block_size=q.block_size,
            accuracy_level=ACCURACY_LEVEL,
        )

    def model(self, name: str) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, name, self.inputs, self.outputs, self.initializers
        )
        opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="edgeslm")
        model.ir_version = 10
        return model


INT64 = TensorProto.INT64
INT32 = TensorProto.INT32
FLOAT = TensorProto.FLOAT
