"""End-to-end check of emulated aarch64 runs against the host, for .ci/aarch64.sh.

Not a pytest module (pytest collects `test_*.py` only). One file serves both sides:

    make-packages  (host)  a tiny random-weight Llama saved as a Hugging Face folder
                           with the llama SentencePiece tokenizer, exported with
                           `edgeslm.export.export_model` as int8 and fp32 packages,
                           plus `int8-portable` (the int8 package running its
                           portable graph: onnxruntime's MatMulNBits instead of
                           edgeslm's MatMulQ8) and `int8-portable-fp32compute` (that
                           graph with MatMulNBits set to accuracy_level 1)
    generate       (host or emulated)  greedy `generate("hello")` on each package,
                           and the logits of every step with the reference tokens
                           fed back (teacher forcing), into a result folder
    check-host     (host)  the reference is decisive enough to compare against
    compare        (host)  one emulated run against the host run

What is compared, and why: the int8 package runs edgeslm's own MatMulQ8 kernel on
both sides (AVX-512 or AVX2 on the host; NEON on the Pi 4's Cortex-A72, NEON dot
product on the Pi 5's Cortex-A76), whose integer products are exact everywhere, so
only the order of float sums differs: the logits must match the host's within
LOGIT_TOLERANCE and the tokens exactly. The portable graph runs onnxruntime's
MatMulNBits (accuracy_level 4), which quantizes activations and uses integer dot
products where onnxruntime has a kernel for that: x86-64 and ARMv8.2 with dotprod.
On ARMv8.0 it has none and computes in fp32 from the dequantized weights instead,
which moves logits by up to ~1e-2 of their range: a legitimate difference of
algorithm, not an emulation error. So an emulated portable run must equal the host
run of the same computation, `int8-portable` or `int8-portable-fp32compute`, and
`compare` says which one it matched. fp32 runs must match the host's fp32 run. The
tiny model is initialised with a large weight scale so that its greedy choices are
decisive (check-host enforces a margin), which keeps token equality meaningful
instead of flaky.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import platform
import shutil
import sys
import time
from pathlib import Path

log = logging.getLogger("edgeslm.aarch64")

PROMPT = "hello"
MAX_TOKENS = 8
# Largest allowed |emulated - host| over all teacher-forced logits (they span about
# +-40 here). Same computation, other platform: ~2e-4 at most (summation order).
# The other int8 computation: ~0.8. The gap makes the classification unambiguous.
LOGIT_TOLERANCE = 1e-3
# check-host: smallest allowed gap between the best and second-best logit of the
# host's greedy steps, far above any cross-platform difference of the same
# computation.
MIN_TOP1_MARGIN = 0.05
# The tiny model: small enough to run emulated in seconds, real enough (GQA, tied
# embeddings, 32000-token vocabulary); a large initializer range makes the logits
# decisive (the default 0.02 leaves near-ties of ~1e-4 and repeats one token).
TINY_LLAMA = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=True,
    rms_norm_eps=1e-6,
    initializer_range=1.0,
)
SEED = 1234
GGUF_VOCAB = "tokenizers/ggml-vocab-llama-spm.gguf"
PACKAGES = ("int8", "int8-portable", "fp32")  # what both sides run
PORTABLE = "int8-portable"
# Host-only reference for CPUs where onnxruntime has no int8 MatMulNBits kernel.
FP32_COMPUTE = "int8-portable-fp32compute"
FEED_FROM = {FP32_COMPUTE: PORTABLE}  # whose tokens a package is teacher-forced with


# --------------------------------------------------------------------------- host


def make_packages(shared_data: Path, out: Path) -> None:
    """Writes out/hf (the source folder) and out/pkg-<name> for every package."""
    import gguf
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as transformers_logging

    from edgeslm.export import export_model
    from edgeslm.export.tokenizer_build import tokenizer_from_gguf

    hf = out / "hf"
    shutil.rmtree(hf, ignore_errors=True)
    hf.mkdir(parents=True)
    info = tokenizer_from_gguf(gguf.GGUFReader(shared_data / GGUF_VOCAB), hf)
    vocab = json.loads((hf / "tokenizer.json").read_text())["model"]["vocab"]
    (hf / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": info.bos_token,
                "eos_token": info.eos_token,
                "add_bos_token": info.add_bos_token,
            }
        )
    )
    transformers_logging.disable_progress_bar()
    torch.manual_seed(SEED)
    config = LlamaConfig(
        vocab_size=len(vocab),
        bos_token_id=info.bos_token_id,
        eos_token_id=info.eos_token_id,
        **TINY_LLAMA,
    )
    LlamaForCausalLM(config).eval().save_pretrained(hf, safe_serialization=True)
    for dtype in ("int8", "fp32"):
        export_model(hf, out / f"pkg-{dtype}", dtype=dtype, overwrite=True)
    _portable_copy(out / "pkg-int8", out / f"pkg-{PORTABLE}", accuracy_level=None)
    _portable_copy(out / "pkg-int8", out / f"pkg-{FP32_COMPUTE}", accuracy_level=1)
    log.info("packages written to %s (vocab %d)", out, len(vocab))


def _portable_copy(src: Path, dst: Path, accuracy_level: int | None) -> None:
    """Copies an int8 package so that it runs its portable graph (as model.onnx,
    needing no custom operator), optionally with every MatMulNBits set to
    `accuracy_level`."""
    import onnx

    from edgeslm.manifest import Manifest, sha256_file

    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    manifest = Manifest.read(dst)
    # The weights stay in the package's external data file, shared and unchanged.
    model = onnx.load(str(dst / manifest.portable_model), load_external_data=False)
    changed = 0
    for node in model.graph.node:
        if node.op_type == "MatMulNBits" and accuracy_level is not None:
            for attribute in node.attribute:
                if attribute.name == "accuracy_level":
                    attribute.i = accuracy_level
                    changed += 1
    if accuracy_level is not None and not changed:
        raise RuntimeError(f"{src}: no MatMulNBits accuracy_level to change")
    onnx.save_model(model, str(dst / "model.onnx"))
    (dst / manifest.portable_model).unlink()
    files = {n: h for n, h in manifest.files.items() if n != manifest.portable_model}
    files["model.onnx"] = sha256_file(dst / "model.onnx")
    dataclasses.replace(
        manifest, files=files, custom_ops=(), portable_model=None
    ).write(dst)


# --------------------------------------------------------------------------- both


def generate(packages: list[Path], out: Path, teacher: Path | None) -> None:
    """Greedy generation and per-step logits for each package, into folder out.

    Args:
        packages: package folders named pkg-<name>; results are keyed by <name>.
        out: folder for result.json and <name>-logits.npy.
        teacher: the host's result folder, whose tokens are fed back for the
            logits; None feeds back this run's own tokens (the host does that).
    """
    import numpy as np

    import edgeslm
    from edgeslm import _kernel

    out.mkdir(parents=True, exist_ok=True)
    result = {
        "machine": platform.machine(),
        "python": platform.python_version(),
        "kernel": _kernel.simd_name() or "numpy",
        "packages": {},
    }
    # Without a teacher (on the host), FEED_FROM refers to packages of this run.
    reference = _read_result(teacher) if teacher else result
    for package in packages:
        name = package.name.removeprefix("pkg-")
        started = time.perf_counter()
        model = edgeslm.load(package, n_threads=1)
        gen = model.generate(PROMPT, max_tokens=MAX_TOKENS, temperature=0)
        tokens = [int(t) for t in gen.tokens]

        # Teacher forcing: the prompt, then the reference's tokens one by one.
        prompt_ids = model.tokenizer.encode(PROMPT)
        bos = model.manifest.tokens.bos_token_id
        if model.manifest.tokens.add_bos_token and bos is not None:
            prompt_ids = [bos, *prompt_ids]
        source = FEED_FROM.get(name, name)
        if teacher is None and source == name:
            fed = tokens  # the host feeds back its own tokens
        else:
            fed = reference["packages"][source]["tokens"]
        model.reset()
        rows = [model.forward(prompt_ids).copy()]
        for token in fed[:-1]:
            rows.append(model.forward([token]).copy())
        logits = np.stack(rows).astype(np.float32)
        np.save(out / f"{name}-logits.npy", logits)
        top2 = np.sort(logits, axis=1)[:, -2:]
        result["packages"][name] = {
            "prompt_ids": [int(t) for t in prompt_ids],
            "tokens": tokens,
            "text": gen.text,
            "finish_reason": gen.finish_reason,
            "min_top1_margin": float((top2[:, 1] - top2[:, 0]).min()),
            "seconds": round(time.perf_counter() - started, 2),
        }
        log.info("%s: %s %r", name, tokens, gen.text)
    (out / "result.json").write_text(json.dumps(result, indent=1))


def _read_result(folder: Path) -> dict:
    return json.loads((folder / "result.json").read_text())


# --------------------------------------------------------------------------- host


def check_host(host: Path) -> int:
    """Returns 0 when the host reference is decisive and self-consistent."""
    ref = _read_result(host)["packages"]
    problems = []
    for name in (*PACKAGES, FP32_COMPUTE):
        if len(ref[name]["tokens"]) != MAX_TOKENS:
            problems.append(f"{name} stopped after {len(ref[name]['tokens'])} tokens")
        if ref[name]["min_top1_margin"] < MIN_TOP1_MARGIN:
            problems.append(
                f"{name} has a near-tie (top-1 margin "
                f"{ref[name]['min_top1_margin']:.2g} < {MIN_TOP1_MARGIN})"
            )
    if ref[FP32_COMPUTE]["tokens"] != ref[PORTABLE]["tokens"]:
        problems.append("the portable graph's tokens depend on the compute type")
    for problem in problems:
        print(f"aarch64: host reference: FAIL {problem}; change SEED or TINY_LLAMA")
    if not problems:
        print(
            f"aarch64: host reference: ok (int8 {ref['int8']['tokens']}, fp32 "
            f"{ref['fp32']['tokens']}, {ref['int8']['text']!r})"
        )
    return len(problems)


def compare(host: Path, emulated: Path, label: str, kernel: str) -> int:
    """Prints one line per package; returns the number of failed checks."""
    import numpy as np

    want, got = _read_result(host), _read_result(emulated)
    failures = 0
    if got["machine"] != "aarch64" or got["kernel"] != kernel:
        print(
            f"aarch64: {label}: FAIL ran on {got['machine']} with kernel "
            f"{got['kernel']!r} (want aarch64, {kernel!r})"
        )
        failures += 1
    for name in PACKAGES:
        run = got["packages"].get(name)
        if run is None:
            print(f"aarch64: {label} {name}: FAIL no emulated result")
            failures += 1
            continue
        logits = np.load(emulated / f"{name}-logits.npy")
        # Host computations this run may legitimately equal (see the module doc).
        candidates = [name] + ([FP32_COMPUTE] if name == PORTABLE else [])
        diffs = {
            c: float(np.abs(logits - np.load(host / f"{c}-logits.npy")).max())
            for c in candidates
        }
        matched = min(diffs, key=diffs.get)
        ref = want["packages"][matched]
        problems = []
        if run["prompt_ids"] != ref["prompt_ids"]:
            problems.append(f"prompt ids {run['prompt_ids']} != {ref['prompt_ids']}")
        if run["tokens"] != ref["tokens"]:
            problems.append(f"tokens {run['tokens']} != host {ref['tokens']}")
        if not diffs[matched] <= LOGIT_TOLERANCE:
            shown = ", ".join(f"{c} {d:.3g}" for c, d in diffs.items())
            problems.append(
                f"logits match no host run within {LOGIT_TOLERANCE} ({shown})"
            )
        status = "FAIL " + "; ".join(problems) if problems else "ok"
        print(
            f"aarch64: {label} {name}: {status} (tokens {run['tokens']}; matches host "
            f"{matched} to {diffs[matched]:.1e}; {run['seconds']} s)"
        )
        failures += bool(problems)
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("make-packages")
    p.add_argument("--shared-data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("generate")
    p.add_argument("--package", type=Path, action="append", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--teacher", type=Path, help="the host's result folder")
    p = sub.add_parser("check-host")
    p.add_argument("--host", type=Path, required=True)
    p = sub.add_parser("compare")
    p.add_argument("--host", type=Path, required=True)
    p.add_argument("--emulated", type=Path, required=True)
    p.add_argument("--label", default="e2e")
    p.add_argument("--kernel", default="neon", help="expected esl_simd_name()")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="aarch64:   %(message)s", stream=sys.stderr
    )
    for noisy in ("edgeslm.export", "edgeslm.model", "edgeslm.chat_template"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.command == "make-packages":
        make_packages(args.shared_data, args.out)
        return 0
    if args.command == "generate":
        generate(args.package, args.out, args.teacher)
        return 0
    if args.command == "check-host":
        return 1 if check_host(args.host) else 0
    return 1 if compare(args.host, args.emulated, args.label, args.kernel) else 0


if __name__ == "__main__":
    sys.exit(main())
