"""The Optimum peer: Optimum's ONNX export, onnxruntime dynamic int8, a Python loop.

The model is what a user gets from the usual recipe: Optimum's exporter on the
Hugging Face folder of the GGUF (the decoders without and with past merged into
one file), then `onnxruntime.quantization.quantize_dynamic` (per-channel int8
weights, int8 activations quantized at run time). `tests/optimum_export.py`
already does exactly this in its own venv (Optimum's exporter pins transformers
4), so `prepare` calls it; the file timed is
`merged/onnx/decoder_model_merged_quantized.onnx`.

The run is a plain greedy loop in Python over `InferenceSession.run`, in the
project's onnxruntime: the prompt with an empty past (`use_cache_branch`
false), then one token per step, the `present.*` outputs fed back as the next
`past_key_values.*`. It copies the cache in and out every step, as such a loop
does; it does not use IO binding.

Not done here: Optimum's own `ORTModelForCausalLM.generate` (it needs the
exporter venv's transformers 4 and adds its generation machinery per token),
static quantization, graph optimizations beyond the session's defaults.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _fidelity import run_fidelity

REPO = Path(__file__).resolve().parents[2]
QUANTIZED = Path("merged") / "onnx" / "decoder_model_merged_quantized.onnx"


def prepare(hf: Path, out: Path, prompt_ids: list[int]) -> Path:
    """Export `hf` with Optimum into `out` (made once); return the int8 decoder.

    Runs in the orchestrator: `tests/optimum_export.py` itself starts the
    exporter's venv (created on first use, about a minute) as a subprocess.
    """
    model = out / QUANTIZED
    if model.is_file():
        return model
    sys.path.insert(0, str(REPO / "tests"))
    try:
        import optimum_export
    finally:
        sys.path.pop(0)
    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    optimum_export.export_with_optimum([(hf, tmp, prompt_ids)], n_tokens=8)
    # Only the quantized merged decoder is run; the fp32 files take 1.2 GB.
    shutil.rmtree(tmp / "plain", ignore_errors=True)
    (tmp / "merged" / "onnx" / "decoder_model_merged.onnx").unlink(missing_ok=True)
    tmp.rename(out)
    return model


class _Loop:
    """An onnxruntime session on the merged decoder and its greedy loop."""

    def __init__(self, path: str, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(
            path, options, providers=["CPUExecutionProvider"]
        )
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [n for n in inputs if n.startswith("past_key_values.")]
        shape = inputs[self.past_names[0]].shape  # (batch, kv heads, past, head dim)
        self.kv_heads, self.head_dim = int(shape[1]), int(shape[3])
        self.position_ids = "position_ids" in inputs
        self.use_cache_branch = "use_cache_branch" in inputs
        self.output_names = [o.name for o in self.session.get_outputs()]

    def empty_past(self) -> dict[str, Any]:
        import numpy as np

        shape = (1, self.kv_heads, 0, self.head_dim)
        return {n: np.zeros(shape, dtype=np.float32) for n in self.past_names}

    def step(self, ids: list[int], past: dict[str, Any]) -> tuple[Any, dict]:
        """Run `ids` after `past`; return all positions' logits and the new past."""
        import numpy as np

        n_past = next(iter(past.values())).shape[2]
        feeds = dict(past)
        feeds["input_ids"] = np.asarray([ids], dtype=np.int64)
        feeds["attention_mask"] = np.ones((1, n_past + len(ids)), dtype=np.int64)
        if self.position_ids:
            positions = np.arange(n_past, n_past + len(ids), dtype=np.int64)
            feeds["position_ids"] = positions[None, :]
        if self.use_cache_branch:
            feeds["use_cache_branch"] = np.array([n_past > 0])
        outputs = dict(
            zip(self.output_names, self.session.run(None, feeds), strict=True)
        )
        new_past = {
            n: outputs[n.replace("past_key_values", "present")] for n in self.past_names
        }
        return outputs["logits"][0], new_past

    def generate(self, prompt_ids: list[int], n_decode: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        logits, past = self.step(prompt_ids, self.empty_past())
        tokens = [int(logits[-1].argmax())]
        prompt_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(n_decode):
            logits, past = self.step([tokens[-1]], past)
            tokens.append(int(logits[-1].argmax()))
        decode_s = time.perf_counter() - t0
        return {"prompt_s": prompt_s, "decode_s": decode_s, "tokens": tokens}


def import_runtime() -> None:
    """Import what a measurement needs before any model is loaded."""
    import numpy  # noqa: F401
    import onnxruntime  # noqa: F401


def measure(spec: dict[str, Any], rss_mb: Callable[[], float]) -> dict[str, Any]:
    """One timed generation, after one untimed warm-up (`_peers.measure`'s contract)."""
    t0 = time.perf_counter()
    loop = _Loop(spec["model"], int(spec["threads"]))
    load_s = time.perf_counter() - t0
    loop.generate(spec["warmup_ids"], int(spec["n_warmup_decode"]))
    run = loop.generate(spec["prompt_ids"], int(spec["n_decode"]))
    run.update(load_s=load_s, end_rss_mb=rss_mb())
    return run


def fidelity(spec: dict[str, Any]) -> dict[str, Any]:
    """Greedy tokens per prompt; forced top-1 from one full-sequence run."""
    loop = _Loop(spec["model"], int(spec["threads"]))

    def greedy(ids: list[int], n: int) -> list[int]:
        return loop.generate(ids, n - 1)["tokens"]

    def forced(seq: list[int]) -> list[int]:
        logits, _ = loop.step(seq, loop.empty_past())
        return [int(i) for i in logits.argmax(-1)]

    return run_fidelity(spec, greedy, forced)


def first_token_script(spec: dict[str, Any]) -> str:
    """A `python -c` program: the same loop's prefill, from a cold interpreter."""
    here = str(Path(__file__).resolve().parent)
    return (
        "import json, sys, time\n"
        f"sys.path.insert(0, {here!r})\n"
        "import numpy, onnxruntime\n"
        "from _peer_optimum import _Loop\n"
        "t0 = time.perf_counter()\n"
        f"loop = _Loop({spec['model']!r}, {int(spec['threads'])})\n"
        "load_s = time.perf_counter() - t0\n"
        f"logits, _ = loop.step({list(spec['prompt_ids'])!r}, loop.empty_past())\n"
        "print('FIRST ' + json.dumps({'token': int(logits[-1].argmax()), "
        "'load_s': load_s}), flush=True)\n"
    )


def environment() -> dict[str, Any]:
    """The onnxruntime version the loop runs on."""
    import onnxruntime

    return {"onnxruntime": onnxruntime.__version__}
