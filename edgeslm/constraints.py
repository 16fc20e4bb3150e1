"""Structured output: constraints compiled by llguidance into per-step token masks.

A `Constraint` says what shape the output must have: a JSON schema, a regular
expression, one of a fixed list of strings, or a Lark grammar. `GrammarEngine` holds
llguidance's view of one model's tokenizer (built once per tokenizer and cached;
0.4-0.8 s for SmolLM2's) and compiles constraints into `Guide`s. A `Guide` follows
one generation: before each step it writes the packed bitmask of allowed tokens
(the layout the sampler takes, see docs/SAMPLING.md) into a buffer the C sampler
reads, it consumes the chosen token, and it reports when the output is complete. It
also offers the tokens the grammar forces (`{"name": "` after a choice of key),
which the generate loop feeds to the model in one step instead of sampling them.

The engine is llguidance (the grammar engine llama.cpp and onnxruntime-genai use),
an optional dependency that the `structured` extra installs; without it, making a
constraint raises `ConstraintError`. This module writes no parser of its own. A
`Constraint` is checked by the engine when it is made, before any model is
involved, and llguidance's error messages become `ConstraintError` /
`UnsupportedSchemaError`, which name the offending feature, where it sits in the
schema, and what to write instead (docs/STRUCTURED.md).

Does not do yet: several constraints in sequence (free text, then JSON); token
healing of the prompt's last token (the prompt is taken as it is).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeslm.errors import (
    ConstraintError,
    TruncatedOutputError,
    UnsupportedSchemaError,
)
from edgeslm.generation import Generation
from edgeslm.sampling import mask_words
from edgeslm.schema_closing import (
    DATA_KEYWORDS,
    NAMED_SCHEMAS,
    closed_objects,
    escape_pointer,
)

log = logging.getLogger(__name__)

__all__ = [
    "Constraint",
    "GrammarEngine",
    "Guide",
    "StructuredGeneration",
    "constraint_from_options",
    "engine_for",
    "lark_json",
]

# Compact JSON with one space after separators: what models see most in training
# text, and no room for runs of whitespace (a small model's favourite loop).
# A schema's own top-level "x-guidance" object overrides these.
JSON_DEFAULTS: dict[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}

# Generation options that select a constraint; at most one may be given.
CONSTRAINT_OPTIONS = ("json_schema", "regex", "choices", "grammar", "response_format")


@dataclass(frozen=True)
class Constraint:
    """What shape the output must have, ready for the grammar engine.

    Make one with `Constraint.json_schema`, `.regex`, `.choice` or `.lark`; the
    generation options `json_schema=`, `regex=`, `choices=`, `grammar=` do the same.

    Attributes:
        kind: "json_schema", "regex", "choice" or "grammar".
        source: the schema (a dict), the pattern, the tuple of choices, or the Lark
            text, as given.
        grammar: the llguidance grammar (JSON text) compiled from the source.
    """

    kind: str
    source: Any
    grammar: str = dataclasses.field(repr=False)

    def __post_init__(self) -> None:
        # The engine checks the grammar without a tokenizer (well under a
        # millisecond for the test suite's schemas): a schema it cannot handle
        # fails here, before a model is loaded or a prompt computed.
        llg = _llguidance()
        is_error, notes = llg.LLMatcher.validate_grammar_with_warnings(self.grammar)
        if is_error:
            raise _compile_error(self, notes[0] if notes else "")
        for note in notes:
            if not note.startswith("no tokenizer"):  # special tokens: checked later
                log.warning("%s: %s", self.kind, note.splitlines()[0])

    @classmethod
    def json_schema(cls, schema: Mapping[str, Any] | str | bool) -> Constraint:
        """Output must be JSON valid against `schema` (a dict or its JSON text).

        Objects are written compactly (`{"a": 1, "b": [2, 3]}`) with properties in
        the schema's order. An object schema with `properties` but no
        `additionalProperties` gets no other keys (the output still validates
        against the schema as given); write `"additionalProperties": true` to allow
        them. Combined with other parts (`allOf`, `anyOf`, `oneOf`, `$ref`), it
        gets the keys that any part combined with it declares. `{"type": "object"}`
        accepts any JSON object.

        Raises:
            ConstraintError: the schema is not a JSON object (or boolean).
        """
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as exc:
                raise ConstraintError(
                    f"json_schema is not valid JSON ({exc}); give a dict or the "
                    "text of a JSON object"
                ) from exc
        if schema is True:
            schema = {}
        if schema is False:
            raise ConstraintError("json_schema false accepts nothing; give a schema")
        if not isinstance(schema, Mapping):
            raise ConstraintError(
                f"json_schema must be a JSON object (dict), got {type(schema).__name__}"
            )
        schema = dict(schema)
        llg = _llguidance()
        try:
            grammar = llg.LLMatcher.grammar_from_json_schema(
                closed_objects(schema), defaults=JSON_DEFAULTS
            )
        except (ValueError, TypeError) as exc:  # not JSON-serializable
            raise ConstraintError(f"json_schema cannot be serialized: {exc}") from exc
        return cls("json_schema", schema, grammar)

    @classmethod
    def regex(cls, pattern: str) -> Constraint:
        """The whole output must match `pattern` (Rust regex syntax, anchored).

        Raises:
            ConstraintError: not a non-empty string.
        """
        if not isinstance(pattern, str) or not pattern:
            raise ConstraintError(f"regex must be a non-empty string, got {pattern!r}")
        return cls(
            "regex", pattern, _llguidance().LLMatcher.grammar_from_regex(pattern)
        )

    @classmethod
    def choice(cls, options: Sequence[str]) -> Constraint:
        """The output must be exactly one of `options`.

        Raises:
            ConstraintError: not a list of distinct non-empty strings.
        """
        if isinstance(options, str) or not isinstance(options, Sequence):
            raise ConstraintError(
                f"choices must be a list of strings, got {type(options).__name__}"
            )
        opts = tuple(options)
        bad = [o for o in opts if not isinstance(o, str) or not o]
        if not opts or bad:
            raise ConstraintError(
                f"choices must be non-empty strings (at least one), got {list(opts)!r}"
            )
        if len(set(opts)) != len(opts):
            dup = sorted({o for o in opts if opts.count(o) > 1})
            raise ConstraintError(f"choices must be distinct; repeated: {dup}")
        lark = "start: " + " | ".join(json.dumps(o) for o in opts)
        return cls("choice", opts, _llguidance().LLMatcher.grammar_from_lark(lark))

    @classmethod
    def lark(cls, text: str) -> Constraint:
        """Output must match a Lark grammar (llguidance's dialect: `start` is the
        top rule; `%json {...}` embeds a JSON schema; `<name>` is a special token).

        Raises:
            ConstraintError: not a non-empty string.
        """
        if not isinstance(text, str) or not text.strip():
            raise ConstraintError(
                "grammar must be the non-empty text of a Lark grammar"
            )
        return cls("grammar", text, _llguidance().LLMatcher.grammar_from_lark(text))


def lark_json(schema: Mapping[str, Any]) -> str:
    """`%json {...}` for a Lark grammar, with the same conventions as
    `Constraint.json_schema` (compact separators, closed objects)."""
    closed = closed_objects(dict(schema))
    closed["x-guidance"] = {**JSON_DEFAULTS, **closed.get("x-guidance", {})}
    return "%json " + json.dumps(closed, ensure_ascii=False)


def constraint_from_options(options: dict[str, Any]) -> Constraint | None:
    """Pop the constraint options from generation `options` and build the constraint.

    Accepted (at most one): `json_schema` (dict or JSON text), `regex` (str),
    `choices` (list of str), `grammar` (Lark text or a `Constraint`), and
    `response_format` in the OpenAI shape: `{"type": "json_object"}`,
    `{"type": "json_schema", "json_schema": {"schema": {...}}}` or `{"type": "text"}`.

    Raises:
        ConstraintError: more than one given, or a malformed one.
    """
    given = {k: options.pop(k) for k in CONSTRAINT_OPTIONS if k in options}
    given = {k: v for k, v in given.items() if v is not None}
    if len(given) > 1:
        raise ConstraintError(
            f"give at most one constraint, got {sorted(given)}; combine them in one "
            "JSON schema or Lark grammar instead"
        )
    if not given:
        return None
    ((kind, value),) = given.items()
    if isinstance(value, Constraint):
        return value
    if kind == "json_schema":
        return Constraint.json_schema(value)
    if kind == "regex":
        return Constraint.regex(value)
    if kind == "choices":
        return Constraint.choice(value)
    if kind == "grammar":
        return Constraint.lark(value)
    return _from_response_format(value)


def _from_response_format(value: Any) -> Constraint | None:
    kind = value.get("type") if isinstance(value, Mapping) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint.json_schema({"type": "object"})
    if kind == "json_schema":
        spec = value.get("json_schema")
        if isinstance(spec, Mapping) and "schema" in spec:
            return Constraint.json_schema(spec["schema"])
    raise ConstraintError(
        "response_format must be {'type': 'text'}, {'type': 'json_object'} or "
        "{'type': 'json_schema', 'json_schema': {'schema': {...}}}, got "
        f"{value!r}"
    )


# --- errors: llguidance's messages, named by feature ------------------------------

_UNIMPLEMENTED = re.compile(r"Unimplemented keys: \[([^\]]*)\]")
_UNKNOWN_FORMAT = re.compile(r"Unknown format: (\S+)")
# The regex crate's report: the pattern on its own line, then "error: <why>".
_REGEX_ERROR = re.compile(r"regex parse error:\s*\n\s*(.*?)\n.*?error: ([^\n]+)", re.S)
_FORMATS = "date-time, time, date, duration, email, hostname, ipv4, ipv6, uuid"
_LENIENT = (
    'or add "x-guidance": {"lenient": true} at the top of the schema to ignore '
    "unsupported keywords and formats (the output is then not checked against them)"
)

# What to write instead of a keyword the engine does not implement.
_INSTEAD = {
    "not": "list the allowed values with enum, or the allowed shapes with anyOf",
    "if": "anyOf with one branch per case",
    "dependentRequired": "anyOf of the object with and without the dependent keys",
    "dependentSchemas": "anyOf of the object with and without the dependent keys",
    "dependencies": "anyOf of the object with and without the dependent keys",
    "uniqueItems": "check uniqueness after parsing, or an enum per prefixItems slot",
    "contains": "prefixItems, or check after parsing",
    "propertyNames": "properties with fixed names, or patternProperties",
    "unevaluatedProperties": "additionalProperties",
    "unevaluatedItems": "items",
    "$dynamicRef": "a local $ref",
}
_INSTEAD.update(
    {k: _INSTEAD["if"] for k in ("then", "else")}
    | {k: _INSTEAD["contains"] for k in ("minContains", "maxContains")}
    | {k: _INSTEAD["$dynamicRef"] for k in ("$dynamicAnchor", "$recursiveRef")}
)


def _compile_error(constraint: Constraint, message: str) -> ConstraintError:
    """The edgeslm error for llguidance's compile error `message`.

    An `UnsupportedSchemaError` for a JSON schema feature the engine lacks (its
    `features` name them); a `ConstraintError` for anything else, such as an
    unsatisfiable schema or a syntax error.
    """
    message = message.strip()
    what = {"json_schema": "json_schema", "regex": "regex", "choice": "choices"}
    what = what.get(constraint.kind, "grammar")
    if m := _REGEX_ERROR.search(message):
        pattern, why = m.group(1).strip(), m.group(2).strip()
        feature = _regex_feature(why)
        if feature is None:  # a syntax error
            return ConstraintError(f"{what}: invalid pattern {pattern!r}: {why}")
        instead = _PATTERN_INSTEAD[feature]
        text = f"{what} uses a {feature} in the pattern {pattern!r} ({why}); {instead}"
        if constraint.kind == "json_schema":
            return UnsupportedSchemaError(text, (f"pattern with {feature}",))
        return ConstraintError(text)
    if "lookarounds not supported" in message:  # \b and friends
        text = f"{what} uses a look-around in a pattern ({message.splitlines()[0]})"
        text += f"; {_PATTERN_INSTEAD['look-around']}"
        if constraint.kind == "json_schema":
            return UnsupportedSchemaError(text, ("pattern with look-around",))
        return ConstraintError(text)
    if constraint.kind != "json_schema" and "JSON schema" not in message:
        return ConstraintError(f"{what} cannot be compiled: {message}")

    schema = constraint.source if constraint.kind == "json_schema" else None
    first = message.splitlines()[0]
    if m := _UNIMPLEMENTED.search(message):
        keys = tuple(k.strip().strip('"') for k in m.group(1).split(",") if k.strip())
        parts = []
        for key in keys:
            where = _pointers(schema, key) if schema is not None else []
            at = f" at {', '.join(where[:3])}" if where else ""
            parts.append(f"{key!r}{at} ({_INSTEAD.get(key, 'leave it out')})")
        text = (
            f"{what} uses {'; '.join(parts)}: the grammar engine does not support "
            f"{'this keyword' if len(keys) == 1 else 'these keywords'}. Rewrite "
            f"as suggested, {_LENIENT}"
        )
        return UnsupportedSchemaError(text, keys)
    if m := _UNKNOWN_FORMAT.search(message):
        fmt = m.group(1).strip("\"'.,")
        text = (
            f'{what} uses "format": {fmt!r}, which the grammar engine does not '
            f"know (it knows {_FORMATS}). Use a pattern instead, {_LENIENT}"
        )
        return UnsupportedSchemaError(text, (f"format: {fmt}",))
    if "oneOf" in message and "not supported" in message:
        where = _pointers(schema, "oneOf") if schema is not None else []
        at = f" at {', '.join(where[:3])}" if where else ""
        text = (
            f"{what} uses 'oneOf'{at}, which the grammar engine supports only when "
            "its branches cannot both match. Write anyOf instead (the same schema "
            'when the branches exclude each other), or add "x-guidance": '
            '{"coerce_one_of": true} at the top to treat it as anyOf (an output may '
            "then match two branches and fail oneOf validation)"
        )
        return UnsupportedSchemaError(text, ("oneOf",))
    if "not present in a registry" in message:
        text = (
            f"{what} has a $ref to another document ({first}); the grammar engine "
            "reads no files or URLs. Copy the referenced schema into $defs and "
            'point at it with "$ref": "#/$defs/..."'
        )
        return UnsupportedSchemaError(text, ("$ref to an external document",))
    if first.startswith("Unsatisfiable schema: "):
        why = first.removeprefix("Unsatisfiable schema: ")
        return ConstraintError(
            f"{what} accepts no value ({why}); fix the schema so that some value "
            "is valid"
        )
    return ConstraintError(f"{what} cannot be used: {first}")


# What to write instead of a pattern feature (the regex crate has no backtracking).
_PATTERN_INSTEAD = {
    "look-around": "rewrite the pattern without look-ahead, look-behind or \\b",
    "backreference": "spell out the repeated part instead of referring back to it",
}


def _regex_feature(why: str) -> str | None:
    """The unsupported feature a regex error names, or None for a syntax error."""
    if "look-around" in why or "lookaround" in why:
        return "look-around"
    if "backreference" in why:
        return "backreference"
    return None


def _pointers(schema: Any, keyword: str, path: str = "") -> list[str]:
    """JSON pointers (`/properties/a/not`) to where `keyword` is used in `schema`.

    Names under `properties` and values of data keywords (`enum`, `const`, ...)
    are not keywords, so a property named "not" is not reported.
    """
    if isinstance(schema, list):
        return [
            p
            for i, item in enumerate(schema)
            for p in _pointers(item, keyword, f"{path}/{i}")
        ]
    if not isinstance(schema, Mapping):
        return []
    found = [f"{path}/{escape_pointer(keyword)}"] if keyword in schema else []
    for key, value in schema.items():
        here = f"{path}/{escape_pointer(key)}"
        if key in DATA_KEYWORDS:
            continue
        if key in NAMED_SCHEMAS and isinstance(value, Mapping):
            for name, sub in value.items():
                found += _pointers(sub, keyword, f"{here}/{escape_pointer(name)}")
        else:
            found += _pointers(value, keyword, here)
    return found


# --- the engine: one per tokenizer ------------------------------------------------


class GrammarEngine:
    """llguidance's tokenizer for one model, and the constraints compiled for it.

    Args:
        tokenizer_json: the text of the model's `tokenizer.json`.
        vocab_size: logits per step (the model's; may exceed the tokenizer's).
        eos_ids: tokens that end a generation; allowed once a constraint is complete.
    """

    def __init__(
        self, tokenizer_json: str, vocab_size: int, eos_ids: Sequence[int]
    ) -> None:
        llg = _llguidance()
        if not eos_ids:
            raise ConstraintError(
                "structured output needs an end-of-sequence token, and this model's "
                "manifest lists none; re-export the model"
            )
        started = time.perf_counter()
        try:
            self._tokenizer = llg.LLTokenizer(
                tokenizer_json, n_vocab=vocab_size, eos_token=list(eos_ids)
            )
        except Exception as exc:  # the Rust side raises bare exceptions
            raise ConstraintError(
                f"the grammar engine cannot read this model's tokenizer ({exc})"
            ) from exc
        self.vocab_size = vocab_size
        self.eos_ids = tuple(eos_ids)
        self.build_seconds = time.perf_counter() - started
        self._prototypes: dict[str, Any] = {}  # grammar -> compiled matcher
        self._lock = threading.Lock()
        log.debug("grammar engine tokenizer built in %.2f s", self.build_seconds)

    def compile(self, constraint: Constraint) -> Guide:
        """A fresh `Guide` for one generation under `constraint`.

        Compiled grammars are kept (up to 32), so the same constraint compiles once.

        Raises:
            ConstraintError, UnsupportedSchemaError: the constraint cannot be used.
        """
        with self._lock:
            proto = self._prototypes.get(constraint.grammar)
        if proto is None:
            proto = self._new_matcher(constraint)
            with self._lock:
                if len(self._prototypes) >= 32:
                    self._prototypes.pop(next(iter(self._prototypes)))
                self._prototypes[constraint.grammar] = proto
        return Guide(proto.deep_copy(), constraint, self.vocab_size, self.eos_ids)

    def _new_matcher(self, constraint: Constraint) -> Any:
        llg = _llguidance()
        limits = llg.LLParserLimits(verbose_errors=False)
        matcher = llg.LLMatcher(
            self._tokenizer, constraint.grammar, log_level=0, limits=limits
        )
        if matcher.is_error():
            raise _compile_error(constraint, matcher.get_error())
        return matcher


_ENGINES: dict[tuple, GrammarEngine] = {}
_BY_MODEL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_ENGINES_LOCK = threading.Lock()


def engine_for(model: Any) -> GrammarEngine:
    """The grammar engine of a loaded `Model`, built on first use and cached.

    Models loaded from the same tokenizer share one engine.
    """
    engine = _BY_MODEL.get(model)
    if engine is not None:
        return engine
    import hashlib  # here: unconstrained generation needs no OpenSSL

    backend = model.tokenizer.backend
    text = backend.to_str()
    key = (
        hashlib.sha256(text.encode()).hexdigest(),
        model.config.vocab_size,
        tuple(model.manifest.tokens.eos_token_ids),
    )
    with _ENGINES_LOCK:
        engine = _ENGINES.get(key)
    if engine is None:
        engine = GrammarEngine(text, key[1], key[2])
        with _ENGINES_LOCK:
            engine = _ENGINES.setdefault(key, engine)
    _BY_MODEL[model] = engine
    return engine


# --- one generation ---------------------------------------------------------------


class Guide:
    """The state of one constrained generation.

    `mask()` before a step, `advance(tokens)` after it; `done` when nothing may
    follow, `complete` when the output so far satisfies the constraint.
    """

    def __init__(
        self,
        matcher: Any,
        constraint: Constraint,
        vocab_size: int,
        eos_ids: tuple[int, ...],
    ) -> None:
        self.constraint = constraint
        self._matcher = matcher
        self._eos_ids = eos_ids
        # Packed allowed-token bits, (ceil(vocab / 32),) uint32, rewritten each step.
        self._mask = np.zeros(mask_words(vocab_size), dtype=np.uint32)
        self._mask_ptr = self._mask.ctypes.data
        self._mask_bytes = self._mask.nbytes

    def mask(self) -> np.ndarray:
        """The tokens allowed next, written into a buffer reused every step."""
        self._matcher.unsafe_compute_mask_ptr(self._mask_ptr, self._mask_bytes)
        if self._matcher.is_error():
            raise ConstraintError(
                f"the grammar engine failed: {self._matcher.get_error()}"
            )
        return self._mask

    def forced(self) -> list[int]:
        """Tokens the constraint allows no alternative to (maybe none)."""
        return self._matcher.compute_ff_tokens()

    def advance(self, tokens: Sequence[int]) -> None:
        """Record generated tokens.

        Raises:
            ConstraintError: a token was not allowed (only if the caller ignored
                the mask: the sampler never picks a masked token).
        """
        if not self._matcher.consume_tokens(list(tokens)):
            raise ConstraintError(
                f"token(s) {list(tokens)} rejected by the constraint: "
                f"{self._matcher.get_error()}"
            )

    @property
    def done(self) -> bool:
        """True when the constraint allows nothing more but the end."""
        return self._matcher.is_stopped()

    @property
    def complete(self) -> bool:
        """True when the output so far satisfies the constraint."""
        return self._matcher.is_accepting() or self._matcher.is_stopped()


# --- results ----------------------------------------------------------------------


@dataclass
class StructuredGeneration(Generation):
    """A `Generation` made under a constraint.

    Attributes:
        complete: the text satisfies the constraint. False when `max_tokens` or a
            stop string cut it short (`finish_reason` says which): then the text is
            a truncated prefix and must not be used as a valid answer.
        constraint: the constraint the text was made under.
    """

    complete: bool = False
    constraint: Constraint | None = None

    def value(self) -> Any:
        """The parsed answer: a Python object for a JSON schema, else the text.

        Raises:
            TruncatedOutputError: the output is not complete.
        """
        if not self.complete:
            raise TruncatedOutputError(
                f"the constrained output was cut short (finish_reason "
                f"{self.finish_reason!r}) after {len(self.tokens)} tokens: "
                f"{_preview(self.text)}; raise max_tokens or bound the schema "
                "(maxLength, maxItems)",
                self,
            )
        kind = self.constraint.kind if self.constraint else ""
        return json.loads(self.text) if kind == "json_schema" else self.text


def _preview(text: str, n: int = 60) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError as exc:  # optional: the "structured" extra
        raise ConstraintError(
            "structured output needs the llguidance package, which the "
            '"structured" extra installs: pip install "edgeslm[structured]" '
            "(or pip install llguidance)"
        ) from exc
    return llguidance
