"""End-to-end check of emulated aarch64 runs against the host: driver for .ci/aarch64.sh.

Not a pytest module (pytest collects `test_*.py` only). One file serves both sides:

    make-packages  (host)  a tiny random-weight Llama saved as a Hugging Face folder
                           with a real SentencePiece tokenizer, exported by
                           `edgeslm.export.export_model` as int8 and fp32 packages
    generate       (host or emulated aarch64)  greedy `generate("hello")` on each
                           package, plus the logits of every step with the host's
                           tokens fed back (teacher forcing), written to a folder
    compare        (host)  one emulated run against the host run: generated tokens
                           must be equal, logits close

Why teacher forcing: the generated tokens are the contract, but when they differ the
logits of the same positions say by how much, and they stay comparable after the first
difference. The logits are saved as .npy (float32); `compare` prints the largest
difference per package so drift shows up in CI logs before it flips a token.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

log = logging.getLogger("edgeslm.aarch64")

PROMPT = "hello"
MAX_TOKENS = 8
DTYPES = ("int8", "fp32")
# Largest allowed |emulated - host| on any teacher-forced logit. fp32 graphs differ
# only in summation order between x86 and aarch64 kernels; int8 (MatMulNBits with
# int8 activations) also in how each platform rounds the quantized activations.
LOGIT_TOLERANCE = {"fp32": 1e-4, "int8": 2e-2}
# The tiny model: small enough to run emulated in seconds, real enough (GQA, tied
# embeddings, the llama SentencePiece vocabulary of 32000 tokens).
TINY_LLAMA = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=True,
    rms_norm_eps=1e-6,
)
SEED = 1234
GGUF_VOCAB = "tokenizers/ggml-vocab-llama-spm.gguf"


# --------------------------------------------------------------------------- host


def make_packages(shared_data: Path, out: Path) -> None:
    """Writes out/hf (the source folder) and out/pkg-int8, out/pkg-fp32."""
    import gguf
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from edgeslm.export import export_model
    from edgeslm.export.tokenizer_build import tokenizer_from_gguf

    hf = out / "hf"
    hf.mkdir(parents=True, exist_ok=True)
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
    torch.manual_seed(SEED)
    config = LlamaConfig(
        vocab_size=len(vocab),
        bos_token_id=info.bos_token_id,
        eos_token_id=info.eos_token_id,
        **TINY_LLAMA,
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(hf, safe_serialization=True)
    for dtype in DTYPES:
        export_model(hf, out / f"pkg-{dtype}", dtype=dtype, overwrite=True)
    log.info("packages written to %s (vocab %d)", out, len(vocab))


# --------------------------------------------------------------------------- both


def generate(packages: list[Path], out: Path, teacher: Path | None) -> None:
    """Greedy generation and per-step logits for each package, into folder out.

    Args:
        packages: package folders; each is named by its manifest's quantization.
        out: folder for result.json and <dtype>-logits.npy.
        teacher: a host result folder whose tokens are fed back for the logits;
            None feeds back this run's own tokens (the host does that).
    """
    import numpy as np

    import edgeslm
    from edgeslm import _kernel

    out.mkdir(parents=True, exist_ok=True)
    reference = _read_result(teacher) if teacher else None
    result = {
        "machine": platform.machine(),
        "python": platform.python_version(),
        "kernel": _kernel.simd_name() or "numpy",
        "packages": {},
    }
    for package in packages:
        started = time.perf_counter()
        model = edgeslm.load(package, n_threads=1)
        dtype = _dtype_of(model)
        gen = model.generate(PROMPT, max_tokens=MAX_TOKENS, temperature=0)
        tokens = [int(t) for t in gen.tokens]

        # Teacher forcing: the prompt, then the reference's tokens one by one.
        prompt_ids = model.tokenizer.encode(PROMPT)
        bos = model.manifest.tokens.bos_token_id
        if model.manifest.tokens.add_bos_token and bos is not None:
            prompt_ids = [bos, *prompt_ids]
        fed = reference["packages"][dtype]["tokens"] if reference else tokens
        model.reset()
        rows = [model.forward(prompt_ids).copy()]
        for token in fed[:-1]:
            rows.append(model.forward([token]).copy())
        logits = np.stack(rows).astype(np.float32)
        np.save(out / f"{dtype}-logits.npy", logits)
        top2 = np.sort(logits, axis=1)[:, -2:]
        result["packages"][dtype] = {
            "prompt_ids": [int(t) for t in prompt_ids],
            "tokens": tokens,
            "text": gen.text,
            "finish_reason": gen.finish_reason,
            "argmax": [int(i) for i in logits.argmax(axis=1)],
            "min_top1_margin": float((top2[:, 1] - top2[:, 0]).min()),
            "seconds": round(time.perf_counter() - started, 2),
        }
        log.info(
            "%s: %s %r (%.1f s)", dtype, tokens, gen.text, time.perf_counter() - started
        )
    (out / "result.json").write_text(json.dumps(result, indent=1))


def _dtype_of(model) -> str:
    quantization = model.manifest.quantization
    return "fp32" if quantization == "fp32" else "int8"


def _read_result(folder: Path) -> dict:
    return json.loads((folder / "result.json").read_text())


# --------------------------------------------------------------------------- host


def compare(host: Path, emulated: Path, label: str) -> int:
    """Prints one line per package; returns the number of failed checks."""
    import numpy as np

    want, got = _read_result(host), _read_result(emulated)
    if got["machine"] != "aarch64":
        print(f"aarch64: {label}: FAIL the emulated run reports {got['machine']}")
        return 1
    failures = 0
    for dtype, ref in want["packages"].items():
        run = got["packages"].get(dtype)
        if run is None:
            print(f"aarch64: {label} {dtype}: FAIL no emulated result")
            failures += 1
            continue
        diff = float(
            np.abs(
                np.load(emulated / f"{dtype}-logits.npy")
                - np.load(host / f"{dtype}-logits.npy")
            ).max()
        )
        problems = []
        if run["prompt_ids"] != ref["prompt_ids"]:
            problems.append(f"prompt ids {run['prompt_ids']} != {ref['prompt_ids']}")
        if run["tokens"] != ref["tokens"]:
            problems.append(f"tokens {run['tokens']} != host {ref['tokens']}")
        if run["argmax"] != ref["argmax"]:
            problems.append("teacher-forced argmax differs")
        if not diff <= LOGIT_TOLERANCE[dtype]:
            problems.append(f"max logit diff {diff:.3g} > {LOGIT_TOLERANCE[dtype]}")
        status = "FAIL " + "; ".join(problems) if problems else "ok"
        print(
            f"aarch64: {label} {dtype}: {status} (tokens {run['tokens']}, "
            f"max |logit diff| {diff:.2e}, host min top-1 margin "
            f"{ref['min_top1_margin']:.3f}, kernel {got['kernel']}, "
            f"{run['seconds']} s)"
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
    p.add_argument("--teacher", type=Path, help="host result folder")
    p = sub.add_parser("compare")
    p.add_argument("--host", type=Path, required=True)
    p.add_argument("--emulated", type=Path, required=True)
    p.add_argument("--label", default="e2e")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="aarch64: %(message)s", stream=sys.stderr
    )
    logging.getLogger("edgeslm.export").setLevel(logging.WARNING)
    if args.command == "make-packages":
        make_packages(args.shared_data, args.out)
        return 0
    if args.command == "generate":
        generate(args.package, args.out, args.teacher)
        return 0
    return 1 if compare(args.host, args.emulated, args.label) else 0


if __name__ == "__main__":
    sys.exit(main())
