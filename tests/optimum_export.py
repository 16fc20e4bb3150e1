"""Optimum-layout ONNX files made by Optimum's own exporter, for the tests.

Optimum's ONNX exporter lives in the PyPI package `optimum-onnx`, whose only release
(0.1.0) requires `transformers<4.58` and `optimum~=2.1`; this project tests against
transformers 5 (which renamed the `past_key_values` argument the exporter passes).
So the exporter runs in its own virtual environment (`exporter_python`), made once
from the pins in `EXPORTER_REQUIREMENTS` on top of this interpreter's packages
(torch, onnx and onnxruntime are shared), and is called as a subprocess.

Run as a script inside that environment, this file exports one checkpoint folder in
the two layouts users hold:

- `merged/`: `onnx/decoder_model_merged.onnx` (Optimum's decoder without past and
  decoder with past joined by `optimum.onnx.merge_decoders`, as the layout of
  transformers.js repositories), and `onnx/decoder_model_merged_quantized.onnx`
  (onnxruntime dynamic int8, with the settings of transformers.js's quantize
  script: per-channel int8 weights, reduced range, subgraphs included);
- `plain/`: `model.onnx` from `optimum.exporters.onnx.main_export` (what
  `optimum-cli export onnx --task text-generation-with-past` writes today).

Both folders get the checkpoint's `config.json` and tokenizer files, and each job
a `reference.json`: the greedy tokens that Optimum's own onnxruntime runtime
(`ORTModelForCausalLM.generate`, its KV-cache loop) produces from every decoder file
for the job's prompt. They are the independent reference for the quantized files,
whose tokens transformers (fp32) cannot be expected to reproduce exactly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

log = logging.getLogger(__name__)

EXPORTER_REQUIREMENTS = (
    "optimum==2.1.0",
    "optimum-onnx==0.1.0",
    "transformers==4.57.6",
)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
)


def exporter_python() -> Path:
    """The Python of the exporter's environment, created on first use (~1 minute).

    It lives in `$EDGESLM_OPTIMUM_VENV`, else in the user cache under a name that
    changes with the pins, so a change of pins makes a fresh one.
    """
    digest = hashlib.sha256(" ".join(EXPORTER_REQUIREMENTS).encode()).hexdigest()[:8]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    env = Path(
        os.environ.get("EDGESLM_OPTIMUM_VENV")
        or cache / "edgeslm-tests" / f"optimum-exporter-{digest}"
    )
    python = env / "bin" / "python"
    ready = env / ".ready"
    if ready.is_file():
        return python

    log.warning("creating the Optimum exporter environment in %s", env)
    shutil.rmtree(env, ignore_errors=True)
    venv.EnvBuilder(system_site_packages=True, with_pip=True).create(env)
    cmd = [str(python), "-m", "pip", "install", "--quiet", *EXPORTER_REQUIREMENTS]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(
            f"could not install the Optimum exporter ({' '.join(cmd)}):\n"
            f"{done.stderr[-3000:]}"
        )
    ready.write_text("\n".join(EXPORTER_REQUIREMENTS) + "\n")
    return python


def export_with_optimum(
    jobs: list[tuple[Path, Path, list[int]]], n_tokens: int = 24
) -> None:
    """Export each `(src, out, prompt_ids)` with Optimum into `out/merged` and
    `out/plain`, and write `out/reference.json` (Optimum runtime's greedy tokens,
    `n_tokens` after `prompt_ids`, end of text ignored).

    All jobs run in one subprocess, which pays the imports of torch, transformers
    and Optimum once.

    Raises:
        RuntimeError: the exporter failed (its output is in the message).
    """
    spec = [
        {"src": str(src), "out": str(out), "prompt_ids": ids, "n_tokens": n_tokens}
        for src, out, ids in jobs
    ]
    cmd = [str(exporter_python()), __file__, json.dumps(spec)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    if done.returncode != 0:
        raise RuntimeError(f"Optimum export failed:\n{done.stderr[-4000:]}")


# --- run inside the exporter environment ----------------------------------------------


def _copy_metadata(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", *TOKENIZER_FILES):
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def _export(src: Path, out: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from optimum.exporters.onnx import export, main_export
    from optimum.exporters.tasks import TasksManager
    from optimum.onnx.graph_transformations import merge_decoders
    from transformers import AutoModelForCausalLM

    task = "text-generation-with-past"
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    make_config = TasksManager.get_exporter_config_constructor(
        exporter="onnx", model=model, task=task, library_name="transformers"
    )

    # The merged layout: decoder without past, decoder with past, one If between.
    merged = out / "merged"
    _copy_metadata(src, merged)
    onnx_dir = merged / "onnx"
    onnx_dir.mkdir()
    parts = []
    for name, past_in in (("decoder_model", False), ("decoder_with_past_model", True)):
        config = make_config(model.config, use_past=True, use_past_in_inputs=past_in)
        export(model, config, onnx_dir / f"{name}.onnx")
        parts.append(onnx_dir / f"{name}.onnx")
    merge_decoders(*parts, save_path=onnx_dir / "decoder_model_merged.onnx")
    for part in parts:
        part.unlink()
    quantize_dynamic(
        onnx_dir / "decoder_model_merged.onnx",
        onnx_dir / "decoder_model_merged_quantized.onnx",
        per_channel=True,
        reduce_range=True,
        weight_type=QuantType.QInt8,
        extra_options={"EnableSubgraph": True},
    )

    # Today's layout: one model.onnx whose past may be empty.
    plain = out / "plain"
    main_export(str(src), plain, task=task, do_validation=False)
    _copy_metadata(src, plain)


def _reference(out: Path, prompt_ids: list[int], n_tokens: int) -> None:
    """Greedy tokens of Optimum's runtime for every decoder file under `out`."""
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    found = {}
    for onnx_file in sorted(out.rglob("*.onnx")):
        folder = onnx_file.parent
        if folder.name == "onnx":
            folder = folder.parent
        subfolder = "onnx" if onnx_file.parent.name == "onnx" else ""
        model = ORTModelForCausalLM.from_pretrained(
            folder, subfolder=subfolder, file_name=onnx_file.name, use_cache=True
        )
        ids = torch.tensor([prompt_ids])
        tokens = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=n_tokens,
            min_new_tokens=n_tokens,
            pad_token_id=0,
        )
        found[str(onnx_file.relative_to(out))] = tokens[0, len(prompt_ids) :].tolist()
    (out / "reference.json").write_text(json.dumps(found, indent=1) + "\n")


if __name__ == "__main__":
    for job in json.loads(sys.argv[1]):
        _export(Path(job["src"]), Path(job["out"]))
        _reference(Path(job["out"]), job["prompt_ids"], job["n_tokens"])
