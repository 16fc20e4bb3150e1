"""Finds and loads the C kernel (`_edgeslm_kernel.so`) with ctypes.

Owns: choosing the library (environment variables below), declaring the ctypes
signatures of kernels/edgeslm_kernel.h, and turning its status codes into exceptions.
Does not: build the library (setup.py does), or implement any algorithm (the numpy
references live in `edgeslm.sampling` and `edgeslm.kvcache`).

Environment:
    EDGESLM_KERNEL: "auto" (default: C if it loads, else numpy with one warning),
        "c" (C required; a missing library raises KernelError) or "numpy" (never
        load C).
    EDGESLM_KERNEL_LIB: explicit path of the shared library, e.g. a cross-compiled one.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from pathlib import Path

from edgeslm.errors import KernelError

log = logging.getLogger(__name__)

ENV_BACKEND = "EDGESLM_KERNEL"
ENV_LIBRARY = "EDGESLM_KERNEL_LIB"
ABI_VERSION = 4
LIBRARY_NAME = "_edgeslm_kernel.so"
BACKENDS = ("auto", "c", "numpy")

# Status codes of esl_status (kernels/edgeslm_kernel.h).
OK = 0
ERR_ARG = 1
ERR_NOMEM = 2
ERR_NONFINITE = 3
ERR_ALL_MASKED = 4
ERR_TOKEN_RANGE = 5
ERR_IO = 6
ERR_BAD_MAGIC = 7
ERR_BAD_VERSION = 8
ERR_BAD_HEADER = 9
ERR_TRUNCATED = 10
ERR_CHECKSUM = 11
ERR_TRAILING = 12
ERR_MISMATCH = 13

_P = ctypes.c_void_p
_I32 = ctypes.c_int32
_I64 = ctypes.c_int64
_U64P = ctypes.POINTER(ctypes.c_uint64)


class SamplerParams(ctypes.Structure):
    """Mirror of `esl_sampler_params`."""

    _fields_ = [
        ("temperature", ctypes.c_double),
        ("top_p", ctypes.c_double),
        ("min_p", ctypes.c_double),
        ("repetition_penalty", ctypes.c_double),
        ("frequency_penalty", ctypes.c_double),
        ("presence_penalty", ctypes.c_double),
        ("top_k", ctypes.c_int32),
        ("penalty_window", ctypes.c_int32),
    ]


class KVDesc(ctypes.Structure):
    """Mirror of `esl_kv_desc`."""

    _fields_ = [
        ("n_layers", ctypes.c_int32),
        ("n_kv_heads", ctypes.c_int32),
        ("max_seq_len", ctypes.c_int32),
        ("head_dim", ctypes.c_int32),
        ("rotary_dim", ctypes.c_int32),
        ("length", ctypes.c_int32),
        ("rope_theta", ctypes.c_double),
        ("half", ctypes.c_int32),
    ]


_SIGNATURES: dict[str, tuple[object, list[object]]] = {
    "esl_strerror": (ctypes.c_char_p, [_I32]),
    "esl_abi_version": (_I32, []),
    "esl_simd_level": (_I32, []),
    "esl_simd_set": (_I32, [_I32]),
    "esl_simd_name": (ctypes.c_char_p, []),
    "esl_rng_seed": (None, [_U64P, ctypes.c_uint64]),
    "esl_rng_next": (ctypes.c_uint64, [_U64P]),
    "esl_sampler_init": (_I32, [_I32, ctypes.POINTER(_P)]),
    "esl_sampler_free": (None, [_P]),
    "esl_sampler_vocab": (_I32, [_P]),
    # sampler, params, logits, mask, bias ids, bias values, n_bias, recent, n_recent,
    # rng state, out token: pointers travel as plain integers (c_void_p) for speed.
    "esl_sampler_sample": (_I32, [_P, _P, _P, _P, _P, _P, _I32, _P, _I32, _P, _P]),
    "esl_fixed_softmax": (_I32, [_P, _I32, ctypes.c_double, _P, _P]),
    "esl_kv_shift": (_I32, [_P, _P, _I32, _I32, _P]),
    "esl_kv_save": (_I32, [ctypes.c_char_p, _P, _P, _P, _I64]),
    "esl_kv_read_header": (_I32, [ctypes.c_char_p, _P, _P]),
    "esl_kv_load": (_I32, [ctypes.c_char_p, _P, _P, _P, _I64]),
    "esl_qmm_level": (_I32, []),
    "esl_qmm_set_level": (_I32, [_I32]),
    "esl_qmm_name": (ctypes.c_char_p, []),
    # x, m, k, packed weights, packed scales, n, block, y
    "esl_qmm_matmul": (_I32, [_P, _I64, _I64, _P, _P, _I64, _I64, _P]),
    # x, m, k, packed nibbles, scales, minimums, n, y
    "esl_qmm4_matmul": (_I32, [_P, _I64, _I64, _P, _P, _P, _I64, _P]),
    "esl_qmm_half": (ctypes.c_float, [ctypes.c_uint16]),
    "esl_qmm_to_half": (ctypes.c_uint16, [ctypes.c_float]),
    # halves, floats, count
    "esl_attn_to_half": (None, [_P, _P, _I64]),
    # gate, up, y, count, simd
    "esl_swiglu": (None, [_P, _P, _P, _I64, _I32]),
}

_lock = threading.Lock()
_loaded = False
_lib: ctypes.CDLL | None = None
_lib_path: Path | None = None
_load_error: str | None = None


def backend_setting() -> str:
    """Returns the EDGESLM_KERNEL setting ("auto" when unset).

    Raises:
        ValueError: EDGESLM_KERNEL holds something other than auto, c or numpy.
    """
    value = os.environ.get(ENV_BACKEND, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(
            f"{ENV_BACKEND} must be one of {', '.join(BACKENDS)}, got {value!r}"
        )
    return value


def default_library_path() -> Path:
    """Returns where `pip install` puts the library: next to this module."""
    return Path(__file__).resolve().parent / LIBRARY_NAME


def _open(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes
    version = lib.esl_abi_version()
    if version != ABI_VERSION:
        raise OSError(f"ABI version {version}, this edgeslm needs {ABI_VERSION}")
    return lib


def load() -> ctypes.CDLL | None:
    """Returns the loaded kernel library, or None when the numpy reference must be used.

    The first call decides (thread-safe) and later calls return the same answer. A
    missing or broken library logs one warning unless EDGESLM_KERNEL=numpy.

    Returns:
        The ctypes library with signatures declared, or None.

    Raises:
        ValueError: EDGESLM_KERNEL is not auto, c or numpy.
    """
    global _loaded, _lib, _lib_path, _load_error
    setting = backend_setting()
    if setting == "numpy":
        return None
    with _lock:
        if not _loaded:
            explicit = os.environ.get(ENV_LIBRARY)
            path = Path(explicit) if explicit else default_library_path()
            try:
                _lib = _open(path)
                _lib_path = path
                log.debug("edgeslm C kernel loaded from %s (%s)", path, simd_name(_lib))
            except (OSError, AttributeError) as exc:
                _load_error = f"cannot load the C kernel from {path}: {exc}"
                log.warning("%s; using the numpy reference (slower)", _load_error)
            _loaded = True
    return _lib


def operator_library() -> Path | None:
    """The kernel library's path for onnxruntime's `register_custom_ops_library`
    (it holds the `ai.edgeslm` operators, kernels/ort_op.c), or None when the C
    kernel is not available (then packages run their portable graph)."""
    return _lib_path if load() is not None else None


def load_error() -> str | None:
    """Why the C kernel did not load (None if it did or was not tried)."""
    return _load_error


def require() -> ctypes.CDLL:
    """Returns the kernel library or raises; for callers that asked for backend "c".

    Raises:
        KernelError: EDGESLM_KERNEL=numpy, or the library is missing or broken.
    """
    lib = load()
    if lib is None:
        why = _load_error or f"{ENV_BACKEND}=numpy disables it"
        raise KernelError(
            f"the C kernel is not available ({why}); rebuild with "
            "`pip install -e .` or use backend='numpy'"
        )
    return lib


def resolve_backend(backend: str) -> str:
    """Maps a requested backend ("auto", "c", "numpy") to the one that will run.

    Args:
        backend: What the caller asked for; "auto" defers to EDGESLM_KERNEL.

    Returns:
        "c" or "numpy".

    Raises:
        ValueError: backend is not one of auto, c, numpy.
        KernelError: "c" was requested (or forced by EDGESLM_KERNEL=c) but is missing.
    """
    if backend not in BACKENDS:
        raise ValueError(
            f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}"
        )
    if backend == "auto":
        backend = backend_setting()
    if backend == "numpy":
        return "numpy"
    if backend == "c":
        require()
        return "c"
    return "c" if load() is not None else "numpy"


def simd_name(lib: ctypes.CDLL | None = None) -> str:
    """Returns "avx2", "neon" or "c" for the SIMD level the kernel uses ("" if none)."""
    lib = lib if lib is not None else load()
    return lib.esl_simd_name().decode() if lib is not None else ""


def strerror(status: int) -> str:
    """Returns the kernel's description of a status code."""
    lib = load()
    if lib is None:
        return f"status {status}"
    return lib.esl_strerror(status).decode()


def check(status: int, what: str) -> None:
    """Raises KernelError naming `what` unless status is OK.

    Raises:
        KernelError: status is not OK.
    """
    if status != OK:
        raise KernelError(f"{what}: {strerror(status)} (status {status})")
