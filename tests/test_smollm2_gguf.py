"""The default model through the GGUF path: SmolLM2-135M-Instruct (Q4_1 GGUF).

- fp32 export: identical greedy continuations to transformers loading the same file
  (`gguf_file=`), fed the same token ids (transformers' GGUF tokenizer misses the
  `smollm` digit split, see test_tokenizer.py, so ids come from edgeslm's tokenizer).
- int8 export (the default: smoothed, blocks of 32) and int4 export (the GGUF's own
  Q4_1 blocks): next-token top-1 agreement with the fp32 package, teacher-forced, on
  two chat texts, both reported. The public one is the start of the chat corpus of
  `tools/fidelity.py` (chatterbot-corpus' English dialogues, about 1,250 positions);
  int8 must agree at least 98% there (issue 2's bar; the whole corpus, 4,392
  positions, gives 98.5%: docs/MODELS.md). The second is the conversations written
  for this test (about 1,100 positions of human-written answers, with more near-ties
  in fp32): int8 reaches 97.4% there, and the test holds it to at least 97%.
  int4 is held to 97% on both. The fp32 reference is the dequantized Q4_1 file
  itself, so int4 differs from it only by the int8 rounding of activations, int8
  also by requantizing the weights.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from checkpoints import smollm2_gguf
from conftest import REPO_ROOT

import edgeslm
from edgeslm.export import export_model

sys.path.insert(0, str(REPO_ROOT / "tools"))
import fidelity  # noqa: E402

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Turn on the kitchen lights and set them to 40 percent.",
    "Give me three tips for a good night's sleep.",
]

# Conversations written for this test (teacher-forced text for the agreement check).
TRANSCRIPTS = [
    [
        ("user", "How do I make a good cup of tea?"),
        (
            "assistant",
            "Boil fresh water, warm the pot, and add one spoon of loose tea per cup. "
            "Pour the water over it and let it steep for three to five minutes. "
            "Strain it into a cup and add milk or lemon if you like.",
        ),
    ],
    [
        ("user", "Set the living room thermostat to 21 degrees, please."),
        (
            "assistant",
            "Done. The living room thermostat is now set to 21 °C. Would you like "
            "me to lower it again at night?",
        ),
        ("user", "Yes, 17 degrees at 11 pm."),
        ("assistant", "All right: 17 °C from 11 pm every night, starting today."),
    ],
    [
        ("system", "You are a concise assistant for a smart home."),
        ("user", "Which lights are still on downstairs?"),
        (
            "assistant",
            "The kitchen ceiling light and the hallway lamp are on. The living "
            "room is dark. Shall I switch the two of them off?",
        ),
        ("user", "Only the hallway one."),
        ("assistant", "The hallway lamp is off now; the kitchen light stays on."),
    ],
    [
        ("user", "Can you help me plan a three-day trip to Lisbon?"),
        (
            "assistant",
            "Of course. Day one: walk through Alfama, ride tram 28 and watch the "
            "sunset from a viewpoint. Day two: take the train to Sintra for the "
            "palaces and gardens. Day three: visit Belém, try the custard tarts and "
            "end with dinner by the river.",
        ),
        ("user", "Is it easy to get around without a car?"),
        (
            "assistant",
            "Yes. The metro, trams and buses cover the city, and a rechargeable "
            "card works on all of them. Bring comfortable shoes: the hills are steep.",
        ),
    ],
    [
        ("system", "You answer questions about cooking briefly."),
        ("user", "My bread always comes out flat. What am I doing wrong?"),
        (
            "assistant",
            "Flat bread usually means the dough rose too long or too little. Check "
            "that your yeast is fresh, knead until the dough is smooth and springy, "
            "and bake it as soon as it has doubled in size.",
        ),
        ("user", "And how hot should the oven be?"),
        ("assistant", "Around 220 °C for a crusty loaf, with a tray of water below."),
    ],
    [
        ("user", "What is the difference between weather and climate?"),
        (
            "assistant",
            "Weather is what the atmosphere does over hours or days: rain today, "
            "sunshine tomorrow. Climate is the pattern of weather over decades, such "
            "as how warm a region's summers usually are.",
        ),
        ("user", "So one cold winter does not disprove warming?"),
        (
            "assistant",
            "Right. A single season is weather; warming shows up in long-term "
            "averages across the whole planet.",
        ),
    ],
    [
        ("user", "Remind me to call the dentist tomorrow at nine."),
        (
            "assistant",
            "I have set a reminder for tomorrow at 9:00: call the dentist. Do you "
            "want a second reminder ten minutes before?",
        ),
        ("user", "No thanks. What's on my calendar after that?"),
        (
            "assistant",
            "At 10:30 you have a video call with the design team, and lunch with "
            "Sam at 12:45.",
        ),
    ],
    [
        ("user", "Write a short poem about a cat watching the rain."),
        (
            "assistant",
            "Behind the glass the grey cat sits,\nand counts the drops that race "
            "and split;\nshe flicks her tail at every stream,\nand half asleep, "
            "she starts to dream.",
        ),
    ],
    [
        ("user", "How many minutes are there in a week?"),
        (
            "assistant",
            "A week has 7 days of 24 hours, and each hour has 60 minutes, so "
            "7 × 24 × 60 = 10,080 minutes.",
        ),
        ("user", "And seconds?"),
        ("assistant", "Multiply by 60 again: 604,800 seconds."),
    ],
    [
        ("user", "Explain in two sentences why the sky is blue."),
        (
            "assistant",
            "Sunlight is scattered by the molecules of the air, and short blue "
            "wavelengths are scattered far more than long red ones. So wherever you "
            "look away from the sun, blue light reaches your eyes from every "
            "direction.",
        ),
    ],
]


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    gguf_path = smollm2_gguf()
    root = tmp_path_factory.mktemp("smollm2")
    fp32 = export_model(gguf_path, root / "fp32", dtype="fp32")
    int8 = export_model(gguf_path, root / "int8", dtype="int8")
    int4 = export_model(gguf_path, root / "int4", dtype="int4")
    return gguf_path, fp32, int8, int4


@pytest.fixture(scope="module")
def oracle(packages):
    from transformers import AutoModelForCausalLM

    gguf_path = packages[0]
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    # Generate through end-of-turn tokens, as edgeslm does with ignore_eos.
    model.generation_config.eos_token_id = None
    return model.eval()


def test_fp32_greedy_matches_transformers(packages, oracle):
    model = edgeslm.load(packages[1], n_threads=2)
    for question in CHAT_PROMPTS:
        text = model.chat_template.render([{"role": "user", "content": question}])
        ids = model.tokenize(text, add_bos=False)
        with torch.no_grad():
            out = oracle.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=32,
                do_sample=False,
            )
        expected = out[0, len(ids) :].tolist()
        got = model.generate(ids, max_tokens=32, temperature=0, ignore_eos=True)
        assert got.tokens == expected, question


# Teacher-forced positions of the public chat text (tools/fidelity.py's corpus).
CORPUS_POSITIONS = 1200
# Lowest next-token agreement with fp32 accepted, per text and variant (see above).
# The figures move by tenths of a percent with changes far below the quantization
# error: four SwiGLU epilogues within 2 ulp of the exact value each (onnxruntime's
# ops, float64, two orders of edgeslm's polynomial) gave int4 95.96-97.28% on the
# written text and 98.26-98.58% on the corpus, int8 97.81-98.07% and 98.66-99.21%,
# because the int8 rounding of activations turns a 1-ulp change into a whole step
# now and then. The bounds sit below that spread; the corpus int8 one is issue 2's.
MIN_AGREEMENT = {
    ("corpus", "int8"): 0.98,
    ("written", "int8"): 0.97,
    ("corpus", "int4"): 0.97,
    ("written", "int4"): 0.955,
}


def chat_texts(model) -> dict[str, list[list[int]]]:
    """Token ids of the two texts: the corpus' first conversations up to
    CORPUS_POSITIONS, and this test's own conversations."""
    corpus, n = [], 0
    for messages in fidelity.transcripts(8):
        if n >= CORPUS_POSITIONS:
            break
        corpus.append(
            model.tokenize(model.chat_template.render(messages), add_bos=False)
        )
        n += len(corpus[-1])
    written = [
        model.tokenize(
            model.chat_template.render([{"role": r, "content": c} for r, c in t]),
            add_bos=False,
        )
        for t in TRANSCRIPTS
    ]
    return {"corpus": corpus, "written": written}


@pytest.fixture(scope="module")
def reference_choices(packages) -> dict[str, list[tuple[list[int], list[int]]]]:
    """Per text, each conversation's token ids and fp32's top-1 next token at
    every position."""
    fp32 = edgeslm.load(packages[1], n_threads=2)
    choices = {}
    for text, conversations in chat_texts(fp32).items():
        choices[text] = []
        for ids in conversations:
            fp32.reset()
            choices[text].append((ids, [int(fp32.forward([t]).argmax()) for t in ids]))
    return choices


@pytest.mark.parametrize("variant", ["int8", "int4"])
def test_quantized_top1_agreement_with_fp32(
    packages, reference_choices, variant, report
):
    model = edgeslm.load(packages[2 if variant == "int8" else 3], n_threads=2)
    rates = {}
    for text, conversations in reference_choices.items():
        agree = total = 0
        for ids, expected in conversations:
            model.reset()
            for token, want in zip(ids, expected, strict=True):
                agree += int(int(model.forward([token]).argmax()) == want)
                total += 1
        rates[text] = agree / total
        report(
            f"SmolLM2 {variant} vs fp32 next-token top-1 agreement, {text} text: "
            f"{rates[text]:.2%} of {total}"
        )
        assert total >= 1000
    for text, rate in rates.items():
        assert rate >= MIN_AGREEMENT[text, variant], (text, rate)


def test_int4_package_holds_the_gguf_blocks(packages):
    # The weights the int4 graph computes with, rebuilt from its MatMulQ4
    # initializers (nibbles, scales and minimums in 16-row groups), are the fp32
    # package's weights: the file's Q4_1 blocks, carried over exactly.
    import onnx
    from onnx import numpy_helper

    from edgeslm.export.quantize import PackedQ4, unpack_q4

    def initializers(package):
        model = onnx.load(str(package / "model.onnx"))
        return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}

    int4, fp32 = initializers(packages[3]), initializers(packages[1])
    for name in ("layers.0.qkv", "layers.7.w_down"):
        expected = fp32[f"{name}.weight"].T
        packed = PackedQ4(
            data=int4[f"{name}.qweight4"],
            scales=int4[f"{name}.scales"],
            mins=int4[f"{name}.mins"],
            n=expected.shape[0],
            k=expected.shape[1],
        )
        weight = unpack_q4(packed).dequantize()
        np.testing.assert_allclose(weight, expected, rtol=0, atol=1e-6)
