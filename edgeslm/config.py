"""The one vocabulary of model dimensions used everywhere in edgeslm.

Every checkpoint format (Hugging Face `config.json`, GGUF metadata) is translated
into a `ModelConfig` in exactly one place (its reader); graph builders, the runtime
and the manifest speak only these names.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from edgeslm.errors import ModelFormatError

SUPPORTED_ARCHITECTURES = ("llama", "gpt2")
POSITION_EMBEDDINGS = ("rope", "learned")


@dataclass(frozen=True)
class ModelConfig:
    """Dimensions and hyper-parameters of a decoder-only model.

    Attributes:
        architecture: graph family, one of `SUPPORTED_ARCHITECTURES`.
        vocab_size: rows of the embedding matrix.
        hidden_size: width of the residual stream.
        n_layers: transformer blocks.
        n_heads: query heads per block.
        n_kv_heads: key/value heads per block (grouped-query attention).
        head_dim: width of one head.
        intermediate_size: width of the feed-forward layer.
        max_seq_len: positions the model was trained for.
        rope_theta: RoPE base frequency.
        norm_eps: epsilon of the RMS norms.
        tie_word_embeddings: the output projection reuses the embedding matrix.
        position_embedding: "rope" (rotary, keys re-rotatable in the cache) or
            "learned" (GPT-2's absolute position table; a full context must be
            recomputed, not shifted).
        hidden_act: feed-forward activation as Hugging Face names it ("silu",
            "gelu_new", "gelu", ...).
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_seq_len: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    position_embedding: str = "rope"
    hidden_act: str = "silu"

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ModelFormatError(
                f"architecture must be one of {SUPPORTED_ARCHITECTURES}, "
                f"got {self.architecture!r}"
            )
        for name in ("vocab_size", "hidden_size", "n_layers", "n_heads"):
            if getattr(self, name) <= 0:
                raise ModelFormatError(
                    f"{name} must be positive, got {getattr(self, name)}"
                )
        if self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads:
            raise ModelFormatError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads "
                f"({self.n_kv_heads})"
            )
        if self.position_embedding not in POSITION_EMBEDDINGS:
            raise ModelFormatError(
                f"position_embedding must be one of {POSITION_EMBEDDINGS}, "
                f"got {self.position_embedding!r}"
            )
        if self.position_embedding == "rope" and self.head_dim % 2:
            raise ModelFormatError(
                f"head_dim must be even for RoPE, got {self.head_dim}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Rebuild a config from a manifest, rejecting unknown or missing keys."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise ModelFormatError(f"unknown model config keys: {sorted(unknown)}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise ModelFormatError(f"incomplete model config: {exc}") from exc
