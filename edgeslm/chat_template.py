"""Chat templates: a model's own Jinja template, rendered as the ecosystem does.

Templates come from the model's metadata (`tokenizer_config.json` or GGUF
`tokenizer.chat_template`) and are rendered with jinja2 in a sandbox, with the
variables and helpers Hugging Face templates expect (`messages`, `bos_token`,
`eos_token`, `add_generation_prompt`, `raise_exception`, `strftime_now`, `tojson`).
A model without a template gets ChatML, the most common format among small chat models,
except the GPT-2 family, whose chat format is DialoGPT's: each turn's text followed by
the end-of-text token, no roles, and the oldest turns dropped when the conversation
outgrows the context (`fit_history`).

Extra variables reach the template as keyword arguments of `render`: tool
definitions go in as `tools=[...]` when `edgeslm/structured.py` finds that a template
uses them (docs/STRUCTURED.md).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

from edgeslm.errors import EdgeSLMError

log = logging.getLogger(__name__)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{{ message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# DialoGPT: "turn<|endoftext|>turn<|endoftext|>..."; the reply follows the last one.
# It was trained without system prompts, so system messages are left out.
DIALOGPT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}"
    "{{ message['content'] + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)

ROLES = ("system", "user", "assistant", "tool")


class ChatTemplateError(EdgeSLMError, ValueError):
    """A template failed to render, or the messages are malformed."""


def validate_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Check the OpenAI-style message list and return plain dicts.

    Raises:
        ChatTemplateError: not a list of {"role", "content"} with a known role.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatTemplateError(
            "messages must be a list of {'role': ..., 'content': ...} dicts"
        )
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatTemplateError(
                f"messages[{i}] must be a dict, got {type(message)}"
            )
        role = message.get("role")
        if role not in ROLES:
            raise ChatTemplateError(
                f"messages[{i}].role must be one of {ROLES}, got {role!r}"
            )
        if not isinstance(message.get("content"), str):
            raise ChatTemplateError(f"messages[{i}].content must be a string")
        checked.append(dict(message))
    return checked


class ChatTemplate:
    """A compiled chat template.

    Args:
        source: the Jinja template text; None selects ChatML.
        bos_token: the text of the BOS token, as templates reference it.
        eos_token: the text of the EOS token.
    """

    def __init__(
        self, source: str | None, *, bos_token: str = "", eos_token: str = ""
    ) -> None:
        if not source:
            log.info("model has no chat template; using ChatML")
        self.source = source or CHATML_TEMPLATE
        self.bos_token = bos_token
        self.eos_token = eos_token
        # compiled at the first render: jinja2 and what it imports are 7 MB of
        # resident memory that plain generation never needs
        self._template: Any = None

    def compile(self) -> Any:
        """The compiled template (compiled once).

        Raises:
            ChatTemplateError: the template is not valid Jinja.
        """
        if self._template is None:
            self._template = _compile(self.source)
        return self._template

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        **extra: Any,
    ) -> str:
        """Render a conversation to the prompt text the model was trained on.

        Raises:
            ChatTemplateError: malformed messages, or the template raised.
        """
        checked = validate_messages(messages)
        try:
            return self.compile().render(
                messages=checked,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                add_generation_prompt=add_generation_prompt,
                **extra,
            )
        except ChatTemplateError:
            raise
        except Exception as exc:  # jinja2 raises many types from template code
            raise ChatTemplateError(f"chat template failed to render: {exc}") from exc


def _raise(message: str) -> None:
    raise ChatTemplateError(f"chat template refused the messages: {message}")


@lru_cache(maxsize=8)
def _compile(source: str) -> Any:
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda value, indent=None: json.dumps(
        value, ensure_ascii=False, indent=indent
    )
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except TemplateError as exc:
        raise ChatTemplateError(f"chat template does not compile: {exc}") from exc


def fit_history(
    messages: Sequence[Mapping[str, Any]],
    count_tokens: Callable[[list[dict[str, Any]]], int],
    budget: int,
) -> list[dict[str, Any]]:
    """Drop the oldest turns until the rendered conversation fits `budget` tokens.

    System messages are kept, and so is the last message even if it alone does not
    fit (the caller then reports a prompt too long for the context).

    Args:
        messages: the conversation, oldest first.
        count_tokens: tokens of a rendered message list.
        budget: tokens the prompt may use.

    Returns:
        The messages that fit, in order.
    """
    kept = validate_messages(messages)
    dropped = 0
    while count_tokens(kept) > budget:
        turns = [i for i, m in enumerate(kept[:-1]) if m["role"] != "system"]
        if not turns:
            break
        del kept[turns[0]]
        dropped += 1
    if dropped:
        log.debug("dropped the %d oldest turns to fit %d tokens", dropped, budget)
    return kept
