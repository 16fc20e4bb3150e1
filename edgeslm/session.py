"""onnxruntime sessions for edgeslm packages: threads, edgeslm's operators, fallback.

An int8 package's `model.onnx` runs its linear layers with edgeslm's own operator
(`ai.edgeslm::MatMulQ8`, kernels/ort_op.c), which lives in the C kernel library. When
that library is not available (no compiler at install, `EDGESLM_KERNEL=numpy`), the
package's `portable_model` runs instead: the same graph with onnxruntime's
`MatMulNBits`, slower to load and larger in memory, but correct on a stock
onnxruntime. `open_session` makes that choice and says so once in the log.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from edgeslm import _kernel
from edgeslm.errors import ModelFormatError

log = logging.getLogger(__name__)

EDGESLM_DOMAIN = "ai.edgeslm"
_warned_fallback = False


def open_session(
    package: Path,
    model_file: str,
    *,
    custom_ops: Sequence[str] = (),
    portable_model: str | None = None,
    n_threads: int | None = None,
):
    """An `InferenceSession` for a package's graph, with the operators it needs.

    Args:
        package: the package folder.
        model_file: the graph to run when its operators are available.
        custom_ops: operator domains the graph needs besides onnxruntime's.
        portable_model: a graph of the same model needing none of them, if any.
        n_threads: onnxruntime intra-op threads (default: all cores).

    Raises:
        ModelFormatError: onnxruntime cannot load the graph, or it needs an
            operator domain this edgeslm lacks and there is no portable graph.
        ValueError: n_threads < 1.
    """
    unknown = sorted(set(custom_ops) - {EDGESLM_DOMAIN})
    if unknown:
        raise ModelFormatError(
            f"{package}: the graph needs operators {unknown} that this edgeslm "
            "does not have; upgrade edgeslm or re-export the model"
        )
    library = _kernel.operator_library() if custom_ops else None
    if custom_ops and library is None:
        if portable_model is None:
            raise ModelFormatError(
                f"{package}: the graph needs edgeslm's C kernel, which is not "
                f"available ({_kernel.load_error() or 'EDGESLM_KERNEL=numpy'}); "
                "reinstall edgeslm with a C compiler present (pip install .)"
            )
        _warn_fallback(package)
        model_file = portable_model
    return make_session(package / model_file, n_threads, operator_library=library)


def make_session(
    path: Path, n_threads: int | None, *, operator_library: Path | None = None
):
    """An onnxruntime CPU session with edgeslm's settings.

    Args:
        path: the `.onnx` file.
        n_threads: intra-op threads (default: all cores).
        operator_library: a custom-operator library to register first.

    Raises:
        ModelFormatError: onnxruntime cannot load it.
        ValueError: n_threads < 1.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    threads = n_threads or os.cpu_count() or 1
    if threads < 1:
        raise ValueError(f"n_threads must be >= 1, got {n_threads}")
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    try:
        if operator_library is not None:
            options.register_custom_ops_library(str(operator_library))
        return ort.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise ModelFormatError(f"{path}: onnxruntime cannot load it ({exc})") from exc


def _warn_fallback(package: Path) -> None:
    global _warned_fallback
    if not _warned_fallback:
        log.warning(
            "edgeslm's C kernel is not available (%s): running %s with onnxruntime's "
            "own int8 operator, which loads slower and takes more memory; reinstall "
            "edgeslm with a C compiler for the fast path",
            _kernel.load_error() or "EDGESLM_KERNEL=numpy",
            package,
        )
        _warned_fallback = True


def release_freed_heap() -> None:
    """Return heap memory that was freed while loading to the system (glibc only).

    Parsing a `tokenizer.json` and building a session make temporaries (about 15 MB
    for SmolLM2's 49,152-token vocabulary) that glibc's allocator keeps for reuse
    once freed, so they stay resident for the life of the process. `malloc_trim(0)`
    gives them back, in a few milliseconds. Elsewhere (musl, macOS) this does
    nothing.
    """
    global _malloc_trim
    if _malloc_trim is None:
        _malloc_trim = _find_malloc_trim()
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def _find_malloc_trim():
    """glibc's `malloc_trim`, or False where there is none."""
    import ctypes

    try:  # the symbols the process has already loaded, libc's among them
        return getattr(ctypes.CDLL(None), "malloc_trim", False)
    except OSError:
        return False
