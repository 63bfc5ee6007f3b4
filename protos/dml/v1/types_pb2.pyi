from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_PENDING: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_PENDING: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState

class JobSpec(_message.Message):
    __slots__ = ("task", "rounds", "local_steps", "batch_size", "learning_rate", "min_peers", "sharding", "aggregation", "seed", "num_shards", "checkpoint_every_rounds", "peer_grace_s", "codec", "data_plane", "eval_every_rounds", "gossip_topology", "gossip_timeout_ms", "task_digest", "sync", "optimizer_state", "outer_optimizer", "outer_lr", "outer_momentum", "prox_mu", "min_shard_samples", "dataset", "pool", "max_peers", "placement", "local_data", "precision")
    TASK_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    MIN_PEERS_FIELD_NUMBER: _ClassVar[int]
    SHARDING_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_EVERY_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    PEER_GRACE_S_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    DATA_PLANE_FIELD_NUMBER: _ClassVar[int]
    EVAL_EVERY_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    GOSSIP_TOPOLOGY_FIELD_NUMBER: _ClassVar[int]
    GOSSIP_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    TASK_DIGEST_FIELD_NUMBER: _ClassVar[int]
    SYNC_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_STATE_FIELD_NUMBER: _ClassVar[int]
    OUTER_OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    OUTER_LR_FIELD_NUMBER: _ClassVar[int]
    OUTER_MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    PROX_MU_FIELD_NUMBER: _ClassVar[int]
    MIN_SHARD_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    MAX_PEERS_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    LOCAL_DATA_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    task: str
    rounds: int
    local_steps: int
    batch_size: int
    learning_rate: float
    min_peers: int
    sharding: str
    aggregation: str
    seed: int
    num_shards: int
    checkpoint_every_rounds: int
    peer_grace_s: int
    codec: str
    data_plane: str
    eval_every_rounds: int
    gossip_topology: str
    gossip_timeout_ms: int
    task_digest: str
    sync: str
    optimizer_state: str
    outer_optimizer: str
    outer_lr: float
    outer_momentum: float
    prox_mu: float
    min_shard_samples: int
    dataset: str
    pool: str
    max_peers: int
    placement: str
    local_data: str
    precision: str
    def __init__(self, task: _Optional[str] = ..., rounds: _Optional[int] = ..., local_steps: _Optional[int] = ..., batch_size: _Optional[int] = ..., learning_rate: _Optional[float] = ..., min_peers: _Optional[int] = ..., sharding: _Optional[str] = ..., aggregation: _Optional[str] = ..., seed: _Optional[int] = ..., num_shards: _Optional[int] = ..., checkpoint_every_rounds: _Optional[int] = ..., peer_grace_s: _Optional[int] = ..., codec: _Optional[str] = ..., data_plane: _Optional[str] = ..., eval_every_rounds: _Optional[int] = ..., gossip_topology: _Optional[str] = ..., gossip_timeout_ms: _Optional[int] = ..., task_digest: _Optional[str] = ..., sync: _Optional[str] = ..., optimizer_state: _Optional[str] = ..., outer_optimizer: _Optional[str] = ..., outer_lr: _Optional[float] = ..., outer_momentum: _Optional[float] = ..., prox_mu: _Optional[float] = ..., min_shard_samples: _Optional[int] = ..., dataset: _Optional[str] = ..., pool: _Optional[str] = ..., max_peers: _Optional[int] = ..., placement: _Optional[str] = ..., local_data: _Optional[str] = ..., precision: _Optional[str] = ...) -> None: ...

class SampleRange(_message.Message):
    __slots__ = ("shard_id", "start", "stop", "data_epoch")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    DATA_EPOCH_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    start: int
    stop: int
    data_epoch: int
    def __init__(self, shard_id: _Optional[int] = ..., start: _Optional[int] = ..., stop: _Optional[int] = ..., data_epoch: _Optional[int] = ...) -> None: ...

class MemberSamples(_message.Message):
    __slots__ = ("peer_id", "ranges")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    RANGES_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    ranges: _containers.RepeatedCompositeFieldContainer[SampleRange]
    def __init__(self, peer_id: _Optional[str] = ..., ranges: _Optional[_Iterable[_Union[SampleRange, _Mapping]]] = ...) -> None: ...

class RoundMetrics(_message.Message):
    __slots__ = ("round", "epoch", "train_loss", "test_accuracy", "test_loss", "samples", "digest", "duration_ms", "members", "data_epoch", "consumed", "train_ms", "exchange_ms", "committed_unix_ms", "test_evaluated", "eval_ms", "consensus_distance", "bytes_sent", "test_metrics")
    class TestMetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ROUND_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    TEST_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    TEST_LOSS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    DATA_EPOCH_FIELD_NUMBER: _ClassVar[int]
    CONSUMED_FIELD_NUMBER: _ClassVar[int]
    TRAIN_MS_FIELD_NUMBER: _ClassVar[int]
    EXCHANGE_MS_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    TEST_EVALUATED_FIELD_NUMBER: _ClassVar[int]
    EVAL_MS_FIELD_NUMBER: _ClassVar[int]
    CONSENSUS_DISTANCE_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    TEST_METRICS_FIELD_NUMBER: _ClassVar[int]
    round: int
    epoch: int
    train_loss: float
    test_accuracy: float
    test_loss: float
    samples: int
    digest: str
    duration_ms: int
    members: int
    data_epoch: int
    consumed: _containers.RepeatedCompositeFieldContainer[MemberSamples]
    train_ms: int
    exchange_ms: int
    committed_unix_ms: int
    test_evaluated: bool
    eval_ms: int
    consensus_distance: float
    bytes_sent: int
    test_metrics: _containers.ScalarMap[str, float]
    def __init__(self, round: _Optional[int] = ..., epoch: _Optional[int] = ..., train_loss: _Optional[float] = ..., test_accuracy: _Optional[float] = ..., test_loss: _Optional[float] = ..., samples: _Optional[int] = ..., digest: _Optional[str] = ..., duration_ms: _Optional[int] = ..., members: _Optional[int] = ..., data_epoch: _Optional[int] = ..., consumed: _Optional[_Iterable[_Union[MemberSamples, _Mapping]]] = ..., train_ms: _Optional[int] = ..., exchange_ms: _Optional[int] = ..., committed_unix_ms: _Optional[int] = ..., test_evaluated: _Optional[bool] = ..., eval_ms: _Optional[int] = ..., consensus_distance: _Optional[float] = ..., bytes_sent: _Optional[int] = ..., test_metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class Member(_message.Message):
    __slots__ = ("peer_id", "address", "shard_ids", "samples", "public_key")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SHARD_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    address: str
    shard_ids: _containers.RepeatedScalarFieldContainer[int]
    samples: _containers.RepeatedCompositeFieldContainer[SampleRange]
    public_key: bytes
    def __init__(self, peer_id: _Optional[str] = ..., address: _Optional[str] = ..., shard_ids: _Optional[_Iterable[int]] = ..., samples: _Optional[_Iterable[_Union[SampleRange, _Mapping]]] = ..., public_key: _Optional[bytes] = ...) -> None: ...

class Plan(_message.Message):
    __slots__ = ("job_id", "round", "epoch", "members", "spec", "checkpoint", "data_epoch", "shard_indices", "start_digest", "gossip", "evaluate", "member_ticket", "take")
    class ShardIndicesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: ShardIndices
        def __init__(self, key: _Optional[int] = ..., value: _Optional[_Union[ShardIndices, _Mapping]] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    DATA_EPOCH_FIELD_NUMBER: _ClassVar[int]
    SHARD_INDICES_FIELD_NUMBER: _ClassVar[int]
    START_DIGEST_FIELD_NUMBER: _ClassVar[int]
    GOSSIP_FIELD_NUMBER: _ClassVar[int]
    EVALUATE_FIELD_NUMBER: _ClassVar[int]
    MEMBER_TICKET_FIELD_NUMBER: _ClassVar[int]
    TAKE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    round: int
    epoch: int
    members: _containers.RepeatedCompositeFieldContainer[Member]
    spec: JobSpec
    checkpoint: bool
    data_epoch: int
    shard_indices: _containers.MessageMap[int, ShardIndices]
    start_digest: str
    gossip: bool
    evaluate: bool
    member_ticket: bytes
    take: bool
    def __init__(self, job_id: _Optional[str] = ..., round: _Optional[int] = ..., epoch: _Optional[int] = ..., members: _Optional[_Iterable[_Union[Member, _Mapping]]] = ..., spec: _Optional[_Union[JobSpec, _Mapping]] = ..., checkpoint: _Optional[bool] = ..., data_epoch: _Optional[int] = ..., shard_indices: _Optional[_Mapping[int, ShardIndices]] = ..., start_digest: _Optional[str] = ..., gossip: _Optional[bool] = ..., evaluate: _Optional[bool] = ..., member_ticket: _Optional[bytes] = ..., take: _Optional[bool] = ...) -> None: ...

class ShardIndices(_message.Message):
    __slots__ = ("indices",)
    INDICES_FIELD_NUMBER: _ClassVar[int]
    indices: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, indices: _Optional[_Iterable[int]] = ...) -> None: ...
