"""Build a model package's `tokenizer.json` from whatever tokenizer a source has.

At run time edgeslm only reads a Hugging Face `tokenizer.json`. This module is where
callers get that file, and the facts a manifest needs about it (`TokenizerInfo`),
from:

- GGUF metadata (llama.cpp's `tokenizer.ggml.*` keys): "gpt2" byte-level BPE
  vocabularies and "llama" SentencePiece vocabularies (BPE with byte fallback,
  merges recovered from the piece scores the way llama.cpp ranks them);
- Hugging Face folders: a `tokenizer.json` (copied as is), a GPT-2 style
  `vocab.json` + `merges.txt`, or a SentencePiece `tokenizer.model` (BPE or
  Unigram; the protobuf is decoded here, so no protobuf package is needed).

It owns only these names; the work is done in `tokenizer_gguf` (GGUF metadata),
`tokenizer_hf` (Hugging Face folders), `tokenizer_bpe` (byte-level BPE),
`tokenizer_spm` (SentencePiece) and `tokenizer_common` (`TokenizerInfo` and the
steps every builder shares: post-processor, id checks, writing the file).

It does not (yet) handle: GGUF vocabularies other than "gpt2" and "llama" (WordPiece
"bert", Unigram "t5", RWKV...), byte-level pre-tokenizers other than GPT-2's and
the digit-splitting family SmolLM2 uses, or tiktoken files. Those raise
`ModelFormatError` naming what was found. The files it writes are checked to load
and to keep every token at the id the source gave it.
"""

from __future__ import annotations

from edgeslm.export.tokenizer_common import TOKENIZER_FILE, TokenizerInfo
from edgeslm.export.tokenizer_gguf import tokenizer_from_gguf
from edgeslm.export.tokenizer_hf import tokenizer_from_hf_folder

__all__ = [
    "TOKENIZER_FILE",
    "TokenizerInfo",
    "tokenizer_from_gguf",
    "tokenizer_from_hf_folder",
]
