"""The runtime model: an edgeslm package loaded into onnxruntime, and its generate loop.

`Model` owns one onnxruntime session, one KV cache allocated for the whole context,
a tokenizer and a chat template. A step binds the new token ids and the cache buffers
(past and present are the same memory) and runs the graph; the C sampler picks the
next token from the last position's logits.

The cache remembers which tokens it holds, so a new prompt that starts with them
(the next turn of a chat) only computes its new tokens. When the context is full, the
oldest tokens after a kept prefix are dropped and the kept keys re-rotated (RoPE), or
the kept tokens computed again (learned positions: the manifest's `context_shift`).

A constraint (JSON schema, regex, choices, grammar; docs/STRUCTURED.md) puts a
token mask from `edgeslm.constraints.Guide` before each sampling step and
feeds the tokens it forces in one step.

Not yet: batching several sequences.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Generator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgeslm.chat_template import ChatTemplate, fit_history
from edgeslm.constraints import (
    Guide,
    StructuredGeneration,
    constraint_from_options,
    engine_for,
)
from edgeslm.errors import EdgeSLMError, ModelFormatError
from edgeslm.generation import Generation, GenerationStats, TextStream
from edgeslm.kvcache import KVCache
from edgeslm.manifest import Manifest
from edgeslm.sampling import Sampler, SamplerSettings
from edgeslm.session import open_session, release_freed_heap
from edgeslm.tokenizer import Tokenizer

log = logging.getLogger(__name__)

SUPPORTED_GRAPHS = ("llama-gqa-v1", "gpt2-gqa-v1")
DEFAULT_CONTEXT = 4096


class Model:
    """A loaded model package.

    Args:
        package: folder made by `edgeslm export`.
        n_threads: onnxruntime intra-op threads (default: all cores).
        n_ctx: tokens the KV cache holds (default: the model's, at most 4096).
        verify: check every file's sha256 against the manifest first; a file
            that passed before and has not changed since (size, modification time,
            inode) is not hashed again (see `Manifest.verify`).

    Raises:
        ModelFormatError: not a package, or made for a graph this version can't run.
        PackageIntegrityError: a file is missing or fails its sha256.
    """

    def __init__(
        self,
        package: str | Path,
        *,
        n_threads: int | None = None,
        n_ctx: int | None = None,
        verify: bool = True,
    ) -> None:
        started = time.perf_counter()
        self.path = Path(package)
        self.manifest = Manifest.read(self.path)
        if self.manifest.graph not in SUPPORTED_GRAPHS:
            raise ModelFormatError(
                f"{self.path}: graph {self.manifest.graph!r} is not supported by this "
                f"edgeslm (supports {SUPPORTED_GRAPHS}); re-export the model"
            )
        if verify:
            self.manifest.verify(self.path, reuse_checks=True)
        self.config = self.manifest.config
        self.tokenizer = Tokenizer.from_file(self.path / "tokenizer.json")
        self.chat_template = ChatTemplate(
            self.manifest.chat_template,
            bos_token=self._token_text(self.manifest.tokens.bos_token_id),
            eos_token=self._token_text(self._eos_ids[0] if self._eos_ids else None),
        )
        self.n_ctx = _check_n_ctx(n_ctx, self.config.max_seq_len)
        self._session = open_session(
            self.path,
            "model.onnx",
            custom_ops=self.manifest.custom_ops,
            portable_model=self.manifest.portable_model,
            n_threads=n_threads,
        )
        self.cache = KVCache(
            self.config.n_layers,
            self.config.n_kv_heads,
            self.n_ctx,
            self.config.head_dim,
            # Learned positions (GPT-2): a shift only moves data, see _Run._step.
            rope_theta=self.config.rope_theta if self._rotary else None,
            dtype=_cache_dtype(self._session),
        )
        self._tokens: list[int] = []  # what the cache holds, position by position
        self._n_keep = 0  # tokens a context shift keeps
        self._bind()
        release_freed_heap()
        self.load_seconds = time.perf_counter() - started
        log.debug("loaded %s in %.3f s", self.path, self.load_seconds)

    # --- low level: one forward step ----------------------------------------------

    def _bind(self) -> None:
        """Bind every layer's past and present to the same cache buffers, once."""
        import onnxruntime as ort

        self._io = self._session.io_binding()
        self._ort_cache = []  # keeps the OrtValues (and so the views) alive
        for layer in range(self.config.n_layers):
            for kind, view in (
                ("key", self.cache.key(layer)),
                ("value", self.cache.value(layer)),
            ):
                value = ort.OrtValue.ortvalue_from_numpy(view)
                self._ort_cache.append(value)
                self._io.bind_ortvalue_input(f"past_key_values.{layer}.{kind}", value)
                self._io.bind_ortvalue_output(f"present.{layer}.{kind}", value)

        # Logits of the last position, (1, vocab_size) float32, reused every step.
        self._logits = np.zeros((1, self.config.vocab_size), dtype=np.float32)
        self._io.bind_ortvalue_output(
            "logits", ort.OrtValue.ortvalue_from_numpy(self._logits)
        )

        # Step inputs live in fixed buffers bound once; a decode step only writes
        # three integers. A prompt of several tokens binds its own ids buffer.
        self._seqlens = np.zeros(1, dtype=np.int32)  # (1,) cache length - 1
        self._total = np.zeros((), dtype=np.int32)  # () cache length
        self._one_id = np.zeros((1, 1), dtype=np.int64)  # (1, 1) decode token
        self._step_inputs = [
            ort.OrtValue.ortvalue_from_numpy(a)
            for a in (self._seqlens, self._total, self._one_id)
        ]
        self._io.bind_ortvalue_input("seqlens_k", self._step_inputs[0])
        self._io.bind_ortvalue_input("total_sequence_length", self._step_inputs[1])
        self._ids_bound_one = False

    def forward(self, token_ids: Sequence[int]) -> np.ndarray:
        """Append tokens to the cache and return the logits after the last one.

        Args:
            token_ids: new tokens; they must fit in the free part of the context.

        Returns:
            `(vocab_size,)` float32 logits, a view overwritten by the next call.
        """
        n_new = len(token_ids)
        total = self.cache.length + n_new
        if n_new == 0 or total > self.n_ctx:
            raise EdgeSLMError(
                f"forward needs 1..{self.n_ctx - self.cache.length} tokens, got {n_new}"
            )
        if n_new == 1:
            self._one_id[0, 0] = token_ids[0]
            if not self._ids_bound_one:
                self._io.bind_ortvalue_input("input_ids", self._step_inputs[2])
                self._ids_bound_one = True
        else:
            ids = np.asarray([token_ids], dtype=np.int64)
            self._io.bind_cpu_input("input_ids", ids)
            self._ids_bound_one = False
        self._seqlens[0] = total - 1
        self._total[...] = total
        self._session.run_with_iobinding(self._io)
        self.cache.advance(n_new)
        self._tokens.extend(int(t) for t in token_ids)
        return self._logits[0]

    def save_prompt_cache(self, path: str | Path) -> int:
        """Save what the cache holds (keys, values, tokens) for a later instant start.

        Returns:
            The number of tokens saved.
        """
        self.cache.save(path, self._tokens)
        return len(self._tokens)

    def load_prompt_cache(self, path: str | Path) -> int:
        """Restore a cache saved by `save_prompt_cache` with this model.

        The next prompt that starts with the restored tokens only computes the rest.

        Returns:
            The number of tokens restored.

        Raises:
            ModelFormatError: not a cache file, or one made for other dimensions.
        """
        loaded, tokens = KVCache.load(path, max_seq_len=self.n_ctx)
        mine = (self.cache.n_layers, self.cache.n_kv_heads, self.cache.head_dim)
        theirs = (loaded.n_layers, loaded.n_kv_heads, loaded.head_dim)
        if mine != theirs or loaded.rope_theta != self.cache.rope_theta:
            raise ModelFormatError(
                f"{path}: prompt cache made for another model (layers, kv heads, "
                f"head_dim {theirs}; this model has {mine}); delete it to rebuild"
            )
        # TODO: record a model fingerprint in the file; same-shaped models still mix.
        n = loaded.length
        self.cache.rewind(0)
        self.cache.data[:, :, :, :n] = loaded.data[:, :, :, :n]
        self.cache.advance(n)
        self._tokens = [int(t) for t in tokens]
        self._n_keep = n
        return n

    def reset(self) -> None:
        """Forget the cached tokens (the next prompt is computed from scratch)."""
        self.cache.rewind(0)
        self._tokens.clear()

    # --- generation ----------------------------------------------------------------

    def generate(
        self, prompt: str | Sequence[int], *, stream: bool = False, **options: Any
    ) -> Generation | Iterator[str]:
        """Continue a prompt.

        Args:
            prompt: text, or token ids (used as they are).
            stream: return an iterator of text chunks instead of a `Generation`;
                when exhausted it returns (as `StopIteration.value`) the
                `Generation` a non-streaming call would have, with its stats.
            **options: `max_tokens` (256), `stop` (strings), `ignore_eos`, `add_bos`
                (default: the model's setting for text prompts), `keep` (tokens
                kept when the context is full; default the whole first prompt up to
                half the context), and sampling settings: `temperature` (0 = greedy,
                the default), `top_k`, `top_p`, `min_p`, `repetition_penalty`,
                `frequency_penalty`, `presence_penalty`, `seed`. At most one
                constraint on the output (docs/STRUCTURED.md): `json_schema` (dict
                or JSON text), `regex`, `choices` (list of strings), `grammar` (Lark
                text), or `response_format` (OpenAI shape); with one, the result is
                a `StructuredGeneration` whose `complete` says if the output
                satisfies it, and `fast_forward` (default True) feeds the tokens
                the constraint forces without sampling them. `cancel`: a callable
                asked before every step; when it returns True the generation ends
                there with finish_reason "cancelled" (a server whose client left).

        Raises:
            ValueError: an option is out of range (the message names it).
            ConstraintError: a constraint is malformed; `UnsupportedSchemaError`
                names a JSON-schema feature the grammar engine lacks.
        """
        ids = self._prompt_ids(prompt, options.pop("add_bos", None))
        run = _Run(self, ids, options)
        return run.chunks() if stream else run.result()

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        stream: bool = False,
        **options: Any,
    ) -> Generation | Iterator[str]:
        """Answer the last message of a conversation, rendered by the chat template.

        Consecutive calls with a growing conversation reuse the cache: only the new
        messages are computed. Options are those of `generate`. In the DialoGPT
        format the oldest turns are dropped so that the prompt leaves room for the
        reply (`max_tokens`, at most half the context).
        """
        if self.manifest.chat_format == "dialogpt":
            reply = min(int(options.get("max_tokens", 256)), self.n_ctx // 2)
            messages = fit_history(
                messages,
                lambda kept: len(self.tokenize(self._render(kept), add_bos=False)),
                self.n_ctx - reply,
            )
        text = self._render(messages)
        return self.generate(text, stream=stream, add_bos=False, **options)

    def tokenize(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`, with BOS if the model wants it (or `add_bos`)."""
        return self._prompt_ids(text, add_bos)

    # --- structured output (edgeslm/structured.py) ---------------------------------

    def choose(self, text: str, options: Sequence[str], **kwargs: Any) -> str:
        """Classify `text` into exactly one of `options`; see `structured.choose`."""
        from edgeslm.structured import choose

        return choose(self, text, options, **kwargs)

    def extract(self, text: str, schema: Mapping[str, Any] | str, **kwargs: Any) -> Any:
        """A JSON value matching `schema`, extracted from `text` and parsed; see
        `structured.extract`."""
        from edgeslm.structured import extract

        return extract(self, text, schema, **kwargs)

    def tool_call(
        self,
        messages: Sequence[Mapping[str, Any]] | str,
        tools: Sequence[Any],
        **kwargs: Any,
    ) -> Any:
        """Call one of `tools` or answer in plain text (`tool_choice="auto"`);
        returns a `structured.ToolResponse`; see `structured.tool_call`."""
        from edgeslm.structured import tool_call

        return tool_call(self, messages, tools, **kwargs)

    # --- helpers -------------------------------------------------------------------

    def _render(self, messages: Sequence[Mapping[str, Any]]) -> str:
        return self.chat_template.render(messages, add_generation_prompt=True)

    @property
    def _rotary(self) -> bool:
        return self.config.position_embedding == "rope"

    @property
    def _eos_ids(self) -> tuple[int, ...]:
        return self.manifest.tokens.eos_token_ids

    def _token_text(self, token_id: int | None) -> str:
        if token_id is None:
            return ""
        return self.tokenizer.id_to_token(token_id) or ""

    def _prompt_ids(
        self, prompt: str | Sequence[int], add_bos: bool | None
    ) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
            bos = self.manifest.tokens.bos_token_id
            if add_bos is None:
                add_bos = self.manifest.tokens.add_bos_token
            if add_bos and bos is not None and (not ids or ids[0] != bos):
                ids = [bos, *ids]
        else:
            ids = [int(t) for t in prompt]
            bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
            if bad:
                raise ValueError(
                    f"prompt token ids must be in [0, {self.config.vocab_size}), "
                    f"got {bad[:5]}"
                )
        if not ids:
            raise ValueError("prompt is empty: give at least one token of text")
        return ids


class _Run:
    """One generation: prefill with prefix reuse, then the token loop."""

    def __init__(self, model: Model, ids: list[int], options: dict[str, Any]) -> None:
        self.model = model
        self.ids = ids
        self.max_tokens = int(options.pop("max_tokens", 256))
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        self.ignore_eos = bool(options.pop("ignore_eos", False))
        self.keep = options.pop("keep", None)
        self.cancel = options.pop("cancel", None)
        if self.cancel is not None and not callable(self.cancel):
            raise ValueError(f"cancel must be callable, got {self.cancel!r}")
        self.guide = _guide(model, options, self.ignore_eos)
        self.fast_forward = bool(options.pop("fast_forward", True))
        self.stream = TextStream(
            model.tokenizer.incremental_decoder(), options.pop("stop", None) or ()
        )
        options.setdefault("temperature", 0.0)
        try:
            settings = SamplerSettings(**options)
        except TypeError as exc:
            known = ", ".join(f.name for f in dataclasses.fields(SamplerSettings))
            raise ValueError(
                f"unknown generation option in {sorted(options)}; sampling options "
                f"are: {known}, plus max_tokens, stop, ignore_eos, add_bos, keep, "
                "fast_forward and a constraint (json_schema, regex, choices, "
                "grammar, response_format)"
            ) from exc
        self.sampler = Sampler(settings, model.config.vocab_size)
        # Penalties look at a window of recent tokens; pass no more than that.
        window = settings.penalty_window or model.n_ctx
        self.window = window if settings.penalties_active else 0
        self.stats = GenerationStats(prompt_tokens=len(ids))
        self.tokens: list[int] = []
        self.finish_reason = "length"

    def result(self) -> Generation:
        for _ in self.chunks():
            pass
        return self._outcome()

    def _outcome(self) -> Generation:
        if self.guide is None:
            return Generation(
                self.stream.text, self.tokens, self.finish_reason, self.stats
            )
        # A stop string cuts the text before it: never a complete answer.
        complete = self.guide.complete and self.finish_reason != "stop"
        return StructuredGeneration(
            self.stream.text,
            self.tokens,
            self.finish_reason,
            self.stats,
            complete=complete,
            constraint=self.guide.constraint,
        )

    def chunks(self) -> Generator[str, None, Generation]:
        logits = self._prefill()
        decode_start = time.perf_counter()
        while len(self.tokens) < self.max_tokens:
            if self.cancel is not None and self.cancel():
                self.finish_reason = "cancelled"
                break
            new = self._next_tokens(logits)
            if not new:
                self.finish_reason = "eos"
                break
            for token in new:
                self.tokens.append(token)
                piece = self.stream.add(token)
                if piece:
                    yield piece
                if self.stream.stopped:
                    break
            if self.stream.stopped:
                self.finish_reason = "stop"
                break
            if self.guide is not None and self.guide.done:
                self.finish_reason = "eos"  # the constraint allows nothing more
                break
            if len(self.tokens) < self.max_tokens:
                logits = self._step(new)
        tail = self.stream.finish()
        if tail:
            yield tail
        self.stats.generated_tokens = len(self.tokens)
        self.stats.decode_seconds = time.perf_counter() - decode_start
        return self._outcome()

    def _next_tokens(self, logits: np.ndarray) -> list[int]:
        """This step's tokens: one sampled, then any the constraint forces; [] = EOS."""
        guide = self.guide
        budget = self.max_tokens - len(self.tokens)
        if guide is not None and self.fast_forward and not self.tokens:
            # The constraint may force a start ('{"' of a JSON object).
            forced = guide.forced()[:budget]
            if forced:
                guide.advance(forced)
                return forced

        recent = self.model._tokens[-self.window :] if self.window else ()
        mask = guide.mask() if guide is not None else None
        token = self.sampler.sample(logits, recent_tokens=recent, mask=mask)
        if token in self.model._eos_ids and not self.ignore_eos:
            return []
        if guide is None:
            return [token]

        guide.advance([token])
        if not self.fast_forward or budget == 1 or guide.done:
            return [token]
        forced = guide.forced()[: budget - 1]
        if forced:
            guide.advance(forced)
        return [token, *forced]

    def _prefill(self) -> np.ndarray:
        """Process the prompt, reusing the longest cached prefix."""
        model, ids = self.model, self.ids
        if len(ids) >= model.n_ctx:
            raise ValueError(
                f"prompt has {len(ids)} tokens but the context holds {model.n_ctx}; "
                "shorten it or load the model with a larger n_ctx"
            )
        common = _common_prefix(model._tokens, ids)
        common = min(common, len(ids) - 1)  # at least one token yields logits
        model.cache.rewind(common)
        del model._tokens[common:]
        self.stats.reused_tokens = common
        if common == 0:
            # A fresh context: its first prompt (say, a system prompt) is what a
            # context shift keeps, unless the caller said otherwise.
            model._n_keep = min(self.keep or len(ids), model.n_ctx // 2)

        started = time.perf_counter()
        logits = model.forward(ids[common:])
        self.stats.prompt_seconds = time.perf_counter() - started
        return logits

    def _step(self, token_ids: list[int]) -> np.ndarray:
        model = self.model
        if model.cache.length + len(token_ids) > model.n_ctx:
            kept = self._shift()
            if model.manifest.context_shift == "reprefill":
                # Learned positions: the kept tokens move to new positions, which
                # only a fresh computation gives them. Exact, but costs a prefill.
                model.cache.rewind(0)
                model._tokens.clear()
                return model.forward([*kept, *token_ids])
        return model.forward(token_ids)

    def _shift(self) -> list[int]:
        """Context full: keep a prefix, drop the oldest half of the rest.

        With RoPE the cache is shifted in place (keys re-rotated). Returns the kept
        tokens, which a "reprefill" package computes again instead.
        """
        model = self.model
        keep = model._n_keep
        drop = max(1, (model.cache.length - keep) // 2)
        log.debug("context full: keeping %d tokens, dropping %d", keep, drop)
        kept = model._tokens[:keep] + model._tokens[keep + drop :]
        if model.manifest.context_shift == "rotate":
            model.cache.shift(keep, drop)
            del model._tokens[keep : keep + drop]
        return kept


def _cache_dtype(session) -> type:
    """The element type of the KV cache the graph takes: float16 in quantized
    packages' own graphs (export version 6), float32 elsewhere (fp32 packages, the
    portable graph, older packages)."""
    for value in session.get_inputs():
        if value.name.startswith("past_key_values."):
            return np.float16 if value.type == "tensor(float16)" else np.float32
    raise ModelFormatError("the graph has no past_key_values inputs; re-export it")


def _guide(model: Model, options: dict[str, Any], ignore_eos: bool) -> Guide | None:
    """Pop the constraint options and compile them for this model (None if none)."""
    constraint = constraint_from_options(options)
    if constraint is None:
        return None
    if ignore_eos:
        raise ValueError(
            "ignore_eos cannot be combined with a constraint: the constraint "
            "decides where the output ends"
        )
    return engine_for(model).compile(constraint)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _check_n_ctx(n_ctx: int | None, max_seq_len: int) -> int:
    if n_ctx is None:
        return min(max_seq_len, DEFAULT_CONTEXT)
    if not 1 <= n_ctx <= max_seq_len:
        raise ValueError(f"n_ctx must be in [1, {max_seq_len}], got {n_ctx}")
    return int(n_ctx)
