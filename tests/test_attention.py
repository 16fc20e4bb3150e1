"""The cached attention operator (kernels/attention.c, ort_attention.c).

`ai.edgeslm::CachedAttention` takes GroupQueryAttention's inputs as edgeslm's decoder
graphs give them; onnxruntime's own GroupQueryAttention is the oracle: the same
outputs and cache contents for a prompt, for decode steps, with and without RoPE, at
every SIMD level, with present bound to past's buffer (as the runtime does) or not.
Then its errors, and a float64 numpy statement of the computation.
The C kernel must be built (`pip install -e .`); a missing library fails these tests.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeslm import _kernel

HEAD_DIM = 16


def _graph(
    domain: str,
    heads: int,
    kv_heads: int,
    max_seq: int,
    rotary: bool,
    cache: int = TensorProto.FLOAT,
):
    op = "CachedAttention" if domain == "ai.edgeslm" else "GroupQueryAttention"
    width = (heads + 2 * kv_heads) * HEAD_DIM
    inputs = [
        helper.make_tensor_value_info("qkv", TensorProto.FLOAT, [1, "s", width]),
        helper.make_tensor_value_info(
            "past_key", cache, [1, kv_heads, max_seq, HEAD_DIM]
        ),
        helper.make_tensor_value_info(
            "past_value", cache, [1, kv_heads, max_seq, HEAD_DIM]
        ),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
        helper.make_tensor_value_info("total", TensorProto.INT32, []),
    ]
    angles = np.outer(
        np.arange(max_seq), 1.0 / 10000 ** (np.arange(HEAD_DIM // 2) * 2 / HEAD_DIM)
    )
    inits = [
        numpy_helper.from_array(np.cos(angles).astype(np.float32), "cos"),
        numpy_helper.from_array(np.sin(angles).astype(np.float32), "sin"),
    ]
    node = helper.make_node(
        op,
        ["qkv", "", "", "past_key", "past_value", "seqlens_k", "total"]
        + (["cos", "sin"] if rotary else []),
        ["out", "present_key", "present_value"],
        domain=domain,
        num_heads=heads,
        kv_num_heads=kv_heads,
        do_rotary=int(rotary),
        **({"rotary_interleaved": 0} if op == "GroupQueryAttention" else {}),
    )
    outputs = [
        helper.make_tensor_value_info("out", TensorProto.FLOAT, None),
        helper.make_tensor_value_info("present_key", cache, None),
        helper.make_tensor_value_info("present_value", cache, None),
    ]
    graph = helper.make_graph([node], "attn", inputs, outputs, inits)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid(domain, 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    return model.SerializeToString()


def _session(model: bytes, threads: int = 1):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.register_custom_ops_library(str(_kernel.operator_library()))
    return ort.InferenceSession(model, options)


class _Cache:
    """A past/present buffer pair bound to one array, as edgeslm's runtime binds it."""

    def __init__(self, session, kv_heads: int, max_seq: int, dtype=np.float32):
        self.session = session
        self.key = np.zeros((1, kv_heads, max_seq, HEAD_DIM), dtype)
        self.value = np.zeros_like(self.key)
        self.io = session.io_binding()
        for name, array in (("key", self.key), ("value", self.value)):
            value = ort.OrtValue.ortvalue_from_numpy(array)
            self.io.bind_ortvalue_input(f"past_{name}", value)
            self.io.bind_ortvalue_output(f"present_{name}", value)
            setattr(self, f"_{name}_value", value)

    def step(self, qkv: np.ndarray, total: int) -> np.ndarray:
        self.io.bind_cpu_input("qkv", qkv)
        self.io.bind_cpu_input("seqlens_k", np.array([total - 1], np.int32))
        self.io.bind_cpu_input("total", np.array(total, np.int32))
        self.io.bind_output("out")  # a fresh output each step: its shape changes
        self.session.run_with_iobinding(self.io)
        return self.io.copy_outputs_to_cpu()[-1]  # "out", bound last


@pytest.mark.parametrize("rotary", [True, False])
@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (3, 3), (6, 1)])
@pytest.mark.parametrize("threads", [1, 2])
def test_matches_group_query_attention(lib, levels, rotary, heads, kv_heads, threads):
    max_seq, prompt, steps = 48, 19, 6
    rng = np.random.default_rng(heads * 10 + kv_heads)
    width = (heads + 2 * kv_heads) * HEAD_DIM
    tokens = rng.standard_normal((1, prompt + steps, width)).astype(np.float32) * 2
    theirs = _Cache(_session(_graph("com.microsoft", heads, kv_heads, max_seq, rotary)),
                    kv_heads, max_seq)  # fmt: skip
    want = [theirs.step(tokens[:, :prompt], prompt)]
    for t in range(prompt, prompt + steps):
        want.append(theirs.step(tokens[:, t : t + 1], t + 1))
    for level in levels:
        lib.esl_qmm_set_level(level)
        ours = _Cache(
            _session(_graph("ai.edgeslm", heads, kv_heads, max_seq, rotary), threads),
            kv_heads,
            max_seq,
        )
        got = [ours.step(tokens[:, :prompt], prompt)]
        for t in range(prompt, prompt + steps):
            got.append(ours.step(tokens[:, t : t + 1], t + 1))
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
        n = prompt + steps
        np.testing.assert_allclose(
            ours.key[..., :n, :], theirs.key[..., :n, :], atol=1e-5
        )
        np.testing.assert_array_equal(ours.value, theirs.value)


def test_equals_the_numpy_statement(lib):
    heads, kv_heads, max_seq, s, total = 4, 2, 32, 5, 12
    rng = np.random.default_rng(3)
    width = (heads + 2 * kv_heads) * HEAD_DIM
    qkv = rng.standard_normal((1, s, width)).astype(np.float32)
    cache = _Cache(_session(_graph("ai.edgeslm", heads, kv_heads, max_seq, False)),
                   kv_heads, max_seq)  # fmt: skip
    cache.key[..., : total - s, :] = rng.standard_normal(
        (kv_heads, total - s, HEAD_DIM)
    )
    cache.value[..., : total - s, :] = rng.standard_normal(
        (kv_heads, total - s, HEAD_DIM)
    )
    out = cache.step(qkv, total).reshape(s, heads, HEAD_DIM)

    q = qkv[0, :, : heads * HEAD_DIM].reshape(s, heads, HEAD_DIM).astype(np.float64)
    keys, values = cache.key[0].astype(np.float64), cache.value[0].astype(np.float64)
    for i in range(s):
        visible = total - s + i + 1
        for h in range(heads):
            kv = h // (heads // kv_heads)
            scores = keys[kv, :visible] @ q[i, h] / np.sqrt(HEAD_DIM)
            p = np.exp(scores - scores.max())
            want = (p / p.sum()) @ values[kv, :visible]
            np.testing.assert_allclose(out[i, h], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rotary", [True, False])
@pytest.mark.parametrize("threads", [1, 2])
def test_half_cache_holds_the_float_cache_rounded(lib, levels, rotary, threads):
    # The float16 registration: the same keys (rotated in float) and values, each
    # rounded to the nearest half, and the attention of the new tokens over those.
    heads, kv_heads, max_seq, prompt, steps = 4, 2, 40, 17, 5
    rng = np.random.default_rng(int(rotary) + 2 * threads)
    width = (heads + 2 * kv_heads) * HEAD_DIM
    tokens = rng.standard_normal((1, prompt + steps, width)).astype(np.float32) * 3
    n = prompt + steps

    def run(cache_type, dtype):
        graph = _graph("ai.edgeslm", heads, kv_heads, max_seq, rotary, cache_type)
        cache = _Cache(_session(graph, threads), kv_heads, max_seq, dtype)
        outs = [cache.step(tokens[:, :prompt], prompt)]
        for t in range(prompt, n):
            outs.append(cache.step(tokens[:, t : t + 1], t + 1))
        return cache, outs

    full, _ = run(TensorProto.FLOAT, np.float32)
    for level in levels:
        lib.esl_qmm_set_level(level)
        half, outs = run(TensorProto.FLOAT16, np.float16)
        np.testing.assert_array_equal(half.key, full.key.astype(np.float16))
        np.testing.assert_array_equal(half.value, full.value.astype(np.float16))

        # The last step's output: the float64 statement over the halves.
        keys = half.key[0, :, :n].astype(np.float64)
        values = half.value[0, :, :n].astype(np.float64)
        q = tokens[0, -1, : heads * HEAD_DIM].reshape(heads, HEAD_DIM)
        q = q.astype(np.float64)
        if rotary:  # the query rotated as the keys were (rotate-half)
            angles = (n - 1) / 10000 ** (np.arange(HEAD_DIM // 2) * 2 / HEAD_DIM)
            c, s_ = np.cos(angles), np.sin(angles)
            a, b = q[:, : HEAD_DIM // 2].copy(), q[:, HEAD_DIM // 2 :].copy()
            q = np.concatenate([a * c - b * s_, a * s_ + b * c], axis=1)
        for h in range(heads):
            kv = h // (heads // kv_heads)
            scores = keys[kv] @ q[h] / np.sqrt(HEAD_DIM)
            p = np.exp(scores - scores.max())
            want = (p / p.sum()) @ values[kv]
            got = outs[-1].reshape(heads, HEAD_DIM)[h]
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def _half_probes() -> np.ndarray:
    """Every finite half, the midpoints between neighbours (ties go to the even one)
    and a little either side of them, overflow to infinity, subnormals, signed zeros
    and infinities, as float32."""
    halves = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    finite = halves[np.isfinite(halves)].astype(np.float64)
    ordered = np.unique(finite)
    mids = (ordered[:-1] + ordered[1:]) / 2
    return np.concatenate(
        [
            finite,
            mids,
            np.nextafter(mids.astype(np.float32), np.float32(np.inf)),
            np.nextafter(mids.astype(np.float32), np.float32(-np.inf)),
            [65504.0, 65519.99, 65520.0, 1e6, -1e6, 1e-8, -1e-8, 2.0**-25, 2.0**-24],
            [0.0, -0.0, np.inf, -np.inf],
        ]
    ).astype(np.float32)


def _numpy_halves(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # numpy warns as it rounds 1e6 to infinity
        return x.astype(np.float16).view(np.uint16)


def test_half_conversion_rounds_to_nearest_even(lib):
    # The scalar rounding of every probe, as numpy's float16 conversion.
    probes = _half_probes()
    got = np.array([lib.esl_qmm_to_half(float(x)) for x in probes], np.uint16)
    np.testing.assert_array_equal(got, _numpy_halves(probes))
    assert np.isnan(np.uint16(lib.esl_qmm_to_half(float("nan"))).view(np.float16))


def test_vector_half_stores_give_the_scalar_bits(lib, levels):
    # CachedAttention stores new keys and values with each ISA's vector conversion
    # (F16C, fcvtn): every probe, at every offset of a vector and with a NaN in some
    # groups (those take the scalar path: the canonical quiet NaN).
    probes = _half_probes()
    with_nans = probes.copy()
    with_nans[::997] = np.nan
    cases = [
        (probes, _numpy_halves(probes)),
        (
            with_nans,
            np.array([lib.esl_qmm_to_half(float(x)) for x in with_nans], np.uint16),
        ),
    ]
    for level in levels:
        lib.esl_qmm_set_level(level)
        for x, expected in cases:
            for start in (0, 1, 3):  # the vector groups at each alignment
                src = np.ascontiguousarray(x[start:])
                got = np.zeros(len(src), np.uint16)
                lib.esl_attn_to_half(got.ctypes.data, src.ctypes.data, len(src))
                np.testing.assert_array_equal(
                    got, expected[start:], err_msg=f"level {level}"
                )


def test_present_in_its_own_buffer_gets_the_past(lib):
    heads, kv_heads, max_seq = 2, 1, 16
    rng = np.random.default_rng(5)
    session = _session(_graph("ai.edgeslm", heads, kv_heads, max_seq, True))
    past = rng.standard_normal((1, kv_heads, max_seq, HEAD_DIM)).astype(np.float32)
    feeds = {
        "qkv": rng.standard_normal((1, 1, 4 * HEAD_DIM)).astype(np.float32),
        "past_key": past,
        "past_value": past.copy(),
        "seqlens_k": np.array([9], np.int32),
        "total": np.array(10, np.int32),
    }
    _, present_key, present_value = session.run(None, feeds)
    np.testing.assert_array_equal(present_key[..., :9, :], past[..., :9, :])
    np.testing.assert_array_equal(present_value[..., 10:, :], past[..., 10:, :])
    assert not np.array_equal(present_value[..., 9, :], past[..., 9, :])


def test_inconsistent_inputs_are_refused(lib):
    session = _session(_graph("ai.edgeslm", 4, 2, 16, True))
    base = {
        "qkv": np.zeros((1, 1, 8 * HEAD_DIM), np.float32),
        "past_key": np.zeros((1, 2, 16, HEAD_DIM), np.float32),
        "past_value": np.zeros((1, 2, 16, HEAD_DIM), np.float32),
        "seqlens_k": np.array([4], np.int32),
        "total": np.array(5, np.int32),
    }
    session.run(None, base)
    for change in (
        {"total": np.array(17, np.int32), "seqlens_k": np.array([16], np.int32)},
        {"seqlens_k": np.array([2], np.int32)},
        {"qkv": np.zeros((1, 6, 8 * HEAD_DIM), np.float32)},  # 6 new tokens of 5
    ):
        with pytest.raises(Exception, match="CachedAttention: inconsistent inputs"):
            session.run(None, {**base, **change})
