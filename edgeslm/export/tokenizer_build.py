"""Build a model package's `tokenizer.json` from whatever tokenizer a source has.

At run time edgeslm only reads a Hugging Face `tokenizer.json`. This module owns
producing that file, and the facts a manifest needs about it (`TokenizerInfo`), from:

- GGUF metadata (llama.cpp's `tokenizer.ggml.*` keys): "gpt2" byte-level BPE
  vocabularies and "llama" SentencePiece vocabularies (BPE with byte fallback,
  merges recovered from the piece scores the way llama.cpp ranks them);
- Hugging Face folders: a `tokenizer.json` (copied as is), a GPT-2 style
  `vocab.json` + `merges.txt`, or a SentencePiece `tokenizer.model` (BPE or
  Unigram; the protobuf is decoded here, so no protobuf package is needed).

It does not (yet) handle: GGUF vocabularies other than "gpt2" and "llama" (WordPiece
"bert", Unigram "t5", RWKV...), byte-level pre-tokenizers other than GPT-2's and
the digit-splitting family SmolLM2 uses, or tiktoken files. Those raise
`ModelFormatError` naming what was found. The files it writes are checked to load
and to keep every token at the id the source gave it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

from edgeslm.errors import ModelFormatError, ModelNotFoundError

if TYPE_CHECKING:  # gguf is an export-time extra; only the reader object is used
    import gguf

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"

# Token types, numbered as SentencePiece and GGUF (`tokenizer.ggml.token_type`) do.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# Spellings of end-of-turn markers that chat models emit besides their EOS token.
_END_OF_TURN_TEXTS = frozenset(
    {
        "<|endoftext|>",
        "<|im_end|>",
        "<|eot_id|>",
        "<|eom_id|>",
        "<|end|>",
        "<|end_of_text|>",
        "<end_of_turn>",
        "<end_of_utterance>",
        "<EOT>",
    }
)

_SPIECE_SPACE = "\u2581"  # "▁", SentencePiece's visible space


@dataclass(frozen=True)
class TokenizerInfo:
    """What a package manifest records about its tokenizer.

    Attributes:
        bos_token_id: Id of the beginning-of-sequence token, if any.
        eos_token_id: Id of the end-of-sequence token, if any.
        unk_token_id: Id of the unknown token, if any.
        pad_token_id: Id of the padding token, if any.
        bos_token: Spelling of the BOS token.
        eos_token: Spelling of the EOS token.
        add_bos_token: Whether a prompt should start with BOS. The written
            tokenizer's post-processor adds it on `encode(add_special_tokens=True)`.
        chat_template: The Jinja chat template, if the source has one.
        extra_eos_token_ids: Other ids that end a turn (e.g. `<|endoftext|>` when
            EOS is `<|im_end|>`), so generation can stop on them too.
    """

    bos_token_id: int | None
    eos_token_id: int | None
    unk_token_id: int | None
    pad_token_id: int | None
    bos_token: str | None
    eos_token: str | None
    add_bos_token: bool
    chat_template: str | None
    extra_eos_token_ids: tuple[int, ...] = ()


# --------------------------------------------------------------------------- GGUF


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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_same_length(key: str, values: Sequence[Any], tokens: Sequence[str]) -> None:
    if len(values) != len(tokens):
        raise ModelFormatError(
            f"GGUF key {key!r} has {len(values)} entries but 'tokenizer.ggml.tokens' "
            f"has {len(tokens)}; the file looks truncated or corrupt"
        )


def _named(tokens: Sequence[str], token_id: int | None) -> tuple[str, int] | None:
    return None if token_id is None else (tokens[token_id], token_id)


# ----------------------------------------------------------------- HF folders


def tokenizer_from_hf_folder(src: Path, out_dir: Path) -> TokenizerInfo:
    """Write `out_dir/tokenizer.json` from a Hugging Face checkpoint folder.

    The tokenizer comes from the first of: `tokenizer.json` (copied byte for
    byte), `vocab.json` + `merges.txt` (GPT-2 byte-level BPE), `tokenizer.model`
    (SentencePiece, converted). Special tokens, the BOS policy and the chat
    template come from `tokenizer_config.json` (and `chat_template.jinja`), then
    `special_tokens_map.json`; `generation_config.json` adds extra EOS ids.

    Args:
        src: The checkpoint folder.
        out_dir: Folder to write `tokenizer.json` into; created if missing.

    Returns:
        The special token ids, BOS policy and chat template.

    Raises:
        ModelNotFoundError: `src` is not a folder.
        ModelFormatError: No tokenizer file is there, one is truncated or
            garbled, or a config file is not a JSON object.
    """
    src, out_dir = Path(src), Path(out_dir)
    if not src.is_dir():
        raise ModelNotFoundError(f"tokenizer source folder {src} does not exist")
    config = _json_object(src / "tokenizer_config.json")
    names = _special_names(config, _json_object(src / "special_tokens_map.json"))
    backend, source = _load_hf_tokenizer(src, config, names)
    copied = source == TOKENIZER_FILE
    if not copied:
        _add_config_tokens(backend, config, names, src)

    ids = {role: backend.token_to_id(token) for role, token in names.items()}
    bos_id, eos_id = ids.get("bos"), ids.get("eos")
    add_bos = _add_bos_policy(backend, config, bos_id, source)
    if not copied:
        bos = (names["bos"], bos_id) if add_bos and bos_id is not None else None
        _set_post_processor(backend, bos=bos, eos=None, byte_level=source != _SPM_FILE)

    generation = _json_object(src / "generation_config.json")
    extra = _extra_eos_ids(backend, eos_id, _int_list(generation.get("eos_token_id")))
    if copied:
        _copy_file(src / TOKENIZER_FILE, out_dir)
    else:
        _write_tokenizer(backend, out_dir)
    return TokenizerInfo(
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        unk_token_id=ids.get("unk"),
        pad_token_id=ids.get("pad"),
        bos_token=names["bos"] if bos_id is not None else None,
        eos_token=names["eos"] if eos_id is not None else None,
        add_bos_token=add_bos,
        chat_template=_chat_template(src, config),
        extra_eos_token_ids=extra,
    )


_BPE_FILES = "vocab.json"
_SPM_FILE = "tokenizer.model"


def _load_hf_tokenizer(
    src: Path, config: dict[str, Any], names: dict[str, str]
) -> tuple[Tokenizer, str]:
    """The folder's tokenizer, and which file it came from."""
    if (src / TOKENIZER_FILE).is_file():
        return _load_tokenizer_json(src / TOKENIZER_FILE), TOKENIZER_FILE
    if (src / _BPE_FILES).is_file() and (src / "merges.txt").is_file():
        return _byte_level_from_files(src, config, names), _BPE_FILES
    if (src / _SPM_FILE).is_file():
        return _sentencepiece_from_model_file(src / _SPM_FILE, config, names), _SPM_FILE
    raise ModelFormatError(
        f"no tokenizer in {src}: expected tokenizer.json, vocab.json + merges.txt, "
        "or tokenizer.model (SentencePiece)"
    )


def _json_object(path: Path) -> dict[str, Any]:
    """A JSON object file's content; {} if the file is absent."""
    if not path.is_file():
        return {}
    value = _read_json(path)
    if not isinstance(value, dict):
        raise ModelFormatError(
            f"{path} should hold a JSON object, got {type(value).__name__}: "
            "re-download it"
        )
    return value


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFormatError(
            f"{path} is not valid JSON ({exc}); it may be truncated: re-download it"
        ) from exc


def _load_tokenizer_json(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust side raises a bare Exception
        raise ModelFormatError(
            f"{path} could not be loaded by tokenizers ({exc}); it may be truncated "
            "or written by a newer tokenizers version: re-download it"
        ) from exc


def _special_names(
    config: dict[str, Any], special_map: dict[str, Any]
) -> dict[str, str]:
    """bos/eos/unk/pad spellings, tokenizer_config.json before the special map."""
    names: dict[str, str] = {}
    for role in ("bos", "eos", "unk", "pad"):
        for source in (config, special_map):
            value = _token_content(source.get(f"{role}_token"))
            if value is not None:
                names[role] = value
                break
    return names


def _token_content(value: Any) -> str | None:
    """A token spelling from a config entry: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _add_config_tokens(
    backend: Tokenizer, config: dict[str, Any], names: dict[str, str], src: Path
) -> None:
    """Add the config's declared added tokens, then mark named ones special.

    Tokens declared with an id (`added_tokens_decoder`, `added_tokens.json`) must
    land on that id. Named special tokens that are not in the vocabulary are not
    invented: that would grow the vocabulary past the model's embedding.
    """
    for token_id, token in _declared_added_tokens(config, src):
        if token.special:
            backend.add_special_tokens([token])
        else:
            backend.add_tokens([token])
        got = backend.token_to_id(token.content)
        if got != token_id:
            raise ModelFormatError(
                f"{src}: the config says {token.content!r} is id {token_id}, but the "
                f"vocabulary puts it at {got}; the tokenizer files disagree: "
                "re-download them together"
            )
    extra = config.get("additional_special_tokens") or []
    wanted = [*names.values(), *filter(None, map(_token_content, extra))]
    for token in dict.fromkeys(wanted):
        if backend.token_to_id(token) is None:
            logger.warning("%s: special token %r is not in the vocabulary", src, token)
            continue
        backend.add_special_tokens([AddedToken(token, normalized=False, special=True)])


def _declared_added_tokens(
    config: dict[str, Any], src: Path
) -> list[tuple[int, AddedToken]]:
    """(id, token) pairs from `added_tokens_decoder` and `added_tokens.json`."""
    declared = config.get("added_tokens_decoder") or {}
    legacy = _json_object(src / "added_tokens.json")
    if not isinstance(declared, dict):
        raise ModelFormatError(
            f"{src}/tokenizer_config.json 'added_tokens_decoder' should be an object "
            f"mapping ids to tokens, got {type(declared).__name__}"
        )
    found: dict[int, AddedToken] = {}
    for content, token_id in legacy.items():
        if _is_int(token_id):
            found[token_id] = AddedToken(content, normalized=False, special=False)
    for key, spec in declared.items():
        content = _token_content(spec)
        if content is None or not str(key).isdigit():
            raise ModelFormatError(
                f"{src}/tokenizer_config.json added_tokens_decoder entry {key!r} "
                f"should map an id to {{'content': ...}}, got {spec!r}"
            )
        special = bool(spec.get("special", False))
        found[int(key)] = AddedToken(
            content,
            single_word=bool(spec.get("single_word", False)),
            lstrip=bool(spec.get("lstrip", False)),
            rstrip=bool(spec.get("rstrip", False)),
            normalized=bool(spec.get("normalized", not special)),
            special=special,
        )
    return sorted(found.items(), key=lambda item: item[0])


def _add_bos_policy(
    backend: Tokenizer, config: dict[str, Any], bos_id: int | None, source: str
) -> bool:
    """Whether prompts start with BOS: the config's word, else what the files do."""
    if bos_id is None:
        return False
    declared = config.get("add_bos_token")
    if isinstance(declared, bool):
        if source == TOKENIZER_FILE and declared != _adds_bos(backend, bos_id):
            logger.warning(
                "tokenizer_config.json says add_bos_token=%s but tokenizer.json's "
                "post-processor disagrees; the manifest follows the config",
                declared,
            )
        return declared
    if source == TOKENIZER_FILE:
        return _adds_bos(backend, bos_id)
    # No word either way: SentencePiece models (Llama) add BOS, GPT-2 does not.
    return source == _SPM_FILE


def _adds_bos(backend: Tokenizer, bos_id: int) -> bool:
    return backend.encode("a", add_special_tokens=True).ids[:1] == [bos_id]


def _chat_template(src: Path, config: dict[str, Any]) -> str | None:
    """The default chat template: chat_template.jinja, else tokenizer_config.json."""
    jinja = src / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named: [{"name": ..., "template": ...}, ...]
        named = {
            t.get("name"): t.get("template") for t in template if isinstance(t, dict)
        }
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


def _int_list(value: Any) -> list[int]:
    if _is_int(value):
        return [value]
    if isinstance(value, list):
        return [v for v in value if _is_int(v)]
    return []


# ------------------------------------------------------- byte-level BPE (GPT-2)


def _byte_level_from_files(
    src: Path, config: dict[str, Any], names: dict[str, str]
) -> Tokenizer:
    """A GPT-2 byte-level BPE from `vocab.json` and `merges.txt`.

    Fills `names` with GPT-2's `<|endoftext|>` when the folder declares none.
    """
    vocab = _read_json(src / "vocab.json")
    if not isinstance(vocab, dict) or not all(
        isinstance(k, str) and _is_int(v) for k, v in vocab.items()
    ):
        raise ModelFormatError(
            f"{src / 'vocab.json'} should map token strings to integer ids; it does "
            "not: re-download it"
        )
    merges = _read_merges(src / "merges.txt")
    backend = _byte_level_bpe(vocab, merges)
    add_prefix_space = bool(config.get("add_prefix_space", False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    # GPT-2 folders often ship no config at all; HF's GPT-2 defaults then apply.
    if not names and "<|endoftext|>" in vocab:
        logger.info("%s: no special tokens declared; using GPT-2's <|endoftext|>", src)
        names.update(bos="<|endoftext|>", eos="<|endoftext|>", unk="<|endoftext|>")
    return backend


def _read_merges(path: Path) -> list[tuple[str, str]]:
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as exc:
        raise ModelFormatError(
            f"{path} is not UTF-8 text ({exc}): re-download it"
        ) from exc
    merges = []
    for number, line in enumerate(lines, start=1):
        if not line or (number == 1 and line.startswith("#version")):
            continue
        merges.append(_split_merge(line, f"{path.name} line {number}"))
    return merges


def _split_merge(text: str, where: str) -> tuple[str, str]:
    parts = text.split(" ")
    if len(parts) != 2 or not all(parts):
        raise ModelFormatError(
            f"{where} should be two tokens separated by one space, got {text!r}; "
            "the merges look truncated or garbled"
        )
    return parts[0], parts[1]


def _byte_level_bpe(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Tokenizer:
    try:
        model = models.BPE(vocab=vocab, merges=merges, fuse_unk=False)
    except Exception as exc:  # e.g. a merge naming a token not in the vocabulary
        raise ModelFormatError(
            f"the BPE vocabulary and merges do not fit together ({exc}); one of them "
            "is truncated or they come from different models"
        ) from exc
    backend = Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return backend


def _gpt2_split() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2_split() -> pre_tokenizers.PreTokenizer:
    # llama.cpp runs "\p{N}" first, then GPT-2's regex, on each piece.
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), _gpt2_split()]
    )


# `tokenizer.ggml.pre` values whose split is GPT-2's regex, or digits first.
_BYTE_LEVEL_PRE: dict[str, Callable[[], pre_tokenizers.PreTokenizer]] = {
    **dict.fromkeys(("gpt-2", "phi-2", "mpt", "olmo", "jais"), _gpt2_split),
    **dict.fromkeys(
        (
            "smollm",
            "starcoder",
            "refact",
            "command-r",
            "codeshell",
            "exaone",
            "minerva-7b",
        ),
        _digits_then_gpt2_split,
    ),
}


def _byte_level_pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    if pre is None or pre == "default":
        # llama.cpp's own "default" is a stop-gap regex it warns about; GPT-2's
        # split is what such old byte-level conversions almost always meant.
        logger.warning(
            "GGUF 'tokenizer.ggml.pre' is %r; assuming GPT-2's pre-tokenizer", pre
        )
        return _gpt2_split()
    factory = _BYTE_LEVEL_PRE.get(pre)
    if factory is None:
        # TODO: llama3/qwen2/deepseek splits; no reference vectors here to test them.
        raise ModelFormatError(
            f"GGUF key 'tokenizer.ggml.pre' is {pre!r}, a pre-tokenizer edgeslm does "
            f"not know; supported: 'default', {', '.join(sorted(_BYTE_LEVEL_PRE))}. "
            "Export this model from its Hugging Face folder (tokenizer.json) instead"
        )
    return factory()


# ------------------------------------------------------------------ SentencePiece

_SPM_UNIGRAM, _SPM_BPE = 1, 2


@dataclass
class _SpmSpec:
    """The parts of a SentencePiece model the conversion needs."""

    pieces: list[tuple[str, float, int]]  # (piece, score, type) in id order
    model_type: int
    unk_id: int | None
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = False
    precompiled_charsmap: bytes = b""
    byte_fallback: bool = True


def _sentencepiece_backend(spec: _SpmSpec) -> Tokenizer:
    """A `tokenizers` pipeline that segments the way SentencePiece does.

    Plain text segments exactly as SentencePiece would. Added tokens written in
    the text split it first, and each piece between them gets the dummy "▁"
    prefix again: llama.cpp's behaviour (HF's `legacy=True`).
    """
    # TODO: match user-defined pieces as SentencePiece does; Metaspace mangles spaces
    tokens = [p for p, _, _ in spec.pieces]
    vocab = _vocab_dict(tokens)
    unk = tokens[spec.unk_id] if spec.unk_id is not None else None
    try:
        if spec.model_type == _SPM_BPE:
            merges = _merges_from_scores(spec.pieces, vocab)
            model = models.BPE(
                vocab=vocab,
                merges=merges,
                unk_token=unk,
                fuse_unk=True,
                byte_fallback=spec.byte_fallback,
            )
        else:
            scored = [(p, float(s)) for p, s, _ in spec.pieces]
            model = models.Unigram(
                scored, unk_id=spec.unk_id, byte_fallback=spec.byte_fallback
            )
    except Exception as exc:
        raise ModelFormatError(
            f"the SentencePiece vocabulary is inconsistent ({exc})"
        ) from exc

    backend = Tokenizer(model)
    backend.normalizer = _spm_normalizer(spec)
    steps = [
        decoders.Replace(_SPIECE_SPACE, " "),
        decoders.ByteFallback(),
        decoders.Fuse(),
    ]
    if spec.add_dummy_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(steps)
    _add_typed_tokens(backend, tokens, [t for _, _, t in spec.pieces])
    _check_ids_kept(backend, tokens)
    return backend


def _spm_normalizer(spec: _SpmSpec) -> normalizers.Normalizer:
    steps: list[normalizers.Normalizer] = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        steps.append(normalizers.Replace(Regex(r"\A +| +\z"), ""))
        steps.append(normalizers.Replace(Regex(" {2,}"), " "))
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend(_SPIECE_SPACE))
    steps.append(normalizers.Replace(" ", _SPIECE_SPACE))
    return normalizers.Sequence(steps)


def _merges_from_scores(
    pieces: Sequence[tuple[str, float, int]], vocab: dict[str, int]
) -> list[tuple[str, str]]:
    """BPE merges that reproduce SentencePiece's score-ranked merging.

    SentencePiece (and llama.cpp's "llama" tokenizer) repeatedly joins the two
    adjacent symbols whose concatenation is the best-scoring piece. Ranking every
    split of every normal piece by that piece's score gives `tokenizers` the same
    order; ties break by piece id, then by the left part's id.
    """
    ranked = []
    for piece_id, (piece, score, kind) in enumerate(pieces):
        if kind != _NORMAL or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-score, piece_id, vocab[left], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _sentencepiece_from_model_file(
    path: Path, config: dict[str, Any], names: dict[str, str]
) -> Tokenizer:
    """Convert a SentencePiece `tokenizer.model` (BPE or Unigram).

    Fills `names` with the trainer's bos/eos/unk/pad pieces the config leaves out.
    """
    if config.get("legacy") is False:
        logger.warning(
            "%s: legacy=False is not reproduced; text after an added token gets "
            "SentencePiece's dummy prefix again, as llama.cpp does",
            path,
        )
    spec, specials = _parse_spm_model(path.read_bytes(), str(path))
    for role, piece in specials.items():
        names.setdefault(role, piece)
    return _sentencepiece_backend(spec)


def _parse_spm_model(data: bytes, where: str) -> tuple[_SpmSpec, dict[str, str]]:
    """Decode the ModelProto of a SentencePiece model file.

    Returns:
        The spec, and the bos/eos/unk/pad pieces its trainer spec names.

    Raises:
        ModelFormatError: The bytes are not a complete SentencePiece model.
    """
    try:
        return _decode_spm_model(data, where)
    except (TypeError, ValueError, IndexError, struct.error) as exc:
        # A field of the wrong wire type (bytes where a number belongs...).
        raise ModelFormatError(
            f"{where} is not a valid SentencePiece model ({exc}); the file is "
            "garbled: re-download it"
        ) from exc


def _decode_spm_model(data: bytes, where: str) -> tuple[_SpmSpec, dict[str, str]]:
    pieces: list[tuple[str, float, int]] = []
    trainer: dict[int, Any] | None = None
    normalizer: dict[int, Any] | None = None
    for field, value in _proto_fields(data, where):
        if field == 1:  # repeated SentencePiece {piece=1, score=2, type=3}
            entry = _proto_dict(value, where)
            piece = entry.get(1, b"")
            score = (
                struct.unpack("<f", entry[2])[0]
                if isinstance(entry.get(2), bytes)
                else 0.0
            )
            pieces.append((_utf8(piece, where), score, int(entry.get(3, _NORMAL))))
        elif field == 2:
            trainer = _proto_dict(value, where)
        elif field == 3:
            normalizer = _proto_dict(value, where)
    parts: dict[str, Any] = {
        "pieces": pieces or None,
        "trainer spec": trainer,
        "normalizer spec": normalizer,
    }
    missing = [name for name, part in parts.items() if part is None]
    if missing:
        raise ModelFormatError(
            f"{where} has no {' or '.join(missing)}; it is not a SentencePiece "
            "model or it is truncated: re-download it"
        )
    model_type = int(trainer.get(3, _SPM_UNIGRAM))
    if model_type not in (_SPM_UNIGRAM, _SPM_BPE):
        raise ModelFormatError(
            f"{where} is a SentencePiece model of type {model_type} (word/char); "
            "only BPE (2) and Unigram (1) models are supported"
        )
    role_ids = {
        "unk": trainer.get(40, 0),
        "bos": trainer.get(41, 1),
        "eos": trainer.get(42, 2),
        "pad": trainer.get(43, -1),
    }
    role_ids = {k: _signed32(v) for k, v in role_ids.items()}
    specials = {k: pieces[i][0] for k, i in role_ids.items() if 0 <= i < len(pieces)}
    unk_id = role_ids["unk"] if 0 <= role_ids["unk"] < len(pieces) else None
    spec = _SpmSpec(
        pieces=pieces,
        model_type=model_type,
        unk_id=unk_id,
        add_dummy_prefix=bool(normalizer.get(3, 1)),
        remove_extra_whitespaces=bool(normalizer.get(4, 1)),
        precompiled_charsmap=normalizer.get(2, b"") or b"",
        byte_fallback=bool(trainer.get(35, 0)),
    )
    return spec, specials


def _proto_fields(data: bytes, where: str) -> Iterator[tuple[int, Any]]:
    """(field number, value) pairs of one protobuf message, in order.

    Varints come back as int, length-delimited fields as bytes, fixed 32/64-bit
    fields as their raw little-endian bytes.
    """
    pos, end = 0, len(data)
    while pos < end:
        key, pos = _varint(data, pos, where)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos, where)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = data[pos : pos + size], pos + size
        elif wire == 2:
            size, pos = _varint(data, pos, where)
            value, pos = data[pos : pos + size], pos + size
        else:
            raise ModelFormatError(
                f"{where}: protobuf wire type {wire} is not valid here; the file "
                "is garbled"
            )
        if pos > end or field == 0:
            raise ModelFormatError(
                f"{where} ends in the middle of a field; it is truncated: "
                "re-download it"
            )
        yield field, value


def _proto_dict(data: bytes, where: str) -> dict[int, Any]:
    """Last value of each field of a message (all fields we read are singular)."""
    return dict(_proto_fields(data, where))


def _varint(data: bytes, pos: int, where: str) -> tuple[int, int]:
    value = shift = 0
    while pos < len(data) and shift < 70:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise ModelFormatError(
        f"{where} ends inside a number; it is truncated or garbled: re-download it"
    )


def _signed32(value: int) -> int:
    """A protobuf int32 decoded from its varint (negatives are 10-byte varints)."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def _utf8(raw: Any, where: str) -> str:
    try:
        return bytes(raw).decode("utf-8")
    except (UnicodeDecodeError, TypeError) as exc:
        raise ModelFormatError(
            f"{where} holds a piece that is not UTF-8; the file is garbled"
        ) from exc


# ------------------------------------------------------------------ shared steps


def _vocab_dict(tokens: Sequence[str]) -> dict[str, int]:
    """token -> id; a repeated spelling keeps its first id."""
    vocab: dict[str, int] = {}
    duplicates = 0
    for token_id, token in enumerate(tokens):
        if token in vocab:
            duplicates += 1
            continue
        vocab[token] = token_id
    if duplicates:
        # TODO: keep repeated spellings decodable; needs id->text outside the vocab map.
        logger.warning(
            "%d tokens repeat an earlier spelling; their ids will not decode",
            duplicates,
        )
    return vocab


def _add_typed_tokens(
    backend: Tokenizer, tokens: Sequence[str], types: Sequence[int]
) -> None:
    """Make control/unknown tokens special and user-defined ones whole added tokens."""
    special = [
        AddedToken(t, normalized=False, special=True)
        for t, kind in zip(tokens, types, strict=True)
        if kind in (_CONTROL, _UNKNOWN)
    ]
    user = [
        AddedToken(t, normalized=False, special=False)
        for t, kind in zip(tokens, types, strict=True)
        if kind == _USER_DEFINED
    ]
    if special:
        backend.add_special_tokens(special)
    if user:
        backend.add_tokens(user)


def _set_post_processor(
    backend: Tokenizer,
    *,
    bos: tuple[str, int] | None,
    eos: tuple[str, int] | None,
    byte_level: bool,
) -> None:
    """Add BOS/EOS on `encode(add_special_tokens=True)` as the source asks."""
    steps: list[processors.PostProcessor] = []
    if byte_level:
        steps.append(processors.ByteLevel(trim_offsets=False))
    if bos is not None or eos is not None:

        def template(sequence: str, type_id: int) -> list[str]:
            head = [f"{bos[0]}:{type_id}"] if bos else []
            tail = [f"{eos[0]}:{type_id}"] if eos else []
            return [*head, f"${sequence}:{type_id}", *tail]

        specials = list(dict.fromkeys(t for t in (bos, eos) if t is not None))
        steps.append(
            processors.TemplateProcessing(
                single=template("A", 0),
                pair=template("A", 0) + template("B", 1),
                special_tokens=specials,
            )
        )
    if len(steps) > 1:
        backend.post_processor = processors.Sequence(steps)
    else:
        backend.post_processor = steps[0] if steps else None


def _extra_eos_ids(
    backend: Tokenizer, eos_id: int | None, declared: Sequence[int]
) -> tuple[int, ...]:
    """Ids besides EOS that end a turn: declared ones, then known special markers."""
    found = [i for i in declared if i != eos_id]
    specials = {
        token_id: added.content
        for token_id, added in backend.get_added_tokens_decoder().items()
        if added.special
    }
    for token_id, content in sorted(specials.items()):
        if content in _END_OF_TURN_TEXTS and token_id != eos_id:
            found.append(token_id)
    return tuple(dict.fromkeys(found))


def _check_ids_kept(backend: Tokenizer, tokens: Sequence[str]) -> None:
    """Every token must still be at the id the source gave it."""
    seen: set[str] = set()
    for token_id, token in enumerate(tokens):
        if token in seen:
            continue
        seen.add(token)
        got = backend.token_to_id(token)
        if got != token_id:
            raise ModelFormatError(
                f"token {token!r} is id {token_id} in the source but {got} in the "
                "built tokenizer; the vocabulary is inconsistent (a control token "
                "listed twice?)"
            )


def _write_tokenizer(backend: Tokenizer, out_dir: Path) -> Path:
    """Save compactly and atomically, then check the file loads back."""
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / TOKENIZER_FILE
    fd, tmp = tempfile.mkstemp(prefix=".tokenizer.", suffix=".json", dir=out_dir)
    os.close(fd)
    try:
        backend.save(tmp, pretty=False)
        _load_tokenizer_json(Path(tmp))
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    logger.info(
        "wrote %s (%d tokens)", target, backend.get_vocab_size(with_added_tokens=True)
    )
    return target


def _copy_file(source: Path, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / TOKENIZER_FILE
    if source.resolve() != target.resolve():
        shutil.copyfile(source, target)
    return target
