"""The default model through the GGUF path: SmolLM2-135M-Instruct (Q4_1 GGUF).

- fp32 export: identical greedy continuations to transformers loading the same file
  (`gguf_file=`), fed the same token ids (transformers' GGUF tokenizer misses the
  `smollm` digit split, see test_tokenizer.py, so ids come from edgeslm's tokenizer).
- int8 export: next-token top-1 agreement with the fp32 package over a few hundred
  positions of chat text, at least 98%.
"""

from __future__ import annotations

import pytest
import torch
from checkpoints import smollm2_gguf

import edgeslm
from edgeslm.export import export_model

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
    return gguf_path, fp32, int8


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


def test_int8_top1_agreement_with_fp32(packages, report):
    fp32 = edgeslm.load(packages[1], n_threads=2)
    int8 = edgeslm.load(packages[2], n_threads=2)
    agree = total = 0
    for transcript in TRANSCRIPTS:
        messages = [{"role": r, "content": c} for r, c in transcript]
        ids = fp32.tokenize(fp32.chat_template.render(messages), add_bos=False)
        fp32.reset()
        int8.reset()
        for token in ids:
            expected = int(fp32.forward([token]).argmax())
            agree += int(int(int8.forward([token]).argmax()) == expected)
            total += 1
    rate = agree / total
    report(f"SmolLM2 int8 vs fp32 next-token top-1 agreement: {rate:.2%} of {total}")
    assert total >= 300
    assert rate >= 0.98
