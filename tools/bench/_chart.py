"""The PNG chart of `compare.py`: decode speed and prompt time per row.

Two horizontal bar panels (decode tok/s, prompt ms), one bar per thread count,
edgeslm's rows in their own colour. matplotlib is a tools-only dependency (the
`bench` extra); it is imported here only, with the non-interactive Agg backend.

Not here: error bars (the JSON has min and max), memory or fidelity panels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def write_chart(
    path: Path,
    rows: list[Any],
    summary: dict,
    threads: list[int],
    title: str,
) -> None:
    """Draw the medians of `summary` for `rows` into the PNG `path` (small, 100 dpi)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r.short for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 0.45 * len(rows) + 1.6), dpi=100)
    height = 0.8 / len(threads)
    shades = {"edgeslm": ("#1f6fb4", "#7fb2e0"), "peer": ("#7a7a7a", "#c4c4c4")}
    panels = (
        ("decode_tok_s", "decode, tok/s (higher is better)"),
        ("prompt_ms", "prompt, ms (lower is better)"),
    )
    for ax, (metric, xlabel) in zip(axes, panels, strict=True):
        for j, n in enumerate(threads):
            values, colours = [], []
            for row in rows:
                stat = summary.get(row.key, {}).get(n, {}).get(metric)
                values.append(stat["median"] if stat else 0.0)
                kind = "edgeslm" if row.system == "edgeslm" else "peer"
                colours.append(shades[kind][min(j, 1)])
            ys = [i + (j - (len(threads) - 1) / 2) * height for i in range(len(rows))]
            ax.barh(ys, values, height=height, color=colours, label=f"{n} thread(s)")
            for y, v in zip(ys, values, strict=True):
                if v:
                    ax.text(v, y, f" {v:.0f}", va="center", fontsize=7)
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels(labels if ax is axes[0] else [""] * len(rows), fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(xlabel, fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        ax.margins(x=0.15)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
