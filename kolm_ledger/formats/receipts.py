"""Receipts: in-toto Statement v1 payloads of five kinds, signed as DSSE envelopes.

Predicate types (one per kind)::

    urn:kolm:receipt:label:v1       subjects: digest of JCS({input, output}); SHA-256 of the job id
    urn:kolm:receipt:eval:v1        subject: artifact digest
    urn:kolm:receipt:artifact:v1    subject: artifact digest (and the .kolm file digest)
    urn:kolm:receipt:prediction:v1  subject: output digest
    urn:kolm:receipt:key:v1         subject: the DSSE key id of the key concerned

Example::

    >>> from kolm_ledger.keys import PrivateKey
    >>> from kolm_ledger import receipts
    >>> st = receipts.key_statement(action="register", public_key=PrivateKey.generate().public_key(),
    ...                             role="infer")
    >>> env = receipts.sign_statement(st, PrivateKey.generate())
    >>> receipts.Statement.from_envelope(env).kind
    'key'
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kolm_ledger._crypto import PrivateKey, PublicKey
from kolm_ledger.errors import StatementFormatError
from kolm_ledger.formats.canonical import (
    canonical_json,
    digest_hex,
    parse_json,
    sha256_hex,
    strict_loads,
)
from kolm_ledger.formats.dsse import IN_TOTO_PAYLOAD_TYPE, Envelope, sign
from kolm_ledger.keys import format_time

__all__ = [
    "KINDS",
    "PREDICATE_PREFIX",
    "STATEMENT_TYPE",
    "Statement",
    "Subject",
    "artifact_statement",
    "eval_statement",
    "example_digest",
    "job_digest",
    "key_statement",
    "kind_of",
    "label_statement",
    "predicate_type",
    "prediction_statement",
    "sign_statement",
]

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_PREFIX = "urn:kolm:receipt:"
KINDS: tuple[str, ...] = ("label", "eval", "artifact", "prediction", "key")

#: Predicate fields each kind must carry (more are allowed).
REQUIRED: dict[str, tuple[str, ...]] = {
    "label": ("task", "teacher", "k", "votes", "sample_digests", "verifier", "agreement", "job_id"),
    "eval": (
        "holdout_digest",
        "n",
        "correct",
        "k_score",
        "interval",
        "outcome_root",
        "teacher_k_score",
        "metric",
    ),
    "artifact": (
        "base_model",
        "training_set_root",
        "label_count",
        "eval_receipt",
        "k_score",
        "verifier",
        "compile_config_digest",
        "kolm_version",
        "checkpoint",
    ),
    "prediction": (
        "artifact_digest",
        "input_commitment",
        "verifier_verdict",
        "backend",
        "confidence",
        "latency_ms",
        "request_id",
        "time",
    ),
    "key": ("action", "keyid", "role", "algorithm", "public_key_pem", "effective_at"),
}


_REQUIRED_SETS: dict[str, frozenset[str]] = {k: frozenset(v) for k, v in REQUIRED.items()}
_STATEMENT_FIELDS = frozenset({"_type", "subject", "predicateType", "predicate"})
_KIND_OF: dict[str, str] = {f"{PREDICATE_PREFIX}{k}:v1": k for k in KINDS}


def predicate_type(kind: str) -> str:
    """The predicate type URI of ``kind``."""
    if kind not in KINDS:
        raise StatementFormatError(f"unknown receipt kind {kind!r}, want one of {list(KINDS)}")
    return f"{PREDICATE_PREFIX}{kind}:v1"


def kind_of(ptype: str) -> str:
    """The kind named by predicate type ``ptype``; raises for a foreign type."""
    kind = _KIND_OF.get(ptype)
    if kind is not None:
        return kind
    if ptype.startswith(PREDICATE_PREFIX) and ptype.endswith(":v1"):
        kind = ptype[len(PREDICATE_PREFIX) : -3]
        if kind in KINDS:
            return kind
    raise StatementFormatError(
        f"predicateType {ptype[:80]!r} is not a kolm receipt type ({PREDICATE_PREFIX}<kind>:v1)"
    )


def job_digest(job_id: str) -> str:
    """Hex SHA-256 of a compile job id: the second subject of its label receipts.

    Lets anyone find every label of a job through the ledger's subject index.
    """
    return sha256_hex(job_id.encode())


def example_digest(input_value: Any, output_value: Any) -> str:
    """Hex SHA-256 of RFC 8785 ``{"input": ..., "output": ...}`` (the label subject)."""
    return digest_hex({"input": input_value, "output": output_value})


@dataclass(frozen=True)
class Subject:
    """An in-toto resource descriptor with a SHA-256 digest."""

    name: str
    sha256: str

    def to_json(self) -> dict[str, Any]:
        """The in-toto subject object."""
        return {"name": self.name, "digest": {"sha256": self.sha256}}


_HEX64 = re.compile(r"[0-9a-f]{64}")


def _is_hex64(s: object) -> bool:
    return isinstance(s, str) and _HEX64.fullmatch(s) is not None


@dataclass(frozen=True)
class Statement:
    """An in-toto Statement v1 carrying a kolm predicate."""

    subjects: tuple[Subject, ...]
    predicate_type: str
    predicate: Mapping[str, Any] = field(hash=False)

    @property
    def kind(self) -> str:
        """The receipt kind (``label``, ``eval``, ...)."""
        return kind_of(self.predicate_type)

    def to_json(self) -> dict[str, Any]:
        """The statement JSON object."""
        return {
            "_type": STATEMENT_TYPE,
            "subject": [s.to_json() for s in self.subjects],
            "predicateType": self.predicate_type,
            "predicate": dict(self.predicate),
        }

    def to_bytes(self) -> bytes:
        """Canonical JSON bytes (the DSSE payload).

        A statement made by this module's builders keeps the bytes its parser round trip
        produced (see ``_statement``), so signing it does not encode it again.
        """
        cached: bytes | None = self.__dict__.get("_bytes")
        return cached if cached is not None else canonical_json(self.to_json())

    @classmethod
    def from_json(cls, obj: object) -> Statement:
        """Parse and validate; raises :class:`StatementFormatError` naming the field."""
        if not isinstance(obj, dict):
            raise StatementFormatError(f"statement: want a JSON object, got {type(obj).__name__}")
        if obj.get("_type") != STATEMENT_TYPE:
            raise StatementFormatError(
                f"statement._type: {str(obj.get('_type'))[:80]!r}, want {STATEMENT_TYPE!r}"
            )
        if not obj.keys() <= _STATEMENT_FIELDS:
            unknown = sorted(obj.keys() - _STATEMENT_FIELDS)
            raise StatementFormatError(f"statement: unknown field(s) {', '.join(unknown)}")
        subj = obj.get("subject")
        if not isinstance(subj, list) or not subj:
            raise StatementFormatError("statement.subject: want a non-empty list")
        subjects: list[Subject] = []
        for i, s in enumerate(subj):
            if not isinstance(s, dict):
                raise StatementFormatError(f"statement.subject[{i}]: want an object")
            name, digest = s.get("name"), s.get("digest")
            if not isinstance(name, str):
                raise StatementFormatError(f"statement.subject[{i}].name: want a string")
            sha = digest.get("sha256") if isinstance(digest, dict) else None
            if not isinstance(sha, str) or _HEX64.fullmatch(sha) is None:
                raise StatementFormatError(
                    f"statement.subject[{i}].digest.sha256: want 64 lowercase hex digits"
                )
            subjects.append(Subject(name, sha))
        ptype = obj.get("predicateType")
        if not isinstance(ptype, str):
            raise StatementFormatError("statement.predicateType: want a string")
        kind = kind_of(ptype)
        pred = obj.get("predicate")
        if not isinstance(pred, dict):
            raise StatementFormatError("statement.predicate: want an object")
        if not pred.keys() >= _REQUIRED_SETS[kind]:
            missing = [f for f in REQUIRED[kind] if f not in pred]
            raise StatementFormatError(
                f"statement.predicate: {kind} receipt is missing {', '.join(missing)}"
            )
        return cls(tuple(subjects), ptype, pred)

    @classmethod
    def from_bytes(cls, data: bytes) -> Statement:
        """Parse a signed statement: ``data`` must be exactly its RFC 8785 form.

        The ledger (at append), ``kolm verify`` and the audit all read payloads here, so
        one rule (:func:`~kolm_ledger.formats.canonical.strict_loads`: UTF-8, no duplicate keys,
        no NaN/Infinity, doubles only, canonical bytes) holds everywhere; a refusal is a
        :class:`StatementFormatError` naming the fault.
        """
        return cls.from_json(strict_loads(data, "statement", StatementFormatError))

    @classmethod
    def from_document(cls, data: bytes) -> Statement:
        """Parse a statement a person wrote (any JSON layout), to be signed as canonical JSON.

        The value rules of :func:`~kolm_ledger.formats.canonical.parse_json` still hold (no
        duplicate keys, NaN, lone surrogates); :meth:`to_bytes` gives the canonical form.
        """
        return cls.from_json(parse_json(data, "statement", StatementFormatError))

    @classmethod
    def from_envelope(cls, env: Envelope) -> Statement:
        """Parse the statement inside a DSSE envelope (payload type must be in-toto)."""
        if env.payload_type != IN_TOTO_PAYLOAD_TYPE:
            raise StatementFormatError(
                f"envelope.payloadType is {env.payload_type[:80]!r}, want {IN_TOTO_PAYLOAD_TYPE!r}"
            )
        return cls.from_bytes(env.payload)

    def subject_digests(self) -> list[str]:
        """All subject SHA-256 digests."""
        return [s.sha256 for s in self.subjects]


def sign_statement(
    statement: Statement, key: PrivateKey, *, deterministic: bool = False
) -> Envelope:
    """Sign a statement as a DSSE envelope (payload = canonical statement JSON).

    ``deterministic`` (RFC 6979): the same statement gives the same envelope bytes, so a
    receipt re-signed after a crash is a duplicate the ledger answers with its index.
    """
    return sign(statement.to_bytes(), IN_TOTO_PAYLOAD_TYPE, key, deterministic=deterministic)


def _now(t: datetime | None) -> str:
    return format_time(t or datetime.now(UTC))


def _statement(kind: str, subjects: Sequence[Subject], predicate: dict[str, Any]) -> Statement:
    data = Statement(tuple(subjects), predicate_type(kind), predicate).to_bytes()
    # round-trip through the parser so a builder can never emit what a verifier refuses
    st = Statement.from_json(json.loads(data))
    # its predicate is the parser's own fresh dict, which no caller holds a reference to
    # beyond ``st.predicate`` (statements are values: never change one once built), and
    # canonical JSON re-encodes parsed canonical JSON to the same bytes
    st.__dict__["_bytes"] = data
    return st


def label_statement(
    *,
    input_value: Any,
    output_value: Any,
    task: Mapping[str, Any],
    teacher: Mapping[str, Any],
    k: int,
    votes: Mapping[str, int],
    sample_digests: Sequence[str],
    verifier: Mapping[str, Any],
    agreement: float,
    job_id: str,
    include_input: bool = False,
    time: datetime | None = None,
) -> Statement:
    """A ``label`` receipt: one verified, voted teacher label.

    The subject commits to ``{input, output}``; the input itself is stored only
    when ``include_input`` (by default its digest is).
    """
    pred: dict[str, Any] = {
        "task": dict(task),
        "teacher": dict(teacher),
        "k": k,
        "votes": dict(sorted(votes.items())),
        "sample_digests": list(sample_digests),
        "verifier": dict(verifier),
        "agreement": agreement,
        "job_id": job_id,
        "input_digest": digest_hex(input_value),
        "output": output_value,
        "time": _now(time),
    }
    if include_input:
        pred["input"] = input_value
    subjects = [
        Subject("example", example_digest(input_value, output_value)),
        Subject(f"job:{job_id}", job_digest(job_id)),
    ]
    return _statement("label", subjects, pred)


def eval_statement(
    *,
    artifact_digest: str,
    holdout_digest: str,
    n: int,
    correct: int,
    k_score: float,
    interval: tuple[float, float],
    outcome_root: str,
    teacher_k_score: float | None,
    metric: str = "100 * |{x in holdout: verifier(f(x)) and f(x) == ref(x)}| / n",
    extra: Mapping[str, Any] | None = None,
    time: datetime | None = None,
) -> Statement:
    """An ``eval`` receipt: the artifact's K-score on a holdout."""
    pred: dict[str, Any] = {
        "holdout_digest": holdout_digest,
        "n": n,
        "correct": correct,
        "k_score": k_score,
        "interval": {
            "low": interval[0],
            "high": interval[1],
            "confidence": 0.95,
            "method": "wilson",
        },
        "outcome_root": outcome_root,
        "teacher_k_score": teacher_k_score,
        "metric": metric,
        "time": _now(time),
        **(extra or {}),
    }
    return _statement("eval", [Subject("artifact", artifact_digest)], pred)


def artifact_statement(
    *,
    artifact_digest: str,
    file_name: str,
    file_digest: str,
    base_model: Mapping[str, Any],
    training_set_root: str,
    label_count: int,
    eval_receipt: str,
    k_score: float,
    verifier: Mapping[str, Any],
    compile_config_digest: str,
    kolm_version: str,
    checkpoint: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
    time: datetime | None = None,
) -> Statement:
    """An ``artifact`` receipt: a signed ``.kolm`` and where it came from."""
    pred: dict[str, Any] = {
        "base_model": dict(base_model),
        "training_set_root": training_set_root,
        "label_count": label_count,
        "eval_receipt": eval_receipt,
        "k_score": k_score,
        "verifier": dict(verifier),
        "compile_config_digest": compile_config_digest,
        "kolm_version": kolm_version,
        "checkpoint": dict(checkpoint),
        "time": _now(time),
        **(extra or {}),
    }
    return _statement(
        "artifact", [Subject("artifact", artifact_digest), Subject(file_name, file_digest)], pred
    )


def prediction_statement(
    *,
    output_digest: str,
    artifact_digest: str,
    input_commitment: str,
    output: Any | None,
    verifier_verdict: Mapping[str, Any],
    backend: str,
    confidence: float | None,
    latency_ms: float,
    request_id: str,
    evidence: Sequence[Mapping[str, Any]] | None = None,
    corpus_root: str | None = None,
    extra: Mapping[str, Any] | None = None,
    time: datetime | None = None,
) -> Statement:
    """A ``prediction`` receipt: one answer of the inference service.

    ``evidence`` (recall): the cited chunks, each ``{"id", "digest", "position",
    "proof"}`` (plus ``"label"`` for a labelled chunk), as made by
    ``kolm_compile.recall.evidence``; ``corpus_root`` is the hex corpus root they prove
    into. Give both or neither (else :class:`StatementFormatError`).
    """
    if backend not in ("student", "teacher"):
        raise StatementFormatError(f"prediction backend {backend!r}, want 'student' or 'teacher'")
    if (evidence is None) != (corpus_root is None):
        raise StatementFormatError("prediction evidence and corpus_root go together: give both")
    if corpus_root is not None and (
        not isinstance(corpus_root, str) or _HEX64.fullmatch(corpus_root) is None
    ):
        raise StatementFormatError("prediction corpus_root: want 64 lowercase hex digits")
    if evidence is not None and not all(isinstance(e, Mapping) for e in evidence):
        raise StatementFormatError("prediction evidence: want a list of objects")
    pred: dict[str, Any] = {
        "artifact_digest": artifact_digest,
        "input_commitment": input_commitment,
        "verifier_verdict": dict(verifier_verdict),
        "backend": backend,
        "confidence": confidence,
        "latency_ms": latency_ms,
        "request_id": request_id,
        "time": _now(time),
        **(extra or {}),
    }
    if output is not None:
        pred["output"] = output
    if evidence is not None:
        pred["evidence"] = [dict(e) for e in evidence]
        pred["corpus_root"] = corpus_root
    return _statement("prediction", [Subject("output", output_digest)], pred)


def key_statement(
    *,
    action: str,
    public_key: PublicKey,
    role: str,
    effective_at: datetime | None = None,
    not_after: datetime | None = None,
    replaces: str | None = None,
    reason: str | None = None,
    time: datetime | None = None,
) -> Statement:
    """A ``key`` receipt: register, rotate or revoke a producer key (signed by an admin key)."""
    if action not in ("register", "rotate", "revoke"):
        raise StatementFormatError(f"key action {action!r}, want register, rotate or revoke")
    keyid = public_key.keyid()
    pred: dict[str, Any] = {
        "action": action,
        "keyid": keyid,
        "role": role,
        "algorithm": public_key.algorithm,
        "public_key_pem": public_key.pem(),
        "effective_at": _now(effective_at or time),
        "not_after": format_time(not_after) if not_after else None,
        "replaces": replaces,
        "reason": reason,
        "time": _now(time),
    }
    return _statement("key", [Subject("key", keyid)], pred)
