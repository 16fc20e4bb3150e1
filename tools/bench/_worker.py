"""Worker process of the benchmarks: one task for one system, then exit.

Usage (by the harness, `_harness.call_worker`, not by hand):
`python _worker.py '<json spec>'`. The spec names a `task` (measure, fidelity,
tokenize, quantize, export, prepare, environment) and a `system` (a key of
`SYSTEMS`). The worker imports only that system's module, runs the task and
prints one line `RESULT <json>` on stdout. For `measure` it adds the process's
peak RSS, read at the very end, so it covers loading, warm-up and the timed run
of that one system alone.

A system module may run under another interpreter (onnxruntime-genai's workers
use its own virtual environment), so this file and the system modules import
nothing outside the standard library at module level.
"""

from __future__ import annotations

import importlib
import json
import resource
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

RESULT_PREFIX = "RESULT "
# system name -> module in this folder that runs it
SYSTEMS = {
    "edgeslm": "_subject",
    "llama.cpp": "_peers",
    "genai": "_peer_genai",
    "optimum": "_peer_optimum",
    "transformers": "_peer_torch",
}


def system_module(name: str) -> ModuleType:
    """The module that runs system `name`, imported on demand."""
    if name not in SYSTEMS:
        raise ValueError(f"unknown system {name!r}; known: {sorted(SYSTEMS)}")
    return importlib.import_module(SYSTEMS[name])


def _peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux: KiB units)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mb() -> float:
    """Resident set size of this process now, in MiB (from /proc/self/status)."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS line in /proc/self/status")


def _measure(system: ModuleType, spec: dict[str, Any]) -> dict[str, Any]:
    """Time one generation and attach the memory figures.

    `import_rss_mb` (interpreter plus the system's libraries, no model yet) and
    `end_rss_mb` (after the run, model still loaded: the steady state) tell a
    load-time peak apart from the memory the system keeps.
    """
    system.import_runtime()
    import_mb = _peak_rss_mb()
    result = system.measure(spec, rss_mb=_current_rss_mb)
    result.update(peak_rss_mb=_peak_rss_mb(), import_rss_mb=import_mb)
    return result


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Dispatch `spec` to the system's module; return its JSON-able result."""
    system = system_module(spec["system"])
    task = spec["task"]
    if task == "measure":
        return _measure(system, spec)
    if task == "fidelity":
        return system.fidelity(spec)
    if task == "environment":
        return system.environment()
    if task == "tokenize":
        return system.tokenize(Path(spec["model"]), spec["text"])
    if task == "prepare":
        return system.prepare(spec)
    if task == "quantize":  # llama.cpp's requantization (bench_generate's name)
        return system.quantize_q8_0(
            Path(spec["src"]), Path(spec["dst"]), int(spec["threads"])
        )
    if task == "export":  # edgeslm's export through its Python API
        return system.export_package(
            Path(spec["src"]), Path(spec["dst"]), spec["dtype"]
        )
    raise ValueError(f"unknown task {task!r}")


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    result = run(json.loads(argv[1]))
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
