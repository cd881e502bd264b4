"""Offline verification of one receipt bundle: the API a downstream system calls.

No network, no kolm server, no torch: only the bundle and a trust root. The
procedure, with the step numbers that errors carry::

    (1) parse bundle        the bundle JSON, its DSSE envelope, its ``integrated_time``
                            and its tlog-proof parse
    (2) parse statement     the payload is an in-toto Statement v1 with a kolm predicate
                            type and an RFC 3339 ``time`` (:mod:`kolm_ledger.timefmt`)
    (3) check signature     a signature is by a key in the trust root and verifies
                            (every signature by a trusted key must verify)
    (4) check key policy    that key's role may sign this kind of receipt; the key was
                            valid (not before, not expired, not revoked) at the entry's
                            integration time (the bundle's ``integrated_time``, proven
                            by steps 5-7); the receipt's own ``time`` is not before the
                            key's ``not_before`` nor later than the integration time
                            plus the skew (5 minutes)
    (5) compute leaf hash   ``SHA-256(0x00 || JCS({"envelope", "integrated_time"}))``
                            (:mod:`kolm_ledger.formats.leaf`), within the ledger's entry size
                            limit
    (6) check checkpoint    the tlog-proof's checkpoint is signed by a trusted log key
                            for ``origin``, valid at ``now``; with a witness policy, at
                            least ``min_witnesses`` of ``witnesses`` cosigned it
    (7) check inclusion     ``index < size`` and the inclusion proof links the leaf hash
                            to the checkpoint root

For a ``prediction`` receipt, :func:`verify_prediction` goes on::

    (8) check artifact receipt  the artifact's own receipt bundle passes steps 2-7, is an
                                ``artifact`` receipt (so signed by a ``compile`` key),
                                its subject is the artifact digest the prediction names,
                                and that compile key is valid at the prediction's
                                integration time
    (9) check input commitment  ``SHA-256(salt || JCS(input))`` equals the receipt's
                                ``input_commitment`` (the caller alone holds the salt)
    (10) check evidence         every chunk the receipt cites (recall ``evidence``) is in
                                the signed corpus: the corpus root and size come from the
                                verified artifact receipt (``corpus_root``/``corpus_chunks``)
                                or from the verified ``.kolm`` file, never from the
                                prediction receipt, whose own ``corpus_root`` must match;
                                with the file, each cited chunk's id, digest and label must
                                also be the index row at its position, its digest must
                                recompute from that row's text, and missing proofs are made

The canonical input is the RFC 8785 (JCS) JSON of the input value: for a
``classify`` task the input is a JSON string, so ``"where is my card?"`` is
committed as the 19 bytes ``"where is my card?"`` *with* the quotes.

Each failure raises the specific :class:`~kolm_ledger.errors.KolmError` subclass
(``SignatureError``, ``RoleError``, ``InclusionProofError``...) with a message that
starts ``"step N (<step name>): "`` and an attribute ``step = N`` (read it with
:func:`step_of`). :func:`verify_bundle` takes a parsed bundle and starts at step 2;
:func:`verify_bundle_bytes` starts at step 1.

Example::

    >>> from kolm_ledger.verify.receipt import STEPS
    >>> STEPS[0], STEPS[6], STEPS[-1]
    ('parse bundle', 'check inclusion', 'check evidence')
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from kolm_ledger.errors import (
    CheckpointError,
    EntryTooLargeError,
    InvalidInput,
    KeyValidityError,
    KolmError,
    StatementFormatError,
    UnknownKeyError,
    VerificationError,
)
from kolm_ledger.formats import dsse
from kolm_ledger.formats.bundle import Bundle
from kolm_ledger.formats.canonical import canonical_json, digest_hex
from kolm_ledger.formats.checkpoint import Checkpoint, verify_checkpoint
from kolm_ledger.formats.dsse import MAX_ENVELOPE_BYTES, Envelope
from kolm_ledger.formats.leaf import entry_leaf_hash
from kolm_ledger.formats.receipts import Statement
from kolm_ledger.formats.witness import CosignatureVerifier, verify_cosignatures
from kolm_ledger.keys import Role, TrustedKey, TrustRoot
from kolm_ledger.timefmt import MAX_TIME_SKEW, check_receipt_time, from_micros, receipt_time
from kolm_ledger.verify.artifact import check_artifact
from kolm_ledger.verify.recall_proof import read_artifact_corpus, verify_evidence
from kolm_ledger.verify.trust import check_key_policy

if TYPE_CHECKING:
    pass

__all__ = [
    "SALT_BYTES",
    "STEPS",
    "VerifiedPrediction",
    "VerifiedReceipt",
    "at_step",
    "input_commitment",
    "step_of",
    "verify_bundle",
    "verify_bundle_bytes",
    "verify_prediction",
]

#: The verification steps, in order; step ``n`` is ``STEPS[n - 1]``.
STEPS: tuple[str, ...] = (
    "parse bundle",
    "parse statement",
    "check signature",
    "check key policy",
    "compute leaf hash",
    "check checkpoint",
    "check inclusion",
    "check artifact receipt",
    "check input commitment",
    "check evidence",
)

_HEX64 = re.compile(r"[0-9a-f]{64}")

#: Length of the salt of an input commitment.
SALT_BYTES = 32


@dataclass(frozen=True)
class VerifiedReceipt:
    """What a verified bundle establishes."""

    statement: Statement
    envelope: Envelope
    kind: str
    keyid: str
    role: Role
    index: int
    leaf_hash: bytes
    checkpoint: Checkpoint
    time: datetime  # the receipt's own ``time`` (claimed by its signer)
    integrated_at: datetime  # when the log integrated it (proven by the inclusion)


def step_of(error: BaseException) -> int | None:
    """The verification step an error from this module failed at (``None`` if not one)."""
    step = getattr(error, "step", None)
    return step if isinstance(step, int) else None


def at_step(step: int, error: KolmError) -> KolmError:
    """A copy of ``error`` (same class) whose message names the step, with ``.step`` set."""
    new = type(error)(f"step {step} ({STEPS[step - 1]}): {error}")
    new.step = step
    return new


@contextmanager
def _step(step: int) -> Iterator[None]:
    try:
        yield
    except KolmError as e:
        if step_of(e) is not None:
            raise
        raise at_step(step, e) from e


def _trusted_signer(envelope: Envelope, trust: TrustRoot) -> TrustedKey:
    """The first trusted key that signed ``envelope``; every trusted signature must verify."""
    by_id: dict[str, TrustedKey] = {k.keyid: k for k in trust.keys}
    signers: list[TrustedKey] = []
    for s in envelope.signatures:
        k = by_id.get(s.keyid)
        if k is not None and k not in signers:
            signers.append(k)
    if not signers:
        have = ", ".join(s.keyid[:16] for s in envelope.signatures)
        raise UnknownKeyError(
            f"no envelope signature is by a key in the trust root (keyids: {have})"
        )
    for k in signers:
        dsse.verify_signature(envelope, k.public_key)
    return signers[0]


def verify_bundle(
    bundle: Bundle,
    trust: TrustRoot,
    *,
    origin: str | None = None,
    now: datetime | None = None,
    witnesses: Sequence[CosignatureVerifier] = (),
    min_witnesses: int = 0,
    max_time_skew: timedelta = MAX_TIME_SKEW,
) -> VerifiedReceipt:
    """Verify a parsed receipt bundle offline (steps 2 to 7 of the module docstring).

    ``origin``: the ledger the caller expects (default: any log in the trust root).
    ``now``: the time log keys must be valid at (default: the current time).
    ``max_time_skew``: how far the receipt's ``time`` may lie after its integration time.
    ``witnesses``/``min_witnesses``: the cosignature policy of step 6 (requires
    ``min_witnesses <= len(witnesses)``; 0 checks none).
    Raises a :class:`~kolm_ledger.errors.KolmError` subclass whose ``step`` attribute
    and message prefix name the step that failed.

    (2) parse the statement inside the envelope;
    (3) the signing key is trusted and its DSSE signature verifies;
    (4) the key's role may sign this kind, it was valid at the integration time, and the
        receipt's time lies in [not_before, integration time + skew];
    (5) recompute the leaf hash from the envelope and the integration time;
    (6) the checkpoint is signed by a trusted log key;
    (7) the inclusion proof links the leaf to the checkpoint root.
    """
    now = now if now is not None else datetime.now(UTC)
    env = bundle.envelope
    proof = bundle.tlog_proof
    # (2) parse the statement inside the envelope
    with _step(2):
        statement = Statement.from_envelope(env)
        kind = statement.kind
        t = receipt_time(statement.predicate)
    integrated_at = from_micros(bundle.integrated_time)
    # (3) the signing key is in the trust root and its DSSE signature verifies
    with _step(3):
        key = _trusted_signer(env, trust)
    # (4) the key's role may sign this kind, it was valid when the log integrated the
    # receipt (a time steps 5-7 prove), and the receipt's own time obeys the time rule
    with _step(4):
        check_key_policy(key, kind, integrated_at)
        check_receipt_time(
            t, not_before=key.not_before, integrated_at=integrated_at, skew=max_time_skew
        )
    # (5) recompute the leaf hash
    with _step(5):
        canonical = env.canonical()
        if len(canonical) > MAX_ENVELOPE_BYTES:
            raise EntryTooLargeError(
                f"envelope is {len(canonical)} bytes, over the ledger's "
                f"{MAX_ENVELOPE_BYTES}-byte entry limit"
            )
        leaf_hash = entry_leaf_hash(canonical, bundle.integrated_time)
    # (6) check the checkpoint signature
    with _step(6):
        signed = verify_checkpoint(proof.checkpoint, trust, origin=origin, at=now)
        if min_witnesses > len(witnesses):
            raise InvalidInput(
                f"policy wants {min_witnesses} witness cosignatures but names only "
                f"{len(witnesses)} witnesses"
            )
        if min_witnesses:
            cosigned = verify_cosignatures(signed.note, witnesses)
            if len(cosigned) < min_witnesses:
                raise CheckpointError(
                    f"checkpoint has {len(cosigned)} valid witness cosignature(s)"
                    f"{' (' + ', '.join(cosigned) + ')' if cosigned else ''}, "
                    f"want at least {min_witnesses}"
                )
    # (7) check the inclusion proof
    with _step(7):
        proof.verify_inclusion(leaf_hash, signed.checkpoint)
    return VerifiedReceipt(
        statement=statement,
        envelope=env,
        kind=kind,
        keyid=key.keyid,
        role=key.role,
        index=proof.index,
        leaf_hash=leaf_hash,
        checkpoint=signed.checkpoint,
        time=t,
        integrated_at=integrated_at,
    )


def verify_bundle_bytes(
    data: bytes,
    trust: TrustRoot,
    *,
    origin: str | None = None,
    now: datetime | None = None,
    witnesses: Sequence[CosignatureVerifier] = (),
    min_witnesses: int = 0,
    max_time_skew: timedelta = MAX_TIME_SKEW,
) -> VerifiedReceipt:
    """Parse (step 1) and verify (steps 2 to 7) a bundle file's bytes."""
    # (1) parse the bundle
    with _step(1):
        bundle = Bundle.from_bytes(data)
    return verify_bundle(
        bundle,
        trust,
        origin=origin,
        now=now,
        witnesses=witnesses,
        min_witnesses=min_witnesses,
        max_time_skew=max_time_skew,
    )


def input_commitment(input_value: Any, salt: bytes) -> str:
    """Hex ``SHA-256(salt || JCS(input_value))``: how a prediction receipt commits to its input.

    Requires ``len(salt) == SALT_BYTES`` and an input RFC 8785 can represent (a string
    for ``classify``); raises :class:`InvalidInput` otherwise.
    """
    if not isinstance(salt, bytes | bytearray) or len(salt) != SALT_BYTES:
        n = len(salt) if isinstance(salt, bytes | bytearray) else type(salt).__name__
        raise InvalidInput(f"salt has {n} bytes, want {SALT_BYTES}")
    return hashlib.sha256(bytes(salt) + canonical_json(input_value)).hexdigest()


@dataclass(frozen=True)
class VerifiedPrediction:
    """What a verified prediction bundle establishes.

    ``artifact`` is the verified artifact receipt (``None`` when none was given, so step
    8 did not run) and ``k_score`` its K-score; ``input_checked`` says step 9 ran.
    ``evidence`` is the receipt's cited chunks (empty without recall) and
    ``corpus_root`` the root it names; ``evidence_checked`` says step 10 proved them in
    the signed corpus, whose root and size came from ``corpus_source``
    (``"artifact receipt"``, ``"artifact file"``, or both joined by ``" and "``).
    ``artifact_file_checked`` says the given ``.kolm`` passed the artifact check (the
    inference loader's) and is the artifact the prediction names.
    """

    receipt: VerifiedReceipt
    artifact_digest: str
    output: Any
    backend: str
    reason: str | None
    artifact: VerifiedReceipt | None
    k_score: float | None
    input_checked: bool
    evidence: tuple[Mapping[str, Any], ...] = ()
    corpus_root: str | None = None
    evidence_checked: bool = False
    corpus_source: str | None = None
    artifact_file_checked: bool = False


def _hex64(pred: Mapping[str, Any], field: str) -> str:
    v = pred.get(field)
    if not isinstance(v, str) or _HEX64.fullmatch(v) is None:
        raise StatementFormatError(f"statement.predicate.{field}: want 64 lowercase hex digits")
    return v


def _check_prediction(statement: Statement) -> None:
    """The prediction-specific fields are well formed and the output matches the subject."""
    if statement.kind != "prediction":
        raise StatementFormatError(f"receipt is a {statement.kind!r} receipt, want 'prediction'")
    pred = statement.predicate
    _hex64(pred, "artifact_digest")
    _hex64(pred, "input_commitment")
    if pred.get("backend") not in ("student", "teacher"):
        raise StatementFormatError(
            f"statement.predicate.backend: {str(pred.get('backend'))[:20]!r}, "
            "want 'student' or 'teacher'"
        )
    if "output" in pred:
        want = statement.subjects[0].sha256
        got = digest_hex(pred["output"])
        if got != want:
            raise StatementFormatError(
                f"output digest {got[:16]}… does not match the subject digest {want[:16]}…"
            )
    if "evidence" in pred or "corpus_root" in pred:
        if not isinstance(pred.get("evidence"), list):
            raise StatementFormatError("statement.predicate.evidence: want a list")
        _hex64(pred, "corpus_root")


def _trusted_corpus(artifact: VerifiedReceipt) -> tuple[str, int] | None:
    """``(corpus_root, corpus_chunks)`` from a verified artifact receipt, if it names them."""
    ap = artifact.statement.predicate
    if "corpus_root" not in ap and "corpus_chunks" not in ap:
        return None
    root, n = ap.get("corpus_root"), ap.get("corpus_chunks")
    if not isinstance(root, str) or _HEX64.fullmatch(root) is None:
        raise StatementFormatError("artifact receipt corpus_root: want 64 lowercase hex digits")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise StatementFormatError("artifact receipt corpus_chunks: want an integer >= 1")
    return root, n


def _check_evidence(
    pred: Mapping[str, Any],
    evidence: list[Any],
    trust: TrustRoot,
    artifact: VerifiedReceipt | None,
    artifact_file: str | os.PathLike[str] | None,
    at: datetime,
) -> str | None:
    """Step 10; returns the corpus source, or ``None`` when no trusted corpus was given."""
    sources: dict[str, tuple[str, int]] = {}
    if artifact is not None:
        got = _trusted_corpus(artifact)
        if got is not None:
            sources["artifact receipt"] = got
    corpus = None
    if artifact_file is not None:
        positions = [
            e["position"]
            for e in evidence
            if isinstance(e, Mapping)
            and isinstance(e.get("position"), int)
            and not isinstance(e.get("position"), bool)
        ]
        corpus = read_artifact_corpus(
            artifact_file,
            trust,
            artifact_digest=str(pred["artifact_digest"]),
            at=at,
            positions=positions,
        )
        sources["artifact file"] = (corpus.corpus_root, corpus.size)
    if not sources:
        return None
    (root, size), *others = sources.values()
    if any(o != (root, size) for o in others):
        a, b = sources["artifact receipt"], sources["artifact file"]
        raise VerificationError(
            f"the artifact receipt's corpus (root {a[0][:16]}…, {a[1]} chunks) is not the "
            f"artifact file's (root {b[0][:16]}…, {b[1]} chunks)"
        )
    named = str(pred["corpus_root"])
    if named != root:
        raise VerificationError(
            f"the receipt's corpus_root {named[:16]}… is not the artifact's signed corpus "
            f"root {root[:16]}…"
        )
    items: list[Any] = list(evidence)
    texts: dict[str, str] | None = None
    if corpus is not None:
        texts = {}
        for n, item in enumerate(items):
            if not isinstance(item, Mapping):
                continue  # verify_evidence names it
            cid = item.get("id")
            name = repr(cid) if isinstance(cid, str) else f"[{n}]"
            row = corpus.chunks.get(item.get("position"))  # type: ignore[arg-type]
            if row is None:
                continue  # out of range: verify_evidence names it
            for field, have in (("id", row.id), ("digest", row.digest), ("label", row.label)):
                if item.get(field) != have:
                    raise VerificationError(
                        f"evidence chunk {name}: {field} {str(item.get(field))[:80]!r} is not "
                        f"the artifact's chunk at position {row.position} ({str(have)[:80]!r})"
                    )
            texts[row.id] = row.text
            if "proof" not in item:  # a receipt without proofs: make them from the file
                items[n] = {**item, "proof": [h.hex() for h in corpus.tree.proof(row.position)]}
    else:
        for n, item in enumerate(items):
            if isinstance(item, Mapping) and "proof" not in item:
                cid = item.get("id")
                name = repr(cid) if isinstance(cid, str) else f"[{n}]"
                raise VerificationError(
                    f"evidence chunk {name}: the receipt holds no inclusion proof; give the "
                    "artifact file to compute it"
                )
    verify_evidence(items, root, size, texts=texts)
    return " and ".join(sources)


def verify_prediction(
    bundle: Bundle,
    trust: TrustRoot,
    *,
    artifact_bundle: Bundle | None = None,
    input_value: Any = None,
    salt: bytes | None = None,
    artifact_file: str | os.PathLike[str] | None = None,
    origin: str | None = None,
    now: datetime | None = None,
    witnesses: Sequence[CosignatureVerifier] = (),
    min_witnesses: int = 0,
    max_time_skew: timedelta = MAX_TIME_SKEW,
) -> VerifiedPrediction:
    """Verify a ``prediction`` receipt bundle offline: steps 2-7, then 8, 9 and 10.

    Steps 2-7 are :func:`verify_bundle`'s (the key must be an ``infer`` key valid at the
    receipt's integration time); then the statement must be a well-formed prediction whose
    ``output`` (when present) hashes to the subject digest (reported as step 2).

    (8) with ``artifact_bundle`` (the artifact receipt's bundle, e.g. from the ledger's
        ``FindEntries`` + ``GetReceiptBundle``): it passes steps 2-7, is an ``artifact``
        receipt and names the artifact digest the prediction names, and its compile key
        is still valid (not revoked, not expired) at the prediction's integration time;
    (9) with ``salt`` (and ``input_value``; ``None`` is not an input): the commitment
        recomputes. Giving one of ``input_value`` / ``salt`` without the other is an error.
    (10) when the receipt cites recall ``evidence`` and a trusted corpus is at hand — the
        artifact receipt of step 8 recording ``corpus_root``/``corpus_chunks``, and/or
        ``artifact_file`` (the ``.kolm``, verified here by signature and digest with
        :func:`kolm_ledger.verify.recall_proof.read_artifact_corpus`) — the receipt's
        ``corpus_root`` is that root and every cited chunk verifies
        (:func:`kolm_ledger.verify.recall_proof.verify_evidence`; failures name the chunk). Without
        a trusted corpus the step does not run (``evidence_checked`` is false): a root taken
        from the prediction receipt alone proves nothing. Without the file, ids and labels
        are bound to the digests only through the chunk text, so only the file checks them.
        ``artifact_file`` is checked whether or not the receipt cites evidence: the whole
        artifact check of the inference loader (:mod:`kolm_ledger.verify.artifact`; an
        unsigned extra file, a missing one, a pickle, a symlink or unsafe name fails), by a
        compile key valid at the receipt's integration time, and it must be the artifact
        named.

    Raises a :class:`~kolm_ledger.errors.KolmError` subclass with ``step`` set.
    """
    receipt = verify_bundle(
        bundle,
        trust,
        origin=origin,
        now=now,
        witnesses=witnesses,
        min_witnesses=min_witnesses,
        max_time_skew=max_time_skew,
    )
    statement = receipt.statement
    with _step(2):
        _check_prediction(statement)
    pred = statement.predicate
    digest = str(pred["artifact_digest"])
    artifact: VerifiedReceipt | None = None
    k_score: float | None = None
    # (8) check the artifact receipt
    if artifact_bundle is not None:
        try:
            artifact = verify_bundle(
                artifact_bundle, trust, origin=origin, now=now, max_time_skew=max_time_skew
            )
        except KolmError as e:
            raise at_step(8, type(e)(f"artifact receipt: {e}")) from e
        with _step(8):
            if artifact.kind != "artifact":
                raise VerificationError(
                    f"the artifact bundle holds a {artifact.kind!r} receipt, want 'artifact'"
                )
            named = artifact.statement.subject_digests()
            if digest not in named:
                raise VerificationError(
                    f"the artifact receipt is for {named[0][:16]}…, the prediction names "
                    f"artifact {digest[:16]}…"
                )
            # the artifact's compile key must still be valid when the prediction was logged
            # (its authenticated integration time): after its revocation (or expiry) the
            # artifact is not to be served any more
            signer = next(k for k in trust.keys if k.keyid == artifact.keyid)
            try:
                check_key_policy(signer, "artifact", receipt.integrated_at)
            except KeyValidityError as e:
                raise KeyValidityError(
                    f"the artifact's compile key is not valid at the prediction's integration time: {e}"
                ) from e
            ks = artifact.statement.predicate.get("k_score")
            if isinstance(ks, bool) or not isinstance(ks, int | float):
                raise StatementFormatError("artifact receipt k_score: want a number")
            k_score = float(ks)
    # (9) check the input commitment
    checked = False
    if salt is not None or input_value is not None:
        with _step(9):
            if salt is None or input_value is None:
                raise InvalidInput("to check the input commitment give both the input and salt")
            got = input_commitment(input_value, salt)
            want = _hex64(pred, "input_commitment")
            if got != want:
                raise VerificationError(
                    f"input commitment {got[:16]}… of the given input and salt does not "
                    f"match the receipt's {want[:16]}…"
                )
            checked = True
    # (10) check the evidence against the signed corpus
    evidence = pred.get("evidence")
    source = None
    if isinstance(evidence, list):
        with _step(10):
            source = _check_evidence(
                pred, evidence, trust, artifact, artifact_file, receipt.integrated_at
            )
    elif artifact_file is not None:  # no evidence: the file still gets the loader's check
        with _step(10):
            check_artifact(
                artifact_file,
                trust.by_role("compile"),
                at=receipt.integrated_at,
                expect_digest=digest,
            )
    reason = pred.get("reason")
    root = pred.get("corpus_root")
    return VerifiedPrediction(
        receipt=receipt,
        artifact_digest=digest,
        output=pred.get("output"),
        backend=str(pred["backend"]),
        reason=reason if isinstance(reason, str) else None,
        artifact=artifact,
        k_score=k_score,
        input_checked=checked,
        evidence=tuple(e for e in evidence if isinstance(e, Mapping))
        if isinstance(evidence, list)
        else (),
        corpus_root=root if isinstance(root, str) else None,
        evidence_checked=source is not None,
        corpus_source=source,
        artifact_file_checked=artifact_file is not None,
    )
