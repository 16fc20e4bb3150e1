"""`pytorch_model.bin` without torch: exact round trips, hostile pickles, bad headers.

torch writes the files here (it is the oracle); edgeslm reads them with its
restricted unpickler. A pickle that asks for anything but tensors must be refused
before any of its code runs, and truncated or garbled checkpoint headers of every
format edgeslm reads (`.bin`, `.safetensors`, GGUF) must give a `ModelFormatError`,
never a crash or a hang.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeslm.errors import ModelFormatError
from edgeslm.export import export_model
from edgeslm.export.torch_pickle import load_torch_checkpoint, read_torch_checkpoint

LAYOUTS = {"zip": True, "legacy": False}


def random_state_dict() -> OrderedDict:
    """Every dtype a checkpoint may hold, plus views that share storages."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    sd = OrderedDict(
        f32=torch.randn(4, 3, generator=g),
        f16=torch.randn(7, generator=g).half(),
        bf16=torch.randn(3, 2, generator=g).bfloat16(),
        f64=torch.randn(2, 2, generator=g).double(),
        i64=torch.randint(-(2**40), 2**40, (5,), generator=g),
        i32=torch.randint(-1000, 1000, (3, 1), generator=g, dtype=torch.int32),
        i16=torch.randint(-1000, 1000, (4,), generator=g, dtype=torch.int16),
        i8=torch.randint(-128, 127, (4,), generator=g, dtype=torch.int8),
        u8=torch.randint(0, 255, (4,), generator=g, dtype=torch.uint8),
        flag=torch.rand(5, generator=g) > 0.5,
        scalar=torch.tensor(3.5),
        empty=torch.zeros(0, 4),
        base=base,
        transposed=base.t(),  # shared storage, strides (1, 5)
        row=base[2],  # shared storage, offset 10
        strided=base[1::2, ::3],  # offset and steps
    )
    sd["param"] = torch.nn.Parameter(torch.randn(3, generator=g))
    sd["tied"] = sd["f32"]  # the same tensor twice, like a tied lm_head
    return sd


def expected_array(tensor: torch.Tensor) -> np.ndarray:
    t = tensor.detach()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_torch_save_round_trips_exactly(tmp_path, layout):
    sd = random_state_dict()
    path = tmp_path / "pytorch_model.bin"
    torch.save(sd, path, _use_new_zipfile_serialization=LAYOUTS[layout])

    got = load_torch_checkpoint(path)
    assert list(got) == list(sd)
    for name, tensor in sd.items():
        want = expected_array(tensor)
        assert got[name].dtype == want.dtype, name
        assert got[name].shape == want.shape, name
        assert np.array_equal(got[name], want), name


def test_module_state_dict_round_trips(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Embedding(50, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 50)
    )
    model[2].weight = model[0].weight  # tied, as GPT-2's output is
    path = tmp_path / "pytorch_model.bin"
    torch.save(model.state_dict(), path)
    got = load_torch_checkpoint(path)
    assert list(got) == list(model.state_dict())
    for name, tensor in model.state_dict().items():
        assert np.array_equal(got[name], tensor.numpy()), name


# --- hostile pickles ----------------------------------------------------------------


class _Payload:
    """Pickles as a call that would create a marker file if it ever ran."""

    def __init__(self, func, args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payloads(marker: Path) -> dict[str, object]:
    command = f"touch {marker}"
    return {
        "os.system": _Payload(os.system, (command,)),
        "eval": _Payload(eval, (f"open({str(marker)!r}, 'w')",)),
        "exec": _Payload(exec, (f"open({str(marker)!r}, 'w')",)),
        "subprocess.Popen": _Payload(subprocess.Popen, (["touch", str(marker)],)),
    }


@pytest.mark.parametrize("name", ["os.system", "eval", "exec", "subprocess.Popen"])
@pytest.mark.parametrize("how", ["torch.save", "legacy", "plain pickle"])
def test_hostile_pickle_is_refused_and_runs_nothing(tmp_path, name, how):
    marker = tmp_path / "pwned"
    payload = _payloads(marker)[name]
    # The payload comes first, so it is the first global the reader meets.
    state = OrderedDict(evil=payload, weight=torch.zeros(2))
    path = tmp_path / "pytorch_model.bin"
    if how == "plain pickle":
        path.write_bytes(pickle.dumps(state, protocol=2))
    else:
        torch.save(state, path, _use_new_zipfile_serialization=how == "torch.save")

    with pytest.raises(ModelFormatError, match="refused") as info:
        read_torch_checkpoint(path)
    global_name = name.split(".")[-1]
    assert global_name in str(info.value)
    assert not marker.exists()


def test_hostile_bin_in_a_model_folder_stops_the_export(tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps(
            {"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 2}
            | {"n_positions": 64, "vocab_size": 64}
        )
    )
    state = OrderedDict(evil=_Payload(os.system, (f"touch {marker}",)))
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(ModelFormatError, match="system"):
        export_model(folder, tmp_path / "pkg")
    assert not marker.exists() and not (tmp_path / "pkg").exists()


def test_tensor_subclasses_and_other_torch_globals_are_refused(tmp_path):
    # A rebuild function torch uses for tensor subclasses: it can call any type.
    data = b"\x80\x02ctorch._tensor\n_rebuild_from_type_v2\nq\x00)R."  # call it
    path = tmp_path / "sub.bin"
    path.write_bytes(data)
    with pytest.raises(ModelFormatError, match="_rebuild_from_type_v2"):
        read_torch_checkpoint(path)


def test_allowed_names_used_wrongly_are_errors_not_crashes(tmp_path):
    # REDUCE on a storage type (not callable), and a tensor without a storage.
    cases = [
        b"\x80\x02ctorch\nFloatStorage\n)R.",
        b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(K\x01K\x00)).R.",
    ]
    for i, data in enumerate(cases):
        path = tmp_path / f"bad{i}.bin"
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("archive/data.pkl", data)
        with pytest.raises(ModelFormatError):
            read_torch_checkpoint(path)


def test_a_view_past_its_storage_is_refused(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.zeros(4)}, path)
    with zipfile.ZipFile(path) as archive:
        members = {n: archive.read(n) for n in archive.namelist()}
    pkl = next(n for n in members if n.endswith("data.pkl"))
    # Size 4 -> 9: the tensor would read past its 4-element storage.
    members[pkl] = members[pkl].replace(b"K\x04\x85", b"K\x09\x85", 1)
    with zipfile.ZipFile(path, "w") as archive:
        for name, blob in members.items():
            archive.writestr(name, blob)
    with pytest.raises(ModelFormatError, match="reaches element"):
        load_torch_checkpoint(path)


# --- truncated and garbled files: .bin --------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_truncated_bin_is_a_format_error(tmp_path, layout):
    full = tmp_path / "full.bin"
    torch.save(
        random_state_dict(), full, _use_new_zipfile_serialization=LAYOUTS[layout]
    )
    data = full.read_bytes()
    cut = tmp_path / "cut.bin"
    for keep in sorted({1, 2, 10, 64, len(data) // 3, len(data) // 2, len(data) - 9}):
        cut.write_bytes(data[:keep])
        with pytest.raises(ModelFormatError, match="cut.bin"):
            load_torch_checkpoint(cut)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_garbled_bin_never_crashes(tmp_path, layout):
    """Random byte flips: either the exact tensors or a ModelFormatError."""
    full = tmp_path / "full.bin"
    sd = random_state_dict()
    torch.save(sd, full, _use_new_zipfile_serialization=LAYOUTS[layout])
    data = full.read_bytes()
    rng = np.random.default_rng(1)
    bad = tmp_path / "bad.bin"
    errors = 0
    for _ in range(60):
        garbled = bytearray(data)
        for pos in rng.integers(0, len(data), 4):
            garbled[pos] = int(rng.integers(0, 256))
        bad.write_bytes(bytes(garbled))
        try:
            load_torch_checkpoint(bad)
        except ModelFormatError:
            errors += 1
    assert errors > 0


def test_not_a_checkpoint_says_so(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    for blob, what in [
        (b"", "not a PyTorch checkpoint"),
        (b"hello world", "not a PyTorch checkpoint"),
        (pickle.dumps([1, 2, 3], protocol=2), "not a PyTorch checkpoint"),
        (b"PK\x03\x04garbage", "zip"),
    ]:
        path.write_bytes(blob)
        with pytest.raises(ModelFormatError, match=what):
            read_torch_checkpoint(path)
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ModelFormatError, match="state dict"):
        read_torch_checkpoint(path)


# --- truncated and garbled headers: .safetensors and GGUF --------------------------


def _safetensors_file(path: Path) -> bytes:
    from safetensors.numpy import save_file

    save_file({"w": np.arange(64, dtype=np.float32).reshape(8, 8)}, str(path))
    return path.read_bytes()


def test_safetensors_header_cut_or_garbled_is_a_format_error(tmp_path, tiny_folder):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_folder, folder)
    shard = folder / "model.safetensors"
    data = _safetensors_file(tmp_path / "small.safetensors")
    (header_len,) = struct.unpack("<Q", data[:8])
    cases = [data[:n] for n in (4, 8, 9, 8 + header_len // 2, 8 + header_len)]
    cases += [
        struct.pack("<Q", 2**62) + data[8:],  # header length far past the end
        data[:8] + b"\x00" * header_len + data[8 + header_len :],  # not JSON
        data[:8] + data[8 : 8 + header_len].replace(b"F32", b"X99") + data[8:],
    ]
    for blob in cases:
        shard.write_bytes(blob)
        with pytest.raises(ModelFormatError, match="safetensors|tensor"):
            export_model(folder, tmp_path / "pkg")
        assert not (tmp_path / "pkg").exists()


def _small_gguf(path: Path) -> bytes:
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.ones((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def test_gguf_header_cut_or_garbled_is_a_format_error(tmp_path):
    data = _small_gguf(tmp_path / "ok.gguf")
    bad = tmp_path / "bad.gguf"
    huge = struct.pack("<Q", 2**62)
    cases = [data[:n] for n in (3, 4, 8, 16, 24, 40, 80, len(data) - 4)]
    cases += [
        b"GGUF" + struct.pack("<I", 99) + data[8:],  # unknown version
        data[:8] + huge + data[16:],  # tensor count
        data[:16] + huge + data[24:],  # metadata count
        data[:24] + huge + data[32:],  # first key's length
        b"FUGG" + data[4:],  # magic
    ]
    for blob in cases:
        bad.write_bytes(blob)
        with pytest.raises(ModelFormatError, match="bad.gguf"):
            export_model(bad, tmp_path / "pkg")
        assert not (tmp_path / "pkg").exists()


def test_sharded_bin_folder_reads_every_tensor_in_its_layout(tmp_path):
    """`pytorch_model-0000N-of-0000M.bin` shards; GPT-2's Conv1D comes out (out, in)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from edgeslm.export.checkpoint import open_checkpoint

    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=16, vocab_size=64)
    model = GPT2LMHeadModel(config)
    config.save_pretrained(tmp_path)
    state = model.state_dict()
    keys = list(state)
    half = len(keys) // 2
    for i, part in enumerate((keys[:half], keys[half:]), start=1):
        shard = tmp_path / f"pytorch_model-{i:05d}-of-00002.bin"
        torch.save({k: state[k] for k in part}, shard)

    ckpt = open_checkpoint(tmp_path)
    assert ckpt.config.architecture == "gpt2" and ckpt.config.n_layers == 2
    assert "lm_head" not in ckpt.names  # tied: the output reuses the embedding
    c_attn = state["transformer.h.1.attn.c_attn.weight"].numpy()
    assert np.array_equal(ckpt.load("layers.1.wqkv"), c_attn.T)
    assert np.array_equal(ckpt.load("pos_embed"), state["transformer.wpe.weight"])
    assert len(ckpt.names) == 4 + 2 * 12


def test_bin_missing_a_tensor_names_it(tmp_path, shared_data):
    import shutil

    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=16)
    config.save_pretrained(tmp_path / "model")
    tokenizers = shared_data / "tokenizers"
    shutil.copyfile(tokenizers / "encoder.json", tmp_path / "model" / "vocab.json")
    shutil.copyfile(tokenizers / "vocab.bpe", tmp_path / "model" / "merges.txt")
    state = GPT2LMHeadModel(config).state_dict()
    del state["transformer.wpe.weight"]
    torch.save(state, tmp_path / "model" / "pytorch_model.bin")
    with pytest.raises(ModelFormatError, match="pos_embed"):
        export_model(tmp_path / "model", tmp_path / "pkg")
    assert not (tmp_path / "pkg").exists()
