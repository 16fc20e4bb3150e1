"""Byte-level BPE, GPT-2 style: the model, its merges and its pre-tokenizers.

This module owns building a `tokenizers` byte-level BPE from a vocabulary and its
merges, reading a `vocab.json` + `merges.txt` pair, parsing merge lines, and the
pre-tokenizer each GGUF `tokenizer.ggml.pre` name it knows stands for.

It does not read GGUF metadata (`tokenizer_gguf`) or a folder's special-token
configs (`tokenizer_hf`). Not yet: byte-level pre-tokenizers other than GPT-2's and
the digit-splitting family SmolLM2 uses (llama3, qwen2, deepseek... raise
`ModelFormatError`), and tiktoken files.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from edgeslm.errors import ModelFormatError
from edgeslm.export.tokenizer_common import _is_int, _read_json

# the tokenizer build's log lines keep the one name they had before the split
logger = logging.getLogger("edgeslm.export.tokenizer_build")


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
