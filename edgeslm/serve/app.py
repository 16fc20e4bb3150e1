"""The endpoints of the OpenAI-compatible API, independent of the HTTP transport.

`App` holds the loaded models and the queue; each endpoint takes the parsed JSON
body and a `Client` (the transport's view of the caller: send a JSON answer or a
stream of events, and say whether the caller is still there). Generation runs
with `cancel=client.gone`, so a caller that disconnects stops its generation
before the next token and frees the model for the next request in line.
"""

from __future__ import annotations

import base64
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from edgeslm.errors import EdgeSLMError, TruncatedOutputError
from edgeslm.generation import Generation
from edgeslm.serve import tools
from edgeslm.serve.protocol import (
    CHAT_FIELDS,
    COMPLETION_FIELDS,
    EMBEDDING_FIELDS,
    APIError,
    GenerationRequest,
    bad,
    chat_messages,
    check_fields,
    completion_prompt,
    embedding_inputs,
    generation_request,
)
from edgeslm.serve.queue import ClientGone, ModelQueue
from edgeslm.structured import ToolCall, tool_call_format

log = logging.getLogger(__name__)

# What OpenAI clients expect in finish_reason for each of edgeslm's.
FINISH_REASONS = {
    "eos": "stop",
    "stop": "stop",
    "length": "length",
    "cancelled": "stop",
}
# A /v1/completions request without max_tokens gets OpenAI's default.
COMPLETION_DEFAULT_MAX_TOKENS = 16


class Client(Protocol):
    """What an endpoint needs from the transport."""

    def gone(self) -> bool:
        """True once the caller has disconnected."""

    def send_json(self, body: dict[str, Any]) -> None:
        """Answer 200 with a JSON body."""

    def start_events(self) -> None:
        """Answer 200 with a stream of server-sent events."""

    def send_event(self, data: dict[str, Any] | str) -> None:
        """Send one event (a JSON object, or a bare string such as "[DONE]").

        Raises:
            ClientGone: the caller disconnected.
        """


@dataclass
class Served:
    """One finished generation, kept in `App.recent` for /health and tests."""

    endpoint: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float


class App:
    """The API over one chat model and/or one encoder.

    Args:
        model: a loaded `Model` (None: the generation endpoints answer 404).
        encoder: a loaded `Encoder` (None: /v1/embeddings answers 404).
        model_id: the decoder's name in /v1/models and in answers.
        encoder_id: the encoder's name.
        max_waiting: requests that may wait for the model (beyond: 429).
    """

    def __init__(
        self,
        model: Any = None,
        encoder: Any = None,
        *,
        model_id: str = "edgeslm",
        encoder_id: str = "edgeslm-encoder",
        max_waiting: int = 4,
    ) -> None:
        if model is None and encoder is None:
            raise ValueError("give a chat model, an encoder, or both")
        self.model = model
        self.encoder = encoder
        self.model_id = model_id
        self.encoder_id = encoder_id
        self.queue = ModelQueue(max_waiting)
        self.recent: deque[Served] = deque(maxlen=32)
        self.counts = {"served": 0, "cancelled": 0, "rejected": 0, "failed": 0}
        self._counts_lock = threading.Lock()
        self.started = int(time.time())

    def count(self, what: str) -> None:
        with self._counts_lock:
            self.counts[what] += 1

    # --- GET endpoints ------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        state = self.queue.state()
        with self._counts_lock:
            counts = dict(self.counts)
        return {
            "status": "ok",
            "model": self.model_id if self.model is not None else None,
            "encoder": self.encoder_id if self.encoder is not None else None,
            "queue": {
                "running": state.running,
                "waiting": state.waiting,
                "max_waiting": state.max_waiting,
            },
            **counts,
        }

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self._card(i) for i in self._ids()]}

    def model_card(self, model_id: str) -> dict[str, Any]:
        if model_id not in self._ids():
            raise APIError(
                404,
                f"no model {model_id!r} here; this server has {self._ids()}",
                param="model",
                code="model_not_found",
            )
        return self._card(model_id)

    def _ids(self) -> list[str]:
        ids = [self.model_id] if self.model is not None else []
        return ids + ([self.encoder_id] if self.encoder is not None else [])

    def _card(self, model_id: str) -> dict[str, Any]:
        return {
            "id": model_id,
            "object": "model",
            "created": self.started,
            "owned_by": "edgeslm",
        }

    # --- POST endpoints -----------------------------------------------------------

    def chat(self, body: Any, client: Client) -> None:
        """POST /v1/chat/completions."""
        req = generation_request(body, CHAT_FIELDS)
        model = self._decoder()
        if "messages" not in req.fields:
            raise bad("messages", "is required", "missing_field")
        messages = chat_messages(req.fields["messages"])
        plan = tools.plan(req.fields.get("tools"), req.fields.get("tool_choice"))
        if not plan.active:  # Model.tool_call writes earlier calls itself
            call_format, _ = tool_call_format(model)
            messages = tools.with_calls_as_text(messages, call_format)
        response_format = req.fields.get("response_format")
        if plan.active and response_format and response_format.get("type") != "text":
            raise bad(
                "response_format",
                "cannot be combined with tools: a tool call is already JSON",
            )
        options = dict(req.options)
        if response_format is not None:
            options["response_format"] = response_format

        answer = None
        with self._turn(client):
            if req.max_tokens is None:
                # OpenAI's default: as much as the context leaves after the prompt
                # the model will really see (with tools, their listing too).
                options["max_tokens"] = _context_left(model, messages, plan)
            if plan.active:
                answer = self._answer_with_tools(
                    model, messages, plan, options, req, client
                )
            else:
                pieces = _call(
                    model.chat, messages, stream=True, cancel=client.gone, **options
                )
                shape = _Shape("chat", "chatcmpl-", self.model_id)
                answer = self._answer(pieces, req, client, shape)
        if answer is not None:  # sent once the model is free for the next one
            client.send_json(answer)

    def completions(self, body: Any, client: Client) -> None:
        """POST /v1/completions."""
        req = generation_request(body, COMPLETION_FIELDS)
        model = self._decoder()
        if "prompt" not in req.fields:
            raise bad("prompt", "is required", "missing_field")
        prompt = completion_prompt(req.fields["prompt"])
        options = dict(req.options)
        options.setdefault("max_tokens", COMPLETION_DEFAULT_MAX_TOKENS)
        with self._turn(client):
            echo = ""
            if req.fields.get("echo"):
                echo = (
                    prompt
                    if isinstance(prompt, str)
                    else model.tokenizer.decode(prompt)
                )
            pieces = _call(
                model.generate, prompt, stream=True, cancel=client.gone, **options
            )
            shape = _Shape("text", "cmpl-", self.model_id, echo=echo)
            answer = self._answer(pieces, req, client, shape)
        if answer is not None:
            client.send_json(answer)

    def embeddings(self, body: Any, client: Client) -> None:
        """POST /v1/embeddings."""
        f = check_fields(body, EMBEDDING_FIELDS)
        if self.encoder is None:
            raise APIError(
                404,
                "this server has no embedding model; start it with --encoder "
                "(or give an encoder package as the model)",
                param="model",
                code="model_not_found",
            )
        if "input" not in f:
            raise bad("input", "is required", "missing_field")
        texts = embedding_inputs(f["input"])
        dim = self.encoder.dim
        if f.get("dimensions", dim) != dim:
            raise bad("dimensions", f"this encoder gives {dim} dimensions only")
        with self._turn(client):
            started = time.perf_counter()
            vectors = self.encoder.embed(texts)
            n_tokens = sum(
                len(e.ids) for e in self.encoder.tokenizer.encode_batch(texts)
            )
        self.count("served")
        seconds = time.perf_counter() - started
        log.info(
            "embeddings: %d texts, %d tokens in %.2f s", len(texts), n_tokens, seconds
        )
        as_base64 = f.get("encoding_format") == "base64"
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": _base64(v) if as_base64 else v.tolist(),
            }
            for i, v in enumerate(vectors)
        ]
        client.send_json(
            {
                "object": "list",
                "data": data,
                "model": self.encoder_id,
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
            }
        )

    # --- the shared generation path -----------------------------------------------

    def _decoder(self) -> Any:
        if self.model is None:
            raise APIError(
                404,
                "this server runs an encoder only; start it with a chat model for "
                "completions",
                param="model",
                code="model_not_found",
            )
        return self.model

    @contextmanager
    def _turn(self, client: Client) -> Iterator[None]:
        with self.queue.turn(client.gone):
            yield

    def _answer(
        self,
        pieces: Iterator[str],
        req: GenerationRequest,
        client: Client,
        shape: _Shape,
    ) -> dict[str, Any] | None:
        """Run the generation; stream it as events, or return the whole answer.

        Returns:
            The answer to send once the model is free; None if it was streamed.

        Raises:
            ClientGone: the caller left; the generation stopped at the next token.
        """
        started = time.perf_counter()
        stream = _Pieces(pieces)
        stream.prime()  # prefill now: a prompt that is too long is still a 400
        try:
            if req.stream:
                _send_stream(stream, req, client, shape)
                return None
            text = "".join(stream)
            if stream.result.finish_reason == "cancelled":
                raise ClientGone
            return shape.whole(text, stream.result)
        except ClientGone:
            # The transport now reports the client gone: the generation ends at
            # its next step, and the result says how far it got.
            for _ in stream:
                pass
            raise
        finally:
            self._record(shape.kind, stream.result, time.perf_counter() - started)

    def _answer_with_tools(
        self,
        model: Any,
        messages: list[dict[str, Any]],
        plan: tools.ToolPlan,
        options: dict[str, Any],
        req: GenerationRequest,
        client: Client,
    ) -> dict[str, Any] | None:
        """Run `Model.tool_call`; stream its call or plain answer, or return it.

        Returns:
            The answer to send once the model is free; None if it was streamed.

        Raises:
            ClientGone: the caller left; the generation stopped at the next token.
        """
        started = time.perf_counter()
        result: Generation | None = None
        try:
            try:
                response = model.tool_call(
                    messages,
                    list(plan.tools),
                    tool_choice=plan.choice,
                    cancel=client.gone,
                    **options,
                )
                result, call = response.generation, response.call
            except TruncatedOutputError as exc:  # cut short inside a call
                result, call = exc.generation, None
            except (EdgeSLMError, ValueError, TypeError) as exc:
                code = "context_length_exceeded" if "context" in str(exc) else None
                raise APIError(400, str(exc), code=code or "invalid_value") from exc
            if result.finish_reason == "cancelled":
                raise ClientGone
            shape = _Shape("chat", "chatcmpl-", self.model_id)
            if req.stream:
                _send_tool_stream(result, call, req, client, shape)
                return None
            return shape.whole(result.text, result, call)
        finally:
            self._record("chat", result, time.perf_counter() - started)

    def _record(self, endpoint: str, result: Generation | None, seconds: float) -> None:
        if result is None:  # failed before its end
            self.count("failed")
            return
        reason = result.finish_reason
        prompt, completion = result.stats.prompt_tokens, len(result.tokens)
        self.recent.append(Served(endpoint, reason, prompt, completion, seconds))
        self.count("cancelled" if reason == "cancelled" else "served")
        log.info(
            "%s: %d + %d tokens in %.2f s, %s",
            endpoint,
            prompt,
            completion,
            seconds,
            reason,
        )


def _call(function: Any, *args: Any, **options: Any) -> Iterator[str]:
    """Start a generation; the model's own errors become 400s."""
    try:
        return function(*args, **options)
    except (EdgeSLMError, ValueError, TypeError) as exc:
        raise APIError(400, str(exc), code="invalid_value") from exc


def _context_left(
    model: Any, messages: list[dict[str, Any]], plan: tools.ToolPlan
) -> int:
    """Tokens the context holds after the chat's rendered prompt (at least 1)."""
    # The prompt as the generation will render it.
    if plan.active:
        text = _call(tools.prompt, model, messages, plan)
    else:
        text = _call(model.chat_template.render, messages, add_generation_prompt=True)

    # What is left of the context (a prompt too long is refused at prefill).
    used = len(model.tokenize(text, add_bos=False))
    return max(1, model.n_ctx - used)


class _Pieces:
    """A streaming generation: its text pieces, then its `Generation`."""

    def __init__(self, pieces: Iterator[str]) -> None:
        self._pieces = pieces
        self._first: list[str] = []
        self.result: Generation | None = None

    def prime(self) -> None:
        """Run up to the first piece, turning the model's errors into 400s."""
        try:
            self._first = [self._next()]
        except StopIteration:
            pass
        except (EdgeSLMError, ValueError) as exc:
            code = "context_length_exceeded" if "context" in str(exc) else None
            raise APIError(400, str(exc), code=code or "invalid_value") from exc

    def __iter__(self) -> Iterator[str]:
        yield from self._first
        self._first = []
        while self.result is None:
            try:
                yield self._next()
            except StopIteration:
                return

    def _next(self) -> str:
        try:
            return next(self._pieces)
        except StopIteration as done:
            self.result = done.value
            raise


@dataclass
class _Shape:
    """How answers of one endpoint look: chat messages or completion text."""

    kind: str  # "chat" or "text"
    prefix: str
    model_id: str
    echo: str = ""

    def __post_init__(self) -> None:
        self.id = self.prefix + secrets.token_hex(12)
        self.created = int(time.time())

    def _envelope(self, obj: str, choices: list, usage: dict | None) -> dict:
        body = {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model_id,
            "choices": choices,
        }
        if usage is not None:
            body["usage"] = usage
        return body

    def whole(
        self, text: str, result: Generation, call: ToolCall | None = None
    ) -> dict[str, Any]:
        """The non-streaming answer: text, or a tool call."""
        finish = FINISH_REASONS[result.finish_reason]
        if self.kind == "text":
            choice = {"index": 0, "text": self.echo + text, "logprobs": None}
            choice["finish_reason"] = finish
            return self._envelope("text_completion", [choice], usage(result))
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if call is not None:
            message["content"] = None
            message["tool_calls"] = [tools.openai_call(call)]
            finish = "tool_calls"
        choice = {"index": 0, "message": message, "logprobs": None}
        choice["finish_reason"] = finish
        return self._envelope("chat.completion", [choice], usage(result))

    def chunk(self, delta: Any, finish: str | None) -> dict[str, Any]:
        """One streamed event; `delta` is text for completions, a dict for chat."""
        if self.kind == "text":
            choice = {"index": 0, "text": delta, "logprobs": None}
            choice["finish_reason"] = finish
            return self._envelope("text_completion", [choice], None)
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return self._envelope("chat.completion.chunk", [choice], None)

    def usage_chunk(self, result: Generation) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return self._envelope(obj, [], usage(result))


def _send_stream(
    stream: _Pieces, req: GenerationRequest, client: Client, shape: _Shape
) -> None:
    """Send the generation as events, one per text piece."""
    client.start_events()
    chat = shape.kind == "chat"
    if chat:
        client.send_event(shape.chunk({"role": "assistant", "content": ""}, None))
    elif shape.echo:
        client.send_event(shape.chunk(shape.echo, None))
    for piece in stream:
        client.send_event(shape.chunk({"content": piece} if chat else piece, None))
    result = stream.result
    client.send_event(
        shape.chunk({} if chat else "", FINISH_REASONS[result.finish_reason])
    )
    if req.include_usage:
        client.send_event(shape.usage_chunk(result))
    client.send_event("[DONE]")


def _send_tool_stream(
    result: Generation,
    call: ToolCall | None,
    req: GenerationRequest,
    client: Client,
    shape: _Shape,
) -> None:
    """Send a finished tool-call generation as events: the call or text in one."""
    # TODO: stream a plain answer piece by piece; Model.tool_call does not stream.
    client.start_events()
    client.send_event(shape.chunk({"role": "assistant", "content": ""}, None))
    finish = FINISH_REASONS[result.finish_reason]
    if call is not None:
        delta: dict[str, Any] = {
            "tool_calls": [{"index": 0, **tools.openai_call(call)}]
        }
        finish = "tool_calls"
    else:
        delta = {"content": result.text}
    client.send_event(shape.chunk(delta, None))
    client.send_event(shape.chunk({}, finish))
    if req.include_usage:
        client.send_event(shape.usage_chunk(result))
    client.send_event("[DONE]")


def usage(result: Generation) -> dict[str, int]:
    prompt, completion = result.stats.prompt_tokens, len(result.tokens)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _base64(vector: np.ndarray) -> str:
    """OpenAI's base64 embedding: the float32 values, little-endian."""
    return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
