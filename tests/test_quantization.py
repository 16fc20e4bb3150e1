"""Quantization schemes of the exporter: 4-bit blocks, and activation smoothing.

- int4 (`Int4Blocks`): GGUF Q4_0/Q4_1 blocks are read as they are stored, a float
  weight's min/max blocks round-trip exactly, and the graph's `MatMulQ4` (the C
  kernel, kernels/qmatmul4.c) computes `x @ W.T` to the rounding of its int8
  activations, as its numpy statement does.
- smoothing: rescaling activations into the weights leaves the fp32 model's function
  unchanged, and only int8 Llama exports use it.
- the KV cache's type follows the quantization: float16 for int8 only.
"""

from __future__ import annotations

import gguf
import numpy as np
import onnxruntime as ort
import pytest
from checkpoints import TINY_LLAMA, make_llama_folder, smollm2_gguf
from onnx import TensorProto

import edgeslm
from edgeslm import _kernel
from edgeslm.export import _write_package, export_model
from edgeslm.export.checkpoint import open_checkpoint
from edgeslm.export.gguf_reader import _dequantize, _int4_blocks
from edgeslm.export.onnx_graph import GraphBuilder
from edgeslm.export.quantize import (
    concat_int4,
    pack_q4,
    quantize_int4_blocks,
    reference_matmul_q4,
)
from edgeslm.export.smoothing import activation_ranges, smooth_checkpoint
from edgeslm.manifest import Manifest

# --- 4-bit blocks ----------------------------------------------------------------


def test_int4_blocks_round_trip_their_own_values():
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((48, 96)).astype(np.float32)
    weight[3, :32] = 0.25  # a constant block
    blocks = quantize_int4_blocks(weight)

    values = blocks.dequantize()
    assert np.abs(values - weight).max() <= blocks.scales.max() / 2 + 1e-6
    # Quantizing values that already lie on a block grid gives them back exactly.
    again = quantize_int4_blocks(values)
    np.testing.assert_array_equal(again.q, blocks.q)
    np.testing.assert_allclose(again.dequantize(), values, rtol=0, atol=1e-6)

    stacked = concat_int4([blocks, quantize_int4_blocks(weight[:5])])
    assert stacked.q.shape == (53, 3, 32)


def test_int4_rejects_what_it_cannot_hold():
    with pytest.raises(NotImplementedError, match="K % 32"):
        quantize_int4_blocks(np.zeros((4, 40), np.float32))
    with pytest.raises(ValueError, match="2-D"):
        quantize_int4_blocks(np.zeros(32, np.float32))


def test_gguf_q4_1_blocks_are_read_as_stored():
    # The default model's linear layers are Q4_1 in its GGUF; their blocks must give
    # exactly the values that dequantizing the file gives, Q/K permutation included.
    path = smollm2_gguf()
    reader = gguf.GGUFReader(str(path))
    config = open_checkpoint(path).config
    tensors = {t.name: t for t in reader.tensors}
    for gguf_name, name in (
        ("blk.0.attn_q.weight", "layers.0.wq"),
        ("blk.0.attn_k.weight", "layers.0.wk"),
        ("blk.3.ffn_down.weight", "layers.3.w_down"),
    ):
        tensor = tensors[gguf_name]
        blocks = _int4_blocks(tensor, name, config, path)
        assert blocks is not None, gguf_name
        expected = _dequantize(tensor, name, config, path)
        np.testing.assert_array_equal(blocks.dequantize(), expected)
    # Other types are not 4-bit blocks (token_embd is Q8_0 there).
    embd = tensors["token_embd.weight"]
    assert _int4_blocks(embd, "embed", config, path) is None


def _run_linear(dtype: str, weight, x: np.ndarray) -> np.ndarray:
    b = GraphBuilder(dtype)
    b.input("x", TensorProto.FLOAT, [1, "T", x.shape[-1]])
    out = b.linear("x", weight, "proj")
    b.node("Identity", [out], outputs=["y"])
    b.output("y", TensorProto.FLOAT, [1, "T", None])
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(_kernel.operator_library()))
    session = ort.InferenceSession(
        b.model("linear").SerializeToString(),
        options,
        providers=["CPUExecutionProvider"],
    )
    return session.run(None, {"x": x})[0]


def test_int4_linear_computes_the_blocks_product():
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((256, 512)).astype(np.float32) * 0.05
    blocks = quantize_int4_blocks(weight)
    x = rng.standard_normal((1, 4, 512)).astype(np.float32)
    x[..., ::17] *= 20  # activation outliers, as after RMS norms
    exact = x @ blocks.dequantize().T

    got = _run_linear("int4", blocks, x)
    rms = np.sqrt(np.mean((got - exact) ** 2) / np.mean(exact**2))
    # Only the int8 rounding of activations (chunks of 32) separates the two.
    assert rms < 0.0135, rms
    stated = reference_matmul_q4(x.reshape(4, 512), pack_q4(blocks))
    np.testing.assert_allclose(got.reshape(4, -1), stated, rtol=1e-5, atol=1e-5)
    # Float weights go through the same blocks.
    np.testing.assert_allclose(_run_linear("int4", weight, x), got, rtol=0, atol=1e-5)


# --- smoothing -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, shared_data):
    return make_llama_folder(
        tmp_path_factory.mktemp("smooth-src"), shared_data, **TINY_LLAMA
    )


def test_smoothing_keeps_the_fp32_function(tiny_llama, tmp_path):
    ckpt = open_checkpoint(tiny_llama)
    ids = list(range(5, 69))
    smoothed = smooth_checkpoint(ckpt, activation_ranges(ckpt, ids), alpha=0.5)
    # The norms and weights really changed...
    name = "layers.0.attn_norm"
    assert not np.allclose(smoothed.load(name), ckpt.load(name))

    # ...but an fp32 graph of the smoothed weights computes the same logits.
    plain = export_model(tiny_llama, tmp_path / "plain", dtype="fp32")
    folder = tmp_path / "smoothed"
    folder.mkdir()
    _write_package(smoothed, folder, "fp32", 32, smooth=0)
    a = edgeslm.load(plain, n_threads=1)
    b = edgeslm.load(folder, n_threads=1)
    for token in [1, 17, 230, 4000, 77]:
        np.testing.assert_allclose(
            b.forward([token]), a.forward([token]), rtol=0, atol=1e-4
        )


def test_smoothing_is_recorded_and_only_for_int8(tiny_llama, tmp_path):
    int8 = export_model(tiny_llama, tmp_path / "int8")
    assert Manifest.read(int8).quantization == "int8-block32, smoothed alpha 0.5"
    off = export_model(tiny_llama, tmp_path / "off", smooth=0, block_size=64)
    assert Manifest.read(off).quantization == "int8-block64"
    int4 = export_model(tiny_llama, tmp_path / "int4", dtype="int4")
    assert Manifest.read(int4).quantization.startswith("int4-block32")
    with pytest.raises(ValueError, match="smooth must be in"):
        export_model(tiny_llama, tmp_path / "bad", smooth=1.5)


def test_int8_block_length_must_divide_the_layers(tiny_llama, tmp_path):
    # The tiny Llama's hidden size is 64: blocks of 128 cannot tile it, and the
    # error names the size and the lengths that would.
    with pytest.raises(ValueError, match=r"hidden_size \(64\).*\[32, 64\]"):
        export_model(tiny_llama, tmp_path / "b128", block_size=128)
    with pytest.raises(ValueError, match="block_size must be one of"):
        export_model(tiny_llama, tmp_path / "b24", block_size=24)
    assert not (tmp_path / "b128").exists()
    b64 = export_model(tiny_llama, tmp_path / "b64", block_size=64)
    assert Manifest.read(b64).quantization.startswith("int8-block64")


def test_int8_packages_cache_in_float16_int4_and_fp32_in_float32(
    tiny_package, tiny_folder, tmp_path
):
    # int4 weights are the source's exactly (a GGUF's Q4_1 blocks), so its cache
    # keeps float32: rounding it would be the package's largest departure from fp32
    int4 = export_model(tiny_folder, tmp_path / "int4", dtype="int4")
    fp32 = export_model(tiny_folder, tmp_path / "fp32", dtype="fp32")
    dtypes = [
        edgeslm.load(p, n_threads=1).cache.dtype for p in (tiny_package, int4, fp32)
    ]
    assert dtypes == [np.float16, np.float32, np.float32]
