"""Checkpoint readers: Hugging Face folders and GGUF files, as numpy, never torch.

A reader turns a source into a `Checkpoint`: a `ModelConfig` in edgeslm's names and
a lazy map from canonical tensor names to float32 arrays laid out `(out, in)`.
Canonical names (one vocabulary for every format):

    embed                       (vocab_size, hidden_size)
    layers.{i}.attn_norm        (hidden_size,)
    layers.{i}.wq               (n_heads * head_dim, hidden_size)
    layers.{i}.wk / wv          (n_kv_heads * head_dim, hidden_size)
    layers.{i}.wo               (hidden_size, n_heads * head_dim)
    layers.{i}.ffn_norm         (hidden_size,)
    layers.{i}.w_gate / w_up    (intermediate_size, hidden_size)
    layers.{i}.w_down           (hidden_size, intermediate_size)
    norm                        (hidden_size,)
    lm_head                     (vocab_size, hidden_size), absent when tied

The GPT-2 family has its own names (biases, learned positions, fused QKV); they are
listed in `gpt2.py`, which also translates its `config.json`. Weights come from
`*.safetensors` (memory-mapped), else from `pytorch_model*.bin` through the
restricted unpickler of `torch_pickle.py`, which never executes the pickle.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from edgeslm.config import ModelConfig
from edgeslm.errors import ModelFormatError, ModelNotFoundError
from edgeslm.export.quantize import Int4Blocks

log = logging.getLogger(__name__)


@dataclass
class Checkpoint:
    """A model source opened for export.

    Attributes:
        config: dimensions in edgeslm's names.
        names: canonical tensor names present in the source.
        load: returns one tensor as float32 `(out, in)`, read on demand.
        write_tokenizer: writes `tokenizer.json` into a folder, returns its info.
        source: where it came from (`kind`, `path`), recorded in the manifest.
        load_int4: the tensor's 4-bit blocks when the source stores it that way
            (GGUF Q4_0/Q4_1), else None; int4 exports carry such blocks over.
    """

    config: ModelConfig
    names: list[str]
    load: Callable[[str], np.ndarray]
    write_tokenizer: Callable[[Path], Any]
    source: dict[str, str]
    load_int4: Callable[[str], Int4Blocks | None] = lambda name: None


def open_checkpoint(src: str | Path) -> Checkpoint:
    """Open a Hugging Face folder or a GGUF file.

    Raises:
        ModelNotFoundError: `src` does not exist.
        ModelFormatError: it exists but is not a readable checkpoint.
    """
    path = Path(src)
    if not path.exists():
        raise ModelNotFoundError(f"no checkpoint at {path}")
    if path.is_dir():
        return _open_hf_folder(path)
    if path.suffix.lower() == ".gguf":
        from edgeslm.export.gguf_reader import open_gguf

        return open_gguf(path)
    raise ModelFormatError(
        f"{path}: expected a Hugging Face model folder or a .gguf file"
    )


# --- Hugging Face folders --------------------------------------------------------

_HF_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm",
    "self_attn.q_proj.weight": "wq",
    "self_attn.k_proj.weight": "wk",
    "self_attn.v_proj.weight": "wv",
    "self_attn.o_proj.weight": "wo",
    "post_attention_layernorm.weight": "ffn_norm",
    "mlp.gate_proj.weight": "w_gate",
    "mlp.up_proj.weight": "w_up",
    "mlp.down_proj.weight": "w_down",
}
_HF_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "embed",
    "model.norm.weight": "norm",
    "lm_head.weight": "lm_head",
}


def _require(cfg: dict[str, Any], key: str, where: Path) -> Any:
    if key not in cfg:
        raise ModelFormatError(f"{where}: missing required key {key!r}")
    return cfg[key]


def hf_config_to_model_config(cfg: dict[str, Any], where: Path) -> ModelConfig:
    """Translate a Llama-family or GPT-2 `config.json` into a `ModelConfig`."""
    model_type = cfg.get("model_type") or _model_type_from_class(cfg)
    if model_type == "gpt2":
        from edgeslm.export.gpt2 import gpt2_config_from_hf

        return gpt2_config_from_hf(cfg, where)
    if model_type not in ("llama", "mistral"):
        raise ModelFormatError(
            f"{where}: model_type {model_type!r} is not supported yet; supported: "
            "llama, mistral, gpt2"
        )
    if cfg.get("rope_scaling"):
        # TODO: RoPE scaling (llama3, linear, yarn); no supported model needs it yet.
        raise ModelFormatError(f"{where}: rope_scaling is not supported yet")
    hidden = int(_require(cfg, "hidden_size", where))
    n_heads = int(_require(cfg, "num_attention_heads", where))
    rope = cfg.get("rope_parameters") or {}
    return ModelConfig(
        architecture="llama",
        vocab_size=int(_require(cfg, "vocab_size", where)),
        hidden_size=hidden,
        n_layers=int(_require(cfg, "num_hidden_layers", where)),
        n_heads=n_heads,
        n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
        head_dim=int(cfg.get("head_dim") or hidden // n_heads),
        intermediate_size=int(_require(cfg, "intermediate_size", where)),
        max_seq_len=int(_require(cfg, "max_position_embeddings", where)),
        rope_theta=float(cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )


def _model_type_from_class(cfg: dict[str, Any]) -> str | None:
    """Configs older than `model_type` (2019 GPT-2 uploads) name only the class."""
    classes = cfg.get("architectures") or []
    known = {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama"}
    return next((known[c] for c in classes if c in known), None)


def _open_hf_folder(folder: Path) -> Checkpoint:
    from safetensors import SafetensorError

    # Config first: it names everything else.
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelFormatError(f"{folder}: no config.json; is this a model folder?")
    try:
        raw_cfg = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFormatError(f"{config_path}: not valid JSON ({exc})") from exc
    config = hf_config_to_model_config(raw_cfg, config_path)

    # Weights: a zero-argument reader per canonical name, plus whether the stored
    # layout is (in, out) and must be transposed (GPT-2's Conv1D).
    canonical = _canonical_namer(config)
    where: dict[str, tuple[Callable[[], np.ndarray], bool, str]] = {}
    for key, read in _hf_tensors(folder):
        found = canonical(key)
        if found is not None:
            where[found[0]] = (read, found[1], key)

    def load(name: str) -> np.ndarray:
        if name not in where:
            raise ModelFormatError(
                f"{folder}: the weights have no tensor for {name!r} (a "
                f"{config.architecture} model needs it); the checkpoint is incomplete "
                "or of another model type"
            )
        read, transpose, key = where[name]
        try:
            array = np.asarray(read(), dtype=np.float32)
        except (SafetensorError, ValueError) as exc:
            raise ModelFormatError(f"tensor {key}: unreadable ({exc})") from exc
        return np.ascontiguousarray(array.T) if transpose else array

    if "lm_head" not in where and not config.tie_word_embeddings:
        config = _replace(config, tie_word_embeddings=True)
    return Checkpoint(
        config=config,
        names=sorted(where),
        load=load,
        write_tokenizer=lambda out: _write_tokenizer(folder, out),
        source={"kind": "hf-folder", "path": str(folder.resolve())},
    )


def _hf_tensors(folder: Path) -> list[tuple[str, Callable[[], np.ndarray]]]:
    """(key, reader) of every tensor: safetensors shards, else pytorch_model*.bin."""
    from safetensors import SafetensorError, safe_open

    shards = sorted(folder.glob("*.safetensors"))
    found: list[tuple[str, Callable[[], np.ndarray]]] = []
    for shard in shards:
        try:
            handle = safe_open(str(shard), framework="numpy")
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelFormatError(f"{shard}: unreadable safetensors ({exc})") from exc
        for key in handle.keys():
            found.append((key, partial(handle.get_tensor, key)))
    if shards:
        return found

    # No safetensors: PyTorch pickles, read without torch and without running them.
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if not bins:
        raise ModelFormatError(
            f"{folder}: no weights found; expected *.safetensors or pytorch_model.bin"
        )
    from edgeslm.export.torch_pickle import read_torch_checkpoint

    for path in bins:
        log.info("reading %s with the restricted unpickler", path.name)
        for key, ref in read_torch_checkpoint(path).items():
            found.append((key, ref.load))
    return found


def _canonical_namer(
    config: ModelConfig,
) -> Callable[[str], tuple[str, bool] | None]:
    """The architecture's map: HF key -> (canonical name, transpose?) or None."""
    if config.architecture == "gpt2":
        from edgeslm.export.gpt2 import gpt2_canonical_name

        return lambda key: gpt2_canonical_name(key, config)

    def llama(key: str) -> tuple[str, bool] | None:
        name = _hf_to_canonical(key)
        return None if name is None else (name, False)

    return llama


def _replace(config: ModelConfig, **changes: Any) -> ModelConfig:
    import dataclasses

    return dataclasses.replace(config, **changes)


def _hf_to_canonical(key: str) -> str | None:
    if key in _HF_GLOBAL_NAMES:
        return _HF_GLOBAL_NAMES[key]
    parts = key.split(".", 3)
    if len(parts) == 4 and parts[0] == "model" and parts[1] == "layers":
        suffix = _HF_LAYER_NAMES.get(parts[3])
        if suffix is not None:
            return f"layers.{int(parts[2])}.{suffix}"
    return None


def _write_tokenizer(source, out: Path):
    from edgeslm.export.tokenizer_build import tokenizer_from_hf_folder

    return tokenizer_from_hf_folder(source, out)
