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


def write_llama_gguf(
    hf_folder: Path, out: Path, shared_data: Path, qtype: str = "F32"
) -> Path:
    """Write a llama GGUF from a Hugging Face folder, as llama.cpp's converter does.

    The weights come from `model.safetensors`; the query and key rows are permuted
    into llama.cpp's interleaved RoPE layout; the vocabulary (SentencePiece, with
    scores and token types) is copied from the shared `ggml-vocab-llama-spm.gguf`,
    and the chat template from the folder's `tokenizer_config.json`.

    Args:
        hf_folder: a folder made by `make_llama_folder`.
        out: the `.gguf` file to write.
        shared_data: the reference data folder (for the vocabulary).
        qtype: "F32", or a `gguf.GGMLQuantizationType` name such as "Q8_0" for the
            2-D weights (norms stay F32, as llama.cpp keeps them).
    """
    from safetensors.numpy import load_file

    cfg = json.loads((hf_folder / "config.json").read_text())
    weights = load_file(str(hf_folder / "model.safetensors"))
    template = json.loads((hf_folder / "tokenizer_config.json").read_text())
    vocab = gguf.GGUFReader(
        str(shared_data / "tokenizers" / "ggml-vocab-llama-spm.gguf")
    )

    def field(key: str):
        return vocab.fields[key].contents()

    n_heads, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name("llama-68m-random")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(cfg["hidden_size"] // n_heads)
    w.add_rope_freq_base(float(cfg.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_tokenizer_model(field("tokenizer.ggml.model"))
    w.add_token_list(field("tokenizer.ggml.tokens"))
    w.add_token_scores(field("tokenizer.ggml.scores"))
    w.add_token_types(field("tokenizer.ggml.token_type"))
    w.add_bos_token_id(field("tokenizer.ggml.bos_token_id"))
    w.add_eos_token_id(field("tokenizer.ggml.eos_token_id"))
    w.add_unk_token_id(field("tokenizer.ggml.unknown_token_id"))
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_chat_template(template["chat_template"])

    def permute(rows, heads: int):  # llama.cpp's convert_hf_to_gguf permutation
        return (
            rows.reshape(heads, 2, rows.shape[0] // heads // 2, rows.shape[1])
            .swapaxes(1, 2)
            .reshape(rows.shape)
        )

    def add(name: str, array) -> None:
        array = array.astype("float32")
        if qtype == "F32" or array.ndim == 1:
            w.add_tensor(name, array)
            return
        kind = gguf.GGMLQuantizationType[qtype]
        w.add_tensor(name, gguf.quants.quantize(array, kind), raw_dtype=kind)

    add("token_embd.weight", weights["model.embed_tokens.weight"])
    add("output_norm.weight", weights["model.norm.weight"])
    add("output.weight", weights["lm_head.weight"])
    for i in range(cfg["num_hidden_layers"]):
        hf = f"model.layers.{i}."
        add(f"blk.{i}.attn_norm.weight", weights[hf + "input_layernorm.weight"])
        q = permute(weights[hf + "self_attn.q_proj.weight"], n_heads)
        add(f"blk.{i}.attn_q.weight", q)
        k = permute(weights[hf + "self_attn.k_proj.weight"], n_kv)
        add(f"blk.{i}.attn_k.weight", k)
        add(f"blk.{i}.attn_v.weight", weights[hf + "self_attn.v_proj.weight"])
        add(f"blk.{i}.attn_output.weight", weights[hf + "self_attn.o_proj.weight"])
        add(f"blk.{i}.ffn_norm.weight", weights[hf + "post_attention_layernorm.weight"])
        add(f"blk.{i}.ffn_gate.weight", weights[hf + "mlp.gate_proj.weight"])
        add(f"blk.{i}.ffn_up.weight", weights[hf + "mlp.up_proj.weight"])
        add(f"blk.{i}.ffn_down.weight", weights[hf + "mlp.down_proj.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


# microsoft/DialoGPT-small: GPT-2 with 12 layers of 768, 1024 positions.
DIALOGPT_SMALL = dict(
    n_embd=768,
    n_layer=12,
    n_head=12,
    n_positions=1024,
    n_ctx=1024,
    vocab_size=50257,
    activation_function="gelu_new",
    layer_norm_epsilon=1e-5,
    bos_token_id=50256,
    eos_token_id=50256,
)

# Same widths and vocabulary, 2 layers: exports and runs in a few seconds.
DIALOGPT_2L = dict(DIALOGPT_SMALL, n_layer=2)


def make_gpt2_folder(
    folder: Path, shared_data: Path, seed: int = 0, *, bin_only: bool = False, **config
) -> Path:
    """Write a random-weight GPT-2 checkpoint with GPT-2's real BPE vocabulary.

    Args:
        folder: where to write `config.json`, the weights and `vocab.json` +
            `merges.txt` (GPT-2's `encoder.json` and `vocab.bpe`).
        shared_data: the reference data folder (for the vocabulary).
        seed: torch seed for the weights.
        bin_only: save `pytorch_model.bin` (torch.save of the state dict, tied
            output sharing the embedding's storage) instead of safetensors.
        **config: `GPT2Config` fields (default: DialoGPT-small's).
    """
    import shutil

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**(config or DIALOGPT_SMALL))).eval()
    # Random init gives near-uniform logits; widen them so greedy choices are clear.
    with torch.no_grad():
        model.transformer.wte.weight.mul_(8.0)
    if bin_only:
        model.config.save_pretrained(folder)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    else:
        model.save_pretrained(folder, safe_serialization=True)

    tokenizers = shared_data / "tokenizers"
    shutil.copyfile(tokenizers / "encoder.json", folder / "vocab.json")
    shutil.copyfile(tokenizers / "vocab.bpe", folder / "merges.txt")
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<|endoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "model_max_length": 1024,
            }
        )
    )
    return folder


def smollm2_gguf() -> Path:
    """The default model's GGUF (SmolLM2-135M-Instruct, Q4_1), installed if needed."""
    return default_model_gguf(install=True)
