"""Offline receipt bundles: what a downstream system keeps to verify a receipt later.

A bundle is a JSON object with exactly two fields::

    {
      "envelope": <the DSSE envelope JSON object>,
      "tlog_proof": "<C2SP tlog-proof text: index, inclusion hashes, signed checkpoint>"
    }

stored with the file extension ``.kolm-receipt.json``. It verifies with no network
and no kolm server (:func:`kolm_ledger.verify.verify_bundle`).

Example::

    >>> import json
    >>> from kolm_ledger.bundle import Bundle
    >>> from kolm_ledger.errors import BundleFormatError
    >>> try:
    ...     Bundle.from_bytes(b'{"envelope": {}}')
    ... except BundleFormatError as e:
    ...     print(e)
    bundle: missing field(s) tlog_proof
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .dsse import Envelope
from .errors import BundleFormatError, FormatError
from .tlogproof import TlogProof

__all__ = ["FILE_EXTENSION", "MAX_BUNDLE_BYTES", "Bundle"]

#: File extension of saved bundles.
FILE_EXTENSION = ".kolm-receipt.json"
#: Bundles larger than this are refused before parsing.
MAX_BUNDLE_BYTES = 4 << 20

_FIELDS = frozenset({"envelope", "tlog_proof"})


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for k, v in pairs:
        if k in obj:
            raise BundleFormatError(f"bundle: duplicate JSON key {k[:40]!r}")
        obj[k] = v
    return obj


@dataclass(frozen=True)
class Bundle:
    """A DSSE receipt envelope and the tlog-proof of its inclusion in the ledger."""

    envelope: Envelope
    tlog_proof: TlogProof

    def to_json(self) -> dict[str, Any]:
        """The bundle JSON object."""
        return {"envelope": self.envelope.to_json(), "tlog_proof": self.tlog_proof.to_text()}

    @classmethod
    def from_json(cls, obj: object) -> Bundle:
        """Parse a bundle JSON object; raises :class:`BundleFormatError` naming the field."""
        if not isinstance(obj, dict):
            raise BundleFormatError(f"bundle: want a JSON object, got {type(obj).__name__}")
        missing = sorted(_FIELDS - obj.keys())
        if missing:
            raise BundleFormatError(f"bundle: missing field(s) {', '.join(missing)}")
        unknown = sorted(str(k)[:40] for k in obj.keys() - _FIELDS)
        if unknown:
            raise BundleFormatError(f"bundle: unknown field(s) {', '.join(unknown)}")
        try:
            envelope = Envelope.from_json(obj["envelope"])
            # the leaf hash is computed from the canonical form: it must exist
            envelope.canonical()
        except FormatError as e:
            raise BundleFormatError(f"bundle.envelope: {e}") from e
        text = obj["tlog_proof"]
        if not isinstance(text, str):
            raise BundleFormatError(
                f"bundle.tlog_proof: want a tlog-proof string, got {type(text).__name__}"
            )
        try:
            proof = TlogProof.from_text(text)
        except FormatError as e:
            raise BundleFormatError(f"bundle.tlog_proof: {e}") from e
        return cls(envelope, proof)

    def to_bytes(self) -> bytes:
        """Pretty JSON with sorted keys and a trailing newline (deterministic)."""
        return (json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n").encode("ascii")

    @classmethod
    def from_bytes(cls, data: bytes) -> Bundle:
        """Parse bundle JSON bytes; raises :class:`BundleFormatError`.

        The size limit is checked first; duplicate JSON keys are refused.
        """
        if len(data) > MAX_BUNDLE_BYTES:
            raise BundleFormatError(
                f"bundle is {len(data)} bytes, over the {MAX_BUNDLE_BYTES}-byte limit"
            )
        try:
            obj = json.loads(data, object_pairs_hook=_no_duplicate_keys)
        except (ValueError, UnicodeDecodeError) as e:
            raise BundleFormatError(f"bundle is not JSON: {e}") from e
        except RecursionError as e:
            raise BundleFormatError("bundle is not JSON: nested too deeply") from e
        return cls.from_json(obj)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`to_bytes` to ``path`` (by convention ending in ``.kolm-receipt.json``)."""
        Path(path).write_bytes(self.to_bytes())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Bundle:
        """Read and parse a bundle file; errors name the path."""
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise BundleFormatError(f"cannot read bundle {path}: {e.strerror}") from e
        try:
            return cls.from_bytes(data)
        except BundleFormatError as e:
            raise BundleFormatError(f"{path}: {e}") from e
