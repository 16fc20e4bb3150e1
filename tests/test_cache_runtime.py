"""The KV cache inside the runtime: rewind, shift, save and restore, on a real model.

- rewind + re-append gives the same logits as a fresh run;
- after a context shift, the first layer's keys and values (which depend only on
  token and position) equal a fresh run's over the kept tokens within 1e-4 (float32
  re-rotation rounds differently from rotating once), so a one-layer model's output
  matches a fresh run to that tolerance; deeper layers still remember the dropped
  tokens, which is what a shift trades for not recomputing the cache;
- a saved prompt cache restores to the same next-token logits, and the CLI's
  `--prompt-cache` makes the file on first use and restores it afterwards.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import edgeslm
from edgeslm.errors import ModelFormatError


@pytest.fixture(scope="module")
def fp32_package(tmp_path_factory, tiny_folder):
    from edgeslm.export import export_model

    return export_model(
        tiny_folder, tmp_path_factory.mktemp("fp32") / "pkg", dtype="fp32"
    )


def ids(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(3, 32000, n).tolist()


def test_rewind_and_reappend_equals_a_fresh_run(fp32_package):
    model = edgeslm.load(fp32_package, n_threads=1)
    prompt = ids(40)
    fresh = model.forward(prompt).copy()

    model.cache.rewind(25)
    del model._tokens[25:]
    model.forward(ids(7, seed=9))  # something else in between
    model.cache.rewind(25)
    del model._tokens[25:]
    again = model.forward(prompt[25:]).copy()
    np.testing.assert_allclose(again, fresh, atol=1e-5, rtol=0)


def test_after_a_shift_the_kept_keys_are_those_of_a_fresh_run(fp32_package):
    model = edgeslm.load(fp32_package, n_threads=1)
    tokens = ids(60, seed=1)
    keep, drop = 8, 20
    model.forward(tokens)
    model.cache.shift(keep, drop)
    kept = tokens[:keep] + tokens[keep + drop :]
    assert model.cache.length == len(kept)

    # Layer 0's keys and values depend only on each token and its position, so
    # after the shift (moved keys re-rotated by -drop positions) they must equal a
    # fresh run's over the kept tokens. Deeper layers saw the dropped tokens.
    reference = edgeslm.load(fp32_package, n_threads=1)
    reference.forward(kept)
    n = len(kept)
    np.testing.assert_allclose(
        model.cache.data[0, :, :, :n], reference.cache.data[0, :, :, :n], atol=1e-4
    )


def test_after_a_shift_a_one_layer_model_matches_a_fresh_run(tmp_path, shared_data):
    # With one layer the cache holds only first-layer keys and values, which
    # depend on token and position alone: after a shift the model's output must
    # equal a fresh run over the kept tokens, up to float32 re-rotation rounding.
    from checkpoints import TINY_LLAMA, make_llama_folder

    from edgeslm.export import export_model

    folder = make_llama_folder(
        tmp_path / "hf", shared_data, **dict(TINY_LLAMA, num_hidden_layers=1)
    )
    package = export_model(folder, tmp_path / "pkg", dtype="fp32")
    tokens, nxt = ids(60, seed=1), ids(1, seed=2)
    keep, drop = 8, 20
    kept = tokens[:keep] + tokens[keep + drop :]
    fresh = edgeslm.load(package, n_threads=1).forward(kept + nxt).copy()

    model = edgeslm.load(package, n_threads=1)
    model.forward(tokens)
    model.cache.shift(keep, drop)
    np.testing.assert_allclose(model.forward(nxt), fresh, atol=1e-4, rtol=0)


def test_prompt_cache_round_trips(fp32_package, tmp_path):
    model = edgeslm.load(fp32_package, n_threads=1)
    prefix, rest = ids(30, seed=3), ids(5, seed=4)
    model.forward(prefix)
    assert model.save_prompt_cache(tmp_path / "p.kv") == 30
    expected = model.forward(rest).copy()

    restored = edgeslm.load(fp32_package, n_threads=1)
    assert restored.load_prompt_cache(tmp_path / "p.kv") == 30
    out = restored.generate(prefix + rest, max_tokens=1, ignore_eos=True)
    assert out.stats.reused_tokens == 30
    assert out.tokens == [int(expected.argmax())]


def test_prompt_cache_from_another_model_is_refused(fp32_package, tmp_path):
    from edgeslm.kvcache import KVCache

    other = KVCache(1, 2, 16, 16, rope_theta=10000.0)
    other.advance(3)
    other.save(tmp_path / "other.kv", [5, 6, 7])
    model = edgeslm.load(fp32_package, n_threads=1)
    with pytest.raises(ModelFormatError, match="another model"):
        model.load_prompt_cache(tmp_path / "other.kv")


def test_cli_prompt_cache_is_made_once_then_restored(fp32_package, tmp_path):
    cache = tmp_path / "system.kv"
    cmd = [sys.executable, "-m", "edgeslm", "-v", "chat", str(fp32_package)]
    cmd += ["--system", "You are a lamp.", "--prompt-cache", str(cache)]
    cmd += ["--max-tokens", "3", "--temperature", "0"]
    first = subprocess.run(
        cmd, input="hi\n", capture_output=True, text=True, timeout=300
    )
    assert first.returncode == 0, first.stderr
    assert cache.is_file() and "saved" in first.stderr
    second = subprocess.run(
        cmd, input="hi\n", capture_output=True, text=True, timeout=300
    )
    assert second.returncode == 0, second.stderr
    assert "restored" in second.stderr
    assert second.stdout == first.stdout
