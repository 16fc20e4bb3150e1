"""Exception types raised by edgeslm.

Every error edgeslm raises on purpose derives from `EdgeSLMError`, so callers can
catch one type. Messages name what was wrong and say what to do next.
"""


class EdgeSLMError(Exception):
    """Base class of every error edgeslm raises on purpose."""


class ModelFormatError(EdgeSLMError, ValueError):
    """A checkpoint or model file is malformed, truncated or unsupported."""


class PackageIntegrityError(EdgeSLMError):
    """A model package failed verification (missing file, sha256 mismatch)."""


class ModelNotFoundError(EdgeSLMError, FileNotFoundError):
    """A model name or path could not be resolved to a checkpoint or package."""


class KernelError(EdgeSLMError, RuntimeError):
    """The C kernel reported an error (bad arguments, NaN logits, I/O)."""
