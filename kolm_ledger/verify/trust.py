"""The ledger's trust state: the trust root plus the ``key`` receipts in the log.

An admin key registers, rotates and revokes producer keys by appending ``key``
receipts. Each takes effect at ``max(effective_at, integration time)`` — a
receipt cannot back-date a revocation to before the log saw it, so receipts
signed (and integrated) before a revocation stay valid, and ones after it are
refused at append and flagged by the audit.

A revoked key id never becomes valid again: a ``register`` or ``rotate`` receipt
naming a key id that is revoked (even from a time still to come) is refused by
:meth:`TrustState.apply` with :class:`~kolm_ledger.errors.KeyValidityError`
(``FAILED_PRECONDITION``), so the ledger refuses it at append, the audit flags it,
and :func:`fold_key_receipts` leaves it out.

One key policy — may this key sign this kind at this time — is
:func:`check_key_policy` (:meth:`TrustState.authorize` looks the key up first): its
role may sign the kind, and it is valid then (not before ``not_before``, not after
``not_after``, not revoked). The ledger (at append and again at integration), the
audit, offline verify (step 4), the provenance check, the fold below, the inference key
follower and the compile pre-flight all ask it.

One fold serves every reader of the trust state — the ledger's refresh, the audit, the
inference loader and its key follower, ``kolm verify --ledger``, ``kolm provenance``
and ``kolm report``: :func:`fold_key_receipts` checks each key receipt against the
state so far (:meth:`TrustState.admit`: signer known, signature, the key policy for an
``admin`` key at the integration time) and applies it; :func:`key_receipt_entries` pages
through *every* key receipt of a ledger database or service (``FindEntries`` pages of
1000, to the end), and :func:`prove_entries` proves each (envelope and integration
time) against the log's signed checkpoint before a reader folds it
(:func:`ledger_trust_state` does both).

Example::

    >>> from kolm_ledger.keys import TrustRoot
    >>> TrustState(TrustRoot(())).keys()
    []
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol, cast

from kolm_ledger._crypto import PublicKey
from kolm_ledger.errors import (
    CheckpointError,
    InclusionProofError,
    KeyFormatError,
    KeyValidityError,
    KolmError,
    StatementFormatError,
    TrustRootFormatError,
    UnknownKeyError,
)
from kolm_ledger.formats.checkpoint import Checkpoint, verify_checkpoint
from kolm_ledger.formats.dsse import Envelope, verify_signature
from kolm_ledger.formats.leaf import entry_leaf_hash
from kolm_ledger.formats.merkle import verify_inclusion
from kolm_ledger.formats.receipts import Statement
from kolm_ledger.keys import ROLES, KeyID, Role, TrustedKey, TrustRoot, format_time, parse_time
from kolm_ledger.timefmt import micros

if TYPE_CHECKING:
    from kolm_ledger.storage import Entry

__all__ = [
    "KEY_PAGE",
    "EntrySource",
    "TrustState",
    "check_key_policy",
    "fold_key_receipts",
    "key_receipt_entries",
    "ledger_trust_state",
    "prove_entries",
    "prove_entry",
]

log = logging.getLogger("kolm.trust")

#: Key receipts asked for per ``find`` call while paging (the service's page size).
KEY_PAGE = 1000


@dataclass(frozen=True)
class TrustState:
    """An immutable view of which keys are trusted, and until when."""

    root: TrustRoot
    extra: tuple[TrustedKey, ...] = ()

    def keys(self) -> list[TrustedKey]:
        """Every key known (from the root and from key receipts)."""
        return [*self.root.keys, *self.extra]

    def as_root(self) -> TrustRoot:
        """This state as a :class:`TrustRoot` (revocations kept in ``revoked_at``), for the
        offline verifier's functions, which take a root."""
        return TrustRoot(tuple(self.keys()))

    @functools.cached_property
    def _extra_by_id(self) -> dict[str, TrustedKey]:
        return {k.keyid: k for k in self.extra}

    def get(self, keyid: str) -> TrustedKey:
        """The key with this id; raises :class:`UnknownKeyError`."""
        k = self._extra_by_id.get(keyid)
        if k is not None:
            return k
        try:
            return self.root.get(keyid)
        except UnknownKeyError:
            raise UnknownKeyError(
                f"key {keyid[:16]} is not in the trust root or registered by a key receipt"
            ) from None

    def authorize(self, keyid: str, kind: str, at: datetime) -> TrustedKey:
        """The key ``keyid`` of this state, once :func:`check_key_policy` says it may sign
        ``kind`` receipts at ``at``; raises :class:`UnknownKeyError`, :class:`RoleError` or
        :class:`KeyValidityError`."""
        return check_key_policy(self.get(keyid), kind, at)

    def admit(self, envelope: Envelope | bytes, integrated_at: datetime) -> TrustState:
        """The state after the key receipt ``envelope``, integrated at that time, once it
        is checked against this state: one signature, by a known key whose role may sign
        ``key`` receipts and that is valid at ``integrated_at``; then :meth:`apply`.

        Raises the specific :class:`~kolm_ledger.errors.KolmError` (the state is unchanged).
        """
        b = _Builder(self)
        b.admit(envelope, integrated_at)
        return b.build()

    def apply(self, statement: Statement, integrated_at: datetime) -> TrustState:
        """The state after ``statement`` (a validated ``key`` receipt) integrated at that time.

        Raises :class:`StatementFormatError` for a malformed predicate, and
        :class:`KeyValidityError` (``FAILED_PRECONDITION``) for a ``register`` or
        ``rotate`` that names a revoked key id: a revoked key never becomes valid again.
        """
        if statement.kind != "key":
            return self
        b = _Builder(self)
        b.apply(statement, integrated_at)
        return b.build()


def check_key_policy(key: TrustedKey, kind: str, at: datetime) -> TrustedKey:
    """The key policy — may this key sign this kind at this time — returning ``key``.

    Its role may sign ``kind`` receipts (:data:`~kolm_ledger.keys.ROLE_KINDS`, else
    :class:`~kolm_ledger.errors.RoleError`), and at ``at`` it is valid: not before its
    ``not_before``, not after its ``not_after``, not at or after its revocation
    (:class:`~kolm_ledger.errors.KeyValidityError`). The one copy of the rule: the
    ledger at append and again at integration, the audit, offline ``verify_bundle``
    (step 4), the provenance check, the key-receipt fold and the compile pre-flight
    all ask it (most through :meth:`TrustState.authorize`).
    """
    key.check_may_sign(kind)
    key.check_valid_at(at)
    return key


class _Builder:
    """A trust state being folded (mutable; linear in the receipts folded). Every check of
    a receipt runs before its first change, so a refused receipt changes nothing."""

    def __init__(self, state: TrustState) -> None:
        self._root = state.root
        self._root_keys: dict[str, TrustedKey] = {k.keyid: k for k in state.root.keys}
        self._extra: dict[str, TrustedKey] = dict(state._extra_by_id)
        self._root_changed = False

    def get(self, keyid: str) -> TrustedKey:
        k = self._extra.get(keyid) or self._root_keys.get(keyid)
        if k is None:
            raise UnknownKeyError(
                f"key {keyid[:16]} is not in the trust root or registered by a key receipt"
            )
        return k

    def _put(self, key: TrustedKey) -> None:
        if key.keyid in self._root_keys:
            self._root_keys[key.keyid] = key
            self._root_changed = True
        else:
            self._extra[key.keyid] = key

    def build(self) -> TrustState:
        root = TrustRoot(tuple(self._root_keys.values())) if self._root_changed else self._root
        return TrustState(root, tuple(self._extra.values()))

    def admit(self, envelope: Envelope | bytes, integrated_at: datetime) -> None:
        """:meth:`TrustState.admit`, in place."""
        env = envelope if isinstance(envelope, Envelope) else Envelope.from_bytes(envelope)
        st = Statement.from_envelope(env)
        if st.kind != "key":
            raise StatementFormatError(f"a {st.kind!r} receipt is not a key receipt")
        if len(env.signatures) != 1:
            raise StatementFormatError(f"key receipt has {len(env.signatures)} signatures, want 1")
        signer = self.get(env.signatures[0].keyid)
        verify_signature(env, signer.public_key)
        check_key_policy(signer, "key", integrated_at)
        self.apply(st, integrated_at)

    def apply(self, statement: Statement, integrated_at: datetime) -> None:
        """:meth:`TrustState.apply`, in place."""
        p = statement.predicate
        # the predicate is arbitrary (signed) JSON: check types before use, so a bad key
        # receipt raises StatementFormatError and never a foreign error
        for f in ("action", "keyid", "role", "effective_at"):
            if not isinstance(p[f], str):
                raise StatementFormatError(
                    f"key receipt {f}: want a string, got {type(p[f]).__name__}"
                )
        action, keyid, role = p["action"], p["keyid"], p["role"]
        if action not in ("register", "rotate", "revoke"):
            raise StatementFormatError(
                f"key receipt action {action[:20]!r}, want register, rotate or revoke"
            )
        effective = max(_time(p["effective_at"], "effective_at"), integrated_at)
        if action == "revoke":
            k = self.get(keyid)
            if k.revoked_at is None or k.revoked_at > effective:
                self._put(replace(k, revoked_at=effective))
            return
        if role not in ROLES or role == "log":
            raise StatementFormatError(f"key receipt role {role[:20]!r} cannot be registered")
        have = self._extra.get(keyid) or self._root_keys.get(keyid)
        if have is not None and have.revoked_at is not None:
            raise KeyValidityError(
                f"key {keyid[:16]} ({have.role}) was revoked at {format_time(have.revoked_at)}; "
                f"a revoked key id cannot be registered again (key receipt action {action!r})"
            )
        pem = p["public_key_pem"]
        if not isinstance(pem, str):
            raise StatementFormatError("key receipt public_key_pem: want a PEM string")
        try:
            pub = PublicKey.from_pem(pem)
        except (KeyFormatError, UnicodeError) as e:
            raise StatementFormatError(f"key receipt public_key_pem: {e}") from e
        if pub.keyid() != keyid:
            raise StatementFormatError("key receipt keyid does not match its public key")
        not_after = p.get("not_after")
        replaces = p.get("replaces")
        if replaces is not None and not isinstance(replaces, str):
            raise StatementFormatError("key receipt replaces: want a key id string")
        key = TrustedKey(
            KeyID(keyid),
            cast(Role, role),
            pub.algorithm,
            pub,
            effective,
            None if not_after is None else _time(not_after, "not_after"),
        )
        old = self.get(replaces) if action == "rotate" and replaces else None
        self._put(key)
        if old is not None:
            old = self.get(old.keyid)  # the new key itself, when it replaces itself
            if old.revoked_at is None or old.revoked_at > effective:
                self._put(replace(old, revoked_at=effective))


def _time(value: object, field: str) -> datetime:
    """A key receipt's RFC 3339 time field; raises :class:`StatementFormatError`."""
    try:
        return parse_time(value, f"key receipt {field}")
    except (TrustRootFormatError, OverflowError) as e:
        raise StatementFormatError(f"key receipt {field}: {e}") from e


# --------------------------------------------------------------------------- proving entries


class EntrySource(Protocol):
    """What :func:`prove_entries` reads proofs from: a
    :class:`~kolm_ledger.storage.Store` (``latest_checkpoint`` + ``inclusion_proof``) or a
    :class:`~kolm_ledger.service.client.LedgerClient` (``inclusion_proof(index=...)``)."""

    def inclusion_proof(self, *args: Any, **kwargs: Any) -> Any: ...


def prove_entries(
    entries: Iterable[Entry],
    source: EntrySource,
    trust: TrustRoot,
    *,
    origin: str | None = None,
) -> list[Entry]:
    """Prove that each entry — its envelope *and its integration time* — is the one the
    log's signed checkpoint holds at its index; returns the entries.

    For each: the leaf is recomputed from the stored envelope and ``integrated_at``
    (:func:`kolm_ledger.formats.leaf.entry_leaf_hash`), and an inclusion proof from ``source``
    links it to the root of a checkpoint signed by a trusted log key (for ``origin``).
    So a time moved in the database (a revocation pushed to 2100) or a server's made-up
    time is refused, not folded. Readers of key receipts (the trust-state fold) call
    this before judging keys at those times. Raises
    :class:`~kolm_ledger.errors.InclusionProofError` naming the entry, or the
    checkpoint's error.
    """
    out = list(entries)
    if not out:
        return out
    if hasattr(source, "latest_checkpoint"):  # a ledger database
        stored = source.latest_checkpoint()
        if stored is None:
            raise CheckpointError("the ledger has no signed checkpoint to prove entries against")
        cp = verify_checkpoint(stored.note, trust, origin=origin).checkpoint
        for e in out:
            prove_entry(e, cp, lambda i: source.inclusion_proof(i, cp.size))
        return out
    # a ledger service: one proof per entry, all against the checkpoint of the first
    # (its note verified once)
    size = 0
    verified: dict[bytes, Checkpoint] = {}
    for e in out:
        r = source.inclusion_proof(index=e.index, tree_size=size)
        note = bytes(r.checkpoint)
        got = verified.get(note)
        if got is None:
            got = verified[note] = verify_checkpoint(note, trust, origin=origin).checkpoint
        size = size or got.size
        cp = got

        def given(_i: int, hashes: Sequence[bytes] = tuple(r.hashes)) -> Sequence[bytes]:
            return hashes

        prove_entry(e, cp, given)
    return out


def prove_entry(e: Entry, cp: Checkpoint, proof: Callable[[int], Sequence[bytes]]) -> None:
    """:func:`prove_entries` for one entry against ``cp`` (already verified); ``proof(i)``
    gives the inclusion proof of index ``i`` in the tree of ``cp.size``."""
    where = f"entry {e.index} ({e.kind}, integrated {e.integrated_at.isoformat()})"
    if e.index >= cp.size:
        raise InclusionProofError(f"{where} is not covered by the checkpoint of size {cp.size}")
    try:
        leaf = entry_leaf_hash(e.envelope, micros(e.integrated_at))
        hashes = proof(e.index)
        verify_inclusion(e.index, cp.size, leaf, hashes, cp.root)
    except KolmError as err:
        raise InclusionProofError(
            f"{where}: its envelope and integration time are not what the signed checkpoint "
            f"of size {cp.size} holds at that index ({err})"
        ) from err


# --------------------------------------------------------------------------- the fold


class KeySource(Protocol):
    """What :func:`key_receipt_entries` reads: a :class:`~kolm_ledger.storage.Store` or a
    :class:`~kolm_ledger.service.client.LedgerClient` (both page with ``after_index``)."""

    def find(
        self, *, kind: str | None = ..., after_index: int = ..., limit: int = ...
    ) -> Sequence[Entry]: ...


def key_receipt_entries(
    source: KeySource, *, after_index: int = -1, page: int = KEY_PAGE
) -> Iterator[Entry]:
    """Every ``key`` entry of ``source`` after ``after_index``, in index order, page by page
    (``find`` returns at most ``page`` a call; a short page is the last)."""
    after = after_index
    while True:
        got = source.find(kind="key", after_index=after, limit=page)
        yield from got
        if len(got) < page:
            return
        after = got[-1].index


def _log_refused(e: Entry, err: KolmError) -> None:
    log.warning("ignoring key receipt %d: %s", e.index, err)


def fold_key_receipts(
    trust: TrustRoot | TrustState,
    entries: Iterable[Entry],
    *,
    refused: Callable[[Entry, KolmError], None] = _log_refused,
) -> TrustState:
    """``trust`` (a root, or a state to continue from) after the key receipts ``entries``,
    in order: each is checked against the state so far and applied
    (:meth:`TrustState.admit`, at the entry's integration time).

    A receipt that does not pass — not signed by a valid ``admin`` key of the state, bad
    signature, malformed, or registering a revoked key id — changes nothing; ``refused``
    hears of it (default: a warning in the log).
    """
    b = _Builder(trust if isinstance(trust, TrustState) else TrustState(trust))
    for e in entries:
        try:
            b.admit(e.envelope, e.integrated_at)
        except KolmError as err:
            refused(e, err)
    return b.build()


def ledger_trust_state(source: KeySource, trust: TrustRoot) -> TrustState:
    """The trust root plus *every* key receipt of the ledger database or service, each
    first proven to be the log's, integration time included
    (:func:`prove_entries`; raises
    :class:`~kolm_ledger.errors.InclusionProofError` naming an entry whose stored time or
    envelope is not what the signed checkpoint holds)."""
    entries = prove_entries(key_receipt_entries(source), cast(Any, source), trust)
    return fold_key_receipts(trust, entries)
