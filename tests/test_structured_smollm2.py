"""Structured output on the default model, SmolLM2-135M-Instruct int8 (GGUF export).

- tests/data/structured/schemas.json: 22 JSON schemas (device commands, form
  extraction, nested objects, enums, numeric ranges, arrays, anyOf, optional and
  nullable fields) with 110 prompts. Every greedy answer must be complete, parse
  and validate with `jsonschema`; a subset again at temperature 1.0.
- regex.json and choices.json: every output matches / is one of the options.
- Tool calls: a validated `{name, arguments}` with `tool_choice="required"`.

One model is loaded for the module; the schema's system prompt is shared by its
prompts, so the cache computes it once per schema.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import jsonschema
import pytest
from checkpoints import smollm2_gguf

import edgeslm
from edgeslm.constraints import engine_for
from edgeslm.export import export_model

DATA = Path(__file__).parent / "data" / "structured"
# Generous for the suite's bounded schemas (strings have maxLength, arrays maxItems).
MAX_TOKENS = 160


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    package = export_model(
        smollm2_gguf(), tmp_path_factory.mktemp("smollm2") / "int8", dtype="int8"
    )
    return edgeslm.load(package, n_threads=2)


def load(name: str) -> dict:
    return json.loads((DATA / name).read_text(encoding="utf-8"))


def test_suite_is_big_enough():
    suite = load("schemas.json")["schemas"]
    assert len(suite) >= 20
    assert sum(len(entry["prompts"]) for entry in suite) >= 100
    for entry in suite:  # the schemas themselves are valid JSON Schema
        jsonschema.Draft202012Validator.check_schema(entry["schema"])


def run_suite(model, entries, report, label, **options):
    """Extract every prompt of `entries`; return (answers, failures)."""
    answers = failures = 0
    tokens = 0
    started = time.perf_counter()
    for entry in entries:
        validator = jsonschema.Draft202012Validator(entry["schema"])
        for prompt in entry["prompts"]:
            gen = _extract(model, prompt, entry["schema"], **options)
            tokens += len(gen.tokens)
            answers += 1
            assert gen.complete, (entry["name"], prompt, gen.text, gen.finish_reason)
            value = json.loads(gen.text)
            errors = [e.message for e in validator.iter_errors(value)]
            if errors:
                failures += 1
                print(f"{entry['name']}: {prompt!r} -> {gen.text} {errors}")
    seconds = time.perf_counter() - started
    report(
        f"structured {label}: {answers - failures}/{answers} valid, "
        f"{tokens} tokens in {seconds:.1f} s"
    )
    return answers, failures


def _extract(model, prompt, schema, **options):
    from edgeslm.structured import DEFAULT_EXTRACT_PROMPT

    system = DEFAULT_EXTRACT_PROMPT.replace("{schema}", json.dumps(schema))
    messages = [
        {"role": "system", "content": system},
        {"role": "user", "content": prompt},
    ]
    return model.chat(messages, json_schema=schema, max_tokens=MAX_TOKENS, **options)


def test_every_schema_answer_validates_greedy(model, report):
    suite = load("schemas.json")["schemas"]
    answers, failures = run_suite(model, suite, report, "greedy")
    assert answers >= 100
    assert failures == 0


def test_sampling_at_temperature_one_still_obeys(model, report):
    # Two prompts of every schema, sampled (seeded, so a failure reproduces).
    suite = [dict(e, prompts=e["prompts"][:2]) for e in load("schemas.json")["schemas"]]
    answers, failures = run_suite(
        model, suite, report, "T=1.0", temperature=1.0, seed=1234
    )
    assert answers >= 40
    assert failures == 0


def test_regex_outputs_match(model):
    for case in load("regex.json")["cases"]:
        messages = [{"role": "user", "content": case["prompt"]}]
        for options in ({}, {"temperature": 1.0, "seed": 7}):
            gen = model.chat(messages, regex=case["pattern"], max_tokens=48, **options)
            assert gen.complete, (case, gen.text)
            assert re.fullmatch(case["pattern"], gen.text), (case, gen.text)


def test_choice_outputs_are_options(model):
    for case in load("choices.json")["cases"]:
        for options in ({}, {"temperature": 1.0, "seed": 3}):
            label = model.choose(case["text"], case["options"], **options)
            assert label in case["options"], (case, label)


def test_choose_is_sensible_on_clear_cases(model):
    # Not a benchmark of a 135M model: cases it gets right, so a broken prompt
    # (labels missing, text not passed) shows up as the same answer for opposites.
    assert model.choose("What a wonderful day!", ["happy", "sad"]) == "happy"
    assert model.choose("I hate this, it is terrible.", ["happy", "sad"]) == "sad"
    assert model.choose("Stop the music", ["play", "stop"]) == "stop"


def test_extract_returns_python_objects(model):
    schema = load("schemas.json")["schemas"][0]["schema"]
    value = model.extract("Turn off the bedroom light.", schema)
    jsonschema.validate(value, schema)
    assert value["device"] == "light"


def test_tool_call_required_is_validated(model):
    tools = [
        {
            "type": "function",
            "function": {
                "name": "set_light",
                "description": "Switch a light on or off",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "room": {"type": "string", "maxLength": 20},
                        "on": {"type": "boolean"},
                    },
                    "required": ["room", "on"],
                },
            },
        },
        {
            "name": "get_weather",
            "description": "Weather forecast for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 30}},
                "required": ["city"],
            },
        },
    ]
    schemas = {
        "set_light": tools[0]["function"]["parameters"],
        "get_weather": tools[1]["parameters"],
    }
    for question in ("Turn off the bedroom light.", "What is the weather in Paris?"):
        response = model.tool_call(question, tools, tool_choice="required")
        assert response.call is not None, response.text
        jsonschema.validate(response.call.arguments, schemas[response.call.name])
    response = model.tool_call("Weather in Rome?", tools, tool_choice="get_weather")
    assert response.call.name == "get_weather"
    response = model.tool_call("Hi!", tools, tool_choice="none", max_tokens=16)
    assert response.call is None and not response.text.startswith("<")


def test_grammar_engine_is_built_once(model):
    assert engine_for(model) is engine_for(model)
