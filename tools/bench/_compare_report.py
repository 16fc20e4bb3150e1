"""The report of `compare.py`: fidelity, medians, ratios, targets, as markdown.

Pure functions over what the workers returned: nothing here runs a model or
touches the machine. The layout follows issue 8's table (one line per system
and weights, "1 thread / 2 threads" in each cell), then the ratios of every
edgeslm row against every peer, paired run by run, then issue 8's targets.

Not here: the chart (`_chart.py`), statistics beyond median, min and max.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

# metric key -> (column title, digits, higher is better)
METRICS = {
    "prompt_ms": ("prompt {p} (ms)", 0, False),
    "decode_tok_s": ("decode (tok/s)", 1, True),
    "peak_rss_mb": ("peak RSS (MiB)", 0, False),
    "end_rss_mb": ("RSS after the run (MiB)", 0, False),
    "load_s": ("load (s)", 2, False),
    "first_token_s": ("start to first token (s)", 2, False),
    "others_cores": ("other processes (cores)", 1, False),
}
TABLE_METRICS = ("prompt_ms", "decode_tok_s", "peak_rss_mb", "load_s", "first_token_s")


def spread(values: Sequence[float]) -> dict[str, float] | None:
    """Median, min and max of `values`; None when there are none."""
    if not values:
        return None
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


# --- fidelity -------------------------------------------------------------------------


def leading_equal(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens two sequences share."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))


def fidelity_summary(row: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    """A row's greedy tokens and forced argmaxes against the fp32 reference's.

    Returns, per prompt, the identical leading greedy tokens (of n_decode + 1),
    their sum over the prompts, and the top-1 agreement: the share of positions
    (every prompt and continuation position, teacher-forced along the
    reference's sequence) where the row's argmax is the reference's.
    """
    equal = [
        leading_equal(a, b) for a, b in zip(row["tokens"], ref["tokens"], strict=True)
    ]
    out: dict[str, Any] = {
        "equal": equal,
        "of": len(ref["tokens"][0]),
        "equal_sum": sum(equal),
        "top1": None,
    }
    if row.get("argmax") and ref.get("argmax"):
        same = total = 0
        for a, b in zip(row["argmax"], ref["argmax"], strict=True):
            same += sum(x == y for x, y in zip(a, b, strict=True))
            total += len(b)
        out.update(top1=same / total, top1_positions=total)
    return out


# --- timings --------------------------------------------------------------------------


def summarize(results: list[dict[str, Any]]) -> dict[str, dict[int, dict[str, Any]]]:
    """Median, min and max of every metric per row and thread count."""
    summary: dict[str, dict[int, dict[str, Any]]] = {}
    for r in results:
        summary.setdefault(r["row"], {}).setdefault(r["threads"], {})
    for key, by_threads in summary.items():
        for n in by_threads:
            rows = [r for r in results if r["row"] == key and r["threads"] == n]
            for metric in METRICS:
                values = [r[metric] for r in rows if r.get(metric) is not None]
                by_threads[n][metric] = spread(values)
    return summary


def paired_ratio(
    results: list[dict[str, Any]], mine: str, peer: str, n: int, metric: str
) -> dict[str, float] | None:
    """Spread of the per-run ratios peer/mine or mine/peer, as "times better".

    Run r of `mine` is paired with run r of `peer` at the same thread count
    (both ran in the same round, minutes apart at most), so a change of machine
    load between rounds cancels out. Above 1 means `mine` is better.
    """
    higher_better = METRICS[metric][2]
    by_run: dict[int, dict[str, float]] = {}
    for r in results:
        if r["threads"] == n and r["row"] in (mine, peer) and r.get(metric):
            by_run.setdefault(r["run"], {})[r["row"]] = r[metric]
    ratios = [
        (p[mine] / p[peer]) if higher_better else (p[peer] / p[mine])
        for p in by_run.values()
        if len(p) == 2
    ]
    return spread(ratios)


# --- markdown -------------------------------------------------------------------------


def _num(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _by_threads(
    summary: dict, key: str, threads: list[int], metric: str, digits: int
) -> str:
    cells = []
    for n in threads:
        stat = summary.get(key, {}).get(n, {}).get(metric)
        cells.append(_num(stat["median"] if stat else None, digits))
    return " / ".join(cells)


def main_table(
    rows: list[Any],
    summary: dict,
    fidelity: dict[str, dict[str, Any]],
    threads: list[int],
    n_prompt: int,
) -> str:
    """Issue 8's table: one line per row, medians, "1 thread / 2 threads" cells."""
    n_prompts = max((len(f["equal"]) for f in fidelity.values()), default=0)
    of = next((f["of"] for f in fidelity.values()), 0)
    head = ["system", "weights", "threads"]
    head += [METRICS[m][0].format(p=n_prompt) for m in TABLE_METRICS]
    head += [
        "file (MB)",
        f"greedy = fp32, timed prompt (of {of})",
        f"greedy = fp32, {n_prompts} prompts (sum of {of * n_prompts})",
        "top-1 = fp32",
        "other processes (cores)",
    ]
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "---|" * 3 + "---:|" * (len(head) - 3),
    ]
    for row in rows:
        f = fidelity.get(row.key)
        cells = [row.label, row.weights, " / ".join(map(str, threads))]
        for metric in TABLE_METRICS:
            digits = METRICS[metric][1]
            cells.append(_by_threads(summary, row.key, threads, metric, digits))
        cells.append(f"{row.size_mb * 2**20 / 1e6:.0f}")
        if f:
            top1 = "–" if f["top1"] is None else f"{100 * f['top1']:.1f}%"
            cells += [str(f["equal"][0]), str(f["equal_sum"]), top1]
        else:
            cells += ["–", "–", "–"]
        cells.append(_by_threads(summary, row.key, threads, "others_cores", 1))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ratio_cell(stat: dict[str, float] | None) -> str:
    if stat is None:
        return "–"
    if stat["n"] == 1:
        return f"{stat['median']:.2f}"
    return f"{stat['median']:.2f} ({stat['min']:.2f}–{stat['max']:.2f})"


def ratio_table(
    results: list[dict[str, Any]],
    mine: list[Any],
    peers: list[Any],
    threads: list[int],
) -> str:
    """How many times better each edgeslm row is than each peer, paired by run.

    Decode: edgeslm tok/s over the peer's; prompt: the peer's ms over
    edgeslm's; RSS: the peer's peak over edgeslm's. Above 1 is edgeslm ahead.
    Cells are "median (min–max)" of the per-run ratios.
    """
    t = "/".join(map(str, threads))
    head = ["edgeslm", "peer", f"decode × ({t} thr)", f"prompt × ({t} thr)"]
    head += [f"peak RSS × ({threads[0]} thr)", "file ×"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---:|---:|---:|---:|"]
    for m in mine:
        for p in peers:
            cells = [m.weights, p.short]
            for metric in ("decode_tok_s", "prompt_ms"):
                parts = [
                    _ratio_cell(paired_ratio(results, m.key, p.key, n, metric))
                    for n in threads
                ]
                cells.append(" / ".join(parts))
            rss = paired_ratio(results, m.key, p.key, threads[0], "peak_rss_mb")
            cells.append(_ratio_cell(rss))
            cells.append(f"{p.size_mb / m.size_mb:.2f}" if m.size_mb else "–")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(
    results: list[dict[str, Any]],
    summary: dict,
    fidelity: dict[str, dict[str, Any]],
    mine: Any,
    by_key: dict[str, Any],
    threads: list[int],
    four_bit: bool,
) -> list[tuple[str, str, bool | None]]:
    """Issue 8's targets for one edgeslm row: (target, measured, met or None).

    None means the figure is missing (peer left out, fidelity skipped). An
    int8 row is held to the int8 targets; a 4-bit row (`four_bit`) to the
    4-bit option's.
    """
    out: list[tuple[str, str, bool | None]] = []

    def ratio_check(peer: str, metric: str, floor: float, what: str) -> None:
        if peer not in by_key:
            out.append((what, f"{peer} not measured", None))
            return
        for n in threads:
            stat = paired_ratio(results, mine.key, peer, n, metric)
            value = stat["median"] if stat else None
            out.append(
                (
                    f"{what}, {n} thr",
                    "–" if value is None else f"{value:.2f}×",
                    None if value is None else value >= floor,
                )
            )

    def fid(key: str) -> dict[str, Any] | None:
        return fidelity.get(key)

    if four_bit:
        ratio_check(
            "genai-int4", "decode_tok_s", 1.0, "decode ≥ 1× onnxruntime-genai int4"
        )
        mine_f, q4 = fid(mine.key), fid("llama.cpp-q4_1")
        if mine_f and q4:
            out.append(
                (
                    "greedy = fp32 ≥ llama.cpp Q4_1 (sum over prompts)",
                    f"{mine_f['equal_sum']} vs {q4['equal_sum']}",
                    mine_f["equal_sum"] >= q4["equal_sum"],
                )
            )
        return out

    ratio_check(
        "genai-int8", "decode_tok_s", 1.15, "decode ≥ 1.15× onnxruntime-genai int8"
    )
    ratio_check("llama.cpp-q8_0", "decode_tok_s", 1.5, "decode ≥ 1.5× llama.cpp Q8_0")
    ratio_check(
        "genai-int8", "prompt_ms", 1.25, "prompt ≥ 1.25× onnxruntime-genai int8"
    )

    q8 = by_key.get("llama.cpp-q8_0")
    n0 = threads[0]
    mine_rss = summary.get(mine.key, {}).get(n0, {}).get("peak_rss_mb")
    if q8 is not None and mine_rss:
        peer_rss = summary.get(q8.key, {}).get(n0, {}).get("peak_rss_mb")
        if peer_rss:
            out.append(
                (
                    f"peak RSS ≤ llama.cpp Q8_0 ({n0} thr)",
                    f"{mine_rss['median']:.0f} vs {peer_rss['median']:.0f} MiB",
                    mine_rss["median"] <= peer_rss["median"],
                )
            )
    size = mine.size_mb * 2**20 / 1e6
    out.append(("package file ≤ 150 MB", f"{size:.0f} MB", size <= 150))

    mine_f, q8f = fid(mine.key), fid("llama.cpp-q8_0")
    if mine_f and q8f:
        out.append(
            (
                "greedy = fp32 ≥ llama.cpp Q8_0 (sum over prompts)",
                f"{mine_f['equal_sum']} vs {q8f['equal_sum']}",
                mine_f["equal_sum"] >= q8f["equal_sum"],
            )
        )
    if mine_f and mine_f["top1"] is not None:
        out.append(
            (
                "top-1 agreement ≥ 98%",
                f"{100 * mine_f['top1']:.1f}%",
                mine_f["top1"] >= 0.98,
            )
        )
    for metric, limit, what in (
        ("first_token_s", 1.0, "process start to first token < 1 s"),
        ("load_s", 0.3, "model load < 0.3 s"),
    ):
        for n in threads:
            stat = summary.get(mine.key, {}).get(n, {}).get(metric)
            if stat:
                out.append(
                    (
                        f"{what}, {n} thr",
                        f"{stat['median']:.2f} s",
                        stat["median"] < limit,
                    )
                )
    return out


def targets_table(checks: list[tuple[str, str, bool | None]]) -> str:
    mark = {True: "met", False: "**not met**", None: "–"}
    lines = ["| target | measured | |", "|---|---:|---|"]
    lines += [f"| {what} | {value} | {mark[ok]} |" for what, value, ok in checks]
    return "\n".join(lines)
