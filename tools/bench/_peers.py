"""The llama.cpp peer: install it, prepare its weights, tokenize, and time it.

llama.cpp runs through llama-cpp-python built from source on this machine, so it
uses the same CPU features (AVX-512, VNNI) as onnxruntime does. Everything here
that imports `llama_cpp` is meant to run inside a worker subprocess
(`_worker.py`), never in the orchestrating process, so that the peer's memory
never mixes with edgeslm's.

`first_token_script` is the source of the `python -c` that the harness times
from process start to the first token.

Not done here: GPU offload, batched generation, llama.cpp's own sampler chain
(greedy argmax is done in numpy on the logits it returns, as edgeslm does).
"""

from __future__ import annotations

import ctypes
import logging
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _fidelity import run_fidelity

log = logging.getLogger("bench.peers")

# A native build enables every ISA extension the compiler knows for this CPU.
# On CPUs with AMX, llama.cpp's AMX matmul has crashed here, so AMX is turned
# off while AVX-512 and VNNI stay on. Caveat: ggml puts -march=native after
# these flags, which re-enables AMX on a CPU that has it (see README.md).
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
PEER_CMAKE_ARGS = (
    f"-DGGML_NATIVE=ON -DCMAKE_C_FLAGS='{NO_AMX}' -DCMAKE_CXX_FLAGS='{NO_AMX}'"
)
PEER_PIP_ARGS = [
    "install",
    "--no-binary",
    "llama-cpp-python",
    "llama-cpp-python",
]
INSTALL_COMMAND = f'CMAKE_ARGS="{PEER_CMAKE_ARGS}" pip {shlex.join(PEER_PIP_ARGS)}'

# llama_ftype value of LLAMA_FTYPE_MOSTLY_Q8_0 in llama.h.
FTYPE_Q8_0 = 7


def peer_available() -> bool:
    """True when `import llama_cpp` succeeds in a fresh interpreter.

    A subprocess is used because a broken build can fail inside the import
    (missing shared library) and because the orchestrator must stay light.
    """
    probe = [sys.executable, "-c", "import llama_cpp"]
    done = subprocess.run(probe, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        log.debug("import llama_cpp failed: %s", done.stderr.strip()[-500:])
    return done.returncode == 0


def install_peer() -> int:
    """Build llama-cpp-python from its sdist with the flags above; return pip's code.

    Takes 15-25 minutes on 2 cores. `-v` makes the compiler lines visible so
    that the AMX flags can be checked in the log.
    """
    env = dict(os.environ, CMAKE_ARGS=PEER_CMAKE_ARGS)
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", "2")
    cmd = [sys.executable, "-m", "pip", "-v", *PEER_PIP_ARGS]
    log.info("building the peer (this takes a while): %s", INSTALL_COMMAND)
    return subprocess.run(cmd, env=env, check=False).returncode


def quantize_q8_0(src: Path, dst: Path, n_threads: int) -> dict[str, Any]:
    """Requantize the GGUF at `src` to Q8_0 at `dst` with llama.cpp's quantizer.

    The source blocks (Q4_1 for SmolLM2 here) are dequantized and re-rounded to
    Q8_0, so the Q8_0 file carries exactly the source model's values, to within
    Q8_0's rounding, just as edgeslm's int8 export of the same file does.
    """
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPE_Q8_0
    params.allow_requantize = True
    params.nthread = n_threads

    tmp = dst.with_suffix(".part")
    status = llama_cpp.llama_model_quantize(
        str(src).encode(), str(tmp).encode(), ctypes.byref(params)
    )
    if status != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama_model_quantize({src}) returned {status}")
    tmp.replace(dst)
    return {"path": str(dst), "bytes": dst.stat().st_size}


def tokenize(gguf: Path, text: str) -> dict[str, Any]:
    """Token ids of `text` by the GGUF's own tokenizer, without BOS or specials."""
    import llama_cpp

    llm = llama_cpp.Llama(str(gguf), vocab_only=True, verbose=False)
    ids = llm.tokenize(text.encode(), add_bos=False, special=False)
    return {"ids": [int(i) for i in ids]}


def import_runtime() -> None:
    """Import what a measurement needs before any model is loaded."""
    import llama_cpp  # noqa: F401
    import numpy  # noqa: F401


def _greedy(logits_ptr: Any, n_vocab: int) -> int:
    """Argmax of the float logits row that llama.cpp exposes at `logits_ptr`."""
    import numpy as np

    row = np.ctypeslib.as_array(logits_ptr, shape=(n_vocab,))
    return int(row.argmax())


def _generate(llm: Any, prompt_ids: list[int], n_decode: int) -> dict[str, Any]:
    """Prefill `prompt_ids`, then `n_decode` single-token steps; greedy, no EOS stop.

    Returns the wall time of the prefill and of the decode steps separately,
    and the n_decode + 1 tokens produced (the first one comes from the prefill).
    """
    import llama_cpp

    n_vocab = llm.n_vocab()
    ctx = llm.ctx
    llm.reset()

    # Prefill: one batch of the whole prompt, logits for its last position.
    t0 = time.perf_counter()
    llm.eval(prompt_ids)
    tokens = [_greedy(llama_cpp.llama_get_logits_ith(ctx, -1), n_vocab)]
    prompt_s = time.perf_counter() - t0

    # Decode: each step feeds the previous token and takes the argmax.
    t0 = time.perf_counter()
    for _ in range(n_decode):
        llm.eval([tokens[-1]])
        tokens.append(_greedy(llama_cpp.llama_get_logits_ith(ctx, -1), n_vocab))
    decode_s = time.perf_counter() - t0

    return {"prompt_s": prompt_s, "decode_s": decode_s, "tokens": tokens}


def measure(spec: dict[str, Any], rss_mb: Callable[[], float]) -> dict[str, Any]:
    """One timed generation by llama.cpp, after one untimed warm-up generation.

    `spec` keys: model, threads, n_ctx, prompt_ids, warmup_ids, n_decode,
    n_warmup_decode. `rss_mb` is read once after the run, with the model still
    loaded. See `_worker.py` for the contract shared with edgeslm.
    """
    import llama_cpp

    threads = int(spec["threads"])
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(
        spec["model"],
        n_ctx=int(spec["n_ctx"]),
        n_batch=512,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    load_s = time.perf_counter() - t0

    # Warm-up on a different prompt, then drop its cache and perf counters.
    _generate(llm, spec["warmup_ids"], int(spec["n_warmup_decode"]))
    llama_cpp.llama_perf_context_reset(llm.ctx)

    run = _generate(llm, spec["prompt_ids"], int(spec["n_decode"]))
    perf = llama_cpp.llama_perf_context(llm.ctx)
    run.update(
        load_s=load_s,
        end_rss_mb=rss_mb(),
        internal={
            "t_p_eval_ms": perf.t_p_eval_ms,
            "n_p_eval": perf.n_p_eval,
            "t_eval_ms": perf.t_eval_ms,
            "n_eval": perf.n_eval,
        },
    )
    return run


def fidelity(spec: dict[str, Any]) -> dict[str, Any]:
    """Greedy tokens per prompt and top-1 along forced sequences (`_fidelity`)."""
    import llama_cpp

    threads = int(spec["threads"])
    llm = llama_cpp.Llama(
        spec["model"],
        n_ctx=int(spec["n_ctx"]),
        n_batch=512,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    n_vocab = llm.n_vocab()

    def greedy(ids: list[int], n: int) -> list[int]:
        return _generate(llm, ids, n - 1)["tokens"]

    def forced(seq: list[int]) -> list[int]:
        llm.reset()
        out = []
        for t in seq:
            llm.eval([t])
            out.append(_greedy(llama_cpp.llama_get_logits_ith(llm.ctx, -1), n_vocab))
        return out

    return run_fidelity(spec, greedy, forced)


def first_token_script(spec: dict[str, Any]) -> str:
    """A `python -c` program: import llama_cpp, load the GGUF, print token one."""
    n = int(spec["threads"])
    return (
        "import json, time\n"
        "import llama_cpp, numpy as np\n"
        "t0 = time.perf_counter()\n"
        f"llm = llama_cpp.Llama({spec['model']!r}, n_ctx={int(spec['n_ctx'])}, "
        f"n_batch=512, n_threads={n}, n_threads_batch={n}, verbose=False)\n"
        "load_s = time.perf_counter() - t0\n"
        f"llm.eval({list(spec['prompt_ids'])!r})\n"
        "row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), "
        "shape=(llm.n_vocab(),))\n"
        "print('FIRST ' + json.dumps({'token': int(row.argmax()), "
        "'load_s': load_s}), flush=True)\n"
    )


def environment() -> dict[str, Any]:
    """Version and build facts of the peer, for the JSON report."""
    import llama_cpp

    return {
        "llama_cpp_python": llama_cpp.__version__,
        "system_info": llama_cpp.llama_print_system_info().decode().strip(),
    }
