"""Benchmark the C sampler against the numpy reference over a 49,152-token vocabulary.

Both run through the public `Sampler.sample` API on the same LLM-like logits (a normal
bulk with std 2.5 plus 20 boosted tokens). Each figure is the best mean over several
batches, which is robust to other load on a shared machine. Prints microseconds per
token and the C speed-up, and optionally writes JSON.

Usage:
    python tools/bench/bench_sampler.py [--vocab 49152] [--batches 30] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import numpy as np

from edgeslm import _kernel
from edgeslm.sampling import Sampler, SamplerSettings

CASES: list[tuple[str, dict]] = [
    ("greedy", dict(temperature=0.0)),
    ("top_k=40 top_p=0.95 T=0.8", dict(temperature=0.8, top_k=40, top_p=0.95)),
    ("top_k=50 T=1.0", dict(temperature=1.0, top_k=50)),
    ("top_p=0.9 T=1.0", dict(temperature=1.0, top_p=0.9)),
    ("top_p=0.95 min_p=0.05 T=0.7", dict(temperature=0.7, top_p=0.95, min_p=0.05)),
    ("temperature only T=1.0", dict(temperature=1.0)),
    (
        "top_k=40 top_p=0.95 + penalties",
        dict(temperature=0.8, top_k=40, top_p=0.95, repetition_penalty=1.1),
    ),
]


def make_logits(rng: np.random.Generator, vocab: int, count: int) -> list[np.ndarray]:
    """LLM-like logits: a broad bulk and a few strongly preferred tokens."""
    out = []
    for _ in range(count):
        x = rng.standard_normal(vocab) * 2.5
        top = rng.choice(vocab, 20, replace=False)
        x[top] += rng.uniform(3.0, 15.0, 20)
        out.append(x.astype(np.float32))
    return out


def time_sampler(
    sampler: Sampler,
    logits: list[np.ndarray],
    recent: np.ndarray,
    batches: int,
    per_batch: int,
) -> float:
    """Returns the best mean seconds per call over `batches` batches."""
    best = float("inf")
    n = len(logits)
    for x in logits:  # warm-up
        sampler.sample(x, recent_tokens=recent)
    for b in range(batches):
        t0 = time.perf_counter()
        for i in range(per_batch):
            sampler.sample(logits[(b + i) % n], recent_tokens=recent)
        best = min(best, (time.perf_counter() - t0) / per_batch)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--per-batch", type=int, default=50, help="C calls per batch")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)

    _kernel.require()
    rng = np.random.default_rng(1234)
    logits = make_logits(rng, args.vocab, 8)
    recent = rng.integers(0, args.vocab, 64).astype(np.int32)
    rows = []
    print(
        f"edgeslm sampler, vocab {args.vocab}, SIMD {_kernel.simd_name()}, "
        f"{platform.machine()} / Python {platform.python_version()}"
    )
    print(f"{'setting':34s} {'C us/tok':>10s} {'numpy us/tok':>13s} {'ratio':>7s}")
    for name, cfg in CASES:
        settings = SamplerSettings(seed=7, **cfg)
        c = Sampler(settings, args.vocab, backend="c")
        n = Sampler(settings, args.vocab, backend="numpy")
        tc = time_sampler(c, logits, recent, args.batches, args.per_batch)
        tn = time_sampler(n, logits, recent, max(3, args.batches // 5), 4)
        rows.append(
            {"setting": name, "c_us": tc * 1e6, "numpy_us": tn * 1e6, "ratio": tn / tc}
        )
        print(f"{name:34s} {tc * 1e6:10.1f} {tn * 1e6:13.0f} {tn / tc:6.0f}x")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(
                {"vocab": args.vocab, "simd": _kernel.simd_name(), "rows": rows}, f
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
