"""The onnxruntime-genai peer: its own venv, its model builder, and a timed run.

onnxruntime-genai is installed in a virtual environment of its own under the
bench work folder (`venv_python`), never in the project's environment, whose
onnxruntime the project runs on. The venv sees the project's packages (torch,
transformers, onnx) and adds onnxruntime-genai and `onnx_ir` (the builder needs
it); pip installs another onnxruntime into the venv only if genai's pin asks for
one (0.18 accepts the project's 1.32, so the two then share it).

The model is built from the Hugging Face folder of the GGUF (`_peer_torch.prepare`;
the builder cannot read a Q4_1 GGUF) with the builder's defaults for CPU int8 or
int4 (`build_command`). Threads go in through `og.Config(folder).overlay(...)`.

The functions below that import `onnxruntime_genai` run in a worker started with
the venv's Python; the orchestrator only uses `venv_python`, `install` and
`build_command`.

Not done here: the builder's non-default options (block size, accuracy level,
shared embeddings), its paged-attention engine, sampling. EOS is kept from
ending the run with `min_length`, which masks EOS where the other systems just
keep going; a prose prompt has not produced EOS here, and a changed token would
show in the fidelity columns.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import venv
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _fidelity import run_fidelity

VENV_REQUIREMENTS = ("onnxruntime-genai", "onnx_ir")


def venv_python(work: Path) -> Path:
    """Where the venv's interpreter is (it may not exist yet)."""
    return work / "venvs" / "genai" / "bin" / "python"


def installed(work: Path) -> bool:
    """True when the venv imports onnxruntime_genai and its builder's needs."""
    python = venv_python(work)
    if not python.is_file():
        return False
    probe = "import onnxruntime_genai, onnx_ir"
    done = subprocess.run([str(python), "-c", probe], capture_output=True, check=False)
    return done.returncode == 0


def install_command(work: Path) -> str:
    reqs = " ".join(f"'{r}'" for r in VENV_REQUIREMENTS)
    folder = venv_python(work).parent.parent
    return (
        f"python -m venv --system-site-packages {folder} && "
        f"{venv_python(work)} -m pip install {reqs}"
    )


def install(work: Path) -> None:
    """Create the venv (seeing the project's packages) and install the peer in it."""
    python = venv_python(work)
    if not python.is_file():
        venv.EnvBuilder(system_site_packages=True, with_pip=True).create(
            python.parent.parent
        )
    cmd = [str(python), "-m", "pip", "install", "--quiet", *VENV_REQUIREMENTS]
    subprocess.run(cmd, check=True, timeout=1800)


def build_command(python: Path, hf: Path, out: Path, dtype: str, cache: Path) -> list:
    """The model builder's command line for a CPU model of `dtype` (int8 or int4)."""
    return [
        str(python),
        "-m",
        "onnxruntime_genai.models.builder",
        "-i",
        str(hf),
        "-o",
        str(out),
        "-p",
        dtype,
        "-e",
        "cpu",
        "-c",
        str(cache),
    ]


def weight_files(folder: Path) -> list[Path]:
    """The files the runtime reads: the graph, its weights and genai_config.json."""
    names = ("*.onnx", "*.onnx.data", "*.data", "genai_config.json")
    return sorted({p for pattern in names for p in folder.glob(pattern)})


# --- inside the venv's worker ---------------------------------------------------------


def import_runtime() -> None:
    """Import what a measurement needs before any model is loaded."""
    import numpy  # noqa: F401
    import onnxruntime_genai  # noqa: F401


def _load(spec: dict[str, Any]) -> Any:
    import onnxruntime_genai as og

    threads = int(spec["threads"])
    config = og.Config(spec["model"])
    options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
    config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
    return og.Model(config)


def _generator(model: Any, n_tokens: int) -> Any:
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(
        do_sample=False, max_length=n_tokens, min_length=n_tokens, batch_size=1
    )
    return og.Generator(model, params)


def _generate(model: Any, prompt_ids: list[int], n_decode: int) -> dict[str, Any]:
    """Prefill, then `n_decode` steps; each `generate_next_token` after the first
    runs the model on the previous token and picks the next one greedily."""
    import numpy as np

    gen = _generator(model, len(prompt_ids) + n_decode + 1)
    t0 = time.perf_counter()
    gen.append_tokens(np.asarray(prompt_ids, dtype=np.int32))
    gen.generate_next_token()
    tokens = [int(gen.get_next_tokens()[0])]
    prompt_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    for _ in range(n_decode):
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
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
    """Greedy tokens per prompt, and top-1 along forced sequences token by token."""
    import numpy as np

    model = _load(spec)

    def greedy(ids: list[int], n: int) -> list[int]:
        return _generate(model, ids, n - 1)["tokens"]

    def forced(seq: list[int]) -> list[int]:
        gen = _generator(model, len(seq) + 1)
        out = []
        for t in seq:
            gen.append_tokens(np.asarray([t], dtype=np.int32))
            out.append(int(np.asarray(gen.get_logits()).reshape(-1).argmax()))
        return out

    return run_fidelity(spec, greedy, forced)


def first_token_script(spec: dict[str, Any]) -> str:
    """A `python -c` program: import onnxruntime_genai, load, print token one."""
    options = {"intra_op_num_threads": int(spec["threads"]), "inter_op_num_threads": 1}
    overlay = json.dumps({"model": {"decoder": {"session_options": options}}})
    n = len(spec["prompt_ids"]) + 1
    return (
        "import json, time\n"
        "import numpy as np, onnxruntime_genai as og\n"
        "t0 = time.perf_counter()\n"
        f"c = og.Config({spec['model']!r})\n"
        f"c.overlay({overlay!r})\n"
        "m = og.Model(c)\n"
        "load_s = time.perf_counter() - t0\n"
        "p = og.GeneratorParams(m)\n"
        f"p.set_search_options(do_sample=False, max_length={n}, min_length={n})\n"
        "g = og.Generator(m, p)\n"
        f"g.append_tokens(np.asarray({list(spec['prompt_ids'])!r}, dtype=np.int32))\n"
        "g.generate_next_token()\n"
        "print('FIRST ' + json.dumps({'token': int(g.get_next_tokens()[0]), "
        "'load_s': load_s}), flush=True)\n"
    )


def environment() -> dict[str, Any]:
    """Versions of onnxruntime-genai and the onnxruntime it runs on."""
    import onnxruntime_genai as og

    facts: dict[str, Any] = {
        "onnxruntime_genai": og.__version__,
        "python": sys.executable,
    }
    try:
        import onnxruntime

        facts["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        facts["onnxruntime"] = "bundled"
    facts["venv"] = os.environ.get("VIRTUAL_ENV") or str(Path(sys.prefix))
    return facts
