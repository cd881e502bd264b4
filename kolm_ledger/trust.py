"""The ledger's trust state: the trust root plus the ``key`` receipts in the log.

An admin key registers, rotates and revokes producer keys by appending ``key``
receipts. Each takes effect at ``max(effective_at, integration time)`` — a
receipt cannot back-date a revocation to before the log saw it, so receipts
signed (and integrated) before a revocation stay valid, and ones after it are
refused at append and flagged by the audit.

Example::

    >>> from kolm_ledger.keys import TrustRoot
    >>> TrustState(TrustRoot(())).keys()
    []
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from typing import cast

from ._crypto import PublicKey
from .errors import KeyFormatError, StatementFormatError, UnknownKeyError
from .keys import ROLES, KeyID, Role, TrustedKey, TrustRoot, parse_time
from .receipts import Statement

__all__ = ["TrustState"]


@dataclass(frozen=True)
class TrustState:
    """An immutable view of which keys are trusted, and until when."""

    root: TrustRoot
    extra: tuple[TrustedKey, ...] = ()

    def keys(self) -> list[TrustedKey]:
        """Every key known (from the root and from key receipts)."""
        return [*self.root.keys, *self.extra]

    def get(self, keyid: str) -> TrustedKey:
        """The key with this id; raises :class:`UnknownKeyError`."""
        for k in self.extra:
            if k.keyid == keyid:
                return k
        try:
            return self.root.get(keyid)
        except UnknownKeyError:
            raise UnknownKeyError(
                f"key {keyid[:16]} is not in the trust root or registered by a key receipt"
            ) from None

    def _with(self, key: TrustedKey) -> TrustState:
        if any(k.keyid == key.keyid for k in self.root.keys):
            return TrustState(self.root.with_key(key), self.extra)
        return TrustState(self.root, (*(k for k in self.extra if k.keyid != key.keyid), key))

    def apply(self, statement: Statement, integrated_at: datetime) -> TrustState:
        """The state after ``statement`` (a validated ``key`` receipt) integrated at that time."""
        if statement.kind != "key":
            return self
        p = statement.predicate
        try:
            effective = max(parse_time(p["effective_at"], "key.effective_at"), integrated_at)
        except KeyFormatError as e:  # pragma: no cover - parse_time raises TrustRootFormatError
            raise StatementFormatError(str(e)) from e
        action, keyid, role = p["action"], p["keyid"], p["role"]
        if action == "revoke":
            k = self.get(keyid)
            if k.revoked_at is not None and k.revoked_at <= effective:
                return self
            return self._with(replace(k, revoked_at=effective))
        if role not in ROLES or role == "log":
            raise StatementFormatError(f"key receipt role {role!r} cannot be registered")
        pub = PublicKey.from_pem(p["public_key_pem"])
        if pub.keyid() != keyid:
            raise StatementFormatError("key receipt keyid does not match its public key")
        not_after = p.get("not_after")
        key = TrustedKey(
            KeyID(keyid),
            cast(Role, role),
            pub.algorithm,
            pub,
            effective,
            None if not_after is None else parse_time(not_after, "key.not_after"),
        )
        state = self._with(key)
        if action == "rotate" and p.get("replaces"):
            old = state.get(str(p["replaces"]))
            state = state._with(replace(old, revoked_at=effective))
        return state
