"""Worker process of the benchmark: one task for one system, then exit.

Usage (by `bench_generate.py`, not by hand): `python _worker.py '<json spec>'`.
The spec names a `task` (measure, quantize, tokenize, export, environment) and a
`system` (edgeslm or llama.cpp). The worker imports only that system, runs the
task and prints one line `RESULT <json>` on stdout. For `measure` it adds the
process's peak RSS, read at the very end, so it covers loading, warm-up and the
timed run of that one system alone.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Any

import _peers
import _subject

RESULT_PREFIX = "RESULT "
SYSTEMS = {"edgeslm": _subject, "llama.cpp": _peers}


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


def _measure(system: Any, spec: dict[str, Any]) -> dict[str, Any]:
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
    system = SYSTEMS[spec["system"]]
    task = spec["task"]
    if task == "measure":
        return _measure(system, spec)
    if task == "environment":
        return system.environment()
    if task == "tokenize":
        return system.tokenize(Path(spec["model"]), spec["text"])
    if task == "quantize":
        return _peers.quantize_q8_0(
            Path(spec["src"]), Path(spec["dst"]), int(spec["threads"])
        )
    if task == "export":
        return _subject.export_package(
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
