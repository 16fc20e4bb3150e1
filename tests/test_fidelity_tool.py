"""tools/fidelity.py measures what it says: checked on the tiny model against torch.

The figures in docs/MODELS.md come from this tool, so its pieces are checked here:
the transcripts alternate speakers, a package compared with itself agrees
everywhere, a different model does not, and its perplexity is transformers' own on
the same tokens.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from checkpoints import TINY_LLAMA, make_llama_folder
from conftest import REPO_ROOT

import edgeslm
from edgeslm.export import export_model

sys.path.insert(0, str(REPO_ROOT / "tools"))
import fidelity  # noqa: E402


@pytest.fixture(scope="module")
def tiny_fp32(tiny_folder, tmp_path_factory):
    """Two loads of the tiny model's fp32 package (a model cannot be its own peer:
    each step feeds both)."""
    out = tmp_path_factory.mktemp("fid") / "fp32"
    package = export_model(tiny_folder, out, dtype="fp32")
    return [edgeslm.load(package, n_threads=1, n_ctx=256) for _ in range(2)]


def test_transcripts_alternate_speakers_and_cover_every_topic():
    topics = fidelity.corpus_dialogues()
    assert len(topics) >= 15
    seen = 0
    for messages in fidelity.transcripts(8):
        assert 1 <= len(messages) <= 8
        assert [m["role"] for m in messages] == [
            ("user", "assistant")[i % 2] for i in range(len(messages))
        ]
        assert all(m["content"] for m in messages)
        seen += len(messages)
    assert seen > 4000  # nearly all of the corpus' 4,419 turns


def test_a_model_against_itself_agrees_everywhere(tiny_fp32):
    texts = fidelity.token_texts(tiny_fp32[0], 60, 4)
    scores = fidelity.Scores("tiny", "random", "fp32")
    fidelity.compare_decoders(*tiny_fp32, texts, scores)
    assert scores.positions == sum(len(t) - 1 for t in texts) >= 60
    assert scores.agreement == 1.0 and scores.ppl_fp32 == scores.ppl_quantized
    assert abs(scores.kl) < 1e-9


def test_another_model_disagrees(tiny_fp32, tmp_path, shared_data):
    other_folder = make_llama_folder(
        tmp_path / "other", shared_data, seed=1, **TINY_LLAMA
    )
    other = edgeslm.load(
        export_model(other_folder, tmp_path / "pkg", dtype="fp32"), n_threads=1
    )
    texts = fidelity.token_texts(tiny_fp32[0], 60, 4)
    scores = fidelity.Scores("tiny", "random", "other")
    fidelity.compare_decoders(tiny_fp32[0], other, texts, scores)
    assert scores.agreement < 0.5 and scores.kl / scores.positions > 0.1


def test_perplexity_is_transformers_own(tiny_fp32, tiny_folder):
    from transformers import LlamaForCausalLM

    oracle = LlamaForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32).eval()
    ids = fidelity.token_texts(tiny_fp32[0], 20, 2)[0]
    scores = fidelity.Scores("tiny", "random", "fp32")
    fidelity.compare_decoders(*tiny_fp32, [ids], scores)
    with torch.no_grad():
        loss = oracle(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    np.testing.assert_allclose(scores.ppl_fp32, math.exp(loss), rtol=1e-3)
