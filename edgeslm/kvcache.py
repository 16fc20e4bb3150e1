"""The key/value cache: one preallocated buffer the attention ops write into.

Owns: the buffer layout `(n_layers, 2, n_kv_heads, max_seq_len, head_dim)` (index 0 =
keys, stored after rotary embedding; 1 = values), float32 or float16 (half the
memory, and what quantized packages' graphs take), in memory that becomes resident
only where positions are written, the valid `length`, context shifting
(drop a span of positions, move the rest down and re-rotate the moved keys) and the
versioned save/load file format. Shift, save and load run in the C kernel when it is
available; the numpy code beside them is the reference they are tested against.

RoPE convention: Hugging Face Llama "rotate_half" (NeoX): within the first `rotary_dim`
dims, dim i and i + rotary_dim/2 form a pair rotated by pos * theta**(-2i/rotary_dim).
Rotation by a delta composes exactly, so `shift` re-rotates moved keys by -drop.
With `rope_theta=None` (learned absolute positions, GPT-2 style) `shift` only moves
data: the moved entries keep the positions they were computed at, and choosing position
ids after a shift is the caller's problem.

Does not do yet: int8 caches, paged or batched caches, sliding-window layers,
big-endian hosts (the file format is little-endian and the payload is written raw).
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os
import struct
import zlib
from collections.abc import Sequence

import numpy as np

from edgeslm import _kernel
from edgeslm.errors import ModelFormatError

__all__ = ["FORMAT_VERSION", "MAGIC", "KVCache"]

MAGIC = b"EDGESLKV"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sIIiiiiiidqI")  # 60 bytes, then the header CRC-32
_HEADER_BYTES = 64
_DTYPE_F32 = 1
_DTYPE_F16 = 2
# The element types a cache may have, and their codes in the file format.
_FILE_DTYPES = {np.dtype(np.float32): _DTYPE_F32, np.dtype(np.float16): _DTYPE_F16}
_DTYPE_OF_CODE = {code: dtype for dtype, code in _FILE_DTYPES.items()}
_DIM_MAX = 1 << 24
_MAP_BYTES = 1 << 20  # smaller caches stay ordinary numpy arrays
# TODO: byte-swap the payload on big-endian hosts; no supported board is big-endian.

_FORMAT_PROBLEMS = {
    _kernel.ERR_BAD_MAGIC: "not an edgeslm KV-cache file (bad magic)",
    _kernel.ERR_BAD_VERSION: "unsupported format version",
    _kernel.ERR_BAD_HEADER: "corrupt header (checksum or fields invalid)",
    _kernel.ERR_TRUNCATED: "file is truncated",
    _kernel.ERR_CHECKSUM: "payload checksum mismatch (data corrupted)",
    _kernel.ERR_TRAILING: "unexpected bytes after the end of the data",
}


class _FormatProblem(Exception):
    """Internal: carries an esl status from the numpy reader."""

    def __init__(self, status: int, detail: str = "") -> None:
        super().__init__(status, detail)
        self.status = status
        self.detail = detail


def _zeroed(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A zeroed array whose memory becomes resident only where it is written.

    numpy asks for transparent huge pages on large arrays, and a cache is written one
    position at a time across every (layer, kind, head) strip: with 2 MiB pages the
    first token made a 4096-position SmolLM2 cache (188 MB) wholly resident. A private
    anonymous mapping with huge pages declined costs 4 KiB pages only where positions
    are used. Elsewhere (no `MAP_PRIVATE`, e.g. Windows) it is `np.zeros`.
    """
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < _MAP_BYTES or not hasattr(mmap, "MAP_PRIVATE"):
        return np.zeros(shape, dtype=dtype)
    buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE)  # anonymous, zeroed
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        try:
            buffer.madvise(mmap.MADV_NOHUGEPAGE)
        except OSError:  # a kernel without transparent huge pages refuses the advice
            pass
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)


def _positive_int(name: str, value: object, upper: int = _DIM_MAX) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not 1 <= int(value) <= upper:
        raise ValueError(f"{name} must be in [1, {upper}], got {value}")
    return int(value)


class KVCache:
    """Preallocated KV cache for one sequence.

    Attributes:
        data: float32 or float16 array (n_layers, 2, n_kv_heads, max_seq_len,
            head_dim), allocated once; onnxruntime binds views of it as past/present.
        dtype: its element type.
        length: Number of valid positions, [0, max_seq_len].
        backend: "c" or "numpy": which implementation shift/save/load use.
    """

    def __init__(
        self,
        n_layers: int,
        n_kv_heads: int,
        max_seq_len: int,
        head_dim: int,
        *,
        rope_theta: float | None,
        rotary_dim: int | None = None,
        dtype: object = np.float32,
        backend: str = "auto",
    ) -> None:
        """Allocates a zeroed cache.

        Args:
            n_layers: Transformer layers, >= 1.
            n_kv_heads: Key/value heads per layer, >= 1.
            max_seq_len: Capacity in positions, >= 1.
            head_dim: Dims per head, >= 1.
            rope_theta: RoPE base (e.g. 10000.0), or None for learned positions.
            rotary_dim: Leading dims that rotate (even, <= head_dim); None = head_dim
                with RoPE, 0 without.
            dtype: float32 or float16 (rounded to nearest even as values are
                written; shifts rotate in float64 and round back).
            backend: "auto", "c" or "numpy" (see `edgeslm._kernel`).

        Raises:
            TypeError, ValueError: An argument is out of range (the message names it).
            KernelError: backend "c" requested but the kernel is not available.
        """
        self.n_layers = _positive_int("n_layers", n_layers)
        self.n_kv_heads = _positive_int("n_kv_heads", n_kv_heads)
        self.max_seq_len = _positive_int("max_seq_len", max_seq_len)
        self.head_dim = _positive_int("head_dim", head_dim)
        if rope_theta is None:
            if rotary_dim not in (None, 0):
                raise ValueError(
                    f"rotary_dim must be None or 0 when rope_theta is None, "
                    f"got {rotary_dim}"
                )
            self.rope_theta: float | None = None
            self.rotary_dim = 0
        else:
            theta = float(rope_theta)
            if not (theta > 0.0 and math.isfinite(theta)):
                raise ValueError(f"rope_theta must be > 0 and finite, got {rope_theta}")
            rd = self.head_dim if rotary_dim is None else rotary_dim
            if isinstance(rd, bool) or not isinstance(rd, (int, np.integer)):
                raise TypeError(f"rotary_dim must be an int, got {type(rd).__name__}")
            if not (2 <= rd <= self.head_dim and rd % 2 == 0):
                raise ValueError(
                    f"rotary_dim must be even and in [2, head_dim={self.head_dim}], "
                    f"got {rd}"
                )
            self.rope_theta = theta
            self.rotary_dim = int(rd)
        try:
            self.dtype = np.dtype(dtype)
        except TypeError:
            self.dtype = None
        if self.dtype not in _FILE_DTYPES:
            raise ValueError(f"dtype must be float32 or float16, got {dtype!r}")
        self.backend: str = _kernel.resolve_backend(backend)
        shape = (self.n_layers, 2, self.n_kv_heads, self.max_seq_len, self.head_dim)
        self.data: np.ndarray = _zeroed(shape, self.dtype)
        self.length = 0
        half = self.rotary_dim // 2
        # Reused by every shift: inverse frequencies and the (cos, sin) table.
        self._inv_freq = np.array(
            [self.rope_theta ** (-2.0 * i / self.rotary_dim) for i in range(half)]
            if half
            else [],
            dtype=np.float64,
        )
        self._cos_sin = np.zeros(2 * half, dtype=np.float64)
        self._desc = _kernel.KVDesc()

    # -- views and bookkeeping ------------------------------------------------------

    def key(self, layer: int) -> np.ndarray:
        """Returns the keys of `layer`: C-contiguous (1, heads, max_seq, dim) view."""
        return self.data[layer, 0][None]

    def value(self, layer: int) -> np.ndarray:
        """Returns the values of `layer`: C-contiguous (1, heads, max_seq, dim) view."""
        return self.data[layer, 1][None]

    @property
    def free(self) -> int:
        """Positions still available."""
        return self.max_seq_len - self.length

    def advance(self, n: int) -> None:
        """Marks n positions written by the model at [length, length + n) as valid.

        Raises:
            ValueError: n < 0 or the cache would overflow.
        """
        if not 0 <= n <= self.max_seq_len - self.length:
            raise ValueError(
                f"advance n must be in [0, {self.max_seq_len - self.length}] "
                f"(length {self.length}, max_seq_len {self.max_seq_len}), got {n}"
            )
        self.length += n

    def rewind(self, n: int) -> None:
        """Keeps only the first n positions.

        Raises:
            ValueError: n is not in [0, length].
        """
        if not 0 <= n <= self.length:
            raise ValueError(f"rewind n must be in [0, {self.length}], got {n}")
        self.length = n

    def _c_desc(self, length: int | None = None) -> _kernel.KVDesc:
        d = self._desc
        d.n_layers, d.n_kv_heads = self.n_layers, self.n_kv_heads
        d.max_seq_len, d.head_dim = self.max_seq_len, self.head_dim
        d.rotary_dim = self.rotary_dim
        d.length = self.length if length is None else length
        d.rope_theta = self.rope_theta or 0.0
        d.half = int(self.dtype == np.float16)
        return d

    # -- shift ----------------------------------------------------------------------

    def shift(self, keep: int, drop: int) -> None:
        """Drops positions [keep, keep + drop) and moves the later ones down by drop.

        Moved keys are re-rotated by -drop positions so they equal keys computed at
        their new positions; with rope_theta None data is only moved. length -= drop.

        Args:
            keep: Leading positions left untouched (e.g. the system prompt).
            drop: Positions removed after them.

        Raises:
            ValueError: keep or drop negative, or keep + drop > length.
        """
        if keep < 0 or drop < 0 or keep + drop > self.length:
            raise ValueError(
                f"shift needs keep >= 0, drop >= 0 and keep + drop <= length "
                f"{self.length}, got keep={keep}, drop={drop}"
            )
        if drop == 0:
            return
        if self.rotary_dim:
            angles = -float(drop) * self._inv_freq
            self._cos_sin[0::2] = np.cos(angles)
            self._cos_sin[1::2] = np.sin(angles)
        if self.backend == "c":
            lib = _kernel.require()
            status = lib.esl_kv_shift(
                ctypes.addressof(self._c_desc()),
                self.data.ctypes.data,
                keep,
                drop,
                self._cos_sin.ctypes.data if self.rotary_dim else None,
            )
            _kernel.check(status, "esl_kv_shift")
        else:
            _shift_reference(
                self.data, self.length, keep, drop, self._cos_sin, self.rotary_dim
            )
        self.length -= drop

    # -- save / load ----------------------------------------------------------------

    def save(self, path: str | os.PathLike[str], tokens: Sequence[int]) -> None:
        """Writes the valid prefix and the tokens that produced it to `path`.

        Args:
            path: Destination file (replaced).
            tokens: Token ids (int32 range), typically the `length` cached ones.

        Raises:
            ValueError: A token id outside [0, 2**31).
            OSError: The file cannot be written.
        """
        toks = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if toks.size and (int(toks.min()) < 0 or int(toks.max()) > 2**31 - 1):
            raise ValueError("tokens must be in [0, 2**31), got an id outside it")
        toks = np.ascontiguousarray(toks, dtype=np.int32)
        path = os.fspath(path)
        if self.backend == "c":
            lib = _kernel.require()
            status = lib.esl_kv_save(
                os.fsencode(path),
                ctypes.addressof(self._c_desc()),
                self.data.ctypes.data,
                toks.ctypes.data if toks.size else None,
                toks.size,
            )
            if status == _kernel.ERR_IO:
                raise OSError(f"cannot write KV cache file {path}")
            _kernel.check(status, "esl_kv_save")
        else:
            _save_reference(self, path, toks)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        max_seq_len: int | None = None,
        backend: str = "auto",
    ) -> tuple[KVCache, list[int]]:
        """Reads a file written by `save` into a new cache.

        Args:
            path: File to read.
            max_seq_len: Capacity of the new cache; None = the saved one. Must be at
                least the saved length.
            backend: "auto", "c" or "numpy".

        Returns:
            (cache, tokens) with cache.length = the saved length.

        Raises:
            FileNotFoundError: path does not exist.
            ModelFormatError: The file is not a valid KV-cache file; the message says
                what is wrong (magic, version, header, truncation, checksum).
            ValueError: max_seq_len smaller than the saved length.
        """
        path = os.fspath(path)
        os.stat(path)  # FileNotFoundError / PermissionError with the usual message
        chosen = _kernel.resolve_backend(backend)
        try:
            if chosen == "c":
                geometry, n_tokens = _read_header_c(path)
            else:
                with open(path, "rb") as f:
                    geometry, n_tokens = _read_header_reference(f)
        except _FormatProblem as p:
            raise _format_error(path, p) from None
        n_layers, heads, saved_max, head_dim, rd, length, theta, dtype = geometry
        capacity = saved_max if max_seq_len is None else max_seq_len
        if capacity < length:
            raise ValueError(
                f"max_seq_len must be >= the saved length {length}, got {capacity}"
            )
        cache = cls(
            n_layers,
            heads,
            capacity,
            head_dim,
            rope_theta=theta if rd else None,
            rotary_dim=rd if rd else None,
            dtype=dtype,
            backend=chosen,
        )
        tokens = np.zeros(n_tokens, dtype=np.int32)
        try:
            if chosen == "c":
                lib = _kernel.require()
                status = lib.esl_kv_load(
                    os.fsencode(path),
                    ctypes.addressof(cache._c_desc(length)),
                    cache.data.ctypes.data,
                    tokens.ctypes.data if n_tokens else None,
                    n_tokens,
                )
                if status == _kernel.ERR_IO:
                    raise OSError(f"cannot read KV cache file {path}")
                if status in _FORMAT_PROBLEMS:
                    raise _FormatProblem(status)
                _kernel.check(status, "esl_kv_load")
            else:
                _load_reference(cache, path, length, tokens)
        except _FormatProblem as p:
            raise _format_error(path, p) from None
        cache.length = length
        return cache, tokens.tolist()


def _format_error(path: str, problem: _FormatProblem) -> ModelFormatError:
    what = _FORMAT_PROBLEMS.get(problem.status, f"status {problem.status}")
    detail = f" ({problem.detail})" if problem.detail else ""
    return ModelFormatError(f"KV cache file {path}: {what}{detail}")


# ------------------------------------------------------------------------------
# C header read (the C loader re-checks everything before it writes into the cache).


def _read_header_c(path: str) -> tuple[tuple, int]:
    lib = _kernel.require()
    desc = _kernel.KVDesc()
    n_tokens = ctypes.c_int64()
    status = lib.esl_kv_read_header(
        os.fsencode(path), ctypes.addressof(desc), ctypes.addressof(n_tokens)
    )
    if status == _kernel.ERR_IO:
        raise OSError(f"cannot read KV cache file {path}")
    if status in _FORMAT_PROBLEMS:
        raise _FormatProblem(status)
    _kernel.check(status, "esl_kv_read_header")
    geometry = (
        desc.n_layers,
        desc.n_kv_heads,
        desc.max_seq_len,
        desc.head_dim,
        desc.rotary_dim,
        desc.length,
        desc.rope_theta,
        np.float16 if desc.half else np.float32,
    )
    return geometry, int(n_tokens.value)


# ------------------------------------------------------------------------------
# numpy references.


def _shift_reference(
    data: np.ndarray,
    length: int,
    keep: int,
    drop: int,
    cos_sin: np.ndarray,
    rotary_dim: int,
) -> None:
    """numpy twin of esl_kv_shift (same float64 arithmetic, rounded to float32 and
    then, for a float16 cache, to float16, as the C code rounds)."""
    moved = length - keep - drop
    if moved <= 0:
        return
    data[:, :, :, keep : keep + moved] = data[:, :, :, keep + drop : length].copy()
    if rotary_dim:
        half = rotary_dim // 2
        k = data[:, 0, :, keep : keep + moved]
        a = k[..., :half].astype(np.float64)
        b = k[..., half:rotary_dim].astype(np.float64)
        c, s = cos_sin[0::2], cos_sin[1::2]
        k[..., :half] = (a * c - b * s).astype(np.float32).astype(data.dtype)
        k[..., half:rotary_dim] = (a * s + b * c).astype(np.float32).astype(data.dtype)


def _header_bytes(cache: KVCache, n_tokens: int) -> bytes:
    head = _HEADER.pack(
        MAGIC,
        FORMAT_VERSION,
        _HEADER_BYTES,
        cache.n_layers,
        cache.n_kv_heads,
        cache.max_seq_len,
        cache.head_dim,
        cache.rotary_dim,
        cache.length,
        cache.rope_theta or 0.0,
        n_tokens,
        _FILE_DTYPES[cache.dtype],
    )
    return head + struct.pack("<I", zlib.crc32(head))


def _save_reference(cache: KVCache, path: str, tokens: np.ndarray) -> None:
    """numpy twin of esl_kv_save: byte-identical output."""
    with open(path, "wb") as f:
        f.write(_header_bytes(cache, tokens.size))
        body = tokens.astype("<i4").tobytes()
        crc = zlib.crc32(body)
        f.write(body)
        for layer in range(cache.n_layers):
            for kv in range(2):
                for h in range(cache.n_kv_heads):
                    chunk = cache.data[layer, kv, h, : cache.length]
                    chunk = chunk.astype(chunk.dtype.newbyteorder("<"))
                    raw = chunk.tobytes()
                    crc = zlib.crc32(raw, crc)
                    f.write(raw)
        f.write(struct.pack("<I", crc))


def _read_header_reference(f) -> tuple[tuple, int]:
    """numpy twin of esl_kv_read_header on an open binary file."""
    raw = f.read(_HEADER_BYTES)
    if len(raw) < len(MAGIC):
        status = (
            _kernel.ERR_BAD_MAGIC
            if raw and not MAGIC.startswith(raw)
            else _kernel.ERR_TRUNCATED
        )
        raise _FormatProblem(status, f"{len(raw)} bytes")
    if raw[:8] != MAGIC:
        raise _FormatProblem(_kernel.ERR_BAD_MAGIC)
    if len(raw) < 12:
        raise _FormatProblem(_kernel.ERR_TRUNCATED, f"{len(raw)} bytes")
    (version,) = struct.unpack_from("<I", raw, 8)
    if version != FORMAT_VERSION:
        raise _FormatProblem(
            _kernel.ERR_BAD_VERSION, f"file has {version}, this edgeslm reads 1"
        )
    if len(raw) < _HEADER_BYTES:
        raise _FormatProblem(_kernel.ERR_TRUNCATED, f"header is {len(raw)} bytes")
    fields = _HEADER.unpack_from(raw)
    (crc,) = struct.unpack_from("<I", raw, 60)
    _, _, hbytes, n_layers, heads, max_seq, head_dim, rd, length, theta, nt, dt = fields
    dtype = _DTYPE_OF_CODE.get(dt)
    if crc != zlib.crc32(raw[:60]) or hbytes != _HEADER_BYTES or dtype is None:
        raise _FormatProblem(_kernel.ERR_BAD_HEADER)
    dims_ok = all(1 <= v <= _DIM_MAX for v in (n_layers, heads, max_seq, head_dim))
    rope_ok = (theta > 0.0 and math.isfinite(theta)) if rd > 0 else theta == 0.0
    if not (
        dims_ok
        and 0 <= length <= max_seq
        and 0 <= rd <= head_dim
        and rd % 2 == 0
        and rope_ok
        and 0 <= nt <= 2**31 - 1
    ):
        raise _FormatProblem(_kernel.ERR_BAD_HEADER)
    values = n_layers * 2 * heads * length * head_dim
    expect = _HEADER_BYTES + 4 * nt + dtype.itemsize * values + 4
    size = os.fstat(f.fileno()).st_size
    if size < expect:
        raise _FormatProblem(_kernel.ERR_TRUNCATED, f"{size} of {expect} bytes")
    if size > expect:
        raise _FormatProblem(_kernel.ERR_TRAILING, f"{size - expect} extra bytes")
    return (n_layers, heads, max_seq, head_dim, rd, length, theta, dtype), nt


def _load_reference(cache: KVCache, path: str, length: int, tokens: np.ndarray) -> None:
    """numpy twin of esl_kv_load: fills cache.data[..., :length, :] and tokens."""
    with open(path, "rb") as f:
        _read_header_reference(f)
        f.seek(_HEADER_BYTES)
        crc = 0
        if tokens.size:
            raw = f.read(4 * tokens.size)
            tokens[:] = np.frombuffer(raw, dtype="<i4")
            crc = zlib.crc32(raw)
        for layer in range(cache.n_layers):
            for kv in range(2):
                for h in range(cache.n_kv_heads):
                    raw = f.read(cache.dtype.itemsize * length * cache.head_dim)
                    wire = cache.dtype.newbyteorder("<")
                    chunk = np.frombuffer(raw, dtype=wire).reshape(length, -1)
                    cache.data[layer, kv, h, :length] = chunk
                    crc = zlib.crc32(raw, crc)
        (stored,) = struct.unpack("<I", f.read(4))
        if stored != crc:
            raise _FormatProblem(_kernel.ERR_CHECKSUM)
