"""The OpenAI request bodies: checked field by field and turned into edgeslm options.

Each endpoint has a table of the fields it accepts. A field is one of:

- supported: checked (type and range) and passed to the model;
- an edgeslm extension (`top_k`, `min_p`, `repetition_penalty`, `ignore_eos`):
  vLLM's names (llama.cpp's server calls the penalty `repeat_penalty`);
- accepted and ignored, because it cannot change the answer here (`user`,
  `metadata`, `store`, `service_tier`, `parallel_tool_calls`);
- accepted only at its default (`n: 1`, `logprobs: false`, ...), because this server
  cannot honour any other value and a silently different answer is worse than an
  error.

Any other top-level field is an error (400) naming it: a typo such as `max_token`
would otherwise be dropped silently and the request served with defaults. Unknown
keys inside a message are ignored. `null` means "the default" for every optional
field, as in OpenAI's API.

Nothing here touches HTTP or the model: the server module does both.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

# OpenAI's own limits where it states them; larger ones are this server's.
MAX_STOP_STRINGS = 4
MAX_EMBEDDING_INPUTS = 2048
MAX_SEED = 2**63


class APIError(Exception):
    """An error answered as an OpenAI error object.

    Attributes:
        status: HTTP status code.
        message: what was wrong and what to do.
        param: the request field at fault, if one is.
        code: a short machine-readable reason.
        type: OpenAI's error type (`invalid_request_error`, `server_error`, ...).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def bad(param: str, message: str, code: str = "invalid_value") -> APIError:
    """A 400 error about one field."""
    return APIError(400, f"{param}: {message}", param=param, code=code)


# --- field checkers: (value, name) -> normalized value, or raise APIError ------------

Check = Callable[[Any, str], Any]


def _type_name(value: Any) -> str:
    return {
        bool: "boolean",
        int: "integer",
        float: "number",
        str: "string",
        list: "array",
        dict: "object",
    }.get(type(value), type(value).__name__)


def integer(lo: int | None = None, hi: int | None = None) -> Check:
    def check(value: Any, name: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad(
                name, f"must be an integer, got {_type_name(value)}", "invalid_type"
            )
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            where = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise bad(name, f"must be {where}, got {value}")
        return value

    return check


def number(lo: float, hi: float, *, open_lo: bool = False) -> Check:
    def check(value: Any, name: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad(
                name, f"must be a number, got {_type_name(value)}", "invalid_type"
            )
        value = float(value)
        low_ok = value > lo if open_lo else value >= lo
        if not (math.isfinite(value) and low_ok and value <= hi):
            bracket = "(" if open_lo else "["
            raise bad(name, f"must be in {bracket}{lo:g}, {hi:g}], got {value:g}")
        return value

    return check


def boolean(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise bad(
            name, f"must be true or false, got {_type_name(value)}", "invalid_type"
        )
    return value


def string(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise bad(name, f"must be a string, got {_type_name(value)}", "invalid_type")
    return value


def obj(value: Any, name: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise bad(name, f"must be an object, got {_type_name(value)}", "invalid_type")
    return dict(value)


def ignored(value: Any, name: str) -> None:
    """Accepted for compatibility; has no effect on this server."""
    return None


def only(default: Any, why: str) -> Check:
    """A field this server supports only at its default value (or null)."""

    def check(value: Any, name: str) -> Any:
        if value != default and not (default is False and value == 0):
            raise bad(
                name, f"only {default!r} is supported: {why}", "unsupported_value"
            )
        return default

    return check


def stop_strings(value: Any, name: str) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise bad(name, "must be a string or an array of strings", "invalid_type")
    if len(items) > MAX_STOP_STRINGS or any(not s for s in items):
        raise bad(name, f"give 1 to {MAX_STOP_STRINGS} non-empty strings")
    return items


def stream_options(value: Any, name: str) -> dict[str, bool]:
    opts = obj(value, name)
    unknown = sorted(set(opts) - {"include_usage"})
    if unknown:
        raise bad(name, f"unknown option(s) {unknown}; supported: include_usage")
    include = opts.get("include_usage")
    return {"include_usage": False if include is None else boolean(include, name)}


# --- what each endpoint accepts ----------------------------------------------------

SAMPLING: dict[str, Check] = {
    "model": string,
    "max_tokens": integer(1),
    "temperature": number(0.0, 2.0),
    "top_p": number(0.0, 1.0, open_lo=True),
    "stop": stop_strings,
    "seed": integer(-MAX_SEED, MAX_SEED - 1),
    "stream": boolean,
    "stream_options": stream_options,
    "frequency_penalty": number(-2.0, 2.0),
    "presence_penalty": number(-2.0, 2.0),
    "n": only(1, "one answer per request; send several requests"),
    "logit_bias": only({}, "the sampler has no per-token bias here yet"),
    "user": ignored,
    # edgeslm extensions (vLLM's names; llama.cpp's server has repeat_penalty)
    "top_k": integer(0),
    "min_p": number(0.0, 1.0),
    "repetition_penalty": number(0.0, 100.0, open_lo=True),
    "ignore_eos": boolean,
}

CHAT_FIELDS: dict[str, Check] = {
    **SAMPLING,
    "messages": lambda v, n: v,  # checked by chat_messages
    "max_completion_tokens": integer(1),
    "response_format": obj,
    "tools": lambda v, n: v,  # checked by the tools module
    "tool_choice": lambda v, n: v,
    "parallel_tool_calls": ignored,
    "logprobs": only(False, "token log-probabilities are not reported"),
    "top_logprobs": only(0, "token log-probabilities are not reported"),
    "metadata": ignored,
    "store": ignored,
    "service_tier": ignored,
}

COMPLETION_FIELDS: dict[str, Check] = {
    **SAMPLING,
    "prompt": lambda v, n: v,  # checked by completion_prompt
    "echo": boolean,
    "suffix": only(None, "fill-in-the-middle is not supported"),
    "best_of": only(1, "one candidate per request"),
    "logprobs": only(0, "token log-probabilities are not reported"),
}

EMBEDDING_FIELDS: dict[str, Check] = {
    "model": string,
    "input": lambda v, n: v,  # checked by embedding_inputs
    "encoding_format": lambda v, n: _one_of(v, n, ("float", "base64")),
    "dimensions": integer(1),
    "user": ignored,
}

# Names a client may mean when it sends an old or another API's field.
HINTS = {
    "functions": "use tools (the functions field is OpenAI's older form)",
    "function_call": "use tool_choice (function_call is OpenAI's older form)",
    "max_token": "did you mean max_tokens?",
    "repeat_penalty": "did you mean repetition_penalty?",
    "stop_sequences": "did you mean stop?",
}


def _one_of(value: Any, name: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise bad(name, f"must be one of {list(allowed)}, got {value!r}")
    return value


def check_fields(body: Any, fields: Mapping[str, Check]) -> dict[str, Any]:
    """The request's fields, each checked; nulls dropped; unknown fields refused.

    Raises:
        APIError: 400 naming the first field at fault.
    """
    if not isinstance(body, Mapping):
        raise APIError(
            400,
            f"the request body must be a JSON object, got {_type_name(body)}",
            code="invalid_body",
        )
    unknown = [k for k in body if k not in fields]
    if unknown:
        name = unknown[0]
        close = difflib.get_close_matches(name, list(fields), n=1, cutoff=0.75)
        hint = HINTS.get(name) or (
            f"did you mean {close[0]}?"
            if close
            else "see docs/SERVER.md for the fields this server accepts"
        )
        raise bad(name, f"unknown field ({hint})", "unknown_field")
    checked = {}
    for name, value in body.items():
        if value is not None:
            checked[name] = fields[name](value, name)
    return checked


# --- requests, parsed ----------------------------------------------------------------


@dataclass
class GenerationRequest:
    """A chat or completion request, checked.

    Attributes:
        options: keyword options for `Model.generate` / `Model.chat`, without
            `max_tokens` when the request left it to the server.
        stream: answer as server-sent events.
        include_usage: send a last event with token counts (stream only).
        max_tokens: the requested limit, or None.
        fields: every checked field, for what the endpoint reads itself.
    """

    options: dict[str, Any]
    stream: bool
    include_usage: bool
    max_tokens: int | None
    fields: dict[str, Any] = field(default_factory=dict)


def generation_request(body: Any, fields: Mapping[str, Check]) -> GenerationRequest:
    """Check a chat or completion body and map it onto generation options."""
    f = check_fields(body, fields)
    max_tokens = f.get("max_tokens")
    if "max_completion_tokens" in f:
        if max_tokens is not None and max_tokens != f["max_completion_tokens"]:
            raise bad(
                "max_completion_tokens",
                f"differs from max_tokens ({max_tokens}); give one of the two",
            )
        max_tokens = f["max_completion_tokens"]

    stream = f.get("stream", False)
    if "stream_options" in f and not stream:
        raise bad("stream_options", "only allowed with stream: true")
    include_usage = f.get("stream_options", {}).get("include_usage", False)

    # OpenAI's defaults: temperature 1, top_p 1.
    options: dict[str, Any] = {"temperature": f.get("temperature", 1.0)}
    for name in ("top_p", "frequency_penalty", "presence_penalty", "top_k", "min_p"):
        if name in f:
            options[name] = f[name]
    for name in ("repetition_penalty", "ignore_eos", "stop"):
        if name in f:
            options[name] = f[name]
    if "seed" in f:
        options["seed"] = f["seed"] % 2**64  # OpenAI seeds may be negative
    if max_tokens is not None:
        options["max_tokens"] = max_tokens
    return GenerationRequest(options, stream, include_usage, max_tokens, f)


def chat_messages(value: Any) -> list[dict[str, Any]]:
    """OpenAI messages as the chat template takes them: role and text content.

    Text parts are joined; `developer` becomes `system`; an assistant message with
    `tool_calls` and a `tool` message keep those keys for the tools module.

    Raises:
        APIError: 400 naming the message at fault.
    """
    if not isinstance(value, list) or not value:
        raise bad("messages", "must be a non-empty array of message objects")
    out = []
    for i, message in enumerate(value):
        name = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise bad(name, f"must be an object, got {_type_name(message)}")
        role = message.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant", "tool"):
            raise bad(
                f"{name}.role",
                f"must be system, developer, user, assistant or tool, got {role!r}",
            )
        calls = message.get("tool_calls")
        content = message_text(message.get("content"), f"{name}.content")
        if content is None and not (role == "assistant" and calls):
            raise bad(f"{name}.content", "is required (a string or text parts)")
        entry: dict[str, Any] = {"role": role, "content": content or ""}
        if role == "assistant" and calls:
            entry["tool_calls"] = calls
        out.append(entry)
    return out


def message_text(content: Any, name: str) -> str | None:
    """A message's text: a string, or the text of an array of content parts."""
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad(
            name, f"must be a string or an array of parts, got {_type_name(content)}"
        )
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise bad(
                f"{name}[{j}]",
                f"only text parts are supported ({{'type': 'text', 'text': ...}}), "
                f"got type {kind!r}",
                "unsupported_value",
            )
        texts.append(part["text"])
    return "".join(texts)


def completion_prompt(value: Any) -> str | list[int]:
    """The prompt of /v1/completions: a string, one string in an array, or token ids.

    Raises:
        APIError: 400 for other shapes (several prompts in one request included).
    """
    if isinstance(value, str):
        return value
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        return value[0]
    if (
        isinstance(value, list)
        and value
        and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    ):
        return list(value)
    raise bad(
        "prompt",
        "must be a string, an array of one string, or an array of token ids "
        "(one prompt per request)",
    )


def embedding_inputs(value: Any) -> list[str]:
    """The texts of /v1/embeddings: a string or an array of non-empty strings."""
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts:
        raise bad("input", "must be a string or a non-empty array of strings")
    if len(texts) > MAX_EMBEDDING_INPUTS:
        raise bad("input", f"at most {MAX_EMBEDDING_INPUTS} texts per request")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise bad(
                f"input[{i}]",
                f"must be a string, got {_type_name(text)} (token-id inputs are not "
                "supported)",
                "invalid_type",
            )
        if not text:
            raise bad(f"input[{i}]", "must not be empty")
    return texts
