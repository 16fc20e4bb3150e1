"""Encoder latency per request, one thread: edgeslm int8 and fp32 beside PyTorch.

    python tools/eval_intents/bench_encoder.py [--rounds 3] [--out bench.json]

Each request (the hand-written calibration requests: short commands and
questions) is embedded alone, as the intent layer does, by every system in turn,
so all of them see the same load. The peer is transformers' BertModel in PyTorch
with sentence-transformers' mean pooling and normalization, on one thread. The
encoder layer's own figure (embedding + both heads + slot resolution) is in the
evaluation's `layer_own_latency` (run.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(HERE), str(REPO)]

from calibrate import load_calibration  # noqa: E402


def torch_peer(source: Path):
    import torch
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    model = AutoModel.from_pretrained(str(source)).eval()

    def embed(text: str) -> np.ndarray:
        batch = tokenizer([text], return_tensors="pt")
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        mean = (hidden * mask).sum(1) / mask.sum(1)
        return torch.nn.functional.normalize(mean, dim=-1).numpy()

    return embed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args(argv)

    from edgeslm.encoder import default_encoder_source, load_encoder

    source = default_encoder_source()
    systems = {
        "edgeslm int8": load_encoder(dtype="int8", n_threads=1).embed,
        "edgeslm fp32": load_encoder(dtype="fp32", n_threads=1).embed,
        "pytorch fp32": torch_peer(source),
    }
    texts = [text for text, _ in load_calibration(HERE / "calibration_en.yaml")]
    for embed in systems.values():  # warm up
        embed(texts[0])
    times: dict[str, list[float]] = {name: [] for name in systems}
    load_start = os.getloadavg()[0]
    for _ in range(args.rounds):
        for text in texts:
            for name, embed in systems.items():
                started = time.perf_counter()
                embed(text)
                times[name].append(1000 * (time.perf_counter() - started))
    peer = float(np.median(times["pytorch fp32"]))
    rows = {
        name: {
            "p50_ms": round(float(np.median(t)), 2),
            "p95_ms": round(float(np.percentile(t, 95)), 2),
            "speedup_vs_pytorch_p50": round(peer / float(np.median(t)), 2),
        }
        for name, t in times.items()
    }
    result = {
        "requests": len(texts) * args.rounds,
        "threads": 1,
        "load_avg": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        "systems": rows,
    }
    print("| encoder | p50 ms | p95 ms | vs PyTorch (p50) |")
    print("|---|---|---|---|")
    for name, row in rows.items():
        print(
            f"| {name} | {row['p50_ms']} | {row['p95_ms']} | "
            f"{row['speedup_vs_pytorch_p50']}x |"
        )
    print(f"load average {result['load_avg'][0]} -> {result['load_avg'][1]} (2 cores)")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
