"""Constraints without the big model: errors, the mask and the sampler, the loop.

- Errors: every schema feature llguidance cannot handle is named (and located)
  by an `UnsupportedSchemaError` when the `Constraint` is made; malformed
  regexes, grammars, choices and option combinations get a `ConstraintError`.
- The mask and the sampler agree (fuzzed): over random masks, logits, biases,
  penalties and settings, the C kernel (portable and SIMD) and the numpy
  reference never choose a token outside the mask, and choose the same token.
- Real masks: random-logit walks under llguidance's masks for the test suite's
  constraints, on SmolLM2's byte-level BPE vocabulary and the Llama
  SentencePiece vocabulary, always end in a valid output.
- The loop: a random-weight Llama (`tiny_package`) generating under constraints
  at random settings always completes validly, and stops exactly at the end.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import gguf
import jsonschema
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import edgeslm
from edgeslm.cli import main as cli_main
from edgeslm.constraints import (
    Constraint,
    GrammarEngine,
    constraint_from_options,
    engine_for,
)
from edgeslm.errors import (
    ConstraintError,
    KernelError,
    TruncatedOutputError,
    UnsupportedSchemaError,
)
from edgeslm.export.tokenizer_build import tokenizer_from_gguf
from edgeslm.hub import default_model_gguf
from edgeslm.sampling import Sampler, SamplerSettings, mask_words
from edgeslm.tokenizer import Tokenizer

DATA = Path(__file__).parent / "data" / "structured"
FORMATS = jsonschema.Draft202012Validator.FORMAT_CHECKER


def load(name: str) -> dict:
    return json.loads((DATA / name).read_text(encoding="utf-8"))


# --- errors, named by feature -----------------------------------------------------

UNSUPPORTED = [
    # (schema, features named, text the message must contain)
    (
        {"type": "object", "properties": {"a": {"not": {"type": "string"}}}},
        ("not",),
        "/properties/a/not",
    ),
    (
        {"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}},
        ("if", "then"),
        "anyOf",
    ),
    ({"type": "array", "uniqueItems": True}, ("uniqueItems",), "/uniqueItems"),
    ({"type": "array", "contains": {"type": "integer"}}, ("contains",), "contains"),
    (
        {"type": "object", "dependentRequired": {"a": ["b"]}},
        ("dependentRequired",),
        "dependentRequired",
    ),
    ({"type": "object", "propertyNames": {"maxLength": 3}}, ("propertyNames",), "/"),
    (
        {"type": "object", "unevaluatedProperties": False},
        ("unevaluatedProperties",),
        "additionalProperties",
    ),
    ({"type": "string", "format": "credit-card"}, ("format: credit-card",), "pattern"),
    ({"oneOf": [{"type": "number"}, {"type": "integer"}]}, ("oneOf",), "anyOf"),
    (
        {"type": "string", "pattern": "^(?=a)a+$"},
        ("pattern with look-around",),
        "(?=a)",
    ),
    ({"type": "string", "pattern": "\\bx"}, ("pattern with look-around",), "\\b"),
    (
        {"type": "string", "pattern": "^(a)\\1$"},
        ("pattern with backreference",),
        "\\1",
    ),
    (
        {"$ref": "https://example.com/other.json"},
        ("$ref to an external document",),
        "$defs",
    ),
]


@pytest.mark.parametrize(
    "schema,features,where", UNSUPPORTED, ids=[f[0] for _, f, _ in UNSUPPORTED]
)
def test_unsupported_schema_features_are_named(schema, features, where):
    # Raised when the constraint is made: no model or tokenizer involved.
    with pytest.raises(UnsupportedSchemaError) as info:
        Constraint.json_schema(schema)
    assert info.value.features == features
    message = str(info.value)
    assert where in message
    for feature in features:
        assert feature.split()[-1] in message  # "look-around", "credit-card"


def test_a_property_named_like_a_keyword_is_not_blamed():
    schema = {
        "type": "object",
        "properties": {"not": {"type": "string"}, "b": {"not": {"const": 1}}},
    }
    with pytest.raises(UnsupportedSchemaError) as info:
        Constraint.json_schema(schema)
    assert "/properties/b/not" in str(info.value)
    assert "/properties/not" not in str(info.value).replace("/properties/b/not", "")


def test_lenient_schema_compiles_and_coerced_one_of_too():
    Constraint.json_schema({"not": {"type": "string"}, "x-guidance": {"lenient": True}})
    Constraint.json_schema(
        {
            "oneOf": [{"type": "number"}, {"type": "integer"}],
            "x-guidance": {"coerce_one_of": True},
        }
    )


@pytest.mark.parametrize(
    "schema,needle",
    [
        ({"type": "integer", "minimum": 5, "maximum": 1}, "accepts no value"),
        ({"type": "array", "minItems": 3, "maxItems": 1}, "accepts no value"),
        ({"enum": []}, "accepts no value"),
        ({"type": "strnig"}, "Invalid type: strnig"),
        ({"type": "string", "maxLength": -1}, "maxLength"),
        ({"$ref": "#/$defs/missing"}, "/$defs/missing"),
        ({"type": "string", "pattern": "[a-z"}, "unclosed character class"),
        ("{not json", "not valid JSON"),
        (["a list"], "must be a JSON object"),
        (False, "accepts nothing"),
    ],
)
def test_invalid_schemas_say_what_is_wrong(schema, needle):
    with pytest.raises(ConstraintError, match=re.escape(needle)) as info:
        Constraint.json_schema(schema)
    assert not isinstance(info.value, UnsupportedSchemaError)


@pytest.mark.parametrize(
    "make,arg,needle",
    [
        (Constraint.regex, "(a", "unclosed group"),
        (Constraint.regex, "a(?=b)", "look-around"),
        (Constraint.regex, "(a)\\1", "backreference"),
        (Constraint.regex, "", "non-empty string"),
        (Constraint.lark, "start: foo", 'unknown name: "foo"'),
        (Constraint.lark, "  ", "non-empty text"),
        (Constraint.lark, 'start: x\nx: %json {"not": {}}', "'not'"),
        (Constraint.choice, [], "at least one"),
        (Constraint.choice, ["a", "a"], "repeated: ['a']"),
        (Constraint.choice, "ab", "list of strings"),
        (Constraint.choice, ["a", ""], "non-empty strings"),
    ],
)
def test_malformed_constraints_say_what_is_wrong(make, arg, needle):
    with pytest.raises(ConstraintError, match=re.escape(needle)):
        make(arg)


def test_constraint_options():
    assert constraint_from_options({}) is None
    assert constraint_from_options({"response_format": {"type": "text"}}) is None
    c = constraint_from_options({"response_format": {"type": "json_object"}})
    assert c.kind == "json_schema" and c.source == {"type": "object"}
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    spec = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    assert constraint_from_options({"response_format": spec}).source == schema
    options = {"regex": "[0-9]", "temperature": 1.0}
    assert constraint_from_options(options).kind == "regex"
    assert options == {"temperature": 1.0}  # the constraint option is popped
    with pytest.raises(ConstraintError, match="at most one constraint"):
        constraint_from_options({"regex": "a", "choices": ["a"]})
    with pytest.raises(ConstraintError, match="response_format must be"):
        constraint_from_options({"response_format": {"type": "yaml"}})


# --- the mask and the sampler agree (fuzzed) --------------------------------------

SETTINGS = st.builds(
    SamplerSettings,
    temperature=st.sampled_from([0.0, 0.3, 0.7, 1.0, 1.5, 4.0]),
    top_k=st.sampled_from([0, 0, 1, 2, 5, 40, 100_000]),
    top_p=st.sampled_from([1.0, 1.0, 0.95, 0.5, 0.1, 1e-9]),
    min_p=st.sampled_from([0.0, 0.0, 0.05, 0.2, 1.0]),
    repetition_penalty=st.sampled_from([1.0, 1.3, 0.8]),
    frequency_penalty=st.sampled_from([0.0, 0.5, -0.25]),
    presence_penalty=st.sampled_from([0.0, 0.4, -0.4]),
    penalty_window=st.sampled_from([0, 8, 64]),
    seed=st.integers(0, 2**63 - 1),
)


def pack(allowed: np.ndarray) -> np.ndarray:
    """Boolean (vocab,) -> the packed (ceil(vocab / 32),) uint32 mask."""
    bits = np.zeros(mask_words(allowed.size) * 32, dtype=bool)
    bits[: allowed.size] = allowed
    return np.packbits(bits, bitorder="little").view("<u4").astype(np.uint32)


def hostile_case(rng: np.random.Generator, vocab: int) -> tuple:
    """Logits, mask, bias and recent tokens that all pull towards masked tokens."""
    allowed = rng.random(vocab) < rng.choice([0.001, 0.05, 0.5, 0.99])
    allowed[rng.integers(0, vocab)] = True
    logits = (rng.standard_normal(vocab) * rng.choice([0.1, 3.0, 30.0])).astype(
        np.float32
    )
    banned = np.flatnonzero(~allowed)
    if banned.size:
        # The best logits, +inf and NaN all sit on masked tokens.
        top = rng.choice(banned, min(banned.size, 20), replace=False)
        logits[top] = rng.choice([50.0, 1e30, np.inf, np.nan], top.size)
    if rng.random() < 0.3:  # some allowed tokens are impossible too
        some = np.flatnonzero(allowed)[:: int(rng.integers(2, 5))]
        logits[some] = -np.inf
    bias = {}
    if banned.size and rng.random() < 0.5:
        ids = rng.choice(banned, min(banned.size, 5), replace=False)
        bias = {int(i): float(rng.choice([5.0, 1e6])) for i in ids}
    recent = rng.choice(banned if banned.size else vocab, int(rng.integers(0, 40)))
    return logits, allowed, bias, [int(t) for t in recent]


def outcome(sampler: Sampler, logits: np.ndarray, **kw) -> int | str:
    try:
        return sampler.sample(logits.copy(), **kw)
    except KernelError as exc:  # C and numpy word their messages differently
        return "all masked" if "masked out" in str(exc) else f"KernelError: {exc}"


@settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    vocab=st.sampled_from([1, 2, 31, 32, 33, 100, 1000, 4099, 49152]),
    config=SETTINGS,
    seed=st.integers(0, 2**32 - 1),
)
def test_no_token_outside_the_mask_is_ever_chosen(lib, vocab, config, seed):
    rng = np.random.default_rng(seed)
    logits, allowed, bias, recent = hostile_case(rng, vocab)
    kw = {"mask": pack(allowed), "bias": bias, "recent_tokens": recent}
    before = lib.esl_simd_level()
    results = []
    try:
        for level in (0, 1):  # portable C, then the best SIMD level
            lib.esl_simd_set(level)
            results.append(outcome(Sampler(config, vocab, backend="c"), logits, **kw))
    finally:
        lib.esl_simd_set(before)
    results.append(outcome(Sampler(config, vocab, backend="numpy"), logits, **kw))

    assert len(set(results)) == 1, results  # C (both levels) == numpy reference
    token = results[0]
    if isinstance(token, str):
        # Only when every allowed token is impossible.
        assert token == "all masked" and np.isneginf(logits[allowed]).all(), token
    else:
        assert allowed[token], (token, results)


def test_c_sampler_leaves_masked_logits_at_minus_infinity(lib):
    rng = np.random.default_rng(11)
    for _ in range(50):
        logits, allowed, bias, recent = hostile_case(rng, 3000)
        x = logits.copy()
        Sampler(SamplerSettings(temperature=1.0, seed=2), 3000, backend="c").sample(
            x, mask=pack(allowed), bias=bias, recent_tokens=recent
        )
        assert np.isneginf(x[~allowed]).all()


# --- real masks from llguidance, random logits --------------------------------------


@pytest.fixture(scope="module")
def smollm2_engine(tmp_path_factory):
    """SmolLM2's byte-level BPE vocabulary (from the GGUF), as the engine sees it."""
    folder = tmp_path_factory.mktemp("smollm2-tokenizer")
    info = tokenizer_from_gguf(
        gguf.GGUFReader(default_model_gguf(install=True)), folder
    )
    text = (folder / "tokenizer.json").read_text(encoding="utf-8")
    eos = (info.eos_token_id, *info.extra_eos_token_ids)
    return GrammarEngine(text, 49152, eos), Tokenizer.from_file(
        folder / "tokenizer.json"
    )


@pytest.fixture(scope="module")
def tiny(tiny_package):
    return edgeslm.load(tiny_package, n_threads=1)


def suite_constraints() -> list[tuple[str, Constraint, object]]:
    """(name, constraint, checker) for every constraint of the test data."""
    out = []
    for entry in load("schemas.json")["schemas"]:
        validator = jsonschema.Draft202012Validator(
            entry["schema"], format_checker=FORMATS
        )
        out.append(
            (
                entry["name"],
                Constraint.json_schema(entry["schema"]),
                lambda text, v=validator: v.validate(json.loads(text)) is None,
            )
        )
    for case in load("regex.json")["cases"]:
        pattern = case["pattern"]
        out.append(
            (
                pattern,
                Constraint.regex(pattern),
                lambda text, p=pattern: re.fullmatch(p, text) is not None,
            )
        )
    for case in load("choices.json")["cases"]:
        options = case["options"]
        out.append(
            (
                "|".join(options),
                Constraint.choice(options),
                lambda text, o=options: text in o,
            )
        )
    return out


def random_walk(engine, constraint, rng, backend, max_steps=400):
    """Sample under the guide's masks from adversarial random logits.

    Returns (tokens, complete). Asserts at every step that the chosen token is
    allowed by the mask and accepted by the matcher.
    """
    guide = engine.compile(constraint)
    config = SamplerSettings(
        temperature=float(rng.choice([0.0, 0.7, 1.0, 2.0])),
        top_k=int(rng.choice([0, 0, 3, 40])),
        top_p=float(rng.choice([1.0, 0.9])),
        seed=int(rng.integers(0, 2**62)),
    )
    sampler = Sampler(config, engine.vocab_size, backend=backend)
    tokens: list[int] = []
    for _ in range(max_steps):
        if rng.random() < 0.3 and (forced := guide.forced()):
            guide.advance(forced)  # as the generate loop's fast-forward does
            tokens += forced
            if guide.done:
                break
            continue
        mask = guide.mask()
        logits = (rng.standard_normal(engine.vocab_size) * 3).astype(np.float32)
        logits[rng.integers(0, engine.vocab_size, 30)] += 12  # likely masked
        token = sampler.sample(logits, mask=mask)
        assert (int(mask[token >> 5]) >> (token & 31)) & 1, token
        if token in engine.eos_ids:
            assert guide.complete  # EOS is allowed only once the output is whole
            break
        guide.advance([token])  # raises if the matcher rejects it
        tokens.append(token)
        if guide.done:
            break
    return tokens, guide.complete


def test_real_masks_keep_random_logits_valid_bpe(smollm2_engine):
    engine, tokenizer = smollm2_engine
    rng = np.random.default_rng(2024)
    for name, constraint, valid in suite_constraints():
        for walk in range(2):
            backend = ("c", "numpy")[walk]
            tokens, complete = random_walk(engine, constraint, rng, backend)
            text = tokenizer.decode(tokens)
            assert complete, (name, backend, text)
            assert valid(text), (name, backend, text)


def test_real_masks_keep_random_logits_valid_sentencepiece(tiny):
    engine = engine_for(tiny)
    rng = np.random.default_rng(7)
    for name, constraint, valid in suite_constraints()[::2]:
        tokens, complete = random_walk(engine, constraint, rng, "c")
        text = tiny.tokenizer.decode(tokens)
        assert complete and valid(text), (name, text)


# --- closed objects: a combined schema keeps the keys of all its parts --------------

BASE = {
    "type": "object",
    "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["id"],
}
SWITCH = {
    "type": "object",
    "properties": {"on": {"type": "boolean"}},
    "required": ["on"],
}
NAME = {"type": "string", "maxLength": 8}
COMBINED = [
    # (name, schema, valid values with the keys of every part of the combination)
    (
        "anyOf beside properties",
        {
            "type": "object",
            "properties": {"a": NAME},
            "required": ["a"],
            "anyOf": [{"properties": {"b": {"enum": [1, 2]}}, "required": ["b"]}],
        },
        [{"a": "x", "b": 1}],
    ),
    (
        "$ref beside properties",
        {
            "$defs": {"Base": BASE},
            "$ref": "#/$defs/Base",
            "properties": {"name": NAME},
            "required": ["name"],
        },
        [{"id": 1, "name": "x"}],
    ),
    (
        "$ref and properties in anyOf branches beside properties",
        {
            "$defs": {"Switch": SWITCH},
            "type": "object",
            "properties": {"room": {"enum": ["hall", "kitchen"]}},
            "required": ["room"],
            "anyOf": [
                {"$ref": "#/$defs/Switch"},
                {"properties": {"level": {"enum": [1, 2]}}, "required": ["level"]},
            ],
        },
        [{"room": "hall", "on": True}, {"room": "hall", "level": 2}],
    ),
    (
        "allOf of two objects",
        {"allOf": [SWITCH, {"properties": {"b": {"enum": [1]}}, "required": ["b"]}]},
        [{"on": True, "b": 1}],
    ),
    (
        "anyOf inside one allOf member, properties in the other",
        {
            "allOf": [
                {"anyOf": [SWITCH]},
                {"properties": {"room": {"enum": ["hall"]}}, "required": ["room"]},
            ]
        },
        [{"on": False, "room": "hall"}],
    ),
    (
        "a $defs object used alone and as the base of another",
        {
            "$defs": {"Base": BASE},
            "type": "object",
            "properties": {
                "plain": {"$ref": "#/$defs/Base"},
                "named": {
                    "$ref": "#/$defs/Base",
                    "properties": {"name": NAME},
                    "required": ["name"],
                },
            },
            "required": ["plain", "named"],
        },
        [{"plain": {"id": 1}, "named": {"id": 2, "name": "x"}}],
    ),
]


# A required key that no properties describe: any JSON value, so no random walk.
REQUIRED_ONLY = (
    "a required key without a property",
    {"type": "object", "properties": {"a": NAME}, "required": ["a", "b"]},
    [{"a": "x", "b": 1}],
)


def key_orders(value: dict) -> list[str]:
    """`value` as compact JSON, once per order of its top-level keys."""
    return [
        json.dumps({k: value[k] for k in keys})
        for keys in itertools.permutations(value)
    ]


def accepts(smollm2_engine, constraint: Constraint, text: str) -> bool:
    """Whether a guide for `constraint` takes the tokens of `text` as a whole answer."""
    engine, tokenizer = smollm2_engine
    guide = engine.compile(constraint)
    try:
        guide.advance(tokenizer.encode(text))
    except ConstraintError:
        return False
    return guide.complete


@pytest.mark.parametrize(
    "schema,values",
    [c[1:] for c in (*COMBINED, REQUIRED_ONLY)],
    ids=[c[0] for c in (*COMBINED, REQUIRED_ONLY)],
)
def test_combined_objects_accept_the_keys_of_every_part(smollm2_engine, schema, values):
    constraint = Constraint.json_schema(schema)  # no "accepts no value"
    for value in values:
        jsonschema.validate(value, schema)
        assert any(accepts(smollm2_engine, constraint, t) for t in key_orders(value))
        # Still closed: a key that no part declares is refused.
        extra = {**value, "zz": 1}
        assert not any(
            accepts(smollm2_engine, constraint, t) for t in key_orders(extra)
        )


def test_a_part_that_allows_unlisted_keys_keeps_its_combination_open(
    smollm2_engine,
):
    pattern = {"patternProperties": {"^x_": {"enum": [1]}}}
    extra = {"properties": {"a": {}}, "additionalProperties": {"enum": [1]}}
    for part in (pattern, extra):
        schema = {"properties": {"a": {"enum": [0]}}, "required": ["a"]}
        schema["allOf"] = [part]
        jsonschema.validate({"a": 0, "x_1": 1}, schema)
        constraint = Constraint.json_schema(schema)
        assert accepts(smollm2_engine, constraint, '{"a": 0, "x_1": 1}'), part


@pytest.mark.parametrize(
    "schema,values", [c[1:] for c in COMBINED], ids=[c[0] for c in COMBINED]
)
def test_combined_objects_random_walks_validate(smollm2_engine, schema, values):
    engine, tokenizer = smollm2_engine
    constraint = Constraint.json_schema(schema)
    rng = np.random.default_rng(31)
    for backend in ("c", "numpy", "c"):
        tokens, complete = random_walk(engine, constraint, rng, backend)
        text = tokenizer.decode(tokens)
        assert complete, text
        jsonschema.validate(json.loads(text), schema)


# --- the generate loop on a random-weight model -------------------------------------


def test_random_weight_model_always_obeys(tiny):
    """Whatever a model with random weights wants, the output is valid."""
    rng = np.random.default_rng(5)
    cases = suite_constraints()
    for i in range(24):
        name, constraint, valid = cases[int(rng.integers(len(cases)))]
        options = {
            "temperature": float(rng.choice([0.0, 1.0, 1.5])),
            "top_k": int(rng.choice([0, 20])),
            "repetition_penalty": float(rng.choice([1.0, 1.2])),
            "seed": i,
            "fast_forward": bool(i % 2),
        }
        tiny.reset()
        gen = tiny.generate("Answer:", grammar=constraint, max_tokens=200, **options)
        assert gen.complete and gen.finish_reason == "eos", (name, gen.text)
        assert valid(gen.text), (name, options, gen.text)


def test_generation_stops_exactly_when_the_constraint_is_complete(tiny):
    # A choice: the tokens spell the option, no EOS or anything else after it.
    gen = tiny.generate("Pick:", choices=["alpha", "beta"], max_tokens=50)
    assert gen.text in ("alpha", "beta") and gen.finish_reason == "eos"
    assert tiny.tokenizer.decode(gen.tokens) == gen.text
    assert gen.stats.generated_tokens == len(gen.tokens)
    # Three digits: the constraint allows nothing more, so the loop stops there
    # without asking the model (no EOS is sampled and none is in the tokens).
    gen = tiny.generate("Count:", regex="[0-9]{3}", max_tokens=50)
    assert re.fullmatch("[0-9]{3}", gen.text) and gen.finish_reason == "eos"
    assert not set(gen.tokens) & set(engine_for(tiny).eos_ids)
    # JSON: nothing after the closing brace.
    schema = {"type": "object", "properties": {"on": {"type": "boolean"}}}
    schema["required"] = ["on"]
    gen = tiny.generate("JSON:", json_schema=schema, max_tokens=50)
    assert gen.text.endswith("}") and gen.value() in ({"on": True}, {"on": False})


def test_cut_short_output_is_never_taken_as_valid(tiny):
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 40}},
        "required": ["name"],
    }
    gen = tiny.generate("JSON:", json_schema=schema, max_tokens=4)
    assert gen.finish_reason == "length" and not gen.complete
    with pytest.raises(TruncatedOutputError, match="raise max_tokens"):
        gen.value()
    gen = tiny.generate("JSON:", json_schema=schema, max_tokens=60, stop=['"'])
    assert gen.finish_reason == "stop" and not gen.complete


def test_constraint_options_conflicts_are_errors(tiny):
    with pytest.raises(ValueError, match="ignore_eos cannot be combined"):
        tiny.generate("x", regex="a", ignore_eos=True)
    with pytest.raises(ConstraintError, match="at most one constraint"):
        tiny.generate("x", regex="a", json_schema={"type": "object"})


def test_cli_constraint_flags(tiny_package, tmp_path, capsys):
    def run(*flags: str) -> str:
        args = ["generate", "Answer:", "-m", str(tiny_package), "--threads", "1"]
        assert cli_main([*args, "--temperature", "1.0", "--seed", "3", *flags]) == 0
        return capsys.readouterr().out.rstrip("\n")

    assert run("--choice", "alpha", "--choice", "beta") in ("alpha", "beta")
    assert re.fullmatch("[0-9]{2}-[a-z]{2}", run("--regex", "[0-9]{2}-[a-z]{2}"))
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    schema["required"] = ["n"]
    file = tmp_path / "schema.json"
    file.write_text(json.dumps(schema))
    for value in (str(file), json.dumps(schema)):  # a file, or the JSON itself
        jsonschema.validate(json.loads(run("--json-schema", value)), schema)
    grammar = tmp_path / "g.lark"
    grammar.write_text('start: "x=" /[0-9]/')
    assert re.fullmatch("x=[0-9]", run("--grammar", str(grammar)))
    # Cut short: the partial answer is printed, and the exit status says so.
    args = ["generate", "Answer:", "-m", str(tiny_package), "--max-tokens", "1"]
    assert cli_main([*args, "--regex", "[a-z]{20}"]) == 1
    assert "raise --max-tokens" in capsys.readouterr().err


def test_cli_names_the_unsupported_feature(tiny_package, tmp_path, capsys):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "array", "uniqueItems": True}))
    code = cli_main(
        ["generate", "List:", "-m", str(tiny_package), "--json-schema", str(schema)]
    )
    assert code == 1
    assert "uniqueItems" in capsys.readouterr().err
