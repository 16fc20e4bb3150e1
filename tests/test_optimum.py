"""ONNX decoders in the Optimum / transformers.js layout, run as they are.

The files come from Optimum's own exporter (optimum-onnx 0.1.0, in its own virtual
environment: `optimum_export.py`), run in the set-up on random-weight tiny Llama
and GPT-2 checkpoints with the real vocabularies. What is shown:

- fp32 files (`decoder_model_merged.onnx`, `model.onnx`): the same greedy tokens as
  transformers on the checkpoint, and last-position logits within 1e-3;
- the quantized file (`decoder_model_merged_quantized.onnx`: onnxruntime dynamic
  int8, as transformers.js repositories hold it): the same greedy tokens as
  Optimum's own onnxruntime runtime (`ORTModelForCausalLM`) on the same file, and,
  as a stated tolerance, at least 90% teacher-forced top-1 agreement with
  transformers in fp32 (measured: 95% for the Llama, 100% for the GPT-2);
- detection by `edgeslm.load`, chat over turns with cache reuse, rewinds, a full
  context, a catalogue name resolved through the hub cache, no export extra
  needed, and clear errors for the layouts and files it cannot run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from checkpoints import DIALOGPT_SMALL, TINY_LLAMA, make_gpt2_folder, make_llama_folder
from hub_snapshot import add_snapshot
from optimum_export import export_with_optimum

import edgeslm
from edgeslm.errors import EdgeSLMError, ModelFormatError, ModelNotFoundError
from edgeslm.export import export_model
from edgeslm.optimum_backend import OptimumModel

# GPT-2's vocabulary and layout, small enough to export in seconds.
TINY_GPT2 = dict(
    DIALOGPT_SMALL, n_embd=64, n_layer=2, n_head=4, n_positions=256, n_ctx=256
)
PROMPT = "The kitchen lights are on and the heating is set to twenty degrees."
N_TOKENS = 24
ARCHS = ("llama", "gpt2")
MERGED = "merged/onnx/decoder_model_merged.onnx"
QUANTIZED = "merged/onnx/decoder_model_merged_quantized.onnx"
PLAIN = "plain/model.onnx"
EOS = {"llama": 2, "gpt2": 50256}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, shared_data):
    """Per architecture: source folder, Optimum output folder, oracle, prompt ids."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("optimum")
    sources = {
        "llama": make_llama_folder(root / "llama-src", shared_data, **TINY_LLAMA),
        "gpt2": make_gpt2_folder(root / "gpt2-src", shared_data, **TINY_GPT2),
    }
    prompts = {
        arch: AutoTokenizer.from_pretrained(src)(PROMPT).input_ids
        for arch, src in sources.items()
    }
    jobs = [(src, root / arch, prompts[arch]) for arch, src in sources.items()]
    export_with_optimum(jobs, n_tokens=N_TOKENS)
    found = {}
    for arch, src in sources.items():
        oracle = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        reference = json.loads((root / arch / "reference.json").read_text())
        found[arch] = dict(
            src=src, out=root / arch, oracle=oracle, ids=prompts[arch], ref=reference
        )
    return found


def oracle_greedy(oracle, ids: list[int], n: int, eos: int | None = None) -> list[int]:
    """transformers' greedy tokens; past EOS unless `eos` is given."""
    with torch.no_grad():
        out = oracle.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=n,
            min_new_tokens=n if eos is None else 0,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=0,
        )
    reply = out[0, len(ids) :].tolist()
    return reply[: reply.index(eos)] if eos in reply else reply


def oracle_logits(oracle, ids: list[int]) -> np.ndarray:
    """(len(ids), vocab) logits of transformers at every position."""
    with torch.no_grad():
        return oracle(torch.tensor([ids])).logits[0].numpy()


def load(exported, arch: str, file: str, **kwargs) -> OptimumModel:
    model = edgeslm.load(exported[arch]["out"] / file, n_threads=1, **kwargs)
    assert isinstance(model, OptimumModel)
    return model


# --- detection --------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_load_detects_the_layout_and_picks_the_decoder(exported, arch):
    out = exported[arch]["out"]
    picks = {
        (out / "merged", "int8"): QUANTIZED,
        (out / "merged", "fp32"): MERGED,
        (out / "plain", "int8"): PLAIN,  # no quantized file: the plain one
        (out / QUANTIZED, "fp32"): QUANTIZED,  # a file given is used as it is
    }
    for (path, dtype), expected in picks.items():
        model = edgeslm.load(path, dtype=dtype, n_threads=1)
        assert isinstance(model, OptimumModel), path
        assert model.onnx_file == out / expected
    merged = edgeslm.load(out / "merged", n_threads=1)
    assert merged.manifest.graph == "optimum-merged"
    assert merged.manifest.context_shift == "reprefill"
    assert merged.config.architecture == arch
    expected_format = "dialogpt" if arch == "gpt2" else "template"
    assert merged.manifest.chat_format == expected_format


# --- greedy parity ----------------------------------------------------------------


@pytest.mark.parametrize("file", [MERGED, PLAIN])
@pytest.mark.parametrize("arch", ARCHS)
def test_fp32_files_generate_what_transformers_does(exported, arch, file):
    case = exported[arch]
    model = load(exported, arch, file)
    ids = case["ids"]

    logits = model.forward(ids).copy()
    np.testing.assert_allclose(
        logits, oracle_logits(case["oracle"], ids)[-1], atol=1e-3, rtol=0
    )
    model.reset()
    got = model.generate(ids, max_tokens=N_TOKENS, ignore_eos=True)
    assert got.tokens == oracle_greedy(case["oracle"], ids, N_TOKENS)
    # Optimum's own runtime agrees on the same file (the reference harness works).
    assert case["ref"][file] == got.tokens


@pytest.mark.parametrize("arch", ARCHS)
def test_quantized_file_generates_what_optimums_runtime_does(exported, arch, report):
    case = exported[arch]
    model = load(exported, arch, QUANTIZED)
    got = model.generate(case["ids"], max_tokens=N_TOKENS, ignore_eos=True)
    assert got.tokens == case["ref"][QUANTIZED]

    # Teacher-forced top-1 agreement with transformers (fp32) on the fp32 greedy
    # sequence: int8 rounding may flip close calls, so a tolerance, not equality.
    sequence = case["ids"] + oracle_greedy(case["oracle"], case["ids"], N_TOKENS)
    expected = oracle_logits(case["oracle"], sequence).argmax(-1)
    model.reset()
    agree = [
        int(model.forward([t]).argmax()) == e
        for t, e in zip(sequence, expected, strict=True)
    ]
    share = float(np.mean(agree))
    report(f"optimum int8 ({arch}) top-1 agreement with transformers fp32: {share:.1%}")
    assert share >= 0.9


# --- the Model API on an Optimum decoder ------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_chat_over_turns_matches_transformers_and_reuses_the_cache(exported, arch):
    from transformers import AutoTokenizer

    case = exported[arch]
    model = load(exported, arch, MERGED)
    hf_tok = AutoTokenizer.from_pretrained(case["src"])
    messages = []
    for turn, question in enumerate(["Hello! Who are you?", "Turn on the lights."]):
        messages.append({"role": "user", "content": question})
        if arch == "llama":
            text = hf_tok.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
            ids = hf_tok(text, add_special_tokens=False).input_ids
        else:  # DialoGPT: every turn followed by <|endoftext|>
            ids = [
                i
                for m in messages
                for i in hf_tok(m["content"]).input_ids + [EOS[arch]]
            ]
        got = model.chat(messages, max_tokens=12, temperature=0)
        assert got.tokens == oracle_greedy(case["oracle"], ids, 12, eos=EOS[arch])
        assert got.stats.prompt_tokens == len(ids)
        if turn:
            assert got.stats.reused_tokens > 0
        messages.append({"role": "assistant", "content": got.text})


def test_a_rewind_computes_only_the_new_tokens(exported):
    model = load(exported, "llama", MERGED)
    ids = exported["llama"]["ids"]
    model.generate(ids, max_tokens=8, ignore_eos=True)
    changed = ids[:5] + ids[::-1][:4]
    again = model.generate(changed, max_tokens=8, ignore_eos=True)
    assert again.stats.reused_tokens == 5
    model.reset()
    assert model.generate(changed, max_tokens=8, ignore_eos=True).tokens == again.tokens


def test_a_full_context_is_recomputed_like_an_edgeslm_package(exported, tmp_path):
    """GPT-2 packages also re-prefill the kept tokens: both must agree past it."""
    case = exported["gpt2"]
    package = export_model(case["src"], tmp_path / "fp32", dtype="fp32")
    native = edgeslm.load(package, n_threads=1, n_ctx=32)
    model = load(exported, "gpt2", MERGED, n_ctx=32)
    ids = case["ids"][:10]
    got = model.generate(ids, max_tokens=40, ignore_eos=True, keep=4)
    assert len(got.tokens) == 40
    assert (
        got.tokens
        == native.generate(ids, max_tokens=40, ignore_eos=True, keep=4).tokens
    )


def test_prompt_caches_are_refused_with_a_way_out(exported, tmp_path):
    model = load(exported, "llama", MERGED)
    with pytest.raises(EdgeSLMError, match="edgeslm export"):
        model.save_prompt_cache(tmp_path / "cache.bin")


# --- resolving and running without the export extra -------------------------------


def run_python(script: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_a_catalogue_name_resolves_through_the_hub_cache(exported, tmp_path):
    """`onnx-llama-68m-chat-v1` names Felladrin/onnx-Llama-68M-Chat-v1 (models/);
    with its snapshot in huggingface_hub's cache it loads with no network."""
    hub = tmp_path / "hf-hub"
    snapshot = add_snapshot(
        hub, "Felladrin/onnx-Llama-68M-Chat-v1", exported["llama"]["out"] / "merged"
    )
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_HUB_CACHE=str(hub),
        EDGESLM_CACHE=str(tmp_path / "cache"),
    )
    out = run_python(
        "import edgeslm\n"
        "m = edgeslm.load('onnx-llama-68m-chat-v1', n_threads=1)\n"
        "print(m.onnx_file)\n"
        "print(m.generate('Hello', max_tokens=4, ignore_eos=True).tokens)\n",
        env,
    )
    assert out.splitlines()[0] == str(snapshot / "onnx" / QUANTIZED.split("/")[-1])
    assert not (tmp_path / "cache").exists()  # nothing exported


def test_runs_without_the_export_extra_or_torch(exported):
    blocked = ("onnx", "gguf", "safetensors", "torch", "transformers")
    paths = [str(exported[arch]["out"] / "merged") for arch in ARCHS]
    out = run_python(
        "import sys\n"
        f"for name in {blocked!r}:\n"
        "    sys.modules[name] = None  # any import of it fails\n"
        "import edgeslm\n"
        f"for path in {paths!r}:\n"
        "    m = edgeslm.load(path, n_threads=1)\n"
        "    msgs = [{'role': 'user', 'content': 'hi'}]\n"
        "    print(len(m.chat(msgs, max_tokens=4, ignore_eos=True).tokens))\n"
    )
    assert out.split() == ["4", "4"]


# --- what it refuses ------------------------------------------------------------


def folder_with(tmp_path, exported, names: dict[str, bytes | None]):
    """A folder with the tiny Llama's config and tokenizer, plus `names` in onnx/.

    A value of None copies the real merged decoder under that name.
    """
    folder = tmp_path / "model"
    src = exported["llama"]["out"] / "merged"
    shutil.copytree(src, folder, ignore=shutil.ignore_patterns("*.onnx"))
    for name, data in names.items():
        if data is None:
            shutil.copyfile(src / "onnx" / "decoder_model_merged.onnx", folder / name)
        else:
            (folder / name).write_bytes(data)
    return folder


def test_encoder_decoder_and_split_exports_say_what_to_do(tmp_path, exported):
    enc = folder_with(tmp_path / "a", exported, {"onnx/encoder_model.onnx": b"x"})
    with pytest.raises(ModelFormatError, match="encoder-decoder"):
        edgeslm.load(enc)
    split = folder_with(
        tmp_path / "b",
        exported,
        {"onnx/decoder_model.onnx": None, "onnx/decoder_with_past_model.onnx": None},
    )
    with pytest.raises(ModelFormatError, match="text-generation-with-past"):
        edgeslm.load(split)


@pytest.mark.parametrize("cut", ["garbage", "truncated"])
def test_a_broken_onnx_file_is_a_format_error(tmp_path, exported, cut):
    real = (exported["llama"]["out"] / MERGED).read_bytes()
    data = b"\x08\x07not a model" * 50 if cut == "garbage" else real[: len(real) // 2]
    folder = folder_with(tmp_path, exported, {"onnx/decoder_model_merged.onnx": data})
    with pytest.raises(ModelFormatError, match="onnxruntime cannot load"):
        edgeslm.load(folder, dtype="fp32")


def test_a_decoder_without_config_or_with_another_models_config(tmp_path, exported):
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copyfile(exported["llama"]["out"] / MERGED, lone / "decoder.onnx")
    with pytest.raises(ModelNotFoundError, match="config.json"):
        edgeslm.load(lone / "decoder.onnx")

    folder = folder_with(tmp_path, exported, {"onnx/decoder_model_merged.onnx": None})
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, num_hidden_layers=3)))
    with pytest.raises(ModelFormatError, match="different models"):
        edgeslm.load(folder)


def test_a_decoder_exported_without_a_cache_is_refused(tmp_path, exported):
    import onnx
    from onnx import TensorProto, helper

    table = helper.make_tensor("table", TensorProto.FLOAT, [32000, 1], [0.0] * 32000)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["logits"])],
        "no-past",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "n"]),
            helper.make_tensor_value_info(
                "attention_mask", TensorProto.INT64, [1, "n"]
            ),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "n", 1])],
        initializer=[table],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    folder = folder_with(tmp_path, exported, {})
    onnx.save(model, folder / "model.onnx")
    with pytest.raises(ModelFormatError, match="without a KV cache"):
        edgeslm.load(folder)
