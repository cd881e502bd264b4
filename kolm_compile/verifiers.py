"""Deterministic verifiers: is this model output acceptable, and what is its canonical form?

A verifier is looked up by name in one registry and configured with params::

    >>> from kolm_compile.verifiers import get_verifier
    >>> v = get_verifier("label_set", {"labels": ["card_arrival", "pin_blocked"]})
    >>> v.check("  Card_Arrival. ")
    Verdict(ok=True, normalized='card_arrival', reason='ok')
    >>> v.check("lost card").ok
    False

``Verdict.normalized`` is the canonical answer that k-sample voting counts (two
outputs that differ only in case, spacing or JSON key order are one vote), and
what is written into a label receipt. Every verifier's ``spec_digest()`` is the
SHA-256 of the RFC 8785 canonical JSON of ``{name, version, params}`` (params with
their defaults filled in); receipts record name, version and that digest.

Verifiers that compare against a reference (``exact_match``, ``python_ast``,
``bleu``) do so when ``check(..., reference=...)`` is given one (evaluation on a
holdout). Without a reference (voting over teacher samples, where no answer is
known yet) they check only the form of the output and normalize it; the verdict's
reason then says ``"no reference: form only"``.

``check(..., input=...)`` gives the input the output answers. ``json_schema`` uses it
for its ``grounded`` check (values that must occur in the input); the others ignore it.
Without an input that check is skipped and the verdict's reason says so.

A verdict never raises for what a model wrote: text that is not JSON, not Python, or
empty is a failed check (``ok`` false, the reason saying why).

Registered verifiers and their params (``*`` = required):

=============  =======  ==============================================================
name           version  params
=============  =======  ==============================================================
label_set      1        labels*, case_sensitive=false, strip=true
json_schema    2        schema* (Draft 2020-12), strip_code_fences=true, grounded="marked"
                        ("none" | "marked" | "all")
regex          1        pattern*, ignore_case=false, strip=true
exact_match    1        strip=true, collapse_whitespace=false, case_sensitive=true
python_ast     1        mode="exec" ("exec" | "eval"), strip_code_fences=true
bleu           1        threshold* in [0, 1], max_n=4, lowercase=false
=============  =======  ==============================================================

Bad params raise :class:`~kolm_ledger.errors.SpecError` naming the field, e.g.
``"spec.verifier.params.pattern: not a valid regular expression: ..."``. Each
verifier declares its params as a :class:`VerifierParams` section (kolm_compile.fields,
the one validation kit of the spec) and registers it with itself:
``@register_verifier("bleu", "1", params=BLEUParams)``; ``configure`` receives the
parsed params and checks what spans them.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Annotated, Any, ClassVar, Protocol, TypeVar, runtime_checkable

import rfc8785
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError, best_match
from pydantic import PlainValidator

from kolm_compile.fields import Section, boolean, integer, invalid, number, section, string
from kolm_compile.structured import GROUNDED_KEY, canonical, field_pairs, grounded_paths
from kolm_ledger.errors import SpecError

__all__ = [
    "GROUNDED_MODES",
    "BaseVerifier",
    "Verdict",
    "Verifier",
    "VerifierParams",
    "get_verifier",
    "register_verifier",
    "sentence_bleu",
    "verifier_names",
]

_PARAMS = "spec.verifier.params"
_NO_REFERENCE = "no reference: form only"


@dataclass(frozen=True)
class Verdict:
    """The outcome of one check.

    ``ok``: the output is acceptable. ``normalized``: its canonical form (the
    answer that voting counts; for a failed check, the output as far as it could
    be normalized). ``reason``: ``"ok"`` or what failed, for logs and receipts.
    """

    ok: bool
    normalized: str
    reason: str


@runtime_checkable
class Verifier(Protocol):
    """What every verifier offers (see :class:`BaseVerifier`)."""

    @property
    def name(self) -> str:
        """The registered name."""
        ...

    @property
    def version(self) -> str:
        """The version recorded in receipts."""
        ...

    @property
    def params(self) -> dict[str, Any]:
        """The params with defaults filled in (a copy)."""
        ...

    def spec_digest(self) -> str:
        """Hex SHA-256 of the canonical JSON of ``{name, version, params}``."""
        ...

    def describe(self) -> dict[str, Any]:
        """``{name, version, params, spec_digest}`` for receipts and artifacts."""
        ...

    def check(
        self, output: str, *, reference: str | None = None, input: str | None = None
    ) -> Verdict:
        """Judge ``output`` (against ``reference`` when the verifier uses one; ``input``:
        the text it answers, for verifiers that check the output against it)."""
        ...


# --------------------------------------------------------------------------- params


@section
class VerifierParams(Section):
    """Base of a verifier's params: a section of kolm_compile.fields, one class per
    verifier, registered with it (:func:`register_verifier`). A verifier registered
    without one takes no params."""

    PATH: ClassVar[str] = _PARAMS
    UNKNOWN: ClassVar[str] = "unknown parameter"

    @classmethod
    def parse(cls: type[_P], raw: Any) -> _P:
        """The params from a spec's mapping (``None``: none given)."""
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise SpecError(f"{_PARAMS}: must be a mapping, got {type(raw).__name__}")
        for key in raw:
            if not isinstance(key, str):
                raise SpecError(f"{_PARAMS}: keys must be strings, got {key!r}")
        return cls(**raw)

    def to_dict(self) -> dict[str, Any]:
        """Every param, defaults filled in, sorted by name."""
        return {f.name: getattr(self, f.name) for f in sorted(fields(self), key=lambda f: f.name)}


_P = TypeVar("_P", bound=VerifierParams)


def _string_list(v: Any) -> list[str]:
    if isinstance(v, str | bytes) or not isinstance(v, Sequence) or not v:
        invalid("must be a non-empty list of strings")
    for i, item in enumerate(v):
        if not isinstance(item, str) or not item.strip():
            invalid(f"must be a non-empty string, got {item!r}", f"[{i}]")
    if len(set(v)) != len(v):
        dup = next(x for x, n in Counter(v).items() if n > 1)
        invalid(f"duplicate entry {dup!r}")
    return list(v)


def _plain_mapping(v: Any) -> dict[str, Any]:
    if not isinstance(v, Mapping):
        invalid(f"must be a mapping, got {type(v).__name__}")
    plain: dict[str, Any] = json.loads(json.dumps(v))  # a deep, plain copy
    return plain


# --------------------------------------------------------------------------- base and registry


class BaseVerifier:
    """Base class: parses params in :meth:`configure`, provides digest and description.

    Subclasses set nothing by hand: :func:`register_verifier` sets ``name`` and
    ``version``. They implement ``configure(p)`` (read params through ``p``) and
    ``check``.
    """

    name: ClassVar[str] = ""
    version: ClassVar[str] = ""

    def __init__(self, params: Mapping[str, Any] | None = None) -> None:
        parsed = _PARAMS_OF.get(self.name, VerifierParams).parse(params)
        self.configure(parsed)
        self._params = parsed.to_dict()
        body: dict[str, Any] = {"name": self.name, "version": self.version, "params": self._params}
        try:
            canonical = rfc8785.dumps(body)
        except Exception as e:  # e.g. an integer outside the I-JSON range
            raise SpecError(f"{_PARAMS}: not representable as canonical JSON: {e}") from e
        self._digest = hashlib.sha256(canonical).hexdigest()

    def configure(self, p: Any) -> None:
        """Take the parsed params (an instance of the params class registered with the
        verifier) and check what spans them (override)."""

    @property
    def params(self) -> dict[str, Any]:
        """The params with defaults filled in (a deep copy)."""
        copy: dict[str, Any] = json.loads(json.dumps(self._params))
        return copy

    def spec_digest(self) -> str:
        """Hex SHA-256 of RFC 8785 canonical JSON of ``{name, version, params}``."""
        return self._digest

    def describe(self) -> dict[str, Any]:
        """``{name, version, params, spec_digest}``: what receipts record."""
        return {
            "name": self.name,
            "params": self.params,
            "spec_digest": self._digest,
            "version": self.version,
        }

    def check(
        self, output: str, *, reference: str | None = None, input: str | None = None
    ) -> Verdict:
        """Judge ``output``; see the module docstring for what ``reference`` and ``input``
        do."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, version={self.version!r})"


_V = TypeVar("_V", bound=type[BaseVerifier])
_REGISTRY: dict[str, type[BaseVerifier]] = {}
_PARAMS_OF: dict[str, type[VerifierParams]] = {}


def register_verifier(
    name: str, version: str, *, params: type[VerifierParams] = VerifierParams
) -> Callable[[_V], _V]:
    """Class decorator: register a :class:`BaseVerifier` subclass under ``name``, with its
    params class (``configure`` gets an instance of it).

    ``version`` is recorded in every receipt; bump it whenever the verdict or
    the normalized form could change for some input. Registering a name twice
    raises ``ValueError``.
    """

    def decorate(cls: _V) -> _V:
        if name in _REGISTRY:
            raise ValueError(f"verifier {name!r} is already registered")
        cls.name = name
        cls.version = version
        if params is not VerifierParams:
            params.REQUIRED = f"required by verifier {name}"
            params.UNKNOWN = f"unknown parameter for verifier {name}"
        _REGISTRY[name] = cls
        _PARAMS_OF[name] = params
        return cls

    return decorate


def verifier_names() -> list[str]:
    """The registered verifier names, sorted."""
    return sorted(_REGISTRY)


def get_verifier(name: str, params: Mapping[str, Any] | None = None) -> Verifier:
    """Build the verifier registered as ``name`` with ``params``.

    Raises :class:`SpecError` naming ``spec.verifier.name`` for an unknown name
    and ``spec.verifier.params.<field>`` for bad params.
    """
    cls = _REGISTRY.get(name) if isinstance(name, str) else None
    if cls is None:
        raise SpecError(
            f"spec.verifier.name: unknown verifier {name!r} (known: {', '.join(verifier_names())})"
        )
    return cls(params)


# --------------------------------------------------------------------------- helpers


_FENCE = re.compile(r"\A```[A-Za-z0-9_+-]*[ \t]*\n(.*?)\n?```\Z", re.DOTALL)


def _strip_fences(text: str) -> str:
    """``"```json\\n{...}\\n```"`` → ``"{...}"``; anything else is only stripped."""
    text = text.strip()
    m = _FENCE.match(text)
    return m.group(1).strip() if m else text


def _short(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[: limit - 1] + "…")


def _ensure_text(output: object, what: str = "output") -> str:
    if not isinstance(output, str):
        raise TypeError(f"{what} must be str, got {type(output).__name__}")
    return output


# --------------------------------------------------------------------------- verifiers


# Surrounding characters a teacher often adds to a bare label: whitespace,
# quotes, backticks, a final full stop.
_LABEL_STRIP = " \t\r\n\"'`."


@section
class LabelSetParams(VerifierParams):
    """Params of ``label_set``."""

    labels: Annotated[list[str], PlainValidator(_string_list)] = field(
        metadata={"help": "the closed label set"}
    )
    case_sensitive: Annotated[bool, boolean()] = field(
        default=False, metadata={"help": "compare case-sensitively"}
    )
    strip: Annotated[bool, boolean()] = field(
        default=True, metadata={"help": "ignore surrounding spaces, quotes, full stops"}
    )


@register_verifier("label_set", "1", params=LabelSetParams)
class LabelSetVerifier(BaseVerifier):
    """The output must be one of a closed set of labels.

    With ``strip`` (default) surrounding whitespace, quotes, backticks and full
    stops are ignored; unless ``case_sensitive`` the comparison is case-folded.
    ``normalized`` is the label exactly as written in ``labels``.
    """

    def configure(self, p: LabelSetParams) -> None:
        self._case_sensitive = p.case_sensitive
        self._strip = p.strip
        self._index: dict[str, str] = {}
        for i, label in enumerate(p.labels):
            key = self._key(label)
            if key in self._index:
                raise SpecError(
                    f"{_PARAMS}.labels[{i}]: {label!r} is the same label as "
                    f"{self._index[key]!r} once normalized"
                )
            self._index[key] = label

    def _clean(self, text: str) -> str:
        return text.strip(_LABEL_STRIP) if self._strip else text

    def _key(self, text: str) -> str:
        text = self._clean(text)
        return text if self._case_sensitive else text.casefold()

    def check(
        self, output: str, *, reference: str | None = None, input: str | None = None
    ) -> Verdict:
        label = self._index.get(self._key(_ensure_text(output)))
        if label is None:
            cleaned = self._clean(output)
            return Verdict(
                False, cleaned, f"{_short(cleaned)} is not one of the {len(self._index)} labels"
            )
        return Verdict(True, label, "ok")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


#: ``json_schema``'s ``grounded`` param: which string values must occur in the input
GROUNDED_MODES = ("none", "marked", "all")
_NO_INPUT = "no input: grounded check skipped"


@section
class JSONSchemaParams(VerifierParams):
    """Params of ``json_schema``."""

    schema: Annotated[dict[str, Any], PlainValidator(_plain_mapping)] = field(
        metadata={"help": "the JSON Schema (Draft 2020-12) an output must satisfy"}
    )
    strip_code_fences: Annotated[bool, boolean()] = field(
        default=True, metadata={"help": "remove a Markdown code fence first"}
    )
    grounded: Annotated[str, string(GROUNDED_MODES)] = field(
        default="marked",
        metadata={
            "help": "string values that must occur in the input: none, marked (the fields "
            f"marked {GROUNDED_KEY!r} in the schema) or all"
        },
    )


@register_verifier("json_schema", "2", params=JSONSchemaParams)
class JSONSchemaVerifier(BaseVerifier):
    """The output must be JSON that validates against a Draft 2020-12 schema and, given
    the input, whose grounded values occur in it.

    Strict JSON: ``NaN``/``Infinity`` and duplicate object keys are rejected.
    With ``strip_code_fences`` (default) a Markdown code fence around the JSON is
    removed first. ``normalized`` is the RFC 8785 canonical JSON text
    (:func:`kolm_compile.structured.canonical`), so key order and spacing never split a
    vote.

    ``grounded`` (checked after the schema, only when ``check`` is given the ``input``):
    ``marked`` (default) — every value of a field marked ``"x-kolm-grounded": true``
    (:func:`kolm_compile.structured.grounded_paths`) must occur in the input, character
    for character; ``all`` — every string value anywhere in the output must; ``none`` —
    no such check. A value that does not occur fails the check with a reason naming the
    field's JSON Pointer and the value (cut to 60 characters). Without an input the
    check is skipped and the reason says ``"no input: grounded check skipped"``.

    Version 2: the ``grounded`` param (version 1 had no grounded check).
    """

    def configure(self, p: JSONSchemaParams) -> None:
        schema = p.schema
        self._fences = p.strip_code_fences
        self._grounded = p.grounded
        try:
            Draft202012Validator.check_schema(schema)
        except SchemaError as e:
            raise SpecError(
                f"{_PARAMS}.schema: not a valid JSON Schema (Draft 2020-12): {e.message}"
            ) from e
        self._validator = Draft202012Validator(schema)
        self._paths = grounded_paths(schema)

    def check(
        self, output: str, *, reference: str | None = None, input: str | None = None
    ) -> Verdict:
        text = _ensure_text(output).strip()
        if self._fences:
            text = _strip_fences(text)
        try:
            value = json.loads(
                text, parse_constant=_reject_constant, object_pairs_hook=_no_duplicate_keys
            )
        except (ValueError, RecursionError) as e:
            return Verdict(False, text, f"not valid JSON: {e}")
        try:
            normalized = canonical(value)
        except (ValueError, RecursionError) as e:  # integers outside I-JSON, lone surrogates
            return Verdict(False, text, f"not representable as canonical JSON: {e}")
        try:
            error = best_match(self._validator.iter_errors(value))
        except RecursionError:
            return Verdict(False, normalized, "schema: nested too deeply to validate")
        if error is not None:
            return Verdict(False, normalized, f"schema: {error.json_path}: {error.message}")
        if self._grounded == "none" or (self._grounded == "marked" and not self._paths):
            return Verdict(True, normalized, "ok")
        if input is None:
            return Verdict(True, normalized, _NO_INPUT)
        input_text = _ensure_text(input, "input")
        for ptr, raw in field_pairs(value):
            if self._grounded == "marked" and ptr not in self._paths:
                continue
            item = json.loads(raw)
            if isinstance(item, str) and item not in input_text:
                return Verdict(
                    False,
                    normalized,
                    f"grounded: {ptr or '/'}: {_short(item, 60)} does not occur in the input",
                )
        return Verdict(True, normalized, "ok")


@section
class RegexParams(VerifierParams):
    """Params of ``regex``."""

    pattern: Annotated[str, string()] = field(metadata={"help": "the whole output must match"})
    ignore_case: Annotated[bool, boolean()] = field(
        default=False, metadata={"help": "match case-insensitively"}
    )
    strip: Annotated[bool, boolean()] = field(
        default=True, metadata={"help": "strip surrounding whitespace first"}
    )


@register_verifier("regex", "1", params=RegexParams)
class RegexVerifier(BaseVerifier):
    """The whole output (stripped unless ``strip`` is false) must match ``pattern``."""

    def configure(self, p: RegexParams) -> None:
        self._strip = p.strip
        try:
            self._regex = re.compile(p.pattern, re.IGNORECASE if p.ignore_case else 0)
        except re.error as e:
            raise SpecError(f"{_PARAMS}.pattern: not a valid regular expression: {e}") from e

    def check(
        self, output: str, *, reference: str | None = None, input: str | None = None
    ) -> Verdict:
        text = _ensure_text(output)
        if self._strip:
            text = text.strip()
        if self._regex.fullmatch(text) is None:
            return Verdict(False, text, f"{_short(text)} does not match {self._regex.pattern!r}")
        return Verdict(True, text, "ok")


@section
class ExactMatchParams(VerifierParams):
    """Params of ``exact_match``."""

    strip: Annotated[bool, boolean()] = field(
        default=True, metadata={"help": "strip surrounding whitespace"}
    )
    collapse_whitespace: Annotated[bool, boolean()] = field(
        default=False, metadata={"help": "collapse runs of whitespace to one space"}
    )
    case_sensitive: Annotated[bool, boolean()] = field(
        default=True, metadata={"help": "compare case-sensitively"}
    )


@register_verifier("exact_match", "1", params=ExactMatchParams)
class ExactMatchVerifier(BaseVerifier):
    """The output must equal the reference after the configured normalization.

    Normalization: ``strip`` surrounding whitespace, ``collapse_whitespace`` runs
    to one space, and case-fold unless ``case_sensitive``.
    """

    def configure(self, p: ExactMatchParams) -> None:
        self._strip = p.strip
        self._collapse = p.collapse_whitespace
        self._case_sensitive = p.case_sensitive

    def _norm(self, text: str) -> str:
        if self._collapse:
            text = " ".join(text.split())
        elif self._strip:
            text = text.strip()
        return text if self._case_sensitive else text.casefold()

    def check(
        self, output: str, *, reference: str | None = None, input: str | None = None
    ) -> Verdict:
        normalized = self._norm(_ensure_text(output))
        if reference is None:
            return Verdict(True, normalized, _NO_REFERENCE)
        want = self._norm(_ensure_text(reference, "reference"))
        if normalized != want:
            return Verdict(False, normalized, f"{_short(normalized)} != reference {_short(want)}")
        return Verdict(True, normalized, "ok")


@section
class PythonASTParams(VerifierParams):
    """Params of ``python_ast``."""

    mode: Annotated[str, string(("exec", "eval"))] = field(
        default="exec", metadata={"help": "exec (statements) | eval (one expression)"}
    )
    strip_code_fences: Annotated[bool, boolean()] = field(
        default=True, metadata={"help": "remove a Markdown code fence first"}
    )


@register_verifier("python_ast", "1", params=PythonASTParams)
class PythonASTVerifier(BaseVerifier):
    """The output must be Python that parses; with a reference, to the same AST.

    AST equivalence: ``ast.dump`` of both trees (no line/column attributes) must
    be equal, so formatting, comments and quote style do not matter.
    ``normalized`` is ``ast.unparse`` of the tree (canonical formatting of the
    running Python version).
    """

    def configure(self, p: PythonASTParams) -> None:
        self._mode = p.mode
        self._fences = p.strip_code_fences

    def _parse(self, text: str) -> ast.AST:
        if self._fences:
            text = _strip_fences(text)
        return ast.parse(text, mode=self._mode)

    def check(
        self, output: str, *, reference: str | None = None, input: str | None = None
    ) -> Verdict:
        text = _ensure_text(output)
        try:
            tree = self._parse(text)
        except SyntaxError as e:
            return Verdict(False, text.strip(), f"not valid Python: line {e.lineno}: {e.msg}")
        except (ValueError, RecursionError, MemoryError) as e:
            return Verdict(False, text.strip(), f"not valid Python: {type(e).__name__}")
        normalized = ast.unparse(tree)
        if reference is None:
            return Verdict(True, normalized, _NO_REFERENCE)
        try:
            want = self._parse(_ensure_text(reference, "reference"))
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            return Verdict(False, normalized, "reference is not valid Python")
        if ast.dump(tree) != ast.dump(want):
            return Verdict(False, normalized, "AST differs from the reference")
        return Verdict(True, normalized, "ok")


_TOKEN = re.compile(r"\w+|[^\w\s]")


def _ngrams(tokens: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def sentence_bleu(reference: Sequence[str], hypothesis: Sequence[str], max_n: int = 4) -> float:
    """Sentence BLEU of token lists, in [0, 1], with add-one smoothing.

    Papineni et al. (2002) with one reference: the geometric mean of clipped
    n-gram precisions p_1..p_max_n times the brevity penalty
    ``BP = 1 if c > r else exp(1 - r/c)``. For n >= 2, ``p_n = (m + 1)/(c + 1)``
    (Lin & Och 2004, "add-one"), so one missing 4-gram does not zero a sentence;
    p_1 is not smoothed. An empty hypothesis scores 0. Requires ``max_n >= 1``.
    """
    if max_n < 1:
        raise ValueError(f"max_n must be >= 1, got {max_n}")
    c, r = len(hypothesis), len(reference)
    if c == 0:
        return 0.0
    log_sum = 0.0
    for n in range(1, max_n + 1):
        hyp, ref = _ngrams(hypothesis, n), _ngrams(reference, n)
        matches = sum(min(count, ref[gram]) for gram, count in hyp.items())
        total = sum(hyp.values())
        if n == 1:
            if matches == 0:
                return 0.0
            log_sum += math.log(matches / total)
        else:
            log_sum += math.log((matches + 1) / (total + 1))
    bp = 1.0 if c > r else math.exp(1.0 - r / c)
    return bp * math.exp(log_sum / max_n)


@section
class BLEUParams(VerifierParams):
    """Params of ``bleu``."""

    threshold: Annotated[float, number(0.0, 1.0)] = field(
        metadata={"help": "the least sentence BLEU an output must score"}
    )
    max_n: Annotated[int, integer(1, 8)] = field(
        default=4, metadata={"help": "longest n-gram counted"}
    )
    lowercase: Annotated[bool, boolean()] = field(
        default=False, metadata={"help": "lower-case the tokens first"}
    )


@register_verifier("bleu", "1", params=BLEUParams)
class BLEUVerifier(BaseVerifier):
    """Sentence BLEU against the reference must be at least ``threshold``.

    Tokens are runs of word characters and single punctuation marks
    (lower-cased if ``lowercase``). See :func:`sentence_bleu` for the formula.
    ``normalized`` is the output with whitespace collapsed.
    """

    def configure(self, p: BLEUParams) -> None:
        self._threshold = p.threshold
        self._max_n = p.max_n
        self._lowercase = p.lowercase

    def _tokens(self, text: str) -> list[str]:
        return _TOKEN.findall(text.lower() if self._lowercase else text)

    def check(
        self, output: str, *, reference: str | None = None, input: str | None = None
    ) -> Verdict:
        normalized = " ".join(_ensure_text(output).split())
        if not normalized:
            return Verdict(False, normalized, "empty output")
        if reference is None:
            return Verdict(True, normalized, _NO_REFERENCE)
        ref = self._tokens(_ensure_text(reference, "reference"))
        score = sentence_bleu(ref, self._tokens(normalized), self._max_n)
        ok = score >= self._threshold
        reason = f"BLEU-{self._max_n} {score:.4f} {'>=' if ok else '<'} {self._threshold:.4f}"
        return Verdict(ok, normalized, reason)
