"""The Merkle leaf of a log entry (kolm log format v2) and the statement digest.

An entry is a DSSE envelope *and* the time the log integrated it, and the leaf binds
both, so the log key's checkpoint signature authenticates the integration time and an
offline bundle proves it::

    leaf_data  = JCS({"envelope": <DSSE envelope object>, "integrated_time": <µs>})
    leaf_hash  = SHA-256(0x00 || leaf_data)

``integrated_time`` is the integer number of microseconds since 1970-01-01T00:00:00Z
(0 <= t <= 2**53 - 1, so RFC 8785 writes it as plain decimal digits). Because JCS sorts
keys (``"envelope"`` before ``"integrated_time"``) and the envelope's canonical JSON is
already JCS, ``leaf_data`` is the byte concatenation ``{"envelope":`` + JCS(envelope) +
``,"integrated_time":`` + decimal + ``}`` — :func:`leaf_data` builds it so, and a test
holds it equal to the general encoder.

A leaf hash is therefore *not* a function of the envelope alone: take it from the
ledger (the Append result, an entry, a bundle), never recompute it from an envelope.

One statement, one entry: the log holds at most one entry per :func:`statement_digest`
``= SHA-256(PAE(payloadType, payload) || UTF-8(keyid))`` — what the DSSE signature covers
plus who signed it, and nothing of the signature bytes (PAE is self-delimiting, so the
key id is whatever follows it). Appending an envelope whose statement digest is in the
log answers with that entry, whatever its signature bytes.

Example::

    >>> from kolm_ledger.keys import PrivateKey
    >>> from kolm_ledger import dsse
    >>> env = dsse.sign(b'{}', dsse.IN_TOTO_PAYLOAD_TYPE, PrivateKey.generate())
    >>> leaf_data(env, 1_700_000_000_000_000).endswith(b',"integrated_time":1700000000000000}')
    True
    >>> len(entry_leaf_hash(env, 0))
    32
"""

from __future__ import annotations

import hashlib

from kolm_ledger.errors import InvalidInput
from kolm_ledger.formats.dsse import Envelope, pae

__all__ = [
    "LOG_FORMAT",
    "MAX_INTEGRATED_TIME_US",
    "chain_next",
    "entry_leaf_hash",
    "leaf_data",
    "statement_digest",
]

#: The log format this code writes and verifies (docs/FORMATS.md, "Log format").
LOG_FORMAT = "kolm log format v2"
#: Largest integration time (µs) a leaf can hold: an exact RFC 8785 (IEEE double) integer.
MAX_INTEGRATED_TIME_US = 2**53 - 1

_HEAD = b'{"envelope":'
_MID = b',"integrated_time":'


def _check_time(integrated_time_us: int) -> None:
    if type(integrated_time_us) is not int or not (
        0 <= integrated_time_us <= MAX_INTEGRATED_TIME_US
    ):
        raise InvalidInput(
            f"integrated_time {integrated_time_us!r}: want an integer number of microseconds "
            f"since the epoch in [0, {MAX_INTEGRATED_TIME_US}]"
        )


def leaf_data(envelope: Envelope | bytes, integrated_time_us: int) -> bytes:
    """``JCS({"envelope": envelope, "integrated_time": integrated_time_us})``.

    ``envelope``: an :class:`Envelope`, or its canonical JSON bytes (what the ledger
    stores; the caller vouches that they are canonical). Raises :class:`InvalidInput`
    for a time outside ``[0, 2**53 - 1]``.
    """
    _check_time(integrated_time_us)
    canonical = envelope.canonical() if isinstance(envelope, Envelope) else envelope
    return b"%b%b%b%d}" % (_HEAD, canonical, _MID, integrated_time_us)


def entry_leaf_hash(envelope: Envelope | bytes, integrated_time_us: int) -> bytes:
    """The RFC 6962 leaf hash of an entry: ``SHA-256(0x00 || leaf_data(...))``."""
    return hashlib.sha256(b"\x00" + leaf_data(envelope, integrated_time_us)).digest()


def statement_digest(envelope: Envelope) -> bytes:
    """``SHA-256(PAE(payloadType, payload) || UTF-8(keyid))`` of a one-signature envelope:
    the identity of a signed statement in the log (its signature bytes left out)."""
    if len(envelope.signatures) != 1:
        raise InvalidInput(
            f"a log entry has exactly one signature; this envelope has {len(envelope.signatures)}"
        )
    return hashlib.sha256(
        pae(envelope.payload_type, envelope.payload) + envelope.signatures[0].keyid.encode()
    ).digest()


def chain_next(prev: bytes, leaf_hash: bytes) -> bytes:
    """The hash chain's next link: ``chain[i] = SHA-256(0x02 || chain[i-1] || leaf_hash[i])``
    (the ledger extends it as it sequences; the audit recomputes it)."""
    return hashlib.sha256(b"\x02" + prev + leaf_hash).digest()
