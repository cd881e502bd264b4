"""Offline receipt bundles: what a downstream system keeps to verify a receipt later.

A bundle is a JSON object with exactly three fields::

    {
      "envelope": <the DSSE envelope JSON object>,
      "integrated_time": <integer: µs since the epoch, UTC, when the log integrated it>,
      "tlog_proof": "<C2SP tlog-proof text: index, inclusion hashes, signed checkpoint>"
    }

stored with the file extension ``.kolm-receipt.json``. It verifies with no network
and no kolm server (:func:`kolm_ledger.verify.receipt.verify_bundle`). The entry's leaf hash is
recomputed from ``envelope`` and ``integrated_time`` together
(:func:`kolm_ledger.formats.leaf.entry_leaf_hash`), so the inclusion proof under the signed
checkpoint proves the integration time too.

Example::

    >>> import json
    >>> from kolm_ledger.formats.bundle import Bundle
    >>> from kolm_ledger.errors import BundleFormatError
    >>> try:
    ...     Bundle.from_bytes(b'{"envelope": {}}')
    ... except BundleFormatError as e:
    ...     print(e)
    bundle: missing field(s) integrated_time, tlog_proof
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kolm_ledger.errors import BundleFormatError, FormatError
from kolm_ledger.formats.dsse import Envelope
from kolm_ledger.formats.leaf import MAX_INTEGRATED_TIME_US
from kolm_ledger.formats.tlogproof import TlogProof

if TYPE_CHECKING:
    from kolm_ledger.storage import Store

__all__ = ["FILE_EXTENSION", "MAX_BUNDLE_BYTES", "Bundle"]

#: File extension of saved bundles.
FILE_EXTENSION = ".kolm-receipt.json"
#: Bundles larger than this are refused before parsing.
MAX_BUNDLE_BYTES = 4 << 20

_FIELDS = frozenset({"envelope", "integrated_time", "tlog_proof"})


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for k, v in pairs:
        if k in obj:
            raise BundleFormatError(f"bundle: duplicate JSON key {k[:40]!r}")
        obj[k] = v
    return obj


@dataclass(frozen=True)
class Bundle:
    """A DSSE receipt envelope, its integration time (µs since the epoch) and the
    tlog-proof of the entry's inclusion in the ledger."""

    envelope: Envelope
    tlog_proof: TlogProof
    integrated_time: int

    def to_json(self) -> dict[str, Any]:
        """The bundle JSON object."""
        return {
            "envelope": self.envelope.to_json(),
            "integrated_time": self.integrated_time,
            "tlog_proof": self.tlog_proof.to_text(),
        }

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
        t = obj["integrated_time"]
        if type(t) is not int or not 0 <= t <= MAX_INTEGRATED_TIME_US:
            raise BundleFormatError(
                f"bundle.integrated_time: {str(t)[:40]!r}, want an integer number of "
                f"microseconds since the epoch in [0, {MAX_INTEGRATED_TIME_US}]"
            )
        text = obj["tlog_proof"]
        if not isinstance(text, str):
            raise BundleFormatError(
                f"bundle.tlog_proof: want a tlog-proof string, got {type(text).__name__}"
            )
        try:
            proof = TlogProof.from_text(text)
        except FormatError as e:
            raise BundleFormatError(f"bundle.tlog_proof: {e}") from e
        return cls(envelope, proof, t)

    @classmethod
    def from_store(cls, store: Store, index: int, size: int | None = None) -> Bundle:
        """The bundle of entry ``index`` of a ledger database, against its checkpoint of
        ``size`` (default: the newest); raises :class:`NotFoundError` when none covers it."""
        from kolm_ledger.errors import InvalidInput, NotFoundError
        from kolm_ledger.timefmt import micros

        if index < 0:
            raise InvalidInput(f"index {index} is negative")
        entry = store.get_entry(index)
        cp = store.latest_checkpoint() if size is None else store.checkpoint_at(size)
        if cp is None or cp.size <= index:
            raise NotFoundError(f"no checkpoint covers index {index} yet")
        proof = store.inclusion_proof(index, cp.size, check_size=False)
        return cls(
            Envelope.from_bytes(entry.envelope),
            TlogProof(index, tuple(proof), cp.note),
            micros(entry.integrated_at),
        )

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
