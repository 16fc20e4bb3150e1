"""Existing ONNX exports in the Optimum / transformers.js layout, run without re-export.

Users already hold many decoders exported by Optimum (`optimum-cli export onnx`) or
converted for transformers.js, for example `Felladrin/onnx-Llama-68M-Chat-v1`. Such a
folder has `config.json`, the tokenizer files, and one of these decoders, in `onnx/`
or at the top level:

- `decoder_model_merged.onnx` / `decoder_model_merged_quantized.onnx`: the graphs
  without and with past joined by an `If` on the `use_cache_branch` input;
- `model.onnx` / `model_quantized.onnx`: one graph whose past may be empty.

Inputs are `input_ids`, `attention_mask`, optionally `position_ids` and
`use_cache_branch`, and `past_key_values.{l}.key|value (1, n_kv_heads, past,
head_dim)`; outputs are `logits (1, n_new, vocab_size)` and `present.{l}.key|value
(1, n_kv_heads, past + n_new, head_dim)`.

`OptimumModel` is a `Model` (same generate, chat, streaming, stop strings, sampler,
tokenizer and chat template) whose forward step drives such a graph. Only the cache
differs: the graph concatenates past and new keys itself and returns the whole
present, so this cache is a copying one (`CopyingCache`): the presents of one step
are handed, without a copy on our side, to the next as its past. A full context is
handled by recomputing the kept tokens (`context_shift = "reprefill"`), since keys
cannot be moved to new positions through a graph we did not write.

Not supported (each gives an error saying so): encoder-decoder models, decoders
exported without past (`--task text-generation`), split `decoder_model.onnx` +
`decoder_with_past_model.onnx` pairs without the merged file, fused `key_value`
caches, and batching.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeslm.chat_template import DIALOGPT_TEMPLATE, ChatTemplate
from edgeslm.config import ModelConfig
from edgeslm.errors import EdgeSLMError, ModelFormatError, ModelNotFoundError
from edgeslm.manifest import Manifest, TokenSpec
from edgeslm.model import Model, _check_n_ctx
from edgeslm.session import make_session
from edgeslm.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# Decoder file names by preference for each dtype; the other dtype's files follow as a
# fallback, so a folder holding only one variant still loads.
INT8_FILES = (
    "decoder_model_merged_quantized.onnx",
    "model_quantized.onnx",
    "decoder_model_merged_int8.onnx",
    "model_int8.onnx",
    "decoder_model_merged_uint8.onnx",
    "model_uint8.onnx",
)
FP32_FILES = ("decoder_model_merged.onnx", "model.onnx")
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.gguf")
PREFILL_CHUNK = 128  # tokens per prefill run: bounds the (1, n, vocab) logits
_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


# --- finding a decoder ----------------------------------------------------------------


def find_decoder(path: str | Path, dtype: str = "int8") -> Path | None:
    """The Optimum-layout decoder to run for `path`, or None if it is not one.

    Args:
        path: an `.onnx` file, or a folder holding `config.json` and a decoder in
            `onnx/` or at the top level.
        dtype: "int8" prefers the `*_quantized.onnx` files, "fp32" the plain ones;
            either falls back to the other when its own is missing.

    Returns:
        The `.onnx` file, or None: not an ONNX file, or a folder with weights
        (safetensors, `.bin`, GGUF: edgeslm exports those itself, which runs faster)
        or without any decoder.

    Raises:
        ModelFormatError: an ONNX-only folder in a layout edgeslm cannot run
            (encoder-decoder, or split decoders without the merged file).
    """
    path = Path(path).expanduser()
    if path.is_file():
        return path if path.suffix == ".onnx" else None
    if not path.is_dir() or any(any(path.glob(p)) for p in WEIGHT_PATTERNS):
        return None
    order = INT8_FILES + FP32_FILES if dtype == "int8" else FP32_FILES + INT8_FILES
    for folder in (path / "onnx", path):
        for name in order:
            if (folder / name).is_file():
                return folder / name
    _refuse_other_layouts(path)
    return None


def _refuse_other_layouts(path: Path) -> None:
    """Explain ONNX folders that hold a model, but not a decoder edgeslm runs."""
    names = {p.name for folder in (path / "onnx", path) for p in folder.glob("*.onnx")}
    if any(n.startswith("encoder_model") for n in names):
        raise ModelFormatError(
            f"{path}: an encoder-decoder ONNX export (encoder_model*.onnx); edgeslm "
            "runs decoder-only language models"
        )
    if any(n.startswith("decoder_with_past_model") for n in names):
        # TODO: run split decoders (two sessions); exporters write merged ones today.
        raise ModelFormatError(
            f"{path}: split decoders (decoder_model.onnx + decoder_with_past_model"
            ".onnx) are not supported; re-export so the folder holds "
            "decoder_model_merged.onnx (optimum-cli export onnx --task "
            "text-generation-with-past)"
        )
    if names:
        raise ModelFormatError(
            f"{path}: holds {sorted(names)} but no decoder edgeslm knows; expected "
            f"one of {FP32_FILES + INT8_FILES}, or pass the .onnx file itself"
        )


def model_folder(onnx_file: Path) -> Path:
    """The folder with `config.json` and the tokenizer for a decoder file."""
    for folder in (onnx_file.parent, onnx_file.parent.parent):
        if (folder / "config.json").is_file():
            return folder
    raise ModelNotFoundError(
        f"{onnx_file}: no config.json beside it or one folder up; an Optimum export "
        "keeps config.json and the tokenizer files next to the onnx/ folder"
    )


# --- the graph's interface ------------------------------------------------------------


@dataclass(frozen=True)
class DecoderIO:
    """What an Optimum decoder graph takes and returns.

    Attributes:
        n_layers: layers, from the `past_key_values.{l}.*` inputs.
        n_kv_heads: key/value heads per layer.
        head_dim: width of one head.
        vocab_size: logits per position.
        past_dtype: float type of the cache (float32, or float16 exports).
        logits_dtype: float type of the logits.
        position_ids: the graph takes `position_ids`.
        use_cache_branch: the graph is a merged one (`use_cache_branch` input).
    """

    n_layers: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    past_dtype: type
    logits_dtype: type
    position_ids: bool
    use_cache_branch: bool

    @property
    def past_names(self) -> list[str]:
        return [
            f"past_key_values.{layer}.{kind}"
            for layer in range(self.n_layers)
            for kind in ("key", "value")
        ]

    @property
    def present_names(self) -> list[str]:
        return [name.replace("past_key_values", "present") for name in self.past_names]


def inspect_decoder(session: Any, hf: dict[str, Any], where: Path) -> DecoderIO:
    """Check a session's inputs and outputs against the Optimum decoder layout.

    Args:
        session: an onnxruntime `InferenceSession`.
        hf: the folder's `config.json` (fallback for dimensions the graph leaves
            symbolic).
        where: the file, for messages.

    Raises:
        ModelFormatError: naming the missing or unexpected input or output.
    """
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    if "encoder_hidden_states" in inputs or hf.get("is_encoder_decoder"):
        raise ModelFormatError(
            f"{where}: an encoder-decoder decoder; edgeslm runs decoder-only models"
        )
    past = sorted(
        (int(m[1]), m[2]) for name in inputs if (m := _PAST.match(name)) is not None
    )
    if "input_ids" not in inputs or "logits" not in outputs:
        raise ModelFormatError(
            f"{where}: not a language-model decoder (inputs {sorted(inputs)}, "
            f"outputs {sorted(outputs)}); expected input_ids in, logits out"
        )
    if not past:
        fused = [n for n in inputs if n.startswith("past_key_values")]
        hint = f" (found {fused[:2]}: fused key_value caches)" if fused else ""
        raise ModelFormatError(
            f"{where}: no past_key_values.N.key/value inputs{hint}; it was exported "
            "without a KV cache: re-export with `optimum-cli export onnx --task "
            "text-generation-with-past`"
        )
    n_layers = past[-1][0] + 1
    if past != [(layer, k) for layer in range(n_layers) for k in ("key", "value")]:
        raise ModelFormatError(f"{where}: past_key_values inputs are incomplete")

    known = {"input_ids", "attention_mask", "position_ids", "use_cache_branch"}
    unknown = sorted(n for n in inputs if n not in known and not _PAST.match(n))
    if unknown or "attention_mask" not in inputs:
        raise ModelFormatError(
            f"{where}: inputs {unknown or ['(attention_mask missing)']} are not part "
            "of the Optimum decoder layout edgeslm runs (input_ids, attention_mask, "
            "position_ids, past_key_values.N.key/value, use_cache_branch)"
        )
    io = DecoderIO(
        n_layers=n_layers,
        n_kv_heads=_dim(inputs["past_key_values.0.key"].shape[1], hf, "kv_heads"),
        head_dim=_dim(inputs["past_key_values.0.key"].shape[3], hf, "head_dim"),
        vocab_size=_dim(outputs["logits"].shape[-1], hf, "vocab_size"),
        past_dtype=_float_type(inputs["past_key_values.0.key"].type, where),
        logits_dtype=_float_type(outputs["logits"].type, where),
        position_ids="position_ids" in inputs,
        use_cache_branch="use_cache_branch" in inputs,
    )
    missing = [n for n in io.present_names if n not in outputs]
    if missing:
        raise ModelFormatError(f"{where}: outputs {missing[:2]}... are missing")
    return io


def _dim(value: Any, hf: dict[str, Any], what: str) -> int:
    """A dimension from the graph when it is a number, else from config.json."""
    if isinstance(value, int) and value > 0:
        return value
    heads = hf.get("num_attention_heads") or hf.get("n_head")
    hidden = hf.get("hidden_size") or hf.get("n_embd")
    fallback = {
        "kv_heads": hf.get("num_key_value_heads") or heads,
        "head_dim": hf.get("head_dim") or (hidden // heads if hidden and heads else 0),
        "vocab_size": hf.get("vocab_size"),
    }[what]
    if not fallback:
        raise ModelFormatError(
            f"the graph leaves {what} symbolic and config.json does not give it"
        )
    return int(fallback)


def _float_type(onnx_type: str, where: Path) -> type:
    if onnx_type not in _FLOAT_TYPES:
        raise ModelFormatError(
            f"{where}: cache or logits of type {onnx_type}; supported: "
            f"{sorted(_FLOAT_TYPES)}"
        )
    return _FLOAT_TYPES[onnx_type]


# --- the cache ------------------------------------------------------------------------


class CopyingCache:
    """Past keys and values of an Optimum graph: the presents of its last run.

    Each layer's key and value is an onnxruntime `OrtValue` of shape `(1, n_kv_heads,
    stored, head_dim)`; the first `length` positions are valid. The graph writes a
    new, longer present every step (its `Concat` copies the past once), and the
    next step binds those values as its past without a copy on our side. A rewind
    only lowers `length`; the stored values are cut to it at the next step.
    """

    def __init__(self, io: DecoderIO) -> None:
        self.io = io
        self.length = 0
        self._values: list[Any] = []  # OrtValues, key and value per layer
        self._stored = 0  # positions the OrtValues hold

    def rewind(self, n: int) -> None:
        """Keep only the first `n` positions."""
        if not 0 <= n <= self.length:
            raise EdgeSLMError(f"rewind to {n} outside [0, {self.length}]")
        self.length = n

    def past(self) -> list[Any]:
        """One OrtValue per past input, holding exactly `length` positions."""
        import onnxruntime as ort

        if self.length == 0:
            shape = (1, self.io.n_kv_heads, 0, self.io.head_dim)
            empty = np.zeros(shape, dtype=self.io.past_dtype)
            return [ort.OrtValue.ortvalue_from_numpy(empty)] * len(self.io.past_names)
        if self._stored != self.length:
            # After a rewind: a one-off copy of the kept positions.
            self._values = [
                ort.OrtValue.ortvalue_from_numpy(
                    np.ascontiguousarray(v.numpy()[:, :, : self.length])
                )
                for v in self._values
            ]
            self._stored = self.length
        return self._values

    def store(self, presents: list[Any], length: int) -> None:
        """Keep a run's presents as the cache of `length` positions."""
        self._values = presents
        self._stored = self.length = length


# --- the model ------------------------------------------------------------------------


class OptimumModel(Model):
    """A decoder in the Optimum / transformers.js layout, with the `Model` API.

    Args:
        onnx_file: the decoder (see `find_decoder`); `config.json` and the tokenizer
            are read from its folder or the folder above `onnx/`.
        n_threads: onnxruntime intra-op threads (default: all cores).
        n_ctx: tokens the context holds (default: the model's, at most 4096).

    Raises:
        ModelNotFoundError: no config.json or tokenizer next to the file.
        ModelFormatError: a layout, architecture or input this backend cannot run.
    """

    def __init__(
        self,
        onnx_file: str | Path,
        *,
        n_threads: int | None = None,
        n_ctx: int | None = None,
    ) -> None:
        # Model.__init__ opens an edgeslm package; this sets the same attributes
        # from an Optimum folder instead, and the generate loop is shared.
        started = time.perf_counter()
        self.onnx_file = Path(onnx_file)
        if not self.onnx_file.is_file():
            raise ModelNotFoundError(f"no ONNX file at {self.onnx_file}")
        self.path = model_folder(self.onnx_file)
        hf = _read_json(self.path / "config.json")
        self._session = make_session(self.onnx_file, n_threads)
        self.io = inspect_decoder(self._session, hf, self.onnx_file)
        tokenizer_file, tokens, template = _read_tokenizer(self.path)
        self.manifest = _manifest(self.path, self.onnx_file, hf, self.io, tokens)
        self.manifest = _with_chat(self.manifest, template)
        self.config = self.manifest.config
        self.tokenizer = tokenizer_file
        self.chat_template = ChatTemplate(
            self.manifest.chat_template,
            bos_token=self._token_text(tokens.bos_token_id),
            eos_token=self._token_text(self._eos_ids[0] if self._eos_ids else None),
        )
        self.n_ctx = _check_n_ctx(n_ctx, self.config.max_seq_len)
        self.cache = CopyingCache(self.io)
        self._tokens: list[int] = []  # what the context holds, position by position
        self._n_keep = 0  # tokens a context shift keeps
        self._logits_one = np.zeros((1, 1, self.io.vocab_size), self.io.logits_dtype)
        self.load_seconds = time.perf_counter() - started
        log.debug(
            "loaded Optimum decoder %s in %.3f s", self.onnx_file, self.load_seconds
        )

    def forward(self, token_ids: Sequence[int]) -> np.ndarray:
        """Append tokens to the context and return the logits after the last one.

        Tokens the cache lost to a rewind are computed first, so the cache always
        catches up with the context. A long prompt runs in chunks of
        `PREFILL_CHUNK` tokens, which bounds the memory of its logits.

        Returns:
            `(vocab_size,)` float32 logits.
        """
        n_new = len(token_ids)
        if n_new == 0 or len(self._tokens) + n_new > self.n_ctx:
            raise EdgeSLMError(
                f"forward needs 1..{self.n_ctx - len(self._tokens)} tokens, got {n_new}"
            )
        pending = [*self._tokens[self.cache.length :], *(int(t) for t in token_ids)]
        for start in range(0, len(pending), PREFILL_CHUNK):
            logits = self._run(pending[start : start + PREFILL_CHUNK])
        self._tokens.extend(int(t) for t in token_ids)
        return logits

    def _run(self, ids: list[int]) -> np.ndarray:
        """One session run over `ids` after the cached positions."""
        past, n = self.cache.length, len(ids)
        io = self._session.io_binding()
        io.bind_cpu_input("input_ids", np.asarray([ids], dtype=np.int64))
        io.bind_cpu_input("attention_mask", np.ones((1, past + n), dtype=np.int64))
        if self.io.position_ids:
            positions = np.arange(past, past + n, dtype=np.int64)[None]
            io.bind_cpu_input("position_ids", positions)
        if self.io.use_cache_branch:
            io.bind_cpu_input("use_cache_branch", np.array([past > 0]))
        for name, value in zip(self.io.past_names, self.cache.past(), strict=True):
            io.bind_ortvalue_input(name, value)

        # Logits land in our buffer; presents are allocated by onnxruntime and kept.
        logits = self._logits_one
        if n > 1:
            logits = np.empty((1, n, self.io.vocab_size), self.io.logits_dtype)
        io.bind_output(
            "logits", "cpu", 0, logits.dtype, logits.shape, logits.ctypes.data
        )
        for name in self.io.present_names:
            io.bind_output(name, "cpu")
        self._session.run_with_iobinding(io)
        self.cache.store(io.get_outputs()[1:], past + n)
        return logits[0, -1].astype(np.float32, copy=False)

    def save_prompt_cache(self, path: str | Path) -> int:
        # TODO: save the copying cache too; the prompt-cache format is KVCache's.
        raise EdgeSLMError(
            "prompt caches are not supported for Optimum-layout ONNX files yet; "
            "export the model with `edgeslm export` to use --prompt-cache"
        )

    def load_prompt_cache(self, path: str | Path) -> int:
        return self.save_prompt_cache(path)


# --- reading the folder ---------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFormatError(f"{path}: unreadable ({exc}); re-download it") from exc
    if not isinstance(data, dict):
        raise ModelFormatError(f"{path}: expected a JSON object")
    return data


def _read_tokenizer(folder: Path) -> tuple[Tokenizer, TokenSpec, str | None]:
    """The folder's tokenizer, special tokens and chat template.

    The same reader as `edgeslm export` uses (it needs only `tokenizers`), writing
    its `tokenizer.json` to a temporary folder.
    """
    from edgeslm.export.tokenizer_build import tokenizer_from_hf_folder

    with tempfile.TemporaryDirectory(prefix="edgeslm-tok-") as tmp:
        info = tokenizer_from_hf_folder(folder, Path(tmp))
        tokenizer = Tokenizer.from_file(Path(tmp) / "tokenizer.json")
    eos = [info.eos_token_id] if info.eos_token_id is not None else []
    eos += [i for i in info.extra_eos_token_ids if i not in eos]
    tokens = TokenSpec(
        bos_token_id=info.bos_token_id,
        eos_token_ids=tuple(eos),
        add_bos_token=info.add_bos_token,
        pad_token_id=info.pad_token_id,
    )
    return tokenizer, tokens, info.chat_template


def _manifest(
    folder: Path, onnx_file: Path, hf: dict[str, Any], io: DecoderIO, tokens: TokenSpec
) -> Manifest:
    """An in-memory manifest describing the folder, as a package's would."""
    config = _model_config(hf, folder / "config.json")
    seen = (config.n_layers, config.n_kv_heads, config.head_dim)
    if seen != (io.n_layers, io.n_kv_heads, io.head_dim):
        raise ModelFormatError(
            f"{onnx_file}: the graph has (layers, kv heads, head_dim) "
            f"{(io.n_layers, io.n_kv_heads, io.head_dim)} but config.json says "
            f"{seen}; the files come from different models"
        )
    quantized = any(s in onnx_file.stem for s in ("quantized", "int8", "uint8"))
    return Manifest(
        config=config,
        tokens=tokens,
        quantization="int8-dynamic (Optimum)" if quantized else "as exported",
        graph="optimum-merged" if io.use_cache_branch else "optimum-past",
        # The graph owns the positions: a full context is computed again.
        context_shift="reprefill",
        source={"kind": "optimum-onnx", "path": str(onnx_file.resolve())},
    )


def _model_config(hf: dict[str, Any], where: Path) -> ModelConfig:
    """The runtime's `ModelConfig` from `config.json`.

    Llama-family configs go through the exporter's own translation (which needs
    only numpy); GPT-2's is read here, because the exporter's GPT-2 module imports
    `onnx`, which running a ready graph does not need.
    """
    if (hf.get("model_type") or "") != "gpt2":
        from edgeslm.export.checkpoint import hf_config_to_model_config

        return hf_config_to_model_config(hf, where)
    try:
        hidden, n_heads = int(hf["n_embd"]), int(hf["n_head"])
        return ModelConfig(
            architecture="gpt2",
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            n_layers=int(hf["n_layer"]),
            n_heads=n_heads,
            n_kv_heads=n_heads,
            head_dim=hidden // n_heads,
            intermediate_size=int(hf.get("n_inner") or 4 * hidden),
            max_seq_len=int(hf["n_positions"]),
            norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
            tie_word_embeddings=True,
            position_embedding="learned",
            hidden_act=str(hf.get("activation_function", "gelu_new")),
        )
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise ModelFormatError(f"{where}: malformed GPT-2 config ({exc!r})") from exc


def _with_chat(manifest: Manifest, template: str | None) -> Manifest:
    """Set the chat format: the folder's template; DialoGPT's for GPT-2 without one."""
    from dataclasses import replace

    if manifest.config.architecture == "gpt2" and not template:
        return replace(
            manifest, chat_template=DIALOGPT_TEMPLATE, chat_format="dialogpt"
        )
    return replace(manifest, chat_template=template)
