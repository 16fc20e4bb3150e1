"""Tool calls for /v1/chat/completions: OpenAI `tools` onto `Model.tool_call`.

The server checks the request's `tools` and `tool_choice` (400s naming the field
at fault), then lets `edgeslm.structured.tool_call` do the work, so a program on
the board gets the same prompt, call format and grammar through the API as
through the library: the model answers either a call in its format (for every
model edgeslm ships, `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`),
whose arguments a grammar keeps valid against the tool's parameter schema, or
plain text.

- `tool_choice: "auto"` (the default with tools): a call or plain text;
- `"required"`, or `{"type": "function", "function": {"name": ...}}`: a call (of
  that function);
- `"none"`: the tools are not offered; the answer is plain text.

Earlier calls in the conversation (assistant messages with `tool_calls`) are shown
to the model in its call format; `tool` messages keep their role.

Not yet: several calls in one answer (`parallel_tool_calls` is accepted and has no
effect); streaming a plain answer token by token when tools are offered (the
answer goes out as one event at the end: see `app._send_tool_stream`).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from edgeslm.errors import ConstraintError
from edgeslm.serve.protocol import bad
from edgeslm.structured import (
    Tool,
    ToolCall,
    ToolCallFormat,
    _render_with_tools,
    tool_call_format,
)


@dataclass(frozen=True)
class ToolPlan:
    """What a request's `tools` and `tool_choice` ask of the generation.

    Attributes:
        tools: the tools offered to the model (empty: none).
        choice: `tool_choice` as `Model.tool_call` takes it: "none", "auto",
            "required" or the name of the one function to call.
    """

    tools: tuple[Tool, ...] = ()
    choice: str = "none"

    @property
    def active(self) -> bool:
        """True when the tools are offered to the model."""
        return bool(self.tools) and self.choice != "none"


def plan(tools: Any, tool_choice: Any) -> ToolPlan:
    """Check `tools` and `tool_choice`.

    Raises:
        APIError: 400 naming the malformed field.
    """
    if tools is None:
        if tool_choice not in (None, "none"):
            raise bad("tool_choice", "needs tools; none were given")
        return ToolPlan()
    parsed = _parse_tools(tools)
    choice = "auto" if tool_choice is None else tool_choice
    if choice in ("none", "auto", "required"):
        return ToolPlan(parsed, choice)

    # {"type": "function", "function": {"name": ...}}: that function, always.
    function = choice.get("function") if isinstance(choice, Mapping) else None
    name = function.get("name") if isinstance(function, Mapping) else None
    if not isinstance(name, str):
        raise bad(
            "tool_choice",
            "must be 'none', 'auto', 'required' or "
            "{'type': 'function', 'function': {'name': ...}}",
        )
    known = [t.name for t in parsed]
    if name not in known:
        raise bad("tool_choice", f"names {name!r}, which is not in tools {known}")
    return ToolPlan(parsed, name)


def _parse_tools(tools: Any) -> tuple[Tool, ...]:
    if not isinstance(tools, list) or not tools:
        raise bad("tools", "must be a non-empty array of {'type': 'function', ...}")
    parsed = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, Mapping) or tool.get("type") != "function":
            raise bad(
                where, "only {'type': 'function', 'function': {...}} is supported"
            )
        function = tool.get("function")
        if not isinstance(function, Mapping) or not isinstance(
            function.get("name"), str
        ):
            raise bad(f"{where}.function", "must be an object with a string name")
        params = function.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        if not isinstance(params, Mapping):
            raise bad(f"{where}.function.parameters", "must be a JSON schema object")
        description = function.get("description") or ""
        if not isinstance(description, str):
            raise bad(f"{where}.function.description", "must be a string")
        try:
            parsed.append(Tool(function["name"], description, dict(params)))
        except ConstraintError as exc:
            raise bad(f"{where}.function.name", str(exc)) from exc
    names = [t.name for t in parsed]
    if len(set(names)) != len(names):
        raise bad("tools", f"function names must be distinct, got {names}")
    return tuple(parsed)


def prompt(model: Any, messages: list[dict[str, Any]], tool_plan: ToolPlan) -> str:
    """The prompt text `Model.tool_call` generates from, the tools' listing included.

    Rendered by the same function `edgeslm.structured.tool_call` uses, so that its
    length in tokens is the length of the prompt the model will see.

    Args:
        model: the loaded chat model.
        messages: the conversation, as `Model.tool_call` will be given it.
        tool_plan: an active plan (tools offered).

    Raises:
        EdgeSLMError: malformed earlier calls, or the template failed.
    """
    call_format, native = tool_call_format(model)
    offered = list(tool_plan.tools) if tool_plan.active else []
    return _render_with_tools(model, messages, offered, call_format, native)


def with_calls_as_text(
    messages: list[dict[str, Any]], call_format: ToolCallFormat
) -> list[dict[str, Any]]:
    """The conversation with earlier tool calls written into the text.

    For answers made without tools (none given, or `tool_choice: "none"`):
    the chat template takes text only, so each call of an assistant message
    becomes text in the model's call format. (With tools, `Model.tool_call`
    does the same itself.)

    Raises:
        APIError: 400 for a call without a function name or with arguments
            that are not a JSON object.
    """
    out = []
    for i, message in enumerate(messages):
        calls = message.get("tool_calls")
        if not calls:
            out.append(message)
            continue
        where = f"messages[{i}].tool_calls"
        if not isinstance(calls, list):
            raise bad(where, "must be an array of tool calls")
        texts = [message["content"]] if message["content"] else []
        for j, call in enumerate(calls):
            name, arguments = _call_parts(call, f"{where}[{j}]")
            texts.append(call_format.render(name, arguments))
        out.append({"role": message["role"], "content": "\n".join(texts)})
    return out


def _call_parts(call: Any, where: str) -> tuple[str, dict[str, Any]]:
    function = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise bad(where, "each call needs function.name")
    arguments = function.get("arguments") or "{}"
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as exc:
            raise bad(f"{where}.function.arguments", f"is not JSON ({exc})") from exc
    if not isinstance(arguments, Mapping):
        raise bad(f"{where}.function.arguments", "must be a JSON object")
    return function["name"], dict(arguments)


def openai_call(call: ToolCall) -> dict[str, Any]:
    """The OpenAI `tool_calls` entry for a validated call."""
    return {
        "id": "call_" + secrets.token_hex(12),
        "type": "function",
        "function": {
            "name": call.name,
            "arguments": json.dumps(call.arguments, ensure_ascii=False),
        },
    }
