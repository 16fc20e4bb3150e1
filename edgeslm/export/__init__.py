"""Export: checkpoints (Hugging Face folders, GGUF files) into edgeslm packages.

`export_model` opens a source with a reader (`checkpoint.py`, `gguf_reader.py`,
`torch_pickle.py`), builds the graph with the builder of its architecture family
(`llama.py`, `gpt2.py`), quantizes the weights (`quantize.py`), writes the tokenizer
and the manifest, and hashes every file.
This package needs the `export` extra (onnx, gguf, safetensors); the runtime does not.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from edgeslm.config import ModelConfig
from edgeslm.manifest import EXPORT_VERSION, Manifest, TokenSpec, sha256_file

log = logging.getLogger(__name__)

DTYPES = ("int8", "int4", "fp32")
GRAPH_KINDS = {"llama": "llama-gqa-v1", "gpt2": "gpt2-gqa-v1"}
MODEL_FILE = "model.onnx"
PORTABLE_FILE = "model.portable.onnx"
WEIGHTS_FILE = "model.onnx.data"
TOKENIZER_FILE = "tokenizer.json"
# int8 block length of decoder exports; docs/MODELS.md has the fidelity measurements.
DEFAULT_BLOCK_SIZE = 32
BLOCK_SIZES = (32, 64, 128)  # MatMulQ8's blocks that the portable graph also runs


def export_model(
    src: str | Path,
    out_dir: str | Path,
    *,
    dtype: str = "int8",
    overwrite: bool = False,
    block_size: int = DEFAULT_BLOCK_SIZE,
    smooth: float | None = None,
) -> Path:
    """Export a checkpoint to a model package.

    Args:
        src: a Hugging Face model folder or a `.gguf` file.
        out_dir: the package folder to create.
        dtype: "int8" (block-wise int8 weights, the default), "int4" (4-bit
            blocks of 32 for the linear layers; a GGUF's Q4_0/Q4_1 blocks are
            carried over unchanged) or "fp32".
        overwrite: replace an existing package at `out_dir`.
        block_size: int8 block length (16, 32, 64 or 128); smaller is more
            faithful and larger is smaller on disk and faster.
        smooth: activation smoothing strength for int8 Llama-family exports
            (`smoothing.py`), in [0, 1]; 0 turns it off; None (the default) uses
            `smoothing.DEFAULT_ALPHA`. Ignored for fp32 and int4, and for GPT-2.

    Returns:
        The package folder.

    Raises:
        ModelNotFoundError: `src` does not exist.
        ModelFormatError: `src` is malformed or of an unsupported architecture.
        FileExistsError: `out_dir` exists and `overwrite` is false.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True")

    from edgeslm.export.checkpoint import open_checkpoint

    started = time.perf_counter()
    ckpt = open_checkpoint(src)
    cfg = ckpt.config
    _check_block_size(cfg, dtype, block_size)
    log.info(
        "exporting %s (%s, %d layers, hidden %d, vocab %d) as %s",
        src,
        cfg.architecture,
        cfg.n_layers,
        cfg.hidden_size,
        cfg.vocab_size,
        dtype,
    )

    with staged_package(out) as tmp:
        _write_package(ckpt, tmp, dtype, block_size, smooth)
    log.info("package written to %s in %.1f s", out, time.perf_counter() - started)
    return out


@contextlib.contextmanager
def staged_package(out: Path) -> Iterator[Path]:
    """A temporary folder beside `out` to write a package into; moved in place of
    `out` when the block ends, removed if it raises, so a failed export never
    leaves a half-written package behind."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out.parent))
    try:
        yield tmp
        # mkdtemp made the folder private; a package is as readable as any file.
        tmp.chmod(0o755)
        for path in tmp.iterdir():
            path.chmod(0o644)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _check_block_size(cfg, dtype: str, block_size: int) -> None:
    """int8 blocks run along every linear layer's input, so their length must
    divide the model's hidden and intermediate sizes.

    Raises:
        ValueError: an unknown block length, or one this model's sizes don't allow.
    """
    if dtype != "int8":
        return
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {block_size}")
    sizes = {"hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size}
    for name, size in sizes.items():
        if size % block_size:
            fitting = [
                b for b in BLOCK_SIZES if all(s % b == 0 for s in sizes.values())
            ]
            raise ValueError(
                f"int8 block length {block_size} does not divide this model's {name} "
                f"({size}); use one of {fitting}"
            )


def _write_package(
    ckpt, folder: Path, dtype: str, block_size: int, smooth: float | None
) -> None:
    from edgeslm.export.gpt2 import build_gpt2
    from edgeslm.export.llama import build_llama

    builders = {"llama": build_llama, "gpt2": build_gpt2}

    def progress(done: int, total: int, what: str) -> None:
        log.info("  [%3d%%] %s", 100 * done // total, what)

    info = ckpt.write_tokenizer(folder)
    alpha = _smoothing_alpha(ckpt.config, dtype, smooth)
    if alpha:
        ckpt = _smoothed(ckpt, folder, info.chat_template, alpha)
    build = builders[ckpt.config.architecture]
    model = build(ckpt, dtype, progress, block_size=block_size)
    graphs = save_graphs(model, folder)

    # Special tokens: every id that should end a generation.
    eos = [info.eos_token_id] if info.eos_token_id is not None else []
    eos += [i for i in info.extra_eos_token_ids if i not in eos]
    manifest = Manifest(
        config=ckpt.config,
        tokens=TokenSpec(
            bos_token_id=info.bos_token_id,
            eos_token_ids=tuple(eos),
            add_bos_token=info.add_bos_token,
            pad_token_id=info.pad_token_id,
        ),
        quantization=_quantization_label(dtype, block_size, alpha),
        graph=GRAPH_KINDS[ckpt.config.architecture],
        **_chat_and_context(ckpt.config, info.chat_template),
        source=ckpt.source,
        files={
            name: sha256_file(folder / name)
            for name in (*graphs["files"], TOKENIZER_FILE)
        },
        custom_ops=graphs["custom_ops"],
        portable_model=graphs["portable_model"],
        export_version=EXPORT_VERSION,
    )
    manifest.write(folder)


def save_graphs(model, folder: Path) -> dict:
    """Write `model` as model.onnx + model.onnx.data, and beside it the portable
    graph when the model uses edgeslm's operators (sharing the same weights file).

    Returns:
        The manifest's view of what was written: `files` (names), `custom_ops`
        (domains model.onnx needs) and `portable_model` (name or None).
    """
    import onnx

    from edgeslm.export.onnx_graph import EDGESLM_DOMAIN, portable_model

    # Weights go to one external data file: onnxruntime maps it instead of parsing
    # it out of a protobuf, which loads faster and peaks lower. Saving turns the
    # model's initializers into references to that file, which the portable graph
    # then shares.
    log.info("  writing %s and %s", MODEL_FILE, WEIGHTS_FILE)
    onnx.save_model(
        model,
        str(folder / MODEL_FILE),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=WEIGHTS_FILE,
        size_threshold=1024,
    )
    domains = {o.domain for o in model.opset_import}
    if EDGESLM_DOMAIN not in domains:
        return {
            "files": [MODEL_FILE, WEIGHTS_FILE],
            "custom_ops": (),
            "portable_model": None,
        }
    portable = portable_model(model)
    if portable is None:
        return {
            "files": [MODEL_FILE, WEIGHTS_FILE],
            "custom_ops": (EDGESLM_DOMAIN,),
            "portable_model": None,
        }
    log.info("  writing %s (for onnxruntime without edgeslm's kernel)", PORTABLE_FILE)
    onnx.save_model(portable, str(folder / PORTABLE_FILE))
    return {
        "files": [MODEL_FILE, PORTABLE_FILE, WEIGHTS_FILE],
        "custom_ops": (EDGESLM_DOMAIN,),
        "portable_model": PORTABLE_FILE,
    }


def _quantization_label(dtype: str, block_size: int, alpha: float) -> str:
    """The manifest's `quantization`: dtype and block length of the linear layers."""
    if dtype == "int8":
        smoothed = f", smoothed alpha {alpha:g}" if alpha else ""
        return f"int8-block{block_size}{smoothed}"
    if dtype == "int4":
        return f"int4-block32 (embedding int8-block{block_size})"
    return "fp32"


def _smoothing_alpha(config: ModelConfig, dtype: str, smooth: float | None) -> float:
    """The smoothing strength this export uses (0: none)."""
    from edgeslm.export.smoothing import DEFAULT_ALPHA

    alpha = DEFAULT_ALPHA if smooth is None else float(smooth)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smooth must be in [0, 1], got {smooth}")
    if dtype != "int8" or config.architecture != "llama":
        # int4 keeps a source's own blocks, fp32 needs nothing, and smoothing
        # through GPT-2's biased LayerNorms is not written yet.
        return 0.0
    return alpha


def _smoothed(ckpt, folder: Path, chat_template: str | None, alpha: float):
    """The checkpoint with activation outliers moved into the weights."""
    from edgeslm.chat_template import ChatTemplate, ChatTemplateError
    from edgeslm.export.smoothing import (
        CALIBRATION_MESSAGES,
        activation_ranges,
        smooth_checkpoint,
    )
    from edgeslm.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_file(folder / TOKENIZER_FILE)
    try:
        text = ChatTemplate(chat_template).render(CALIBRATION_MESSAGES)
    except ChatTemplateError:  # e.g. a template that refuses system messages
        text = "\n".join(m["content"] for m in CALIBRATION_MESSAGES)
    ids = tokenizer.encode(text)
    log.info(
        "  smoothing activations (alpha %g, %d calibration tokens)", alpha, len(ids)
    )
    return smooth_checkpoint(ckpt, activation_ranges(ckpt, ids), alpha=alpha)


def _chat_and_context(
    config: ModelConfig, template: str | None
) -> dict[str, str | None]:
    """Manifest fields that follow from the architecture: chat format, context shift.

    Learned positions (GPT-2) cannot be re-rotated, so a full context is recomputed;
    a GPT-2 model without a template of its own chats in DialoGPT's turn format.
    """
    from edgeslm.chat_template import DIALOGPT_TEMPLATE

    learned = config.position_embedding == "learned"
    fields: dict[str, str | None] = {
        "chat_template": template,
        "chat_format": "template",
        "context_shift": "reprefill" if learned else "rotate",
    }
    if config.architecture == "gpt2" and (
        not template or _renders_like_dialogpt(template)
    ):
        fields.update(chat_template=DIALOGPT_TEMPLATE, chat_format="dialogpt")
    return fields


def _renders_like_dialogpt(template: str) -> bool:
    """Whether a source's own template is DialoGPT's turn format (some hub copies
    carry it as Jinja), so the package gets history trimming too."""
    from edgeslm.chat_template import DIALOGPT_TEMPLATE, ChatTemplate, ChatTemplateError

    sample = [
        {"role": "user", "content": "Hello."},
        {"role": "assistant", "content": "Hi!"},
        {"role": "user", "content": "How are you?"},
    ]
    eos = "<|endoftext|>"
    try:
        theirs = ChatTemplate(template, eos_token=eos).render(sample)
    except ChatTemplateError:
        return False
    return theirs == ChatTemplate(DIALOGPT_TEMPLATE, eos_token=eos).render(sample)
