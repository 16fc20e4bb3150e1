"""A small helper for writing ONNX graphs node by node with the `onnx` helpers.

Graph builders (one per architecture family) call `GraphBuilder` methods that each
add one node or one initializer and return the output name, so a builder reads like
the model's forward pass. Linear layers choose their kernel by the export dtype:
`MatMul` for fp32, edgeslm's own `ai.edgeslm::MatMulQ8` (kernels/ort_op.c) over int8
blocks for int8, and for int4 onnxruntime's 4-bit `MatMulNBits` plus the block-minimum
term (see `linear_int4`).

`portable_model` turns a graph with `MatMulQ8` nodes into one that a stock
onnxruntime runs (`MatMulNBits`, its packed weights unpacked by ops onnxruntime folds
at load): the package's fallback when the C kernel is not built.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeslm.export.quantize import (
    INT8_ZERO_POINT,
    Q8_GROUP,
    BlockQuantized,
    Int4Blocks,
    PackedQ8,
    pack_q4,
    pack_q8,
    quantize_int4_blocks,
    quantize_int8_blocks,
)

MS_DOMAIN = "com.microsoft"
EDGESLM_DOMAIN = "ai.edgeslm"  # kernels/ort_op.c
OPSET = 21

# MatMulNBits compute type of the portable graph: 4 quantizes activations to int8
# blocks (of the weights' block length) and runs int8 dot products. Level 1 (fp32
# compute) is ~40x slower for 8-bit weights in onnxruntime 1.32.
ACCURACY_LEVEL = 4
# int8 weight block length: the graph default; decoder exports choose theirs in
# export/__init__. MatMulQ8 quantizes activations in chunks of 32 whatever it is.
DEFAULT_BLOCK_SIZE = 32
INT8_BLOCK_SIZES = (32, 64, 128, 256)
DTYPES = ("int8", "int4", "fp32")
# MatMulQ8/MatMulQ4 "activation" attribute values (kernels/ort_op.c).
NO_ACTIVATION, SWIGLU = 0, 1

# An RMS norm folded into a quantized product: (gamma initializer, epsilon).
Norm = tuple[str, float]


class GraphBuilder:
    """Collects nodes, initializers, inputs and outputs of one ONNX graph."""

    def __init__(self, dtype: str, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        if block_size not in INT8_BLOCK_SIZES:
            raise ValueError(
                f"block_size must be one of {INT8_BLOCK_SIZES}, got {block_size}"
            )
        self.dtype = dtype
        self.block_size = block_size
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._count = 0
        self._shared: set[str] = set()
        self.domains: set[str] = set()

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

    def linear(
        self,
        x: str,
        weight: np.ndarray | Int4Blocks,
        name: str,
        activation: int = NO_ACTIVATION,
        *,
        norm: Norm | None = None,
        residual: str | None = None,
    ) -> str:
        """`x @ weight.T` for a `(N, K)` weight, with the kernel of the dtype.

        `weight` is float, or for int4 already in 4-bit blocks (a source's own).
        Quantized dtypes only: `activation`, the operator's epilogue (see `swiglu`);
        `norm`, an RMS norm of `x` done by the operator first; `residual`, a tensor
        of the result's shape added to it (kernels/ort_op.c).
        """
        if self.dtype == "fp32" and (activation != NO_ACTIVATION or norm or residual):
            raise ValueError("an fp32 linear layer fuses no activation, norm or add")
        fused = {"activation": activation, "norm": norm, "residual": residual}
        if isinstance(weight, Int4Blocks):
            if self.dtype != "int4":
                weight = weight.dequantize()
            else:
                return self.linear_int4(x, weight, name, **fused)
        if self.dtype == "fp32":
            w = self.const(f"{name}.weight", weight.T.astype(np.float32))
            return self.op("MatMul", x, w, name=name)
        if self.dtype == "int4":
            return self.linear_int4(x, quantize_int4_blocks(weight), name, **fused)
        q = quantize_int8_blocks(weight, self.block_size)
        return self.linear_q(x, q, name, **fused)

    def swiglu(
        self,
        x: str,
        gate_up: np.ndarray | Int4Blocks,
        name: str,
        *,
        norm: Norm | None = None,
    ) -> str:
        """`silu(x @ gate.T) * (x @ up.T)` for a packed `(2 * F, K)` gate + up weight.

        Quantized, with F a multiple of 16, one `MatMulQ8`/`MatMulQ4` with
        `activation=1` does all of it (kernels/ort_op.c); otherwise the product is
        followed by edgeslm's `SwiGLU` operator (kernels/swiglu.c), which computes
        the same function with the same bits.
        """
        rows = gate_up.q.shape[0] if isinstance(gate_up, Int4Blocks) else len(gate_up)
        if self.dtype != "fp32" and rows % (2 * Q8_GROUP) == 0:
            return self.linear(x, gate_up, name, activation=SWIGLU, norm=norm)
        both = self.linear(x, gate_up, name, norm=norm)
        self.domains.add(EDGESLM_DOMAIN)
        return self.op("SwiGLU", both, domain=EDGESLM_DOMAIN, name=f"{name}.swiglu")

    def attention(
        self,
        qkv: str,
        layer: int,
        n_heads: int,
        n_kv_heads: int,
        rope: tuple[str, str] | None,
    ) -> str:
        """Causal attention of layer `layer` over the runtime's cache: edgeslm's
        `CachedAttention` (kernels/attention.c), which takes GroupQueryAttention's
        inputs, so the portable graph swaps one for the other. `rope`: the cos and
        sin tables, or None for no rotary embedding. Returns the attention output."""
        p = f"layers.{layer}"
        inputs = [
            qkv,
            "",
            "",
            f"past_key_values.{layer}.key",
            f"past_key_values.{layer}.value",
            "seqlens_k",
            "total_sequence_length",
            *(rope or ()),
        ]
        self.domains.add(EDGESLM_DOMAIN)
        return self.node(
            "CachedAttention",
            inputs,
            name=f"{p}.attn",
            outputs=[f"{p}.attn/out", f"present.{layer}.key", f"present.{layer}.value"],
            domain=EDGESLM_DOMAIN,
            num_heads=n_heads,
            kv_num_heads=n_kv_heads,
            do_rotary=int(rope is not None),
        )[0]

    def linear_int4(
        self,
        x: str,
        w: Int4Blocks,
        name: str,
        activation: int = NO_ACTIVATION,
        norm: Norm | None = None,
        residual: str | None = None,
    ) -> str:
        """`x @ (scale * q + min).T` with edgeslm's `MatMulQ4` over the blocks as
        they are (a GGUF's Q4_1 or Q4_0 blocks carry over exactly; kernels/qmatmul4.c).
        `activation`, `norm`, `residual`: as in `linear`.
        """
        p = pack_q4(w)
        self.domains.add(EDGESLM_DOMAIN)
        extra, attrs = _fused_inputs(activation, norm, residual)
        weights = [
            self.const(f"{name}.qweight4", p.data),
            self.const(f"{name}.scales", p.scales),
            self.const(f"{name}.mins", p.mins),
        ]
        return self.node(
            "MatMulQ4",
            [x, *weights, *extra],
            name=name,
            domain=EDGESLM_DOMAIN,
            K=p.k,
            N=p.n,
            **attrs,
        )[0]

    def linear_q(
        self,
        x: str,
        q: BlockQuantized | PackedQ8,
        name: str,
        prefix: str = "",
        output: str | None = None,
        activation: int = NO_ACTIVATION,
        norm: Norm | None = None,
        residual: str | None = None,
    ) -> str:
        """`MatMulQ8` over int8 blocks (`prefix`: reuse weights stored under it).
        `activation`, `norm`, `residual`: as in `linear`."""
        packed = q if isinstance(q, PackedQ8) else pack_q8(q)
        data, scales = self.q8_consts(prefix or name, packed, stored=bool(prefix))
        self.domains.add(EDGESLM_DOMAIN)
        extra, attrs = _fused_inputs(activation, norm, residual)
        return self.node(
            "MatMulQ8",
            [x, data, scales, *extra],
            name=name,
            outputs=[output] if output else None,
            domain=EDGESLM_DOMAIN,
            K=packed.k,
            N=packed.n,
            block_size=packed.block_size,
            **attrs,
        )[0]

    def q8_consts(
        self, stem: str, p: PackedQ8, stored: bool = False
    ) -> tuple[str, str]:
        """Names of a packed weight's initializers (added unless `stored`)."""
        data, scales = f"{stem}.qweight", f"{stem}.scales"
        if not stored:
            self.const(data, p.data)  # (n_groups, kp / 4, 16, 4) uint8
            self.const(scales, p.scales)  # (n_groups, n_blocks, 16) float16
        return data, scales

    def embedding_packed(self, ids: str, p: PackedQ8, stem: str) -> str:
        """Rows `ids` of a table stored for `MatMulQ8` (shared with a tied output
        projection), dequantized: `(*ids.shape, K)` float, by edgeslm's `GatherQ8`
        (kernels/ort_embed.c); the portable graph spells it with standard ops."""
        data, scales = self.q8_consts(stem, p)
        self.domains.add(EDGESLM_DOMAIN)
        return self.node(
            "GatherQ8",
            [ids, data, scales],
            name=f"{stem}.gather",
            domain=EDGESLM_DOMAIN,
            K=p.k,
            N=p.n,
            block_size=p.block_size,
        )[0]

    def gather_packed_ops(
        self,
        ids: str,
        tables: tuple[str, str],
        sizes: tuple[int, int, int],
        stem: str,
        ids_rank: int = 2,
    ) -> str:
        """What `GatherQ8` computes, in standard ONNX ops: rows `ids` of the packed
        `tables` (data, scales) of `sizes` (K, padded K, block length).

        Row t is lane t % 16 of group t // 16: the group's data and scales are
        gathered whole (16 rows, a few kB per token), then the lane is picked.
        """
        data, scales = tables
        k, kp, block_size = sizes
        n_blocks = kp // block_size
        sixteen = self.shared_const("q8.group", _i64(Q8_GROUP))
        group = self.op("Div", ids, sixteen)
        lane = self.op("Mod", ids, sixteen)

        def pick(table: str, tail: list[int]) -> str:
            # (*ids, a, 16, *rest) -> (*ids, a, 1, *rest): each token's own row
            rows = self.op("Gather", table, group, axis=0)
            at = self._like_ids(lane, ids, [1] * len(tail))
            index = self.op("Expand", at, self._shape_like_ids(ids, tail))
            return self.op("GatherElements", rows, index, axis=ids_rank + 1)

        rows = pick(data, [kp // 4, 1, 4])  # (*ids, kp / 4, 1, 4) uint8
        row_scales = pick(scales, [n_blocks, 1])  # (*ids, n_blocks, 1) float16
        values = self.op(
            "Sub",
            self.op("Cast", rows, to=FLOAT),
            self.shared_const("q8.zero_point", np.array(INT8_ZERO_POINT, np.float32)),
        )
        blocks = self._like_ids(values, ids, [n_blocks, block_size])
        scaled = self.op("Mul", blocks, self.op("Cast", row_scales, to=FLOAT))
        return self._rows_to_width(scaled, ids, kp, k, stem)

    def embedding_rows(self, ids: str, q: BlockQuantized, stem: str) -> str:
        """Rows `ids` of a row-major int8 table, dequantized: `(*ids.shape, K)`."""
        data = self.const(f"{stem}.qweight", q.data)  # (vocab, n_blocks, block)
        scales = self.const(f"{stem}.scales", q.scales)  # (vocab, n_blocks) float16
        values = self.op(
            "Sub",
            self.op("Cast", self.op("Gather", data, ids, axis=0), to=FLOAT),
            self.shared_const("q8.zero_point", np.array(INT8_ZERO_POINT, np.float32)),
        )
        row_scales = self.op("Cast", self.op("Gather", scales, ids, axis=0), to=FLOAT)
        last = self.shared_const("q8.last_axis", _i64([-1]))
        scaled = self.op("Mul", values, self.op("Unsqueeze", row_scales, last))
        kp = q.data.shape[1] * q.block_size
        return self._rows_to_width(scaled, ids, kp, q.k, stem)

    def _like_ids(self, x: str, ids: str, tail: list[int]) -> str:
        """`x` reshaped to `(*ids.shape, *tail)`."""
        return self.op("Reshape", x, self._shape_like_ids(ids, tail))

    def _shape_like_ids(self, ids: str, tail: list[int]) -> str:
        """The shape `(*ids.shape, *tail)`, as a tensor."""
        return self.op(
            "Concat",
            self.op("Shape", ids),
            self.shared_const(f"q8.tail.{'x'.join(map(str, tail))}", _i64(tail)),
            axis=0,
        )

    def _rows_to_width(self, blocks: str, ids: str, kp: int, k: int, stem: str) -> str:
        """`(*ids.shape, n_blocks, block)` dequantized rows -> `(*ids.shape, k)`."""
        rows = self._like_ids(blocks, ids, [kp])
        if kp == k:
            return rows
        last = self.shared_const("q8.last_axis", _i64([-1]))
        ends = self.const(f"{stem}.k1", _i64([k]))
        return self.op(
            "Slice", rows, self.shared_const("q8.zero", _i64([0])), ends, last
        )

    def model(self, name: str) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, name, self.inputs, self.outputs, self.initializers
        )
        opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)]
        opsets += [helper.make_opsetid(d, 1) for d in sorted(self.domains)]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="edgeslm")
        model.ir_version = 10
        return model


INT64 = TensorProto.INT64
INT32 = TensorProto.INT32
FLOAT = TensorProto.FLOAT
FLOAT16 = TensorProto.FLOAT16


def _i64(values) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


def _fused_inputs(
    activation: int, norm: Norm | None, residual: str | None
) -> tuple[list[str], dict[str, object]]:
    """The optional inputs (gamma, R) and attributes of a quantized product's node;
    trailing absent inputs are left out, so a plain product keeps its three."""
    extra = [norm[0] if norm else "", residual or ""]
    while extra and not extra[-1]:
        extra.pop()
    attrs: dict[str, object] = {"activation": activation} if activation else {}
    if norm:
        attrs["epsilon"] = float(norm[1])
    return extra, attrs


# --- the portable graph -------------------------------------------------------------


def portable_model(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """A copy of `model` with onnxruntime's own operators for edgeslm's:
    `MatMulNBits` for every `MatMulQ8` (after a `SimplifiedLayerNormalization` for
    a folded norm; followed by Split, Sigmoid and Mul for a SwiGLU one, which also
    replace a `SwiGLU` node, and by an Add for a residual), `GroupQueryAttention`
    for every `CachedAttention` (with a float32 cache, which the runtime allocates
    for this graph), Gather and friends for `GatherQ8`; None when the model has
    `MatMulQ4` nodes (4-bit packages need the kernel).

    The packed weights are not copied: small ops undo the interleaving (reshape,
    transpose, slice off the padding rows, cast the scales to float32), and
    onnxruntime folds them into `MatMulNBits`' own layout when it loads the graph.
    That costs load time and memory, which is why it is only the fallback.
    """
    if any(n.op_type == "MatMulQ4" for n in model.graph.node):
        # TODO: a portable graph for 4-bit packages; the repacking into MatMulNBits'
        # nibble order and zero points would fold into copies of every weight.
        return None
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes: list[onnx.NodeProto] = []
    consts: list[onnx.TensorProto] = []
    unpacked: dict[tuple[str, str], tuple[str, str]] = {}
    for node in out.graph.node:
        if node.domain != EDGESLM_DOMAIN:
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "SwiGLU":
            nodes.extend(_swiglu_nodes(node.input[0], node.output[0], node.name))
            continue
        if node.op_type == "GatherQ8":
            ranks = {i.name: len(i.type.tensor_type.shape.dim) for i in out.graph.input}
            _gather_nodes(node, attrs, ranks.get(node.input[0], 2), nodes, consts)
            continue
        if node.op_type == "CachedAttention":
            rotary = {"rotary_interleaved": 0} if attrs.get("do_rotary") else {}
            nodes.append(
                helper.make_node(
                    "GroupQueryAttention",
                    list(node.input),
                    list(node.output),
                    name=node.name,
                    domain=MS_DOMAIN,
                    **attrs,
                    **rotary,
                )
            )
            continue
        k, n, block = attrs["K"], attrs["N"], attrs["block_size"]
        x, data, scales, *extra = node.input
        gamma, residual = (list(extra) + ["", ""])[:2]
        if gamma:  # the folded RMS norm, as its own node again
            normed = f"{node.name}/normed"
            nodes.append(
                helper.make_node(
                    "SimplifiedLayerNormalization",
                    [x, gamma],
                    [normed],
                    name=normed,
                    axis=-1,
                    epsilon=attrs.get("epsilon", 1e-5),
                )
            )
            x = normed
        # The result before the residual add, when there is one.
        result = f"{node.name}/sum_less" if residual else node.output[0]
        # With SwiGLU, MatMulNBits writes the whole product and ops combine it.
        swiglu = attrs.get("activation", NO_ACTIVATION) == SWIGLU
        output = f"{node.name}/gate_up" if swiglu else result
        if (data, scales) not in unpacked:
            unpacked[(data, scales)] = _unpack_q8(
                nodes, consts, data, scales, k, n, block
            )
        weight, weight_scales = unpacked[(data, scales)]
        # MatMulNBits computes the zero padding rows too; their columns are cut off.
        n_padded = -(-n // Q8_GROUP) * Q8_GROUP
        product = output if n_padded == n else f"{node.name}/padded"
        nodes.append(
            helper.make_node(
                "MatMulNBits",
                [x, weight, weight_scales],
                [product],
                name=node.name,
                domain=MS_DOMAIN,
                K=k,
                N=n_padded,
                bits=8,
                block_size=block,
                accuracy_level=ACCURACY_LEVEL,
            )
        )
        if n_padded != n:
            cut = [f"{node.name}/{part}" for part in ("zero", "n", "axis")]
            for name, value in zip(cut, ([0], [n], [-1]), strict=True):
                consts.append(numpy_helper.from_array(_i64(value), name))
            nodes.append(
                helper.make_node(
                    "Slice", [product, *cut], [output], name=f"{node.name}/cut"
                )
            )
        if swiglu:
            nodes.extend(_swiglu_nodes(output, result, node.name))
        if residual:
            nodes.append(
                helper.make_node(
                    "Add", [residual, result], [node.output[0]], name=f"{node.name}/add"
                )
            )
    # GroupQueryAttention takes the cache in the query's type: float32.
    for value in (*out.graph.input, *out.graph.output):
        if value.name.startswith(("past_key_values.", "present.")):
            value.type.tensor_type.elem_type = FLOAT
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    out.graph.initializer.extend(consts)
    kept = [o for o in out.opset_import if o.domain != EDGESLM_DOMAIN]
    del out.opset_import[:]
    out.opset_import.extend(kept)
    return out


def _gather_nodes(
    node: onnx.NodeProto,
    attrs: dict,
    ids_rank: int,
    nodes: list[onnx.NodeProto],
    consts: list[onnx.TensorProto],
) -> None:
    """Appends standard ops computing a `GatherQ8` node's rows (`gather_packed_ops`),
    their names prefixed with the node's so they cannot meet the graph's own."""
    ids, data, scales = node.input
    k, block = attrs["K"], attrs["block_size"]
    b = GraphBuilder("int8", block)
    rows = b.gather_packed_ops(
        ids, (data, scales), (k, -(-k // block) * block, block), node.name, ids_rank
    )
    keep = {ids, data, scales}

    def rename(name: str) -> str:
        return name if name in keep or not name else f"{node.name}/{name}"

    for op in b.nodes:
        op.name = rename(op.name)
        op.input[:] = [rename(i) for i in op.input]
        op.output[:] = [rename(o) for o in op.output]
    for init in b.initializers:
        init.name = rename(init.name)
    nodes.extend(b.nodes)
    consts.extend(b.initializers)
    nodes.append(
        helper.make_node("Identity", [rename(rows)], [node.output[0]], name=node.name)
    )


def _swiglu_nodes(both: str, result: str, stem: str) -> list[onnx.NodeProto]:
    """`result = silu(gate) * up` for `both` = gate and up side by side."""
    gate, up, sig, silu = (f"{stem}/{part}" for part in ("gate", "up", "sig", "silu"))
    return [
        helper.make_node(
            "Split", [both], [gate, up], name=f"{stem}/split", axis=-1, num_outputs=2
        ),
        helper.make_node("Sigmoid", [gate], [sig], name=sig),
        helper.make_node("Mul", [gate, sig], [silu], name=silu),
        helper.make_node("Mul", [silu, up], [result], name=f"{stem}/swiglu"),
    ]


def _unpack_q8(
    nodes: list[onnx.NodeProto],
    consts: list[onnx.TensorProto],
    data: str,
    scales: str,
    k: int,
    n: int,
    block: int,
) -> tuple[str, str]:
    """Appends the ops that turn packed `data`/`scales` into MatMulNBits' row-major
    `(N padded to 16, n_blocks, block)` uint8 and float32 scales; returns their
    names. onnxruntime keeps part of every folded intermediate after loading, so
    the chain is as short as it can be: a transpose and a reshape each."""
    stem = f"{data}.unpacked"
    n_padded, kp = -(-n // Q8_GROUP) * Q8_GROUP, -(-k // block) * block
    n_blocks = kp // block

    def op(kind: str, *inputs: str, out: str, **attrs) -> str:
        name = f"{stem}/{out}"
        nodes.append(helper.make_node(kind, list(inputs), [name], name=name, **attrs))
        return name

    w_shape, s_shape = f"{stem}/const_w_shape", f"{stem}/const_s_shape"
    consts.append(numpy_helper.from_array(_i64([n_padded, n_blocks, block]), w_shape))
    consts.append(numpy_helper.from_array(_i64([n_padded, n_blocks]), s_shape))
    w = op("Transpose", data, out="rows", perm=[0, 2, 1, 3])  # (groups, 16, kp/4, 4)
    w = op("Reshape", w, w_shape, out="w")
    s = op("Transpose", scales, out="scale_rows", perm=[0, 2, 1])  # (groups, 16, nb)
    s = op("Reshape", op("Cast", s, out="scale_f32", to=FLOAT), s_shape, out="s")
    return w, s
