"""Structured outputs (task ``extract``): the canonical form of a JSON object, its fields
as (JSON Pointer, value) pairs, per-field precision/recall/F1, and what a JSON Schema says
about each field (an enum, a span of the input, anything else).

One owner for these so that the votes, the verifier, the students, the K-score and the
report agree on what "the same object" and "a field" mean::

    >>> from kolm_compile.structured import canonical, field_pairs
    >>> canonical({"b": 1, "a": "x"})
    '{"a":"x","b":1}'
    >>> field_pairs({"intent": "PlayMusic", "slots": {"artist": ["Nina Simone"]}})
    [('/intent', '"PlayMusic"'), ('/slots/artist', '"Nina Simone"')]

* **Canonical form** — RFC 8785 (JSON Canonicalization Scheme), as UTF-8 text: two objects
  that differ only in key order or number spelling are one answer.
* **Fields** — every leaf of an object, addressed by its RFC 6901 JSON Pointer; the items
  of an array share their array's pointer (a field may hold several values, in order), and
  each value is written in canonical JSON. An empty object or array contributes nothing.
* **Schema fields** (:func:`schema_fields`) — walking ``properties`` and array ``items``
  of a JSON Schema: a string field with ``enum`` is an *enum* field; a string field marked
  ``"x-kolm-grounded": true`` (on itself or on an array holding it) is a *span* field —
  its values must occur in the input; every other leaf is *other*. ``$ref`` and
  combinators (``anyOf`` …) are not followed: such a field counts as *other*.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import rfc8785

__all__ = [
    "GROUNDED_KEY",
    "FieldScore",
    "SchemaField",
    "assemble",
    "canonical",
    "field_pairs",
    "field_scores",
    "grounded_paths",
    "parse_object",
    "pointer",
    "pointer_parts",
    "schema_fields",
    "span_schema",
]

#: the JSON Schema keyword that marks a string field as a span of the input
GROUNDED_KEY = "x-kolm-grounded"


def canonical(value: Any) -> str:
    """RFC 8785 canonical JSON text of ``value`` (raises ``ValueError`` for what JSON
    cannot hold, e.g. NaN)."""
    try:
        return rfc8785.dumps(value).decode("utf-8")
    except (rfc8785.CanonicalizationError, TypeError) as e:
        raise ValueError(f"not canonical JSON: {e}") from e


def parse_object(text: str) -> dict[str, Any]:
    """The JSON object ``text`` holds; ``ValueError`` naming the problem for text that is
    not JSON, not an object, or repeats a key."""

    def no_dupes(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in pairs:
            if k in out:
                raise ValueError(f"duplicate key {k[:40]!r}")
            out[k] = v
        return out

    try:
        value = json.loads(text, object_pairs_hook=no_dupes)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON: {e.msg} at {e.pos}") from e
    if not isinstance(value, dict):
        raise ValueError(f"a JSON {type(value).__name__}, not an object")
    return value


def pointer(parts: Sequence[str]) -> str:
    """RFC 6901 JSON Pointer of ``parts`` (``~`` → ``~0``, ``/`` → ``~1``)."""
    return "".join("/" + p.replace("~", "~0").replace("/", "~1") for p in parts)


def _leaves(value: Any, parts: tuple[str, ...]) -> Iterator[tuple[str, str]]:
    if isinstance(value, Mapping):
        for k in sorted(value):
            yield from _leaves(value[k], (*parts, str(k)))
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _leaves(item, parts)
    else:
        yield pointer(parts), canonical(value)


def field_pairs(obj: Any) -> list[tuple[str, str]]:
    """Every leaf of ``obj`` as ``(JSON Pointer, canonical JSON value)``, keys in sorted
    order and array items in their order."""
    return list(_leaves(obj, ()))


@dataclass(frozen=True)
class FieldScore:
    """Precision, recall and F1 of one field over a holdout (``support``: gold values)."""

    precision: float
    recall: float
    f1: float
    support: int
    predicted: int
    correct: int

    def to_dict(self) -> dict[str, float | int]:
        return {
            "precision": round(self.precision, 4),
            "recall": round(self.recall, 4),
            "f1": round(self.f1, 4),
            "support": self.support,
            "predicted": self.predicted,
            "correct": self.correct,
        }


def _score(correct: int, predicted: int, support: int) -> FieldScore:
    p = correct / predicted if predicted else (1.0 if not support else 0.0)
    r = correct / support if support else (1.0 if not predicted else 0.0)
    f = 2 * p * r / (p + r) if p + r else 0.0
    return FieldScore(p, r, f, support, predicted, correct)


def field_scores(
    golds: Sequence[Any], preds: Sequence[Any | None], *, prefix: str = ""
) -> tuple[dict[str, FieldScore], FieldScore]:
    """Per-field and micro-averaged precision/recall/F1 of predicted objects against gold.

    A value counts as correct when the same pointer holds it in the gold object of that
    example (multiset match: a value predicted twice and given once is one correct, one
    wrong). ``None`` (no object: invalid output) predicts nothing. ``prefix`` keeps only
    pointers starting with it (``"/slots/"``: the slot F1)."""
    if len(golds) != len(preds):
        raise ValueError(f"{len(golds)} gold objects but {len(preds)} predictions")
    c: Counter[str] = Counter()
    n_pred: Counter[str] = Counter()
    n_gold: Counter[str] = Counter()
    for g, p in zip(golds, preds, strict=True):
        gp = Counter(x for x in field_pairs(g) if x[0].startswith(prefix))
        pp = (
            Counter(x for x in field_pairs(p) if x[0].startswith(prefix))
            if p is not None
            else Counter()
        )
        for (path, _), n in gp.items():
            n_gold[path] += n
        for (path, _), n in pp.items():
            n_pred[path] += n
        for pair, n in (gp & pp).items():
            c[pair[0]] += n
    per = {path: _score(c[path], n_pred[path], n_gold[path]) for path in sorted(n_gold | n_pred)}
    micro = _score(sum(c.values()), sum(n_pred.values()), sum(n_gold.values()))
    return per, micro


@dataclass(frozen=True)
class SchemaField:
    """One leaf field of a JSON Schema (see the module docstring)."""

    path: str  # JSON Pointer (array items share their array's pointer)
    kind: str  # "enum" | "span" | "other"
    many: bool  # inside an array: several values
    enum: tuple[str, ...] = ()


def _walk(schema: Any, parts: tuple[str, ...], many: bool, grounded: bool) -> Iterator[SchemaField]:
    if not isinstance(schema, Mapping):
        yield SchemaField(pointer(parts), "other", many)
        return
    grounded = grounded or schema.get(GROUNDED_KEY) is True
    types = schema.get("type")
    types = set(types) if isinstance(types, list) else {types}
    if "object" in types or "properties" in schema:
        props = schema.get("properties")
        if isinstance(props, Mapping) and props:
            for name in sorted(props):
                yield from _walk(props[name], (*parts, str(name)), many, grounded)
        else:
            yield SchemaField(pointer(parts), "other", many)
        return
    if "array" in types or "items" in schema:
        yield from _walk(schema.get("items", {}), parts, True, grounded)
        return
    enum = schema.get("enum")
    if isinstance(enum, list) and enum and all(isinstance(e, str) for e in enum):
        yield SchemaField(pointer(parts), "enum", many, tuple(enum))
    elif "string" in types and grounded:
        yield SchemaField(pointer(parts), "span", many)
    else:
        yield SchemaField(pointer(parts), "other", many)


def schema_fields(schema: Mapping[str, Any]) -> list[SchemaField]:
    """The leaf fields of ``schema``, by pointer order."""
    return list(_walk(schema, (), False, False))


def span_schema(schema: Mapping[str, Any]) -> bool:
    """Whether a span tagger can produce every field of ``schema``: each leaf is an enum
    (a classification head) or a grounded string (a span), and enum fields hold one value."""
    fs = schema_fields(schema)
    return bool(fs) and all(f.kind == "span" or (f.kind == "enum" and not f.many) for f in fs)


def grounded_paths(schema: Mapping[str, Any]) -> set[str]:
    """Pointers of the span fields of ``schema`` (marked ``x-kolm-grounded``)."""
    return {f.path for f in schema_fields(schema) if f.kind == "span"}


def pointer_parts(ptr: str) -> list[str]:
    """The keys of RFC 6901 JSON Pointer ``ptr`` (the inverse of :func:`pointer`)."""
    if ptr == "":
        return []
    if not ptr.startswith("/"):
        raise ValueError(f"not a JSON Pointer: {ptr[:80]!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in ptr[1:].split("/")]


def assemble(values: Mapping[str, Sequence[Any]], fields: Sequence[SchemaField]) -> dict[str, Any]:
    """Build an object from field values: ``values`` maps a field's pointer to its values in
    order (plain JSON values, not canonical text); a ``many`` field becomes a list, another
    its single (first) value; a field with no values is left out, and so is an object left
    empty by that, except the top level. Pointers not among ``fields`` raise ``ValueError``."""
    known = {f.path: f for f in fields}
    out: dict[str, Any] = {}
    for ptr in sorted(values):
        if ptr not in known:
            raise ValueError(f"no field {ptr[:80]!r} in the schema")
        vs = list(values[ptr])
        if not vs:
            continue
        parts = pointer_parts(ptr)
        if not parts:
            raise ValueError("the top level is not a field")
        node = out
        for key in parts[:-1]:
            node = node.setdefault(key, {})
        node[parts[-1]] = vs if known[ptr].many else vs[0]
    return out
