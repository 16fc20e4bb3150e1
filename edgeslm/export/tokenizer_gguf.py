"""`tokenizer.json` from the `tokenizer.ggml.*` metadata of a GGUF file.

This module owns `tokenizer_from_gguf`: typed, validated access to GGUF key/values
(`_GGUFMeta`, the same whatever the gguf package version), the choice between the two
vocabulary kinds it supports ("gpt2": byte-level BPE with merges; "llama":
SentencePiece BPE with byte fallback), and the special ids, BOS/EOS policy, extra
end-of-turn ids and chat template the metadata declares.

It does not build the `tokenizers` models (`tokenizer_bpe`, `tokenizer_spm`) and
never touches the weights. Not yet: GGUF vocabularies other than "gpt2" and "llama"
(WordPiece "bert", Unigram "t5", RWKV...); they raise `ModelFormatError` naming what
was found.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import Tokenizer

from edgeslm.errors import ModelFormatError
from edgeslm.export.tokenizer_bpe import (
    _byte_level_bpe,
    _byte_level_pre_tokenizer,
    _split_merge,
)
from edgeslm.export.tokenizer_common import (
    _NORMAL,
    TokenizerInfo,
    _add_typed_tokens,
    _check_ids_kept,
    _extra_eos_ids,
    _is_int,
    _set_post_processor,
    _vocab_dict,
    _write_tokenizer,
)
from edgeslm.export.tokenizer_spm import _SPM_BPE, _sentencepiece_backend, _SpmSpec

if TYPE_CHECKING:  # gguf is an export-time extra; only the reader object is used
    import gguf

# the tokenizer build's log lines keep the one name they had before the split
logger = logging.getLogger("edgeslm.export.tokenizer_build")


def tokenizer_from_gguf(reader: gguf.GGUFReader, out_dir: Path) -> TokenizerInfo:
    """Write `out_dir/tokenizer.json` from a GGUF file's tokenizer metadata.

    Args:
        reader: An open `gguf.GGUFReader` (weights are not touched).
        out_dir: Folder to write `tokenizer.json` into; created if missing.

    Returns:
        The special token ids, BOS policy and chat template the file declares.

    Raises:
        ModelFormatError: A required `tokenizer.ggml.*` key is missing or has the
            wrong type, the arrays disagree in length, or the vocabulary kind
            (`tokenizer.ggml.model`) or pre-tokenizer is not supported.
    """
    meta = _GGUFMeta(reader)
    kind = meta.string("tokenizer.ggml.model", required=True)
    tokens = meta.strings("tokenizer.ggml.tokens", required=True)
    types = meta.ints("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    _check_same_length("tokenizer.ggml.token_type", types, tokens)

    # The two vocabulary kinds; everything else is named and refused.
    if kind == "gpt2":
        backend = _byte_level_from_gguf(meta, tokens, types)
    elif kind == "llama":
        backend = _sentencepiece_from_gguf(meta, tokens, types)
    else:
        raise ModelFormatError(
            f"GGUF key 'tokenizer.ggml.model' is {kind!r}; edgeslm can build "
            "tokenizers for 'gpt2' (byte-level BPE) and 'llama' (SentencePiece) "
            "vocabularies only: export this model from its Hugging Face folder"
        )

    ids = {role: meta.token_id(key, len(tokens)) for role, key in _GGUF_ID_KEYS}
    # llama.cpp adds BOS to SentencePiece vocabularies unless told otherwise.
    add_bos = meta.boolean("tokenizer.ggml.add_bos_token", default=kind == "llama")
    add_bos = add_bos and ids["bos"] is not None
    add_eos = meta.boolean("tokenizer.ggml.add_eos_token", default=False)
    _set_post_processor(
        backend,
        bos=_named(tokens, ids["bos"]) if add_bos else None,
        eos=_named(tokens, ids["eos"]) if add_eos else None,
        byte_level=kind == "gpt2",
    )

    turn_ends = [meta.token_id(f"tokenizer.ggml.{k}", len(tokens)) for k in _EOT_KEYS]
    extra = _extra_eos_ids(backend, ids["eos"], [i for i in turn_ends if i is not None])
    _write_tokenizer(backend, Path(out_dir))
    return TokenizerInfo(
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        unk_token_id=ids["unk"],
        pad_token_id=ids["pad"],
        bos_token=tokens[ids["bos"]] if ids["bos"] is not None else None,
        eos_token=tokens[ids["eos"]] if ids["eos"] is not None else None,
        add_bos_token=add_bos,
        chat_template=meta.string("tokenizer.chat_template"),
        extra_eos_token_ids=extra,
    )


_GGUF_ID_KEYS = (
    ("bos", "tokenizer.ggml.bos_token_id"),
    ("eos", "tokenizer.ggml.eos_token_id"),
    ("unk", "tokenizer.ggml.unknown_token_id"),
    ("pad", "tokenizer.ggml.padding_token_id"),
)
_EOT_KEYS = ("eot_token_id", "eom_token_id")


def _byte_level_from_gguf(
    meta: _GGUFMeta, tokens: list[str], types: list[int]
) -> Tokenizer:
    """A GPT-2 style byte-level BPE from `tokenizer.ggml.tokens` and `.merges`."""
    raw_merges = meta.strings("tokenizer.ggml.merges", required=True)
    merges = [
        _split_merge(m, f"tokenizer.ggml.merges[{i}]") for i, m in enumerate(raw_merges)
    ]
    pre = meta.string("tokenizer.ggml.pre")
    backend = _byte_level_bpe(_vocab_dict(tokens), merges)
    backend.pre_tokenizer = _byte_level_pre_tokenizer(pre)
    _add_typed_tokens(backend, tokens, types)
    _check_ids_kept(backend, tokens)
    return backend


def _sentencepiece_from_gguf(
    meta: _GGUFMeta, tokens: list[str], types: list[int]
) -> Tokenizer:
    """A SentencePiece BPE with byte fallback, as llama.cpp's "llama" vocab runs it."""
    scores = meta.floats("tokenizer.ggml.scores", required=True)
    _check_same_length("tokenizer.ggml.scores", scores, tokens)
    unk_id = meta.token_id("tokenizer.ggml.unknown_token_id", len(tokens))
    charsmap = meta.ints("tokenizer.ggml.precompiled_charsmap")
    spec = _SpmSpec(
        pieces=list(zip(tokens, scores, types, strict=True)),
        model_type=_SPM_BPE,
        unk_id=unk_id,
        add_dummy_prefix=meta.boolean("tokenizer.ggml.add_space_prefix", default=True),
        remove_extra_whitespaces=meta.boolean(
            "tokenizer.ggml.remove_extra_whitespaces", default=False
        ),
        precompiled_charsmap=bytes(b & 0xFF for b in charsmap) if charsmap else b"",
    )
    return _sentencepiece_backend(spec)


class _GGUFMeta:
    """Typed, validated access to GGUF key/values, without gguf version quirks."""

    def __init__(self, reader: Any) -> None:
        fields = getattr(reader, "fields", None)
        if not isinstance(fields, dict):
            raise ModelFormatError(
                f"reader must be a gguf.GGUFReader (with a .fields mapping), got "
                f"{type(reader).__name__}"
            )
        self._fields = fields

    def _raw(self, key: str) -> Any:
        field = self._fields.get(key)
        if field is None:
            return None
        try:
            return _field_value(field)
        except (IndexError, ValueError, TypeError, UnicodeDecodeError) as exc:
            raise ModelFormatError(
                f"GGUF key {key!r} could not be read ({exc}); the file looks "
                "truncated or corrupt: re-download or re-convert it"
            ) from exc

    def _typed(
        self, key: str, ok: Callable[[Any], bool], what: str, required: bool
    ) -> Any:
        value = self._raw(key)
        if value is None:
            if required:
                raise ModelFormatError(
                    f"GGUF key {key!r} is missing; it is required to build the "
                    "tokenizer. Re-convert the model with a current llama.cpp "
                    "convert script, or export from the Hugging Face folder"
                )
            return None
        if not ok(value):
            shown = (
                f"a list of {len(value)}" if isinstance(value, list) else repr(value)
            )
            raise ModelFormatError(
                f"GGUF key {key!r} should be {what}, got {shown}; the file looks "
                "corrupt or was written by an unknown converter"
            )
        return value

    def string(self, key: str, *, required: bool = False) -> str | None:
        return self._typed(key, lambda v: isinstance(v, str), "a string", required)

    def strings(self, key: str, *, required: bool = False) -> list[str] | None:
        def ok(v: Any) -> bool:
            return isinstance(v, list) and all(isinstance(s, str) for s in v)

        return self._typed(key, ok, "an array of strings", required)

    def ints(self, key: str, *, required: bool = False) -> list[int] | None:
        def ok(v: Any) -> bool:
            return isinstance(v, list) and all(_is_int(x) for x in v)

        return self._typed(key, ok, "an array of integers", required)

    def floats(self, key: str, *, required: bool = False) -> list[float] | None:
        def ok(v: Any) -> bool:
            return isinstance(v, list) and all(isinstance(x, (int, float)) for x in v)

        return self._typed(key, ok, "an array of numbers", required)

    def boolean(self, key: str, *, default: bool) -> bool:
        value = self._typed(key, lambda v: v in (0, 1), "a boolean", False)
        return default if value is None else bool(value)

    def token_id(self, key: str, n_tokens: int) -> int | None:
        value = self._typed(key, _is_int, "an integer token id", False)
        if value is None:
            return None
        if not 0 <= value < n_tokens:
            # Some converters write -1 or a sentinel for "none"; say so and go on.
            logger.warning(
                "GGUF key %r is %d, outside the %d tokens; ignored",
                key,
                value,
                n_tokens,
            )
            return None
        return value


def _field_value(field: Any) -> Any:
    """The Python value of one GGUF reader field (scalar, string or flat array)."""
    from gguf import GGUFValueType  # export-time dependency

    kinds = list(field.types)
    if not kinds:
        raise ValueError("field has no type")
    if kinds[0] == GGUFValueType.ARRAY:
        if len(kinds) > 1 and kinds[-1] == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        if len(kinds) > 2:
            raise ValueError("nested arrays are not tokenizer metadata")
        return [field.parts[i][0].item() for i in field.data]
    if kinds[0] == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    return field.parts[field.data[0]][0].item()


def _check_same_length(key: str, values: Sequence[Any], tokens: Sequence[str]) -> None:
    if len(values) != len(tokens):
        raise ModelFormatError(
            f"GGUF key {key!r} has {len(values)} entries but 'tokenizer.ggml.tokens' "
            f"has {len(tokens)}; the file looks truncated or corrupt"
        )


def _named(tokens: Sequence[str], token_id: int | None) -> tuple[str, int] | None:
    return None if token_id is None else (tokens[token_id], token_id)
