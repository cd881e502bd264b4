"""The kolm error hierarchy.

Every error kolm raises on purpose is a :class:`KolmError`. Each class declares
the gRPC status it maps to (``grpc_code``, a ``grpc.StatusCode`` member name, so
this module imports no transport); one server interceptor turns errors into
statuses through that table, and anything else becomes ``INTERNAL`` with a
generic message.

::

    KolmError                          INTERNAL
    ├── InvalidInput                   INVALID_ARGUMENT
    │   └── FormatError                INVALID_ARGUMENT   malformed bytes/text/JSON
    │       ├── EnvelopeFormatError
    │       ├── StatementFormatError
    │       ├── CheckpointFormatError
    │       ├── ProofFormatError
    │       ├── BundleFormatError
    │       ├── TrustRootFormatError
    │       ├── KeyFormatError
    │       └── SpecError                             a task spec field is wrong
    ├── VerificationError              INVALID_ARGUMENT   a check that should pass did not
    │   ├── SignatureError
    │   ├── InclusionProofError
    │   ├── ConsistencyProofError
    │   ├── ChainError
    │   ├── CheckpointError
    │   └── ArtifactError              FAILED_PRECONDITION
    ├── KeyPolicyError                 PERMISSION_DENIED
    │   ├── UnknownKeyError            PERMISSION_DENIED
    │   ├── RoleError                  PERMISSION_DENIED  key/role may not do that
    │   └── KeyValidityError           FAILED_PRECONDITION revoked, expired, not yet valid
    ├── NotFoundError                  NOT_FOUND
    ├── ResourceExhaustedError         RESOURCE_EXHAUSTED
    │   ├── EntryTooLargeError
    │   └── BackpressureError                         carries ``retry_after_ms``
    ├── ConflictError                  FAILED_PRECONDITION inconsistent state (e.g. checkpoint)
    ├── UnavailableError               UNAVAILABLE
    └── StorageError                   INTERNAL

Messages name what was wrong and, where there are two sides, both of them:
``"inclusion proof has 3 hashes, want 4"``.
"""

from __future__ import annotations

__all__ = [
    "ArtifactError",
    "BackpressureError",
    "BundleFormatError",
    "ChainError",
    "CheckpointError",
    "CheckpointFormatError",
    "ConflictError",
    "ConsistencyProofError",
    "EntryTooLargeError",
    "EnvelopeFormatError",
    "FormatError",
    "InclusionProofError",
    "InvalidInput",
    "KeyFormatError",
    "KeyPolicyError",
    "KeyValidityError",
    "KolmError",
    "NotFoundError",
    "ProofFormatError",
    "ResourceExhaustedError",
    "RoleError",
    "SignatureError",
    "SpecError",
    "StatementFormatError",
    "StorageError",
    "TrustRootFormatError",
    "UnavailableError",
    "UnknownKeyError",
    "VerificationError",
]


class KolmError(Exception):
    """Root of every error kolm raises on purpose."""

    grpc_code: str = "INTERNAL"
    #: the numbered verification step that failed, where a procedure numbers its steps
    step: int | None = None


class InvalidInput(KolmError):
    """The caller sent something we cannot accept."""

    grpc_code = "INVALID_ARGUMENT"


class FormatError(InvalidInput):
    """Bytes, text or JSON that do not parse as the format they claim to be."""


class EnvelopeFormatError(FormatError):
    """A DSSE envelope is malformed."""


class StatementFormatError(FormatError):
    """An in-toto statement (or a kolm predicate) is malformed."""


class CheckpointFormatError(FormatError):
    """A signed note or checkpoint is malformed."""


class ProofFormatError(FormatError):
    """A tlog-proof or Merkle proof is malformed."""


class BundleFormatError(FormatError):
    """An offline receipt bundle is malformed."""


class TrustRootFormatError(FormatError):
    """A trust root file is malformed."""


class KeyFormatError(FormatError):
    """A key file or public key is malformed."""


class SpecError(FormatError):
    """A task spec is invalid; the message names the field."""


class VerificationError(KolmError):
    """A verification step failed."""

    grpc_code = "INVALID_ARGUMENT"


class SignatureError(VerificationError):
    """A signature does not verify."""


class InclusionProofError(VerificationError):
    """An inclusion proof does not verify."""


class ConsistencyProofError(VerificationError):
    """A consistency proof does not verify."""


class ChainError(VerificationError):
    """The hash chain does not link."""


class CheckpointError(VerificationError):
    """A checkpoint does not verify or contradicts another."""


class ArtifactError(VerificationError):
    """A ``.kolm`` artifact failed verification (digests, signature, ledger)."""

    grpc_code = "FAILED_PRECONDITION"


class KeyPolicyError(KolmError):
    """A key may not be used for this."""

    grpc_code = "PERMISSION_DENIED"


class UnknownKeyError(KeyPolicyError):
    """The key id is not in the trust state."""


class RoleError(KeyPolicyError):
    """The key's (or client's) role may not perform this operation."""


class KeyValidityError(KeyPolicyError):
    """The key is revoked, expired or not yet valid."""

    grpc_code = "FAILED_PRECONDITION"


class NotFoundError(KolmError):
    """The requested entry, checkpoint, artifact or job does not exist."""

    grpc_code = "NOT_FOUND"


class ResourceExhaustedError(KolmError):
    """A size limit or a capacity limit was hit."""

    grpc_code = "RESOURCE_EXHAUSTED"


class EntryTooLargeError(ResourceExhaustedError):
    """An entry is larger than the ledger accepts."""


class BackpressureError(ResourceExhaustedError):
    """The sequencer queue is full; retry after ``retry_after_ms``."""

    def __init__(self, message: str, retry_after_ms: int = 50) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class ConflictError(KolmError):
    """The operation contradicts existing state (e.g. an inconsistent checkpoint)."""

    grpc_code = "FAILED_PRECONDITION"


class UnavailableError(KolmError):
    """A dependency (the ledger, a teacher) cannot be reached."""

    grpc_code = "UNAVAILABLE"


class StorageError(KolmError):
    """The database failed or holds something it should not."""
