"""`tokenizer.json` from a Hugging Face checkpoint folder.

This module owns `tokenizer_from_hf_folder`: finding the folder's tokenizer
(`tokenizer.json`, copied byte for byte; `vocab.json` + `merges.txt`; a SentencePiece
`tokenizer.model`) and reading what its config files say about it: the special
tokens' spellings, added tokens and the ids they must keep, the BOS policy, the chat
template (`tokenizer_config.json`, `special_tokens_map.json`, `added_tokens.json`,
`chat_template.jinja`) and the extra EOS ids (`generation_config.json`).

It does not convert vocabularies itself (`tokenizer_bpe`, `tokenizer_spm`), does not
change a `tokenizer.json` it copies, and does not invent a named special token the
vocabulary lacks (it logs it). Not yet: tiktoken files; a folder with only those
raises `ModelFormatError`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer

from edgeslm.errors import ModelFormatError, ModelNotFoundError
from edgeslm.export.tokenizer_bpe import _byte_level_from_files
from edgeslm.export.tokenizer_common import (
    TOKENIZER_FILE,
    TokenizerInfo,
    _copy_file,
    _extra_eos_ids,
    _is_int,
    _load_tokenizer_json,
    _read_json,
    _set_post_processor,
    _write_tokenizer,
)
from edgeslm.export.tokenizer_spm import _sentencepiece_from_model_file

# the tokenizer build's log lines keep the one name they had before the split
logger = logging.getLogger("edgeslm.export.tokenizer_build")


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
