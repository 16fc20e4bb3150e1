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


class ConstraintError(EdgeSLMError, ValueError):
    """A constraint (JSON schema, regex, choices, grammar) is malformed or unusable."""


class UnsupportedSchemaError(ConstraintError):
    """A JSON schema uses a feature the grammar engine does not implement.

    Attributes:
        features: the unsupported features, as named in the message (`"not"`,
            `"oneOf"`, `"format: foo"`, ...).
    """

    def __init__(self, message: str, features: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.features = features


class TruncatedOutputError(EdgeSLMError):
    """Constrained output ended before the constraint was complete.

    Raised by the helpers that must return a valid value (`Model.extract`,
    `Model.choose`, `Model.tool_call`) when `max_tokens` or a stop string cut the
    answer short. `generation` holds what was produced.
    """

    def __init__(self, message: str, generation: object = None) -> None:
        super().__init__(message)
        self.generation = generation
