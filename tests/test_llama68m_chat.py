"""Llama-68M-Chat end to end: a Hugging Face folder and GGUF files, chatting in ChatML.

Felladrin/Llama-68M-Chat-v1 is JackFram/llama-68m (2 layers of 768) with a ChatML
template and the Llama SentencePiece vocabulary. Its weights cannot be downloaded
here, so a random-weight checkpoint of that exact shape is used, with the real
vocabulary (test_llama_parity.py checks its logits). This module checks what a user
does with it: chat over several turns from the folder, and the same model as GGUF
files written like llama.cpp's converter writes them (F32 and Q8_0), against
transformers reading the same GGUF (its own dequantization, so an independent oracle).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from checkpoints import LLAMA_68M, make_llama_folder, write_llama_gguf

import edgeslm
from edgeslm.export import export_model

EOS = 2  # </s>
QUESTIONS = ["Hi! Who are you?", "Turn on the kitchen lights, please."]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, shared_data):
    return make_llama_folder(tmp_path_factory.mktemp("llama68m-chat"), shared_data)


@pytest.fixture(scope="module")
def folder_model(hf_folder, tmp_path_factory):
    """The folder exported to fp32 and loaded, for comparing tokenizations."""
    out = tmp_path_factory.mktemp("pkg") / "fp32"
    package = export_model(hf_folder, out, dtype="fp32")
    return edgeslm.load(package, n_threads=1)


def oracle_reply(oracle, ids: list[int], n: int) -> list[int]:
    """Greedy tokens from transformers, stopping at </s> as a chat does."""
    with torch.no_grad():
        out = oracle.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=EOS,
            pad_token_id=EOS,
        )
    reply = out[0, len(ids) :].tolist()
    return reply[: reply.index(EOS)] if EOS in reply else reply


def test_chatml_chat_from_the_folder_matches_transformers(
    hf_folder, tmp_path, monkeypatch
):
    from transformers import AutoTokenizer, LlamaForCausalLM

    monkeypatch.setenv("EDGESLM_CACHE", str(tmp_path / "cache"))
    model = edgeslm.load(hf_folder, dtype="fp32", n_threads=1)  # exported once
    oracle = LlamaForCausalLM.from_pretrained(hf_folder, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(hf_folder)
    assert "<|im_start|>" in model.manifest.chat_template

    messages = [{"role": "system", "content": "You are a helpful assistant."}]
    for turn, question in enumerate(QUESTIONS):
        messages.append({"role": "user", "content": question})

        # The prompt: the folder's own template, rendered and tokenized by both.
        text = hf_tok.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        ids = hf_tok(text, add_special_tokens=False).input_ids
        assert model.tokenize(model._render(messages), add_bos=False) == ids

        got = model.chat(messages, max_tokens=24, temperature=0)
        assert got.tokens == oracle_reply(oracle, ids, 24), question
        if turn:
            # The next turn only computes its new tokens.
            assert got.stats.reused_tokens > 0
        messages.append({"role": "assistant", "content": got.text})


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_gguf_matches_transformers_reading_the_same_file(
    hf_folder, folder_model, shared_data, tmp_path, qtype
):
    from transformers import AutoModelForCausalLM

    path = write_llama_gguf(
        hf_folder, tmp_path / f"llama-68m-{qtype}.gguf", shared_data, qtype
    )
    oracle = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    model = edgeslm.load(
        export_model(path, tmp_path / "pkg", dtype="fp32"), n_threads=1
    )
    assert model.config.n_layers == LLAMA_68M["num_hidden_layers"]
    assert model.manifest.source["kind"] == "gguf"

    # Logits over a 64-token prompt: edgeslm dequantizes and un-permutes the rows
    # itself; transformers does the same independently.
    rng = np.random.default_rng(7)
    ids = [1, *rng.integers(3, LLAMA_68M["vocab_size"], 63).tolist()]
    with torch.no_grad():
        expected = oracle(torch.tensor([ids])).logits[0, -1].numpy()
    np.testing.assert_allclose(model.forward(ids), expected, atol=1e-3, rtol=0)

    # A ChatML conversation from the GGUF's own template and SentencePiece vocabulary.
    messages = [{"role": "user", "content": QUESTIONS[1]}]
    prompt = model.tokenize(model._render(messages), add_bos=False)
    assert prompt == folder_model.tokenize(
        folder_model._render(messages), add_bos=False
    )
    model.reset()
    got = model.generate(prompt, max_tokens=32, temperature=0, ignore_eos=True)
    with torch.no_grad():
        out = oracle.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=32,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=EOS,
        )
    assert got.tokens == out[0, len(prompt) :].tolist()
