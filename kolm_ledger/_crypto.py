"""The one module that touches ``cryptography.hazmat``.

Everything else signs and verifies through :class:`PrivateKey` and
:class:`PublicKey`. Two algorithms: ECDSA P-256 with SHA-256 (DER signatures,
what HSMs, KMS and OpenSSF model-signing use) and Ed25519.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InternalError, InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from kolm_ledger.errors import KeyFormatError, SignatureError

Algorithm = Literal["ecdsa-p256-sha256", "ed25519"]
ALGORITHMS: tuple[Algorithm, ...] = ("ecdsa-p256-sha256", "ed25519")

_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())
_ECDSA_SHA256_RFC6979 = ec.ECDSA(hashes.SHA256(), deterministic_signing=True)
#: the order n of the P-256 group; a signature (r, s) is in low-S form when s <= n // 2
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_P256_HALF = P256_ORDER // 2
_PublicRaw = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
_PrivateRaw = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


@dataclass(frozen=True, eq=False)
class PublicKey:
    """A public key of one of :data:`ALGORITHMS`."""

    _key: _PublicRaw
    algorithm: Algorithm

    @classmethod
    def from_pem(cls, pem: bytes | str) -> PublicKey:
        """Parse a PEM SubjectPublicKeyInfo; raises :class:`KeyFormatError`."""
        try:
            data = pem.encode() if isinstance(pem, str) else pem
            key = serialization.load_pem_public_key(data)
        except (ValueError, TypeError, UnsupportedAlgorithm, InternalError) as e:
            raise KeyFormatError(f"public key is not a valid PEM SubjectPublicKeyInfo: {e}") from e
        return cls._wrap(key)

    @classmethod
    def from_der(cls, der: bytes) -> PublicKey:
        """Parse a DER SubjectPublicKeyInfo; raises :class:`KeyFormatError`."""
        try:
            key = serialization.load_der_public_key(der)
        except (ValueError, TypeError, UnsupportedAlgorithm, InternalError) as e:
            raise KeyFormatError(f"public key is not a valid DER SubjectPublicKeyInfo: {e}") from e
        return cls._wrap(key)

    @classmethod
    def from_ed25519_raw(cls, raw: bytes) -> PublicKey:
        """Wrap a raw 32-byte Ed25519 public key."""
        if len(raw) != 32:
            raise KeyFormatError(f"Ed25519 public key has {len(raw)} bytes, want 32")
        return cls(ed25519.Ed25519PublicKey.from_public_bytes(raw), "ed25519")

    @classmethod
    def _wrap(cls, key: object) -> PublicKey:
        if isinstance(key, ed25519.Ed25519PublicKey):
            return cls(key, "ed25519")
        if isinstance(key, ec.EllipticCurvePublicKey):
            if not isinstance(key.curve, ec.SECP256R1):
                raise KeyFormatError(
                    f"ECDSA key is on curve {key.curve.name}, want secp256r1 (P-256)"
                )
            return cls(key, "ecdsa-p256-sha256")
        raise KeyFormatError(f"unsupported public key type {type(key).__name__}")

    def der(self) -> bytes:
        """DER SubjectPublicKeyInfo."""
        return self._key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def pem(self) -> str:
        """PEM SubjectPublicKeyInfo."""
        return self._key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()

    def raw(self) -> bytes:
        """Raw public key bytes (Ed25519: 32 bytes; P-256: uncompressed point)."""
        if isinstance(self._key, ed25519.Ed25519PublicKey):
            return self._key.public_bytes(
                serialization.Encoding.Raw, serialization.PublicFormat.Raw
            )
        return self._key.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )

    def keyid(self) -> str:
        """DSSE key id: lowercase hex SHA-256 of the DER SubjectPublicKeyInfo."""
        return self._keyid

    @functools.cached_property
    def _keyid(self) -> str:
        return hashlib.sha256(self.der()).hexdigest()

    def verify(self, signature: bytes, data: bytes) -> None:
        """Verify ``signature`` over ``data``; raises :class:`SignatureError`.

        One signature per key and message: ECDSA signatures must be strict DER in low-S
        form (``s <= n/2``; ``(r, n - s)`` verifies mathematically too, and is refused
        here, so nobody can make a second valid signature from a first), and Ed25519
        signatures must have ``S < L`` (OpenSSL's check). Every verifier in kolm -- the
        ledger's append, its worker processes, the audit, ``kolm verify``, the artifact
        load check -- verifies through this method.
        """
        try:
            if isinstance(self._key, ed25519.Ed25519PublicKey):
                self._key.verify(signature, data)
            else:
                _check_low_s(signature)
                self._key.verify(signature, data, _ECDSA_SHA256)
        except InvalidSignature as e:
            raise SignatureError(
                f"{self.algorithm} signature does not verify for key {self.keyid()[:16]}"
            ) from e
        except ValueError as e:  # malformed DER signature
            raise SignatureError(f"{self.algorithm} signature is malformed: {e}") from e

    def x509_public_key(self) -> _PublicRaw:
        """The key as ``cryptography.x509.CertificateBuilder.public_key`` takes it."""
        return self._key

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PublicKey) and self.der() == other.der()

    def __hash__(self) -> int:
        return hash(self.der())


def _check_low_s(signature: bytes) -> None:
    """Refuse an ECDSA signature that is not strict DER ``(r, s)`` with ``s <= n/2``."""
    try:
        r, s = decode_dss_signature(signature)
    except ValueError as e:
        raise SignatureError(f"ecdsa-p256-sha256 signature is not DER (r, s): {e}") from e
    if encode_dss_signature(r, s) != signature:
        raise SignatureError("ecdsa-p256-sha256 signature is not in strict DER form")
    if s > _P256_HALF:
        raise SignatureError(
            "ecdsa-p256-sha256 signature is not in low-S form (s > n/2); kolm accepts only "
            "(r, s) with s <= n/2, so each signature has one encoding"
        )


def _low_s(signature: bytes) -> bytes:
    """``signature`` with ``s`` replaced by ``n - s`` when ``s > n/2`` (same validity)."""
    r, s = decode_dss_signature(signature)
    if s > _P256_HALF:
        return encode_dss_signature(r, P256_ORDER - s)
    return signature


@dataclass(frozen=True, eq=False)
class PrivateKey:
    """A private signing key of one of :data:`ALGORITHMS`."""

    _key: _PrivateRaw
    algorithm: Algorithm

    @classmethod
    def generate(cls, algorithm: Algorithm = "ecdsa-p256-sha256") -> PrivateKey:
        """Generate a fresh key."""
        if algorithm == "ed25519":
            return cls(ed25519.Ed25519PrivateKey.generate(), "ed25519")
        if algorithm == "ecdsa-p256-sha256":
            return cls(ec.generate_private_key(ec.SECP256R1()), "ecdsa-p256-sha256")
        raise KeyFormatError(f"unknown algorithm {algorithm!r}, want one of {ALGORITHMS}")

    @classmethod
    def from_pem(cls, pem: bytes | str) -> PrivateKey:
        """Parse an unencrypted PKCS#8 PEM private key; raises :class:`KeyFormatError`."""
        try:
            data = pem.encode() if isinstance(pem, str) else pem
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm, InternalError) as e:
            raise KeyFormatError(f"private key is not a valid unencrypted PEM: {e}") from e
        if isinstance(key, ed25519.Ed25519PrivateKey):
            return cls(key, "ed25519")
        if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
            return cls(key, "ecdsa-p256-sha256")
        raise KeyFormatError(f"unsupported private key type {type(key).__name__}")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PrivateKey:
        """Load a PEM private key file; raises :class:`KeyFormatError` naming the path."""
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise KeyFormatError(f"cannot read key file {path}: {e.strerror}") from e
        try:
            return cls.from_pem(data)
        except KeyFormatError as e:
            raise KeyFormatError(f"{path}: {e}") from e

    def pem(self) -> bytes:
        """PKCS#8 PEM, unencrypted (protect the file: :meth:`save` writes mode 0600)."""
        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write PKCS#8 PEM with file mode 0600 (created that way, never world-readable)."""
        p = Path(path)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(self.pem())
        os.chmod(p, 0o600)

    def public_key(self) -> PublicKey:
        """The matching public key."""
        return PublicKey(self._key.public_key(), self.algorithm)

    def keyid(self) -> str:
        """DSSE key id of the public key."""
        return self._keyid

    @functools.cached_property
    def _keyid(self) -> str:
        return self.public_key().keyid()

    def sign(self, data: bytes, *, deterministic: bool = False) -> bytes:
        """Sign ``data`` (ECDSA: DER-encoded signature over SHA-256).

        ``deterministic`` uses RFC 6979 nonces for ECDSA, so the same key and data give
        the same bytes (reproducible artifacts); Ed25519 is always deterministic. ECDSA
        signatures come out in low-S form (``s > n/2`` is replaced by ``n - s``, a pure
        function of the signature, so determinism holds), the only form
        :meth:`PublicKey.verify` accepts.
        """
        if isinstance(self._key, ed25519.Ed25519PrivateKey):
            return self._key.sign(data)
        return _low_s(
            self._key.sign(data, _ECDSA_SHA256_RFC6979 if deterministic else _ECDSA_SHA256)
        )

    def sign_certificate(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        """Sign an X.509 certificate (ECDSA with SHA-256, or Ed25519) as its issuer."""
        if isinstance(self._key, ed25519.Ed25519PrivateKey):
            return builder.sign(self._key, None)
        return builder.sign(self._key, hashes.SHA256())

    @staticmethod
    def certificate_pem(cert: x509.Certificate) -> bytes:
        """PEM encoding of an X.509 certificate."""
        return cert.public_bytes(serialization.Encoding.PEM)

    def ed25519_seed(self) -> bytes:
        """Raw 32-byte Ed25519 private key (for signed-note key strings)."""
        if not isinstance(self._key, ed25519.Ed25519PrivateKey):
            raise KeyFormatError("signed-note keys must be Ed25519")
        return self._key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
