import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RoundState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROUND_STATE_UNSPECIFIED: _ClassVar[RoundState]
    ROUND_STATE_OPEN: _ClassVar[RoundState]
    ROUND_STATE_AGGREGATING: _ClassVar[RoundState]
    ROUND_STATE_CLOSED: _ClassVar[RoundState]
    ROUND_STATE_FAILED: _ClassVar[RoundState]
    ROUND_STATE_FINISHED: _ClassVar[RoundState]

class Encoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENCODING_UNSPECIFIED: _ClassVar[Encoding]
    ENCODING_FLOAT32: _ClassVar[Encoding]
    ENCODING_FLOAT16: _ClassVar[Encoding]
    ENCODING_INT8_QUANTIZED: _ClassVar[Encoding]
    ENCODING_MASKED_INT: _ClassVar[Encoding]
    ENCODING_INT4_QUANTIZED: _ClassVar[Encoding]
    ENCODING_INT2_QUANTIZED: _ClassVar[Encoding]
    ENCODING_INT3_QUANTIZED: _ClassVar[Encoding]
    ENCODING_MASKED_INT16: _ClassVar[Encoding]
    ENCODING_MASKED_INT8: _ClassVar[Encoding]
    ENCODING_FLOAT64: _ClassVar[Encoding]

class Compression(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMPRESSION_UNSPECIFIED: _ClassVar[Compression]
    COMPRESSION_NONE: _ClassVar[Compression]
    COMPRESSION_ZSTD: _ClassVar[Compression]

class SecurePhase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SECURE_PHASE_UNSPECIFIED: _ClassVar[SecurePhase]
    SECURE_PHASE_ADVERTISE: _ClassVar[SecurePhase]
    SECURE_PHASE_SHARE: _ClassVar[SecurePhase]
    SECURE_PHASE_UPLOAD: _ClassVar[SecurePhase]
    SECURE_PHASE_UNMASK: _ClassVar[SecurePhase]
    SECURE_PHASE_DONE: _ClassVar[SecurePhase]

class ShareKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SHARE_KIND_UNSPECIFIED: _ClassVar[ShareKind]
    SHARE_KIND_SELF_SEED: _ClassVar[ShareKind]
    SHARE_KIND_MASK_KEY: _ClassVar[ShareKind]
ROUND_STATE_UNSPECIFIED: RoundState
ROUND_STATE_OPEN: RoundState
ROUND_STATE_AGGREGATING: RoundState
ROUND_STATE_CLOSED: RoundState
ROUND_STATE_FAILED: RoundState
ROUND_STATE_FINISHED: RoundState
ENCODING_UNSPECIFIED: Encoding
ENCODING_FLOAT32: Encoding
ENCODING_FLOAT16: Encoding
ENCODING_INT8_QUANTIZED: Encoding
ENCODING_MASKED_INT: Encoding
ENCODING_INT4_QUANTIZED: Encoding
ENCODING_INT2_QUANTIZED: Encoding
ENCODING_INT3_QUANTIZED: Encoding
ENCODING_MASKED_INT16: Encoding
ENCODING_MASKED_INT8: Encoding
ENCODING_FLOAT64: Encoding
COMPRESSION_UNSPECIFIED: Compression
COMPRESSION_NONE: Compression
COMPRESSION_ZSTD: Compression
SECURE_PHASE_UNSPECIFIED: SecurePhase
SECURE_PHASE_ADVERTISE: SecurePhase
SECURE_PHASE_SHARE: SecurePhase
SECURE_PHASE_UPLOAD: SecurePhase
SECURE_PHASE_UNMASK: SecurePhase
SECURE_PHASE_DONE: SecurePhase
SHARE_KIND_UNSPECIFIED: ShareKind
SHARE_KIND_SELF_SEED: ShareKind
SHARE_KIND_MASK_KEY: ShareKind

class TensorSpec(_message.Message):
    __slots__ = ("id", "length", "exact")
    ID_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    EXACT_FIELD_NUMBER: _ClassVar[int]
    id: int
    length: int
    exact: bool
    def __init__(self, id: _Optional[int] = ..., length: _Optional[int] = ..., exact: _Optional[bool] = ...) -> None: ...

class Manifest(_message.Message):
    __slots__ = ("tensors", "fingerprint")
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    fingerprint: bytes
    def __init__(self, tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., fingerprint: _Optional[bytes] = ...) -> None: ...

class ByteCount(_message.Message):
    __slots__ = ("raw_up", "wire_up", "raw_down", "wire_down")
    RAW_UP_FIELD_NUMBER: _ClassVar[int]
    WIRE_UP_FIELD_NUMBER: _ClassVar[int]
    RAW_DOWN_FIELD_NUMBER: _ClassVar[int]
    WIRE_DOWN_FIELD_NUMBER: _ClassVar[int]
    raw_up: int
    wire_up: int
    raw_down: int
    wire_down: int
    def __init__(self, raw_up: _Optional[int] = ..., wire_up: _Optional[int] = ..., raw_down: _Optional[int] = ..., wire_down: _Optional[int] = ...) -> None: ...

class TrainingPlan(_message.Message):
    __slots__ = ("local_epochs", "learning_rate", "batch_size", "encoding", "error_feedback", "optimizer", "secure", "proximal_mu", "warmup", "rehearsal")
    LOCAL_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    ERROR_FEEDBACK_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    SECURE_FIELD_NUMBER: _ClassVar[int]
    PROXIMAL_MU_FIELD_NUMBER: _ClassVar[int]
    WARMUP_FIELD_NUMBER: _ClassVar[int]
    REHEARSAL_FIELD_NUMBER: _ClassVar[int]
    local_epochs: int
    learning_rate: float
    batch_size: int
    encoding: Encoding
    error_feedback: bool
    optimizer: str
    secure: SecurePlan
    proximal_mu: float
    warmup: WarmUp
    rehearsal: Rehearsal
    def __init__(self, local_epochs: _Optional[int] = ..., learning_rate: _Optional[float] = ..., batch_size: _Optional[int] = ..., encoding: _Optional[_Union[Encoding, str]] = ..., error_feedback: _Optional[bool] = ..., optimizer: _Optional[str] = ..., secure: _Optional[_Union[SecurePlan, _Mapping]] = ..., proximal_mu: _Optional[float] = ..., warmup: _Optional[_Union[WarmUp, _Mapping]] = ..., rehearsal: _Optional[_Union[Rehearsal, _Mapping]] = ...) -> None: ...

class Rehearsal(_message.Message):
    __slots__ = ("words", "share")
    WORDS_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    words: WarmUp
    share: float
    def __init__(self, words: _Optional[_Union[WarmUp, _Mapping]] = ..., share: _Optional[float] = ...) -> None: ...

class WarmUp(_message.Message):
    __slots__ = ("words", "styles", "labels", "seed")
    WORDS_FIELD_NUMBER: _ClassVar[int]
    STYLES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    words: int
    styles: str
    labels: str
    seed: int
    def __init__(self, words: _Optional[int] = ..., styles: _Optional[str] = ..., labels: _Optional[str] = ..., seed: _Optional[int] = ...) -> None: ...

class SecurePlan(_message.Message):
    __slots__ = ("enabled", "clip", "frac_bits", "round_seed", "weight_by_samples", "bits", "sample_cap", "code_range", "hide_weights")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    CLIP_FIELD_NUMBER: _ClassVar[int]
    FRAC_BITS_FIELD_NUMBER: _ClassVar[int]
    ROUND_SEED_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BY_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    BITS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_CAP_FIELD_NUMBER: _ClassVar[int]
    CODE_RANGE_FIELD_NUMBER: _ClassVar[int]
    HIDE_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    clip: float
    frac_bits: int
    round_seed: bytes
    weight_by_samples: bool
    bits: int
    sample_cap: float
    code_range: float
    hide_weights: bool
    def __init__(self, enabled: _Optional[bool] = ..., clip: _Optional[float] = ..., frac_bits: _Optional[int] = ..., round_seed: _Optional[bytes] = ..., weight_by_samples: _Optional[bool] = ..., bits: _Optional[int] = ..., sample_cap: _Optional[float] = ..., code_range: _Optional[float] = ..., hide_weights: _Optional[bool] = ...) -> None: ...

class EdgeKeys(_message.Message):
    __slots__ = ("edge_id", "index", "cipher_public", "mask_public", "signature", "certificate")
    EDGE_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    CIPHER_PUBLIC_FIELD_NUMBER: _ClassVar[int]
    MASK_PUBLIC_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    edge_id: str
    index: int
    cipher_public: bytes
    mask_public: bytes
    signature: bytes
    certificate: bytes
    def __init__(self, edge_id: _Optional[str] = ..., index: _Optional[int] = ..., cipher_public: _Optional[bytes] = ..., mask_public: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., certificate: _Optional[bytes] = ...) -> None: ...

class AdvertiseKeysRequest(_message.Message):
    __slots__ = ("round_id", "cipher_public", "mask_public", "signature", "certificate")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    CIPHER_PUBLIC_FIELD_NUMBER: _ClassVar[int]
    MASK_PUBLIC_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    cipher_public: bytes
    mask_public: bytes
    signature: bytes
    certificate: bytes
    def __init__(self, round_id: _Optional[int] = ..., cipher_public: _Optional[bytes] = ..., mask_public: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., certificate: _Optional[bytes] = ...) -> None: ...

class SealedShare(_message.Message):
    __slots__ = ("dealer", "holder", "ciphertext")
    DEALER_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    dealer: str
    holder: str
    ciphertext: bytes
    def __init__(self, dealer: _Optional[str] = ..., holder: _Optional[str] = ..., ciphertext: _Optional[bytes] = ...) -> None: ...

class ShareCommitment(_message.Message):
    __slots__ = ("holder", "self_seed", "mask_key")
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    SELF_SEED_FIELD_NUMBER: _ClassVar[int]
    MASK_KEY_FIELD_NUMBER: _ClassVar[int]
    holder: str
    self_seed: bytes
    mask_key: bytes
    def __init__(self, holder: _Optional[str] = ..., self_seed: _Optional[bytes] = ..., mask_key: _Optional[bytes] = ...) -> None: ...

class ShareKeysRequest(_message.Message):
    __slots__ = ("round_id", "sealed", "commitments")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    SEALED_FIELD_NUMBER: _ClassVar[int]
    COMMITMENTS_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    sealed: _containers.RepeatedCompositeFieldContainer[SealedShare]
    commitments: _containers.RepeatedCompositeFieldContainer[ShareCommitment]
    def __init__(self, round_id: _Optional[int] = ..., sealed: _Optional[_Iterable[_Union[SealedShare, _Mapping]]] = ..., commitments: _Optional[_Iterable[_Union[ShareCommitment, _Mapping]]] = ...) -> None: ...

class GetSecureRoundRequest(_message.Message):
    __slots__ = ("round_id", "after", "wait_seconds", "confirmations")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CONFIRMATIONS_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    after: SecurePhase
    wait_seconds: int
    confirmations: int
    def __init__(self, round_id: _Optional[int] = ..., after: _Optional[_Union[SecurePhase, str]] = ..., wait_seconds: _Optional[int] = ..., confirmations: _Optional[int] = ...) -> None: ...

class SecureRoundStatus(_message.Message):
    __slots__ = ("round_id", "phase", "threshold", "neighbours", "roster", "dealers", "sealed", "survivors", "dropped", "message", "confirmations")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    ROSTER_FIELD_NUMBER: _ClassVar[int]
    DEALERS_FIELD_NUMBER: _ClassVar[int]
    SEALED_FIELD_NUMBER: _ClassVar[int]
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CONFIRMATIONS_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    phase: SecurePhase
    threshold: int
    neighbours: int
    roster: _containers.RepeatedCompositeFieldContainer[EdgeKeys]
    dealers: _containers.RepeatedScalarFieldContainer[str]
    sealed: _containers.RepeatedCompositeFieldContainer[SealedShare]
    survivors: _containers.RepeatedScalarFieldContainer[str]
    dropped: _containers.RepeatedScalarFieldContainer[str]
    message: str
    confirmations: _containers.RepeatedCompositeFieldContainer[SurvivorConfirmation]
    def __init__(self, round_id: _Optional[int] = ..., phase: _Optional[_Union[SecurePhase, str]] = ..., threshold: _Optional[int] = ..., neighbours: _Optional[int] = ..., roster: _Optional[_Iterable[_Union[EdgeKeys, _Mapping]]] = ..., dealers: _Optional[_Iterable[str]] = ..., sealed: _Optional[_Iterable[_Union[SealedShare, _Mapping]]] = ..., survivors: _Optional[_Iterable[str]] = ..., dropped: _Optional[_Iterable[str]] = ..., message: _Optional[str] = ..., confirmations: _Optional[_Iterable[_Union[SurvivorConfirmation, _Mapping]]] = ...) -> None: ...

class ConfirmSurvivorsRequest(_message.Message):
    __slots__ = ("round_id", "signature")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    signature: bytes
    def __init__(self, round_id: _Optional[int] = ..., signature: _Optional[bytes] = ...) -> None: ...

class SurvivorConfirmation(_message.Message):
    __slots__ = ("edge_id", "signature")
    EDGE_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    edge_id: str
    signature: bytes
    def __init__(self, edge_id: _Optional[str] = ..., signature: _Optional[bytes] = ...) -> None: ...

class RevealedShare(_message.Message):
    __slots__ = ("dealer", "kind", "share")
    DEALER_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    dealer: str
    kind: ShareKind
    share: bytes
    def __init__(self, dealer: _Optional[str] = ..., kind: _Optional[_Union[ShareKind, str]] = ..., share: _Optional[bytes] = ...) -> None: ...

class RevealSharesRequest(_message.Message):
    __slots__ = ("round_id", "shares")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    shares: _containers.RepeatedCompositeFieldContainer[RevealedShare]
    def __init__(self, round_id: _Optional[int] = ..., shares: _Optional[_Iterable[_Union[RevealedShare, _Mapping]]] = ...) -> None: ...

class EdgeProgress(_message.Message):
    __slots__ = ("edge_id", "uploaded", "samples", "bytes", "joined_at", "uploaded_at")
    EDGE_ID_FIELD_NUMBER: _ClassVar[int]
    UPLOADED_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    JOINED_AT_FIELD_NUMBER: _ClassVar[int]
    UPLOADED_AT_FIELD_NUMBER: _ClassVar[int]
    edge_id: str
    uploaded: bool
    samples: int
    bytes: ByteCount
    joined_at: _timestamp_pb2.Timestamp
    uploaded_at: _timestamp_pb2.Timestamp
    def __init__(self, edge_id: _Optional[str] = ..., uploaded: _Optional[bool] = ..., samples: _Optional[int] = ..., bytes: _Optional[_Union[ByteCount, _Mapping]] = ..., joined_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., uploaded_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class RoundStatus(_message.Message):
    __slots__ = ("round_id", "round_index", "total_rounds", "state", "quorum", "min_edges", "opened_at", "deadline", "closed_at", "edges", "bytes", "state_version", "plan", "message", "duration_seconds", "evaluations", "evaluation")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_INDEX_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    QUORUM_FIELD_NUMBER: _ClassVar[int]
    MIN_EDGES_FIELD_NUMBER: _ClassVar[int]
    OPENED_AT_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    CLOSED_AT_FIELD_NUMBER: _ClassVar[int]
    EDGES_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    STATE_VERSION_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EVALUATIONS_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    round_index: int
    total_rounds: int
    state: RoundState
    quorum: int
    min_edges: int
    opened_at: _timestamp_pb2.Timestamp
    deadline: _timestamp_pb2.Timestamp
    closed_at: _timestamp_pb2.Timestamp
    edges: _containers.RepeatedCompositeFieldContainer[EdgeProgress]
    bytes: ByteCount
    state_version: int
    plan: TrainingPlan
    message: str
    duration_seconds: float
    evaluations: _containers.RepeatedCompositeFieldContainer[EdgeEvaluation]
    evaluation: Evaluation
    def __init__(self, round_id: _Optional[int] = ..., round_index: _Optional[int] = ..., total_rounds: _Optional[int] = ..., state: _Optional[_Union[RoundState, str]] = ..., quorum: _Optional[int] = ..., min_edges: _Optional[int] = ..., opened_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., deadline: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., closed_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., edges: _Optional[_Iterable[_Union[EdgeProgress, _Mapping]]] = ..., bytes: _Optional[_Union[ByteCount, _Mapping]] = ..., state_version: _Optional[int] = ..., plan: _Optional[_Union[TrainingPlan, _Mapping]] = ..., message: _Optional[str] = ..., duration_seconds: _Optional[float] = ..., evaluations: _Optional[_Iterable[_Union[EdgeEvaluation, _Mapping]]] = ..., evaluation: _Optional[_Union[Evaluation, _Mapping]] = ...) -> None: ...

class Evaluation(_message.Message):
    __slots__ = ("samples", "loss", "word_accuracy", "char_accuracy")
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    WORD_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    CHAR_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    samples: int
    loss: float
    word_accuracy: float
    char_accuracy: float
    def __init__(self, samples: _Optional[int] = ..., loss: _Optional[float] = ..., word_accuracy: _Optional[float] = ..., char_accuracy: _Optional[float] = ...) -> None: ...

class EvaluationReport(_message.Message):
    __slots__ = ("state_version", "generic", "personal")
    STATE_VERSION_FIELD_NUMBER: _ClassVar[int]
    GENERIC_FIELD_NUMBER: _ClassVar[int]
    PERSONAL_FIELD_NUMBER: _ClassVar[int]
    state_version: int
    generic: Evaluation
    personal: Evaluation
    def __init__(self, state_version: _Optional[int] = ..., generic: _Optional[_Union[Evaluation, _Mapping]] = ..., personal: _Optional[_Union[Evaluation, _Mapping]] = ...) -> None: ...

class EvaluationReceipt(_message.Message):
    __slots__ = ("round_id",)
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    def __init__(self, round_id: _Optional[int] = ...) -> None: ...

class EdgeEvaluation(_message.Message):
    __slots__ = ("edge_id", "generic", "personal")
    EDGE_ID_FIELD_NUMBER: _ClassVar[int]
    GENERIC_FIELD_NUMBER: _ClassVar[int]
    PERSONAL_FIELD_NUMBER: _ClassVar[int]
    edge_id: str
    generic: Evaluation
    personal: Evaluation
    def __init__(self, edge_id: _Optional[str] = ..., generic: _Optional[_Union[Evaluation, _Mapping]] = ..., personal: _Optional[_Union[Evaluation, _Mapping]] = ...) -> None: ...

class GetRoundRequest(_message.Message):
    __slots__ = ("round_id",)
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    def __init__(self, round_id: _Optional[int] = ...) -> None: ...

class ListRoundsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListRoundsResponse(_message.Message):
    __slots__ = ("rounds", "total_bytes", "state_version")
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    STATE_VERSION_FIELD_NUMBER: _ClassVar[int]
    rounds: _containers.RepeatedCompositeFieldContainer[RoundStatus]
    total_bytes: ByteCount
    state_version: int
    def __init__(self, rounds: _Optional[_Iterable[_Union[RoundStatus, _Mapping]]] = ..., total_bytes: _Optional[_Union[ByteCount, _Mapping]] = ..., state_version: _Optional[int] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("manifest", "held_state_version", "wait_seconds")
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    HELD_STATE_VERSION_FIELD_NUMBER: _ClassVar[int]
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    manifest: Manifest
    held_state_version: int
    wait_seconds: int
    def __init__(self, manifest: _Optional[_Union[Manifest, _Mapping]] = ..., held_state_version: _Optional[int] = ..., wait_seconds: _Optional[int] = ...) -> None: ...

class JoinResponse(_message.Message):
    __slots__ = ("action", "round_id", "round_index", "total_rounds", "plan", "state_version", "edge_id", "deadline")
    class Action(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        ACTION_UNSPECIFIED: _ClassVar[JoinResponse.Action]
        ACTION_TRAIN: _ClassVar[JoinResponse.Action]
        ACTION_WAIT: _ClassVar[JoinResponse.Action]
        ACTION_FINISHED: _ClassVar[JoinResponse.Action]
    ACTION_UNSPECIFIED: JoinResponse.Action
    ACTION_TRAIN: JoinResponse.Action
    ACTION_WAIT: JoinResponse.Action
    ACTION_FINISHED: JoinResponse.Action
    ACTION_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_INDEX_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    STATE_VERSION_FIELD_NUMBER: _ClassVar[int]
    EDGE_ID_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    action: JoinResponse.Action
    round_id: int
    round_index: int
    total_rounds: int
    plan: TrainingPlan
    state_version: int
    edge_id: str
    deadline: _timestamp_pb2.Timestamp
    def __init__(self, action: _Optional[_Union[JoinResponse.Action, str]] = ..., round_id: _Optional[int] = ..., round_index: _Optional[int] = ..., total_rounds: _Optional[int] = ..., plan: _Optional[_Union[TrainingPlan, _Mapping]] = ..., state_version: _Optional[int] = ..., edge_id: _Optional[str] = ..., deadline: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class DownloadStateRequest(_message.Message):
    __slots__ = ("held_state_version",)
    HELD_STATE_VERSION_FIELD_NUMBER: _ClassVar[int]
    held_state_version: int
    def __init__(self, held_state_version: _Optional[int] = ...) -> None: ...

class StateHeader(_message.Message):
    __slots__ = ("state_version", "tensors", "encoding", "compression", "unchanged", "raw_bytes", "wire_bytes", "base_state_version", "state_sha256")
    STATE_VERSION_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    UNCHANGED_FIELD_NUMBER: _ClassVar[int]
    RAW_BYTES_FIELD_NUMBER: _ClassVar[int]
    WIRE_BYTES_FIELD_NUMBER: _ClassVar[int]
    BASE_STATE_VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_SHA256_FIELD_NUMBER: _ClassVar[int]
    state_version: int
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    encoding: Encoding
    compression: Compression
    unchanged: bool
    raw_bytes: int
    wire_bytes: int
    base_state_version: int
    state_sha256: bytes
    def __init__(self, state_version: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., encoding: _Optional[_Union[Encoding, str]] = ..., compression: _Optional[_Union[Compression, str]] = ..., unchanged: _Optional[bool] = ..., raw_bytes: _Optional[int] = ..., wire_bytes: _Optional[int] = ..., base_state_version: _Optional[int] = ..., state_sha256: _Optional[bytes] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("tensor_id", "offset", "count", "payload", "seq")
    TENSOR_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    tensor_id: int
    offset: int
    count: int
    payload: bytes
    seq: int
    def __init__(self, tensor_id: _Optional[int] = ..., offset: _Optional[int] = ..., count: _Optional[int] = ..., payload: _Optional[bytes] = ..., seq: _Optional[int] = ...) -> None: ...

class Trailer(_message.Message):
    __slots__ = ("sha256", "chunk_count")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    CHUNK_COUNT_FIELD_NUMBER: _ClassVar[int]
    sha256: bytes
    chunk_count: int
    def __init__(self, sha256: _Optional[bytes] = ..., chunk_count: _Optional[int] = ...) -> None: ...

class StateChunk(_message.Message):
    __slots__ = ("header", "chunk", "trailer")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    TRAILER_FIELD_NUMBER: _ClassVar[int]
    header: StateHeader
    chunk: TensorChunk
    trailer: Trailer
    def __init__(self, header: _Optional[_Union[StateHeader, _Mapping]] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ..., trailer: _Optional[_Union[Trailer, _Mapping]] = ...) -> None: ...

class UploadHeader(_message.Message):
    __slots__ = ("round_id", "sample_count", "fingerprint", "encoding", "compression", "base_state_version")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_COUNT_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    BASE_STATE_VERSION_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    sample_count: int
    fingerprint: bytes
    encoding: Encoding
    compression: Compression
    base_state_version: int
    def __init__(self, round_id: _Optional[int] = ..., sample_count: _Optional[int] = ..., fingerprint: _Optional[bytes] = ..., encoding: _Optional[_Union[Encoding, str]] = ..., compression: _Optional[_Union[Compression, str]] = ..., base_state_version: _Optional[int] = ...) -> None: ...

class UploadMessage(_message.Message):
    __slots__ = ("header", "chunk", "trailer")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    TRAILER_FIELD_NUMBER: _ClassVar[int]
    header: UploadHeader
    chunk: TensorChunk
    trailer: Trailer
    def __init__(self, header: _Optional[_Union[UploadHeader, _Mapping]] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ..., trailer: _Optional[_Union[Trailer, _Mapping]] = ...) -> None: ...

class UploadReceipt(_message.Message):
    __slots__ = ("round_id", "edge_id", "raw_bytes", "wire_bytes", "committed_edges", "round_state", "sha256")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    EDGE_ID_FIELD_NUMBER: _ClassVar[int]
    RAW_BYTES_FIELD_NUMBER: _ClassVar[int]
    WIRE_BYTES_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_EDGES_FIELD_NUMBER: _ClassVar[int]
    ROUND_STATE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    edge_id: str
    raw_bytes: int
    wire_bytes: int
    committed_edges: int
    round_state: RoundState
    sha256: bytes
    def __init__(self, round_id: _Optional[int] = ..., edge_id: _Optional[str] = ..., raw_bytes: _Optional[int] = ..., wire_bytes: _Optional[int] = ..., committed_edges: _Optional[int] = ..., round_state: _Optional[_Union[RoundState, str]] = ..., sha256: _Optional[bytes] = ...) -> None: ...
