"""SentencePiece: its model file, and a `tokenizers` pipeline that segments like it.

This module owns `_SpmSpec` (the parts of a SentencePiece model a conversion needs),
decoding a `tokenizer.model` protobuf by hand (so no protobuf package is needed), the
normalizer and decoder SentencePiece implies, and BPE merges recovered from the
piece scores the way llama.cpp ranks them; Unigram models become `models.Unigram`.

It does not read GGUF metadata (`tokenizer_gguf`) or a folder's configs
(`tokenizer_hf`). Not yet: word and char models (refused), user-defined pieces
matched the way SentencePiece matches them (the TODO in `_sentencepiece_backend`),
and HF's `legacy=False`: text after an added token gets the dummy prefix again, as
llama.cpp does.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Regex, Tokenizer, decoders, models, normalizers

from edgeslm.errors import ModelFormatError
from edgeslm.export.tokenizer_common import (
    _NORMAL,
    _add_typed_tokens,
    _check_ids_kept,
    _vocab_dict,
)

# the tokenizer build's log lines keep the one name they had before the split
logger = logging.getLogger("edgeslm.export.tokenizer_build")

_SPIECE_SPACE = "\u2581"  # "▁", SentencePiece's visible space

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
