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

import functools
from dataclasses import dataclass, replace
from datetime import datetime
from typing import cast

from ._crypto import PublicKey
from .errors import KeyFormatError, StatementFormatError, TrustRootFormatError, UnknownKeyError
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

    def _with(self, key: TrustedKey) -> TrustState:
        if any(k.keyid == key.keyid for k in self.root.keys):
            return TrustState(self.root.with_key(key), self.extra)
        return TrustState(self.root, (*(k for k in self.extra if k.keyid != key.keyid), key))

    def apply(self, statement: Statement, integrated_at: datetime) -> TrustState:
        """The state after ``statement`` (a validated ``key`` receipt) integrated at that time."""
        if statement.kind != "key":
            return self
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
            if k.revoked_at is not None and k.revoked_at <= effective:
                return self
            return self._with(replace(k, revoked_at=effective))
        if role not in ROLES or role == "log":
            raise StatementFormatError(f"key receipt role {role[:20]!r} cannot be registered")
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
        state = self._with(key)
        if action == "rotate" and replaces:
            old = state.get(replaces)
            state = state._with(replace(old, revoked_at=effective))
        return state


def _time(value: object, field: str) -> datetime:
    """A key receipt's RFC 3339 time field; raises :class:`StatementFormatError`."""
    try:
        return parse_time(value, f"key receipt {field}")
    except (TrustRootFormatError, OverflowError) as e:
        raise StatementFormatError(f"key receipt {field}: {e}") from e
