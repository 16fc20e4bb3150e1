"""The block matmuls (kernels/qmatmul.c, qmatmul4.c) and their onnxruntime operators.

- The kernel against the numpy statement of the same computation
  (`edgeslm.export.quantize.reference_matmul_q8`) at every SIMD level this CPU has,
  on awkward sizes: rows not a multiple of 16, inputs padded to the block, every
  block length, prompt-sized batches.
- `ai.edgeslm::MatMulQ8` run by onnxruntime (1 and 2 threads, extra leading dims),
  its errors, and the portable graph (`MatMulNBits`) that replaces it without the
  kernel.
- A package runs the same with the kernel and, in a process without it, with its
  portable graph.
The C kernel must be built (`pip install -e .`); a missing library fails these tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import edgeslm
from edgeslm import _kernel
from edgeslm.errors import ModelFormatError
from edgeslm.export.onnx_graph import GraphBuilder, portable_model
from edgeslm.export.quantize import (
    pack_q4,
    pack_q8,
    quantize_int4_blocks,
    quantize_int8_blocks,
    reference_matmul_q4,
    reference_matmul_q8,
    unpack_q4,
    unpack_q8,
)
from edgeslm.manifest import Manifest


def _weights(rng, n: int, k: int, block: int):
    w = rng.standard_normal((n, k)).astype(np.float32) * rng.uniform(0.2, 2, (n, 1))
    return pack_q8(quantize_int8_blocks(w.astype(np.float32), block))


def _activations(rng, m: int, k: int) -> np.ndarray:
    # Channels of very different ranges, as after an RMS norm.
    scale = rng.uniform(0.05, 4.0, size=(1, k)).astype(np.float32)
    return (rng.standard_normal((m, k)).astype(np.float32) * scale).astype(np.float32)


def _c_matmul(lib, x: np.ndarray, p) -> np.ndarray:
    y = np.full((x.shape[0], p.n), np.nan, dtype=np.float32)
    status = lib.esl_qmm_matmul(
        x.ctypes.data,
        x.shape[0],
        x.shape[1],
        p.data.ctypes.data,
        p.scales.ctypes.data,
        p.n,
        p.block_size,
        y.ctypes.data,
    )
    _kernel.check(status, "esl_qmm_matmul")
    return y


def _tolerance(x: np.ndarray, p) -> np.ndarray:
    """Float32 summation error bound: a small multiple of the sum of |terms|."""
    w = unpack_q8(p).dequantize()
    return 1e-5 * (np.abs(x) @ np.abs(w).T) + 1e-6


def test_half_conversion_is_exact_for_every_value(lib):
    halves = np.arange(1 << 16, dtype=np.uint16)
    want = halves.view(np.float16).astype(np.float32)
    got = np.array([lib.esl_qmm_half(int(h)) for h in halves], dtype=np.float32)
    same = (want.view(np.uint32) == got.view(np.uint32)) | (
        np.isnan(want) & np.isnan(got)
    )
    assert same.all(), halves[~same][:5]


def test_packing_round_trips():
    rng = np.random.default_rng(1)
    q = quantize_int8_blocks(rng.standard_normal((37, 96)).astype(np.float32), 32)
    p = pack_q8(q)
    assert p.data.shape == (3, 24, 16, 4) and p.scales.shape == (3, 3, 16)
    back = unpack_q8(p)
    np.testing.assert_array_equal(back.data, q.data)
    np.testing.assert_array_equal(back.scales, q.scales)
    # Padding rows are zero (q + 128 = 128) with zero scales.
    rows = p.data.transpose(0, 2, 1, 3).reshape(48, 96)
    assert (rows[37:] == 128).all() and (p.scales[2, :, 5:] == 0).all()


@pytest.mark.parametrize(
    "m, k, n, block",
    [
        (1, 576, 960, 32),  # a decode step of SmolLM2's QKV projection
        (1, 1536, 576, 32),
        (1, 576, 49152, 32),  # the tied head
        (5, 576, 1536, 64),
        (9, 800, 13, 32),  # K padded to the block, N not a multiple of 16
        (3, 1536, 70, 128),
        (2, 300, 9, 256),
        (17, 96, 40, 32),  # rows in tiles of 8, 4 or 2 plus a remainder
        (128, 64, 33, 64),
    ],
)
def test_kernel_matches_the_numpy_statement(lib, levels, m, k, n, block):
    rng = np.random.default_rng(m * 7 + n)
    p = _weights(rng, n, k, block)
    x = _activations(rng, m, k)
    want = reference_matmul_q8(x, p)
    bound = _tolerance(x, p)
    for level in levels:
        lib.esl_qmm_set_level(level)
        got = _c_matmul(lib, x, p)
        err = np.abs(got - want)
        assert (err <= bound).all(), (lib.esl_qmm_name(), float(err.max()))


def test_kernel_is_close_to_the_float_product(lib):
    # The int8 rounding of weights and activations, not the kernel, sets the error.
    rng = np.random.default_rng(3)
    p = _weights(rng, 64, 576, 32)
    x = _activations(rng, 4, 576)
    exact = x.astype(np.float64) @ unpack_q8(p).dequantize().T.astype(np.float64)
    got = _c_matmul(lib, x, p)
    rel = np.linalg.norm(got - exact) / np.linalg.norm(exact)
    assert rel < 0.02


def test_non_finite_activations_poison_only_their_row(lib, levels):
    rng = np.random.default_rng(4)
    p = _weights(rng, 20, 64, 32)
    x = _activations(rng, 3, 64)
    x[1, 5] = np.nan
    x[2, 40] = np.inf
    for level in levels:
        lib.esl_qmm_set_level(level)
        y = _c_matmul(lib, x, p)
        assert np.isfinite(y[0]).all()
        assert np.isnan(y[1]).all() and np.isnan(y[2]).all()


def _c_matmul4(lib, x: np.ndarray, p) -> np.ndarray:
    y = np.full((x.shape[0], p.n), np.nan, dtype=np.float32)
    status = lib.esl_qmm4_matmul(
        x.ctypes.data,
        x.shape[0],
        x.shape[1],
        p.data.ctypes.data,
        p.scales.ctypes.data,
        p.mins.ctypes.data,
        p.n,
        y.ctypes.data,
    )
    _kernel.check(status, "esl_qmm4_matmul")
    return y


@pytest.mark.parametrize(
    "m, k, n",
    [(1, 576, 960), (1, 1536, 576), (5, 576, 1536), (9, 96, 13), (17, 64, 40)],
)
def test_4bit_kernel_matches_the_numpy_statement(lib, levels, m, k, n):
    rng = np.random.default_rng(m + n)
    w = rng.standard_normal((n, k)).astype(np.float32) * rng.uniform(0.2, 2, (n, 1))
    p = pack_q4(quantize_int4_blocks(w.astype(np.float32)))
    x = _activations(rng, m, k)
    want = reference_matmul_q4(x, p)
    deq = unpack_q4(p).dequantize()
    bound = 1e-5 * (np.abs(x) @ np.abs(deq).T) + 1e-6
    for level in levels:
        lib.esl_qmm_set_level(level)
        err = np.abs(_c_matmul4(lib, x, p) - want)
        assert (err <= bound).all(), (lib.esl_qmm_name(), float(err.max()))
    # and the statement is the float product up to the activations' int8 rounding
    rel = np.linalg.norm(want - x @ deq.T) / np.linalg.norm(x @ deq.T)
    assert rel < 0.02


def test_4bit_packing_round_trips():
    rng = np.random.default_rng(8)
    blocks = quantize_int4_blocks(rng.standard_normal((21, 64)).astype(np.float32))
    back = unpack_q4(pack_q4(blocks))
    np.testing.assert_array_equal(back.q, blocks.q)
    np.testing.assert_array_equal(back.scales, blocks.scales)
    np.testing.assert_array_equal(back.mins, blocks.mins)


def test_kernel_rejects_sizes_it_cannot_hold(lib):
    x = np.zeros((1, 64), np.float32)
    p = _weights(np.random.default_rng(5), 16, 64, 32)
    for block in (16, 48, 512):
        status = lib.esl_qmm_matmul(
            x.ctypes.data, 1, 64, p.data.ctypes.data, p.scales.ctypes.data, 16,
            block, x.ctypes.data,
        )  # fmt: skip
        assert status == _kernel.ERR_ARG
    assert lib.esl_qmm_matmul(0, 1, 64, 0, 0, 16, 32, 0) == _kernel.ERR_ARG


# --- the onnxruntime operator ---------------------------------------------------


def _graph(p, dims, *, constant: bool = True) -> onnx.ModelProto:
    """y = MatMulQ8(x, p) with x of shape (*dims, K)."""
    b = GraphBuilder("int8", p.block_size)
    b.input("x", TensorProto.FLOAT, [*dims, p.k])
    b.linear_q("x", p, "mm", output="y")
    b.output("y", TensorProto.FLOAT, [*dims, p.n])
    model = b.model("q8")
    if not constant:  # weights fed at run time instead of stored
        inits = {t.name: t for t in model.graph.initializer}
        del model.graph.initializer[:]
        for name in ("mm.qweight", "mm.scales"):
            tensor = inits[name]
            free = [f"{name}.{i}" for i in range(len(tensor.dims))]
            model.graph.input.append(
                helper.make_tensor_value_info(name, tensor.data_type, free)
            )
    return model


def _session(model: onnx.ModelProto, threads: int = 1, ops: bool = True):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if ops:
        options.register_custom_ops_library(str(_kernel.operator_library()))
    return ort.InferenceSession(model.SerializeToString(), options)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "dims, k, n, block",
    [([1, 1], 576, 960, 32), ([1, 7], 576, 3072, 64), ([3, 5], 100, 50, 32)],
)
def test_operator_in_onnxruntime(lib, threads, dims, k, n, block):
    rng = np.random.default_rng(n)
    p = _weights(rng, n, k, block)
    x = _activations(rng, int(np.prod(dims)), k).reshape(*dims, k)
    (y,) = _session(_graph(p, dims), threads).run(None, {"x": x})
    assert y.shape == (*dims, n)
    flat = x.reshape(-1, k)
    err = np.abs(y.reshape(-1, n) - reference_matmul_q8(flat, p))
    assert (err <= _tolerance(flat, p)).all()


@pytest.mark.parametrize("threads", [1, 2])
def test_4bit_operator_in_onnxruntime(lib, threads):
    rng = np.random.default_rng(9)
    w = rng.standard_normal((50, 96)).astype(np.float32)
    blocks = quantize_int4_blocks(w)
    b = GraphBuilder("int4")
    b.input("x", TensorProto.FLOAT, [1, 3, 96])
    b.node("Identity", [b.linear_int4("x", blocks, "mm")], outputs=["y"])
    b.output("y", TensorProto.FLOAT, [1, 3, 50])
    x = _activations(rng, 3, 96).reshape(1, 3, 96)
    (y,) = _session(b.model("q4"), threads).run(None, {"x": x})
    want = reference_matmul_q4(x.reshape(3, 96), pack_q4(blocks))
    np.testing.assert_allclose(y.reshape(3, 50), want, rtol=1e-5, atol=1e-5)
    assert portable_model(b.model("q4")) is None  # 4-bit packages need the kernel


def _silu_times(product: np.ndarray) -> np.ndarray:
    gate, up = np.split(product.astype(np.float64), 2, axis=-1)
    return gate / (1.0 + np.exp(-gate)) * up


def test_swiglu_epilogue_is_accurate_and_the_same_on_every_path(lib):
    rng = np.random.default_rng(11)
    gate = np.concatenate(
        [
            rng.standard_normal(5000) * 6,
            np.linspace(-120, 120, 2001),  # beyond the clamp at -87 / 88
            [0.0, -0.0, 1e-30, -1e-30, 87.0, -87.0, 88.5, -88.5, np.inf, -np.inf],
        ]
    ).astype(np.float32)
    up = rng.uniform(-3, 3, gate.size).astype(np.float32)

    def run(simd: int, g: np.ndarray, u: np.ndarray) -> np.ndarray:
        y = np.full(g.size, np.nan, np.float32)
        lib.esl_swiglu(g.ctypes.data, u.ctypes.data, y.ctypes.data, g.size, simd)
        return y

    scalar, simd = run(0, gate, up), run(1, gate, up)
    np.testing.assert_array_equal(simd, scalar)  # the same bits on every CPU
    g64 = gate.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        want = g64 / (1.0 + np.exp(-g64)) * up
    finite = np.isfinite(gate)
    np.testing.assert_allclose(simd[finite], want[finite], rtol=1e-6, atol=1e-30)
    assert not np.isfinite(simd[~finite]).any()  # an infinite gate: no finite value
    for odd in (np.nan, np.inf):  # a NaN gate gives NaN; tails of any length
        g = np.array([1.0, odd, -2.0, 3.0, 0.5], np.float32)
        u = np.ones(5, np.float32)
        assert np.isnan(run(1, g, u * np.nan)).all()
        assert np.isnan(run(1, g, u)[1]) == np.isnan(odd)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", ["int8", "int4"])
@pytest.mark.parametrize("m", [1, 7, 300])  # a decode row, a few, beyond the stack
def test_swiglu_operator_is_silu_of_gate_times_up(lib, threads, dtype, m):
    rng = np.random.default_rng(m)
    k, f = 96, 48  # F a multiple of 16; 2F = 96 rows, 6 groups
    w = rng.standard_normal((2 * f, k)).astype(np.float32)
    x = _activations(rng, m, k).reshape(1, m, k)
    fused = GraphBuilder(dtype)
    fused.input("x", TensorProto.FLOAT, [1, m, k])
    fused.node("Identity", [fused.swiglu("x", w, "ffn")], outputs=["y"])
    fused.output("y", TensorProto.FLOAT, [1, m, f])
    ops = [n for n in fused.model("fused").graph.node if n.domain == "ai.edgeslm"]
    assert len(ops) == 1 and len(fused.model("fused").graph.node) == 2
    plain = GraphBuilder(dtype)
    plain.input("x", TensorProto.FLOAT, [1, m, k])
    plain.node("Identity", [plain.linear("x", w, "ffn")], outputs=["p"])
    plain.output("p", TensorProto.FLOAT, [1, m, 2 * f])

    (y,) = _session(fused.model("fused"), threads).run(None, {"x": x})
    (product,) = _session(plain.model("plain"), threads).run(None, {"x": x})
    assert y.shape == (1, m, f)
    want = _silu_times(product)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
    if dtype == "int8":  # and the portable graph's ops compute the same
        (theirs,) = _session(portable_model(fused.model("fused")), ops=False).run(
            None, {"x": x}
        )
        rel = np.linalg.norm(theirs - y) / np.linalg.norm(y)
        assert rel < 1e-2, rel


@pytest.mark.parametrize("dtype", ["fp32", "int8"])
def test_swiglu_operator_after_a_product_that_cannot_hold_it(lib, dtype):
    # fp32, and F = 20 (not whole groups of 16): the product, then the SwiGLU node,
    # which computes the same bits as the fused epilogue (esl_swiglu).
    rng = np.random.default_rng(3)
    w = rng.standard_normal((40, 64)).astype(np.float32)
    b = GraphBuilder(dtype)
    b.input("x", TensorProto.FLOAT, [1, 2, 64])
    b.node("Identity", [b.swiglu("x", w, "ffn")], outputs=["y"])
    b.output("y", TensorProto.FLOAT, [1, 2, 20])
    b.output("ffn/product", TensorProto.FLOAT, [1, 2, 40])
    model = b.model("ffn")
    swiglu = [n for n in model.graph.node if n.op_type == "SwiGLU"]
    assert len(swiglu) == 1 and swiglu[0].domain == "ai.edgeslm"
    model.graph.node.append(
        helper.make_node("Identity", [swiglu[0].input[0]], ["ffn/product"])
    )
    x = _activations(rng, 2, 64).reshape(1, 2, 64)
    y, product = _session(model).run(None, {"x": x})
    gate, up = (np.ascontiguousarray(h) for h in np.split(product.reshape(2, 40), 2, 1))
    want = np.empty_like(gate)
    lib.esl_swiglu(gate.ctypes.data, up.ctypes.data, want.ctypes.data, gate.size, 1)
    np.testing.assert_array_equal(y.reshape(2, 20), want)
    np.testing.assert_allclose(y, _silu_times(product), rtol=1e-5, atol=1e-6)
    # the portable graph spells it with onnxruntime's ops
    portable = portable_model(model)
    assert "SwiGLU" not in {n.op_type for n in portable.graph.node}
    theirs, _ = _session(portable, ops=False).run(None, {"x": x})
    # int8: as in test_portable_graph_runs_without_the_operator (a Pi 4 computes the
    # portable graph in fp32, so its activations are not rounded to int8 first).
    rel = np.linalg.norm(theirs - y) / np.linalg.norm(y)
    assert rel < (2e-2 if dtype == "int8" else 1e-5), rel


def test_swiglu_operator_refuses_an_odd_width(lib):
    b = GraphBuilder("fp32")
    b.input("x", TensorProto.FLOAT, [1, 3, 7])
    b.domains.add("ai.edgeslm")
    b.node("SwiGLU", ["x"], outputs=["y"], domain="ai.edgeslm")
    b.output("y", TensorProto.FLOAT, [1, 3, 3])
    with pytest.raises(Exception, match="SwiGLU: X must be float32 \\[..., 2F\\]"):
        _session(b.model("odd")).run(None, {"x": np.zeros((1, 3, 7), np.float32)})


def _rms_norm(x: np.ndarray, gamma: np.ndarray, eps: float) -> np.ndarray:
    x64 = x.astype(np.float64)
    inv = 1.0 / np.sqrt((x64 * x64).mean(axis=-1, keepdims=True) + eps)
    return (x64 * inv * gamma).astype(np.float32)


def _fused_graph(dtype, w, gamma, dims, *, residual, activation=0):
    """y = product of (norm(x) if gamma) with w, plus r when `residual`."""
    k, n = w.shape[1], w.shape[0] // (2 if activation else 1)
    b = GraphBuilder(dtype)
    b.input("x", TensorProto.FLOAT, [*dims, k])
    norm = (b.const("gamma", gamma), 1e-5) if gamma is not None else None
    if residual:
        b.input("r", TensorProto.FLOAT, [*dims, n])
    r = "r" if residual else None
    if activation:
        y = b.swiglu("x", w, "mm", norm=norm)
    else:
        y = b.linear("x", w, "mm", norm=norm, residual=r)
    b.node("Identity", [y], outputs=["y"])
    b.output("y", TensorProto.FLOAT, [*dims, n])
    return b.model("fused")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", ["int8", "int4"])
@pytest.mark.parametrize("m", [1, 5, 300])  # a decode row, a few, beyond the stack
def test_operator_folds_the_rms_norm_and_the_residual_add(lib, threads, dtype, m):
    # What a Llama block asks of its products: the norm before QKV and gate + up,
    # the residual add after the output and down projections.
    rng = np.random.default_rng(m)
    k, n = 96, 80
    w = rng.standard_normal((n, k)).astype(np.float32)
    gamma = rng.uniform(0.2, 3.0, k).astype(np.float32)
    x = (rng.standard_normal((1, m, k)) * 7).astype(np.float32)  # not unit RMS
    r = rng.standard_normal((1, m, n)).astype(np.float32)

    def run(model, feeds):
        return _session(model, threads).run(None, feeds)[0]

    # The norm: the same product as of the input normalized beforehand.
    normed = run(_fused_graph(dtype, w, gamma, [1, m], residual=False), {"x": x})
    plain = run(
        _fused_graph(dtype, w, None, [1, m], residual=False),
        {"x": _rms_norm(x, gamma, 1e-5)},
    )
    rel = np.linalg.norm(normed - plain) / np.linalg.norm(plain)
    assert rel < 1e-3, rel  # the norm's rounding can move a few int8 roundings

    # The add: exactly R + P, as a separate Add rounds it.
    both = run(_fused_graph(dtype, w, gamma, [1, m], residual=True), {"x": x, "r": r})
    np.testing.assert_array_equal(both, r + normed)

    if dtype == "int8":  # the portable graph spells both with onnxruntime's ops
        portable = portable_model(_fused_graph(dtype, w, gamma, [1, m], residual=True))
        kinds = [node.op_type for node in portable.graph.node]
        assert "SimplifiedLayerNormalization" in kinds and "Add" in kinds
        (theirs,) = _session(portable, ops=False).run(None, {"x": x, "r": r})
        rel = np.linalg.norm(theirs - both) / np.linalg.norm(both)
        assert rel < 1e-2, rel


def test_operator_folds_the_norm_before_a_swiglu(lib):
    rng = np.random.default_rng(12)
    k, f = 64, 32
    w = rng.standard_normal((2 * f, k)).astype(np.float32)
    gamma = rng.uniform(0.5, 2.0, k).astype(np.float32)
    x = (rng.standard_normal((1, 3, k)) * 5).astype(np.float32)
    model = _fused_graph("int8", w, gamma, [1, 3], residual=False, activation=1)
    assert [n.op_type for n in model.graph.node] == ["MatMulQ8", "Identity"]
    (y,) = _session(model).run(None, {"x": x})
    want = _silu_times(_rms_norm(x, gamma, 1e-5) @ w.T)
    rel = np.linalg.norm(y - want) / np.linalg.norm(want)
    assert rel < 2e-2, rel  # int8 weights and activations


def test_operator_refuses_a_gamma_or_residual_of_the_wrong_size(lib):
    rng = np.random.default_rng(13)
    w = rng.standard_normal((32, 64)).astype(np.float32)
    bad_gamma = _fused_graph("int8", w, np.ones(64, np.float32), [1, 1], residual=True)
    for init in bad_gamma.graph.initializer:
        if init.name == "gamma":
            init.CopyFrom(
                onnx.numpy_helper.from_array(np.ones(63, np.float32), "gamma")
            )
    x = np.ones((1, 1, 64), np.float32)
    with pytest.raises(Exception, match="gamma \\(\\[K\\]\\) must be float32 with 64"):
        _session(bad_gamma).run(None, {"x": x, "r": np.zeros((1, 1, 32), np.float32)})
    model = _fused_graph("int8", w, None, [1, "n"], residual=True)
    del model.graph.input[1].type.tensor_type.shape.dim[:]  # R of any shape
    with pytest.raises(Exception, match="R \\(Y's shape\\) must be float32 with 32"):
        _session(model).run(None, {"x": x, "r": np.zeros((1, 1, 31), np.float32)})
    # epsilon outside [0, 1) is refused when the session is made
    bad_eps = _fused_graph("int8", w, np.ones(64, np.float32), [1, 1], residual=False)
    for attr in bad_eps.graph.node[0].attribute:
        if attr.name == "epsilon":
            attr.f = -1.0
    with pytest.raises(Exception, match="epsilon=-1: it must be in"):
        _session(bad_eps)


@pytest.mark.parametrize("k, block", [(576, 32), (100, 64)])  # K padded: 100 -> 128
def test_gather_operator_gives_the_tables_rows(lib, k, block):
    rng = np.random.default_rng(k)
    p = _weights(rng, 50, k, block)  # 50 rows: the last group is part padding
    b = GraphBuilder("int8", block)
    b.input("ids", TensorProto.INT64, [1, "n"])
    b.node("Identity", [b.embedding_packed("ids", p, "embed")], outputs=["y"])
    b.output("y", TensorProto.FLOAT, [1, "n", k])
    model = b.model("gather")
    assert [n.op_type for n in model.graph.node] == ["GatherQ8", "Identity"]
    ids = np.array([[0, 15, 16, 49, 7, 7]], np.int64)
    (y,) = _session(model).run(None, {"ids": ids})
    want = unpack_q8(p).dequantize()[ids[0]]  # (q - 128) * scale, in float32
    np.testing.assert_array_equal(y[0], want)

    # The portable graph's standard ops compute the same bits.
    portable = portable_model(model)
    assert "GatherQ8" not in {n.op_type for n in portable.graph.node}
    (theirs,) = _session(portable, ops=False).run(None, {"ids": ids})
    np.testing.assert_array_equal(theirs, y)

    for bad in (50, -1):
        with pytest.raises(
            Exception, match=f"token id {bad} is out of range \\[0, 50\\)"
        ):
            _session(model).run(None, {"ids": np.array([[3, bad]], np.int64)})


def test_operator_errors_name_the_problem(lib):
    rng = np.random.default_rng(6)
    p = _weights(rng, 32, 64, 32)
    session = _session(_graph(p, [1, "n"]))
    with pytest.raises(Exception, match="64"):  # onnxruntime checks the declared K
        session.run(None, {"x": np.zeros((1, 2, 63), np.float32)})

    # Weights that are graph inputs are checked on every run, against K, N, block.
    fed = _session(_graph(p, [1, 1], constant=False))
    feeds = {"x": np.zeros((1, 1, 64), np.float32), "mm.scales": p.scales}
    with pytest.raises(Exception, match="MatMulQ8: B must be uint8 with 2048"):
        fed.run(None, {**feeds, "mm.qweight": p.data[:1]})
    (y,) = fed.run(None, {**feeds, "mm.qweight": p.data})
    assert y.shape == (1, 1, 32)

    # Attributes out of range are refused when the session is made.
    bad = _graph(p, [1, 1])
    for attr in bad.graph.node[0].attribute:
        if attr.name == "block_size":
            attr.i = 48
    with pytest.raises(Exception, match="block_size=48"):
        _session(bad)
    # activation is 0 or 1, and SwiGLU needs N (gate and up rows) a multiple of 32.
    for value, n, message in ((2, 32, "activation=2: it must be 0"), (1, 16, "N=16")):
        bad = _graph(p, [1, 1])
        node = bad.graph.node[0]
        for attr in node.attribute:
            if attr.name == "N":
                attr.i = n
        node.attribute.append(helper.make_attribute("activation", value))
        with pytest.raises(Exception, match=message):
            _session(bad)


def test_portable_graph_runs_without_the_operator():
    rng = np.random.default_rng(7)
    p = _weights(rng, 50, 576, 32)
    x = _activations(rng, 3, 576).reshape(1, 3, 576)
    model = _graph(p, [1, 3])
    portable = portable_model(model)
    assert {n.op_type for n in portable.graph.node} >= {"MatMulNBits"}
    assert all(n.domain != "ai.edgeslm" for n in portable.graph.node)
    (ours,) = _session(model).run(None, {"x": x})
    (theirs,) = _session(portable, ops=False).run(None, {"x": x})
    # Where onnxruntime quantizes activations as MatMulQ8 does (x86-64, ARMv8.2),
    # only the float order differs; on ARMv8.0 it computes in fp32 instead, which
    # differs by the int8 rounding of the activations. A wrongly unpacked weight
    # would differ by the whole product.
    rel = np.linalg.norm(theirs - ours) / np.linalg.norm(ours)
    assert rel < 1e-2, rel


# --- packages ---------------------------------------------------------------------


def test_package_runs_its_portable_graph_without_the_kernel(tiny_package):
    manifest = Manifest.read(tiny_package)
    assert manifest.custom_ops == ("ai.edgeslm",)
    assert manifest.portable_model in manifest.files
    model = edgeslm.load(tiny_package, n_threads=1)
    assert model.cache.dtype == np.float16  # the package's own graph
    logits = model.forward(model.tokenize("the weather")).copy()

    script = (
        "import json, sys, edgeslm\n"
        "m = edgeslm.load(sys.argv[1], n_threads=1)\n"
        "l = m.forward(m.tokenize('the weather')).tolist()\n"
        "r = m.generate('hello', max_tokens=8)\n"
        "print(json.dumps({'tokens': r.tokens, 'logits': l,\n"
        "                  'cache': str(m.cache.dtype)}))\n"
    )
    env = {**os.environ, "EDGESLM_KERNEL": "numpy"}
    run = subprocess.run(
        [sys.executable, "-c", script, str(tiny_package)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert "running" in run.stderr and "onnxruntime's own int8 operator" in run.stderr
    theirs = json.loads(run.stdout)
    assert theirs["cache"] == "float32" and len(theirs["tokens"]) == 8
    # The portable graph keeps its cache in float32 (GroupQueryAttention's query
    # type); the package's own graph rounds it to float16, which moves this random
    # model's logits by about 0.7% (norm). A wrongly unpacked weight would move
    # them by the whole product.
    rel = np.linalg.norm(np.array(theirs["logits"]) - logits) / np.linalg.norm(logits)
    assert rel < 2e-2, rel


def test_package_without_portable_graph_needs_the_kernel(tiny_package, tmp_path):
    import shutil

    copy = Path(shutil.copytree(tiny_package, tmp_path / "copy"))
    data = json.loads((copy / "edgeslm.json").read_text())
    data["portable_model"] = None
    (copy / "edgeslm.json").write_text(json.dumps(data))
    script = "import sys, edgeslm; edgeslm.load(sys.argv[1], verify=False)"
    run = subprocess.run(
        [sys.executable, "-c", script, str(copy)],
        capture_output=True,
        text=True,
        env={**os.environ, "EDGESLM_KERNEL": "numpy"},
    )
    assert run.returncode != 0
    assert "needs edgeslm's C kernel" in run.stderr and "C compiler" in run.stderr

    data["custom_ops"] = ["com.example.unknown"]
    (copy / "edgeslm.json").write_text(json.dumps(data))
    with pytest.raises(ModelFormatError, match="com.example.unknown"):
        edgeslm.load(copy, verify=False)
