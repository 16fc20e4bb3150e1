"""How fast edgeslm's MatMulQ8 streams a decode step's weights, beside MatMulNBits.

One graph holds SmolLM2-135M's 121 linear layers as one decode step meets them
(per layer QKV 960x576, output 576x576, gate+up 3072x576, down 576x1536, then the
tied head 49152x576; random int8 weights, 143 MB with float16 scales), each fed a
one-token activation. The same weights run as edgeslm's `ai.edgeslm::MatMulQ8` and
as onnxruntime's `MatMulNBits` (8 bits, blocks of 32, accuracy level 4: the
portable graph's form). The two sessions alternate; each figure is the best of
`--repeats` runs, after a warm-up, for each thread count. The weights (several
times the last-level cache) stream from memory every run, so the figure is the
bandwidth a decode step's products reach, with none of the step's other work.

    python tools/bench/bench_kernel.py --threads 1 2 --repeats 20
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto

from edgeslm import _kernel
from edgeslm.export.onnx_graph import GraphBuilder, portable_model
from edgeslm.export.quantize import BlockQuantized, pack_q8

LAYERS = 30
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * LAYERS + [(49152, 576)]


def build(folder: Path) -> tuple[Path, Path, float]:
    """Writes the MatMulQ8 graph and its portable twin; returns them and the MB."""
    rng = np.random.default_rng(0)
    b = GraphBuilder("int8", 32)
    b.input("x576", TensorProto.FLOAT, [1, 1, 576])
    b.input("x1536", TensorProto.FLOAT, [1, 1, 1536])
    total = 0
    for i, (n, k) in enumerate(SHAPES):
        q = rng.integers(1, 256, size=(n, k // 32, 32), dtype=np.uint8)
        scales = rng.uniform(0.001, 0.05, size=(n, k // 32)).astype(np.float16)
        packed = pack_q8(BlockQuantized(data=q, scales=scales, k=k))
        b.linear_q(f"x{k}", packed, f"l{i}", output=f"y{i}")
        b.output(f"y{i}", TensorProto.FLOAT, [1, 1, n])
        total += packed.data.nbytes + packed.scales.nbytes
    model = b.model("chain")
    ours = folder / "chain.onnx"
    onnx.save_model(
        model,
        str(ours),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="chain.data",
        size_threshold=1024,
    )
    theirs = folder / "chain.portable.onnx"
    onnx.save_model(portable_model(model), str(theirs))
    return ours, theirs, total / 1e6


def session(path: Path, threads: int, ops: bool):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if ops:
        options.register_custom_ops_library(str(_kernel.operator_library()))
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    io = sess.io_binding()
    rng = np.random.default_rng(1)
    for k in (576, 1536):
        io.bind_cpu_input(f"x{k}", rng.standard_normal((1, 1, k)).astype(np.float32))
    for out in sess.get_outputs():
        io.bind_output(out.name)
    sess.run_with_iobinding(io)  # warm-up (and MatMulNBits' first-run work)
    return sess, io


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    _kernel.require()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        ours, theirs, mb = build(Path(tmp))
        for threads in args.threads:
            runs = {
                "MatMulQ8": session(ours, threads, True),
                "MatMulNBits": session(theirs, threads, False),
            }
            best = dict.fromkeys(runs, float("inf"))
            for _ in range(args.repeats):
                for name, (sess, io) in runs.items():  # alternate the two
                    started = time.perf_counter()
                    sess.run_with_iobinding(io)
                    best[name] = min(best[name], time.perf_counter() - started)
            for name, seconds in best.items():
                results.append(
                    {
                        "threads": threads,
                        "op": name,
                        "ms": seconds * 1e3,
                        "gb_per_s": mb / 1e3 / seconds,
                    }  # fmt: skip
                )
    print(f"{len(SHAPES)} products, {mb:.0f} MB of int8 weights (float16 scales)\n")
    print(
        "| threads | operator | ms per step | GB/s (MatMulQ8 bytes) | vs MatMulNBits |"
    )
    print("|---:|---|---:|---:|---:|")
    for r in results:
        peer = next(
            x["ms"] for x in results
            if x["threads"] == r["threads"] and x["op"] == "MatMulNBits"
        )  # fmt: skip
        print(
            f"| {r['threads']} | {r['op']} | {r['ms']:.2f} | {r['gb_per_s']:.1f} | "
            f"{peer / r['ms']:.2f}x |"
        )
    print(
        f"\nCommand: python tools/bench/bench_kernel.py --threads "
        f"{' '.join(map(str, args.threads))} --repeats {args.repeats}; "
        f"{platform.processor() or platform.machine()}, kernel "
        f"{_kernel.load().esl_qmm_name().decode()}, onnxruntime {ort.__version__}"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
