"""The OpenSSF model-signing envelope of a ``.kolm`` (``model.sig``): parse it, check a signer.

One reading of the format for both verifiers: ``kolm_compile.artifact.verify_artifact``
(the inference service's load check, on an unpacked artifact) and
:func:`kolm_ledger.verify.recall_proof.read_artifact_corpus` (an auditor's offline check, which
must not import ``kolm_compile``). The envelope is DSSE over an in-toto statement whose
predicate lists every file with its SHA-256; the subject digest is the SHA-256 over the
raw listed digests in order (:func:`artifact_digest`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass

from kolm_ledger.errors import ArtifactError, FormatError
from kolm_ledger.formats.dsse import (
    IN_TOTO_PAYLOAD_TYPE,
    Envelope,
    Signature,
    b64decode,
    verify_signature,
)
from kolm_ledger.keys import TrustedKey

__all__ = [
    "MODEL_SIGNING_PREDICATE",
    "SIGNATURE_FILE",
    "ModelSignature",
    "artifact_digest",
    "parse_model_signature",
]

SIGNATURE_FILE = "model.sig"
MODEL_SIGNING_PREDICATE = "https://model_signing/signature/v1.0"


def artifact_digest(resources: Iterable[tuple[str, str]]) -> str:
    """SHA-256 over the raw file digests in the order given (model-signing's subject digest).

    Raises ``ValueError`` for a digest that is not hex.
    """
    h = hashlib.sha256()
    for _, digest in resources:
        h.update(bytes.fromhex(digest))
    return h.hexdigest()


@dataclass(frozen=True)
class ModelSignature:
    """What ``model.sig`` says: the signed statement, its signatures and its file list."""

    payload: bytes  # the in-toto statement the signatures cover
    sigs: tuple[bytes, ...]
    resources: tuple[tuple[str, str], ...]  # (file name, hex SHA-256), in signed order
    claimed: str  # the subject digest the statement claims

    def verify_by(self, key: TrustedKey) -> None:
        """Raise :class:`~kolm_ledger.errors.SignatureError` unless ``key`` signed it."""
        env = Envelope(
            self.payload,
            IN_TOTO_PAYLOAD_TYPE,
            tuple(Signature(key.keyid, s) for s in self.sigs),
        )
        verify_signature(env, key.public_key)


def parse_model_signature(data: bytes, name: str) -> ModelSignature:
    """Parse ``model.sig`` bytes; raises :class:`ArtifactError` ("``name``: malformed ...")."""
    try:
        env_obj = json.loads(data)["dsseEnvelope"]
        # strict base64 (one text per value), as for every DSSE envelope kolm reads
        payload = b64decode(env_obj["payload"], "dsseEnvelope.payload")
        sigs = tuple(
            b64decode(s["sig"], "dsseEnvelope.signatures[].sig") for s in env_obj["signatures"]
        )
        if env_obj["payloadType"] != IN_TOTO_PAYLOAD_TYPE or not sigs:
            raise ValueError("not an in-toto DSSE envelope with a signature")
        st = json.loads(payload)
        if st.get("predicateType") != MODEL_SIGNING_PREDICATE:
            raise ValueError(f"predicateType {str(st.get('predicateType'))[:80]!r}")
        res = st["predicate"]["resources"]
        if any(r.get("algorithm") != "sha256" for r in res):
            raise ValueError("only sha256 resources are accepted")
        resources = tuple((str(r["name"]), str(r["digest"])) for r in res)
        claimed = str(st["subject"][0]["digest"]["sha256"])
    except (
        ValueError,
        KeyError,
        TypeError,
        IndexError,
        AttributeError,
        RecursionError,
        FormatError,
    ) as e:
        raise ArtifactError(f"{name}: malformed {SIGNATURE_FILE}: {e}") from e
    return ModelSignature(payload, sigs, resources, claimed)
