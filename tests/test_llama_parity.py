"""Llama export parity with transformers (the oracle), fp32 and int8.

A random-weight checkpoint with JackFram/llama-68m's exact configuration is exported
from its Hugging Face folder; edgeslm's logits must match `LlamaForCausalLM` within
1e-3 over a 64-token prompt, and greedy continuations with the KV cache must be
identical token for token.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from checkpoints import LLAMA_68M, make_llama_folder

import edgeslm
from edgeslm.export import export_model

PROMPT_LEN = 64
CONTINUATION = 32


@pytest.fixture(scope="module")
def llama68m(tmp_path_factory, shared_data):
    from transformers import LlamaForCausalLM

    folder = make_llama_folder(tmp_path_factory.mktemp("llama68m"), shared_data)
    oracle = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    oracle.generation_config.eos_token_id = None  # continue past EOS, as edgeslm does
    fp32 = export_model(folder, tmp_path_factory.mktemp("pkg") / "fp32", dtype="fp32")
    return folder, oracle, fp32


def prompt_ids(seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return [1, *rng.integers(3, LLAMA_68M["vocab_size"], PROMPT_LEN - 1).tolist()]


def test_logits_match_transformers_at_every_position(llama68m):
    _, oracle, package = llama68m
    model = edgeslm.load(package, n_threads=1)
    ids = prompt_ids()
    with torch.no_grad():
        expected = oracle(torch.tensor([ids])).logits[0].numpy()

    # One token at a time through the cache: each step's logits are the last
    # position's, so every position of the prompt is compared.
    for pos, token in enumerate(ids):
        got = model.forward([token])
        np.testing.assert_allclose(got, expected[pos], atol=1e-3, rtol=0)


def test_prefill_logits_match_transformers(llama68m):
    _, oracle, package = llama68m
    model = edgeslm.load(package, n_threads=1)
    ids = prompt_ids(1)
    with torch.no_grad():
        expected = oracle(torch.tensor([ids])).logits[0, -1].numpy()
    np.testing.assert_allclose(model.forward(ids), expected, atol=1e-3, rtol=0)


def test_greedy_continuation_matches_transformers(llama68m):
    _, oracle, package = llama68m
    model = edgeslm.load(package, n_threads=1)
    ids = prompt_ids(2)
    with torch.no_grad():
        out = oracle.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=CONTINUATION,
            do_sample=False,
        )
    expected = out[0, len(ids) :].tolist()
    got = model.generate(ids, max_tokens=CONTINUATION, temperature=0, ignore_eos=True)
    assert got.tokens == expected


def test_int8_export_runs_and_tracks_fp32(llama68m, tmp_path):
    folder, _, fp32_package = llama68m
    int8 = edgeslm.load(export_model(folder, tmp_path / "int8"), n_threads=1)
    fp32 = edgeslm.load(fp32_package, n_threads=1)
    assert int8.manifest.quantization.startswith("int8-block")

    # Random weights have no structure to lose; the logits must still be close.
    ids = prompt_ids(3)
    a, b = fp32.forward(ids).copy(), int8.forward(ids).copy()
    assert np.corrcoef(a, b)[0, 1] > 0.99
