"""edgeslm: a lean on-device runtime for small language models.

    import edgeslm
    model = edgeslm.load()                      # SmolLM2-135M-Instruct, int8
    print(model.chat([{"role": "user", "content": "Hi!"}]).text)

`load` accepts a package folder, a Hugging Face folder, a `.gguf` file or a hub id;
anything that is not a package is exported once into the per-user cache.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from edgeslm.errors import (
    EdgeSLMError,
    KernelError,
    ModelFormatError,
    ModelNotFoundError,
    PackageIntegrityError,
)

if TYPE_CHECKING:
    from edgeslm.model import Model

__version__ = "0.1.0"
__all__ = [
    "EdgeSLMError",
    "KernelError",
    "ModelFormatError",
    "ModelNotFoundError",
    "PackageIntegrityError",
    "load",
]


def load(
    name_or_path: str | os.PathLike | None = None,
    *,
    n_threads: int | None = None,
    n_ctx: int | None = None,
    dtype: str = "int8",
    verify: bool = True,
) -> Model:
    """Load a model, exporting it first if it is not a package yet.

    Args:
        name_or_path: None for the default model (SmolLM2-135M-Instruct), a package
            folder, a Hugging Face folder, a `.gguf` file, a folder of ONNX
            decoders in the Optimum layout, a name from `edgeslm models`, or a
            hub id.
        n_threads: onnxruntime threads (default: all cores).
        n_ctx: context length the KV cache holds.
        dtype: "int8" or "fp32", used when an export is needed.
        verify: check the package files' sha256 before loading.

    Raises:
        ModelNotFoundError, ModelFormatError, PackageIntegrityError.
    """
    from edgeslm.hub import resolve_package
    from edgeslm.model import Model

    package = resolve_package(name_or_path, dtype=dtype)
    if package.suffix == ".onnx":  # an Optimum / transformers.js decoder, as it is
        from edgeslm.optimum_backend import OptimumModel

        return OptimumModel(package, n_threads=n_threads, n_ctx=n_ctx)
    return Model(package, n_threads=n_threads, n_ctx=n_ctx, verify=verify)
