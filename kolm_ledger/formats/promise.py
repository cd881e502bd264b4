"""The log's signed promise to include an entry, and its file form.

The ledger answers an append before the entry is covered by a checkpoint with a
*promise*: ``Ed25519(log key, promise_message(origin, index, leaf_hash, integrated_time))``.
``kolm predict --out`` without ``--wait`` saves it with the envelope as a *promise file*::

    {"envelope": {...DSSE...},
     "promise": {"origin": "...", "index": N, "leaf_hash": "<64 hex>",
                 "integrated_time_us": T, "key_id": "<8 hex: the note key id>",
                 "signature": "<hex>"}}

``kolm verify FILE --ledger HOST:PORT`` fetches the entry by ``leaf_hash`` and checks that
the log kept the promise. This module is a format: no server code, no I/O.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

from kolm_ledger._crypto import PublicKey
from kolm_ledger.errors import InvalidInput, SignatureError

__all__ = ["Promise", "promise_message", "verify_promise"]

_FIELDS = frozenset({"origin", "index", "leaf_hash", "integrated_time_us", "key_id", "signature"})


def promise_message(origin: str, index: int, leaf_hash: bytes, integrated_us: int) -> bytes:
    """The bytes a signed promise covers."""
    return (
        f"kolm.promise/v1\n{origin}\n{index}\n{base64.b64encode(leaf_hash).decode()}\n"
        f"{integrated_us}\n"
    ).encode()


@dataclass(frozen=True)
class Promise:
    """The log's signed promise to include an entry."""

    origin: str
    index: int
    leaf_hash: bytes
    integrated_time_us: int
    key_id: str
    signature: bytes

    def to_json(self) -> dict[str, Any]:
        """The ``promise`` object of a promise file (bytes as lowercase hex)."""
        return {
            "origin": self.origin,
            "index": self.index,
            "leaf_hash": self.leaf_hash.hex(),
            "integrated_time_us": self.integrated_time_us,
            "key_id": self.key_id,
            "signature": self.signature.hex(),
        }

    @classmethod
    def from_json(cls, obj: object, where: str = "promise") -> Promise:
        """Parse :meth:`to_json`'s form strictly; errors name the field."""
        if not isinstance(obj, dict):
            raise InvalidInput(f"{where}: want an object, got {type(obj).__name__}")
        if set(obj) != _FIELDS:
            missing, extra = sorted(_FIELDS - set(obj)), sorted(set(obj) - _FIELDS)
            raise InvalidInput(
                f"{where}: want exactly the fields {', '.join(sorted(_FIELDS))}"
                + (f"; missing {', '.join(missing)}" if missing else "")
                + (f"; unknown {', '.join(map(str, extra))[:200]}" if extra else "")
            )
        for f in ("index", "integrated_time_us"):
            if type(obj[f]) is not int or obj[f] < 0:
                raise InvalidInput(f"{where}.{f}: want a non-negative integer")
        origin = obj["origin"]
        if not isinstance(origin, str) or not origin or "\n" in origin:
            raise InvalidInput(f"{where}.origin: want the log's one-line origin")

        def hexfield(f: str, n: int | None) -> bytes:
            v = obj[f]
            if not isinstance(v, str) or (n is not None and len(v) != 2 * n):
                raise InvalidInput(f"{where}.{f}: want {n or 'some'} bytes as lowercase hex")
            try:
                b = bytes.fromhex(v)
            except ValueError:
                b = b""
            if not b or b.hex() != v:
                raise InvalidInput(f"{where}.{f}: want lowercase hex, got {v[:20]!r}")
            return b

        hexfield("key_id", 4)
        return cls(
            origin,
            obj["index"],
            hexfield("leaf_hash", 32),
            obj["integrated_time_us"],
            obj["key_id"],
            hexfield("signature", None),
        )


def verify_promise(p: Promise, log_key: PublicKey) -> None:
    """Verify a promise against the log's public key; raises :class:`SignatureError`."""
    try:
        log_key.verify(
            p.signature, promise_message(p.origin, p.index, p.leaf_hash, p.integrated_time_us)
        )
    except SignatureError as e:
        raise SignatureError(f"signed promise for index {p.index} does not verify") from e
