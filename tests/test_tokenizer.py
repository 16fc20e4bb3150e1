"""Package tokenizers: built from GGUF and HF folders, checked against references.

References: llama.cpp's tokenizer test vectors for the Llama SentencePiece and GPT-2
vocabularies (shared data), transformers' GGUF loader on SmolLM2 (oracle, tests
only), and the `sentencepiece` library on small models trained here. The streaming
decoder is checked by property tests against `Tokenizer.decode`.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from pathlib import Path

import gguf
import pytest
import sentencepiece as spm
from checkpoints import smollm2_gguf
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from edgeslm.errors import ModelFormatError, ModelNotFoundError
from edgeslm.export.tokenizer_build import (
    TokenizerInfo,
    tokenizer_from_gguf,
    tokenizer_from_hf_folder,
)
from edgeslm.tokenizer import Tokenizer

# EDGESLM_TOKENIZER_EXAMPLES=5000 for a deeper local search than CI's default.
PROPERTY = settings(
    max_examples=int(os.environ.get("EDGESLM_TOKENIZER_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# Chat-shaped texts for the SmolLM2 oracle: specials, newlines, digits, Unicode, code.
SMOLLM2_TEXTS = [
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
    "Hugging Face<|im_end|>\n<|im_start|>user\nTurn on the kitchen lights<|im_end|>\n"
    "<|im_start|>assistant\n",
    "<|im_start|>user\nWhat is 17*23? Answer with 391 or 401.<|im_end|>\n",
    "<|im_start|>user\nÜbersetze: naïve café, 日本語のテキスト, "
    "emoji 🦙🚀 ✅<|im_end|>",
    "<|im_start|>assistant\n```python\ndef area(r):\n    return 3.14159 * r ** 2\n```\n"
    'Call area(2) -> 12.56; {"id": 7, "ok": true}<|im_end|>\n<|endoftext|>',
    "Set the thermostat to 21.5 °C at 07:30, then dim lamp #3 to 40%.",
    "",
]


# --------------------------------------------------------------------- helpers


def read_vectors(folder: Path, name: str) -> list[tuple[str, list[int]]]:
    """llama.cpp's `.inp`/`.out` pair: texts split by `__ggml_vocab_test__`."""
    texts = (folder / f"{name}.inp").read_text(encoding="utf-8")
    lines = (folder / f"{name}.out").read_text(encoding="utf-8").split("\n")
    # Every input, the last included, is followed by the separator line; every
    # output line by a newline. So the final split piece is empty in both.
    inputs = texts.split("\n__ggml_vocab_test__\n")[:-1]
    outputs = [[int(x) for x in line.split()] for line in lines[:-1]]
    assert len(inputs) == len(outputs) > 0
    return list(zip(inputs, outputs, strict=True))


def stream(tok: Tokenizer, ids: list[int], *, skip: bool) -> list[str]:
    decoder = tok.incremental_decoder(skip_special_tokens=skip)
    return [decoder.add(i) for i in ids] + [decoder.flush()]


def write_gguf(path: Path, **kv: object) -> gguf.GGUFReader:
    """A weightless GGUF holding the given `tokenizer.ggml.*` keys (dots as __)."""
    writer = gguf.GGUFWriter(str(path), "llama")
    for name, value in kv.items():
        key = name.replace("__", ".")
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, list(value))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return gguf.GGUFReader(str(path))


# -------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def spm_built(shared_data: Path, tmp_path_factory) -> tuple[Tokenizer, TokenizerInfo]:
    out = tmp_path_factory.mktemp("llama-spm")
    reader = gguf.GGUFReader(str(shared_data / "tokenizers/ggml-vocab-llama-spm.gguf"))
    info = tokenizer_from_gguf(reader, out)
    return Tokenizer.from_file(out / "tokenizer.json"), info


@pytest.fixture(scope="module")
def gpt2_built(shared_data: Path, tmp_path_factory) -> tuple[Tokenizer, TokenizerInfo]:
    src = tmp_path_factory.mktemp("gpt2-src")
    shutil.copyfile(shared_data / "tokenizers/encoder.json", src / "vocab.json")
    shutil.copyfile(shared_data / "tokenizers/vocab.bpe", src / "merges.txt")
    out = tmp_path_factory.mktemp("gpt2")
    info = tokenizer_from_hf_folder(src, out)
    return Tokenizer.from_file(out / "tokenizer.json"), info


@pytest.fixture(scope="module")
def smollm2_built(tmp_path_factory) -> tuple[Tokenizer, TokenizerInfo, Path]:
    out = tmp_path_factory.mktemp("smollm2")
    info = tokenizer_from_gguf(gguf.GGUFReader(str(smollm2_gguf())), out)
    return Tokenizer.from_file(out / "tokenizer.json"), info, out


@pytest.fixture(scope="module")
def smollm2_oracle():
    """transformers' own tokenizer for the GGUF (the parity oracle)."""
    from transformers import AutoTokenizer

    path = smollm2_gguf()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")  # a local file; never ask the hub
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def built(spm_built, gpt2_built, smollm2_built) -> dict[str, Tokenizer]:
    return {"spm": spm_built[0], "gpt2": gpt2_built[0], "smollm2": smollm2_built[0]}


# ------------------------------------------------------ llama.cpp test vectors


def test_llama_spm_gguf_matches_every_llama_cpp_vector(shared_data, spm_built):
    # The .out files are llama.cpp's tokenize without BOS (add_special=false), with
    # the SentencePiece space prefix; an empty text gives no tokens at all.
    tok, _ = spm_built
    vectors = read_vectors(shared_data / "tokenizers", "ggml-vocab-llama-spm.gguf")
    wrong = [(t, tok.encode(t), ids) for t, ids in vectors if tok.encode(t) != ids]
    assert not wrong, f"{len(wrong)}/{len(vectors)} vectors differ, first: {wrong[0]}"


def test_gpt2_folder_matches_every_llama_cpp_vector(shared_data, gpt2_built):
    tok, _ = gpt2_built
    vectors = read_vectors(shared_data / "tokenizers", "ggml-vocab-gpt-2.gguf")
    wrong = [(t, tok.encode(t), ids) for t, ids in vectors if tok.encode(t) != ids]
    assert not wrong, f"{len(wrong)}/{len(vectors)} vectors differ, first: {wrong[0]}"


def test_llama_spm_info_and_special_tokens(spm_built):
    tok, info = spm_built
    assert (info.bos_token_id, info.eos_token_id, info.unk_token_id) == (1, 2, 0)
    assert (info.bos_token, info.eos_token, info.pad_token_id) == ("<s>", "</s>", None)
    assert info.add_bos_token and info.chat_template is None
    assert tok.vocab_size == 32000
    assert tok.encode("Hello", add_special_tokens=True) == [1, 15043]
    # Written specials are single tokens; llama.cpp re-adds the space prefix after.
    assert tok.encode("<s>Hello</s>") == [1, 15043, 2]
    assert tok.decode([1, 15043, 2], skip_special_tokens=True) == "Hello"
    assert tok.id_to_token(13) == "<0x0A>" and tok.token_to_id("▁Hello") == 15043


def test_gpt2_info_defaults_to_endoftext(gpt2_built):
    tok, info = gpt2_built
    assert info.eos_token_id == info.bos_token_id == 50256
    assert info.eos_token == "<|endoftext|>" and not info.add_bos_token
    assert info.extra_eos_token_ids == ()
    assert tok.encode("a<|endoftext|>b") == [64, 50256, 65]
    assert tok.encode("Hello", add_special_tokens=True) == [15496]


# ------------------------------------------------------------ SmolLM2 oracle


@pytest.mark.parametrize("text", SMOLLM2_TEXTS)
def test_smollm2_gguf_encodes_like_transformers(text, smollm2_built, smollm2_oracle):
    tok = smollm2_built[0]
    ids = tok.encode(text)
    assert ids == smollm2_oracle.encode(text, add_special_tokens=False)
    for skip in (False, True):
        expected = smollm2_oracle.decode(
            ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False
        )
        assert tok.decode(ids, skip_special_tokens=skip) == expected


# Ids that llama.cpp itself gives on this GGUF (llama-cpp-python 0.3.16, vocab_only,
# tokenize(add_bos=False, special=True)), recorded once; llama.cpp is not a test
# dependency. The first four have whitespace right before a digit.
SMOLLM2_LLAMA_CPP = [
    ("x =  2", [104, 446, 256, 34]),
    ("a\n\n12", [81, 1116, 33, 34]),
    ("  1", [256, 33]),
    ("\n 1", [3805, 33]),
    ("def f():\n    return 42\n", [1604, 275, 3734, 472, 1003, 216, 36, 34, 198]),
    ("\t\t3\n\n\n4  5", [1656, 35, 16506, 36, 256, 37]),
    (
        "<|im_start|>user\nWhat is 17*23?  42<|im_end|>\n",
        [1, 4093, 198, 1780, 314, 216, 33, 39, 26, 34, 35, 47, 256, 36, 34, 2, 198],
    ),
]


@pytest.mark.parametrize(("text", "ids"), SMOLLM2_LLAMA_CPP)
def test_smollm2_gguf_encodes_like_llama_cpp(text, ids, smollm2_built):
    assert smollm2_built[0].encode(text) == ids


@pytest.mark.parametrize(("text", "ids"), SMOLLM2_LLAMA_CPP[:4])
def test_transformers_gguf_loader_misses_smollm_digit_split(text, ids, smollm2_oracle):
    # GGUF pre "smollm" means llama.cpp's "\p{N}" split before GPT-2's regex (as
    # SmolLM2's own tokenizer.json does). transformers' GGUF loader leaves it
    # out, so whitespace right before a digit merges differently there; with
    # the digit split put back it agrees with llama.cpp and with us.
    from tokenizers import Tokenizer as Backend
    from tokenizers import pre_tokenizers

    assert smollm2_oracle.encode(text, add_special_tokens=False) != ids
    patched = Backend.from_str(smollm2_oracle.backend_tokenizer.to_str())
    patched.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), patched.pre_tokenizer]
    )
    assert patched.encode(text, add_special_tokens=False).ids == ids


def test_smollm2_info(smollm2_built):
    tok, info, _ = smollm2_built
    assert (info.bos_token, info.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert (info.bos_token_id, info.eos_token_id, info.pad_token_id) == (1, 2, 2)
    assert info.unk_token_id == 0 and not info.add_bos_token
    assert info.extra_eos_token_ids == (0,)  # <|endoftext|> also ends a turn
    assert "<|im_start|>" in (info.chat_template or "")
    assert tok.vocab_size == 49152
    assert tok.encode("hi", add_special_tokens=True) == tok.encode("hi")


# ------------------------------------------------------- streaming decode


@pytest.mark.parametrize("kind", ["spm", "gpt2", "smollm2"])
@PROPERTY
@given(text=st.text(max_size=60))
def test_stream_round_trips_any_text_promptly(kind, text, built):
    tok = built[kind]
    specials = [t.content for t in tok.backend.get_added_tokens_decoder().values()]
    assume("\u2581" not in text and "\ufffd" not in text)  # ▁ reads back as " "
    assume(not any(s in text for s in specials))
    ids = tok.encode(text)
    if kind == "smollm2":  # its vocabulary lacks 21 bytes (0x04, 0xF1...): dropped
        assume(tok.decode(ids) == text)
    decoder = tok.incremental_decoder()
    emitted = ""
    for n, token_id in enumerate(ids, start=1):
        chunk = decoder.add(token_id)
        assert "\ufffd" not in chunk
        emitted += chunk
        # Held back only while a character or a byte-fallback run is unfinished.
        so_far = tok.decode(ids[:n])
        byte_piece = re.fullmatch(r"<0x[0-9A-F]{2}>", tok.id_to_token(token_id))
        if not so_far.endswith("\ufffd") and not byte_piece:
            assert emitted == so_far
    assert emitted + decoder.flush() == text


def id_lists(vocab_size: int, byte_ids: range, special_ids: list[int]):
    return st.lists(
        st.one_of(
            st.integers(0, vocab_size - 1),
            st.integers(byte_ids.start, byte_ids.stop - 1),
            st.sampled_from(special_ids),
        ),
        max_size=40,
    )


@PROPERTY
@given(ids=id_lists(32000, range(3, 259), [0, 1, 2, 29871, 13]), skip=st.booleans())
def test_stream_equals_decode_for_any_ids_spm(ids, skip, built):
    tok = built["spm"]
    assert "".join(stream(tok, ids, skip=skip)) == tok.decode(
        ids, skip_special_tokens=skip
    )


@PROPERTY
@given(ids=id_lists(50257, range(0, 256), [50256, 220, 198]), skip=st.booleans())
def test_stream_equals_decode_for_any_ids_gpt2(ids, skip, built):
    tok = built["gpt2"]
    assert "".join(stream(tok, ids, skip=skip)) == tok.decode(
        ids, skip_special_tokens=skip
    )


@PROPERTY
@given(ids=id_lists(49152, range(17, 273), [0, 1, 2, 216, 198]), skip=st.booleans())
def test_stream_equals_decode_for_any_ids_smollm2(ids, skip, built):
    tok = built["smollm2"]
    assert "".join(stream(tok, ids, skip=skip)) == tok.decode(
        ids, skip_special_tokens=skip
    )


def test_stream_holds_byte_pieces_and_keeps_spaces(built):
    tok = built["spm"]
    ids = tok.encode(" this is 🦙.cpp")  # ... 243 162 169 156 (byte pieces) ...
    assert ids == [29871, 445, 338, 29871, 243, 162, 169, 156, 29889, 8223]
    chunks = stream(tok, ids, skip=True)
    assert "".join(chunks) == " this is 🦙.cpp"
    assert chunks[:3] == ["", " this", " is"]  # spaces kept mid-stream
    # A byte-fallback run is held until a non-byte piece closes it: a later
    # invalid byte would turn the whole run into U+FFFD in `decode`.
    assert chunks[3:9] == [" ", "", "", "", "", "🦙."]


def test_stream_skips_specials_without_losing_spaces(built):
    tok = built["spm"]
    ids = [1, *tok.encode("Hello world"), 2]
    assert "".join(stream(tok, ids, skip=True)) == "Hello world"
    assert (
        "".join(stream(tok, ids, skip=False))
        == tok.decode(ids)
        == "<s> Hello world</s>"
    )


def test_stream_window_stays_small(built):
    tok = built["gpt2"]
    text = "Streaming 日本語 text 🦙 keeps a bounded window. " * 60
    decoder = tok.incremental_decoder()
    widest, out = 0, []
    for token_id in tok.encode(text):
        out.append(decoder.add(token_id))
        widest = max(widest, len(decoder._window))
    assert "".join(out) + decoder.flush() == text
    assert widest <= 8


def test_decode_rejects_bad_ids_and_ignores_ids_past_vocab(built):
    tok = built["spm"]
    with pytest.raises(ValueError, match="must be >= 0"):
        tok.decode([-1])
    with pytest.raises(ValueError, match="must be an int"):
        tok.incremental_decoder().add(1.5)  # type: ignore[arg-type]
    assert tok.decode([15043, 40000]) == "Hello"
    assert tok.id_to_token(-3) is None and tok.id_to_token(40000) is None


# ------------------------------------------------ SentencePiece tokenizer.model

SPM_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! How are you today? I'm fine, thanks.",
    "Numbers like 12345 and 3.14159 appear here, 2024-05-01.",
    "Ünïcödé text: naïve café, Straße, 日本語のテキスト。",
    "def main():\n    return 42  # the answer",
    "  leading spaces and   multiple   gaps  ",
] * 40


def train_spm(model_type: str, normalization: str) -> bytes:
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SPM_CORPUS),
        model_writer=buffer,
        model_type=model_type,
        vocab_size=420,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name=normalization,
        remove_extra_whitespaces=normalization != "identity",
        control_symbols=["<|end|>"],
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return buffer.getvalue()


@pytest.fixture(scope="module", params=[("bpe", "identity"), ("unigram", "nmt_nfkc")])
def spm_model(request, tmp_path_factory):
    """A trained SentencePiece model, its converted tokenizer, and its info."""
    data = train_spm(*request.param)
    src = tmp_path_factory.mktemp("spm-src")
    (src / "tokenizer.model").write_bytes(data)
    info = tokenizer_from_hf_folder(src, src / "out")
    processor = spm.SentencePieceProcessor(model_proto=data)
    return processor, Tokenizer.from_file(src / "out/tokenizer.json"), info


SPM_TEXTS = [
    "Hello  world 12 日本",
    "  leading and trailing  ",
    "ｆｕｌｌｗｉｄｔｈ ＡＢＣ and ligature ﬁ",
    "x\ny\tz 🦙🚀",
    " ",
    "",
]


@pytest.mark.parametrize("text", SPM_TEXTS)
def test_tokenizer_model_matches_sentencepiece(text, spm_model):
    processor, tok, _ = spm_model
    assert tok.encode(text) == processor.encode(text)
    assert tok.decode(tok.encode(text)) == processor.decode(processor.encode(text))


@PROPERTY
@given(
    text=st.text(st.characters(codec="utf-8", exclude_characters="\u2581"), max_size=30)
)
def test_tokenizer_model_matches_sentencepiece_on_any_text(text, spm_model):
    processor, tok, _ = spm_model
    assume("<|end|>" not in text and "<s>" not in text and "</s>" not in text)
    assert tok.encode(text) == processor.encode(text)


def test_tokenizer_model_info(spm_model):
    _, tok, info = spm_model
    assert (info.bos_token, info.eos_token) == ("<s>", "</s>")
    assert (info.unk_token_id, info.bos_token_id, info.eos_token_id) == (0, 1, 2)
    assert info.add_bos_token  # SentencePiece (Llama) folders add BOS by default
    assert info.extra_eos_token_ids == (tok.token_to_id("<|end|>"),)
    assert tok.encode("hi", add_special_tokens=True)[0] == 1


# ----------------------------------------------------------- HF folder extras


def test_tokenizer_json_is_copied_and_config_read(smollm2_built, tmp_path):
    _, _, built_dir = smollm2_built
    src = tmp_path / "src"
    src.mkdir()
    shutil.copyfile(built_dir / "tokenizer.json", src / "tokenizer.json")
    config = {
        "bos_token": "<|im_start|>",
        "eos_token": {"content": "<|im_end|>", "special": True},
        "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "chat_template": "{{ messages }}",
    }
    (src / "tokenizer_config.json").write_text(json.dumps(config))
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    info = tokenizer_from_hf_folder(src, tmp_path / "out")
    copied = (tmp_path / "out/tokenizer.json").read_bytes()
    assert copied == (src / "tokenizer.json").read_bytes()
    assert (info.bos_token_id, info.eos_token_id, info.pad_token_id) == (1, 2, 2)
    assert info.chat_template == "{{ messages }}" and not info.add_bos_token
    assert info.extra_eos_token_ids == (0,)


def test_vocab_json_folder_keeps_declared_added_token_ids(shared_data, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copyfile(shared_data / "tokenizers/encoder.json", src / "vocab.json")
    shutil.copyfile(shared_data / "tokenizers/vocab.bpe", src / "merges.txt")
    added = {"50257": {"content": "<|pad|>", "special": True}}
    config = {"added_tokens_decoder": added, "eos_token": "<|endoftext|>"}
    (src / "tokenizer_config.json").write_text(json.dumps(config))
    info = tokenizer_from_hf_folder(src, tmp_path / "out")
    tok = Tokenizer.from_file(tmp_path / "out/tokenizer.json")
    assert tok.encode("a<|pad|>") == [64, 50257] and tok.vocab_size == 50258
    assert info.eos_token_id == 50256 and info.bos_token_id is None

    added["50300"] = added.pop("50257")  # an id the vocabulary cannot give it
    (src / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFormatError, match="50300"):
        tokenizer_from_hf_folder(src, tmp_path / "out2")


# -------------------------------------------------- truncated/garbled sources

LLAMA_KV = {
    "tokenizer__ggml__model": "llama",
    "tokenizer__ggml__tokens": ["<unk>", "<s>", "</s>", "▁", "a", "▁a"],
    "tokenizer__ggml__scores": [0.0, 0.0, 0.0, -1.0, -2.0, -0.5],
    "tokenizer__ggml__token_type": [2, 3, 3, 1, 1, 1],
}


def test_small_synthetic_llama_gguf_builds(tmp_path):
    info = tokenizer_from_gguf(write_gguf(tmp_path / "v.gguf", **LLAMA_KV), tmp_path)
    tok = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert tok.encode("a a") == [5, 5] and tok.decode([5, 5]) == "a a"
    assert info.bos_token_id is None and not info.add_bos_token  # no BOS id given


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"tokenizer__ggml__tokens": None}, "tokenizer.ggml.tokens"),
        ({"tokenizer__ggml__model": None}, "tokenizer.ggml.model"),
        ({"tokenizer__ggml__model": "bert"}, "'bert'"),
        ({"tokenizer__ggml__scores": [0.0, 0.0]}, "tokenizer.ggml.scores"),
        ({"tokenizer__ggml__token_type": [1, 1, 1]}, "tokenizer.ggml.token_type"),
        ({"tokenizer__ggml__tokens": 7}, "array of strings"),
        ({"tokenizer__ggml__model": "gpt2"}, "tokenizer.ggml.merges"),
        (
            {"tokenizer__ggml__model": "gpt2", "tokenizer__ggml__merges": ["a"]},
            r"merges\[0\]",
        ),
        (
            {
                "tokenizer__ggml__model": "gpt2",
                "tokenizer__ggml__merges": ["▁ a"],
                "tokenizer__ggml__pre": "llama-bpe",
            },
            "llama-bpe",
        ),
        (
            {"tokenizer__ggml__model": "gpt2", "tokenizer__ggml__merges": ["x y"]},
            "do not fit",
        ),
    ],
)
def test_garbled_gguf_metadata_raises_model_format_error(changes, message, tmp_path):
    kv = {k: v for k, v in {**LLAMA_KV, **changes}.items() if v is not None}
    reader = write_gguf(tmp_path / "bad.gguf", **kv)
    with pytest.raises(ModelFormatError, match=message):
        tokenizer_from_gguf(reader, tmp_path / "out")
    assert not (tmp_path / "out/tokenizer.json").exists()


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    ("source", "breakage", "message"),
    [
        ("json", lambda d: _truncate(d / "tokenizer.json"), "could not be loaded"),
        ("spm", lambda d: _truncate(d / "tokenizer.model"), "truncated"),
        ("spm", lambda d: (d / "tokenizer.model").write_bytes(b"\n\xff"), "truncated"),
        ("spm", lambda d: (d / "tokenizer.model").write_bytes(b"not spm"), "garbled"),
        ("bpe", lambda d: _truncate(d / "vocab.json"), "not valid JSON"),
        ("bpe", lambda d: (d / "vocab.json").write_text("[1, 2]"), "integer ids"),
        ("bpe", lambda d: (d / "merges.txt").write_text("Ġ t\nbroken\n"), "line 2"),
        ("bpe", lambda d: (d / "tokenizer_config.json").write_text("{"), "valid JSON"),
        ("bpe", lambda d: (d / "tokenizer_config.json").write_text("[]"), "object"),
        ("none", lambda d: None, "no tokenizer in"),
    ],
)
def test_garbled_hf_folder_raises_model_format_error(
    source, breakage, message, shared_data, spm_built, tmp_path
):
    src = tmp_path / "src"
    src.mkdir()
    if source == "json":
        spm_built[0].backend.save(str(src / "tokenizer.json"))
    elif source == "spm":
        (src / "tokenizer.model").write_bytes(train_spm("bpe", "identity"))
    elif source == "bpe":
        shutil.copyfile(shared_data / "tokenizers/encoder.json", src / "vocab.json")
        shutil.copyfile(shared_data / "tokenizers/vocab.bpe", src / "merges.txt")
    breakage(src)
    with pytest.raises(ModelFormatError, match=message):
        tokenizer_from_hf_folder(src, tmp_path / "out")


@pytest.fixture(scope="module")
def spm_bytes() -> bytes:
    return train_spm("bpe", "identity")


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_cut_or_flipped_tokenizer_model_never_crashes(
    data, spm_bytes, tmp_path_factory
):
    # Any prefix of the file, or the file with one byte changed, either converts
    # or raises ModelFormatError; nothing else escapes.
    blob = bytearray(spm_bytes)
    if data.draw(st.booleans(), label="truncate"):
        blob = blob[: data.draw(st.integers(0, len(blob) - 1), label="cut")]
    else:
        where = data.draw(st.integers(0, len(blob) - 1), label="where")
        blob[where] = data.draw(st.integers(0, 255), label="byte")
    src = tmp_path_factory.mktemp("fuzz")
    (src / "tokenizer.model").write_bytes(bytes(blob))
    try:
        tokenizer_from_hf_folder(src, src / "out")
    except ModelFormatError:
        pass


def test_missing_sources_raise_not_found(tmp_path):
    with pytest.raises(ModelNotFoundError):
        Tokenizer.from_file(tmp_path / "nope.json")
    with pytest.raises(ModelNotFoundError):
        tokenizer_from_hf_folder(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(ModelFormatError, match="re-export"):
        Tokenizer.from_file(tmp_path / "tokenizer.json")
