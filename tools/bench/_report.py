"""The report of `bench_generate.py`: medians, ratios and the markdown table.

Pure functions over the list of run results that the workers returned; nothing
here runs a model or touches the machine.
"""

from __future__ import annotations

import statistics
from typing import Any

SYSTEMS = ("edgeslm", "llama.cpp")

METRICS = (
    ("prompt_ms", "prompt {p} tok (ms, lower is better)"),
    ("decode_tok_s", "decode {d} tok (tok/s, higher is better)"),
    ("peak_rss_mb", "peak RSS (MiB, lower is better)"),
    ("end_rss_mb", "RSS after the run (MiB)"),
    ("import_rss_mb", "RSS of the imports, no model (MiB)"),
    ("others_cores", "other processes' CPU during the runs (cores)"),
)
# Facts about the runs rather than about the systems: no ratio for these.
NO_RATIO = {"others_cores"}


def _spread(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
    }


def summarize(results: list[dict[str, Any]]) -> dict[str, dict[int, dict]]:
    """Median, min and max of each metric per system and thread count.

    Under the key "ratio" it also holds, per thread count and metric, the ratio
    edgeslm / llama.cpp of the medians and the spread of the paired ratios: run
    r of edgeslm against run r of llama.cpp, which ran right after it, so a
    change in machine load between runs cancels out of each pair.
    """
    summary: dict[str, dict[int, dict]] = {}
    pairs: dict[tuple[int, int], dict[str, dict]] = {}
    for r in results:
        summary.setdefault(r["system"], {}).setdefault(r["threads"], {})
        pairs.setdefault((r["threads"], r["run"]), {})[r["system"]] = r

    for system, by_threads in summary.items():
        for n in by_threads:
            rows = [r for r in results if r["system"] == system and r["threads"] == n]
            for key, _ in METRICS:
                by_threads[n][key] = _spread([r[key] for r in rows])

    if len(summary) == len(SYSTEMS):
        summary["ratio"] = {}
        for n in summary["edgeslm"]:
            both = [p for (t, _), p in pairs.items() if t == n and len(p) == 2]
            summary["ratio"][n] = {
                key: {
                    "of_medians": summary["edgeslm"][n][key]["median"]
                    / summary["llama.cpp"][n][key]["median"],
                    "paired": _spread(
                        [p["edgeslm"][key] / p["llama.cpp"][key] for p in both]
                    ),
                }
                for key, _ in METRICS
                if key not in NO_RATIO
            }
    return summary


def _cell(stat: dict[str, float] | None, digits: int = 1) -> str:
    if stat is None:
        return "–"
    lo, mid, hi = (f"{stat[k]:.{digits}f}" for k in ("min", "median", "max"))
    return f"{mid} ({lo}–{hi})"


def render_table(
    summary: dict,
    labels: dict[str, str],
    sizes_mb: dict[str, float],
    threads: list[int],
    n_prompt: int,
    n_decode: int,
) -> str:
    """A markdown table: median (min–max) per system, and edgeslm / llama.cpp.

    The ratio column is the ratio of the two medians; the paired column is the
    median (min–max) of the per-run ratios, whose spread shows the noise.
    """
    head = ["metric", "threads", labels["edgeslm"], labels["llama.cpp"]]
    lines = [
        "| " + " | ".join([*head, "edgeslm / llama.cpp", "paired ratio"]) + " |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, title in METRICS:
        name = title.format(p=n_prompt, d=n_decode)
        for n in threads:
            stats = [summary.get(s, {}).get(n, {}).get(key) for s in SYSTEMS]
            ratio = summary.get("ratio", {}).get(n, {}).get(key)
            cells = [name, str(n), _cell(stats[0]), _cell(stats[1])]
            if ratio:
                cells += [f"**{ratio['of_medians']:.2f}**", _cell(ratio["paired"], 2)]
            else:
                cells += ["–", "–"]
            lines.append("| " + " | ".join(cells) + " |")

    sizes = [sizes_mb.get(s) for s in SYSTEMS]
    row = ["model on disk (MiB, lower is better)", "–"]
    row += [f"{s:.1f}" if s is not None else "–" for s in sizes]
    row += [f"**{sizes[0] / sizes[1]:.2f}**" if None not in sizes else "–", "–"]
    lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def agreement(results: list[dict[str, Any]]) -> str:
    """How many leading greedy tokens the two systems share, per thread count.

    Q8_0 and edgeslm's int8 round the same weights differently, so the two may
    part ways after a while; a divergence at the very first tokens would mean the
    two are not running the same model or the same prompt.
    """
    notes = []
    for n in sorted({r["threads"] for r in results}):
        firsts = {r["system"]: r["tokens"] for r in results if r["threads"] == n}
        if len(firsts) < 2:
            continue
        a, b = (firsts[s] for s in SYSTEMS)
        pairs = enumerate(zip(a, b, strict=False))
        same = next((i for i, (x, y) in pairs if x != y), min(len(a), len(b)))
        notes.append(f"{n} thread(s): first {same} of {len(a)} greedy tokens agree")
    return "; ".join(notes)


def machine_line(env: dict[str, Any]) -> str:
    """One line on the machine, the versions and how busy the machine was."""
    load = [
        ", ".join(f"{x:.1f}" for x in env[k]) for k in ("loadavg_start", "loadavg_end")
    ]
    parts = [f"{env['cpu']}, {env['cpus']} CPUs, Python {env['python']}"]
    if "edgeslm" in env:
        parts.append(f"onnxruntime {env['edgeslm']['onnxruntime']}")
    if "llama.cpp" in env:
        parts.append(f"llama-cpp-python {env['llama.cpp']['llama_cpp_python']}")
    parts.append(f"load average {load[0]} at the start, {load[1]} at the end")
    return "Machine: " + "; ".join(parts) + "."
