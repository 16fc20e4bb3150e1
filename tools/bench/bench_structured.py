"""What a constraint costs: per-token overhead of constrained decoding, compile time.

One edgeslm package (default: SmolLM2-135M-Instruct, int8), the prompts and JSON
schemas of the structured-output test suite (`tests/data/structured/schemas.json`,
the first prompt of each schema, rendered as `Model.extract` renders them):

1. Decoding, side by side on the same prompts. For each prompt the constrained
   generation runs (greedy, `json_schema`), then an unconstrained greedy
   generation of the same number of tokens (EOS ignored) on the same prompt;
   the order flips every other prompt, and every generation starts from an
   empty cache (`reset()`). Constrained runs twice, with fast-forward of forced
   tokens (the default) and without it (one model run per token, the pure
   per-step cost). Reported per token and per model run: the whole step, and the
   part outside the model run (`Model.forward`), which is where the constraint
   works (mask, sampler mask, consuming the token). The overhead is the extra
   time per step against the unconstrained peer, as a share of its step.
2. Compile time, per schema, with a fresh grammar engine cache: building the
   `Constraint` (llguidance grammar + validation), the matcher for the model's
   tokenizer, and the first mask (llguidance builds lexer states lazily). Also the
   one-off grammar-engine tokenizer build. Given in milliseconds and in decode steps
   measured in the same run.
3. The sampler alone (`Sampler.sample`, the C kernel when built) on the same
   logits with and without the suite's real masks: what applying a mask costs.

Absolute times on a shared machine are noise; compare the ratios. The load
average at the start and the end is printed with the tables.

    python tools/bench/bench_structured.py [--package DIR] [--threads 1] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

import edgeslm
from edgeslm import constraints
from edgeslm.constraints import Constraint, GrammarEngine, Guide, engine_for
from edgeslm.sampling import Sampler, SamplerSettings
from edgeslm.structured import DEFAULT_EXTRACT_PROMPT

SUITE = Path(__file__).parents[2] / "tests" / "data" / "structured" / "schemas.json"
MAX_TOKENS = 160


class Timers:
    """Time in `Model.forward` (per call) and in the `Guide` methods."""

    def __init__(self, model) -> None:
        self.forward: list[float] = []
        self.guide = 0.0
        forward = model.forward

        def timed_forward(ids):
            start = time.perf_counter()
            try:
                return forward(ids)
            finally:
                self.forward.append(time.perf_counter() - start)

        model.forward = timed_forward
        for name in ("mask", "advance", "forced"):
            self._wrap_guide(name)

    def _wrap_guide(self, name: str) -> None:
        method = getattr(Guide, name)

        def timed(guide, *args):
            start = time.perf_counter()
            try:
                return method(guide, *args)
            finally:
                self.guide += time.perf_counter() - start

        setattr(Guide, name, timed)

    def reset(self) -> None:
        self.forward.clear()
        self.guide = 0.0


def prompts(model, n: int) -> list[tuple[str, Constraint]]:
    """(rendered prompt, constraint) for the first prompt of the first `n` schemas."""
    out = []
    for entry in json.loads(SUITE.read_text(encoding="utf-8"))["schemas"][:n]:
        system = DEFAULT_EXTRACT_PROMPT.replace("{schema}", json.dumps(entry["schema"]))
        messages = [
            {"role": "system", "content": system},
            {"role": "user", "content": entry["prompts"][0]},
        ]
        prompt = model.chat_template.render(messages)
        out.append((prompt, Constraint.json_schema(entry["schema"])))
    return out


def one_run(model, timers: Timers, prompt: str, **options) -> dict:
    """One generation from an empty cache; its decode timings.

    A step is one turn of the loop: sample (under the mask), then one model run
    for the new token(s). The first turn samples from the prompt's logits, so
    the runs counted are the prompt's last token (recomputed) and the decode runs.
    """
    model.reset()
    model.forward(model.tokenize(prompt, add_bos=False))  # prefill, untimed
    ids = list(model._tokens)
    timers.reset()
    gen = model.generate(ids, **options)
    seconds = gen.stats.decode_seconds
    return {
        "tokens": len(gen.tokens),
        "steps": len(timers.forward),
        "decode_s": seconds,
        "outside_s": max(seconds - sum(timers.forward[1:]), 0.0),
        "guide_s": timers.guide,
        "complete": getattr(gen, "complete", None),
    }


def decoding(model, timers: Timers, cases, runs: int) -> dict[str, list[dict]]:
    """Unconstrained, constrained without and with fast-forward, alternating."""
    # The token count of each constrained answer sets the unconstrained length.
    lengths = [
        one_run(model, timers, p, json_schema=c, max_tokens=MAX_TOKENS)["tokens"]
        for p, c in cases
    ]
    results: dict[str, list[dict]] = {"free": [], "no_ff": [], "ff": []}
    for run in range(runs):
        for i, ((prompt, c), n) in enumerate(zip(cases, lengths, strict=True)):
            kinds = ["free", "no_ff", "ff"]
            if (i + run) % 2:
                kinds.reverse()
            for kind in kinds:
                if kind == "free":
                    options = {"max_tokens": n, "ignore_eos": True}
                else:
                    options = {"json_schema": c, "max_tokens": MAX_TOKENS}
                    options["fast_forward"] = kind == "ff"
                results[kind].append(one_run(model, timers, prompt, **options))
    return results


def per(results: list[dict], key: str, unit: str) -> float:
    """Total `key` seconds over total `unit` (tokens or steps), in ms."""
    return 1000 * sum(r[key] for r in results) / sum(r[unit] for r in results)


def compile_times(engine: GrammarEngine) -> dict[str, list[float]]:
    """Per schema: Constraint build, matcher compile, first mask (seconds)."""
    times: dict[str, list[float]] = {"build": [], "compile": [], "first_mask": []}
    for entry in json.loads(SUITE.read_text(encoding="utf-8"))["schemas"]:
        engine._prototypes.clear()  # a cold compile every time
        start = time.perf_counter()
        c = Constraint.json_schema(entry["schema"])
        built = time.perf_counter()
        guide = engine.compile(c)
        compiled = time.perf_counter()
        guide.mask()
        masked = time.perf_counter()
        times["build"].append(built - start)
        times["compile"].append(compiled - built)
        times["first_mask"].append(masked - compiled)
    return times


def sampler_cost(engine: GrammarEngine, batches: int = 20) -> dict[str, float]:
    """Best mean µs per `Sampler.sample` call with and without a real mask.

    The masks are the first masks of the suite's schemas; the logits are
    LLM-like (a normal bulk plus a few strong tokens), the settings greedy and
    T=0.8 with top-k 40. The mask is applied by the C kernel, inside the call.
    """
    rng = np.random.default_rng(0)
    vocab = engine.vocab_size
    masks = []
    for entry in json.loads(SUITE.read_text(encoding="utf-8"))["schemas"]:
        masks.append(engine.compile(Constraint.json_schema(entry["schema"])).mask())
        masks[-1] = masks[-1].copy()
    logits = []
    for _ in range(len(masks)):
        x = rng.standard_normal(vocab).astype(np.float32) * 2.5
        x[rng.choice(vocab, 20, replace=False)] += 10
        logits.append(x)
    out = {}
    for label, config in (
        ("greedy", SamplerSettings(temperature=0.0)),
        ("T=0.8 top-k 40", SamplerSettings(temperature=0.8, top_k=40, seed=1)),
    ):
        sampler = Sampler(config, vocab)
        for masked in (False, True):
            best = float("inf")
            for _ in range(batches):
                work = [x.copy() for x in logits]
                start = time.perf_counter()
                for x, m in zip(work, masks, strict=True):
                    sampler.sample(x, mask=m if masked else None)
                best = min(best, (time.perf_counter() - start) / len(work))
            out[f"{label}, {'mask' if masked else 'no mask'}"] = 1e6 * best
    return out


def print_decoding(results: dict[str, list[dict]]) -> float:
    """The decoding tables; returns the unconstrained step (ms)."""
    free, no_ff, ff = results["free"], results["no_ff"], results["ff"]
    step = per(free, "decode_s", "steps")
    incomplete = sum(not r["complete"] for r in ff + no_ff)
    print(f"constrained outputs cut short by max_tokens: {incomplete}")
    print()
    print("| decode (ms) | unconstrained | constrained, ff off | ff on |")
    print("|---|---:|---:|---:|")
    rows = [
        ("per step (one model run)", "decode_s", "steps"),
        ("per step, outside the model run", "outside_s", "steps"),
        ("per step, in the Guide (mask, advance, forced)", "guide_s", "steps"),
        ("per generated token", "decode_s", "tokens"),
    ]
    for label, key, unit in rows:
        cells = " | ".join(f"{per(r, key, unit):.2f}" for r in (free, no_ff, ff))
        print(f"| {label} | {cells} |")

    whole = (per(no_ff, "decode_s", "steps") - step) / step
    outside = per(no_ff, "outside_s", "steps") - per(free, "outside_s", "steps")
    per_token = per(ff, "decode_s", "tokens") / per(free, "decode_s", "tokens")
    runs = sum(r["steps"] for r in ff) / sum(r["tokens"] for r in ff)
    print()
    print("| constrained against unconstrained | value |")
    print("|---|---:|")
    print(f"| extra time per step, ff off, share of the step | {whole:+.1%} |")
    print(
        f"| extra time outside the model run, share of the step | "
        f"{outside / step:+.1%} |"
    )
    print(
        f"| time in the Guide, share of the step | "
        f"{per(no_ff, 'guide_s', 'steps') / step:.1%} |"
    )
    print(f"| time per token, ff on / unconstrained | {per_token:.2f} |")
    print(f"| model runs per token, ff on | {runs:.3f} |")
    return step


def print_compile(compiled: dict[str, list[float]], engine_s: float, step: float):
    """The compile-time table, in ms and in unconstrained decode steps."""
    print()
    print("| compile (per schema, cold) | median ms | max ms | median, in steps |")
    print("|---|---:|---:|---:|")
    compiled = dict(compiled)
    compiled["total"] = [sum(v) for v in zip(*compiled.values(), strict=True)]
    labels = {
        "build": "Constraint (grammar + check)",
        "compile": "matcher for the tokenizer",
        "first_mask": "first mask",
        "total": "total",
    }
    for key, label in labels.items():
        med = 1000 * statistics.median(compiled[key])
        print(
            f"| {label} | {med:.2f} | {1000 * max(compiled[key]):.2f} | "
            f"{med / step:.2f} |"
        )
    ms = 1000 * engine_s
    print(
        f"| grammar engine for the tokenizer (once per model) | {ms:.0f} | – | "
        f"{ms / step:.0f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", help="package folder (default: the default model)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--schemas", type=int, default=12, help="prompts to decode")
    parser.add_argument("--json", help="write the raw results here")
    args = parser.parse_args()

    load_start = os.getloadavg()
    model = edgeslm.load(args.package, n_threads=args.threads, n_ctx=1024)
    started = time.perf_counter()
    engine = engine_for(model)
    engine_s = time.perf_counter() - started
    timers = Timers(model)
    cases = prompts(model, args.schemas)
    one_run(model, timers, cases[0][0], max_tokens=8, ignore_eos=True)  # warm-up
    results = decoding(model, timers, cases, args.runs)
    compiled = compile_times(engine)
    sampling = sampler_cost(engine)
    load_end = os.getloadavg()

    print(
        f"package: {model.path.name} ({model.manifest.quantization}), "
        f"{args.threads} thread(s), {len(cases)} prompts x {args.runs} runs, "
        f"{constraints._llguidance().get_version()}, {platform.machine()}, "
        f"load average {load_start[0]:.1f} at the start, {load_end[0]:.1f} at the end"
    )
    step = print_decoding(results)
    print_compile(compiled, engine_s, step)
    print()
    vocab = engine.vocab_size
    print(f"| sampler, {vocab} logits (µs per call, best batch) | no mask | mask |")
    print("|---|---:|---:|")
    for label in ("greedy", "T=0.8 top-k 40"):
        print(
            f"| {label} | {sampling[f'{label}, no mask']:.1f} | "
            f"{sampling[f'{label}, mask']:.1f} |"
        )
    if args.json:
        raw = {"decoding": results, "compile": compiled, "engine_s": engine_s}
        raw["sampler_us"] = sampling
        raw |= {"load": [load_start, load_end], "threads": args.threads}
        Path(args.json).write_text(json.dumps(raw, indent=1))


if __name__ == "__main__":
    main()
