"""Checkpoints made by the tests: random-weight Hugging Face folders, and the GGUF.

The real Llama-68M weights cannot be downloaded here, so tests build checkpoints with
the exact configuration and random weights with transformers (the oracle), and give
them the real SentencePiece vocabulary from the shared reference data.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf

from edgeslm.chat_template import CHATML_TEMPLATE
from edgeslm.export.tokenizer_build import tokenizer_from_gguf
from edgeslm.hub import default_model_gguf

# JackFram/llama-68m, the base of Felladrin/Llama-68M-Chat-v1.
LLAMA_68M = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=2,
    num_attention_heads=12,
    num_key_value_heads=12,
    vocab_size=32000,
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)

# Small enough to export and run in well under a second; grouped-query attention.
TINY_LLAMA = dict(
    LLAMA_68M,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def make_llama_folder(folder: Path, shared_data: Path, seed: int = 0, **config) -> Path:
    """Write a random-weight Llama checkpoint with the Llama SentencePiece vocabulary.

    Args:
        folder: where to write `config.json`, `model.safetensors`, the tokenizer.
        shared_data: the reference data folder (for the vocabulary).
        seed: torch seed for the weights.
        **config: `LlamaConfig` fields (default: Llama-68M's).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**(config or LLAMA_68M))).eval()
    # Random init gives near-uniform logits; widen them so greedy choices are clear.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(folder, safe_serialization=True)

    vocab = gguf.GGUFReader(
        str(shared_data / "tokenizers" / "ggml-vocab-llama-spm.gguf")
    )
    tokenizer_from_gguf(vocab, folder)
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<s>",
                "eos_token": "</s>",
                "add_bos_token": True,
                "chat_template": CHATML_TEMPLATE,
            }
        )
    )
    return folder


def smollm2_gguf() -> Path:
    """The default model's GGUF (SmolLM2-135M-Instruct, Q4_1), installed if needed."""
    return default_model_gguf(install=True)
