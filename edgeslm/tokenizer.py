"""The runtime tokenizer: a thin wrapper around a Hugging Face `tokenizer.json`.

Every model package carries exactly one `tokenizer.json`, whatever the model was
exported from, so run time has one code path: the Rust `tokenizers` library. This
module owns loading that file, encoding and decoding ids, and streaming decode of
generated ids (`IncrementalDecoder`), which never emits half a UTF-8 character and
never loses a SentencePiece leading space.

It does not build `tokenizer.json` files (see `edgeslm.export.tokenizer_build`),
render chat templates, or batch, pad or truncate.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer as _Backend

from edgeslm.errors import ModelFormatError, ModelNotFoundError

logger = logging.getLogger(__name__)

# A SentencePiece byte-fallback piece such as "<0x0A>".
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_REPLACEMENT = "\ufffd"


class Tokenizer:
    """Encode text to ids and decode ids to text with one `tokenizer.json`.

    Build one with `Tokenizer.from_file`; the constructor takes an already loaded
    `tokenizers.Tokenizer` (useful in tests and in the exporter).
    """

    def __init__(self, backend: _Backend) -> None:
        """Wrap a loaded `tokenizers.Tokenizer`.

        Args:
            backend: The Hugging Face tokenizer to wrap.
        """
        self._backend = backend
        self._vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self._special_ids = frozenset(
            token_id
            for token_id, added in backend.get_added_tokens_decoder().items()
            if added.special
        )
        self._byte_ids = _byte_fallback_ids(backend)

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load a `tokenizer.json`.

        Args:
            path: The `tokenizer.json` file, usually inside a model package.

        Returns:
            The tokenizer.

        Raises:
            ModelNotFoundError: `path` is not a file.
            ModelFormatError: The file is not a valid `tokenizer.json` (truncated,
                not JSON, or from a `tokenizers` version too new for this one).
        """
        path = Path(path)
        if not path.is_file():
            raise ModelNotFoundError(
                f"tokenizer file {path} does not exist; a model package keeps it as "
                "tokenizer.json next to model.onnx"
            )
        try:
            backend = _Backend.from_file(str(path))
        except Exception as exc:  # the Rust side raises a bare Exception
            raise ModelFormatError(
                f"tokenizer file {path} could not be parsed ({exc}); it may be "
                "truncated or corrupt: re-export the model package"
            ) from exc
        return cls(backend)

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer knows, added tokens included."""
        return self._vocab_size

    @property
    def backend(self) -> _Backend:
        """The wrapped `tokenizers.Tokenizer`, for callers that need more."""
        return self._backend

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Turn text into token ids.

        Special and added tokens written in the text (such as `<|im_start|>`) are
        recognized as single tokens.

        Args:
            text: The text to encode.
            add_special_tokens: Apply the tokenizer's post-processor, which adds BOS
                (and EOS) where the package's tokenizer says so.

        Returns:
            The token ids.

        Raises:
            TypeError: `text` is not a `str`.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """Turn token ids back into text.

        Args:
            ids: Token ids; ids at or past `vocab_size` (padding rows of a model's
                embedding) have no text and are left out.
            skip_special_tokens: Leave special tokens (BOS, EOS, `<|im_end|>`...)
                out of the text.

        Returns:
            The text.

        Raises:
            ValueError: An id is not a non-negative integer.
        """
        checked = [self._check_id(token_id) for token_id in ids]
        return self._backend.decode(checked, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """The id of a token string (as spelled in the vocabulary), or None."""
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary spelling of an id, or None if the id is unknown."""
        try:
            return self._backend.id_to_token(self._check_id(token_id))
        except ValueError:
            return None

    def is_special(self, token_id: int) -> bool:
        """Whether an id is a special token (skipped by `skip_special_tokens`)."""
        return token_id in self._special_ids

    def incremental_decoder(
        self, *, skip_special_tokens: bool = True
    ) -> IncrementalDecoder:
        """A streaming decoder for ids produced one at a time.

        Args:
            skip_special_tokens: Leave special tokens out of the streamed text.

        Returns:
            A fresh decoder.
        """
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens)

    def _check_id(self, token_id: int) -> int:
        # numpy integers are welcome; bools, floats and negatives are not. Ids past
        # the vocabulary (a model whose embedding is padded beyond it) decode to "".
        if isinstance(token_id, bool) or not hasattr(token_id, "__index__"):
            raise ValueError(
                f"token id must be an int, got {type(token_id).__name__} {token_id!r}"
            )
        value = int(token_id)
        if value < 0:
            raise ValueError(f"token id must be >= 0, got {value}")
        return value


class IncrementalDecoder:
    """Streams text from ids as they are generated.

    For any id sequence, `"".join(add(i) for i in ids) + flush()` equals
    `Tokenizer.decode(ids, skip_special_tokens=...)`. Text is held back while it
    could still change: while it ends in an incomplete UTF-8 character, and while a
    run of SentencePiece byte-fallback pieces (`<0xE2>`...) may still grow, because
    the decoder turns a whole invalid run into replacement characters.

    Each step decodes a short window: the ids emitted by the previous step (their
    text is already out, they give the context that keeps leading spaces right)
    plus the ids not yet emitted. The window restarts after every emission, so the
    cost per token does not grow with the length of the text. (Only a run of ids
    whose text keeps ending in U+FFFD keeps the window open until one does not.)
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool) -> None:
        """Start an empty stream.

        Args:
            tokenizer: The tokenizer whose ids will be fed.
            skip_special_tokens: Leave special tokens out of the text.
        """
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._reset()

    def add(self, token_id: int) -> str:
        """Feed one id.

        Args:
            token_id: The next generated id.

        Returns:
            The text that became final with this id; often "" while a character
            is incomplete.

        Raises:
            ValueError: The id is not a non-negative integer.
        """
        tok = self._tokenizer
        token_id = tok._check_id(token_id)
        # A skipped special token contributes nothing to `decode`, anywhere.
        if self._skip and token_id in tok._special_ids:
            return ""
        self._window.append(token_id)
        if token_id in tok._byte_ids:
            return ""
        text = self._decode(self._window)
        if text.endswith(_REPLACEMENT) or not text.startswith(self._prefix_text):
            return ""
        chunk = text[len(self._prefix_text) :]
        # What was just emitted becomes the context of the next window.
        self._window = self._window[self._read :]
        self._read = len(self._window)
        self._prefix_text = self._decode(self._window)
        return chunk

    def flush(self) -> str:
        """End the stream and return whatever text is still held back.

        The decoder is then empty again, ready for a new, unrelated stream.

        Returns:
            The remaining text ("" if nothing is pending).
        """
        chunk = ""
        if len(self._window) > self._read:
            text = self._decode(self._window)
            if not text.startswith(self._prefix_text):
                # No decoder we build does this: it rewrote text already emitted.
                logger.warning("decoded text changed before the stream position")
            chunk = text[len(self._prefix_text) :]
        self._reset()
        return chunk

    def _reset(self) -> None:
        self._window: list[int] = []
        self._read = 0
        self._prefix_text = ""

    def _decode(self, ids: list[int]) -> str:
        backend = self._tokenizer._backend
        return backend.decode(ids, skip_special_tokens=self._skip)


def _byte_fallback_ids(backend: _Backend) -> frozenset[int]:
    """Ids of `<0xNN>` pieces, if the decoder turns them into raw bytes."""
    decoder = backend.decoder
    if decoder is None or b"ByteFallback" not in decoder.__getstate__():
        return frozenset()
    vocab = backend.get_vocab(with_added_tokens=False)
    return frozenset(i for piece, i in vocab.items() if _BYTE_PIECE.fullmatch(piece))
