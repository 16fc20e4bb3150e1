"""GPT-2 (DialoGPT) export parity with transformers, `.bin` loading, dialogue format.

A random-weight checkpoint with microsoft/DialoGPT-small's exact configuration is
exported from its Hugging Face folder; edgeslm's fp32 logits must match
`GPT2LMHeadModel` within 1e-3 over a 64-token prompt and greedy continuations with
the KV cache must be identical. A 2-layer checkpoint of the same widths, saved only
as `pytorch_model.bin`, checks the restricted unpickler end to end, the context
re-prefill of learned positions, and DialoGPT's turn format against the oracle.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from checkpoints import DIALOGPT_2L, DIALOGPT_SMALL, make_gpt2_folder

import edgeslm
from edgeslm.chat_template import fit_history
from edgeslm.export import export_model

PROMPT_LEN = 64
CONTINUATION = 32
EOT = 50256  # <|endoftext|>


@pytest.fixture(scope="module")
def dialogpt(tmp_path_factory, shared_data):
    """DialoGPT-small's exact shape: folder, oracle, fp32 package loaded once."""
    from transformers import GPT2LMHeadModel

    folder = make_gpt2_folder(tmp_path_factory.mktemp("dialogpt"), shared_data)
    oracle = GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32).eval()
    oracle.generation_config.eos_token_id = None  # continue past EOS, as edgeslm does
    oracle.generation_config.pad_token_id = EOT
    fp32 = export_model(folder, tmp_path_factory.mktemp("pkg") / "fp32", dtype="fp32")
    return folder, oracle, edgeslm.load(fp32, n_threads=1)


@pytest.fixture
def dialogpt_model(dialogpt):
    """The fp32 DialoGPT-small-shaped model with an empty cache."""
    model = dialogpt[2]
    model.reset()
    return model


@pytest.fixture(scope="module")
def dialogpt_bin(tmp_path_factory, shared_data):
    """2 layers of DialoGPT's widths, saved only as pytorch_model.bin."""
    from transformers import GPT2LMHeadModel

    folder = make_gpt2_folder(
        tmp_path_factory.mktemp("dialogpt-bin"),
        shared_data,
        bin_only=True,
        **DIALOGPT_2L,
    )
    assert not list(folder.glob("*.safetensors"))
    oracle = GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32).eval()
    oracle.generation_config.pad_token_id = EOT
    fp32 = export_model(folder, tmp_path_factory.mktemp("pkg") / "fp32", dtype="fp32")
    return folder, oracle, fp32


def prompt_ids(seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, DIALOGPT_SMALL["vocab_size"] - 1, PROMPT_LEN).tolist()


def test_manifest_records_architecture_and_formats(dialogpt_model):
    manifest = dialogpt_model.manifest
    assert manifest.config.architecture == "gpt2"
    assert manifest.config.n_layers == DIALOGPT_SMALL["n_layer"]
    assert manifest.config.position_embedding == "learned"
    assert manifest.context_shift == "reprefill"
    assert manifest.chat_format == "dialogpt"
    assert manifest.tokens.eos_token_ids == (EOT,)
    assert not manifest.tokens.add_bos_token


def test_logits_match_transformers_at_every_position(dialogpt, dialogpt_model):
    oracle, model = dialogpt[1], dialogpt_model
    ids = prompt_ids()
    with torch.no_grad():
        expected = oracle(torch.tensor([ids])).logits[0].numpy()

    # One token at a time through the cache: every position of the prompt is
    # compared, and the positions come from the graph's own arithmetic.
    for pos, token in enumerate(ids):
        got = model.forward([token])
        np.testing.assert_allclose(got, expected[pos], atol=1e-3, rtol=0)


def test_prefill_logits_match_transformers(dialogpt, dialogpt_model):
    oracle, model = dialogpt[1], dialogpt_model
    ids = prompt_ids(1)
    with torch.no_grad():
        expected = oracle(torch.tensor([ids])).logits[0, -1].numpy()
    np.testing.assert_allclose(model.forward(ids), expected, atol=1e-3, rtol=0)


def oracle_greedy(oracle, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = oracle.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=n,
            do_sample=False,
        )
    return out[0, len(ids) :].tolist()


def test_greedy_continuation_matches_transformers(dialogpt, dialogpt_model):
    oracle, model = dialogpt[1], dialogpt_model
    ids = prompt_ids(2)
    got = model.generate(ids, max_tokens=CONTINUATION, temperature=0, ignore_eos=True)
    assert got.tokens == oracle_greedy(oracle, ids, CONTINUATION)


def test_int8_next_token_agreement_with_fp32(
    dialogpt, dialogpt_model, tmp_path, report
):
    fp32 = dialogpt_model
    int8 = edgeslm.load(export_model(dialogpt[0], tmp_path / "int8"), n_threads=1)
    assert int8.manifest.quantization.startswith("int8-block")

    # Teacher-forced over fp32's own greedy path: the same token goes into both.
    ids = prompt_ids(3)
    path = ids + fp32.generate(ids, max_tokens=64, ignore_eos=True).tokens
    fp32.reset()
    agree = 0
    for token in path:
        a, b = fp32.forward([token]), int8.forward([token])
        agree += int(np.argmax(a) == np.argmax(b))
    rate = agree / len(path)
    report(f"gpt2 DialoGPT-small shape, int8 vs fp32 next-token top-1: {rate:.1%}")
    assert rate >= 0.9


def test_pytorch_bin_checkpoint_matches_transformers(dialogpt_bin):
    _, oracle, package = dialogpt_bin
    model = edgeslm.load(package, n_threads=1)
    ids = prompt_ids(4)
    with torch.no_grad():
        expected = oracle(torch.tensor([ids])).logits[0, -1].numpy()
    np.testing.assert_allclose(model.forward(ids), expected, atol=1e-3, rtol=0)
    model.reset()
    got = model.generate(ids, max_tokens=16, ignore_eos=True)
    oracle.generation_config.eos_token_id = None
    assert got.tokens == oracle_greedy(oracle, ids, 16)


def test_full_context_is_recomputed_at_new_positions(dialogpt_bin):
    """Learned positions: after a context shift the cache equals a fresh prefill."""
    package = dialogpt_bin[2]
    model = edgeslm.load(package, n_threads=1, n_ctx=32)
    out = model.generate(prompt_ids(5)[:12], max_tokens=40, ignore_eos=True)
    assert len(out.tokens) == 40  # went past the 32-token context
    assert len(model._tokens) <= 32

    fresh = edgeslm.load(package, n_threads=1, n_ctx=32)
    fresh.forward(model._tokens)
    n = len(model._tokens)
    np.testing.assert_allclose(
        model.cache.data[..., :n, :], fresh.cache.data[..., :n, :], atol=1e-4
    )


def test_dialogue_turns_match_transformers(dialogpt_bin):
    """DialoGPT's format: each turn then <|endoftext|>; the reply ends at it."""
    from transformers import AutoTokenizer

    folder, oracle, package = dialogpt_bin
    hf_tok = AutoTokenizer.from_pretrained(folder)
    model = edgeslm.load(package, n_threads=1)
    turns = ["Does money buy happiness?", "Depends how much money.", "And love?"]
    messages = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": text}
        for i, text in enumerate(turns)
    ]

    # The oracle's prompt, built the way DialoGPT's model card does.
    ids = [t for text in turns for t in [*hf_tok.encode(text), EOT]]

    # Through <|endoftext|>: the same prompt tokens and the same continuation.
    oracle.generation_config.eos_token_id = None
    full = model.chat(messages, max_tokens=16, temperature=0, ignore_eos=True)
    assert full.stats.prompt_tokens == len(ids)
    assert full.tokens == oracle_greedy(oracle, ids, 16)

    # A chat reply ends at the first <|endoftext|>.
    expected = full.tokens[: full.tokens.index(EOT)] if EOT in full.tokens else None
    got = model.chat(messages, max_tokens=16, temperature=0)
    if expected is not None:
        assert got.tokens == expected and got.finish_reason == "eos"
    else:
        assert got.tokens == full.tokens and got.finish_reason == "length"


def test_dialogue_history_is_trimmed_from_the_oldest_turn(dialogpt_bin):
    model = edgeslm.load(dialogpt_bin[2], n_threads=1, n_ctx=48)
    turns = [f"turn number {i} says something fairly long here" for i in range(12)]
    messages = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": text}
        for i, text in enumerate(turns)
    ]
    got = model.chat(messages, max_tokens=8, temperature=0)
    assert got.stats.prompt_tokens <= 48 - 8

    # What was kept is the most recent turns, as many as fit.
    def count(kept):
        return len(model.tokenize(model._render(kept), add_bos=False))

    kept = fit_history(messages, count, 40)
    assert kept == messages[-len(kept) :] and 1 <= len(kept) < len(messages)
    assert count(kept) == got.stats.prompt_tokens
    assert count(messages[-len(kept) - 1 :]) > 40


def test_cli_chat_holds_a_multi_turn_conversation(dialogpt_bin, tmp_path):
    """`edgeslm chat FOLDER` exports the .bin folder once and answers every turn."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, EDGESLM_CACHE=str(tmp_path / "cache"))
    done = subprocess.run(
        [sys.executable, "-m", "edgeslm", "chat", str(dialogpt_bin[0])]
        + ["--max-tokens", "6", "--temperature", "0"],
        input="Hello there\nHow are you?\nBye\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 3
    manifests = list((tmp_path / "cache").rglob("edgeslm.json"))
    assert len(manifests) == 1 and '"dialogpt"' in manifests[0].read_text()


@pytest.mark.parametrize("activation", ["gelu", "gelu_pytorch_tanh"])
def test_other_gelu_variants_and_widths_match_transformers(
    tmp_path, shared_data, activation
):
    """Exact-erf GELU (BiasGelu), an explicit n_inner, a narrow model."""
    from transformers import GPT2LMHeadModel

    tiny = dict(DIALOGPT_2L, n_embd=64, n_head=4, n_inner=96, n_positions=128)
    tiny["activation_function"] = activation
    folder = make_gpt2_folder(tmp_path / "hf", shared_data, **tiny)
    oracle = GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32).eval()
    model = edgeslm.load(
        export_model(folder, tmp_path / "fp32", dtype="fp32"), n_threads=1
    )
    ids = prompt_ids(6)[:40]
    with torch.no_grad():
        expected = oracle(torch.tensor([ids])).logits[0, -1].numpy()
    np.testing.assert_allclose(model.forward(ids), expected, atol=1e-3, rtol=0)
    int8 = edgeslm.load(export_model(folder, tmp_path / "int8"), n_threads=1)
    assert np.corrcoef(int8.forward(ids), expected)[0, 1] > 0.99


def test_config_of_2019_uploads_and_unsupported_variants(tmp_path):
    """No `model_type` (old DialoGPT configs): the class name decides. Variants
    the graph does not implement are refused by name."""
    from edgeslm.errors import ModelFormatError
    from edgeslm.export.checkpoint import hf_config_to_model_config

    old = {k: v for k, v in DIALOGPT_SMALL.items() if not k.endswith("_token_id")}
    old["architectures"] = ["GPT2LMHeadModel"]
    cfg = hf_config_to_model_config(old, tmp_path)
    assert (cfg.architecture, cfg.n_layers, cfg.max_seq_len) == ("gpt2", 12, 1024)
    assert cfg.intermediate_size == 4 * 768 and cfg.tie_word_embeddings

    for change, named in [
        ({"activation_function": "relu"}, "relu"),
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse"),
        ({"n_embd": 770}, "n_embd"),
    ]:
        with pytest.raises(ModelFormatError, match=named):
            hf_config_to_model_config({**old, **change}, tmp_path)
