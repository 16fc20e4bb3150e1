"""Closing JSON-schema objects before they reach the grammar engine.

JSON Schema lets an object with `properties` carry any other key unless it says
`additionalProperties: false`. A small model steered only by a token mask fills
such room with keys copied from the prompt until max_tokens runs out, so
`edgeslm.constraints` hands llguidance a copy of every schema in which those
objects are closed: `closed_objects(schema)`. Closing only ever removes values,
so output that satisfies the copy satisfies the original (docs/STRUCTURED.md,
"Closed objects", states the rule).

Not done: `$ref`s to anchors, nested `$id`s or other documents; a schema with one
is left open rather than guessed at.
"""

from __future__ import annotations

import logging
import urllib.parse
from collections.abc import Iterable, Mapping
from typing import Any

log = logging.getLogger(__name__)

# Keywords whose values are data, not schemas: never rewritten.
DATA_KEYWORDS = frozenset({"enum", "const", "default", "examples", "x-guidance"})
# Keywords whose values map names to schemas.
NAMED_SCHEMAS = frozenset(
    {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"}
)
# Keywords whose members are one more part of the object they sit in.
_PARTS = ("allOf", "$ref", "anyOf", "oneOf")
# Keywords that may require keys the schema does not list by name.
_REQUIRES_UNLISTED = ("minProperties", "enum", "const")
# ... or allow them.
_UNLISTED_KEYS = ("patternProperties", *_REQUIRES_UNLISTED)
# Passes over a schema before contexts through $ref settle (one per level of $ref
# nesting; schemas from pydantic need two or three).
_MAX_PASSES = 16


class _Unresolvable(Exception):
    """A $ref the closer cannot follow (an anchor, an $id, another document)."""


def closed_objects(schema: Any) -> Any:
    """A copy of `schema` where objects with `properties` but no
    `additionalProperties` allow no other keys.

    JSON Schema lets such objects carry any extra key, and a small model, steered
    only by the mask, fills them with keys copied from the prompt until max_tokens.
    An object combined with other parts (members of `allOf`, branches of `anyOf` /
    `oneOf`, a `$ref` target beside other keywords) is closed to the keys that it
    and every part it is combined with declare (`properties` or `required`), so
    the combination keeps all of them; closing each part to its own keys would
    forbid the others'. A part that allows unlisted keys (`additionalProperties`
    other than false, `patternProperties`, `minProperties`, `enum`, `const`) leaves
    the parts combined with it open. Closing only ever removes values, so the
    output still validates against `schema`.

    A schema whose $ref the closer cannot follow is returned unchanged.
    """
    if not isinstance(schema, Mapping):
        return schema
    contexts: dict[str, dict | None] = {}
    try:
        for _ in range(_MAX_PASSES):
            closer = _Closer(schema, contexts)
            out = closer.walk(schema, "", {})
            if closer.ref_contexts == contexts:
                return out
            contexts = closer.ref_contexts
    except _Unresolvable as exc:
        log.debug("objects left open: cannot follow $ref %s", exc)
    return schema


def _union(a: dict | None, b: dict | None) -> dict | None:
    """Union of two ordered key sets (dicts); None (any key) absorbs."""
    return None if a is None or b is None else {**a, **b}


def _union_all(sets: Iterable[dict | None]) -> dict | None:
    """Union of any number of key sets (`_union`)."""
    out: dict | None = {}
    for keys in sets:
        out = _union(out, keys)
    return out


def _declared(node: Mapping[str, Any]) -> dict:
    """The keys `node` names: its properties, then its required keys."""
    props = node.get("properties")
    keys = list(props) if isinstance(props, Mapping) else []
    required = node.get("required")
    if isinstance(required, list):
        keys += [k for k in required if isinstance(k, str)]
    return dict.fromkeys(keys)


class _Closer:
    """One pass of `closed_objects` over a schema document.

    The context of a subschema is the set of keys that the parts it is combined
    with declare (None: any key). Contexts reach `$ref` targets through the
    references, so a pass uses those the previous pass found, in `contexts`.
    """

    def __init__(self, root: Mapping[str, Any], contexts: dict) -> None:
        self.root = root
        self.contexts = contexts
        self.ref_contexts: dict[str, dict | None] = {}  # found by this pass

    def walk(self, value: Any, ptr: str, context: dict | None) -> Any:
        """The closed copy of `value`, the subschema at pointer `ptr`."""
        if isinstance(value, list):
            return [self.walk(v, f"{ptr}/{i}", {}) for i, v in enumerate(value)]
        if not isinstance(value, Mapping):
            return value
        if "$id" in value and ptr:  # refs below resolve against another base
            raise _Unresolvable(f"under the $id at {ptr}")
        context = _union(context, self.contexts.get(ptr, {}))
        out = {}
        for key, sub in value.items():
            here = f"{ptr}/{escape_pointer(key)}"
            if key in DATA_KEYWORDS:
                out[key] = sub
            elif key in ("allOf", "anyOf", "oneOf") and isinstance(sub, list):
                inner = self.member_contexts(value, key, context)
                out[key] = [
                    self.walk(m, f"{here}/{i}", c)
                    for i, (m, c) in enumerate(zip(sub, inner, strict=True))
                ]
            elif key in NAMED_SCHEMAS and isinstance(sub, Mapping):
                out[key] = {
                    k: self.walk(v, f"{here}/{escape_pointer(k)}", {})
                    for k, v in sub.items()
                }
            else:
                out[key] = self.walk(sub, here, {})
        if "$ref" in value:
            target, _ = self.resolve(value["$ref"])
            seen = _union(context, self.keys(value, skip="$ref"))
            self.ref_contexts[target] = _union(self.ref_contexts.get(target, {}), seen)
        self.close(value, out, context)
        return out

    def member_contexts(
        self, node: Mapping[str, Any], keyword: str, context: dict | None
    ) -> list[dict | None]:
        """The context of each member of `node[keyword]` (allOf, anyOf, oneOf):
        `node`'s own, and the keys of `node` and its other parts. Branches of
        anyOf / oneOf are alternatives, not combined with each other."""
        members = node[keyword]
        outer = _union(context, self.keys(node, skip=keyword))
        if keyword != "allOf":
            return [outer] * len(members)
        keys = [self.keys(m) for m in members]
        return [
            _union(outer, _union_all(k for j, k in enumerate(keys) if j != i))
            for i in range(len(members))
        ]

    def close(self, node: Mapping[str, Any], out: dict, context: dict | None) -> None:
        """Close `out` (the copy of `node`) to the keys of its whole combination."""
        props = out.get("properties")
        if not isinstance(props, Mapping) or "additionalProperties" in node:
            return
        if any(k in node for k in _REQUIRES_UNLISTED):
            return
        allowed = _union(_union(context, _declared(node)), self.keys(node, own=False))
        if allowed is None:
            return
        out["properties"] = {**props, **{k: {} for k in allowed if k not in props}}
        out["additionalProperties"] = False

    def keys(
        self,
        node: Any,
        skip: str = "",
        own: bool = True,
        seen: frozenset = frozenset(),
    ) -> dict | None:
        """The keys an object valid against `node` may need: those `node` and its
        parts declare (`node`'s own only if `own`; not through the `skip`
        keyword). None when a part allows keys it does not list."""
        if not isinstance(node, Mapping) or id(node) in seen:
            return {}
        extra = node.get("additionalProperties", False) is not False
        if own and (extra or any(k in node for k in _UNLISTED_KEYS)):
            return None
        found = _declared(node) if own else {}
        seen = seen | {id(node)}
        for keyword in _PARTS:
            if keyword == skip or keyword not in node:
                continue
            for part in self.parts(node, keyword):
                found = _union(found, self.keys(part, seen=seen))
        return found

    def parts(self, node: Mapping[str, Any], keyword: str) -> list:
        """The subschemas `node[keyword]` combines with `node`."""
        if keyword == "$ref":
            return [self.resolve(node["$ref"])[1]]
        members = node[keyword]
        return members if isinstance(members, list) else []

    def resolve(self, ref: Any) -> tuple[str, Any]:
        """(JSON pointer, subschema) of a local `$ref` ("#/$defs/Room")."""
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
            raise _Unresolvable(repr(ref))
        tokens = [
            t.replace("~1", "/").replace("~0", "~")
            for t in urllib.parse.unquote(ref[1:]).split("/")[1:]
        ]
        node = self.root
        for token in tokens:
            if isinstance(node, Mapping) and token in node:
                node = node[token]
            elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
                node = node[int(token)]
            else:
                raise _Unresolvable(repr(ref))
        return "".join(f"/{escape_pointer(t)}" for t in tokens), node


def escape_pointer(key: str) -> str:
    """`key` as one token of a JSON pointer (RFC 6901: `~` and `/` escaped)."""
    return str(key).replace("~", "~0").replace("/", "~1")
