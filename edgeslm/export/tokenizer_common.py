"""What every tokenizer builder shares: the manifest's facts and the finishing steps.

This module owns `TokenizerInfo` (what a package manifest records about its
tokenizer), the token-type numbers SentencePiece and GGUF share, and the steps every
source goes through once its `tokenizers` pipeline exists: the token -> id map,
special and user-defined tokens, the BOS/EOS post-processor, the extra end-of-turn
ids, the check that every token kept its id, and writing (or copying)
`tokenizer.json`. It also reads JSON and `tokenizer.json` files with errors that say
what to do.

It does not read a source format (`tokenizer_gguf`, `tokenizer_hf`) or build a model
(`tokenizer_bpe`, `tokenizer_spm`). Not yet: a token that repeats an earlier
token's spelling keeps no id that decodes (the TODO in `_vocab_dict`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, processors

from edgeslm.errors import ModelFormatError

# the tokenizer build's log lines keep the one name they had before the split
logger = logging.getLogger("edgeslm.export.tokenizer_build")

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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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
