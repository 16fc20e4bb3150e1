"""The BERT exporter and `Encoder.embed`, on the real all-MiniLM-L6-v2 weights.

The oracle is transformers (torch) with sentence-transformers' recipe written out:
mean of the last hidden states over real tokens, then L2 normalization.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from edgeslm.encoder import Encoder, EncoderManifest, default_encoder_source
from edgeslm.errors import ModelFormatError, ModelNotFoundError, PackageIntegrityError
from edgeslm.export.bert import export_bert

TEXTS = [
    "turn on the kitchen light",
    "what is the weather in paris today, tell me please",
    "a",
    "dim the lights to forty percent in the bedroom and in the hall",
    "Ünïcode and émojis 🎉 still tokenize",
]


@pytest.fixture(scope="module")
def source():
    return default_encoder_source(install=False)


@pytest.fixture(scope="module")
def packages(tmp_path_factory, source):
    root = tmp_path_factory.mktemp("encoders")
    return {
        dtype: export_bert(source, root / dtype, dtype=dtype)
        for dtype in ("fp32", "int8")
    }


@pytest.fixture(scope="module")
def reference(source):
    import torch
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    model = AutoModel.from_pretrained(str(source)).eval()
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    mean = (hidden * mask).sum(1) / mask.sum(1)
    vectors = torch.nn.functional.normalize(mean, dim=-1).numpy()
    return vectors, batch["input_ids"].numpy()


@pytest.mark.parametrize("dtype,min_cos", [("fp32", 0.99999), ("int8", 0.999)])
def test_embeddings_match_transformers(packages, reference, dtype, min_cos, report):
    encoder = Encoder(packages[dtype])
    vectors = encoder.embed(TEXTS)
    want, want_ids = reference
    ids, _ = encoder.encode_ids(TEXTS)
    assert (ids == want_ids).all()
    assert vectors.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    cos = (vectors * want).sum(axis=1)
    report(f"encoder {dtype} cosine to transformers: min {cos.min():.5f}")
    assert cos.min() >= min_cos


def test_padding_and_batching_do_not_change_a_vector(packages):
    encoder = Encoder(packages["int8"])
    together = encoder.embed(TEXTS, batch_size=2)
    alone = np.stack([encoder.embed(t)[0] for t in TEXTS])
    np.testing.assert_allclose(together, alone, atol=2e-3)


def test_long_text_is_truncated_not_refused(packages):
    encoder = Encoder(packages["int8"])
    long = "turn the lights on " * 400
    ids, mask = encoder.encode_ids([long])
    assert ids.shape[1] == encoder.manifest.max_tokens == 256
    assert encoder.embed([long]).shape == (1, 384)


def test_embed_input_errors(packages):
    encoder = Encoder(packages["int8"])
    assert encoder.embed([]).shape == (0, 384)
    with pytest.raises(TypeError, match="strings"):
        encoder.embed(["ok", 3])
    with pytest.raises(ValueError, match="batch_size"):
        encoder.embed(["ok"], batch_size=0)


def test_manifest_records_what_was_exported(packages, source):
    manifest = EncoderManifest.read(packages["int8"])
    assert manifest.quantization == "int8-block32"
    assert manifest.config["n_layers"] == 6 and manifest.config["hidden_size"] == 384
    assert manifest.source["path"] == str(source.resolve())
    files = {"model.onnx", "model.portable.onnx", "model.onnx.data", "tokenizer.json"}
    assert set(manifest.files) == files
    assert manifest.custom_ops == ("ai.edgeslm",)
    assert manifest.portable_model == "model.portable.onnx"


def test_changed_file_fails_verification(packages, tmp_path):
    copy = shutil.copytree(packages["int8"], tmp_path / "pkg")
    with open(copy / "tokenizer.json", "a") as f:
        f.write(" ")
    with pytest.raises(PackageIntegrityError, match="tokenizer.json"):
        Encoder(copy)


def test_bad_sources_are_refused_with_a_reason(tmp_path, source):
    with pytest.raises(ModelNotFoundError):
        export_bert(tmp_path / "nothing", tmp_path / "out")

    gpt = tmp_path / "gpt"
    shutil.copytree(source, gpt, ignore=shutil.ignore_patterns("*.safetensors"))
    config = json.loads((gpt / "config.json").read_text())
    (gpt / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ModelFormatError, match="not a BERT encoder"):
        export_bert(gpt, tmp_path / "out")

    (gpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFormatError, match="safetensors"):
        export_bert(gpt, tmp_path / "out")

    (gpt / "config.json").write_text("{not json")
    with pytest.raises(ModelFormatError, match="not valid JSON"):
        export_bert(gpt, tmp_path / "out")


def test_decoder_package_is_not_an_encoder(tiny_package):
    with pytest.raises(ModelFormatError, match="not an encoder package"):
        Encoder(tiny_package)


def test_existing_output_is_kept_unless_overwrite(packages, source, tmp_path):
    out = tmp_path / "pkg"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        export_bert(source, out)
    assert (out / "keep.txt").read_text() == "mine"
