"""Keys, key ids and the trust root.

Producers (``admin``, ``compile``, ``infer``) sign receipts with ECDSA P-256 by
default (Ed25519 accepted); the ``log`` key signs checkpoints with Ed25519.

The trust root is a JSON file other tools read, exactly::

    {"version": 1, "keys": [{"keyid", "role", "algorithm", "public_key_pem",
                             "not_before", "not_after", "origin"}]}

``origin`` is set for log keys only (the checkpoint origin line).

Example::

    >>> from kolm_ledger.keys import PrivateKey, TrustRoot, TrustedKey
    >>> k = PrivateKey.generate()
    >>> root = TrustRoot((TrustedKey.for_key(k.public_key(), "compile"),))
    >>> root.get(k.keyid()).role
    'compile'
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, NewType, cast

from kolm_ledger._crypto import ALGORITHMS, Algorithm, PrivateKey, PublicKey
from kolm_ledger.errors import (
    KeyFormatError,
    KeyValidityError,
    RoleError,
    TrustRootFormatError,
    UnknownKeyError,
)
from kolm_ledger.timefmt import format_time, parse_rfc3339

__all__ = [
    "ROLES",
    "ROLE_KINDS",
    "Algorithm",
    "KeyID",
    "PrivateKey",
    "PublicKey",
    "Role",
    "TrustRoot",
    "TrustedKey",
    "format_time",
    "init_keys",
    "parse_time",
]

KeyID = NewType("KeyID", str)
Role = Literal["admin", "compile", "infer", "log"]
ROLES: tuple[Role, ...] = ("admin", "compile", "infer", "log")

#: Which receipt kinds each producer role may sign.
ROLE_KINDS: dict[str, frozenset[str]] = {
    "admin": frozenset({"key"}),
    "compile": frozenset({"label", "eval", "artifact"}),
    "infer": frozenset({"prediction"}),
    "log": frozenset(),
}

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def parse_time(s: object, what: str) -> datetime:
    """Parse an RFC 3339 timestamp with an explicit offset (the one strict parser,
    :func:`kolm_ledger.timefmt.parse_rfc3339`); raises :class:`TrustRootFormatError`
    naming ``what``."""
    return parse_rfc3339(s, what, TrustRootFormatError)


@dataclass(frozen=True)
class TrustedKey:
    """One entry of the trust root."""

    keyid: KeyID
    role: Role
    algorithm: Algorithm
    public_key: PublicKey
    not_before: datetime
    not_after: datetime | None = None
    origin: str | None = None
    revoked_at: datetime | None = None  # set from key receipts in the ledger, never from the file

    @classmethod
    def for_key(
        cls,
        public_key: PublicKey,
        role: Role,
        *,
        not_before: datetime = _EPOCH,
        not_after: datetime | None = None,
        origin: str | None = None,
    ) -> TrustedKey:
        """Build an entry for ``public_key``."""
        if role not in ROLES:
            raise TrustRootFormatError(f"role {role!r} is not one of {ROLES}")
        if role == "log" and not origin:
            raise TrustRootFormatError("log keys need an origin")
        return cls(
            KeyID(public_key.keyid()),
            role,
            public_key.algorithm,
            public_key,
            not_before,
            not_after,
            origin if role == "log" else None,
        )

    def check_valid_at(self, t: datetime) -> None:
        """Raise :class:`KeyValidityError` unless the key is valid (and unrevoked) at ``t``."""
        if t < self.not_before:
            raise KeyValidityError(
                f"key {self.keyid[:16]} ({self.role}) is not valid before "
                f"{format_time(self.not_before)}; time is {format_time(t)}"
            )
        if self.not_after is not None and t > self.not_after:
            raise KeyValidityError(
                f"key {self.keyid[:16]} ({self.role}) expired at "
                f"{format_time(self.not_after)}; time is {format_time(t)}"
            )
        if self.revoked_at is not None and t >= self.revoked_at:
            raise KeyValidityError(
                f"key {self.keyid[:16]} ({self.role}) was revoked at "
                f"{format_time(self.revoked_at)}; time is {format_time(t)}"
            )

    def check_may_sign(self, kind: str) -> None:
        """Raise :class:`RoleError` unless this key's role may sign receipts of ``kind``."""
        if kind not in ROLE_KINDS[self.role]:
            allowed = sorted(r for r, kinds in ROLE_KINDS.items() if kind in kinds)
            raise RoleError(
                f"key {self.keyid[:16]} has role {self.role!r}, which may not sign {kind!r} "
                f"receipts (allowed: {', '.join(allowed) or 'none'})"
            )

    def to_json(self) -> dict[str, Any]:
        """The trust-root JSON object for this key."""
        return {
            "keyid": self.keyid,
            "role": self.role,
            "algorithm": self.algorithm,
            "public_key_pem": self.public_key.pem(),
            "not_before": format_time(self.not_before),
            "not_after": format_time(self.not_after) if self.not_after else None,
            "origin": self.origin,
        }

    @classmethod
    def from_json(cls, obj: object, where: str) -> TrustedKey:
        """Parse one trust-root key object; errors name ``where`` and the field."""
        if not isinstance(obj, dict):
            raise TrustRootFormatError(f"{where}: want an object, got {type(obj).__name__}")
        want = {"keyid", "role", "algorithm", "public_key_pem", "not_before", "not_after", "origin"}
        missing = sorted(want - {"not_after", "origin"} - obj.keys())
        if missing:
            raise TrustRootFormatError(f"{where}: missing field(s) {', '.join(missing)}")
        unknown = sorted(obj.keys() - want)
        if unknown:
            raise TrustRootFormatError(f"{where}: unknown field(s) {', '.join(unknown)}")
        role = obj["role"]
        if role not in ROLES:
            raise TrustRootFormatError(f"{where}.role: {role!r} is not one of {list(ROLES)}")
        alg = obj["algorithm"]
        if alg not in ALGORITHMS:
            raise TrustRootFormatError(
                f"{where}.algorithm: {alg!r} is not one of {list(ALGORITHMS)}"
            )
        pem = obj["public_key_pem"]
        if not isinstance(pem, str):
            raise TrustRootFormatError(f"{where}.public_key_pem: want a PEM string")
        try:
            pub = PublicKey.from_pem(pem)
        except KeyFormatError as e:
            raise TrustRootFormatError(f"{where}.public_key_pem: {e}") from e
        if pub.algorithm != alg:
            raise TrustRootFormatError(
                f"{where}.algorithm: says {alg!r} but the public key is {pub.algorithm!r}"
            )
        if obj["keyid"] != pub.keyid():
            raise TrustRootFormatError(
                f"{where}.keyid: {str(obj['keyid'])[:16]}... does not match the public key "
                f"({pub.keyid()[:16]}...)"
            )
        origin = obj.get("origin")
        if role == "log":
            if not isinstance(origin, str) or not origin or "\n" in origin:
                raise TrustRootFormatError(f"{where}.origin: log keys need a one-line origin")
            if alg != "ed25519":
                raise TrustRootFormatError(f"{where}.algorithm: log keys must be ed25519")
        elif origin is not None:
            raise TrustRootFormatError(f"{where}.origin: only log keys have an origin")
        not_before = parse_time(obj["not_before"], f"{where}.not_before")
        nb = obj.get("not_after")
        not_after = None if nb is None else parse_time(nb, f"{where}.not_after")
        return cls(
            KeyID(pub.keyid()),
            cast(Role, role),
            cast(Algorithm, alg),
            pub,
            not_before,
            not_after,
            origin,
        )


@dataclass(frozen=True)
class TrustRoot:
    """The set of trusted public keys, by key id."""

    keys: tuple[TrustedKey, ...]

    def __post_init__(self) -> None:
        ids = [k.keyid for k in self.keys]
        if len(set(ids)) != len(ids):
            raise TrustRootFormatError("trust root lists the same keyid twice")

    @functools.cached_property
    def _by_id(self) -> dict[str, TrustedKey]:
        return {k.keyid: k for k in self.keys}

    def get(self, keyid: str) -> TrustedKey:
        """The key with this id; raises :class:`UnknownKeyError`."""
        k = self._by_id.get(keyid)
        if k is None:
            raise UnknownKeyError(f"key {keyid[:16]} is not in the trust root")
        return k

    def by_role(self, role: Role) -> list[TrustedKey]:
        """All keys with ``role``."""
        return [k for k in self.keys if k.role == role]

    def log_keys(self, origin: str | None = None) -> list[TrustedKey]:
        """Log keys, optionally only those for ``origin``."""
        return [k for k in self.by_role("log") if origin is None or k.origin == origin]

    def with_key(self, key: TrustedKey) -> TrustRoot:
        """A copy with ``key`` added or replaced (same key id)."""
        return TrustRoot((*(k for k in self.keys if k.keyid != key.keyid), key))

    def revoke(self, keyid: str, at: datetime) -> TrustRoot:
        """A copy where ``keyid`` is revoked from ``at`` on."""
        k = self.get(keyid)
        return self.with_key(replace(k, revoked_at=at))

    def to_json(self) -> dict[str, Any]:
        """The trust-root JSON object."""
        return {"version": 1, "keys": [k.to_json() for k in self.keys]}

    def to_bytes(self) -> bytes:
        """Pretty, deterministic JSON."""
        return (json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> TrustRoot:
        """Parse trust-root JSON; raises :class:`TrustRootFormatError` naming the field."""
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise TrustRootFormatError(f"trust root is not JSON: {e}") from e
        if not isinstance(obj, dict):
            raise TrustRootFormatError("trust root: want a JSON object")
        if obj.get("version") != 1:
            raise TrustRootFormatError(f"trust root version: {obj.get('version')!r}, want 1")
        unknown = sorted(obj.keys() - {"version", "keys"})
        if unknown:
            raise TrustRootFormatError(f"trust root: unknown field(s) {', '.join(unknown)}")
        keys = obj.get("keys")
        if not isinstance(keys, list):
            raise TrustRootFormatError("trust root keys: want a list")
        return cls(tuple(TrustedKey.from_json(k, f"keys[{i}]") for i, k in enumerate(keys)))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TrustRoot:
        """Read a trust-root file."""
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise TrustRootFormatError(f"cannot read trust root {path}: {e.strerror}") from e
        return cls.from_bytes(data)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the trust-root file."""
        Path(path).write_bytes(self.to_bytes())


def init_keys(
    directory: str | os.PathLike[str],
    *,
    origin: str = "kolm.dev/ledger",
    now: datetime | None = None,
    roles: Iterable[Role] = ROLES,
) -> TrustRoot:
    """Create ``<role>.key``/``<role>.pub`` for each role and ``trust.json`` in ``directory``.

    Producer keys are ECDSA P-256; the log key is Ed25519 (signed-note). Refuses to
    overwrite an existing key file. ``origin`` is the log's checkpoint origin and its
    signed-note key name, so it must be a valid note key name (non-empty; no whitespace,
    ``+`` or control character: :func:`kolm_ledger.formats.note.check_key_name`); checked before
    anything is written.
    """
    from kolm_ledger.formats.note import check_key_name

    roles = tuple(roles)
    if "log" in roles:
        check_key_name(origin, "origin (the log's signed-note key name)", KeyFormatError)
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    t = (now or datetime.now(UTC)).replace(microsecond=0)
    entries: list[TrustedKey] = []
    for role in roles:
        priv_path = d / f"{role}.key"
        if priv_path.exists():
            raise KeyFormatError(f"{priv_path} exists; refusing to overwrite a key")
        key = PrivateKey.generate("ed25519" if role == "log" else "ecdsa-p256-sha256")
        key.save(priv_path)
        (d / f"{role}.pub").write_text(key.public_key().pem())
        entries.append(
            TrustedKey.for_key(
                key.public_key(), role, not_before=t, origin=origin if role == "log" else None
            )
        )
    root = TrustRoot(tuple(entries))
    root.save(d / "trust.json")
    return root
