"""High-level structured output: classification, extraction and tool calls.

Built on the constraints of `edgeslm.constraints`; `Model.choose`, `Model.extract`
and `Model.tool_call` call these functions.

- `choose`: classify a text into one of a closed set of labels.
- `extract`: pull a JSON object matching a schema out of a text.
- `tool_call`: given tool definitions (name, description, JSON-schema parameters),
  the model either calls one tool, with arguments valid against its schema, or
  answers in plain text.

Tool calls are written in the format the model's chat template expects when the
template renders tools itself (`tool_call_format` recognizes the Hermes / Qwen
`<tool_call>` blocks, SmolLM2's list inside `<tool_call>` tags, Llama 3.1's JSON
with "parameters", and Mistral's `[TOOL_CALLS]`). For any other template, which
includes every model edgeslm ships, the tools are listed in a system message
(`DEFAULT_TOOL_PROMPT`) and the call is a Hermes block (`DEFAULT_TOOL_FORMAT`):
`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`.
docs/STRUCTURED.md says why, and how well SmolLM2-135M picks tools.

Does not do yet: several tool calls in one answer (the list formats hold one).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgeslm.constraints import Constraint, StructuredGeneration, lark_json
from edgeslm.errors import ConstraintError, UnsupportedSchemaError
from edgeslm.schema_closing import DATA_KEYWORDS, escape_pointer

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_TOOL_FORMAT",
    "DEFAULT_TOOL_PROMPT",
    "TOOL_CALL_CLOSE",
    "TOOL_CALL_FORMATS",
    "TOOL_CALL_OPEN",
    "Tool",
    "ToolCall",
    "ToolCallFormat",
    "ToolResponse",
    "choose",
    "extract",
    "tool_call",
    "tool_call_format",
]

# Labels and text in one user message, each label quoted: on SmolLM2-135M this
# reads the text more reliably than labels in the system message.
DEFAULT_CHOOSE_SYSTEM = "You are a precise text classifier."
DEFAULT_CHOOSE_PROMPT = (
    'Classify this text into one of the labels {labels}.\n\nText: "{text}"'
)

DEFAULT_EXTRACT_PROMPT = (
    "Extract the information in the user's text as JSON following this schema:\n"
    "{schema}\nUse only facts from the text."
)
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass(frozen=True)
class Tool:
    """A function the model may call.

    Attributes:
        name: letters, digits, `_`, `.` or `-`, at most 64 characters.
        description: what it does, for the model.
        parameters: JSON schema of the arguments object.
    """

    name: str
    description: str = ""
    parameters: Mapping[str, Any] = field(
        default_factory=lambda: {"type": "object", "properties": {}}
    )

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ConstraintError(
                f"tool name must be 1-64 letters, digits, '_', '.' or '-', "
                f"got {self.name!r}"
            )
        if not isinstance(self.parameters, Mapping):
            raise ConstraintError(
                f"tool {self.name!r}: parameters must be a JSON schema (dict)"
            )

    @classmethod
    def from_spec(cls, spec: Tool | Mapping[str, Any]) -> Tool:
        """A `Tool` from itself, `{"name", "description", "parameters"}`, or the
        OpenAI shape `{"type": "function", "function": {...}}`."""
        if isinstance(spec, Tool):
            return spec
        if not isinstance(spec, Mapping):
            raise ConstraintError(
                f"a tool must be a dict with name, description and parameters, "
                f"got {type(spec).__name__}"
            )
        fn = spec.get("function", spec)
        if not isinstance(fn, Mapping) or "name" not in fn:
            raise ConstraintError(f"a tool needs a 'name', got keys {sorted(spec)}")
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        return cls(str(fn["name"]), str(fn.get("description", "")), dict(params))

    def to_spec(self) -> dict[str, Any]:
        """The OpenAI / Hugging Face shape that chat templates expect."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": dict(self.parameters),
            },
        }


@dataclass(frozen=True)
class ToolCall:
    """A validated call: `arguments` satisfies the tool's parameter schema."""

    name: str
    arguments: dict[str, Any]


@dataclass
class ToolResponse:
    """What the model did with the tools.

    Attributes:
        call: the tool call, or None for a plain answer.
        text: the plain answer (or the raw tool-call text).
        generation: the underlying generation (tokens, timings).
    """

    call: ToolCall | None
    text: str
    generation: StructuredGeneration


# --- classification and extraction ------------------------------------------------


def choose(
    model: Any,
    text: str,
    options: Sequence[str],
    *,
    instruction: str | None = None,
    **gen_options: Any,
) -> str:
    """Classify `text` into one of `options` (greedy by default).

    Args:
        model: a loaded `Model`.
        text: what to classify.
        options: the labels; the answer is exactly one of them.
        instruction: the system message (default: `DEFAULT_CHOOSE_SYSTEM`); the
            user message is `DEFAULT_CHOOSE_PROMPT` with the labels and the text.
        **gen_options: generation options (`temperature`, `seed`, ...).

    Raises:
        ConstraintError: bad options. TruncatedOutputError: max_tokens too small.
    """
    constraint = Constraint.choice(options)
    # A label of n UTF-8 bytes never takes more than n tokens.
    gen_options.setdefault(
        "max_tokens", max(len(o.encode()) for o in constraint.source) + 1
    )
    labels = " or ".join(repr(label) for label in constraint.source)
    prompt = DEFAULT_CHOOSE_PROMPT.format(labels=labels, text=_text(text))
    messages = [
        {"role": "system", "content": instruction or DEFAULT_CHOOSE_SYSTEM},
        {"role": "user", "content": prompt},
    ]
    return model.chat(messages, choices=constraint, **gen_options).value()


def extract(
    model: Any,
    text: str,
    schema: Mapping[str, Any] | str,
    *,
    instruction: str | None = None,
    **gen_options: Any,
) -> Any:
    """Extract a JSON value matching `schema` from `text` and return it parsed.

    Args:
        model: a loaded `Model`.
        text: the source text.
        schema: JSON schema of the answer (dict or JSON text).
        instruction: the system message; `{schema}` is replaced by the schema
            (default: `DEFAULT_EXTRACT_PROMPT`).
        **gen_options: generation options (`max_tokens`, `temperature`, ...).

    Raises:
        ConstraintError / UnsupportedSchemaError: the schema cannot be used.
        TruncatedOutputError: the answer did not finish within max_tokens.
    """
    constraint = Constraint.json_schema(schema)
    system = (instruction or DEFAULT_EXTRACT_PROMPT).replace(
        "{schema}", json.dumps(constraint.source, ensure_ascii=False)
    )
    messages = [
        {"role": "system", "content": system},
        {"role": "user", "content": _text(text)},
    ]
    return model.chat(messages, json_schema=constraint, **gen_options).value()


# --- tool calls -------------------------------------------------------------------


@dataclass(frozen=True)
class ToolCallFormat:
    """How a model writes one tool call: `prefix`, a JSON object, `suffix`.

    The object is `{"name": <tool name>, <arguments_key>: {...}}`. A part of the
    prefix or suffix that is a special token of the model's vocabulary
    (`<tool_call>`, `[TOOL_CALLS]`) is generated as that token.

    Attributes:
        name: the key in `TOOL_CALL_FORMATS`.
        prefix: text before the JSON object ("" for none).
        suffix: text after it.
        arguments_key: "arguments", or "parameters" (Llama 3.1's JSON calls).
    """

    name: str
    prefix: str
    suffix: str
    arguments_key: str = "arguments"

    def render(self, name: str, arguments: Mapping[str, Any]) -> str:
        """A call as the model writes it (for earlier calls in a conversation)."""
        body = {"name": name, self.arguments_key: dict(arguments)}
        return f"{self.prefix}{json.dumps(body, ensure_ascii=False)}{self.suffix}"

    def is_call(self, raw: str) -> bool:
        """Whether a constrained answer (special tokens kept) is a call."""
        start = self.prefix.strip() or "{"
        return raw.lstrip().startswith(start)

    def parse(self, raw: str) -> dict[str, Any]:
        """The JSON object of a call written by `render` or by the grammar.

        Raises:
            ConstraintError: not a call in this format.
        """
        body = raw.strip().removeprefix(self.prefix.strip())
        body = body.removesuffix(self.suffix.strip()).strip()
        try:
            data = json.loads(body)
        except json.JSONDecodeError as exc:
            raise ConstraintError(f"tool call is not JSON ({exc}): {raw!r}") from exc
        if not isinstance(data, dict) or not isinstance(
            data.get(self.arguments_key), dict
        ):
            raise ConstraintError(
                f"tool call must be an object with name and {self.arguments_key}, "
                f"got {raw!r}"
            )
        return data


TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
# The formats of the chat templates edgeslm recognizes (`tool_call_format`).
TOOL_CALL_FORMATS = {
    # Hermes 2/3, Qwen 2.5, SmolLM3: one object per <tool_call> block.
    "hermes": ToolCallFormat("hermes", f"{TOOL_CALL_OPEN}\n", f"\n{TOOL_CALL_CLOSE}"),
    # SmolLM2's function-calling convention: a list of calls inside the tags.
    "smollm2": ToolCallFormat("smollm2", f"{TOOL_CALL_OPEN}[", f"]{TOOL_CALL_CLOSE}"),
    # Llama 3.1 / 3.2: a bare JSON object with "parameters".
    "llama3-json": ToolCallFormat("llama3-json", "", "", "parameters"),
    # Mistral v3 templates: a control token, then a list of calls.
    "mistral": ToolCallFormat("mistral", "[TOOL_CALLS] [", "]"),
}
# For a template that does not render tools (SmolLM2-135M's, Llama-68M-Chat's,
# ChatML): `DEFAULT_TOOL_PROMPT` in a system message, answers in this format.
DEFAULT_TOOL_FORMAT = TOOL_CALL_FORMATS["hermes"]
DEFAULT_TOOL_PROMPT = (
    "You can call these tools:\n<tools>\n{tools}\n</tools>\n"
    "To call a tool, answer only with:\n{example}\n"
    "If no tool fits, answer the user in plain text."
)
TOOL_CHOICES = ("auto", "required", "none")
# Parts of a prefix or suffix that may be special tokens.
_MARKER = re.compile(r"(<[^<>\s]+>|\[[A-Z_]+\])")


def tool_call_format(model: Any) -> tuple[ToolCallFormat, bool]:
    """The call format `model` expects, and whether its template renders tools.

    A template that reads `tools` and writes calls in a known format gets the
    tools (the template says how to call them); any other gets
    `DEFAULT_TOOL_PROMPT` and `DEFAULT_TOOL_FORMAT`.
    """
    source = model.chat_template.source
    if not re.search(r"\btools\b", source):
        return DEFAULT_TOOL_FORMAT, False
    if "[TOOL_CALLS]" in source:
        return TOOL_CALL_FORMATS["mistral"], True
    if re.search(r"<tool_call>(\\n|\n|\s)*\[", source):
        return TOOL_CALL_FORMATS["smollm2"], True
    if TOOL_CALL_OPEN in source:
        return TOOL_CALL_FORMATS["hermes"], True
    if "ipython" in source and re.search(r"\"parameters\"\s*:", source):
        return TOOL_CALL_FORMATS["llama3-json"], True
    log.info(
        "the chat template renders tools but writes calls in a format edgeslm "
        "does not know; offering them with the default prompt instead"
    )
    return DEFAULT_TOOL_FORMAT, False


def tool_call(
    model: Any,
    messages: Sequence[Mapping[str, Any]] | str,
    tools: Sequence[Tool | Mapping[str, Any]],
    *,
    tool_choice: str = "auto",
    call_format: ToolCallFormat | str | None = None,
    **gen_options: Any,
) -> ToolResponse:
    """Let the model call one of `tools` or answer in plain text.

    Args:
        model: a loaded `Model`.
        messages: the conversation (or one user message as text). Assistant
            messages may carry earlier calls as OpenAI `tool_calls`; `tool`
            messages carry their results.
        tools: `Tool`s or dicts (`{"name", "description", "parameters"}` or the
            OpenAI `{"type": "function", "function": {...}}` shape).
        tool_choice: "auto" (call or answer), "required" (must call one), "none"
            (plain answer, tools not offered), or a tool name (must call that one).
        call_format: override the format (`TOOL_CALL_FORMATS` key or a
            `ToolCallFormat`); default: `tool_call_format(model)`.
        **gen_options: generation options.

    Returns:
        The call (its arguments valid against the tool's schema) or the answer.

    Raises:
        ConstraintError: malformed tools, tool_choice or earlier calls.
        TruncatedOutputError: the answer did not finish within max_tokens.
    """
    specs = [Tool.from_spec(t) for t in tools]
    names = [t.name for t in specs]
    if not specs or len(set(names)) != len(names):
        raise ConstraintError(
            f"tools must be a non-empty list of distinct names, got {names}"
        )
    if tool_choice not in TOOL_CHOICES and tool_choice not in names:
        raise ConstraintError(
            f"tool_choice must be one of {TOOL_CHOICES} or a tool name {names}, "
            f"got {tool_choice!r}"
        )
    expected, native = tool_call_format(model)
    fmt = expected if call_format is None else _format(call_format)
    native = native and fmt == expected  # else the template would ask for another
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    offered = [] if tool_choice == "none" else specs
    prompt = _render_with_tools(model, list(messages), offered, fmt, native)
    callable_tools = [t for t in specs if tool_choice in (*TOOL_CHOICES, t.name)]
    grammar = _tool_grammar(model, callable_tools, tool_choice, fmt)
    gen = model.generate(prompt, add_bos=False, grammar=grammar, **gen_options)
    if not gen.complete:
        gen.value()  # raises TruncatedOutputError with the details
    raw = model.tokenizer.decode(gen.tokens, skip_special_tokens=False)
    if tool_choice == "none" or not fmt.is_call(raw):
        return ToolResponse(None, gen.text, gen)
    data = fmt.parse(raw)
    if data.get("name") not in names:  # the grammar makes this unreachable
        raise ConstraintError(f"tool call names an unknown tool: {data.get('name')!r}")
    call = ToolCall(data["name"], data[fmt.arguments_key])
    return ToolResponse(call, gen.text, gen)


def _format(value: ToolCallFormat | str) -> ToolCallFormat:
    if isinstance(value, ToolCallFormat):
        return value
    if value not in TOOL_CALL_FORMATS:
        raise ConstraintError(
            f"call_format must be one of {sorted(TOOL_CALL_FORMATS)} or a "
            f"ToolCallFormat, got {value!r}"
        )
    return TOOL_CALL_FORMATS[value]


def _render_with_tools(
    model: Any,
    messages: list[Mapping[str, Any]],
    tools: list[Tool],
    fmt: ToolCallFormat,
    native: bool,
) -> str:
    """The prompt: the template renders the tools if it knows how, else we do."""
    template = model.chat_template
    if native:
        # The template renders earlier calls itself, from `tool_calls`.
        history = [{**m, "content": m.get("content") or ""} for m in messages]
        return template.render(history, tools=[t.to_spec() for t in tools] or None)
    history = [_calls_as_text(m, fmt) for m in messages]
    if not tools:
        return template.render(history)
    listing = "\n".join(json.dumps(t.to_spec(), ensure_ascii=False) for t in tools)
    example = fmt.render("<tool name>", {}).replace("{}", "<arguments object>")
    prompt = DEFAULT_TOOL_PROMPT.format(tools=listing, example=example)
    if history and history[0].get("role") == "system":
        first = dict(history[0])
        first["content"] = f"{first.get('content', '')}\n\n{prompt}".strip()
        history = [first, *history[1:]]
    else:
        history = [{"role": "system", "content": prompt}, *history]
    return template.render(history)


def _calls_as_text(message: Mapping[str, Any], fmt: ToolCallFormat) -> dict:
    """A message whose OpenAI `tool_calls` are written into its text in `fmt`."""
    out = {k: v for k, v in message.items() if k != "tool_calls"}
    calls = message.get("tool_calls")
    if not calls:
        return out
    if not isinstance(calls, Sequence) or isinstance(calls, str):
        raise ConstraintError("tool_calls must be a list of calls")
    texts = [message["content"]] if message.get("content") else []
    for call in calls:
        fn = call.get("function", call) if isinstance(call, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise ConstraintError(f"each tool call needs function.name, got {call!r}")
        args = fn.get("arguments") or {}
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError as exc:
                raise ConstraintError(
                    f"tool call {fn['name']!r}: arguments are not JSON ({exc})"
                ) from exc
        if not isinstance(args, Mapping):
            raise ConstraintError(f"tool call {fn['name']!r}: arguments not an object")
        texts.append(fmt.render(fn["name"], args))
    out["content"] = "\n".join(texts)
    return out


def _tool_grammar(
    model: Any, tools: list[Tool], tool_choice: str, fmt: ToolCallFormat
) -> Constraint:
    """Lark grammar: one call in `fmt` with a tool's JSON, or plain text.

    Raises:
        ConstraintError / UnsupportedSchemaError: a tool's parameters cannot be
            used (the message names the tool and where in its parameters).
    """
    # A plain answer must not start like a call (nor with whitespace).
    first = (fmt.prefix.strip() or "{")[0]
    answer = f"answer: /[^{re.escape(first)}\\s](.|\\n)*/"
    if tool_choice == "none":
        return Constraint.lark(f"start: answer\n{answer}")
    call_schema: dict[str, Any] = {
        "anyOf": [_call_schema(t, fmt, f"/anyOf/{i}") for i, t in enumerate(tools)]
    }
    # Engine options apply to a whole JSON document: those of any tool, to all.
    options = [t.parameters.get("x-guidance") for t in tools]
    options = [o for o in options if isinstance(o, Mapping)]
    if options:
        call_schema["x-guidance"] = {k: v for o in options for k, v in o.items()}
    call = (
        f"call: {_lark_text(model, fmt.prefix)} call_json "
        f"{_lark_text(model, fmt.suffix)}\n"
        f"call_json: {lark_json(call_schema)}"
    )
    if tool_choice == "auto":
        return Constraint.lark(f"start: call | answer\n{call}\n{answer}")
    return Constraint.lark(f"start: call\n{call}")


def _call_schema(tool: Tool, fmt: ToolCallFormat, ptr: str) -> dict[str, Any]:
    """The JSON schema of a call of `tool`, for the place `ptr` of the grammar's.

    The parameters are checked on their own first, so that an error points into
    them as for `json_schema=`. Nested in the call, their local `$ref`s
    (`#/$defs/Room`, as pydantic writes them) are rewritten to point into their
    new place; a top-level `$id` would change what those resolve against, so it
    goes (with `$schema`: both describe a document, not a nested schema).

    Raises:
        ConstraintError / UnsupportedSchemaError: the parameters cannot be used.
    """
    try:
        Constraint.json_schema(tool.parameters)
    except UnsupportedSchemaError as exc:
        raise UnsupportedSchemaError(_tool_error(tool, exc), exc.features) from exc
    except ConstraintError as exc:
        raise ConstraintError(_tool_error(tool, exc)) from exc
    key = fmt.arguments_key
    params = {k: v for k, v in tool.parameters.items() if k not in ("$id", "$schema")}
    return {
        "type": "object",
        "properties": {
            "name": {"const": tool.name},
            key: _rerooted(params, f"{ptr}/properties/{escape_pointer(key)}"),
        },
        "required": ["name", key],
    }


def _tool_error(tool: Tool, exc: ConstraintError) -> str:
    """`exc`'s message (about a json_schema) said of `tool`'s parameters."""
    return f"tool {tool.name!r}: parameters {str(exc).removeprefix('json_schema ')}"


def _rerooted(value: Any, base: str) -> Any:
    """A copy of `value` whose local `$ref`s ("#/...") point under `base`."""
    if isinstance(value, list):
        return [_rerooted(item, base) for item in value]
    if not isinstance(value, Mapping):
        return value
    out = {}
    for key, sub in value.items():
        local = isinstance(sub, str) and (sub == "#" or sub.startswith("#/"))
        if key == "$ref" and local:
            out[key] = f"#{base}{sub[1:]}"
        elif key in DATA_KEYWORDS:
            out[key] = sub
        else:
            out[key] = _rerooted(sub, base)
    return out


def _lark_text(model: Any, text: str) -> str:
    """`text` as a Lark sequence; markers in the vocabulary as special tokens."""
    parts = []
    for piece in _MARKER.split(text):
        if not piece:
            continue
        token_id = model.tokenizer.token_to_id(piece)
        if _MARKER.fullmatch(piece) and token_id is not None:
            if model.tokenizer.is_special(token_id):
                parts.append(f"<[{token_id}]>")
                continue
        parts.append(json.dumps(piece))
    return " ".join(parts)


def _text(text: Any) -> str:
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return text
