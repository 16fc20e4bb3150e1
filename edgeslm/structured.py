"""High-level structured output: classification, extraction and tool calls.

Built on the constraints of `edgeslm.constraints`; `Model.choose`, `Model.extract`
and `Model.tool_call` call these functions.

- `choose`: classify a text into one of a closed set of labels.
- `extract`: pull a JSON object matching a schema out of a text.
- `tool_call`: given tool definitions (name, description, JSON-schema parameters),
  the model either calls one tool, with arguments valid against its schema, or
  answers in plain text.

Tool-call format: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`
(the Hermes / Qwen convention, which SmolLM2's larger siblings were also trained
on). A chat template that takes `tools` renders the definitions itself; for any
other template a system message lists them (`DEFAULT_TOOL_PROMPT`).

Does not do yet: several tool calls in one answer; passing earlier tool calls and
their results back through the template (give them as plain message text).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgeslm.constraints import Constraint, StructuredGeneration, lark_json
from edgeslm.errors import ConstraintError

__all__ = [
    "DEFAULT_TOOL_PROMPT",
    "Tool",
    "ToolCall",
    "ToolResponse",
    "choose",
    "extract",
    "tool_call",
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
DEFAULT_TOOL_PROMPT = (
    "You can call these tools:\n<tools>\n{tools}\n</tools>\n"
    "To call a tool, answer only with:\n"
    '<tool_call>\n{{"name": <tool name>, "arguments": <arguments object>}}\n'
    "</tool_call>\nIf no tool fits, answer the user in plain text."
)
TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
TOOL_CHOICES = ("auto", "required", "none")
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


def tool_call(
    model: Any,
    messages: Sequence[Mapping[str, Any]] | str,
    tools: Sequence[Tool | Mapping[str, Any]],
    *,
    tool_choice: str = "auto",
    **gen_options: Any,
) -> ToolResponse:
    """Let the model call one of `tools` or answer in plain text.

    Args:
        model: a loaded `Model`.
        messages: the conversation (or one user message as text).
        tools: `Tool`s or dicts (`{"name", "description", "parameters"}` or the
            OpenAI `{"type": "function", "function": {...}}` shape).
        tool_choice: "auto" (call or answer), "required" (must call one), "none"
            (plain answer only), or a tool name (must call that one).
        **gen_options: generation options.

    Returns:
        The call (validated against the tool's schema) or the plain answer.

    Raises:
        ConstraintError: malformed tools or tool_choice.
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
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    prompt = _render_with_tools(model, list(messages), specs)
    callable_tools = [t for t in specs if tool_choice in (*TOOL_CHOICES, t.name)]
    grammar = _tool_grammar(model, callable_tools, tool_choice)
    gen = model.generate(prompt, add_bos=False, grammar=grammar, **gen_options)
    if not gen.complete:
        gen.value()  # raises TruncatedOutputError with the details
    return _parse_response(model, gen, {t.name for t in specs})


def _render_with_tools(
    model: Any, messages: list[dict[str, Any]], tools: list[Tool]
) -> str:
    """The prompt: the template renders the tools if it knows how, else we do."""
    template = model.chat_template
    if _template_takes_tools(template.source):
        return template.render(messages, tools=[t.to_spec() for t in tools])
    listing = "\n".join(json.dumps(t.to_spec(), ensure_ascii=False) for t in tools)
    prompt = DEFAULT_TOOL_PROMPT.format(tools=listing)
    if messages and messages[0].get("role") == "system":
        first = dict(messages[0])
        first["content"] = f"{first.get('content', '')}\n\n{prompt}".strip()
        messages = [first, *messages[1:]]
    else:
        messages = [{"role": "system", "content": prompt}, *messages]
    return template.render(messages)


def _template_takes_tools(source: str) -> bool:
    """Whether a Jinja chat template reads the `tools` variable."""
    return re.search(r"\btools\b", source) is not None


def _tool_grammar(model: Any, tools: list[Tool], tool_choice: str) -> Constraint:
    """Lark grammar: a `<tool_call>` block with one tool's JSON, or plain text."""
    call_schema = {
        "anyOf": [
            {
                "type": "object",
                "properties": {
                    "name": {"const": t.name},
                    "arguments": dict(t.parameters),
                },
                "required": ["name", "arguments"],
            }
            for t in tools
        ]
    }
    open_, close = (_marker(model, m) for m in (TOOL_CALL_OPEN, TOOL_CALL_CLOSE))
    # A plain answer must not start with '<', so it can't be mistaken for a call.
    answer = "answer: /[^<\\s](.|\\n)*/"
    call = (
        f'call: {open_} "\\n" call_json "\\n" {close}\n'
        f"call_json: {lark_json(call_schema)}"
    )
    if tool_choice == "none":
        return Constraint.lark(f"start: answer\n{answer}")
    if tool_choice == "auto":
        return Constraint.lark(f"start: call | answer\n{call}\n{answer}")
    return Constraint.lark(f"start: call\n{call}")


def _marker(model: Any, text: str) -> str:
    """A tool-call marker in Lark: the special token if the vocabulary has one."""
    token_id = model.tokenizer.token_to_id(text)
    if token_id is not None and model.tokenizer.is_special(token_id):
        return text  # `<tool_call>` in Lark names the special token
    return json.dumps(text)


def _parse_response(
    model: Any, gen: StructuredGeneration, names: set[str]
) -> ToolResponse:
    """Split the output into a call or a plain answer (the grammar made it one)."""
    text = gen.text.strip()
    open_id = model.tokenizer.token_to_id(TOOL_CALL_OPEN)
    # A special-token marker is left out of the text; look at the first token.
    is_call = text.startswith(TOOL_CALL_OPEN) or (
        open_id is not None and gen.tokens[:1] == [open_id]
    )
    if not is_call:
        return ToolResponse(None, gen.text, gen)
    body = text.removeprefix(TOOL_CALL_OPEN).removesuffix(TOOL_CALL_CLOSE).strip()
    try:
        data = json.loads(body)
    except json.JSONDecodeError as exc:  # the grammar makes this unreachable
        raise ConstraintError(f"tool call is not JSON ({exc}): {body!r}") from exc
    if data.get("name") not in names:
        raise ConstraintError(f"tool call names an unknown tool: {data.get('name')!r}")
    return ToolResponse(ToolCall(data["name"], data["arguments"]), gen.text, gen)


def _text(text: Any) -> str:
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return text
