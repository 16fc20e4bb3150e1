"""Tool calls for /v1/chat/completions: OpenAI `tools` onto edgeslm constraints.

The model is told about the tools in a system message and answers a call as one
JSON object, `{"name": "...", "arguments": {...}}`, which a constraint makes valid
against the tool's parameter schema:

- `tool_choice: "required"` or a named function: the whole answer is such an
  object (a JSON-schema constraint, `anyOf` over the allowed tools);
- `"auto"` (the default when tools are given): a Lark grammar lets the answer be
  either a call (output that starts with `{`) or plain text (anything else);
- `"none"`: the tools are not offered and the answer is plain text.

Earlier calls in the conversation (assistant messages with `tool_calls`) are shown
to the model in the same JSON form, and `tool` messages as the template's `tool`
role. One call per answer: `parallel_tool_calls` is accepted and has no effect.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from edgeslm.serve.protocol import APIError, bad

# TODO: use Model's tool-call API (model's own call format); issue 5 has not landed it.


@dataclass(frozen=True)
class Tool:
    """One function the model may call."""

    name: str
    description: str
    parameters: dict[str, Any]


@dataclass(frozen=True)
class ToolPlan:
    """What a request's `tools` and `tool_choice` ask of the generation.

    Attributes:
        tools: the tools offered to the model (empty: none).
        mode: "none", "auto" or "required" (a named function is "required" with
            only that tool in `allowed`).
        allowed: the tools the answer may call.
    """

    tools: tuple[Tool, ...] = ()
    mode: str = "none"
    allowed: tuple[Tool, ...] = ()

    @property
    def active(self) -> bool:
        return self.mode != "none"


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
        return ToolPlan(parsed, choice, parsed)

    # {"type": "function", "function": {"name": ...}}: that function, always.
    function = choice.get("function") if isinstance(choice, Mapping) else None
    name = function.get("name") if isinstance(function, Mapping) else None
    if not isinstance(name, str):
        raise bad(
            "tool_choice",
            "must be 'none', 'auto', 'required' or "
            "{'type': 'function', 'function': {'name': ...}}",
        )
    named = tuple(t for t in parsed if t.name == name)
    if not named:
        known = [t.name for t in parsed]
        raise bad("tool_choice", f"names {name!r}, which is not in tools {known}")
    return ToolPlan(parsed, "required", named)


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
        parsed.append(Tool(function["name"], description, dict(params)))
    names = [t.name for t in parsed]
    if len(set(names)) != len(names):
        raise bad("tools", f"function names must be distinct, got {names}")
    return tuple(parsed)


def system_prompt(tool_plan: ToolPlan) -> str:
    """The system text that offers the tools and says how to call one."""
    lines = ["You can call these functions:"]
    for tool in tool_plan.tools:
        spec = {"name": tool.name, "parameters": tool.parameters}
        if tool.description:
            spec["description"] = tool.description
        lines.append(json.dumps(spec, ensure_ascii=False))
    lines.append(
        'To call one, reply with only a JSON object: {"name": <function name>, '
        '"arguments": <object matching its parameters>}.'
    )
    if tool_plan.mode == "auto":
        lines.append("If no function is needed, reply in plain text.")
    return "\n".join(lines)


def with_tools(messages: list[dict[str, Any]], tool_plan: ToolPlan) -> list[dict]:
    """The conversation as the model sees it: tools offered, past calls as JSON."""
    out = []
    for message in messages:
        calls = message.pop("tool_calls", None)
        if calls:
            message["content"] = _calls_as_text(calls, message["content"])
        out.append(message)
    if not tool_plan.active:
        return out
    note = system_prompt(tool_plan)
    if out and out[0]["role"] == "system":
        out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{note}"}
    else:
        out.insert(0, {"role": "system", "content": note})
    return out


def _calls_as_text(calls: Any, content: str) -> str:
    """An assistant message's earlier tool calls, in the form the model answers."""
    texts = [content] if content else []
    if not isinstance(calls, list):
        raise bad("messages.tool_calls", "must be an array of tool calls")
    for call in calls:
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(
            function.get("name"), str
        ):
            raise bad("messages.tool_calls", "each call needs function.name")
        arguments = function.get("arguments") or "{}"
        try:
            args = json.loads(arguments) if isinstance(arguments, str) else arguments
        except json.JSONDecodeError:
            args = arguments  # shown as the string it was
        texts.append(
            json.dumps(
                {"name": function["name"], "arguments": args}, ensure_ascii=False
            )
        )
    return "\n".join(texts)


def constraint_options(tool_plan: ToolPlan) -> dict[str, Any]:
    """The generation option that shapes the answer (none when tools are off)."""
    calls = [_call_schema(t) for t in tool_plan.allowed]
    if tool_plan.mode == "required":
        schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
        return {"json_schema": schema}
    if tool_plan.mode == "auto":
        schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
        lark = (
            "start: call | answer\n"
            f"call: %json {json.dumps(schema)}\n"
            # Plain text: anything that does not start with "{".
            "answer: /[^{][\\s\\S]*/\n"
        )
        return {"grammar": lark}
    return {}


def _call_schema(tool: Tool) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": tool.name}, "arguments": tool.parameters},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def parse_call(text: str, tool_plan: ToolPlan) -> dict[str, Any] | None:
    """The OpenAI `tool_calls` entry for an answer that is a call, else None.

    Raises:
        APIError: 500 if a required call is not a call (the constraint failed).
    """
    if not tool_plan.active or not text.lstrip().startswith("{"):
        if tool_plan.mode == "required":
            raise APIError(
                500,
                f"the model's answer is not a tool call: {text[:80]!r}",
                type="server_error",
            )
        return None
    try:
        call = json.loads(text)
    except json.JSONDecodeError:
        return None  # cut short by max_tokens: finish_reason says "length"
    return {
        "id": "call_" + secrets.token_hex(12),
        "type": "function",
        "function": {
            "name": call["name"],
            "arguments": json.dumps(call["arguments"], ensure_ascii=False),
        },
    }
