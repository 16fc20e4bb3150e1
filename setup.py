"""Builds the optional C kernel as a plain shared library next to the edgeslm package.

pyproject.toml holds the project metadata; setuptools picks this file up for the one
thing pyproject cannot say: the extension and a build step that never fails the install.
The library has no Python C-API; edgeslm/_kernel.py loads it with ctypes. Without a C
compiler the install still succeeds and edgeslm falls back to its numpy reference.

Cross-compiling (e.g. for aarch64) needs no setuptools; see docs/KERNEL.md.
"""

from __future__ import annotations

import logging
import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

log = logging.getLogger("edgeslm.setup")

KERNEL_SOURCES = [
    "kernels/common.c",
    "kernels/sampler.c",
    "kernels/kvcache.c",
    "kernels/qmatmul.c",
    "kernels/qmatmul4.c",
    "kernels/attention.c",
    "kernels/ort_util.c",
    "kernels/ort_op.c",
    "kernels/ort_attention.c",
    "kernels/swiglu.c",
    "kernels/ort_embed.c",
]
# -ffp-contract=off: no fused multiply-add, so every platform rounds like numpy does.
KERNEL_CFLAGS = [
    "-O2",
    "-std=c99",
    "-ffp-contract=off",
    "-fno-fast-math",
    "-fvisibility=hidden",
    "-Wall",
    "-Wextra",
]


class OptionalKernelBuild(build_ext):
    """build_ext that names the library `_edgeslm_kernel.so` and tolerates failure."""

    def get_ext_filename(self, fullname: str) -> str:
        """Returns a plain library name: the file is not a Python extension module."""
        suffix = ".dll" if sys.platform == "win32" else ".so"
        return os.path.join(*fullname.split(".")) + suffix

    def get_export_symbols(self, ext: Extension) -> list[str]:
        """Exports no PyInit_* symbol (there is none); the C API is marked ESL_API."""
        return []

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # any toolchain failure is non-fatal
            self._warn(exc)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:  # any toolchain failure is non-fatal
            self._warn(exc)

    @staticmethod
    def _warn(exc: BaseException) -> None:
        message = (
            f"edgeslm: building the C kernel failed ({exc}); installing without it, "
            "the numpy reference sampler and KV cache will be used"
        )
        log.warning(message)


setup(
    ext_modules=[
        Extension(
            "edgeslm._edgeslm_kernel",
            sources=KERNEL_SOURCES,
            include_dirs=["kernels"],
            depends=[
                "kernels/edgeslm_kernel.h",
                "kernels/esl_internal.h",
                "kernels/qmatmul.h",
                "kernels/attention.h",
                "kernels/ort_abi.h",
                "kernels/ort_util.h",
            ],
            extra_compile_args=KERNEL_CFLAGS,
            libraries=["m"] if sys.platform != "win32" else [],
        )
    ],
    cmdclass={"build_ext": OptionalKernelBuild},
)
