from dml.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EvictionCause(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVICTION_CAUSE_UNSPECIFIED: _ClassVar[EvictionCause]
    EVICTION_CAUSE_HEARTBEAT_TIMEOUT: _ClassVar[EvictionCause]
    EVICTION_CAUSE_NEIGHBOUR_REPORT: _ClassVar[EvictionCause]
    EVICTION_CAUSE_SELF_REPORT: _ClassVar[EvictionCause]
    EVICTION_CAUSE_ROUND_DEADLINE: _ClassVar[EvictionCause]
    EVICTION_CAUSE_REPLACED: _ClassVar[EvictionCause]
    EVICTION_CAUSE_QUARANTINED: _ClassVar[EvictionCause]
    EVICTION_CAUSE_UNREACHABLE: _ClassVar[EvictionCause]
    EVICTION_CAUSE_PROTOCOL_MISMATCH: _ClassVar[EvictionCause]
EVICTION_CAUSE_UNSPECIFIED: EvictionCause
EVICTION_CAUSE_HEARTBEAT_TIMEOUT: EvictionCause
EVICTION_CAUSE_NEIGHBOUR_REPORT: EvictionCause
EVICTION_CAUSE_SELF_REPORT: EvictionCause
EVICTION_CAUSE_ROUND_DEADLINE: EvictionCause
EVICTION_CAUSE_REPLACED: EvictionCause
EVICTION_CAUSE_QUARANTINED: EvictionCause
EVICTION_CAUSE_UNREACHABLE: EvictionCause
EVICTION_CAUSE_PROTOCOL_MISMATCH: EvictionCause

class JobStatus(_message.Message):
    __slots__ = ("job_id", "spec", "state", "round", "epoch", "peers", "last", "reason", "created_unix_ms", "updated_unix_ms", "checkpoint_round", "samples", "data_epoch", "rolled_back_rounds", "evictions", "epochs", "evictions_total", "quarantined", "held_out", "declined", "data_present_samples", "data_seen_samples", "data_sources_present", "data_sources_seen")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    UPDATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_ROUND_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    DATA_EPOCH_FIELD_NUMBER: _ClassVar[int]
    ROLLED_BACK_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    QUARANTINED_FIELD_NUMBER: _ClassVar[int]
    HELD_OUT_FIELD_NUMBER: _ClassVar[int]
    DECLINED_FIELD_NUMBER: _ClassVar[int]
    DATA_PRESENT_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    DATA_SEEN_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    DATA_SOURCES_PRESENT_FIELD_NUMBER: _ClassVar[int]
    DATA_SOURCES_SEEN_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    spec: _types_pb2.JobSpec
    state: _types_pb2.JobState
    round: int
    epoch: int
    peers: _containers.RepeatedScalarFieldContainer[str]
    last: _types_pb2.RoundMetrics
    reason: str
    created_unix_ms: int
    updated_unix_ms: int
    checkpoint_round: int
    samples: int
    data_epoch: int
    rolled_back_rounds: int
    evictions: _containers.RepeatedCompositeFieldContainer[Eviction]
    epochs: _containers.RepeatedCompositeFieldContainer[MembershipEpoch]
    evictions_total: int
    quarantined: _containers.RepeatedCompositeFieldContainer[PeerExclusion]
    held_out: _containers.RepeatedCompositeFieldContainer[PeerExclusion]
    declined: _containers.RepeatedCompositeFieldContainer[PeerExclusion]
    data_present_samples: int
    data_seen_samples: int
    data_sources_present: int
    data_sources_seen: int
    def __init__(self, job_id: _Optional[str] = ..., spec: _Optional[_Union[_types_pb2.JobSpec, _Mapping]] = ..., state: _Optional[_Union[_types_pb2.JobState, str]] = ..., round: _Optional[int] = ..., epoch: _Optional[int] = ..., peers: _Optional[_Iterable[str]] = ..., last: _Optional[_Union[_types_pb2.RoundMetrics, _Mapping]] = ..., reason: _Optional[str] = ..., created_unix_ms: _Optional[int] = ..., updated_unix_ms: _Optional[int] = ..., checkpoint_round: _Optional[int] = ..., samples: _Optional[int] = ..., data_epoch: _Optional[int] = ..., rolled_back_rounds: _Optional[int] = ..., evictions: _Optional[_Iterable[_Union[Eviction, _Mapping]]] = ..., epochs: _Optional[_Iterable[_Union[MembershipEpoch, _Mapping]]] = ..., evictions_total: _Optional[int] = ..., quarantined: _Optional[_Iterable[_Union[PeerExclusion, _Mapping]]] = ..., held_out: _Optional[_Iterable[_Union[PeerExclusion, _Mapping]]] = ..., declined: _Optional[_Iterable[_Union[PeerExclusion, _Mapping]]] = ..., data_present_samples: _Optional[int] = ..., data_seen_samples: _Optional[int] = ..., data_sources_present: _Optional[int] = ..., data_sources_seen: _Optional[int] = ...) -> None: ...

class PeerExclusion(_message.Message):
    __slots__ = ("peer_id", "round", "reason", "unix_ms", "reporters")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    REPORTERS_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    round: int
    reason: str
    unix_ms: int
    reporters: str
    def __init__(self, peer_id: _Optional[str] = ..., round: _Optional[int] = ..., reason: _Optional[str] = ..., unix_ms: _Optional[int] = ..., reporters: _Optional[str] = ...) -> None: ...

class Eviction(_message.Message):
    __slots__ = ("peer_id", "cause", "reporter", "unix_ms", "epoch", "round", "detail")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    CAUSE_FIELD_NUMBER: _ClassVar[int]
    REPORTER_FIELD_NUMBER: _ClassVar[int]
    UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    cause: EvictionCause
    reporter: str
    unix_ms: int
    epoch: int
    round: int
    detail: str
    def __init__(self, peer_id: _Optional[str] = ..., cause: _Optional[_Union[EvictionCause, str]] = ..., reporter: _Optional[str] = ..., unix_ms: _Optional[int] = ..., epoch: _Optional[int] = ..., round: _Optional[int] = ..., detail: _Optional[str] = ...) -> None: ...

class MembershipEpoch(_message.Message):
    __slots__ = ("epoch", "peers", "started_unix_ms", "round")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    STARTED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    peers: _containers.RepeatedScalarFieldContainer[str]
    started_unix_ms: int
    round: int
    def __init__(self, epoch: _Optional[int] = ..., peers: _Optional[_Iterable[str]] = ..., started_unix_ms: _Optional[int] = ..., round: _Optional[int] = ...) -> None: ...

class SubmitJobRequest(_message.Message):
    __slots__ = ("spec", "task_code")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    TASK_CODE_FIELD_NUMBER: _ClassVar[int]
    spec: _types_pb2.JobSpec
    task_code: bytes
    def __init__(self, spec: _Optional[_Union[_types_pb2.JobSpec, _Mapping]] = ..., task_code: _Optional[bytes] = ...) -> None: ...

class SubmitJobResponse(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id", "include_history")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_HISTORY_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    include_history: bool
    def __init__(self, job_id: _Optional[str] = ..., include_history: _Optional[bool] = ...) -> None: ...

class GetJobResponse(_message.Message):
    __slots__ = ("job", "history")
    JOB_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    job: JobStatus
    history: _containers.RepeatedCompositeFieldContainer[_types_pb2.RoundMetrics]
    def __init__(self, job: _Optional[_Union[JobStatus, _Mapping]] = ..., history: _Optional[_Iterable[_Union[_types_pb2.RoundMetrics, _Mapping]]] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[JobStatus]
    def __init__(self, jobs: _Optional[_Iterable[_Union[JobStatus, _Mapping]]] = ...) -> None: ...

class ListPeersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PeerInfo(_message.Message):
    __slots__ = ("peer_id", "address", "pool", "device", "memory_bytes", "samples_per_s", "state", "job_id", "training_share", "exchange_share", "idle_share", "registered_unix_ms", "max_samples", "local_datasets", "workers", "worker_devices")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_PER_S_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TRAINING_SHARE_FIELD_NUMBER: _ClassVar[int]
    EXCHANGE_SHARE_FIELD_NUMBER: _ClassVar[int]
    IDLE_SHARE_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    LOCAL_DATASETS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    WORKER_DEVICES_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    address: str
    pool: str
    device: str
    memory_bytes: int
    samples_per_s: float
    state: str
    job_id: str
    training_share: float
    exchange_share: float
    idle_share: float
    registered_unix_ms: int
    max_samples: int
    local_datasets: _containers.RepeatedScalarFieldContainer[str]
    workers: int
    worker_devices: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, peer_id: _Optional[str] = ..., address: _Optional[str] = ..., pool: _Optional[str] = ..., device: _Optional[str] = ..., memory_bytes: _Optional[int] = ..., samples_per_s: _Optional[float] = ..., state: _Optional[str] = ..., job_id: _Optional[str] = ..., training_share: _Optional[float] = ..., exchange_share: _Optional[float] = ..., idle_share: _Optional[float] = ..., registered_unix_ms: _Optional[int] = ..., max_samples: _Optional[int] = ..., local_datasets: _Optional[_Iterable[str]] = ..., workers: _Optional[int] = ..., worker_devices: _Optional[_Iterable[str]] = ...) -> None: ...

class ListPeersResponse(_message.Message):
    __slots__ = ("peers",)
    PEERS_FIELD_NUMBER: _ClassVar[int]
    peers: _containers.RepeatedCompositeFieldContainer[PeerInfo]
    def __init__(self, peers: _Optional[_Iterable[_Union[PeerInfo, _Mapping]]] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class CancelJobResponse(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: _types_pb2.JobState
    def __init__(self, state: _Optional[_Union[_types_pb2.JobState, str]] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class DownloadModelRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class ModelChunk(_message.Message):
    __slots__ = ("round", "digest", "data")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    round: int
    digest: str
    data: bytes
    def __init__(self, round: _Optional[int] = ..., digest: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class GetShardsRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class PeerShards(_message.Message):
    __slots__ = ("peer_id", "shard_ids", "samples", "label_counts", "data_source", "bytes_fetched", "chunks_fetched", "cache_hits", "damaged_refetched", "cached_shard_ids", "cache_free_bytes", "has_cache_free")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    SHARD_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    LABEL_COUNTS_FIELD_NUMBER: _ClassVar[int]
    DATA_SOURCE_FIELD_NUMBER: _ClassVar[int]
    BYTES_FETCHED_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FETCHED_FIELD_NUMBER: _ClassVar[int]
    CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    DAMAGED_REFETCHED_FIELD_NUMBER: _ClassVar[int]
    CACHED_SHARD_IDS_FIELD_NUMBER: _ClassVar[int]
    CACHE_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    HAS_CACHE_FREE_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    shard_ids: _containers.RepeatedScalarFieldContainer[int]
    samples: int
    label_counts: _containers.RepeatedScalarFieldContainer[int]
    data_source: str
    bytes_fetched: int
    chunks_fetched: int
    cache_hits: int
    damaged_refetched: int
    cached_shard_ids: _containers.RepeatedScalarFieldContainer[int]
    cache_free_bytes: int
    has_cache_free: bool
    def __init__(self, peer_id: _Optional[str] = ..., shard_ids: _Optional[_Iterable[int]] = ..., samples: _Optional[int] = ..., label_counts: _Optional[_Iterable[int]] = ..., data_source: _Optional[str] = ..., bytes_fetched: _Optional[int] = ..., chunks_fetched: _Optional[int] = ..., cache_hits: _Optional[int] = ..., damaged_refetched: _Optional[int] = ..., cached_shard_ids: _Optional[_Iterable[int]] = ..., cache_free_bytes: _Optional[int] = ..., has_cache_free: _Optional[bool] = ...) -> None: ...

class GetShardsResponse(_message.Message):
    __slots__ = ("job_id", "peers", "num_classes", "train_samples", "unassigned")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    TRAIN_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    UNASSIGNED_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    peers: _containers.RepeatedCompositeFieldContainer[PeerShards]
    num_classes: int
    train_samples: int
    unassigned: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, job_id: _Optional[str] = ..., peers: _Optional[_Iterable[_Union[PeerShards, _Mapping]]] = ..., num_classes: _Optional[int] = ..., train_samples: _Optional[int] = ..., unassigned: _Optional[_Iterable[int]] = ...) -> None: ...
