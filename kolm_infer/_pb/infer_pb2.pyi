from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LoadArtifactRequest(_message.Message):
    __slots__ = ("path", "data", "name")
    PATH_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    path: str
    data: bytes
    name: str
    def __init__(self, path: _Optional[str] = ..., data: _Optional[bytes] = ..., name: _Optional[str] = ...) -> None: ...

class ArtifactInfo(_message.Message):
    __slots__ = ("name", "digest", "file_digest", "task_type", "labels", "confidence_threshold", "k_score", "artifact_receipt_index", "verifier", "signer_key_id", "recall")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    FILE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    TASK_TYPE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    K_SCORE_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_RECEIPT_INDEX_FIELD_NUMBER: _ClassVar[int]
    VERIFIER_FIELD_NUMBER: _ClassVar[int]
    SIGNER_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    RECALL_FIELD_NUMBER: _ClassVar[int]
    name: str
    digest: str
    file_digest: str
    task_type: str
    labels: _containers.RepeatedScalarFieldContainer[str]
    confidence_threshold: float
    k_score: float
    artifact_receipt_index: int
    verifier: str
    signer_key_id: str
    recall: RecallInfo
    def __init__(self, name: _Optional[str] = ..., digest: _Optional[str] = ..., file_digest: _Optional[str] = ..., task_type: _Optional[str] = ..., labels: _Optional[_Iterable[str]] = ..., confidence_threshold: _Optional[float] = ..., k_score: _Optional[float] = ..., artifact_receipt_index: _Optional[int] = ..., verifier: _Optional[str] = ..., signer_key_id: _Optional[str] = ..., recall: _Optional[_Union[RecallInfo, _Mapping]] = ...) -> None: ...

class RecallInfo(_message.Message):
    __slots__ = ("corpus_root", "chunks", "default_k", "embedding_model", "labelled")
    CORPUS_ROOT_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_K_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_MODEL_FIELD_NUMBER: _ClassVar[int]
    LABELLED_FIELD_NUMBER: _ClassVar[int]
    corpus_root: str
    chunks: int
    default_k: int
    embedding_model: str
    labelled: bool
    def __init__(self, corpus_root: _Optional[str] = ..., chunks: _Optional[int] = ..., default_k: _Optional[int] = ..., embedding_model: _Optional[str] = ..., labelled: _Optional[bool] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("artifact", "input", "request_id", "wait_for_inclusion", "recall_k")
    ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    WAIT_FOR_INCLUSION_FIELD_NUMBER: _ClassVar[int]
    RECALL_K_FIELD_NUMBER: _ClassVar[int]
    artifact: str
    input: str
    request_id: str
    wait_for_inclusion: bool
    recall_k: int
    def __init__(self, artifact: _Optional[str] = ..., input: _Optional[str] = ..., request_id: _Optional[str] = ..., wait_for_inclusion: _Optional[bool] = ..., recall_k: _Optional[int] = ...) -> None: ...

class Evidence(_message.Message):
    __slots__ = ("id", "digest", "position", "label", "score", "text")
    ID_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    id: str
    digest: str
    position: int
    label: str
    score: float
    text: str
    def __init__(self, id: _Optional[str] = ..., digest: _Optional[str] = ..., position: _Optional[int] = ..., label: _Optional[str] = ..., score: _Optional[float] = ..., text: _Optional[str] = ...) -> None: ...

class RecallVote(_message.Message):
    __slots__ = ("label", "share", "neighbours", "agrees")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    AGREES_FIELD_NUMBER: _ClassVar[int]
    label: str
    share: float
    neighbours: int
    agrees: bool
    def __init__(self, label: _Optional[str] = ..., share: _Optional[float] = ..., neighbours: _Optional[int] = ..., agrees: _Optional[bool] = ...) -> None: ...

class Promise(_message.Message):
    __slots__ = ("origin", "index", "leaf_hash", "integrated_time_us", "key_id", "signature")
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LEAF_HASH_FIELD_NUMBER: _ClassVar[int]
    INTEGRATED_TIME_US_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    origin: str
    index: int
    leaf_hash: bytes
    integrated_time_us: int
    key_id: str
    signature: bytes
    def __init__(self, origin: _Optional[str] = ..., index: _Optional[int] = ..., leaf_hash: _Optional[bytes] = ..., integrated_time_us: _Optional[int] = ..., key_id: _Optional[str] = ..., signature: _Optional[bytes] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("request_id", "output", "verified", "backend", "reason", "confidence", "latency_ms", "artifact_digest", "salt", "input_commitment", "envelope", "promise", "bundle", "spooled", "verifier_reason", "evidence", "corpus_root", "recall_k", "recall_vote")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_DIGEST_FIELD_NUMBER: _ClassVar[int]
    SALT_FIELD_NUMBER: _ClassVar[int]
    INPUT_COMMITMENT_FIELD_NUMBER: _ClassVar[int]
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    PROMISE_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_FIELD_NUMBER: _ClassVar[int]
    SPOOLED_FIELD_NUMBER: _ClassVar[int]
    VERIFIER_REASON_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_FIELD_NUMBER: _ClassVar[int]
    CORPUS_ROOT_FIELD_NUMBER: _ClassVar[int]
    RECALL_K_FIELD_NUMBER: _ClassVar[int]
    RECALL_VOTE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    output: str
    verified: bool
    backend: str
    reason: str
    confidence: float
    latency_ms: float
    artifact_digest: str
    salt: bytes
    input_commitment: str
    envelope: bytes
    promise: Promise
    bundle: bytes
    spooled: bool
    verifier_reason: str
    evidence: _containers.RepeatedCompositeFieldContainer[Evidence]
    corpus_root: str
    recall_k: int
    recall_vote: RecallVote
    def __init__(self, request_id: _Optional[str] = ..., output: _Optional[str] = ..., verified: _Optional[bool] = ..., backend: _Optional[str] = ..., reason: _Optional[str] = ..., confidence: _Optional[float] = ..., latency_ms: _Optional[float] = ..., artifact_digest: _Optional[str] = ..., salt: _Optional[bytes] = ..., input_commitment: _Optional[str] = ..., envelope: _Optional[bytes] = ..., promise: _Optional[_Union[Promise, _Mapping]] = ..., bundle: _Optional[bytes] = ..., spooled: _Optional[bool] = ..., verifier_reason: _Optional[str] = ..., evidence: _Optional[_Iterable[_Union[Evidence, _Mapping]]] = ..., corpus_root: _Optional[str] = ..., recall_k: _Optional[int] = ..., recall_vote: _Optional[_Union[RecallVote, _Mapping]] = ...) -> None: ...

class ListArtifactsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListArtifactsResponse(_message.Message):
    __slots__ = ("artifacts",)
    ARTIFACTS_FIELD_NUMBER: _ClassVar[int]
    artifacts: _containers.RepeatedCompositeFieldContainer[ArtifactInfo]
    def __init__(self, artifacts: _Optional[_Iterable[_Union[ArtifactInfo, _Mapping]]] = ...) -> None: ...

class UnloadArtifactRequest(_message.Message):
    __slots__ = ("artifact",)
    ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    artifact: str
    def __init__(self, artifact: _Optional[str] = ...) -> None: ...

class UnloadArtifactResponse(_message.Message):
    __slots__ = ("digest",)
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    digest: str
    def __init__(self, digest: _Optional[str] = ...) -> None: ...
