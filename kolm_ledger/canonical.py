"""RFC 8785 (JCS) canonical JSON and the digests built on it.

Example::

    >>> from kolm_ledger.canonical import canonical_json, digest_hex
    >>> canonical_json({"b": 1, "a": [True, None]})
    b'{"a":[true,null],"b":1}'
"""

from __future__ import annotations

import hashlib
from typing import Any

import rfc8785

from .errors import FormatError

__all__ = ["canonical_json", "digest_hex", "sha256_hex"]


def canonical_json(obj: Any) -> bytes:
    """RFC 8785 canonical JSON bytes; raises :class:`FormatError` for unrepresentable values."""
    try:
        return rfc8785.dumps(obj)
    except (rfc8785.CanonicalizationError, TypeError, ValueError) as e:
        raise FormatError(f"value cannot be canonicalized as RFC 8785 JSON: {e}") from e


def sha256_hex(data: bytes) -> str:
    """Lowercase hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def digest_hex(obj: Any) -> str:
    """Lowercase hex SHA-256 of the canonical JSON of ``obj``."""
    return sha256_hex(canonical_json(obj))
