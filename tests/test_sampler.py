"""The C sampler against the numpy reference, edge cases, statistics and settings.

The C kernel must be built (`pip install -e .`): tests that use backend="c" fail, not
skip, when it is missing.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeslm import _kernel
from edgeslm.errors import KernelError
from edgeslm.sampling import (
    _LOG2E,
    Sampler,
    SamplerSettings,
    _q_of_t,
    mask_words,
    rng_next,
    rng_seed,
    sample_reference,
)

BACKENDS = ["c", "numpy"]


@pytest.fixture(params=[0, 1], ids=["simd-off", "simd-on"])
def simd(request, lib):
    """Runs a test at the portable-C level and at the best SIMD level."""
    before = lib.esl_simd_level()
    level = lib.esl_simd_set(request.param)
    yield level
    lib.esl_simd_set(before)


def both(settings_: SamplerSettings, vocab: int) -> tuple[Sampler, Sampler]:
    return Sampler(settings_, vocab, backend="c"), Sampler(
        settings_, vocab, backend="numpy"
    )


def outcome(sampler: Sampler, logits: np.ndarray, **kw) -> object:
    """The token, or the exception type and message an error raises."""
    try:
        return sampler.sample(logits.copy(), **kw)
    except (KernelError, ValueError) as exc:
        return type(exc).__name__


def random_settings(rng: np.random.Generator, vocab: int) -> SamplerSettings:
    return SamplerSettings(
        temperature=float(rng.choice([0.0, 0.3, 0.7, 1.0, 1.5, 4.0])),
        top_k=int(rng.choice([0, 0, 1, 2, 5, 40, vocab, vocab + 7])),
        top_p=float(rng.choice([1.0, 1.0, 0.95, 0.9, 0.5, 0.1, 1e-9])),
        min_p=float(rng.choice([0.0, 0.0, 0.05, 0.2, 1.0])),
        repetition_penalty=float(rng.choice([1.0, 1.0, 1.3, 0.8])),
        frequency_penalty=float(rng.choice([0.0, 0.0, 0.5, -0.25])),
        presence_penalty=float(rng.choice([0.0, 0.0, 0.4])),
        penalty_window=int(rng.choice([0, 4, 64])),
        seed=int(rng.integers(0, 2**63)),
    )


def random_logits(rng: np.random.Generator, vocab: int) -> np.ndarray:
    kind = rng.integers(0, 5)
    if kind == 0:  # peaked, LLM-like
        x = rng.standard_normal(vocab) * 2.5
        top = rng.choice(vocab, min(vocab, 20), replace=False)
        x[top] += rng.uniform(3, 15, top.size)
    elif kind == 1:  # flat
        x = rng.standard_normal(vocab) * 0.3
    elif kind == 2:  # heavy ties
        x = rng.integers(-3, 3, vocab).astype(np.float64)
    elif kind == 3:  # wide range with -inf holes
        x = rng.uniform(-80, 40, vocab)
        x[rng.random(vocab) < 0.3] = -np.inf
    else:  # zeros of both signs
        x = np.where(rng.random(vocab) < 0.5, -0.0, 0.0)
        x[rng.integers(0, vocab)] = 1.0
    return x.astype(np.float32)


def random_extras(rng: np.random.Generator, vocab: int) -> dict:
    kw: dict = {}
    if rng.random() < 0.3:
        allowed = rng.random(vocab) < rng.choice([0.02, 0.5, 0.95])
        allowed[rng.integers(0, vocab)] = True
        kw["mask"] = pack_mask(allowed)
    if rng.random() < 0.3:
        ids = rng.choice(vocab, min(vocab, 5), replace=False)
        kw["bias"] = {int(i): float(rng.choice([-5.0, 2.5, -np.inf])) for i in ids}
    if rng.random() < 0.5:
        kw["recent_tokens"] = rng.integers(0, vocab, rng.integers(0, 100)).tolist()
    return kw


def pack_mask(allowed: np.ndarray) -> np.ndarray:
    words = np.zeros(mask_words(allowed.size) * 32, dtype=bool)
    words[: allowed.size] = allowed
    return np.packbits(words, bitorder="little").view("<u4").astype(np.uint32)


# ------------------------------------------------------------------------------


def test_c_kernel_is_built_and_used(lib):
    s = Sampler(SamplerSettings(seed=1), 10, backend="c")
    assert s.backend == "c"
    assert lib.esl_abi_version() == _kernel.ABI_VERSION
    assert _kernel.simd_name() in ("avx2", "neon", "c")


def test_rng_c_matches_python(lib):
    for seed in (0, 1, 2**64 - 1, 123456789):
        c_state = np.zeros(4, dtype=np.uint64)
        lib.esl_rng_seed(c_state.ctypes.data_as(_kernel._U64P), seed)
        py_state = rng_seed(seed)
        assert np.array_equal(c_state, py_state)
        for _ in range(50):
            assert lib.esl_rng_next(c_state.ctypes.data_as(_kernel._U64P)) == rng_next(
                py_state
            )


def test_q_of_t_cutoff_is_exact():
    # Every float32 in [-32, -31] maps to 0 and the top maps to exactly 2**30.
    lo, hi = np.float32(-32.0).view(np.uint32), np.float32(-31.0).view(np.uint32)
    t = np.arange(hi, lo + 1, dtype=np.uint32).view(np.float32)
    assert not _q_of_t(t).any()
    assert _q_of_t(np.array([0.0, -0.0, -np.inf], np.float32)).tolist() == [
        2**30,
        2**30,
        0,
    ]
    # monotone on a dense grid (not required by the definition, but expected)
    grid = np.linspace(-31, 0, 200001, dtype=np.float32)
    assert np.all(np.diff(_q_of_t(grid).astype(np.int64)) >= 0)


def c_fixed_softmax(lib, x: np.ndarray, temperature: float) -> tuple[np.ndarray, int]:
    q = np.zeros(x.size, dtype=np.uint32)
    z = np.zeros(1, dtype=np.uint64)
    status = lib.esl_fixed_softmax(
        x.ctypes.data, x.size, temperature, q.ctypes.data, z.ctypes.data
    )
    _kernel.check(status, "esl_fixed_softmax")
    return q, int(z[0])


def test_fixed_softmax_bit_identical(simd, lib):
    rng = np.random.default_rng(99)
    for _ in range(300):
        n = int(rng.integers(1, 3000))
        x = random_logits(rng, n)
        temperature = float(rng.choice([1e-6, 0.1, 0.7, 1.0, 2.0, 1e3]))
        q, z = c_fixed_softmax(lib, x, temperature)
        m = x.max()
        want = _q_of_t((x - m) * np.float32(_LOG2E / temperature))
        assert np.array_equal(q, want)
        assert z == int(want.astype(np.uint64).sum())


@pytest.mark.parametrize("backend", BACKENDS)
def test_min_p_threshold_is_a_ceiling(backend, lib):
    # Token 1 sits exactly one unit below ceil(min_p * 2**30): min-p must drop it.
    x = np.array([0.0, -1.0], dtype=np.float32)
    q1 = int(_q_of_t((x - x.max()) * np.float32(_LOG2E))[1])
    cfg = SamplerSettings(min_p=(q1 + 0.5) / 2**30, seed=5)
    s = Sampler(cfg, 2, backend=backend)
    assert {s.sample(x.copy()) for _ in range(200)} == {0}
    s = Sampler(dataclass_replace(cfg, min_p=q1 / 2**30), 2, backend=backend)
    assert {s.sample(x.copy()) for _ in range(200)} == {0, 1}


def test_c_matches_numpy_random_loop(simd):
    rng = np.random.default_rng(20240601 + simd)
    checked = 0
    for _ in range(700):
        vocab = int(rng.choice([1, 2, 7, 31, 32, 33, 100, 257, 1000, 4099]))
        cfg = random_settings(rng, vocab)
        c, n = both(cfg, vocab)
        for _ in range(3):
            x = random_logits(rng, vocab)
            kw = random_extras(rng, vocab)
            assert outcome(c, x, **kw) == outcome(n, x, **kw), (cfg, vocab, kw)
            assert np.array_equal(c.rng_state, n.rng_state)
            checked += 1
    assert checked == 2100


def test_c_matches_numpy_full_vocab(simd):
    rng = np.random.default_rng(7)
    vocab = 49152
    configs = [
        dict(temperature=0.8, top_k=40, top_p=0.95),
        dict(temperature=1.0, top_p=0.9),
        dict(temperature=1.0),
        dict(temperature=0.7, min_p=0.05),
        dict(temperature=1.0, top_k=50),
        dict(temperature=1.2, top_p=0.99, min_p=0.001),
        dict(temperature=1.0, top_k=5000, top_p=0.8),
        dict(temperature=0.0, repetition_penalty=1.3),
    ]
    for i, cfg in enumerate(configs):
        c, n = both(SamplerSettings(seed=i, **cfg), vocab)
        for _ in range(6):
            x = random_logits(rng, vocab)
            kw = random_extras(rng, vocab)
            assert outcome(c, x, **kw) == outcome(n, x, **kw), cfg


finite_or_special = st.one_of(
    st.floats(-1e4, 1e4, width=32),
    st.sampled_from([-np.inf, 0.0, -0.0, 1.0, 1e30, -1e30]),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    values=st.lists(finite_or_special, min_size=1, max_size=80),
    temperature=st.sampled_from([0.0, 1e-6, 0.5, 1.0, 3.0, 1e6]),
    top_k=st.integers(0, 90),
    top_p=st.sampled_from([1.0, 0.999, 0.9, 0.5, 0.01]),
    min_p=st.sampled_from([0.0, 0.1, 0.9, 1.0]),
    seed=st.integers(0, 2**64 - 1),
    nan_at=st.one_of(st.none(), st.integers(0, 79)),
)
def test_c_matches_numpy_hypothesis(
    lib, values, temperature, top_k, top_p, min_p, seed, nan_at
):
    x = np.array(values, dtype=np.float32)
    if nan_at is not None and nan_at < x.size:
        x[nan_at] = np.nan
    cfg = SamplerSettings(
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed
    )
    c, n = both(cfg, x.size)
    for _ in range(2):
        assert outcome(c, x) == outcome(n, x)


# ------------------------------------------------------------------------------
# The kernel's bound path (no top-k): tokens with t = (x - max) * c >= -12 get exact
# masses, the others only bounds on their sum, and the exact path runs when the bounds
# cannot decide (kernels/sampler.c, docs/SAMPLING.md). These tests pin the lemma it
# rests on and aim C-vs-numpy comparisons at the cases where the bounds are tight.

BULK_QMAX = 1 << 18  # ESL_BULK_QMAX
BULK_LO_NUM = 61600  # ESL_BULK_LO_NUM


def bulk_r(t: np.ndarray) -> np.ndarray:
    """The kernel's esl__bulk_r, float32 t < -12: rint of the chord of 2**(t + 30)."""
    ts = np.maximum(t * np.float32(2**23), np.float32(-(2**28)))
    chord = (ts.astype(np.int32) + np.int32(157 << 23)).view(np.float32)
    return np.rint(chord).astype(np.int64)


def test_bulk_bound_lemma_is_exhaustively_true():
    # Every float32 t in [-32, -12) (below -32 the kernel clamps to -32): q <= 2**18 and
    # floor(r * 61600 / 2**16) - 1 <= q <= r + (r >> 12) + 1. The kernel sums these
    # per-token bounds into bounds on Z; a single counterexample would make them wrong.
    lo = np.float32(12.0).view(np.uint32)
    hi = np.float32(32.0).view(np.uint32)
    checked = 0
    for start in range(int(lo) + 1, int(hi) + 1, 1 << 21):
        bits = np.arange(start, min(start + (1 << 21), int(hi) + 1), dtype=np.uint32)
        t = -bits.view(np.float32)
        q = _q_of_t(t).astype(np.int64)
        r = bulk_r(t)
        assert q.max() <= BULK_QMAX
        assert np.all(q <= r + (r >> 12) + 1)
        assert np.all(q >= ((r * BULK_LO_NUM) >> 16) - 1)
        checked += t.size
    assert checked == int(hi) - int(lo)
    assert bulk_r(np.array([-32.0, -np.inf], np.float32)).tolist() == [0, 0]
    assert _q_of_t(np.array([-12.0], np.float32))[0] == BULK_QMAX


def ulp_steps(base: float, steps: list[int]) -> np.ndarray:
    """float32 values `steps` ulps above (positive) or below `base` (< 0)."""
    bits = np.array([np.float32(base).view(np.int32)] * len(steps), np.int32)
    return (bits - np.array(steps, np.int32)).view(np.float32)  # more bits = lower


def threshold_logits(rng: np.random.Generator, vocab: int) -> np.ndarray:
    """max 0 (so with temperature log2(e), t = x); many tokens at or next to t = -12,
    where q = 2**18 on both sides of the candidate threshold, and a bulk below."""
    x = (rng.standard_normal(vocab) * 2.0 - 19.0).astype(np.float32)
    near = ulp_steps(-12.0, [-3, -2, -1, 0, 1, 2, 3])
    idx = rng.choice(vocab, min(vocab, 400), replace=False)
    x[idx] = near[rng.integers(0, near.size, idx.size)]
    top = rng.choice(vocab, 6, replace=False)
    x[top] = np.array([0.0, -0.5, -1.0, -3.0, -6.0, -11.0], np.float32)
    return x


def test_threshold_logits_have_the_intended_masses():
    near = ulp_steps(-12.0, [-3, -2, -1, 0, 1, 2, 3])
    assert near[3] == -12.0 and np.all(np.diff(near) > 0)
    # ties between bulk (t < -12) and candidate (t >= -12) tokens at exactly 2**18
    assert _q_of_t(near).tolist() == [BULK_QMAX - 1] + [BULK_QMAX] * 5 + [BULK_QMAX + 1]


def nucleus_top_p(x: np.ndarray, c: np.float32, before_mass: int) -> float:
    """top_p whose target falls `before_mass` into the q-ranked order (for aiming)."""
    q = _q_of_t((x - x.max()) * c).astype(np.int64)
    return min(1.0, before_mass / float(q.sum()))


def test_bound_path_at_the_candidate_threshold(simd):
    rng = np.random.default_rng(4242 + simd)
    c = np.float32(_LOG2E / _LOG2E)
    assert c == 1.0
    for vocab in (4096, 49152):
        x = threshold_logits(rng, vocab)
        q = _q_of_t(x - x.max()).astype(np.int64)
        order = np.lexsort((np.arange(vocab), -q))
        csum = np.cumsum(q[order])
        group = np.flatnonzero(q[order] == BULK_QMAX)
        # top-p targets inside the q = 2**18 group (bulk and candidate tokens tie there,
        # ranked by id), at its ends, and on exact prefix sums
        mid = group[len(group) // 2]
        targets = [csum[group[0]] - 1, csum[mid] + 0.5, csum[group[-1]]]
        configs = [dict(top_p=nucleus_top_p(x, c, t)) for t in targets]
        configs += [
            dict(),
            dict(min_p=2.0**-12),  # keeps every q = 2**18 token, bulk ones too
            dict(min_p=np.nextafter(2.0**-12, 1.0)),
            dict(min_p=np.nextafter(2.0**-12, 0.0)),
            dict(top_p=0.9, min_p=0.0001),
            dict(top_p=0.999999),
        ]
        for i, cfg in enumerate(configs):
            settings_ = SamplerSettings(temperature=_LOG2E, seed=100 + i, **cfg)
            a, b = both(settings_, vocab)
            for _ in range(25):
                assert a.sample(x.copy()) == b.sample(x.copy()), (vocab, cfg)
            assert np.array_equal(a.rng_state, b.rng_state)


def special_logits(kind: str, rng: np.random.Generator, vocab: int) -> np.ndarray:
    if kind == "all equal":
        return np.zeros(vocab, np.float32)
    if kind == "one huge":
        x = np.full(vocab, -1e30, np.float32)
        x[rng.integers(0, vocab)] = 1e30
        return x
    if kind == "one live":
        x = np.full(vocab, -np.inf, np.float32)
        x[rng.integers(0, vocab)] = -7.0
        return x
    if kind == "many ties":
        return rng.integers(-20, 1, vocab).astype(np.float32)
    if kind == "two levels":  # 16 top tokens, a heavier bulk 13 bits further down
        x = np.full(vocab, -9.0, np.float32)
        x[rng.choice(vocab, 16, replace=False)] = 0.0
        return x
    # "llm-like": a broad bulk under a few boosted tokens (the benchmark's shape)
    x = rng.standard_normal(vocab) * 2.5
    top = rng.choice(vocab, 20, replace=False)
    x[top] += rng.uniform(3, 15, 20)
    return x.astype(np.float32)


@pytest.mark.parametrize(
    "kind", ["all equal", "one huge", "one live", "many ties", "two levels", "llm-like"]
)
def test_bound_path_special_shapes(simd, kind):
    rng = np.random.default_rng(len(kind) * 1000 + simd)
    vocab = 49152
    configs = [
        dict(temperature=1.0),
        dict(temperature=1.0, top_p=0.9),
        dict(temperature=0.7, top_p=0.95, min_p=0.05),
        dict(temperature=1.0, min_p=0.01),
        dict(temperature=3.0, top_p=0.5),
        dict(temperature=1e-6, top_p=0.9),
    ]
    for i, cfg in enumerate(configs):
        a, b = both(SamplerSettings(seed=7 + i, **cfg), vocab)
        for _ in range(4):
            x = special_logits(kind, rng, vocab)
            assert a.sample(x.copy()) == b.sample(x.copy()), (kind, cfg)
        assert np.array_equal(a.rng_state, b.rng_state)


def test_top_p_on_exact_prefix_sums(simd):
    # top_p * Z exactly equal to (and one double ulp around) a prefix sum of the ranked
    # masses: the cut is decided by the exact Z, which the bound path only brackets.
    rng = np.random.default_rng(31 + simd)
    vocab = 49152
    for _ in range(4):
        x = special_logits("llm-like", rng, vocab)
        q = _q_of_t((x - x.max()) * np.float32(_LOG2E)).astype(np.int64)
        z = float(q.sum())
        ranked = np.sort(q)[::-1]
        for j in (1, 2, 3, 5):
            exact = float(ranked[:j].sum()) / z
            for top_p in (exact, np.nextafter(exact, 0.0), np.nextafter(exact, 1.0)):
                if not 0.0 < top_p <= 1.0:
                    continue
                a, b = both(SamplerSettings(top_p=float(top_p), seed=j), vocab)
                for _ in range(3):
                    assert a.sample(x.copy()) == b.sample(x.copy()), (j, top_p)


def test_temperature_only_draws_full_vocab(simd):
    # Draws land on candidates (decided by bounds) and in the bulk (exact path); the
    # same PRNG output must serve both.
    rng = np.random.default_rng(77 + simd)
    vocab = 49152
    for temperature in (0.7, 1.0, 2.0):
        a, b = both(SamplerSettings(temperature=temperature, seed=5), vocab)
        x = special_logits("llm-like", rng, vocab)
        got = [a.sample(x.copy()) for _ in range(150)]
        assert got == [b.sample(x.copy()) for _ in range(150)]
        assert np.array_equal(a.rng_state, b.rng_state)


# ------------------------------------------------------------------------------
# Edge cases, each on both backends.


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_inf_but_one(backend, lib):
    x = np.full(1000, -np.inf, dtype=np.float32)
    x[417] = -3.0
    for cfg in (SamplerSettings(seed=3), SamplerSettings(top_k=5, top_p=0.1, seed=3)):
        s = Sampler(cfg, 1000, backend=backend)
        assert [s.sample(x.copy()) for _ in range(20)] == [417] * 20


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_posinf_raises(backend, bad, lib):
    x = np.zeros(100, dtype=np.float32)
    x[50] = bad
    for temp in (0.0, 1.0):
        s = Sampler(SamplerSettings(temperature=temp, seed=1), 100, backend=backend)
        state = s.rng_state
        with pytest.raises(KernelError, match="NaN or \\+inf"):
            s.sample(x.copy())
        assert np.array_equal(s.rng_state, state)  # errors do not consume a draw


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_under_mask_is_ignored(backend, lib):
    x = np.zeros(64, dtype=np.float32)
    x[3] = np.nan
    allowed = np.ones(64, dtype=bool)
    allowed[3] = False
    s = Sampler(SamplerSettings(seed=1), 64, backend=backend)
    assert s.sample(x, mask=pack_mask(allowed)) != 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_masked_raises(backend, lib):
    s = Sampler(SamplerSettings(seed=1), 70, backend=backend)
    with pytest.raises(KernelError, match="masked"):
        s.sample(np.zeros(70, np.float32), mask=np.zeros(3, np.uint32))
    with pytest.raises(KernelError, match="masked"):
        s.sample(np.full(70, -np.inf, np.float32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_only_allowed_tokens(backend, lib):
    rng = np.random.default_rng(5)
    allowed = rng.random(1000) < 0.05
    s = Sampler(SamplerSettings(temperature=2.0, seed=4), 1000, backend=backend)
    for _ in range(200):
        tok = s.sample(
            rng.standard_normal(1000).astype(np.float32), mask=pack_mask(allowed)
        )
        assert allowed[tok]


def test_c_mask_writes_logits_in_place(lib):
    x = np.ones(40, dtype=np.float32)
    allowed = np.zeros(40, dtype=bool)
    allowed[[1, 39]] = True
    Sampler(SamplerSettings(seed=1), 40, backend="c").sample(x, mask=pack_mask(allowed))
    assert np.isneginf(x[~allowed]).all() and (x[allowed] == 1).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_k_beyond_vocab_equals_off(backend, lib):
    rng = np.random.default_rng(8)
    a = Sampler(SamplerSettings(top_k=0, seed=9), 300, backend=backend)
    b = Sampler(SamplerSettings(top_k=10_000, seed=9), 300, backend=backend)
    for _ in range(100):
        x = rng.standard_normal(300).astype(np.float32)
        assert a.sample(x.copy()) == b.sample(x.copy())


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_is_first_argmax_and_draws_nothing(backend, lib):
    x = np.array([0.0, 3.0, -1.0, 3.0, 2.0], dtype=np.float32)
    s = Sampler(SamplerSettings(temperature=0.0, seed=5), 5, backend=backend)
    state = s.rng_state
    assert s.sample(x.copy()) == 1
    assert np.array_equal(s.rng_state, state)


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_k_one_and_tiny_top_p_are_greedy(backend, lib):
    rng = np.random.default_rng(11)
    for cfg in (SamplerSettings(top_k=1, seed=2), SamplerSettings(top_p=1e-9, seed=2)):
        s = Sampler(cfg, 500, backend=backend)
        for _ in range(50):
            x = rng.standard_normal(500).astype(np.float32)
            assert s.sample(x.copy()) == int(np.argmax(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_bans_and_forces(backend, lib):
    x = np.zeros(10, dtype=np.float32)
    s = Sampler(SamplerSettings(seed=1), 10, backend=backend)
    assert s.sample(x.copy(), bias={7: 100.0}) == 7
    banned = {i: -np.inf for i in range(10) if i != 2}
    assert s.sample(x.copy(), bias=banned) == 2
    with pytest.raises(ValueError, match="bias token ids"):
        s.sample(x.copy(), bias={10: 1.0})


@pytest.mark.parametrize("backend", BACKENDS)
def test_penalties(backend, lib):
    x = np.array([2.0, -2.0, 1.9, 0.0], dtype=np.float32)
    greedy = dict(temperature=0.0)
    s = Sampler(SamplerSettings(repetition_penalty=1.1, **greedy), 4, backend=backend)
    assert s.sample(x.copy(), recent_tokens=[0]) == 2  # 2 / 1.1 < 1.9
    s = Sampler(SamplerSettings(presence_penalty=0.2, **greedy), 4, backend=backend)
    assert s.sample(x.copy(), recent_tokens=[0, 0, 0]) == 2
    s = Sampler(SamplerSettings(frequency_penalty=0.05, **greedy), 4, backend=backend)
    assert s.sample(x.copy(), recent_tokens=[0]) == 0  # 1.95 > 1.9
    assert s.sample(x.copy(), recent_tokens=[0, 0, 0]) == 2  # 1.85 < 1.9
    s = Sampler(
        SamplerSettings(presence_penalty=1.0, penalty_window=1, **greedy),
        4,
        backend=backend,
    )
    assert s.sample(x.copy(), recent_tokens=[0, 2]) == 0  # only the last token counts
    with pytest.raises(ValueError, match="recent_tokens must be in"):
        s.sample(x.copy(), recent_tokens=[4])


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_reproducible_stream(backend, lib):
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal(200).astype(np.float32) for _ in range(50)]
    cfg = SamplerSettings(temperature=1.5, seed=42)
    a = Sampler(cfg, 200, backend=backend)
    b = Sampler(cfg, 200, backend=backend)
    c = Sampler(dataclass_replace(cfg, seed=43), 200, backend=backend)
    ta = [a.sample(x.copy()) for x in xs]
    assert ta == [b.sample(x.copy()) for x in xs]
    assert ta != [c.sample(x.copy()) for x in xs]


def dataclass_replace(cfg: SamplerSettings, **kw) -> SamplerSettings:
    import dataclasses

    return dataclasses.replace(cfg, **kw)


def test_shape_errors(lib):
    for backend in BACKENDS:
        s = Sampler(SamplerSettings(seed=1), 10, backend=backend)
        with pytest.raises(ValueError, match=r"logits must have shape \(10,\)"):
            s.sample(np.zeros(11, np.float32))
        with pytest.raises(ValueError, match="mask must have 1 uint32 words"):
            s.sample(np.zeros(10, np.float32), mask=np.zeros(2, np.uint32))


# ------------------------------------------------------------------------------
# Statistics: the C sampler's frequencies match the softmax.


def test_c_distribution_matches_softmax(lib):
    logits = np.array([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, -4.0], dtype=np.float32)
    temperature = 0.9
    p = np.exp(logits / temperature)
    p /= p.sum()
    s = Sampler(SamplerSettings(temperature=temperature, seed=2024), 8, backend="c")
    n = 40_000
    counts = np.bincount([s.sample(logits.copy()) for _ in range(n)], minlength=8)
    chi2 = float(((counts - n * p) ** 2 / (n * p)).sum())
    assert chi2 < 35.0, (chi2, counts, n * p)  # df = 7; p-value ~ 1e-5


def test_c_distribution_top_k_top_p(lib):
    logits = np.log(np.array([0.4, 0.3, 0.2, 0.06, 0.04], dtype=np.float64)).astype(
        np.float32
    )
    s = Sampler(SamplerSettings(top_k=4, top_p=0.85, seed=77), 5, backend="c")
    n = 30_000
    counts = np.bincount([s.sample(logits.copy()) for _ in range(n)], minlength=5)
    # top-k keeps 4 (mass 0.96), top-p 0.85 of that keeps the first 3.
    assert counts[3] == counts[4] == 0
    p = np.array([0.4, 0.3, 0.2]) / 0.9
    chi2 = float(((counts[:3] - n * p) ** 2 / (n * p)).sum())
    assert chi2 < 25.0, (chi2, counts)


# ------------------------------------------------------------------------------
# Settings validation.


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("top_p", 1.5, "top_p must be in (0, 1], got 1.5"),
        ("top_p", 0.0, "top_p must be in (0, 1], got 0.0"),
        ("min_p", -0.1, "min_p must be in [0, 1], got -0.1"),
        ("temperature", -1.0, "temperature must be 0 (greedy) or in [1e-06, 1e+06]"),
        ("temperature", math.nan, "temperature must be"),
        ("top_k", -1, "top_k must be in [0, 4194304] (0 = off), got -1"),
        ("repetition_penalty", 0.0, "repetition_penalty must be in [0.001, 1000]"),
        ("frequency_penalty", math.inf, "frequency_penalty must be in [-100, 100]"),
        ("penalty_window", -2, "penalty_window must be in [0, 2**31 - 1], got -2"),
        ("seed", -1, "seed must be in [0, 2**64) or None, got -1"),
    ],
)
def test_settings_validation(field, value, message):
    with pytest.raises(ValueError) as info:
        SamplerSettings(**{field: value})
    assert message in str(info.value)


def test_settings_types():
    with pytest.raises(TypeError, match="top_k must be an int"):
        SamplerSettings(top_k=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="temperature must be a number"):
        SamplerSettings(temperature="hot")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="vocab_size must be in"):
        Sampler(SamplerSettings(), 0)
    with pytest.raises(ValueError, match="backend must be one of"):
        Sampler(SamplerSettings(), 10, backend="gpu")


def test_reference_does_not_modify_input():
    x = np.ones(33, dtype=np.float32)
    sample_reference(x, SamplerSettings(), rng_seed(1), mask=np.zeros(2, np.uint32) + 1)
    assert (x == 1).all()


# ------------------------------------------------------------------------------
# Library selection through the environment (fresh interpreters).


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, **env}
    return subprocess.run(
        [sys.executable, "-c", code],
        env=full,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_env_forces_numpy():
    code = (
        "from edgeslm.sampling import Sampler, SamplerSettings\n"
        "print(Sampler(SamplerSettings(), 5).backend)"
    )
    out = run_python(code, EDGESLM_KERNEL="numpy")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "numpy"


def test_env_missing_library_warns_and_falls_back(tmp_path):
    code = (
        "import logging; logging.basicConfig(level=logging.WARNING)\n"
        "from edgeslm.sampling import Sampler, SamplerSettings\n"
        "print(Sampler(SamplerSettings(), 5).backend)\n"
        "print(Sampler(SamplerSettings(), 5).backend)"
    )
    missing = str(tmp_path / "nope.so")
    out = run_python(code, EDGESLM_KERNEL_LIB=missing, EDGESLM_KERNEL="auto")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["numpy", "numpy"]
    assert out.stderr.count("cannot load the C kernel") == 1
    forced = run_python(code, EDGESLM_KERNEL_LIB=missing, EDGESLM_KERNEL="c")
    assert forced.returncode != 0 and "KernelError" in forced.stderr


def test_env_explicit_library(lib):
    code = (
        "from edgeslm.sampling import Sampler, SamplerSettings\n"
        "print(Sampler(SamplerSettings(), 5).backend)"
    )
    out = run_python(code, EDGESLM_KERNEL_LIB=str(_kernel.default_library_path()))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "c"


def test_kernel_selftest_hash(tmp_path):
    """kernels/selftest.c pins a hash that aarch64 (NEON) builds must reproduce too."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    assert cc, "a C compiler is needed to build kernels/selftest.c: apt-get install gcc"
    kernels = Path(__file__).resolve().parent.parent / "kernels"
    sources = [str(kernels / f"{name}.c") for name in ("selftest", "common", "sampler")]
    exe = tmp_path / "selftest"
    build = [cc, "-O2", "-std=c99", "-ffp-contract=off", f"-I{kernels}", *sources]
    subprocess.run(
        [*build, str(kernels / "kvcache.c"), "-lm", "-o", str(exe)], check=True
    )
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "MISMATCH" not in out.stdout


def test_build_without_a_compiler_still_installs(tmp_path):
    """setup.py's optional build: a failing compiler warns and builds nothing,
    and the install goes on (the runtime then falls back to numpy, as
    test_env_missing_library_warns_and_falls_back shows)."""
    repo = Path(__file__).resolve().parent.parent
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(repo / name, tmp_path / name)
    shutil.copytree(repo / "kernels", tmp_path / "kernels")
    (tmp_path / "edgeslm").mkdir()
    (tmp_path / "edgeslm" / "__init__.py").write_text("")
    env = dict(os.environ, CC="/bin/false")
    build = [sys.executable, "setup.py", "build_ext", "--build-lib", "out"]
    done = subprocess.run(
        build, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "building the C kernel failed" in done.stderr
    assert "numpy reference" in done.stderr
    assert not list(tmp_path.rglob("_edgeslm_kernel*.so"))
