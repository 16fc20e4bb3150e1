"""Decode speed and memory of the Llama-68M and DialoGPT-small shapes beside llama.cpp.

`bench_generate.py` measures the default model; this script runs the same harness
(the same workers, schedule, quiet-machine waits, table and paired ratios) on the
two models that define edgeslm's niche, whose weights cannot be downloaded here:

- `llama-68m`: JackFram/llama-68m's exact configuration (the base of
  Felladrin/Llama-68M-Chat-v1), random weights, the Llama SentencePiece vocabulary;
- `dialogpt-small`: microsoft/DialoGPT-small's exact configuration, random
  weights, GPT-2's BPE vocabulary.

Each checkpoint is made once with transformers (tests/checkpoints.py). edgeslm
exports it to its int8 package; llama.cpp gets a GGUF written from the same
checkpoint and quantized to Q8_0 by llama.cpp's own quantizer: the Llama through
the converter-equivalent writer of the tests (`write_llama_gguf`, F32), GPT-2
through llama.cpp's own `convert_hf_to_gguf.py` from the llama-cpp-python sdist
(fetched once with `pip download`). Speed does not depend on the values of the
weights, so random weights measure what real ones would; the greedy tokens of
the two systems are compared only as a sanity check.

    python tools/bench/bench_models.py --runs 3 --json /tmp/bench_models.json
    python tools/bench/bench_models.py --models dialogpt-small --threads 1

Every option of bench_generate.py applies (--runs, --threads, --prompt-tokens,
--decode-tokens, --n-ctx, --systems, --quiet-below, ...) except --source.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import bench_generate as bench
from _report import agreement, machine_line, render_table, summarize

REPO = bench.REPO
SHAPES = ("llama-68m", "dialogpt-small")
LABELS = {"llama-68m": "Llama-68M", "dialogpt-small": "DialoGPT-small"}

log = logging.getLogger("bench.models")


# --- the checkpoints and what each system runs --------------------------------------


def shared_data() -> Path:
    path = Path(os.environ.get("EDGESLM_SHARED_DATA") or REPO.parent / "shared/data")
    if not path.is_dir():
        raise SystemExit(f"reference data not found at {path}; set EDGESLM_SHARED_DATA")
    return path


def run_checkpoints(call: str) -> None:
    """Run `call` on tests/checkpoints.py in a subprocess.

    torch and transformers stay out of this process: Linux carries a process's
    peak RSS across fork and exec, so every worker started from a heavy
    orchestrator would report the orchestrator's peak as its own.
    """
    script = f"import sys; sys.path.insert(0, {str(REPO / 'tests')!r}); "
    script += f"import checkpoints; from pathlib import Path; checkpoints.{call}"
    subprocess.run([sys.executable, "-c", script], check=True, timeout=1800)


def checkpoint(shape: str, work: Path) -> Path:
    """The random-weight Hugging Face folder of `shape`, made once."""
    folder = work / f"{shape}-hf"
    if (folder / "config.json").is_file():
        return folder
    log.info("making the %s checkpoint (random weights, exact config)", shape)
    make = "make_llama_folder" if shape == "llama-68m" else "make_gpt2_folder"
    run_checkpoints(f"{make}(Path({str(folder)!r}), Path({str(shared_data())!r}))")
    return folder


def converter(work: Path) -> Path:
    """llama.cpp's convert_hf_to_gguf.py, from the sdist of the installed peer."""
    version = _peer_version()
    root = work / f"llama-cpp-python-{version}"
    script = root / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    if script.is_file():
        return script
    log.info("fetching the llama-cpp-python %s sdist for its converter", version)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary"]
    cmd += [":all:", "-d", str(work), f"llama-cpp-python=={version}"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=900)
    tarball = work / f"llama_cpp_python-{version}.tar.gz"
    subprocess.run(["tar", "-xzf", str(tarball), "-C", str(work)], check=True)
    (work / f"llama_cpp_python-{version}").rename(root)
    return script


def _peer_version() -> str:
    probe = [sys.executable, "-c", "import llama_cpp; print(llama_cpp.__version__)"]
    done = subprocess.run(probe, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def f32_gguf(shape: str, hf: Path, work: Path) -> Path:
    """An F32 GGUF of the checkpoint, written as llama.cpp's converter does."""
    out = work / f"{shape}.F32.gguf"
    if out.is_file():
        return out
    if shape == "llama-68m":
        paths = ", ".join(f"Path({str(p)!r})" for p in (hf, out, shared_data()))
        run_checkpoints(f"write_llama_gguf({paths}, qtype='F32')")
        return out
    script = converter(work)
    env = dict(os.environ, PYTHONPATH=str(script.parent / "gguf-py"))
    cmd = [sys.executable, str(script), str(hf), "--outtype", "f32"]
    cmd += ["--outfile", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed:\n{done.stderr[-3000:]}")
    return out


def prepare(args: argparse.Namespace, shape: str) -> bench.Artefacts:
    """Make (or reuse) both systems' models of `shape` and the prompt ids."""
    work = Path(args.work_dir) / "models"
    work.mkdir(parents=True, exist_ok=True)
    hf = checkpoint(shape, work)
    models = {}
    if "edgeslm" in args.systems:
        models["edgeslm"] = bench.prepare_edgeslm(hf, work, args.rebuild, args.timeout)
    if "llama.cpp" in args.systems:
        src = f32_gguf(shape, hf, work)
        models["llama.cpp"] = bench.prepare_llama_cpp(
            src, work, args.rebuild, args.timeout
        )
    sizes = {name: bench.size_mb(path) for name, path in models.items()}
    ids = bench.prompt_ids(models, args.prompt_tokens, args.timeout)
    labels = dict(bench.LABELS)
    if "edgeslm" in models:
        labels["edgeslm"] += " " + bench.package_quantization(models["edgeslm"])
    return bench.Artefacts(models=models, sizes_mb=sizes, prompt_ids=ids, labels=labels)


# --- command line ---------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    mine = argparse.ArgumentParser(add_help=False)
    mine.add_argument("--models", nargs="+", choices=SHAPES, default=list(SHAPES))
    mine.add_argument("-h", "--help", action="store_true")
    ours, rest = mine.parse_known_args(argv)
    if ours.help:
        print(__doc__)
        print("  --models {llama-68m,dialogpt-small} ...  (default: both)\n")
        bench.parse_args(["--help"])
    if "--source" in rest:
        raise SystemExit("--source does not apply: the checkpoints are made here")
    args = bench.parse_args(rest)
    args.models = ours.models
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    args.systems = [s for s in bench.SYSTEMS if s in args.systems]
    bench.check_systems(args)

    started = time.time()
    env = bench.environment(args)
    reports: dict[str, Any] = {}
    for shape in args.models:
        art = prepare(args, shape)
        results = bench.measure_all(args, art)
        summary = summarize(results)
        print(f"\n### {LABELS[shape]}\n")
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
        reports[shape] = {
            "artefacts": {k: str(v) for k, v in art.models.items()},
            "sizes_mb": art.sizes_mb,
            "summary": summary,
            "runs": results,
        }
    env["loadavg_end"] = os.getloadavg()
    print(f"\nCommand: python tools/bench/bench_models.py {shlex.join(argv)}")
    print(machine_line(env))
    if args.json:
        report = {
            "args": vars(args),
            "environment": env,
            "models": reports,
            "seconds": time.time() - started,
        }
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
        log.info("raw results written to %s", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
