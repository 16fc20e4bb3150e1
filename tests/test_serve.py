"""`edgeslm serve` through the official `openai` client, on the default model.

SmolLM2-135M-Instruct int8 (`edgeslm.load()`, exported once into the user cache)
behind a server on a free port, with an API key. The client validates every
answer against its own response types (`_strict_response_validation`), so a
field of the wrong shape fails the test. Greedy answers through the API are
compared with the same request made in-process: the server must add nothing and
lose nothing. Embeddings use all-MiniLM-L6-v2 (`load_encoder()`).
"""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import openai
import pytest
from serve_harness import assert_error, client, request, serving

import edgeslm
from edgeslm.serve import App

KEY = "sk-test-board"
LIGHT_TOOL = {
    "type": "function",
    "function": {
        "name": "set_light",
        "description": "Switch the light of a room on or off",
        "parameters": {
            "type": "object",
            "properties": {
                "room": {"type": "string", "maxLength": 20},
                "on": {"type": "boolean"},
            },
            "required": ["room", "on"],
        },
    },
}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather forecast for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 24}},
            "required": ["city"],
        },
    },
}


@pytest.fixture(scope="module")
def model():
    return edgeslm.load(n_threads=1)


@pytest.fixture(scope="module")
def encoder():
    from edgeslm.encoder import load_encoder

    return load_encoder()


@pytest.fixture(scope="module")
def app(model, encoder):
    return App(model, encoder, model_id="smollm2", encoder_id="minilm")


@pytest.fixture(scope="module")
def server(app):
    with serving(app, api_key=KEY) as server:
        yield server


@pytest.fixture(scope="module")
def api(server):
    return client(server, KEY)


def in_process(app, method: str, *args, **options):
    """The same generation made directly on the served model, in its turn, from
    an empty cache (see `fresh`)."""
    with app.queue.turn():
        app.model.reset()
        return getattr(app.model, method)(*args, **options)


def fresh(app) -> None:
    """Empty the served model's cache, so the next request computes its prompt
    from scratch. A prompt served from the cache rounds its int8 products in
    another order (docs/SERVER.md, "Seeds"), which may flip a near-tie; tests
    that compare two answers token for token start both from the same state."""
    with app.queue.turn():
        app.model.reset()


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# --- completions, chat, streaming ---------------------------------------------


def test_chat_answers_like_the_in_process_api(api, app):
    messages = ask("Name the capital of France.")
    fresh(app)
    answer = api.chat.completions.create(
        model="smollm2", messages=messages, max_tokens=24, temperature=0
    )
    direct = in_process(app, "chat", messages, max_tokens=24, temperature=0)

    choice = answer.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == direct.text
    assert "Paris" in choice.message.content
    assert choice.finish_reason == "stop"  # SmolLM2 ends the sentence
    assert answer.model == "smollm2" and answer.object == "chat.completion"
    assert answer.usage.prompt_tokens == direct.stats.prompt_tokens
    assert answer.usage.completion_tokens == len(direct.tokens)
    assert answer.usage.total_tokens == (
        answer.usage.prompt_tokens + answer.usage.completion_tokens
    )


def test_streamed_chat_is_the_same_text_in_pieces(api, app):
    options = dict(model="smollm2", messages=ask("Name three colours."), max_tokens=30)
    fresh(app)
    whole = api.chat.completions.create(temperature=0, **options)
    fresh(app)
    chunks = list(
        api.chat.completions.create(
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            **options,
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([p for p in pieces if p]) > 3  # token by token, not one blob
    assert "".join(pieces) == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason
    assert all(f is None for f in finishes[:-1])
    assert len({c.id for c in chunks}) == 1
    usage = chunks[-1].usage  # include_usage: a last chunk with no choices
    assert chunks[-1].choices == [] and usage == whole.usage


def test_text_completion_and_its_stream(api, app, server):
    prompt = "The capital of France is"
    fresh(app)
    answer = api.completions.create(
        model="smollm2", prompt=prompt, max_tokens=8, temperature=0
    )
    direct = in_process(app, "generate", prompt, max_tokens=8, temperature=0)
    assert answer.choices[0].text == direct.text
    assert answer.choices[0].finish_reason in ("length", "stop")
    assert answer.usage.completion_tokens == len(direct.tokens)

    lenient = client(server, KEY, strict=False)  # see serve_harness.client
    fresh(app)
    stream = lenient.completions.create(
        model="smollm2",
        prompt=prompt,
        max_tokens=8,
        temperature=0,
        stream=True,
        echo=True,
    )
    chunks = list(stream)
    assert all(c.object == "text_completion" for c in chunks)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == prompt + direct.text
    assert chunks[-1].choices[0].finish_reason == answer.choices[0].finish_reason


def test_sampling_options_reach_the_sampler(api):
    options = dict(
        model="smollm2",
        messages=ask("Write a sentence about the sea."),
        max_tokens=16,
        temperature=1.0,
        top_p=0.9,
    )
    # A prompt computed in one batch and the same prompt's last token computed
    # on top of the cache round differently (int8 kernels), enough to change a
    # sampled token: warm the cache first so both seeded requests reuse it.
    api.chat.completions.create(seed=0, **options)
    first = api.chat.completions.create(seed=-7, **options)  # OpenAI seeds may be < 0
    again = api.chat.completions.create(seed=-7, **options)
    assert first.choices[0].message.content == again.choices[0].message.content
    others = {
        api.chat.completions.create(seed=s, **options).choices[0].message.content
        for s in (1, 2, 3)
    }
    assert len(others) > 1  # the seed, not the server, decides

    short = api.chat.completions.create(
        model="smollm2",
        messages=ask("Count from one to ten."),
        max_tokens=3,
        temperature=0,
    )
    assert short.choices[0].finish_reason == "length"
    assert short.usage.completion_tokens == 3

    stopped = api.chat.completions.create(
        model="smollm2",
        messages=ask("Name the capital of France."),
        max_tokens=24,
        temperature=0,
        stop=["Paris"],
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert "Paris" not in stopped.choices[0].message.content


# --- structured output and tools ------------------------------------------------

COMMAND = {
    "type": "object",
    "properties": {
        "device": {"enum": ["light", "heater", "fan", "blinds"]},
        "room": {"type": "string", "maxLength": 20},
        "on": {"type": "boolean"},
    },
    "required": ["device", "room", "on"],
}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_response_format_json_schema_is_obeyed(api, stream):
    validator = jsonschema.Draft202012Validator(COMMAND)
    for text in (
        "Turn on the kitchen lights",
        "Switch the heater in the bedroom off",
        "Start the fan in the office",
    ):
        answer = api.chat.completions.create(
            model="smollm2",
            messages=ask(text),
            max_tokens=60,
            temperature=0,
            stream=stream,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "command", "schema": COMMAND, "strict": True},
            },
        )
        if stream:
            chunks = list(answer)
            content = "".join(c.choices[0].delta.content or "" for c in chunks)
            finish = chunks[-1].choices[0].finish_reason
        else:
            content = answer.choices[0].message.content
            finish = answer.choices[0].finish_reason
        assert finish == "stop", content
        value = json.loads(content)
        assert not list(validator.iter_errors(value)), (text, content)


def test_json_object_mode_gives_an_object(api):
    answer = api.chat.completions.create(
        model="smollm2",
        messages=ask("Describe a cat as JSON with a name and an age."),
        max_tokens=60,
        temperature=0,
        response_format={"type": "json_object"},
    )
    if answer.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(answer.choices[0].message.content), dict)
    else:  # cut by max_tokens: still the start of an object
        assert answer.choices[0].message.content.startswith("{")


def _check_call(call, tool: dict) -> dict:
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == tool["function"]["name"]
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, tool["function"]["parameters"])
    return arguments


def test_tool_calls(api):
    tools = [LIGHT_TOOL, WEATHER_TOOL]
    answer = api.chat.completions.create(
        model="smollm2",
        messages=ask("Turn on the kitchen lights"),
        tools=tools,
        tool_choice="required",
        max_tokens=60,
        temperature=0,
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    tool = LIGHT_TOOL if call.function.name == "set_light" else WEATHER_TOOL
    _check_call(call, tool)

    # A named function, streamed: the call arrives as one tool_calls delta.
    chunks = list(
        api.chat.completions.create(
            model="smollm2",
            messages=ask("Will it rain in Paris tomorrow?"),
            tools=tools,
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            max_tokens=60,
            temperature=0,
            stream=True,
        )
    )
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    calls = [d.tool_calls for d in deltas if d.tool_calls]
    assert len(calls) == 1 and calls[0][0].index == 0
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    args = _check_call(calls[0][0], WEATHER_TOOL)
    assert args["city"]

    # The call's result goes back as a tool message; the answer is text.
    history = [
        *ask("Will it rain in Paris tomorrow?"),
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [calls[0][0].model_dump(exclude={"index"})],
        },
        {
            "role": "tool",
            "tool_call_id": calls[0][0].id,
            "content": '{"forecast": "rain", "chance": 0.8}',
        },
    ]
    reply = api.chat.completions.create(
        model="smollm2",
        messages=history,
        tools=tools,
        tool_choice="none",
        max_tokens=40,
        temperature=0,
    )
    assert reply.choices[0].message.tool_calls is None
    assert reply.choices[0].message.content


def test_auto_tool_choice_answers_a_call_or_text(api):
    answer = api.chat.completions.create(
        model="smollm2",
        messages=ask("Switch off the bedroom light"),
        tools=[LIGHT_TOOL],
        max_tokens=60,
        temperature=0,
    )
    message = answer.choices[0].message
    if message.tool_calls:
        assert answer.choices[0].finish_reason == "tool_calls"
        _check_call(message.tool_calls[0], LIGHT_TOOL)
    else:
        assert message.content and not message.content.startswith("<tool_call>")


# --- embeddings, models, keys ----------------------------------------------------


def test_embeddings_match_the_encoder(api, encoder, server):
    texts = ["turn on the kitchen light", "switch the kitchen lamp on", "is it raining"]
    # Without encoding_format the client asks for base64 and decodes it after
    # validation, so only the lenient client takes that answer.
    lenient = client(server, KEY, strict=False)
    answer = lenient.embeddings.create(model="minilm", input=texts)
    assert answer.model == "minilm" and answer.object == "list"
    assert [d.index for d in answer.data] == [0, 1, 2]
    vectors = np.array([d.embedding for d in answer.data], dtype=np.float32)
    direct = encoder.embed(texts)
    assert vectors.shape == (3, encoder.dim)
    np.testing.assert_allclose(vectors, direct, atol=1e-6)
    assert answer.usage.prompt_tokens > len(texts)
    similar, unrelated = vectors[0] @ vectors[1], vectors[0] @ vectors[2]
    assert similar > unrelated

    # Floats as JSON numbers: the same values.
    one = api.embeddings.create(model="minilm", input=texts[0], encoding_format="float")
    np.testing.assert_allclose(one.data[0].embedding, direct[0], atol=1e-6)


def test_models_lists_both_and_keys_are_checked(api, server):
    ids = sorted(m.id for m in api.models.list())
    assert ids == ["minilm", "smollm2"]
    assert api.models.retrieve("smollm2").id == "smollm2"
    with pytest.raises(openai.NotFoundError):
        api.models.retrieve("gpt-4")

    wrong = client(server, "sk-wrong")
    with pytest.raises(openai.AuthenticationError) as caught:
        wrong.models.list()
    assert caught.value.body["code"] == "invalid_api_key"
    status, _, body = request(server, "GET", "/v1/models")  # no key at all
    assert_error(status, body, 401)
    status, _, body = request(server, "GET", "/health")  # probes need no key
    assert status == 200 and body["status"] == "ok"


def test_bad_values_are_openai_errors(api):
    with pytest.raises(openai.BadRequestError) as caught:
        api.chat.completions.create(model="smollm2", messages=ask("hi"), max_tokens=-1)
    assert caught.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as caught:
        api.chat.completions.create(
            model="smollm2", messages=ask("hi"), extra_body={"max_token": 5}
        )
    assert caught.value.body["code"] == "unknown_field"
    assert "max_tokens" in caught.value.body["message"]  # the hint
    with pytest.raises(openai.BadRequestError) as caught:
        api.chat.completions.create(
            model="smollm2",
            messages=ask("hi"),
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "object", "not": {}}},
            },
        )
    assert "not" in caught.value.body["message"]
    # And the server goes on answering.
    ok = api.chat.completions.create(model="smollm2", messages=ask("hi"), max_tokens=2)
    assert ok.usage.completion_tokens <= 2


def test_an_encoder_package_alone_serves_embeddings(encoder):
    from edgeslm.serve import load_app

    alone = load_app(str(encoder.package))
    assert alone.model is None and alone.encoder is not None
    with serving(alone) as server:
        api = client(server)
        assert [m.id for m in api.models.list()] == [encoder.package.name]
        answer = api.embeddings.create(
            model=encoder.package.name, input="hello", encoding_format="float"
        )
        assert len(answer.data[0].embedding) == encoder.dim
        with pytest.raises(openai.NotFoundError) as caught:
            api.chat.completions.create(model="x", messages=ask("hi"), max_tokens=1)
        assert caught.value.body["code"] == "model_not_found"
        status, _, body = request(
            server, "POST", "/v1/embeddings", {"input": ["ok", ""]}
        )
        assert_error(status, body, 400, "input[1]")
