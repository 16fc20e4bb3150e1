"""The system under test: export an edgeslm package and time one generation.

Like the peers' modules, everything here imports edgeslm lazily and is meant to
run in a worker subprocess (`_worker.py`), so that each measurement has its own
process and its own peak RSS. `first_token_script` is the source of the
`python -c` that the harness times from process start to the first token.

Not done here: chat templates, sampling other than greedy, streaming.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _fidelity import run_fidelity


def export_package(src: Path, dst: Path, dtype: str) -> dict[str, Any]:
    """Export the checkpoint `src` to the package folder `dst` (replacing it)."""
    from edgeslm.export import export_model

    export_model(src, dst, dtype=dtype, overwrite=True)
    files = [p for p in dst.rglob("*") if p.is_file()]
    return {"path": str(dst), "bytes": sum(p.stat().st_size for p in files)}


def tokenize(package: Path, text: str) -> dict[str, Any]:
    """Token ids of `text` by the package's tokenizer, without special tokens."""
    from edgeslm.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_file(package / "tokenizer.json")
    return {"ids": tokenizer.encode(text, add_special_tokens=False)}


def import_runtime() -> None:
    """Import what a measurement needs before any model is loaded."""
    import onnxruntime  # noqa: F401

    import edgeslm.model  # noqa: F401


def _load(spec: dict[str, Any]) -> Any:
    import edgeslm

    return edgeslm.load(
        spec["model"], n_threads=int(spec["threads"]), n_ctx=int(spec["n_ctx"])
    )


def _generate(model: Any, prompt_ids: list[int], n_decode: int) -> dict[str, Any]:
    """Prefill `prompt_ids`, then `n_decode` decode steps; greedy, no EOS stop.

    `generate` is asked for n_decode + 1 tokens: the first comes from the prefill,
    each further one costs one decode step, as in `_peers._generate`.
    """
    t0 = time.perf_counter()
    gen = model.generate(
        prompt_ids, max_tokens=n_decode + 1, temperature=0.0, ignore_eos=True
    )
    wall_s = time.perf_counter() - t0

    # The whole prompt must have been computed (no prefix reuse from the warm-up)
    # and every requested token made, or the timings mean something else.
    stats = gen.stats
    tokens = [int(t) for t in gen.tokens]
    computed = stats.prompt_tokens - stats.reused_tokens
    if computed != len(prompt_ids) or len(tokens) != n_decode + 1:
        raise RuntimeError(
            f"edgeslm computed {computed} prompt tokens and made {len(tokens)} "
            f"tokens; expected {len(prompt_ids)} and {n_decode + 1}"
        )
    return {
        "prompt_s": float(stats.prompt_seconds),
        "decode_s": float(stats.decode_seconds),
        "wall_s": wall_s,
        "tokens": tokens,
    }


def measure(spec: dict[str, Any], rss_mb: Callable[[], float]) -> dict[str, Any]:
    """One timed generation by edgeslm, after one untimed warm-up generation.

    `spec` and `rss_mb` as in `_peers.measure`; `model` is the package folder.
    """
    t0 = time.perf_counter()
    model = _load(spec)
    load_s = time.perf_counter() - t0

    # Warm-up on a different prompt, then forget its cache (llama.cpp does too).
    _generate(model, spec["warmup_ids"], int(spec["n_warmup_decode"]))
    model.reset()
    run = _generate(model, spec["prompt_ids"], int(spec["n_decode"]))
    run.update(load_s=load_s, end_rss_mb=rss_mb())
    return run


def fidelity(spec: dict[str, Any]) -> dict[str, Any]:
    """Greedy tokens per prompt and top-1 along forced sequences (`_fidelity`).

    The forced pass feeds one token per `Model.forward` call, since the graph
    returns the logits of the last position only.
    """
    model = _load(spec)

    def greedy(ids: list[int], n: int) -> list[int]:
        model.reset()
        gen = model.generate(ids, max_tokens=n, temperature=0.0, ignore_eos=True)
        return [int(t) for t in gen.tokens]

    def forced(seq: list[int]) -> list[int]:
        model.reset()
        return [int(model.forward([t]).argmax()) for t in seq]

    return run_fidelity(spec, greedy, forced)


def first_token_script(spec: dict[str, Any]) -> str:
    """A `python -c` program: import edgeslm, load the package, print token one."""
    return (
        "import edgeslm\n"
        f"m = edgeslm.load({spec['model']!r}, n_threads={int(spec['threads'])}, "
        f"n_ctx={int(spec['n_ctx'])})\n"
        f"g = m.generate({list(spec['prompt_ids'])!r}, max_tokens=1, "
        "temperature=0.0, ignore_eos=True)\n"
        "import json\n"
        "print('FIRST ' + json.dumps({'token': int(g.tokens[0]), "
        "'load_s': m.load_seconds}), flush=True)\n"
    )


def environment() -> dict[str, Any]:
    """Versions of edgeslm and its inference engine, for the JSON report."""
    import onnxruntime

    import edgeslm

    return {
        "edgeslm": edgeslm.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
