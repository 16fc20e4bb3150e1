"""The transformers (PyTorch, fp32) peer, and the Hugging Face folder of the GGUF.

`prepare` turns the GGUF into a Hugging Face folder (fp32 safetensors, config,
tokenizer) with transformers' own GGUF reader (`gguf_file=`): the folder that
onnxruntime-genai's model builder and Optimum's exporter start from, so that
every peer gets the values of the same GGUF. The timed peer runs that folder in
fp32 with a plain greedy loop over `model(...)` and its KV cache.

Everything imports torch lazily and runs in a worker subprocess (`_worker.py`).

Not done here: `model.generate` (its logits processors and stopping criteria
cost time per token that a greedy loop does not need), bf16, torch.compile.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _fidelity import run_fidelity


def prepare(spec: dict[str, Any]) -> dict[str, Any]:
    """Write the Hugging Face folder of the GGUF `spec["src"]` to `spec["dst"]`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, dst = Path(spec["src"]), Path(spec["dst"])
    tmp = dst.with_name(dst.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(
        src.parent, gguf_file=src.name, dtype=torch.float32
    )
    # The weights are plain fp32 tensors by now; transformers still marks the
    # model as "quantized with gguf" and refuses to save it unless told otherwise.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    tokenizer.save_pretrained(tmp)
    # transformers 5 writes RoPE's theta under "rope_parameters" only; readers
    # on transformers 4 (Optimum's exporter venv) would silently use 10000.
    config = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
    theta = (config.get("rope_parameters") or {}).get("rope_theta")
    if theta is not None:
        config.setdefault("rope_theta", theta)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return {"path": str(dst)}


def import_runtime() -> None:
    """Import what a measurement needs before any model is loaded."""
    import torch  # noqa: F401
    import transformers  # noqa: F401


def _load(spec: dict[str, Any]) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(int(spec["threads"]))
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    return model.eval()


def _generate(model: Any, prompt_ids: list[int], n_decode: int) -> dict[str, Any]:
    """Prefill, then `n_decode` single-token steps through the KV cache; greedy."""
    import torch

    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(torch.tensor([prompt_ids]), use_cache=True)
        tokens = [int(out.logits[0, -1].argmax())]
        prompt_s = time.perf_counter() - t0

        past = out.past_key_values
        t0 = time.perf_counter()
        for _ in range(n_decode):
            out = model(
                torch.tensor([[tokens[-1]]]), past_key_values=past, use_cache=True
            )
            past = out.past_key_values
            tokens.append(int(out.logits[0, -1].argmax()))
        decode_s = time.perf_counter() - t0
    return {"prompt_s": prompt_s, "decode_s": decode_s, "tokens": tokens}


def measure(spec: dict[str, Any], rss_mb: Callable[[], float]) -> dict[str, Any]:
    """One timed generation, after one untimed warm-up (`_peers.measure`'s contract)."""
    t0 = time.perf_counter()
    model = _load(spec)
    load_s = time.perf_counter() - t0
    _generate(model, spec["warmup_ids"], int(spec["n_warmup_decode"]))
    run = _generate(model, spec["prompt_ids"], int(spec["n_decode"]))
    run.update(load_s=load_s, end_rss_mb=rss_mb())
    return run


def fidelity(spec: dict[str, Any]) -> dict[str, Any]:
    """Greedy tokens per prompt; forced top-1 from one full-sequence forward."""
    import torch

    model = _load(spec)

    def greedy(ids: list[int], n: int) -> list[int]:
        return _generate(model, ids, n - 1)["tokens"]

    def forced(seq: list[int]) -> list[int]:
        with torch.inference_mode():
            logits = model(torch.tensor([seq])).logits[0]
        return [int(i) for i in logits.argmax(-1)]

    return run_fidelity(spec, greedy, forced)


def first_token_script(spec: dict[str, Any]) -> str:
    """A `python -c` program: import transformers, load, print the first token."""
    return (
        "import json, time\n"
        "import torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"torch.set_num_threads({int(spec['threads'])})\n"
        "t0 = time.perf_counter()\n"
        f"m = AutoModelForCausalLM.from_pretrained({spec['model']!r}, "
        "dtype=torch.float32).eval()\n"
        "load_s = time.perf_counter() - t0\n"
        "with torch.inference_mode():\n"
        f"    out = m(torch.tensor([{list(spec['prompt_ids'])!r}]))\n"
        "print('FIRST ' + json.dumps({'token': int(out.logits[0, -1].argmax()), "
        "'load_s': load_s}), flush=True)\n"
    )


def environment() -> dict[str, Any]:
    """Versions of torch and transformers, for the JSON report."""
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}
