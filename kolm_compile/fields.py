"""The one validation kit of kolm_compile: typed, frozen sections on pydantic v2.

A section is a class decorated with :func:`section`: a frozen pydantic dataclass whose
fields carry their checks as annotations (``Annotated[int, integer(1, 100)]``) and whose
``__post_init__`` holds the checks that span fields. The spec's sections
(kolm_compile.spec), each teacher backend's options (kolm_compile.teachers) and each
verifier's params (kolm_compile.verifiers) are such sections.

Every problem is one :class:`~kolm_ledger.errors.SpecError` whose message starts with
the dotted path of the field, exactly as before pydantic::

    >>> from kolm_compile.spec import BudgetSpec
    >>> BudgetSpec(max_teacher_calls=0)
    Traceback (most recent call last):
    kolm_ledger.errors.SpecError: spec.budget.max_teacher_calls: must be >= 1, got 0
    >>> BudgetSpec(currency="EUR")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    kolm_ledger.errors.SpecError: spec.budget.currency: unknown field (known: max_cost, ...)

The checks are :class:`pydantic.PlainValidator` functions (pydantic runs them, in
strict mode, and nothing else: no coercion of ``"5"`` to ``5``); each raises
:func:`invalid`, a :class:`pydantic_core.PydanticCustomError` carrying kolm's
message and, for a value inside the field (``params.temperature``, ``labels[1]``),
the rest of its path. :func:`spec_error` is the one adapter from pydantic's
:class:`~pydantic.ValidationError` to :class:`SpecError`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, NoReturn, TypeVar, dataclass_transform

import pydantic
import rfc8785
from pydantic import ConfigDict, PlainValidator, ValidationError
from pydantic_core import PydanticCustomError

from kolm_ledger.errors import SpecError

__all__ = [
    "MAX_SEED",
    "TABLE_SUFFIXES",
    "Section",
    "at",
    "boolean",
    "check_int",
    "check_key_env_name",
    "check_num",
    "check_str",
    "check_text",
    "file_path",
    "freeze",
    "from_mapping",
    "help_of",
    "instance_of",
    "integer",
    "invalid",
    "json_mapping",
    "label_list",
    "looks_like_key",
    "number",
    "optional",
    "pattern",
    "section",
    "spec_error",
    "string",
    "table_path",
    "text",
    "thaw",
]

MAX_SEED = 2**53  # I-JSON safe: a seed goes into canonical JSON
TABLE_SUFFIXES = (".csv", ".jsonl", ".ndjson")

_CONFIG = ConfigDict(
    extra="forbid", arbitrary_types_allowed=True, strict=True, validate_default=True
)
_KIND = "kolm"

# --------------------------------------------------------------------------- errors


def invalid(message: str, at: str = "") -> NoReturn:
    """Raise kolm's ``message`` for the field being checked (``at``: the rest of the path
    inside the field, e.g. ``".temperature"`` or ``"[1]"``)."""
    raise PydanticCustomError(_KIND, "{message}", {"message": message, "at": at})


def _fail(want: str, got: Any, at: str = "") -> NoReturn:
    invalid(f"must be {want}, got {got!r}", at)


def _dotted(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


_UNKNOWN = ("unexpected_keyword_argument", "extra_forbidden")
_MISSING = ("missing", "missing_argument", "missing_keyword_only_argument")


def spec_error(error: ValidationError, cls: type[Any]) -> SpecError:
    """The :class:`SpecError` for pydantic's first problem with a ``cls`` section:
    ``<cls.PATH><.field path>: <message>``. An unknown field is reported before a
    missing one, and both before a bad value (kolm's order before pydantic)."""
    errors = error.errors()
    rank = {kind: 0 for kind in _UNKNOWN} | {kind: 1 for kind in _MISSING}
    first = min(errors, key=lambda e: rank.get(e["type"], 2))
    ctx = first.get("ctx") or {}
    path = f"{getattr(cls, 'PATH', 'spec')}{_dotted(first['loc'])}{ctx.get('at', '')}"
    path = path.removeprefix(".")  # a section at the top (PATH ""): the field's name alone
    kind = first["type"]
    if kind == _KIND:
        message = str(ctx["message"])
    elif kind in _UNKNOWN:
        unknown = getattr(cls, "UNKNOWN", "unknown field")
        message = f"{unknown} (known: {', '.join(sorted(_known(cls)))})"
    elif kind in _MISSING:
        message = str(getattr(cls, "REQUIRED", "required"))
    else:  # a pydantic check kolm has no words for (not expected: every field has its own)
        message = first["msg"]
    return SpecError(f"{path}: {message}")


_R = TypeVar("_R")


def at(path: str, check: Callable[..., _R], *args: Any) -> _R:
    """``check(*args)`` with its problem as a :class:`SpecError` naming ``path`` (for the
    checks a section's ``__post_init__`` makes across fields)."""
    try:
        return check(*args)
    except PydanticCustomError as e:
        ctx = e.context or {}
        raise SpecError(f"{path}{ctx.get('at', '')}: {ctx.get('message', e.message())}") from None


def _known(cls: type[Any]) -> list[str]:
    internal: frozenset[str] = getattr(cls, "INTERNAL", frozenset())
    return [f.name for f in dataclasses.fields(cls) if f.init and f.name not in internal]


# --------------------------------------------------------------------------- sections


class Section:
    """What every section offers: ``PATH`` (its dotted place in the spec), ``REQUIRED``
    and ``UNKNOWN`` (the words for a missing and an unknown field), :meth:`from_mapping`
    and :meth:`help`."""

    PATH: ClassVar[str] = "spec"
    REQUIRED: ClassVar[str] = "required"
    UNKNOWN: ClassVar[str] = "unknown field"
    #: init fields a spec file may not set (they say where the spec came from)
    INTERNAL: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def from_mapping(cls: type[_S], raw: Any, **extra: Any) -> _S:
        """The section from a spec's mapping (``None`` values mean "not given")."""
        return from_mapping(cls, raw, **extra)

    @classmethod
    def help(cls) -> dict[str, str]:
        """Field name → help string (for CLIs and docs)."""
        return help_of(cls)


_S = TypeVar("_S")


@dataclass_transform(frozen_default=True, field_specifiers=(dataclasses.field,))
def section(cls: type[_S]) -> type[_S]:
    """Class decorator: ``cls`` as a frozen pydantic dataclass (strict, unknown fields
    refused) whose constructor raises :class:`SpecError` (through :func:`spec_error`)."""
    dc: Any = pydantic.dataclasses.dataclass(frozen=True, config=_CONFIG)(cls)
    init = dc.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            init(self, *args, **kwargs)
        except ValidationError as e:
            raise spec_error(e, type(self)) from None

    __init__.__doc__ = init.__doc__
    dc.__init__ = __init__
    made: type[_S] = dc
    return made


def from_mapping(cls: type[_S], raw: Any, **extra: Any) -> _S:
    """``cls(**raw, **extra)`` for a spec's mapping: ``raw`` must be a mapping, may not
    set ``cls.INTERNAL`` fields, and its ``None`` values are left out (the default)."""
    path = getattr(cls, "PATH", "spec")
    if not isinstance(raw, Mapping):
        raise SpecError(f"{path}: must be a mapping, got {type(raw).__name__!r}")
    known = _known(cls)
    for key in raw:  # the first unknown key as written (one a spec may not set is unknown too)
        if key not in known:
            unknown = getattr(cls, "UNKNOWN", "unknown field")
            raise SpecError(f"{path}.{key}: {unknown} (known: {', '.join(sorted(known))})")
    return cls(**{k: v for k, v in raw.items() if v is not None}, **extra)


def help_of(cls: type[Any]) -> dict[str, str]:
    """Field name → the ``help`` metadata of each field of a section."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


# --------------------------------------------------------------------------- value checks


def _check(fn: Callable[[Any], Any]) -> PlainValidator:
    return PlainValidator(fn)


def optional(check: PlainValidator) -> PlainValidator:
    """``check``, or ``None`` (the field is not set)."""
    inner: Any = check.func
    return PlainValidator(lambda v: None if v is None else inner(v))


def is_int(v: object) -> bool:
    """An ``int`` that is not a ``bool``."""
    return isinstance(v, int) and not isinstance(v, bool)


def check_int(v: Any, lo: int, hi: int | None = None, at: str = "") -> int:
    """``v`` as an integer in ``[lo, hi]`` (kolm's words on failure)."""
    if not is_int(v):
        _fail("an integer", v, at)
    if v < lo:
        invalid(f"must be >= {lo}, got {v}", at)
    if hi is not None and v > hi:
        invalid(f"must be <= {hi}, got {v}", at)
    return int(v)


def integer(lo: int, hi: int | None = None) -> PlainValidator:
    """An integer in ``[lo, hi]`` (no upper bound without ``hi``); ``True`` is not one."""
    return _check(lambda v: check_int(v, lo, hi))


def check_num(
    v: Any, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False, at: str = ""
) -> float:
    """``v`` as a finite number in ``[lo, hi]`` (open at ``lo`` with ``lo_open``, at ``hi``
    with ``hi_open``)."""
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        _fail("a number", v, at)
    if v < lo or (lo_open and v == lo) or v > hi or (hi_open and v == hi):
        if math.isinf(hi):
            invalid(f"must be {'>' if lo_open else '>='} {lo:g}, got {v!r}", at)
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        invalid(f"must be in {interval}, got {v!r}", at)
    return float(v)


def number(
    lo: float, hi: float = math.inf, *, lo_open: bool = False, hi_open: bool = False
) -> PlainValidator:
    """A finite number in ``[lo, hi]`` (open ends with ``lo_open``/``hi_open``), as a
    float (so ``0`` and ``0.0`` serialize alike)."""
    return _check(lambda v: check_num(v, lo, hi, lo_open=lo_open, hi_open=hi_open))


def check_str(v: Any, choices: Sequence[str] = (), at: str = "") -> str:
    """``v`` as a string (one of ``choices`` when given)."""
    if not isinstance(v, str):
        _fail("a string", v, at)
    if choices and v not in choices:
        invalid(f"must be one of {', '.join(choices)}, got {v!r}", at)
    return v


def string(choices: Sequence[str] = ()) -> PlainValidator:
    """A string; one of ``choices`` when given."""
    return _check(lambda v: check_str(v, choices))


def check_text(v: Any, at: str = "") -> str:
    """``v`` as a string with something besides whitespace."""
    s = check_str(v, at=at)
    if not s.strip():
        invalid("must not be empty", at)
    return s


def text() -> PlainValidator:
    """A string that is not empty or blank."""
    return _check(check_text)


def boolean() -> PlainValidator:
    """``true`` or ``false`` (not 0/1, not "yes")."""

    def check(v: Any) -> bool:
        if not isinstance(v, bool):
            _fail("true or false", v)
        return v

    return _check(check)


def pattern(regex: str, want: str) -> PlainValidator:
    """A string matching ``regex`` whole (``want`` says so in the error)."""
    compiled = re.compile(regex)

    def check(v: Any) -> str:
        if not isinstance(v, str) or not compiled.fullmatch(v):
            _fail(want, v)
        return v

    return _check(check)


def label_list(min_len: int = 1) -> PlainValidator:
    """A list of distinct one-line labels (no outer spaces), at least ``min_len``, as a
    tuple."""

    def check(v: Any) -> tuple[str, ...]:
        if isinstance(v, str | bytes) or not isinstance(v, Sequence):
            _fail("a list of strings", v)
        if len(v) < min_len:
            invalid(f"must have at least {min_len} entries, got {len(v)}")
        for i, label in enumerate(v):
            if not isinstance(label, str) or not label or label != label.strip() or "\n" in label:
                _fail("a non-empty one-line string without outer spaces", label, f"[{i}]")
        dup = [label for label, n in Counter(v).items() if n > 1]
        if dup:
            invalid(f"duplicate label {dup[0]!r}")
        return tuple(v)

    return _check(check)


def freeze(v: Any) -> Any:
    """Deep read-only copy: mappings → MappingProxyType (sorted), lists → tuples."""
    if isinstance(v, Mapping):
        return types.MappingProxyType({k: freeze(v[k]) for k in sorted(v)})
    if isinstance(v, list | tuple):
        return tuple(freeze(x) for x in v)
    return v


def thaw(v: Any) -> Any:
    """Inverse of :func:`freeze`: plain dicts (sorted) and lists, JSON-ready."""
    if isinstance(v, Mapping):
        return {k: thaw(v[k]) for k in sorted(v)}
    if isinstance(v, list | tuple):
        return [thaw(x) for x in v]
    if isinstance(v, Path):
        return v.as_posix()
    return v


def check_mapping(v: Any) -> Mapping[str, Any]:
    """``v`` as a read-only mapping with string keys that canonical JSON can hold."""
    if not isinstance(v, Mapping):
        _fail("a mapping", type(v).__name__)
    for key in v:
        if not isinstance(key, str):
            invalid(f"keys must be strings, got {key!r}")
    try:
        rfc8785.dumps(thaw(v))
    except Exception as e:
        invalid(f"not representable as canonical JSON: {e}")
    frozen: Mapping[str, Any] = freeze(v)
    return frozen


def json_mapping() -> PlainValidator:
    """A mapping with string keys that canonical JSON can hold, frozen (read-only)."""
    return _check(check_mapping)


def file_path(
    suffixes: Sequence[str], want: str = "a path", *, blank_is_empty: bool = True
) -> PlainValidator:
    """A path (a string is read as one) whose name ends in one of ``suffixes`` (any name
    without them). A blank string "must not be empty" (``blank_is_empty``) or is not a
    path."""

    def check(v: Any) -> Path:
        if isinstance(v, str) and (v.strip() or blank_is_empty):
            if not v.strip():
                invalid("must not be empty")
            v = Path(v)
        if not isinstance(v, Path):
            _fail(want, v)
        if suffixes and v.suffix.lower() not in suffixes:
            invalid(f"must be a {', '.join(suffixes)} file, got {v.name!r}")
        return v

    return _check(check)


def table_path() -> PlainValidator:
    """A table: a ``.csv``, ``.jsonl`` or ``.ndjson`` path."""
    return file_path(TABLE_SUFFIXES)


def instance_of(cls: type[Any]) -> PlainValidator:
    """An instance of ``cls`` (a section inside a section)."""

    def check(v: Any) -> Any:
        if not isinstance(v, cls):
            _fail(f"a {cls.__name__}", type(v).__name__)
        return v

    return _check(check)


# --------------------------------------------------------------------------- API keys

_KEY_PREFIXES = ("sk-", "sk_", "pk_", "rk_", "hf_", "gsk_", "ghp_", "gho_", "xox", "AIza", "AKIA")


def looks_like_key(value: str) -> bool:
    """A credential rather than an environment variable's name: a well-known key prefix,
    or a long value of mixed-case letters and digits (variable names are UPPER_CASE)."""
    if value.startswith(_KEY_PREFIXES):
        return True
    has_lower = any(c.islower() for c in value)
    has_digit = any(c.isdigit() for c in value)
    return len(value) >= 20 and has_lower and has_digit


def check_key_env_name(path: str, value: Any) -> str:
    """``value`` as the name of the environment variable holding an API key; never echoes
    it (a key pasted into the field would otherwise reach a log or an error)."""
    if not isinstance(value, str) or not value.strip():
        raise SpecError(f"{path}: must be the name of an environment variable")
    if looks_like_key(value):
        raise SpecError(
            f"{path}: the value looks like a key, not a variable name (not shown); put the "
            "key in an environment variable and give its name here, e.g. OPENAI_API_KEY"
        )
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
        raise SpecError(
            f"{path}: must be an environment variable name (letters, digits and _, not "
            "starting with a digit); the value is not shown"
        )
    return value


def key_env_name() -> PlainValidator:
    """The name of an environment variable holding a key (the value is never echoed)."""

    def check(v: Any) -> str:
        try:
            return check_key_env_name("", v)
        except SpecError as e:
            invalid(str(e).removeprefix(": "))

    return _check(check)
