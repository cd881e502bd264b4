from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AppendRequest(_message.Message):
    __slots__ = ("envelope", "wait_for_checkpoint")
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    WAIT_FOR_CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    envelope: bytes
    wait_for_checkpoint: bool
    def __init__(self, envelope: _Optional[bytes] = ..., wait_for_checkpoint: _Optional[bool] = ...) -> None: ...

class SignedPromise(_message.Message):
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

class AppendResponse(_message.Message):
    __slots__ = ("index", "leaf_hash", "duplicate", "integrated_time_us", "promise", "bundle", "checkpoint_size")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LEAF_HASH_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    INTEGRATED_TIME_US_FIELD_NUMBER: _ClassVar[int]
    PROMISE_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_SIZE_FIELD_NUMBER: _ClassVar[int]
    index: int
    leaf_hash: bytes
    duplicate: bool
    integrated_time_us: int
    promise: SignedPromise
    bundle: bytes
    checkpoint_size: int
    def __init__(self, index: _Optional[int] = ..., leaf_hash: _Optional[bytes] = ..., duplicate: _Optional[bool] = ..., integrated_time_us: _Optional[int] = ..., promise: _Optional[_Union[SignedPromise, _Mapping]] = ..., bundle: _Optional[bytes] = ..., checkpoint_size: _Optional[int] = ...) -> None: ...

class AppendStreamRequest(_message.Message):
    __slots__ = ("batch_id", "envelopes", "wait_for_checkpoint")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    ENVELOPES_FIELD_NUMBER: _ClassVar[int]
    WAIT_FOR_CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    batch_id: int
    envelopes: _containers.RepeatedScalarFieldContainer[bytes]
    wait_for_checkpoint: bool
    def __init__(self, batch_id: _Optional[int] = ..., envelopes: _Optional[_Iterable[bytes]] = ..., wait_for_checkpoint: _Optional[bool] = ...) -> None: ...

class Status(_message.Message):
    __slots__ = ("code", "message", "retry_after_ms")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    retry_after_ms: int
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., retry_after_ms: _Optional[int] = ...) -> None: ...

class AppendResult(_message.Message):
    __slots__ = ("ok", "error")
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ok: AppendResponse
    error: Status
    def __init__(self, ok: _Optional[_Union[AppendResponse, _Mapping]] = ..., error: _Optional[_Union[Status, _Mapping]] = ...) -> None: ...

class AppendStreamResponse(_message.Message):
    __slots__ = ("batch_id", "results")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    batch_id: int
    results: _containers.RepeatedCompositeFieldContainer[AppendResult]
    def __init__(self, batch_id: _Optional[int] = ..., results: _Optional[_Iterable[_Union[AppendResult, _Mapping]]] = ...) -> None: ...

class GetCheckpointRequest(_message.Message):
    __slots__ = ("size",)
    SIZE_FIELD_NUMBER: _ClassVar[int]
    size: int
    def __init__(self, size: _Optional[int] = ...) -> None: ...

class Checkpoint(_message.Message):
    __slots__ = ("note", "size", "root", "chain_head")
    NOTE_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    ROOT_FIELD_NUMBER: _ClassVar[int]
    CHAIN_HEAD_FIELD_NUMBER: _ClassVar[int]
    note: bytes
    size: int
    root: bytes
    chain_head: bytes
    def __init__(self, note: _Optional[bytes] = ..., size: _Optional[int] = ..., root: _Optional[bytes] = ..., chain_head: _Optional[bytes] = ...) -> None: ...

class GetInclusionProofRequest(_message.Message):
    __slots__ = ("index", "leaf_hash", "statement_digest", "tree_size")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LEAF_HASH_FIELD_NUMBER: _ClassVar[int]
    STATEMENT_DIGEST_FIELD_NUMBER: _ClassVar[int]
    TREE_SIZE_FIELD_NUMBER: _ClassVar[int]
    index: int
    leaf_hash: bytes
    statement_digest: bytes
    tree_size: int
    def __init__(self, index: _Optional[int] = ..., leaf_hash: _Optional[bytes] = ..., statement_digest: _Optional[bytes] = ..., tree_size: _Optional[int] = ...) -> None: ...

class InclusionProof(_message.Message):
    __slots__ = ("index", "tree_size", "leaf_hash", "hashes", "checkpoint")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TREE_SIZE_FIELD_NUMBER: _ClassVar[int]
    LEAF_HASH_FIELD_NUMBER: _ClassVar[int]
    HASHES_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    index: int
    tree_size: int
    leaf_hash: bytes
    hashes: _containers.RepeatedScalarFieldContainer[bytes]
    checkpoint: bytes
    def __init__(self, index: _Optional[int] = ..., tree_size: _Optional[int] = ..., leaf_hash: _Optional[bytes] = ..., hashes: _Optional[_Iterable[bytes]] = ..., checkpoint: _Optional[bytes] = ...) -> None: ...

class GetConsistencyProofRequest(_message.Message):
    __slots__ = ("from_size", "to_size")
    FROM_SIZE_FIELD_NUMBER: _ClassVar[int]
    TO_SIZE_FIELD_NUMBER: _ClassVar[int]
    from_size: int
    to_size: int
    def __init__(self, from_size: _Optional[int] = ..., to_size: _Optional[int] = ...) -> None: ...

class ConsistencyProof(_message.Message):
    __slots__ = ("from_size", "to_size", "hashes", "checkpoint")
    FROM_SIZE_FIELD_NUMBER: _ClassVar[int]
    TO_SIZE_FIELD_NUMBER: _ClassVar[int]
    HASHES_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    from_size: int
    to_size: int
    hashes: _containers.RepeatedScalarFieldContainer[bytes]
    checkpoint: bytes
    def __init__(self, from_size: _Optional[int] = ..., to_size: _Optional[int] = ..., hashes: _Optional[_Iterable[bytes]] = ..., checkpoint: _Optional[bytes] = ...) -> None: ...

class GetEntriesRequest(_message.Message):
    __slots__ = ("start", "end")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...

class Entry(_message.Message):
    __slots__ = ("index", "leaf_hash", "chain_hash", "kind", "key_id", "integrated_time_us", "envelope")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LEAF_HASH_FIELD_NUMBER: _ClassVar[int]
    CHAIN_HASH_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    INTEGRATED_TIME_US_FIELD_NUMBER: _ClassVar[int]
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    index: int
    leaf_hash: bytes
    chain_hash: bytes
    kind: str
    key_id: str
    integrated_time_us: int
    envelope: bytes
    def __init__(self, index: _Optional[int] = ..., leaf_hash: _Optional[bytes] = ..., chain_hash: _Optional[bytes] = ..., kind: _Optional[str] = ..., key_id: _Optional[str] = ..., integrated_time_us: _Optional[int] = ..., envelope: _Optional[bytes] = ...) -> None: ...

class FindEntriesRequest(_message.Message):
    __slots__ = ("subject_digest", "kind", "key_id", "since_us", "until_us", "after_index", "limit")
    SUBJECT_DIGEST_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    SINCE_US_FIELD_NUMBER: _ClassVar[int]
    UNTIL_US_FIELD_NUMBER: _ClassVar[int]
    AFTER_INDEX_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    subject_digest: str
    kind: str
    key_id: str
    since_us: int
    until_us: int
    after_index: int
    limit: int
    def __init__(self, subject_digest: _Optional[str] = ..., kind: _Optional[str] = ..., key_id: _Optional[str] = ..., since_us: _Optional[int] = ..., until_us: _Optional[int] = ..., after_index: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class FindEntriesResponse(_message.Message):
    __slots__ = ("entries", "next_after_index")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    NEXT_AFTER_INDEX_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[Entry]
    next_after_index: int
    def __init__(self, entries: _Optional[_Iterable[_Union[Entry, _Mapping]]] = ..., next_after_index: _Optional[int] = ...) -> None: ...

class GetReceiptBundleRequest(_message.Message):
    __slots__ = ("index", "leaf_hash", "statement_digest", "tree_size")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LEAF_HASH_FIELD_NUMBER: _ClassVar[int]
    STATEMENT_DIGEST_FIELD_NUMBER: _ClassVar[int]
    TREE_SIZE_FIELD_NUMBER: _ClassVar[int]
    index: int
    leaf_hash: bytes
    statement_digest: bytes
    tree_size: int
    def __init__(self, index: _Optional[int] = ..., leaf_hash: _Optional[bytes] = ..., statement_digest: _Optional[bytes] = ..., tree_size: _Optional[int] = ...) -> None: ...

class ReceiptBundle(_message.Message):
    __slots__ = ("bundle", "index")
    BUNDLE_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    bundle: bytes
    index: int
    def __init__(self, bundle: _Optional[bytes] = ..., index: _Optional[int] = ...) -> None: ...

class GetProvenanceRequest(_message.Message):
    __slots__ = ("artifact_digest", "include_labels")
    ARTIFACT_DIGEST_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_LABELS_FIELD_NUMBER: _ClassVar[int]
    artifact_digest: str
    include_labels: bool
    def __init__(self, artifact_digest: _Optional[str] = ..., include_labels: _Optional[bool] = ...) -> None: ...

class Provenance(_message.Message):
    __slots__ = ("artifact", "eval", "k_score", "eval_n", "eval_correct", "interval_low", "interval_high", "teacher_k_score", "training_set_root", "recomputed_root", "label_count", "labels_found", "labels", "job_id")
    ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    EVAL_FIELD_NUMBER: _ClassVar[int]
    K_SCORE_FIELD_NUMBER: _ClassVar[int]
    EVAL_N_FIELD_NUMBER: _ClassVar[int]
    EVAL_CORRECT_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_LOW_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_HIGH_FIELD_NUMBER: _ClassVar[int]
    TEACHER_K_SCORE_FIELD_NUMBER: _ClassVar[int]
    TRAINING_SET_ROOT_FIELD_NUMBER: _ClassVar[int]
    RECOMPUTED_ROOT_FIELD_NUMBER: _ClassVar[int]
    LABEL_COUNT_FIELD_NUMBER: _ClassVar[int]
    LABELS_FOUND_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    artifact: Entry
    eval: Entry
    k_score: float
    eval_n: int
    eval_correct: int
    interval_low: float
    interval_high: float
    teacher_k_score: float
    training_set_root: str
    recomputed_root: str
    label_count: int
    labels_found: int
    labels: _containers.RepeatedCompositeFieldContainer[Entry]
    job_id: str
    def __init__(self, artifact: _Optional[_Union[Entry, _Mapping]] = ..., eval: _Optional[_Union[Entry, _Mapping]] = ..., k_score: _Optional[float] = ..., eval_n: _Optional[int] = ..., eval_correct: _Optional[int] = ..., interval_low: _Optional[float] = ..., interval_high: _Optional[float] = ..., teacher_k_score: _Optional[float] = ..., training_set_root: _Optional[str] = ..., recomputed_root: _Optional[str] = ..., label_count: _Optional[int] = ..., labels_found: _Optional[int] = ..., labels: _Optional[_Iterable[_Union[Entry, _Mapping]]] = ..., job_id: _Optional[str] = ...) -> None: ...
