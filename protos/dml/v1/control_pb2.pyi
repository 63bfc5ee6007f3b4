from dml.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DataSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DATA_SOURCE_UNSPECIFIED: _ClassVar[DataSource]
    DATA_SOURCE_LOCAL: _ClassVar[DataSource]
    DATA_SOURCE_STORE: _ClassVar[DataSource]

class CheckpointKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CHECKPOINT_KIND_MODEL: _ClassVar[CheckpointKind]
    CHECKPOINT_KIND_TRAINING_STATE: _ClassVar[CheckpointKind]

class FailureKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FAILURE_KIND_UNSPECIFIED: _ClassVar[FailureKind]
    FAILURE_KIND_UNREACHABLE: _ClassVar[FailureKind]
    FAILURE_KIND_POISONED: _ClassVar[FailureKind]
    FAILURE_KIND_LOCAL: _ClassVar[FailureKind]
    FAILURE_KIND_TASK: _ClassVar[FailureKind]

class TakeOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TAKE_OUTCOME_UNSPECIFIED: _ClassVar[TakeOutcome]
    TAKE_OUTCOME_READY: _ClassVar[TakeOutcome]
    TAKE_OUTCOME_DECLINED: _ClassVar[TakeOutcome]
    TAKE_OUTCOME_TASK_ERROR: _ClassVar[TakeOutcome]
DATA_SOURCE_UNSPECIFIED: DataSource
DATA_SOURCE_LOCAL: DataSource
DATA_SOURCE_STORE: DataSource
CHECKPOINT_KIND_MODEL: CheckpointKind
CHECKPOINT_KIND_TRAINING_STATE: CheckpointKind
FAILURE_KIND_UNSPECIFIED: FailureKind
FAILURE_KIND_UNREACHABLE: FailureKind
FAILURE_KIND_POISONED: FailureKind
FAILURE_KIND_LOCAL: FailureKind
FAILURE_KIND_TASK: FailureKind
TAKE_OUTCOME_UNSPECIFIED: TakeOutcome
TAKE_OUTCOME_READY: TakeOutcome
TAKE_OUTCOME_DECLINED: TakeOutcome
TAKE_OUTCOME_TASK_ERROR: TakeOutcome

class PeerCapability(_message.Message):
    __slots__ = ("device", "memory_bytes", "pool", "max_samples", "cache_free_bytes", "has_cache_free", "local_datasets", "workers", "worker_devices")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    MAX_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    CACHE_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    HAS_CACHE_FREE_FIELD_NUMBER: _ClassVar[int]
    LOCAL_DATASETS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    WORKER_DEVICES_FIELD_NUMBER: _ClassVar[int]
    device: str
    memory_bytes: int
    pool: str
    max_samples: int
    cache_free_bytes: int
    has_cache_free: bool
    local_datasets: _containers.RepeatedScalarFieldContainer[str]
    workers: int
    worker_devices: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, device: _Optional[str] = ..., memory_bytes: _Optional[int] = ..., pool: _Optional[str] = ..., max_samples: _Optional[int] = ..., cache_free_bytes: _Optional[int] = ..., has_cache_free: _Optional[bool] = ..., local_datasets: _Optional[_Iterable[str]] = ..., workers: _Optional[int] = ..., worker_devices: _Optional[_Iterable[str]] = ...) -> None: ...

class DataUsage(_message.Message):
    __slots__ = ("source", "chunks_fetched", "bytes_fetched", "cache_hits", "damaged_refetched", "cached_shard_ids")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FETCHED_FIELD_NUMBER: _ClassVar[int]
    BYTES_FETCHED_FIELD_NUMBER: _ClassVar[int]
    CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    DAMAGED_REFETCHED_FIELD_NUMBER: _ClassVar[int]
    CACHED_SHARD_IDS_FIELD_NUMBER: _ClassVar[int]
    source: DataSource
    chunks_fetched: int
    bytes_fetched: int
    cache_hits: int
    damaged_refetched: int
    cached_shard_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, source: _Optional[_Union[DataSource, str]] = ..., chunks_fetched: _Optional[int] = ..., bytes_fetched: _Optional[int] = ..., cache_hits: _Optional[int] = ..., damaged_refetched: _Optional[int] = ..., cached_shard_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class RegisterPeerRequest(_message.Message):
    __slots__ = ("address", "capability", "public_key", "cluster_id", "protocol_version")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    address: str
    capability: PeerCapability
    public_key: bytes
    cluster_id: str
    protocol_version: int
    def __init__(self, address: _Optional[str] = ..., capability: _Optional[_Union[PeerCapability, _Mapping]] = ..., public_key: _Optional[bytes] = ..., cluster_id: _Optional[str] = ..., protocol_version: _Optional[int] = ...) -> None: ...

class RegisterPeerResponse(_message.Message):
    __slots__ = ("peer_id", "heartbeat_interval_ms", "peer_timeout_ms", "round_deadline_ms", "peer_token", "cluster_id", "coordinator_public_key", "protocol_version")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    PEER_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    ROUND_DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    PEER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    heartbeat_interval_ms: int
    peer_timeout_ms: int
    round_deadline_ms: int
    peer_token: str
    cluster_id: str
    coordinator_public_key: bytes
    protocol_version: int
    def __init__(self, peer_id: _Optional[str] = ..., heartbeat_interval_ms: _Optional[int] = ..., peer_timeout_ms: _Optional[int] = ..., round_deadline_ms: _Optional[int] = ..., peer_token: _Optional[str] = ..., cluster_id: _Optional[str] = ..., coordinator_public_key: _Optional[bytes] = ..., protocol_version: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("peer_id",)
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    def __init__(self, peer_id: _Optional[str] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("epoch", "job_id", "held_out_reason", "cluster_id", "protocol_version")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    HELD_OUT_REASON_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    job_id: str
    held_out_reason: str
    cluster_id: str
    protocol_version: int
    def __init__(self, epoch: _Optional[int] = ..., job_id: _Optional[str] = ..., held_out_reason: _Optional[str] = ..., cluster_id: _Optional[str] = ..., protocol_version: _Optional[int] = ...) -> None: ...

class GetPlanRequest(_message.Message):
    __slots__ = ("peer_id", "last_job_id", "last_round", "last_epoch", "wait_ms")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_JOB_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_ROUND_FIELD_NUMBER: _ClassVar[int]
    LAST_EPOCH_FIELD_NUMBER: _ClassVar[int]
    WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    last_job_id: str
    last_round: int
    last_epoch: int
    wait_ms: int
    def __init__(self, peer_id: _Optional[str] = ..., last_job_id: _Optional[str] = ..., last_round: _Optional[int] = ..., last_epoch: _Optional[int] = ..., wait_ms: _Optional[int] = ...) -> None: ...

class GetPlanResponse(_message.Message):
    __slots__ = ("has_plan", "plan")
    HAS_PLAN_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    has_plan: bool
    plan: _types_pb2.Plan
    def __init__(self, has_plan: _Optional[bool] = ..., plan: _Optional[_Union[_types_pb2.Plan, _Mapping]] = ...) -> None: ...

class ReportRoundRequest(_message.Message):
    __slots__ = ("peer_id", "job_id", "round", "epoch", "samples", "train_loss", "digest", "has_test_metrics", "test_accuracy", "test_loss", "train_samples_per_s", "train_ms", "exchange_ms", "eval_ms", "pair_distance", "has_pair_distance", "bytes_sent", "update_norm", "test_metrics", "data_usage", "cache_free_bytes", "has_cache_free")
    class TestMetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    HAS_TEST_METRICS_FIELD_NUMBER: _ClassVar[int]
    TEST_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    TEST_LOSS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_SAMPLES_PER_S_FIELD_NUMBER: _ClassVar[int]
    TRAIN_MS_FIELD_NUMBER: _ClassVar[int]
    EXCHANGE_MS_FIELD_NUMBER: _ClassVar[int]
    EVAL_MS_FIELD_NUMBER: _ClassVar[int]
    PAIR_DISTANCE_FIELD_NUMBER: _ClassVar[int]
    HAS_PAIR_DISTANCE_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    UPDATE_NORM_FIELD_NUMBER: _ClassVar[int]
    TEST_METRICS_FIELD_NUMBER: _ClassVar[int]
    DATA_USAGE_FIELD_NUMBER: _ClassVar[int]
    CACHE_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    HAS_CACHE_FREE_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    job_id: str
    round: int
    epoch: int
    samples: int
    train_loss: float
    digest: str
    has_test_metrics: bool
    test_accuracy: float
    test_loss: float
    train_samples_per_s: float
    train_ms: int
    exchange_ms: int
    eval_ms: int
    pair_distance: float
    has_pair_distance: bool
    bytes_sent: int
    update_norm: float
    test_metrics: _containers.ScalarMap[str, float]
    data_usage: DataUsage
    cache_free_bytes: int
    has_cache_free: bool
    def __init__(self, peer_id: _Optional[str] = ..., job_id: _Optional[str] = ..., round: _Optional[int] = ..., epoch: _Optional[int] = ..., samples: _Optional[int] = ..., train_loss: _Optional[float] = ..., digest: _Optional[str] = ..., has_test_metrics: _Optional[bool] = ..., test_accuracy: _Optional[float] = ..., test_loss: _Optional[float] = ..., train_samples_per_s: _Optional[float] = ..., train_ms: _Optional[int] = ..., exchange_ms: _Optional[int] = ..., eval_ms: _Optional[int] = ..., pair_distance: _Optional[float] = ..., has_pair_distance: _Optional[bool] = ..., bytes_sent: _Optional[int] = ..., update_norm: _Optional[float] = ..., test_metrics: _Optional[_Mapping[str, float]] = ..., data_usage: _Optional[_Union[DataUsage, _Mapping]] = ..., cache_free_bytes: _Optional[int] = ..., has_cache_free: _Optional[bool] = ...) -> None: ...

class ReportRoundResponse(_message.Message):
    __slots__ = ("committed", "has_next", "next")
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    HAS_NEXT_FIELD_NUMBER: _ClassVar[int]
    NEXT_FIELD_NUMBER: _ClassVar[int]
    committed: bool
    has_next: bool
    next: _types_pb2.Plan
    def __init__(self, committed: _Optional[bool] = ..., has_next: _Optional[bool] = ..., next: _Optional[_Union[_types_pb2.Plan, _Mapping]] = ...) -> None: ...

class ReportFailureRequest(_message.Message):
    __slots__ = ("peer_id", "job_id", "round", "epoch", "suspect_peer_id", "detail", "kind")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SUSPECT_PEER_ID_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    job_id: str
    round: int
    epoch: int
    suspect_peer_id: str
    detail: str
    kind: FailureKind
    def __init__(self, peer_id: _Optional[str] = ..., job_id: _Optional[str] = ..., round: _Optional[int] = ..., epoch: _Optional[int] = ..., suspect_peer_id: _Optional[str] = ..., detail: _Optional[str] = ..., kind: _Optional[_Union[FailureKind, str]] = ...) -> None: ...

class ReportFailureResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CheckpointChunk(_message.Message):
    __slots__ = ("peer_id", "job_id", "round", "digest", "epoch", "data", "kind")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    job_id: str
    round: int
    digest: str
    epoch: int
    data: bytes
    kind: CheckpointKind
    def __init__(self, peer_id: _Optional[str] = ..., job_id: _Optional[str] = ..., round: _Optional[int] = ..., digest: _Optional[str] = ..., epoch: _Optional[int] = ..., data: _Optional[bytes] = ..., kind: _Optional[_Union[CheckpointKind, str]] = ...) -> None: ...

class UploadCheckpointResponse(_message.Message):
    __slots__ = ("size_bytes",)
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    size_bytes: int
    def __init__(self, size_bytes: _Optional[int] = ...) -> None: ...

class DataInfo(_message.Message):
    __slots__ = ("train_samples", "test_samples", "labels", "num_classes", "batch_size", "num_params", "data_digest", "label_counts")
    TRAIN_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    TEST_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_PARAMS_FIELD_NUMBER: _ClassVar[int]
    DATA_DIGEST_FIELD_NUMBER: _ClassVar[int]
    LABEL_COUNTS_FIELD_NUMBER: _ClassVar[int]
    train_samples: int
    test_samples: int
    labels: bytes
    num_classes: int
    batch_size: int
    num_params: int
    data_digest: str
    label_counts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, train_samples: _Optional[int] = ..., test_samples: _Optional[int] = ..., labels: _Optional[bytes] = ..., num_classes: _Optional[int] = ..., batch_size: _Optional[int] = ..., num_params: _Optional[int] = ..., data_digest: _Optional[str] = ..., label_counts: _Optional[_Iterable[int]] = ...) -> None: ...

class TakeJobRequest(_message.Message):
    __slots__ = ("peer_id", "job_id", "outcome", "detail", "data", "data_usage", "cache_free_bytes", "has_cache_free")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    DATA_USAGE_FIELD_NUMBER: _ClassVar[int]
    CACHE_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    HAS_CACHE_FREE_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    job_id: str
    outcome: TakeOutcome
    detail: str
    data: DataInfo
    data_usage: DataUsage
    cache_free_bytes: int
    has_cache_free: bool
    def __init__(self, peer_id: _Optional[str] = ..., job_id: _Optional[str] = ..., outcome: _Optional[_Union[TakeOutcome, str]] = ..., detail: _Optional[str] = ..., data: _Optional[_Union[DataInfo, _Mapping]] = ..., data_usage: _Optional[_Union[DataUsage, _Mapping]] = ..., cache_free_bytes: _Optional[int] = ..., has_cache_free: _Optional[bool] = ...) -> None: ...

class TakeJobResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FetchTaskCodeRequest(_message.Message):
    __slots__ = ("peer_id", "job_id", "digest")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    job_id: str
    digest: str
    def __init__(self, peer_id: _Optional[str] = ..., job_id: _Optional[str] = ..., digest: _Optional[str] = ...) -> None: ...

class FetchTaskCodeResponse(_message.Message):
    __slots__ = ("bundle",)
    BUNDLE_FIELD_NUMBER: _ClassVar[int]
    bundle: bytes
    def __init__(self, bundle: _Optional[bytes] = ...) -> None: ...

class GetShardIndicesRequest(_message.Message):
    __slots__ = ("peer_id", "job_id", "shard_ids")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SHARD_IDS_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    job_id: str
    shard_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, peer_id: _Optional[str] = ..., job_id: _Optional[str] = ..., shard_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class GetShardIndicesResponse(_message.Message):
    __slots__ = ("shard_indices",)
    class ShardIndicesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: _types_pb2.ShardIndices
        def __init__(self, key: _Optional[int] = ..., value: _Optional[_Union[_types_pb2.ShardIndices, _Mapping]] = ...) -> None: ...
    SHARD_INDICES_FIELD_NUMBER: _ClassVar[int]
    shard_indices: _containers.MessageMap[int, _types_pb2.ShardIndices]
    def __init__(self, shard_indices: _Optional[_Mapping[int, _types_pb2.ShardIndices]] = ...) -> None: ...
