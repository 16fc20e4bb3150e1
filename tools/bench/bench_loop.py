"""Where a decode step's time goes, and what cache reuse saves on a chat's second turn.

Two measurements on one edgeslm package (default: SmolLM2-135M-Instruct, int8, exported
into the per-user cache on first use):

1. Per-token Python overhead of the generate loop: the time of whole decode steps
   (`Model.generate`, greedy, EOS ignored) against the time spent inside
   onnxruntime's `run_with_iobinding` in the same steps. The rest (sampling, text
   decoding, stop strings, bookkeeping) is the loop's overhead, reported as a share
   of the step.
2. Second-turn latency of a chat: time to the first token of turn 2 when the cache
   still holds turn 1 (only the new tokens are computed) against the same model after
   `reset()` (the whole conversation recomputed). Runs alternate; medians.

It does not measure load time, memory or other systems (see bench_generate.py).
Absolute times on a shared machine are noise; compare the ratios.

    python tools/bench/bench_loop.py [--package DIR] [--threads 1] [--runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import edgeslm

TURN1 = [
    {"role": "system", "content": "You are a concise assistant for a smart home."},
    {"role": "user", "content": "Which lights are on in the living room right now?"},
]
ANSWER = "The floor lamp and the ceiling light are on; the reading lamp is off."
TURN2 = "Switch off the ceiling light and dim the floor lamp to 30 percent."


def loop_overhead(model, steps: int, runs: int) -> tuple[float, float]:
    """Median (step ms, share of the step outside onnxruntime)."""
    session = model._session
    inside = 0.0
    run = session.run_with_iobinding

    def timed(io, *args):
        nonlocal inside
        start = time.perf_counter()
        run(io, *args)
        inside += time.perf_counter() - start

    session.run_with_iobinding = timed
    step_ms, shares = [], []
    try:
        for _ in range(runs):
            model.reset()
            model.forward(model.tokenize("Tell me a story about a lighthouse."))
            inside = 0.0
            start = time.perf_counter()
            out = model.generate(
                model._tokens + [], max_tokens=steps, ignore_eos=True, temperature=0
            )
            total = time.perf_counter() - start
            # The prompt is entirely cached: one single-token run, then one per step.
            assert out.stats.reused_tokens == out.stats.prompt_tokens - 1
            step_ms.append(1000 * total / steps)
            shares.append(1 - inside / total)
    finally:
        session.run_with_iobinding = run
    return statistics.median(step_ms), statistics.median(shares)


def second_turn(model, runs: int) -> tuple[float, float, int, int]:
    """Median first-token latency of turn 2 (ms) with and without cache reuse."""
    turn2 = [*TURN1, {"role": "assistant", "content": ANSWER}]
    turn2.append({"role": "user", "content": TURN2})
    reuse, fresh = [], []
    for _ in range(runs):
        for keep in (True, False):
            model.reset()
            model.chat(TURN1, max_tokens=1)
            model.chat(turn2[:-1] + [{"role": "user", "content": "x"}], max_tokens=0)
            if not keep:
                model.reset()
            start = time.perf_counter()
            out = model.chat(turn2, max_tokens=1)
            elapsed = 1000 * (time.perf_counter() - start)
            (reuse if keep else fresh).append((elapsed, out.stats))
    r = statistics.median(ms for ms, _ in reuse)
    f = statistics.median(ms for ms, _ in fresh)
    return r, f, reuse[0][1].reused_tokens, fresh[0][1].prompt_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", help="package folder (default: the default model)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    model = edgeslm.load(args.package, n_threads=args.threads, n_ctx=1024)
    step_ms, share = loop_overhead(model, args.steps, args.runs)
    reuse_ms, fresh_ms, reused, total = second_turn(model, args.runs)
    quant = model.manifest.quantization
    print(f"package: {model.path} ({quant}), {args.threads} thread(s)")
    print("| measurement | value |")
    print("|---|---:|")
    print(f"| decode step, whole loop (ms) | {step_ms:.2f} |")
    print(f"| share of the step outside onnxruntime | {share:.1%} |")
    print(f"| chat turn 2, first token, cache reused (ms) | {reuse_ms:.1f} |")
    print(f"| chat turn 2, first token, recomputed (ms) | {fresh_ms:.1f} |")
    print(f"| speed-up from reuse | {fresh_ms / reuse_ms:.2f}× |")
    print(f"| turn 2 prompt tokens reused / total | {reused} / {total} |")


if __name__ == "__main__":
    main()
