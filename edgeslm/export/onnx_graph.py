"""A small helper for writing ONNX graphs node by node with the `onnx` helpers.

Graph builders (one per architecture family) call `GraphBuilder` methods that each
add one node or one initializer and return the output name, so a builder reads like
the model's forward pass. Linear layers choose their kernel by the export dtype:
`MatMul` for fp32, onnxruntime's `MatMulNBits` (8-bit blocks) for int8.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeslm.export.quantize import BlockQuantized, quantize_int8_blocks

MS_DOMAIN = "com.microsoft"
OPSET = 21

# MatMulNBits compute type: 4 quantizes activations to int8 blocks and runs int8
# dot products. Level 1 (fp32 compute) is ~40x slower for 8-bit weights in
# onnxruntime 1.32, so int8 packages always use 4.
ACCURACY_LEVEL = 4
# Weights and activations share the block size. 16 keeps next-token agreement with
# fp32 at ~98.7% on SmolLM2 (32: ~96.7%) for 25% more scale bytes than 32.
DEFAULT_BLOCK_SIZE = 16


class GraphBuilder:
    """Collects nodes, initializers, inputs and outputs of one ONNX graph."""

    def __init__(self, dtype: str, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        if dtype not in ("int8", "fp32"):
            raise ValueError(f"dtype must be 'int8' or 'fp32', got {dtype!r}")
        if block_size not in (16, 32, 64, 128):
            raise ValueError(f"block_size must be 16, 32, 64 or 128, got {block_size}")
        self.dtype = dtype
        self.block_size = block_size
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._count = 0

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

    def linear(self, x: str, weight: np.ndarray, name: str) -> str:
        """`x @ weight.T` for a `(N, K)` weight: MatMul (fp32), MatMulNBits (int8)."""
        if self.dtype == "fp32":
            w = self.const(f"{name}.weight", weight.T.astype(np.float32))
            return self.op("MatMul", x, w, name=name)
        return self.linear_q(x, quantize_int8_blocks(weight, self.block_size), name)

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
