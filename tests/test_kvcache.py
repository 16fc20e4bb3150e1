"""KV cache: layout, bookkeeping, shift with RoPE re-rotation, save/load, corruption.

Every behaviour runs on the C kernel and the numpy reference; the C kernel must be
built (`pip install -e .`), a missing library fails these tests.
"""

from __future__ import annotations

import struct
import sys
import zlib

import numpy as np
import pytest

from edgeslm.errors import ModelFormatError
from edgeslm.kvcache import KVCache

BACKENDS = ["c", "numpy"]


# Every test here needs the C kernel (conftest's `lib`: a missing library fails).
pytestmark = pytest.mark.usefixtures("lib")


def rope(x: np.ndarray, positions: np.ndarray, theta: float, rotary_dim: int):
    """Independent float64 RoPE oracle (rotate_half): x (..., seq, dim)."""
    half = rotary_dim // 2
    inv = theta ** (-np.arange(half, dtype=np.float64) * 2.0 / rotary_dim)
    ang = positions[:, None].astype(np.float64) * inv[None, :]
    cos, sin = np.cos(ang), np.sin(ang)
    out = x.astype(np.float64).copy()
    a, b = x[..., :half].astype(np.float64), x[..., half:rotary_dim].astype(np.float64)
    out[..., :half] = a * cos - b * sin
    out[..., half:rotary_dim] = a * sin + b * cos
    return out


def filled(
    backend: str,
    *,
    theta=10000.0,
    rotary_dim=None,
    seq=48,
    length=40,
    seed=0,
    dtype=np.float32,
):
    """A cache whose keys are rope(raw, pos); returns (cache, raw_keys, values)."""
    rng = np.random.default_rng(seed)
    cache = KVCache(
        3,
        2,
        seq,
        16,
        rope_theta=theta,
        rotary_dim=rotary_dim,
        dtype=dtype,
        backend=backend,
    )
    raw = rng.standard_normal((3, 2, length, 16))
    vals = rng.standard_normal((3, 2, length, 16)).astype(dtype)
    pos = np.arange(length)
    keys = rope(raw, pos, theta, cache.rotary_dim) if theta else raw
    cache.data[:, 0, :, :length] = keys.astype(np.float32).astype(dtype)
    cache.data[:, 1, :, :length] = vals
    cache.advance(length)
    return cache, raw, vals


# ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_layout_and_views(backend):
    cache = KVCache(4, 2, 32, 8, rope_theta=10000.0, backend=backend)
    assert cache.backend == backend
    assert cache.data.shape == (4, 2, 2, 32, 8) and cache.data.dtype == np.float32
    k, v = cache.key(1), cache.value(1)
    assert k.shape == v.shape == (1, 2, 32, 8)
    assert k.flags.c_contiguous and v.flags.c_contiguous
    k[0, 1, 3, 2] = 5.0
    v[0, 0, 0, 0] = 7.0
    assert cache.data[1, 0, 1, 3, 2] == 5.0 and cache.data[1, 1, 0, 0, 0] == 7.0
    assert cache.rotary_dim == 8


def _resident_kib(array: np.ndarray) -> int:
    """Rss of the mappings that hold `array` (Linux smaps; madvise can split one
    allocation into several mappings)."""
    first, last = array.ctypes.data, array.ctypes.data + array.nbytes
    total, inside, seen = 0, False, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split(" ", 1)[0]
            if "-" in head and ":" not in head:
                start, end = (int(part, 16) for part in head.split("-"))
                inside = start < last and first < end
                seen = seen or inside
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1])
    assert seen, "no mapping holds the cache"
    return total


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads Linux's /proc/self/smaps"
)
def test_only_written_positions_take_memory():
    # SmolLM2's cache shape at 4096 positions: 188 MB if every page were resident.
    cache = KVCache(30, 3, 4096, 64, rope_theta=1e5)
    assert not cache.data.any()
    cache.data[..., :16, :] = 1.0  # 16 positions of every strip: 4 KiB each
    strips = 30 * 2 * 3
    resident = _resident_kib(cache.data)
    assert resident <= strips * 8 + 64, (
        f"{resident} KiB resident for 16 of 4096 positions ({strips} strips)"
    )
    assert float(cache.data[7, 1, 2, 15].sum()) == 64.0
    assert not cache.data[7, 1, 2, 16:].any()


def test_bookkeeping_and_errors():
    cache = KVCache(1, 1, 10, 4, rope_theta=None)
    cache.advance(6)
    cache.rewind(4)
    assert cache.length == 4 and cache.free == 6
    with pytest.raises(ValueError, match="advance n must be in"):
        cache.advance(7)
    with pytest.raises(ValueError, match="rewind n must be in"):
        cache.rewind(5)
    with pytest.raises(ValueError, match="keep \\+ drop <= length"):
        cache.shift(2, 3)
    with pytest.raises(ValueError, match="rotary_dim must be even"):
        KVCache(1, 1, 10, 4, rope_theta=1e4, rotary_dim=3)
    with pytest.raises(ValueError, match="rotary_dim must be None or 0"):
        KVCache(1, 1, 10, 4, rope_theta=None, rotary_dim=4)
    with pytest.raises(ValueError, match="head_dim must be in"):
        KVCache(1, 1, 10, 0, rope_theta=None)
    with pytest.raises(ValueError, match="rope_theta must be > 0"):
        KVCache(1, 1, 10, 4, rope_theta=-1.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rotary_dim", [None, 8])
@pytest.mark.parametrize(("keep", "drop"), [(4, 10), (0, 1), (0, 39), (12, 0), (5, 35)])
def test_shift_matches_fresh_rope(backend, rotary_dim, keep, drop):
    theta = 10000.0
    cache, raw, vals = filled(backend, rotary_dim=rotary_dim, theta=theta)
    before = cache.data.copy()
    cache.shift(keep, drop)
    n = 40 - drop
    assert cache.length == n
    # kept prefix untouched, bit for bit
    assert np.array_equal(cache.data[:, :, :, :keep], before[:, :, :, :keep])
    moved = np.arange(keep, n)
    src = moved + drop
    want_k = rope(raw[:, :, src], moved, theta, cache.rotary_dim)
    got_k = cache.data[:, 0, :, keep:n]
    np.testing.assert_allclose(got_k, want_k, rtol=0, atol=1e-5)
    assert np.array_equal(cache.data[:, 1, :, keep:n], vals[:, :, src])


def test_shift_large_positions_re_rotation():
    # Far positions: re-rotation error stays within 1e-5 for unit-scale keys.
    for backend in BACKENDS:
        cache, raw, _ = filled(backend, seq=4200, length=4100, theta=500000.0, seed=3)
        cache.shift(100, 3000)
        moved = np.arange(100, 1100)
        want = rope(raw[:, :, moved + 3000], moved, 500000.0, 16)
        np.testing.assert_allclose(
            cache.data[:, 0, :, 100:1100], want, atol=1e-5, rtol=0
        )


@pytest.mark.parametrize("rotary_dim", [None, 4, 16])
def test_shift_c_equals_numpy_exactly(rotary_dim):
    a, _, _ = filled("c", rotary_dim=rotary_dim, seed=9)
    b, _, _ = filled("numpy", rotary_dim=rotary_dim, seed=9)
    for keep, drop in [(3, 7), (0, 5), (10, 1)]:
        a.shift(keep, drop)
        b.shift(keep, drop)
        assert a.length == b.length
        assert np.array_equal(a.data[:, :, :, : a.length], b.data[:, :, :, : b.length])


@pytest.mark.parametrize("backend", BACKENDS)
def test_shift_without_rope_only_moves(backend):
    cache, raw, vals = filled(backend, theta=None)
    cache.shift(2, 5)
    assert np.array_equal(cache.data[:, 0, :, 2:35], raw[:, :, 7:40].astype(np.float32))
    assert np.array_equal(cache.data[:, 1, :, 2:35], vals[:, :, 7:40])


# ------------------------------------------------------------------------------
# save / load


@pytest.mark.parametrize("writer", BACKENDS)
@pytest.mark.parametrize("reader", BACKENDS)
def test_save_load_round_trip(tmp_path, writer, reader):
    cache, _, _ = filled(writer, rotary_dim=8)
    tokens = list(range(100, 140))
    path = tmp_path / "c.kv"
    cache.save(path, tokens)
    got, got_tokens = KVCache.load(path, backend=reader)
    assert got.backend == reader
    assert got_tokens == tokens
    assert got.length == 40 and got.max_seq_len == 48
    assert (got.rope_theta, got.rotary_dim) == (10000.0, 8)
    assert np.array_equal(got.data[:, :, :, :40], cache.data[:, :, :, :40])
    assert not got.data[:, :, :, 40:].any()


def test_save_is_byte_identical_and_compact(tmp_path):
    a, _, _ = filled("c", seed=4)
    b, _, _ = filled("numpy", seed=4)
    a.save(tmp_path / "a.kv", [1, 2, 3])
    b.save(tmp_path / "b.kv", [1, 2, 3])
    raw = (tmp_path / "a.kv").read_bytes()
    assert raw == (tmp_path / "b.kv").read_bytes()
    assert len(raw) == 64 + 3 * 4 + 3 * 2 * 2 * 40 * 16 * 4 + 4  # valid prefix only


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_into_larger_capacity_and_no_rope(tmp_path, backend):
    cache, _, _ = filled(backend, theta=None, length=10)
    cache.save(tmp_path / "x.kv", [])
    got, toks = KVCache.load(tmp_path / "x.kv", max_seq_len=100, backend=backend)
    assert toks == [] and got.max_seq_len == 100 and got.rope_theta is None
    assert np.array_equal(got.data[:, :, :, :10], cache.data[:, :, :, :10])
    with pytest.raises(ValueError, match="max_seq_len must be >= the saved length 10"):
        KVCache.load(tmp_path / "x.kv", max_seq_len=5, backend=backend)


def corruptions(good: bytes) -> dict[str, tuple[bytes, str]]:
    header = bytearray(good[:64])
    bad_field = bytearray(header)
    bad_field[16:20] = struct.pack("<i", 0)  # n_layers = 0, CRC fixed up
    bad_field[60:64] = struct.pack("<I", zlib.crc32(bytes(bad_field[:60])))
    version = bytearray(good)
    version[8:12] = struct.pack("<I", 2)
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x10
    header_flip = bytearray(good)
    header_flip[20] ^= 0x01
    return {
        "magic": (b"GGUF" + good[4:], "bad magic"),
        "garbage": (b"\x00" * 200, "bad magic"),
        "empty": (b"", "truncated"),
        "short header": (good[:40], "truncated"),
        "truncated payload": (good[:-100], "truncated"),
        "missing checksum": (good[:-4], "truncated"),
        "trailing": (good + b"\x00", "unexpected bytes"),
        "version": (bytes(version), "unsupported format version"),
        "header crc": (bytes(header_flip), "corrupt header"),
        "header field": (bytes(bad_field) + good[64:], "corrupt header"),
        "payload bit flip": (bytes(flipped), "checksum mismatch"),
    }


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupted_files_raise_model_format_error(tmp_path, backend):
    cache, _, _ = filled(backend)
    good_path = tmp_path / "good.kv"
    cache.save(good_path, list(range(40)))
    good = good_path.read_bytes()
    for name, (blob, message) in corruptions(good).items():
        path = tmp_path / f"{name}.kv"
        path.write_bytes(blob)
        with pytest.raises(ModelFormatError, match=message) as info:
            KVCache.load(path, backend=backend)
        assert str(path) in str(info.value), name


def test_missing_file(tmp_path):
    for backend in BACKENDS:
        with pytest.raises(FileNotFoundError):
            KVCache.load(tmp_path / "absent.kv", backend=backend)


# ------------------------------------------------------------------------------
# float16 caches


@pytest.mark.parametrize("rotary_dim", [None, 4, 16])
def test_half_shift_c_equals_numpy_exactly(rotary_dim):
    a, _, _ = filled("c", rotary_dim=rotary_dim, seed=11, dtype=np.float16)
    b, _, _ = filled("numpy", rotary_dim=rotary_dim, seed=11, dtype=np.float16)
    assert a.data.dtype == np.float16 and a.data.nbytes == 3 * 2 * 2 * 48 * 16 * 2
    for keep, drop in [(3, 7), (0, 5), (10, 1)]:
        a.shift(keep, drop)
        b.shift(keep, drop)
        assert np.array_equal(a.data[:, :, :, : a.length], b.data[:, :, :, : b.length])


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_shift_is_a_fresh_rope_to_half_precision(backend):
    cache, raw, _ = filled(backend, rotary_dim=8, dtype=np.float16)
    cache.shift(4, 10)
    fresh = rope(raw[:, :, 14:40], np.arange(4, 30), 10000.0, 8)
    # Two roundings to half (stored, then re-rotated) against one: within 2 ulp.
    np.testing.assert_allclose(
        cache.data[:, 0, :, 4:30].astype(np.float64), fresh, rtol=2e-3, atol=2e-3
    )


@pytest.mark.parametrize("writer", BACKENDS)
@pytest.mark.parametrize("reader", BACKENDS)
def test_half_save_load_round_trip(tmp_path, writer, reader):
    cache, _, _ = filled(writer, rotary_dim=8, dtype=np.float16)
    path = tmp_path / "h.kv"
    cache.save(path, list(range(40)))
    raw = path.read_bytes()
    assert len(raw) == 64 + 40 * 4 + 3 * 2 * 2 * 40 * 16 * 2 + 4  # two bytes a value
    assert struct.unpack_from("<I", raw, 56)[0] == 2  # the dtype field: float16
    got, tokens = KVCache.load(path, backend=reader)
    assert got.dtype == np.float16 and tokens == list(range(40))
    assert np.array_equal(got.data[:, :, :, :40], cache.data[:, :, :, :40])


def test_half_save_is_byte_identical(tmp_path):
    for backend in BACKENDS:
        cache, _, _ = filled(backend, seed=5, dtype=np.float16)
        cache.save(tmp_path / f"{backend}.kv", [7])
    assert (tmp_path / "c.kv").read_bytes() == (tmp_path / "numpy.kv").read_bytes()


def test_cache_dtype_is_float32_or_float16():
    with pytest.raises(ValueError, match="dtype must be float32 or float16, got"):
        KVCache(1, 1, 4, 8, rope_theta=None, dtype=np.float64)
    with pytest.raises(ValueError, match="dtype must be float32 or float16, got"):
        KVCache(1, 1, 4, 8, rope_theta=None, dtype="int8")
